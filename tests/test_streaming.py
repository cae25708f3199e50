"""True streaming: local files read as a stream, each rank its own share, the position saved and resumed."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from moe_reason.training.arguments import parse_args
from moe_reason.data.prepare import collate_blocks, prepare_data
from moe_reason.layout import stream_state_name
from moe_reason.training.trainer import read_stream_state

from conftest import launch, main_cases, train_args, train_losses

VALIDATION = 20


def write_stream_corpus(folder, files=1, n=240):
    """n documents, each starting with its own marker `docN.`, over `files` jsonl files (the stream's shards)."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        with open(folder / f"part{f}.jsonl", "w") as out:
            for i in range(f, n, files):
                words = " ".join(f"w{(i * 7 + j) % 40}" for j in range(15 + i % 25))
                out.write(json.dumps({"text": f"doc{i}. {words}"}) + "\n")
    return folder


def stream_args(tmp_path, corpus, **overrides) -> list[str]:
    return train_args(tmp_path, corpus, streaming=True, validation_documents=VALIDATION,
                      data_cache_dir=tmp_path / "stream_cache", **overrides)


def prepared(tmp_path, corpus, rank=0, world_size=1):
    _, data_args, _ = parse_args(stream_args(tmp_path, corpus, output_dir=tmp_path / "unused"))
    return prepare_data(data_args, log=lambda _: None, rank=rank, world_size=world_size)


def markers(data, tokenizer) -> set[int]:
    """The documents whose opening marker appears in this stream's blocks (one pass)."""
    text = "".join(tokenizer.decode(row["input_ids"]) for row in data)
    return {int(n) for n in re.findall(r"doc(\d+)\.", text)}


def blocks(data) -> list[list[int]]:
    return [row["input_ids"] for row in data]


def test_two_ranks_read_disjoint_shares_of_the_documents_after_the_validation_slice(tmp_path):
    # one file: it does not divide between 2 ranks, so each keeps every 2nd document
    one_file = write_stream_corpus(tmp_path / "one_file")
    ranks = [prepared(tmp_path, one_file, rank, 2) for rank in (0, 1)]
    seen = [markers(data.train, data.tokenizer) for data in ranks]
    assert markers(ranks[0].validation, ranks[0].tokenizer) == set(range(VALIDATION))  # the stream's first ones
    assert seen[0] <= set(range(VALIDATION, 240, 2)) and seen[1] <= set(range(VALIDATION + 1, 240, 2))
    assert min(len(share) for share in seen) > 0.9 * (240 - VALIDATION) / 2  # markers cut at a block edge are lost
    # two files, two ranks: one file each (split_dataset_by_node), the validation documents left out of both
    two_files = write_stream_corpus(tmp_path / "two_files", files=2)  # file f holds documents f, f + 2, ...
    ranks = [prepared(tmp_path, two_files, rank, 2) for rank in (0, 1)]
    held_out = markers(ranks[0].validation, ranks[0].tokenizer)
    assert held_out == set(range(0, 2 * VALIDATION, 2))  # the stream's first documents: file 0's
    seen = [markers(data.train, data.tokenizer) for data in ranks]
    assert seen[0] <= set(range(2 * VALIDATION, 240, 2)) and seen[1] <= set(range(1, 240, 2))
    assert len(seen[0]) > 0.9 * (120 - VALIDATION) and len(seen[1]) > 0.9 * 120


def test_a_saved_stream_position_gives_the_batches_that_follow_it(tmp_path):
    corpus = write_stream_corpus(tmp_path / "corpus")
    data = prepared(tmp_path, corpus)
    batches = iter(DataLoader(data.train, batch_size=4, collate_fn=collate_blocks))
    for _ in range(3):
        next(batches)
    state = data.train.state_dict()
    following = [next(batches)["input_ids"] for _ in range(3)]
    fresh = prepared(tmp_path, corpus)  # a new process: the cache, and a stream opened again
    fresh.train.load_state_dict(json.loads(json.dumps(state)))  # through JSON, as a checkpoint keeps it
    resumed = iter(DataLoader(fresh.train, batch_size=4, collate_fn=collate_blocks))
    assert all(torch.equal(next(resumed)["input_ids"], b) for b in following)


@pytest.mark.slow
def test_streaming_run_resumes_exactly_and_refuses_bad_setups(tmp_path):
    corpus = write_stream_corpus(tmp_path / "corpus")
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    steps = dict(max_steps=8, save_interval=4, eval_interval=4, hidden_dropout=0.1)
    errors = main_cases([stream_args(tmp_path, corpus, output_dir=straight, **steps),
                         stream_args(tmp_path, corpus, output_dir=halves, **{**steps, "max_steps": 4}),
                         stream_args(tmp_path, corpus, output_dir=halves, resume_from_checkpoint="latest", **steps),
                         ["--streaming", "true", "--data_files", str(corpus), "--output_dir", str(tmp_path / "x")],
                         ["--streaming", "true", "--validation_documents", "5", "--output_dir", str(tmp_path / "y")]])
    assert errors[:3] == [None, None, None]
    # no --validation_documents: the default 500 (a stream has no length to take a share of), too many here
    assert "UserError: the stream holds only 240 document(s): validation_documents=500 leaves nothing" in errors[3]
    assert "must be False for the embedded default corpus" in errors[4]
    assert train_losses(halves) == train_losses(straight)  # every step, bit for bit
    a, b = load_file(straight / "final" / "model.safetensors"), load_file(halves / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (halves / "checkpoint-4" / stream_state_name(0, 1)).is_file()


@pytest.mark.slow
def test_a_resume_keeps_the_runs_tokenizer_and_names_the_data_files_changed_since(tmp_path):
    """A stream's documents edited after its checkpoint would train another tokenizer (token ids move); the
    resumed run keeps the saved one, warns naming the file, and says that a shrunken stream ends early."""
    corpus = write_stream_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    launch(stream_args(tmp_path, corpus, output_dir=run, max_steps=4, save_interval=4, eval_interval=4))
    saved = AutoTokenizer.from_pretrained(run / "checkpoint-4")
    lines = (corpus / "part0.jsonl").read_text().splitlines()
    edited = [json.dumps({"text": f"doc{i}. zebra quokka axolotl narwhal " * 4}) for i in range(len(lines) // 2)]
    (corpus / "part0.jsonl").write_text("\n".join(lines[:VALIDATION] + edited) + "\n")  # new words, half the lines
    fresh = prepared(tmp_path / "fresh", corpus).tokenizer
    assert fresh.get_vocab() != saved.get_vocab()  # what a fresh run would train: another tokenizer
    result = launch(stream_args(tmp_path, corpus, output_dir=run, max_steps=8, save_interval=4, eval_interval=4,
                                resume_from_checkpoint="latest"))
    assert f"warning: data files changed since {run / 'checkpoint-4'}:" in result.stdout
    assert re.search(r"part0\.jsonl: shrank \([\d,]+ -> [\d,]+ bytes\)", result.stdout), result.stdout[-2000:]
    assert "the resumed stream's pass ends earlier than the run's" in result.stdout
    assert "keeps the tokenizer saved in" in result.stdout
    for folder in (run / "checkpoint-8", run / "final"):
        assert AutoTokenizer.from_pretrained(folder).get_vocab() == saved.get_vocab()


def test_a_stream_position_resumes_only_on_the_number_of_processes_that_saved_it(tmp_path):
    for rank in (0, 1):
        (tmp_path / stream_state_name(rank, 2)).write_text("{}")
    assert read_stream_state(tmp_path, 1, 2) == {}
    with pytest.raises(ValueError, match=r"positions of 2 process\(es\), and this launch has 1: .*--num_processes 2"):
        read_stream_state(tmp_path, 0, 1)


def test_two_processes_stream_their_own_shares_and_save_both_positions(tmp_path):
    corpus = write_stream_corpus(tmp_path / "corpus")  # one file: each process keeps one document in 2
    result = launch(stream_args(tmp_path, corpus, output_dir=tmp_path / "run", max_steps=4, save_interval=4,
                                eval_interval=4, per_device_train_batch_size=2, cpu_threads=1),
                    config_file="accelerate_configs/cpu_ddp.yaml")
    assert "2 process(es) (MULTI_CPU)" in result.stdout and "keeps one in 2" in result.stdout
    for rank in (0, 1):
        assert json.loads((tmp_path / "run" / "checkpoint-4" / stream_state_name(rank, 2)).read_text())["epoch"] == 0
