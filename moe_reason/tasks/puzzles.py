"""Reasoning tasks (Sudoku, mazes) as training data: the task interface, the two formulations,
disjoint train/test splits, a fresh draw of augmented puzzles every epoch, a character tokenizer,
and the on-disk cache.

A puzzle and its answer are grids of cell codes; as tokens they are the grid read row by row
(token = code, 0 = padding). Two formulations share the model code: `grid` (HRM/TRM) reads the
puzzle and predicts the answer's cell at every position (`config.bidirectional`); `prompt` is a
causal LM that reads the puzzle and '=' and writes the answer with `generate`.
"""

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from ..atomic import install, staged
from ..errors import UserError
from ..models.configuration_moe_reason import require
from . import maze, sudoku
from .files import given, read_sudoku_file

TASKS = ("sudoku", "maze")
FORMULATIONS = ("grid", "prompt")
TASK_CACHE_VERSION = 1  # bump when generated puzzles for the same arguments would differ
PAD_TOKEN = "<pad>"
SEP_TOKEN = "="  # the prompt formulation's end of the puzzle; its id follows the task's symbols
DEFAULT_BLANKS = {4: 8, 6: 20, 9: 45}  # about half the cells, by grid size


@dataclass
class TaskArguments:
    task: str | None = field(default=None, metadata={"help": (
        f"Train on a generated reasoning task instead of text: one of {TASKS} (see --task_formulation); the "
        "validation set is the held-out test puzzles.")})
    task_formulation: str = field(default="grid", metadata={"help": (
        "grid: the model reads the whole puzzle (bidirectional attention) and predicts each cell of the answer at "
        "its position, in one forward (HRM/TRM); prompt: a causal LM reads the puzzle and '=' and writes the "
        "answer with generate, labels on the answer only (what transfers to language models).")})
    task_size: int | None = field(default=None, metadata={"help": (
        "Grid side: Sudoku 4, 6 or 9 (default 9); maze n x n (default 8).")})
    sudoku_blanks: int | None = field(default=None, metadata={"help": (
        "Blank cells per Sudoku (difficulty), kept only while the solution stays unique; default 45 at 9x9, "
        f"{DEFAULT_BLANKS[6]} at 6x6, {DEFAULT_BLANKS[4]} at 4x4. At 9x9, 20 blanks need about 1.3 rounds of "
        "single-candidate filling, 30 about 2.1, 45 about 4.7 (one in a hundred needs a guess), 55 about 10 "
        "(a third need a guess). The data summary reports the rounds its puzzles need.")})
    sudoku_blanks_max: int | None = field(default=None, metadata={"help": (
        "Mix difficulties: draw each Sudoku's blanks uniformly from [sudoku_blanks, sudoku_blanks_max] (default: "
        "every puzzle has sudoku_blanks). Small grids have few distinct puzzles at one blank count (4x4 at 10 "
        "blanks: a few hundred up to the augmentations); a range gives a held-out set large enough to measure.")})
    maze_min_path: int | None = field(default=None, metadata={"help": (
        "Shortest-path length in cells (start and goal included) a maze must reach (difficulty); default 2 x size.")})
    maze_wall_share: float = field(default=0.3, metadata={"help": "Share of maze cells drawn as walls."})
    maze_canvas: int | None = field(default=None, metadata={"help": (
        "Place each task_size x task_size maze at a random spot of a canvas x canvas grid of walls (default: no "
        "canvas). Mazes of different sizes then share one token layout, so a model trained on small mazes can be "
        "scored on larger ones (easy-to-hard: train --task_size 6 --maze_canvas 8, evaluate --task_size 8).")})
    task_train_puzzles: int = field(default=1000, metadata={"help": (
        "Distinct training puzzles (with --task_train_file: the file's first ones); each epoch draws a fresh "
        "augmentation of every one (TRM: 1000).")})
    task_test_puzzles: int = field(default=1000, metadata={"help": (
        "Held-out test puzzles: never equal to a training puzzle's solution up to the augmentations (with "
        "--task_test_file: the file's first ones).")})
    task_train_file: str | None = field(default=None, metadata={"help": (
        "Train on these Sudoku puzzles with solutions instead of generated ones: a text or CSV collection as "
        "`evaluate --task_file` reads (e.g. Sudoku-Extreme's train.csv). Needs --task_test_file; the files' "
        "puzzles are taken as they are (their overlap is the collection's business).")})
    task_test_file: str | None = field(default=None, metadata={"help": (
        "The held-out puzzles with solutions that go with --task_train_file (e.g. Sudoku-Extreme's test.csv).")})
    task_augment: bool = field(default=True, metadata={"help": (
        "Augment training puzzles (TRM's): Sudoku digit relabelling, band/row and stack/column shuffles and "
        "transpose; maze rotations and mirrors.")})

    def __post_init__(self):
        require(self, "task", self.task is None or self.task in TASKS, f"None or one of {TASKS}")
        require(self, "task_formulation", self.task_formulation in FORMULATIONS, f"one of {FORMULATIONS}")
        if self.task is None:
            return
        if self.task_size is None:
            self.task_size = 9 if self.task == "sudoku" else 8
        if self.task == "sudoku":
            require(self, "task_size", self.task_size in sudoku.BOXES, f"one of {sorted(sudoku.BOXES)} for sudoku")
            if self.sudoku_blanks is None:
                self.sudoku_blanks = DEFAULT_BLANKS[self.task_size]
            require(self, "sudoku_blanks", 1 <= self.sudoku_blanks < self.task_size ** 2,
                    f"in [1, {self.task_size ** 2 - 1}] for a {self.task_size}x{self.task_size} sudoku")
            require(self, "sudoku_blanks_max", self.sudoku_blanks_max is None
                    or self.sudoku_blanks <= self.sudoku_blanks_max < self.task_size ** 2,
                    f"None or in [sudoku_blanks ({self.sudoku_blanks}), {self.task_size ** 2 - 1}]")
        else:
            require(self, "task_size", self.task_size >= 2, ">= 2 for a maze")
            if self.maze_min_path is None:
                self.maze_min_path = 2 * self.task_size
            require(self, "maze_min_path", 2 <= self.maze_min_path <= self.task_size ** 2, "in [2, size x size]")
            require(self, "maze_wall_share", 0.0 <= self.maze_wall_share < 1.0, "in [0, 1)")
            require(self, "maze_canvas", self.maze_canvas is None or self.maze_canvas >= self.task_size,
                    f"None or >= task_size ({self.task_size})")
        require(self, "maze_canvas", self.task == "maze" or self.maze_canvas is None, "None for a sudoku task")
        require(self, "sudoku_blanks_max", self.task == "sudoku" or self.sudoku_blanks_max is None,
                "None for a maze task")
        require(self, "task_test_file", bool(self.task_train_file) == bool(self.task_test_file),
                "given together with task_train_file (training and held-out puzzles)")
        require(self, "task_train_file", not self.task_train_file or self.task == "sudoku",
                "None for a maze task (puzzle files hold Sudoku collections)")
        require(self, "task_train_puzzles", self.task_train_puzzles >= 1, ">= 1")
        require(self, "task_test_puzzles", self.task_test_puzzles >= 1, ">= 1")

    def task_settings(self) -> dict:
        """What decides the generated puzzles (saved in the model's config as `task`, so that evaluation
        regenerates the same held-out test puzzles)."""
        keys = ["task", "task_formulation", "task_size"] + (["sudoku_blanks"] if self.task == "sudoku" else
                                        ["maze_min_path", "maze_wall_share", "maze_canvas"])
        keys += ["sudoku_blanks_max"] if self.sudoku_blanks_max is not None else []  # absent: one blank count
        keys += ["task_train_puzzles", "task_test_puzzles"]
        keys += ["task_train_file", "task_test_file"] if self.task_train_file else ["data_seed"]  # DataArguments
        return {k: getattr(self, k) for k in keys}


