"""Evaluation, the ablation runner, the baseline-vs-recursive comparison and the shipped experiment files."""

import dataclasses
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from moe_reason.runners.ablate import OWN_KEYS as GRID_KEYS
from moe_reason.runners.ablate import AblateArguments, load_grid, main as ablate_main
from moe_reason.runners.grid_report import plot as ablate_plot
from moe_reason.training.arguments import arguments_from, build_config, parse_args
from moe_reason.runners.compare import OWN_KEYS as COMPARISON_KEYS
from moe_reason.runners.compare import (budget_trend, load_comparison, main as compare_main, plan_runs, run_order,
                                        same_first_steps, twin_starts)
from moe_reason.runners.comparison_report import (evenly, learning_curves, stored_answer_note, trend_section,
                                                  trend_verdict)
from moe_reason.models.configuration_recursive import RecursiveMoEReasonConfig
from moe_reason.evaluation.evaluate import main as evaluate_main
from moe_reason.runners import run_folder
from moe_reason.runners.engine import (STUDY_IN_USE, RunBudget, exit_status, hours_left, parse_runner_cli, pyplot,
                                      settings_line)
from moe_reason.runners.run_folder import RunState, latest_evaluation, run_training
from moe_reason.runners.study_file import RUNNER_KEYS, RunnerArguments, load_study_mapping
from moe_reason.runners.records import CURVE_POINTS, GridReport, RunRecord, TrendPoint
from moe_reason.layout import RESULTS, STUDY_LOCK, complete_checkpoints
from moe_reason.locks import hold_folder
from moe_reason.training.metrics import training_flops_per_token

from conftest import REPO, eval_records, launch, tiny_model, train_args

EXPERIMENTS = sorted((REPO / "experiments").glob("*.yaml"))
RUN_FIELDS = ("config", "final_val_loss", "best_val_loss", "perplexity", "accuracy", "train_loss_curve",
              "grad_norm_curve", "tokens_per_s", "wall_seconds", "nan", "status")


def tiny_base(tmp_path, corpus, **overrides) -> dict:
    """Trainer arguments for a seconds-long debug run, as a mapping (what experiment files hold)."""
    argv = train_args(tmp_path, corpus, **{"max_steps": 4, "eval_interval": 2, "save_interval": 4, **overrides})
    return {name[2:]: value for name, value in zip(argv[::2], argv[1::2])}


# ----------------------------------------------------------------------------
# FLOP accounting and the shipped files


def test_training_flops_match_a_hand_computation():
    cfg = RecursiveMoEReasonConfig.from_preset("debug", h_cycles=2, l_cycles=1, halt_max_steps=3,
                                               recursion_gradient="one_step")
    S, H, I, L, V, E, k = 16, 32, 64, 2, 256, 4, 2
    attention = H * (4 + 2 * 2) * 8 + 4 * 8 * H  # q + k + v (4 heads, 2 kv heads, head_dim 8), o
    expert = H * I + I * H  # plain SiLU experts (the preset default, as in exp8): up and down
    decoder = 2 * L * (attention + H * E + k * expert) + 4 * L * S * H
    head = 2 * H * V
    passes, grad_passes, heads = 2 * (1 + 1) * 3, 2 * 3, 3  # h(l+1) per supervision step; one_step: 2 with grad
    assert training_flops_per_token(cfg, S) == decoder * (passes + 2 * grad_passes) + 3 * heads * head
    base = build_config(parse_args(["--model_preset", "debug"])[0])
    assert training_flops_per_token(base, S) == 3 * (decoder + head)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_shipped_experiment_parses_and_every_variant_builds_a_valid_config(path):
    spec = load_study_mapping(path, "experiment", RUNNER_KEYS | COMPARISON_KEYS | GRID_KEYS)
    if "variants" in spec:  # a grid (or a file that extends one)
        grid = load_grid(path)
        runs = [{**grid.base, **over} for over in grid.variants.values()]
    else:
        cmp = load_comparison(path)
        runs = [{**cmp.base, **arm} for arm in cmp.arms.values()]
    for values in runs:
        model_args, _, train_args = arguments_from(values)
        build_config(model_args, vocab_size=49152).check()  # raises on any invalid field
        assert train_args.max_steps >= 1
    if path.stem.startswith("exp8_ablations"):  # the seeds' fifteen, by their numbers, #2 and #12 recursive
        numbered = [n for n in grid.variants if n[:2].isdigit()]
        assert [int(n[:2]) for n in numbered] == list(range(1, 16))
        seeds_02 = {k: v for k, v in grid.variants["02_recursive"].items() if k != "input_norm"}  # offline: pinned
        assert seeds_02 == {"model_type": "recursive", "h_cycles": 2, "l_cycles": 2, "halt_max_steps": 3,
                            "halt_target": "accuracy"}
        assert grid.variants["12_recursive_low_lr"]["learning_rate"] == 1e-4
        assert grid.variants["two_experts"]["num_experts"] == 2 and grid.base["lr_scheduler"] == "seeds_linear"
        small = {**grid.base, **grid.variants["07_small_model"]}
        config = build_config(arguments_from(small)[0])
        assert config.intermediate_size == 4 * config.hidden_size  # the original kept 2048 at width 256
    if path.stem.startswith("exp8_reasoning_ablations"):  # the seeds' 15 around their defaults, + R16 (+ R17 offline)
        assert len(grid.variants) == (17 if path.stem.endswith("_offline") else 16)
        assert grid.base["model_type"] == "recursive"
        overrides = [v for v in grid.variants.values()]
        assert {v.get("halt_max_steps", grid.base["halt_max_steps"]) for v in overrides} == {1, 2, 3, 4}
        assert {"recursion_gradient": "one_step"} in overrides and {"use_act": False} in overrides
        assert {v.get("learning_rate") for v in overrides} >= {1e-4, 6e-4, 2e-3}  # 2e-3: the baseline grid's highest
        assert grid.variants["R02_minimal"] == {"h_cycles": 1, "l_cycles": 1}


# ----------------------------------------------------------------------------
# evaluate


