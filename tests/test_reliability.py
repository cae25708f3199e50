"""Faults a user meets: two runs in one folder, a kill between checkpoints, a set-up that fails, file modes,
and checkpoints that are damaged or tampered with."""

import json
import os
import pickle
import random
import shutil
import signal
import stat
import string
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_reason import MoEReasonConfig, MoEReasonForCausalLM
from moe_reason.training.arguments import TrainingArguments
from moe_reason.data.corpus import MAX_PIECE
from moe_reason.data.prepare import DataArguments, prepare_data
from moe_reason.errors import run_cli
from moe_reason.evaluation.evaluate import main as evaluate_main
from moe_reason.layout import RUN_LOCK_OWNER, complete_checkpoints
from moe_reason.safe_loading import damaged_files, deepspeed_globals, deepspeed_weights_only
from moe_reason.training.export import main as export_main
from moe_reason.tasks.puzzles import GridFormulation

from conftest import (REPO, assert_zero_run_learned_and_exported_its_gathered_weights, clean_env, cli_cases, launch,
                      main_cases, python_run, read_metrics, save_tiny, train_args, train_losses, write_corpus)


def run_train(argv, timeout=180) -> subprocess.CompletedProcess:
    return python_run([REPO / "train.py", *argv], timeout=timeout)


