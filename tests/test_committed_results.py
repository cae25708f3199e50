"""The README's and the docs' result tables say what the committed reports (experiments/results/) hold: a
rerun that changes a report, or an edit to a table, cannot leave the two disagreeing unnoticed."""

import json
import re
from statistics import mean, stdev

import pytest

from conftest import REPO

RESULTS = REPO / "experiments" / "results"
GRIDS = ("exp8_ablations_offline", "exp8_reasoning_ablations_offline")
COMPARISONS = ("exp8_compare_offline", "exp8_long_offline")
# | variant (what it changes) | mean ± std | Δ | [low, high] | real (Holm)? |
GRID_ROW = re.compile(r"^\| (\S+)(?: \([^|]*\))? \| (\d+\.\d{4}) ± (\d+\.\d{4}) \| (\S+) \| (\[[^]]*\]|—) \| (\S+) \|$")
# | `report` | puzzles | steps | run | parameters | exact % | cell % |
PUZZLE_ROW = re.compile(r"^\| `([^`]+)` \| [^|]+ \| (\d+) \| (\S+) \| ([\d,]+) \| (\d+\.\d) ± (\d+\.\d) \| "
                        r"(\d+\.\d) ± (\d+\.\d) \|$")


TRM_STUDIES = sorted(path.name for path in RESULTS.glob("trm_*") if (path / "comparison.json").is_file())
BALANCING = ("moe_balancing_offline", "moe_balancing_fine_offline")


def block(page: str, name: str) -> str | None:
    """The text between a page's <!-- NAME: ... --> and <!-- /NAME --> markers."""
    found = re.search(rf"<!-- {name}[^>]*-->\n(.*?)<!-- /{name} -->", text(page), re.S)
    return found and found.group(1)


def text(name: str) -> str:
    return (REPO / name).read_text()


def report(name: str) -> dict:
    path = RESULTS / name
    return json.loads(((path / "results.json") if (path / "results.json").is_file()
                       else (path / "comparison.json")).read_text())


def spread(values: list[float]) -> float:
    """The standard deviation over seeds a report prints (0 for one seed)."""
    return stdev(values) if len(values) > 1 else 0.0


def interval(low: float, high: float) -> str:
    return f"[{low:+.4f}, {high:+.4f}]"


@pytest.mark.parametrize("name", GRIDS)
def test_every_grid_row_of_the_exp8_page_matches_its_committed_report(name):
    found = report(name)
    rows = {m[1]: m.groups()[1:] for m in map(GRID_ROW.match, text("docs/exp8.md").splitlines()) if m}
    rows = {variant: row for variant, row in rows.items() if variant in found["variants"]}
    assert rows, f"docs/exp8.md shows no row of {name}"
    if name == "exp8_reasoning_ablations_offline":  # shown whole; the baseline grid's table shows its best
        assert set(rows) == set(found["variants"]), set(found["variants"]) - set(rows)
    for variant, (mean_, std, delta, span, real) in rows.items():
        v = found["variants"][variant]
        assert (mean_, std) == (f"{v['val_loss_mean']:.4f}", f"{v['val_loss_std']:.4f}"), variant
        if variant == found["reference"]:
            assert delta == span == real == "—", variant
            continue
        assert delta == f"{v['delta_vs_reference']:+.4f}" and span == interval(*v["interval"]), variant
        assert real.strip("*") == ("yes" if v["real_by_holm"] else "no"), variant


@pytest.mark.parametrize("name", COMPARISONS)
def test_every_arm_of_a_committed_comparison_is_quoted_as_the_report_has_it(name):
    found = report(name)
    quoted = text("docs/exp8.md") + text("README.md")
    for kind in ("equal_steps", "equal_flops"):
        for verdict in found[kind].values():
            for run, side in verdict["sides"].items():
                assert f"{side['mean']:.4f} ± {side['std']:.4f}" in quoted, f"{name}: {run}"
            assert f"{verdict['difference']:+.4f} {interval(*verdict['interval'])}" in quoted, f"{name}: {kind}"


