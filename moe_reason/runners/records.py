"""The records a study keeps: one `RunRecord` per training run, and the report records (`GridReport`,
`ComparisonReport`) that hold a study's runs with the statistics made from them (a grid's `VariantSummary`
per variant; a comparison's `Accounting` of FLOPs, a `Verdict` per pair of runs compared and the
equal-FLOPs gap's `TrendPoint`s).

Both runners name a run the same way: `run` is its name in its study (a grid's variant; a comparison's
arm, or ARM_equal_flops for the arm's run at the reference's training FLOPs) and its folder there, and
`seed` its seed; `title` ("RUN/seed_N") is how the runners print it. The report JSON files are these
records as JSON. Records written before the runs had one name for both runners (`variant` in a grid,
`label` and `name` in a comparison, a verdict's sides inline) read as today's (`from_json`); the next
write stores them in today's form, so no run trains again because of the schema.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..errors import UserError

STATUSES = ("finished", "failed")
CURVE_POINTS = 1000  # most points a record keeps of a training curve: a plot's worth; metrics.jsonl has them all
OLD_NAMES = ("variant", "label")  # a run's name before `run`: a grid's key, then a comparison's
DROPPED = ("name",)  # "RUN/seed_N" as older records stored it: `title` now


@dataclass
class RunRecord:
    """One training run: which run of its study it is, how it ended, and (finished) what it measured.

    A field the run did not measure is None: a failed run has no figures, a language-model run no puzzle
    scores, a dense model no expert load, a direct model no recursion steps.
    """
    run: str  # its name in its study, and its folder there
    seed: int
    status: str  # one of STATUSES
    output_dir: str
    config: dict = field(default_factory=dict)  # the trainer arguments it ran with
    skipped: bool = False  # not trained by this command (finished earlier, kept, refused): the ETA leaves it out
    error: str | None = None  # a failed run: why
    wall_seconds: float = 0.0  # its training loop over all its starts
    # what its runner planned: a comparison's arm (model fields) and budget; a grid variant's overrides
    arm: str | None = None
    kind: str | None = None  # "equal_steps" or "equal_flops"
    overrides: dict | None = None
    # what a finished run measured: its results and metrics files (run_results.collect_run)
    steps: int | None = None  # the step cap it trained under (max_steps); stopped_at: where it ended
    final_val_loss: float | None = None
    best_val_loss: float | None = None
    perplexity: float | None = None
    accuracy: float | None = None  # token accuracy on the validation set
    ln_vocab: float | None = None
    eval_tokens: int | None = None
    recursion_steps: float | None = None
    load_max_over_mean: float | None = None
    load_entropy: float | None = None
    tokens_per_s: float | None = None
    flops_per_token: int | None = None
    tokens_per_step: int | None = None
    sequences_per_step: int | None = None
    parameters: int | None = None
    train_loss_curve: list | None = None  # [[step, language-model loss], ...], at most CURVE_POINTS (thinned)
    grad_norm_curve: list | None = None  # [[step, gradient norm], ...], as thinned
    eval_curve: list | None = None  # [[step, loss, token accuracy, exact accuracy or None], ...]
    # its first evaluation scored by the task's validator; before it (and in runs made before the trainer
    # recorded it: None), exact accuracy on the curve is the match with the stored answer
    curve_validated_from: int | None = None
    stopped_by: str | None = None  # "plateau" or "max_steps"
    stopped_at: int | None = None  # the step it ended at
    nan: bool | None = None  # a non-finite loss or a skipped step was seen
    machines: list | None = None  # what trained it (training.metrics.machine), one per start on another machine
    # "RUN_FOLDER/checkpoint-STEP": another run's checkpoint this one started from (run_folder.continue_from); its
    # steps, curves and wall time up to there are that run's
    started_from: str | None = None
    # a task run's scores on its held-out puzzles (run_results.task_figures)
    exact_accuracy: float | None = None
    cell_accuracy: float | None = None
    exact_accuracy_by_steps: dict | None = None  # supervision steps -> exact accuracy, on the first curve_puzzles
    q_head_by_steps: dict | None = None
    q_head: dict | None = None
    by_difficulty: dict | None = None
    q_head_thresholds: dict | None = None
    puzzles: int | None = None
    curve_puzzles: int | None = None
    transfer: dict | None = None  # a comparison's `transfer:` scores (task_figures of the other puzzles)

    def __post_init__(self):
        self.train_loss_curve = thinned(self.train_loss_curve)
        self.grad_norm_curve = thinned(self.grad_norm_curve)

    @property
    def title(self) -> str:
        return f"{self.run}/seed_{self.seed}"

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    def to_json(self) -> dict:
        """The record as JSON, leaving out what the run did not measure."""
        return without_none(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, values: dict, where: str) -> RunRecord:
        """A record as a report JSON holds it, today's or older (OLD_NAMES, DROPPED); `where` names the file."""
        values = dict(values)
        for old in OLD_NAMES:
            if old in values and "run" not in values:
                values["run"] = values.pop(old)
        for old in DROPPED:
            values.pop(old, None)
        unknown = sorted(set(values) - field_names(cls))
        if unknown or "run" not in values or values.get("status") not in STATUSES:
            raise UserError(f"{where} holds a run record this version cannot read (unknown keys {unknown}, or no "
                            "run name or status); move it aside to start the record afresh")
        return cls(**values)


