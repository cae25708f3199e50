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

`baseline:` and `recursive:` at the top level are the two-arm form (reference: baseline).
The arms may set model fields, and `learning_rate` where each arm is to train at its own best
one (the report names each arm's); batch, schedule, data and seed are the base's.
Runs per seed (the equal-steps runs of every seed first, then the equal-FLOPs runs): every arm at
`max_steps` (equal steps) and, with `equal_flops`, each costlier arm
at the steps that spend the cheapest arm's FLOPs (its own full schedule: a base `warmup_steps` is the
same number of steps in every run, a base `warmup_ratio` the same share of each). `equal_flops: reference`
turns this around for studies whose reference is the costly arm (a deep recursion): each arm cheaper than
the reference also runs for the steps that spend the reference's FLOPs, so the cheap arms are not starved;
with `stop_on_plateau` in the base those steps are a cap, and each run says whether it plateaued or hit it.
`equal_steps: false` keeps only the budget arm's `max_steps` run and the equal-FLOPs runs: the
costlier arms' full-length runs are what makes a long study long. With a task base each
finished run's export is scored on the held-out puzzles (`task_eval`). Writes `comparison.json`,
`comparison.png` and `COMPARISON.md`; a winner is named only where the 95% interval of the difference
over seeds excludes 0 (moe_reason.runners.statistics).
`--max_hours H` starts no run after H hours; `--report DIR` rebuilds the report from DIR/comparison.json.
comparison.json is the comparison's record (moe_reason.runners.engine): a command narrowed by --seeds keeps the
other finished runs in it, and a finished run whose folder is gone is kept from it while its arguments are unchanged.
"""

import math
from pathlib import Path

from ..data.prepare import prepare_data
from ..errors import UserError, run_cli
from ..training.arguments import arguments_from, build_config
from ..training.metrics import training_flops_per_token
from .engine import (THROUGHPUT_NOTE, TRANSFER_EVAL, ReportFiles, RunBudget, RunnerArguments, check_arguments,
                     check_launch, earlier_runs, exit_status, load_runner_file, mean_curve, model_argument_names,
                     pyplot, run_runner, safe_name, save_figure, score_task_run, task_argument_names, task_figures,
                     train_or_keep, write_json)
from .statistics import RULE as STATISTICS_RULE
from .statistics import mean_std, welch

LEGACY_ARMS = ("baseline", "recursive")
EQUAL_FLOPS_REFERENCE = "reference"  # equal_flops: the cheaper arms also run at the reference arm's FLOPs
METRICS = {"loss": ("final_val_loss", "validation loss", False),  # name -> (record key, label, higher is better)
           "exact_accuracy": ("exact_accuracy", "exact accuracy on held-out puzzles", True)}
OWN_KEYS = {"arms", "reference", "metric", "equal_flops", "equal_steps", "transfer", *LEGACY_ARMS}
ARM_TRAINING_FIELDS = {"learning_rate"}  # the one training setting an arm may set: its own best learning rate

USAGE = ("moe-reason-compare CONFIG.yaml [--output_dir D] [--seeds 0 1 2] [--launcher in_process|accelerate] "
         "[--set name=value ...]")


def load_comparison(path, args: RunnerArguments | None = None) -> dict:
    args = args or RunnerArguments()
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
    arms = {safe_name(name): check_arguments(fields, f"comparison {path}: arm {name} (model fields and "
                                             "learning_rate only, so every arm trains with the same settings)",
                                             model_argument_names() | ARM_TRAINING_FIELDS)
            for name, fields in raw.items()}
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
    if metric == "exact_accuracy" and not settings["base"].get("task"):
        raise UserError(f"comparison {path}: metric exact_accuracy needs a task in base (task: sudoku or maze)")
    equal_flops, equal_steps = spec.get("equal_flops", True), bool(spec.get("equal_steps", True))
    if equal_flops not in (True, False, EQUAL_FLOPS_REFERENCE):
        raise UserError(f"comparison {path}: equal_flops={equal_flops!r} is invalid: must be true, false or "
                        f"{EQUAL_FLOPS_REFERENCE!r}")
    if not (equal_flops or equal_steps):
        raise UserError(f"comparison {path}: equal_flops and equal_steps are both false: nothing to compare")
    transfer = check_arguments(spec.get("transfer"), f"comparison {path}: transfer (task arguments)",
                               task_argument_names())
    if transfer and not settings["base"].get("task"):
        raise UserError(f"comparison {path}: transfer scores task runs on other puzzles; base has no task")
    check_launch(settings["launcher"], [{**settings["base"], **fields} for fields in arms.values()],
                 f"comparison {path}")
    return {**settings, "arms": arms, "reference": reference, "metric": metric, "equal_flops": equal_flops,
            "equal_steps": equal_steps, "transfer": transfer, "max_hours": args.max_hours}


def arm_config(values: dict):
    """The model config these trainer arguments build, and their step budget.

    Prepares (or loads the cached) data once for the exact vocabulary size.
    """
    model_args, data_args, train_args = arguments_from(values)
    data = prepare_data(data_args, log=lambda _: None)
    config = build_config(model_args, vocab_size=len(data.tokenizer), task=data.summary.get("task"))
    return config, data.summary["block_size"], train_args.max_steps


def depth_of(config) -> dict:
    """Layers per supervision step (the effective depth), decoder passes and passes with gradient per
    supervision step, and supervision steps: the recursion's shape for a report's arm table."""
    layers = config.num_hidden_layers
    if not hasattr(config, "h_cycles"):
        return {"effective_depth": layers, "passes": 1, "gradient_passes": 1, "supervision_steps": 1}
    passes = config.h_cycles * (config.l_cycles + 1)
    return {"effective_depth": passes * layers, "passes": passes,
            "gradient_passes": config.grad_passes_per_supervision_step(),
            "supervision_steps": config.halt_max_steps}


def plan_runs(cmp: dict) -> tuple[list[dict], dict]:
    """The runs (kind, arm, steps) per seed and the FLOP accounting behind the equal-FLOPs budgets."""
    flops, depth = {}, {}
    for arm, fields in cmp["arms"].items():
        config, block, steps = arm_config({**cmp["base"], **fields})
        flops[arm], depth[arm] = training_flops_per_token(config, block), depth_of(config)
    cheapest = min(flops, key=flops.get)
    if cmp["equal_flops"] == EQUAL_FLOPS_REFERENCE:  # the cheaper arms get the reference's FLOPs
        budget_arm = cmp["reference"]
        equal_flops_steps = {arm: max(1, math.floor(steps * flops[budget_arm] / f)) for arm, f in flops.items()
                             if f < flops[budget_arm]}
    else:  # the costlier arms get the cheapest arm's FLOPs
        budget_arm = cheapest
        equal_flops_steps = {arm: max(1, math.floor(steps * flops[cheapest] / f)) for arm, f in flops.items()
                             if f > flops[cheapest] and cmp["equal_flops"]}
    plan = [{"kind": "equal_steps", "arm": arm, "steps": steps} for arm in cmp["arms"]
            if cmp.get("equal_steps", True) or arm == budget_arm]
    plan += [{"kind": "equal_flops", "arm": arm, "steps": n} for arm, n in equal_flops_steps.items()]
    accounting = {"flops_per_token": flops, "steps": steps, "cheapest_arm": cheapest, "budget_arm": budget_arm,
                  "flop_ratio": {arm: f / flops[cheapest] for arm, f in flops.items()},
                  "equal_flops_steps": equal_flops_steps, "depth": depth}
    return plan, accounting


def run_comparison(cmp: dict) -> dict:
    out = cmp["output_dir"]
    out.mkdir(parents=True, exist_ok=True)
    plan, accounting = plan_runs(cmp)
    costs = ", ".join(f"{arm} {f:.3e} (x{accounting['flop_ratio'][arm]:.2f})"
                      for arm, f in accounting["flops_per_token"].items())
    print(f"comparison {cmp['path']}: training FLOPs/token {costs}; equal steps: {accounting['steps']}; equal FLOPs: "
          f"{accounting['equal_flops_steps'] or 'none'}; seeds {cmp['seeds']} -> {out}", flush=True)
    runs = []
    # the equal-steps runs of every seed first, then the equal-FLOPs ones (a long study's cheap arms run for the
    # costly arm's FLOPs: its first verdict should not wait for them); seeds outermost within each, so a partial
    # comparison has every arm
    todo = [(seed, item) for kind in ("equal_steps", "equal_flops") for seed in cmp["seeds"]
            for item in plan if item["kind"] == kind]
    labels = {run_label(item) for item in plan}
    earlier = earlier_runs(out / REPORT.json, lambda r: (r["label"], r["seed"]) if r["label"] in labels else None)
    budget = RunBudget(len(todo), cmp.get("max_hours"))
    for seed, item in todo:
        if budget.exhausted(len(runs), "the same command (finished runs are skipped)"):
            break
        label = run_label(item)
        values = {**cmp["base"], **cmp["arms"][item["arm"]], "seed": seed, "max_steps": item["steps"]}
        record = train_or_keep(f"{label}/seed_{seed}", values, out / label / f"seed_{seed}",
                               cmp["launcher"], cmp["accelerate_config"], earlier.pop((label, seed), None))
        if cmp.get("transfer") and record["status"] == "finished" and "transfer" not in record:
            record["transfer"] = transfer_figures(out / label / f"seed_{seed}", values, cmp["transfer"])
        runs.append({**record, **item, "label": label, "seed": seed, "config": values})
        write_json(out / REPORT.json, comparison_payload(cmp, accounting, runs, earlier))
        budget.after(len(runs), record)
    payload = comparison_payload(cmp, accounting, runs, earlier)
    write_json(out / REPORT.json, payload)
    REPORT.write(payload, out)
    for kind in ("equal_steps", "equal_flops"):
        for arm, v in payload[kind].items():
            print(f"{kind.replace('_', ' ')}, {arm}: {v['verdict']}", flush=True)
    print(f"wrote {out / REPORT.json}, {out / REPORT.png}, {out / REPORT.markdown}", flush=True)
    return payload


def budget_arm(accounting: dict) -> str:
    """The arm whose training FLOPs the equal-FLOPs runs spend (the cheapest, unless `equal_flops: reference`)."""
    return accounting.get("budget_arm", accounting["cheapest_arm"])


def budget_words(accounting: dict) -> str:
    return "cheapest arm's" if budget_arm(accounting) == accounting["cheapest_arm"] else "reference arm's"


def run_label(item: dict) -> str:
    """A planned run's folder and report label: the arm, or ARM_equal_flops for its equal-FLOPs run."""
    return item["arm"] if item["kind"] == "equal_steps" else f"{item['arm']}_equal_flops"