def test_the_long_runs_trend_table_is_the_reports_trend():
    trend = report("exp8_long_offline")["equal_flops_trend"]["recursive"]
    lines = text("docs/exp8.md").splitlines()
    for row in trend:
        cells = (f"| {row['share']:.0%} | {row['reference_step']:.0f} | {row['arm_step']} | "
                 f"{row['reference_value'][0]:.4f}")
        gap = f"{row['gap'][0]:+.4f} ± {row['gap'][1]:.4f} |"
        line = next((line for line in lines if line.startswith(cells)), None)
        assert line is not None and line.endswith(gap), f"no docs/exp8.md row {cells} ... {gap}"
        assert f"| {row['arm_value'][0]:.4f}" in line, line


def test_the_first_puzzle_studys_table_is_its_reports():
    rows = [m.groups() for m in map(PUZZLE_ROW.match, text("docs/tasks.md").splitlines()) if m]
    assert len(rows) >= 16
    for name, steps, label, parameters, exact, exact_std, cells, cells_std in rows:
        done = [r for r in report(name)["runs"] if r["run"] == label and r["status"] == "finished"]
        assert done, (name, label)
        figures = [100 * r["exact_accuracy"] for r in done], [100 * r["cell_accuracy"] for r in done]
        assert (exact, exact_std) == (f"{mean(figures[0]):.1f}", f"{spread(figures[0]):.1f}"), (name, label)
        assert (cells, cells_std) == (f"{mean(figures[1]):.1f}", f"{spread(figures[1]):.1f}"), (name, label)
        assert int(steps) == done[0]["steps"] and parameters == f"{done[0]['parameters']:,}", (name, label)


def points(x: float) -> str:
    return f"{100 * x:.1f}"


def spread_cell(values: list[float]) -> str:
    """± the standard deviation over seeds in points; one seed has none."""
    return f"± {points(spread(values))}" if len(values) > 1 else "(1 seed)"


def difference_cell(verdict: dict) -> str:
    """recursive − run in points of exact accuracy, with its 95% interval."""
    low, high = verdict["interval"]
    span = "interval unknown: 1 seed" if low is None else f"[{100 * low:+.1f}, {100 * high:+.1f}]"
    return f"{100 * verdict['difference']:+.1f} {span}"


def puzzle_rows(name: str) -> list[str]:
    """A committed puzzle comparison, one row per run kind: depth, how each seed stopped, exact accuracy, and
    the reference (recursive) arm minus it at the same budget."""
    p = report(name)
    done = [r for r in p["runs"] if r["status"] == "finished"]
    rows = []
    for label in dict.fromkeys(r["run"] for r in done):
        runs = sorted((r for r in done if r["run"] == label), key=lambda r: r["seed"])
        arm, kind, depth = runs[0]["arm"], runs[0]["kind"], p["accounting"]["depth"][runs[0]["arm"]]
        exact = [r["exact_accuracy"] for r in runs]
        stops = ", ".join(f"{'plateau' if r['stopped_by'] == 'plateau' else 'cap'} {r['stopped_at']}" for r in runs)
        verdict = p[kind].get(arm, {})
        versus = ("—" if arm == p["reference"] else difference_cell(verdict) if "difference" in verdict else
                  f"— (no finished {p['reference']} run yet)")
        rows.append(f"| `{name}` | {label} | {depth['effective_depth']} × {depth['supervision_steps']} | {len(runs)}: "
                    f"{stops} | {points(mean(exact))} {spread_cell(exact)} | {versus} |")
    return rows


def halting_rows(name: str) -> list[str]:
    """Each recursive run's halting (every run kind with Q-head figures: the reference arm, and a per-step
    arm beside it): every step, the Q-head at each threshold (share of the steps), on every held-out puzzle;
    and the trained, 2x and 4x supervision steps on the first N (the depth curve's puzzles)."""
    p = report(name)
    done = [r for r in p["runs"] if r["status"] == "finished" and r.get("q_head_thresholds")]
    rows = []
    for label in dict.fromkeys(r["run"] for r in done):
        runs = [r for r in done if r["run"] == label]
        trained = runs[0]["q_head"]["halt_max_steps"]
        cells = [points(mean(r["q_head"]["all_steps_exact_accuracy"] for r in runs))]
        for threshold in runs[0]["q_head_thresholds"]:
            at = [r["q_head_thresholds"][threshold] for r in runs]
            cells.append(f"{points(mean(x['exact_accuracy'] for x in at))} "
                         f"({mean(x['share_of_steps'] for x in at):.0%})")
        depths = [points(mean(r["exact_accuracy_by_steps"][str(k * trained)] for r in runs)) for k in (1, 2, 4)]
        rows.append(f"| `{name}` | {label} | {len(runs)} | {trained} | " + " | ".join(cells)
                    + f" | {' / '.join(depths)} ({runs[0]['curve_puzzles']}) |")
    return rows


