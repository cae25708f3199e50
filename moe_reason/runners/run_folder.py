"""One training run of a study, in its own folder: trained, resumed, skipped or refused.

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
"""

import contextlib
import dataclasses
import json
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..atomic import install, staged, write_text
from ..layout import BEST, FINAL, METRICS, RESULTS, RUN_CONFIG, RUN_SPEC, STARTED_FROM, checkpoint_step, run_outputs
from ..training.arguments import arguments_from, build_config
from ..training.checkpointing import complete_checkpoints, read_trainer_state
from ..training.build import TOKENIZER_FIELDS, config_drift, describe_drift, saved_config
from ..training.trainer import EXECUTION_ARGUMENTS, train
from .records import RunRecord
from .run_results import collect_run, score_task_run, scored, solved_share


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

    spec = run_spec(values, run_dir, launcher, accelerate_config)
    values, folder = spec["values"], read_folder(run_dir, spec)
    finished, resume = folder.finished, folder.resume  # resume: also where it goes on from another run's checkpoint
    if folder.drift:  # a run made by earlier code, whose arguments build another model with today's
        state = "finished earlier" if finished else f"interrupted earlier (at {folder.checkpoints[-1].name})"
        error = (f"{state}, but its arguments now build a different model ({describe_drift(folder.drift)}): a "
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

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RUN_SPEC).write_text(json.dumps(spec, indent=2))
    how = f" (resuming{resumed_at(run_dir, folder.checkpoints, values)})" if resume else ""
    if resume and folder.earlier_cap is not None:
        how = f" (resuming: its step cap rose from {folder.earlier_cap} to {values['max_steps']})"
        # the folder's spec now names the higher cap: the results of the lower one must not pass for this run's
        # if it stops before the end (it is then an interrupted run, resumed the next time)
        (run_dir / RESULTS).unlink(missing_ok=True)
    if folder.replaced:  # the trainer's --overwrite_output_dir is about to delete it: say why
        how = f" (in place of the run its folder holds, made with other arguments: {spec_changes(folder.saved, spec)})"
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


def run_spec(values: dict, run_dir: Path, launcher: str, accelerate_config: str | None) -> dict:
    """What a run folder's RUN_SPEC holds for the run of trainer arguments `values`: them, with its folder as
    output_dir, and its launch."""
    return {"values": {**values, "output_dir": str(run_dir)}, "launcher": launcher,
            "accelerate_config": accelerate_config}


@dataclass(frozen=True)
class Folder:
    """What a run folder holds for one run (`run_spec`): how `run_training` acts on it, and `run_state` reports."""
    saved: dict | None  # its RUN_SPEC, as written
    earlier_cap: int | None  # the lower step cap the run goes on from (`judge_folder`)
    checkpoints: list[Path]  # the complete checkpoints of this run
    finished: bool  # this run, finished
    resume: bool  # this run, interrupted at its last checkpoint
    replaced: bool  # another run's outputs, which this run's start deletes
    drift: dict  # where finished or resumed: the fields its arguments now build otherwise (`model_drift`)


def read_folder(run_dir: Path, spec: dict) -> Folder:
    """What `run_dir` holds of the run `spec` (`run_spec`), read without writing anything."""
    saved = _spec_of(run_dir)
    same, earlier_cap = judge_folder(run_dir, saved, spec)
    checkpoints = complete_checkpoints(run_dir) if same or earlier_cap is not None else []
    finished = same and (run_dir / RESULTS).is_file()
    resume = not finished and bool(checkpoints)
    replaced = not (same or resume) and saved is not None and any(path.exists() for path in run_outputs(run_dir))
    drift = model_drift(run_dir / FINAL if finished else checkpoints[-1], spec["values"]) if finished or resume \
        else {}
    return Folder(saved, earlier_cap, checkpoints, finished, resume, replaced, drift)


def kept_from_record(kept: RunRecord | None, values: dict, run_dir: Path) -> bool:
    """Whether a study's record `kept` is the run of `values` in place of its folder: the folder is gone (deleted,
    or a fresh checkout holding only the report) and the record ran with these arguments."""
    return bool(same_record(kept, values)) and not Path(run_dir).exists()