# ----------------------------------------------------------------------------
# The tasks


class SudokuTask:
    """Cells: 0 blank, 1..n digits. Tokens: code + 1 (1 = blank), so the vocabulary is <pad> . 1 .. n."""

    unique_answers = True  # generated puzzles have proved-unique solutions: the stored one is the only one

    def __init__(self, task_size: int = 9, sudoku_blanks: int = 45, sudoku_blanks_max: int | None = None, **_):
        self.n, self.blanks, self.blanks_max = task_size, sudoku_blanks, sudoku_blanks_max
        self.symbols = "." + "123456789"[: self.n]

    def generate(self, rng):
        solution = sudoku.random_solution(self.n, rng)
        blanks = self.blanks if self.blanks_max is None else int(rng.integers(self.blanks, self.blanks_max + 1))
        return sudoku.make_puzzle(solution, blanks, rng), solution

    def key(self, puzzle, answer):
        # 9x9: no test solution grid is an augmentation of a training one. The small grids have too few
        # solution grids for that (4x4: two up to the augmentations), so there no puzzle is.
        return sudoku.canonical_key(answer) if self.n == 9 else sudoku.canonical_puzzle_key(puzzle)

    def augment(self, puzzle, answer, rng):
        aug = sudoku.random_augmentation(self.n, rng)
        return sudoku.augment(puzzle, aug), sudoku.augment(answer, aug)

    def is_valid(self, puzzle, answer) -> bool:
        return sudoku.is_valid(puzzle, answer)

    def to_tokens(self, grid: np.ndarray) -> np.ndarray:
        return grid.reshape(-1).astype(np.int64) + 1

    def from_tokens(self, tokens) -> np.ndarray:
        return (np.asarray(tokens).reshape(self.n, self.n) - 1).clip(0, self.n).astype(np.int8)

    def difficulty(self, puzzles: np.ndarray, answers: np.ndarray) -> dict:
        """What the solver needs: rounds of single-candidate filling, or a guess (backtracking)."""
        rounds = [sudoku.propagation_rounds(p) for p in puzzles]
        solved = [r for r in rounds if r is not None]
        return {"blanks_mean": float((puzzles == 0).sum((1, 2)).mean()),
                "propagation_rounds_mean": float(np.mean(solved)) if solved else None,
                "propagation_rounds_max": max(solved) if solved else None,
                "needs_backtracking": sum(r is None for r in rounds) / len(rounds)}


