"""Shared fixtures and helpers: offline Hub, deterministic seeds, tiny configs, launches, checks on a run."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers on two cores: one thread each, or they slow each other
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

import moe_reason  # noqa: F401  (registers the Auto classes)
from moe_reason import MoEReasonConfig, MoEReasonForCausalLM

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_model(**overrides) -> MoEReasonForCausalLM:
    """The `debug` preset (hidden 32, 2 layers, 4 experts, top-2) in eval mode."""
    return MoEReasonForCausalLM(MoEReasonConfig.from_preset("debug", **overrides)).eval()


def random_ids(batch=2, seq=16, vocab=256) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq))


def assert_training_path_equals_eval_path(model, ids, labels, fields=("loss", "lm_loss")) -> dict:
    """Training mode with labels takes the chunked loss (no logits); eval mode the logits. Without
    dropout, jitter or exploration both must give the same `fields` (1e-6) and gradients (1e-6,
    rel 1e-5). Returns the training path's figures."""
    results = []
    for train in (True, False):
        model.train(train)
        out = model(ids, labels=labels)
        assert (out.logits is None) == train
        out.loss.backward()
        results.append(({k: getattr(out, k).detach() for k in fields},
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        model.zero_grad()
    (figures, grads), (ref_figures, ref_grads) = results
    for key, value in figures.items():
        torch.testing.assert_close(value, ref_figures[key], atol=1e-6, rtol=1e-6, msg=key)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-6, rtol=1e-5, msg=name)
    return figures


def write_corpus(folder, n=40, column="text"):
    """A jsonl corpus of n distinguishable documents of different lengths."""
    path = folder / "docs.jsonl"
    with open(path, "w") as f:
        for i in range(n):
            body = " ".join(f"word{i}_{j} alpha beta" for j in range(3 + i % 7))
            f.write(json.dumps({column: f"document {i}: {body}.", "id": i}) + "\n")
    return path


REPO = Path(__file__).resolve().parent.parent


def train_args(tmp_path, corpus, **overrides) -> list[str]:
    """Trainer flags for a seconds-long run of the debug preset on a small local corpus."""
    settings = dict(model_preset="debug", data_files=str(corpus), tokenizer_vocab_size=320, block_size=32,
                    validation_documents=6, data_cache_dir=str(tmp_path / "data_cache"), max_steps=6,
                    eval_interval=3, eval_batches=2, log_interval=1, save_interval=3,
                    per_device_train_batch_size=4, sample_tokens=0, preprocessing_num_workers=1, learning_rate=3e-3,
                    cpu_threads=1)  # beside another xdist worker
    settings.update(overrides)
    argv = []
    for name, value in settings.items():
        argv += [f"--{name}", str(value)]
    return argv


def launch(argv: list[str], config_file: str | None = None, timeout: int = 300, extra_launch=(), check=True,
           warm=True):
    """`accelerate launch --config_file F train.py ARGV` as real processes, or without a config file what
    `python train.py ARGV` does (`python_run`); returns CompletedProcess. A launch's ranks fork from the
    warm-start process (tests/warm_rank.py) unless warm=False: then each starts a fresh interpreter, for a check
    of what happens at an interpreter's start or exit (a forked run ends with os._exit after its streams)."""
    if warm and not config_file:
        result = python_run([REPO / "train.py", *argv], timeout=timeout)
    else:
        launcher = ["-m", "accelerate.commands.launch", "--config_file", str(REPO / config_file),
                    *extra_launch] if config_file else []
        script = warm_args([REPO / "train.py"]) if warm else [str(REPO / "train.py")]
        result = subprocess.run([sys.executable, *launcher, *script, *argv], cwd=REPO, capture_output=True,
                                text=True, timeout=timeout, env=warm_env() if warm else clean_env())
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, result.args))} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


_warm: tuple[subprocess.Popen, tempfile.TemporaryDirectory] | None = None


