"""The comparison report: COMPARISON.md and comparison.png, made from comparison.json alone (`runners/compare.py`
writes it), so `--report DIR` rebuilds them without training."""

import dataclasses
from pathlib import Path
from typing import NamedTuple

from ..tasks.puzzles import TASK_CLASSES
from .engine import mean_curve, other_runs_note, pyplot, save_figure, settings_line, throughput_lines
from .records import Accounting, ComparisonReport, RunRecord, TrendPoint
from .statistics import mean_std, mean_std_text, welch


class Metric(NamedTuple):
    """What a comparison compares its runs by."""
    field: str  # the RunRecord field of a run's final value
    label: str
    higher_is_better: bool
    column_label: str  # a table column's
    curve_column: int  # its column in a RunRecord's eval_curve ([step, loss, token accuracy, exact accuracy])


METRICS = {"loss": Metric("final_val_loss", "validation loss", False, "val loss", 1),
           "exact_accuracy": Metric("exact_accuracy", "exact accuracy on held-out puzzles", True, "exact accuracy", 3)}
TRANSFER_CURVES = ("exact_accuracy_by_steps", "q_head_by_steps", "q_head")  # a transfer score's steps curve
TREND_ROWS = 21  # most rows of an equal-FLOPs trend table: 5% of the budget apart when it has more
# the step cap and evaluation interval an arm may set when its update costs a fraction of the others'
# (supervision_updates: per_step), so it spends the same FLOPs
ARM_BUDGET_FIELDS = {"max_steps", "eval_interval"}
ARM_TRAINING_FIELDS = {"learning_rate"} | ARM_BUDGET_FIELDS  # and its own best learning rate


def budget_words(accounting: Accounting) -> str:
    return "cheapest arm's" if accounting.budget_arm == accounting.cheapest_arm else "reference arm's"


def trend_verdict(rows: list[TrendPoint]) -> str:
    """Whether the gap shrank, held or grew (or changed sign) from the first row to the last, by the spread rule."""
    if len(rows) < 2:
        return "too few shared evaluations to tell"
    (first, first_std), (last, last_std) = rows[0].gap, rows[-1].gap
    span = (f"from {first:+.4f} ± {first_std:.4f} at {rows[0].share:.0%} of the budget "
            f"to {last:+.4f} ± {last_std:.4f}")
    if len(rows[0].seeds) < 2:
        return f"the gap goes {span} (one seed: the spread is unknown)"
    if abs(first - last) <= first_std + last_std:
        return f"the gap holds within the seed spread: {span}"
    if first * last < 0:
        return f"the gap reverses: {span}"
    return f"the gap {'shrinks' if abs(last) < abs(first) else 'grows'}: {span}"


def comparison_markdown(p: ComparisonReport) -> str:
    acc, runs = p.accounting, p.runs
    lines = [f"# Comparison: {p.config}", ""]
    if p.description:
        lines += [p.description.strip(), ""]
    lines += settings_line(p.base)
    own_lr = any("learning_rate" in fields for fields in p.arms.values())
    own_caps = any(set(fields) & ARM_BUDGET_FIELDS for fields in p.arms.values())
    shared = "batch, schedule, data, data order" + ("" if own_lr else ", learning rate")
    lines += [f"Every arm shares every training setting ({shared}) and the seeds {p.seeds}; they differ "
              f"only in model fields{' and learning rate' if own_lr else ''}"
              f"{' (and the step caps below)' if own_caps else ''}. The reference arm is "
              f"`{p.reference}`.", "",
              "| arm | model fields | learning rate | parameters | training FLOPs / token | steps (equal steps) | "
              "steps (equal FLOPs) |", "|---|---|---:|---:|---:|---:|---:|"]
    for arm, fields in p.arms.items():
        params = next((r.parameters for r in runs if r.arm == arm and r.finished), None)
        model_fields = {k: v for k, v in fields.items() if k not in ARM_TRAINING_FIELDS}
        lr = fields.get("learning_rate", p.base.get("learning_rate", "default"))
        lines.append(f"| {arm} | `{model_fields}` | {lr} | {f'{params:,}' if params else '—'} | "
                     f"{acc.flops_per_token[arm]:.4g} | {full_steps(p, arm)} | "
                     f"{acc.equal_flops_steps.get(arm, '—')} |")
    lines += own_settings(p)
    lines += depth_table(p)
    lines += ["", "Recursive FLOPs count every supervision step (halting can only make it cheaper) and the backward "
              f"of the passes that carry gradient only. An equal-FLOPs run spends the {budget_words(acc)} "
              f"(`{acc.budget_arm}`) training FLOPs with its own full learning-rate schedule.", ""]
    if p.ln_vocab and p.metric == "loss":
        lines += [f"Losses are validation cross-entropy in nats per token; chance (uniform guessing) is "
                  f"ln(vocab) = {p.ln_vocab:.3f}.", ""]
    lines += run_table(p) + stored_answer_note(runs) + other_runs_note(
        p.other_runs, "comparison.json", "seeds the command left out with --seeds", "--seeds") + [""]
    lines += [f"**Equal steps, {arm} vs {p.reference}:** {v.verdict}." for arm, v in p.equal_steps.items()]
    lines += [f"**Equal FLOPs, {arm} vs {acc.budget_arm}:** {v.verdict}."
              for arm, v in p.equal_flops.items()]
    lines += ["", f"Rule: {p.spread_rule}."] + throughput_lines(runs)
    lines += trend_section(p)
    lines += steps_curve_table(runs)
    lines += halting_section(p)
    lines += transfer_section(p)
    failed = [r for r in runs if not r.finished]
    if failed:
        lines += ["", "## Failed runs", ""] + [f"- `{r.run}` seed {r.seed}: {r.error.splitlines()[-1][:300]}"
                                               for r in failed]
    return "\n".join(lines) + "\n"