def thinned(curve: list | None) -> list | None:
    """A [[step, value], ...] curve cut to at most CURVE_POINTS: the points at multiples of the smallest
    stride that fits (the logging interval times a power of two), and its last point.

    A 100k-step run logs ten thousand points a curve, which made a study's JSON megabytes. Strides that
    are powers of two of one interval nest, so seeds of one arm that stopped at different steps still
    share their points (mean_curve averages at the shared steps)."""
    if not curve or len(curve) <= CURVE_POINTS:
        return curve
    stride = max(curve[1][0] - curve[0][0], 1)
    while curve[-1][0] / stride > CURVE_POINTS - 1:
        stride *= 2
    return [point for point in curve[:-1] if point[0] % stride == 0] + [curve[-1]]


def records_from_json(values: list, where: str) -> list[RunRecord]:
    return [RunRecord.from_json(v, where) for v in values]


@dataclass
class Side:
    """One side of a verdict: its runs' metric over seeds."""
    mean: float
    std: float
    values: list[float]


@dataclass
class Verdict:
    """One run name against another over seeds (a - b): the difference with its 95% Welch interval, and a
    winner only where the interval excludes 0 (statistics.RULE); `sides` is empty when a side has no run."""
    verdict: str  # the sentence a report prints
    winner: str | None = None
    sides: dict[str, Side] = field(default_factory=dict)  # run name -> its metric over seeds, a first
    gap: float | None = None  # |mean a - mean b|
    difference: float | None = None  # mean a - mean b
    interval: list | None = None  # [low, high]; [None, None] below 2 seeds a side
    p_value: float | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in without_none(dataclasses.asdict(self)).items() if v != {}}  # no sides: no key

    @classmethod
    def from_json(cls, values: dict) -> Verdict:
        names = field_names(cls)
        sides = values.get("sides") or {k: v for k, v in values.items() if k not in names}  # older: sides inline
        return cls(**{k: v for k, v in values.items() if k in names and k != "sides"},
                   sides={name: Side(**side) for name, side in sides.items()})


@dataclass
class Depth:
    """An arm's shape: layers per supervision step (its effective depth), decoder passes and passes with
    gradient per supervision step, supervision steps (1 for a direct model), and how many of them one
    optimizer update follows (all: the default; 1: HRM/TRM's per-step updates; None in older reports)."""
    effective_depth: int
    passes: int
    gradient_passes: int
    supervision_steps: int
    steps_per_update: int | None = None


