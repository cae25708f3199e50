"""N named arms trained on the same data, data order, training settings and seeds, compared at equal
optimizer steps and, separately, at equal training FLOPs.

    moe-reason-compare experiments/exp8_compare_offline.yaml
    moe-reason-compare CONFIG.yaml --output_dir outputs/cmp --seeds 0 1 2 --set max_steps=200

A comparison file:

    output_dir: outputs/compare
    launcher: in_process                     # or accelerate (+ accelerate_config)
    seeds: [0, 1, 2]
    base: {model_preset: small, max_steps: 1000, learning_rate: 1.0e-3}    # shared by every arm
    arms:                                    # any number >= 2, each a mapping of model fields
      recursive: {model_type: recursive, h_cycles: 2, l_cycles: 2, halt_max_steps: 2}
      direct: {model_type: base}
    reference: recursive                     # the arm the others are compared with (default: the first)
    metric: loss                             # or exact_accuracy, for a --task base (higher is better)
    equal_flops: true                        # also run each costlier arm at the cheapest arm's FLOPs; or
                                             # `reference`: each cheaper arm also runs at the reference's FLOPs
    equal_steps: true                        # false: costlier arms run at equal FLOPs only (long studies)
    transfer: {task_size: 8}                 # task bases: also score every run on the puzzles these task
                                             # arguments generate (easy-to-hard), in its own report section

`baseline:` and `recursive:` at the top level are the two-arm form (reference: baseline). `extends: OTHER.yaml`
builds on another comparison file (`study_file.load_study_mapping`): its keys, the base updated name by name.
The arms may set model fields, and `learning_rate` where each arm is to train at its own best
one (the report names each arm's); batch, schedule, data and seed are the base's, but for the step cap
and the evaluation interval (`max_steps`, `eval_interval`) of an arm whose update costs a fraction of the
others' (`supervision_updates: per_step` runs one of 8 supervision steps per update: 8x the cap spends the
same FLOPs). `--set NAME=VALUE` sets NAME for the arms that set their own too.
Runs per seed (the equal-steps runs of every seed first, then the equal-FLOPs runs): every arm at
`max_steps` (equal steps) and, with `equal_flops`, each costlier arm
at the steps that spend the cheapest arm's FLOPs (its own full schedule: a base `warmup_steps` is the
same number of steps in every run, a base `warmup_ratio` the same share of each). `equal_flops: reference`
turns this around for studies whose reference is the costly arm (a deep recursion): each arm cheaper than
the reference also runs for the steps that spend the reference's FLOPs, so the cheap arms are not starved;
with `stop_on_plateau` in the base those steps are a cap, and each run says whether it plateaued or hit it.
Under a schedule the cap does not shape (`lr_scheduler: constant`, no `warmup_ratio`) an equal-FLOPs
run's first steps are its equal-steps twin's, so it starts from the twin's last checkpoint instead of
step 0; its record says so (`started_from`). A twin that plateaued within the run's cap leaves it nothing to
train (the plateau rule does not read the cap): the twin's record is the run's, and nothing trains (`[ended]`).
`equal_steps: false` keeps only the budget arm's `max_steps` run and the equal-FLOPs runs: the
costlier arms' full-length runs are what makes a long study long. With a task base each
finished run's export is scored on the held-out puzzles (`tasks.scoring`). Writes `comparison.json`,
`comparison.png` and `COMPARISON.md`; a winner is named only where the 95% interval of the difference
over seeds excludes 0 (moe_reason.runners.statistics).
`--max_hours H` starts no run after H hours; `--report DIR` rebuilds the report from DIR/comparison.json.
`--arms A ...` trains only those arms' runs (equal steps and equal FLOPs): the other arms' finished runs enter
the verdicts from comparison.json and none trains, so a study's cheap arms can train on one machine and its
costly arm on another, each command's report complete with what is done. `--kinds equal_steps` (or
`equal_flops`) likewise trains only that kind of run. `--status` trains nothing: it prints where each planned
run stands and the hours left (`run_folder.run_state`), holding no lock.
comparison.json is the comparison's record (moe_reason.runners.engine): a command narrowed by --seeds keeps the
other finished runs in it, and a finished run whose folder is gone is kept from it while its arguments are unchanged.
"""

