"""Bad arguments raise ValueError/TypeError naming the argument; inputs are never modified;
any real dtype, memory order or stride gives the float32 C-contiguous result.
"""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
from bnrs import functional as F
from bnrs import nn, optim


def f32(*shape):
    return np.ones(shape, dtype=np.float32)


X = f32(2, 3, 7, 9)
W = f32(4, 3, 3, 3)


def _raises(error, argument, call):
    """``call()`` raises ``error`` whose message starts with ``argument`` (a regex), as
    bnrs's messages do ("weight: expected ..."): a message that only mentions the name
    further on (", as input has ...") does not count."""
    with pytest.raises(error, match=rf"^({argument})\b"):
        call()


# --------------------------------------------------------------------------- shape errors

WRONG_NDIM = {
    "conv2d_input_3d": ("input", lambda: F.conv2d(f32(3, 7, 9), W)),
    "conv2d_weight_3d": ("weight", lambda: F.conv2d(X, f32(4, 3, 3))),
    "conv2d_backward_grad_output_3d": ("grad_output",
                                       lambda: F.conv2d_backward(f32(4, 7, 9), X, W, padding=1)),
    "max_pool2d_input_3d": ("input", lambda: F.max_pool2d(f32(3, 7, 9), 2)),
    "avg_pool2d_input_5d": ("input", lambda: F.avg_pool2d(f32(1, 2, 3, 7, 9), 2)),
    "linear_input_1d": ("input", lambda: F.linear(f32(5), f32(4, 5))),
    "linear_input_3d": ("input", lambda: F.linear(f32(2, 3, 5), f32(4, 5))),
    "linear_weight_1d": ("weight", lambda: F.linear(f32(2, 5), f32(5))),
    "batch_norm_input_1d": ("input", lambda: F.native_batch_norm(f32(8), training=True)),
    "log_softmax_input_1d": ("input", lambda: F.log_softmax(f32(5))),
    "log_softmax_input_3d": ("input", lambda: F.log_softmax(f32(2, 3, 5))),
    "cross_entropy_input_1d": ("input", lambda: F.cross_entropy(f32(5), np.array([1]))),
    "cross_entropy_target_2d": ("target", lambda: F.cross_entropy(f32(2, 5), np.ones((2, 1),
                                                                                     int))),
    "dropout2d_input_3d": ("input", lambda: F.dropout2d(f32(3, 7, 9), 0.5, seed=1)),
}


@pytest.mark.parametrize("name", WRONG_NDIM)
def test_wrong_ndim(name):
    argument, call = WRONG_NDIM[name]
    _raises(ValueError, argument, call)


# Two arguments that disagree, neither wrong alone: the message may lead with either
# (the pairs below); a case named after one argument expects that one.
MISMATCHED_CHANNELS = {
    "conv2d_input_vs_weight": ("input|weight", lambda: F.conv2d(f32(2, 2, 7, 9), W)),
    "conv2d_backward_grad_output_vs_weight": (
        "grad_output", lambda: F.conv2d_backward(f32(2, 5, 7, 9), X, W, padding=1)),
    # Nothing tells which of the two is wrong: the message names both.
    "conv2d_backward_weight_vs_grad_output": (
        "grad_output, weight", lambda: F.conv2d_backward(f32(2, 4, 7, 9), X, f32(3, 3, 3, 3),
                                                         padding=1)),
    "conv2d_backward_grad_output_spatial": (
        "grad_output", lambda: F.conv2d_backward(f32(2, 4, 6, 9), X, W, padding=1)),
    "linear_input_vs_weight": ("input|weight", lambda: F.linear(f32(2, 6), f32(4, 5))),
    "linear_backward_grad_output": ("grad_output",
                                    lambda: F.linear_backward(f32(2, 3), f32(2, 5), f32(4, 5))),
    "batch_norm_backward_grad_output": (
        "grad_output", lambda: F.batch_norm_backward(f32(2, 4), f32(2, 3), None, f32(3),
                                                     f32(3))),
    "relu_backward_grad_output": ("grad_output",
                                  lambda: F.relu_backward(f32(3, 4), f32(4, 3))),
    "sigmoid_backward_grad_output": ("grad_output",
                                     lambda: F.sigmoid_backward(f32(3, 4), f32(3, 5))),
    "log_softmax_backward_grad_output": ("grad_output",
                                         lambda: F.log_softmax_backward(f32(3, 4), f32(3, 5))),
    "max_pool2d_backward_indices": (
        "indices",
        lambda: F.max_pool2d_backward(f32(2, 3, 3, 4), np.zeros((2, 3, 3, 3), np.int64),
                                      X.shape)),
    "max_pool2d_backward_grad_output": (
        "grad_output",
        lambda: F.max_pool2d_backward(f32(2, 4, 3, 4), np.zeros((2, 3, 3, 4), np.int64),
                                      X.shape)),
    "avg_pool2d_backward_input_shape": (
        "grad_output",
        lambda: F.avg_pool2d_backward(f32(2, 3, 3, 3), X.shape, 2)),
}