@pytest.mark.slow
def test_evaluate_reproduces_the_trainers_final_validation_loss(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    launch(train_args(tmp_path, corpus, output_dir=out, per_device_eval_batch_size=4, eval_batches=2))
    data_flags = ["--data_files", str(corpus), "--tokenizer_vocab_size", "320", "--block_size", "32",
                  "--validation_documents", "6", "--data_cache_dir", str(tmp_path / "eval_cache"),
                  "--preprocessing_num_workers", "1"]
    # the CLI's main in this process: it builds no Accelerator, so nothing is left behind
    evaluate_main(["--model_path", str(out / "final"), "--max_blocks", "8",
                   "--output_file", str(tmp_path / "eval.json"), *data_flags])
    printed = capsys.readouterr().out
    written = json.loads((tmp_path / "eval.json").read_text())
    assert written == json.loads(printed[printed.index("{"):])
    assert written["loss"] == pytest.approx(eval_records(out)[-1]["eval/loss"], abs=1e-4)
    for key in ("perplexity", "accuracy", "tokens", "ln_vocab"):
        assert key in written
    with pytest.raises(FileNotFoundError, match="no config.json there"):
        evaluate_main(["--model_path", str(tmp_path / "nowhere")])


# ----------------------------------------------------------------------------
# ablate


@pytest.mark.slow
def test_ablation_grid_writes_its_artefacts_skips_finished_runs_and_records_a_failure(tmp_path, corpus, capsys):
    grid = {"seeds": [0, 1], "base": tiny_base(tmp_path, corpus),
            "variants": {"baseline": {}, "no_aux": {"router_aux_loss_coef": 0.0},
                         "broken": {"num_experts_per_tok": 9}}}  # invalid: the debug preset has 4 experts
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid, sort_keys=False))
    out = tmp_path / "ablation"
    payload = ablate_main([str(tmp_path / "grid.yaml"), "--output_dir", str(out)])
    for name in ("results.json", "ablation_comparison.png", "SUMMARY.md"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert results["ranking"] and set(results["ranking"]) == {"baseline", "no_aux"}
    runs = results["runs"]
    assert [(r["run"], r["seed"], r["status"]) for r in runs] == [
        ("baseline", 0, "finished"), ("baseline", 1, "finished"), ("no_aux", 0, "finished"),
        ("no_aux", 1, "finished"), ("broken", 0, "failed"), ("broken", 1, "failed")]
    for run in runs[:4]:
        for field in RUN_FIELDS:
            assert field in run, field
        assert run["train_loss_curve"][-1][0] == 4 and run["nan"] is False
        assert run["steps"] == run["stopped_at"] == 4  # its cap, and where it ended
    assert "num_experts_per_tok=9 is invalid" in runs[4]["error"]
    assert runs[0]["final_val_loss"] != runs[1]["final_val_loss"]  # the seeds differ
    stats = results["variants"]["no_aux"]
    assert stats["val_loss_std"] > 0 and stats["real_by_holm"] in (True, False)
    low, high = stats["interval"]
    assert low < stats["delta_vs_reference"] < high
    summary = (out / "SUMMARY.md").read_text()
    assert "ln(vocab) = 5.768" in summary and "± " in summary and "broken" in summary
    assert "Base trainer arguments (the file's `base` with any `--set`;" in summary and "`max_steps=4`" in summary
    assert "Throughput: tokens/s and wall time are each run's training loop over all its starts" in summary
    assert payload.ranking == results["ranking"]
    assert exit_status(payload) == 1  # the command exits 1: a script or CI notices the failed runs

    capsys.readouterr()
    ablate_main([str(tmp_path / "grid.yaml"), "--output_dir", str(out)])  # restarted: finished runs are skipped
    printed = capsys.readouterr().out
    assert printed.count("[skip]") == 4 and printed.count("[FAILED]") == 2 and printed.count("[eta]") == 6
    # the runs to train: not no_aux's seed 1, finished earlier; a failed variant trains again, unpriced
    eta = [line for line in printed.splitlines() if line.startswith("[eta]")]
    assert eta[2].startswith("[eta] 3/6 runs done") and eta[2].endswith(
        "; the 2 to train: no estimate yet for broken (no run trained so far)")
    assert eta[-1].startswith("[eta] 6/6 runs done") and "to train" not in eta[-1]
    assert json.loads((out / "results.json").read_text())["variants"]["baseline"]["val_loss_mean"] == \
        results["variants"]["baseline"]["val_loss_mean"]

    (out / "SUMMARY.md").unlink()
    (out / "ablation_comparison.png").unlink()
    ablate_main(["--report", str(out)])  # the report again from results.json, without training
    assert (out / "SUMMARY.md").read_text() == summary and (out / "ablation_comparison.png").stat().st_size > 0
    capsys.readouterr()
    ablate_main([str(tmp_path / "grid.yaml"), "--output_dir", str(tmp_path / "budget"), "--max_hours", "1e-6"])
    printed = capsys.readouterr().out  # 3.6 ms: the first run starts, the second does not
    assert printed.count("[start]") == 1 and "[budget] --max_hours 1e-06 spent after 1/6 runs" in printed
    assert len(json.loads((tmp_path / "budget" / "results.json").read_text())["runs"]) == 1
    assert "Not in this report (no finished run yet, or left out by --variants): no_aux, " in \
        (tmp_path / "budget" / "SUMMARY.md").read_text()

    # a finished run whose export no longer matches what its arguments build (a code default changed since)
    # is neither skipped as if it were today's model nor overwritten
    exported = out / "baseline" / "seed_0" / "final" / "config.json"
    config = json.loads(exported.read_text())
    exported.write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))
    capsys.readouterr()
    ablate_main([str(tmp_path / "grid.yaml"), "--output_dir", str(out), "--variants", "baseline"])
    printed = capsys.readouterr().out
    assert printed.count("[skip]") == 1 and "[FAILED] baseline/seed_0" in printed
    assert "rms_norm_eps: 0.001 there, 1e-06 now" in printed and "a default changed since" in printed
    assert json.loads(exported.read_text())["rms_norm_eps"] == 1e-3
    assert (exported.parent / "model.safetensors").is_file()

    # an interrupted run likewise: resuming would load its checkpoint into the model built today
    exported.write_text(json.dumps(config))
    (out / "baseline" / "seed_0" / RESULTS).unlink()  # as if stopped before the end
    checkpoint = complete_checkpoints(out / "baseline" / "seed_0")[-1]
    saved = checkpoint / "config.json"
    saved.write_text(json.dumps({**json.loads(saved.read_text()), "rms_norm_eps": 1e-3}))
    ablate_main([str(tmp_path / "grid.yaml"), "--output_dir", str(out), "--variants", "baseline"])
    printed = capsys.readouterr().out
    assert f"[FAILED] baseline/seed_0: interrupted earlier (at {checkpoint.name}), but its arguments now " \
        "build a different model (rms_norm_eps: 0.001 there, 1e-06 now)" in printed and "[start]" not in printed
    assert json.loads(saved.read_text())["rms_norm_eps"] == 1e-3
    assert not (out / "baseline" / "seed_0" / RESULTS).exists()


def test_a_reports_settings_name_how_the_last_command_ran_apart_from_what_ran():
    """Threads and compilation change how a run computes, not what: a study's runs may differ in them, so the
    report does not list them as every run's arguments."""
    line = settings_line({"max_steps": 4, "cpu_threads": 2, "torch_compile": True})[0]
    assert "override them): `max_steps=4`. The last command ran with `cpu_threads=2`, `torch_compile=True`:" in line
    assert "last command" not in settings_line({"max_steps": 4})[0]


def test_a_run_whose_folder_is_gone_is_kept_from_results_json_while_its_arguments_hold(tmp_path, corpus, capsys):
    # a committed report copied into a fresh clone's output folder: its runs' folders are not there
    grid = {"seeds": [0], "base": tiny_base(tmp_path, corpus), "variants": {"a": {}, "b": {"learning_rate": 1e-3}}}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid, sort_keys=False))
    out, command = tmp_path / "ablation", [str(tmp_path / "grid.yaml"), "--output_dir", str(tmp_path / "ablation")]
    first = ablate_main(command)
    shutil.rmtree(out / "b")
    capsys.readouterr()
    again = ablate_main(command)
    printed = capsys.readouterr().out
    assert "[kept] b/seed_0: its folder is gone; kept from the report (val loss" in printed
    assert printed.count("[skip]") == 1 and "[start]" not in printed and not (out / "b").exists()
    assert again.variants == first.variants

    # other threads, recomputed activations, compiling or trackers change how a run computes, not what, and the
    # folder named relative to here is the same folder: nothing trains again
    finished = (out / "a" / "seed_0" / RESULTS).read_text()
    ablate_main(command[:1] + ["--output_dir", os.path.relpath(out), "--set", "cpu_threads=2",
                               "gradient_checkpointing=true", "torch_compile=true", "report_to=none"])
    printed = capsys.readouterr().out
    assert "[skip] a/seed_0" in printed and "[kept] b/seed_0" in printed and "[start]" not in printed
    assert (out / "a" / "seed_0" / RESULTS).read_text() == finished

    ablate_main(command + ["--variants", "a"])  # a narrowed command keeps b in the grid's record
    assert [r["run"] for r in json.loads((out / "results.json").read_text())["other_runs"]] == ["b"]
    assert "Also in results.json, not counted here (seeds or variants the command left out with --seeds or " \
        "--variants, or runs trained with other arguments): b/seed_0." in (out / "SUMMARY.md").read_text()
    assert ablate_main(command).variants["b"] == first.variants["b"]
    assert "[kept] b/seed_0" in capsys.readouterr().out

    grid["variants"]["b"] = {"learning_rate": 2e-3}  # its arguments changed: trained again, not kept
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid, sort_keys=False))
    capsys.readouterr()
    changed = ablate_main(command)
    printed = capsys.readouterr().out
    assert "[kept]" not in printed and "[start] b/seed_0" in printed and (out / "b" / "seed_0" / RESULTS).is_file()
    assert changed.variants["b"].val_loss_mean != first.variants["b"].val_loss_mean
    grid["variants"]["b"] = {"learning_rate": 3e-3}  # and again, over its folder this time: the command says so
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid, sort_keys=False))
    ablate_main(command)
    assert "[start] b/seed_0 (in place of the run its folder holds, made with other arguments: learning_rate: " \
        "0.002 there, 0.003 now)" in capsys.readouterr().out

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "results.json").write_text("{\"runs\": ")  # cut short: refused before any run
    with pytest.raises(ValueError, match="other/results.json is not a report written by this runner"):
        ablate_main(command[:1] + ["--output_dir", str(tmp_path / "other")])
    assert not (tmp_path / "other" / "a").exists()


