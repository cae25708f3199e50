"""Scoring a grid model on puzzles: exact accuracy by the task's validator (no reference needed), cell
accuracy on the cells the puzzle leaves open, and for recursive models the test-time-compute curve
(accuracy after 1 .. 2 x halt_max_steps supervision steps) and Q-head halting.
"""

import numpy as np
import torch

from .task_files import given
from .tasks import MazeTask, PromptFormulation


@torch.no_grad()
def predict_answers(model, task, puzzles: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Puzzles [N, n, n] -> (the model's answers [N, n, n], recursion steps [N]): a grid model's argmax at
    every cell, or a prompt model's greedy continuation of puzzle + '='."""
    device = next(model.parameters()).device
    prompt = PromptFormulation() if not model.config.bidirectional else None
    answers, steps = [], []
    for start in range(0, len(puzzles), batch_size):
        batch = puzzles[start:start + batch_size]
        if prompt is None:
            ids = torch.tensor(np.stack([task.to_tokens(p) for p in batch]), device=device)  # [b, n*n]
            out = model(input_ids=ids, use_cache=False)
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


def evaluate_puzzles(model, task, puzzles, references=None, batch_size: int = 64, curve_puzzles: int = 0) -> dict:
    """The figures of `score`, as the model was trained to run (recursive: its configured halting), plus for
    a recursive model exact_accuracy_by_steps (on the first `curve_puzzles`, 0 = all: the curve runs
    1 + 2 + ... + 2 x halt_max_steps supervision steps) and the Q-head's halting."""
    model.eval()
    answers, steps = predict_answers(model, task, puzzles, batch_size)
    result = score(task, puzzles, answers, references)
    config = model.config
    if not hasattr(config, "halt_max_steps"):
        return result
    trained = (config.halt_max_steps, config.eval_halting)
    try:
        config.eval_halting = "max_steps"
        curve, subset = {}, puzzles[:curve_puzzles or len(puzzles)]
        for k in range(1, 2 * trained[0] + 1):  # beyond the trained depth: does accuracy keep rising?
            config.halt_max_steps = k
            curve[k] = score(task, subset, predict_answers(model, task, subset, batch_size)[0], None)["exact_accuracy"]
        result.update(exact_accuracy_by_steps=curve, curve_puzzles=len(subset))
        config.halt_max_steps, config.eval_halting = trained[0], "q_head"
        answers, steps = predict_answers(model, task, puzzles, batch_size)
        result["q_head"] = {"exact_accuracy": score(task, puzzles, answers, None)["exact_accuracy"],
                            "mean_steps": float(steps.mean()), "halt_max_steps": trained[0]}
    finally:
        config.halt_max_steps, config.eval_halting = trained
    return result
