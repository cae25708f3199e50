"""The statistics that decide whether two arms differ: a 95% confidence interval over seeds for the
difference of their means (Welch's t: unequal variances, no pairing), and Holm's correction where a
grid compares many variants with one baseline.

A difference is called real when its interval excludes 0 (comparisons), or when Holm's step-down
procedure rejects "no difference" at a family-wise 5% (grids). Seeds are the unit: each run's final
figure is one observation, so the interval says how far another set of seeds could land.
"""

import math
from dataclasses import dataclass

from scipy import stats

CONFIDENCE = 0.95
RULE = ("a difference is called real when the 95% confidence interval of mean_a - mean_b over seeds "
        "(Welch's t, unequal variances) excludes 0; it needs at least 2 seeds per side")
HOLM_RULE = ("with several variants against one baseline, a difference is called real when Holm's step-down "
             "procedure over the variants' Welch p-values rejects \"no difference\" at a family-wise 5%")


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def mean_std_text(values: list[float]) -> str:
    """The "mean ± std" over seeds a report prints; one seed has no spread, so it says so rather than "± 0"."""
    mean, std = mean_std(values)
    return f"{mean:.4f} ± {std:.4f}" if len(values) > 1 else f"{mean:.4f} (1 seed)"


@dataclass(frozen=True)
class Difference:
    """mean(a) - mean(b) with its Welch interval and two-sided p-value; `low`/`high` are None below 2 seeds
    a side. Where both sides have no spread at all, the interval is the point itself (p 0, or 1 when equal)."""

    diff: float
    low: float | None
    high: float | None
    p_value: float | None
    df: float | None

    @property
    def excludes_zero(self) -> bool | None:
        if self.low is None:
            return None
        return self.low > 0 or self.high < 0

    def interval_text(self, scale: float = 1.0, digits: int = 4) -> str:
        if self.low is None:
            return f"{self.diff * scale:+.{digits}f} (interval unknown: fewer than 2 seeds a side)"
        return f"{self.diff * scale:+.{digits}f} [{self.low * scale:+.{digits}f}, {self.high * scale:+.{digits}f}]"


def welch(a: list[float], b: list[float], confidence: float = CONFIDENCE) -> Difference:
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    diff = ma - mb
    if len(a) < 2 or len(b) < 2:
        return Difference(diff, None, None, None, None)
    va, vb = sa * sa / len(a), sb * sb / len(b)
    se = math.sqrt(va + vb)
    if se == 0:  # every seed of both sides gave the same figure: nothing varies, the difference is exact
        return Difference(diff, diff, diff, 0.0 if diff else 1.0, None)
    df = (va + vb) ** 2 / (va * va / (len(a) - 1) + vb * vb / (len(b) - 1))  # Welch-Satterthwaite
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * se
    p = float(2 * stats.t.sf(abs(diff) / se, df))
    return Difference(diff, diff - half, diff + half, p, df)


def holm(p_values: dict[str, float | None], alpha: float = 1 - CONFIDENCE) -> dict[str, bool | None]:
    """Holm's step-down procedure: {name: rejected} (None where the p-value is unknown, which counts as
    a comparison all the same, so the correction is never weakened by a missing seed)."""
    known = sorted((p, name) for name, p in p_values.items() if p is not None)
    m = len(p_values)
    rejected, stopped = {name: None for name, p in p_values.items() if p is None}, False
    for rank, (p, name) in enumerate(known):
        stopped = stopped or p > alpha / (m - rank)
        rejected[name] = not stopped
    return rejected
