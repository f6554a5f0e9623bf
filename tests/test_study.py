"""bnrs.study: statistics, storage (resume, concurrent writers, killed runs), the runner,
the pairing of seeds, a tiny end-to-end study and the dask backend."""

from __future__ import annotations

import builtins
import json
import math
import multiprocessing
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import bnrs
import numpy as np
import pytest
from bnrs.study import plots, questions, report, results, runner, stats, storage, train

# --------------------------------------------------------------------------- stats


def test_t_quantile_known_values():
    assert stats.t_quantile(1) == pytest.approx(12.706, abs=1e-3)
    assert stats.t_quantile(4) == pytest.approx(2.776, abs=1e-3)
    assert stats.t_quantile(30) == pytest.approx(2.042, abs=1e-3)
    with pytest.raises(ValueError):
        stats.t_quantile(0)


def test_t_quantile_without_scipy(monkeypatch):
    real_import = builtins.__import__

    def no_scipy(name, *args, **kwargs):
        if name.startswith("scipy"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_scipy)
    assert stats.t_quantile(4) == 2.776
    assert stats.t_quantile(1000) == pytest.approx(1.962, abs=1e-3)


def test_mean_interval_on_known_numbers():
    interval = stats.mean_interval([1, 2, 3, 4, 5])
    # sd = sqrt(2.5); half width = 2.776 * sqrt(2.5) / sqrt(5) = 1.963
    assert interval.mean == 3 and interval.n == 5
    assert interval.half_width == pytest.approx(2.7764451 * math.sqrt(2.5) / math.sqrt(5))
    single = stats.mean_interval([0.9])
    assert single.mean == 0.9 and math.isnan(single.low)
    assert stats.mean_interval([]).n == 0


@pytest.mark.parametrize("differences, verdict", [
    ([0.010, 0.012, 0.008, 0.011, 0.009], "supported"),
    ([-0.010, -0.012, -0.008, -0.011, -0.009], "contradicted"),
    ([0.010, -0.012, 0.008, -0.011, 0.009], "inconclusive"),
    ([0.05], "inconclusive"),                     # one seed: no interval
    ([0.02, 0.02, 0.02], "supported"),            # no spread: the sign decides
    ([0.0, 0.0, 0.0], "inconclusive"),
])
def test_paired_verdict(differences, verdict):
    result = stats.paired_verdict(differences)
    assert result.verdict == verdict
    if len(differences) > 1 and np.std(differences) > 0:
        assert result.d_z == pytest.approx(np.mean(differences) / np.std(differences, ddof=1))


def test_t_cdf_against_closed_forms_and_tables():
    # df = 1 is the Cauchy distribution, df = 2 has F(t) = 1/2 + t / (2 sqrt(2 + t^2)).
    for t in (-30.0, -3.0, -0.2, 0.0, 1.0, 4.5):
        assert stats.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-13)
        assert stats.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)),
                                                  abs=1e-13)
    # Published quantiles: t(0.975; 4) = 2.776445, t(0.975; 10) = 2.228139,
    # t(0.95; 30) = 1.697261, t(0.8; 4) = 0.940965.
    assert stats.t_cdf(2.776445105, 4) == pytest.approx(0.975, abs=1e-9)
    assert stats.t_cdf(2.228138852, 10) == pytest.approx(0.975, abs=1e-9)
    assert stats.t_cdf(1.697260887, 30) == pytest.approx(0.95, abs=1e-9)
    assert stats.t_cdf(0.940964577, 4) == pytest.approx(0.8, abs=1e-9)
    assert stats.t_cdf(math.inf, 3) == 1.0 and stats.t_cdf(-math.inf, 3) == 0.0


def test_t_quantile_at_other_levels_without_scipy(monkeypatch):
    real_import = builtins.__import__

    def no_scipy(name, *args, **kwargs):
        if name.startswith("scipy"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_scipy)
    assert stats.t_quantile(4, 0.90) == pytest.approx(2.131847, abs=1e-6)
    assert stats.t_quantile(4, 0.60) == pytest.approx(0.940965, abs=1e-6)
    assert stats.t_quantile(1, 0.5) == pytest.approx(1.0, abs=1e-9)   # Cauchy quartile


def test_t_p_value_on_hand_computed_numbers():
    # [1, 2, 3]: mean 2, sd 1, t = 2 sqrt(3), df 2: p = 1 - t / sqrt(2 + t^2).
    t = 2 * math.sqrt(3)
    assert stats.t_p_value([1, 2, 3]) == pytest.approx(1 - t / math.sqrt(2 + t * t))
    # [1..5]: t = 3 / (sqrt(2.5) / sqrt(5)) = 4.2426, df 4: p = 0.013236 (R: t.test).
    assert stats.t_p_value([1, 2, 3, 4, 5]) == pytest.approx(0.013236, abs=1e-6)
    assert stats.t_p_value([-1, -2, -3]) == stats.t_p_value([1, 2, 3])
    assert math.isnan(stats.t_p_value([0.5]))
    assert stats.t_p_value([0.0, 0.0]) == 1.0 and stats.t_p_value([0.1, 0.1]) == 0.0


