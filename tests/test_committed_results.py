"""The README's Exp8 tables say what the committed reports (experiments/results/) hold: a rerun that
changes a report, or an edit to the README, cannot leave the two disagreeing unnoticed."""

import json
import re

import pytest

from conftest import REPO

RESULTS = REPO / "experiments" / "results"
GRIDS = ("exp8_ablations_offline", "exp8_reasoning_ablations_offline")
COMPARISONS = ("exp8_compare_offline", "exp8_long_offline")
# | variant (what it changes) | mean ± std | Δ | beyond the seed spread? |
GRID_ROW = re.compile(r"^\| (\S+)(?: \([^|]*\))? \| (\d+\.\d{4}) ± (\d+\.\d{4}) \| (\S+) \| (\S+) \|$")


def readme() -> str:
    return (REPO / "README.md").read_text()


def grid_rows() -> dict[str, tuple[str, ...]]:
    return {m[1]: m.groups()[1:] for m in map(GRID_ROW.match, readme().splitlines()) if m}


@pytest.mark.parametrize("name", GRIDS)
def test_every_grid_row_of_the_readme_matches_its_committed_report(name):
    report = json.loads((RESULTS / name / "results.json").read_text())
    rows = {variant: row for variant, row in grid_rows().items() if variant in report["variants"]}
    assert rows, f"the README shows no row of {name}"
    if name == "exp8_reasoning_ablations_offline":  # shown whole; the baseline grid's table shows its best
        assert set(rows) == set(report["variants"]), set(report["variants"]) - set(rows)
    for variant, (mean, std, delta, beyond) in rows.items():
        v = report["variants"][variant]
        assert (mean, std) == (f"{v['val_loss_mean']:.4f}", f"{v['val_loss_std']:.4f}"), variant
        if variant == report["reference"]:
            assert delta == beyond == "—", variant
            continue
        assert delta.replace("−", "-") == f"{v['delta_vs_reference']:+.4f}", variant
        assert beyond == ("yes" if v["beyond_seed_spread"] else "no"), variant


@pytest.mark.parametrize("name", COMPARISONS)
def test_every_arm_of_a_committed_comparison_is_quoted_as_the_report_has_it(name):
    report = json.loads((RESULTS / name / "comparison.json").read_text())
    text = readme()
    for kind in ("equal_steps", "equal_flops"):
        for verdict in report[kind].values():
            for label, side in verdict.items():
                if isinstance(side, dict):
                    quoted = f"{side['mean']:.4f} ± {side['std']:.4f}"
                    assert quoted in text, f"{name}: {label}'s {quoted} is not in the README"
            assert f"{verdict['gap']:.4f}" in text, f"{name}: the {kind} gap {verdict['gap']:.4f} is not in the README"


def test_the_long_runs_trend_table_is_the_reports_trend():
    report = json.loads((RESULTS / "exp8_long_offline" / "comparison.json").read_text())
    trend = report["equal_flops_trend"]["recursive"]
    text = readme()
    for row in trend:
        cells = (f"| {row['share']:.0%} | {row['reference_step']:.0f} | {row['arm_step']} | "
                 f"{row['reference_loss'][0]:.4f}")
        gap = f"{row['gap'][0]:+.4f} ± {row['gap'][1]:.4f} |"
        line = next((line for line in text.splitlines() if line.startswith(cells)), None)
        assert line is not None and line.endswith(gap), f"no README row {cells} ... {gap}"
        assert f"| {row['arm_loss'][0]:.4f}" in line, line
