"""Any resumable checkpoint -> a from_pretrained folder (safetensors, config, tokenizer), without training.

    python -m moe_reason.export outputs/run/checkpoint-400 outputs/run-step400

The weights are read as the run wrote them, each file without unpickling code (`safe_loading`):
  model.safetensors                      one process and DDP (Accelerate)
  pytorch_model/mp_rank_00_model_states  DeepSpeed ZeRO-1/2: the module's weights as trained
  pytorch_model/zero_pp_rank_*           ZeRO-3: each rank's fp32 partition, joined by DeepSpeed's zero_to_fp32
  expert_shard_R_of_N.safetensors        expert parallelism: each rank's experts, stitched in rank order
The config and tokenizer are the ones the trainer stores in every checkpoint; an --ema_decay run's
moving average (ema.safetensors) replaces its parameters, and a LoRA run's adapters
(adapter_config.json beside them) are merged into the weights. The folder equals what
the trainer itself exports at that step (best/, final/), so its logits are the same.
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.utils import CONFIG_NAME

from .checkpointing import write_pretrained
from .layout import EMA_WEIGHTS, EXPERT_SHARD, TRAINER_STATE
from .lora import add_lora, load_lora_config, merged
from .safe_loading import load_deepspeed_file, torch_load_weights_only

DEEPSPEED_TAG = "pytorch_model"  # the folder Accelerate asks DeepSpeed to save a model's states in
USAGE = "usage: python -m moe_reason.export CHECKPOINT_DIR OUTPUT_DIR"


def checkpoint_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The full model's weights saved in `checkpoint` (see the module docstring for the layouts)."""
    if (checkpoint / "model.safetensors").is_file():
        return load_file(checkpoint / "model.safetensors")
    tag = checkpoint / DEEPSPEED_TAG
    if (tag / "mp_rank_00_model_states.pt").is_file():  # ZeRO-0/1/2: the module's weights as trained
        module = load_deepspeed_file(tag / "mp_rank_00_model_states.pt")["module"]
    elif list(tag.glob("zero_pp_rank_*_model_states.pt")):  # ZeRO-3: each rank's partition of them
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        with torch_load_weights_only():
            module = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=DEEPSPEED_TAG)
    else:
        raise FileNotFoundError(f"{checkpoint} holds neither model.safetensors (Accelerate) nor DeepSpeed's model "
                                f"states in {DEEPSPEED_TAG}/: not a checkpoint this trainer wrote")
    return {**module, **stitched_experts(checkpoint)}


def stitched_experts(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Expert-parallel shards -> full expert tensors [E, ...], the ranks' experts in rank order ({} without EP)."""
    shards = sorted((int(m.group(1)), int(m.group(2)), p)
                    for p in checkpoint.iterdir() if (m := EXPERT_SHARD.match(p.name)))
    if not shards:
        return {}
    size = shards[0][1]
    if [rank for rank, _, _ in shards] != list(range(size)):
        raise FileNotFoundError(f"{checkpoint}: expert shards {[p.name for _, _, p in shards]} are not ranks "
                                f"0..{size - 1} of one expert-parallel size")
    parts = [load_file(p) for _, _, p in shards]
    return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}


def export_checkpoint(checkpoint, output) -> Path:
    checkpoint, output = Path(checkpoint), Path(output)
    if not (checkpoint / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"{checkpoint}: no {TRAINER_STATE}, so not a complete checkpoint (a save that did "
                                "not finish, or not a checkpoint-N folder)")
    if not (checkpoint / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{checkpoint} holds no {CONFIG_NAME}: it was saved by a version of the trainer that "
                                "did not store the model's config and tokenizer with each checkpoint. Resume it for "
                                "one step (--resume_from_checkpoint) and export the checkpoint that writes")
    import moe_reason  # noqa: F401  (registers the Auto classes)

    config = AutoConfig.from_pretrained(checkpoint)
    model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config)
    adapters = load_lora_config(checkpoint)
    if adapters is not None:  # a LoRA run: its adapters are rebuilt, loaded and merged
        model = add_lora(model, adapters)
    state = checkpoint_weights(checkpoint)
    if (checkpoint / EMA_WEIGHTS).is_file():  # an --ema_decay run exports the moving average of its parameters
        state.update(load_file(checkpoint / EMA_WEIGHTS))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # a tied head is not saved (LoRA's wrapper prefixes its name)
    missing = [k for k in missing if not (config.tie_word_embeddings and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise ValueError(f"{checkpoint}: the saved weights do not fit the saved config: missing "
                         f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model = merged(model)
    return write_pretrained(model, model.state_dict(), AutoTokenizer.from_pretrained(checkpoint), output)


def main(argv: list[str] | None = None) -> Path:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0].startswith("-"):
        raise SystemExit(USAGE)
    folder = export_checkpoint(*argv)
    print(f"exported {argv[0]} -> {folder} (load with AutoModelForCausalLM.from_pretrained)")
    return folder


if __name__ == "__main__":
    main()