def puzzle_block() -> str:
    """The README's and docs/tasks.md's puzzle tables, made from the committed reports."""
    lines = ["| study | run | layers per step × supervision steps | seeds: stopped at step | exact % (mean ± std) "
             "| recursive − run, points (95% interval) |", "|---|---|---|---|---|---|"]
    lines += [row for name in TRM_STUDIES for row in puzzle_rows(name)]
    halting = [row for name in TRM_STUDIES for row in halting_rows(name)]
    if halting:
        lines += ["", "Halting and test-time depth, recursive runs, exact % (share of the supervision steps used):", "",
                  "| study | run | seeds | trained steps | every step | Q-head ≥ 0.5 | Q-head ≥ 0.9 | Q-head ≥ 0.99 | "
                  "trained, 2×, 4× steps (on the first N held-out) |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
        lines += halting
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("page", ("README.md", "docs/tasks.md"))
def test_the_puzzle_tables_are_made_from_the_committed_reports(page):
    assert TRM_STUDIES, "no committed trm_* puzzle study"
    found = block(page, "puzzle-table")
    assert found is not None, f"{page} has no <!-- puzzle-table --> block"
    assert found == puzzle_block(), f"{page}'s puzzle tables differ from the reports; they are:\n" \
                                    f"{puzzle_block()}(python tests/test_committed_results.py prints them)"


def moe_block() -> str:
    """The README's MoE tables: each balancing variant's loss and expert load against the aux loss's, and the
    upcycling comparison, made from the committed reports."""
    lines = ["| grid (`experiments/results/`) | balancing | val loss (mean ± std) | Δ vs aux_loss (95% interval) "
             "| max/mean expert load | Δ load (95% interval) |", "|---|---|---|---|---:|---|"]
    for name in BALANCING:
        found = report(name)
        for variant in found["variants"]:
            v = found["variants"][variant]
            delta = "—" if variant == found["reference"] else \
                f"{v['delta_vs_reference']:+.4f} {interval(*v['interval'])}"
            load = "—" if "load_max_over_mean_delta" not in v else \
                f"{v['load_max_over_mean_delta']:+.3f} [{v['load_max_over_mean_interval'][0]:+.3f}, " \
                f"{v['load_max_over_mean_interval'][1]:+.3f}]"
            lines.append(f"| `{name}` | {variant} | {v['val_loss_mean']:.4f} ± {v['val_loss_std']:.4f} | {delta} | "
                         f"{v['load_max_over_mean_mean']:.3f} ± {v['load_max_over_mean_std']:.3f} | {load} |")
    up = report("moe_upcycle_offline")["equal_steps"]["scratch"]
    upcycled, scratch = up["sides"]["upcycled"], up["sides"]["scratch"]
    lines += ["", "| comparison (`experiments/results/moe_upcycle_offline`) | upcycled | scratch | "
              "upcycled − scratch (95% interval) |", "|---|---|---|---|",
              f"| 100 steps each, 3 seeds | {upcycled['mean']:.4f} ± {upcycled['std']:.4f} | "
              f"{scratch['mean']:.4f} ± {scratch['std']:.4f} | "
              f"{up['difference']:+.4f} {interval(*up['interval'])} |"]
    return "\n".join(lines) + "\n"


def test_the_moe_tables_are_made_from_the_committed_reports():
    found = block("README.md", "moe-table")
    assert found is not None, "README.md has no <!-- moe-table --> block"
    assert found == moe_block(), f"README.md's MoE tables differ from the reports; they are:\n{moe_block()}"


if __name__ == "__main__":
    print(puzzle_block() + "\n" + moe_block(), end="")
