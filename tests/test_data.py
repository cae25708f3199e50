"""Data preparation: document split, packing, cache, tokenizer, sharding and bad input."""

import json
import time

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from transformers import AutoTokenizer

from moe_reason import MoEReasonConfig
from moe_reason.data import prepare as data_module
from conftest import write_corpus
from moe_reason.data.corpus import cut_text, load_documents, pack, split_documents, stdlib_files
from moe_reason.data.prepare import DataArguments, EpochSampler, check_against_model, prepare_data
from moe_reason.errors import UserError


def args_for(tmp_path, corpus, **overrides):
    settings = dict(data_files=[str(corpus)], data_cache_dir=str(tmp_path / "cache"), tokenizer_vocab_size=320,
                    block_size=16, validation_documents=5, preprocessing_num_workers=1)
    return DataArguments(**{**settings, **overrides})


def doc_ids(dataset):
    return {int(text.split(":")[0].split()[1]) for text in dataset["text"]}


def test_split_is_by_document_and_deterministic(tmp_path):
    args = args_for(tmp_path, write_corpus(tmp_path))
    docs = load_documents(args)
    train, val = split_documents(docs, args)
    assert not doc_ids(train) & doc_ids(val)
    assert doc_ids(train) | doc_ids(val) == set(range(40)) and len(val) == 5
    again_train, again_val = split_documents(docs, args)
    assert again_train["text"] == train["text"] and again_val["text"] == val["text"]
    args.data_seed = 1
    assert doc_ids(split_documents(docs, args)[1]) != doc_ids(val)


def test_packing_keeps_every_token_in_order_with_one_eos_between_documents(tmp_path):
    args = args_for(tmp_path, write_corpus(tmp_path, n=13))
    prepared = prepare_data(args, log=lambda _: None)
    tok = prepared.tokenizer
    _, val_docs = split_documents(load_documents(args), args)
    expected = []
    for text in val_docs["text"]:
        expected += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor(prepared.validation["input_ids"]).flatten()
    labels = torch.tensor(prepared.validation["labels"]).flatten()
    kept = labels != -100
    assert ids[kept].tolist() == expected  # every token, in order, EOS after each document
    assert kept.sum() == len(expected) and len(ids) - len(expected) < args.block_size  # only the tail is padding
    assert torch.equal(ids[kept], labels[kept])  # labels are the inputs; the model shifts them


def test_pack_on_hand_made_documents():
    from datasets import Dataset
    tokenized = Dataset.from_dict({"input_ids": [[1, 2, 9], [3, 9], [4, 5, 6, 9]]})
    packed = pack(tokenized, block_size=4, pad_id=0)
    assert packed["input_ids"] == [[1, 2, 9, 3], [9, 4, 5, 6], [9, 0, 0, 0]]
    assert packed["labels"][-1] == [9, -100, -100, -100]
    assert pack(tokenized, block_size=4, pad_id=0, max_tokens=8)["input_ids"] == [[1, 2, 9, 3], [9, 4, 5, 6]]


def test_second_preparation_hits_the_cache_and_changes_miss_it(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path)
    first = prepare_data(args_for(tmp_path, corpus), log=lambda _: None)
    assert first.summary["cache_hit"] is False

    def must_not_tokenize(*_, **__):
        raise AssertionError("re-tokenized although the cache holds this preparation")

    real_tokenize = data_module.tokenize
    monkeypatch.setattr(data_module, "tokenize", must_not_tokenize)
    second = prepare_data(args_for(tmp_path, corpus), log=lambda _: None)
    assert second.summary["cache_hit"] is True
    assert second.train["input_ids"] == first.train["input_ids"]

    calls = []
    monkeypatch.setattr(data_module, "tokenize", lambda *a, **k: calls.append(1) or real_tokenize(*a, **k))
    assert prepare_data(args_for(tmp_path, corpus, block_size=32), log=lambda _: None).summary["cache_hit"] is False
    assert calls
    tok_dir = tmp_path / "cache" / first.summary["cache_key"] / "tokenizer"
    other_tok = args_for(tmp_path, corpus, tokenizer_name=str(tok_dir))
    assert data_module.cache_key(other_tok) != first.summary["cache_key"]
    assert prepare_data(other_tok, log=lambda _: None).summary["cache_hit"] is False


