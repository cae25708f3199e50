"""Baseline vs recursive: the same data, data order, training settings and seeds, compared at
equal optimizer steps and, separately, at equal training FLOPs.

    python -m moe_reason.compare configs/exp8_compare_offline.yaml
    python -m moe_reason.compare CONFIG.yaml --output_dir outputs/cmp --seeds 0 1 2 --set max_steps=200

A comparison file:

    output_dir: outputs/compare
    launcher: in_process                     # or accelerate (+ accelerate_config)
    seeds: [0, 1, 2]
    base: {model_preset: small, max_steps: 1000, learning_rate: 1.0e-3}    # shared by both arms
    baseline: {model_type: base}
    recursive: {model_type: recursive, h_cycles: 2, l_cycles: 2, halt_max_steps: 2}

The arms may set model fields only: learning rate, batch, schedule, data and seed are the
base's, so the two can never be compared at different learning rates by accident.
Runs per seed: both arms at `max_steps` (equal steps) and the costlier arm at the steps
that spend the cheaper arm's FLOPs (equal FLOPs, its own full schedule). Writes
`comparison.json`, `comparison.png` and `COMPARISON.md`; a winner is named only when the
gap exceeds the spread across seeds.
"""

import math
from pathlib import Path

from .arguments import build_config, parse_args, to_argv
from .data import prepare_data
from .experiments import (SPREAD_RULE, RunnerArguments, beyond_spread, check_arguments, load_runner_file, mean_curve,
                          mean_std, model_argument_names, pyplot, run_runner, run_training, save_figure,
                          write_json)
from .metrics import training_flops_per_token

ARMS = ("baseline", "recursive")

USAGE = ("python -m moe_reason.compare CONFIG.yaml [--output_dir D] [--seeds 0 1 2] [--launcher in_process|accelerate] "
         "[--set name=value ...]")


def load_comparison(path, args: RunnerArguments | None = None) -> dict:
    args = args or RunnerArguments()
    spec, settings = load_runner_file(path, "comparison", set(ARMS), args, default_seeds=[0, 1],
                                      output_prefix="compare")
    arms = {}
    for arm in ARMS:
        if arm not in spec:
            raise ValueError(f"comparison {path} needs a '{arm}:' mapping of model fields")
        arms[arm] = check_arguments(spec[arm], f"comparison {path}: {arm} (model fields only, so both arms "
                                               "train with the same settings)", model_argument_names())
    arms["baseline"].setdefault("model_type", "base")
    arms["recursive"].setdefault("model_type", "recursive")
    return {**settings, "arms": arms}


def flops_per_token(values: dict) -> tuple[float, int]:
    """Training FLOPs per token of the model these trainer arguments build, and its step budget.

    Prepares (or loads the cached) data once for the exact vocabulary size.
    """
    model_args, data_args, train_args = parse_args(to_argv(values))
    data = prepare_data(data_args, log=lambda _: None)
    config = build_config(model_args, vocab_size=len(data.tokenizer))
    return training_flops_per_token(config, data.summary["block_size"]), train_args.max_steps


def plan_runs(cmp: dict) -> tuple[list[dict], dict]:
    """The runs (kind, arm, steps) per seed and the FLOP accounting behind the equal-FLOPs budget."""
    flops = {}
    for arm in ARMS:
        flops[arm], steps = flops_per_token({**cmp["base"], **cmp["arms"][arm]})
    parse_args(to_argv(cmp["base"]))  # the base alone must parse too
    cheap, costly = sorted(ARMS, key=lambda arm: flops[arm])
    equal_flops_steps = max(1, math.floor(steps * flops[cheap] / flops[costly]))
    plan = [{"kind": "equal_steps", "arm": arm, "steps": steps} for arm in ARMS]
    plan.append({"kind": "equal_flops", "arm": costly, "steps": equal_flops_steps})
    accounting = {"flops_per_token": flops, "steps": steps, "cheaper_arm": cheap, "costlier_arm": costly,
                  "flop_ratio": flops[costly] / flops[cheap], "equal_flops_steps": equal_flops_steps}
    return plan, accounting


