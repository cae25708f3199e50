"""What a run trains: its model (built from the arguments for its tokenizer, or from --init_from; this
rank's experts; LoRA; ZeRO-3's leaf module) and its loaders; and how a saved config differs from the one
today's code builds (`config_drift`), which a resume and a study's finished run are checked against."""

import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.utils import CONFIG_NAME

from ..data.prepare import check_against_model, collate_blocks
from ..errors import UserError
from ..models.modeling_recursive import RecursiveMoEReasonForCausalLM
from ..safe_loading import from_pretrained
from .accelerator import zero_stage
from .arguments import build_config
from .lora import add_lora, lora_config


TOKENIZER_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")  # set from the run's tokenizer, not its arguments


def token_ids(tokenizer) -> dict:
    """The config's TOKENIZER_FIELDS for this tokenizer; padding falls back to end-of-sequence."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return dict(zip(TOKENIZER_FIELDS, (tokenizer.bos_token_id, tokenizer.eos_token_id, pad)))


def same_tokenizer(a, b) -> bool:
    """The same token ids for the same strings, and the same special tokens."""
    return a.get_vocab() == b.get_vocab() and token_ids(a) == token_ids(b)


def saved_config(folder: Path):
    """The model config an export or a checkpoint saved (through from_dict: how the export itself loads), or
    None where it saved none."""
    return AutoConfig.from_pretrained(folder) if (folder / CONFIG_NAME).is_file() else None


def config_drift(then, now) -> dict:
    """{field: (then, now)} for the model fields where the saved config `then` differs from the config `now`;
    empty when they agree."""
    if then.model_type != now.model_type:
        return {"model_type": (then.model_type, now.model_type)}
    fields = sorted(type(now).field_names())
    then, now = (json.loads(c.to_json_string(use_diff=False)) for c in (then, now))  # JSON's types on both sides
    return {k: (then.get(k), now[k]) for k in fields if then.get(k) != now[k]}


def describe_drift(drift: dict) -> str:
    """`config_drift`'s fields for a message: "name: saved there, built now, ..."."""
    return ", ".join(f"{k}: {then!r} there, {now!r} now" for k, (then, now) in drift.items())


def build_model(model_args, args, data, accelerator, expert_parallel):
    """The model for this run's tokenizer, this rank's experts kept under expert parallelism -> (model, config)."""
    config = build_config(model_args, vocab_size=len(data.tokenizer), task=data.summary.get("task"))
    for name, value in token_ids(data.tokenizer).items():
        setattr(config, name, value)
    check_against_model(data, config)
    if model_args.init_from:
        model = from_pretrained(AutoModelForCausalLM, model_args.init_from, strict=False, config=config)
    else:  # the Auto mapping's class, built directly: from_config would partition it under ZeRO-3 even with
        # zero3_init_flag false, and the optimizer's parameter groups would then see empty tensors
        model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable()
    described = expert_parallel.shard(model)  # every rank built (or loaded) the same full model
    if isinstance(model, RecursiveMoEReasonForCausalLM):  # `evaluate` runs each forward on every rank together
        model.evaluates_in_step = accelerator.num_processes > 1
    if described:
        accelerator.print(described)
    if model_args.lora_rank:
        model = add_lora(model, lora_config(model_args.lora_rank, model_args.lora_alpha))
    if zero_stage(accelerator) == 3 and not isinstance(model, RecursiveMoEReasonForCausalLM):
        # ZeRO-3 gathers a module's parameters when its forward starts; the MoE block is one leaf, gathered
        # whole, so no rank's routing can change which of its parameters are gathered. Not in the recursive
        # model: a leaf's gradients are reduced by a backward hook that fires at each call, and the recursion
        # calls the block once per pass, so DeepSpeed would reduce the same gradients several times (it asserts
        # in stage3.py, __reduce_and_partition_ipg_grads). Unregistered, each parameter's gradient is reduced
        # once, after the backward of every pass (its accumulation hook); the experts are one module, called in
        # every pass whatever the routing, and halting keeps the ranks' calls in step (see the recursive
        # model's ghost steps). (Imported here: a run without DeepSpeed need not pay for importing it.)
        from deepspeed.utils import set_z3_leaf_modules
        set_z3_leaf_modules(model, [type(model.model.layers[0].mlp)])
    return model, config


def make_loaders(data, args, num_processes: int) -> tuple[DataLoader, DataLoader]:
    """Training loader (seeded epoch order, resumable; or this rank's stream, in order) and the fixed
    validation slice."""
    # a stream (no sampler) is already this rank's share, read in order with no workers, so its state is the
    # loader's. The loader's own generator: each new iterator draws a seed from it, which from the global one
    # would shift the dropout of a resumed stream (it starts its iterator after the random states are restored)
    sampler = None if data.sampler is None else data.sampler(len(data.train), args.seed)
    train_loader = DataLoader(data.train, batch_size=args.per_device_train_batch_size, drop_last=True, sampler=sampler,
                              collate_fn=collate_blocks, generator=torch.Generator().manual_seed(args.seed))
    # the validation set is a fixed slice of blocks, the same whatever the number of processes
    eval_blocks = len(data.validation) if args.eval_batches == 0 else \
        min(len(data.validation), args.eval_batches * args.per_device_eval_batch_size)
    eval_loader = DataLoader(data.validation.select(range(eval_blocks)), batch_size=args.per_device_eval_batch_size,
                             collate_fn=collate_blocks)
    if data.sampler is not None and len(train_loader) < num_processes:
        unit = data.summary.get("unit", "block")
        raise UserError(f"{len(data.train)} training {unit}s make {len(train_loader)} full batch(es) of "
                        f"per_device_train_batch_size={args.per_device_train_batch_size}, fewer than the "
                        f"{num_processes} process(es): lower the batch size or add data")
    return train_loader, eval_loader