import dataclasses
import math
from pathlib import Path

from ..data.prepare import prepare_data
from ..errors import UserError, run_cli
from ..layout import TRANSFER_EVAL
from ..training.arguments import arguments_from, build_config
from ..training.metrics import training_flops_per_token
from .comparison_report import ARM_TRAINING_FIELDS, METRICS, comparison_markdown, plot
from .engine import ReportFiles, RunBudget, exit_status, print_status, run_runner, started_first, write_json
from .run_folder import (RunState, last_checkpoint_within, run_state, same_first_steps, same_record, train_or_keep,
                         waiting_runs)
from .run_results import score_task_run, task_argument_names, task_figures
from .records import Accounting, ComparisonReport, Depth, RunRecord, Side, Transfer, TrendPoint, Verdict
from .statistics import RULE as STATISTICS_RULE
from .statistics import mean_std, welch
from .study_file import (RunnerArguments, StudySettings, check_arguments, check_launch, load_runner_file,
                         model_argument_names, safe_name)

LEGACY_ARMS = ("baseline", "recursive")
EQUAL_FLOPS_REFERENCE = "reference"  # equal_flops: the cheaper arms also run at the reference arm's FLOPs
OWN_KEYS = {"arms", "reference", "metric", "equal_flops", "equal_steps", "transfer", *LEGACY_ARMS}
KINDS = ("equal_steps", "equal_flops")  # a planned run's kind: its arm's step cap, or the budget arm's FLOPs
USAGE = ("moe-reason-compare CONFIG.yaml [--output_dir D] [--seeds 0 1 2] [--arms A B] [--kinds equal_steps] "
         "[--launcher in_process|accelerate] [--set name=value ...]")


@dataclasses.dataclass
class CompareArguments(RunnerArguments):
    arms: list[str] | None = dataclasses.field(default=None, metadata={"help": (
        "Train only these arms' runs now (equal steps and equal FLOPs); the other arms' finished runs count from "
        "comparison.json and none trains.")})
    kinds: list[str] | None = dataclasses.field(default=None, metadata={"help": (
        "Train only these kinds of runs now: equal_steps, equal_flops (default: both); the others' finished runs "
        "count from comparison.json. E.g. --kinds equal_steps: every arm's seeds before any equal-FLOPs run.")})


@dataclasses.dataclass(kw_only=True)
class Comparison(StudySettings):
    """A comparison file, validated, with the command line's overrides."""
    arms: dict[str, dict]  # name -> its model fields (and its own learning_rate, where it has one)
    reference: str  # the arm the others are compared with
    metric: str = "loss"  # a METRICS key
    equal_flops: bool | str = True  # or EQUAL_FLOPS_REFERENCE
    equal_steps: bool = True
    transfer: dict = dataclasses.field(default_factory=dict)  # task arguments of the puzzles also scored
    training: list[str] | None = None  # the arms whose runs this command may train (None: every arm)
    kinds: list[str] | None = None  # the kinds of runs (KINDS) this command may train (None: both)

    def trains(self, item: "PlannedRun") -> bool:
        """Whether this command may train planned run `item` (--arms and --kinds)."""
        return (not self.training or item.arm in self.training) and (not self.kinds or item.kind in self.kinds)

    def left_out_by(self, item: "PlannedRun") -> str:
        """The option that leaves planned run `item` to another command, for its messages."""
        return "--arms" if self.training and item.arm not in self.training else "--kinds"


