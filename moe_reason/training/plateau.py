"""When a run has stopped improving on held-out data: the rule behind `--stop_on_plateau`.

A run evaluated n times has plateaued when n >= min_evals and, over the last quarter of its
evaluations (the last ceil(n / 4)), no watched metric rose `delta` or more above its best before
them. The window grows with the run, so a run that took long to start improving must stay flat
for proportionally long before it is stopped; `min_evals` keeps the first flat evaluations (before
learning starts) from stopping it. The watched metrics are held-out exact accuracy (puzzles solved)
and token accuracy: exact accuracy alone is flat at 0 while a model still learns the cells.
"""

import math

WATCHED = ("exact_match", "accuracy")  # evaluation figures, higher is better
RULE = ("a run plateaus when, after at least {min_evals} evaluations, neither held-out exact accuracy nor token "
        "accuracy rose {delta_points:g} point(s) or more over the last quarter of its evaluations above its best "
        "before them")


def describe(min_evals: int, delta: float) -> str:
    return RULE.format(min_evals=min_evals, delta_points=100 * delta)


def plateaued(history: list[list[float]], min_evals: int, delta: float) -> bool:
    """history: one [step, exact_match, accuracy] row per evaluation, oldest first."""
    n = len(history)
    if n < max(min_evals, 2):
        return False
    recent = math.ceil(n / 4)
    before, last = history[:n - recent], history[n - recent:]
    return all(max(row[column] for row in last) - max(row[column] for row in before) < delta
               for column in range(1, len(WATCHED) + 1))