@dataclass
class Accounting:
    """A comparison's FLOP accounting: each arm's training FLOPs per token, and the budgets made from them."""
    flops_per_token: dict[str, int]
    steps: int  # the equal-steps runs' steps (the budget arm's, where arm_steps gives each arm its own)
    cheapest_arm: str
    budget_arm: str  # whose training FLOPs the equal-FLOPs runs spend: the cheapest arm's, or the reference's
    flop_ratio: dict[str, float]  # arm -> its FLOPs per token over the cheapest arm's
    equal_flops_steps: dict[str, int]  # arm -> the steps of its equal-FLOPs run
    depth: dict[str, Depth] | None = None  # None in reports written before the depth was recorded
    arm_steps: dict[str, int] | None = None  # arm -> its own step cap, where the arms' caps differ; None: `steps`

    def steps_of(self, arm: str) -> int:
        """The step cap of `arm`'s equal-steps run."""
        return self.arm_steps[arm] if self.arm_steps else self.steps

    @classmethod
    def from_json(cls, values: dict) -> Accounting:
        values = {"budget_arm": values["cheapest_arm"], **values}  # older reports: the cheapest arm's, always
        depth = values.get("depth")
        return cls(**{**values, "depth": depth and {arm: Depth(**d) for arm, d in depth.items()}})


@dataclass
class TrendPoint:
    """The equal-FLOPs gap at one shared evaluation: a share of the budget both sides spend, each side's step
    there, and their values of the comparison's metric as [mean, std] over the seeds both finished."""
    share: float
    arm_step: int
    reference_step: float
    reference_value: list[float]
    arm_value: list[float]
    gap: list[float]  # the arm's value minus the reference's
    seeds: list[int]

    @classmethod
    def from_json(cls, values: dict) -> TrendPoint:
        legacy = {"reference_loss": "reference_value", "arm_loss": "arm_value"}  # older reports: val loss always
        return cls(**{legacy.get(name, name): value for name, value in values.items()})


@dataclass
class Transfer:
    """A comparison's `transfer:`: the task arguments of the other puzzles, and the equal-steps verdicts on them."""
    settings: dict
    equal_steps: dict[str, Verdict]


@dataclass
class VariantSummary:
    """A grid variant's finished runs over seeds, and its difference from the reference variant."""
    seeds: list[int]
    val_loss_mean: float
    val_loss_std: float
    best_val_loss_mean: float
    perplexity_mean: float
    accuracy_mean: float
    tokens_per_s_mean: float
    wall_seconds_mean: float
    any_nan: bool
    delta_vs_reference: float | None = None  # mean val loss minus the reference's
    interval: list | None = None  # its 95% Welch interval (None: the reference, or 1 seed a side)
    p_value: float | None = None
    real_by_holm: bool | None = None  # Holm's verdict over the variants (None: the reference, or no interval)
    # the experts' balance on the validation set, where every run measured it
    load_max_over_mean_mean: float | None = None
    load_max_over_mean_std: float | None = None
    load_entropy_mean: float | None = None
    load_entropy_std: float | None = None
    load_max_over_mean_delta: float | None = None  # minus the reference's, with its interval
    load_max_over_mean_interval: list | None = None


@dataclass
class GridReport:
    """An ablation grid's report: its runs, and per variant the loss (and expert load) over seeds with the
    difference from the reference variant; `ranking` orders the variants by mean validation loss."""
    grid: str  # the grid file
    description: str
    reference: str
    seeds: list[int]
    base: dict
    ln_vocab: float | None
    ranking: list[str]
    variants: dict[str, VariantSummary]
    not_in_report: list[str]  # the file's variants without a finished run
    runs: list[RunRecord]
    spread_rule: str
    other_runs: list[RunRecord]  # earlier finished runs this command did not plan or reach

    def to_json(self) -> dict:
        return {**fields_of(self), "variants": {name: without_none(dataclasses.asdict(v))
                                               for name, v in self.variants.items()}, **runs_json(self)}

    @classmethod
    def from_json(cls, values: dict, where: str) -> GridReport:
        values = checked(cls, {"other_runs": [], "not_in_report": [], **values}, where)
        return cls(**{**values, "variants": {name: VariantSummary(**v) for name, v in values["variants"].items()},
                      **runs_from_json(values, where)})


