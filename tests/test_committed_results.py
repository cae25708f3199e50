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


def text(name: str) -> str:
    return (REPO / name).read_text()


def report(name: str) -> dict:
    path = RESULTS / name
    return json.loads(((path / "results.json") if (path / "results.json").is_file()
                       else (path / "comparison.json")).read_text())


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
            for label, side in verdict.items():
                if isinstance(side, dict):
                    assert f"{side['mean']:.4f} ± {side['std']:.4f}" in quoted, f"{name}: {label}"
            assert f"{verdict['difference']:+.4f} {interval(*verdict['interval'])}" in quoted, f"{name}: {kind}"


def test_the_long_runs_trend_table_is_the_reports_trend():
    trend = report("exp8_long_offline")["equal_flops_trend"]["recursive"]
    lines = text("docs/exp8.md").splitlines()
    for row in trend:
        cells = (f"| {row['share']:.0%} | {row['reference_step']:.0f} | {row['arm_step']} | "
                 f"{row['reference_loss'][0]:.4f}")
        gap = f"{row['gap'][0]:+.4f} ± {row['gap'][1]:.4f} |"
        line = next((line for line in lines if line.startswith(cells)), None)
        assert line is not None and line.endswith(gap), f"no docs/exp8.md row {cells} ... {gap}"
        assert f"| {row['arm_loss'][0]:.4f}" in line, line


def test_the_first_puzzle_studys_table_is_its_reports():
    rows = [m.groups() for m in map(PUZZLE_ROW.match, text("docs/tasks.md").splitlines()) if m]
    assert len(rows) >= 16
    for name, steps, label, parameters, exact, exact_std, cells, cells_std in rows:
        done = [r for r in report(name)["runs"] if r["label"] == label and r["status"] == "finished"]
        assert done, (name, label)
        spread = (lambda v: stdev(v) if len(v) > 1 else 0.0)
        figures = [100 * r["exact_accuracy"] for r in done], [100 * r["cell_accuracy"] for r in done]
        assert (exact, exact_std) == (f"{mean(figures[0]):.1f}", f"{spread(figures[0]):.1f}"), (name, label)
        assert (cells, cells_std) == (f"{mean(figures[1]):.1f}", f"{spread(figures[1]):.1f}"), (name, label)
        assert int(steps) == done[0]["steps"] and parameters == f"{done[0]['parameters']:,}", (name, label)
