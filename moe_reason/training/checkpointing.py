"""Resumable checkpoints and exported models, written atomically (folder names: `layout.py`).

    checkpoint-STEP/   accelerator.save_state (model, optimizer, RNG) + trainer_state.json (the loop's
                       state and the learning-rate schedule)
                       + each expert-parallel rank's shard of the experts
                       + config.json and the tokenizer (+ adapter_config.json of a LoRA run)
                       + each rank's stream position (--streaming)
                       + each rank's training carry (a recursive model's supervision_updates="per_step")
    best/, final/      save_pretrained: model.safetensors + config.json + tokenizer files

Every folder is written as NAME.tmp and renamed into place only when complete, and old
checkpoints are removed only after the new one is in place: a crash or kill during a
save leaves the previous checkpoint intact (a stale .tmp is cleared by the next save).
"""

import json
import logging
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from safetensors.torch import save_file

from ..atomic import install, readable_like_the_rest, staged
from ..errors import MissingFileError, UserError
from ..parallel.expert_parallel import NoExpertParallel
from ..layout import TRAINER_STATE, checkpoint_name, checkpoint_step, complete_checkpoints
from .lora import is_lora
from ..safe_loading import (check_no_custom_pickles, check_random_states, damaged_files, deepspeed_globals,
                           deepspeed_weights_only)

NO_EXPERT_PARALLEL = NoExpertParallel()


def resolve_checkpoint(output_dir, spec: str) -> Path:
    """'latest' or a folder -> a complete checkpoint folder, or a clear error."""
    if spec == "latest":
        found = complete_checkpoints(output_dir)
        if not found:
            raise MissingFileError(f"--resume_from_checkpoint latest: no complete checkpoint in {output_dir}")
        return found[-1]
    path = Path(spec)
    if not (path / TRAINER_STATE).is_file():
        raise MissingFileError(f"--resume_from_checkpoint {spec}: not a complete checkpoint folder "
                               f"(no {TRAINER_STATE}); complete ones: "
                               f"{[str(p) for p in complete_checkpoints(output_dir)]}")
    return path


def unfinished_checkpoints_after(output_dir, checkpoint: Path) -> list[Path]:
    """checkpoint-N folders newer than `checkpoint` without trainer_state.json: saves that did not finish."""
    step = checkpoint_step(checkpoint)
    step = -1 if step is None else step
    found = [p for p in Path(output_dir).glob("checkpoint-*")
             if (n := checkpoint_step(p)) is not None and n > step and not (p / TRAINER_STATE).is_file()]
    return sorted(found, key=checkpoint_step)


