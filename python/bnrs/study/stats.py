"""Statistics of the study: t-intervals over seeds and the verdict of a paired claim.

* A summary over seeds is the mean with a 95% Student-t interval
  ``mean ± t(0.975, n-1) · sd / sqrt(n)`` (no interval for a single value).
* A claim is decided on the paired differences ``d_s`` of its contrast over the seeds
  ``s`` (the same seed gives both variants the same initial weights where their shapes
  agree, the same order of mini-batches and the same data split):

  - **supported** if the 95% t-interval of the mean difference lies above 0 (in the
    direction the claim expects),
  - **contradicted** if it lies below 0,
  - **inconclusive** otherwise, or with fewer than 2 seeds.

  The effect size is the mean difference (in accuracy points for accuracies) and
  Cohen's d_z = mean(d) / sd(d).

No correction for the number of claims is made: with about thirty claims at 95%, one
or two "supported" or "contradicted" verdicts could be chance when there is no effect,
and the report says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Interval", "PairedResult", "mean_interval", "paired_verdict", "t_quantile"]

# t(0.975, df) for df = 1..30; beyond, the normal approximation with a 1/df correction.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201,
         2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074,
         2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile(df: int, level: float = 0.95) -> float:
    """The two-sided ``level`` quantile of Student's t with ``df`` degrees of freedom.

    Uses scipy when it is installed; otherwise a table (level 0.95 only).
    """
    if df < 1:
        raise ValueError(f"df: expected >= 1, got {df}")
    try:
        from scipy.stats import t as student_t
    except ImportError:
        if level != 0.95:
            raise ValueError("t_quantile: without scipy only level=0.95 is available")
        if df <= len(_T975):
            return _T975[df - 1]
        return 1.959964 + 2.4 / df
    return float(student_t.ppf(0.5 + level / 2, df))


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` values with its 95% t-interval ``[low, high]`` (NaN if n < 2)."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def _sd(values: Sequence[float]) -> float:
    n = len(values)
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def mean_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """The mean of ``values`` and its t-interval; NaN interval for fewer than 2 values."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = sum(values) / n
    if n < 2:
        return Interval(mean, math.nan, math.nan, n)
    half = t_quantile(n - 1, level) * _sd(values) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


@dataclass(frozen=True)
class PairedResult:
    """The verdict on a claim from paired differences (``plus - minus``, per seed)."""

    verdict: str          # "supported", "contradicted" or "inconclusive"
    difference: Interval  # mean difference and its 95% interval
    d_z: float            # Cohen's d_z = mean / sd of the differences
    differences: tuple[float, ...]


def paired_verdict(differences: Sequence[float], level: float = 0.95) -> PairedResult:
    """Decide a claim from its per-seed differences (positive = as the claim expects)."""
    differences = tuple(float(d) for d in differences)
    interval = mean_interval(differences, level)
    if interval.n < 2:
        return PairedResult("inconclusive", interval, math.nan, differences)
    sd = _sd(differences)
    if sd == 0.0:
        d_z = 0.0 if interval.mean == 0.0 else math.copysign(math.inf, interval.mean)
        verdict = ("inconclusive" if interval.mean == 0.0
                   else "supported" if interval.mean > 0 else "contradicted")
        return PairedResult(verdict, interval, d_z, differences)
    d_z = interval.mean / sd
    if interval.low > 0:
        verdict = "supported"
    elif interval.high < 0:
        verdict = "contradicted"
    else:
        verdict = "inconclusive"
    return PairedResult(verdict, interval, d_z, differences)