def transfer_figures(run_dir: Path, values: dict, transfer: dict) -> dict:
    """The run's scores on the transfer puzzles (scored once; a rerun reads them back)."""
    if not task_figures(run_dir, TRANSFER_EVAL):
        score_task_run(run_dir, values, transfer)
    return task_figures(run_dir, TRANSFER_EVAL)


def verdict(label_a: str, a: list[float], label_b: str, b: list[float], higher_is_better: bool = False) -> dict:
    """Mean ± std per side, the difference a - b with its 95% Welch interval over seeds, and a winner only
    where the interval excludes 0 (statistics.RULE)."""
    if not a or not b:
        return {"verdict": "incomplete: a side has no finished run", "winner": None}
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    d = welch(a, b)
    a_better = ma > mb if higher_is_better else ma < mb
    winner = (label_a if a_better else label_b) if d.excludes_zero else None
    difference = f"{label_a} - {label_b} = {d.interval_text()}"
    if d.low is None:
        text = f"no winner: {difference}"
    elif winner:
        best, other = (ma, mb) if a_better else (mb, ma)
        text = f"{winner} wins: {best:.4f} vs {other:.4f}; {difference} excludes 0"
    else:
        text = f"no winner: {difference} includes 0"
    return {label_a: {"mean": ma, "std": sa, "values": a}, label_b: {"mean": mb, "std": sb, "values": b},
            "gap": abs(ma - mb), "difference": d.diff, "interval": [d.low, d.high], "p_value": d.p_value,
            "winner": winner, "verdict": text}


