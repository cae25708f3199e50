"""The ablation runner: a base config, named variants (overrides) and seeds; every variant x seed
trained by the same trainer, then compared.

    moe-reason-ablate configs/exp8_ablations_offline.yaml
    moe-reason-ablate GRID.yaml --output_dir outputs/abl --set max_steps=50 --variants baseline no_aux
    moe-reason-ablate --report outputs/abl        # SUMMARY.md and the plot again, from results.json

A grid file:

    output_dir: outputs/my_ablation      # optional; --output_dir wins
    launcher: in_process                 # or accelerate (+ accelerate_config: accelerate_configs/x.yaml)
    seeds: [0, 1]
    reference: baseline                  # the variant others are compared with (default: the first)
    base: {model_preset: small, max_steps: 100}        # trainer arguments shared by every run
    variants:
      baseline: {}
      no_aux_loss: {router_aux_loss_coef: 0.0}

`extends: OTHER.yaml` builds on another grid file (`study_file.load_study_mapping`): its keys, the base updated
name by name. Writes into output_dir: one folder per run (VARIANT/seed_S), `results.json` (updated after
every run), `ablation_comparison.png` and `SUMMARY.md`. A failed run is recorded with its
error and the grid goes on; rerunning the command skips finished runs and resumes
interrupted ones. `--max_hours H` starts no run after H hours (the report covers those done and
names the variants it lacks), and a one-line ETA follows every run. `--status` trains nothing: it prints
where each run stands and the hours left.

results.json is the grid's record (moe_reason.runners.engine): a narrowed command keeps the other finished
runs in it, and a finished run whose folder is gone is kept from it while its arguments are unchanged.
"""

import dataclasses
from dataclasses import dataclass, field

from ..errors import UserError, run_cli
from ..training.arguments import arguments_from
from .engine import ReportFiles, RunBudget, exit_status, print_status, run_runner, started_first, write_json
from .run_folder import RunState, run_state, train_or_keep, waiting_runs
from .grid_report import plot, summary_markdown
from .records import GridReport, RunRecord, VariantSummary
from .statistics import HOLM_RULE, holm, mean_std, welch
from .statistics import RULE as STATISTICS_RULE
from .study_file import (RunnerArguments, StudySettings, check_arguments, check_launch, load_runner_file,
                         safe_name)

OWN_KEYS = {"reference", "variants"}  # a grid file's keys beside the runners' shared ones
USAGE = ("moe-reason-ablate GRID.yaml [--output_dir D] [--launcher in_process|accelerate] [--seeds 0 1] "
         "[--variants a b] [--set name=value ...]")


@dataclass
class AblateArguments(RunnerArguments):
    variants: list[str] | None = field(default=None, metadata={"help": "Run only these variants."})


@dataclass(kw_only=True)
class Grid(StudySettings):
    """A grid file, validated, with the command line's overrides."""
    variants: dict[str, dict]  # name -> its trainer-argument overrides: the variants this command runs
    reference: str  # the variant every other is compared with
    in_file: list[str] = field(default_factory=list)  # every variant the file names (a narrowed command runs fewer)


def load_grid(path, args: AblateArguments | None = None) -> Grid:
    """The grid file with CLI overrides applied, validated before any run starts."""
    args = args or AblateArguments()
    spec, settings = load_runner_file(path, "grid", OWN_KEYS, args, default_seeds=[0],
                                      output_prefix="ablation")
    variants = spec.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise UserError(f"grid {path} needs a non-empty mapping 'variants: {{name: {{overrides}}}}'")
    variants = {safe_name(name): check_arguments(over, f"grid {path}: variant {name}")
                for name, over in variants.items()}
    in_file = list(variants)
    reference = spec.get("reference", next(iter(variants)))
    if reference not in variants:
        raise UserError(f"grid {path}: reference {reference!r} is not one of its variants: {list(variants)}")
    if args.variants:
        missing = sorted(set(args.variants) - set(variants))
        if missing:
            raise UserError(f"--variants {missing} not in the grid; it has {list(variants)}")
        if reference not in args.variants:
            raise UserError(f"--variants {args.variants} leaves out the reference {reference!r}, which every "
                            "variant is compared with: add it to --variants")
        variants = {name: variants[name] for name in args.variants}
    check_launch(settings.launcher, [{**settings.base, **over} for over in variants.values()], f"grid {path}")
    return Grid(**vars(settings), variants=variants, in_file=in_file, reference=reference)