def test_a_spent_budget_still_trains_one_run_and_a_report_with_no_finished_run_plots(tmp_path, capsys):
    budget = RunBudget([("a", 100), ("a", 100), ("a", 50)], max_hours=1e-12)  # spent before the first run starts
    assert not budget.exhausted(0, "again")
    failed = RunRecord("a", 0, "failed", str(tmp_path / "a"), error="refused")
    runs = [failed]
    budget.after(runs)  # refused at once: spends the budget, prices nothing
    assert budget.exhausted(1, "again")
    runs.append(RunRecord("a", 1, "finished", str(tmp_path / "b"), wall_seconds=720.0, stopped_at=80, steps=100))
    budget.after(runs)  # stopped at step 80 in 12 min: 9 s per step, so the 50-step run left takes 7.5 min
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("[eta] 1/3 runs done") and printed[0].endswith(
        "; the 2 to train: no estimate yet for a (no run trained so far)")
    assert printed[-1].endswith("; the 1 to train: at most 0.1 h for 1 at their step caps")
    report = GridReport(grid="g.yaml", description="", reference="a", seeds=[0], base={}, ln_vocab=None, ranking=[],
                        variants={}, not_in_report=["a"], runs=[failed], spread_rule="", other_runs=[])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to label: no legend, so no matplotlib warning either
        ablate_plot(report, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


def test_the_eta_prices_only_the_steps_a_run_trains(tmp_path, capsys):
    """A run that goes on from its twin's checkpoint trains from there: its own seconds per step count those
    steps only, and a run still to come that will start from a twin's step is priced from that step."""
    budget = RunBudget([("a", 100), ("a", 100), ("a", 400)], max_hours=None)
    went_on = RunRecord("a_equal_flops", 0, "finished", str(tmp_path / "b"), arm="a", wall_seconds=360.0,
                        stopped_at=100, steps=100, started_from=f"{tmp_path}/a/seed_0/checkpoint-60")
    budget.after([went_on], starts={2: 300})  # 9 s for each of steps 61-100; the last run trains 100 steps
    assert capsys.readouterr().out.strip().endswith(
        "; the 2 to train: at most 0.5 h for 2 at their step caps (1 of them from their twin's last step)")
    # a run still to come that has started (its own checkpoint) trains from there, and prices a model none of
    # whose runs has finished at its own pace so far; one that finished earlier trains nothing
    budget = RunBudget([("a", 100), ("b", 1000), ("c", 100), ("a", 100), ("d", 100)], max_hours=None)
    states = {1: RunState("started", 400, seconds_per_step=18.0), 2: RunState("new"),
              3: RunState("finished", 100, "plateau"), 4: RunState("new")}
    budget.after([went_on], states=states, starts={3: 50})  # the finished run's twin start is spent
    assert capsys.readouterr().out.strip().endswith(
        "; the 3 to train: at most 3.0 h for 1 at their step caps; no estimate yet for c, d (no run trained so far)")
    # and the report's finished runs this command has yet to reach price their model too: 36 s a step
    earlier = RunRecord("d", 1, "finished", str(tmp_path / "d"), wall_seconds=3600.0, stopped_at=100, steps=100)
    budget.after([went_on], [earlier], states=states)
    assert capsys.readouterr().out.strip().endswith(
        "; the 3 to train: at most 4.0 h for 2 at their step caps; no estimate yet for c (no run trained so far)")


def test_the_eta_also_says_how_long_if_runs_stop_where_their_arms_runs_did(tmp_path):
    """The plateau rule stopped a's finished runs at steps 400 and 600 of 1,000, at 3.6 s a step: a run at step
    100 takes 500 more steps if it stops by 600, one already past 600 is priced to its cap, and so is a run under
    another cap (no run of it finished)."""
    done = [RunRecord("a", seed, "finished", str(tmp_path / str(seed)), wall_seconds=stop * 3.6, stopped_at=stop,
                      steps=1000) for seed, stop in [(0, 400), (1, 600)]]
    left = [("a", 1000, 900), ("a", 1000, 300), ("a", 2000, 2000)]  # (model, cap, steps to train)
    assert hours_left(left, done) == ("at most 3.2 h for 3 at their step caps, about 2.8 h if each stops no later "
                                      "than its arm's (variant's) finished runs did")
    at_cap = dataclasses.replace(done[0], seed=2, stopped_at=1000, wall_seconds=3600.0)  # one that hit its cap
    assert hours_left(left[:2], [*done, at_cap]) == "at most 1.2 h for 2 at their step caps"


@pytest.mark.slow
def test_ablation_runs_through_accelerate_launch_too(tmp_path, corpus):
    grid = {"seeds": [3], "launcher": "accelerate", "base": tiny_base(tmp_path, corpus), "variants": {"only": {}}}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid))
    payload = ablate_main([str(tmp_path / "grid.yaml"), "--output_dir", str(tmp_path / "out")])
    assert payload.runs[0].finished and payload.runs[0].config["seed"] == 3
    assert "[done]" not in (tmp_path / "out" / "only" / "seed_3" / "train.log").read_text()  # the run's own log


def test_grid_mistakes_are_refused_before_any_run(tmp_path):
    def grid_error(grid) -> str:
        (tmp_path / "g.yaml").write_text(yaml.safe_dump(grid))
        with pytest.raises(ValueError) as err:
            load_grid(tmp_path / "g.yaml")
        return str(err.value)

    assert "unknown argument(s) ['learning_rat']" in grid_error({"base": {}, "variants": {"a": {"learning_rat": 1}}})
    assert "seeds=[0, 0] is invalid" in grid_error({"seeds": [0, 0], "variants": {"a": {}}})
    assert "non-empty mapping" in grid_error({"base": {}})
    assert "unknown key(s) ['variant']" in grid_error({"variant": {}})
    assert "reference 'basline' is not one of its variants" in grid_error(
        {"reference": "basline", "variants": {"baseline": {}, "a": {}}})


def test_a_reference_left_out_by_the_variants_option_is_refused(tmp_path):
    (tmp_path / "g.yaml").write_text(yaml.safe_dump({"reference": "baseline", "variants": {"baseline": {}, "a": {},
                                                                                           "b": {}}}))
    with pytest.raises(ValueError, match="leaves out the reference 'baseline'"):
        load_grid(tmp_path / "g.yaml", AblateArguments(variants=["b", "a"]))
    grid = load_grid(tmp_path / "g.yaml", AblateArguments(variants=["b", "baseline"]))
    assert grid.reference == "baseline" and list(grid.variants) == ["b", "baseline"]


# ----------------------------------------------------------------------------
# compare