def test_trained_tokenizer_round_trips_and_reloads(tmp_path):
    prepared = prepare_data(args_for(tmp_path, write_corpus(tmp_path)), log=lambda _: None)
    folder = tmp_path / "cache" / prepared.summary["cache_key"] / "tokenizer"
    reloaded = AutoTokenizer.from_pretrained(folder)
    text = "document 3: word3_1 alpha beta, unseen Ünïcode ✓ text\n\tindented"
    ids = reloaded(text, add_special_tokens=False)["input_ids"]
    assert reloaded.decode(ids) == text  # byte-level: any text round-trips
    assert ids == prepared.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(reloaded) == 320 and reloaded.eos_token == "<|endoftext|>"


def test_epoch_sampler_is_seeded_and_ranks_get_disjoint_shards():
    sampler = EpochSampler(20, seed=3)
    epoch0 = list(sampler)
    assert epoch0 == list(EpochSampler(20, seed=3)) and sorted(epoch0) == list(range(20))
    sampler.set_epoch(1)
    assert list(sampler) != epoch0
    batches = torch.utils.data.BatchSampler(EpochSampler(20, seed=3), batch_size=2, drop_last=True)
    shards = [list(BatchSamplerShard(batches, num_processes=2, process_index=rank)) for rank in (0, 1)]
    seen = [i for shard in shards for batch in shard for i in batch]
    assert sorted(seen) == list(range(20))  # together the ranks see each block of the epoch exactly once


def test_default_corpus_is_the_standard_library():
    files = stdlib_files()
    assert len(files) > 100 and any(f.name == "json" or f.parent.name == "json" for f in files)
    assert not any("test" in f.parts or "site-packages" in f.parts for f in files)


@pytest.mark.parametrize("case", ["missing_file", "missing_folder", "empty_folder", "empty_corpus", "no_text_column",
                                  "no_validation_left", "mixed_formats"])
def test_bad_input_gets_a_clear_error(tmp_path, case):
    if case == "missing_file":
        args, err, match = args_for(tmp_path, tmp_path / "nope.jsonl"), FileNotFoundError, "not found.*nope.jsonl"
    elif case == "missing_folder":
        args, err, match = args_for(tmp_path, tmp_path / "nodir"), FileNotFoundError, "not found.*nodir"
    elif case == "empty_folder":
        (tmp_path / "empty").mkdir()
        args, err, match = args_for(tmp_path, tmp_path / "empty"), FileNotFoundError, "holds no data files"
    elif case == "empty_corpus":
        (tmp_path / "blank.txt").write_text("   \n")
        args, err, match = args_for(tmp_path, tmp_path / "blank.txt"), ValueError, "corpus is empty"
    elif case == "no_text_column":
        args = args_for(tmp_path, write_corpus(tmp_path, column="body"))
        err, match = ValueError, "'text' not found.*body"
    elif case == "no_validation_left":
        args = args_for(tmp_path, write_corpus(tmp_path), max_documents=5)
        err, match = ValueError, "leave no training data"
    else:
        (tmp_path / "a.txt").write_text("hello")
        args, err, match = args_for(tmp_path, write_corpus(tmp_path)), ValueError, "mix formats"
        args.data_files.append(str(tmp_path / "a.txt"))
    with pytest.raises(err, match=match):
        prepare_data(args, log=lambda _: None)


def test_data_the_model_cannot_take_is_refused(tmp_path):
    prepared = prepare_data(args_for(tmp_path, write_corpus(tmp_path)), log=lambda _: None)
    with pytest.raises(ValueError, match="block_size=16 is larger than the model's max_position_embeddings=8"):
        check_against_model(prepared, MoEReasonConfig.from_preset("debug", vocab_size=320, max_position_embeddings=8))
    with pytest.raises(ValueError, match="tokenizer has 320 tokens but the model's vocab_size=256"):
        check_against_model(prepared, MoEReasonConfig.from_preset("debug"))
    check_against_model(prepared, MoEReasonConfig.from_preset("debug", vocab_size=320))


