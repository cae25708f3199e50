"""Is data preparation ever the reason training waits?

Prepares the embedded default corpus cold (fresh cache: BPE training, tokenization,
packing), streams the same files (`--streaming`: tokenized and packed on the fly, one rank's
reader, timed after the validation slice and tokenizer are cached), and times training steps
(forward + backward + AdamW) of the `small` model on the same machine, then prints all three
in tokens/s. Last lines: preparation / training and streaming / training (targets: >= 10 and
>= 1, the stream being read while training runs).

    python benchmarks/data_throughput.py [--steps 5] [--batch_size 8] [--max_documents N]
"""

import argparse
import tempfile
import time

import torch

from moe_reason import MoEReasonConfig, MoEReasonForCausalLM
from moe_reason.data.corpus import stdlib_files
from moe_reason.data.prepare import DataArguments, collate_blocks, prepare_data
from timing import time_rounds, training_step


def time_stream(args) -> tuple[int, float]:
    """Tokens read from the training stream of the default corpus's files, and the seconds it took."""
    files = [str(p) for p in stdlib_files()][: args.max_documents]  # a quick run lists only the files it reads
    with tempfile.TemporaryDirectory() as cache:
        stream_args = DataArguments(data_files=files, streaming=True, validation_documents=20, data_cache_dir=cache,
                                    block_size=args.block_size, max_documents=args.max_documents)
        stream = prepare_data(stream_args, log=lambda _: None).train  # the tokenizer and validation slice: not timed
        loader = torch.utils.data.DataLoader(stream, batch_size=args.batch_size, collate_fn=collate_blocks)
        start, tokens = time.perf_counter(), 0
        for batch in loader:
            tokens += batch["input_ids"].numel()
            if tokens >= args.stream_tokens:
                break
        return tokens, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--max_documents", type=int, default=None, help="cap the corpus (for a quick run)")
    parser.add_argument("--stream_tokens", type=int, default=2_000_000, help="tokens to read from the stream")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        data = prepare_data(DataArguments(data_cache_dir=cache, block_size=args.block_size,
                                          max_documents=args.max_documents), log=lambda _: None)
        prep_seconds = time.perf_counter() - start
    prep_tokens = data.summary["train"]["tokens"] + data.summary["validation"]["tokens"]
    prep_rate = prep_tokens / prep_seconds
    stream_tokens, stream_seconds = time_stream(args)
    stream_rate = stream_tokens / stream_seconds

    torch.manual_seed(0)
    config = MoEReasonConfig.from_preset(args.preset, vocab_size=data.summary["vocab_size"])
    model = MoEReasonForCausalLM(config)
    batch = torch.tensor(data.train[: args.batch_size]["input_ids"], dtype=torch.long)
    seconds = time_rounds({"train": training_step(model, batch, torch.device("cpu"))}, torch.device("cpu"),
                          rounds=1, steps_per_round=args.steps, warmup=1)["train"][0]
    train_rate = batch.numel() / seconds

    print(f"preparation: {prep_tokens} tokens in {prep_seconds:.1f} s = {prep_rate:,.0f} tokens/s (cold cache)")
    print(f"training ({args.preset}, batch {args.batch_size}x{args.block_size}): {train_rate:,.0f} tokens/s")
    print(f"streaming: {stream_tokens} tokens in {stream_seconds:.1f} s = {stream_rate:,.0f} tokens/s")
    print(f"ratio preparation/training: {prep_rate / train_rate:.1f}")
    print(f"ratio streaming/training: {stream_rate / train_rate:.1f}")


if __name__ == "__main__":
    main()
