"""The ablation grid's report: SUMMARY.md and ablation_comparison.png, made from results.json alone
(`runners/ablate.py` writes it), so `--report DIR` rebuilds them without training."""

from pathlib import Path

from .engine import mean_curve, other_runs_note, pyplot, save_figure, settings_line, throughput_lines
from .records import GridReport, VariantSummary


def summary_markdown(report: GridReport) -> str:
    runs, variants, ref = report.runs, report.variants, report.reference
    done = [r for r in runs if r.finished]
    lines = [f"# Ablation summary: {report.grid}", ""]
    if report.description:
        lines += [report.description.strip(), ""]
    lines += settings_line(report.base)
    lines += [f"{len(report.variants)} variants finished, {len(report.seeds)} seed(s) each "
              f"({report.seeds}); {len(runs) - len(done)} run(s) failed."]
    if report.not_in_report:  # a grid still running, stopped by --max_hours, or narrowed by --variants
        lines += ["", f"Not in this report (no finished run yet, or left out by --variants): "
                  f"{', '.join(report.not_in_report)}. The grid's command runs them and rebuilds the report."]
    if done:
        r0 = done[0]
        lines += ["", f"Each run: {r0.steps} optimizer steps; validation on {r0.eval_tokens:,} tokens. "
                  f"Losses are mean cross-entropy in nats per token. A model guessing uniformly over the "
                  f"vocabulary scores ln(vocab) = {report.ln_vocab:.3f}; a loss L means the model is as unsure "
                  f"as a uniform choice among e^L tokens (its perplexity).", ""]
    balance = all(v.load_entropy_mean is not None for v in variants.values()) and variants
    lines += ["| rank | variant | val loss (mean ± std) | Δ vs " + ref + " | 95% interval of Δ | real (Holm)? | "
              + (f"max/mean expert load | Δ load vs {ref} (95% interval) | load entropy / ln E | " if balance else "")
              + "perplexity | accuracy | tokens/s | wall (s) |",
              "|---:|---|---|---:|---|---|" + ("---:|---|---:|" if balance else "") + "---:|---:|---:|---:|"]
    for rank, name in enumerate(report.ranking, 1):
        v = variants[name]
        real = {True: "**yes**", False: "no", None: "n/a" if name == ref else "can't tell (1 seed)"}[
            v.real_by_holm]
        delta = "—" if name == ref or v.delta_vs_reference is None else f"{v.delta_vs_reference:+.4f}"
        low, high = v.interval or (None, None)
        interval = "—" if low is None else f"[{low:+.4f}, {high:+.4f}]"
        nan = " (non-finite seen)" if v.any_nan else ""
        load = (f"{v.load_max_over_mean_mean:.3f} ± {v.load_max_over_mean_std:.3f} | {load_delta(v)} | "
                f"{v.load_entropy_mean:.4f} ± {v.load_entropy_std:.4f} | ") if balance else ""
        lines.append(f"| {rank} | {name}{nan} | {v.val_loss_mean:.4f} ± {v.val_loss_std:.4f} | {delta} | "
                     f"{interval} | {real} | {load}{v.perplexity_mean:.2f} | {v.accuracy_mean:.3f} | "
                     f"{v.tokens_per_s_mean:,.0f} | {v.wall_seconds_mean:.0f} |")
    lines += other_runs_note(report.other_runs, "results.json", "seeds or variants the command left out with --seeds "
                             "or --variants", "--seeds and --variants")
    lines += ["", f"Rule: {report.spread_rule}."] + throughput_lines(runs)
    failed = [r for r in runs if not r.finished]
    if failed:
        lines += ["", "## Failed runs", ""]
        lines += [f"- `{r.run}` seed {r.seed}: {r.error.splitlines()[-1][:300]} "
                  f"(log: `{r.output_dir}/train.log`)" for r in failed]
    return "\n".join(lines) + "\n"


def load_delta(v: VariantSummary) -> str:
    """'+0.149 [-0.203, +0.501]': a variant's max/mean load minus the reference's, with its Welch interval."""
    if v.load_max_over_mean_delta is None:
        return "—"
    low, high = v.load_max_over_mean_interval or (None, None)
    span = "(interval unknown: 1 seed)" if low is None else f"[{low:+.3f}, {high:+.3f}]"
    return f"{v.load_max_over_mean_delta:+.3f} {span}"


def plot(report: GridReport, path: Path) -> None:
    """Left: final validation loss per variant (mean ± std, seeds as dots). Right: mean training curves."""
    plt = pyplot()
    names = report.ranking
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, max(4.5, 0.42 * len(names) + 1.5)))
    colors = plt.cm.tab20.colors
    for i, name in enumerate(names):
        v = report.variants[name]
        seeds = [r.final_val_loss for r in report.runs if r.run == name and r.finished]
        left.errorbar(v.val_loss_mean, i, xerr=v.val_loss_std, fmt="o", color=colors[i % 20], capsize=4)
        left.scatter(seeds, [i] * len(seeds), color=colors[i % 20], alpha=0.4, s=14)
    left.set_yticks(range(len(names)), names)
    left.invert_yaxis()
    left.set_xlabel("final validation loss (nats/token), mean ± std over seeds; dots: single seeds")
    chance = "" if report.ln_vocab is None else f" (ln vocab = {report.ln_vocab:.2f} is chance)"
    left.set_title(f"Variants ranked{chance}")
    left.grid(axis="x", alpha=0.3)
    for i, name in enumerate(names):
        curves = [r.train_loss_curve for r in report.runs if r.run == name and r.finished and r.train_loss_curve]
        steps, mean, _ = mean_curve(curves)
        right.plot(steps, mean, color=colors[i % 20], label=name, linewidth=1.3)
    right.set_xlabel("optimizer step")
    right.set_ylabel("training LM loss (nats/token, no aux terms), mean over seeds")
    right.set_title("Training curves")
    right.grid(alpha=0.3)
    if right.lines:
        right.legend(fontsize=7, ncol=2 if len(names) > 8 else 1)
    save_figure(fig, path)
