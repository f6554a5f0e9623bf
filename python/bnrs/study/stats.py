"""Statistics of the study: t-intervals over seeds and the verdict of a paired claim.

* A summary over seeds is the mean with a 95% Student-t interval
  ``mean ± t(0.975, n-1) · sd / sqrt(n)`` (no interval for a single value).
* A claim's unadjusted verdict (:func:`paired_verdict`) is decided on the paired
  differences ``d_s`` of its contrast over the seeds ``s`` (the same seed gives both
  variants the same initial weights where their shapes agree, the same order of
  mini-batches and the same data split):

  - **supported** if the 95% t-interval of the mean difference lies above 0 (in the
    direction the claim expects),
  - **contradicted** if it lies below 0,
  - **inconclusive** otherwise, or with fewer than 2 seeds.

  The effect size is the mean difference (in accuracy points for accuracies) and
  Cohen's d_z = mean(d) / sd(d).

* Multiplicity: every claim also gets a two-sided p-value (:func:`t_p_value`), and the
  p-values of the whole study are adjusted by Holm's step-down method
  (:func:`holm_adjust`, which controls the family-wise error rate) and by
  Benjamini-Hochberg (:func:`bh_adjust`, the false discovery rate). The report takes a
  claim's verdict from its Holm-adjusted p-value.
* Equivalence ("X makes no difference"): two one-sided tests (:func:`tost`) against a
  margin fixed beforehand; "equivalent" if both reject, i.e. the ``1 - 2 alpha``
  interval lies inside ``(-margin, margin)``.
* Counts (how many runs diverged): exact tests, :func:`exact_mcnemar` for seeds paired
  across two variants (the binomial test on the discordant seeds), :func:`fisher_exact`
  for two independent groups.
* :func:`minimum_detectable_effect`: the smallest mean difference the paired design
  detects with 80% power.
* Times to a target with runs that never reach it (right-censored at the budget):
  :func:`kaplan_meier` and :func:`km_median` per variant; between two variants paired
  by seed, :func:`paired_sign_test` (a run that never reaches the target is slower than
  any that does, two that never reach it tie) and :func:`median_interval`, the
  distribution-free interval of the median paired difference (order statistics,
  infinite where too many runs never reach it). Nothing averages only the runs that
  reached the target.
* Ratios (BN's time per epoch): :func:`ratio_interval`, the geometric mean of paired
  ratios with its t-interval on the log scale.

The t distribution is computed here (regularised incomplete beta function by its
continued fraction), so that scipy is not needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Interval", "PairedResult", "SignTest", "TostResult", "bh_adjust",
           "binomial_test", "censored_difference", "exact_mcnemar", "fisher_exact",
           "holm_adjust", "kaplan_meier", "km_median", "mean_interval",
           "median_interval", "minimum_detectable_effect", "paired_sign_test",
           "paired_verdict", "ratio_interval", "t_cdf", "t_p_value", "t_quantile",
           "tost"]

# t(0.975, df) for df = 1..30; beyond, the normal approximation with a 1/df correction.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201,
         2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074,
         2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile(df: int, level: float = 0.95) -> float:
    """The two-sided ``level`` quantile of Student's t with ``df`` degrees of freedom.

    Uses scipy when it is installed; otherwise a table at level 0.95 (as the committed
    study was computed) and, at other levels, the inverse of :func:`t_cdf`.
    """
    if df < 1:
        raise ValueError(f"df: expected >= 1, got {df}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level: expected in (0, 1), got {level}")
    try:
        from scipy.stats import t as student_t
    except ImportError:
        if level != 0.95:
            return _t_inverse(0.5 + level / 2, df)
        if df <= len(_T975):
            return _T975[df - 1]
        return 1.959964 + 2.4 / df
    return float(student_t.ppf(0.5 + level / 2, df))


def _incomplete_beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularised incomplete beta function (modified
    Lentz's method, as in Numerical Recipes' ``betacf``)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for numerator in (m * (b - m) * x / ((a + m2 - 1.0) * (a + m2)),
                          -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1.0))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def _regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularised incomplete beta function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    # The fraction converges fast for x < (a + 1) / (a + b + 2); use the symmetry
    # I_x(a, b) = 1 - I_{1-x}(b, a) on the other side.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _incomplete_beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _incomplete_beta_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom (to about 1e-14)."""
    if df <= 0:
        raise ValueError(f"df: expected > 0, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * _regularized_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def _t_inverse(probability: float, df: float) -> float:
    """The ``probability`` quantile of Student's t (bisection on :func:`t_cdf`)."""
    low, high = -1.0, 1.0
    while t_cdf(low, df) > probability:
        low *= 2.0
    while t_cdf(high, df) < probability:
        high *= 2.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if t_cdf(middle, df) < probability:
            low = middle
        else:
            high = middle
        if high - low < 1e-12 * max(1.0, abs(middle)):
            break
    return 0.5 * (low + high)


def t_p_value(differences: Sequence[float]) -> float:
    """The two-sided p-value of the one-sample t-test of mean(differences) = 0
    (NaN for fewer than 2 values; 0 or 1 if all differences are equal)."""
    values = [float(v) for v in differences]
    n = len(values)
    if n < 2:
        return math.nan
    mean, sd = sum(values) / n, _sd(values)
    if sd == 0.0:
        return 1.0 if mean == 0.0 else 0.0
    t = mean / (sd / math.sqrt(n))
    return min(1.0, 2.0 * t_cdf(-abs(t), n - 1))


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error rate), in the input order.

    With the p-values sorted, ``p_(1) <= ... <= p_(m)``, the adjusted value of the k-th
    is ``max_{j <= k} min(1, (m - j + 1) p_(j))``; a hypothesis is rejected at level
    alpha when its adjusted p-value is <= alpha. NaNs stay NaN and do not count in m.
    """
    return _adjust(p_values, holm=True)


def bh_adjust(p_values: Sequence[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values (false discovery rate), in the input order.

    With the p-values sorted, the adjusted value of the k-th is
    ``min_{j >= k} min(1, m p_(j) / j)``. NaNs stay NaN and do not count in m.
    """
    return _adjust(p_values, holm=False)


