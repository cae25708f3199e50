"""Evaluate an exported model (base or recursive) with the tokenizer saved beside it.

    moe-reason-evaluate --model_path outputs/run/final                 # the default corpus
    moe-reason-evaluate --model_path DIR --data_files docs/ --split train --max_blocks 200
    moe-reason-evaluate --model_path outputs/sudoku/final [--task_file puzzles.csv]   # a task model
    moe-reason-evaluate --model_path outputs/run/final --lm_eval_tasks hellaswag,arc_easy --lm_eval_limit 100

The data arguments are the trainer's (`DataArguments`): the same ones reproduce the same
document split, so `--max_blocks` = the trainer's eval_batches x per_device_eval_batch_size
reproduces its validation loss. The tokenizer defaults to the one in `--model_path`.
Prints and writes JSON: loss, perplexity, token accuracy, tokens evaluated, ln(vocab), and
for recursive models the mean recursion (supervision) steps.

A model trained with `--task` is scored on puzzles instead (`tasks.scoring.evaluate_puzzles`): the held-out
test puzzles of its training, regenerated from the settings in its config, or a `--task_file`, or with
`--task` and the task options, the test puzzles those settings generate (another size or difficulty: a
model trained on 6x6 mazes on an 8x8 canvas scored on 8x8 mazes is the easy-to-hard test).
`--lm_eval_tasks` runs lm-evaluation-harness instead (`evaluation/harness.py`) and writes MODEL/eval_lm_eval.json.
"""

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser
from transformers.utils import CONFIG_NAME

from ..data.prepare import DataArguments, check_against_model, collate_blocks, prepare_data
from ..errors import MissingFileError, UserError, run_cli
from ..models.configuration_moe_reason import require
from ..tasks.files import read_sudoku_file
from ..tasks.puzzles import load_or_generate, make_task
from ..tasks.scoring import evaluate_puzzles
from ..layout import TASK_EVAL
from ..safe_loading import from_pretrained
from .harness import run_lm_eval
from .loss import evaluate_model

SPLITS = ("validation", "train")


@dataclass
class EvaluateArguments:
    model_path: str = field(metadata={"help": "Exported model folder (best/, final/ or any save_pretrained output)."})
    split: str = field(default="validation", metadata={"help": f"Which split to evaluate: one of {SPLITS}."})
    batch_size: int = field(default=8, metadata={"help": "Blocks per forward."})
    max_blocks: int = field(default=0, metadata={"help": "Evaluate the first N blocks of the split (0 = all)."})
    eval_halting: str | None = field(default=None, metadata={"help": (
        "A recursive model only: max_steps (every example runs halt_max_steps supervision steps) or q_head (its "
        "Q-head halts them). Default: the model's config.")})
    output_file: str | None = field(default=None, metadata={"help": (
        "Where to write the JSON result; default: MODEL_PATH/eval_SPLIT.json (eval_task.json for a task model).")})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N, or auto (a GPU when there is one)."})
    task_file: str | None = field(default=None, metadata={"help": (
        "Sudoku puzzles to score a task model on: a text file of one puzzle per line (81 characters, '.' or "
        "'0' for a blank, optionally ',' and the solution) or a CSV with question/answer, puzzle/solution, "
        "quizzes/solutions or unsolved/solved columns. Default: the model's held-out test puzzles.")})
    max_puzzles: int = field(default=0, metadata={"help": "Score the first N puzzles (0 = all)."})
    lm_eval_tasks: str | None = field(default=None, metadata={"help": (
        "Comma-separated lm-evaluation-harness tasks (e.g. hellaswag,arc_easy) to run on the model instead "
        "of our own evaluation; needs pip install -e \".[eval]\" and the tasks' data (the Hub, or local files).")})
    lm_eval_include_path: str | None = field(default=None, metadata={"help": (
        "A folder of lm-eval task YAMLs to add to the known tasks (e.g. tasks on local data files).")})
    lm_eval_limit: int | None = field(
        default=None, metadata={"help": "Score at most this many examples per lm-eval task."})
    curve_puzzles: int = field(default=0, metadata={"help": (
        "Run a recursive model's accuracy-by-supervision-steps curve on the first N puzzles (0 = all of them).")})

    def __post_init__(self):
        require(self, "split", self.split in SPLITS, f"one of {SPLITS}")
        require(self, "batch_size", self.batch_size >= 1, ">= 1")
        require(self, "max_blocks", self.max_blocks >= 0, ">= 0")
        if not (Path(self.model_path) / CONFIG_NAME).is_file():
            raise MissingFileError(f"--model_path {self.model_path}: no {CONFIG_NAME} there (expected an exported "
                                   "model folder such as outputs/run/final)")