@pytest.mark.slow
def test_a_live_run_holds_its_folder_and_a_killed_run_resumes_without_repeating_metrics(tmp_path):
    corpus, out = write_corpus(tmp_path, n=80), tmp_path / "run"
    argv = train_args(tmp_path, corpus, output_dir=out, max_steps=100000, save_interval=2, eval_interval=100000,
                      log_interval=1, save_total_limit=100000)
    live = subprocess.Popen([sys.executable, str(REPO / "train.py"), *argv], cwd=REPO, env=clean_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (complete_checkpoints(out) and len(read_metrics(out)) >= 3):
            assert live.poll() is None and time.time() < deadline, "the run ended or stalled before training"
            time.sleep(0.2)
        assert json.loads((out / RUN_LOCK_OWNER).read_text())["pid"] == live.pid
        # a second run into the folder, and one that would delete the live run's checkpoints
        for error in main_cases([argv, argv + ["--overwrite_output_dir", "true"]]):
            assert error is not None and f"in use by another run (PID {live.pid}" in error, error
        assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    finally:
        live.send_signal(signal.SIGKILL)  # no chance to save: the kernel releases its lock
        live.wait(timeout=60)
    logged = max(r["step"] for r in read_metrics(out))
    (out / "checkpoint-999999").mkdir()  # a save that was cut short: no trainer_state.json
    resumed = run_train(train_args(tmp_path, corpus, output_dir=out, max_steps=logged + 2, save_interval=2,
                                   eval_interval=100000, log_interval=1, save_total_limit=100000,
                                   resume_from_checkpoint="latest"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoint-999999: no trainer_state.json" in resumed.stdout
    steps = [r["step"] for r in read_metrics(out) if "train/loss" in r]
    assert steps == list(range(1, logged + 3))  # each step once: the records after the checkpoint were dropped


@pytest.mark.slow
def test_a_run_that_fails_in_set_up_leaves_no_claim_and_exports_are_readable(tmp_path):
    corpus, out = write_corpus(tmp_path, n=80), tmp_path / "run"
    failed, fixed = main_cases([train_args(tmp_path, corpus, output_dir=out, block_size=256),  # debug holds 128
                                train_args(tmp_path, corpus, output_dir=out, max_steps=1)])  # the corrected retry
    assert failed is not None and "max_position_embeddings" in failed, failed
    assert fixed is None, fixed
    umask = os.umask(0)
    os.umask(umask)
    for path in (out / "final").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name


class Payload:
    """Unpickled, it would create `marker`: what a planted pickle in a checkpoint could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def planted_copy(checkpoint, root, name: str, target: str, marker) -> list[str]:
    """A run folder holding a copy of `checkpoint` whose file `target` is replaced by a payload (or cut in half
    for a .safetensors file) -> the trainer arguments that resume from it."""
    folder = root / name
    shutil.copytree(checkpoint, folder / checkpoint.name)
    path = folder / checkpoint.name / target
    if path.suffix == ".safetensors":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        torch.save({"state": Payload(marker)}, path)
    return ["--output_dir", str(folder), "--resume_from_checkpoint", "latest"]


@pytest.mark.slow
def test_a_resume_never_runs_a_planted_pickle_and_names_the_damaged_file(tmp_path):
    corpus, out, marker = write_corpus(tmp_path, n=80), tmp_path / "run", tmp_path / "PWNED"
    base = train_args(tmp_path, corpus, max_steps=3, save_interval=2, eval_interval=100000)
    first = run_train(base + ["--output_dir", str(out)])
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint = out / "checkpoint-2"
    targets = {"optimizer.bin": "optimizer.bin holds objects other than tensors",
               "random_states_0.pkl": "random_states_0.pkl holds objects other than tensors",
               "model.safetensors": "model.safetensors is damaged or truncated",
               "custom_checkpoint_0.pkl": "holds custom_checkpoint_0.pkl: a pickle"}  # an older version's scheduler
    errors = main_cases([base + planted_copy(checkpoint, tmp_path, name.replace(".", "_"), name, marker)
                         for name in targets])
    assert not marker.exists()  # no payload ran
    for (name, expected), error in zip(targets.items(), errors):
        # torch's own message advises a re-run with weights_only=False: ours must not
        assert error is not None and expected in error and "re-run" not in error.lower(), (name, error)


@pytest.mark.slow
def test_deepspeed_zero3_resumes_with_weights_only_and_refuses_a_planted_pickle(tmp_path):
    """A ZeRO-3 run with its optimizer offloaded to the CPU learns and exports the gathered weights; its resume
    reads DeepSpeed's files with weights_only=True (its types allow-listed) and continues exactly; a payload
    planted in one of those files, read the way DeepSpeed reads it, does not run."""
    corpus, out, marker = write_corpus(tmp_path, n=80), tmp_path / "zero3", tmp_path / "PWNED"
    base = train_args(tmp_path, corpus, max_steps=12, save_interval=6, eval_interval=12, learning_rate=1e-2,
                      eval_batches=1, per_device_eval_batch_size=8)
    result = launch(base + ["--output_dir", str(out)], config_file="accelerate_configs/deepspeed_zero3_offload.yaml")
    assert "2 process(es) (DEEPSPEED)" in result.stdout
    assert_zero_run_learned_and_exported_its_gathered_weights(out, tmp_path, corpus, last_step=12)
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-6", resumed / "checkpoint-6")
    launch(base + ["--output_dir", str(resumed), "--resume_from_checkpoint", "latest"],
           config_file="accelerate_configs/deepspeed_zero3_offload.yaml")
    straight = train_losses(out)
    assert train_losses(resumed) == pytest.approx({s: straight[s] for s in range(7, 13)}, abs=1e-6)

    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    engine = SimpleNamespace(checkpoint_engine=TorchCheckpointEngine())  # what the DeepSpeed engine reads with
    files = sorted((out / "checkpoint-6" / "pytorch_model").glob("*.pt"))
    with deepspeed_weights_only(engine):
        for path in files:  # DeepSpeed's own files pass
            engine.checkpoint_engine.load(str(path), map_location="cpu")
        torch.save({"state": Payload(marker)}, files[0])
        with pytest.raises(pickle.UnpicklingError):
            engine.checkpoint_engine.load(str(files[0]), map_location="cpu")
    assert not marker.exists()
    assert damaged_files(out / "checkpoint-6", deepspeed_globals()) == [
        f"pytorch_model/{files[0].name} holds objects other than tensors, which are not loaded (it may have been "
        "tampered with)"]


def data_args(tmp_path, files) -> DataArguments:
    return DataArguments(data_files=[str(f) for f in files], data_cache_dir=str(tmp_path / "cache"),
                         tokenizer_vocab_size=320, block_size=16, validation_documents=2, preprocessing_num_workers=1)


@pytest.mark.parametrize("case", ["latin1_text", "binary_text", "rows_without_text", "deepspeed_json",
                                  "evaluate_vocab", "truncated_export", "renamed_weights"])
def test_bad_input_names_the_file_or_value(tmp_path, case):
    messages = []
    if case in ("latin1_text", "binary_text"):
        good = tmp_path / "good.txt"
        good.write_text("plain words\n" * 50)
        bad = tmp_path / "bad.txt"
        bad.write_bytes("café au lait\n".encode("latin-1") * 50 if case == "latin1_text" else bytes(range(256)) * 40)
        with pytest.raises(ValueError, match=f"data file {bad} is not UTF-8 text: byte"):
            prepare_data(data_args(tmp_path, [good, bad]), log=messages.append)
    elif case == "rows_without_text":
        path = tmp_path / "docs.jsonl"
        path.write_text("".join(json.dumps({"text": f"document {i} " * 20} if i % 2 else {"body": "no text"}) + "\n"
                                for i in range(20)))
        prepare_data(data_args(tmp_path, [path]), log=messages.append)
        assert any("10 of 20 rows have no text in column 'text'" in m for m in messages), messages
    elif case == "deepspeed_json":
        (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 2,}}')
        with pytest.raises(ValueError, match=f"DeepSpeed config {tmp_path / 'ds.json'} does not parse"):
            TrainingArguments(deepspeed=str(tmp_path / "ds.json"))
    elif case == "truncated_export":
        MoEReasonForCausalLM(MoEReasonConfig.from_preset("debug")).save_pretrained(tmp_path / "model")
        weights = tmp_path / "model" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
        with pytest.raises(ValueError, match=f"model folder {tmp_path / 'model'} cannot be loaded: "
                                             "model.safetensors is damaged or truncated"):
            evaluate_main(["--model_path", str(tmp_path / "model")])
    elif case == "renamed_weights":  # as a compiled run once exported them: transformers would only warn
        MoEReasonForCausalLM(MoEReasonConfig.from_preset("debug")).save_pretrained(tmp_path / "model")
        weights = tmp_path / "model" / "model.safetensors"
        save_file({f"_orig_mod.{k}": v for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
        expected = (rf"model folder {tmp_path / 'model'} does not hold this model's weights: \d+ missing \(e\.g\. "
                    r"lm_head\.weight, model\.embed_tokens\.weight, .*\); \d+ unexpected \(e\.g\. _orig_mod\.model\.")
        with pytest.raises(ValueError, match=expected):
            evaluate_main(["--model_path", str(tmp_path / "model")])
    else:  # a tokenizer larger than the model: evaluate has no --vocab_size to suggest
        corpus = write_corpus(tmp_path, n=40)
        prepared = prepare_data(data_args(tmp_path, [corpus]), log=messages.append)
        MoEReasonForCausalLM(MoEReasonConfig.from_preset("debug")).save_pretrained(tmp_path / "model")
        prepared.tokenizer.save_pretrained(tmp_path / "tokenizer")
        with pytest.raises(ValueError, match="evaluate with the tokenizer the model was trained with") as raised:
            evaluate_main(["--model_path", str(tmp_path / "model"), "--data_files", str(corpus), "--data_cache_dir",
                           str(tmp_path / "cache"), "--tokenizer_name", str(tmp_path / "tokenizer"),
                           "--block_size", "16", "--validation_documents", "2"])
        assert "--vocab_size" not in str(raised.value)


@pytest.mark.slow
def test_resuming_on_another_number_of_processes_continues_at_the_same_sample(tmp_path):
    """With a learning rate of ~0 the weights stay put, so a step's loss tells which blocks it trained on.
    Blocks are dealt to processes in rounds, so on 2 processes step s takes the blocks a 1-process run
    with the same per-device batch takes in steps 2s-1 and 2s. A resume on the other number of processes
    must continue at the block where the checkpoint stopped."""
    corpus = write_corpus(tmp_path, n=80)
    still = dict(learning_rate=1e-12, warmup_steps=0, hidden_dropout=0.0, attention_dropout=0.0,
                 router_jitter_noise=0.0, per_device_train_batch_size=2, save_interval=2, save_total_limit=100,
                 eval_interval=100000, cpu_threads=1)
    two, one, up, down = (tmp_path / name for name in ("two", "one", "up", "down"))
    launch(train_args(tmp_path, corpus, output_dir=two, max_steps=6, **still),
           config_file="accelerate_configs/cpu_ddp.yaml")
    shutil.copytree(two / "checkpoint-2", down / "checkpoint-2")
    # one process: an uninterrupted run, then two's checkpoint-2 resumed to step 4
    assert main_cases([train_args(tmp_path, corpus, output_dir=one, max_steps=6, **still),
                       train_args(tmp_path, corpus, output_dir=down, max_steps=4, resume_from_checkpoint="latest",
                                  **still)]) == [None, None]
    two_losses, one_losses = train_losses(two), train_losses(one)
    # 1 -> 2: one's checkpoint-4 has consumed 8 blocks, two's first 2 steps; the next step is two's step 3
    up.mkdir()
    shutil.copytree(one / "checkpoint-4", up / "checkpoint-4")
    launch(train_args(tmp_path, corpus, output_dir=up, max_steps=6, resume_from_checkpoint="latest", **still),
           config_file="accelerate_configs/cpu_ddp.yaml")
    up_losses = train_losses(up)
    assert up_losses[5] == pytest.approx(two_losses[3], abs=1e-6)
    assert up_losses[6] == pytest.approx(two_losses[4], abs=1e-6)
    # 2 -> 1: two's checkpoint-2 has consumed 8 blocks, one's first 4 steps; the next step is one's step 5
    down = train_losses(down)
    assert down[3] == pytest.approx(one_losses[5], abs=1e-6) and down[4] == pytest.approx(one_losses[6], abs=1e-6)
    assert len({round(v, 6) for v in one_losses.values()}) == 6  # the steps' blocks really differ in loss


def test_a_megabyte_line_without_white_space_trains_the_tokenizer_in_bounded_pieces(tmp_path):
    """BPE training is quadratic in a piece's length; the pre-tokenizer cuts unbroken runs, so this prepares in
    seconds (it did not finish in minutes before) and ordinary text keeps its GPT-2 pieces."""
    blobs = [tmp_path / f"blob{i}.txt" for i in range(2)]  # one document is held out: at least one trains
    for i, blob in enumerate(blobs):
        blob.write_text("".join(random.Random(i).choices(string.ascii_letters, k=1_000_000)) + "\n")
    prose = tmp_path / "prose.txt"
    prose.write_text("plain words in a plain sentence.\n" * 20)
    args = data_args(tmp_path, [*blobs, prose])
    args.validation_documents = 1
    prepared = prepare_data(args, log=lambda _: None)
    assert prepared.summary["train"]["tokens"] > 100_000  # a megabyte line was trained on
    blob = blobs[0]
    pieces = prepared.tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(blob.read_text()[:100_000])
    assert max(len(piece) for piece, _ in pieces) == MAX_PIECE
    words = prepared.tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str("plain words, as before")
    assert [w for w, _ in words] == ["plain", "Ġwords", ",", "Ġas", "Ġbefore"]


# ----------------------------------------------------------------------------
# export never deletes what it did not write


def export_cli(capsys, *argv) -> subprocess.CompletedProcess:
    """The export command in this process, as `python -m moe_reason.training.export ARGV` runs it (its main under
    run_cli; export keeps no state between calls), -> its exit status and stderr."""
    capsys.readouterr()
    try:
        run_cli(export_main, [str(a) for a in argv])
        code = 0
    except SystemExit as stop:
        code = stop.code
    return subprocess.CompletedProcess(argv, code, *capsys.readouterr())


def listing(folder) -> dict:
    """Every file under `folder` with its bytes: what must not change."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_export_refuses_every_destination_that_holds_what_it_did_not_write(tmp_path, capsys):
    corpus, out = write_corpus(tmp_path, n=80), tmp_path / "run"
    assert main_cases([train_args(tmp_path, corpus, output_dir=out, max_steps=2, save_interval=2)]) == [None]
    r = tmp_path / "r"
    shutil.copytree(out / "checkpoint-2", r / "checkpoint-2")
    (r / "notes.txt").write_text("mine")
    (tmp_path / "a_file").write_text("mine too")
    before = listing(tmp_path)
    cases = {  # destination -> the refusal
        r: "is a folder holding the checkpoint",
        r / "checkpoint-2": "is the checkpoint",
        r / "checkpoint-2" / "inside": "is inside the checkpoint",
        tmp_path / "a_file": "is a file",
        tmp_path / "run": "is not empty: name a new folder, or pass --overwrite",
    }
    for destination, refusal in cases.items():
        result = export_cli(capsys, r / "checkpoint-2", destination)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert result.stderr.startswith("error: ") and refusal in result.stderr, result.stderr
    assert listing(tmp_path) == before  # nothing deleted, nothing written

    # a new folder, then replaced with --overwrite; files of the user's beside it (NAME.tmp, NAME.old) stay
    for name in ("export.tmp", "export.old"):
        (tmp_path / name).write_text("the user's")
    assert export_cli(capsys, r / "checkpoint-2", tmp_path / "export").returncode == 0
    assert listing(tmp_path / "export") == listing(out / "final") | {}  # what the trainer exported at that step
    (tmp_path / "export" / "eval_task.json").write_text("{}")  # what evaluate adds is part of an export
    replaced = export_cli(capsys, r / "checkpoint-2", tmp_path / "export", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert not (tmp_path / "export" / "eval_task.json").exists()
    assert (tmp_path / "export.tmp").read_text() == (tmp_path / "export.old").read_text() == "the user's"
    (tmp_path / "export" / "notes.txt").write_text("mine")  # an export with a file of the user's: refused
    refused = export_cli(capsys, r / "checkpoint-2", tmp_path / "export", "--overwrite")
    assert refused.returncode == 2 and "holds ['notes.txt'], which an export does not write" in refused.stderr
    assert (tmp_path / "export" / "notes.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


# ----------------------------------------------------------------------------
# user errors: one line, no traceback, exit status 2


def cli(args: list[str], close_stdin: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=clean_env(), capture_output=not close_stdin,
                          stdout=subprocess.PIPE if close_stdin else None, stderr=subprocess.PIPE if close_stdin
                          else None, stdin=None, text=True, timeout=180,
                          preexec_fn=(lambda: os.close(0)) if close_stdin else None)


@pytest.mark.slow
def test_every_command_tells_a_user_error_in_one_line_without_a_traceback(tmp_path):
    corpus, out = write_corpus(tmp_path, n=80), tmp_path / "run"
    assert main_cases([train_args(tmp_path, corpus, output_dir=out, max_steps=2, save_interval=2)]) == [None]
    truncated = tmp_path / "truncated"
    shutil.copytree(out / "checkpoint-2", truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (tmp_path / "huge.csv").write_text("question,answer\n4..31.4224..3...," + "1" * 5_000_000 + "\n")
    train = ["--output_dir", str(tmp_path / "x"), "--max_steps", "1"]
    trainer = "moe_reason.training.trainer"  # train.py's main
    cases = [  # each as `python -m MODULE ARGV` runs it, forked from the warm-start process
        ((trainer, train + ["--num_experts", "0"]), "MoEReasonConfig.num_experts=0 is invalid"),
        ((trainer, train + ["--block_size", "0"]), "DataArguments.block_size=0 is invalid"),
        ((trainer, train + ["--block_size", "100000"]),
         "block_size=100000 is larger than the model's max_position_embeddings"),
        (("moe_reason.evaluation.generate", ["--model_path", tmp_path / "nowhere", "--prompt", "x"]),
         f"--model_path {tmp_path / 'nowhere'}: no config.json there"),
        (("moe_reason.training.export", [truncated, tmp_path / "e"]), "model.safetensors is damaged or truncated"),
        (("moe_reason.evaluation.evaluate", ["--model_path", save_tiny(tmp_path / "grid", GridFormulation(), {
            "task": "sudoku", "task_size": 4, "sudoku_blanks": 8}), "--task_file", tmp_path / "huge.csv"]),
         "huge.csv line 2: field larger than field limit"),
        (("moe_reason.runners.compare", [tmp_path / "missing.yaml"]), "comparison file not found"),
        (("moe_reason.runners.ablate", [tmp_path / "missing.yaml"]), "grid file not found"),
    ]
    script = cli(["train.py"] + train + ["--learning_rate", "-1"])  # and one as the script itself
    outcomes = [(script.returncode, script.stderr)] + cli_cases([case for case, _ in cases])
    messages = ["TrainingArguments.learning_rate=-1.0 is invalid: must be > 0"] + [message for _, message in cases]
    for (code, stderr), message in zip(outcomes, messages):
        assert code == 2, (message, code, stderr[-2000:])
        assert "Traceback" not in stderr and message in stderr, (message, stderr[-2000:])
        assert [line for line in stderr.splitlines() if line.startswith("error: ")], stderr[-500:]
    closed = cli(["-m", "moe_reason.evaluation.generate", "--model_path", str(out / "final")], close_stdin=True)
    assert closed.returncode == 2 and "Traceback" not in closed.stderr
    assert "error: no prompt: give --prompt TEXT (standard input, where a prompt is read otherwise, is closed)" \
        in closed.stderr


@pytest.mark.slow
def test_a_deepspeed_launch_from_outside_the_repository_names_the_config_and_the_folder(tmp_path):
    # Accelerate reads the accelerate config's deepspeed_config_file from the folder the command runs in; it
    # failed there with its own three chained tracebacks (the path tried as a file, as JSON, as base64)
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                             str(REPO / "accelerate_configs" / "deepspeed_zero1.yaml"), "--num_processes", "1",
                             str(REPO / "train.py"), "--output_dir", str(tmp_path / "run"), "--max_steps", "1"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300, env=clean_env())
    assert result.returncode != 0
    assert f"error: DeepSpeed config not found from {tmp_path}: " in result.stderr, result.stderr[-3000:]
    assert "Received: ds_configs/zero1.json. The shipped accelerate_configs/ name" in result.stderr
    assert "accelerate/utils/deepspeed.py" not in result.stderr  # the launcher's own report of a failed rank stays


@pytest.mark.full  # 10 launches: minutes on a 2-core CPU
def test_zero3_offload_runs_end_with_exit_0_under_load(tmp_path):
    """A finished ZeRO-3 offload rank once aborted at exit ('terminate called without an active exception'),
    failing a job that had succeeded, about once in a full suite: 10 runs beside a job that loads the CPU."""
    corpus = write_corpus(tmp_path, n=80)
    load = subprocess.Popen([sys.executable, "-c", "while True: sum(i * i for i in range(10000))"])
    try:
        for attempt in range(10):
            out = tmp_path / f"run{attempt}"
            result = launch(train_args(tmp_path, corpus, output_dir=out, max_steps=4, eval_interval=4, save_interval=4,
                                       eval_batches=1, per_device_eval_batch_size=8),
                            config_file="accelerate_configs/deepspeed_zero3_offload.yaml", check=False,
                            warm=False)  # the abort was at the interpreter's exit, which a forked rank skips
            assert result.returncode == 0, (attempt, result.stderr[-3000:])
            assert "terminate called" not in result.stderr and (out / "final" / "model.safetensors").is_file()
    finally:
        load.kill()