def budget_trend(runs: list[dict], reference: str, label: str) -> list[dict]:
    """The equal-FLOPs gap along the shared budget, for a long study's "does the gap shrink with training?".

    At each evaluation of the `label` runs (a share of their own schedule, and so of the FLOPs both
    sides spend in all), their val loss minus the `reference` run's of the same seed at the same share
    of its schedule (interpolated between its evaluations); mean ± std over the seeds both finished.
    """
    def by_seed(name):
        return {r["seed"]: r for r in runs if r["label"] == name and r["status"] == "finished"}

    ref, arm = by_seed(reference), by_seed(label)
    seeds = sorted(set(ref) & set(arm))
    if not seeds:
        return []
    steps = sorted(set.intersection(*({point[0] for point in arm[seed]["eval_curve"]} for seed in seeds)))
    rows = []
    for step in steps:
        share = step / arm[seeds[0]]["steps"]
        ref_losses = [interpolate(ref[seed]["eval_curve"], share * ref[seed]["steps"]) for seed in seeds]
        if None in ref_losses:  # before the reference's first evaluation
            continue
        arm_losses = [next(loss for s, loss, *_ in arm[seed]["eval_curve"] if s == step) for seed in seeds]
        gap = mean_std([a - r for a, r in zip(arm_losses, ref_losses)])
        rows.append({"share": share, "arm_step": step, "reference_step": share * ref[seeds[0]]["steps"],
                     "reference_loss": mean_std(ref_losses), "arm_loss": mean_std(arm_losses),
                     "gap": gap, "seeds": seeds})
    return rows


