"""Talk to an exported model: tokens are printed as they are produced.

    moe-reason-generate --model_path outputs/run/final --prompt "def read_config(path):"
    echo "import os" | moe-reason-generate --model_path outputs/run/final --do_sample --temperature 0.8
    moe-reason-generate --model_path outputs/run/final --interactive
    moe-reason-generate --model_path outputs/sudoku/final --prompt "4..31.4224..3..."   # a task model

Greedy by default; `--do_sample` with `--temperature`, `--top_k`, `--top_p` samples (seeded by `--seed`).
A model trained with `--task` reads the prompt as a puzzle (its cells row by row, in the task's symbols;
white space is ignored) and prints its answer as a grid, with the validator's verdict.
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, TextStreamer, set_seed
from transformers.utils import CONFIG_NAME

from ..errors import MissingFileError, UserError, run_cli
from ..models.configuration_moe_reason import require
from ..tasks.puzzles import SudokuTask, make_task, render
from ..tasks.scoring import answer_one
from ..safe_loading import from_pretrained


@dataclass
class GenerateArguments:
    model_path: str = field(metadata={"help": "Exported model folder (best/, final/, or `moe-reason-export` output)."})
    prompt: str | None = field(default=None, metadata={"help": "The prompt; default: read from stdin."})
    interactive: bool = field(default=False, metadata={"help": "Read one prompt per line until an empty line or EOF."})
    max_new_tokens: int = field(default=100, metadata={"help": "Tokens to generate."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (with --do_sample)."})
    top_k: int = field(default=50, metadata={"help": "Sample among the k likeliest tokens (0 = all)."})
    top_p: float = field(default=1.0, metadata={"help": "Sample within this probability mass (nucleus)."})
    seed: int = field(default=0, metadata={"help": "Seed of the sampling."})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N, or auto (a GPU when there is one)."})

    def __post_init__(self):
        require(self, "max_new_tokens", self.max_new_tokens >= 1, ">= 1")
        require(self, "temperature", not self.do_sample or self.temperature > 0,
                "> 0 (for greedy decoding leave out --do_sample)")


def parse_puzzle(task, text: str):
    """A puzzle typed as its cells row by row in the task's symbols ('0' is also a Sudoku blank) -> grid."""
    cells = "".join(text.split())
    if isinstance(task, SudokuTask):
        cells = cells.replace("0", ".")
    if len(cells) != task.n * task.n or any(c not in task.symbols for c in cells):
        raise UserError(f"a {task.n}x{task.n} puzzle is {task.n * task.n} cells of {task.symbols!r} (white space "
                        f"ignored); got {len(cells)} characters: {cells[:90]!r}")
    return task.from_tokens([task.symbols.index(c) + 1 for c in cells])


def answer_puzzle(model, text: str) -> str:
    task = make_task(model.config.task)
    puzzle = parse_puzzle(task, text)
    answer, valid = answer_one(model, task, puzzle)
    verdict = "valid" if valid else "not valid"
    return f"{render(task, answer)}\n({verdict} by the {model.config.task['task']} validator)"


def new_tokens(model, prompt_tokens: int, wanted: int) -> int:
    """--max_new_tokens, capped (with a note on stderr) where prompt + answer would pass the model's positions."""
    room = model.config.max_position_embeddings - prompt_tokens
    if room < 1:
        raise UserError(f"the prompt is {prompt_tokens} tokens; the model holds max_position_embeddings="
                        f"{model.config.max_position_embeddings}, so no token is left to generate: shorten it")
    if wanted > room:
        positions = model.config.max_position_embeddings
        print(f"note: --max_new_tokens {wanted} capped at {room}: the model holds {positions} positions and the "
              f"prompt takes {prompt_tokens}", file=sys.stderr, flush=True)
    return min(wanted, room)


def generate_text(model, tokenizer, text: str, args: GenerateArguments) -> str:
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.to(model.device)
    if ids.shape[1] == 0:
        raise UserError("the prompt is empty: give --prompt TEXT, text on stdin, or a line in --interactive")
    set_seed(args.seed)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p) if args.do_sample else {}
    out = model.generate(ids, attention_mask=torch.ones_like(ids),
                         max_new_tokens=new_tokens(model, ids.shape[1], args.max_new_tokens),
                         do_sample=args.do_sample, streamer=TextStreamer(tokenizer, skip_prompt=True),
                         pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                         else tokenizer.eos_token_id, **sampling)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def respond(model, tokenizer, text: str, args: GenerateArguments) -> str:
    """One prompt -> the reply (already streamed to stdout for text; printed here for a puzzle)."""
    if getattr(model.config, "task", None):
        reply = answer_puzzle(model, text)
        print(reply, flush=True)
        return reply
    print(text, end="", flush=True)
    return generate_text(model, tokenizer, text, args)


def main(argv: list[str] | None = None) -> list[str]:
    (args,) = HfArgumentParser(GenerateArguments).parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    import moe_reason  # noqa: F401  (registers the Auto classes)

    if not (Path(args.model_path) / CONFIG_NAME).is_file():
        raise MissingFileError(f"--model_path {args.model_path}: no {CONFIG_NAME} there; give an exported model folder "
                               "(a run's best/ or final/, or the output of moe-reason-export)")
    if args.prompt is None and (sys.stdin is None or sys.stdin.closed):
        raise UserError("no prompt: give --prompt TEXT (standard input, where a prompt is read otherwise, is closed)")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    model = from_pretrained(AutoModelForCausalLM, args.model_path).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    if not args.interactive:
        return [respond(model, tokenizer, args.prompt if args.prompt is not None else sys.stdin.read(), args)]
    replies = []
    while True:
        print(">>> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            return replies
        replies.append(respond(model, tokenizer, line.rstrip("\n"), args))
        print(flush=True)


if __name__ == "__main__":
    run_cli(main)