def test_holm_and_benjamini_hochberg_by_hand():
    p = [0.01, 0.04, 0.03, 0.005]
    # Sorted 0.005, 0.01, 0.03, 0.04. Holm: 4 x 0.005 = 0.02, 3 x 0.01 = 0.03,
    # 2 x 0.03 = 0.06, 1 x 0.04 = 0.04 -> running maximum 0.06.
    assert stats.holm_adjust(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # BH: 0.005 x 4/1 = 0.02, 0.01 x 4/2 = 0.02, 0.03 x 4/3 = 0.04, 0.04 x 4/4 = 0.04,
    # running minimum from the largest.
    assert stats.bh_adjust(p) == pytest.approx([0.02, 0.04, 0.04, 0.02])
    # Capped at 1; a NaN (a claim without data) is left out of m.
    assert stats.holm_adjust([0.5, 0.6, math.nan]) == pytest.approx([1.0, 1.0, math.nan],
                                                                     nan_ok=True)
    assert stats.bh_adjust([0.5, 0.6, math.nan]) == pytest.approx([0.6, 0.6, math.nan],
                                                                   nan_ok=True)
    # BH's step-up: 0.049 x 2/2 makes the first one 0.049 too, not 0.04 x 2 = 0.08.
    assert stats.bh_adjust([0.04, 0.049]) == pytest.approx([0.049, 0.049])
    assert stats.holm_adjust([0.04, 0.049]) == pytest.approx([0.08, 0.08])
    assert stats.holm_adjust([]) == [] and stats.bh_adjust([]) == []


def test_tost_by_hand():
    # [0.1, 0.2, 0.3]: mean 0.2, se 0.1 / sqrt(3); against +-0.5 the binding test is the
    # upper one, t = (0.2 - 0.5) / se = -3 sqrt(3), df 2.
    t = -3 * math.sqrt(3)
    result = stats.tost([0.1, 0.2, 0.3], 0.5)
    assert result.p == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)))
    assert result.equivalent
    half = 2.919986 * 0.1 / math.sqrt(3)                      # t(0.95; 2) x se
    assert (result.low, result.high) == pytest.approx((0.2 - half, 0.2 + half), abs=1e-6)
    # The 90% interval (0.03, 0.37) is not inside +-0.25: not shown equivalent.
    assert not stats.tost([0.1, 0.2, 0.3], 0.25).equivalent
    assert stats.tost([-0.1, -0.2, -0.3], 0.5).p == pytest.approx(result.p)
    with pytest.raises(ValueError):
        stats.tost([0.1, 0.2], 0.0)


def test_exact_tests_against_known_values():
    # Binomial: R binom.test(7, 20)$p.value = 0.2632; 3 of 10: 2 x 176 / 1024.
    assert stats.binomial_test(7, 20) == pytest.approx(0.263176, abs=1e-6)
    assert stats.binomial_test(3, 10) == pytest.approx(352 / 1024)
    assert stats.binomial_test(8, 10, alternative="greater") == pytest.approx(56 / 1024)
    assert stats.binomial_test(0, 0) == 1.0
    # Exact McNemar on paired seeds: only the discordant pairs count.
    assert stats.exact_mcnemar(2, 0) == pytest.approx(0.5)
    assert stats.exact_mcnemar(5, 0) == pytest.approx(2 / 32)      # 5 seeds: p >= 0.0625
    assert stats.exact_mcnemar(5, 0, alternative="greater") == pytest.approx(1 / 32)
    # Fisher: the lady tasting tea, [[3, 1], [1, 3]]: one-sided 17/70, two-sided 34/70;
    # R fisher.test(matrix(c(8, 1, 2, 5), 2))$p.value = 0.03497.
    assert stats.fisher_exact([[3, 1], [1, 3]], "greater") == pytest.approx(17 / 70)
    assert stats.fisher_exact([[3, 1], [1, 3]]) == pytest.approx(34 / 70)
    assert stats.fisher_exact([[8, 2], [1, 5]]) == pytest.approx(0.034965, abs=1e-6)
    assert stats.fisher_exact([[5, 0], [0, 5]], "greater") == pytest.approx(1 / 252)


def test_minimum_detectable_effect():
    # (t(0.975; 4) + t(0.8; 4)) x sd / sqrt(5) = (2.776445 + 0.940965) / sqrt(5).
    assert stats.minimum_detectable_effect(1.0, 5) == pytest.approx(
        (2.776445 + 0.940965) / math.sqrt(5), abs=1e-5)
    assert stats.minimum_detectable_effect(0.5, 5) == pytest.approx(
        0.5 * stats.minimum_detectable_effect(1.0, 5))
    # A stricter level needs a larger effect; more seeds a smaller one.
    assert stats.minimum_detectable_effect(1.0, 5, alpha=0.05 / 35) > 2.0
    assert stats.minimum_detectable_effect(1.0, 10) < stats.minimum_detectable_effect(1.0, 5)
    assert math.isnan(stats.minimum_detectable_effect(1.0, 1))


# --------------------------------------------------------------------------- storage

FAKE_RESULT = {"status": "ok", "metrics": {"test_acc": 0.5, "train_seconds": 1.0,
                                           "best_val_acc": math.nan},
               "curves": {"epoch": [1], "val_acc": [0.5]}}


