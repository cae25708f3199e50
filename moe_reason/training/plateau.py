"""When a run has stopped improving on held-out data: the rule behind `--stop_on_plateau`.

A run evaluated n times has plateaued when n >= min_evals and, over the last quarter of its
evaluations (the last ceil(n / 4), and at least min_window of them), no watched metric rose `delta`
or more above its best before them. The window grows with the run, so a run that took long to start
improving must stay flat for proportionally long; `min_evals` keeps the first flat evaluations
(before learning starts) from stopping it, and `min_window` keeps a run evaluated a dozen times from
being judged on its last three, where a slow learner's rise is within the noise. The watched metrics
are held-out exact accuracy (puzzles solved) and token accuracy: exact accuracy alone is flat at 0
while a model still learns the cells."""

import math

WATCHED = ("exact_match", "accuracy")  # evaluation figures, higher is better
RULE = ("a run plateaus when, after at least {min_evals} evaluations, neither held-out exact accuracy nor token "
        "accuracy rose {delta_points:g} point(s) or more over the last quarter of its evaluations{window} above "
        "its best before them")


def describe(min_evals: int, delta: float, min_window: int = 1) -> str:
    window = f" (at least the last {min_window})" if min_window > 1 else ""
    return RULE.format(min_evals=min_evals, delta_points=100 * delta, window=window)


def plateaued(history: list[list[float]], min_evals: int, delta: float, min_window: int = 1) -> bool:
    """history: one [step, exact_match, accuracy] row per evaluation, oldest first."""
    n = len(history)
    recent = max(math.ceil(n / 4), min_window)
    if n < max(min_evals, recent + 1):  # too early, or nothing before the window to compare with
        return False
    before, last = history[:n - recent], history[n - recent:]
    return all(max(row[column] for row in last) - max(row[column] for row in before) < delta
               for column in range(1, len(WATCHED) + 1))
