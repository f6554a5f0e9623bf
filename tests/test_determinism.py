"""Results do not depend on the thread count, and every SIMD level agrees with the scalar path.

Shapes are large enough for the kernels to split the work between threads. Every kernel must
give bit-identical results at 1 and 2 threads. Every SIMD level the CPU has (avx2, avx512) is
compared with the portable scalar path: elementwise kernels, batch-norm statistics, group norm, dropout
and pooling must be bit-identical; conv2d and linear, whose GEMM blocks and rounds its sums
by the level's register width (and fuses multiply-adds only with SIMD), within float32
tolerance. A level the CPU lacks is skipped, with the reason.
"""

from __future__ import annotations

import os

import child
import numpy as np
import pytest
from bnrs import _core
from bnrs import functional as F


def _data(seed=0):
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    return rng, normal


def _conv():
    _, normal = _data()
    x, w, b = normal(8, 16, 20, 20), normal(16, 16, 3, 3), normal(16)
    gy = normal(8, 16, 10, 10)
    y = F.conv2d(x, w, b, stride=2, padding=1)
    grads = F.conv2d_backward(gy, x, w, stride=2, padding=1)
    return {"output": y, "grad_input": grads[0], "grad_weight": grads[1], "grad_bias": grads[2]}


def _conv_image_blocks():
    """Small images in a batch of 19: blocks of 3 images share one GEMM (with FMA the
    forward and the input gradient take the direct kernels; the weight gradient of 12x12
    outputs stays on the GEMM)."""
    _, normal = _data(3)
    x, w, b = normal(19, 16, 12, 12), normal(8, 16, 3, 3), normal(8)
    gy = normal(19, 8, 12, 12)
    grads = F.conv2d_backward(gy, x, w, padding=1)
    return {"output": F.conv2d(x, w, b, padding=1), "grad_input": grads[0],
            "grad_weight": grads[1], "grad_bias": grads[2]}


def _conv_first_layer():
    _, normal = _data(1)
    x, w = normal(8, 1, 28, 28), normal(16, 1, 5, 5)
    gy = normal(8, 16, 28, 28)
    grads = F.conv2d_backward(gy, x, w, padding=2, input_grad=False)
    return {"output": F.conv2d(x, w, None, padding=2), "grad_weight": grads[1],
            "grad_bias": grads[2]}


def _conv_direct():
    """Stride 1 on 28x28: the direct kernels (forward, input and weight gradients)."""
    _, normal = _data(4)
    x, w, b = normal(9, 16, 28, 28), normal(16, 16, 3, 3), normal(16)
    gy = normal(9, 16, 28, 28)
    grads = F.conv2d_backward(gy, x, w, padding=1)
    return {"output": F.conv2d(x, w, b, padding=1), "grad_input": grads[0],
            "grad_weight": grads[1], "grad_bias": grads[2]}


def _linear():
    _, normal = _data(2)
    x, w, b, gy = normal(64, 300), normal(100, 300), normal(100), normal(64, 100)
    grads = F.linear_backward(gy, x, w)
    return {"output": F.linear(x, w, b), "grad_input": grads[0], "grad_weight": grads[1],
            "grad_bias": grads[2]}


def _batch_norm(shape, training):
    def run():
        rng, normal = _data(3)
        channels = shape[1]
        x = normal(*shape) * 2 + 1
        gamma, beta, gy = normal(channels), normal(channels), normal(*shape)
        running_mean = normal(channels)
        running_var = rng.uniform(0.5, 2, channels).astype(np.float32)
        y, save_mean, save_invstd = F.native_batch_norm(x, gamma, beta, running_mean,
                                                        running_var, training, 0.1, 1e-5)
        grads = F.batch_norm_backward(gy, x, gamma, save_mean, save_invstd, training)
        return {"output": y, "save_mean": save_mean, "save_invstd": save_invstd,
                "running_mean": running_mean, "running_var": running_var,
                "grad_input": grads[0], "grad_weight": grads[1], "grad_bias": grads[2]}
    return run


def _group_norm(shape, groups):
    def run():
        _, normal = _data(9)
        channels = shape[1]
        x = normal(*shape) * 2 + 1
        gamma, beta, gy = normal(channels), normal(channels), normal(*shape)
        y, mean, rstd = F.native_group_norm(x, groups, gamma, beta)
        grads = F.group_norm_backward(gy, x, groups, gamma, mean, rstd)
        return {"output": y, "mean": mean, "rstd": rstd, "grad_input": grads[0],
                "grad_weight": grads[1], "grad_bias": grads[2]}
    return run


