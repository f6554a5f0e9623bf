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