def run_comparison(cmp: dict) -> dict:
    out = cmp["output_dir"]
    out.mkdir(parents=True, exist_ok=True)
    plan, accounting = plan_runs(cmp)
    print(f"comparison {cmp['path']}: training FLOPs/token baseline {accounting['flops_per_token']['baseline']:.3e}, "
          f"recursive {accounting['flops_per_token']['recursive']:.3e} (x{accounting['flop_ratio']:.2f}); "
          f"equal steps: {accounting['steps']}, equal FLOPs: {accounting['costlier_arm']} gets "
          f"{accounting['equal_flops_steps']} steps; seeds {cmp['seeds']} -> {out}", flush=True)
    runs = []
    for seed in cmp["seeds"]:  # seeds outermost: a partial comparison already has both arms
        for item in plan:
            label = item["arm"] if item["kind"] == "equal_steps" else f"{item['arm']}_equal_flops"
            values = {**cmp["base"], **cmp["arms"][item["arm"]], "seed": seed, "max_steps": item["steps"]}
            record = run_training(f"{label}/seed_{seed}", values, out / label / f"seed_{seed}",
                                  cmp["launcher"], cmp["accelerate_config"])
            runs.append({**record, **item, "label": label, "seed": seed, "config": values})
            write_json(out / "comparison.json", comparison_payload(cmp, accounting, runs))
    payload = comparison_payload(cmp, accounting, runs)
    write_json(out / "comparison.json", payload)
    plot(payload, out / "comparison.png")
    (out / "COMPARISON.md").write_text(comparison_markdown(payload))
    print(f"equal steps: {payload['equal_steps']['verdict']}\nequal FLOPs: {payload['equal_flops']['verdict']}\n"
          f"wrote {out / 'comparison.json'}, {out / 'comparison.png'}, {out / 'COMPARISON.md'}", flush=True)
    return payload


def verdict(label_a: str, a: list[float], label_b: str, b: list[float]) -> dict:
    """Mean ± std per side and a winner only when the gap exceeds the seed spread."""
    if not a or not b:
        return {"verdict": "incomplete: a side has no finished run", "winner": None}
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    beyond = beyond_spread(a, b)
    winner = (label_a if ma < mb else label_b) if beyond else None
    if beyond is None:
        text = "no winner: fewer than 2 seeds per side, the seed spread is unknown"
    elif winner:
        text = f"{winner} wins: {min(ma, mb):.4f} vs {max(ma, mb):.4f}, gap {abs(ma - mb):.4f} > spread {sa + sb:.4f}"
    else:
        text = f"no winner: gap {abs(ma - mb):.4f} is within the seed spread {sa + sb:.4f}"
    return {label_a: {"mean": ma, "std": sa, "values": a}, label_b: {"mean": mb, "std": sb, "values": b},
            "gap": abs(ma - mb), "beyond_seed_spread": beyond, "winner": winner, "verdict": text}


def comparison_payload(cmp: dict, accounting: dict, runs: list[dict]) -> dict:
    def losses(label):
        return [r["final_val_loss"] for r in runs if r["label"] == label and r["status"] == "finished"]

    cheap, costly = accounting["cheaper_arm"], accounting["costlier_arm"]
    return {"config": cmp["path"], "description": cmp["description"], "seeds": cmp["seeds"], "base": cmp["base"],
            "arms": cmp["arms"], "accounting": accounting,
            "equal_steps": verdict("baseline", losses("baseline"), "recursive", losses("recursive")),
            "equal_flops": verdict(cheap, losses(cheap), f"{costly}_equal_flops", losses(f"{costly}_equal_flops")),
            "ln_vocab": next((r["ln_vocab"] for r in runs if r["status"] == "finished"), None),
            "runs": runs, "spread_rule": SPREAD_RULE}