def load_comparison(path, args: CompareArguments | None = None) -> Comparison:
    args = args or CompareArguments()
    spec, settings = load_runner_file(path, "comparison", OWN_KEYS, args, default_seeds=[0, 1],
                                      output_prefix="compare")
    legacy = [arm for arm in LEGACY_ARMS if arm in spec]
    if legacy and "arms" in spec:
        raise UserError(f"comparison {path}: give either 'arms:' or the two-arm form {LEGACY_ARMS}, not both")
    raw = spec.get("arms") if "arms" in spec else {arm: spec.get(arm) for arm in LEGACY_ARMS}
    if legacy and len(legacy) < 2:
        raise UserError(f"comparison {path} needs both '{LEGACY_ARMS[0]}:' and '{LEGACY_ARMS[1]}:' mappings")
    if not isinstance(raw, dict) or len(raw) < 2:
        raise UserError(f"comparison {path}: 'arms:' must map two or more arm names to model fields")
    allowed = ", ".join(sorted(ARM_TRAINING_FIELDS))
    arms = {safe_name(name): check_arguments(fields, f"comparison {path}: arm {name} (model fields and {allowed} "
                                             "only: every other training setting is the base's)",
                                             model_argument_names() | ARM_TRAINING_FIELDS)
            for name, fields in raw.items()}
    overrides = settings.overrides  # the command line beats the file, an arm's own settings too
    arms = {name: {**fields, **{k: v for k, v in overrides.items() if k in fields and k in ARM_TRAINING_FIELDS}}
            for name, fields in arms.items()}
    if not legacy and not all("model_type" in fields for fields in arms.values()):
        raise UserError(f"comparison {path}: every arm must name its model_type (base or recursive)")
    arms.get("baseline", {}).setdefault("model_type", "base")
    arms.get("recursive", {}).setdefault("model_type", "recursive")
    reference = spec.get("reference", next(iter(arms)))
    if reference not in arms:
        raise UserError(f"comparison {path}: reference={reference!r} names no arm; arms: {sorted(arms)}")
    metric = spec.get("metric", "loss")
    if metric not in METRICS:
        raise UserError(f"comparison {path}: metric={metric!r} is invalid: must be one of {sorted(METRICS)}")
    if metric == "exact_accuracy" and not settings.base.get("task"):
        raise UserError(f"comparison {path}: metric exact_accuracy needs a task in base (task: sudoku or maze)")
    equal_flops, equal_steps = spec.get("equal_flops", True), bool(spec.get("equal_steps", True))
    if equal_flops not in (True, False, EQUAL_FLOPS_REFERENCE):
        raise UserError(f"comparison {path}: equal_flops={equal_flops!r} is invalid: must be true, false or "
                        f"{EQUAL_FLOPS_REFERENCE!r}")
    if not (equal_flops or equal_steps):
        raise UserError(f"comparison {path}: equal_flops and equal_steps are both false: nothing to compare")
    transfer = check_arguments(spec.get("transfer"), f"comparison {path}: transfer (task arguments)",
                               task_argument_names())
    if transfer and not settings.base.get("task"):
        raise UserError(f"comparison {path}: transfer scores task runs on other puzzles; base has no task")
    unknown = sorted(set(args.arms or ()) - set(arms))
    if unknown:
        raise UserError(f"comparison {path}: --arms {' '.join(unknown)} names no arm; arms: {sorted(arms)}")
    unknown = sorted(set(args.kinds or ()) - set(KINDS))
    if unknown:
        raise UserError(f"--kinds {' '.join(unknown)}: not a kind of run; kinds: {' '.join(KINDS)}")
    check_launch(settings.launcher, [{**settings.base, **fields} for fields in arms.values()], f"comparison {path}")
    return Comparison(**vars(settings), arms=arms, reference=reference, metric=metric, equal_flops=equal_flops,
                      equal_steps=equal_steps, transfer=transfer, training=args.arms, kinds=args.kinds)


def arm_config(values: dict):
    """The model config these trainer arguments build, and their step budget.

    Prepares (or loads the cached) data once for the exact vocabulary size.
    """
    model_args, data_args, train_args = arguments_from(values)
    data = prepare_data(data_args, log=lambda _: None)
    config = build_config(model_args, vocab_size=len(data.tokenizer), task=data.summary.get("task"))
    return config, data.summary["block_size"], train_args.max_steps