def run_grid(grid: Grid) -> GridReport:
    out = grid.output_dir
    runs = []
    total = len(grid.variants) * len(grid.seeds)
    print(f"ablation {grid.path}: {len(grid.variants)} variants x {len(grid.seeds)} seeds = {total} runs "
          f"-> {out}", flush=True)
    earlier = REPORT.earlier_runs(out, lambda r: r.run in grid.in_file)
    caps = {variant: arguments_from({**grid.base, **overrides})[2].max_steps
            for variant, overrides in grid.variants.items()}
    plan = [(variant, overrides, seed, {**grid.base, **overrides, "seed": seed})
            for variant, overrides in grid.variants.items() for seed in grid.seeds]
    plan = started_first(plan, [run_state(out / variant / f"seed_{seed}", values, grid.launcher,
                                          grid.accelerate_config, None) for variant, _, seed, values in plan])
    budget = RunBudget([(variant, caps[variant]) for variant, *_ in plan], grid.max_hours)

    def report_now() -> GridReport:  # the runs reached, and the finished ones still to reach
        waiting, others = waiting_runs(earlier, [((variant, seed), values, {"overrides": overrides,
                                                                            "steps": caps[variant]})
                                                 for variant, overrides, seed, values in plan[len(runs):]])
        return grid_report(grid, runs + waiting, others)

    def states(first: int) -> dict[int, RunState]:  # where the planned runs from `first` on stand
        return {i: run_state(out / variant / f"seed_{seed}", values, grid.launcher, grid.accelerate_config,
                             earlier.get((variant, seed)))
                for i, (variant, _, seed, values) in list(enumerate(plan))[first:]}

    if grid.status:  # where each run stands; nothing trains, nothing is written
        print_status([(f"{variant}/seed_{seed}", variant, caps[variant], 0, state)
                      for (variant, _, seed, _), state in zip(plan, states(0).values())], list(earlier.values()))
        return report_now()
    out.mkdir(parents=True, exist_ok=True)

    for variant, overrides, seed, values in plan:
        if budget.exhausted(len(runs), "the same command (finished runs are skipped)"):
            break
        record = train_or_keep(variant, seed, values, out / variant / f"seed_{seed}", grid.launcher,
                               grid.accelerate_config, earlier.pop((variant, seed), None))
        runs.append(dataclasses.replace(record, overrides=overrides, steps=caps[variant]))
        write_json(out / REPORT.json, report_now().to_json())
        budget.after(runs, earlier.values(), states=states(len(runs)))
    report = report_now()
    REPORT.write(report, out)
    failed = [r.title for r in runs if not r.finished]
    print(f"wrote {out / REPORT.json}, {out / REPORT.png}, {out / REPORT.markdown}"
          f"{f'; {len(failed)} run(s) failed: {failed}' if failed else ''}", flush=True)
    return report


def grid_report(grid: Grid, runs: list[RunRecord], earlier: dict | None = None) -> GridReport:
    """Runs plus per-variant statistics across seeds, ranked by mean final validation loss, each variant's
    difference from the reference with its 95% Welch interval and Holm's verdict over the variants; `other_runs`
    keeps the earlier finished runs this command did not plan or reach (a narrowed or budgeted command)."""
    variants = {}
    reference_runs = [r for r in runs if r.run == grid.reference and r.finished]
    reference = [r.final_val_loss for r in reference_runs]
    for name in grid.variants:
        done = [r for r in runs if r.run == name and r.finished]
        if not done:
            continue
        losses = [r.final_val_loss for r in done]
        mean, std = mean_std(losses)
        d = welch(losses, reference) if reference and name != grid.reference else None
        variants[name] = VariantSummary(
            seeds=[r.seed for r in done], val_loss_mean=mean, val_loss_std=std,
            best_val_loss_mean=mean_std([r.best_val_loss for r in done])[0],
            perplexity_mean=mean_std([r.perplexity for r in done])[0],
            accuracy_mean=mean_std([r.accuracy for r in done])[0],
            tokens_per_s_mean=mean_std([r.tokens_per_s for r in done])[0],
            wall_seconds_mean=mean_std([r.wall_seconds for r in done])[0], any_nan=any(r.nan for r in done),
            delta_vs_reference=mean - mean_std(reference)[0] if reference else None,
            interval=None if d is None else [d.low, d.high], p_value=None if d is None else d.p_value,
            **load_figures(done, reference_runs if name != grid.reference else []))
    others = {name: v.p_value for name, v in variants.items() if name != grid.reference and reference}
    for name, real in holm(others).items():
        variants[name].real_by_holm = real
    ranking = sorted(variants, key=lambda n: variants[n].val_loss_mean)
    return GridReport(
        grid=grid.path, description=grid.description, reference=grid.reference, seeds=grid.seeds,
        base=grid.base, ln_vocab=next((r.ln_vocab for r in runs if r.finished), None), ranking=ranking,
        variants=variants,
        not_in_report=[name for name in grid.in_file or grid.variants if name not in variants],
        runs=runs, spread_rule=f"{STATISTICS_RULE}; {HOLM_RULE}", other_runs=list((earlier or {}).values()))


def load_figures(done: list[RunRecord], reference: list[RunRecord]) -> dict:
    """The experts' balance on the validation set (mean ± std over seeds), where the runs measured it, and the
    busiest expert's load against the reference variant's (difference of means, 95% Welch interval): the
    VariantSummary fields they fill."""
    figures = {}
    for name in ("load_max_over_mean", "load_entropy"):
        values = [getattr(r, name) for r in done if getattr(r, name) is not None]
        if len(values) == len(done):
            figures[f"{name}_mean"], figures[f"{name}_std"] = mean_std(values)
    theirs = [r.load_max_over_mean for r in reference if r.load_max_over_mean is not None]
    if "load_max_over_mean_mean" in figures and theirs and len(theirs) == len(reference):
        d = welch([r.load_max_over_mean for r in done], theirs)
        figures["load_max_over_mean_delta"] = figures["load_max_over_mean_mean"] - mean_std(theirs)[0]
        figures["load_max_over_mean_interval"] = None if d.low is None else [d.low, d.high]
    return figures


def refreshed(report: GridReport) -> GridReport:
    """A grid's statistics computed again from its runs by today's rules (`--report`)."""
    overrides = {r.run: r.overrides for r in report.runs}
    grid = Grid(path=report.grid, description=report.description, seeds=report.seeds, base=report.base,
                variants=overrides, reference=report.reference,
                in_file=list(overrides) + [n for n in report.not_in_report if n not in overrides])
    return grid_report(grid, report.runs, dict(enumerate(report.other_runs)))


REPORT = ReportFiles("results.json", "ablation_comparison.png", "SUMMARY.md", GridReport, plot, summary_markdown,
                     refreshed)


def main(argv: list[str] | None = None) -> GridReport:
    return run_runner(argv, AblateArguments, load_grid, run_grid, USAGE, REPORT.rebuild)


if __name__ == "__main__":
    raise SystemExit(exit_status(run_cli(main)))