def interpolate(curve: list[list[float]], step: float) -> float | None:
    """A [[step, value, ...], ...] curve's value at `step`, linear between its points; None outside them."""
    exact = [point[1] for point in curve if point[0] == step]
    if exact:
        return exact[-1]
    for (s0, v0, *_), (s1, v1, *_) in zip(curve, curve[1:]):
        if s0 < step < s1:
            return v0 + (v1 - v0) * (step - s0) / (s1 - s0)
    return None


def trend_verdict(rows: list[dict]) -> str:
    """Whether the gap shrank, held or grew (or changed sign) from the first row to the last, by the spread rule."""
    if len(rows) < 2:
        return "too few shared evaluations to tell"
    (first, first_std), (last, last_std) = rows[0]["gap"], rows[-1]["gap"]
    span = (f"from {first:+.4f} ± {first_std:.4f} at {rows[0]['share']:.0%} of the budget "
            f"to {last:+.4f} ± {last_std:.4f}")
    if len(rows[0]["seeds"]) < 2:
        return f"the gap goes {span} (one seed: the spread is unknown)"
    if abs(first - last) <= first_std + last_std:
        return f"the gap holds within the seed spread: {span}"
    if first * last < 0:
        return f"the gap reverses: {span}"
    return f"the gap {'shrinks' if abs(last) < abs(first) else 'grows'}: {span}"


def comparison_payload(cmp: dict, accounting: dict, runs: list[dict], earlier: dict | None = None) -> dict:
    """The verdicts from `runs`; `other_runs` keeps the earlier finished runs this command did not plan or reach."""
    key, _, higher = METRICS[cmp["metric"]]

    def values(label):
        return [r[key] for r in runs if r["label"] == label and r["status"] == "finished" and r.get(key) is not None]

    reference, cheapest = cmp["reference"], budget_arm(accounting)
    equal_steps = {arm: verdict(reference, values(reference), arm, values(arm), higher)
                   for arm in cmp["arms"] if arm != reference} if cmp.get("equal_steps", True) else {}
    equal_flops = {arm: verdict(cheapest, values(cheapest), f"{arm}_equal_flops", values(f"{arm}_equal_flops"), higher)
                   for arm in accounting["equal_flops_steps"]}
    transfer = {}
    if cmp.get("transfer"):
        def transferred(label):
            return [r["transfer"]["exact_accuracy"] for r in runs if r["label"] == label and r.get("transfer")]
        transfer = {"settings": cmp["transfer"],
                    "equal_steps": {arm: verdict(reference, transferred(reference), arm, transferred(arm), True)
                                    for arm in cmp["arms"] if arm != reference} if cmp.get("equal_steps", True) else {}}
    return {"config": cmp["path"], "description": cmp["description"], "seeds": cmp["seeds"], "base": cmp["base"],
            "arms": cmp["arms"], "reference": reference, "metric": cmp["metric"], "accounting": accounting,
            "equal_steps_runs": cmp.get("equal_steps", True),
            "equal_steps": equal_steps, "equal_flops": equal_flops, "transfer": transfer,
            "equal_flops_trend": {arm: budget_trend(runs, cheapest, f"{arm}_equal_flops")
                                  for arm in accounting["equal_flops_steps"]},
            "ln_vocab": next((r["ln_vocab"] for r in runs if r["status"] == "finished"), None),
            "runs": runs, "spread_rule": STATISTICS_RULE, "other_runs": list((earlier or {}).values())}


def refreshed(p: dict) -> dict:
    """A comparison.json's verdicts and trends computed again from its runs by today's rules (`--report`)."""
    cmp = {"path": p["config"], "description": p["description"], "seeds": p["seeds"], "base": p["base"],
           "arms": p["arms"], "reference": p["reference"], "metric": p["metric"],
           "equal_steps": p.get("equal_steps_runs", True), "transfer": (p.get("transfer") or {}).get("settings")}
    return comparison_payload(cmp, p["accounting"], p["runs"], dict(enumerate(p.get("other_runs", []))))


