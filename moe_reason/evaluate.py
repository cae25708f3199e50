"""Evaluate an exported model (base or recursive) with the tokenizer saved beside it.

    python -m moe_reason.evaluate --model_path outputs/run/final                 # the default corpus
    python -m moe_reason.evaluate --model_path DIR --data_files docs/ --split train --max_blocks 200

The data arguments are the trainer's (`DataArguments`): the same ones reproduce the same
document split, so `--max_blocks` = the trainer's eval_batches x per_device_eval_batch_size
reproduces its validation loss. The tokenizer defaults to the one in `--model_path`.
Prints and writes JSON: loss, perplexity, token accuracy, tokens evaluated, ln(vocab), and
for recursive models the mean recursion (supervision) steps.
"""

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, HfArgumentParser

from .configuration_moe_reason import require
from .data import DataArguments, check_against_model, collate_blocks, prepare_data
from .metrics import summarise_eval
from .modeling_moe_reason import next_token_statistics
from .safe_loading import from_pretrained

SPLITS = ("validation", "train")


@dataclass
class EvaluateArguments:
    model_path: str = field(metadata={"help": "Exported model folder (best/, final/ or any save_pretrained output)."})
    split: str = field(default="validation", metadata={"help": f"Which split to evaluate: one of {SPLITS}."})
    batch_size: int = field(default=8, metadata={"help": "Blocks per forward."})
    max_blocks: int = field(default=0, metadata={"help": "Evaluate the first N blocks of the split (0 = all)."})
    output_file: str | None = field(default=None, metadata={"help": (
        "Where to write the JSON result; default: MODEL_PATH/eval_SPLIT.json.")})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N, or auto (a GPU when there is one)."})

    def __post_init__(self):
        require(self, "split", self.split in SPLITS, f"one of {SPLITS}")
        require(self, "batch_size", self.batch_size >= 1, ">= 1")
        require(self, "max_blocks", self.max_blocks >= 0, ">= 0")
        if not (Path(self.model_path) / "config.json").is_file():
            raise FileNotFoundError(f"--model_path {self.model_path}: no config.json there (expected an exported "
                                    "model folder such as outputs/run/final)")


@torch.no_grad()
def evaluate_model(model, batches, vocab_size: int, gather=lambda t: t, progress: bool = False) -> dict:
    """Loss, perplexity, accuracy (and recursion steps) over `batches`; `gather` joins ranks' tensors.

    `model` may be wrapped (DDP, a DeepSpeed engine), so the vocabulary size is passed in.
    Statistics are computed from fp32 logits and summed in float64, never in bf16.
    """
    was_training = model.training
    model.eval()
    stats, recursion_steps = [], []
    for batch in tqdm(batches, desc="evaluating", disable=not progress, dynamic_ncols=True):
        out = model(input_ids=batch["input_ids"], use_cache=False)
        stats.append(gather(next_token_statistics(out.logits, batch["labels"])))
        if getattr(out, "recursion_steps", None) is not None:
            recursion_steps.append(gather(out.recursion_steps.float().reshape(-1)))
    model.train(was_training)
    result = summarise_eval(torch.cat(stats), vocab_size)
    if recursion_steps:
        result["recursion_steps"] = float(torch.cat(recursion_steps).mean())
    return result


def main(argv: list[str] | None = None) -> dict:
    eval_args, data_args = HfArgumentParser((EvaluateArguments, DataArguments)).parse_args_into_dataclasses(
        args=argv, look_for_args_file=False)
    import moe_reason  # noqa: F401  (registers the Auto classes)

    if data_args.tokenizer_name is None:
        data_args.tokenizer_name = eval_args.model_path  # the tokenizer the model was trained with
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if eval_args.device == "auto"
                          else eval_args.device)
    model = from_pretrained(AutoModelForCausalLM, eval_args.model_path).to(device)
    data = prepare_data(data_args, log=lambda msg: print(msg, file=sys.stderr))
    check_against_model(data, model.config, vocab_remedy=(
        "evaluate with the tokenizer the model was trained with: leave --tokenizer_name unset to use the one "
        f"saved in {eval_args.model_path}"))
    split = data.validation if eval_args.split == "validation" else data.train
    if eval_args.max_blocks:
        split = split.select(range(min(eval_args.max_blocks, len(split))))
    loader = DataLoader(split, batch_size=eval_args.batch_size, collate_fn=collate_blocks)
    batches = ({k: v.to(device) for k, v in batch.items()} for batch in loader)
    result = {"model_path": eval_args.model_path, "model_type": model.config.model_type, "split": eval_args.split,
              "blocks": len(split), **evaluate_model(model, batches, model.config.vocab_size, progress=True)}
    output = Path(eval_args.output_file or Path(eval_args.model_path) / f"eval_{eval_args.split}.json")
    output.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