def warm_process() -> tuple[subprocess.Popen, Path]:
    """This worker's warm-start process (tests/warm_start.py), started on first use, and its socket: it has
    imported the trainer and forks a child for each request, so a run skips a fresh interpreter's imports."""
    global _warm
    if _warm is None or _warm[0].poll() is not None:
        folder = tempfile.TemporaryDirectory(prefix="warm_start_")
        process = subprocess.Popen([sys.executable, str(REPO / "tests" / "warm_start.py"),
                                    str(Path(folder.name) / "socket")], cwd=REPO, env=clean_env(),
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for line in process.stdout:  # what the imports print (DeepSpeed logs to stdout), then "ready"
            if line == "ready\n":
                break
        else:
            raise AssertionError(f"the warm-start process ended (exit status {process.wait()})")
        _warm = (process, folder)
    return _warm[0], Path(_warm[1].name) / "socket"


def warm_start(request: dict, timeout: int = 300) -> dict:
    """`request` to the warm-start process on its stdin -> its answer (tests/warm_start.py)."""
    process, _ = warm_process()
    process.stdin.write(json.dumps({**request, "timeout": timeout}) + "\n")
    process.stdin.flush()
    line = process.stdout.readline()
    assert line, f"the warm-start process ended (exit status {process.wait()})"
    return json.loads(line)


def warm_env() -> dict:
    """clean_env() for a launch whose ranks run through tests/warm_rank.py: it names the warm-start socket."""
    return {**clean_env(), "WARM_START_SOCKET": str(warm_process()[1])}


def warm_args(script_and_args: list) -> list[str]:
    """Arguments for `python` that run SCRIPT ARGS as a process forked from the warm-start process, given
    warm_env(): what a launcher starts per rank. Signals to it reach the run; it exits with the run's status."""
    return [str(REPO / "tests" / "warm_rank.py"), *map(str, script_and_args)]


def python_run(args: list, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python ARGS` (a script and its arguments, or -m MODULE ...) in REPO with clean_env() and `env` on top,
    as subprocess.run with capture_output gives it, run in a child of the warm-start process."""
    args = [str(a) for a in args]
    answer = warm_start({"args": args, **({"env": {**clean_env(), **env}} if env else {})}, timeout)
    if answer["timed_out"]:
        raise subprocess.TimeoutExpired(["python", *args], timeout, answer["stdout"], answer["stderr"])
    return subprocess.CompletedProcess(["python", *args], answer["returncode"], answer["stdout"], answer["stderr"])


def main_cases(argv_lists: list[list[str]], timeout: int = 300) -> list[str | None]:
    """The trainer's `main` on each argument list, each in a fresh process forked from the warm-start process ->
    per case the error it stopped with ("ExceptionType: message"), or None where it trained to the end."""
    results = []
    for argv in argv_lists:
        answer = warm_start({"main": [str(a) for a in argv]}, timeout)
        assert answer["returncode"] == 0 and not answer["timed_out"], \
            answer["stdout"][-2000:] + answer["stderr"][-3000:]
        results.append(answer["result"])
    return results


def cli_cases(cases: list[tuple[str, list[str]]], timeout: int = 300) -> list[tuple[int, str]]:
    """Each (MODULE, ARGV) run as `python -m MODULE ARGV` -> per case (exit status, stderr)."""
    runs = [python_run(["-m", module, *argv], timeout) for module, argv in cases]
    return [(run.returncode, run.stderr) for run in runs]


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                      "MASTER_"))}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return env


def read_metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def train_losses(output_dir) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(output_dir) if "train/loss" in r}


def eval_records(output_dir) -> list[dict]:
    return [r for r in read_metrics(output_dir) if "eval/loss" in r]


def assert_export_cli_matches_final(output_dir) -> None:
    """`moe-reason-export` on the run's newest checkpoint writes what the trainer exported to final/
    at that step: the same weights (so the same logits), config and tokenizer."""
    from safetensors.torch import load_file

    from moe_reason.training.export import main as export_main
    from moe_reason.layout import complete_checkpoints

    output_dir = Path(output_dir)
    checkpoint = complete_checkpoints(output_dir)[-1]
    folder = export_main([str(checkpoint), str(output_dir / "exported_by_cli")])
    final = output_dir / "final"
    ours, trainers = load_file(folder / "model.safetensors"), load_file(final / "model.safetensors")
    assert ours.keys() == trainers.keys()
    for name, tensor in trainers.items():
        torch.testing.assert_close(ours[name], tensor, atol=0, rtol=0, msg=name)
    assert json.loads((folder / "config.json").read_text()) == json.loads((final / "config.json").read_text())
    assert (folder / "tokenizer.json").read_text() == (final / "tokenizer.json").read_text()


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path, n=80)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def evaluate_export(folder, tmp_path, corpus, blocks=8) -> float:
    """Validation loss of an exported folder, computed here independently of the trainer."""
    from transformers import AutoModelForCausalLM

    from moe_reason.data.prepare import DataArguments, collate_blocks, prepare_data
    from moe_reason.evaluation.loss import summarise_eval
    from moe_reason.models.modeling_moe_reason import next_token_statistics

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    data = prepare_data(DataArguments(data_files=[str(corpus)], tokenizer_vocab_size=320, block_size=32,
                                      validation_documents=6, data_cache_dir=str(tmp_path / "data_cache"),
                                      preprocessing_num_workers=1), log=lambda _: None)
    batch = collate_blocks([data.validation[i] for i in range(min(blocks, len(data.validation)))])
    with torch.no_grad():
        stats = next_token_statistics(model(batch["input_ids"]).logits, batch["labels"])
    return summarise_eval(stats, model.config.vocab_size)["loss"]


def assert_zero_run_learned_and_exported_its_gathered_weights(out, tmp_path, corpus, last_step: int) -> None:
    """A DeepSpeed run's loss fell, final/ holds exactly the weights gathered from its last checkpoint, and they
    reproduce its last validation loss. The check of every ZeRO run through the trainer: ZeRO-2 in
    test_recursive.py (the recursive model), ZeRO-3 in test_train.py (the recursive model, ranks halting apart) and
    in test_reliability.py (offloaded, and resumed)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    losses = train_losses(out)
    assert losses[last_step] < losses[min(losses)], losses
    gathered = get_fp32_state_dict_from_zero_checkpoint(str(out / f"checkpoint-{last_step}"))
    exported = load_file(out / "final" / "model.safetensors")
    for name, tensor in exported.items():
        torch.testing.assert_close(tensor, gathered[name], atol=0, rtol=0, msg=name)
    assert evaluate_export(out / "final", tmp_path, corpus) == \
        pytest.approx(eval_records(out)[-1]["eval/loss"], abs=1e-5)
    assert_export_cli_matches_final(out)  # DeepSpeed's module file (ZeRO-2) or its fp32 partitions (ZeRO-3)


def save_tiny(folder, formulation, task_settings=None):
    """An untrained debug model and its 4x4 Sudoku tokenizer saved to `folder`, as a task export is."""
    from moe_reason.tasks.puzzles import GridFormulation, SudokuTask, task_tokenizer

    tokenizer = task_tokenizer(SudokuTask(4), formulation)
    grid = isinstance(formulation, GridFormulation)
    config = MoEReasonConfig.from_preset("debug", vocab_size=len(tokenizer), pad_token_id=0, bidirectional=grid,
                                         use_cache=not grid)
    torch.manual_seed(0)
    model = MoEReasonForCausalLM(config)
    if task_settings:
        model.config.task = task_settings
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def task_argv(tmp_path, out, **extra) -> list[str]:
    """Trainer flags for a tiny grid model on 32 4x4 Sudoku puzzles (16 held out)."""
    args = dict(task="sudoku", task_size=4, sudoku_blanks=8, task_train_puzzles=32, task_test_puzzles=16,
                model_preset="debug", hidden_size=64, intermediate_size=128, output_dir=out,
                data_cache_dir=tmp_path / "cache", per_device_train_batch_size=32, warmup_steps=10,
                eval_interval=1000, save_interval=1000, log_interval=50, cpu_threads=1)  # beside another xdist worker
    args.update(extra)
    return [item for k, v in args.items() for item in (f"--{k}", str(v))]