def trend_section(p: ComparisonReport) -> list[str]:
    """The equal-FLOPs gap at each shared evaluation along the budget (`budget_trend`), one table per arm."""
    lines, reference, label = [], p.accounting.budget_arm, METRICS[p.metric].column_label
    for arm, rows in p.equal_flops_trend.items():
        if not rows:
            continue
        lines += ["", f"## The equal-FLOPs gap along the budget: {arm} vs {reference}", "",
                  f"At each evaluation of `{arm}_equal_flops`, its {label} against `{reference}`'s at the same "
                  f"share of the FLOPs both spend (interpolated between its evaluations), per seed: "
                  f"**{trend_verdict(rows)}**.", ""]
        low = [r.title for r in p.runs if r.run in (f"{arm}_equal_flops", reference) and r.seed in rows[0].seeds
               and stored_answer_to(r) is not None]
        if low and p.metric == "exact_accuracy":  # a loss trend does not read the exact-accuracy column
            lines += [f"The curves of {', '.join(low)} count a maze solved only when the answer is its stored path "
                      "(above): their values here read low, and the gap is not the validator's.", ""]
        shown = evenly(rows, TREND_ROWS)
        if len(shown) < len(rows):
            lines += [f"{len(shown)} of the {len(rows)} shared evaluations, evenly spaced, the first and the last "
                      "among them (comparison.json keeps them all).", ""]
        lines += [f"| share of the budget | {arm} step | {reference} step | {reference} {label} | {arm} {label} | "
                  "gap (mean ± std) |", "|---:|---:|---:|---:|---:|---:|"]
        for row in shown:
            lines.append(f"| {row.share:.0%} | {row.arm_step} | {row.reference_step:.0f} | "
                         f"{row.reference_value[0]:.4f} | {row.arm_value[0]:.4f} | "
                         f"{row.gap[0]:+.4f} ± {row.gap[1]:.4f} |")
    return lines


def evenly(rows: list, most: int) -> list:
    """At most `most` of `rows`, evenly spaced by position, the first and the last among them."""
    if len(rows) <= most:
        return rows
    return [rows[round(i * (len(rows) - 1) / (most - 1))] for i in range(most)]


def depth_table(p: ComparisonReport) -> list[str]:
    """Each arm's depth: layers per supervision step, decoder passes (with gradient), supervision steps, and
    (where any arm updates per supervision step) the supervision steps one update follows."""
    depth = p.accounting.depth
    if not depth:  # a report written before the depth was recorded
        return []
    per_step = updates_per_supervision_step(p)
    lines = ["", "| arm | effective depth (layers per supervision step) | decoder passes per supervision step | "
             "passes with gradient | supervision steps (most) |" + (" supervision steps per update |" if per_step
                                                                     else ""),
             "|---|---:|---:|---:|---:|" + ("---:|" if per_step else "")]
    for arm, d in depth.items():
        lines.append(f"| {arm} | {d.effective_depth} | {d.passes} | {d.gradient_passes} | {d.supervision_steps} |"
                     + (f" {d.steps_per_update} |" if per_step else ""))
    return lines