def test_store_round_trip_and_insert_or_ignore(tmp_path):
    store = storage.ResultStore(tmp_path)
    config = {"dataset": "digits", "architecture": "c4", "lr": 0.001}
    key = storage.run_key(config, 3)
    assert key != storage.run_key(config, 4)
    assert key != storage.run_key(dict(config, lr=0.002), 3)
    assert store.put(key, config, 3, FAKE_RESULT, "0.0")
    assert not store.put(key, config, 3, dict(FAKE_RESULT, status="diverged"), "0.0")
    run = store.get([key])[key]
    assert run["status"] == "ok" and run["seed"] == 3 and run["config"] == config
    assert math.isnan(run["metrics"]["best_val_acc"])    # NaN survives as JSON null
    assert store.finished_keys() == {key} and len(store) == 1
    with sqlite3.connect(store.path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


_OLD_LAYOUT = """CREATE TABLE runs (run_key TEXT PRIMARY KEY, config TEXT NOT NULL,
    seed INTEGER NOT NULL, status TEXT NOT NULL, metrics TEXT NOT NULL, curves TEXT NOT NULL,
    dataset TEXT, architecture TEXT, batch_size INTEGER, lr REAL, init_scale REAL,
    epochs INTEGER, n_train INTEGER, test_acc REAL, train_seconds REAL, bnrs_version TEXT,
    host TEXT, finished_at TEXT NOT NULL)"""


def test_a_database_without_the_simd_column_is_read_then_given_it(tmp_path):
    # A study stored before runs recorded their SIMD level: read as it is (and not
    # changed by reading), given the column at its next write.
    with sqlite3.connect(tmp_path / storage.DB_NAME) as connection:
        connection.execute("PRAGMA journal_mode=WAL")   # as the store made it
        connection.execute(_OLD_LAYOUT)
        connection.execute("INSERT INTO runs VALUES (?, ?, 0, 'ok', ?, ?, NULL, NULL, NULL, "
                           "NULL, NULL, NULL, NULL, 0.5, 1.0, '0.0', 'old-host', "
                           "'2026-01-01T00:00:00Z')",
                           ("old", json.dumps({"a": 1}), json.dumps(FAKE_RESULT["metrics"]),
                            json.dumps(FAKE_RESULT["curves"])))
    connection.close()
    saved = (tmp_path / storage.DB_NAME).read_bytes()
    store = storage.ResultStore(tmp_path)
    old = store.get()["old"]
    assert old["simd"] is None and old["host"] == "old-host"
    assert (tmp_path / storage.DB_NAME).read_bytes() == saved
    result = dict(FAKE_RESULT, host="worker-7", simd="avx2")
    assert store.put("new", {"b": 2}, 0, result, "0.1")
    runs = store.get()
    assert runs["old"]["simd"] is None and runs["new"]["simd"] == "avx2"
    assert runs["new"]["host"] == "worker-7"
    assert report._simd_levels(list(runs.values())) == {"not recorded": 1, "avx2": 1}
    with sqlite3.connect(store.path) as connection:
        columns = [row[1] for row in connection.execute("PRAGMA table_info(runs)")]
    connection.close()
    assert columns[-1] == "simd" and tuple(columns) == storage._COLUMNS


def _writer(directory: str, start: int, count: int) -> None:
    store = storage.ResultStore(directory)
    for index in range(start, start + count):
        config = {"index": index}
        store.put(storage.run_key(config, 0), config, 0, FAKE_RESULT, "0.0")


def test_two_concurrent_writers(tmp_path):
    # Overlapping ranges: both write keys 40..59; every key ends up exactly once.
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_writer, args=(str(tmp_path), start, 60))
               for start in (0, 40)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(60)
        assert writer.exitcode == 0
    store = storage.ResultStore(tmp_path)
    assert len(store) == 100
    with sqlite3.connect(store.path) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# --------------------------------------------------------------------------- runner


def _small_settings(**changes):
    settings = questions.settings_for("digits", "small", True, 1258, seeds=2, epochs=2)
    return settings if not changes else questions.replace(settings, **changes)


def test_identical_configurations_are_shared():
    from bnrs import datasets

    data = datasets.load_digits()
    settings = _small_settings()
    question_list = questions.build_questions(settings, [1, 2, 3])
    entries, jobs = runner.plan(question_list, settings, data, "digits")
    # Q1 has plain and bn in both regimes, Q2 repeats the short ones, Q3 repeats bn:
    # 4 + 3 + 1 distinct variants. Q1's four enter its steps-to-target claims, decided
    # on counts: they run twice the seeds (2 x 2), of which the others share the first 2.
    factor = questions.COUNT_CLAIM_SEED_FACTOR
    assert questions.count_claim_variants(question_list[0]) == {
        v.name for v in question_list[0].variants}
    assert len(entries) == (4 * factor + 5 + 2) * 2
    assert len(jobs) == 4 * factor * 2 + (3 + 1) * 2
    overfit = {jobs[key].config.n_train for q, v, seed, key in entries
               if v.regime == "overfit"}
    assert overfit == {settings.overfit_n_train} and settings.overfit_n_train < settings.n_train


def test_report_only_changes_nothing_stored(tmp_path, monkeypatch):
    _study(tmp_path, questions=[3], seeds=2, epochs=1)
    saved = (tmp_path / runner.STUDY_FILE).read_bytes()
    monkeypatch.setattr(runner, "train_run", _must_not_train)
    # Other arguments only select which stored runs to report (here: none of them).
    table = _study(tmp_path, questions=[3], seeds=3, epochs=1, report_only=True)
    assert len(table) == 6 and (tmp_path / runner.STUDY_FILE).read_bytes() == saved
    assert len(storage.ResultStore(tmp_path)) == 4
    assert runner.stored_arguments(tmp_path)["seeds"] == 2
    with pytest.raises(FileNotFoundError, match="no stored runs"):
        _study(tmp_path / "empty", report_only=True)
    assert not (tmp_path / "empty").exists()


def test_threads_never_oversubscribe():
    assert runner.threads_per_job(2, cores=2) == 1
    assert runner.threads_per_job(1, cores=8) == 8
    assert runner.threads_per_job(3, cores=8) == 2
    assert runner.threads_per_job(16, cores=8) == 1
    assert runner.threads_per_job(-1, cores=8) == 1
    assert runner.threads_per_job(2, backend="dask", cores=8) == 1
    assert runner.threads_per_job(2, n_threads=3, cores=8) == 3