@dataclass(frozen=True)
class RunState:
    """Where one planned run stands (a runner's --status), read from its folder and the study's record."""
    state: str  # finished, kept (the record's; its folder is gone), started, drifted, other or new
    step: int = 0  # where it stopped (finished, kept), or its last checkpoint's step (started)
    note: str = ""  # what stopped it, or what its folder holds instead
    seconds_per_step: float | None = None  # started: its training loop's time per step up to its last checkpoint
    last_eval: str = ""  # started: its latest held-out evaluation up to its last checkpoint, e.g. "exact 10.2%"

    def steps_left(self, cap: int, start: int = 0) -> int:
        """The steps it has still to train under step cap `cap`: none once finished (or refused), from its last
        checkpoint once started, from step 0 over another run's folder, else from `start` (its twin's step)."""
        if self.state in ("finished", "kept", "drifted"):
            return 0
        return cap - {"started": self.step, "other": 0}.get(self.state, start)

    def line(self, title: str, cap: int, start: int = 0) -> str:
        """`[STATE] title: ...`, for a run capped at `cap` that will start at step `start` if it has not."""
        stopped = {"plateau": "plateaued", "max_steps": "hit its cap"}.get(self.note, self.note)
        return f"[{self.state}] {title}: " + {
            "finished": f"{stopped} at step {self.step:,}",
            "kept": f"{stopped} at step {self.step:,} (the report's record; its folder is gone)",
            "started": f"at step {self.step:,} of {cap:,} (its last checkpoint" + "".join(
                f"; {part}" for part in (self.last_eval, self.seconds_per_step and
                                         f"{self.seconds_per_step:.1f} s a step so far") if part) + ")",
            "drifted": f"its arguments now build a different model ({self.note}); the runner reports it failed",
            "other": f"its folder holds a run made with other arguments ({self.note}): it trains again from step 0",
            "new": f"not started (cap {cap:,})" if not start else
                   f"not started; goes on from its twin's step {start:,} (cap {cap:,})" if start < cap else
                   "not started; its twin plateaued within its cap, so its twin's run is its own",
        }[self.state]


def run_state(run_dir: Path, values: dict, launcher: str, accelerate_config: str | None,
              kept: RunRecord | None) -> RunState:
    """Where the run of trainer arguments `values` in `run_dir` stands, as `run_training` would find it (and
    `kept`, the study's record of it, where its folder is gone); nothing is written."""
    run_dir = Path(run_dir)
    spec = run_spec(values, run_dir, launcher, accelerate_config)
    folder = read_folder(run_dir, spec)
    if folder.drift:
        return RunState("drifted", note=describe_drift(folder.drift))
    if folder.finished:
        return RunState("finished", json.loads((run_dir / RESULTS).read_text())["step"], stopped_by(run_dir))
    if folder.resume:
        step = checkpoint_step(folder.checkpoints[-1])
        seconds = read_trainer_state(folder.checkpoints[-1]).get("train_seconds")
        return RunState("started", step, seconds_per_step=seconds / step if seconds and step else None,
                        last_eval=latest_evaluation(run_dir, step, bool(values.get("task"))))
    if kept_from_record(kept, values, run_dir):
        return RunState("kept", kept.stopped_at or 0, kept.stopped_by or "")
    if folder.replaced:
        return RunState("other", note=spec_changes(folder.saved, spec))
    return RunState("new")


def resumed_at(run_dir: Path, checkpoints: list[Path], values: dict) -> str:
    """Where a resumed run of trainer arguments `values` goes on, and how it stood:
    ' at step 3,094 of 24,000; exact 2.7% at step 2,800'."""
    if not checkpoints:
        return ""
    step = checkpoint_step(checkpoints[-1].name)
    last = latest_evaluation(run_dir, step, bool(values.get("task")))
    return f" at step {step:,} of {values['max_steps']:,}" + (f"; {last}" if last else "")


def latest_evaluation(run_dir: Path, step: int, task: bool) -> str:
    """A run's latest held-out evaluation at or before `step`, from its metrics file: "exact 10.2% at step 400"
    for a `task` run (the share of puzzles solved), else "val loss 2.345 at step 400"; "" before the first."""
    try:
        records = [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines()]
    except (OSError, ValueError):
        return ""
    evals = [r for r in records if "eval/loss" in r and r["step"] <= step]
    if not evals:
        return ""
    last = evals[-1]
    if task and solved_share(last) is not None:
        return f"exact {100 * solved_share(last):.1f}% at step {last['step']:,}"
    return f"val loss {last['eval/loss']:.3f} at step {last['step']:,}"


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
    if kept_from_record(kept, values, run_dir):
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