def _pools():
    _, normal = _data(4)
    x, gy = normal(8, 16, 20, 20), normal(8, 16, 10, 10)
    y, indices = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    return {"max": y, "max_indices": indices,
            "max_grad": F.max_pool2d_backward(gy, indices, x.shape),
            "avg": F.avg_pool2d(x, 3, 2, 1),
            "avg_grad": F.avg_pool2d_backward(gy, x.shape, 3, 2, 1),
            "avg_nopad": F.avg_pool2d(x, 3, 2, 1, count_include_pad=False),
            "avg_nopad_grad": F.avg_pool2d_backward(gy, x.shape, 3, 2, 1,
                                                    count_include_pad=False)}


def _elementwise():
    _, normal = _data(5)
    x, gy = normal(100_003) * 4, normal(100_003)
    sigmoid, tanh = F.sigmoid(x), F.tanh(x)
    return {"relu": F.relu(x), "relu_grad": F.relu_backward(gy, x),
            "leaky_relu": F.leaky_relu(x, 0.1),
            "leaky_relu_grad": F.leaky_relu_backward(gy, x, 0.1),
            "sigmoid": sigmoid, "sigmoid_grad": F.sigmoid_backward(gy, sigmoid),
            "tanh": tanh, "tanh_grad": F.tanh_backward(gy, tanh)}


def _dropout():
    _, normal = _data(6)
    x = normal(100_003)
    maps = normal(16, 32, 14, 14)
    return {"dropout": F.dropout(x, 0.3, seed=11),
            "dropout_grad": F.dropout_backward(x, 0.3, 11),
            "dropout2d": F.dropout2d(maps, 0.4, seed=12),
            "dropout2d_grad": F.dropout2d_backward(maps, 0.4, 12),
            "mask": F.dropout_mask(100_003, 0.5, 13)}


def _loss():
    rng, normal = _data(7)
    logits, gy = normal(64, 1000) * 3, normal(64, 1000)
    target = rng.integers(0, 1000, 64)
    y = F.log_softmax(logits)
    return {"log_softmax": y, "log_softmax_grad": F.log_softmax_backward(gy, y),
            "cross_entropy": np.float64(F.cross_entropy(logits, target)),
            "cross_entropy_grad": F.cross_entropy_backward(logits, target)}


