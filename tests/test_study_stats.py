"""The study's statistics beyond the t-tests: censored times to a target, ratios, and
what the report derives from them. Expected values are computed by hand (in the
comments) or by scipy where it is installed."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from bnrs.study import questions, report, results, stats

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


# --------------------------------------------------------------------------- results

_EPOCHS = 10
_STEPS_PER_EPOCH = 1000 // 50


def _run(reach_epoch=None, status="ok", curve=None, train_seconds=10.0, gap=0.05,
         test_acc=0.8):
    """A stored run of 10 epochs, 20 steps each, whose validation accuracy first reaches
    the target (0.8) at ``reach_epoch`` (None: never)."""
    if curve is None:
        curve = ([0.5] * _EPOCHS if reach_epoch is None else
                 [0.5] * (reach_epoch - 1) + [0.85] * (_EPOCHS - reach_epoch + 1))
    return {"status": status,
            "config": {"target_accuracy": 0.8, "epochs": _EPOCHS, "n_train": 1000,
                       "batch_size": 50},
            "metrics": {"test_acc": test_acc, "chance": 0.1, "gap": gap,
                        "train_seconds": train_seconds, "epochs_run": len(curve)},
            "curves": {"epoch": list(range(1, len(curve) + 1)), "val_acc": curve,
                       **{key: curve for key in ("train_loss", "train_acc", "test_acc")}}}


def _question(claims, names=("bn", "plain"), **extra):
    variants = tuple(questions.Variant(name, name, name) for name in names)
    return questions.Question(1, "x", "x", variants=variants, claims=claims, n_train=1000,
                              epochs=_EPOCHS, **extra)


def _entries(q, runs_by_variant):
    runs, entries = {}, []
    for name, seed_runs in runs_by_variant.items():
        for seed, run in enumerate(seed_runs):
            key = f"{name}-{seed}"
            runs[key] = run
            entries.append((q, q.variant(name), seed, key))
    return entries, runs


def test_time_to_target_censors_at_the_budget():
    assert results.time_to_target(_run(3)) == (3.0, True)
    assert results.time_to_target(_run(3), "steps") == (60.0, True)
    assert results.time_to_target(_run(None), "steps") == (200.0, False)
    # A diverged run never reached the target: censored at the budget, not dropped.
    diverged = _run(status="diverged", curve=[0.3, 0.1])
    assert results.time_to_target(diverged) == (10.0, False)
    stored = _run(2)
    stored["metrics"]["steps_per_epoch"] = 7
    assert results.time_to_target(stored, "steps") == (14.0, True)
    # Protocol 2 stores the steps after each epoch: they count where stored.
    stored["curves"]["steps"] = [5, 11, 17]
    assert results.time_to_target(stored, "steps") == (11.0, True)
    assert results.time_to_target(stored, "epochs") == (2.0, True)
    no_target = _run(2)
    no_target["config"]["target_accuracy"] = None
    assert results.time_to_target(no_target) == (10.0, False)


def test_time_claim_counts_runs_that_never_reach_the_target():
    claim = questions.Claim("BN reaches the target in fewer steps", ("bn",), ("plain",),
                            metric="steps_to_target", lower_is_better=True)
    q = _question((claim,))
    bn = [_run(e) for e in (2, 2, 3, 2, 4, None, 3, 2)]
    plain = [_run(e) for e in (4, None, 3, 5, None, None, 6, 3)]
    plain[4] = _run(status="diverged", curve=[0.3, 0.1])
    entries, runs = _entries(q, {"bn": bn, "plain": plain})
    (result,) = results.claim_results(q, entries, runs)
    assert result.test == "exact sign"
    # BN first on 6 seeds, never last; seed 2 ties (both at 3), seed 5 ties (neither).
    assert (result.plus_faster, result.minus_faster, result.ties) == (6, 0, 2)
    assert result.p == pytest.approx(2 / 64)
    # Differences in steps: -40, -inf, 0, -60, -inf, 0, -60, -20: median (-60 - 40) / 2;
    # n 8 gives the 95% interval [x_(1), x_(8)] (2 P(X <= 1) = 18/256 > 0.05).
    assert result.mean == -50 and (result.low, result.high) == (-math.inf, 0)
    # Kaplan-Meier medians in steps: BN 4 of 8 at 40 -> S = 1/2; no BN: 60 (2/8), 80
    # (1/6), 100 (1/5) -> S = 6/8 x 5/6 x 4/5 = 1/2.
    assert (result.plus_median, result.minus_median) == (40, 100)
    assert (result.plus_reached, result.minus_reached) == (7, 5)
    assert result.diverged == 1
    results.adjust_claims([result])
    assert result.verdict == result.raw_verdict == "supported"
    assert result.overall_verdict == "supported"
    text = result.sentence()
    assert "exact sign test p 0.031" in text
    assert "Kaplan-Meier median 40 steps vs 100 steps (reached by 7/8 vs 5/8)" in text
    assert "Holm-level interval −∞ to 0" in text
    assert report._verdict_cell(result) == (
        "**supported**: median -50 steps (−∞ to 0); reached 7/8 vs 5/8")
    # Averaging only the runs that got there is not what decides it: a claim on several
    # variants (censored times do not add up) is refused.
    bad = questions.Claim("x", ("bn", "plain"), ("plain",), metric="epochs_to_target")
    with pytest.raises(ValueError, match="censored times"):
        results.claim_results(_question((bad,)), entries, runs)


def test_time_claim_in_the_holm_family():
    faster = questions.Claim("a first", ("bn",), ("plain",), metric="epochs_to_target",
                             lower_is_better=True)
    better = questions.Claim("a better", ("bn",), ("plain",))
    q = _question((faster, better))
    bn = [_run(2, test_acc=0.80 + 0.01 * s) for s in range(8)]
    plain = [_run(5, test_acc=0.79 + 0.011 * s) for s in range(8)]
    entries, runs = _entries(q, {"bn": bn, "plain": plain})
    claims = results.adjust_claims(results.claim_results(q, entries, runs))
    p_values = [c.p for c in claims]
    assert [c.p_holm for c in claims] == pytest.approx(stats.holm_adjust(p_values))
    time_claim, accuracy_claim = claims
    assert time_claim.p == pytest.approx(2 / 256) and accuracy_claim.p < time_claim.p
    # The time claim is Holm's second step of two: level 1 - 0.05 / 1; n 8 then gives
    # [x_(1), x_(8)] (2 P(X <= 0) = 2/256 <= 0.05 < 2 P(X <= 1)); every difference is -3.
    assert time_claim.adjusted_level == pytest.approx(0.95)
    assert (time_claim.adjusted_low, time_claim.adjusted_high) == (-3, -3)
    assert time_claim.verdict == accuracy_claim.verdict == "supported"


def test_still_rising():
    assert results.still_rising(_run(curve=[0.1 * i for i in range(1, 11)]))
    # The best of 10 epochs at the 9th is not in the last 10%; of 20 epochs it is.
    assert not results.still_rising(_run(curve=[0.1] * 8 + [0.9, 0.8]))
    assert results.still_rising(_run(curve=[0.1] * 18 + [0.9, 0.8]))
    # Ties: the earliest best epoch counts.
    assert not results.still_rising(_run(curve=[0.9] * 10))
    assert results.still_rising(_run(curve=[0.5], status="ok")) is None
    assert results.still_rising(_run(curve=[0.5, 0.6], status="diverged")) is None


def test_regimes_default_to_short():
    claim = questions.Claim("a beats b", ("bn",), ("plain",))
    assert results.regime_of(_question((claim,)), claim) == "short"
    long_q = SimpleNamespace(regime="overfitting", variants=_question(()).variants)
    assert results.regime_of(long_q) == results.regime_of(long_q, claim) == "overfitting"
    per_variant = SimpleNamespace(variants=(
        SimpleNamespace(name="bn", regime="overfitting"),
        SimpleNamespace(name="plain", regime="overfitting")))
    assert results.regime_of(per_variant, claim) == "overfitting"
    own = SimpleNamespace(statement="x", plus=("bn",), minus=("plain",), regime="long")
    assert results.regime_of(per_variant, own) == "long"


def _claim_result(statement, regime, verdict="supported", mean=0.02, rising=()):
    return results.ClaimResult(
        1, statement, "", "test_acc", verdict, mean, 0.01, 0.03, 2.0, 10, 0,
        regime=regime, raw_verdict=verdict, rising=list(rising), p=0.001, p_holm=0.01,
        adjusted_low=0.005, adjusted_high=0.035)


def test_summary_has_one_row_per_advice_and_a_column_per_regime():
    q1, q2 = SimpleNamespace(number=4), SimpleNamespace(number=11)
    by_question = {
        4: [_claim_result("Dropout helps (Srivastava 2014)", "short", "contradicted",
                          -0.02), _claim_result("Other advice", "short")],
        11: [_claim_result("Dropout helps (Srivastava 2014)", "overfit",
                           rising=["no dropout"])]}
    regimes, rows = report._summary_rows([q1, q2], by_question)
    assert regimes == ["short", "overfit"]
    assert rows[0][0] == "[Q4](#q4), [Q11](#q11) Dropout helps"
    assert rows[0][1] == "**contradicted**: -2.00 points (+0.50 to +3.50)"
    assert rows[0][2] == "**supported**: +2.00 points (+0.50 to +3.50) ↗"
    # A parenthesis without a year (a variant's name) is part of the advice.
    assert report._advice_text(_claim_result("MC dropout wins (dense d0.5)", "x")) == (
        "MC dropout wins (dense d0.5)")
    assert rows[1] == ["[Q4](#q4) Other advice",
                       "**supported**: +2.00 points (+0.50 to +3.50)", "–"]
    # The default regime first, the others as they come.
    assert report._regime_order(["long", "overfit", "short"]) == ["short", "long", "overfit"]
    doc = report._Document()
    report._summary(doc, [q1, q2], by_question, None)
    (table,) = [block for block in doc.blocks if block[0] == "table"]
    assert table[1] == ["advice", "short training", "overfitting regime"]


def test_bn_cost_pairs_and_intervals():
    q = _question((), names=("bn", "plain", "bn-lr10", "plain-lr10", "sigmoid-bn",
                             "sigmoid-plain", "brn-b2"))
    assert [(a.name, b.name) for a, b in results.bn_pairs(q)] == [
        ("bn", "plain"), ("bn-lr10", "plain-lr10"), ("sigmoid-bn", "sigmoid-plain")]
    # A regime's copies pair within the regime.
    q = _question((), names=("bn@overfit", "plain@overfit", "plain"))
    assert [(a.name, b.name) for a, b in results.bn_pairs(q)] == [
        ("bn@overfit", "plain@overfit")]
    q = _question(())
    bn = [_run(2, train_seconds=t, gap=g) for t, g in ((20, 0.10), (40, 0.12), (80, 0.14))]
    plain = [_run(2, train_seconds=t, gap=g) for t, g in ((10, 0.04), (20, 0.05),
                                                           (20, 0.03))]
    plain.append(_run(status="diverged", curve=[0.1, 0.1]))   # no partner: left out
    entries, runs = _entries(q, {"bn": bn, "plain": plain})
    (cost,) = results.bn_costs(q, entries, runs)
    # Seconds per epoch 2, 4, 8 vs 1, 2, 2: ratios 2, 2, 4, geometric mean 2^(4/3).
    assert cost.seconds_ratio.mean == pytest.approx(2 ** (4 / 3))
    assert cost.seconds_ratio.n == 3
    assert cost.seconds_with.mean == pytest.approx(14 / 3)
    # Gap differences 0.06, 0.07, 0.11: mean 0.08, sd sqrt(0.0007).
    half = 4.302653 * math.sqrt(0.0007) / math.sqrt(3)
    assert cost.gap_difference.mean == pytest.approx(0.08)
    assert (cost.gap_difference.low, cost.gap_difference.high) == pytest.approx(
        (0.08 - half, 0.08 + half), rel=1e-6)
    scipy_stats = pytest.importorskip("scipy.stats")
    low, high = scipy_stats.t.interval(0.95, 2, loc=0.08,
                                       scale=scipy_stats.sem([0.06, 0.07, 0.11]))
    assert (cost.gap_difference.low, cost.gap_difference.high) == pytest.approx((low, high))


def test_variant_summary_medians_count_every_run(tmp_path):
    q = _question(())
    bn = [_run(e) for e in (2, 3, None, None, None)]
    entries, runs = _entries(q, {"bn": bn, "plain": [_run(e) for e in (1, 2, 3, 4, 9)]})
    summaries = results.variant_summaries(q, entries, runs)
    # Averaging the two runs that got there would say 2.5 epochs; 3 of 5 never did.
    assert math.isinf(summaries[0].median_epochs_to_target) and summaries[0].n_timed == 2
    assert summaries[1].median_epochs_to_target == 3
    assert summaries[1].median_steps_to_target == 60
    assert report._target_cell(summaries[0]) == "not by the end (2/5 reached)"
    q = _question((questions.Claim("bn first", ("bn",), ("plain",),
                                   metric="epochs_to_target"),))
    entries, runs = _entries(q, {"bn": bn, "plain": [_run(e) for e in (1, 2, 3, 4, 9)]})
    claims = results.claim_results(q, entries, runs)
    results.write_claims_csv(claims, tmp_path / "claims.csv")
    header, row = (tmp_path / "claims.csv").read_text().splitlines()
    values = dict(zip(header.split(","), row.split(",")))
    assert (values["test"], values["plus_faster"], values["minus_faster"]) == (
        "exact sign", "0", "5")
    assert values["plus_median"] == "inf" and values["regime"] == "short"


def test_a_gain_claim_without_a_minus_side_is_in_points():
    # MC dropout: the claim is on a run's own difference (mc_gain = MC-dropout minus
    # deterministic test accuracy), no second variant; margin +-1 point.
    claim = questions.Claim("MC dropout beats the deterministic pass", ("drop",), (),
                            metric="mc_gain", equivalence=0.01,
                            equivalence_advice="the deterministic pass is as good")
    q = _question((claim,), names=("drop",))
    runs = [_run(2) for _ in range(5)]
    for run, gain in zip(runs, (0.001, 0.002, -0.001, 0.0, 0.003)):
        run["metrics"]["mc_gain"] = gain
    entries, stored = _entries(q, {"drop": runs})
    (result,) = results.adjust_claims(results.claim_results(q, entries, stored))
    assert result.differences == pytest.approx([0.001, 0.002, -0.001, 0.0, 0.003])
    assert result.unit == "points" and result.effect_text(interval=False) == "+0.10 points"
    assert result.overall_verdict == "equivalent"
    assert report._verdict_cell(result).startswith("**equivalent** within ±1 point")
    assert not results.is_accuracy("final_train_loss") and results.is_accuracy("gap")


def test_time_to_target_plot(tmp_path):
    from bnrs.study import plots

    plt = plots.load_pyplot()
    if plt is None:
        pytest.skip("matplotlib is not installed")
    claim = questions.Claim("bn first", ("bn",), ("plain",), metric="steps_to_target",
                            lower_is_better=True)
    q = _question((claim,))
    entries, runs = _entries(q, {"bn": [_run(e) for e in (2, 3, None)],
                                 "plain": [_run(e) for e in (4, None, None)]})
    assert plots.plot_time_to_target(plt, q, entries, runs, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 0
    no_time = _question((questions.Claim("a", ("bn",), ("plain",)),))
    assert not plots.plot_time_to_target(plt, no_time, entries, runs, tmp_path / "u.png")


def test_lower_is_better_effects_say_lower_or_higher():
    # BN's gap 2 points larger than without: "BN reduces overfitting" is 2 points higher.
    larger = results.ClaimResult(1, "BN reduces overfitting", "", "gap", "contradicted",
                                 0.02, 0.01, 0.03, 2.0, 10, 0, lower_is_better=True)
    assert larger.effect_text(interval=False) == "2 points higher"
    smaller = results.ClaimResult(1, "x", "", "final_train_loss", "supported", -0.276,
                                  -0.3, -0.25, 2.0, 10, 0, lower_is_better=True)
    assert smaller.effect_text(interval=False) == "0.276 lower"


def _claim(question, statement, test, n_seeds, p_holm, tost_p_holm=math.nan):
    return results.ClaimResult(question=question, statement=statement, source="", metric="m",
                               verdict="inconclusive", mean=0.0, low=0.0, high=0.0,
                               d_z=math.nan, n_seeds=n_seeds, diverged=0, test=test,
                               p_holm=p_holm, tost_p_holm=tost_p_holm)


def test_the_report_names_count_claims_that_holm_cannot_pass():
    # 10 seeds: an exact test's p is at least 2 / 2**10 = 0.00195; with 96 tests Holm
    # reaches that only after 96 - floor(0.05 / 0.00195) = 71 rejections.
    decided = [_claim(1, f"t{i}", "paired t", 10, 0.001) for i in range(35)]
    rest = [_claim(2, f"u{i}", "paired t", 10, 0.5) for i in range(59)]
    counts = [_claim(7, "Fewer diverge", "exact McNemar", 10, 0.2),
              _claim(1, "Sooner", "exact sign", 10, 0.1)]
    (item,) = report._undecidable_counts(decided + rest + counts, 96)
    assert "2 claims (2 pieces of advice" in item and "71 of the 96 tests" in item
    assert "rejected 35" in item and "12 seeds" in item
    assert "Q7 Fewer diverge" in item and "Q1 Sooner" in item
    # Enough seeds, or enough rejections before them: nothing to say.
    assert report._undecidable_counts(decided + rest + [
        _claim(1, "Sooner", "exact sign", 14, 0.1)], 96) == []
    assert report._undecidable_counts(
        [_claim(1, f"t{i}", "paired t", 10, 0.001) for i in range(80)] + counts, 96) == []