def updates_per_supervision_step(p: ComparisonReport) -> bool:
    """Whether some arm updates after each supervision step (supervision_updates="per_step")."""
    return any(d.steps_per_update is not None and d.steps_per_update < d.supervision_steps
               for d in (p.accounting.depth or {}).values())


def stops_text(done: list[RunRecord]) -> str:
    """How the runs ended: plateau at step S, or the step cap (runs written before the rule: the cap)."""
    return ", ".join(f"{'plateau' if r.stopped_by == 'plateau' else 'cap'} "
                     f"{r.steps if r.stopped_at is None else r.stopped_at}" for r in sorted(done, key=lambda r: r.seed))


def halting_section(p: ComparisonReport) -> list[str]:
    """Q-head halting at the trained depth per run kind (accuracy, steps, share of the maximum) and, for the
    reference arm, by difficulty."""
    runs = [r for r in p.runs if r.finished and (r.q_head or {}).get("share_of_steps")]
    if not runs:
        return []
    lines = ["", "## Halting: the Q-head against every supervision step (all held-out puzzles)", "",
             "| run | seeds | exact accuracy, every step | exact accuracy, Q-head halting | difference "
             "(95% interval) | mean steps | share of the steps |", "|---|---:|---:|---:|---|---:|---:|"]
    for name in dict.fromkeys(r.run for r in runs):
        q = [r.q_head for r in runs if r.run == name]
        every, halted = [x["all_steps_exact_accuracy"] for x in q], [x["exact_accuracy"] for x in q]
        lines.append(f"| {name} | {len(q)} | {mean_std(every)[0]:.4f} | {mean_std(halted)[0]:.4f} | "
                     f"{welch(halted, every).interval_text()} | {mean_std([x['mean_steps'] for x in q])[0]:.2f} "
                     f"of {q[0]['halt_max_steps']} | {mean_std([x['share_of_steps'] for x in q])[0]:.0%} |")
    lines += threshold_table(runs)
    reference = [r.by_difficulty for r in runs if r.run == p.reference and r.by_difficulty]
    if reference:
        measure = reference[0]["measure"]
        values = sorted({int(v) for table in reference for v in table["rows"]})
        lines += ["", f"By difficulty ({measure}), `{p.reference}`, mean over seeds: do harder puzzles take more "
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


def threshold_table(runs: list[RunRecord]) -> list[str]:
    """The Q-head's trade-off: exact accuracy and steps when it must give "halt" 0.5 (training's rule), 0.9, 0.99."""
    scored = [r for r in runs if r.q_head_thresholds]
    if not scored:
        return []
    thresholds = list(scored[0].q_head_thresholds)
    lines = ["", "The Q-head's operating points: it halts an example when it gives \"halt\" at least this probability "
             "(0.5 is the rule it trained with); exact accuracy (share of the steps), mean over seeds:", "",
             "| run | " + " | ".join(thresholds) + " |", "|---|" + "---:|" * len(thresholds)]
    for name in dict.fromkeys(r.run for r in scored):
        mine = [r.q_head_thresholds for r in scored if r.run == name]
        cells = [f"{mean_std([m[t]['exact_accuracy'] for m in mine])[0]:.4f} "
                 f"({mean_std([m[t]['share_of_steps'] for m in mine])[0]:.0%})" for t in thresholds]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def full_steps(p: ComparisonReport, arm: str):
    """The arm's equal-steps run length, or — where `equal_steps: false` left it out."""
    ran = p.equal_steps_runs or arm == p.accounting.budget_arm
    return p.accounting.steps_of(arm) if ran else "—"


def own_settings(p: ComparisonReport) -> list[str]:
    """A note on the arms that set a training setting besides the learning rate (a step cap of their own)."""
    own = {arm: {k: v for k, v in fields.items() if k in ARM_BUDGET_FIELDS}
           for arm, fields in p.arms.items()}
    own = {arm: settings for arm, settings in own.items() if settings}
    if not own:
        return []
    return ["", "Training settings of their own: " + "; ".join(
        f"`{arm}` " + ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in settings.items())
        for arm, settings in own.items()) + " (the other arms: the base's). Each arm's equal-steps run trains to its "
        "own step cap, and the equal-steps verdicts compare the arms at their caps, which spend these training "
        "FLOPs per token of a whole run: " + ", ".join(f"`{arm}` {p.accounting.steps_of(arm) * f:.4g}"
                                                      for arm, f in p.accounting.flops_per_token.items()) + "."]


