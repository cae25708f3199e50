"""What the ablation and comparison runners share: their command line, the budget and ETA between runs,
and the report files (the JSON record, the plot and the Markdown made from it) with the curves and notes
both reports draw. A study's file is read by `study_file`, each run trained or skipped by `run_folder`
and read back by `run_results`.

A runner's report JSON is its record: a command narrowed by --seeds (or the ablation's --variants)
keeps the other finished runs in it (`other_runs`); the finished runs it has yet to reach count in
its report while it runs, and if it stops. A finished run whose folder is gone (deleted to
free the disk, or a fresh clone holding only a committed report JSON copied into output_dir) is kept
from it while its arguments are unchanged, instead of trained again. Such a run cannot be checked for a
model default changed since (that needs its saved config), so the runner prints `[kept]`.

"""

import json
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from transformers import HfArgumentParser

from ..atomic import write_text
from ..errors import MissingFileError, UserError
from ..layout import STUDY_LOCK, checkpoint_step
from ..locks import hold_folder
from ..training.trainer import EXECUTION_ARGUMENTS, UNRECORDED_MACHINE
from .records import RunRecord
from .run_folder import RunState
from .statistics import mean_std
from .study_file import RunnerArguments


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
    holding its output folder (a second runner on the same study is refused, naming the first; --status trains
    nothing and holds nothing); or --report
    OUTPUT_DIR -> report(OUTPUT_DIR), which rebuilds the report from the JSON the runs left."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--report"]:
        if len(argv) != 2:
            raise UserError(f"usage: --report OUTPUT_DIR (got {argv[1:]})")
        with hold_folder(Path(argv[1]), STUDY_LOCK, STUDY_IN_USE):
            return report(Path(argv[1]))
    path, args = parse_runner_cli(argv, arguments_class, usage)
    study = load(path, args)
    if study.status:  # reads the study's folder only, beside the runner that may hold it
        return run(study)
    with hold_folder(study.output_dir, STUDY_LOCK, STUDY_IN_USE):
        return run(study)


STUDY_IN_USE = ("study folder {folder} is in use by another runner ({who}): wait for it to end or stop it (its runs "
                "resume), or give this one another --output_dir")


def exit_status(report) -> int:
    """A runner command's exit status: 1 when any of its runs failed (scripts and CI must notice), else 0."""
    return int(any(not r.finished for r in report.runs))