@pytest.mark.slow
def test_compare_writes_its_artefacts_with_equal_steps_and_equal_flops(tmp_path, corpus, capsys):
    spec = {"seeds": [0, 1], "base": tiny_base(tmp_path, corpus, max_steps=6, eval_interval=3),
            "baseline": {}, "recursive": {"h_cycles": 1, "l_cycles": 1, "halt_max_steps": 2}}
    (tmp_path / "cmp.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "cmp"
    payload = compare_main([str(tmp_path / "cmp.yaml"), "--output_dir", str(out)])
    for name in ("comparison.json", "comparison.png", "COMPARISON.md"):
        assert (out / name).stat().st_size > 0, name
    acc = payload.accounting
    # recursive h=1, l=1, 2 supervision steps: 4 decoder passes, all with gradient; the LM head twice
    recursive = RecursiveMoEReasonConfig.from_preset("debug", vocab_size=320, h_cycles=1, l_cycles=1,
                                                     halt_max_steps=2)
    assert acc.flops_per_token["recursive"] == training_flops_per_token(recursive, 32)
    assert acc.cheapest_arm == "baseline"
    equal_flops = int(6 * acc.flops_per_token["baseline"] / acc.flops_per_token["recursive"])
    assert acc.equal_flops_steps == {"recursive": equal_flops}
    runs = payload.runs
    assert sorted({(r.run, r.steps) for r in runs}) == [
        ("baseline", 6), ("recursive", 6), ("recursive_equal_flops", equal_flops)]
    assert all(r.finished for r in runs) and len(runs) == 6
    # identical data order and settings: a run's config differs from its counterpart only in model fields
    base0 = next(r for r in runs if r.run == "baseline" and r.seed == 0).config
    rec0 = next(r for r in runs if r.run == "recursive" and r.seed == 0).config
    assert {k for k in base0.keys() | rec0.keys() if base0.get(k) != rec0.get(k)} == \
        {"model_type", "h_cycles", "l_cycles", "halt_max_steps"}
    for side in ("equal_steps", "equal_flops"):
        verdict = getattr(payload, side)["recursive"]
        assert verdict.verdict and verdict.winner in ("baseline", "recursive", f"recursive_{side}", None)
        low, high = verdict.interval
        assert low < verdict.difference < high and ("excludes 0" in verdict.verdict) == (low > 0 or high < 0)
    report = (out / "COMPARISON.md").read_text()
    assert "Equal steps, recursive vs baseline:" in report and "Equal FLOPs, recursive vs baseline:" in report
    assert "ln(vocab)" in report and "`max_steps=6`" in report and "`eval_interval=3`" in report  # shared
    assert "Throughput: tokens/s and wall time are each run's training loop over all its starts" in report
    trend = payload.equal_flops_trend["recursive"]  # both ends of the budget meet at the runs' final evaluations
    assert trend[-1].share == 1.0 and trend[-1].arm_step == equal_flops and trend[-1].reference_step == 6
    assert "## The equal-FLOPs gap along the budget: recursive vs baseline" in report
    (out / "COMPARISON.md").unlink()
    compare_main(["--report", str(out)])  # rebuilt from comparison.json, without training
    assert (out / "COMPARISON.md").read_text() == report

    # a fresh clone with the committed comparison.json: the runs whose folders are gone are kept, not trained
    shutil.rmtree(out / "recursive_equal_flops")
    capsys.readouterr()
    again = compare_main([str(tmp_path / "cmp.yaml"), "--output_dir", str(out), "--seeds", "1"])
    printed = capsys.readouterr().out
    assert "[kept] recursive_equal_flops/seed_1" in printed and "[start]" not in printed
    kept = next(r for r in runs if r.run == "recursive_equal_flops" and r.seed == 1)
    assert again.equal_flops["recursive"].sides["recursive_equal_flops"].values == [kept.final_val_loss]
    # seed 0's runs, left out by --seeds 1, stay in the record; its equal-FLOPs run comes back from it
    assert {(r.run, r.seed) for r in again.other_runs} == {
        ("baseline", 0), ("recursive", 0), ("recursive_equal_flops", 0)}
    assert ("not counted here (seeds the command left out with --seeds, or runs trained with other arguments): "
            "baseline/seed_0, recursive/seed_0, recursive_equal_flops/seed_0.") in (out / "COMPARISON.md").read_text()
    assert compare_main([str(tmp_path / "cmp.yaml"), "--output_dir", str(out)]).equal_flops == payload.equal_flops
    assert "not counted here" not in (out / "COMPARISON.md").read_text()
    assert not (out / "recursive_equal_flops").exists()


def plateau_study(tmp_path, corpus, max_steps: int) -> None:
    """tmp_path/c.yaml: a recursive and a direct arm at a constant learning rate, the direct arm also at the
    recursion's FLOPs, under a plateau rule (3 evaluations, a bar no run clears) that stops a run at step 9."""
    base = tiny_base(tmp_path, corpus, max_steps=max_steps, eval_interval=3, save_interval=3,
                     lr_scheduler="constant", stop_on_plateau=True, plateau_min_evals=3, plateau_delta=0.5)
    spec = {"seeds": [0], "base": base, "reference": "recursive", "equal_flops": "reference",
            "arms": {"recursive": {"model_type": "recursive", "h_cycles": 1, "l_cycles": 1, "halt_max_steps": 2},
                     "direct": {"model_type": "base"}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(spec))


def test_an_equal_flops_run_goes_on_from_its_twins_last_checkpoint_and_ends_as_a_run_from_step_0(tmp_path, corpus,
                                                                                               capsys):
    # a constant schedule: the direct arm's run at the recursion's FLOPs repeats its 6-step twin, then goes on;
    # the plateau rule (3 evaluations, a bar no run clears) stops both it and a run from step 0 at step 9
    plateau_study(tmp_path, corpus, max_steps=6)
    payload = compare_main([str(tmp_path / "c.yaml"), "--output_dir", str(tmp_path / "cmp")])
    twin, run = (next(r for r in payload.runs if r.run == name) for name in ("direct", "direct_equal_flops"))
    assert twin.started_from is None and (twin.stopped_by, twin.stopped_at) == ("max_steps", 6)
    assert run.started_from == f"{twin.output_dir}/checkpoint-6" and run.steps > 9
    assert "Started from their equal-steps twin's last checkpoint" in (tmp_path / "cmp" / "COMPARISON.md").read_text()
    fresh = run_training("fresh", 0, run.config, tmp_path / "fresh")
    assert (run.stopped_by, run.stopped_at) == (fresh.stopped_by, fresh.stopped_at) == ("plateau", 9)
    assert [s for s, *_ in run.eval_curve] == [s for s, *_ in fresh.eval_curve] == [3, 6, 9]
    assert [loss for _, loss, *_ in run.eval_curve] == pytest.approx([loss for _, loss, *_ in fresh.eval_curve],
                                                                       rel=1e-4)
    assert [s for s, _ in run.train_loss_curve] == list(range(1, 10))  # the twin's steps 1-6 came along
    assert run.final_val_loss == pytest.approx(fresh.final_val_loss, rel=1e-4)
    # where the cap shapes the schedule, or the runs differ in more than the cap, nothing is shared
    values = {**run.config}
    assert same_first_steps(twin.config, values)
    for change in ({"lr_scheduler": "cosine"}, {"warmup_ratio": 0.1}):  # the cap shapes the schedule
        assert not same_first_steps({**twin.config, **change}, {**values, **change})
    assert not same_first_steps(twin.config, {**values, "learning_rate": 1e-3})  # more than the cap differs
    assert not same_first_steps({**twin.config, "max_steps": 5}, values)  # the twin's last step: no evaluation
    assert same_first_steps({**twin.config, "cpu_threads": 1}, {**values, "cpu_threads": 2})  # how, not what
    # the ETA's view of it: the run will start at the twin's last step; at its cap where the twin plateaued
    cmp = load_comparison(tmp_path / "c.yaml")
    todo = run_order(*plan_runs(cmp), [0])
    at = next(i for i, (_, item) in enumerate(todo) if item.name == "direct_equal_flops")
    assert twin_starts(cmp, todo, payload.runs) == {at: 6}
    plateaued = dataclasses.replace(twin, stopped_by="plateau", stopped_at=3)
    assert twin_starts(cmp, todo, [plateaued]) == {at: run.steps}
    assert twin_starts(cmp, todo, [dataclasses.replace(twin, config={**twin.config, "learning_rate": 1.0})]) == {}
    gone = dataclasses.replace(twin, output_dir=str(tmp_path / "gone"))  # kept from a report, its folder gone
    assert twin_starts(cmp, todo, [gone]) == {}  # nothing to go on from: step 0
    assert twin_starts(cmp, todo, [dataclasses.replace(gone, stopped_by="plateau", stopped_at=3)]) == {at: run.steps}
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as patch:  # and the run says so as it starts
        patch.setattr(run_folder, "_train_in_process", lambda *args: "stopped")
        run_training("direct_equal_flops", 0, run.config, tmp_path / "from_gone", start_from=tmp_path / "gone")
    assert (f"[start] direct_equal_flops/seed_0 (from step 0: {tmp_path / 'gone'} holds no finished run's last "
            "checkpoint within the cap to go on from)") in capsys.readouterr().out

    # a study that raises its step cap: the twin, stopped by its cap, goes on in its own folder and ends as the
    # run from step 0 did; that run, stopped by the plateau rule, ends there under any higher cap
    capsys.readouterr()
    folder, raised = Path(twin.output_dir), {**twin.config, "max_steps": run.steps}
    with pytest.MonkeyPatch.context() as patch:  # stopped before its end: an interrupted run, not the capped one
        patch.setattr(run_folder, "_train_in_process", lambda *args: "stopped")
        assert run_training("direct", 0, raised, folder).status == "failed"
    assert f"[start] direct/seed_0 (resuming: its step cap rose from 6 to {run.steps})" in capsys.readouterr().out
    assert not (folder / RESULTS).exists() and (folder / "checkpoint-6").is_dir()
    longer = run_training("direct", 0, raised, folder)
    assert re.search(rf"\[start\] direct/seed_0 \(resuming at step 6 of {run.steps:,}; val loss \d\.\d{{3}} at "
                     r"step 6\) ->", capsys.readouterr().out)
    assert (longer.stopped_by, longer.stopped_at) == ("plateau", 9)
    assert [loss for _, loss, *_ in longer.eval_curve] == pytest.approx([loss for _, loss, *_ in fresh.eval_curve],
                                                                          rel=1e-4)
    again = run_training("fresh", 0, {**run.config, "max_steps": run.steps + 3}, tmp_path / "fresh")
    assert "[skip] fresh/seed_0" in capsys.readouterr().out and again.stopped_at == 9


def test_kinds_trains_every_arms_equal_steps_runs_first_and_the_equal_flops_runs_go_on_from_their_twins(
        tmp_path, corpus, capsys):
    # a study's seeds at equal steps on one command, its long equal-FLOPs runs on another: the second takes the
    # twins from the report and still goes on from their last checkpoints
    plateau_study(tmp_path, corpus, max_steps=6)
    out, command = tmp_path / "cmp", [str(tmp_path / "c.yaml"), "--output_dir", str(tmp_path / "cmp")]
    first = compare_main(command + ["--kinds", "equal_steps"])
    printed = capsys.readouterr().out
    assert "[later] left out by --kinds, and the report holds no finished run of them with these arguments: " \
        "direct_equal_flops/seed_0\n" in printed and not (out / "direct_equal_flops").exists()
    assert sorted(r.run for r in first.runs) == ["direct", "recursive"] and first.equal_flops["direct"].winner is None
    second = compare_main(command + ["--kinds", "equal_flops"])
    printed = capsys.readouterr().out
    assert "[kept] direct/seed_0: left out by --kinds; from the report" in printed and printed.count("[start]") == 1
    twin, run = (next(r for r in second.runs if r.run == name) for name in ("direct", "direct_equal_flops"))
    assert run.started_from == f"{twin.output_dir}/checkpoint-6" and (run.stopped_by, run.stopped_at) == ("plateau", 9)
    assert len(second.equal_flops["direct"].sides["direct_equal_flops"].values) == 1
    with pytest.raises(ValueError, match="--kinds equal: not a kind of run; kinds: equal_steps equal_flops"):
        compare_main(command + ["--kinds", "equal"])


def test_status_says_where_each_run_stands_and_trains_nothing_beside_the_runner_at_work(tmp_path, corpus, capsys):
    plateau_study(tmp_path, corpus, max_steps=6)
    out, command = tmp_path / "cmp", [str(tmp_path / "c.yaml"), "--output_dir", str(tmp_path / "cmp"), "--status"]
    compare_main(command)
    printed = capsys.readouterr().out
    assert "[new] recursive/seed_0: not started (cap 6)\n" in printed and not out.exists()
    assert "[status] 0/3 runs finished; the 3 to train: no estimate yet for direct, recursive (no run trained so far)" \
        in printed
    cmp = load_comparison(tmp_path / "c.yaml")
    with pytest.MonkeyPatch.context() as patch:  # stopped before its first checkpoint: it starts again, as new
        patch.setattr(run_folder, "_train_in_process", lambda *args: "stopped")
        run_training("recursive", 0, {**cmp.base, **cmp.arms["recursive"], "seed": 0, "max_steps": 6},
                     out / "recursive" / "seed_0")
    (out / "recursive" / "seed_0" / "metrics.jsonl").write_text("")
    capsys.readouterr()
    compare_main(command)
    assert "[new] recursive/seed_0: not started (cap 6)\n" in capsys.readouterr().out
    compare_main(command[:-1] + ["--kinds", "equal_steps"])
    item = next(item for _, item in run_order(*plan_runs(cmp), [0]) if item.name == "direct_equal_flops")
    values = {**cmp.base, **cmp.arms["direct"], "seed": 0, "max_steps": item.steps}
    with pytest.MonkeyPatch.context() as patch:  # went on from its twin's checkpoint-6, then was interrupted
        patch.setattr(run_folder, "_train_in_process", lambda *args: "stopped")
        run_training("direct_equal_flops", 0, values, out / "direct_equal_flops" / "seed_0",
                     start_from=out / "direct" / "seed_0")
    capsys.readouterr()
    with hold_folder(out, STUDY_LOCK, STUDY_IN_USE):  # a runner at work on the study: --status still reads it
        report = compare_main(command)
    printed = capsys.readouterr().out
    assert "[finished] direct/seed_0: hit its cap at step 6\n" in printed
    assert re.search(rf"\[started\] direct_equal_flops/seed_0: at step 6 of {item.steps:,} \(its last checkpoint; "
                     r"val loss \d\.\d{3} at step 6; \d+\.\d s a step so far\)\n", printed)  # its twin's, copied
    assert re.search(r"\[status\] 2/3 runs finished; the 1 to train: at most \d+\.\d h for 1 at their step caps\n",
                     printed)
    assert sorted(r.run for r in report.runs) == ["direct", "recursive"]
    compare_main(command + ["--seeds", "1", "0"])  # seed 0's run stopped part-way trains before seed 1's of its kind
    assert re.findall(r"^\[\w+\] (\S+): ", capsys.readouterr().out, re.M) == [
        "direct/seed_1", "recursive/seed_1", "direct/seed_0", "recursive/seed_0", "direct_equal_flops/seed_0",
        "direct_equal_flops/seed_1"]
    shutil.rmtree(out / "direct")  # a fresh checkout: the record is left, and the run is kept from it
    assert "[kept] direct/seed_0: hit its cap at step 6 (the report's record; its folder is gone)" in \
        (compare_main(command), capsys.readouterr().out)[1]


def test_status_reads_a_started_runs_latest_evaluation_up_to_its_checkpoint(tmp_path):
    records = [{"step": 5, "train/loss": 1.0}, {"step": 10, "eval/loss": 2.5},  # a later one is logged again
               {"step": 20, "eval/loss": 2.25, "eval/exact_match": 0.125}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert latest_evaluation(tmp_path, 15, task=True) == "val loss 2.500 at step 10"
    assert latest_evaluation(tmp_path, 20, task=True) == "exact 12.5% at step 20"
    assert latest_evaluation(tmp_path, 20, task=False) == "val loss 2.250 at step 20"  # text: no puzzle to solve
    assert latest_evaluation(tmp_path, 5, task=True) == "" and latest_evaluation(tmp_path / "gone", 20, task=True) == ""
    with open(tmp_path / "metrics.jsonl", "a") as f:  # the task's validator's verdict, where the trainer gave one
        f.write(json.dumps({"step": 30, "eval/loss": 2.0, "eval/exact_match": 0.125, "eval/solved": 0.25}) + "\n")
    assert latest_evaluation(tmp_path, 30, task=True) == "exact 25.0% at step 30"


def test_a_maze_runs_curve_scored_against_its_stored_path_is_named_and_dotted():
    def run(name, task, curve, validated_from=None):
        return RunRecord(name, 0, "finished", f"out/{name}/seed_0", config={"task": task}, eval_curve=curve,
                         curve_validated_from=validated_from, sequences_per_step=64, tokens_per_step=4096,
                         flops_per_token=1000)

    curve = [[100, 1.0, 0.5, 0.1], [200, 0.9, 0.6, 0.2], [300, 0.8, 0.7, 0.5], [400, 0.7, 0.8, 0.6]]
    runs = [run("old", "maze", curve), run("resumed", "maze", curve, validated_from=300),
            run("new", "maze", curve, validated_from=100), run("sudoku", "sudoku", curve), run("text", None, curve)]
    note = " ".join(stored_answer_note(runs))
    assert "(dotted in the figure): the whole curve of old/seed_0; resumed/seed_0's to step 200." in note
    assert "new/seed_0" not in note and "sudoku" not in note and "text" not in note  # validated, or one answer
    assert stored_answer_note(runs[2:]) == []
    figure, (by_seen, by_flops) = pyplot().subplots(1, 2)
    names = ["old", "resumed", "new"]
    learning_curves(by_seen, by_flops, runs[:3], names, {name: "C0" for name in names})
    styles = [(line.get_linestyle(), len(line.get_xdata())) for line in by_seen.lines]
    # dotted to the last stored-answer point and on to the first validated one, solid from there (empty: labelled)
    assert styles == [(":", 4), ("-", 0), (":", 3), ("-", 2), ("-", 4)]
    pyplot().close(figure)
    # the equal-FLOPs gap along the budget names the curves of its runs that read low
    runs = [run("old", "maze", curve), run("new_equal_flops", "maze", curve, validated_from=100)]
    trend = {"new": [TrendPoint(0.5, 200, 200, [0.2, 0.0], [0.2, 0.0], [0.0, 0.0], [0])]}
    report = SimpleNamespace(accounting=SimpleNamespace(budget_arm="old"), equal_flops_trend=trend, runs=runs,
                             metric="exact_accuracy")
    assert "The curves of old/seed_0 count a maze solved only when" in " ".join(trend_section(report))
    report.runs = runs[1:]
    assert "count a maze solved" not in " ".join(trend_section(report))


def test_an_equal_flops_run_whose_twin_plateaued_within_its_cap_is_the_twins_run(tmp_path, corpus, capsys):
    # the plateau rule (3 evaluations, a bar no run clears) stops the direct arm's 12-step run at step 9, under the
    # cap of its run at the recursion's FLOPs: that run would go on from the twin's step 9 and stop at once
    plateau_study(tmp_path, corpus, max_steps=12)
    out = tmp_path / "cmp"
    command = [str(tmp_path / "c.yaml"), "--output_dir", str(out), "--arms", "direct"]
    payload = compare_main(command)
    printed = capsys.readouterr().out
    twin, run = (next(r for r in payload.runs if r.run == name) for name in ("direct", "direct_equal_flops"))
    assert (twin.stopped_by, twin.stopped_at) == ("plateau", 9) and run.steps > 12
    assert f"[ended] direct_equal_flops/seed_0: its twin direct/seed_0 plateaued at step 9, within this run's " \
        f"cap of {run.steps}" in printed and "[start] direct_equal_flops" not in printed
    assert not (out / "direct_equal_flops").exists() and run.started_from == f"{twin.output_dir}/checkpoint-9"
    assert (run.stopped_by, run.stopped_at, run.config["max_steps"]) == ("plateau", 9, run.steps)
    # what it stands for: the run going on from the twin's last checkpoint stops there, with the twin's figures
    went_on = run_training("went_on", 0, run.config, tmp_path / "went_on", start_from=Path(twin.output_dir))
    assert (went_on.stopped_by, went_on.stopped_at) == ("plateau", 9)
    assert went_on.eval_curve == run.eval_curve and went_on.final_val_loss == run.final_val_loss
    # a fresh checkout with the committed report: both are kept from it
    shutil.rmtree(out / "direct")
    capsys.readouterr()
    again = compare_main(command)
    printed = capsys.readouterr().out
    assert "[kept] direct/seed_0: its folder is gone" in printed
    assert "[kept] direct_equal_flops/seed_0: it is direct's run, as it ended; kept from the report" in printed
    assert "[start]" not in printed and again.runs[-1].final_val_loss == run.final_val_loss
    # and where the report holds the twin only (the run came after it was committed), the kept twin's record
    record = json.loads((out / "comparison.json").read_text())
    record["runs"] = [r for r in record["runs"] if r["run"] != "direct_equal_flops"]
    (out / "comparison.json").write_text(json.dumps(record))
    assert compare_main(command).runs[-1].eval_curve == run.eval_curve
    printed = capsys.readouterr().out
    assert "[kept] direct/seed_0" in printed and "[ended] direct_equal_flops/seed_0" in printed
    assert "[start]" not in printed and not (out / "direct_equal_flops").exists()


def two_arm_study(tmp_path, corpus) -> tuple[Path, list[str]]:
    """tmp_path/c.yaml: a recursive and a direct arm, 2 seeds, no equal-FLOPs runs -> (output folder, command)."""
    spec = {"seeds": [0, 1], "base": tiny_base(tmp_path, corpus), "reference": "recursive", "equal_flops": False,
            "arms": {"recursive": {"model_type": "recursive", "h_cycles": 1, "l_cycles": 1, "halt_max_steps": 2},
                     "direct": {"model_type": "base"}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(spec))
    return tmp_path / "cmp", [str(tmp_path / "c.yaml"), "--output_dir", str(tmp_path / "cmp")]


def test_arms_trains_one_arm_now_and_the_others_count_from_the_report(tmp_path, corpus, capsys):
    # the cheap arm on one machine, the costly one on another: each command's verdict has both arms' runs
    out, command = two_arm_study(tmp_path, corpus)
    first = compare_main(command + ["--arms", "direct"])
    printed = capsys.readouterr().out
    assert "[later] left out by --arms, and the report holds no finished run of them with these arguments: " \
        "recursive/seed_0, recursive/seed_1\n" in printed and not (out / "recursive").exists()
    assert [(r.run, r.seed) for r in first.runs] == [("direct", 0), ("direct", 1)]
    assert first.equal_steps["direct"].sides == {} and first.equal_steps["direct"].winner is None

    both = compare_main(command + ["--arms", "recursive"])
    printed = capsys.readouterr().out
    assert printed.count("[kept] direct/seed_") == 2 and printed.count("[start] recursive/seed_") == 2
    assert "[skip]" not in printed and "[start] direct" not in printed
    direct = [r.final_val_loss for r in first.runs]
    assert both.equal_steps["direct"].sides["direct"].values == direct
    assert len(both.equal_steps["direct"].sides["recursive"].values) == 2 and both.equal_steps["direct"].interval
    assert both.equal_steps == compare_main(command).equal_steps  # the whole study: nothing left to train
    machines = {r.machines[0] for r in both.runs}  # each run names what trained it, and the report says so
    assert len(machines) == 1 and all(len(r.machines) == 1 for r in both.runs)
    assert f"Machines: {machines.pop()}: direct/seed_0, direct/seed_1, recursive/seed_0, recursive/seed_1." in \
        (out / "COMPARISON.md").read_text()
    assert "[start]" not in capsys.readouterr().out

    with pytest.raises(ValueError, match=r"--arms deep names no arm; arms: \['direct', 'recursive'\]"):
        compare_main(command + ["--arms", "direct", "deep"])


def test_a_stopped_command_reports_the_finished_runs_it_had_yet_to_reach(tmp_path, corpus, capsys):
    # seed 1 trained first; the whole study then stops after one run (a spent budget) as a run stopped by
    # Ctrl-C would: its report still counts the seed-1 runs the command had yet to skip, on disk and in --report
    out, command = two_arm_study(tmp_path, corpus)
    seed_1 = {r.run: r.final_val_loss for r in compare_main(command + ["--seeds", "1"]).runs}
    capsys.readouterr()
    stopped = compare_main(command + ["--max_hours", "1e-12"])
    assert capsys.readouterr().out.count("[start]") == 1  # the cheaper arm's seed 0; the budget then stops it
    expected = [("direct", 0), ("direct", 1), ("recursive", 1)]
    assert sorted((r.run, r.seed) for r in stopped.runs) == expected and stopped.other_runs == []
    on_disk = json.loads((out / "comparison.json").read_text())
    assert sorted((r["run"], r["seed"]) for r in on_disk["runs"]) == expected and on_disk["other_runs"] == []
    rebuilt = compare_main(["--report", str(out)]).equal_steps["direct"]
    assert rebuilt.sides["recursive"].values == [seed_1["recursive"]] and len(rebuilt.sides["direct"].values) == 2

    # a grid the same way: variant b's seed 1, finished earlier, counts though the command stopped before it
    grid = {"seeds": [0, 1], "base": tiny_base(tmp_path, corpus), "variants": {"a": {}, "b": {"learning_rate": 1e-3}}}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(grid, sort_keys=False))
    command = [str(tmp_path / "grid.yaml"), "--output_dir", str(tmp_path / "ablation")]
    ablate_main(command + ["--seeds", "1", "--variants", "a", "b"])
    stopped = ablate_main(command + ["--max_hours", "1e-12"])
    assert sorted((r.run, r.seed) for r in stopped.runs) == [("a", 0), ("a", 1), ("b", 1)]
    assert stopped.other_runs == [] and stopped.variants["b"].seeds == [1]
    capsys.readouterr()
    ablate_main(command + ["--status"])  # the grid's --status: what the stopped command left
    printed = capsys.readouterr().out
    assert "[finished] a/seed_1: hit its cap at step 4\n" in printed
    assert "[new] b/seed_0: not started (cap 4)\n" in printed
    assert "[status] 3/4 runs finished; the 1 to train: at most " in printed


def test_compare_refuses_training_settings_in_an_arm_except_its_own_learning_rate_cap_and_interval(tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"base": {}, "baseline": {"warmup_steps": 5}, "recursive": {}}))
    with pytest.raises(ValueError, match=r"model fields and eval_interval, learning_rate, max_steps only: every "
                                         r"other training setting is the base's\) .*\['warmup_steps'\]"):
        load_comparison(tmp_path / "c.yaml")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"base": {"learning_rate": 3e-4}, "reference": "direct", "arms": {
        "direct": {"model_type": "base", "learning_rate": 6e-4}, "recursive": {"model_type": "recursive"}}}))
    cmp = load_comparison(tmp_path / "c.yaml")
    assert cmp.arms["direct"]["learning_rate"] == 6e-4 and "learning_rate" not in cmp.arms["recursive"]