def test_same_seed_same_initial_weights_and_order():
    config = train.RunConfig("digits", "", 100, 50, "c4-relu-mp2-fc8-relu")
    plain = train.build_network(config, (1, 8, 8), 10, seed=3)
    for architecture in ("c4-bn-relu-mp2-fc8-bn-relu", "c4-relu-d0.2-mp2-fc8-relu-d0.5",
                         "c4-relu-mp2-sd0.1-fc8-brn-relu"):
        other = train.build_network(train.RunConfig("digits", "", 100, 50, architecture),
                                    (1, 8, 8), 10, seed=3)
        pairs = zip(train._parametric_layers(plain), train._parametric_layers(other))
        for a, b in pairs:
            assert np.array_equal(a.weight.data, b.weight.data)
            assert np.array_equal(a.bias.data, b.bias.data)
    different = train.build_network(config, (1, 8, 8), 10, seed=4)
    assert not np.array_equal(plain[0].weight.data, different[0].weight.data)
    scaled = train.build_network(
        train.RunConfig("digits", "", 100, 50, "c4-relu-mp2-fc8-relu", init_scale=10.0),
        (1, 8, 8), 10, seed=3)
    assert np.allclose(scaled[0].weight.data, 10 * plain[0].weight.data)
    assert np.array_equal(scaled[0].bias.data, plain[0].bias.data)
    assert np.array_equal(train._order_stream(3).permutation(10),
                          train._order_stream(3).permutation(10))


def test_each_seed_draws_its_own_training_subset():
    from bnrs import datasets

    data = datasets.load_digits()
    train.load_split.cache_clear()
    subsets = {}
    for seed in (0, 1):
        again = train.load_split.__wrapped__("digits", 200, 500, seed)
        first = train.load_split("digits", 200, 500, seed)
        assert np.array_equal(first[1], again[1]) and np.array_equal(first[2], again[2])
        subsets[seed] = first
    (_, train0, val0), (_, train1, val1) = subsets[0], subsets[1]
    assert np.array_equal(val0, val1)                        # the validation set is fixed
    assert len(train0) == len(train1) == 500
    assert not np.isin(train0, val0).any() and not np.isin(train1, val1).any()
    assert set(train0) != set(train1)                        # each seed its own images
    counts = [np.bincount(data.y_train[t], minlength=10) for t in (train0, train1)]
    assert np.abs(counts[0] - counts[1]).max() <= 1          # both stratified
    # The same seed's subset, whatever else is in the cache: bit for bit.
    train.load_split.cache_clear()
    assert np.array_equal(train.load_split("digits", 200, 500, 0)[1], train0)


def test_he_initialisation_keeps_the_pairing():
    he = train.build_network(train.RunConfig("digits", "", 100, 50, "c4-relu-mp2-fc8-relu",
                                             init="he"), (1, 8, 8), 10, seed=3)
    with_dropout = train.build_network(
        train.RunConfig("digits", "", 100, 50, "c4-relu-mp2-d0.2-fc8-relu-d0.5", init="he"),
        (1, 8, 8), 10, seed=3)
    default = train.build_network(
        train.RunConfig("digits", "", 100, 50, "c4-relu-mp2-fc8-relu"), (1, 8, 8), 10, seed=3)
    for layer, twin, other in zip(train._parametric_layers(he),
                                  train._parametric_layers(with_dropout),
                                  train._parametric_layers(default)):
        assert np.array_equal(layer.weight.data, twin.weight.data)
        assert not np.any(layer.bias.data) and not np.array_equal(layer.weight.data,
                                                                  other.weight.data)
    # fc8 after 4 x 4 x 4 inputs: N(0, 2 / 64), std 0.177 (512 weights: within 20%).
    assert np.std(he[4].weight.data) == pytest.approx(math.sqrt(2 / 64), rel=0.2)
    with pytest.raises(ValueError, match="init"):
        train.build_network(train.RunConfig("digits", "", 100, 50, "c4", init="xavier"),
                            (1, 8, 8), 10, seed=3)


def test_run_metrics_for_the_statistics():
    from bnrs import datasets

    data = datasets.load_digits()
    config = train.RunConfig("digits", data.fingerprint, 300, 100,
                             "c4-relu-mp2-fc16-relu-d0.5", epochs=3, batch_size=32, lr=0.01,
                             n_train_eval=100, n_test_curve=100, target_accuracy=0.5,
                             mc_samples=3)
    result = train.train_run(config, 0)
    metrics, curves = result["metrics"], result["curves"]
    assert metrics["steps_per_epoch"] == 300 // 32 and metrics["steps_run"] == 3 * 9
    assert curves["steps"] == [9, 18, 27] and len(curves["epoch_seconds"]) == 3
    assert len(curves["val_loss"]) == len(curves["test_loss"]) == 3
    assert metrics["target_reached"] and metrics["steps_to_target"] in curves["steps"]
    assert metrics["diverged"] is False
    assert metrics["seconds_per_epoch"] == pytest.approx(sum(curves["epoch_seconds"]) / 3)
    assert 1 <= metrics["val_loss_min_epoch"] <= 3 and metrics["val_loss_rise"] >= 0
    assert metrics["mc_gain"] == pytest.approx(metrics["mc_test_acc"] - metrics["test_acc"])
    # The same seed: the same MC passes, bit for bit.
    assert train.train_run(config, 0)["metrics"]["mc_test_acc"] == metrics["mc_test_acc"]
    unreachable = train.train_run(train.RunConfig(
        "digits", data.fingerprint, 300, 100, "c4-relu-mp2-fc16-relu", epochs=1,
        n_train_eval=100, n_test_curve=100, target_accuracy=1.01), 0)["metrics"]
    assert unreachable["steps_to_target"] is None and not unreachable["target_reached"]
    assert "mc_test_acc" not in unreachable


