"""Scoring a grid model on puzzles: exact accuracy by the task's validator (no reference needed), cell
accuracy on the cells the puzzle leaves open, and for recursive models:

- test-time depth: exact accuracy after 1 .. halt_max_steps supervision steps and at 2, 3 and 4 times
  the trained number, every puzzle running every step (`exact_accuracy_by_steps`), and the same depths
  with the Q-head free to stop a puzzle early (`q_head_by_steps`: a halted puzzle keeps its answer);
- Q-head halting at the trained depth: exact accuracy, mean steps and their share of the maximum, at the
  trained rule (halt when the Q-head gives it 0.5) and at stricter thresholds (`q_head_thresholds`);
- by difficulty (Sudoku blanks, maze path length): how many steps the Q-head spends and what it solves.
"""

import numpy as np
import torch

from .files import given
from .puzzles import MazeTask, PromptFormulation

TEST_TIME_MULTIPLES = (2, 3, 4)  # depths past the trained one, as multiples of halt_max_steps
HALT_THRESHOLDS = (0.5, 0.9, 0.99)  # the Q-head's operating points reported: probability of "halt" it must give


@torch.no_grad()
def predict_answers(model, task, puzzles: np.ndarray, batch_size: int = 64,
                    **halting) -> tuple[np.ndarray, np.ndarray]:
    """Puzzles [N, n, n] -> (the model's answers [N, n, n], recursion steps [N]): a grid model's argmax at
    every cell, or a prompt model's greedy continuation of puzzle + '='. `halting` (halt_max_steps,
    eval_halting) overrides a recursive grid model's for these calls."""
    device = next(model.parameters()).device
    prompt = PromptFormulation() if not model.config.bidirectional else None
    answers, steps = [], []
    for start in range(0, len(puzzles), batch_size):
        batch = puzzles[start:start + batch_size]
        if prompt is None:
            ids = torch.tensor(np.stack([task.to_tokens(p) for p in batch]), device=device)  # [b, n*n]
            out = model(input_ids=ids, use_cache=False, **halting)
            predicted = out.logits.argmax(-1)  # [b, n*n]
            recursion = getattr(out, "recursion_steps", None)
        else:
            ids = torch.tensor([prompt.prompt(task, p) for p in batch], device=device)  # [b, n*n + 1]
            cells = task.n * task.n
            predicted = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=cells,
                                       min_new_tokens=cells, do_sample=False, pad_token_id=0)[:, -cells:]
            recursion = None  # each generated token ran its own recursion
        answers += [task.from_tokens(row) for row in predicted.cpu().numpy()]
        steps.append(recursion.float().cpu().numpy() if recursion is not None else np.ones(len(batch)))
    return np.stack(answers), np.concatenate(steps)