def _adjust(p_values: Sequence[float], holm: bool) -> list[float]:
    values = [float(p) for p in p_values]
    order = sorted((i for i, p in enumerate(values) if not math.isnan(p)),
                   key=lambda i: values[i])
    m = len(order)
    adjusted = [math.nan] * len(values)
    if holm:
        running = 0.0
        for rank, i in enumerate(order):
            running = max(running, min(1.0, (m - rank) * values[i]))
            adjusted[i] = running
    else:
        running = 1.0
        for rank in range(m - 1, -1, -1):
            i = order[rank]
            running = min(running, m * values[i] / (rank + 1))
            adjusted[i] = running
    return adjusted


@dataclass(frozen=True)
class TostResult:
    """Two one-sided tests of ``|mean difference| < margin``.

    ``p`` is the larger of the two one-sided p-values (equivalence is shown at level
    alpha when ``p < alpha``); ``low``/``high`` the ``1 - 2 alpha`` interval of the mean.
    """

    margin: float
    p: float
    low: float
    high: float

    @property
    def equivalent(self) -> bool:
        return self.p < 0.05


def tost(differences: Sequence[float], margin: float, alpha: float = 0.05) -> TostResult:
    """Paired two one-sided t-tests (Schuirmann 1987) of equivalence within ``margin``.

    H0: mean <= -margin or mean >= margin. The p-value is the larger of the one-sided
    p-values of ``(mean + margin) / se`` (upper tail) and ``(mean - margin) / se``
    (lower tail), both with n - 1 degrees of freedom.
    """
    if margin <= 0:
        raise ValueError(f"margin: expected > 0, got {margin}")
    values = [float(v) for v in differences]
    n = len(values)
    if n < 2:
        return TostResult(margin, math.nan, math.nan, math.nan)
    mean, sd = sum(values) / n, _sd(values)
    if sd == 0.0:
        p = 0.0 if abs(mean) < margin else 1.0
        return TostResult(margin, p, mean, mean)
    se = sd / math.sqrt(n)
    p_lower = 1.0 - t_cdf((mean + margin) / se, n - 1)
    p_upper = t_cdf((mean - margin) / se, n - 1)
    half = t_quantile(n - 1, 1.0 - 2.0 * alpha) * se
    return TostResult(margin, max(p_lower, p_upper), mean - half, mean + half)