@pytest.mark.parametrize("name", MISMATCHED_CHANNELS)
def test_mismatched_shapes_between_arguments(name):
    argument, call = MISMATCHED_CHANNELS[name]
    _raises(ValueError, argument, call)


KERNEL_TOO_LARGE = {
    "conv2d": ("weight", lambda: F.conv2d(f32(1, 1, 3, 3), f32(1, 1, 5, 5))),
    "conv2d_one_axis": ("weight", lambda: F.conv2d(f32(1, 1, 9, 3), f32(1, 1, 3, 5),
                                                           padding=(0, 0))),
    "conv2d_dilated": (r"weight: .*\(dilation \(3, 3\)\) on",
                       lambda: F.conv2d(f32(1, 1, 5, 5), f32(1, 1, 3, 3), dilation=3)),
    "conv2d_backward": ("weight",
                        lambda: F.conv2d_backward(f32(1, 1, 1, 1), f32(1, 1, 3, 3),
                                                  f32(1, 1, 5, 5))),
    "max_pool2d": ("kernel_size", lambda: F.max_pool2d(f32(1, 1, 3, 3), 4)),
    "avg_pool2d": ("kernel_size", lambda: F.avg_pool2d(f32(1, 1, 3, 3), (2, 4))),
}


@pytest.mark.parametrize("name", KERNEL_TOO_LARGE)
def test_kernel_larger_than_padded_input(name):
    argument, call = KERNEL_TOO_LARGE[name]
    _raises(ValueError, argument, call)


# --------------------------------------------------------------------------- geometry values

CONV_AND_POOLS = {
    "conv2d": lambda **kw: F.conv2d(X, W, **kw),
    "conv2d_backward": lambda **kw: F.conv2d_backward(f32(2, 4, 5, 7), X, W, **kw),
    "max_pool2d": lambda **kw: F.max_pool2d(X, 3, **kw),
    "avg_pool2d": lambda **kw: F.avg_pool2d(X, 3, **kw),
    "avg_pool2d_backward": lambda **kw: F.avg_pool2d_backward(f32(2, 3, 2, 3), X.shape, 3,
                                                              **kw),
}


@pytest.mark.parametrize("padding", [-1, (0, -1)])
@pytest.mark.parametrize("name", CONV_AND_POOLS)
def test_negative_padding(name, padding):
    _raises(ValueError, "padding", lambda: CONV_AND_POOLS[name](padding=padding))


@pytest.mark.parametrize("stride", [0, (1, 0), -1])
@pytest.mark.parametrize("name", CONV_AND_POOLS)
def test_stride_not_positive(name, stride):
    _raises(ValueError, "stride", lambda: CONV_AND_POOLS[name](stride=stride))


@pytest.mark.parametrize("dilation", [0, (0, 1), -2])
@pytest.mark.parametrize("name", ["conv2d", "conv2d_backward"])
def test_dilation_not_positive(name, dilation):
    _raises(ValueError, "dilation", lambda: CONV_AND_POOLS[name](dilation=dilation))


@pytest.mark.parametrize("kernel_size", [0, (2, 0)])
@pytest.mark.parametrize("pool", [F.max_pool2d, F.avg_pool2d])
def test_pool_kernel_size_not_positive(pool, kernel_size):
    _raises(ValueError, "kernel_size", lambda: pool(X, kernel_size))


