"""What the ablation and comparison runners share: experiment files, running one training run,
reading its results back, and the statistics that decide whether a difference is real.

A run is the trainer (`moe_reason.training.trainer`) with a mapping of its arguments, in its own folder:
in this process (`launcher: in_process`, the default, no start-up cost) or as
`accelerate launch` (`launcher: accelerate`, optionally with `accelerate_config`), which
is how multi-GPU and DeepSpeed runs are made. Either way its output goes to
`RUN_DIR/train.log` and the runner prints one line when it starts and one when it ends.
A run folder whose results file (`train_results.json`) exists and whose arguments are unchanged (but
for those that change how a run computes, not what: `--set cpu_threads=2`, `gradient_checkpointing=true`
or other trackers, `run_identity`) is finished and skipped, unless those arguments now build
a different model than the one it exported (a default changed in the code since): then it is reported
as failed, naming the fields, and left as it is. A run whose arguments changed trains again in its
folder, and its `[start]` line names what changed; but where only the step cap rose, under a schedule the
cap does not shape, a capped or interrupted run goes on from its last checkpoint (`raised_cap`) and a
plateaued one stays as it ended.
An interrupted run resumes from its last checkpoint. A new run may start from another finished run's
last checkpoint (`start_from`: a comparison's equal-FLOPs run from its equal-steps twin, where the
schedule does not depend on the step cap and their first steps are the same); its folder's
started_from.json and its record's `started_from` name that checkpoint.

A runner's report JSON is its record: a command narrowed by --seeds (or the ablation's --variants)
keeps the other finished runs in it (`other_runs`); the finished runs it has yet to reach count in
its report while it runs, and if it stops. A finished run whose folder is gone (deleted to
free the disk, or a fresh clone holding only a committed report JSON copied into output_dir) is kept
from it while its arguments are unchanged, instead of trained again. Such a run cannot be checked for a
model default changed since (that needs its saved config), so the runner prints `[kept]`.
"""

import contextlib
import dataclasses
import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from ..atomic import install, staged, write_text
from ..data.prepare import DataArguments
from ..errors import MissingFileError, UserError
from ..evaluation.evaluate import EvaluateArguments, evaluate
from ..layout import BEST, FINAL, METRICS, RESULTS, STUDY_LOCK, TASK_EVAL, checkpoint_step, run_outputs
from ..locks import hold_folder
from ..tasks.puzzles import TaskArguments
from ..training.arguments import ModelArguments, arguments_from, build_config, load_mapping, refuse_unknown
from ..training.checkpointing import complete_checkpoints
from ..training.trainer import (EXECUTION_ARGUMENTS, TOKENIZER_FIELDS, UNRECORDED_MACHINE, config_drift, describe_drift,
                                saved_config, train)
from .records import RunRecord
from .statistics import mean_std

LAUNCHERS = ("in_process", "accelerate")
RUN_SPEC = "experiment_run.json"  # the arguments a run folder was made with
STARTED_FROM = "started_from.json"  # the other run's checkpoint a run folder started from (`start_from`)
RUN_CONFIG = "run_config.yaml"  # launcher accelerate: the arguments, as the trainer's config file
CURVE_PUZZLES = 200  # a task run's accuracy-by-steps curve: its first held-out puzzles (all of them are scored)
RUNNER_KEYS = {"output_dir", "launcher", "accelerate_config", "seeds", "base", "description", "extends"}
OWN_WORDS = ("description", "output_dir")  # what a file that extends another never inherits: they name the other


@dataclass
class RunnerArguments:
    """Command-line overrides of an experiment file, shared by the ablation and comparison runners."""
    output_dir: str | None = field(default=None, metadata={"help": "Where runs and reports go (default: the file's)."})
    launcher: str | None = field(default=None, metadata={"help": "in_process or accelerate (default: the file's)."})
    accelerate_config: str | None = field(default=None, metadata={"help": "accelerate YAML for launcher accelerate."})
    seeds: list[int] | None = field(default=None, metadata={"help": (
        "Replace the file's seeds (2 or more to measure the spread).")})
    set: list[str] | None = field(default=None, metadata={"action": "extend", "help": (
        "NAME=VALUE trainer arguments for every run, space-separated; a second --set adds to the first.")})
    max_hours: float | None = field(default=None, metadata={"help": (
        "Start no run after this many hours; the report covers the runs done, and the same command continues.")})


