"""Prepare and cache the training data ahead of time (e.g. on a CPU node before a GPU job).

    moe-reason-prepare-data                                  # embedded offline corpus
    moe-reason-prepare-data --data_files docs/ --block_size 512
    moe-reason-prepare-data --dataset_name HuggingFaceTB/smollm-corpus \
        --dataset_config cosmopedia-v2 --tokenizer_name HuggingFaceTB/SmolLM-135M \
        --streaming --max_documents 200000

Prints a JSON summary: documents and tokens per split, vocab size, block size, cache path,
seconds taken. The trainer, given the same data arguments, then loads the cache in seconds. With
--streaming only the validation slice and the tokenizer are prepared: the training stream is read
while training.
"""

import json
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from ..errors import run_cli
from ..models.configuration_moe_reason import MoEReasonConfig
from .prepare import DataArguments, check_against_model, prepare_data


@dataclass
class CheckArguments:
    model_preset: str | None = field(default=None, metadata={"help": (
        "Also check the data against this model preset (block size vs positions, vocabulary).")})


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((DataArguments, CheckArguments))
    data_args, check_args = parser.parse_args_into_dataclasses(args=argv)
    data = prepare_data(data_args, log=lambda msg: print(msg, file=sys.stderr))
    if check_args.model_preset:
        check_against_model(data, MoEReasonConfig.from_preset(check_args.model_preset))
    print(json.dumps(data.summary, indent=2))
    return data.summary


if __name__ == "__main__":
    run_cli(main)