@pytest.mark.parametrize("kernel_size, padding", [(3, 2), (2, 2), ((2, 4), (1, 3)),
                                                  ((5, 3), (2, 2))])
@pytest.mark.parametrize("pool", [F.max_pool2d, F.avg_pool2d])
def test_pool_padding_over_half_the_kernel(pool, kernel_size, padding):
    # PyTorch: "pad should be at most half of effective kernel size".
    _raises(ValueError, "padding", lambda: pool(X, kernel_size, 1, padding))


@pytest.mark.parametrize("call", [lambda: F.max_pool2d(X, 2, padding=2),
                                  lambda: F.avg_pool2d(X, 2, padding=2),
                                  lambda: nn.MaxPool2d(2, padding=2)])
def test_pool_padding_message_states_the_limit_it_enforces(call):
    # Once read "expected at most half the kernel size (2, 2), got (2, 2)".
    with pytest.raises(ValueError) as error:
        call()
    assert str(error.value) == (
        "padding: expected at most kernel_size // 2 = 1 (kernel_size 2), got 2")


@pytest.mark.parametrize("value", [1.5, (1, 2, 3), "2", True, None])
def test_geometry_that_is_not_an_int_or_pair(value):
    _raises(TypeError, "stride", lambda: F.conv2d(X, W, stride=value))


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5, float("nan")])
def test_p_outside_zero_one(p):
    _raises(ValueError, r"\bp\b", lambda: F.dropout(X, p, seed=1))


def test_p_not_a_number():
    _raises(TypeError, r"\bp\b", lambda: F.dropout(X, "half", seed=1))


@pytest.mark.parametrize("seed, error", [(-1, ValueError), (2**64, ValueError),
                                         (1.5, TypeError), (True, TypeError)])
def test_bad_seed(seed, error):
    _raises(error, "seed", lambda: F.dropout(X, 0.5, seed=seed))


def test_dim_other_than_the_class_axis():
    _raises(ValueError, "dim", lambda: F.log_softmax(f32(2, 5), dim=0))


# --------------------------------------------------------------------------- dtypes


NON_NUMERIC = {
    "object": np.array([[1.0, 2.0]], dtype=object),
    "str": np.array([["1", "2"]]),
    "complex": np.ones((1, 2), np.complex64),
    "bool": np.ones((1, 2), bool),
}


@pytest.mark.parametrize("kind", NON_NUMERIC)
def test_non_numeric_dtype(kind):
    bad = NON_NUMERIC[kind]
    _raises(TypeError, "input", lambda: F.relu(bad))
    _raises(TypeError, "input", lambda: F.linear(bad, f32(3, 2)))
    _raises(TypeError, "weight", lambda: F.linear(f32(1, 2), bad))
    _raises(TypeError, "input", lambda: F.conv2d(bad.reshape(1, 1, 1, 2), f32(1, 1, 1, 1)))
    _raises(TypeError, "grad_output", lambda: F.tanh_backward(bad, f32(1, 2)))


def test_float_target():
    _raises(TypeError, "target", lambda: F.cross_entropy(f32(2, 3), np.array([0.0, 1.0])))


def test_float_indices():
    _raises(TypeError, "indices",
            lambda: F.max_pool2d_backward(f32(1, 1, 1, 1), np.zeros((1, 1, 1, 1)), (1, 1, 2, 2)))


# --------------------------------------------------------------------------- in-place buffers


def _float64(buffer):
    return buffer.astype(np.float64)


def _non_contiguous(buffer):
    wide = np.zeros(buffer.shape + (2,), np.float32)
    wide[..., 0] = buffer
    return wide[..., 0]


def _read_only(buffer):
    buffer = buffer.copy()
    buffer.setflags(write=False)
    return buffer


BAD_BUFFERS = {"float64": (_float64, TypeError), "non_contiguous": (_non_contiguous, ValueError),
               "read_only": (_read_only, ValueError)}


def _bn_call(argument, bad):
    buffers = {"running_mean": np.zeros(3, np.float32), "running_var": np.ones(3, np.float32)}
    buffers[argument] = bad(buffers[argument])
    return lambda: F.native_batch_norm(f32(4, 3), None, None, buffers["running_mean"],
                                       buffers["running_var"], training=True)