def test_equal_flops_budget_gives_the_costlier_arm_fewer_steps(tmp_path, corpus):
    cmp = load_comparison_for(tmp_path, corpus, recursive={"h_cycles": 2, "l_cycles": 2, "halt_max_steps": 2})
    plan, acc = plan_runs(cmp)
    ratio = acc.flop_ratio["recursive"]
    assert ratio > 4 and acc.equal_flops_steps == {"recursive": int(acc.steps / ratio)}
    assert [p.kind for p in plan] == ["equal_steps", "equal_steps", "equal_flops"]
    cmp = load_comparison_for(tmp_path, corpus, recursive={"h_cycles": 2, "l_cycles": 2, "halt_max_steps": 2},
                              equal_steps=False)  # a long study: the costlier arm at equal FLOPs only
    assert [(p.kind, p.arm) for p in plan_runs(cmp)[0]] == [("equal_steps", "baseline"),
                                                                   ("equal_flops", "recursive")]
    with pytest.raises(ValueError, match="both false: nothing to compare"):
        load_comparison_for(tmp_path, corpus, recursive={}, equal_steps=False, equal_flops=False)


def test_the_equal_flops_gap_along_the_budget_pairs_seeds_at_the_same_share_of_the_flops():
    def run(name, seed, steps, curve):
        return RunRecord(name, seed, "finished", f"out/{name}/seed_{seed}", steps=steps, eval_curve=curve)

    runs = [run("baseline", 0, 40, [[10, 4.0, 0], [20, 3.0, 0], [30, 2.0, 0], [40, 1.0, 0]]),
            run("baseline", 1, 40, [[10, 5.0, 0], [20, 4.0, 0], [30, 3.0, 0], [40, 2.0, 0]]),
            # 8 steps spend the baseline's 40 steps' FLOPs; evaluations at 1/8 (before its first), 1/2, 3/4, 1
            run("recursive_equal_flops", 0, 8, [[1, 9.0, 0], [4, 3.5, 0], [6, 2.0, 0], [8, 1.0, 0]]),
            run("recursive_equal_flops", 1, 8, [[1, 9.0, 0], [4, 4.5, 0], [6, 3.2, 0], [8, 2.0, 0]]),
            run("recursive_equal_flops", 2, 8, [[4, 0.0, 0]])]  # no baseline run of seed 2: left out
    rows = budget_trend(runs, "baseline", "recursive_equal_flops", "loss")
    assert [(r.share, r.arm_step, r.reference_step) for r in rows] == \
        [(0.5, 4, 20), (0.75, 6, 30), (1.0, 8, 40)]
    assert rows[0].seeds == [0, 1] and rows[0].reference_value == [3.5, pytest.approx(0.5 ** 0.5)]
    assert [r.gap[0] for r in rows] == pytest.approx([0.5, 0.1, 0.0])  # seed 0: 0.5, 0, 0; seed 1: 0.5, 0.2, 0
    assert trend_verdict(rows).startswith("the gap shrinks: from +0.5000 ± 0.0000 at 50% of the budget to +0.0000")
    # a baseline evaluated between the recursive run's evaluations is interpolated
    runs[0].eval_curve = runs[1].eval_curve = [[10, 4.0, 0], [40, 1.0, 0]]
    assert budget_trend(runs, "baseline", "recursive_equal_flops", "loss")[0].reference_value[0] == pytest.approx(3.0)
    assert trend_verdict(rows[:1]) == "too few shared evaluations to tell"
    # a puzzle study's trend is in its metric, exact accuracy (the curve's fourth column); an unscored point is left
    puzzles = [run("baseline", 0, 40, [[10, 4.0, 0.5, 0.1], [40, 1.0, 0.9, 0.7]]),
               run("recursive_equal_flops", 0, 8, [[2, 9.0, 0.2, None], [4, 3.0, 0.6, 0.5], [8, 1.0, 0.9, 0.6]])]
    rows = budget_trend(puzzles, "baseline", "recursive_equal_flops", "exact_accuracy")
    assert [r.arm_step for r in rows] == [4, 8]
    assert [value for r in rows for value in (r.reference_value[0], r.arm_value[0])] == pytest.approx(
        [0.3, 0.5, 0.7, 0.6])  # the baseline's step 20 interpolated: 0.1 + 0.6 / 3
    assert [r.gap[0] for r in rows] == pytest.approx([0.2, -0.1])
    assert trend_verdict(rows).startswith("the gap goes from +0.2000 ± 0.0000 at 50% of the budget to -0.1000")
    # a report written before the trend took its metric (val loss under other names) still reads
    assert TrendPoint.from_json({"share": 0.5, "arm_step": 4, "reference_step": 20, "reference_loss": [3.5, 0.0],
                                 "arm_loss": [4.0, 0.0], "gap": [0.5, 0.0], "seeds": [0]}) == \
        TrendPoint(0.5, 4, 20, [3.5, 0.0], [4.0, 0.0], [0.5, 0.0], [0])