@pytest.mark.parametrize("field,value", [("block_size", 1), ("validation_split", 1.0), ("tokenizer_vocab_size", 10),
                                         ("max_documents", 1)])
def test_invalid_data_arguments(field, value):
    with pytest.raises(ValueError, match=f"DataArguments.{field}"):
        DataArguments(**{field: value})


def test_unreachable_hub_dataset_fails_fast_with_a_way_out(tmp_path):
    start = time.perf_counter()
    with pytest.raises(UserError, match="(?s)could not load Hub dataset.*--data_files"):
        prepare_data(DataArguments(dataset_name="nobody/no-such-corpus", data_cache_dir=str(tmp_path)),
                     log=lambda _: None)
    assert time.perf_counter() - start < 30  # offline mode answers at once; no 50 s of retries


def test_prepare_data_cli_prints_a_json_summary(tmp_path, capsys):
    from moe_reason.data.prepare_data import main
    corpus = write_corpus(tmp_path)
    main(["--data_files", str(corpus), "--data_cache_dir", str(tmp_path / "c"), "--tokenizer_vocab_size", "320",
          "--block_size", "16", "--validation_documents", "4", "--preprocessing_num_workers", "1"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["train"]["documents"] == 36 and summary["validation"]["documents"] == 4
    assert summary["vocab_size"] == 320 and summary["block_size"] == 16 and summary["cache_path"]
    assert summary["train"]["tokens"] > 0 and "seconds" in summary


def test_one_big_text_file_is_cut_into_pieces_so_a_split_exists(tmp_path):
    """A single file (a book) used to be one document that left nothing to hold out. Long documents are cut
    at blank lines, then at line breaks, then every max_document_chars characters, before the split."""
    book = tmp_path / "book.txt"
    paragraphs = [f"Chapter {i}. " + " ".join(f"word{i}_{j}" for j in range(40)) for i in range(300)]
    book.write_text("\n\n".join(paragraphs))
    args = DataArguments(data_files=[str(book)], max_document_chars=2000, tokenizer_vocab_size=300, block_size=32,
                         validation_split=0.1, data_cache_dir=str(tmp_path / "cache"), preprocessing_num_workers=1)
    prepared = prepare_data(args, log=lambda _: None)
    summary = prepared.summary
    assert summary["train"]["documents"] > 60 and summary["validation"]["documents"] >= 7  # 75 pieces
    assert "piece of at most 2,000 characters" in summary["split_unit"] and len(prepared.validation) > 0
    text = book.read_text()
    assert "".join(cut_text(text, 2000)).replace("\n", "") == text.replace("\n", "")  # nothing lost, in order
    assert all(len(p) <= 2000 for p in cut_text(text, 2000))
    assert cut_text("\n\n".join(paragraphs[:3]), 2000)[0].startswith("Chapter 0")
    line = "x" * 5000 + "\nshort line"  # no blank line, and a line longer than the limit
    assert [len(p) for p in cut_text(line, 2000)] == [2000, 2000, 1000 + 1 + len("short line")]
    assert cut_text("y" * 4500, 2000) == ["y" * 2000, "y" * 2000, "y" * 500]
    # by default a corpus of few documents is cut into about 100 pieces: a book trains out of the box
    auto = prepare_data(DataArguments(data_files=[str(book)], tokenizer_vocab_size=300, block_size=32,
                                      data_cache_dir=str(tmp_path / "cache")), log=lambda _: None).summary
    assert 100 <= auto["train"]["documents"] + auto["validation"]["documents"] <= 160  # whole paragraphs per piece
    assert auto["validation"]["documents"] >= 4


def test_a_text_file_too_big_to_read_whole_is_refused_naming_the_limit(tmp_path):
    huge = tmp_path / "dump.txt"
    with open(huge, "wb") as f:  # sparse: 1.5 GiB on paper, nothing on disk
        f.truncate(3 * 2**29)
    with pytest.raises(ValueError, match="dump.txt is 1.5 GiB: a .txt/.md/.py file is read whole, up to 1 GiB"):
        prepare_data(DataArguments(data_files=[str(huge)], data_cache_dir=str(tmp_path / "cache")), log=lambda _: None)
