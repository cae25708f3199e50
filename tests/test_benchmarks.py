"""Each benchmark script runs one tiny iteration and ends with its ratio line (no timing is asserted)."""

import importlib.util
import re

import pytest
import torch

from conftest import REPO, launch, python_run, train_args, write_corpus

TINY = {
    "throughput.py": ["--preset", "debug", "--batch", "2", "--seq", "32", "--steps", "1", "--rounds", "1",
                      "--warmup", "1"],
    "recursion_overhead.py": ["--preset", "debug", "--batch", "2", "--seq", "32", "--steps", "1", "--rounds", "1",
                              "--warmup", "1"],
    "data_throughput.py": ["--preset", "debug", "--steps", "1", "--batch_size", "2", "--block_size", "32",
                           "--max_documents", "40", "--stream_tokens", "2000"],
    "puzzle_cost.py": ["--cells", "16", "--batch", "4", "--hidden", "32", "--steps", "1", "--rounds", "1",
                       "--recursion", "1,1,2", "--deep_layers", "3", "--threads", "1", "--gradient_checkpointing"],
}
LAST_LINE = {"throughput.py": r"ratio ours/mixtral: \d+\.\d\d",
             "recursion_overhead.py": r"ratio measured/FLOPs: \d+\.\d\d",
             "data_throughput.py": r"ratio streaming/training: \d+\.\d",
             "puzzle_cost.py": r"ratio recursive/direct puzzles per second: \d+\.\d\d\d"}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(TINY))
def test_benchmark_runs_once_and_prints_its_ratio_last(script):
    result = python_run([REPO / "benchmarks" / script, *TINY[script]])
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert re.search(LAST_LINE[script], last), last


@pytest.mark.full  # inductor generates and compiles C++ for each arm: minutes on a 2-core CPU
def test_puzzle_cost_times_every_arm_compiled_beside_eager():
    result = python_run([REPO / "benchmarks" / "puzzle_cost.py", *TINY["puzzle_cost.py"], "--mixers", "attention",
                         "--torch_compile"], timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    arms = ["direct (attention)", "direct 3 layers (attention)", "recursive h1 l1 x2 (attention)"]
    for arm in arms:
        assert re.search(rf"{re.escape(arm)}, compiled: first step \(compiling\) \d+\.\d s", result.stdout), arm
        assert re.search(rf"{re.escape(arm)}, compiled: \d+\.\d\d\dx the puzzles/s of the same arm eager",
                         result.stdout), arm
    assert "checkpointed, compiled" not in result.stdout
    assert re.search(LAST_LINE["puzzle_cost.py"], result.stdout.strip().splitlines()[-1])


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_halting_probe_reads_differences_a_millionth_of_the_features_size():
    """The probe standardises per dimension, so a split carried by 1e-6 differences on features of size
    15 (what a collapsed z_H looks like) is found as surely as one at full scale."""
    probe = load_benchmark("halting_probe")
    torch.manual_seed(0)
    signal = torch.randn(150, 16)
    target = (signal[:, 0] + 0.5 * signal[:, 1] > 0).float()
    fit, held_out = probe.probe_accuracy(15.0 + 1e-6 * signal, target)
    assert fit > 0.9 and held_out > 0.85, (fit, held_out)
    noise_fit, noise_held_out = probe.probe_accuracy(15.0 + 1e-6 * signal, target[torch.randperm(150)])
    assert noise_held_out < 0.75, noise_held_out  # a target unrelated to the features is not found


@pytest.mark.slow
def test_halting_probe_runs_on_a_trained_recursive_model(tmp_path):
    corpus = write_corpus(tmp_path, n=120)
    out = tmp_path / "run"
    launch(train_args(tmp_path, corpus, output_dir=out, model_type="recursive", h_cycles=1, l_cycles=1,
                      halt_max_steps=2, validation_documents=30))
    data = ["--data_files", str(corpus), "--block_size", "32", "--validation_documents", "30",
            "--data_cache_dir", str(tmp_path / "data_cache"), "--preprocessing_num_workers", "1"]
    result = python_run([REPO / "benchmarks" / "halting_probe.py", "--model_path", out / "final", "--blocks", "12",
                         *data])
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"linear probe for loss_rank \(median split\): fit \d\.\d+, held-out \d\.\d+ \(4 sequences\)",
                     result.stdout), result.stdout