class MazeTask:
    """Cells and tokens: 1 wall #, 2 free ., 3 start S, 4 goal G, 5 path o. `n` is the grid's side: the
    canvas's where there is one (the maze itself is `size` x `size`)."""

    unique_answers = False  # a maze may have several shortest paths; its stored answer marks one

    def __init__(self, task_size: int, maze_min_path: int = 16, maze_wall_share: float = 0.3,
                 maze_canvas: int | None = None, **_):
        self.size, self.min_path, self.wall_share = task_size, maze_min_path, maze_wall_share
        self.n = maze_canvas or task_size
        self.symbols = "#.SGo"

    def generate(self, rng):
        puzzle, answer = maze.make_maze(self.size, self.min_path, rng, self.wall_share)
        if self.n == self.size:
            return puzzle, answer
        corner = rng.integers(self.n - self.size + 1, size=2)
        return maze.on_canvas(puzzle, self.n, corner), maze.on_canvas(answer, self.n, corner)

    def key(self, puzzle, answer):
        return maze.canonical_key(answer)

    def augment(self, puzzle, answer, rng):
        k = int(rng.integers(8))
        return maze.dihedral(puzzle, k), maze.dihedral(answer, k)

    def is_valid(self, puzzle, answer) -> bool:
        return maze.is_valid(puzzle, answer)

    def to_tokens(self, grid: np.ndarray) -> np.ndarray:
        return grid.reshape(-1).astype(np.int64)

    def from_tokens(self, tokens) -> np.ndarray:
        return np.asarray(tokens).reshape(self.n, self.n).clip(1, 5).astype(np.int8)

    def difficulty(self, puzzles: np.ndarray, answers: np.ndarray) -> dict:
        """The shortest paths' lengths in cells, start and goal included."""
        lengths = (answers == maze.PATH).sum((1, 2)) + 2
        return {"path_cells_mean": float(lengths.mean()), "path_cells_max": int(lengths.max())}


TASK_CLASSES = dict(zip(TASKS, (SudokuTask, MazeTask), strict=True))  # by --task name


def make_task(settings: dict):
    """`TaskArguments.task_settings()` (or a model config's `task`) -> the task object."""
    cls = TASK_CLASSES[settings["task"]]
    return cls(**{k: v for k, v in settings.items() if k != "task"})  # each takes the settings it needs