def test_a_diverging_run_is_recorded_not_raised():
    from bnrs import datasets

    data = datasets.load_digits()
    config = train.RunConfig("digits", data.fingerprint, 200, 100, "c4-relu-mp2-fc8-relu",
                             lr=1e6, epochs=2, n_train_eval=100, n_test_curve=100)
    result = train.train_run(config, 0)
    assert result["status"] == "diverged" and result["metrics"]["diverged"] is True
    assert result["metrics"]["diverged_reason"]


def test_claim_scores_diverged_runs_at_chance():
    q = questions.Question(1, "x", "x", variants=(questions.Variant("a", "a", "a"),
                                                  questions.Variant("b", "b", "b")),
                           claims=(questions.Claim("a beats b", ("a",), ("b",)),),
                           n_train=1, epochs=1)
    runs, entries = {}, []
    for seed, (acc_a, status_b) in enumerate([(0.8, "diverged"), (0.82, "diverged"),
                                              (0.79, "ok")]):
        for variant, acc, status in ((q.variants[0], acc_a, "ok"),
                                     (q.variants[1], 0.7, status_b)):
            key = f"{variant.name}{seed}"
            runs[key] = {"status": status, "metrics": {"test_acc": acc, "chance": 0.1}}
            entries.append((q, variant, seed, key))
    (result,) = results.claim_results(q, entries, runs)
    assert result.differences == pytest.approx([0.7, 0.72, 0.09])
    assert result.diverged == 2 and result.verdict == "inconclusive"


def _claim_study(claims, seeds_data):
    """A two-variant question and its runs: seeds_data = [(acc_a, status_a, acc_b,
    status_b)] per seed."""
    q = questions.Question(1, "x", "x", variants=(questions.Variant("a", "a", "a"),
                                                  questions.Variant("b", "b", "b")),
                           claims=claims, n_train=1, epochs=1)
    runs, entries = {}, []
    for seed, (acc_a, status_a, acc_b, status_b) in enumerate(seeds_data):
        for variant, acc, status in ((q.variants[0], acc_a, status_a),
                                     (q.variants[1], acc_b, status_b)):
            key = f"{variant.name}{seed}"
            runs[key] = {"status": status, "metrics": {"test_acc": acc, "chance": 0.1}}
            entries.append((q, variant, seed, key))
    return results.claim_results(q, entries, runs)


def test_divergence_claim_uses_exact_mcnemar():
    claim = questions.Claim("fewer of a diverge", ("a",), ("b",), divergence=True)
    seeds = [(0.8, "ok", 0.1, "diverged")] * 2 + [(0.8, "ok", 0.8, "ok")] * 3
    (result,) = _claim_study((claim,), seeds)
    assert result.test == "exact McNemar"
    assert (result.plus_diverged, result.minus_diverged) == (0, 2)
    assert (result.only_plus_diverged, result.only_minus_diverged) == (0, 2)
    assert result.p == pytest.approx(0.5) and result.verdict == "inconclusive"
    # Six of six seeds diverge only without BN: p = 2/64, supported.
    (result,) = _claim_study((claim,), [(0.8, "ok", 0.1, "diverged")] * 6)
    assert result.p == pytest.approx(2 / 64) and result.verdict == "supported"


def test_adjusted_verdicts_and_equivalence():
    strong = questions.Claim("a beats b", ("a",), ("b",))
    equal = questions.Claim("a beats b by a lot", ("a",), ("b",), equivalence=0.01,
                            equivalence_advice="a or b makes no difference")
    seeds_strong = [(0.80 + d, "ok", 0.70, "ok") for d in (0.001, 0.003, -0.002, 0.0, 0.002)]
    seeds_equal = [(0.80 + d, "ok", 0.80, "ok") for d in (0.001, 0.003, -0.002, 0.0, 0.002)]
    claims = _claim_study((strong,), seeds_strong) + _claim_study((equal,), seeds_equal)
    results.adjust_claims(claims)
    first, second = claims
    assert first.verdict == first.raw_verdict == "supported"
    p_values = [first.p, second.p, second.tost_p]          # one family of three tests
    assert first.p_holm == pytest.approx(stats.holm_adjust(p_values)[0])
    assert first.p_bh == pytest.approx(stats.bh_adjust(p_values)[0])
    assert second.tost_p_holm == pytest.approx(stats.holm_adjust(p_values)[2])
    assert second.verdict == "inconclusive" and second.equivalence_verdict() == "equivalent"
    assert first.equivalence_verdict() == ""
    # The Holm-level interval is wider than the 95% one and still excludes zero.
    assert first.adjusted_low < first.low and first.adjusted_high > first.high
    assert first.adjusted_low > 0
    assert "Holm" in first.sentence() and "equivalent" in second.sentence()


def test_adjustment_can_turn_a_raw_verdict_inconclusive():
    claim = questions.Claim("a beats b", ("a",), ("b",))
    noisy = [(0.80 + d, "ok", 0.80, "ok") for d in (0.01, 0.02, 0.005, 0.015, 0.003)]
    many = [r for _ in range(30) for r in _claim_study((claim,), noisy)]
    assert all(r.raw_verdict == "supported" for r in many)
    results.adjust_claims(many)
    assert all(r.verdict == "inconclusive" for r in many)   # p ~0.02 x 30 > 0.05
    assert all(r.adjusted_low < 0 for r in many)