def test_a_long_runs_training_curves_are_thinned_so_that_seeds_still_share_their_steps():
    def run(seed, last):  # logged every 10 steps to `last`
        curve = [[step, step / 10] for step in range(10, last + 1, 10)]
        return RunRecord("arm", seed, "finished", "out", train_loss_curve=curve, grad_norm_curve=curve)

    short = run(0, 10 * CURVE_POINTS)  # fits: kept whole
    assert len(short.train_loss_curve) == CURVE_POINTS
    long, longer = run(1, 30 * CURVE_POINTS + 70), run(2, 90 * CURVE_POINTS)
    for r in (long, longer):
        assert len(r.train_loss_curve) <= CURVE_POINTS and r.grad_norm_curve == r.train_loss_curve
    assert long.train_loss_curve[-1] == [30 * CURVE_POINTS + 70, 3 * CURVE_POINTS + 7]  # the last point stays
    assert {s for s, _ in long.train_loss_curve[:-1]} == set(range(40, 30 * CURVE_POINTS + 70, 40))
    shared = {s for s, _ in long.train_loss_curve} & {s for s, _ in longer.train_loss_curve}
    assert shared == set(range(160, 30 * CURVE_POINTS + 70, 160))  # the strides nest: 40 and 160
    # thinning is idempotent: a report read back and written again keeps the same curves
    again = RunRecord.from_json(long.to_json(), "report.json")
    assert again.train_loss_curve == long.train_loss_curve
    assert evenly(list(range(101)), 21) == list(range(0, 101, 5)) and evenly([1, 2], 21) == [1, 2]