def comparison_markdown(p: dict) -> str:
    acc, runs = p["accounting"], p["runs"]
    key, metric_label, higher = METRICS[p["metric"]]
    lines = [f"# Comparison: {p['config']}", ""]
    if p["description"]:
        lines += [p["description"].strip(), ""]
    own_lr = any("learning_rate" in fields for fields in p["arms"].values())
    shared = "batch, schedule, data, data order" + ("" if own_lr else ", learning rate")
    lines += [f"Every arm shares every training setting ({shared}) and the seeds {p['seeds']}; they differ "
              f"only in model fields{' and learning rate' if own_lr else ''}. The reference arm is "
              f"`{p['reference']}`.", "",
              "| arm | model fields | learning rate | parameters | training FLOPs / token | steps (equal steps) | "
              "steps (equal FLOPs) |", "|---|---|---:|---:|---:|---:|---:|"]
    for arm, fields in p["arms"].items():
        params = next((r["parameters"] for r in runs if r["arm"] == arm and r["status"] == "finished"), None)
        model_fields = {k: v for k, v in fields.items() if k not in ARM_TRAINING_FIELDS}
        lr = fields.get("learning_rate", p["base"].get("learning_rate", "default"))
        lines.append(f"| {arm} | `{model_fields}` | {lr} | {f'{params:,}' if params else '—'} | "
                     f"{acc['flops_per_token'][arm]:.4g} | {full_steps(p, arm)} | "
                     f"{acc['equal_flops_steps'].get(arm, '—')} |")
    lines += depth_table(p)
    lines += ["", "Recursive FLOPs count every supervision step (halting can only make it cheaper) and the backward "
              f"of the passes that carry gradient only. An equal-FLOPs run spends the {budget_words(acc)} "
              f"(`{budget_arm(acc)}`) training FLOPs with its own full learning-rate schedule.", ""]
    if p["ln_vocab"] and p["metric"] == "loss":
        lines += [f"Losses are validation cross-entropy in nats per token; chance (uniform guessing) is "
                  f"ln(vocab) = {p['ln_vocab']:.3f}.", ""]
    lines += run_table(p, key, metric_label, higher) + [""]
    lines += [f"**Equal steps, {arm} vs {p['reference']}:** {v['verdict']}." for arm, v in p["equal_steps"].items()]
    lines += [f"**Equal FLOPs, {arm} vs {budget_arm(acc)}:** {v['verdict']}."
              for arm, v in p["equal_flops"].items()]
    lines += ["", f"Rule: {p['spread_rule']}.", "", f"Throughput: {THROUGHPUT_NOTE}."]
    lines += trend_section(p)
    lines += steps_curve_table(runs)
    lines += halting_section(p)
    lines += transfer_section(p)
    failed = [r for r in runs if r["status"] == "failed"]
    if failed:
        lines += ["", "## Failed runs", ""] + [f"- `{r['label']}` seed {r['seed']}: {r['error'].splitlines()[-1][:300]}"
                                               for r in failed]
    return "\n".join(lines) + "\n"


def trend_section(p: dict) -> list[str]:
    """The equal-FLOPs gap at each shared evaluation along the budget (`budget_trend`), one table per arm."""
    lines, reference = [], budget_arm(p["accounting"])
    for arm, rows in p.get("equal_flops_trend", {}).items():
        if not rows:
            continue
        lines += ["", f"## The equal-FLOPs gap along the budget: {arm} vs {reference}", "",
                  f"At each evaluation of `{arm}_equal_flops`, against `{reference}` at the same share of the "
                  "FLOPs both spend (its loss interpolated between its evaluations), per seed: "
                  f"**{trend_verdict(rows)}**.", "",
                  f"| share of the budget | {arm} step | {reference} step | {reference} val loss | {arm} val loss | "
                  "gap (mean ± std) |", "|---:|---:|---:|---:|---:|---:|"]
        for row in rows:
            lines.append(f"| {row['share']:.0%} | {row['arm_step']} | {row['reference_step']:.0f} | "
                         f"{row['reference_loss'][0]:.4f} | {row['arm_loss'][0]:.4f} | "
                         f"{row['gap'][0]:+.4f} ± {row['gap'][1]:.4f} |")
    return lines


def depth_table(p: dict) -> list[str]:
    """Each arm's depth: layers per supervision step, decoder passes (with gradient), supervision steps."""
    depth = p["accounting"].get("depth")
    if not depth:  # a report written before the depth was recorded
        return []
    lines = ["", "| arm | effective depth (layers per supervision step) | decoder passes per supervision step | "
             "passes with gradient | supervision steps (most) |", "|---|---:|---:|---:|---:|"]
    for arm, d in depth.items():
        lines.append(f"| {arm} | {d['effective_depth']} | {d['passes']} | {d['gradient_passes']} | "
                     f"{d['supervision_steps']} |")
    return lines


def stops_text(done: list[dict]) -> str:
    """How the runs ended: plateau at step S, or the step cap (runs written before the rule: the cap)."""
    return ", ".join(f"{'plateau' if r.get('stopped_by') == 'plateau' else 'cap'} {r.get('stopped_at', r['steps'])}"
                     for r in sorted(done, key=lambda r: r["seed"]))