class RunBudget:
    """Between runs: whether --max_hours leaves time to start another, and a one-line ETA after each run.

    The ETA prices each run still to come at the steps from where it starts (step 0, its own last checkpoint,
    or the step of another's checkpoint it goes on from) to its step cap, times the seconds per step its
    model's runs took (a comparison's arm, a grid's variant; the finished ones, this command's or earlier, on
    whatever machine ran them, and the started ones so far): an upper bound where the plateau rule stops runs
    before their caps.
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

    def after(self, runs: list[RunRecord], earlier: Iterable[RunRecord] = (), starts: dict[int, int] | None = None,
              states: dict[int, RunState] | None = None):
        """The ETA once `runs` are done; `earlier`: the report's finished runs this command has yet to reach;
        `starts`: {plan index: the step a run still to come will start at} for runs that go on from another's
        checkpoint (a comparison's equal-FLOPs run from its twin's last step); `states`: {plan index: where a
        run still to come stands} (`run_folder.run_state`): a started one trains from its last checkpoint, at
        the seconds per step it took so far, which price its model until one of its runs finishes."""
        self.trained += not runs[-1].skipped
        starts = {i: step for i, step in (starts or {}).items() if i >= len(runs)}
        states = {i: state for i, state in (states or {}).items() if i >= len(runs)}
        todo = list(enumerate(self.plan))[len(runs):]
        left = [(model, cap, states[i].steps_left(cap, starts.get(i, 0)) if i in states else cap - starts.get(i, 0))
                for i, (model, cap) in todo]
        started = {}
        for i, (model, _) in todo:
            if i in states and states[i].seconds_per_step:
                started.setdefault(model, []).append(states[i].seconds_per_step)
        training = [i for (i, _), (*_, steps) in zip(todo, left) if steps > 0]
        from_twin = sum(i in starts and (i not in states or states[i].state == "new") for i in training)
        head_start = f" ({from_twin} of them from their twin's last step)" if from_twin else ""
        price = hours_left(left, [*runs, *earlier], head_start, started)
        print(f"[eta] {len(runs)}/{len(self.plan)} runs done, {(time.perf_counter() - self.start) / 60:.1f} min in "
              f"this command" + (f"; the {len(training)} to train: {price}" if training else ""), flush=True)


def started_first(todo: list, states: list[RunState], stage: Callable[[object], int] = lambda run: 0) -> list:
    """`todo` with the runs stopped part-way (a checkpoint in their folder, `states[i]`) first within each
    `stage`, the rest in their order: a run left part-way (by a command narrowed with --seeds, or stopped while
    another came first) finishes before a new one starts, instead of its steps sitting idle."""
    order = sorted(range(len(todo)), key=lambda i: (stage(todo[i]), states[i].state != "started"))
    return [todo[i] for i in order]


def hours_left(left: list[tuple[str, int, int]], finished: Iterable[RunRecord], note: str = "",
               started: dict[str, list[float]] | None = None) -> str:
    """The time the runs `left` ([(model, step cap, steps it has to train)]) take, at the seconds per step their
    model's `finished` runs took (a comparison's arm, a grid's variant) and its `started` ones so far ({model:
    [seconds per step of each]}): an upper bound where the plateau rule stops runs before their caps, so it is
    followed, when less, by the time if each stops no later than its model's finished runs under the same cap
    did (a run already past the latest of them is priced to its cap)."""
    per_step = {model: list(rates) for model, rates in (started or {}).items()}  # model -> seconds per step, a run each
    stops = {}  # (model, step cap) -> the step each finished run under that cap stopped at
    for r in finished:
        if not r.finished:
            continue
        model = r.arm or r.run
        # a run that went on from another's checkpoint trained from that step only
        steps = (r.stopped_at or r.steps or 0) - (checkpoint_step(r.started_from or "") or 0)
        if steps > 0 and r.wall_seconds:
            per_step.setdefault(model, []).append(r.wall_seconds / steps)
        if r.stopped_at and r.steps:
            stops.setdefault((model, r.steps), []).append(r.stopped_at)
    training = [(model, cap, steps) for model, cap, steps in left if steps > 0]
    rate = {model: sum(rates) / len(rates) for model, rates in per_step.items()}

    def to_stop(model: str, cap: int, steps: int) -> int:  # a run past the latest stop: no better guess than its cap
        stop, at = max(stops.get((model, cap), [cap])), cap - steps
        return steps if at >= stop else stop - at

    priced = [(model, cap, steps) for model, cap, steps in training if model in rate]
    at_caps = sum(rate[model] * steps for model, _, steps in priced)
    by_stops = sum(rate[model] * to_stop(model, cap, steps) for model, cap, steps in priced)
    unpriced = sorted({model for model, *_ in training if model not in rate})
    parts = [f"at most {at_caps / 3600:.1f} h for {len(priced)} at their step caps{note}"] if priced else []
    if by_stops < at_caps:
        parts[0] += (f", about {by_stops / 3600:.1f} h if each stops no later than its arm's (variant's) finished "
                     "runs did")
    parts += [f"no estimate yet for {', '.join(unpriced)} (no run trained so far)"] if unpriced else []
    return "; ".join(parts) or "nothing to train"


def print_status(rows: list[tuple[str, str, int, int, RunState]], finished: list[RunRecord]) -> None:
    """--status: a line per planned run ([(title, model, step cap, the step it would start at if new, its state)]),
    and the time those still to train take at the seconds per step of their models' `finished` runs and of the
    started ones up to their last checkpoints."""
    for title, _, cap, start, state in rows:
        print(state.line(title, cap, start), flush=True)
    done = sum(state.state in ("finished", "kept") for *_, state in rows)
    drifted = sum(state.state == "drifted" for *_, state in rows)
    left = [(model, cap, state.steps_left(cap, start)) for _, model, cap, start, state in rows]
    training = [(model, cap, steps) for model, cap, steps in left if steps > 0]
    started = {}
    for _, model, _, _, state in rows:
        if state.seconds_per_step:
            started.setdefault(model, []).append(state.seconds_per_step)
    print(f"[status] {done}/{len(rows)} runs finished" + (f", {drifted} refused" if drifted else "")
          + (f"; the {len(training)} to train: {hours_left(training, finished, started=started)}" if training else ""),
          flush=True)


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


def other_runs_note(others: list[RunRecord], record: str, left_out: str, flags: str) -> list[str]:
    """A report's line naming the finished runs its `record` file keeps and its figures leave out (`left_out` by
    the command's `flags`, or trained with other arguments), so that a narrowed report does not read as the
    whole study."""
    if not others:
        return []
    titles = ", ".join(sorted(r.title for r in others))
    return ["", f"Also in {record}, not counted here ({left_out}, or runs trained with other arguments): {titles}. "
            f"The file's command without {flags} counts those whose arguments are its own."]


def settings_line(base: dict) -> list[str]:
    """A report's paragraph naming the trainer arguments each run starts from: the file's `base` with any
    `--set`, so a report made from a file with overrides says what ran. Those that change how a run computes,
    not what (`EXECUTION_ARGUMENTS`), are named apart: they are the last command's, and a study's earlier runs
    may have had others."""
    def listed(execution: bool) -> str:
        return ", ".join(f"`{name}={value}`" for name, value in base.items()
                         if (name in EXECUTION_ARGUMENTS) == execution)

    line = (f"Base trainer arguments (the file's `base` with any `--set`; an arm's or variant's own fields, and an "
            f"equal-FLOPs run's step cap, override them): {listed(False) or 'none'}.")
    if execution := listed(True):
        line += (f" The last command ran with {execution}: these change how a run computes, not what, and "
                 "earlier runs may have had others.")
    return [line, ""]


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
