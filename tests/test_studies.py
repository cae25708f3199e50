"""What a study needs to decide: the plateau rule (and a run that stops by it, resumably), the statistics
behind every verdict, mixed-difficulty puzzles, and a comparison that gives the cheap arms the costly
arm's FLOPs."""

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats as scipy_stats

from moe_reason.runners.compare import CompareArguments, load_comparison, plan_runs
from moe_reason.runners.records import Depth
from moe_reason.data.prepare import DataArguments
from moe_reason.training.plateau import plateaued
from moe_reason.runners.statistics import holm, mean_std_text, welch
from moe_reason.tasks.puzzles import SudokuTask, TaskArguments, generate_splits

from conftest import REPO, main_cases, train_args, write_corpus


# ----------------------------------------------------------------------------
# The plateau rule


def history(*exact, accuracy=None):
    """[step, exact, accuracy] rows, evaluations every 100 steps; token accuracy follows exact unless given."""
    accuracy = accuracy or exact
    return [[100 * (i + 1), e, a] for i, (e, a) in enumerate(zip(exact, accuracy))]


def test_a_run_plateaus_when_the_last_quarter_brings_no_point():
    flat = history(0.1, 0.3, 0.5, 0.6, 0.65, 0.7, 0.705, 0.70)  # last 2 of 8: best 0.705 vs 0.7 before
    assert plateaued(flat, min_evals=8, delta=0.01)
    rising = history(0.1, 0.3, 0.5, 0.6, 0.65, 0.7, 0.72, 0.70)  # 0.72: two points above the best before
    assert not plateaued(rising, min_evals=8, delta=0.01)
    assert not plateaued(flat[:7], min_evals=8, delta=0.01)  # too few evaluations yet
    # the window grows with the run: 12 evaluations look at the last 3
    assert not plateaued(history(*[0.5] * 9, 0.52, 0.5, 0.5), min_evals=8, delta=0.01)
    assert plateaued(history(*[0.5] * 8, 0.52, 0.5, 0.5, 0.5), min_evals=8, delta=0.01)