def halting_section(p: dict) -> list[str]:
    """Q-head halting at the trained depth per run kind (accuracy, steps, share of the maximum) and, for the
    reference arm, by difficulty."""
    runs = [r for r in p["runs"] if r["status"] == "finished" and (r.get("q_head") or {}).get("share_of_steps")]
    if not runs:
        return []
    lines = ["", "## Halting: the Q-head against every supervision step (all held-out puzzles)", "",
             "| run | seeds | exact accuracy, every step | exact accuracy, Q-head halting | difference "
             "(95% interval) | mean steps | share of the steps |", "|---|---:|---:|---:|---|---:|---:|"]
    for label in dict.fromkeys(r["label"] for r in runs):
        q = [r["q_head"] for r in runs if r["label"] == label]
        every, halted = [x["all_steps_exact_accuracy"] for x in q], [x["exact_accuracy"] for x in q]
        lines.append(f"| {label} | {len(q)} | {mean_std(every)[0]:.4f} | {mean_std(halted)[0]:.4f} | "
                     f"{welch(halted, every).interval_text()} | {mean_std([x['mean_steps'] for x in q])[0]:.2f} "
                     f"of {q[0]['halt_max_steps']} | {mean_std([x['share_of_steps'] for x in q])[0]:.0%} |")
    lines += threshold_table(runs)
    reference = [r["by_difficulty"] for r in runs if r["label"] == p["reference"] and r.get("by_difficulty")]
    if reference:
        measure = reference[0]["measure"]
        values = sorted({int(v) for table in reference for v in table["rows"]})
        lines += ["", f"By difficulty ({measure}), `{p['reference']}`, mean over seeds: do harder puzzles take more "
                  "steps?", "", f"| {measure} | puzzles | exact accuracy, every step | exact accuracy, Q-head | "
                  "Q-head mean steps |", "|---:|---:|---:|---:|---:|"]
        for value in values:
            rows = [table["rows"][str(value)] if str(value) in table["rows"] else table["rows"].get(value)
                    for table in reference]
            rows = [row for row in rows if row]
            lines.append(f"| {value} | {rows[0]['puzzles']} | "
                         + " | ".join(f"{mean_std([row[k] for row in rows])[0]:.3f}" for k in
                                      ("exact_accuracy", "q_head_exact_accuracy", "q_head_mean_steps")) + " |")
    return lines


def threshold_table(runs: list[dict]) -> list[str]:
    """The Q-head's trade-off: exact accuracy and steps when it must give "halt" 0.5 (training's rule), 0.9, 0.99."""
    scored = [r for r in runs if r.get("q_head_thresholds")]
    if not scored:
        return []
    thresholds = list(scored[0]["q_head_thresholds"])
    lines = ["", "The Q-head's operating points: it halts an example when it gives \"halt\" at least this probability "
             "(0.5 is the rule it trained with); exact accuracy (share of the steps), mean over seeds:", "",
             "| run | " + " | ".join(thresholds) + " |", "|---|" + "---:|" * len(thresholds)]
    for label in dict.fromkeys(r["label"] for r in scored):
        mine = [r["q_head_thresholds"] for r in scored if r["label"] == label]
        cells = [f"{mean_std([m[t]['exact_accuracy'] for m in mine])[0]:.4f} "
                 f"({mean_std([m[t]['share_of_steps'] for m in mine])[0]:.0%})" for t in thresholds]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def full_steps(p: dict, arm: str):
    """The arm's equal-steps run length, or — where `equal_steps: false` left it out."""
    ran = p.get("equal_steps_runs", True) or arm == budget_arm(p["accounting"])
    return p["accounting"]["steps"] if ran else "—"


def run_table(p: dict, key: str, metric_label: str, higher: bool) -> list[str]:
    task = p["metric"] == "exact_accuracy"
    stops = any("stopped_by" in r for r in p["runs"])  # runs made before the plateau rule have no such field
    lines = [f"| run | seeds | {metric_label} (mean ± std) | " + ("cell accuracy | " if task else "")
             + "val loss | token accuracy | tokens/s | recursion steps |" + (" stopped, per seed |" if stops else ""),
             "|---|---:|---|" + ("---:|" if task else "") + "---:|---:|---:|---:|" + ("---|" if stops else "")]
    for label in dict.fromkeys(r["label"] for r in p["runs"]):
        done = [r for r in p["runs"] if r["label"] == label and r["status"] == "finished"]
        if not done:
            lines.append(f"| {label} | 0 | failed |" + (" |" if task else "") + " | | | |" + (" |" if stops else ""))
            continue
        m, s = mean_std([r[key] for r in done])
        cells = f" {mean_std([r['cell_accuracy'] for r in done])[0]:.3f} |" if task else ""
        steps = [r["recursion_steps"] for r in done if r.get("recursion_steps") is not None]
        lines.append(f"| {label} | {len(done)} | {m:.4f} ± {s:.4f} |{cells} "
                     f"{mean_std([r['final_val_loss'] for r in done])[0]:.4f} | "
                     f"{mean_std([r['accuracy'] for r in done])[0]:.3f} | "
                     f"{mean_std([r['tokens_per_s'] for r in done])[0]:,.0f} | "
                     f"{f'{sum(steps) / len(steps):.2f}' if steps else '—'} |"
                     + (f" {stops_text(done)} |" if stops else ""))
    return lines