def load_comparison_for(tmp_path, corpus, recursive, **options):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"base": tiny_base(tmp_path, corpus, max_steps=100),
                                                     "baseline": {}, "recursive": recursive, **options}))
    return load_comparison(tmp_path / "c.yaml")


def test_compare_takes_any_number_of_named_arms_and_refuses_a_reference_that_names_none(tmp_path, corpus):
    arms = {"recursive": {"model_type": "recursive", "h_cycles": 1, "l_cycles": 1, "halt_max_steps": 2},
            "direct": {"model_type": "base"}, "direct_deep": {"model_type": "base", "num_hidden_layers": 4}}
    spec = {"base": tiny_base(tmp_path, corpus, max_steps=100), "arms": arms, "reference": "recursive"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))  # the file's order is the arms' order
    cmp = load_comparison(tmp_path / "c.yaml")
    assert list(cmp.arms) == ["recursive", "direct", "direct_deep"] and cmp.reference == "recursive"
    plan, acc = plan_runs(cmp)
    assert acc.cheapest_arm == "direct" and set(acc.equal_flops_steps) == {"recursive", "direct_deep"}
    assert acc.equal_flops_steps["direct_deep"] == int(100 / acc.flop_ratio["direct_deep"])
    assert [(p.kind, p.arm) for p in plan][3:] == [("equal_flops", "recursive"), ("equal_flops", "direct_deep")]
    # the order they train in: equal steps before equal FLOPs, seed by seed, the cheapest run of a seed first
    order = [(seed, p.name) for seed, p in run_order(plan, acc, [0, 1])]
    by_cost = ["direct", "direct_deep", "recursive"]
    flops_runs = [f"{arm}_equal_flops" for arm in sorted(["recursive", "direct_deep"], key=lambda arm:
                                                         acc.equal_flops_steps[arm] * acc.flops_per_token[arm])]
    assert order == [(0, a) for a in by_cost] + [(1, a) for a in by_cost] + [(0, a) for a in flops_runs] + \
        [(1, a) for a in flops_runs]
    for change, error in [({"reference": "baseline"}, "reference='baseline' names no arm"),
                          ({"metric": "exact_accuracy"}, "metric exact_accuracy needs a task in base"),
                          ({"arms": {"only": {"model_type": "base"}}}, "two or more arm names"),
                          ({"arms": {**arms, "b": {"model_type": "base", "seed": 10}}}, "max_steps only"),
                          ({"baseline": {}}, "either 'arms:' or the two-arm form"),
                          ({"transfer": {"task_size": 8}},
                           "transfer scores task runs on other puzzles; base has no task"),
                          ({"transfer": {"learning_rate": 1.0}}, "transfer \\(task arguments\\) has unknown")]:
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**spec, **change}))
        with pytest.raises(ValueError, match=error):
            load_comparison(tmp_path / "bad.yaml")


def test_a_second_set_adds_to_the_first():
    """--set a=1 --set b=2 keeps both (it once kept only the last, silently dropping the first)."""
    path, args = parse_runner_cli(["g.yaml", "--set", "sudoku_blanks=20", "max_steps=600", "--set", "cpu_threads=1"],
                                  RunnerArguments, "usage")
    assert path == "g.yaml" and args.set == ["sudoku_blanks=20", "max_steps=600", "cpu_threads=1"]


