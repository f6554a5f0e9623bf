"""Batch renormalisation (bnrs.nn.BatchRenorm1d/2d) against NumPy references."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from bnrs import nn


def _pair(cls_bn, cls_brn, channels):
    bn, brn = cls_bn(channels), cls_brn(channels, r_max=1.0, d_max=0.0)
    weight = np.linspace(0.5, 2.0, channels)
    bias = np.linspace(-0.3, 0.3, channels)
    for layer in (bn, brn):
        layer.weight.data[:] = weight
        layer.bias.data[:] = bias
    return bn, brn


@pytest.mark.parametrize("shape, classes", [
    ((6, 3, 4, 5), (nn.BatchNorm2d, nn.BatchRenorm2d)),
    ((7, 4), (nn.BatchNorm1d, nn.BatchRenorm1d)),
])
def test_equals_batch_norm_when_r_is_1_and_d_is_0(rng, assert_close, shape, classes):
    bn, brn = _pair(*classes, shape[1])
    for step in range(3):   # also after the running statistics have moved
        x = (rng.standard_normal(shape) * 3 + step).astype(np.float32)
        grad = rng.standard_normal(shape).astype(np.float32)
        assert_close(brn(x), bn(x), terms=shape[0], name="output")
        assert_close(brn.backward(grad), bn.backward(grad), terms=x.size, name="grad_input")
    assert_close(brn.weight.grad, bn.weight.grad, terms=x.size * 3, name="grad_weight")
    assert_close(brn.bias.grad, bn.bias.grad, terms=x.size * 3, name="grad_bias")


def _reference(x, weight, bias, running_mean, running_var, eps, r_max, d_max):
    """Float64 renormalised forward and its r, d (per channel, broadcastable)."""
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean = x.mean(axis=axes, keepdims=True)
    std = np.sqrt(x.var(axis=axes, keepdims=True) + eps)
    running_std = np.sqrt(running_var.reshape(shape) + eps)
    r = np.clip(std / running_std, 1 / r_max, r_max)
    d = np.clip((mean - running_mean.reshape(shape)) / running_std, -d_max, d_max)
    x_hat = (x - mean) / std
    return weight.reshape(shape) * (x_hat * r + d) + bias.reshape(shape), r, d


def _trained_layer(rng, channels, cls=nn.BatchRenorm2d, shape=(5, 3, 4, 4)):
    layer = cls(channels, momentum=0.5)
    for _ in range(4):   # running statistics away from the batch's: r != 1, d != 0
        layer(rng.standard_normal(shape).astype(np.float32) * 0.5 + 1)
        layer.clear_saved()
    layer.weight.data[:] = rng.uniform(0.5, 2, channels)
    layer.bias.data[:] = rng.uniform(-1, 1, channels)
    return layer


def test_forward_matches_reference_with_active_correction(rng, assert_close):
    layer = _trained_layer(rng, 3)
    x = (rng.standard_normal((5, 3, 4, 4)) * 2).astype(np.float32)
    expected, r, d = _reference(x.astype(np.float64), layer.weight.data, layer.bias.data,
                                layer.running_mean, layer.running_var, layer.eps, 3.0, 5.0)
    assert not np.allclose(r, 1) and not np.allclose(d, 0)
    assert_close(layer(x), expected, terms=80, dtype=np.float32)


def test_gradients_by_finite_differences(rng):
    """r and d are constants for the gradient (Ioffe 2017): compare with central
    differences of the reference in which r and d are frozen at their forward values."""
    layer = _trained_layer(rng, 3)
    x = rng.standard_normal((5, 3, 4, 4))
    grad = rng.standard_normal(x.shape)
    weight = layer.weight.data.astype(np.float64)
    bias = layer.bias.data.astype(np.float64)
    _, r, d = _reference(x, weight, bias, layer.running_mean, layer.running_var,
                         layer.eps, 3.0, 5.0)
    trial = copy.deepcopy(layer)
    trial(x.astype(np.float32))
    grad_input = trial.backward(grad.astype(np.float32))

    def objective(x_value, weight_value, bias_value):
        axes = (0, 2, 3)
        mean = x_value.mean(axis=axes, keepdims=True)
        std = np.sqrt(x_value.var(axis=axes, keepdims=True) + layer.eps)
        out = (weight_value.reshape(1, -1, 1, 1) * ((x_value - mean) / std * r + d)
               + bias_value.reshape(1, -1, 1, 1))
        return float((out * grad).sum())

    step = 1e-4
    for index in [(0, 0, 0, 0), (1, 1, 2, 3), (4, 2, 3, 1), (2, 0, 1, 1)]:
        bump = np.zeros_like(x)
        bump[index] = step
        numeric = (objective(x + bump, weight, bias) - objective(x - bump, weight, bias)) / (
            2 * step)
        assert abs(grad_input[index] - numeric) < 2e-3 * max(1, abs(numeric)), index
    for channel in range(3):
        bump = np.zeros(3)
        bump[channel] = step
        numeric_w = (objective(x, weight + bump, bias) - objective(x, weight - bump, bias)) / (
            2 * step)
        numeric_b = (objective(x, weight, bias + bump) - objective(x, weight, bias - bump)) / (
            2 * step)
        assert abs(trial.weight.grad[channel] - numeric_w) < 2e-3 * max(1, abs(numeric_w))
        assert abs(trial.bias.grad[channel] - numeric_b) < 2e-3 * max(1, abs(numeric_b))


def test_running_statistics_are_bias_corrected(rng, assert_close):
    layer = nn.BatchRenorm1d(2, momentum=0.01)
    x = rng.standard_normal((8, 2)).astype(np.float32) * 3 + 5
    layer(x)
    # The first batch sets them (weight 1), then they move by ~momentum.
    assert_close(layer.running_mean, x.mean(axis=0), dtype=None)
    assert_close(layer.running_var, x.var(axis=0, ddof=1), dtype=None, rtol=1e-3)
    assert int(layer.num_batches_tracked) == 1
    second = rng.standard_normal((8, 2)).astype(np.float32)
    layer(second)
    weight = 0.01 / (1 - 0.99 ** 2)
    assert_close(layer.running_mean,
                 x.mean(axis=0) + weight * (second.mean(axis=0) - x.mean(axis=0)), dtype=None)


def test_evaluation_uses_running_statistics(rng, assert_close):
    layer = _trained_layer(rng, 3)
    layer.eval()
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    shape = (1, 3, 1, 1)
    expected = (layer.weight.data.reshape(shape) * (x - layer.running_mean.reshape(shape))
                / np.sqrt(layer.running_var.reshape(shape) + layer.eps)
                + layer.bias.data.reshape(shape))
    before = layer.running_mean.copy()
    assert_close(layer(x), expected, dtype=np.float32)
    assert np.array_equal(layer.running_mean, before)
    assert layer.backward(np.ones_like(x)).shape == x.shape


def test_grammar_token_and_state_dict():
    model = nn.from_spec("c4-brn-relu-mp2-fc8-brn-relu", (1, 8, 8), 3, random_state=0)
    kinds = [type(m).__name__ for m in model]
    assert kinds[:2] == ["Conv2d", "BatchRenorm2d"] and "BatchRenorm1d" in kinds
    assert "1.running_var" in model.state_dict()
    assert [t.kind for t in nn.parse("brn-bn")] == ["brn", "bn"]
    with pytest.raises(ValueError, match="r_max"):
        nn.BatchRenorm2d(3, r_max=0.5)
    with pytest.raises(ValueError, match="momentum"):
        nn.BatchRenorm2d(3, momentum=None)