def parse_runner_cli(argv: list[str] | None, arguments_class, usage: str) -> tuple[str, RunnerArguments]:
    """FILE.yaml [--flag value ...] -> (the file, the parsed overrides)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = f"usage: {usage}\n   or: --report OUTPUT_DIR (rebuild the report from its JSON, no training)"
    parser = HfArgumentParser(arguments_class)
    if argv[:1] in (["-h"], ["--help"]):
        print(f"{usage}\n\noptions:{parser.format_help().split('options:', 1)[1]}")  # argparse's usage replaced
        raise SystemExit(0)
    if not argv or argv[0].startswith("-"):
        raise UserError(usage)
    path = argv.pop(0)
    (args,) = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    return path, args


def run_runner(argv: list[str] | None, arguments_class, load, run, usage: str, report=None):
    """A runner's command line: FILE.yaml and its overrides -> load(file, overrides), validated, then run it
    holding its output folder (a second runner on the same study is refused, naming the first); or --report
    OUTPUT_DIR -> report(OUTPUT_DIR), which rebuilds the report from the JSON the runs left."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--report"]:
        if len(argv) != 2:
            raise UserError(f"usage: --report OUTPUT_DIR (got {argv[1:]})")
        with hold_folder(Path(argv[1]), STUDY_LOCK, STUDY_IN_USE):
            return report(Path(argv[1]))
    path, args = parse_runner_cli(argv, arguments_class, usage)
    study = load(path, args)
    with hold_folder(study.output_dir, STUDY_LOCK, STUDY_IN_USE):
        return run(study)


STUDY_IN_USE = ("study folder {folder} is in use by another runner ({who}): wait for it to end or stop it (its runs "
                "resume), or give this one another --output_dir")


def exit_status(report) -> int:
    """A runner command's exit status: 1 when any of its runs failed (scripts and CI must notice), else 0."""
    return int(any(not r.finished for r in report.runs))


class RunBudget:
    """Between runs: whether --max_hours leaves time to start another, and a one-line ETA after each run.

    The ETA prices each run still to come at the steps from where it starts (step 0, or the step of the
    checkpoint it goes on from) to its step cap, times the seconds per step its model's finished runs took (a
    comparison's arm, a grid's variant; this command's runs or earlier ones, on whatever machine ran them): an
    upper bound where the plateau rule stops runs before their caps.
    """

    def __init__(self, plan: list[tuple[str, int]], max_hours: float | None):
        self.plan, self.max_hours, self.start = plan, max_hours, time.perf_counter()  # plan: (model, step cap)
        self.trained = 0  # runs started by this command: the budget spends on them

    def exhausted(self, done: int, command: str) -> bool:
        # one run always trains, so a budget spent by a slow start (or a tiny --max_hours) still makes progress
        hours = (time.perf_counter() - self.start) / 3600
        if self.max_hours is None or hours < self.max_hours or done == len(self.plan) or not self.trained:
            return False
        print(f"[budget] --max_hours {self.max_hours} spent after {done}/{len(self.plan)} runs ({hours:.2f} h): "
              f"reporting the runs done; continue with:\n  {command}", flush=True)
        return True

    def after(self, runs: list[RunRecord], earlier: Iterable[RunRecord] = (), starts: dict[int, int] | None = None):
        """The ETA once `runs` are done; `earlier`: the report's finished runs this command has yet to reach;
        `starts`: {plan index: the step a run still to come will start at} for runs that go on from another's
        checkpoint (a comparison's equal-FLOPs run from its twin's last step)."""
        self.trained += not runs[-1].skipped
        per_step = {}  # model -> seconds per step of each of its finished runs
        for r in [*runs, *earlier]:  # a run that went on from another's checkpoint trained from that step only
            steps = (r.stopped_at or r.steps or 0) - (checkpoint_step(r.started_from or "") or 0)
            if r.finished and steps > 0 and r.wall_seconds:
                per_step.setdefault(r.arm or r.run, []).append(r.wall_seconds / steps)
        starts = {i: step for i, step in (starts or {}).items() if i >= len(runs)}
        left = list(enumerate(self.plan))[len(runs):]
        priced = [sum(per_step[model]) / len(per_step[model]) * (cap - starts.get(i, 0))
                  for i, (model, cap) in left if model in per_step]
        unpriced = sorted({model for _, (model, _) in left if model not in per_step})
        head_start = f" ({len(starts)} of them from their twin's last step)" if starts else ""
        parts = [f"at most {sum(priced) / 3600:.1f} h for {len(priced)} at their step caps{head_start}"] \
            if priced else []
        parts += [f"no estimate yet for {', '.join(unpriced)} (no finished run)"] if unpriced else []
        print(f"[eta] {len(runs)}/{len(self.plan)} runs done, {(time.perf_counter() - self.start) / 60:.1f} min in "
              f"this command" + (f"; the {len(left)} left: {'; '.join(parts)}" if left else ""), flush=True)


