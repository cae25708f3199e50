"""The corpus's building blocks, shared by the in-memory preparation (`data.py`) and streaming
(`streaming.py`): finding and reading documents, cutting long ones, the document split, the
tokenizer, tokenization and packing, and the cache key. `args` is always the data arguments
(`data.DataArguments`).
"""

import codecs
import hashlib
import json
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, load_dataset
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ..errors import MissingFileError, UserError

CACHE_VERSION = 2  # bump when the prepared data or the trained tokenizer would differ
EOS_TOKEN = "<|endoftext|>"
MAX_PIECE = 256  # characters: the longest run without white space BPE training sees whole
LONG_DOCUMENT, FEW_DOCUMENTS = 1_000_000, 100  # the automatic max_document_chars (see DataArguments)
MAX_TEXT_FILE = 2**30  # bytes: a text file is one string in memory before it is cut
LOADERS = {".txt": "text", ".md": "text", ".py": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
SKIPPED_STDLIB_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclass
class PreparedData:
    """What the trainer trains and evaluates on (`data.prepare_data`)."""
    # columns input_ids, labels: [block_size] int32 each (a task: PuzzleDraws; a stream: IterableDataset)
    train: Dataset
    validation: Dataset
    tokenizer: object  # a transformers tokenizer
    summary: dict
    sampler: type | None  # orders the training examples: EpochSampler, DrawSampler for a task's draws; None: a stream


# ----------------------------------------------------------------------------
# Documents


def stdlib_files() -> list[Path]:
    """The running interpreter's standard-library .py files, test suites excluded, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not SKIPPED_STDLIB_DIRS & set(p.relative_to(root).parts))


def expand_files(paths: list[str]) -> list[Path]:
    """Files and folders -> a sorted list of readable files of one loader type."""
    files = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in LOADERS and p.is_file())
            if not found:
                raise MissingFileError(f"folder {path} holds no data files ({', '.join(sorted(LOADERS))})")
            files += found
        elif path.is_file():
            if path.suffix not in LOADERS:
                raise UserError(f"data file {path} has unsupported type {path.suffix!r}; "
                                f"use {', '.join(sorted(LOADERS))}")
            files.append(path)
        else:
            raise MissingFileError(f"data file or folder not found: {path}")
    loaders = {LOADERS[p.suffix] for p in files}
    if len(loaders) > 1:
        raise UserError(f"data_files mix formats {sorted(loaders)}; give files of one format")
    return files


def check_utf8(files: list[Path]) -> None:
    """Refuse the first file that is not UTF-8 text, naming it and the byte where decoding fails."""
    for path in files:
        decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as err:
                    raise UserError(f"data file {path} is not UTF-8 text: byte {offset + err.start} ({err.reason}). "
                                    "Convert it (e.g. iconv -f LATIN1 -t UTF-8) or leave it out") from None
                offset += len(chunk)


def check_text_file_sizes(files: list[Path]) -> None:
    """A text file is read whole, as one document (then cut into pieces): refuse one too big for that."""
    for path in files:
        size = path.stat().st_size
        if size > MAX_TEXT_FILE:
            raise UserError(f"data file {path} is {size / 2**30:.1f} GiB: a .txt/.md/.py file is read whole, up to "
                            f"{MAX_TEXT_FILE / 2**30:.0f} GiB. Split it (split -C 512M {path.name} part_) or give "
                            "its documents as .jsonl, one per line")


def source_identity(args) -> dict:
    """What the documents are, for the cache key: names, or paths with sizes and mtimes."""
    if args.dataset_name:
        return {"hub": args.dataset_name, "config": args.dataset_config, "split": args.dataset_split}
    listing = source_listing(args)
    return {"files": hashlib.sha256(json.dumps(listing).encode()).hexdigest(), "count": len(listing),
            "default": not args.data_files}


def source_listing(args) -> list[list]:
    """The local documents' files as [path, bytes, mtime_ns] (none for a Hub dataset): what a checkpoint
    records so that a resume can name the files changed since."""
    if args.dataset_name:
        return []
    files = expand_files(args.data_files) if args.data_files else stdlib_files()
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def changed_files(then: list[list], now: list[list]) -> list[str]:
    """What differs between two `source_listing`s, one line per file."""
    before, after = {p: (size, mtime) for p, size, mtime in then}, {p: (size, mtime) for p, size, mtime in now}
    lines = [f"{p}: gone" for p in before if p not in after] + [f"{p}: new" for p in after if p not in before]
    for path in (p for p in before if p in after and before[p] != after[p]):
        (was, _), (size, _) = before[path], after[path]
        how = "shrank" if size < was else "grew" if size > was else "rewritten"
        lines.append(f"{path}: {how} ({was:,} -> {size:,} bytes)")
    return lines


def load_documents(args, log=print) -> Dataset:
    """All documents as a Dataset with one `text` column, in a fixed order."""
    if args.dataset_name:
        raw = _load_hub(args)
    else:
        files = expand_files(args.data_files) if args.data_files else stdlib_files()
        loader = LOADERS[files[0].suffix] if files else "text"
        kwargs = {"sample_by": "document"} if loader == "text" else {}
        if loader == "text":
            check_text_file_sizes(files)
        try:
            raw = load_dataset(loader, data_files=[str(p) for p in files], split="train", **kwargs)
        except Exception as err:  # datasets' errors do not say which file; find it, or pass the error on
            if loader in ("text", "json"):
                check_utf8(files)
            raise UserError(f"could not read the data files ({len(files)}, first {files[0]}): {err}") from err
    if args.text_column not in raw.column_names:
        raise UserError(f"text column {args.text_column!r} not found; columns are {raw.column_names} "
                        "(set --text_column)")
    docs = raw.select_columns([args.text_column])
    if args.text_column != "text":
        docs = docs.rename_column(args.text_column, "text")
    rows = len(docs)
    docs = docs.filter(lambda batch: [bool(t and t.strip()) for t in batch["text"]], batched=True)
    if len(docs) < rows:  # a row without the column reads as None: say so rather than drop it unseen
        log(f"{rows - len(docs)} of {rows} rows have no text in column {args.text_column!r} (missing or blank) "
            "and are left out")
    if len(docs) == 0:
        raise UserError("the corpus is empty: no document with text was found")
    return docs


def _load_hub(args) -> Dataset:
    try:
        return load_dataset(args.dataset_name, args.dataset_config, split=args.dataset_split)
    except (ConnectionError, FileNotFoundError, OSError, ValueError) as err:
        raise UserError(
            f"could not load Hub dataset {args.dataset_name!r} (config {args.dataset_config!r}): {err}\n"
            "No network, or HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set? Use local files instead: "
            "--data_files path/to/docs.jsonl (or .txt/.parquet files or folders), or leave dataset_name "
            "unset to train on the embedded offline corpus.") from err


def cut_text(text: str, max_chars: int, separators: tuple[str, ...] = ("\n\n", "\n")) -> list[str]:
    """`text` -> consecutive pieces of at most `max_chars` characters, cut at the first separator that occurs
    (paragraphs, then lines), and every `max_chars` characters where none is left."""
    if len(text) <= max_chars:
        return [text]
    if not separators:
        return [text[i:i + max_chars] for i in range(0, len(text), max_chars)]
    sep, finer = separators[0], separators[1:]
    out, current = [], ""
    for part in text.split(sep):
        if len(part) > max_chars:  # too long on its own: cut finer, and continue after its last piece
            if current:
                out.append(current)
            *whole, current = cut_text(part, max_chars, finer)
            out += whole
        elif current and len(current) + len(sep) + len(part) > max_chars:
            out.append(current)
            current = part
        else:
            current = f"{current}{sep}{part}" if current else part
    return out + [current] if current.strip() else out


def cut_long_documents(docs: Dataset, args, log=print) -> tuple[Dataset, str]:
    """Documents over max_document_chars cut into pieces (`cut_text`), then max_documents applied
    -> (documents, what the unit of the train/validation split is)."""
    lengths = pc.utf8_length(docs.data.column("text"))
    limit = args.max_document_chars
    if limit is None:
        limit = LONG_DOCUMENT if len(docs) >= FEW_DOCUMENTS else max(1000, pc.sum(lengths).as_py() // FEW_DOCUMENTS)
    unit = "document"
    if limit and (pc.max(lengths).as_py() or 0) > limit:
        before = len(docs)
        docs = docs.map(lambda batch: {"text": [p for t in batch["text"] for p in cut_text(t, limit)]},
                        batched=True, batch_size=16)
        unit = f"document, or a piece of at most {limit:,} characters of a longer one ({before:,} documents " \
               f"became {len(docs):,} pieces)"
        log(f"documents over {limit:,} characters cut into pieces: {before:,} -> {len(docs):,}")
    if args.max_documents is not None:
        docs = docs.select(range(min(args.max_documents, len(docs))))
    return docs, unit


def split_documents(docs: Dataset, args) -> tuple[Dataset, Dataset]:
    """Shuffle documents with the seed and hold out whole documents for validation."""
    n_val = args.validation_documents or max(1, round(len(docs) * args.validation_split))
    if n_val >= len(docs):
        raise UserError(f"{len(docs)} document(s) leave no training data after holding out {n_val} for "
                        "validation; lower validation_documents/validation_split or raise max_documents")
    parts = docs.train_test_split(test_size=n_val, seed=args.data_seed, shuffle=True)
    return parts["train"], parts["test"]


# ----------------------------------------------------------------------------
# Tokenizer


def padding_id(tokenizer) -> int:
    """What pads a last partial block: the pad token, else EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def load_or_train_tokenizer(args, train_docs: Dataset, folder: Path, log=print):
    """A Hub/local tokenizer, or byte-level BPE trained on the training documents; saved to `folder` either way."""
    if args.tokenizer_name:
        try:
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name)
        except OSError as err:
            raise UserError(
                f"could not load tokenizer {args.tokenizer_name!r}: {err}\nGive a local tokenizer folder, or "
                "leave tokenizer_name unset to train a BPE tokenizer on the corpus.") from err
        if tokenizer.eos_token_id is None:
            raise UserError(f"tokenizer {args.tokenizer_name!r} has no EOS token to separate documents")
        tokenizer.save_pretrained(folder)
        return tokenizer
    log(f"training a byte-level BPE tokenizer ({args.tokenizer_vocab_size} tokens) on {len(train_docs)} documents")
    return train_bpe_tokenizer(train_docs["text"], args.tokenizer_vocab_size, folder)