def depth_of(config) -> Depth:
    """The recursion's shape for a report's arm table (a direct model: its layers, one pass, one step)."""
    layers = config.num_hidden_layers
    if not hasattr(config, "h_cycles"):
        return Depth(effective_depth=layers, passes=1, gradient_passes=1, supervision_steps=1, steps_per_update=1)
    passes = config.h_cycles * (config.l_cycles + 1)
    return Depth(effective_depth=passes * layers, passes=passes,
                 gradient_passes=config.grad_passes_per_supervision_step(), supervision_steps=config.halt_max_steps,
                 steps_per_update=config.training_supervision_steps())


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """One run a comparison plans per seed: an arm at equal steps, or at the budget arm's FLOPs."""
    kind: str  # "equal_steps" or "equal_flops"
    arm: str
    steps: int  # its step cap

    @property
    def name(self) -> str:
        """Its name (and folder): the arm, or ARM_equal_flops for its equal-FLOPs run."""
        return self.arm if self.kind == "equal_steps" else f"{self.arm}_equal_flops"


def plan_runs(cmp: Comparison) -> tuple[list[PlannedRun], Accounting]:
    """The runs (kind, arm, steps) per seed and the FLOP accounting behind the equal-FLOPs budgets."""
    flops, depth, steps = {}, {}, {}
    for arm, fields in cmp.arms.items():
        config, block, steps[arm] = arm_config({**cmp.base, **fields})
        flops[arm], depth[arm] = training_flops_per_token(config, block), depth_of(config)
    run_flops = {arm: steps[arm] * f for arm, f in flops.items()}  # per token over an equal-steps run
    cheapest = min(run_flops, key=run_flops.get)
    # equal_flops: reference gives the cheaper arms the reference's FLOPs; true, the costlier arms the cheapest's
    toward_reference = cmp.equal_flops == EQUAL_FLOPS_REFERENCE
    budget_arm = cmp.reference if toward_reference else cheapest
    budget = run_flops[budget_arm]
    budgeted = [arm for arm, f in run_flops.items() if (f < budget if toward_reference else
                                                         f > budget and cmp.equal_flops)]
    equal_flops_steps = {arm: max(1, math.floor(budget / flops[arm])) for arm in budgeted}
    plan = [PlannedRun("equal_steps", arm, steps[arm]) for arm in cmp.arms if cmp.equal_steps or arm == budget_arm]
    plan += [PlannedRun("equal_flops", arm, n) for arm, n in equal_flops_steps.items()]
    return plan, Accounting(flops, steps[budget_arm], cheapest, budget_arm,
                            {arm: f / flops[cheapest] for arm, f in flops.items()}, equal_flops_steps, depth,
                            arm_steps=None if len(set(steps.values())) == 1 else steps)


def run_order(plan: list[PlannedRun], accounting: Accounting, seeds: list[int]) -> list[tuple[int, PlannedRun]]:
    """(seed, run) in the order they train: the equal-steps runs of every seed first, then the equal-FLOPs ones (a
    long study's cheap arms run for the costly arm's FLOPs: its first verdict should not wait for them); seeds
    outermost within each, so a partial comparison has every arm; within a seed the cheapest run (step cap x
    FLOPs per token) first, so a study whose reference takes days shows what the other arms do in hours."""
    def cost(item: PlannedRun) -> float:
        return item.steps * accounting.flops_per_token[item.arm]

    return [(seed, item) for kind in ("equal_steps", "equal_flops") for seed in seeds
            for item in sorted((item for item in plan if item.kind == kind), key=cost)]


def training_order(cmp: Comparison, plan: list[PlannedRun], accounting: Accounting, earlier: dict) \
        -> list[tuple[tuple[int, PlannedRun], RunState]]:
    """[((seed, run), where it stands)] in `run_order`, with the runs stopped part-way first within each kind
    (`started_first`): an equal-FLOPs run still waits for every equal-steps one, its twin among them. `earlier`:
    the report's finished runs (`run_states`)."""
    todo = run_order(plan, accounting, cmp.seeds)
    states = run_states(cmp, todo, earlier)
    return started_first(list(zip(todo, states)), states, stage=lambda run: run[0][1].kind != "equal_steps")