@dataclass(frozen=True)
class ReportFiles:
    """A runner's report: the JSON its runs update (its report record), and the plot and Markdown made from that
    record alone."""
    json: str
    png: str
    markdown: str
    record: type  # records.GridReport or records.ComparisonReport
    plot: Callable[[object, Path], None]
    render: Callable[[object], str]
    refresh: Callable[[object], object]  # the verdicts computed again from the runs, by today's statistics

    def write(self, report, out: Path) -> None:
        """The report's JSON, plot and Markdown into `out`."""
        write_json(out / self.json, report.to_json())
        self.plot(report, out / self.png)
        (out / self.markdown).write_text(self.render(report))

    def read(self, path: Path):
        """A report JSON as its record (a report written before today's records reads too)."""
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise UserError(f"{path} is not a report written by this runner (not JSON: {error}); move it aside to "
                            "start the record afresh") from error
        try:
            return self.record.from_json(values, str(path))
        except (AttributeError, KeyError, TypeError) as error:  # not a mapping, or a record missing a field
            raise UserError(f"{path} is not a report written by this runner ({error!r}); move it aside to start the "
                            "record afresh") from error

    def rebuild(self, out: Path):
        """--report DIR: the verdicts, plot and Markdown again from the runs in DIR's JSON, without training."""
        if not (out / self.json).is_file():
            raise MissingFileError(f"--report {out}: no {self.json} there (the output folder of a runner's runs)")
        report = self.refresh(self.read(out / self.json))
        self.write(report, out)
        print(f"wrote {out / self.png}, {out / self.markdown} from {out / self.json}", flush=True)
        return report

    def earlier_runs(self, out: Path, planned: Callable[[RunRecord], bool]) -> dict[tuple[str, int], RunRecord]:
        """{(run, seed): record} of the finished runs the study's earlier report holds (its `runs` and
        `other_runs`) that `planned` keeps (a variant no longer in the file is dropped)."""
        if not (out / self.json).is_file():
            return {}
        earlier = self.read(out / self.json)
        return {(r.run, r.seed): r for r in earlier.runs + earlier.other_runs if r.finished and planned(r)}


@dataclass(kw_only=True)
class StudySettings:
    """What every experiment file sets (a grid and a comparison add their own): from the command line first,
    then the file. A report rebuilt from its JSON (`--report`) knows the first four only."""
    path: str
    description: str
    seeds: list[int]
    base: dict  # trainer arguments every run shares: NAME -> value as a file gives it (the trainer parses them)
    launcher: str = "in_process"
    accelerate_config: str | None = None
    output_dir: Path | None = None
    max_hours: float | None = None


def load_runner_file(path, kind: str, own_keys: set[str], args: RunnerArguments, default_seeds: list[int],
                     output_prefix: str) -> tuple[dict, StudySettings]:
    """An experiment file -> (its raw mapping, the settings every runner shares), validated before any run."""
    spec = load_study_mapping(path, kind, RUNNER_KEYS | own_keys)
    output_dir = args.output_dir or spec.get("output_dir") or f"outputs/{output_prefix}_{Path(path).stem}"
    return spec, StudySettings(
        path=str(path), description=spec.get("description", ""),
        base={**check_arguments(spec.get("base"), f"{kind} {path}: base"), **parse_overrides(args.set)},
        seeds=check_seeds(args.seeds or spec.get("seeds", default_seeds)),
        launcher=check_launcher(args.launcher or spec.get("launcher", "in_process")),
        accelerate_config=args.accelerate_config or spec.get("accelerate_config"),
        output_dir=Path(output_dir), max_hours=args.max_hours)