def train_bpe_tokenizer(texts, vocab_size: int, folder: Path):
    """Byte-level BPE (GPT-2 style) with one special token that is EOS, BOS and padding.

    Runs of more than MAX_PIECE characters without white space are cut into pieces of that length
    before the GPT-2 split: BPE training is quadratic in a piece's length, so one long unbroken line
    (minified code, a base64 blob) would otherwise stall it for minutes. Ordinary words never reach it.
    """
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(rf"\S{{{MAX_PIECE}}}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=sys.stderr.isatty(),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer=trainer, length=len(texts))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                      pad_token=EOS_TOKEN, unk_token=None, model_max_length=10**9)
    wrapped.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)  # exactly what a user reloads from an exported model


# ----------------------------------------------------------------------------
# Tokenize and pack


def tokenize(docs: Dataset, tokenizer, num_workers: int) -> Dataset:
    """Documents -> `input_ids` per document with EOS appended (batched map, `num_workers` processes)."""
    eos = tokenizer.eos_token_id

    def encode(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [doc + [eos] for doc in ids]}

    return docs.map(encode, batched=True, batch_size=64, remove_columns=docs.column_names,
                    num_proc=num_workers if num_workers > 1 and len(docs) >= 4 * num_workers else None,
                    desc="tokenizing")