def read_trainer_state(checkpoint: Path) -> dict:
    try:
        return json.loads((checkpoint / TRAINER_STATE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"checkpoint {checkpoint} is corrupt: {TRAINER_STATE} unreadable ({err})") from err


def bare_model(accelerator, model) -> torch.nn.Module:
    """The model itself, out of its DDP or DeepSpeed wrapper and out of torch.compile's: the compiled wrapper names
    every weight `_orig_mod.NAME`, and an export or a moving average under those names loads as nothing."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def save_checkpoint(accelerator, output_dir, step: int, trainer_state: dict, total_limit: int, model=None,
                    expert_parallel: NoExpertParallel = NO_EXPERT_PARALLEL, tensor_files: dict | None = None,
                    tokenizer=None, rank_files: dict[str, str | dict] | None = None,
                    main_files: dict[str, str] | None = None) -> Path:
    """accelerator.save_state (+ the expert shards, + `tensor_files`: {file name: tensors} written by the
    main process as safetensors, + `rank_files`: {file name: text, or tensors as safetensors} written by
    each rank under its own name, + `main_files`: {file name: text} written by the main process, + the
    model's config and the tokenizer, which `moe-reason-export` reads) into checkpoint-STEP.tmp, then rename
    and rotate.

    All ranks call this.
    """
    final = Path(output_dir) / checkpoint_name(step)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    with _quiet_tied_head_notice():
        accelerator.save_state(str(tmp))
    expert_parallel.save(model, tmp)
    for name, content in (rank_files or {}).items():
        tmp.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            (tmp / name).write_text(content)
        else:
            save_file(content, tmp / name)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for name, tensors in (tensor_files or {}).items():
            save_file(tensors, tmp / name)
        for name, text in (main_files or {}).items():
            (tmp / name).write_text(text)
        if model is not None and tokenizer is not None:
            model.config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            if is_lora(model):
                model.peft_config["default"].save_pretrained(tmp)  # how `moe-reason-export` rebuilds the adapters
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
        install(tmp, final)
        for old in complete_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, model, checkpoint: Path,
                    expert_parallel: NoExpertParallel = NO_EXPERT_PARALLEL) -> dict:
    """Restore what `save_checkpoint` wrote into the prepared model and optimizer and the random states
    -> the trainer state saved with them. Nothing is unpickled beyond tensors (`safe_loading.py`); a file
    that does not load is named. All ranks call this."""
    trainer_state = read_trainer_state(checkpoint)
    check_no_custom_pickles(checkpoint)
    same_world = trainer_state.get("num_processes", accelerator.num_processes) == accelerator.num_processes
    if not check_random_states(checkpoint, accelerator.process_index, required=same_world):
        print(f"process {accelerator.process_index}: {checkpoint} holds no random states for it (saved by "
              f"{trainer_state['num_processes']} processes): its dropout and routing noise start afresh", flush=True)
    try:
        with deepspeed_weights_only(model):
            accelerator.load_state(str(checkpoint), **expert_parallel.load_state_kwargs)
        expert_parallel.load(bare_model(accelerator, model), checkpoint)
    except Exception:
        deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        damaged = damaged_files(checkpoint, deepspeed_globals() if deepspeed else ())
        if not damaged:
            raise
        raise UserError(f"checkpoint {checkpoint} cannot be resumed: {'; '.join(damaged)}. Resume from an "
                        "earlier checkpoint with --resume_from_checkpoint DIR") from None
    return trainer_state


@contextmanager
def _quiet_tied_head_notice():
    """Drop one benign warning of Accelerate's safetensors save.

    With tied embeddings `lm_head.weight` shares the embedding's storage, so the save writes it
    once and warns "Removed shared tensor {'lm_head.weight'} ... check ... while reloading" at
    every checkpoint. Loading re-ties the head (resume is tested to be exact); any other
    shared tensor still warns.
    """
    def drop(record: logging.LogRecord) -> bool:
        return "Removed shared tensor {'lm_head.weight'} while saving" not in record.getMessage()

    logger = logging.getLogger("accelerate.utils.other")
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def export_model(accelerator, model, tokenizer, folder,
                 expert_parallel: NoExpertParallel = NO_EXPERT_PARALLEL) -> Path:
    """Full weights (gathered under ZeRO-3 and expert parallelism) as safetensors + config + tokenizer.

    All ranks call this. Refuses to write a model with non-finite weights.
    """
    folder = Path(folder)
    bare = bare_model(accelerator, model)
    # a collective under ZeRO-3, every rank taking part: DeepSpeed gathers from its engine, which compiles inside
    # itself; elsewhere from the bare model, whose weights have their own names even when compiled
    state = accelerator.get_state_dict(model if accelerator.distributed_type == DistributedType.DEEPSPEED else bare)
    state = expert_parallel.full_state_dict(bare, state)
    if accelerator.is_main_process:
        write_pretrained(bare, state, tokenizer, folder)
    accelerator.wait_for_everyone()
    return folder


def write_pretrained(model, state: dict, tokenizer, folder: Path, check=lambda staged_folder: None) -> Path:
    """`state` as a from_pretrained folder (safetensors, config, tokenizer), written aside and renamed into
    place; `check(staged_folder)` may refuse it there, before anything at `folder` changes. Refuses non-finite
    weights. A tied head is left out (from_pretrained ties it again), whether or not `state` shares its storage
    with the embedding (a DeepSpeed state dict does not)."""
    if model.config.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k not in (model._tied_weights_keys or {})}
    bad = [name for name, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise RuntimeError(f"refusing to export {folder}: non-finite weights in {bad[:5]}")
    tmp = staged(folder)
    try:
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        readable_like_the_rest(tmp)
        check(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # ours: nothing else is ever in it
        raise
    install(tmp, folder)
    return folder