def run_comparison(cmp: Comparison) -> ComparisonReport:
    out = cmp.output_dir
    plan, accounting = plan_runs(cmp)
    if cmp.status:
        return comparison_status(cmp, accounting, plan)
    out.mkdir(parents=True, exist_ok=True)
    costs = ", ".join(f"{arm} {f:.3e} (x{accounting.flop_ratio[arm]:.2f})"
                      for arm, f in accounting.flops_per_token.items())
    print(f"comparison {cmp.path}: training FLOPs/token {costs}; equal steps: "
          f"{accounting.arm_steps or accounting.steps}; equal FLOPs: {accounting.equal_flops_steps or 'none'}; "
          f"seeds {cmp.seeds} -> {out}", flush=True)
    runs = []
    names = {item.name for item in plan}
    earlier = REPORT.earlier_runs(out, lambda r: r.run in names)
    todo = [run for run, _ in training_order(cmp, plan, accounting, earlier)]
    untrained = [(seed, item) for seed, item in todo if not cmp.trains(item)]
    todo = [run for run in todo if run not in untrained]
    reported, earlier = not_trained_now(cmp, untrained, earlier)
    budget = RunBudget([(item.arm, item.steps) for _, item in todo], cmp.max_hours)

    def report_now() -> ComparisonReport:  # the runs reached, and the finished ones still to reach
        waiting, others = waiting_runs(earlier, planned_records(cmp, todo[len(runs):]))
        return comparison_report(cmp, accounting, reported + runs + waiting, others)

    for seed, item in todo:
        if budget.exhausted(len(runs), "the same command (finished runs are skipped)"):
            break
        name, values, run_dir = item.name, run_values(cmp, seed, item), out / item.name / f"seed_{seed}"
        twin, kept = twin_of(seed, item, reported + runs, values), earlier.pop((name, seed), None)
        if twin and ends_with_twin(twin, item) and not same_record(kept, values) and not run_dir.exists():
            record = twin_ended(twin, item, values)
        else:
            record = train_or_keep(name, seed, values, run_dir, cmp.launcher, cmp.accelerate_config, kept,
                                   start_from=Path(twin.output_dir) if twin else None)
        record = dataclasses.replace(record, arm=item.arm, kind=item.kind, steps=item.steps)
        if cmp.transfer and record.finished and record.transfer is None:
            record.transfer = transfer_figures(Path(record.output_dir), values, cmp.transfer)
        runs.append(record)
        write_json(out / REPORT.json, report_now().to_json())
        budget.after(runs, earlier.values(), twin_starts(cmp, todo, [*reported, *runs, *earlier.values()]),
                     dict(enumerate(run_states(cmp, todo[len(runs):], earlier), len(runs))))
    report = report_now()
    REPORT.write(report, out)
    for kind, verdicts in (("equal steps", report.equal_steps), ("equal FLOPs", report.equal_flops)):
        for arm, v in verdicts.items():
            print(f"{kind}, {arm}: {v.verdict}", flush=True)
    print(f"wrote {out / REPORT.json}, {out / REPORT.png}, {out / REPORT.markdown}", flush=True)
    return report


def comparison_status(cmp: Comparison, accounting: Accounting, plan: list[PlannedRun]) -> ComparisonReport:
    """--status: where each planned run stands and the hours left, in the order the runs train; the report of the
    finished runs is returned, not written."""
    names = {item.name for item in plan}
    earlier = REPORT.earlier_runs(cmp.output_dir, lambda r: r.run in names)
    ordered = training_order(cmp, plan, accounting, earlier)
    todo = [run for run, _ in ordered]
    finished, others = waiting_runs(earlier, planned_records(cmp, todo))
    starts = twin_starts(cmp, todo, finished)
    rows = [(f"{item.name}/seed_{seed}", item.arm, item.steps, starts.get(i, 0), state)
            for i, ((seed, item), state) in enumerate(ordered)]
    print(f"comparison {cmp.path} -> {cmp.output_dir}: {len(todo)} runs planned", flush=True)
    print_status(rows, finished)
    return comparison_report(cmp, accounting, finished, others)