def _optimizers():
    _, normal = _data(8)
    param, grad, buffer = normal(100_003), normal(100_003), normal(100_003)
    F.sgd_step(param, grad, buffer, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    adam_param, exp_avg, exp_avg_sq = normal(100_003), normal(100_003), normal(100_003) ** 2
    for step in (1, 2):
        F.adam_step(adam_param, grad, exp_avg, exp_avg_sq, step, lr=0.01, weight_decay=0.1,
                    decoupled_weight_decay=step == 2)
    return {"sgd_param": param, "sgd_buffer": buffer, "adam_param": adam_param,
            "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


# name: (run, outputs that may differ within float32 tolerance between SIMD and scalar,
#        the number of terms those outputs sum)
KERNELS = {
    "conv2d": (_conv, {"output", "grad_input", "grad_weight", "grad_bias"}, 8 * 10 * 10),
    "conv2d_image_blocks": (_conv_image_blocks,
                            {"output", "grad_input", "grad_weight", "grad_bias"}, 19 * 144),
    "conv2d_first_layer": (_conv_first_layer, {"output", "grad_weight", "grad_bias"},
                           8 * 28 * 28),
    "conv2d_direct": (_conv_direct, {"output", "grad_input", "grad_weight", "grad_bias"},
                      9 * 28 * 28),
    "linear": (_linear, {"output", "grad_input", "grad_weight", "grad_bias"}, 300),
    "batch_norm_2d_train": (_batch_norm((16, 8, 14, 14), True),
                            {"output", "grad_input", "grad_weight", "grad_bias"}, 16 * 14 * 14),
    "batch_norm_2d_eval": (_batch_norm((16, 8, 14, 14), False),
                           {"output", "grad_input", "grad_weight", "grad_bias"}, 16 * 14 * 14),
    "batch_norm_1d_train": (_batch_norm((64, 100), True),
                            {"output", "grad_input", "grad_weight", "grad_bias"}, 64),
    # 256 samples: the sums run over 3 blocks of channels in parallel.
    "batch_norm_1d_channel_blocks": (_batch_norm((256, 300), True),
                                     {"output", "grad_input", "grad_weight", "grad_bias"}, 256),
    "group_norm_2d": (_group_norm((16, 32, 14, 14), 8), set(), 1),
    "layer_norm_features": (_group_norm((64, 300), 1), set(), 1),
    "pooling": (_pools, set(), 1),
    "elementwise": (_elementwise, set(), 1),
    "dropout": (_dropout, set(), 1),
    "log_softmax_cross_entropy": (_loss, {"log_softmax", "log_softmax_grad", "cross_entropy",
                                          "cross_entropy_grad"}, 64 * 1000),
    "optimizers": (_optimizers, set(), 1),
}


@pytest.fixture
def restore_threads():
    before = _core.get_num_threads()
    yield
    _core.set_num_threads(before)


@pytest.fixture
def restore_simd():
    level = _core.simd_backend()
    yield
    _core.set_simd(level)


def _use_level(level):
    if level not in _core.simd_levels():
        pytest.skip(f"this CPU has no {level} (it has {', '.join(_core.simd_levels())})")
    assert _core.set_simd(level) == level


def _assert_identical(actual, expected, what):
    assert actual.keys() == expected.keys()
    for key in expected:
        assert np.array_equal(actual[key], expected[key]), (
            f"{what}: {key} differs in {np.count_nonzero(actual[key] != expected[key])} of "
            f"{np.size(expected[key])} elements")


def test_thread_count_can_be_set(restore_threads):
    _core.set_num_threads(1)
    assert _core.get_num_threads() == 1
    _core.set_num_threads(2)
    assert _core.get_num_threads() == 2
    with pytest.raises(ValueError):
        _core.set_num_threads(0)


@pytest.mark.parametrize("name", KERNELS)
def test_bit_identical_at_one_and_two_threads(restore_threads, name):
    run = KERNELS[name][0]
    _core.set_num_threads(1)
    one_thread = run()
    _core.set_num_threads(2)
    two_threads = run()
    _assert_identical(two_threads, one_thread, "2 threads vs 1")
    _assert_identical(run(), two_threads, "2 threads, second run")


def test_simd_switch(restore_simd):
    backend = _core.simd_backend()
    assert backend in ("avx512", "avx2", "scalar")
    _core.set_simd_enabled(False)
    assert _core.simd_backend() == "scalar"
    _core.set_simd_enabled(True)
    # Back to the level in use before, unless that was scalar (BNRS_SIMD=scalar): then
    # to the widest the CPU has.
    widest = _core.simd_levels()[-1]
    assert _core.simd_backend() == (backend if backend != "scalar" else widest)


@pytest.mark.parametrize("name", KERNELS)
def test_scalar_fallback_agrees_with_simd(restore_simd, assert_close, name):
    run, tolerant, terms = KERNELS[name]
    _core.set_simd_enabled(True)
    simd = run()
    _core.set_simd_enabled(False)
    scalar = run()
    assert simd.keys() == scalar.keys()
    for key in simd:
        if key in tolerant:
            expected = np.asarray(simd[key], np.float64)
            assert_close(scalar[key], expected, terms=terms, dtype=None, name=key)
        else:
            assert np.array_equal(scalar[key], simd[key]), (
                f"{key}: scalar path differs from SIMD in "
                f"{np.count_nonzero(scalar[key] != simd[key])} of {np.size(simd[key])} elements")


SIMD_LEVELS = ("avx2", "avx512")


def _assert_agree(actual, expected, tolerant, terms, assert_close, what):
    assert actual.keys() == expected.keys()
    for key in expected:
        if key in tolerant:
            assert_close(actual[key], np.asarray(expected[key], np.float64), terms=terms,
                         dtype=None, name=f"{what}: {key}")
        else:
            assert np.array_equal(actual[key], expected[key]), (
                f"{what}: {key} differs in {np.count_nonzero(actual[key] != expected[key])} "
                f"of {np.size(expected[key])} elements")


@pytest.mark.parametrize("level", SIMD_LEVELS)
@pytest.mark.parametrize("name", KERNELS)
def test_each_simd_level_agrees_with_the_scalar_path(restore_simd, assert_close, level, name):
    run, tolerant, terms = KERNELS[name]
    _use_level(level)
    simd = run()
    _core.set_simd("scalar")
    _assert_agree(run(), simd, tolerant, terms, assert_close, f"scalar vs {level}")


# Outputs computed by the GEMM. gemm's AVX-512 kernels hold 16 floats a register and block
# the product differently from its AVX2 kernels (8 floats), so the same sums are rounded
# in another order: they agree within float32 tolerance of the terms summed, not bit for bit
# (linear 64x1568->128 differs in about 93% of its outputs, by up to 1.5e-4 on values ~40).
# Everything bnrs computes itself is compiled from one body per level and must be identical.
GEMM_OUTPUTS = {
    "conv2d": {"output", "grad_input", "grad_weight"},
    "conv2d_image_blocks": {"grad_weight"},
    "conv2d_first_layer": {"grad_weight"},
    "linear": {"output", "grad_input", "grad_weight"},
}


@pytest.mark.parametrize("name", KERNELS)
def test_avx512_agrees_with_avx2(restore_simd, assert_close, name):
    run, _, terms = KERNELS[name]
    _use_level("avx2")
    avx2 = run()
    _use_level("avx512")
    _assert_agree(run(), avx2, GEMM_OUTPUTS.get(name, set()), terms, assert_close,
                  "avx512 vs avx2")


def test_simd_levels_and_set_simd(restore_simd):
    levels = _core.simd_levels()
    assert levels[0] == "scalar"
    assert set(levels) <= {"scalar", "avx2", "avx512"}
    assert _core.simd_backend() == levels[-1] or "BNRS_SIMD" in os.environ
    for level in levels:
        assert _core.set_simd(level) == level
        assert _core.simd_backend() == level
    # True goes back to the level BNRS_SIMD chose, unless that was scalar.
    forced = os.environ.get("BNRS_SIMD", "").strip().lower()
    _core.set_simd_enabled(True)
    assert _core.simd_backend() == (forced if forced in levels[1:] else levels[-1])
    _core.set_simd_enabled(False)
    assert _core.simd_backend() == "scalar"


@pytest.mark.parametrize("name", ["sse", "AVX-512", "", "1"])
def test_set_simd_rejects_unknown_levels(restore_simd, name):
    before = _core.simd_backend()
    with pytest.raises(ValueError, match="expected 'avx512', 'avx2' or 'scalar'"):
        _core.set_simd(name)
    assert _core.simd_backend() == before


@pytest.mark.parametrize("level", SIMD_LEVELS)
def test_a_level_the_cpu_lacks_warns_and_uses_the_widest(restore_simd, level):
    levels = _core.simd_levels()
    if level in levels:
        pytest.skip(f"this CPU has {level}: the fallback cannot be exercised here")
    with pytest.warns(RuntimeWarning, match=f"no {level}"):
        assert _core.set_simd(level) == levels[-1]


_BACKEND_CHILD = """
    import bnrs
    print(bnrs.simd_backend())
"""


@pytest.mark.parametrize("variable, level", [("avx512", "avx512"), ("avx2", "avx2"),
                                             ("scalar", "scalar"), ("0", "scalar"),
                                             (" AVX2 ", "avx2"), ("", None)])
def test_bnrs_simd_forces_a_level(variable, level):
    level = level or _core.simd_levels()[-1]  # blank: as if unset, the widest
    if level not in _core.simd_levels():
        pytest.skip(f"this CPU has no {level}")
    result = child.run(_BACKEND_CHILD, env={"BNRS_SIMD": variable})
    assert result.stdout.split() == [level]
    assert "RuntimeWarning" not in result.stderr


@pytest.mark.parametrize("variable", ["1", "sse4", "avx-512", "avx2,avx512"])
def test_an_invalid_bnrs_simd_warns_and_uses_the_widest(variable):
    result = child.run(_BACKEND_CHILD, env={"BNRS_SIMD": variable})
    assert result.stdout.split() == [_core.simd_levels()[-1]]
    assert "RuntimeWarning" in result.stderr
    assert f"BNRS_SIMD={variable!r}".replace("'", '"') in result.stderr
    assert "expected avx512, avx2, scalar or 0" in result.stderr


@pytest.mark.parametrize("level", SIMD_LEVELS)
def test_bnrs_simd_naming_a_level_the_cpu_lacks_warns(level):
    levels = _core.simd_levels()
    if level in levels:
        pytest.skip(f"this CPU has {level}: the fallback cannot be exercised here")
    result = child.run(_BACKEND_CHILD, env={"BNRS_SIMD": level})
    assert result.stdout.split() == [levels[-1]]
    assert f"this CPU has no {level}" in result.stderr