def comparison_markdown(p: dict) -> str:
    acc, runs = p["accounting"], p["runs"]
    lines = [f"# Baseline vs recursive: {p['config']}", ""]
    if p["description"]:
        lines += [p["description"].strip(), ""]
    lines += ["Both arms share every training setting (learning rate, batch, schedule, data, data order) and "
              f"the seeds {p['seeds']}; they differ only in these model fields: baseline `{p['arms']['baseline']}`, "
              f"recursive `{p['arms']['recursive']}`.", "",
              "| arm | training FLOPs / token | steps (equal steps) | steps (equal FLOPs) |", "|---|---:|---:|---:|"]
    for arm in ARMS:
        eq = acc["equal_flops_steps"] if arm == acc["costlier_arm"] else acc["steps"]
        lines.append(f"| {arm} | {acc['flops_per_token'][arm]:.4g} | {acc['steps']} | {eq} |")
    lines += ["", f"The {acc['costlier_arm']} arm costs {acc['flop_ratio']:.2f}x the FLOPs per token, so at equal "
              f"FLOPs it trains {acc['equal_flops_steps']} steps with its own full learning-rate schedule. "
              "Recursive FLOPs count every supervision step (halting can only make it cheaper) and the "
              "backward of the passes that carry gradient only.", ""]
    if p["ln_vocab"]:
        lines += [f"Losses are validation cross-entropy in nats per token; chance (uniform guessing) is "
                  f"ln(vocab) = {p['ln_vocab']:.3f}.", ""]
    lines += ["| run | seeds | val loss (mean ± std) | accuracy | tokens/s | recursion steps |",
              "|---|---:|---|---:|---:|---:|"]
    for label in dict.fromkeys(r["label"] for r in runs):
        done = [r for r in runs if r["label"] == label and r["status"] == "finished"]
        if not done:
            lines.append(f"| {label} | 0 | failed | | | |")
            continue
        m, s = mean_std([r["final_val_loss"] for r in done])
        steps = [r["recursion_steps"] for r in done if r.get("recursion_steps") is not None]
        lines.append(f"| {label} | {len(done)} | {m:.4f} ± {s:.4f} | "
                     f"{mean_std([r['accuracy'] for r in done])[0]:.3f} | "
                     f"{mean_std([r['tokens_per_s'] for r in done])[0]:,.0f} | "
                     f"{f'{sum(steps) / len(steps):.2f}' if steps else '—'} |")
    lines += ["", f"**Equal steps:** {p['equal_steps']['verdict']}.", "",
              f"**Equal FLOPs:** {p['equal_flops']['verdict']}.", "", f"Rule: {p['spread_rule']}."]
    failed = [r for r in runs if r["status"] == "failed"]
    if failed:
        lines += ["", "## Failed runs", ""] + [f"- `{r['label']}` seed {r['seed']}: {r['error'].splitlines()[-1][:300]}"
                                               for r in failed]
    return "\n".join(lines) + "\n"


def plot(p: dict, path: Path) -> None:
    """Val loss vs steps, val loss vs training FLOPs, final accuracy and tokens/s per run kind."""
    plt = pyplot()
    done = [r for r in p["runs"] if r["status"] == "finished"]
    labels = list(dict.fromkeys(r["label"] for r in done))
    colors = dict(zip(labels, ["tab:blue", "tab:orange", "tab:green", "tab:red"]))
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    (by_step, by_flops), (accuracy, speed) = axes
    for label in labels:
        runs = [r for r in done if r["label"] == label]
        steps, mean, std = mean_curve([r["eval_curve"] for r in runs])
        flops = [s * runs[0]["tokens_per_step"] * runs[0]["flops_per_token"] for s in steps]
        # the equal-FLOPs run has its own shorter schedule: it belongs on the compute axis only
        axes_here = ((by_flops, flops),) if label.endswith("_equal_flops") else ((by_step, steps), (by_flops, flops))
        for ax, x in axes_here:
            ax.plot(x, mean, marker="o", markersize=3, color=colors[label], label=label)
            ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=colors[label], alpha=0.2)
    by_step.set_xlabel("optimizer step")
    by_flops.set_xlabel("training FLOPs")
    by_flops.set_xscale("log")
    for ax, title in ((by_step, "Validation loss at equal steps"), (by_flops, "Validation loss at equal compute")):
        ax.set_ylabel("validation loss (nats/token), mean ± std over seeds")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    for ax, key, ylabel in ((accuracy, "accuracy", "final validation token accuracy"),
                            (speed, "tokens_per_s", "training throughput (tokens/s)")):
        stats = [mean_std([r[key] for r in done if r["label"] == label]) for label in labels]
        ax.bar(labels, [m for m, _ in stats], yerr=[s for _, s in stats], capsize=5,
               color=[colors[label] for label in labels])
        ax.set_ylabel(ylabel + ", mean ± std")
        ax.grid(axis="y", alpha=0.3)
    accuracy.set_title("Accuracy")
    speed.set_title("Throughput")
    fig.suptitle(f"Baseline vs recursive ({len(p['seeds'])} seeds): equal steps — {p['equal_steps']['verdict']}; "
                 f"equal FLOPs — {p['equal_flops']['verdict']}", fontsize=9)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    return run_runner(argv, RunnerArguments, load_comparison, run_comparison, USAGE)


if __name__ == "__main__":
    main()