def steps_curve_table(runs: list[dict],
                      title: str = "## Exact accuracy by supervision steps at evaluation") -> list[str]:
    """Exact accuracy after 1 .. 2 x halt_max_steps supervision steps (recursive task runs): test-time compute."""
    curves = {}
    for r in runs:
        for key, how in (("exact_accuracy_by_steps", ""), ("q_head_by_steps", ", Q-head may halt")):
            if r["status"] == "finished" and r.get(key):
                curves.setdefault(r["label"] + how, []).append({str(k): v for k, v in r[key].items()})
    if not curves:
        return []
    depths = sorted({int(k) for found in curves.values() for c in found for k in c})
    lines = ["", f"{title} (mean over seeds)", "",
             "| run | " + " | ".join(str(k) for k in depths) + " | Q-head halting (steps) |",
             "|---|" + "---:|" * (len(depths) + 1)]
    for label, found in curves.items():
        row = [[c[str(k)] for c in found if str(k) in c] for k in depths]
        q = [r for r in runs if r["label"] == label and r.get("q_head")]
        q_text = (f"{mean_std([r['q_head']['exact_accuracy'] for r in q])[0]:.3f} "
                  f"({mean_std([r['q_head']['mean_steps'] for r in q])[0]:.2f})") if q else "—"
        cells = " | ".join(f"{mean_std(v)[0]:.3f}" if v else "—" for v in row)
        lines.append(f"| {label} | {cells} | {q_text} |")
    return lines


def transfer_section(p: dict) -> list[str]:
    """Every run scored on the transfer puzzles: exact accuracy, cell accuracy and the steps curve."""
    if not p.get("transfer"):
        return []
    settings = ", ".join(f"{k} {v}" for k, v in p["transfer"]["settings"].items())
    lines = ["", f"## Transfer: the same models on other puzzles ({settings})", "",
             "Each run's export scored on the held-out puzzles that its task arguments, so changed, generate: "
             "puzzles of a kind it never trained on.", "",
             "| run | seeds | exact accuracy (mean ± std) | cell accuracy |", "|---|---:|---|---:|"]
    for label in dict.fromkeys(r["label"] for r in p["runs"]):
        done = [r["transfer"] for r in p["runs"] if r["label"] == label and r.get("transfer")]
        if done:
            m, s = mean_std([t["exact_accuracy"] for t in done])
            lines.append(f"| {label} | {len(done)} | {m:.4f} ± {s:.4f} | "
                         f"{mean_std([t['cell_accuracy'] for t in done])[0]:.3f} |")
    lines += [""] + [f"**Transfer, equal steps, {arm} vs {p['reference']}:** {v['verdict']}."
                     for arm, v in p["transfer"]["equal_steps"].items()]
    return lines + steps_curve_table([{**r["transfer"], "label": r["label"], "status": r["status"]}
                                      for r in p["runs"] if r.get("transfer")],
                                     "### Transfer: exact accuracy by supervision steps")


def plot(p: dict, path: Path) -> None:
    """Val loss vs steps and vs training FLOPs, the final metric per run, and the steps curve (task runs)
    or the throughput."""
    plt = pyplot()
    key, metric_label, _ = METRICS[p["metric"]]
    done = [r for r in p["runs"] if r["status"] == "finished"]
    labels = list(dict.fromkeys(r["label"] for r in done))
    colors = dict(zip(labels, plt.get_cmap("tab10").colors))
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    (by_step, by_flops), (final, last) = axes
    learning_curves(by_step, by_flops, done, labels, colors) if p["metric"] == "exact_accuracy" else \
        loss_curves(by_step, by_flops, done, labels, colors)
    stats = [mean_std([r[key] for r in done if r["label"] == label]) for label in labels]
    final.bar(labels, [m for m, _ in stats], yerr=[s for _, s in stats], capsize=5,
              color=[colors[label] for label in labels])
    final.set_ylabel(metric_label + ", mean ± std")
    final.set_title(metric_label.capitalize())
    final.tick_params(axis="x", labelrotation=20, labelsize=8)
    final.grid(axis="y", alpha=0.3)
    plot_steps_curve(last, done, labels, colors)
    fig.suptitle(f"{p['config']} ({len(p['seeds'])} seeds)", fontsize=10)
    save_figure(fig, path)


