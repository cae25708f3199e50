"""Data: documents in, packed token blocks out, cached on disk.

    documents (Hub id | local files | the Python standard library's own sources)
      -> split by document, deterministic for a seed (no document in both splits)
      -> tokenizer (Hub id | local folder | byte-level BPE trained on the train split)
      -> batched `datasets.map` tokenization, EOS after every document
      -> packed into fixed blocks; labels = inputs (the model shifts them)
      -> saved under cache_dir/<key>, the key hashing everything that changes the result

`prepare_data(args)` is the one function the trainer calls; the steps are `corpus.py`'s, and with
--streaming the training set is read while training (`streaming.py`).
"""

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset, load_from_disk
from transformers import AutoTokenizer

from ..atomic import install, staged
from ..errors import UserError
from ..models.configuration_moe_reason import require
from ..tasks.puzzles import TaskArguments, formulation_of, make_task, prepare_task_data
from .corpus import (FEW_DOCUMENTS, LONG_DOCUMENT, PreparedData, cache_key, cut_long_documents, flat_ids,
                     load_documents, load_or_train_tokenizer, pack, padding_id, source_identity, source_listing,
                     split_documents, tokenize)
from .streaming import prepare_stream

STREAM_VALIDATION_DOCUMENTS = 500  # held out from the start of a stream when --validation_documents is not given


@dataclass
class DataArguments(TaskArguments):
    dataset_name: str | None = field(default=None, metadata={"help": (
        "Hub dataset id, e.g. HuggingFaceTB/smollm-corpus (exp8's). Leave unset for local files or the "
        "embedded offline default: the running Python's standard-library sources, one document per file.")})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset config, e.g. cosmopedia-v2."})
    dataset_split: str = field(default="train", metadata={"help": "Split of the Hub dataset to read documents from."})
    data_files: list[str] | None = field(default=None, metadata={"help": (
        "Local .txt/.md/.py (one document per file), .json/.jsonl or .parquet files, or folders of them.")})
    text_column: str = field(default="text", metadata={"help": "Column holding the document text."})
    streaming: bool = field(default=False, metadata={"help": (
        "Read the corpus (a Hub dataset or local files) as a stream while training: nothing of it is stored, "
        "each rank reads its own share, and checkpoints save the position. The stream's first "
        f"validation_documents are held out (default {STREAM_VALIDATION_DOCUMENTS}: a stream has no length to take "
        "a validation_split of). See moe_reason/data/streaming.py.")})
    stream_tokenizer_documents: int = field(default=10_000, metadata={"help": (
        "With --streaming and no tokenizer_name: the BPE tokenizer is trained on this many documents after the "
        "validation slice.")})
    tokenizer_name: str | None = field(default=None, metadata={"help": (
        "Hub id or local folder of a tokenizer, e.g. HuggingFaceTB/SmolLM-135M. Unset: train a byte-level "
        "BPE tokenizer on the training documents.")})
    tokenizer_vocab_size: int = field(default=8192, metadata={"help": "Vocabulary size of a trained tokenizer."})
    block_size: int = field(default=256, metadata={"help": "Tokens per training sequence (packed block)."})
    validation_split: float = field(default=0.05, metadata={"help": "Share of documents held out for validation."})
    validation_documents: int | None = field(default=None, metadata={"help": (
        "Number of documents held out for validation; overrides validation_split (with --streaming: default "
        f"{STREAM_VALIDATION_DOCUMENTS}, the stream's first).")})
    max_document_chars: int | None = field(default=None, metadata={"help": (
        "Cut longer documents into pieces of at most this many characters before the train/validation split: at "
        f"blank lines, else at line breaks, else every max_document_chars characters. Default: {LONG_DOCUMENT:,}, "
        f"or for a corpus of fewer than {FEW_DOCUMENTS} documents its length / {FEW_DOCUMENTS}, so that one big "
        "text file (a book, a dump) splits too. The data summary's split_unit says what was held out. 0: never cut.")})
    max_documents: int | None = field(default=None, metadata={"help": (
        "Use at most this many documents (pieces, after cutting; before the split).")})
    max_train_tokens: int | None = field(
        default=None, metadata={"help": "Keep at most this many training tokens (whole blocks)."})
    data_cache_dir: str = field(default=os.path.join("~", ".cache", "moe_reason", "data"), metadata={"help": (
        "Where prepared datasets are cached; a second run with the same settings loads them in seconds.")})
    preprocessing_num_workers: int = field(default=min(8, os.cpu_count() or 1), metadata={"help": (
        "Processes for tokenization with datasets.map.")})
    data_seed: int = field(default=0, metadata={"help": "Seed of the train/validation document split."})

    def __post_init__(self):
        super().__post_init__()
        checks = [
            ("block_size", self.block_size > 1, "an integer > 1"),
            ("tokenizer_vocab_size", self.tokenizer_vocab_size >= 300, "an integer >= 300 (256 bytes + merges)"),
            ("validation_split", 0.0 < self.validation_split < 1.0, "a share in (0, 1)"),
            ("validation_documents", self.validation_documents is None or self.validation_documents >= 1,
             "None or >= 1"),
            ("max_documents", self.max_documents is None or self.max_documents >= 2, "None or >= 2"),
            ("max_document_chars", self.max_document_chars in (None, 0) or self.max_document_chars >= 100,
             "None (automatic), 0 (never cut) or >= 100"),
            ("max_train_tokens", self.max_train_tokens is None or self.max_train_tokens >= self.block_size,
             f"None or >= block_size={self.block_size}"),
            ("preprocessing_num_workers", self.preprocessing_num_workers >= 1, "an integer >= 1"),
        ]
        for name, ok, allowed in checks:
            require(self, name, ok, allowed)
        if self.dataset_name and self.data_files:
            raise UserError("give either dataset_name (Hub) or data_files (local), not both")
        if self.streaming:
            require(self, "streaming", bool(self.dataset_name or self.data_files),
                    "False for the embedded default corpus, which is read whole: stream a dataset_name or data_files")
            if self.validation_documents is None:  # a stream has no length to take validation_split of
                self.validation_documents = STREAM_VALIDATION_DOCUMENTS
            require(self, "streaming", self.max_train_tokens is None and not self.task,
                    "used without max_train_tokens and task (max_steps bounds what a stream trains on)")
            require(self, "stream_tokenizer_documents", self.stream_tokenizer_documents >= 1, "an integer >= 1")

    def sequence_length(self) -> int:
        """Tokens per training sequence: block_size, or what a task's formulation makes of its grid."""
        return formulation_of(self.task_settings()).length(make_task(self.task_settings())) if self.task \
            else self.block_size