def test_a_minimum_window_keeps_a_slow_learner_from_being_judged_on_its_last_few_evaluations():
    # a slow learner: token accuracy rises 1.5 points per 400 steps; 12 evaluations alone look at the last 3
    slow = history(*[0.0] * 12, accuracy=[0.80 + 0.015 * (i // 4) for i in range(12)])
    assert plateaued(slow, min_evals=8, delta=0.01)
    assert not plateaued(slow, min_evals=8, delta=0.01, min_window=5)
    # the minimum must leave evaluations before the window: none to compare with is no plateau yet
    assert not plateaued(history(*[0.5] * 10), min_evals=8, delta=0.01, min_window=10)
    assert plateaued(history(*[0.5] * 11), min_evals=8, delta=0.01, min_window=10)
    # the quarter takes over once it is the longer: 48 evaluations look at the last 12
    late_rise = history(*[0.5] * 37, 0.52, *[0.5] * 10)
    assert not plateaued(late_rise, min_evals=8, delta=0.01, min_window=10)


def test_exact_accuracy_flat_at_zero_is_no_plateau_while_the_cells_are_still_learned():
    learning = history(*[0.0] * 8, accuracy=[0.3, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75])
    assert not plateaued(learning, min_evals=8, delta=0.01)
    assert plateaued(history(*[0.0] * 8, accuracy=[0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.75, 0.752]), 8, 0.01)


@pytest.mark.slow
def test_a_run_stops_on_its_plateau_and_a_resumed_run_stops_at_the_same_step(tmp_path):
    corpus = write_corpus(tmp_path, n=80)
    rule = dict(max_steps=200, eval_interval=2, save_interval=4, stop_on_plateau="true", plateau_min_evals=4,
                plateau_delta=0.5, lr_scheduler="constant")  # half the tokens more: a bar no short run clears
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    assert main_cases([train_args(tmp_path, corpus, output_dir=straight, **rule),
                       train_args(tmp_path, corpus, output_dir=halves, **{**rule, "max_steps": 4})]) == [None, None]
    results = json.loads((straight / "train_results.json").read_text())
    assert results["stopped_by"] == "plateau" and results["step"] == 8  # 4 evaluations at steps 2, 4, 6, 8
    capped = json.loads((halves / "train_results.json").read_text())
    assert capped["stopped_by"] == "max_steps" and capped["step"] == 4
    assert main_cases([train_args(tmp_path, corpus, output_dir=halves, resume_from_checkpoint="latest",
                                  **rule)]) == [None]
    resumed = json.loads((halves / "train_results.json").read_text())
    assert (resumed["stopped_by"], resumed["step"]) == ("plateau", 8)  # the history came back with the checkpoint
    assert resumed["final_eval"]["loss"] == results["final_eval"]["loss"]


# ----------------------------------------------------------------------------
# Statistics


def test_welch_interval_and_p_value_match_scipy():
    a, b = [0.98, 1.0, 0.99], [0.62, 0.70, 0.55, 0.66]
    d = welch(a, b)
    reference = scipy_stats.ttest_ind(a, b, equal_var=False)
    assert d.p_value == pytest.approx(reference.pvalue, rel=1e-9)
    low, high = reference.confidence_interval(0.95)
    assert (d.low, d.high) == (pytest.approx(low, rel=1e-9), pytest.approx(high, rel=1e-9))
    assert d.excludes_zero and d.diff == pytest.approx(np.mean(a) - np.mean(b))
    assert not welch([0.5, 0.6, 0.4], [0.45, 0.55, 0.5]).excludes_zero
    assert welch([0.5], [0.4, 0.3]).excludes_zero is None  # one seed: no interval
    assert (mean_std_text([0.5]), mean_std_text([0.5, 0.7])) == ("0.5000 (1 seed)", "0.6000 ± 0.1414")  # and no spread
    exact = welch([0.0, 0.0, 0.0], [0.0, 0.0, 0.0])  # no spread at all on either side
    assert (exact.low, exact.high, exact.excludes_zero) == (0.0, 0.0, False)


def test_holm_steps_down_and_counts_unknown_comparisons():
    # 3 comparisons: 0.01 <= 0.05/3 rejects, 0.03 > 0.05/2 stops there, so 0.04 is not rejected either
    assert holm({"a": 0.01, "b": 0.03, "c": 0.04}) == {"a": True, "b": False, "c": False}
    assert holm({"a": 0.01, "b": 0.02, "c": 0.04}) == {"a": True, "b": True, "c": True}
    # an unknown p-value (one seed) still counts as a comparison: 0.02 > 0.05/3
    assert holm({"a": 0.02, "b": None}) == {"a": True, "b": None}
    assert holm({"a": 0.02, "b": None, "c": None}) == {"a": False, "b": None, "c": None}


# ----------------------------------------------------------------------------
# Mixed difficulty and equal FLOPs for the cheap arms


def test_mixed_blank_counts_give_a_held_out_set_a_single_count_cannot():
    with pytest.raises(ValueError, match="sudoku_blanks_max=8 is invalid"):
        TaskArguments(task="sudoku", task_size=4, sudoku_blanks=9, sudoku_blanks_max=8)
    splits = generate_splits(SudokuTask(4, 9, 11), 100, 400, seed=0)
    blanks = (splits["test"][0] == 0).sum((1, 2))
    assert set(blanks.tolist()) == {9, 10, 11} and len(splits["train"][0]) == 100
    args = DataArguments(task="sudoku", task_size=4, sudoku_blanks=9)
    assert "sudoku_blanks_max" not in args.task_settings()  # a single count keeps the settings it always had


def test_equal_flops_reference_gives_each_cheaper_arm_the_reference_arms_flops(tmp_path):
    spec = tmp_path / "c.yaml"
    spec.write_text(json.dumps({
        "seeds": [0, 1, 2], "metric": "exact_accuracy", "reference": "recursive", "equal_flops": "reference",
        "base": {"task": "sudoku", "task_size": 4, "sudoku_blanks": 6, "task_train_puzzles": 20,
                 "task_test_puzzles": 10, "data_cache_dir": str(tmp_path / "cache"), "model_preset": "debug",
                 "max_steps": 100},
        "arms": {"recursive": {"model_type": "recursive", "h_cycles": 2, "l_cycles": 3, "halt_max_steps": 8},
                 "direct": {"model_type": "base"}, "deep": {"model_type": "base", "num_hidden_layers": 16}}}))
    plan, accounting = plan_runs(load_comparison(spec))
    flops = accounting.flops_per_token
    assert accounting.budget_arm == "recursive" and accounting.cheapest_arm == "direct"
    for arm in ("direct", "deep"):
        steps = accounting.equal_flops_steps[arm]
        assert steps * flops[arm] <= 100 * flops["recursive"] < (steps + 1) * flops[arm]
    assert [(r.kind, r.arm) for r in plan] == [("equal_steps", "recursive"), ("equal_steps", "direct"),
                                                     ("equal_steps", "deep"), ("equal_flops", "direct"),
                                                     ("equal_flops", "deep")]
    assert accounting.depth["recursive"] == Depth(effective_depth=16, passes=8, gradient_passes=4,
                                                  supervision_steps=8, steps_per_update=8)
    with pytest.raises(ValueError, match="equal_flops='cheapest' is invalid"):
        spec.write_text(spec.read_text().replace('"reference", "base"', '"cheapest", "base"'))
        load_comparison(spec)


def test_an_arm_updating_per_supervision_step_costs_one_steps_flops_and_its_report_says_so(tmp_path):
    from moe_reason.runners.comparison_report import depth_table

    spec = tmp_path / "c.yaml"
    recursion = {"model_type": "recursive", "h_cycles": 2, "l_cycles": 3, "halt_max_steps": 8}
    spec.write_text(json.dumps({
        "seeds": [0, 1, 2], "metric": "exact_accuracy", "reference": "recursive", "equal_flops": "reference",
        "base": {"task": "sudoku", "task_size": 4, "sudoku_blanks": 6, "task_train_puzzles": 20,
                 "task_test_puzzles": 10, "data_cache_dir": str(tmp_path / "cache"), "model_preset": "debug",
                 "max_steps": 100},
        "arms": {"recursive": recursion, "per_step": {**recursion, "supervision_updates": "per_step"}}}))
    plan, accounting = plan_runs(load_comparison(spec))
    assert accounting.flops_per_token["recursive"] == accounting.flops_per_token["per_step"] * 8
    assert accounting.equal_flops_steps["per_step"] == 800
    assert accounting.depth["per_step"].steps_per_update == 1
    table = depth_table(SimpleNamespace(accounting=accounting))  # the table reads the report's accounting only
    assert table[1].endswith("| supervision steps per update |")
    assert table[3:] == ["| recursive | 16 | 8 | 4 | 8 | 8 |", "| per_step | 16 | 8 | 4 | 8 | 1 |"]


def test_a_per_step_reference_at_8x_the_cap_gives_the_other_arms_a_per_batch_references_budget(tmp_path):
    """An arm may set its own step cap and evaluation interval: a recursion updating per supervision step spends
    in 8x the steps what the per-batch one spends, so the other arms' equal-FLOPs budgets do not change."""
    from moe_reason.runners.comparison_report import own_settings
    from moe_reason.runners.records import Accounting

    spec = tmp_path / "c.yaml"
    recursion = {"model_type": "recursive", "h_cycles": 2, "l_cycles": 3, "halt_max_steps": 8}
    study = {"seeds": [0, 1, 2], "metric": "exact_accuracy", "reference": "recursive", "equal_flops": "reference",
             "base": {"task": "sudoku", "task_size": 4, "sudoku_blanks": 6, "task_train_puzzles": 20,
                      "task_test_puzzles": 10, "data_cache_dir": str(tmp_path / "cache"), "model_preset": "debug",
                      "max_steps": 100, "eval_interval": 10},
             "arms": {"recursive": recursion, "direct": {"model_type": "base"},
                      "deep": {"model_type": "base", "num_hidden_layers": 16}}}
    spec.write_text(json.dumps(study))
    per_batch_plan, per_batch = plan_runs(load_comparison(spec))
    study["arms"]["recursive"] = {**recursion, "supervision_updates": "per_step", "max_steps": 800,
                                  "eval_interval": 80}
    spec.write_text(json.dumps(study))
    plan, accounting = plan_runs(load_comparison(spec))
    assert accounting.equal_flops_steps == per_batch.equal_flops_steps  # the same budgets, to the step
    assert [(r.kind, r.arm, r.steps) for r in plan] == [
        ("equal_steps", "recursive", 800), ("equal_steps", "direct", 100), ("equal_steps", "deep", 100),
        *[(r.kind, r.arm, r.steps) for r in per_batch_plan if r.kind == "equal_flops"]]
    assert accounting.arm_steps == {"recursive": 800, "direct": 100, "deep": 100} and per_batch.arm_steps is None
    assert Accounting.from_json(json.loads(json.dumps(dataclasses.asdict(accounting)))) == accounting
    report = SimpleNamespace(accounting=accounting, arms=load_comparison(spec).arms)
    note = own_settings(report)[1]
    assert note.startswith("Training settings of their own: `recursive` max_steps 800, eval_interval 80 (the other")
    assert f"`recursive` {800 * accounting.flops_per_token['recursive']:.4g}" in note
    assert own_settings(SimpleNamespace(accounting=per_batch, arms=study["arms"] | {"recursive": recursion})) == []
    # the command line beats the file, an arm's own cap too: --set max_steps=10 gives every arm 10 steps
    cmp = load_comparison(spec, CompareArguments(set=["max_steps=10"]))
    assert {r.arm: r.steps for r in plan_runs(cmp)[0] if r.kind == "equal_steps"} == {
        "recursive": 10, "direct": 10, "deep": 10}
    study["arms"]["recursive"]["warmup_steps"] = 5  # a training setting an arm may not set: one line says which
    spec.write_text(json.dumps(study))
    with pytest.raises(ValueError, match="eval_interval, learning_rate, max_steps only"):
        load_comparison(spec)


def test_a_grid_reports_each_variants_expert_load_against_the_references_with_its_interval():
    from moe_reason.runners.ablate import Grid, grid_report
    from moe_reason.runners.grid_report import summary_markdown
    from moe_reason.runners.records import RunRecord

    def run(variant, seed, loss, load):
        return RunRecord(variant, seed, "finished", f"out/{variant}/seed_{seed}", final_val_loss=loss,
                         best_val_loss=loss, perplexity=1.0, accuracy=0.5, tokens_per_s=1.0, wall_seconds=1.0,
                         nan=False, load_max_over_mean=load, load_entropy=0.9, ln_vocab=5.0, steps=10, eval_tokens=100)
    loads = {"aux_loss": [2.5, 2.3, 2.7], "aux_free": [2.0, 2.1, 1.9]}
    runs = [run(v, s, 6.0 + 0.01 * s, x) for v, xs in loads.items() for s, x in enumerate(xs)]
    grid = Grid(path="g.yaml", description="", reference="aux_loss", seeds=[0, 1, 2], base={},
                variants={"aux_loss": {}, "aux_free": {}})
    v = grid_report(grid, runs).variants
    expected = welch(loads["aux_free"], loads["aux_loss"])
    assert v["aux_free"].load_max_over_mean_delta == pytest.approx(-0.5)
    assert v["aux_free"].load_max_over_mean_interval == pytest.approx([expected.low, expected.high])
    assert v["aux_loss"].load_max_over_mean_delta is None
    table = summary_markdown(grid_report(grid, runs))
    assert f"| -0.500 [{expected.low:+.3f}, {expected.high:+.3f}] |" in table


def test_run_records_written_before_one_name_for_a_run_still_read_and_rebuild_the_same_report(tmp_path):
    from moe_reason.runners.records import ComparisonReport, GridReport, RunRecord

    new = json.loads((REPO / "experiments/results/trm_sudoku_4x4/comparison.json").read_text())
    # as the comparison runner wrote it before: `label` and `name` ("RUN/seed_N") for the run's name, and each
    # verdict's sides inline, keyed by their run names
    def inline(verdicts):
        return {arm: {**{k: x for k, x in v.items() if k != "sides"}, **v.get("sides", {})}
                for arm, v in verdicts.items()}

    old = {**new, "runs": [{"name": f"{r['run']}/seed_{r['seed']}", "label": r["run"],
                            **{k: v for k, v in r.items() if k != "run"}} for r in new["runs"]],
           "equal_steps": inline(new["equal_steps"]), "equal_flops": inline(new["equal_flops"])}
    assert "recursive" in old["equal_steps"]["direct_same_params"]
    assert ComparisonReport.from_json(old, "old") == ComparisonReport.from_json(new, "new")
    record = ComparisonReport.from_json(old, "old").runs[0]
    assert (record.run, record.title) == ("recursive", "recursive/seed_0") and "label" not in record.to_json()
    grid = json.loads((REPO / "experiments/results/moe_balancing_offline/results.json").read_text())
    old = {**grid, "runs": [{"variant": r["run"], **{k: v for k, v in r.items() if k != "run"}}
                            for r in grid["runs"]]}  # and a grid `variant`
    assert GridReport.from_json(old, "old") == GridReport.from_json(grid, "new")
    with pytest.raises(ValueError, match=r"x.json holds a run record this version cannot read "
                                         r"\(unknown keys \['arms'\]"):
        RunRecord.from_json({"run": "a", "seed": 0, "status": "finished", "output_dir": "o", "arms": {}}, "x.json")
    with pytest.raises(ValueError, match=r"y.json is not a ComparisonReport written by this runner \(keys missing: "
                                         r"\['accounting'"):
        ComparisonReport.from_json({k: v for k, v in new.items() if k != "accounting"}, "y.json")
    from moe_reason.runners.compare import REPORT
    (tmp_path / "comparison.json").write_text(json.dumps({**new, "runs": [{"run": "a", "status": "finished"}]}))
    with pytest.raises(ValueError, match=r"comparison.json is not a report written by this runner \(TypeError"):
        REPORT.read(tmp_path / "comparison.json")  # a record without its seed: refused in one line, not a traceback


def test_a_report_lists_its_runs_by_arm_kind_and_seed_whatever_order_they_finished_in():
    from moe_reason.runners.compare import refreshed
    from moe_reason.runners.comparison_report import comparison_markdown
    from moe_reason.runners.records import ComparisonReport

    saved = json.loads((REPO / "experiments/results/trm_sudoku_6x6_blanks_24/comparison.json").read_text())
    shuffled = {**saved, "runs": [saved["runs"][i] for i in np.random.default_rng(0).permutation(len(saved["runs"]))]}
    report = refreshed(ComparisonReport.from_json(shuffled, "shuffled"))
    arms = list(saved["arms"])
    names = arms + [f"{arm}_equal_flops" for arm in arms]
    expected = sorted(((r["run"], r["seed"]) for r in saved["runs"]), key=lambda k: (names.index(k[0]), k[1]))
    assert [(r.run, r.seed) for r in report.runs] == expected
    assert expected[0] == ("recursive_per_step", 0) and expected[-1] == ("direct_deep_equal_flops", 2)
    assert comparison_markdown(report) == comparison_markdown(refreshed(ComparisonReport.from_json(saved, "saved")))
