"""Batch normalisation: training and evaluation, running statistics, gradients."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
from bnrs import functional as F

SHAPES = {
    "4d": (3, 4, 7, 9),
    "4d_batch1": (1, 3, 5, 3),
    "4d_1x1_maps": (5, 3, 1, 1),
    "3d": (3, 4, 5),
    "2d": (6, 5),
    "2d_batch2": (2, 5),
}


def _standardised(rng, shape):
    """Normal samples shifted and scaled so every channel has sample mean 0 and std 1."""
    z = rng.standard_normal(shape)
    axes = ref.stat_axes(len(shape))
    return (z - z.mean(axis=axes, keepdims=True)) / z.std(axis=axes, keepdims=True)


def _input(rng, shape):
    """Per-channel offsets and scales, so the statistics are far from (0, 1).

    The offset is at most 6 standard deviations of its channel: float32 arithmetic loses
    about 6e-8·|mean|/std of y, so the conditioning is kept bounded here and tested on its
    own in ``test_channels_with_mean_far_above_std``.
    """
    channels = shape[1]
    offset = ref.per_channel(rng.uniform(-3, 3, channels), len(shape))
    scale = ref.per_channel(rng.uniform(0.5, 3, channels), len(shape))
    return (_standardised(rng, shape) * scale + offset).astype(np.float32)


def _params(rng, channels):
    gamma = rng.uniform(0.5, 2, channels).astype(np.float32)
    beta = rng.standard_normal(channels).astype(np.float32)
    running_mean = rng.standard_normal(channels).astype(np.float32)
    running_var = rng.uniform(0.5, 2, channels).astype(np.float32)
    return gamma, beta, running_mean, running_var


def _count(shape):
    """Values per channel: what each statistic sums."""
    return int(np.prod(shape)) // shape[1]


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_train_forward_matches_reference(rng, assert_close, shape, affine):
    x = _input(rng, shape)
    gamma, beta, running_mean, running_var = _params(rng, shape[1])
    weight, bias = (gamma, beta) if affine else (None, None)
    expected = ref.batch_norm(x, weight, bias, running_mean, running_var, training=True,
                              momentum=0.1, eps=1e-5)
    y, save_mean, save_invstd = F.native_batch_norm(x, weight, bias, running_mean, running_var,
                                                    training=True, momentum=0.1, eps=1e-5)
    terms = _count(shape)
    assert_close(y, expected[0], terms=terms, name="output")
    assert_close(save_mean, expected[1], terms=terms, name="save_mean")
    assert_close(save_invstd, expected[2], terms=terms, name="save_invstd")
    assert_close(running_mean, expected[3], terms=terms, name="running_mean")
    assert_close(running_var, expected[4], terms=terms, name="running_var")


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_train_backward_matches_reference(rng, assert_close, shape, affine):
    x = _input(rng, shape)
    gamma = rng.uniform(0.5, 2, shape[1]).astype(np.float32) if affine else None
    gy = rng.standard_normal(shape).astype(np.float32)
    _, save_mean, save_invstd = F.native_batch_norm(x, gamma, None, training=True)
    grad_input, grad_weight, grad_bias = F.batch_norm_backward(gy, x, gamma, save_mean,
                                                               save_invstd, training=True)
    _, mean, invstd, _, _ = ref.batch_norm(x, training=True)
    expected = ref.batch_norm_backward(gy, x, gamma, mean, invstd, training=True)
    terms = _count(shape)
    assert_close(grad_input, expected[0], terms=terms, name="grad_input")
    if affine:
        assert_close(grad_weight, expected[1], terms=terms, name="grad_weight")
        assert_close(grad_bias, expected[2], terms=terms, name="grad_bias")
    else:
        assert grad_weight is None and grad_bias is None


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_eval_uses_running_stats_and_leaves_them_unchanged(rng, assert_close, shape, affine):
    x = _input(rng, shape)
    gamma, beta, running_mean, running_var = _params(rng, shape[1])
    weight, bias = (gamma, beta) if affine else (None, None)
    mean_before, var_before = running_mean.copy(), running_var.copy()
    y, save_mean, save_invstd = F.native_batch_norm(x, weight, bias, running_mean, running_var,
                                                    training=False, eps=1e-3)
    expected = ref.batch_norm(x, weight, bias, mean_before, var_before, training=False, eps=1e-3)
    np.testing.assert_array_equal(running_mean, mean_before)
    np.testing.assert_array_equal(running_var, var_before)
    assert_close(y, expected[0], name="output")
    assert_close(save_mean, mean_before, name="save_mean")
    assert_close(save_invstd, expected[2], name="save_invstd")


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_eval_backward_is_a_fixed_affine_map(rng, assert_close, shape, affine):
    x = _input(rng, shape)
    gamma, _, running_mean, running_var = _params(rng, shape[1])
    weight = gamma if affine else None
    gy = rng.standard_normal(shape).astype(np.float32)
    _, save_mean, save_invstd = F.native_batch_norm(x, weight, None, running_mean, running_var,
                                                    training=False)
    grad_input, grad_weight, grad_bias = F.batch_norm_backward(gy, x, weight, save_mean,
                                                               save_invstd, training=False)
    _, mean, invstd, _, _ = ref.batch_norm(x, weight, None, running_mean, running_var)
    expected = ref.batch_norm_backward(gy, x, weight, mean, invstd, training=False)
    terms = _count(shape)
    assert_close(grad_input, expected[0], name="grad_input")
    if affine:
        assert_close(grad_weight, expected[1], terms=terms, name="grad_weight")
        assert_close(grad_bias, expected[2], terms=terms, name="grad_bias")
    else:
        assert grad_weight is None and grad_bias is None


@pytest.mark.parametrize("momentum", [0.1, 0.3, 1.0, 0.0])
def test_running_stats_follow_momentum_over_steps(rng, assert_close, momentum):
    shape = SHAPES["4d"]
    _, _, running_mean, running_var = _params(rng, shape[1])
    expected_mean, expected_var = running_mean.astype(np.float64), running_var.astype(np.float64)
    for _ in range(3):
        x = _input(rng, shape)
        F.native_batch_norm(x, None, None, running_mean, running_var, training=True,
                            momentum=momentum)
        _, _, _, expected_mean, expected_var = ref.batch_norm(
            x, None, None, expected_mean, expected_var, training=True, momentum=momentum)
        assert_close(running_mean, expected_mean, terms=_count(shape), name="running_mean")
        assert_close(running_var, expected_var, terms=_count(shape), name="running_var")


def test_running_var_uses_the_unbiased_batch_variance(assert_close):
    # One channel holding 0 and 2: biased variance 1, unbiased 2.
    x = np.array([[0.0], [2.0]], dtype=np.float32)
    running_mean = np.zeros(1, np.float32)
    running_var = np.zeros(1, np.float32)
    _, save_mean, save_invstd = F.native_batch_norm(x, None, None, running_mean, running_var,
                                                    training=True, momentum=1.0, eps=0.0)
    assert_close(save_mean, [1.0], name="save_mean")
    assert_close(save_invstd, [1.0], name="save_invstd")  # normalised with the biased one
    assert_close(running_mean, [1.0], name="running_mean")
    assert_close(running_var, [2.0], name="running_var")


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_without_running_stats_uses_batch_stats(rng, assert_close, shape):
    """track_running_stats=False: no buffers, batch statistics in training and evaluation."""
    x = _input(rng, shape)
    gamma, beta, _, _ = _params(rng, shape[1])
    expected = ref.batch_norm(x, gamma, beta, training=True)
    for training in (True, False):
        y, save_mean, save_invstd = F.native_batch_norm(x, gamma, beta, None, None,
                                                        training=training)
        assert_close(y, expected[0], terms=_count(shape), name=f"output, training={training}")
        assert_close(save_mean, expected[1], terms=_count(shape), name="save_mean")
        assert_close(save_invstd, expected[2], terms=_count(shape), name="save_invstd")


def test_batch_norm_matches_native_batch_norm(rng):
    x = _input(rng, SHAPES["4d"])
    gamma, beta, running_mean, running_var = _params(rng, x.shape[1])
    mean_copy, var_copy = running_mean.copy(), running_var.copy()
    y = F.batch_norm(x, running_mean, running_var, gamma, beta, True, 0.2, 1e-4)
    native = F.native_batch_norm(x, gamma, beta, mean_copy, var_copy, True, 0.2, 1e-4)
    np.testing.assert_array_equal(y, native[0])
    np.testing.assert_array_equal(running_mean, mean_copy)
    np.testing.assert_array_equal(running_var, var_copy)


@pytest.mark.parametrize("with_running_stats", [True, False])
@pytest.mark.parametrize("shape", [(1, 4), (1, 3, 1, 1), (1, 2, 1)])
def test_training_on_one_value_per_channel_raises(shape, with_running_stats):
    x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    running_mean = np.zeros(shape[1], np.float32) if with_running_stats else None
    running_var = np.ones(shape[1], np.float32) if with_running_stats else None
    with pytest.raises(ValueError):
        F.native_batch_norm(x, None, None, running_mean, running_var, training=True)
    if with_running_stats:
        np.testing.assert_array_equal(running_mean, 0.0)
        np.testing.assert_array_equal(running_var, 1.0)


def test_eval_on_one_value_per_channel_works(assert_close):
    x = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
    running_mean = np.array([1.0, 0.0, -1.0], np.float32)
    running_var = np.array([1.0, 4.0, 0.25], np.float32)
    y = F.batch_norm(x, running_mean, running_var, training=False, eps=0.0)
    assert_close(y, [[0.0, 1.0, 8.0]], name="output")


# Mean / std of every channel in the test below.
CONDITION = 1000


@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (2, 3), (3, 2, 6)])
def test_channels_with_mean_far_above_std(rng, assert_close, shape):
    """Channels at 10 ± 0.01: a float32 E[x²] − E[x]² would lose the variance entirely.

    The statistics must keep their relative accuracy. For y and the gradients float32 itself
    limits the absolute accuracy to a few ulp(|x|·invstd), so atol grows with the condition.
    """
    x = (10 + 10 / CONDITION * _standardised(rng, shape)).astype(np.float32)
    gamma, beta, running_mean, running_var = _params(rng, shape[1])
    gy = rng.standard_normal(shape).astype(np.float32)
    expected = ref.batch_norm(x, gamma, beta, running_mean, running_var, training=True,
                              momentum=1.0)
    y, save_mean, save_invstd = F.native_batch_norm(x, gamma, beta, running_mean, running_var,
                                                    training=True, momentum=1.0)
    assert_close(save_mean, expected[1], atol=0, name="save_mean")
    assert_close(save_invstd, expected[2], atol=0, name="save_invstd")
    assert_close(running_var, expected[4], atol=0, name="running_var")  # the unbiased variance
    # Rounding x̂ costs about eps32·|mean|/std; each output carries it times its own scale.
    rounding = 1e-6 * CONDITION
    assert_close(y, expected[0], atol=rounding * np.abs(gamma).max(), name="output")
    grad_input, grad_weight, grad_bias = F.batch_norm_backward(gy, x, gamma, save_mean,
                                                               save_invstd, training=True)
    expected_grads = ref.batch_norm_backward(gy, x, gamma, expected[1], expected[2], True)
    gy_rms = np.sqrt(np.mean(np.square(gy, dtype=np.float64)))
    assert_close(grad_input, expected_grads[0],
                 atol=rounding * np.abs(gamma * save_invstd).max() * gy_rms, name="grad_input")
    assert_close(grad_weight, expected_grads[1], atol=rounding * np.abs(gy).sum(),
                 name="grad_weight")
    assert_close(grad_bias, expected_grads[2], terms=_count(shape), name="grad_bias")


# --------------------------------------------------------------------------- finite differences


@pytest.fixture(params=[(2, 2, 3, 2), (3, 2)], ids=["4d", "2d"])
def fd_case(request, rng):
    """A tiny case with the float64 reference's central-difference gradients."""
    shape = request.param
    x = _input(rng, shape)
    gamma, beta, running_mean, running_var = _params(rng, shape[1])
    gy = rng.standard_normal(shape)
    numerical = {}
    for training in (True, False):
        def loss(x, gamma, beta, training=training):
            y = ref.batch_norm(x, gamma, beta, running_mean, running_var, training=training)[0]
            return ref.weighted_sum(y, gy)

        numerical[training] = ref.numerical_gradients(loss, x, gamma, beta)
    return x, gamma, beta, running_mean, running_var, gy, numerical


NAMES = ["grad_input", "grad_weight", "grad_bias"]


@pytest.mark.parametrize("training", [True, False])
def test_reference_backward_matches_finite_differences(assert_close, fd_case, training):
    x, gamma, beta, running_mean, running_var, gy, numerical = fd_case
    _, mean, invstd, _, _ = ref.batch_norm(x, gamma, beta, running_mean, running_var, training)
    exact = ref.batch_norm_backward(gy, x, gamma, mean, invstd, training)
    for name, got, want in zip(NAMES, exact, numerical[training]):
        assert_close(got, want, **ref.FD_TOLERANCE, name=name)


@pytest.mark.parametrize("training", [True, False])
def test_backward_matches_finite_differences(assert_close, fd_case, training):
    x, gamma, beta, running_mean, running_var, gy, numerical = fd_case
    _, save_mean, save_invstd = F.native_batch_norm(
        x, gamma, beta, running_mean.copy(), running_var.copy(), training)
    actual = F.batch_norm_backward(gy, x, gamma, save_mean, save_invstd, training)
    for name, got, want in zip(NAMES, actual, numerical[training]):
        assert_close(got, want, terms=x.size // x.shape[1], name=name)
