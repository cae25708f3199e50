"""Scoring a grid model on puzzles: exact accuracy by the task's validator (no reference needed), cell
accuracy on the cells the puzzle leaves open, and for recursive models the test-time-compute curve
(accuracy after 1 .. 2 x halt_max_steps supervision steps) and Q-head halting.
"""

import numpy as np
import torch

from .tasks import MazeTask


@torch.no_grad()
def predict_answers(model, task, puzzles: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Puzzles [N, n, n] -> (the model's answers [N, n, n] read from the argmax, recursion steps [N])."""
    device = next(model.parameters()).device
    answers, steps = [], []
    for start in range(0, len(puzzles), batch_size):
        ids = torch.tensor(np.stack([task.to_tokens(p) for p in puzzles[start:start + batch_size]]), device=device)
        out = model(input_ids=ids, use_cache=False)
        answers += [task.from_tokens(row) for row in out.logits.argmax(-1).cpu().numpy()]
        recursion = getattr(out, "recursion_steps", None)
        steps.append(recursion.float().cpu().numpy() if recursion is not None else np.ones(len(ids)))
    return np.stack(answers), np.concatenate(steps)


def open_cells(task, puzzles: np.ndarray) -> np.ndarray:
    """[N, n, n] True where the answer is not given by the puzzle: Sudoku blanks, maze free cells."""
    return puzzles == (2 if isinstance(task, MazeTask) else 0)


def score(task, puzzles: np.ndarray, answers: np.ndarray, references: np.ndarray | None) -> dict:
    """exact_accuracy (validator), cell_accuracy on open cells against the references (None without them)."""
    valid = [task.is_valid(p, a) for p, a in zip(puzzles, answers)]
    result = {"puzzles": len(puzzles), "exact_accuracy": float(np.mean(valid))}
    if references is not None:
        cells = open_cells(task, puzzles)
        result["cell_accuracy"] = float((answers == references)[cells].mean()) if cells.any() else 1.0
    return result


def evaluate_puzzles(model, task, puzzles, references=None, batch_size: int = 64) -> dict:
    """The figures of `score`, as the model was trained to run (recursive: its configured halting), plus for
    a recursive model exact_accuracy_by_steps and the Q-head's halting."""
    model.eval()
    answers, steps = predict_answers(model, task, puzzles, batch_size)
    result = score(task, puzzles, answers, references)
    config = model.config
    if not hasattr(config, "halt_max_steps"):
        return result
    trained = (config.halt_max_steps, config.eval_halting)
    try:
        config.eval_halting = "max_steps"
        curve = {}
        for k in range(1, 2 * trained[0] + 1):  # beyond the trained depth: does accuracy keep rising?
            config.halt_max_steps = k
            curve[k] = score(task, puzzles, predict_answers(model, task, puzzles, batch_size)[0], None)["exact_accuracy"]
        result["exact_accuracy_by_steps"] = curve
        config.halt_max_steps, config.eval_halting = trained[0], "q_head"
        answers, steps = predict_answers(model, task, puzzles, batch_size)
        result["q_head"] = {"exact_accuracy": score(task, puzzles, answers, None)["exact_accuracy"],
                            "mean_steps": float(steps.mean()), "halt_max_steps": trained[0]}
    finally:
        config.halt_max_steps, config.eval_halting = trained
    return result