# ----------------------------------------------------------------------------
# The one entry point


def prepare_data(args: DataArguments, log=print, rank: int = 0, world_size: int = 1) -> PreparedData:
    """Packed train/validation datasets and the tokenizer, from the cache when possible. With --streaming the
    training set is this rank's (of world_size) stream, read as training goes (`streaming.py`)."""
    if args.task:
        return PreparedData(*prepare_task_data(args, log), sampler=DrawSampler)
    if args.streaming:
        return prepare_stream(args, rank, world_size, log)
    data = prepare_corpus(args, log)
    data.summary["files"] = source_listing(args)  # as they are now, cache hit or not: what a checkpoint records
    return data


def prepare_corpus(args: DataArguments, log=print) -> PreparedData:
    """Packed train/validation datasets and the tokenizer of a corpus read whole, from the cache when possible."""
    start = time.perf_counter()
    key = cache_key(args)
    root = Path(args.data_cache_dir).expanduser() / key
    if (root / "summary.json").exists():
        summary = json.loads((root / "summary.json").read_text())
        summary.update(cache_hit=True, seconds=round(time.perf_counter() - start, 3))
        return load_prepared(root, summary)

    log(f"preparing data (cache miss {key}) ...")
    docs, unit = cut_long_documents(load_documents(args, log), args, log)
    train_docs, val_docs = split_documents(docs, args)
    tmp = staged(root)
    tokenizer = load_or_train_tokenizer(args, train_docs, tmp / "tokenizer", log)
    pad_id = padding_id(tokenizer)
    splits, summary = {}, {"cache_key": key, "cache_path": str(root), "split_unit": unit, "vocab_size": len(tokenizer),
                           "block_size": args.block_size, "eos_token_id": tokenizer.eos_token_id}
    for name, part, cap in (("train", train_docs, args.max_train_tokens), ("validation", val_docs, None)):
        tokenized = tokenize(part, tokenizer, args.preprocessing_num_workers)
        splits[name] = pack(tokenized, args.block_size, pad_id, cap)
        tokens = len(flat_ids(tokenized))  # not a Python pass over every document's list
        summary[name] = {"documents": len(part), "tokens": tokens, "blocks": len(splits[name])}
        splits[name].save_to_disk(str(tmp / name))
    summary["source"] = source_identity(args)
    (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    install(tmp, root, keep_existing=True)  # another process may have finished first
    summary.update(cache_hit=False, seconds=round(time.perf_counter() - start, 3))
    return load_prepared(root, summary)


def load_prepared(root: Path, summary: dict) -> PreparedData:
    """A complete cache entry -> PreparedData (the same objects on a hit and right after a miss)."""
    return PreparedData(load_from_disk(str(root / "train")), load_from_disk(str(root / "validation")),
                        AutoTokenizer.from_pretrained(root / "tokenizer"), summary, sampler=EpochSampler)


def check_block_fits(block_size: int, config, remedy: str = "") -> None:
    """Refuse blocks longer than the model's positions (the trainer checks before preparing any data)."""
    if block_size > config.max_position_embeddings:
        raise UserError(f"block_size={block_size} is larger than the model's "
                        f"max_position_embeddings={config.max_position_embeddings}{remedy}")


def check_against_model(data: PreparedData, config, vocab_remedy: str | None = None) -> None:
    """Refuse data the model cannot take: too-long blocks, ids beyond its vocabulary. `vocab_remedy` is what
    to do about a tokenizer larger than the model (default: the trainer's --vocab_size)."""
    check_block_fits(data.summary["block_size"], config)
    if data.summary["vocab_size"] > config.vocab_size:
        remedy = vocab_remedy or f"set --vocab_size {data.summary['vocab_size']} or more"
        raise UserError(f"the tokenizer has {data.summary['vocab_size']} tokens but the model's "
                        f"vocab_size={config.vocab_size}; {remedy}")
    for name, split in (("train", data.train), ("validation", data.validation)):
        if not isinstance(split, Dataset):
            continue  # a task's draws: ids come from its own tokenizer's vocabulary
        ids = flat_ids(split)
        if len(ids) and ids.max() >= config.vocab_size:
            raise UserError(f"{name} data holds token id {int(ids.max())} >= vocab_size={config.vocab_size}")


# ----------------------------------------------------------------------------
# Order of training blocks


class EpochSampler(torch.utils.data.Sampler):
    """A fresh seeded permutation of the blocks every epoch: seed + epoch decides it.

    The order is a pure function of (seed, epoch), so a resumed run rebuilds it exactly and
    skips the batches it already consumed; Accelerate's prepared DataLoader then hands each
    rank a disjoint share of every global batch (it calls `set_epoch` at each new epoch).
    """

    def __init__(self, num_blocks: int, seed: int):
        self.num_blocks, self.seed, self.epoch = num_blocks, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_blocks, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_blocks


class DrawSampler(EpochSampler):
    """EpochSampler's order, with indices offset by epoch x N: a task's `PuzzleDraws` reads the
    offset as "draw a fresh augmentation for this epoch"."""

    def __iter__(self):
        return (self.epoch * self.num_blocks + i for i in super().__iter__())


def collate_blocks(rows: list[dict]) -> dict:
    """Rows of packed blocks -> {"input_ids", "labels"} LongTensors [B, block_size]."""
    return {key: torch.tensor([row[key] for row in rows], dtype=torch.long) for key in ("input_ids", "labels")}
