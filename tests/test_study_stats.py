"""The study's statistics beyond the t-tests: censored times to a target, ratios, and
what the report derives from them. Expected values are computed by hand (in the
comments) or by scipy where it is installed."""

from __future__ import annotations

import math

import pytest
from bnrs.study import stats


# --------------------------------------------------------------------------- censored times

def test_kaplan_meier_by_hand():
    # 6 runs; one reaches the target at t 2, one at 3 (another is censored at 3), one
    # at 5, two never (censored at the budget, 8).
    # S(2) = 5/6; S(3) = 5/6 x 4/5 (the run censored at 3 is still at risk there);
    # S(5) = 2/3 x 2/3 (3 at risk).
    times, reached = [2, 3, 3, 5, 8, 8], [True, True, False, True, False, False]
    steps = stats.kaplan_meier(times, reached)
    assert [t for t, _ in steps] == [2, 3, 5]
    assert [p for _, p in steps] == pytest.approx([5 / 6, 2 / 3, 4 / 9])
    assert stats.km_median(times, reached) == 5
    # Two of five reach the target: the median is beyond the budget.
    assert stats.km_median([3, 4, 10, 10, 10], [True, True, False, False, False]) == math.inf
    # Without censoring it is the ordinary (lower) median of the times.
    assert stats.km_median([4, 1, 3, 2], [True] * 4) == 2
    assert math.isnan(stats.km_median([], []))
    with pytest.raises(ValueError):
        stats.kaplan_meier([1, 2], [True])


def test_kaplan_meier_against_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    if not hasattr(scipy_stats, "ecdf"):
        pytest.skip("scipy < 1.11 has no ecdf")
    times = [3, 5, 5, 6, 7, 7, 9, 10, 10, 10]
    reached = [True, True, False, True, True, True, False, True, False, False]
    censored = scipy_stats.CensoredData(
        uncensored=[t for t, r in zip(times, reached) if r],
        right=[t for t, r in zip(times, reached) if not r])
    survival = scipy_stats.ecdf(censored).sf
    for t, s in stats.kaplan_meier(times, reached):
        assert s == pytest.approx(float(survival.evaluate(t)), abs=1e-12)


def test_paired_sign_test_counts_runs_that_never_arrive():
    inf = math.inf
    first = [3, 5, inf, inf, 4, 2, 6, inf]
    second = [4, 5, inf, 7, 6, 3, 8, 9]
    result = stats.paired_sign_test(first, second)
    # First faster on 4 seeds; second on 2 (both where the first never arrived); ties:
    # equal times and both never.
    assert (result.first_faster, result.second_faster, result.ties) == (4, 2, 2)
    assert result.p == pytest.approx(2 * (15 + 6 + 1) / 64)     # 2 P(Bin(6, 1/2) >= 4)
    scipy_stats = pytest.importorskip("scipy.stats")
    assert result.p == pytest.approx(scipy_stats.binomtest(4, 6).pvalue)
    assert stats.paired_sign_test([inf, inf], [inf, inf]).p == 1.0
    assert stats.censored_difference(inf, inf) == 0.0
    assert stats.censored_difference(inf, 3.0) == inf
    assert stats.censored_difference(2.0, 5.0) == -3.0


def test_median_interval_order_statistics():
    inf = math.inf
    values = [7, -1, 0, inf, 2, -3, 1, 4, 5, inf]
    interval = stats.median_interval(values)
    # n 10: k = 2 (2 P(X <= 1) = 22/1024 <= 0.05; 2 P(X <= 2) = 112/1024 is not), so
    # the interval is [x_(2), x_(9)] of -3 -1 0 1 2 4 5 7 inf inf; median (2 + 4) / 2.
    assert (interval.mean, interval.low, interval.high, interval.n) == (3.0, -1.0, inf, 10)
    # n 5 cannot reach 95% (the widest, [x_(1), x_(5)], covers 1 - 2/32); it reaches 90%.
    assert math.isnan(stats.median_interval([1, 2, 3, 4, 5]).low)
    ninety = stats.median_interval([5, 1, 4, 2, 3], level=0.9)
    assert (ninety.mean, ninety.low, ninety.high) == (3.0, 1.0, 5.0)
    assert stats.median_interval([]).n == 0
    scipy_stats = pytest.importorskip("scipy.stats")
    for n in (6, 10, 17):
        k = [i for i in range(1, n // 2 + 1)
             if 2 * scipy_stats.binom.cdf(i - 1, n, 0.5) <= 0.05][-1]
        interval = stats.median_interval(list(range(n)))
        assert (interval.low, interval.high) == (k - 1, n - k)


def test_ratio_interval_on_the_log_scale():
    # Ratios 2, 4, 8: logs ln2 x (1, 2, 3), mean 2 ln2 (geometric mean 4), sd ln2.
    half = 4.302653 * math.log(2) / math.sqrt(3)                   # t(0.975; 2) x se
    interval = stats.ratio_interval([2, 8, 16], [1, 2, 2])
    assert interval.mean == pytest.approx(4.0)
    assert (interval.low, interval.high) == pytest.approx(
        (math.exp(2 * math.log(2) - half), math.exp(2 * math.log(2) + half)), rel=1e-6)
    assert interval.n == 3
    # A pair with a missing time is left out.
    assert stats.ratio_interval([2, math.nan, 0], [1, 1, 1]).n == 1
    assert stats.ratio_interval([], []).n == 0