def load_study_mapping(path, kind: str, allowed: set[str], seen: tuple[Path, ...] = ()) -> dict:
    """An experiment file's mapping, built on the file it `extends` (a path relative to it), if any: its own
    keys replace the other's, its `base` updates the other's base name by name (a name set to null drops the
    other's value: the trainer's default again), and it never inherits the other's description and
    output_dir (they describe the other study). So a study that changes a few of another's settings says
    only those, and the recipe they share has one source."""
    spec = load_mapping(path, f"{kind} file")
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise UserError(f"{kind} {path} has unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    parent = spec.pop("extends", None)
    if parent is None:
        return spec
    if not isinstance(parent, str) or not parent:
        raise UserError(f"{kind} {path}: extends={parent!r} is invalid: must name another {kind} file, relative to "
                        "this one")
    under = Path(path).parent / parent
    chain = (*seen, Path(path).resolve())
    if under.resolve() in chain:
        raise UserError(f"{kind} {path}: extends {parent} makes a loop ({' -> '.join(str(p) for p in chain)} -> "
                        f"{under.resolve()})")
    if not under.is_file():
        raise MissingFileError(f"{kind} {path}: extends {parent}, which is not a file ({under})")
    inherited = {name: value for name, value in load_study_mapping(under, kind, allowed, chain).items()
                 if name not in OWN_WORDS}
    own = check_arguments(spec.get("base"), f"{kind} {path}: base")
    base = {name: value for name, value in {**check_arguments(inherited.get("base"), f"{kind} {under}: base"),
                                            **own}.items() if not (value is None and name in own)}
    return {**inherited, **spec, "base": base}


def model_argument_names() -> set[str]:
    return {f.name for f in dataclasses.fields(ModelArguments)}


def check_arguments(values, where: str, allowed: set[str] | None = None) -> dict:
    """Refuse unknown trainer arguments (a typo would otherwise be a silent no-op variant)."""
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"{where} must be a mapping of trainer arguments to values, got {values!r}")
    refuse_unknown(values, where, allowed)
    return dict(values)


PROCESS_SETTINGS = ("mixed_precision", "deepspeed")  # one Accelerate process state holds these for all its runs


def check_launch(launcher: str, runs: list[dict], where: str) -> None:
    """In-process runs share one process and its Accelerate state: refuse runs that need another (DeepSpeed, a
    precision differing between runs) before any of them starts."""
    if launcher != "in_process":
        return
    for name in PROCESS_SETTINGS:
        found = {str(values.get(name)) for values in runs}
        if name == "deepspeed" and found != {"None"}:
            raise UserError(f"{where}: {name} needs launcher: accelerate (in_process runs one plain process)")
        if len(found) > 1:
            raise UserError(f"{where}: the runs differ in {name} ({sorted(found)}), which one process cannot change "
                            "between runs: use launcher: accelerate (each run its own process)")


def check_seeds(seeds) -> list[int]:
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise UserError(f"seeds={seeds!r} is invalid: must be a non-empty list of distinct integers")
    return seeds


def check_launcher(launcher: str) -> str:
    if launcher not in LAUNCHERS:
        raise UserError(f"launcher={launcher!r} is invalid: must be one of {LAUNCHERS}")
    return launcher


