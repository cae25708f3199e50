"""A run's output folder: every name the trainer writes and the runners and tools read.

    OUTPUT_DIR/
      run_args.json            the arguments the run was started with (a rerun must match them)
      metrics.jsonl            every logged value, one JSON object per line
      train_results.json       final evaluation, throughput, wall time: written last, so it marks a finished run
      tensorboard/             Accelerate's TensorBoard tracker
      checkpoint-STEP/         accelerator.save_state + trainer_state.json
                               (+ expert_shard_R_of_N.safetensors per expert-parallel rank)
                               (+ ema.safetensors: the weights' moving average, with --ema_decay)
                               (+ stream_state_R_of_N.json per rank, with --streaming: its stream position)
                               (+ data_source.json: the local data files then, so a resume names those changed)
      best/  final/            exported models (save_pretrained); a task model's scores: final/eval_task.json
                               (+ final/eval_transfer.json: a study's scores on other puzzles)
      run.lock, run.lock.json  held by the live run (flock, released by the kernel when it ends), and who it is
    A runner's output folder (a study) holds its runs' folders, its report, and study.lock(.json), held alike.
    A runner's run folder adds experiment_run.json (the run's arguments and launch), started_from.json (the
    other run's checkpoint it went on from, if any) and, when launched by Accelerate, run_config.yaml.

A folder being written is NAME.tmp; a checkpoint counts only once its trainer_state.json is in place.
"""

import re
from pathlib import Path

RUN_ARGS = "run_args.json"
METRICS = "metrics.jsonl"
RESULTS = "train_results.json"
TENSORBOARD = "tensorboard"
TRAINER_STATE = "trainer_state.json"
EMA_WEIGHTS = "ema.safetensors"
BEST, FINAL = "best", "final"
TASK_EVAL = "eval_task.json"  # a task model's puzzle scores, written into its export folder by evaluate
TRANSFER_EVAL = "eval_transfer.json"  # a task run's scores on other puzzles (a comparison's `transfer:`)
RUN_SPEC = "experiment_run.json"  # the arguments a runner's run folder was made with
STARTED_FROM = "started_from.json"  # the other run's checkpoint a run folder started from (a runner's `start_from`)
RUN_CONFIG = "run_config.yaml"  # a runner's launcher accelerate: the arguments, as the trainer's config file
RUN_LOCK, RUN_LOCK_OWNER = "run.lock", "run.lock.json"
STUDY_LOCK = "study.lock"  # in a runner's output folder: held by the runner working on it (+ study.lock.json)
DATA_SOURCE = "data_source.json"  # in a checkpoint: the data files as they were ([path, bytes, mtime_ns] each)
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
EXPERT_SHARD = re.compile(r"^expert_shard_(\d+)_of_(\d+)\.safetensors$")
STREAM_STATE = re.compile(r"^stream_state_(\d+)_of_(\d+)\.json$")


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step}"


def expert_shard_name(ep_rank: int, ep_size: int) -> str:
    """The file an expert-parallel rank keeps its experts in, inside a checkpoint folder (matches EXPERT_SHARD)."""
    return f"expert_shard_{ep_rank}_of_{ep_size}.safetensors"


def stream_state_name(rank: int, world_size: int) -> str:
    """The file a rank keeps its stream position in, inside a checkpoint folder (matches STREAM_STATE)."""
    return f"stream_state_{rank}_of_{world_size}.json"


def carry_name(rank: int, world_size: int) -> str:
    """The file a rank keeps the recursive model's training carry in, inside a checkpoint folder
    (supervision_updates="per_step")."""
    return f"supervision_carry_{rank}_of_{world_size}.safetensors"


def saved_expert_parallel_sizes(folder) -> set[int]:
    """The expert-parallel sizes a checkpoint folder's shard files were written at ({1}: none)."""
    return {int(m.group(2)) for p in Path(folder).iterdir() if (m := EXPERT_SHARD.match(p.name))} or {1}


def wrong_expert_parallel_size(folder, saved: set[int], ep_size: int) -> str:
    return (f"checkpoint {folder} was saved with expert_parallel_size={max(saved)}, not {ep_size}: resume at the "
            "size it was saved with, or start a new run from its exported model (best/ or final/) with "
            "--init_from, which loads at any expert_parallel_size")


def checkpoint_step(folder) -> int | None:
    """The STEP of a checkpoint-STEP folder, or None for any other name."""
    match = CHECKPOINT.match(Path(folder).name)
    return int(match.group(1)) if match else None


def complete_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoint folders (they hold trainer_state.json), oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if checkpoint_step(p) is not None and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=checkpoint_step)


def run_outputs(output_dir) -> list[Path]:
    """Everything a run writes into its folder (what --overwrite_output_dir deletes)."""
    root = Path(output_dir)
    return [*root.glob("checkpoint-*"),
            *(root / name for name in (BEST, FINAL, TENSORBOARD, METRICS, RUN_ARGS, RESULTS))]
