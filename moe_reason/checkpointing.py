"""Resumable checkpoints and exported models, written atomically.

Layout under output_dir:
    checkpoint-STEP/   accelerator.save_state (model, optimizer, scheduler, RNG) + trainer_state.json
    best/, final/      save_pretrained: model.safetensors + config.json + tokenizer files

Every folder is written as NAME.tmp and renamed into place only when complete, and old
checkpoints are removed only after the new one is in place: a crash or kill during a
save leaves the previous checkpoint intact (a stale .tmp is cleared by the next save).
"""

import json
import logging
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
EXPERT_SHARD = re.compile(r"^expert_shard_\d+_of_(\d+)\.safetensors$")  # what expert_shard_name writes
STATE_FILE = "trainer_state.json"


def complete_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoint folders (they hold trainer_state.json), oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if CHECKPOINT.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT.match(p.name).group(1)))


def resolve_checkpoint(output_dir, spec: str) -> Path:
    """'latest' or a folder -> a complete checkpoint folder, or a clear error."""
    if spec == "latest":
        found = complete_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"--resume_from_checkpoint latest: no complete checkpoint in {output_dir}")
        return found[-1]
    path = Path(spec)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume_from_checkpoint {spec}: not a complete checkpoint folder "
                                f"(no {STATE_FILE}); complete ones: {[str(p) for p in complete_checkpoints(output_dir)]}")
    return path


def expert_shard_name(ep_rank: int, ep_size: int) -> str:
    """The file an expert-parallel rank keeps its experts in, inside a checkpoint folder."""
    return f"expert_shard_{ep_rank}_of_{ep_size}.safetensors"


def check_expert_parallel_size(checkpoint: Path, ep_size: int) -> None:
    """A checkpoint resumes only at the expert-parallel size it was saved with (its experts are sharded)."""
    saved = {int(m.group(1)) for p in checkpoint.iterdir() if (m := EXPERT_SHARD.match(p.name))} or {1}
    if saved != {ep_size}:
        raise ValueError(f"checkpoint {checkpoint} was saved with expert_parallel_size={max(saved)}, not {ep_size}: "
                         "resume at the size it was saved with, or start a new run from its exported model "
                         "(best/ or final/) with --init_from, which loads at any expert_parallel_size")


def read_trainer_state(checkpoint: Path) -> dict:
    try:
        return json.loads((checkpoint / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"checkpoint {checkpoint} is corrupt: {STATE_FILE} unreadable ({err})") from err


def save_checkpoint(accelerator, output_dir, step: int, trainer_state: dict, total_limit: int,
                    save_extra=None) -> Path:
    """accelerator.save_state into checkpoint-STEP.tmp, then rename and rotate. All ranks call this.

    `save_extra(folder)`, if given, runs on every rank after save_state (expert-parallel shards).
    """
    final = Path(output_dir) / f"checkpoint-{step}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    with _quiet_tied_head_notice():
        accelerator.save_state(str(tmp))
    if save_extra is not None:
        save_extra(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
        _replace(tmp, final)
        for old in complete_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


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


def export_model(accelerator, model, tokenizer, folder, gather_experts: bool = False) -> Path:
    """Full weights (gathered under ZeRO-3) as safetensors + config + tokenizer. All ranks call this.

    With expert parallelism (`gather_experts`) each rank holds a slice of the experts: the full
    [E, ...] tensors are gathered, so the export never depends on the EP size. Refuses to write
    a model with non-finite weights.
    """
    folder = Path(folder)
    state = accelerator.get_state_dict(model)  # a collective under ZeRO-3: every rank takes part
    if gather_experts:
        from .expert_parallel import full_state_dict
        state = full_state_dict(accelerator.unwrap_model(model), state)
    if accelerator.is_main_process:
        bad = [name for name, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
        if bad:
            raise RuntimeError(f"refusing to export {folder}: non-finite weights in {bad[:5]}")
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _replace(tmp, folder)
    accelerator.wait_for_everyone()
    return folder


def _replace(tmp: Path, final: Path) -> None:
    """Rename tmp to final; an older final is moved aside first and deleted after."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
