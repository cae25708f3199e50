"""True streaming (`--streaming`): a corpus larger than the disk, read lazily as a `datasets` IterableDataset.

    the stream (a Hub dataset, or local files read as one)
      -> its first validation_documents documents: the fixed validation slice, packed and cached like any
         corpus; their texts' hashes are kept, and the training stream leaves out every document with one
         (a duplicate of a validation document too), however the stream is split
      -> the next stream_tokenizer_documents: what a BPE tokenizer is trained on (unless --tokenizer_name)
      -> this rank's share: whole files (`split_dataset_by_node`) when their number divides among the
         ranks, else every world_size-th document; tokenized and packed on the fly,
         STREAM_PACK_DOCUMENTS documents at a time

Nothing of the training stream is stored. Its position is the IterableDataset's `state_dict()`, which
each rank saves in every checkpoint (`layout.stream_state_name`), so a resumed run reads the batches
the uninterrupted run would have read. It resumes on the number of processes that saved it: each
rank's position is within its own share of the documents, and another split has other shares.
Documents are not shuffled, which keeps the resume exact (a shuffle buffer's content is not part of
the state).
"""

import hashlib
import json
import time
from pathlib import Path

import numpy as np
from datasets import Dataset, IterableDataset, load_dataset
from datasets.distributed import split_dataset_by_node
from transformers import AutoTokenizer

from ..atomic import install, staged
from ..errors import UserError
from .corpus import (LOADERS, PreparedData, cache_key, check_text_file_sizes, expand_files, load_or_train_tokenizer,
                     pack, padding_id, source_identity, source_listing, tokenize)

HELD_OUT = "held_out.json"  # in the cache entry: the validation documents' keys, left out of the training stream
STREAM_PACK_DOCUMENTS = 256  # documents packed together; the tokens left over from each group (< a block) are dropped


def open_stream(args) -> IterableDataset:
    """The corpus as a stream of documents with one `text` column, in the source's order."""
    if args.dataset_name:
        try:
            stream = load_dataset(args.dataset_name, args.dataset_config, split=args.dataset_split, streaming=True)
        except (ConnectionError, FileNotFoundError, OSError, ValueError) as err:
            raise UserError(f"could not open Hub dataset {args.dataset_name!r} as a stream: {err}\nNo network? "
                            "Stream local files instead: --streaming --data_files path/to/shards/") from err
    else:
        files = expand_files(args.data_files)
        loader = LOADERS[files[0].suffix]
        if loader == "text":
            check_text_file_sizes(files)
        kwargs = {"sample_by": "document"} if loader == "text" else {}
        stream = load_dataset(loader, data_files=[str(p) for p in files], split="train", streaming=True, **kwargs)
    if stream.column_names is not None and args.text_column not in stream.column_names:
        raise UserError(f"text column {args.text_column!r} not found; columns are {stream.column_names} "
                        "(set --text_column)")
    stream = stream.select_columns([args.text_column])
    if args.text_column != "text":
        stream = stream.rename_column(args.text_column, "text")
    stream = stream.filter(lambda batch: [bool(t and t.strip()) for t in batch["text"]], batched=True)
    return stream.take(args.max_documents) if args.max_documents else stream


def packer(tokenizer, block_size: int):
    """A batched map: documents -> [block_size] blocks of their ids (EOS after each), labels = inputs."""
    eos = tokenizer.eos_token_id

    def pack_documents(batch: dict) -> dict:
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        flat = np.fromiter((t for doc in ids for t in (*doc, eos)), dtype=np.int64)
        blocks = flat[: len(flat) // block_size * block_size].reshape(-1, block_size)  # [N, block_size]
        return {"input_ids": blocks.tolist(), "labels": blocks.tolist()}

    return pack_documents


def document_key(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def training_stream(args, tokenizer, held_out: set[str], rank: int, world_size: int, log=print) -> IterableDataset:
    """This rank's packed training blocks: the stream without the held-out documents, this rank's share of it."""
    stream = open_stream(args).filter(lambda batch: [document_key(t) not in held_out for t in batch["text"]],
                                      batched=True)
    if stream.n_shards % world_size == 0:  # whole files (shards) per rank: each reads only its own
        share = split_dataset_by_node(stream, rank=rank, world_size=world_size)
    else:  # split_dataset_by_node would step over the packed blocks, so every rank would tokenize everything
        share = stream.filter(lambda _, i: i % world_size == rank, with_indices=True)
        if rank == 0 and world_size > 1:
            log(f"streaming: {stream.n_shards} file(s) do not divide among {world_size} processes, so each reads "
                f"every document and keeps one in {world_size}; give a multiple of {world_size} files for each "
                "process to read only its own")
    return share.map(packer(tokenizer, args.block_size), batched=True, batch_size=STREAM_PACK_DOCUMENTS,
                     remove_columns=["text"])


def prepare_stream(args, rank: int, world_size: int, log=print):
    """PreparedData whose `train` is this rank's stream; the validation slice and tokenizer from the cache."""
    start = time.perf_counter()
    key = cache_key(args)
    root = Path(args.data_cache_dir).expanduser() / key
    hit = (root / "summary.json").exists()
    if not hit:
        cache_head_of_stream(args, root, log)
    summary = {**json.loads((root / "summary.json").read_text()), "cache_hit": hit,
               "seconds": round(time.perf_counter() - start, 3), "files": source_listing(args)}
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    held_out = set(json.loads((root / HELD_OUT).read_text()))
    train = training_stream(args, tokenizer, held_out, rank, world_size, log)
    return PreparedData(train, Dataset.load_from_disk(str(root / "validation")), tokenizer, summary, sampler=None)


def cache_head_of_stream(args, root: Path, log=print) -> None:
    """The validation slice (packed), its documents' keys, the tokenizer and the summary, into the cache entry
    `root` (written aside and renamed into place, as data.py's entries)."""
    log(f"streaming: holding out the first {args.validation_documents} documents for validation "
        f"(cache miss {root.name})")
    stream = open_stream(args)
    validation_docs = Dataset.from_dict({"text": [row["text"] for row in stream.take(args.validation_documents)]})
    sample = Dataset.from_dict({"text": [row["text"] for row in stream.skip(args.validation_documents)
                                         .take(args.stream_tokenizer_documents)]})
    if len(sample) == 0:
        raise UserError(f"the stream holds only {len(validation_docs)} document(s): validation_documents="
                        f"{args.validation_documents} leaves nothing to train on")
    tmp = staged(root)
    tokenizer = load_or_train_tokenizer(args, sample, tmp / "tokenizer", log)
    validation = pack(tokenize(validation_docs, tokenizer, 1), args.block_size, padding_id(tokenizer))
    validation.save_to_disk(str(tmp / "validation"))
    (tmp / HELD_OUT).write_text(json.dumps(sorted({document_key(t) for t in validation_docs["text"]})))
    summary = {"cache_key": root.name, "cache_path": str(root), "split_unit": "document", "streaming": True,
               "vocab_size": len(tokenizer), "block_size": args.block_size, "eos_token_id": tokenizer.eos_token_id,
               "train": {"streaming": True, "tokenizer_documents": len(sample)},
               "validation": {"documents": len(validation_docs), "blocks": len(validation)},
               "source": source_identity(args)}
    (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    install(tmp, root, keep_existing=True)  # another process may have finished first
