"""A finished run read back: its figures from its results and metrics files (`collect_run`, the fields
of its `RunRecord`), and a task run's scores on held-out puzzles, made by the evaluate command on its
export (`score_task_run`) and read from there (`task_figures`)."""

import contextlib
import dataclasses
import json
import math
from pathlib import Path

from ..data.prepare import DataArguments
from ..evaluation.evaluate import EvaluateArguments, evaluate
from ..layout import FINAL, METRICS, RESULTS, STARTED_FROM, TASK_EVAL, TRANSFER_EVAL
from ..tasks.puzzles import TaskArguments

CURVE_PUZZLES = 200  # a task run's accuracy-by-steps curve: its first held-out puzzles (all of them are scored)


def collect_run(run_dir) -> dict:
    """A finished run's figures, from its results and metrics files: RunRecord fields by name."""
    run_dir = Path(run_dir)
    results = json.loads((run_dir / RESULTS).read_text())
    records = [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    evals = [r for r in records if "eval/loss" in r]
    final = results["final_eval"]
    losses = [r["train/lm_loss"] for r in train]
    nan = (any(not math.isfinite(x) for x in losses + [final["loss"]])
           or any(r.get("train/skipped_step") for r in records)
           or any(r.get("train/skipped_micro_batches", 0) > 0 for r in train))
    return {
        "output_dir": str(run_dir),
        "final_val_loss": final["loss"], "best_val_loss": results["best_val_loss"],
        "perplexity": final["perplexity"], "accuracy": final["accuracy"], "ln_vocab": final["ln_vocab"],
        "eval_tokens": final["tokens"], "recursion_steps": final.get("recursion_steps"),
        "load_max_over_mean": final.get("load_max_over_mean"), "load_entropy": final.get("load_entropy"),
        "tokens_per_s": results["tokens_per_s"], "wall_seconds": results["wall_seconds"],
        "flops_per_token": results["flops_per_token"], "tokens_per_step": results["tokens_per_step"],
        "sequences_per_step": results.get("sequences_per_step"),
        "parameters": results["parameters"],
        # the language-model cross-entropy, comparable across variants that change the auxiliary losses
        "train_loss_curve": [[r["step"], r["train/lm_loss"]] for r in train],
        "grad_norm_curve": [[r["step"], r["train/grad_norm"]] for r in train],
        # [step, loss, token accuracy, exact accuracy] (a Metric's curve_column): a task run's curve is its fourth
        "eval_curve": [[r["step"], r["eval/loss"], r["eval/accuracy"], solved_share(r)] for r in evals],
        "curve_validated_from": min((r["step"] for r in evals if "eval/solved" in r), default=None),
        "stopped_by": results.get("stopped_by", "max_steps"), "stopped_at": results["step"],
        "nan": nan, "machines": results.get("machines"),
        "started_from": (json.loads((run_dir / STARTED_FROM).read_text())["started_from"]
                         if (run_dir / STARTED_FROM).is_file() else None),
        **task_figures(run_dir),
    }


def solved_share(evaluation: dict) -> float | None:
    """An evaluation's exact accuracy (metrics.jsonl record): the task's validator's verdict, or where the
    trainer did not record one (a run evaluated before it did), the match with the stored answer."""
    return evaluation.get("eval/solved", evaluation.get("eval/exact_match"))


def task_figures(run_dir: Path, scores: str = TASK_EVAL) -> dict:
    """exact_accuracy, cell_accuracy, exact_accuracy_by_steps and q_head of a scored task run ({} otherwise)."""
    scored = Path(run_dir) / FINAL / scores
    if not scored.is_file():
        return {}
    result = json.loads(scored.read_text())
    return {k: result[k] for k in ("exact_accuracy", "cell_accuracy", "exact_accuracy_by_steps", "q_head_by_steps",
                                   "q_head", "by_difficulty", "q_head_thresholds", "puzzles", "curve_puzzles")
            if k in result}


def task_argument_names() -> set[str]:
    """The trainer arguments that decide a task's puzzles."""
    return {f.name for f in dataclasses.fields(TaskArguments)} | {"data_seed"}


def score_task_run(run_dir: Path, values: dict, transfer: dict | None = None) -> None:
    """A task run's export scored on the held-out puzzles of its training -> final/eval_task.json, or with
    `transfer` (task arguments) on the puzzles its training's task arguments so changed generate ->
    final/eval_transfer.json."""
    scoring = EvaluateArguments(model_path=str(run_dir / FINAL), batch_size=256, curve_puzzles=CURVE_PUZZLES,
                                output_file=str(run_dir / FINAL / TRANSFER_EVAL) if transfer else None)
    data = {k: v for k, v in values.items() if k == "data_cache_dir"}
    if transfer:
        data |= {k: v for k, v in values.items() if k in task_argument_names()} | transfer
    with open(run_dir / "train.log", "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        evaluate(scoring, DataArguments(**data))


def scored(run_dir: Path, values: dict) -> bool:
    """Whether a task run's scores exist with every figure today's scoring gives (a recursive run's
    test-time depth curves with and without the Q-head, and the Q-head's thresholds; older scoring lacked
    them, and its runs are scored again)."""
    figures = task_figures(run_dir)
    return bool(figures) and (values.get("model_type") != "recursive" or "q_head_thresholds" in figures)