@dataclass
class ComparisonReport:
    """An N-arm comparison's report: its runs, and the reference arm against each other arm at equal steps, at
    equal training FLOPs and (optionally) on transfer puzzles, with the FLOP accounting behind the budgets."""
    config: str  # the comparison file
    description: str
    seeds: list[int]
    base: dict
    arms: dict  # arm -> its model fields
    reference: str
    metric: str  # "loss" or "exact_accuracy"
    accounting: Accounting
    equal_steps_runs: bool
    equal_steps: dict[str, Verdict]  # arm -> the reference against it at equal steps
    equal_flops: dict[str, Verdict]  # arm -> the budget arm against its equal-FLOPs run
    transfer: Transfer | None
    equal_flops_trend: dict[str, list[TrendPoint]]  # arm -> the equal-FLOPs gap along the budget
    ln_vocab: float | None
    runs: list[RunRecord]
    spread_rule: str
    other_runs: list[RunRecord]

    def to_json(self) -> dict:
        transfer = self.transfer and {"settings": self.transfer.settings, "equal_steps": verdicts_json(
            self.transfer.equal_steps)}
        return {**fields_of(self), "accounting": without_none(dataclasses.asdict(self.accounting)),
                "equal_flops_trend": {arm: [dataclasses.asdict(point) for point in points]
                                      for arm, points in self.equal_flops_trend.items()},
                "equal_steps": verdicts_json(self.equal_steps),
                "equal_flops": verdicts_json(self.equal_flops), "transfer": transfer or {}, **runs_json(self)}

    @classmethod
    def from_json(cls, values: dict, where: str) -> ComparisonReport:
        values = checked(cls, {"other_runs": [], "equal_steps_runs": True, **values}, where)
        transfer = values["transfer"]
        return cls(**{**values, "accounting": Accounting.from_json(values["accounting"]),
                      "equal_flops_trend": {arm: [TrendPoint.from_json(point) for point in points]
                                            for arm, points in values["equal_flops_trend"].items()},
                      "equal_steps": verdicts_from_json(values["equal_steps"]),
                      "equal_flops": verdicts_from_json(values["equal_flops"]),
                      "transfer": Transfer(transfer["settings"], verdicts_from_json(transfer["equal_steps"]))
                      if transfer else None, **runs_from_json(values, where)})


def field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def fields_of(report) -> dict:
    return {f.name: getattr(report, f.name) for f in dataclasses.fields(report)}


def without_none(values: dict) -> dict:
    return {k: v for k, v in values.items() if v is not None}


def verdicts_json(verdicts: dict[str, Verdict]) -> dict:
    return {name: v.to_json() for name, v in verdicts.items()}


def verdicts_from_json(values: dict) -> dict[str, Verdict]:
    return {name: Verdict.from_json(v) for name, v in values.items()}


def runs_json(report) -> dict:
    return {"runs": [r.to_json() for r in report.runs], "other_runs": [r.to_json() for r in report.other_runs]}


def runs_from_json(values: dict, where: str) -> dict:
    return {"runs": records_from_json(values["runs"], where), "other_runs": records_from_json(values["other_runs"],
                                                                                              where)}


def checked(cls, values: dict, where: str) -> dict:
    """A report JSON's keys, refused unless they are exactly `cls`'s fields (keys older reports lack are filled in
    by the caller)."""
    names = field_names(cls)
    if set(values) != names:
        raise UserError(f"{where} is not a {cls.__name__} written by this runner (keys missing: "
                        f"{sorted(names - set(values))}, unknown: {sorted(set(values) - names)}); move it aside to "
                        "start the record afresh")
    return values
