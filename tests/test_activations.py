"""relu, leaky_relu, sigmoid and tanh: forward and backward."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
from bnrs import functional as F

SHAPES = [(1,), (5, 7), (3, 4, 7, 9)]

# name: (bnrs forward, bnrs backward, reference forward, reference backward, backward takes
# the forward's output (True) or its input (False))
ACTIVATIONS = {
    "relu": (F.relu, F.relu_backward, ref.relu, ref.relu_backward, False),
    "leaky_relu": (F.leaky_relu, F.leaky_relu_backward, ref.leaky_relu,
                   ref.leaky_relu_backward, False),
    "leaky_relu_0.2": (lambda x: F.leaky_relu(x, 0.2),
                       lambda g, x: F.leaky_relu_backward(g, x, 0.2),
                       lambda x: ref.leaky_relu(x, 0.2),
                       lambda g, x: ref.leaky_relu_backward(g, x, 0.2), False),
    "sigmoid": (F.sigmoid, F.sigmoid_backward, ref.sigmoid, ref.sigmoid_backward, True),
    "tanh": (F.tanh, F.tanh_backward, ref.tanh, ref.tanh_backward, True),
}


def _input(rng, shape):
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    x.flat[::5] = 0.0  # exact zeros: where relu's derivative switches
    return x


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_forward_matches_reference(rng, assert_close, name, shape):
    forward, _, ref_forward, _, _ = ACTIVATIONS[name]
    x = _input(rng, shape)
    assert_close(forward(x), ref_forward(x), name="output")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_backward_matches_reference(rng, assert_close, name, shape):
    forward, backward, _, ref_backward, takes_output = ACTIVATIONS[name]
    x = _input(rng, shape)
    gy = rng.standard_normal(shape).astype(np.float32)
    saved = forward(x) if takes_output else x
    assert_close(backward(gy, saved), ref_backward(gy, saved), name="grad_input")


def test_relu_gradient_is_zero_at_zero():
    x = np.array([-1.0, 0.0, 2.0], np.float32)
    np.testing.assert_array_equal(F.relu_backward(np.ones(3, np.float32), x), [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(F.relu(x), [0.0, 0.0, 2.0])


def test_leaky_relu_matches_pytorch_at_zero():
    # PyTorch's leaky_relu_backward uses the negative slope wherever x > 0 is false.
    x = np.array([-2.0, 0.0, 3.0], np.float32)
    np.testing.assert_array_equal(F.leaky_relu_backward(np.ones(3, np.float32), x, 0.25),
                                  [0.25, 0.25, 1.0])
    np.testing.assert_array_equal(F.leaky_relu(x, 0.25), [-0.5, 0.0, 3.0])


def test_saturating_activations_stay_finite(assert_close):
    x = np.array([-1e4, -1000, -100, -20, 0, 20, 100, 1000, 1e4], np.float32)
    y_sigmoid, y_tanh = F.sigmoid(x), F.tanh(x)
    assert np.isfinite(y_sigmoid).all() and np.isfinite(y_tanh).all()
    assert ((y_sigmoid >= 0) & (y_sigmoid <= 1)).all()
    assert ((y_tanh >= -1) & (y_tanh <= 1)).all()
    assert_close(y_sigmoid, ref.sigmoid(x), name="sigmoid")
    assert_close(y_tanh, ref.tanh(x), name="tanh")
    assert y_sigmoid[0] < 1e-30 and y_sigmoid[-1] == 1.0
    assert y_tanh[0] == -1.0 and y_tanh[-1] == 1.0


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_backward_matches_finite_differences(rng, assert_close, name):
    forward, backward, ref_forward, ref_backward, takes_output = ACTIVATIONS[name]
    x = (rng.standard_normal((3, 4)) * 3).astype(np.float32)
    x = np.where(np.abs(x) < 1e-3, np.float32(0.5), x)  # away from relu's kink
    gy = rng.standard_normal(x.shape)
    (numerical,) = ref.numerical_gradients(lambda v: ref.weighted_sum(ref_forward(v), gy), x)
    ref_saved = ref_forward(x) if takes_output else x
    assert_close(ref_backward(gy, ref_saved), numerical, **ref.FD_TOLERANCE,
                 name="reference grad_input")
    saved = forward(x) if takes_output else x
    assert_close(backward(gy, saved), numerical, name="grad_input")
