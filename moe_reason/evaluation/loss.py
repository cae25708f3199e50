"""Loss, perplexity, token accuracy and exact match of a model on batches: what the trainer's evaluation and
the evaluate command both report."""

import math

import torch
from tqdm.auto import tqdm

from ..models.modeling_moe_reason import next_token_statistics


def summarise_eval(stats: torch.Tensor, vocab_size: int) -> dict[str, float]:
    """Per-sequence [N, 3] statistics -> loss, perplexity, token accuracy, exact match (the share of
    sequences with every labelled token right: a puzzle solved), tokens, ln(vocab)."""
    nll, tokens, correct = stats.double().sum(0).tolist()
    loss = nll / max(tokens, 1.0)
    labelled = stats[:, 1] > 0
    exact = float((stats[labelled, 2] == stats[labelled, 1]).double().mean()) if labelled.any() else 0.0
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "accuracy": correct / max(tokens, 1.0),
            "exact_match": exact, "tokens": int(tokens), "ln_vocab": math.log(vocab_size)}


def load_summary(load: torch.Tensor) -> dict[str, float]:
    """Tokens per expert per layer [L, E] (this process's share of the batches) -> the mean over layers of the
    busiest expert's load over the mean (1 = balanced) and of the load's entropy over ln(E) (1 = uniform)."""
    share = load / load.sum(-1, keepdim=True).clamp(min=1)  # [L, E]
    entropy = -(share * share.clamp(min=1e-12).log()).sum(-1) / math.log(load.shape[-1])  # [L]
    return {"load_max_over_mean": float((load.max(-1).values / load.mean(-1).clamp(min=1e-9)).mean()),
            "load_entropy": float(entropy.mean())}


@torch.no_grad()
def evaluate_model(model, batches, config, gather=lambda t: t, progress: bool = False, validate=None) -> dict:
    """Loss, perplexity, accuracy, exact match (and recursion steps) over `batches`; `gather` joins ranks' tensors.

    `model` may be wrapped (DDP, a DeepSpeed engine), so its config is passed in.
    Statistics are computed from fp32 logits and summed in float64, never in bf16.
    `validate(input_ids [B, S], argmax [B, S]) -> [B] bool`, for a grid model, judges each answer (a task's
    validator): its share is `solved`, where exact match compares with the one stored answer.
    """
    was_training = model.training
    model.eval()
    stats, recursion_steps, load, solved = [], [], None, []
    for batch in tqdm(batches, desc="evaluating", disable=not progress, dynamic_ncols=True):
        out = model(input_ids=batch["input_ids"], use_cache=False)
        stats.append(gather(next_token_statistics(out.logits, batch["labels"], not config.bidirectional,
                                                  config.stablemax_loss)))
        if validate is not None:
            solved.append(gather(validate(batch["input_ids"], out.logits.argmax(-1)).long()))  # gloo: no bool
        if getattr(out, "recursion_steps", None) is not None:
            recursion_steps.append(gather(out.recursion_steps.float().reshape(-1)))
        if getattr(out, "expert_load", None) is not None:
            load = out.expert_load.float() if load is None else load + out.expert_load.float()
    model.train(was_training)
    result = summarise_eval(torch.cat(stats), config.vocab_size)
    if solved:
        result["solved"] = float(torch.cat(solved).double().mean())
    if load is not None and config.num_experts > 1:
        result.update(load_summary(load))
    if recursion_steps:
        steps = torch.cat(recursion_steps)
        result.update(recursion_steps=float(steps.mean()),
                      halt_rate=float((steps < config.halt_max_steps).float().mean()))
    return result
