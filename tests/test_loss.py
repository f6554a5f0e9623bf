"""log_softmax and cross_entropy: forward, backward, numerical stability; nn.MSELoss and
nn.HuberLoss against the NumPy reference and finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
from bnrs import functional as F
from bnrs import nn

SHAPES = [(1, 1), (1, 5), (3, 10), (7, 3), (64, 100)]


def _logits(rng, shape, offset=0.0):
    x = rng.standard_normal(shape) * 3
    x[::2] += offset  # shift every other row: the result must not change
    return x.astype(np.float32)


def _target(rng, shape):
    return rng.integers(0, shape[1], shape[0])


@pytest.mark.parametrize("shape", SHAPES)
def test_log_softmax_matches_reference(rng, assert_close, shape):
    x = _logits(rng, shape)
    assert_close(F.log_softmax(x), ref.log_softmax(x), terms=shape[1], name="output")
    assert_close(F.log_softmax(x, dim=-1), ref.log_softmax(x), terms=shape[1], name="dim=-1")


@pytest.mark.parametrize("shape", SHAPES)
def test_log_softmax_backward_matches_reference(rng, assert_close, shape):
    x = _logits(rng, shape)
    y = F.log_softmax(x)
    gy = rng.standard_normal(shape).astype(np.float32)
    assert_close(F.log_softmax_backward(gy, y), ref.log_softmax_backward(gy, y),
                 terms=shape[1], name="grad_input")


@pytest.mark.parametrize("shape", SHAPES)
def test_cross_entropy_matches_reference(rng, assert_close, shape):
    x, target = _logits(rng, shape), _target(rng, shape)
    loss = F.cross_entropy(x, target)
    assert isinstance(loss, float)
    assert_close(loss, ref.cross_entropy(x, target), terms=x.size, name="loss")
    assert_close(F.cross_entropy_backward(x, target), ref.cross_entropy_backward(x, target),
                 terms=shape[1], name="grad_input")


@pytest.mark.parametrize("offset", [1000.0, -1000.0, 1e4])
def test_large_offsets_are_stable(rng, assert_close, offset):
    """Rows offset by ±1000 next to rows that are not: needs a per-row max shift."""
    shape = (6, 10)
    x, target = _logits(rng, shape, offset), _target(rng, shape)
    y = F.log_softmax(x)
    assert np.isfinite(y).all()
    assert_close(y, ref.log_softmax(x), terms=shape[1], name="log_softmax")
    loss = F.cross_entropy(x, target)
    assert np.isfinite(loss)
    assert_close(loss, ref.cross_entropy(x, target), terms=x.size, name="loss")
    grad = F.cross_entropy_backward(x, target)
    assert np.isfinite(grad).all()
    assert_close(grad, ref.cross_entropy_backward(x, target), terms=shape[1], name="grad")


def test_single_class_has_zero_loss_and_gradient():
    x = np.array([[3.5], [-2.0]], np.float32)
    target = np.array([0, 0])
    assert F.cross_entropy(x, target) == 0.0
    np.testing.assert_array_equal(F.cross_entropy_backward(x, target), np.zeros((2, 1)))
    np.testing.assert_array_equal(F.log_softmax(x), np.zeros((2, 1)))


def test_cross_entropy_gradient_rows_sum_to_zero(rng, assert_close):
    x, target = _logits(rng, (5, 8)), _target(rng, (5, 8))
    grad = F.cross_entropy_backward(x, target)
    assert_close(grad.sum(axis=1), np.zeros(5), terms=8, name="row sums")


def test_any_integer_target_type(rng):
    x, target = _logits(rng, (7, 3)), _target(rng, (7, 3))
    expected = F.cross_entropy(x, target)
    assert F.cross_entropy(x, target.astype(np.int32)) == expected
    assert F.cross_entropy(x, target.astype(np.uint8)) == expected
    assert F.cross_entropy(x, target.tolist()) == expected
    np.testing.assert_array_equal(F.cross_entropy_backward(x, target.astype(np.int32)),
                                  F.cross_entropy_backward(x, target))


def _fd_case(rng):
    x, target = _logits(rng, (3, 5)), _target(rng, (3, 5))
    gy = rng.standard_normal(x.shape)
    (numerical_log_softmax,) = ref.numerical_gradients(
        lambda v: ref.weighted_sum(ref.log_softmax(v), gy), x)
    (numerical_cross_entropy,) = ref.numerical_gradients(
        lambda v: ref.cross_entropy(v, target), x)
    return x, target, gy, numerical_log_softmax, numerical_cross_entropy


def test_reference_backward_matches_finite_differences(rng, assert_close):
    x, target, gy, numerical_log_softmax, numerical_cross_entropy = _fd_case(rng)
    assert_close(ref.log_softmax_backward(gy, ref.log_softmax(x)), numerical_log_softmax,
                 **ref.FD_TOLERANCE, name="log_softmax")
    assert_close(ref.cross_entropy_backward(x, target), numerical_cross_entropy,
                 **ref.FD_TOLERANCE, name="cross_entropy")


def test_backward_matches_finite_differences(rng, assert_close):
    x, target, gy, numerical_log_softmax, numerical_cross_entropy = _fd_case(rng)
    assert_close(F.log_softmax_backward(gy, F.log_softmax(x)), numerical_log_softmax,
                 terms=x.shape[1], name="log_softmax")
    assert_close(F.cross_entropy_backward(x, target), numerical_cross_entropy,
                 terms=x.shape[1], name="cross_entropy")


# --------------------------------------------------------------------------- regression losses

REGRESSION_SHAPES = [(1,), (5,), (4, 1), (7, 3), (2, 3, 4)]
DELTAS = [0.1, 1.0, 2.5]


def _regression_case(rng, shape, scale=2.0):
    return ((rng.standard_normal(shape) * scale).astype(np.float32),
            (rng.standard_normal(shape) * scale).astype(np.float32))


@pytest.mark.parametrize("shape", REGRESSION_SHAPES)
def test_mse_loss_matches_reference(rng, assert_close, shape):
    x, target = _regression_case(rng, shape)
    crit = nn.MSELoss()
    loss = crit(x, target)
    assert isinstance(loss, float)
    assert_close(loss, ref.mse_loss(x, target), dtype=None, name="loss")
    grad = crit.backward()
    assert_close(grad, ref.mse_loss_backward(x, target), name="grad")


@pytest.mark.parametrize("delta", DELTAS)
@pytest.mark.parametrize("shape", REGRESSION_SHAPES)
def test_huber_loss_matches_reference(rng, assert_close, shape, delta):
    x, target = _regression_case(rng, shape)
    crit = nn.HuberLoss(delta=delta)
    assert_close(crit(x, target), ref.huber_loss(x, target, delta), dtype=None, name="loss")
    assert_close(crit.backward(), ref.huber_loss_backward(x, target, delta), name="grad")


def test_huber_loss_is_half_mse_within_delta_and_linear_beyond():
    x = np.array([0.5, -0.25, 3.0, -4.0], np.float32)
    zero = np.zeros_like(x)
    crit = nn.HuberLoss(delta=1.0)
    # 0.5 * 0.25, 0.5 * 0.0625, 1 * (3 - 0.5), 1 * (4 - 0.5), averaged
    assert crit(x, zero) == pytest.approx((0.125 + 0.03125 + 2.5 + 3.5) / 4, rel=1e-12)
    np.testing.assert_array_equal(crit.backward(), np.array([0.5, -0.25, 1.0, -1.0]) / 4)
    # A delta larger than every residual is half the squared error.
    assert nn.HuberLoss(delta=10.0)(x, zero) == pytest.approx(0.5 * nn.MSELoss()(x, zero))


@pytest.mark.parametrize("make", [nn.MSELoss, lambda: nn.HuberLoss(0.7)])
def test_regression_loss_backward_matches_finite_differences(rng, assert_close, make):
    x, target = _regression_case(rng, (3, 4))
    x[0, 0] = target[0, 0] + 0.7 + 0.01   # near the Huber kink, but not on it
    crit = make()
    crit(x, target)
    grad = crit.backward(grad_output=3.0)
    reference_loss = (ref.mse_loss if isinstance(crit, nn.MSELoss) else
                      lambda v, t: ref.huber_loss(v, t, 0.7))
    (numerical,) = ref.numerical_gradients(lambda v: 3.0 * reference_loss(v, target), x)
    assert_close(grad, numerical, name="grad")
    # The references themselves agree with finite differences in float64.
    reference_grad = (ref.mse_loss_backward(x, target) if isinstance(crit, nn.MSELoss)
                      else ref.huber_loss_backward(x, target, 0.7))
    assert_close(3.0 * reference_grad, numerical, **ref.FD_TOLERANCE, name="reference")


@pytest.mark.parametrize("make", [nn.MSELoss, nn.HuberLoss])
def test_regression_loss_shapes_and_state(make):
    crit = make()
    with pytest.raises(ValueError, match=r"target: expected the shape of input \(4, 1\)"):
        crit(np.zeros((4, 1), np.float32), np.zeros(4, np.float32))
    with pytest.raises(RuntimeError, match="no saved forward state"):
        crit.backward()
    crit(np.ones(3), [0, 1, 2])           # lists and float64 are converted
    assert crit.backward().dtype == np.float32
    with pytest.raises(RuntimeError, match="no saved forward state"):
        crit.backward()                    # one backward per forward


@pytest.mark.parametrize("delta", [0.0, -1.0, float("nan"), float("inf")])
def test_huber_delta_must_be_positive_and_finite(delta):
    with pytest.raises(ValueError, match="delta"):
        nn.HuberLoss(delta=delta)
    with pytest.raises(TypeError, match="delta"):
        nn.HuberLoss(delta="1")