def run_table(p: ComparisonReport) -> list[str]:
    metric, task = METRICS[p.metric], p.metric == "exact_accuracy"
    stops = any(r.stopped_by is not None for r in p.runs)  # runs made before the plateau rule have no such field
    lines = [f"| run | seeds | {metric.label} (mean ± std) | " + ("cell accuracy | " if task else "")
             + "val loss | token accuracy | tokens/s | recursion steps |" + (" stopped, per seed |" if stops else ""),
             "|---|---:|---|" + ("---:|" if task else "") + "---:|---:|---:|---:|" + ("---|" if stops else "")]
    for name in dict.fromkeys(r.run for r in p.runs):
        done = [r for r in p.runs if r.run == name and r.finished]
        if not done:
            lines.append(f"| {name} | 0 | failed |" + (" |" if task else "") + " | | | |" + (" |" if stops else ""))
            continue
        cells = f" {mean_std([r.cell_accuracy for r in done])[0]:.3f} |" if task else ""
        steps = [r.recursion_steps for r in done if r.recursion_steps is not None]
        lines.append(f"| {name} | {len(done)} | {mean_std_text([getattr(r, metric.field) for r in done])} |{cells} "
                     f"{mean_std([r.final_val_loss for r in done])[0]:.4f} | "
                     f"{mean_std([r.accuracy for r in done])[0]:.3f} | "
                     f"{mean_std([r.tokens_per_s for r in done])[0]:,.0f} | "
                     f"{f'{sum(steps) / len(steps):.2f}' if steps else '—'} |"
                     + (f" {stops_text(done)} |" if stops else ""))
    continued = [r for r in p.runs if r.finished and r.started_from]
    if continued:
        lines += ["", "Started from their equal-steps twin's last checkpoint (a schedule the step cap does not shape "
                  "repeats the twin's steps up to there; steps, curves and wall time include them; where the twin "
                  "had plateaued there, the rule stopped the run at once, and it is the twin's run): "
                  + ", ".join(f"{r.title} from `{r.started_from}`" for r in continued) + "."]
    return lines


def stored_answer_to(r: RunRecord) -> int | None:
    """The last step where `r`'s learning curve counts only the stored answer though another may be right
    (a maze run evaluated before the trainer used the validator), else None."""
    task = r.config.get("task")
    if not r.finished or task is None or TASK_CLASSES[task].unique_answers or not r.eval_curve:
        return None
    stored = [step for step, _, _, exact, *_ in (c + [None] for c in r.eval_curve)  # older curves: 3 columns
              if exact is not None and (r.curve_validated_from is None or step < r.curve_validated_from)]
    return max(stored, default=None)


def stored_answer_note(runs: list[RunRecord]) -> list[str]:
    """Which learning curves (dotted in the figure) read low: they count a puzzle solved only when the answer is
    the stored one."""
    low = {r.title: (step, r.curve_validated_from) for r in runs if (step := stored_answer_to(r)) is not None}
    if not low:
        return []
    whole = [title for title, (_, validated) in low.items() if validated is None]
    part = [f"{title}'s to step {step:,}" for title, (step, validated) in low.items() if validated is not None]
    named = ([f"the whole curve{'s' if len(whole) > 1 else ''} of {', '.join(whole)}"] if whole else []) + part
    return ["", "A maze may have several shortest paths, and the task's validator accepts any. So does the exact "
            "accuracy in the table, and in the learning curves of the runs evaluated since the trainer used the "
            "validator. These curves count a maze solved only when the answer is its stored path, and read low "
            "(dotted in the figure): " + "; ".join(named) + "."]