@pytest.mark.parametrize("bad", BAD_BUFFERS)
@pytest.mark.parametrize("argument", ["running_mean", "running_var"])
def test_running_stats_only_read_in_evaluation_may_be_any_array(argument, bad):
    # Evaluation only reads them: a read-only buffer was once refused as if updated.
    make_bad, _ = BAD_BUFFERS[bad]
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    buffers = {"running_mean": np.array([1, 2, 3], np.float32),
               "running_var": np.array([4, 1, 0.25], np.float32)}
    expected = F.native_batch_norm(x, None, None, *buffers.values(), training=False)
    buffers[argument] = make_bad(buffers[argument])
    before = buffers[argument].copy()
    _assert_same_results(F.native_batch_norm(x, None, None, *buffers.values()), expected)
    np.testing.assert_array_equal(buffers[argument], before)


def test_read_only_running_stats_in_training_name_the_argument():
    frozen = _read_only(np.ones(3, np.float32))
    with pytest.raises(ValueError, match="^running_var: is updated in place, but the array "
                                         "is read-only$"):
        F.batch_norm(f32(4, 3), np.zeros(3, np.float32), frozen, training=True)


def _sgd_call(argument, bad, param):
    buffer = np.zeros(5, np.float32)
    if argument == "param":
        param = bad(param)
    else:
        buffer = bad(buffer)
    return lambda: F.sgd_step(param, f32(5), buffer, lr=0.1, momentum=0.9)


def _adam_call(argument, bad, param):
    state = {"param": param, "exp_avg": np.zeros(5, np.float32),
             "exp_avg_sq": np.zeros(5, np.float32)}
    state[argument] = bad(state[argument])
    return lambda: F.adam_step(state["param"], f32(5), state["exp_avg"], state["exp_avg_sq"], 1)


@pytest.mark.parametrize("bad", BAD_BUFFERS)
@pytest.mark.parametrize("argument", ["running_mean", "running_var"])
def test_bad_running_stats_buffer(argument, bad):
    make_bad, error = BAD_BUFFERS[bad]
    _raises(error, argument, _bn_call(argument, make_bad))


@pytest.mark.parametrize("bad", BAD_BUFFERS)
@pytest.mark.parametrize("optimizer, argument", [
    ("sgd", "param"), ("sgd", "momentum_buffer"),
    ("adam", "param"), ("adam", "exp_avg"), ("adam", "exp_avg_sq")])
def test_bad_optimizer_buffer(optimizer, argument, bad):
    make_bad, error = BAD_BUFFERS[bad]
    param = np.ones(5, np.float32)
    make_call = _sgd_call if optimizer == "sgd" else _adam_call
    _raises(error, argument, make_call(argument, make_bad, param))
    np.testing.assert_array_equal(param, 1.0)  # nothing was updated before the error


def test_buffer_that_is_not_an_array():
    _raises(TypeError, "param", lambda: F.sgd_step([1.0, 2.0], [0.1, 0.1], lr=0.1))


# --------------------------------------------------------------------------- vector lengths

