"""The trainer as users run it: real processes, CPU, 2 workers where parallel."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moe_reason.training.checkpointing import complete_checkpoints, save_checkpoint
from moe_reason.training.metrics import cpu_model
from moe_reason.training.trainer import UNRECORDED_MACHINE

from conftest import (REPO, assert_export_cli_matches_final, assert_zero_run_learned_and_exported_its_gathered_weights,
                      clean_env, eval_records, evaluate_export, free_port, launch, main_cases, python_run, read_metrics,
                      train_args, train_losses, warm_args, warm_env)

pytestmark = pytest.mark.slow


def test_single_process_run_writes_everything_and_final_reproduces_val_loss(tmp_path, corpus):
    out = tmp_path / "run"
    run = launch(train_args(tmp_path, corpus, output_dir=out, eval_batches=1, per_device_eval_batch_size=8),
                 config_file="accelerate_configs/cpu_single.yaml", warm=False)  # as the README runs it
    assert "Removed shared tensor" not in run.stderr + run.stdout  # the tied head's benign save notice is dropped
    assert list((out / "tensorboard").rglob("events.out.tfevents*"))
    assert complete_checkpoints(out)[-1].name == "checkpoint-6"
    assert_export_cli_matches_final(out)
    for folder in ("final", "best"):
        assert (out / folder / "model.safetensors").exists() and (out / folder / "tokenizer.json").exists()
    records = read_metrics(out)
    train = [r for r in records if "train/loss" in r]
    for key in ("train/aux_loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu",
                "expert_load/layer_0/max_over_mean"):
        assert key in train[0], key
    final_eval = eval_records(out)[-1]
    assert final_eval["step"] == 6 and final_eval["eval/ln_vocab"] == pytest.approx(5.768, abs=1e-3)
    assert evaluate_export(out / "final", tmp_path, corpus) == pytest.approx(final_eval["eval/loss"], abs=1e-5)
    results = json.loads((out / "train_results.json").read_text())
    assert results["final_eval"]["loss"] == final_eval["eval/loss"]


def test_loss_decreases_over_a_short_run(tmp_path, corpus):
    out = tmp_path / "run"
    launch(train_args(tmp_path, corpus, output_dir=out, max_steps=40, eval_interval=40, save_interval=40,
                      log_interval=5, learning_rate=1e-2))
    losses = train_losses(out)
    assert losses[40] < losses[5] - 0.5, losses


def test_resume_is_exact(tmp_path, corpus):
    # resume must restore the RNG, not just weights, and the aux-free balancing bias beside the aux loss
    noisy = dict(hidden_dropout=0.1, router_jitter_noise=0.1, load_balancing="both", router_bias_update_rate=1e-3)
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    assert main_cases([train_args(tmp_path, corpus, output_dir=straight, **noisy),  # two runs
                       train_args(tmp_path, corpus, output_dir=halves, max_steps=3, **noisy)]) == [None, None]
    # the checkpoint carries the loop's time: pretend the first half took 1000 s, on a machine not recorded (a
    # checkpoint from before runs recorded theirs)
    state_file = halves / "checkpoint-3" / "trainer_state.json"
    saved = json.loads(state_file.read_text())
    assert saved["machines"] == json.loads((straight / "train_results.json").read_text())["machines"]
    assert len(saved["machines"]) == 1 and saved["machines"][0].startswith(f"{cpu_model()}, ")
    state_file.write_text(json.dumps({**saved, "train_seconds": 1000.0, "machines": []}))
    resumed, other_model = main_cases([
        train_args(tmp_path, corpus, output_dir=halves, resume_from_checkpoint="latest", **noisy),
        # the same weight shapes, another model: it would load silently and train as something else
        train_args(tmp_path, corpus, output_dir=halves, resume_from_checkpoint="latest", num_experts_per_tok=1,
                   **noisy)])
    assert resumed is None
    assert other_model.startswith("UserError: ") and "checkpoint-6 holds a different model" in other_model \
        and "num_experts_per_tok: 2 there, 1 now" in other_model and "run_args.json" in other_model, other_model
    assert train_losses(halves) == train_losses(straight)  # every step, bit for bit
    results = json.loads((halves / "train_results.json").read_text())
    assert 1000 < results["wall_seconds"] < 1000 + json.loads((straight / "train_results.json").read_text())[
        "wall_seconds"] * 5  # both halves' time: throughput is over the whole run, not its last start
    assert results["tokens_per_s"] == \
        pytest.approx(results["step"] * results["tokens_per_step"] / results["wall_seconds"])
    assert results["machines"] == [UNRECORDED_MACHINE, saved["machines"][0]]  # what ran each start
    a, b = load_file(straight / "final" / "model.safetensors"), load_file(halves / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ddp_two_processes_match_one_process_on_the_same_global_batch(tmp_path, corpus):
    # the aux loss is a product of per-rank statistics, so the balancing is the aux-free bias here, whose update
    # reads the step's expert counts summed over the ranks; both sides use one thread per process, so the
    # arithmetic is the same
    settings = dict(load_balancing="aux_free", router_bias_update_rate=1e-3, max_steps=5, eval_interval=5,
                    cpu_threads=1)
    launch(train_args(tmp_path, corpus, output_dir=tmp_path / "one", per_device_train_batch_size=4, **settings))
    result = launch(train_args(tmp_path, corpus, output_dir=tmp_path / "two", per_device_train_batch_size=2,
                               **settings), config_file="accelerate_configs/cpu_ddp.yaml")
    assert "2 process(es) (MULTI_CPU)" in result.stdout
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert one.keys() == two.keys()
    # Averaging two half-batch gradients rounds differently from one full batch (~1e-7). Top-k routing is
    # discontinuous, so after a few steps such a difference can flip one token's expert and move that
    # step's loss by up to a few 1e-3 (measured: 1e-6 for steps 1-4, 3.6e-3 at step 5, 1e-4 after).
    for step in (1, 2, 3):
        assert two[step] == pytest.approx(one[step], abs=1e-5), step
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=5e-3), step
    assert eval_records(tmp_path / "two")[-1]["eval/loss"] == pytest.approx(
        eval_records(tmp_path / "one")[-1]["eval/loss"], abs=5e-3)
    assert_export_cli_matches_final(tmp_path / "two")
    # the balancing biases: the same global counts on both sides, so the same sign steps (a token flipped by
    # rounding at step 5, as above, can move one expert's last step: 2e-3 at most)
    biases = [{k: v for k, v in load_file(tmp_path / side / "final" / "model.safetensors").items()
               if k.endswith("expert_bias")} for side in ("one", "two")]
    assert len(biases[0]) == 2 and all(v.abs().max() > 0 for v in biases[0].values())
    for name, bias in biases[0].items():
        assert (biases[1][name] - bias).abs().max() <= 2e-3 + 1e-9, name
    # and the last step's log says how far each layer's bias spread (largest minus smallest expert's)
    logged = [r for r in read_metrics(tmp_path / "one") if "train/router_bias_spread/layer_0" in r][-1]
    assert logged["step"] == 5
    for layer, (name, bias) in enumerate(sorted(biases[0].items())):
        assert logged[f"train/router_bias_spread/layer_{layer}"] == pytest.approx(float(bias.max() - bias.min()),
                                                                                  abs=1e-6), name


@pytest.mark.slow
def test_the_recursive_model_at_trm_depth_trains_under_ddp_like_one_process(tmp_path, corpus):
    # with two H cycles the learned initial states are read only by passes without gradient: DDP, which waits for
    # a gradient of every trainable parameter, failed at the second step. Without ACT (a Q-head's relative target
    # is a quantile of each rank's own batch) both sides compute the same steps
    settings = dict(model_type="recursive", h_cycles=2, l_cycles=1, halt_max_steps=2, use_act=False,
                    load_balancing="aux_free", router_bias_update_rate=1e-3, max_steps=3, eval_interval=3,
                    save_interval=3, cpu_threads=1)
    launch(train_args(tmp_path, corpus, output_dir=tmp_path / "one", per_device_train_batch_size=4, **settings))
    launch(train_args(tmp_path, corpus, output_dir=tmp_path / "two", per_device_train_batch_size=2, **settings),
           config_file="accelerate_configs/cpu_ddp.yaml")
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert one.keys() == two.keys() == {1, 2, 3}
    for step, loss in one.items():  # two half-batch gradients averaged round differently from one: ~1e-7
        assert two[step] == pytest.approx(loss, abs=1e-5), step
    exported = load_file(tmp_path / "two" / "final" / "model.safetensors")
    assert torch.count_nonzero(exported["z_init.weight"]) == 0  # kept its initial value, as the docs say


@pytest.mark.slow
def test_the_recursive_model_trains_under_zero3_with_ranks_halting_apart(tmp_path, corpus):
    """ZeRO-3 partitions the recursive model too: its gradients equal the plain model's averaged over the ranks
    (tests/distributed_zero3_recursive_check.py), evaluation keeps ranks that halt after different numbers of
    steps in step, and a run through the trainer learns, evaluates with the Q-head halting, and exports the
    gathered weights."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           *warm_args([REPO / "tests" / "distributed_zero3_recursive_check.py"])]
    result = subprocess.run(cmd, cwd=REPO, env=warm_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["max_grad_diff"] < 1e-6 and found["parameters_checked"] >= 10, found
    (first, second) = found["steps_per_rank"]
    assert first != second and found["eval_loss_finite"], found
    out = tmp_path / "recursive_zero3"
    launch(train_args(tmp_path, corpus, output_dir=out, max_steps=12, eval_interval=12, save_interval=12,
                      learning_rate=1e-2, eval_batches=1, per_device_eval_batch_size=8, model_type="recursive",
                      h_cycles=2, l_cycles=1, halt_max_steps=2, eval_halting="q_head"),
           config_file="accelerate_configs/deepspeed_zero3.yaml")
    assert_zero_run_learned_and_exported_its_gathered_weights(out, tmp_path, corpus, last_step=12)


def test_log_window_averages_losses_and_recursion_metrics_over_processes():
    """The logged recursion metrics are the mean over processes, as the losses are, not rank 0's."""
    from types import SimpleNamespace
    from moe_reason.training.metrics import LogWindow

    class TwoRanks:  # stands in for a 2-process Accelerator whose other rank saw 3x our values
        device, num_processes = torch.device("cpu"), 2

        def reduce(self, tensor, op):
            assert op == "mean"
            return (tensor + 3 * tensor) / 2

    window = LogWindow()
    for _ in range(2):
        window.add(SimpleNamespace(loss=torch.tensor(1.0), lm_loss=torch.tensor(0.5), aux_loss=None, z_loss=None,
                                   expert_load=None, training_metrics={"recursion_steps": torch.tensor(1.5)}),
                   nonfinite=False)
    window.add(None, nonfinite=True)  # a skipped micro-batch counts for throughput only
    record = window.record(TwoRanks(), tokens_per_micro_batch=64, flops_per_token=1.0, peak=1.0, lr=0.1)
    assert record["train/loss"] == 2.0 and record["train/lm_loss"] == 1.0
    assert record["train/recursion_steps"] == 3.0 and record["train/lr"] == 0.1
    assert record["train/skipped_micro_batches"] == 1 and window.micro == 0  # the next window is open


def test_plain_deepspeed_launcher_trains_like_accelerate_launch(tmp_path, corpus):
    """`deepspeed train.py --deepspeed ds_configs/zero2.json` (2 CPU processes) gives the same
    per-step losses as `accelerate launch` with the ZeRO-2 config, which names that JSON."""
    common = dict(max_steps=4, eval_interval=4, save_interval=4, eval_batches=1)
    launch(train_args(tmp_path, corpus, output_dir=tmp_path / "accelerate", **common),
           config_file="accelerate_configs/deepspeed_zero2.yaml")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           *warm_args([REPO / "train.py", "--deepspeed", REPO / "ds_configs/zero2.json",
                       *train_args(tmp_path, corpus, output_dir=tmp_path / "deepspeed", **common)])]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=warm_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "2 process(es) (DEEPSPEED)" in result.stdout
    losses = train_losses(tmp_path / "deepspeed")
    assert sorted(losses) == [1, 2, 3, 4]
    assert losses == pytest.approx(train_losses(tmp_path / "accelerate"), abs=1e-6)
    assert (tmp_path / "deepspeed" / "final" / "model.safetensors").exists()


