"""AdamW parameter groups and the learning-rate schedule."""

import math

import torch

from ..errors import UserError

LR_SCHEDULERS = ("linear", "cosine", "constant", "seeds_linear")


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: norms, biases and embeddings (and learned state inits) keep weight_decay 0.

    Embeddings are excluded because decay pulls rarely seen tokens' rows to zero; with a tied
    LM head the shared matrix counts as an embedding. Parameter names are kept in each group
    (`names`) so tests can see what went where; each group has a `name`, which DeepSpeed's MoE
    split needs. Expert-parallel expert weights (tagged `allreduce=False`) then move into
    groups of their own marked `moe`, so ZeRO reduces them only within their expert-data-parallel group.
    """
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or id(param) in embedding_ids or name.endswith("bias"):
            no_decay.append((name, param))
        else:
            decay.append((name, param))
    groups = [
        {"name": "decay", "params": [p for _, p in decay], "names": [n for n, _ in decay],
         "weight_decay": weight_decay},
        {"name": "no_decay", "params": [p for _, p in no_decay], "names": [n for n, _ in no_decay],
         "weight_decay": 0.0},
    ]
    # an empty group (LoRA trains matrices only) is left out: DeepSpeed drops it, and the schedule, built on
    # the groups given, would then have one learning rate too many
    groups = [g for g in groups if g["params"]]
    if any(getattr(p, "allreduce", True) is False for g in groups for p in g["params"]):
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
        for group in groups:
            group.pop("names")  # the split copies groups by params; names would no longer match
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return groups


def lr_multiplier(step: int, warmup_steps: int, max_steps: int, kind: str = "cosine", min_ratio: float = 0.0) -> float:
    """Share of the peak learning rate used by optimizer step `step` (0-based).

    Linear warmup reaches the peak on step `warmup_steps - 1` (step 0 already learns), then
    linear or cosine decay from the peak to `min_ratio` over the remaining steps, or constant.
    `seeds_linear` is the Exp8 seeds' decay, max(min_ratio, (max_steps - step) / (max_steps -
    warmup_steps)): linear towards 0, cut off at the floor, which it reaches 1 - min_ratio of the
    way through the decay (90% with 0.1) instead of at the last step.
    Defined for every pair: warmup 0 starts at the peak; warmup >= max_steps never decays.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    decay_steps = max_steps - warmup_steps  # >= 1 here, because warmup_steps <= step < max_steps
    if kind == "seeds_linear":
        return max(min_ratio, (max_steps - step) / max(1, decay_steps))
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps))
    if kind == "linear":
        shape = 1.0 - progress
    elif kind == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise UserError(f"lr_scheduler={kind!r} is invalid: must be one of {LR_SCHEDULERS}")
    return min_ratio + (1.0 - min_ratio) * shape


def fused_adamw(device: torch.device) -> bool | None:
    """AdamW's `fused` argument: torch's fused kernel on a CPU or CUDA device, one pass over all
    tensors instead of a loop of small kernels per tensor (on a GPU, one launch instead of several
    per group). Elsewhere (None) torch picks its default implementation."""
    return True if device.type in ("cpu", "cuda") else None


def make_optimizer_and_scheduler(model, args, device: torch.device):
    """AdamW (fused where `fused_adamw` says so) over `parameter_groups` and the warmup + decay
    schedule (`lr_multiplier`)."""
    optimizer = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "names"} for g in parameter_groups(model, args.weight_decay)],
        lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
        fused=fused_adamw(device))
    warmup = args.warmup()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(
        step, warmup, args.max_steps, args.lr_scheduler, args.min_lr_ratio))
    return optimizer, scheduler