def run_states(cmp: Comparison, todo: list[tuple[int, PlannedRun]], earlier: dict) -> list[RunState]:
    """Where each planned run stands (`run_state`), `earlier` being the report's finished runs not yet reached."""
    return [run_state(cmp.output_dir / item.name / f"seed_{seed}", run_values(cmp, seed, item), cmp.launcher,
                      cmp.accelerate_config, earlier.get((item.name, seed))) for seed, item in todo]


def not_trained_now(cmp: Comparison, untrained: list[tuple[int, PlannedRun]], earlier: dict) \
        -> tuple[list[RunRecord], dict]:
    """The finished runs left out by --arms or --kinds, taken from `earlier` (the report's record) where their
    arguments are this command's, and the rest of `earlier`; the others wait for a command that trains them."""
    kept, earlier = waiting_runs(earlier, planned_records(cmp, untrained))
    found, later = {(record.run, record.seed) for record in kept}, {}
    for seed, item in untrained:
        if (item.name, seed) in found:
            print(f"[kept] {item.name}/seed_{seed}: left out by {cmp.left_out_by(item)}; from the report", flush=True)
        else:
            later.setdefault(cmp.left_out_by(item), []).append(f"{item.name}/seed_{seed}")
    for flag, titles in later.items():
        print(f"[later] left out by {flag}, and the report holds no finished run of them with these arguments: "
              f"{', '.join(titles)}", flush=True)
    return kept, earlier


def planned_records(cmp: Comparison, planned: list[tuple[int, PlannedRun]]) -> list[tuple[tuple[str, int], dict,
                                                                                          dict]]:
    """`waiting_runs`' view of planned runs: each one's key, trainer arguments and the record fields it sets."""
    return [((item.name, seed), run_values(cmp, seed, item), {"arm": item.arm, "kind": item.kind,
                                                              "steps": item.steps}) for seed, item in planned]


def run_values(cmp: Comparison, seed: int, item: PlannedRun) -> dict:
    """The trainer arguments of one planned run of one seed."""
    return {**cmp.base, **cmp.arms[item.arm], "seed": seed, "max_steps": item.steps}


def twin_of(seed: int, item: PlannedRun, finished: list[RunRecord], values: dict) -> RunRecord | None:
    """The finished equal-steps twin among `finished` whose last checkpoint run `values` goes on from (its
    first steps are the same), or None: the run starts from step 0."""
    twin = next((r for r in finished if (r.run, r.seed) == (item.arm, seed) and r.finished), None)
    return twin if twin and item.kind == "equal_flops" and same_first_steps(twin.config, values) else None


def ends_with_twin(twin: RunRecord, item: PlannedRun) -> bool:
    """Whether going on from `twin`'s last checkpoint would stop at once: the twin plateaued within the run's cap,
    and the run's evaluations up to there are the twin's (the plateau rule does not read the cap)."""
    return twin.stopped_by == "plateau" and bool(twin.stopped_at) and twin.stopped_at <= item.steps


def twin_ended(twin: RunRecord, item: PlannedRun, values: dict) -> RunRecord:
    """The record of an equal-FLOPs run that `ends_with_twin`: the twin's run, its model and scores, under this
    run's name and arguments; nothing trains or is scored again, and no folder is made for it (the twin's may
    be gone: a fresh checkout with the committed report)."""
    started = f"{twin.output_dir}/checkpoint-{twin.stopped_at}"
    print(f"[ended] {item.name}/seed_{twin.seed}: its twin {twin.title} plateaued at step {twin.stopped_at}, within "
          f"this run's cap of {item.steps}; going on from {started} would stop at once: the twin's record is this "
          "run's", flush=True)
    return dataclasses.replace(twin, run=item.name, config=values, skipped=True, started_from=started)