def binomial_test(successes: int, trials: int, p: float = 0.5,
                  alternative: str = "two-sided") -> float:
    """The exact binomial test's p-value of ``successes`` out of ``trials``.

    ``alternative``: ``"greater"`` (P(X >= successes)), ``"less"`` (P(X <= successes)),
    or ``"two-sided"`` (the sum of the probabilities of all outcomes no more likely than
    the observed one, as R's binom.test and scipy's binomtest do).
    """
    if not 0 <= successes <= trials:
        raise ValueError(f"successes: expected 0..{trials}, got {successes}")
    if trials == 0:
        return 1.0
    pmf = [math.comb(trials, k) * p ** k * (1 - p) ** (trials - k)
           for k in range(trials + 1)]
    if alternative == "greater":
        return min(1.0, sum(pmf[successes:]))
    if alternative == "less":
        return min(1.0, sum(pmf[:successes + 1]))
    if alternative != "two-sided":
        raise ValueError(f"alternative: expected two-sided, greater or less, got "
                         f"{alternative!r}")
    observed = pmf[successes] * (1 + 1e-7)
    return min(1.0, sum(q for q in pmf if q <= observed))


def exact_mcnemar(only_first: int, only_second: int,
                  alternative: str = "two-sided") -> float:
    """Exact McNemar test for paired binary outcomes: the binomial test of the
    discordant pairs (``only_first`` pairs where only the first has the event,
    ``only_second`` where only the second has it) against 1/2. ``"greater"``: the first
    has the event more often."""
    return binomial_test(only_first, only_first + only_second, 0.5, alternative)


def fisher_exact(table: Sequence[Sequence[int]], alternative: str = "two-sided") -> float:
    """Fisher's exact test of a 2x2 table ``[[a, b], [c, d]]`` (rows: groups, columns:
    event / no event). ``"greater"``: the first row has the event more often (the
    odds ratio is above 1); two-sided sums the tables no more likely than the observed."""
    (a, b), (c, d) = table
    row1, row2, col1 = a + b, c + d, a + c
    total = row1 + row2
    low, high = max(0, col1 - row2), min(row1, col1)

    def probability(x: int) -> float:
        return (math.comb(row1, x) * math.comb(row2, col1 - x)) / math.comb(total, col1)

    probabilities = {x: probability(x) for x in range(low, high + 1)}
    if alternative == "greater":
        return min(1.0, sum(q for x, q in probabilities.items() if x >= a))
    if alternative == "less":
        return min(1.0, sum(q for x, q in probabilities.items() if x <= a))
    if alternative != "two-sided":
        raise ValueError(f"alternative: expected two-sided, greater or less, got "
                         f"{alternative!r}")
    observed = probabilities[a] * (1 + 1e-7)
    return min(1.0, sum(q for q in probabilities.values() if q <= observed))


def minimum_detectable_effect(sd: float, n: int, alpha: float = 0.05,
                              power: float = 0.8) -> float:
    """The smallest true mean difference a paired t-test on ``n`` seeds detects with
    probability ``power`` at two-sided level ``alpha``, given the SD of the differences:
    ``(t(1 - alpha/2, n-1) + t(power, n-1)) * sd / sqrt(n)`` (the usual approximation to
    the noncentral t; NaN for n < 2)."""
    if n < 2 or not math.isfinite(sd):
        return math.nan
    t_alpha = _t_inverse(1.0 - alpha / 2.0, n - 1)
    t_power = _t_inverse(power, n - 1)
    return (t_alpha + t_power) * sd / math.sqrt(n)


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


# --------------------------------------------------------------------------- censored times