WRONG_LENGTH = {
    "conv2d_bias": ("bias", lambda: F.conv2d(X, W, f32(5))),
    "linear_bias": ("bias", lambda: F.linear(f32(2, 5), f32(4, 5), f32(3))),
    "batch_norm_weight": ("weight", lambda: F.native_batch_norm(f32(4, 3), f32(4), None,
                                                                training=True)),
    "batch_norm_bias": ("bias", lambda: F.native_batch_norm(f32(4, 3), f32(3), f32(2),
                                                            training=True)),
    "batch_norm_running_mean": ("running_mean", lambda: F.native_batch_norm(
        f32(4, 3), None, None, np.zeros(4, np.float32), np.ones(3, np.float32), True)),
    "batch_norm_running_var": ("running_var", lambda: F.native_batch_norm(
        f32(4, 3), None, None, np.zeros(3, np.float32), np.ones(2, np.float32), False)),
    "batch_norm_backward_weight": ("weight", lambda: F.batch_norm_backward(
        f32(4, 3), f32(4, 3), f32(2), f32(3), f32(3))),
    "batch_norm_backward_save_mean": ("save_mean", lambda: F.batch_norm_backward(
        f32(4, 3), f32(4, 3), None, f32(4), f32(3))),
    "batch_norm_backward_save_invstd": ("save_invstd", lambda: F.batch_norm_backward(
        f32(4, 3), f32(4, 3), None, f32(3), f32(2))),
    "sgd_grad": ("grad", lambda: F.sgd_step(np.ones(5, np.float32), f32(4), lr=0.1)),
    "sgd_momentum_buffer": ("momentum_buffer", lambda: F.sgd_step(
        np.ones(5, np.float32), f32(5), np.zeros(4, np.float32), lr=0.1, momentum=0.9)),
    "adam_grad": ("grad", lambda: F.adam_step(np.ones(5, np.float32), f32(6),
                                              np.zeros(5, np.float32),
                                              np.zeros(5, np.float32), 1)),
    "adam_exp_avg": ("exp_avg", lambda: F.adam_step(np.ones(5, np.float32), f32(5),
                                                    np.zeros(4, np.float32),
                                                    np.zeros(5, np.float32), 1)),
    "adam_exp_avg_sq": ("exp_avg_sq", lambda: F.adam_step(np.ones(5, np.float32), f32(5),
                                                          np.zeros(5, np.float32),
                                                          np.zeros(6, np.float32), 1)),
}


@pytest.mark.parametrize("name", WRONG_LENGTH)
def test_wrong_length_parameter_vector(name):
    argument, call = WRONG_LENGTH[name]
    _raises(ValueError, argument, call)


def test_only_one_running_buffer():
    # "running_mean, running_var: give both or neither" names the missing one second.
    _raises(ValueError, "(running_mean, )?running_var", lambda: F.native_batch_norm(
        f32(4, 3), None, None, np.zeros(3, np.float32), None, True))


# --------------------------------------------------------------------------- index ranges


@pytest.mark.parametrize("target", [[0, 3], [-1, 0], [0, 1, 2]])
@pytest.mark.parametrize("function", [F.cross_entropy, F.cross_entropy_backward])
def test_target_out_of_range_or_wrong_length(function, target):
    _raises(ValueError, "target", lambda: function(f32(2, 3), np.array(target)))


@pytest.mark.parametrize("index", [-1, 4, 100])
def test_max_pool_indices_out_of_range(index):
    indices = np.zeros((1, 1, 1, 1), np.int64) + index
    _raises(ValueError, "indices",
            lambda: F.max_pool2d_backward(f32(1, 1, 1, 1), indices, (1, 1, 2, 2)))


UINT64_MAX = 2**64 - 1

UINT64_INDICES = {
    # Once reported as -1: the cast to int64 wrapped the value before the kernel saw it.
    "max_pool2d_backward": (
        ("indices: expected flat indices into an H×W plane of 4 elements, "
         f"got index {UINT64_MAX}"),
        lambda: F.max_pool2d_backward(f32(1, 1, 1, 2), np.array([[[[1, UINT64_MAX]]]],
                                                                 np.uint64), (1, 1, 2, 2))),
    "cross_entropy": (
        f"target: expected class indices in [0, 3), got class index {UINT64_MAX}",
        lambda: F.cross_entropy(f32(2, 3), np.array([0, UINT64_MAX], np.uint64))),
    "cross_entropy_backward": (
        f"target: expected class indices in [0, 3), got class index {2**63}",
        lambda: F.cross_entropy_backward(f32(2, 3), np.array([2**63, 0], np.uint64))),
}


@pytest.mark.parametrize("name", UINT64_INDICES)
def test_uint64_index_past_int64_is_reported_as_given(name):
    message, call = UINT64_INDICES[name]
    with pytest.raises(ValueError) as error:
        call()
    assert str(error.value) == message


def test_uint64_indices_in_range_give_the_int64_result():
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    out, indices = F.max_pool2d(x, 2, return_indices=True)
    np.testing.assert_array_equal(
        F.max_pool2d_backward(out, indices.astype(np.uint64), x.shape),
        F.max_pool2d_backward(out, indices, x.shape))
    target = np.array([2, 0])
    assert (F.cross_entropy(f32(2, 3), target.astype(np.uint64))
            == F.cross_entropy(f32(2, 3), target))