def flat_ids(dataset: Dataset) -> np.ndarray:
    """All `input_ids` of a dataset, rows concatenated in order, straight from the Arrow buffers."""
    return dataset.data.column("input_ids").combine_chunks().flatten().to_numpy()


def pack(tokenized: Dataset, block_size: int, pad_id: int, max_tokens: int | None = None) -> Dataset:
    """Concatenate every document's ids in order and cut into [block_size] blocks.

    Nothing is dropped: the last block is padded with `pad_id`, and its padded positions are
    labelled -100 so the loss ignores them. Built with Arrow buffers, not Python lists.
    """
    flat = flat_ids(tokenized).astype(np.int32)
    if max_tokens is not None:
        flat = flat[: max_tokens // block_size * block_size]
    n_blocks = -(-len(flat) // block_size)
    ids = np.full(n_blocks * block_size, pad_id, dtype=np.int32)
    ids[: len(flat)] = flat
    labels = ids.copy()
    labels[len(flat):] = -100
    table = pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids), block_size),
                      "labels": pa.FixedSizeListArray.from_arrays(pa.array(labels), block_size)})
    return Dataset(table)


# ----------------------------------------------------------------------------
# The cache key


def cache_key(args) -> str:
    settings = {name: getattr(args, name) for name in (
        "dataset_config", "dataset_split", "text_column", "tokenizer_name", "tokenizer_vocab_size", "block_size",
        "validation_split", "validation_documents", "max_documents", "max_document_chars", "max_train_tokens",
        "data_seed")}
    if args.streaming:  # a streamed corpus caches its validation slice and tokenizer only
        settings.update(streaming=True, stream_tokenizer_documents=args.stream_tokenizer_documents)
    settings["tokenizer_name"] = _tokenizer_identity(args.tokenizer_name)
    blob = json.dumps({"v": CACHE_VERSION, "source": source_identity(args), **settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "added_tokens.json", "chat_template.jinja")


def _tokenizer_identity(name: str | None):
    """A local tokenizer folder is identified by its tokenizer files' contents (wherever it lies: a checkpoint's
    tokenizer is the same tokenizer whichever checkpoint holds it); a Hub id by its name."""
    if name and Path(name).expanduser().is_dir():
        folder = Path(name).expanduser()
        digest = hashlib.sha256()
        for file in TOKENIZER_FILES:
            if (folder / file).is_file():
                digest.update(file.encode() + (folder / file).read_bytes())
        return {"sha256": digest.hexdigest()}
    return name
