"""The in-place SGD and Adam/AdamW update kernels against PyTorch's update rules."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
from bnrs import functional as F

SIZE = 37  # not a multiple of any SIMD width

SGD_CONFIGS = {
    "plain": {"lr": 0.1},
    "weight_decay": {"lr": 0.1, "weight_decay": 0.05},
    "momentum": {"lr": 0.1, "momentum": 0.9},
    "momentum_dampening": {"lr": 0.05, "momentum": 0.8, "dampening": 0.3},
    "nesterov": {"lr": 0.1, "momentum": 0.9, "nesterov": True},
    "nesterov_weight_decay": {"lr": 0.02, "momentum": 0.5, "nesterov": True,
                              "weight_decay": 0.1},
}

ADAM_CONFIGS = {
    "default": {},
    "large_lr_betas": {"lr": 0.05, "beta1": 0.5, "beta2": 0.9, "eps": 1e-6},
    "l2_weight_decay": {"lr": 0.01, "weight_decay": 0.1},
    "adamw": {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True},
}


@pytest.mark.parametrize("name", SGD_CONFIGS)
def test_sgd_steps_match_reference(rng, assert_close, name):
    config = SGD_CONFIGS[name]
    param = rng.standard_normal(SIZE).astype(np.float32)
    buffer = np.zeros(SIZE, np.float32) if config.get("momentum") else None
    expected_param, expected_buffer = param.astype(np.float64), None
    for step in range(4):
        grad = rng.standard_normal(SIZE).astype(np.float32)
        grad_before = grad.copy()
        F.sgd_step(param, grad, buffer, **config, first_step=step == 0)
        expected_param, expected_buffer = ref.sgd_step(
            expected_param, grad, expected_buffer, **config, first_step=step == 0)
        np.testing.assert_array_equal(grad, grad_before)
        assert_close(param, expected_param, name=f"param after step {step + 1}")
        if buffer is not None:
            assert_close(buffer, expected_buffer, name=f"momentum_buffer after step {step + 1}")


def test_sgd_first_step_sets_the_buffer_to_the_gradient(assert_close):
    param = np.ones(SIZE, np.float32)
    grad = np.linspace(-1, 1, SIZE, dtype=np.float32)
    buffer = np.full(SIZE, 123.0, np.float32)  # stale contents must be overwritten
    F.sgd_step(param, grad, buffer, lr=0.5, momentum=0.9, dampening=0.5, first_step=True)
    assert_close(buffer, grad, name="momentum_buffer")
    assert_close(param, 1.0 - 0.5 * grad.astype(np.float64), name="param")


def test_sgd_with_momentum_needs_a_buffer(rng):
    param = rng.standard_normal(SIZE).astype(np.float32)
    before = param.copy()
    with pytest.raises(ValueError, match="momentum_buffer"):
        F.sgd_step(param, np.ones(SIZE, np.float32), None, lr=0.1, momentum=0.9)
    np.testing.assert_array_equal(param, before)


@pytest.mark.parametrize("name", ADAM_CONFIGS)
def test_adam_steps_match_reference(rng, assert_close, name):
    config = ADAM_CONFIGS[name]
    param = rng.standard_normal(SIZE).astype(np.float32)
    exp_avg, exp_avg_sq = np.zeros(SIZE, np.float32), np.zeros(SIZE, np.float32)
    expected_param, expected_avg, expected_avg_sq = (param.astype(np.float64), np.zeros(SIZE),
                                                     np.zeros(SIZE))
    for step in range(1, 5):
        grad = rng.standard_normal(SIZE).astype(np.float32)
        grad[:3] = 0.0  # zero gradients: a zero update, no 0/0
        F.adam_step(param, grad, exp_avg, exp_avg_sq, step, **config)
        expected_param, expected_avg, expected_avg_sq = ref.adam_step(
            expected_param, grad, expected_avg, expected_avg_sq, step, **config)
        assert_close(param, expected_param, name=f"param after step {step}")
        assert_close(exp_avg, expected_avg, name=f"exp_avg after step {step}")
        assert_close(exp_avg_sq, expected_avg_sq, name=f"exp_avg_sq after step {step}")
        assert np.isfinite(param).all()


def test_adamw_shrinks_parameters_with_zero_gradient(assert_close):
    param = np.full(SIZE, 2.0, np.float32)
    zeros = np.zeros(SIZE, np.float32)
    F.adam_step(param, zeros, zeros.copy(), zeros.copy(), 1, lr=0.1, weight_decay=0.5,
                decoupled_weight_decay=True)
    assert_close(param, np.full(SIZE, 2.0 * (1 - 0.1 * 0.5)), name="param")


def test_adam_step_counts_from_one(rng):
    param = rng.standard_normal(SIZE).astype(np.float32)
    before = param.copy()
    with pytest.raises(ValueError, match="step"):
        F.adam_step(param, np.ones(SIZE, np.float32), np.zeros(SIZE, np.float32),
                    np.zeros(SIZE, np.float32), 0)
    np.testing.assert_array_equal(param, before)


def test_optimizer_accepts_any_gradient_layout(rng):
    grad64 = rng.standard_normal((4, 6))
    param = rng.standard_normal((4, 6)).astype(np.float32)
    results = []
    for grad in (grad64.astype(np.float32), grad64.astype(np.float32).astype(np.float64),
                 np.asfortranarray(grad64.astype(np.float32))):
        updated = param.copy()
        F.adam_step(updated, grad, np.zeros_like(param), np.zeros_like(param), 1, lr=0.1)
        results.append(updated)
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], results[2])