def steps_curve_table(runs: list[RunRecord],
                      title: str = "## Exact accuracy by supervision steps at evaluation") -> list[str]:
    """Exact accuracy after each number of supervision steps scored, from 1 to 4 x halt_max_steps (recursive task
    runs), with and without the Q-head: test-time compute."""
    curves = {}
    for r in runs:
        for key, how in (("exact_accuracy_by_steps", ""), ("q_head_by_steps", ", Q-head may halt")):
            if r.finished and getattr(r, key):
                curves.setdefault(r.run + how, []).append({str(k): v for k, v in getattr(r, key).items()})
    if not curves:
        return []
    depths = sorted({int(k) for found in curves.values() for c in found for k in c})
    lines = ["", f"{title} (mean over seeds)", "",
             "| run | " + " | ".join(str(k) for k in depths) + " | Q-head halting (steps) |",
             "|---|" + "---:|" * (len(depths) + 1)]
    for name, found in curves.items():
        row = [[c[str(k)] for c in found if str(k) in c] for k in depths]
        q = [r for r in runs if r.run == name and r.q_head]
        q_text = (f"{mean_std([r.q_head['exact_accuracy'] for r in q])[0]:.3f} "
                  f"({mean_std([r.q_head['mean_steps'] for r in q])[0]:.2f})") if q else "—"
        cells = " | ".join(f"{mean_std(v)[0]:.3f}" if v else "—" for v in row)
        lines.append(f"| {name} | {cells} | {q_text} |")
    return lines


def transfer_section(p: ComparisonReport) -> list[str]:
    """Every run scored on the transfer puzzles: exact accuracy, cell accuracy and the steps curve."""
    if not p.transfer:
        return []
    settings = ", ".join(f"{k} {v}" for k, v in p.transfer.settings.items())
    lines = ["", f"## Transfer: the same models on other puzzles ({settings})", "",
             "Each run's export scored on the held-out puzzles that its task arguments, so changed, generate: "
             "puzzles of a kind it never trained on.", "",
             "| run | seeds | exact accuracy (mean ± std) | cell accuracy |", "|---|---:|---|---:|"]
    for name in dict.fromkeys(r.run for r in p.runs):
        done = [r.transfer for r in p.runs if r.run == name and r.transfer]
        if done:
            lines.append(f"| {name} | {len(done)} | {mean_std_text([t['exact_accuracy'] for t in done])} | "
                         f"{mean_std([t['cell_accuracy'] for t in done])[0]:.3f} |")
    lines += [""] + [f"**Transfer, equal steps, {arm} vs {p.reference}:** {v.verdict}."
                     for arm, v in p.transfer.equal_steps.items()]
    return lines + steps_curve_table([dataclasses.replace(r, **{k: r.transfer.get(k) for k in TRANSFER_CURVES})
                                      for r in p.runs if r.transfer],
                                     "### Transfer: exact accuracy by supervision steps")


def plot(p: ComparisonReport, path: Path) -> None:
    """Val loss vs steps and vs training FLOPs, the final metric per run, and the steps curve (task runs)
    or the throughput."""
    plt = pyplot()
    metric = METRICS[p.metric]
    done = [r for r in p.runs if r.finished]
    names = list(dict.fromkeys(r.run for r in done))
    colors = dict(zip(names, plt.get_cmap("tab10").colors))
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    (by_step, by_flops), (final, last) = axes
    learning_curves(by_step, by_flops, done, names, colors, updates_per_supervision_step(p)) \
        if p.metric == "exact_accuracy" else loss_curves(by_step, by_flops, done, names, colors)
    stats = [mean_std([getattr(r, metric.field) for r in done if r.run == name]) for name in names]
    final.bar(names, [m for m, _ in stats], yerr=[s for _, s in stats], capsize=5,
              color=[colors[name] for name in names])
    final.set_ylabel(metric.label + ", mean ± std")
    final.set_title(metric.label.capitalize())
    final.tick_params(axis="x", labelrotation=20, labelsize=8)
    final.grid(axis="y", alpha=0.3)
    plot_steps_curve(last, done, names, colors)
    fig.suptitle(f"{p.config} ({len(p.seeds)} seeds)", fontsize=10)
    save_figure(fig, path)