def render(task, grid: np.ndarray) -> str:
    """A grid as text, one row per line, in the task's symbols."""
    tokens = task.to_tokens(grid).reshape(task.n, task.n)
    return "\n".join("".join(task.symbols[t - 1] for t in row.tolist()) for row in tokens)


def sep_id(task) -> int:
    return len(task.symbols) + 1


class GridFormulation:
    """HRM/TRM: the puzzle's cells in, the answer's cells out at the same positions (a bidirectional model)."""

    def length(self, task) -> int:
        return task.n * task.n

    def row(self, task, puzzle, answer) -> dict:
        return {"input_ids": task.to_tokens(puzzle).tolist(), "labels": task.to_tokens(answer).tolist()}


class PromptFormulation:
    """A causal LM: the puzzle, '=', the answer; labelled on the answer only (its first token is predicted
    at the '='), so `generate` after puzzle + '=' writes the answer."""

    def length(self, task) -> int:
        return 2 * task.n * task.n + 1

    def row(self, task, puzzle, answer) -> dict:
        prompt, target = self.prompt(task, puzzle), task.to_tokens(answer).tolist()
        return {"input_ids": prompt + target, "labels": [-100] * len(prompt) + target}

    def prompt(self, task, puzzle) -> list[int]:
        return task.to_tokens(puzzle).tolist() + [sep_id(task)]


def formulation_of(settings: dict):
    """`task_settings()` (or a model config's `task`) -> its formulation object (grid before there was a choice)."""
    return {"grid": GridFormulation, "prompt": PromptFormulation}[settings.get("task_formulation", "grid")]()