def test_study_marks_equivalence_and_divergence_claims():
    settings = questions.settings_for("fashion-mnist", "fashion-mnist", False, 60000)
    claims = {(c.statement, results.regime_of(q, c)): c
              for q in questions.build_questions(settings) for c in q.claims}
    assert len(claims) == 77   # each (advice, regime) once
    assert {regime for _, regime in claims} == {"short", "overfit"}
    marked = {s for s, c in claims.items() if c.equivalence is not None}
    for regime in ("short", "overfit"):
        assert ("Adding dropout to a BN network still helps", regime) in marked
        assert ("Dropout after BN beats dropout before BN", regime) in marked
        inception = ("BN without dropout generalises at least as well as dropout without "
                     "BN (inception)")
        assert (inception, regime) in marked
    assert ("MC dropout (20 passes) beats the deterministic pass (dense d0.5)",
            "overfit") in marked
    assert all(claims[s].equivalence == questions.EQUIVALENCE_MARGIN
               and claims[s].equivalence_advice for s in marked)
    assert [s for s, c in claims.items() if c.divergence] == [
        ("With BN fewer runs diverge at a 30x learning rate (Adam)", "short"),
        ("With BN fewer runs diverge at a 30x learning rate (SGD + momentum 0.9)", "short")]


def test_summary_table_first_in_the_report():
    doc = report._Document()
    claim = questions.Claim("a beats b (Someone 2015: a long aside)", ("a",), ("b",),
                            equivalence=0.01, equivalence_advice="no difference")
    (result,) = _claim_study((claim,), [(0.8 + d, "ok", 0.8, "ok")
                                        for d in (0.001, 0.003, -0.002, 0.0, 0.002)])
    results.adjust_claims([result])
    q = questions.Question(1, "x", "x", variants=(), claims=(claim,), n_train=1, epochs=1)
    settings = questions.settings_for("fashion-mnist", "fashion-mnist", True, 60000)
    report._summary(doc, [q], {1: [result]}, settings)
    (table,) = [block for block in doc.blocks if block[0] == "table"]
    # One column per regime; runs without one are the short regime.
    assert table[1] == ["advice", "short training"]
    (row,) = table[2]
    assert row[0] == "[Q1](#q1) a beats b"         # the literature's aside is left out
    # Not supported (p 0.5), but the TOST shows it within +-1 point: "equivalent", with
    # its 90% interval, in the claim's own row.
    assert result.verdict == "inconclusive" and result.overall_verdict == "equivalent"
    assert row[1].startswith("**equivalent** within ±1 point (90% CI ")


def _study(out, **kwargs):
    arguments = {"questions": [1, 3], "dataset": "digits", "quick": True, "seeds": 2,
                 "epochs": 2, "out": out, "progress": False, "n_jobs": 1}
    arguments.update(kwargs)
    return runner.run(**arguments)