def twin_starts(cmp: Comparison, todo: list[tuple[int, PlannedRun]], finished: list[RunRecord]) -> dict[int, int]:
    """{index in `todo`: the step an equal-FLOPs run will start at}, for the runs whose twin has finished within
    the run's cap (`continue_from`): the twin's last step, or the run's cap where the twin plateaued (its
    evaluations are the twin's, so the plateau rule stops it at once). For the ETA: a twin whose folder is gone
    (kept from the report) leaves no checkpoint to go on from, so its run starts at step 0 unless it ends."""
    starts = {}
    for i, (seed, item) in enumerate(todo):
        twin = twin_of(seed, item, finished, run_values(cmp, seed, item))
        if twin and twin.stopped_at and twin.stopped_at <= item.steps:
            if ends_with_twin(twin, item):
                starts[i] = item.steps
            elif last_checkpoint_within(Path(twin.output_dir), item.steps):
                starts[i] = twin.stopped_at
    return starts


def transfer_figures(run_dir: Path, values: dict, transfer: dict) -> dict:
    """The run's scores on the transfer puzzles (scored once; a rerun reads them back)."""
    if not task_figures(run_dir, TRANSFER_EVAL):
        score_task_run(run_dir, values, transfer)
    return task_figures(run_dir, TRANSFER_EVAL)


def verdict(name_a: str, a: list[float], name_b: str, b: list[float], higher_is_better: bool = False) -> Verdict:
    """Mean ± std per side, the difference a - b with its 95% Welch interval over seeds, and a winner only
    where the interval excludes 0 (statistics.RULE)."""
    if not a or not b:
        return Verdict("incomplete: a side has no finished run")
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    d = welch(a, b)
    a_better = ma > mb if higher_is_better else ma < mb
    winner = (name_a if a_better else name_b) if d.excludes_zero else None
    difference = f"{name_a} - {name_b} = {d.interval_text()}"
    if d.low is None:
        text = f"no winner: {difference}"
    elif winner:
        best, other = (ma, mb) if a_better else (mb, ma)
        text = f"{winner} wins: {best:.4f} vs {other:.4f}; {difference} excludes 0"
    else:
        text = f"no winner: {difference} includes 0"
    return Verdict(text, winner, {name_a: Side(ma, sa, a), name_b: Side(mb, sb, b)}, gap=abs(ma - mb),
                   difference=d.diff, interval=[d.low, d.high], p_value=d.p_value)


def budget_trend(runs: list[RunRecord], reference: str, name: str, metric: str) -> list[TrendPoint]:
    """The equal-FLOPs gap along the shared budget, for a long study's "does the gap shrink with training?".

    At each evaluation of the `name` runs (a share of their own schedule, and so of the FLOPs both
    sides spend in all), their value of `metric` (a METRICS key) minus the `reference` run's of the same
    seed at the same share of its schedule (interpolated between its evaluations); mean ± std over the
    seeds both finished.
    """
    def by_seed(run):
        return {r.seed: r for r in runs if r.run == run and r.finished}

    column = METRICS[metric].curve_column
    ref, arm = by_seed(reference), by_seed(name)
    seeds = sorted(set(ref) & set(arm))
    if not seeds:
        return []
    steps = sorted(set.intersection(*({point[0] for point in arm[seed].eval_curve} for seed in seeds)))
    rows = []
    for step in steps:
        share = step / arm[seeds[0]].steps
        ref_values = [interpolate(ref[seed].eval_curve, share * ref[seed].steps, column) for seed in seeds]
        arm_values = [next(point[column] for point in arm[seed].eval_curve if point[0] == step) for seed in seeds]
        if None in ref_values + arm_values:  # before the reference's first evaluation, or one unscored
            continue
        gap = [a - r for a, r in zip(arm_values, ref_values)]
        rows.append(TrendPoint(share, step, share * ref[seeds[0]].steps, list(mean_std(ref_values)),
                               list(mean_std(arm_values)), list(mean_std(gap)), seeds))
    return rows