def kaplan_meier(times: Sequence[float],
                 reached: Sequence[bool]) -> list[tuple[float, float]]:
    """The Kaplan-Meier estimate of P(not yet at the target after time t).

    ``times[i]`` is when run ``i`` reached the target if ``reached[i]``, else when it was
    last seen without reaching it (censored: the end of its budget). Returns the steps
    ``[(t, S(t))]`` at each time where a run reached the target, in increasing t (S
    starts at 1 before the first). At a tie, the runs reaching the target count before
    those censored at the same time (the usual convention).
    """
    if len(times) != len(reached):
        raise ValueError(f"times and reached: expected equal lengths, got {len(times)} "
                         f"and {len(reached)}")
    survival, steps = 1.0, []
    at_risk = len(times)
    for t in sorted({float(t) for t in times}):
        events = sum(1 for u, r in zip(times, reached) if r and float(u) == t)
        censored = sum(1 for u, r in zip(times, reached) if not r and float(u) == t)
        if events:
            survival *= 1.0 - events / at_risk
            steps.append((t, survival))
        at_risk -= events + censored
    return steps


def km_median(times: Sequence[float], reached: Sequence[bool]) -> float:
    """The Kaplan-Meier median time to the target: the first time where the estimated
    fraction not yet there falls to 1/2 or below; ``inf`` if it never does (fewer than
    half the runs are known to reach it within the budget); NaN without runs."""
    if not times:
        return math.nan
    for t, survival in kaplan_meier(times, reached):
        if survival <= 0.5 + 1e-12:
            return t
    return math.inf


@dataclass(frozen=True)
class SignTest:
    """The exact sign test of paired times (lower is faster).

    ``first_faster``/``second_faster``: seeds where the first/second variant got there
    first (a run that never got there is slower than one that did); ``ties`` the others
    (equal times, or neither got there). ``p``: the two-sided exact binomial p-value of
    the untied seeds against 1/2 (1 when all tie).
    """

    first_faster: int
    second_faster: int
    ties: int
    p: float


def paired_sign_test(first: Sequence[float], second: Sequence[float]) -> SignTest:
    """Exact sign test of times paired by seed; ``math.inf`` marks a run that never
    reached the target (censored at the budget, which both variants share)."""
    if len(first) != len(second):
        raise ValueError(f"first and second: expected equal lengths, got {len(first)} "
                         f"and {len(second)}")
    first_faster = sum(1 for a, b in zip(first, second) if a < b)
    second_faster = sum(1 for a, b in zip(first, second) if b < a)
    ties = len(first) - first_faster - second_faster
    return SignTest(first_faster, second_faster, ties,
                    binomial_test(first_faster, first_faster + second_faster))


def censored_difference(first: float, second: float) -> float:
    """``first - second`` for times where ``inf`` means never: 0 if neither got there,
    +-inf if only one did."""
    if math.isinf(first) and math.isinf(second):
        return 0.0
    return first - second


def median_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """The median of ``values`` and its distribution-free interval ``[x_(k), x_(n+1-k)]``
    (order statistics, inverting the sign test: the largest k with
    ``2 P(Bin(n, 1/2) <= k - 1) <= 1 - level``).

    Values may be infinite (a paired time difference where one run never reached the
    target); so may the median and the bounds. NaN interval when n is too small for
    ``level`` (n = 5 gives at most 93.75%).
    """
    ordered = sorted(float(v) for v in values)
    n = len(ordered)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    middle = n // 2
    median = (ordered[middle] if n % 2 else
              ordered[middle] if ordered[middle - 1] == ordered[middle] else
              0.5 * (ordered[middle - 1] + ordered[middle]))
    tail, k = 0.0, 0
    # Grow k while the two tails below x_(k) and above x_(n+1-k) stay within 1 - level.
    while k < middle:
        tail += math.comb(n, k) * 0.5 ** n
        if 2.0 * tail > 1.0 - level + 1e-12:
            break
        k += 1
    if k == 0:
        return Interval(median, math.nan, math.nan, n)
    return Interval(median, ordered[k - 1], ordered[n - k], n)


def ratio_interval(numerators: Sequence[float], denominators: Sequence[float],
                   level: float = 0.95) -> Interval:
    """The geometric mean of the paired ratios ``numerators[i] / denominators[i]`` and
    its t-interval, computed on the log scale and exponentiated (pairs with a
    non-positive or non-finite value are left out)."""
    logs = [math.log(a / b) for a, b in zip(numerators, denominators)
            if math.isfinite(a) and math.isfinite(b) and a > 0 and b > 0]
    interval = mean_interval(logs, level)
    if interval.n == 0:
        return interval
    return Interval(math.exp(interval.mean), math.exp(interval.low),
                    math.exp(interval.high), interval.n)