def learning_curves(by_seen, by_flops, done: list[dict], labels: list[str], colors: dict) -> None:
    """Held-out exact accuracy at every evaluation against puzzles seen and training FLOPs: one line per run
    (arm and seed), so a run that plateaued early and one that hit its cap are both visible."""
    for label in labels:
        for i, r in enumerate(r for r in done if r["label"] == label):
            points = [(s, e) for s, _, _, e, *_ in (c + [None] for c in r["eval_curve"]) if e is not None]
            if not points or not r.get("sequences_per_step"):  # a run made before its curve had exact accuracy
                continue
            seen = [s * r["sequences_per_step"] for s, _ in points]
            flops = [s * r["tokens_per_step"] * r["flops_per_token"] for s, _ in points]
            for ax, x in ((by_seen, seen), (by_flops, flops)):
                ax.plot(x, [e for _, e in points], color=colors[label], linewidth=1, alpha=0.8,
                        label=label if i == 0 else None)
    by_seen.set_xlabel("training puzzles seen")
    by_flops.set_xlabel("training FLOPs")
    for ax in (by_seen, by_flops):
        ax.set_xscale("log")
        ax.set_ylabel("held-out exact accuracy (one line per seed)")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    by_seen.set_title("Learning curves by puzzles seen")
    by_flops.set_title("Learning curves by training compute")


def loss_curves(by_step, by_flops, done: list[dict], labels: list[str], colors: dict) -> None:
    """Validation loss, mean ± std over seeds, against steps and training FLOPs."""
    for label in labels:
        runs = [r for r in done if r["label"] == label]
        steps, mean, std = mean_curve([r["eval_curve"] for r in runs])
        flops = [s * runs[0]["tokens_per_step"] * runs[0]["flops_per_token"] for s in steps]
        # an equal-FLOPs run has its own shorter schedule: it belongs on the compute axis only
        axes_here = ((by_flops, flops),) if label.endswith("_equal_flops") else ((by_step, steps), (by_flops, flops))
        for ax, x in axes_here:
            ax.plot(x, mean, marker="o", markersize=3, color=colors[label], label=label)
            ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=colors[label], alpha=0.2)
    by_step.set_xlabel("optimizer step")
    by_flops.set_xlabel("training FLOPs")
    by_flops.set_xscale("log")
    for ax, title in ((by_step, "Validation loss at equal steps"), (by_flops, "Validation loss at equal compute")):
        ax.set_ylabel("validation loss, mean ± std over seeds")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.lines:  # a report written while one side has no finished run yet
            ax.legend(fontsize=8)


def plot_steps_curve(ax, done: list[dict], labels: list[str], colors: dict) -> None:
    curved = [label for label in labels if any(r["label"] == label and r.get("exact_accuracy_by_steps") for r in done)]
    if not curved:  # no recursive task run: the throughput instead
        stats = [mean_std([r["tokens_per_s"] for r in done if r["label"] == label]) for label in labels]
        ax.bar(labels, [m for m, _ in stats], yerr=[s for _, s in stats], capsize=5,
               color=[colors[label] for label in labels])
        ax.set_ylabel("training throughput (tokens/s), mean ± std")
        ax.set_title("Throughput")
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        return
    for label in curved:
        for key, style, how in (("exact_accuracy_by_steps", "-", ""), ("q_head_by_steps", "--", ", Q-head may halt")):
            found = [{str(k): v for k, v in r[key].items()} for r in done if r["label"] == label and r.get(key)]
            ks = sorted({int(k) for c in found for k in c})
            if ks:
                ax.plot(ks, [mean_std([c[str(k)] for c in found if str(k) in c])[0] for k in ks], marker="o",
                        linestyle=style, color=colors[label], label=label + how)
    ax.set_xlabel("supervision steps at evaluation")
    ax.set_ylabel("exact accuracy, mean over seeds")
    ax.set_title("Test-time compute: accuracy by supervision steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


REPORT = ReportFiles("comparison.json", "comparison.png", "COMPARISON.md", plot, comparison_markdown, refreshed)


def main(argv: list[str] | None = None) -> dict:
    return run_runner(argv, RunnerArguments, load_comparison, run_comparison, USAGE, REPORT.rebuild)


if __name__ == "__main__":
    raise SystemExit(exit_status(run_cli(main)))
