"""Is data preparation ever the reason training waits?

Prepares the embedded default corpus cold (fresh cache: BPE training, tokenization,
packing) and times training steps (forward + backward + AdamW) of the `small` model on
the same machine, then prints both in tokens/s. Last line: preparation / training ratio
(target: >= 10).

    python benchmarks/data_throughput.py [--steps 5] [--batch_size 8] [--max_documents N]
"""

import argparse
import tempfile
import time

import torch

from moe_reason import MoEReasonConfig, MoEReasonForCausalLM
from moe_reason.data import DataArguments, prepare_data
from timing import time_rounds, training_step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--max_documents", type=int, default=None, help="cap the corpus (for a quick run)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        data = prepare_data(DataArguments(data_cache_dir=cache, block_size=args.block_size,
                                          max_documents=args.max_documents), log=lambda _: None)
        prep_seconds = time.perf_counter() - start
    prep_tokens = data.summary["train"]["tokens"] + data.summary["validation"]["tokens"]
    prep_rate = prep_tokens / prep_seconds

    torch.manual_seed(0)
    config = MoEReasonConfig.from_preset(args.preset, vocab_size=data.summary["vocab_size"])
    model = MoEReasonForCausalLM(config)
    batch = torch.tensor(data.train[: args.batch_size]["input_ids"], dtype=torch.long)
    seconds = time_rounds({"train": training_step(model, batch, torch.device("cpu"))}, torch.device("cpu"),
                          rounds=1, steps_per_round=args.steps, warmup=1)["train"][0]
    train_rate = batch.numel() / seconds

    print(f"preparation: {prep_tokens} tokens in {prep_seconds:.1f} s = {prep_rate:,.0f} tokens/s (cold cache)")
    print(f"training ({args.preset}, batch {args.batch_size}x{args.block_size}): {train_rate:,.0f} tokens/s")
    print(f"ratio preparation/training: {prep_rate / train_rate:.1f}")


if __name__ == "__main__":
    main()