def parse_overrides(pairs: list[str]) -> dict:
    """["max_steps=20", "learning_rate=3e-4"] -> {"max_steps": 20, "learning_rate": 0.0003} (YAML scalars)."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise UserError(f"override {pair!r} is invalid: must be NAME=VALUE")
        name, value = pair.split("=", 1)
        out[name.strip()] = yaml.safe_load(value)
    return check_arguments(out, "--set")


def safe_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", str(name)):
        raise UserError(f"run name {name!r} is invalid: use letters, digits, _ . + - (it names a folder)")
    return str(name)


# ----------------------------------------------------------------------------
# Running one training run


def run_training(run: str, seed: int, values: dict, run_dir: Path, launcher: str = "in_process",
                 accelerate_config: str | None = None, start_from: Path | None = None) -> RunRecord:
    """Train run `run` of seed `seed` once (or skip/resume) and return its record; never raises for a failed run.

    `start_from`: a finished run's folder whose steps this run's first ones repeat exactly; a new run starts
    from its last checkpoint (`continue_from`) instead of step 0."""
    run_dir, config = Path(run_dir), values
    name = f"{run}/seed_{seed}"

    def failed_record(error: str, wall: float, skipped: bool = False) -> RunRecord:
        return RunRecord(run, seed, "failed", str(run_dir), config, skipped=skipped, error=error, wall_seconds=wall)

    def finished_record(skipped: bool) -> RunRecord:
        return RunRecord(run, seed, "finished", config=config, skipped=skipped, **collect_run(run_dir))

    values = {**values, "output_dir": str(run_dir)}
    spec = {"values": values, "launcher": launcher, "accelerate_config": accelerate_config}
    saved_spec = _spec_of(run_dir)
    same_spec, earlier_cap = judge_folder(run_dir, saved_spec, spec)
    checkpoints = complete_checkpoints(run_dir) if same_spec or earlier_cap is not None else []
    finished = same_spec and (run_dir / RESULTS).is_file()
    resume = not finished and bool(checkpoints)
    if finished or resume:  # a run made by earlier code: does today's code build the same model from its arguments?
        saved = run_dir / FINAL if finished else checkpoints[-1]
        drift = model_drift(saved, values)
        if drift:
            state = "finished earlier" if finished else f"interrupted earlier (at {saved.name})"
            error = (f"{state}, but its arguments now build a different model ({describe_drift(drift)}): a "
                     "default changed since. Pin the old value(s) in the experiment file to keep this run, or "
                     f"delete {run_dir} to train it again with the new one(s)")
            print(f"[FAILED] {name}: {error}", flush=True)
            return failed_record(error, 0.0, skipped=True)  # nothing trained: the ETA must not count it
    if finished:
        if values.get("task") and not scored(run_dir, values):
            score_task_run(run_dir, values)  # trained, but stopped before its scoring (or scored by older code)
        record = finished_record(skipped=True)
        print(f"[skip] {name}: finished earlier, val loss {record.final_val_loss:.4f}", flush=True)
        return record

    replaced = not (same_spec or resume) and saved_spec is not None and \
        any(path.exists() for path in run_outputs(run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RUN_SPEC).write_text(json.dumps(spec, indent=2))
    how = " (resuming)" if resume else ""
    if resume and earlier_cap is not None:
        how = f" (resuming: its step cap rose from {earlier_cap} to {values['max_steps']})"
        # the folder's spec now names the higher cap: the results of the lower one must not pass for this run's
        # if it stops before the end (it is then an interrupted run, resumed the next time)
        (run_dir / RESULTS).unlink(missing_ok=True)
    if replaced:  # the trainer's --overwrite_output_dir is about to delete it: say why
        how = f" (in place of the run its folder holds, made with other arguments: {spec_changes(saved_spec, spec)})"
    if not resume:
        (run_dir / STARTED_FROM).unlink(missing_ok=True)  # this runner's own note of an earlier start
        if start_from is not None and not any(path.exists() for path in run_outputs(run_dir)):
            started = continue_from(Path(start_from), run_dir, values["max_steps"])
            resume = started is not None
            how = (f" (from {started}: their first steps are the same)" if resume else
                   f" (from step 0: {start_from} holds no finished run's last checkpoint within the cap to go on from)")
    start = {"resume_from_checkpoint": "latest"} if resume else {"overwrite_output_dir": True}
    print(f"[start] {name}{how} -> {run_dir}", flush=True)
    started = time.perf_counter()
    error = (_train_in_process if launcher == "in_process" else _train_with_accelerate)(
        {**values, **start}, run_dir / "train.log", accelerate_config)
    wall = time.perf_counter() - started
    if error is None and not (run_dir / RESULTS).is_file():
        error = f"the run ended without {RESULTS} (stopped by a signal?)"
    if error is not None:
        print(f"[FAILED] {name} after {wall:.0f} s: {error.splitlines()[-1][:300]} (log: {run_dir / 'train.log'})",
              flush=True)
        return failed_record(error, wall)
    if values.get("task"):
        score_task_run(run_dir, values)
    record = finished_record(skipped=False)
    print(f"[done] {name}: val loss {record.final_val_loss:.4f}, ppl {record.perplexity:.1f}, "
          f"acc {record.accuracy:.3f}, {record.tokens_per_s:,.0f} tok/s, {wall:.0f} s"
          f"{', NON-FINITE values seen' if record.nan else ''}", flush=True)
    return record


def same_record(record: RunRecord | None, values: dict) -> RunRecord | None:
    """`record` (a report's finished run) where it ran with the trainer arguments `values` (those that change
    how a run computes, not what, aside), else None."""
    return record if record and run_identity(record.config) == run_identity(values) else None


def waiting_runs(earlier: dict, left: list[tuple[tuple[str, int], dict, dict]]) \
        -> tuple[list[RunRecord], dict]:
    """Split a study's earlier finished runs (`earlier`, {(run, seed): record}) between the runs a command has
    yet to reach (`left`: [((run, seed), trainer arguments, record fields the command sets)]) whose records
    hold under those arguments, and the rest (the report's `other_runs`). A command that is still running, or
    stopped, counts the first in its report: they are the study's finished runs as much as those it reached."""
    others, waiting = dict(earlier), []
    for key, values, fields in left:
        if same_record(others.get(key), values):
            waiting.append(dataclasses.replace(others.pop(key), skipped=True, **fields))
    return waiting, others


def train_or_keep(run: str, seed: int, values: dict, run_dir: Path, launcher: str, accelerate_config: str | None,
                  kept: RunRecord | None, start_from: Path | None = None) -> RunRecord:
    """run_training, unless the run's folder is gone and its earlier record `kept` has the same arguments."""
    if same_record(kept, values) and not Path(run_dir).exists():
        owner = Path(kept.output_dir).parent.name  # OUTPUT_DIR/RUN/seed_N; another run's: a comparison's twin_ended
        folder = "its folder is gone" if owner == kept.run else f"it is {owner}'s run, as it ended"
        print(f"[kept] {kept.title}: {folder}; kept from the report (val loss {kept.final_val_loss:.4f}; a model "
              "default changed since could not be checked)", flush=True)
        return dataclasses.replace(kept, skipped=True)
    return run_training(run, seed, values, run_dir, launcher, accelerate_config, start_from)


def last_checkpoint_within(twin: Path, max_steps: int) -> Path | None:
    """Finished run `twin`'s last checkpoint, a run of at most `max_steps` can go on from; None where the twin did
    not finish (or its folder is gone) or that checkpoint lies beyond `max_steps`."""
    checkpoints = complete_checkpoints(twin)
    if not (twin / RESULTS).is_file() or not checkpoints or checkpoint_step(checkpoints[-1]) > max_steps:
        return None
    return checkpoints[-1]


def continue_from(twin: Path, run_dir: Path, max_steps: int) -> str | None:
    """Put finished run `twin`'s last checkpoint into the new run folder `run_dir`, with the twin's metrics and
    best/ export (the trainer drops metrics logged after the checkpoint when it resumes), so that the run
    resumes there; returns "TWIN_FOLDER/checkpoint-STEP", or None (nothing copied) where there is none to go
    on from (`last_checkpoint_within`).

    A finished run's last checkpoint is its last step, so its best/ export comes from the steps copied."""
    last = last_checkpoint_within(twin, max_steps)
    if last is None:
        return None
    for folder in (last, twin / BEST):
        if folder.is_dir():
            copy = staged(run_dir / folder.name)
            shutil.copytree(folder, copy, dirs_exist_ok=True)
            install(copy, run_dir / folder.name)
    if (twin / METRICS).is_file():
        write_text(run_dir / METRICS, (twin / METRICS).read_text())
    started = f"{twin}/{last.name}"
    write_text(run_dir / STARTED_FROM, json.dumps({"started_from": started}))
    return started


TRANSFER_EVAL = "eval_transfer.json"  # a task run's scores on other puzzles (a comparison's `transfer:`)


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


def model_drift(saved: Path, values: dict) -> dict:
    """{field: (saved, built now)} for the model fields where the config a run saved (its final/ export or a
    checkpoint) differs from the config its arguments build with today's code; empty when they agree."""
    then = saved_config(saved)
    if then is None:
        return {}
    now = build_config(arguments_from(values)[0], vocab_size=then.vocab_size, task=getattr(then, "task", None))
    for name in TOKENIZER_FIELDS:  # the run's tokenizer sets them, not its arguments
        setattr(now, name, getattr(then, name))
    return config_drift(then, now)


def run_identity(values: dict) -> dict:
    """A run's trainer arguments less those that change how it computes, not what (`EXECUTION_ARGUMENTS`: a study
    begun at one thread per run keeps its finished runs, and resumes its interrupted one, at another), and less
    its output_dir: the same folder named another way (relative or absolute, from another directory) holds the
    same run."""
    return {name: value for name, value in values.items() if name not in (*EXECUTION_ARGUMENTS, "output_dir")}


def is_spec(saved) -> bool:
    """Whether what a run folder's `RUN_SPEC` held is a spec this runner writes (a mapping with its `values`)."""
    return isinstance(saved, dict) and isinstance(saved.get("values"), dict)


def same_run(saved: dict | None, spec: dict) -> bool:
    """Whether a run folder's saved spec (`RUN_SPEC`) is `spec`'s run: the same launch and the same `run_identity`."""
    return is_spec(saved) and \
        {**saved, "values": run_identity(saved["values"])} == {**spec, "values": run_identity(spec["values"])}


def same_but_cap(earlier: dict, values: dict) -> bool:
    """Whether trainer arguments `values` make `earlier`'s run but for the step cap, under a schedule the cap does
    not shape (so their first steps are the same)."""
    args = arguments_from(values)[2]
    return run_identity({**earlier, "max_steps": args.max_steps}) == run_identity(values) and \
        not args.cap_shapes_training()


def same_first_steps(earlier: dict, values: dict) -> bool:
    """Whether a run of trainer arguments `values` repeats the steps of an earlier run of arguments `earlier`
    exactly until that one stopped, so that it may go on from the earlier run's last checkpoint (a comparison's
    equal-FLOPs run from its equal-steps twin, a run whose study raised its step cap): `same_but_cap`, and an
    earlier cap on which both log and evaluate (a run logs and evaluates at its last step too, and the
    evaluations are the plateau rule's history)."""
    args = arguments_from(values)[2]
    return same_but_cap(earlier, values) and earlier["max_steps"] % args.eval_interval == 0 and \
        earlier["max_steps"] % args.log_interval == 0


def raised_cap(saved, spec: dict) -> int | None:
    """The earlier step cap, where a run folder's saved spec is `spec`'s run but for a lower cap
    (`same_but_cap`, the same launch); None otherwise."""
    if not is_spec(saved) or {k: v for k, v in saved.items() if k != "values"} != \
            {k: v for k, v in spec.items() if k != "values"}:
        return None
    before, now = saved["values"].get("max_steps"), spec["values"].get("max_steps")
    if not (isinstance(before, int) and isinstance(now, int) and now > before):
        return None
    return before if same_but_cap(saved["values"], spec["values"]) else None


def spec_changes(saved, spec: dict) -> str:
    """What differs between a run folder's saved spec and `spec`, as 'name: X there, Y now' (execution arguments
    left out, as `same_run` leaves them)."""
    if not is_spec(saved):
        return f"its {RUN_SPEC} is not a run spec"

    def flat(one: dict) -> dict:  # the launch and the run's identity, in one mapping
        return {**{k: v for k, v in one.items() if k != "values"}, **run_identity(one["values"])}

    then, now, unset = flat(saved), flat(spec), object()
    return ", ".join(f"{name}: {then.get(name, '(unset)')} there, {now.get(name, '(unset)')} now"
                     for name in sorted(then.keys() | now.keys()) if then.get(name, unset) != now.get(name, unset))


def judge_folder(run_dir: Path, saved, spec: dict) -> tuple[bool, int | None]:
    """(whether run folder `run_dir`, whose saved spec is `saved`, holds `spec`'s run; the lower step cap its run
    goes on from, where only the cap rose (`raised_cap`) and the run was interrupted or stopped by that cap with
    the same first steps). A run the plateau rule stopped is `spec`'s under any higher cap: the rule does not
    read the cap."""
    if same_run(saved, spec):
        return True, None
    earlier, ended = raised_cap(saved, spec), stopped_by(run_dir)
    if earlier is None or ended == "plateau":
        return earlier is not None, None
    return False, earlier if ended is None or same_first_steps(saved["values"], spec["values"]) else None


def stopped_by(run_dir: Path) -> str | None:
    """What ended a finished run ("plateau" or "max_steps"), from its results file; None where there is none."""
    try:
        return json.loads((Path(run_dir) / RESULTS).read_text()).get("stopped_by", "max_steps")
    except (OSError, ValueError, AttributeError):
        return None


def _spec_of(run_dir: Path):
    try:
        return json.loads((run_dir / RUN_SPEC).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _train_in_process(values: dict, log_file: Path, _accelerate_config) -> str | None:
    """The trainer in this process: each run builds its own Accelerator on the one process state, which is why
    an in-process study's runs must share their precision and DeepSpeed settings (`check_launch`)."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with open(log_file, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            result = train(*arguments_from(values))
        except Exception:  # noqa: BLE001  (any failure of one run is recorded; the grid goes on)
            text = traceback.format_exc()
            log.write(text)
            return text.strip()
        finally:
            for sig, handler in handlers.items():  # the trainer's Ctrl-C handler goes with it
                signal.signal(sig, handler)
    if "stopped_at" in result:  # Ctrl-C / SIGTERM: the trainer saved a checkpoint; stop the whole experiment
        raise KeyboardInterrupt(f"stopped at step {result['stopped_at']}; rerun the same command to resume")
    return None


def _train_with_accelerate(values: dict, log_file: Path, accelerate_config: str | None) -> str | None:
    """`accelerate launch` of the trainer on the run's arguments, written as its config file (RUN_CONFIG)."""
    config = log_file.parent / RUN_CONFIG
    config.write_text(yaml.safe_dump(values, sort_keys=False))
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    cmd += ["--config_file", accelerate_config] if accelerate_config else \
        ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["-m", "moe_reason.training.trainer", str(config)]
    with open(log_file, "a") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    if code == 0:
        return None
    tail = log_file.read_text().strip().splitlines()[-20:]
    return f"accelerate launch exited with {code}:\n" + "\n".join(tail)


# ----------------------------------------------------------------------------
# Reading a finished run back


def collect_run(run_dir) -> dict:
    """A finished run's figures, from its results and metrics files: RunRecord fields by name."""
    run_dir = Path(run_dir)
    results = json.loads((run_dir / RESULTS).read_text())
    records = [json.loads(line) for line in open(run_dir / METRICS)]
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
        # [step, loss, token accuracy, exact match]: a task run's learning curve is its fourth column
        "eval_curve": [[r["step"], r["eval/loss"], r["eval/accuracy"], r.get("eval/exact_match")] for r in evals],
        "stopped_by": results.get("stopped_by", "max_steps"), "stopped_at": results["step"],
        "nan": nan, "machines": results.get("machines"),
        "started_from": (json.loads((run_dir / STARTED_FROM).read_text())["started_from"]
                         if (run_dir / STARTED_FROM).is_file() else None),
        **task_figures(run_dir),
    }


def task_figures(run_dir: Path, scores: str = TASK_EVAL) -> dict:
    """exact_accuracy, cell_accuracy, exact_accuracy_by_steps and q_head of a scored task run ({} otherwise)."""
    scored = Path(run_dir) / FINAL / scores
    if not scored.is_file():
        return {}
    result = json.loads(scored.read_text())
    return {k: result[k] for k in ("exact_accuracy", "cell_accuracy", "exact_accuracy_by_steps", "q_head_by_steps",
                                   "q_head", "by_difficulty", "q_head_thresholds", "puzzles", "curve_puzzles")
            if k in result}


# ----------------------------------------------------------------------------
# Curves and throughput across seeds


THROUGHPUT_NOTE = ("tokens/s and wall time are each run's training loop over all its starts (its checkpoints carry the "
                   "time; a run resumed from a checkpoint older than that counts from its resume): they compare only "
                   "between runs that had the machine alike")


def throughput_lines(runs: list[RunRecord]) -> list[str]:
    """A report's throughput note, and which machine trained which finished runs where any run recorded it (the
    trainer's `machines`: one per start that ran on another)."""
    lines = ["", f"Throughput: {THROUGHPUT_NOTE}."]
    done = [r for r in runs if r.finished]
    if not any(r.machines for r in done):
        return lines
    by_machine = {}
    for r in done:
        for name in r.machines or [UNRECORDED_MACHINE]:
            by_machine.setdefault(name, []).append(r.title)
    trained = "; ".join(f"{name}: {', '.join(sorted(titles))}" for name, titles in by_machine.items())
    return lines + ["", f"Machines: {trained}."]


def settings_line(base: dict) -> list[str]:
    """A report's paragraph naming the trainer arguments each run starts from: the file's `base` with any
    `--set`, so a report made from a file with overrides says what ran."""
    shared = ", ".join(f"`{name}={value}`" for name, value in base.items())
    return [f"Base trainer arguments (the file's `base` with any `--set`; an arm's or variant's own fields, and "
            f"an equal-FLOPs run's step cap, override them): {shared or 'none'}.", ""]


def mean_curve(curves: list[list[list[float]]], column: int = 1) -> tuple[list[float], list[float], list[float]]:
    """Steps, mean and std over runs of [[step, value, ...], ...] curves, at the steps all runs share."""
    shared = sorted(set.intersection(*(set(p[0] for p in c) for c in curves))) if curves else []
    by_run = [{p[0]: p[column] for p in c} for c in curves]
    stats = [mean_std([run[s] for run in by_run]) for s in shared]
    return shared, [m for m, _ in stats], [s for _, s in stats]


def write_json(path: Path, payload: dict) -> None:
    """Write atomically: a crash mid-write never leaves a truncated results file."""
    write_text(path, json.dumps(payload, indent=2, default=str))


def pyplot():
    """matplotlib's pyplot on the Agg backend: reports are files, and no display is needed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    pyplot().close(fig)