def main(argv: list[str] | None = None) -> dict:
    """The command line -> `evaluate`."""
    return evaluate(*HfArgumentParser((EvaluateArguments, DataArguments)).parse_args_into_dataclasses(
        args=argv, look_for_args_file=False))


def evaluate(eval_args: EvaluateArguments, data_args: DataArguments) -> dict:
    """Score the model at eval_args.model_path as the arguments say; writes and returns the JSON result."""
    import moe_reason  # noqa: F401  (registers the Auto classes)

    if data_args.tokenizer_name is None:
        data_args.tokenizer_name = eval_args.model_path  # the tokenizer the model was trained with
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if eval_args.device == "auto"
                          else eval_args.device)
    model = from_pretrained(AutoModelForCausalLM, eval_args.model_path).to(device)
    if eval_args.eval_halting is not None:
        if not hasattr(model.config, "eval_halting"):
            raise UserError(f"--eval_halting {eval_args.eval_halting}: "
                            f"{eval_args.model_path} is not a recursive model")
        model.config.eval_halting = eval_args.eval_halting
        model.config.check()  # names the allowed values
    if eval_args.lm_eval_tasks:
        return write_result(eval_args, "eval_lm_eval.json", evaluate_with_lm_eval(eval_args, model))
    if data_args.task or eval_args.task_file or getattr(model.config, "task", None):
        return write_result(eval_args, TASK_EVAL, evaluate_task(eval_args, data_args, model))
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
              "blocks": len(split), **evaluate_model(model, batches, model.config, progress=True)}
    if hasattr(model.config, "eval_halting"):
        result["eval_halting"] = model.config.eval_halting
    return write_result(eval_args, f"eval_{eval_args.split}.json", result)


def evaluate_task(eval_args, data_args, model) -> dict:
    """A task model on a --task_file or on the held-out test puzzles of its training -> the figures."""
    settings = getattr(model.config, "task", None)
    if not settings:
        raise UserError(f"{eval_args.model_path} was not trained on a task (its config has no `task`): evaluate it "
                        "on text, without --task and --task_file")
    if data_args.task and data_args.task != settings["task"]:
        raise UserError(f"--task {data_args.task}: {eval_args.model_path} was trained on {settings['task']}")
    trained = settings
    if data_args.task and not eval_args.task_file:  # the command line's puzzles (a harder set), the model's formulation
        settings = {**data_args.task_settings(), "task_formulation": trained.get("task_formulation", "grid")}
    task, side = make_task(settings), make_task(trained).n
    if task.n != side:
        print(f"note: scoring {task.n}x{task.n} grids with a model trained on {side}x{side} ones: the rows no longer "
              "line up with its training (give mazes one --maze_canvas)", file=sys.stderr)
    if eval_args.task_file:
        if settings["task"] != "sudoku":
            raise UserError(f"--task_file reads Sudoku collections; "
                            f"{eval_args.model_path} is a {settings['task']} model")
        puzzles, references = read_sudoku_file(eval_args.task_file)
        if puzzles.shape[1] != task.n:
            raise UserError(f"{eval_args.task_file}: {puzzles.shape[1]}x{puzzles.shape[1]} puzzles, but the model "
                            f"was trained on {task.n}x{task.n}")
        source = eval_args.task_file
    else:
        cached = DataArguments(**settings, data_cache_dir=data_args.data_cache_dir)
        puzzles, references = load_or_generate(cached, log=lambda msg: print(msg, file=sys.stderr))[0]["test"]
        source = "held-out test puzzles" + (" of the command line's task settings" if data_args.task else "")
    if eval_args.max_puzzles:
        puzzles = puzzles[:eval_args.max_puzzles]
        references = None if references is None else references[:eval_args.max_puzzles]
    return {"model_path": eval_args.model_path, "model_type": model.config.model_type, "task": settings,
            "trained_task": trained, "source": source,
            **evaluate_puzzles(model, task, puzzles, references, eval_args.batch_size, eval_args.curve_puzzles)}


def evaluate_with_lm_eval(eval_args, model) -> dict:
    if getattr(model.config, "task", None):
        raise UserError(f"{eval_args.model_path} was trained on {model.config.task['task']} puzzles: lm-eval's "
                        "language tasks do not apply; evaluate it without --lm_eval_tasks")
    tasks = [t.strip() for t in eval_args.lm_eval_tasks.split(",") if t.strip()]
    tokenizer = AutoTokenizer.from_pretrained(eval_args.model_path)
    return {"model_path": eval_args.model_path, "model_type": model.config.model_type,
            **run_lm_eval(model, tokenizer, tasks, eval_args.lm_eval_include_path, eval_args.lm_eval_limit,
                          eval_args.batch_size)}


def write_result(eval_args, name: str, result: dict) -> dict:
    output = Path(eval_args.output_file or Path(eval_args.model_path) / name)
    output.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    run_cli(main)