def solved_rows(task, input_ids: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """A grid model's batch: the puzzles' tokens [B, n*n] and its argmax tokens [B, n*n] -> [B] bool on their
    device, whether the task's validator accepts each answer. The labels hold one answer; a maze may have
    several shortest paths, and any of them is solved."""
    puzzles, answers = input_ids.cpu().numpy(), predicted.cpu().numpy()
    valid = [task.is_valid(task.from_tokens(p), task.from_tokens(a)) for p, a in zip(puzzles, answers)]
    return torch.tensor(valid, device=input_ids.device)


def answer_one(model, task, puzzle: np.ndarray) -> tuple[np.ndarray, bool]:
    """One puzzle [n, n] -> (the model's answer [n, n], whether the task's validator accepts it)."""
    answer = predict_answers(model, task, puzzle[None])[0][0]
    return answer, task.is_valid(puzzle, answer)


def open_cells(task, puzzles: np.ndarray) -> np.ndarray:
    """[N, n, n] True where the answer is not given by the puzzle: Sudoku blanks, maze free cells."""
    return puzzles == (2 if isinstance(task, MazeTask) else 0)


def score(task, puzzles: np.ndarray, answers: np.ndarray, references: np.ndarray | None) -> dict:
    """exact_accuracy (validator) over every puzzle; cell_accuracy on the open cells of the puzzles that have a
    reference (an all-zero reference grid stands for none), and how many those are when not all."""
    valid = [task.is_valid(p, a) for p, a in zip(puzzles, answers)]
    result = {"puzzles": len(puzzles), "exact_accuracy": float(np.mean(valid))}
    known = np.zeros(len(puzzles), bool) if references is None else given(references)  # [N]
    if known.any():
        cells = open_cells(task, puzzles) & known[:, None, None]  # [N, n, n]
        result["cell_accuracy"] = float((answers == references)[cells].mean()) if cells.any() else 1.0
    if 0 < known.sum() < len(puzzles):
        result["cell_accuracy_puzzles"] = int(known.sum())
    return result


def test_time_depths(trained: int) -> list[int]:
    """1 .. trained, then the TEST_TIME_MULTIPLES of it."""
    return list(range(1, trained + 1)) + [m * trained for m in TEST_TIME_MULTIPLES]


def difficulty_of(task, puzzles: np.ndarray) -> tuple[str, np.ndarray]:
    """(what sets a puzzle's difficulty, its value per puzzle [N]): a Sudoku's blanks, a maze's free cells."""
    return ("free cells", (puzzles == 2).sum((1, 2))) if isinstance(task, MazeTask) else \
        ("blanks", (puzzles == 0).sum((1, 2)))


def by_difficulty(task, puzzles, all_steps: np.ndarray, halted: np.ndarray, steps: np.ndarray) -> dict:
    """Per difficulty value: puzzles, exact accuracy with every step and with the Q-head, its mean steps.
    all_steps and halted are [N] booleans (solved), steps [N] the Q-head's steps."""
    name, values = difficulty_of(task, puzzles)
    rows = {}
    for value in np.unique(values):
        chosen = values == value
        rows[int(value)] = {"puzzles": int(chosen.sum()), "exact_accuracy": float(all_steps[chosen].mean()),
                            "q_head_exact_accuracy": float(halted[chosen].mean()),
                            "q_head_mean_steps": float(steps[chosen].mean())}
    return {"measure": name, "rows": rows}


def evaluate_puzzles(model, task, puzzles, references=None, batch_size: int = 64, curve_puzzles: int = 0) -> dict:
    """The figures of `score`, as the model was trained to run (recursive: every supervision step), plus for
    a recursive model the test-time depth curves (on the first `curve_puzzles`, 0 = all), the Q-head's
    halting at the trained depth and both by difficulty."""
    model.eval()
    answers, _ = predict_answers(model, task, puzzles, batch_size, **(
        {"eval_halting": "max_steps"} if hasattr(model.config, "halt_max_steps") else {}))
    result = score(task, puzzles, answers, references)
    if not hasattr(model.config, "halt_max_steps"):
        return result
    trained = model.config.halt_max_steps
    solved_all = np.array([task.is_valid(p, a) for p, a in zip(puzzles, answers)])
    subset = puzzles[:curve_puzzles or len(puzzles)]
    curves = {"max_steps": {}, "q_head": {}}
    for k in test_time_depths(trained):  # beyond the trained depth: does accuracy keep rising, or hold?
        for halting, curve in curves.items():
            found = predict_answers(model, task, subset, batch_size, halt_max_steps=k, eval_halting=halting)[0]
            curve[k] = score(task, subset, found, None)["exact_accuracy"]
    result.update(exact_accuracy_by_steps=curves["max_steps"], q_head_by_steps=curves["q_head"],
                  curve_puzzles=len(subset))
    answers, steps = predict_answers(model, task, puzzles, batch_size, eval_halting="q_head")
    solved_q = np.array([task.is_valid(p, a) for p, a in zip(puzzles, answers)])
    result["q_head"] = {"exact_accuracy": float(solved_q.mean()), "mean_steps": float(steps.mean()),
                        "share_of_steps": float(steps.mean() / trained), "halt_max_steps": trained,
                        "all_steps_exact_accuracy": float(solved_all.mean())}
    result["by_difficulty"] = by_difficulty(task, puzzles, solved_all, solved_q, steps)
    result["q_head_thresholds"] = {}
    for threshold in HALT_THRESHOLDS:  # more steps for fewer wrong halts: the trade-off, not one chosen point
        answers, steps = predict_answers(model, task, puzzles, batch_size, eval_halting="q_head",
                                         eval_halt_threshold=threshold)
        result["q_head_thresholds"][str(threshold)] = {
            "exact_accuracy": score(task, puzzles, answers, None)["exact_accuracy"], "mean_steps": float(steps.mean()),
            "share_of_steps": float(steps.mean() / trained)}
    return result
