"""linear forward and backward against NumPy matrix products."""

from __future__ import annotations

import bnrs
import numpy as np
import pytest
import reference as ref
from bnrs import functional as F

# name: (batch, in_features, out_features, bias)
CASES = {
    "all_ones": (1, 1, 1, True),
    "batch1": (1, 9, 3, True),
    "batch3": (3, 7, 5, True),
    "no_bias": (5, 7, 4, False),
    "one_output": (4, 6, 1, True),
    "wide": (64, 33, 17, True),
    # Few rows of a large weight: the dot-product kernel instead of the GEMM (odd rows,
    # features and a depth that is not a whole number of vectors).
    "few_rows": (3, 333, 197, True),
    "few_rows_lenet": (8, 1568, 128, True),
    "few_rows_16": (16, 1000, 70, False),
}


def _case(rng, name):
    n, in_features, out_features, has_bias = CASES[name]
    x = rng.standard_normal((n, in_features)).astype(np.float32)
    w = rng.standard_normal((out_features, in_features)).astype(np.float32)
    b = rng.standard_normal(out_features).astype(np.float32) if has_bias else None
    return x, w, b


@pytest.mark.parametrize("name", CASES)
def test_forward_matches_reference(rng, assert_close, name):
    x, w, b = _case(rng, name)
    assert_close(F.linear(x, w, b), ref.linear(x, w, b), terms=x.shape[1], name="output")


@pytest.mark.parametrize("name", CASES)
def test_backward_matches_reference(rng, assert_close, name):
    x, w, b = _case(rng, name)
    gy = rng.standard_normal((x.shape[0], w.shape[0])).astype(np.float32)
    grad_input, grad_weight, grad_bias = F.linear_backward(gy, x, w, bias=b is not None)
    expected_input, expected_weight, expected_bias = ref.linear_backward(gy, x, w)
    assert_close(grad_input, expected_input, terms=w.shape[0], name="grad_input")
    assert_close(grad_weight, expected_weight, terms=x.shape[0], name="grad_weight")
    if b is None:
        assert grad_bias is None
    else:
        assert_close(grad_bias, expected_bias, terms=x.shape[0], name="grad_bias")


def test_backward_without_input_grad(rng, assert_close):
    x, w, _ = _case(rng, "batch3")
    gy = rng.standard_normal((x.shape[0], w.shape[0])).astype(np.float32)
    grad_input, grad_weight, grad_bias = F.linear_backward(gy, x, w, input_grad=False)
    assert grad_input is None
    assert_close(grad_weight, ref.linear_backward(gy, x, w)[1], terms=x.shape[0])
    assert_close(grad_bias, gy.astype(np.float64).sum(axis=0), terms=x.shape[0])


def _fd_case(rng):
    x, w, b = _case(rng, "batch3")
    gy = rng.standard_normal((x.shape[0], w.shape[0]))
    numerical = ref.numerical_gradients(
        lambda x, w, b: ref.weighted_sum(ref.linear(x, w, b), gy), x, w, b)
    return x, w, gy, numerical


NAMES = ["grad_input", "grad_weight", "grad_bias"]


def test_reference_backward_matches_finite_differences(rng, assert_close):
    x, w, gy, numerical = _fd_case(rng)
    for name, exact, approx in zip(NAMES, ref.linear_backward(gy, x, w), numerical):
        assert_close(exact, approx, **ref.FD_TOLERANCE, name=name)


def test_backward_matches_finite_differences(rng, assert_close):
    x, w, gy, numerical = _fd_case(rng)
    for name, actual, approx in zip(NAMES, F.linear_backward(gy, x, w), numerical):
        assert_close(actual, approx, terms=x.shape[1], name=name)


@pytest.mark.parametrize("batch", [1, 2, 7, 16])
def test_few_rows_forward_is_the_same_at_any_thread_count(rng, batch):
    # A batch of at most 16 rows through a weight of 64K values or more: the dot products
    # split by output features between the threads.
    x = rng.standard_normal((batch, 700)).astype(np.float32)
    w = rng.standard_normal((101, 700)).astype(np.float32)
    b = rng.standard_normal(101).astype(np.float32)
    before = bnrs.get_num_threads()
    try:
        outputs = []
        for threads in (1, 2, 3):
            bnrs.set_num_threads(threads)
            outputs.append(F.linear(x, w, b))
    finally:
        bnrs.set_num_threads(before)
    for other in outputs[1:]:
        assert other.tobytes() == outputs[0].tobytes()