def test_two_machines_on_loopback_train_together(tmp_path, corpus):
    out, port = tmp_path / "two_machines", free_port()
    argv = train_args(tmp_path, corpus, output_dir=out, max_steps=4, eval_interval=4, save_interval=4,
                      per_device_train_batch_size=2)
    procs = []
    for rank in (0, 1):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "accelerate_configs/cpu_ddp.yaml"), "--num_machines", "2", "--num_processes", "2",
               "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
               str(REPO / "train.py"), *argv]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=clean_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "2 process(es) (MULTI_CPU)" in logs[0]
    assert (out / "final" / "model.safetensors").exists() and sorted(train_losses(out)) == [1, 2, 3, 4]


def test_sigterm_saves_a_resumable_checkpoint_and_exits_zero(tmp_path, corpus):
    out = tmp_path / "run"
    argv = train_args(tmp_path, corpus, output_dir=out, max_steps=100000, save_interval=100000,
                      eval_interval=100000, log_interval=1)
    proc = subprocess.Popen([sys.executable, *warm_args([REPO / "train.py", *argv])], cwd=REPO, env=warm_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not ((out / "metrics.jsonl").exists() and len(read_metrics(out)) >= 3):
        assert proc.poll() is None and time.time() < deadline, "the run ended or stalled before training"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, log[-3000:]
    assert f"accelerate launch train.py {' '.join(map(str, argv))} --resume_from_checkpoint latest" in log
    stopped = complete_checkpoints(out)[-1]
    step = int(stopped.name.split("-")[1])
    assert step >= 3
    launch(train_args(tmp_path, corpus, output_dir=out, max_steps=step + 2, eval_interval=100000,
                      save_interval=100000, resume_from_checkpoint="latest"))
    assert max(train_losses(out)) == step + 2


class FakeAccelerator:
    """Enough of Accelerator for save_checkpoint in one process; save_state can be made to die midway."""
    is_main_process = True

    def __init__(self, die=False):
        self.die = die

    def wait_for_everyone(self):
        pass

    def save_state(self, folder):
        Path(folder).mkdir(parents=True)
        (Path(folder) / "model.safetensors").write_bytes(b"partial")
        if self.die:
            raise KeyboardInterrupt("killed during save")


def test_a_kill_during_save_leaves_the_previous_checkpoint_intact(tmp_path):
    save_checkpoint(FakeAccelerator(), tmp_path, 10, {"step": 10}, total_limit=1)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(FakeAccelerator(die=True), tmp_path, 20, {"step": 20}, total_limit=1)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-10"]
    assert json.loads((tmp_path / "checkpoint-10" / "trainer_state.json").read_text())["step"] == 10
    save_checkpoint(FakeAccelerator(), tmp_path, 20, {"step": 20}, total_limit=1)  # the stale .tmp is cleared
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-20"]


# the recursive model under bf16 in the full run (its autocast path is the base model's, run more times)
@pytest.mark.parametrize("model_type", ["base", pytest.param("recursive", marks=pytest.mark.full)])
def test_bf16_mixed_precision_on_cpu_tracks_fp32(tmp_path, corpus, model_type):
    """--mixed_precision bf16 runs the GPU's mixed-precision path (autocast, bf16 expert matmuls, chunked
    loss with fp32 statistics) on the CPU: its losses follow the fp32 run's closely, yet not bit for bit."""
    runs = {}
    argvs = [train_args(tmp_path, corpus, output_dir=tmp_path / precision, model_type=model_type, max_steps=8,
                        eval_interval=8, save_interval=8, mixed_precision=precision) for precision in ("no", "bf16")]
    assert main_cases(argvs) == [None, None]  # both runs forked from the warm-start process
    for precision in ("no", "bf16"):
        out = tmp_path / precision
        assert json.loads((out / "run_args.json").read_text())["TrainingArguments"]["mixed_precision"] == precision
        runs[precision] = train_losses(out), eval_records(out)[-1]["eval/loss"]
    (fp32, fp32_eval), (bf16, bf16_eval) = runs["no"], runs["bf16"]
    assert fp32.keys() == bf16.keys() and bf16 != fp32  # autocast really changed the arithmetic
    for step, loss in fp32.items():
        assert bf16[step] == pytest.approx(loss, abs=5e-3), (step, bf16, fp32)
    assert bf16_eval == pytest.approx(fp32_eval, abs=5e-3)


# DeepSpeed cases last: they leave a process group
BAD_SETUPS = ["unknown_arg", "unknown_preset", "bad_yaml", "occupied_output", "bad_resume", "indivisible_batch",
              "block_over_positions", "fp16_on_cpu", "ds_contradiction"]


def bad_setup(tmp_path, corpus, case) -> tuple[list[str], str]:
    """A case's arguments (its own output folder) and the words its error must hold."""
    out = tmp_path / case
    argv = train_args(tmp_path, corpus, output_dir=out)
    if case == "unknown_arg":
        return argv + ["--learning_rat", "1e-3"], "--learning_rat"
    if case == "unknown_preset":
        return argv + ["--model_preset", "giant"], "unknown model preset 'giant'"
    if case == "bad_yaml":
        (tmp_path / "x.yaml").write_text("max_steps: [1\n")
        return [str(tmp_path / "x.yaml")] + argv, "does not parse"
    if case == "ds_contradiction":
        ds = json.loads((REPO / "ds_configs/zero2.json").read_text())
        ds["gradient_clipping"] = 0.5
        (tmp_path / "ds.json").write_text(json.dumps(ds))
        return argv + ["--deepspeed", str(tmp_path / "ds.json")], "gradient_clipping=0.5 vs 1.0"
    if case == "occupied_output":
        out.mkdir()
        (out / "run_args.json").write_text("{}")
        return argv, "already holds a different run"
    if case == "block_over_positions":  # the debug preset holds 128 positions; refused before preparing data
        return argv + ["--block_size", "256", "--data_cache_dir", str(tmp_path / "untouched")], \
            "block_size=256 is larger than the model's max_position_embeddings=128 (--model_preset debug)"
    if case == "indivisible_batch":
        return argv + ["--global_batch_size", "10"], "global_batch_size=10 is not a multiple of"
    if case == "fp16_on_cpu":  # Accelerate would run it in fp32 without a word
        return argv + ["--mixed_precision", "fp16"], "--mixed_precision fp16 needs a GPU"
    return argv + ["--resume_from_checkpoint", str(tmp_path / "nowhere")], "not a complete checkpoint"


def test_bad_setups_fail_before_training_with_a_clear_message(tmp_path, corpus):
    cases = [bad_setup(tmp_path, corpus, case) for case in BAD_SETUPS]
    errors = main_cases([argv for argv, _ in cases])
    for case, (_, expected), error in zip(BAD_SETUPS, cases, errors):
        assert error is not None and expected in error, (case, error)
        assert not (tmp_path / case / "final").exists(), case
    assert not (tmp_path / "untouched").exists()  # no data work before the refusal


@pytest.mark.slow
def test_report_to_logs_through_accelerates_trackers_and_refuses_an_absent_one(tmp_path, corpus):
    """--report_to mlflow logs to MLflow's local file store (and not to TensorBoard); none logs to metrics.jsonl
    only; a tracker that is not installed is refused before any work, with the pip command."""
    env = {"MLFLOW_TRACKING_URI": f"file:{tmp_path / 'mlruns'}", "MLFLOW_ALLOW_FILE_STORE": "true"}
    mlflow_run = python_run([REPO / "train.py", *train_args(tmp_path, corpus, output_dir=tmp_path / "mlflow",
                                                            max_steps=3, report_to="mlflow")], env=env)
    assert mlflow_run.returncode == 0, mlflow_run.stderr[-3000:]
    logged = sorted((tmp_path / "mlruns").rglob("metrics/train/lm_loss"))
    assert logged and len(logged[0].read_text().splitlines()) == 3  # one line per logged step
    assert not (tmp_path / "mlflow" / "tensorboard").exists()
    errors = main_cases([train_args(tmp_path, corpus, output_dir=tmp_path / "none", max_steps=2, report_to="none"),
                         train_args(tmp_path, corpus, output_dir=tmp_path / "absent", report_to="tensorboard,wandb"),
                         train_args(tmp_path, corpus, output_dir=tmp_path / "typo", report_to="tensorbord")])
    assert errors[0] is None and not (tmp_path / "none" / "tensorboard").exists()
    assert (tmp_path / "none" / "metrics.jsonl").is_file()
    assert errors[1] == ("UserError: --report_to wandb: the wandb package is not installed; pip install wandb (or "
                         "leave wandb out of --report_to)") and not (tmp_path / "absent" / "run_args.json").exists()
    assert "TrainingArguments.report_to='tensorbord' is invalid" in errors[2]
