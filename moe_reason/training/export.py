"""Any resumable checkpoint -> a from_pretrained folder (safetensors, config, tokenizer), without training.

    moe-reason-export outputs/run/checkpoint-400 outputs/run-step400
    moe-reason-export outputs/run/checkpoint-800 outputs/run-step400 --overwrite   # replace an export

The output folder must not exist, be empty, or (with --overwrite) hold an export this command or the
trainer wrote and nothing else: anything else there is refused before any work, and so is a folder
inside the checkpoint or above it. Nothing is deleted that an export did not write.

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

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.utils import CONFIG_NAME

from ..errors import MissingFileError, UserError, run_cli
from .checkpointing import write_pretrained
from ..layout import EMA_WEIGHTS, EXPERT_SHARD, TRAINER_STATE
from .lora import add_lora, load_lora_config, merged
from ..safe_loading import damaged_files, deepspeed_globals, load_deepspeed_file, torch_load_weights_only

DEEPSPEED_TAG = "pytorch_model"  # the folder Accelerate asks DeepSpeed to save a model's states in
EXPORT_EXTRAS = ("eval_task.json", "eval_transfer.json")  # what `evaluate` adds to an export folder


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
        raise MissingFileError(f"{checkpoint} holds neither model.safetensors (Accelerate) nor DeepSpeed's model "
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
        raise MissingFileError(f"{checkpoint}: expert shards {[p.name for _, _, p in shards]} are not ranks "
                               f"0..{size - 1} of one expert-parallel size")
    parts = [load_file(p) for _, _, p in shards]
    return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}


def check_destination(checkpoint: Path, output: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output folder that would mix with or delete what the export did not write."""
    source, target = checkpoint.resolve(), output.resolve()
    where = "the checkpoint" if target == source else "inside the checkpoint" if source in target.parents else \
        "a folder holding the checkpoint" if target in source.parents else None
    if where:
        raise UserError(f"output folder {output} is {where} {checkpoint}: an export is written beside a checkpoint, "
                        "never into it or a folder above it")
    if output.exists() and not output.is_dir():
        raise UserError(f"output folder {output} is a file: name a new folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise UserError(f"output folder {output} is not empty: name a new folder, or pass --overwrite to replace an "
                        "export made by this toolkit there")


def replaceable_export(output: Path):
    """-> a check for `write_pretrained`: an existing `output` may be replaced only if every file in it is one
    the new export writes (or `evaluate` adds), so the replaced folder holds nothing else."""
    def check(staged_folder: Path) -> None:
        if not output.is_dir():
            return
        ours = {p.name for p in staged_folder.iterdir()} | set(EXPORT_EXTRAS)
        foreign = sorted(p.name for p in output.iterdir() if p.name not in ours or not p.is_file())
        if foreign:
            raise UserError(f"--overwrite {output}: it holds {foreign[:5]}, which an export does not write; "
                            "replacing it would delete them. Move them away or name another folder")
    return check


def export_checkpoint(checkpoint, output, overwrite: bool = False) -> Path:
    checkpoint, output = Path(checkpoint), Path(output)
    check_destination(checkpoint, output, overwrite)
    if not (checkpoint / TRAINER_STATE).is_file():
        raise MissingFileError(f"{checkpoint}: no {TRAINER_STATE}, so not a complete checkpoint (a save that did "
                               "not finish, or not a checkpoint-N folder)")
    if not (checkpoint / CONFIG_NAME).is_file():
        raise MissingFileError(f"{checkpoint} holds no {CONFIG_NAME}: it was saved by a version of the trainer that "
                               "did not store the model's config and tokenizer with each checkpoint. Resume it for "
                               "one step (--resume_from_checkpoint) and export the checkpoint that writes")
    import moe_reason  # noqa: F401  (registers the Auto classes)

    config = AutoConfig.from_pretrained(checkpoint)
    model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config)
    adapters = load_lora_config(checkpoint)
    if adapters is not None:  # a LoRA run: its adapters are rebuilt, loaded and merged
        model = add_lora(model, adapters)
    try:
        state = checkpoint_weights(checkpoint)
    except (OSError, MissingFileError):
        raise
    except Exception:
        damaged = damaged_files(checkpoint, deepspeed_globals() if (checkpoint / DEEPSPEED_TAG).is_dir() else ())
        if not damaged:
            raise
        raise UserError(f"checkpoint {checkpoint} cannot be exported: {'; '.join(damaged)}. Export an earlier "
                        "checkpoint") from None
    if (checkpoint / EMA_WEIGHTS).is_file():  # an --ema_decay run exports the moving average of its parameters
        state.update(load_file(checkpoint / EMA_WEIGHTS))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # a tied head is not saved (LoRA's wrapper prefixes its name)
    missing = [k for k in missing if not (config.tie_word_embeddings and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise UserError(f"{checkpoint}: the saved weights do not fit the saved config: missing "
                        f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model = merged(model)
    return write_pretrained(model, model.state_dict(), AutoTokenizer.from_pretrained(checkpoint), output,
                            check=replaceable_export(output))


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="moe-reason-export", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint-STEP folder a run wrote")
    parser.add_argument("output", help="the folder to write the model into (new, empty, or an export to replace)")
    parser.add_argument("--overwrite", action="store_true", help="replace an export this toolkit wrote at OUTPUT")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    folder = export_checkpoint(args.checkpoint, args.output, args.overwrite)
    print(f"exported {args.checkpoint} -> {folder} (load with AutoModelForCausalLM.from_pretrained)")
    return folder


if __name__ == "__main__":
    run_cli(main)
