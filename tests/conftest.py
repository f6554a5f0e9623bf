"""Shared test helpers: the one comparison helper every test uses, and a seeded generator."""

from __future__ import annotations

import numpy as np
import pytest

# float32 kernels against float64 references: a relative part for large values and an
# absolute part for values near zero; the absolute part grows with the square root of the
# number of terms a value sums (rounding errors of a long sum add up like a random walk).
FLOAT32_RTOL = 1e-4
FLOAT32_ATOL = 1e-5


def _assert_close(actual, expected, *, terms=1, rtol=FLOAT32_RTOL, atol=FLOAT32_ATOL,
                  dtype=np.float32, name="result"):
    """Assert ``actual`` matches ``expected`` elementwise within a float32 tolerance.

    ``terms`` is how many products or values each element of the result adds up; the
    absolute tolerance is ``atol * sqrt(terms)``. Arrays must also have the same shape and
    ``dtype`` (None to skip the dtype check, e.g. for float64 references); NaNs must be in
    the same places.
    """
    if isinstance(actual, np.ndarray) and dtype is not None:
        assert actual.dtype == dtype, f"{name}: dtype {actual.dtype}, expected {np.dtype(dtype)}"
    actual_values = np.asarray(actual, dtype=np.float64)
    expected_values = np.asarray(expected, dtype=np.float64)
    assert actual_values.shape == expected_values.shape, (
        f"{name}: shape {actual_values.shape}, expected {expected_values.shape}")
    allowed = atol * np.sqrt(max(terms, 1)) + rtol * np.abs(expected_values)
    error = np.abs(actual_values - expected_values)
    both_nan = np.isnan(actual_values) & np.isnan(expected_values)
    bad = ~((error <= allowed) | both_nan)
    if bad.any():
        where = np.unravel_index(np.argmax(np.where(bad, error - allowed, -np.inf)),
                                 bad.shape) if bad.ndim else ()
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.size} elements differ; worst at index "
            f"{tuple(int(i) for i in where)}: got {actual_values[where]!r}, expected "
            f"{expected_values[where]!r} (error {error[where]:.3g}, allowed "
            f"{allowed[where]:.3g}); max abs error {np.nanmax(error):.3g}")


@pytest.fixture
def assert_close():
    """The shared comparison helper (see ``_assert_close``)."""
    return _assert_close


@pytest.fixture
def rng():
    """A generator with a fixed seed, so every failure reproduces."""
    return np.random.default_rng(20261121)


# --------------------------------------------------------------------------- long runs
# The robustness suites (test_fuzz, test_memory, ...) read their sizes from longrun.py:
# small by default. The long run, run before a release and after changes to a kernel's
# argument checks, is (on one thread, so a failure reproduces):
#
#     BNRS_LONG_RUN=1 BNRS_NUM_THREADS=1 pytest -m "fuzz or memory or long" tests/
#
# BNRS_LONG_RUN=1 makes it 10,000 generated cases per fuzzed entry point (and per kind,
# valid and invalid), 10,000 calls per kernel in the memory tests, and runs the tests
# marked ``long``; BNRS_FUZZ_EXAMPLES / BNRS_REPEATED_CALLS override either count.

import longrun


def pytest_report_header(config):
    return (f"bnrs robustness: {longrun.FUZZ_EXAMPLES} fuzz cases per entry point, "
            f"{longrun.REPEATED_CALLS} repeated calls, long run "
            f"{'on' if longrun.LONG_RUN else 'off (BNRS_LONG_RUN=1)'}")


def pytest_collection_modifyitems(config, items):
    if longrun.LONG_RUN:
        return
    skip = pytest.mark.skip(reason="long run only (set BNRS_LONG_RUN=1)")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    if longrun.FIGURES:
        terminalreporter.section("bnrs robustness figures")
        for name, figure in longrun.FIGURES.items():
            terminalreporter.write_line(f"{name}: {figure}")
    if not longrun.CASES:
        return
    terminalreporter.section("bnrs fuzz cases run")
    for name, count in sorted(longrun.CASES.items()):
        terminalreporter.write_line(f"{count:>9}  {name}")
    terminalreporter.write_line(f"{sum(longrun.CASES.values()):>9}  total, "
                                f"{len(longrun.CASES)} entry points x kinds")