def test_a_file_that_extends_another_changes_only_what_it_names(tmp_path):
    """extends: the other file's keys, its base updated name by name (null drops a name), its own description
    and output folder; a loop, a missing file and a typo in either file are refused."""
    arms = {"recursive": {"model_type": "recursive", "h_cycles": 2}, "direct": {"model_type": "base"}}
    parent = {"description": "the 4x4 study", "output_dir": "outputs/four", "seeds": [0, 1, 2],
              "metric": "exact_accuracy", "transfer": {"task_size": 6}, "arms": arms,
              "base": {"task": "sudoku", "task_size": 4, "sudoku_blanks": 9, "sudoku_blanks_max": 11,
                       "max_steps": 3000}}
    (tmp_path / "four.yaml").write_text(yaml.safe_dump(parent))
    (tmp_path / "more").mkdir()
    child = {"extends": "../four.yaml", "transfer": {},
             "base": {"task_size": 6, "sudoku_blanks": 20, "sudoku_blanks_max": None}}
    (tmp_path / "more" / "six.yaml").write_text(yaml.safe_dump(child))
    cmp = load_comparison(tmp_path / "more" / "six.yaml")
    assert cmp.base == {"task": "sudoku", "task_size": 6, "sudoku_blanks": 20, "max_steps": 3000}
    assert cmp.arms == arms and cmp.seeds == [0, 1, 2] and cmp.metric == "exact_accuracy" and cmp.transfer == {}
    assert cmp.description == "" and str(cmp.output_dir) == "outputs/compare_six"  # the other study's: not its own
    (tmp_path / "nine.yaml").write_text(yaml.safe_dump({"extends": "more/six.yaml", "base": {"task_size": 9}}))
    assert load_comparison(tmp_path / "nine.yaml").base["sudoku_blanks"] == 20  # a chain: every file's changes
    for files, error in [({"more/six.yaml": {**child, "extends": "../nine.yaml"}}, "makes a loop"),
                         ({"more/six.yaml": {**child, "extends": "../none.yaml"}}, "none.yaml, which is not a file"),
                         ({"more/six.yaml": {**child, "extends": 4}}, "extends=4 is invalid"),
                         ({"four.yaml": {**parent, "sedes": [0]}}, r"four.yaml has unknown key\(s\) \['sedes'\]"),
                         ({"more/six.yaml": {**child, "base": {"blanks": 20}}}, r"six.yaml: base has unknown")]:
        for name, spec in files.items():
            (tmp_path / name).write_text(yaml.safe_dump(spec))
        with pytest.raises((ValueError, FileNotFoundError), match=error):
            load_comparison(tmp_path / "nine.yaml")
        (tmp_path / "four.yaml").write_text(yaml.safe_dump(parent))
        (tmp_path / "more" / "six.yaml").write_text(yaml.safe_dump(child))


def test_the_ladders_files_build_on_each_other_without_changing_a_rung():
    """The rungs share one recipe through extends; each still trains exactly the settings its runs were made with."""
    four, six, harder, nine, maze, maze8 = (load_comparison(REPO / "experiments" / f"trm_{name}.yaml") for name in
                                            ("sudoku_4x4", "sudoku_6x6", "sudoku_6x6_blanks_24", "sudoku_9x9", "maze",
                                             "maze_8x8"))
    recipe = {name: four.base[name] for name in ("model_preset", "hidden_size", "learning_rate", "ema_decay",
                                                  "stop_on_plateau", "eval_interval", "save_total_limit")}
    for study in (six, harder, nine, maze, maze8):
        assert {name: study.base[name] for name in recipe} == recipe
        assert study.seeds == [0, 1, 2] and study.equal_flops == "reference"
    for study in (six, maze):
        assert study.arms == four.arms and study.reference == "recursive"
    # the open rungs' recursion updates per supervision step: the same arm, 8x the steps for the same FLOPs
    for study in (harder, nine, maze8):
        per_step = study.arms["recursive_per_step"]
        assert study.reference == "recursive_per_step" and study.arms["direct_deep"] == four.arms["direct_deep"]
        assert {k: v for k, v in per_step.items() if k not in ("supervision_updates", "max_steps", "eval_interval")} \
            == four.arms["recursive"] and per_step["supervision_updates"] == "per_step"
        assert per_step["max_steps"] == 8 * study.base["max_steps"] and per_step["eval_interval"] == 400
        assert study.arms["direct_same_params"] == four.arms["direct_same_params"] and len(study.arms) == 3
    assert (six.base["task_size"], six.base["sudoku_blanks"], "sudoku_blanks_max" in six.base) == (6, 20, False)
    assert {**six.base, "sudoku_blanks": 24} == harder.base
    assert (nine.base["task_size"], nine.base["sudoku_blanks"], nine.base["max_steps"]) == (9, 30, 6000)
    assert "plateau_min_window" not in six.base and nine.base["plateau_min_window"] == 10
    for mazes, size in ((maze, 6), (maze8, 8)):
        assert mazes.base["task"] == "maze" and mazes.base["task_size"] == size and "sudoku_blanks" not in mazes.base
    assert maze.transfer == {"task_size": 8, "maze_min_path": 16} and maze8.transfer == {}
    assert len({str(s.output_dir) for s in (four, six, harder, nine, maze, maze8)}) == 6


def test_a_task_comparison_scores_every_run_on_the_transfer_puzzles_too(tmp_path):
    """Easy-to-hard: trained on 4x4 mazes on a 5x5 canvas, each export is also scored on 5x5 mazes."""
    base = {"task": "maze", "task_size": 4, "maze_min_path": 4, "maze_canvas": 5, "task_train_puzzles": 16,
            "task_test_puzzles": 8, "data_cache_dir": str(tmp_path / "cache"), "model_preset": "debug",
            "hidden_size": 32, "intermediate_size": 64, "max_steps": 2, "per_device_train_batch_size": 8,
            "eval_interval": 2, "save_interval": 2, "cpu_threads": 1}
    spec = {"seeds": [0], "base": base, "metric": "exact_accuracy", "equal_flops": False,
            "transfer": {"task_size": 5, "maze_min_path": 6, "maze_canvas": None},
            "arms": {"recursive": {"model_type": "recursive", "h_cycles": 1, "l_cycles": 1, "halt_max_steps": 2},
                     "direct": {"model_type": "base"}}}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp_path / "t"
    payload = compare_main([str(tmp_path / "t.yaml"), "--output_dir", str(out)])
    for run in payload.runs:
        assert run.puzzles == 8 and run.transfer["puzzles"] == 8
        scored = json.loads((out / run.run / "seed_0" / "final" / "eval_transfer.json").read_text())
        assert scored["task"]["task_size"] == 5 and scored["trained_task"]["task_size"] == 4
    transfer = next(r for r in payload.runs if r.run == "recursive").transfer
    # the trained 2 steps, then 2, 3 and 4 times as many: with every step, and with the Q-head free to halt
    assert set(transfer["exact_accuracy_by_steps"]) == set(transfer["q_head_by_steps"]) == {"1", "2", "4", "6", "8"}
    assert transfer["by_difficulty"]["measure"] == "free cells" and transfer["q_head"]["share_of_steps"] <= 1.0
    assert set(transfer["q_head_thresholds"]) == {"0.5", "0.9", "0.99"}
    report = (out / "COMPARISON.md").read_text()
    assert "## Transfer: the same models on other puzzles (task_size 5, maze_min_path 6" in report
    assert "Transfer, equal steps, direct vs recursive:" in report and "### Transfer: exact accuracy by" in report
    compare_main([str(tmp_path / "t.yaml"), "--output_dir", str(out)])  # finished runs: read back, not rescored
    assert (out / "COMPARISON.md").read_text() == report


def test_evaluate_refuses_a_halting_mode_for_a_model_that_does_not_halt(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="--eval_halting q_head: .* is not a recursive model"):
        evaluate_main(["--model_path", str(tmp_path), "--eval_halting", "q_head"])


def test_a_second_runner_on_the_same_study_is_refused_naming_the_first(tmp_path):
    """Two identical commands at once: the second stops before any run (it once reported the first's live runs
    as failed), and says who holds the study."""
    import os

    from moe_reason.layout import STUDY_LOCK
    from moe_reason.locks import hold_folder

    from conftest import python_run
    spec = {"seeds": [0], "base": {"model_preset": "debug", "max_steps": 1},
            "variants": {"a": {}, "b": {"learning_rate": 1e-4}}}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "study"
    with hold_folder(out, STUDY_LOCK, STUDY_IN_USE):
        result = python_run(["-m", "moe_reason.runners.ablate", tmp_path / "g.yaml", "--output_dir", out],
                            timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"error: study folder {out} is in use by another runner (PID {os.getpid()} on" in result.stderr
    assert not (out / "results.json").exists() and not (out / "a").exists()  # nothing started