def interpolate(curve: list[list[float]], step: float, column: int = 1) -> float | None:
    """A [[step, value, ...], ...] curve's `column` at `step`, linear between its points; None outside them
    (or where a point has no value there)."""
    exact = [point[column] for point in curve if point[0] == step]
    if exact:
        return exact[-1]
    for before, after in zip(curve, curve[1:]):
        (s0, v0), (s1, v1) = (before[0], before[column]), (after[0], after[column])
        if s0 < step < s1:
            return None if v0 is None or v1 is None else v0 + (v1 - v0) * (step - s0) / (s1 - s0)
    return None


def comparison_report(cmp: Comparison, accounting: Accounting, runs: list[RunRecord], earlier: dict | None = None) \
        -> ComparisonReport:
    """The verdicts from `runs`; `other_runs` keeps the earlier finished runs this command did not plan or reach."""
    metric, runs = METRICS[cmp.metric], report_order(cmp, runs)

    def values(name):
        return [getattr(r, metric.field) for r in runs
                if r.run == name and r.finished and getattr(r, metric.field) is not None]

    reference, budget = cmp.reference, accounting.budget_arm
    equal_steps = {arm: verdict(reference, values(reference), arm, values(arm), metric.higher_is_better)
                   for arm in cmp.arms if arm != reference} if cmp.equal_steps else {}
    equal_flops = {arm: verdict(budget, values(budget), f"{arm}_equal_flops", values(f"{arm}_equal_flops"),
                                metric.higher_is_better)
                   for arm in accounting.equal_flops_steps}
    transfer = None
    if cmp.transfer:
        def transferred(name):
            return [r.transfer["exact_accuracy"] for r in runs if r.run == name and r.transfer]
        transfer = Transfer(cmp.transfer, {arm: verdict(reference, transferred(reference), arm, transferred(arm),
                                                         True) for arm in cmp.arms if arm != reference}
                            if cmp.equal_steps else {})
    return ComparisonReport(
        config=cmp.path, description=cmp.description, seeds=cmp.seeds, base=cmp.base, arms=cmp.arms,
        reference=reference, metric=cmp.metric, accounting=accounting, equal_steps_runs=cmp.equal_steps,
        equal_steps=equal_steps, equal_flops=equal_flops, transfer=transfer,
        equal_flops_trend={arm: budget_trend(runs, budget, f"{arm}_equal_flops", cmp.metric)
                           for arm in accounting.equal_flops_steps},
        ln_vocab=next((r.ln_vocab for r in runs if r.finished), None), runs=runs, spread_rule=STATISTICS_RULE,
        other_runs=list((earlier or {}).values()))


def report_order(cmp: Comparison, runs: list[RunRecord]) -> list[RunRecord]:
    """The runs as a report lists them, whatever order they finished in: the arms in the study's order at equal
    steps, then their equal-FLOPs runs, seeds ascending within each (a name the study no longer has goes last)."""
    names = [PlannedRun(kind, arm, 0).name for kind in KINDS for arm in cmp.arms]
    return sorted(runs, key=lambda r: (names.index(r.run) if r.run in names else len(names), r.seed))


def refreshed(p: ComparisonReport) -> ComparisonReport:
    """A comparison's verdicts and trends computed again from its runs by today's rules (`--report`)."""
    cmp = Comparison(path=p.config, description=p.description, seeds=p.seeds, base=p.base, arms=p.arms,
                     reference=p.reference, metric=p.metric, equal_steps=p.equal_steps_runs,
                     transfer=p.transfer.settings if p.transfer else {})
    return comparison_report(cmp, p.accounting, p.runs, dict(enumerate(p.other_runs)))


REPORT = ReportFiles("comparison.json", "comparison.png", "COMPARISON.md", ComparisonReport, plot,
                     comparison_markdown, refreshed)


def main(argv: list[str] | None = None) -> ComparisonReport:
    return run_runner(argv, CompareArguments, load_comparison, run_comparison, USAGE, REPORT.rebuild)


if __name__ == "__main__":
    raise SystemExit(exit_status(run_cli(main)))