@pytest.mark.parametrize("seed", [UINT64_MAX, np.uint64(UINT64_MAX)])
def test_largest_seed_is_accepted(seed):
    np.testing.assert_array_equal(F.dropout(X, 0.5, seed=seed),
                                  F.dropout(X, 0.5, seed=UINT64_MAX))


def test_seed_past_uint64_is_reported_as_given():
    _raises(ValueError, f"seed: expected an int in \\[0, 2\\*\\*64 - 1\\], got {2**64}$",
            lambda: F.dropout(X, 0.5, seed=2**64))


# --------------------------------------------------------------------------- inputs untouched


def _ints(rng, *shape):
    """Small integers as float32: exact in float16, float32, float64 and int arrays."""
    return rng.integers(-4, 5, size=shape).astype(np.float32)


def _bn_train(x, weight, bias):
    channels = np.shape(x)[1]
    running_mean, running_var = np.zeros(channels, np.float32), np.ones(channels, np.float32)
    outputs = F.native_batch_norm(x, weight, bias, running_mean, running_var, True, 0.1, 1e-5)
    return (*outputs, running_mean, running_var)


def _sgd(grad):
    param = np.linspace(-1, 1, np.size(grad), dtype=np.float32)
    buffer = np.ones(np.size(grad), np.float32)
    F.sgd_step(param, grad, buffer, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    return param, buffer


def _adam(grad):
    param = np.linspace(-1, 1, np.size(grad), dtype=np.float32)
    exp_avg, exp_avg_sq = np.zeros_like(param), np.zeros_like(param)
    F.adam_step(param, grad, exp_avg, exp_avg_sq, 1, lr=0.1, weight_decay=0.1,
                decoupled_weight_decay=True)
    return param, exp_avg, exp_avg_sq


def _operations(rng):
    """name -> (call, inputs): ``call(*inputs)`` runs one op; it only reads ``inputs``."""
    x, w, b = _ints(rng, 2, 3, 7, 9), _ints(rng, 4, 3, 3, 2), _ints(rng, 4)
    conv = {"stride": (2, 1), "padding": 1, "dilation": (1, 2)}
    gy_conv = _ints(rng, *ref.conv2d(x, w, b, **conv).shape)
    _, indices = ref.max_pool2d(x, 3, 2, 1)
    gy_pool = _ints(rng, *indices.shape)
    matrix, weight, bias = _ints(rng, 5, 7), _ints(rng, 4, 7), _ints(rng, 4)
    gy_linear = _ints(rng, 5, 4)
    x_bn, gamma, beta = _ints(rng, 4, 3, 5, 5), _ints(rng, 3), _ints(rng, 3)
    gy_bn = _ints(rng, *x_bn.shape)
    mean, invstd = np.abs(_ints(rng, 3)), np.abs(_ints(rng, 3)) + 1
    target = rng.integers(0, 7, 5)
    return {
        "conv2d": (lambda x, w, b: F.conv2d(x, w, b, **conv), (x, w, b)),
        "conv2d_backward": (lambda gy, x, w: F.conv2d_backward(gy, x, w, **conv),
                            (gy_conv, x, w)),
        "max_pool2d": (lambda x: F.max_pool2d(x, 3, 2, 1, return_indices=True), (x,)),
        "max_pool2d_backward": (lambda gy: F.max_pool2d_backward(gy, indices, x.shape),
                                (gy_pool,)),
        "avg_pool2d": (lambda x: F.avg_pool2d(x, 3, 2, 1, count_include_pad=False), (x,)),
        "avg_pool2d_backward": (lambda gy: F.avg_pool2d_backward(gy, x.shape, 3, 2, 1),
                                (gy_pool,)),
        "batch_norm_train": (_bn_train, (x_bn, gamma, beta)),
        "batch_norm_eval": (
            lambda x, w, b, m, v: F.native_batch_norm(x, w, b, m, v, False, 0.1, 1e-5),
            (x_bn, gamma, beta, mean, invstd)),
        "batch_norm_backward": (
            lambda gy, x, w, m, s: F.batch_norm_backward(gy, x, w, m, s, True),
            (gy_bn, x_bn, gamma, mean, invstd)),
        "dropout": (lambda x: F.dropout(x, 0.3, seed=5), (x,)),
        "dropout2d": (lambda x: F.dropout2d(x, 0.3, seed=5), (x,)),
        "dropout_backward": (lambda gy: F.dropout_backward(gy, 0.3, 5), (x,)),
        "linear": (F.linear, (matrix, weight, bias)),
        "linear_backward": (F.linear_backward, (gy_linear, matrix, weight)),
        "relu": (F.relu, (x,)),
        "relu_backward": (F.relu_backward, (gy_pool, gy_pool)),
        "leaky_relu_backward": (F.leaky_relu_backward, (gy_pool, gy_pool)),
        "sigmoid": (F.sigmoid, (x,)),
        "tanh_backward": (F.tanh_backward, (gy_pool, gy_pool)),
        "log_softmax": (F.log_softmax, (matrix,)),
        "log_softmax_backward": (F.log_softmax_backward, (matrix, matrix - 10)),
        "cross_entropy": (lambda x: F.cross_entropy(x, target), (matrix,)),
        "cross_entropy_backward": (lambda x: F.cross_entropy_backward(x, target), (matrix,)),
        "sgd_step": (_sgd, (matrix.ravel(),)),
        "adam_step": (_adam, (matrix.ravel(),)),
    }


OPERATIONS = list(_operations(np.random.default_rng(0)))


def _assert_same_results(actual, expected):
    if isinstance(expected, tuple):
        assert isinstance(actual, tuple) and len(actual) == len(expected)
        for got, want in zip(actual, expected):
            _assert_same_results(got, want)
    elif expected is None:
        assert actual is None
    else:
        np.testing.assert_array_equal(actual, expected)
        if isinstance(expected, np.ndarray):
            assert actual.dtype == expected.dtype


@pytest.mark.parametrize("name", OPERATIONS)
def test_inputs_are_never_modified(rng, name):
    call, inputs = _operations(rng)[name]
    originals = [array.copy() for array in inputs]
    read_only = []
    for array in originals:
        frozen = array.copy()
        frozen.setflags(write=False)
        read_only.append(frozen)
    call(*read_only)
    for original, passed in zip(originals, read_only):
        np.testing.assert_array_equal(passed, original)


def _strided(array):
    wide = np.zeros(array.shape + (3,), array.dtype)
    wide[..., 1] = array
    return wide[..., 1]


def _reversed(array):
    return np.flip(np.flip(array).copy())  # negative strides, same values


VARIANTS = {
    "float64": lambda a: a.astype(np.float64),
    "float16": lambda a: a.astype(np.float16),
    "int64": lambda a: a.astype(np.int64),
    "int32": lambda a: a.astype(np.int32),
    "int8": lambda a: a.astype(np.int8),
    "fortran_order": np.asfortranarray,
    "strided": _strided,
    "negative_strides": _reversed,
    "python_list": lambda a: a.tolist(),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", OPERATIONS)
def test_any_real_dtype_and_layout_gives_the_float32_result(rng, name, variant):
    call, inputs = _operations(rng)[name]
    expected = call(*inputs)
    assert all(array.dtype == np.float32 and array.flags.c_contiguous for array in inputs)
    _assert_same_results(call(*[VARIANTS[variant](array) for array in inputs]), expected)


# --------------------------------------------------------------------------- one set of checks


def test_the_shared_checks_name_the_argument_what_it_expected_and_what_it_got():
    from bnrs import _validation as V

    def message(error, call):
        with pytest.raises(error) as info:
            call()
        return str(info.value)

    assert V.check_int(np.int64(3), "n", 1) == 3
    assert message(TypeError, lambda: V.check_int(2.5, "n", 1)) == (
        "n: expected an int >= 1, got 2.5")
    assert message(ValueError, lambda: V.check_int(0, "n", 1)) == (
        "n: expected an int >= 1, got 0")
    assert message(TypeError, lambda: V.check_int(True, "n")) == "n: expected an int, got True"
    assert V.check_bool(np.True_, "flag") is True
    assert message(TypeError, lambda: V.check_bool("no", "flag")) == (
        "flag: expected a bool, got 'no'")
    assert message(ValueError, lambda: V.check_options("x", "mode", ["b", "a"])) == (
        "mode: expected one of ['a', 'b'], got 'x'")
    assert message(TypeError, lambda: V.check_options(1, "mode", ["a"])) == (
        "mode: expected one of ['a'], got 1")
    assert message(ValueError, lambda: V.check_real(1.0, "p", 0.0, 1.0, high_open=True)) == (
        "p: expected a finite real number in [0.0, 1.0), got 1.0")
    _raises(ValueError, "^p: ", lambda: V.check_real(float("nan"), "p"))
    _raises(ValueError, "^p: ", lambda: V.check_real(float("inf"), "p", 0.0))
    _raises(TypeError, "^p: ", lambda: V.check_real("0.5", "p"))
    assert V.check_int_tuple(np.array([2, 8, 8]), "shape", (1, 3), 1) == (2, 8, 8)
    _raises(ValueError, "^shape: ", lambda: V.check_int_tuple((8, 8), "shape", (1, 3), 1))
    _raises(TypeError, "^shape: ", lambda: V.check_int_tuple("88", "shape", (2,)))
    assert V.check_int_pair(3, "stride", 1) == (3, 3)
    _raises(ValueError, "^stride: ", lambda: V.check_int_pair((1, 0), "stride", 1))
    # Plain ints and pairs of them take a shorter path; its edges give the same answers.
    assert V.check_int(5, "n", 5, 5) == 5
    _raises(ValueError, "^n: ", lambda: V.check_int(6, "n", 1, 5))
    assert V.check_int_pair((2, 3), "stride", 2) == (2, 3)
    assert V.check_int_pair((np.int64(2), 3), "stride") == (2, 3)
    _raises(TypeError, "^stride: ", lambda: V.check_int_pair((True, 1), "stride"))
    _raises(ValueError, "^stride: ", lambda: V.check_int_pair((3, 1), "stride", 2))
    # A wrong type is also a ValueError, as scikit-learn's InvalidParameterError is, so
    # code written when some of these raised ValueError still catches them.
    _raises(ValueError, "^n: ", lambda: V.check_int(2.5, "n", 1))


LAYER_AND_OPTIMIZER_ARGUMENTS = {
    "linear_in_features_float": (TypeError, "in_features", lambda: nn.Linear(2.5, 3)),
    "linear_out_features_zero": (ValueError, "out_features", lambda: nn.Linear(2, 0)),
    "conv_stride_float": (TypeError, "stride", lambda: nn.Conv2d(3, 4, 3, stride=1.5)),
    "conv_stride_zero": (ValueError, "stride", lambda: nn.Conv2d(3, 4, 3, stride=(1, 0))),
    "conv_padding_negative": (ValueError, "padding", lambda: nn.Conv2d(3, 4, 3, padding=-1)),
    "batch_norm_eps_inf": (ValueError, "eps", lambda: nn.BatchNorm2d(4, eps=float("inf"))),
    "batch_norm_momentum": (ValueError, "momentum", lambda: nn.BatchNorm1d(4, momentum=2.0)),
    "dropout_p_text": (TypeError, r"\bp\b", lambda: nn.Dropout("half")),
    "leaky_relu_slope_nan": (ValueError, "negative_slope",
                             lambda: nn.LeakyReLU(float("nan"))),
    "flatten_start_dim_float": (TypeError, "start_dim", lambda: nn.Flatten(1.0)),
    "sgd_lr_text": (TypeError, "Invalid learning rate",
                    lambda: optim.SGD(nn.Linear(2, 2).parameters(), lr="0.1")),
    "adam_lr_bool": (TypeError, "Invalid learning rate",
                     lambda: optim.Adam(nn.Linear(2, 2).parameters(), lr=True)),
    "adam_beta_one": (ValueError, "Invalid beta parameter at index 1",
                      lambda: optim.Adam(nn.Linear(2, 2).parameters(), betas=(0.9, 1.0))),
}


@pytest.mark.parametrize("name", LAYER_AND_OPTIMIZER_ARGUMENTS)
def test_layer_and_optimizer_arguments(name):
    error, argument, call = LAYER_AND_OPTIMIZER_ARGUMENTS[name]
    _raises(error, argument, call)