def task_tokenizer(task, formulation) -> PreTrainedTokenizerFast:
    """One token per character of the task's symbols (ids 1..), <pad> = 0, and '=' for the prompt formulation;
    saved with exported models."""
    symbols = task.symbols + (SEP_TOKEN if isinstance(formulation, PromptFormulation) else "")
    vocab = {PAD_TOKEN: 0, **{s: i + 1 for i, s in enumerate(symbols)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=PAD_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD_TOKEN)


# ----------------------------------------------------------------------------
# Splits and epochs


def generate_splits(task, train: int, test: int, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Test puzzles first, then training puzzles that are no augmentation of a test (or an earlier training)
    puzzle, judged by `task.key` (on the solution grid where there are enough of them). Each split has its own
    seeded stream, so its puzzles do not depend on the other's size."""
    keys, splits = set(), {}
    for name, count, stream in (("test", test, 1), ("train", train, 0)):
        rng = np.random.default_rng([seed, stream])
        puzzles, answers, rejected = [], [], 0
        with tqdm(total=count, desc=f"generating {name} puzzles", dynamic_ncols=True, mininterval=2) as bar:
            while len(puzzles) < count:
                puzzle, answer = task.generate(rng)
                key = task.key(puzzle, answer)
                if key in keys:
                    rejected += 1
                    if rejected > 10 * count + 100:
                        raise UserError(f"only {len(puzzles)} distinct {name} puzzles found of {count}: the task "
                                        "has too few distinct puzzles at this size; lower the puzzle counts")
                    continue
                keys.add(key)
                puzzles.append(puzzle)
                answers.append(answer)
                bar.update()
        splits[name] = (np.stack(puzzles), np.stack(answers))
    return splits


class PuzzleDraws(torch.utils.data.Dataset):
    """Training examples: index e * N + i is base puzzle i under the augmentation drawn from (seed, e, i).

    Each epoch is a fresh draw (`DrawSampler` offsets the indices by the epoch), and the draw is a
    pure function of the index, so a resumed run sees exactly the examples it would have seen.
    """

    def __init__(self, task, formulation, puzzles: np.ndarray, answers: np.ndarray, seed: int, augment: bool):
        self.task, self.formulation, self.seed, self.augment = task, formulation, seed, augment
        self.puzzles, self.answers = puzzles, answers

    def __len__(self) -> int:
        return len(self.puzzles)

    def __getitem__(self, index: int) -> dict:
        epoch, i = divmod(int(index), len(self.puzzles))
        puzzle, answer = self.puzzles[i], self.answers[i]
        if self.augment:
            puzzle, answer = self.task.augment(puzzle, answer, np.random.default_rng([self.seed, epoch, i]))
        return self.formulation.row(self.task, puzzle, answer)


def token_dataset(task, formulation, puzzles: np.ndarray, answers: np.ndarray) -> Dataset:
    rows = [formulation.row(task, p, a) for p, a in zip(puzzles, answers)]
    return Dataset.from_dict({key: [row[key] for row in rows] for key in ("input_ids", "labels")})


# ----------------------------------------------------------------------------
# Preparation with a cache


def task_cache_key(args) -> str:
    settings = {k: v for k, v in args.task_settings().items() if k != "task_formulation"}  # the same puzzles
    blob = json.dumps({"v": TASK_CACHE_VERSION, **settings}, sort_keys=True)
    return "task-" + hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_task_files(args) -> tuple[dict, dict]:
    """--task_train_file / --task_test_file -> ({split: (puzzles, solutions)}, summary)."""
    splits, summary = {}, {"task": args.task_settings(), "cache_hit": False}
    for name, path, count in (("train", args.task_train_file, args.task_train_puzzles),
                              ("test", args.task_test_file, args.task_test_puzzles)):
        puzzles, solutions = read_sudoku_file(path)
        puzzles, solutions = puzzles[:count], None if solutions is None else solutions[:count]
        missing = len(puzzles) if solutions is None else int((~given(solutions)).sum())
        if missing:
            raise UserError(f"{path}: {missing} of {len(puzzles)} puzzles have no solution; training and held-out "
                            "puzzles need theirs (puzzle,solution lines or a CSV answer column)")
        if puzzles.shape[1] != args.task_size:
            raise UserError(f"{path} holds {puzzles.shape[1]}x{puzzles.shape[1]} puzzles; pass --task_size "
                            f"{puzzles.shape[1]}")
        splits[name] = (puzzles, solutions)
        summary[name] = {"puzzles": len(puzzles), "file": str(path),
                         "blanks_mean": float((puzzles == 0).sum((1, 2)).mean())}
    return splits, summary


def load_or_generate(args, log=print) -> tuple[dict, dict]:
    """-> ({split: (puzzles, answers)}, summary), read from the task files, or generated once per settings
    and cached atomically."""
    if args.task_train_file:
        return read_task_files(args)
    start = time.perf_counter()
    root = Path(args.data_cache_dir).expanduser() / task_cache_key(args)
    task = make_task(args.task_settings())
    cache_hit = (root / "summary.json").exists()
    if not cache_hit:
        log(f"generating {args.task} puzzles ({root.name}) ...")
        splits = generate_splits(task, args.task_train_puzzles, args.task_test_puzzles, args.data_seed)
        tmp = staged(root)
        summary = {"task": args.task_settings(), "generation_seconds": round(time.perf_counter() - start, 2)}
        for name, (puzzles, answers) in splits.items():
            np.savez(tmp / f"{name}.npz", puzzles=puzzles, answers=answers)
            summary[name] = {"puzzles": len(puzzles), **task.difficulty(puzzles, answers)}
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
        install(tmp, root, keep_existing=True)  # another process may have finished first
    # the cached puzzles serve every formulation: the settings are this run's, not the cache's
    summary = {**json.loads((root / "summary.json").read_text()), "task": args.task_settings(), "cache_hit": cache_hit}
    splits = {}
    for name in ("train", "test"):
        with np.load(root / f"{name}.npz", allow_pickle=False) as saved:
            splits[name] = (saved["puzzles"], saved["answers"])
    return splits, summary


def prepare_task_data(args, log=print):
    """-> (training draws, the held-out test puzzles as validation, tokenizer, summary) for `--task`."""
    start = time.perf_counter()
    splits, summary = load_or_generate(args, log)
    task, formulation = make_task(args.task_settings()), formulation_of(args.task_settings())
    tokenizer = task_tokenizer(task, formulation)
    train = PuzzleDraws(task, formulation, *splits["train"], seed=args.data_seed, augment=args.task_augment)
    validation = token_dataset(task, formulation, *splits["test"])
    summary.update(block_size=formulation.length(task), vocab_size=len(tokenizer), eos_token_id=None, unit="puzzle",
                   validation=summary.pop("test"), seconds=round(time.perf_counter() - start, 3))
    return train, validation, tokenizer, summary