def test_end_to_end_study_and_resume(tmp_path, monkeypatch):
    table = _study(tmp_path)
    for name in ("report.md", "report.html", "results.csv", "results.sqlite", "study.json"):
        assert (tmp_path / name).is_file(), name
    # Q1's four variants enter claims decided on counts: twice the seeds.
    factor = questions.COUNT_CLAIM_SEED_FACTOR
    assert len(table) == 4 * 2 * factor + 2 * 2 and len(table.where(question=3)) == 4
    assert {row["status"] for row in table} <= {"ok", "diverged"}
    assert len(table.verdicts) == 8 + 1
    assert {v["verdict"] for v in table.verdicts} <= {"supported", "contradicted",
                                                      "inconclusive"}
    text = (tmp_path / "report.md").read_text()
    assert "What this means for your network" in text and "## Q3." in text
    summary = text.index("| advice | short training |")
    assert summary < text.index("## Threats to validity") < text.index("## Q1.")
    assert re.search(r"\| \[Q3\]\(#q3\) BN before the activation beats BN after it \| "
                     r"(\*\*)?(supported|contradicted|equivalent|inconclusive)", text)
    claims_csv = (tmp_path / "claims.csv").read_text().splitlines()
    assert len(claims_csv) == 1 + 8 + 1 and claims_csv[0].startswith("question,regime,")
    assert "What BN costs" in text and (tmp_path / "bn-cost.csv").is_file()
    assert "Smallest effect this design detects" in text and "Holm's step-down" in text
    assert "BN before the activation beats BN after it" in text and "## Method" in text
    assert len(re.findall(r"Run time: [0-9.]+ min summed over its \d+ stored runs", text)) == 2
    html = (tmp_path / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "<table>" in html
    csv_lines = (tmp_path / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(table) and csv_lines[0].startswith("question,regime,variant")
    if plots.load_pyplot() is not None:
        assert (tmp_path / "plots" / "q1-curves.png").is_file()
        assert "plots/q1-accuracy.png" in text

    # Each run records the SIMD level it trained at, and the report says it.
    level = bnrs.simd_backend()
    stored = storage.ResultStore(tmp_path).get()
    assert {run["simd"] for run in stored.values()} == {level}
    assert f"SIMD level {level} ({len(stored)} runs)" in text and "Mixed SIMD" not in text
    assert report._levels_text(report._simd_levels([{"simd": "avx2"}])) == \
        "SIMD level avx2 (1 run)"

    # The same command again trains nothing: every run is in the database.
    monkeypatch.setattr(runner, "train_run", _must_not_train)
    again = _study(tmp_path)
    assert [row["test_acc"] for row in again] == [row["test_acc"] for row in table]

    def report_with(update):
        with sqlite3.connect(tmp_path / storage.DB_NAME) as connection:
            connection.execute(update)
        connection.close()
        _study(tmp_path, report_only=True)
        return (tmp_path / "report.md").read_text()

    # Runs at two levels (a study resumed on another CPU) are said to be.
    text = report_with("UPDATE runs SET simd = 'other' WHERE rowid % 2 = 0")
    assert f"**Mixed SIMD levels** ({', '.join(sorted([level, 'other']))}):" in text
    assert "SIMD levels " in text
    # Runs of an unknown level beside those of a known one may be mixed as well.
    text = report_with("UPDATE runs SET simd = NULL WHERE simd = 'other'")
    assert f"**Mixed SIMD levels** ({level} (and runs stored before the level" in text


def test_question_run_time_sums_its_stored_runs():
    q1, q2 = object(), object()
    entries = [(q1, "a", 0, "k1"), (q1, "b", 0, "k2"), (q1, "b", 1, "k3"),
               (q2, "a", 0, "k2"), (q2, "b", 0, "k4")]   # k2 is shared, k4 not stored
    runs = {"k1": {"metrics": {"wall_seconds": 45.0, "train_seconds": 1.0}},
            "k2": {"metrics": {"wall_seconds": 90.0, "train_seconds": 2.0}},
            "k3": {"metrics": {"train_seconds": 45.0}}}   # an old run without wall time
    assert report._question_time(q1, entries, runs) == (
        "Run time: 3.0 min summed over its 3 stored runs.")
    assert report._question_time(q2, entries, runs) == (
        "Run time: 1.5 min summed over its 1 stored run.")
    assert report._question_time(object(), entries, runs) == "Run time: no runs stored yet."


def _must_not_train(*args, **kwargs):
    raise AssertionError("a finished run was trained again")


def test_report_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "load_pyplot", lambda: None)
    _study(tmp_path, questions=[3], seeds=1, epochs=1)
    text = (tmp_path / "report.md").read_text()
    assert "not drawn: matplotlib is not installed" in text and "![" not in text


def test_quick_plan_covers_every_question():
    from bnrs import datasets

    data = datasets.load_digits()
    settings = questions.settings_for("digits", "small", True, len(data.y_train))
    question_list = questions.build_questions(settings)
    assert [q.number for q in question_list] == list(range(1, 14))
    assert all(q.claims for q in question_list)
    for q in question_list:
        names = {v.name for v in q.variants}
        for claim in q.claims:
            assert set(claim.plus + claim.minus) <= names, (q.number, claim.statement)
    with pytest.raises(ValueError, match="unknown"):
        questions.build_questions(settings, [42])


def test_regimes_budgets_and_the_new_variants():
    from bnrs import datasets

    data = datasets.load_digits()
    settings = questions.settings_for("digits", "small", True, len(data.y_train))
    by_number = {q.number: q for q in questions.build_questions(settings)}
    for number in (4, 5, 13):   # the dropout questions run in both regimes
        q = by_number[number]
        assert q.regimes == ("short", "overfit")
        assert {c.regime for c in q.claims} == {"short", "overfit"}
    for q in by_number.values():
        regimes = {v.name: results.variant_regime(q, v) for v in q.variants}
        assert set(regimes.values()) == set(q.regimes)
        for claim in q.claims:   # a claim compares variants of its own regime
            regime = results.regime_of(q, claim)
            assert {regimes[n] for n in claim.plus + claim.minus} == {regime}
            assert claim.regime in (None, regime)
    entries, jobs = runner.plan(list(by_number.values()), settings, data, "digits")
    for q, variant, seed, key in entries:
        config = jobs[key].config
        if variant.regime == "overfit":
            assert (config.n_train, config.epochs) == settings.budget("overfit")
            assert config.target_accuracy == settings.overfit_target_accuracy
            assert config.mc_samples == (settings.mc_samples if "-d" in config.architecture
                                         or "-sd" in config.architecture else 0)
        else:
            assert (config.n_train, config.epochs) == (q.n_train, q.epochs)
            assert config.mc_samples == 0
    q6 = by_number[6]
    assert {v.name.split("-b")[0] for v in q6.variants} == {"plain", "bn", "brn", "gn", "ln",
                                                           "bn-conv"}
    assert "gn4" in q6.variant("gn-b2").architecture
    assert q6.variant("bn-conv-b2").architecture.count("-bn-") == 2
    q7 = by_number[7]
    assert q7.variant("plain-sgd-lr30").optimizer == "sgd"
    assert q7.variant("plain-sgd-lr30").lr == pytest.approx(30 * settings.sgd_lr)
    assert {jobs[k].config.optimizer for _, v, _, k in entries if v.name == "bn-lr10"} == {
        "adam"}
    q10 = by_number[10]
    assert q10.variant("plain-he-depth12").init == "he"
    assert not any("helps more" in c.statement for c in q10.claims)
    q13 = by_number[13]
    assert "_nobn" in q13.variant("inc-drop").architecture
    assert q13.variant("res-bn-drop@overfit").architecture.endswith("-fc32-bn-relu-d0.5")


_KILLED_STUDY = textwrap.dedent("""
    import sys, time
    from bnrs.study import runner
    real = runner.train_run
    calls = []
    def slow_third(config, seed, n_threads=None):
        calls.append(1)
        if len(calls) == 3:
            time.sleep(600)
        return real(config, seed, n_threads)
    runner.train_run = slow_third
    runner.run(questions=[3], dataset="digits", quick=True, seeds=2, epochs=1,
               out=sys.argv[1], progress=False, n_jobs=1)
""")


def test_killed_study_keeps_whole_rows_and_resumes(tmp_path):
    process = subprocess.Popen([sys.executable, "-c", _KILLED_STUDY, str(tmp_path)])
    database = tmp_path / storage.DB_NAME
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if database.exists() and len(storage.ResultStore(tmp_path)) >= 2:
                break
            assert process.poll() is None, "the study ended before it was killed"
            time.sleep(0.2)
        time.sleep(0.3)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    store = storage.ResultStore(tmp_path)
    assert len(store) == 2
    with sqlite3.connect(database) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    for run in store.get().values():   # whole rows: every field parses
        assert run["curves"]["epoch"] == [1] and math.isfinite(run["metrics"]["test_acc"])
    table = _study(tmp_path, questions=[3], seeds=2, epochs=1)
    assert len(storage.ResultStore(tmp_path)) == 4 and len(table) == 4


def test_custom_architectures_on_npz(tmp_path):
    from bnrs import datasets

    digits = datasets.load_digits()
    path = tmp_path / "mine.npz"
    np.savez(path, X=digits.X_train[:300, 0], y=digits.y_train[:300])
    table = runner.run(dataset=str(path), architectures=["c4-relu-mp2-fc16-relu",
                                                         "c4-bn-relu-mp2-fc16-bn-relu"],
                       seeds=2, epochs=2, out=tmp_path / "out", progress=False, n_jobs=1)
    assert len(table) == 4 and {row["architecture"] for row in table} == {
        "c4-relu-mp2-fc16-relu", "c4-bn-relu-mp2-fc16-bn-relu"}
    assert table.verdicts[0]["statement"] == ("c4-bn-relu-mp2-fc16-bn-relu beats "
                                              "c4-relu-mp2-fc16-relu")
    stored = json.loads((tmp_path / "out" / "study.json").read_text())
    assert stored["architectures"] == ["c4-relu-mp2-fc16-relu", "c4-bn-relu-mp2-fc16-bn-relu"]


def test_dask_backend_on_a_local_cluster(tmp_path):
    distributed = pytest.importorskip("dask.distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        table = _study(tmp_path, questions=[3], seeds=2, epochs=1, backend="dask",
                       scheduler=cluster.scheduler_address, n_jobs=-1)
    assert len(table) == 4 and all(row["status"] in ("ok", "diverged") for row in table)
    assert len(storage.ResultStore(tmp_path)) == 4
    assert os.path.isfile(Path(tmp_path) / "report.md")


@pytest.mark.parametrize("processes", [False, True])
def test_dask_runs_every_job_on_a_single_one_thread_worker(tmp_path, monkeypatch, processes):
    # joblib's dask backend counted one thread, fell back to one job and ran them all in
    # the client: right results, idle cluster.
    distributed = pytest.importorskip("dask.distributed")
    ran_on = []
    real_train_run = runner.train_run

    def recording_train_run(config, seed, n_threads=None):
        try:
            ran_on.append(distributed.get_worker().address)
        except ValueError:   # not in a dask worker
            ran_on.append("the client")
        return real_train_run(config, seed, n_threads)

    monkeypatch.setattr(runner, "train_run", recording_train_run)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=processes,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        (worker,) = client.scheduler_info()["workers"]
        before = client.run(lambda dask_worker: dask_worker.state.transition_counter)[worker]
        table = _study(tmp_path, questions=[3], seeds=2, epochs=1, backend="dask",
                       scheduler=cluster.scheduler_address, n_jobs=-1)
        after = client.run(lambda dask_worker: dask_worker.state.transition_counter)[worker]
    assert len(table) == 4 and len(storage.ResultStore(tmp_path)) == 4
    # Each task goes through several transitions (released, waiting, ready, executing,
    # memory, ...) on the worker; in the client none happen there.
    assert after - before >= 4 * 3, (before, after)
    if not processes:   # the same process: train_run's calls were seen
        assert ran_on == [worker] * 4


def _processes_with_parent(parent_pid: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent_pid:
                children.append(int(entry))
    return children


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a parent that does not reap is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_killed_study_takes_its_workers_with_it(tmp_path, signum):
    command = [sys.executable, "-m", "bnrs.cli", "study", "--questions", "1", "--quick",
               "--seeds", "10", "--epochs", "3", "--n-jobs", "2", "--no-progress",
               "--out", str(tmp_path)]
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr_file:   # not a pipe: orphaned workers would hold it open
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr_file)
    deadline = time.monotonic() + 180
    try:
        # Once a run is stored both workers have started a job.
        while not ((tmp_path / storage.DB_NAME).exists()
                   and len(storage.ResultStore(tmp_path)) >= 1):
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "no run finished in 180 s"
            time.sleep(0.1)
        workers = _processes_with_parent(process.pid)
        assert workers, "no worker processes"
        process.send_signal(signum)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stderr = log.read_text()
    assert len(storage.ResultStore(tmp_path)) < 20, "the study finished: make it longer"
    if signum == signal.SIGTERM:
        assert process.returncode == 128 + signal.SIGTERM, stderr
        assert "interrupted:" in stderr and "Traceback" not in stderr, stderr
    gone_by = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < gone_by:
        time.sleep(0.1)
    assert not [pid for pid in workers if _alive(pid)], "workers outlived the study"


def test_flat_data_runs_dense_architectures_only(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "flat.npz"
    X = rng.standard_normal((120, 5))
    np.savez(path, X=X, y=(X[:, 0] > 0).astype(int))
    with pytest.raises(ValueError, match="flat samples"):
        runner.run(dataset=str(path), out=tmp_path / "a", n_jobs=1, progress=False)
    with pytest.raises(ValueError, match="bad token 'c4x'"):
        runner.run(dataset=str(path), architectures=["fc8", "c4x"], out=tmp_path / "b",
                   n_jobs=1, progress=False)
    table = runner.run(dataset=str(path), architectures=["fc8-relu", "fc8-bn-relu"], seeds=2,
                       epochs=2, out=tmp_path / "c", n_jobs=1, progress=False)
    assert len(table) == 4 and len(table.verdicts) == 1