def learning_curves(by_seen, by_flops, done: list[RunRecord], names: list[str], colors: dict,
                    drawn: bool = False) -> None:
    """Held-out exact accuracy at every evaluation against puzzles seen and training FLOPs: one line per run
    (arm and seed), so a run that plateaued early and one that hit its cap are both visible. `drawn`: an arm
    updates per supervision step, and keeps each row it draws for several updates (it draws a batch per
    update, and trains fewer rows than it draws), so the axis says drawn."""
    for name in names:
        for i, r in enumerate(r for r in done if r.run == name):
            points = [(s, e) for s, _, _, e, *_ in (c + [None] for c in r.eval_curve) if e is not None]
            if not points or not r.sequences_per_step:  # a run made before its curve had exact accuracy
                continue
            seen = [s * r.sequences_per_step for s, _ in points]
            flops = [s * r.tokens_per_step * r.flops_per_token for s, _ in points]
            stored = stored_answer_to(r) or -1  # up to here (dotted) the curve counts the stored answer only
            low = sum(s <= stored for s, _ in points)  # points [:low] read low; the line joins them to the rest
            for ax, x in ((by_seen, seen), (by_flops, flops)):
                y = [e for _, e in points]
                if low:
                    ax.plot(x[:low + 1], y[:low + 1], color=colors[name], linewidth=1, alpha=0.8, linestyle=":")
                ax.plot(x[low:], y[low:], color=colors[name], linewidth=1, alpha=0.8,
                        label=name if i == 0 else None)
    by_seen.set_xlabel("training puzzles drawn (a per-step arm trains on fewer)" if drawn else
                       "training puzzles seen")
    by_flops.set_xlabel("training FLOPs")
    for ax in (by_seen, by_flops):
        ax.set_xscale("log")
        ax.set_ylabel("held-out exact accuracy (one line per seed)")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    by_seen.set_title("Learning curves by puzzles seen")
    by_flops.set_title("Learning curves by training compute")


def loss_curves(by_step, by_flops, done: list[RunRecord], names: list[str], colors: dict) -> None:
    """Validation loss, mean ± std over seeds, against steps and training FLOPs."""
    for name in names:
        runs = [r for r in done if r.run == name]
        steps, mean, std = mean_curve([r.eval_curve for r in runs])
        flops = [s * runs[0].tokens_per_step * runs[0].flops_per_token for s in steps]
        # an equal-FLOPs run has its own shorter schedule: it belongs on the compute axis only
        axes_here = ((by_flops, flops),) if name.endswith("_equal_flops") else ((by_step, steps), (by_flops, flops))
        for ax, x in axes_here:
            ax.plot(x, mean, marker="o", markersize=3, color=colors[name], label=name)
            ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=colors[name], alpha=0.2)
    by_step.set_xlabel("optimizer step")
    by_flops.set_xlabel("training FLOPs")
    by_flops.set_xscale("log")
    for ax, title in ((by_step, "Validation loss at equal steps"), (by_flops, "Validation loss at equal compute")):
        ax.set_ylabel("validation loss, mean ± std over seeds")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.lines:  # a report written while one side has no finished run yet
            ax.legend(fontsize=8)


def plot_steps_curve(ax, done: list[RunRecord], names: list[str], colors: dict) -> None:
    curved = [name for name in names if any(r.run == name and r.exact_accuracy_by_steps for r in done)]
    if not curved:  # no recursive task run: the throughput instead
        stats = [mean_std([r.tokens_per_s for r in done if r.run == name]) for name in names]
        ax.bar(names, [m for m, _ in stats], yerr=[s for _, s in stats], capsize=5,
               color=[colors[name] for name in names])
        ax.set_ylabel("training throughput (tokens/s), mean ± std")
        ax.set_title("Throughput")
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        return
    for name in curved:
        for key, style, how in (("exact_accuracy_by_steps", "-", ""), ("q_head_by_steps", "--", ", Q-head may halt")):
            found = [{str(k): v for k, v in getattr(r, key).items()} for r in done
                     if r.run == name and getattr(r, key)]
            ks = sorted({int(k) for c in found for k in c})
            if ks:
                ax.plot(ks, [mean_std([c[str(k)] for c in found if str(k) in c])[0] for k in ks], marker="o",
                        linestyle=style, color=colors[name], label=name + how)
    ax.set_xlabel("supervision steps at evaluation")
    ax.set_ylabel("exact accuracy, mean over seeds")
    ax.set_title("Test-time compute: accuracy by supervision steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
