"""Property-based fuzzing of bnrs.nn (every layer, Sequential/from_spec), bnrs.optim and
bnrs.CNNClassifier (the functional ops: test_fuzz.py; the machinery: fuzzing.py).

Valid cases build a layer from random arguments, run forward and backward on random
input in any dtype and layout, and compare output, input gradient, parameter gradients
and running statistics with the plain-NumPy references; the input and the output
gradient are unchanged afterwards. Optimizers take random steps that must match the
reference update rules; the estimator fits random data and must predict valid labels and
probabilities, reproducibly, without touching X or y.

Invalid cases break one constructor argument, the input, the output gradient, the call
order or a hyper-parameter: ValueError or TypeError naming it (RuntimeError for backward
without forward, as in PyTorch), and no array argument changes.
"""

from __future__ import annotations

import math

import bnrs
import longrun
import numpy as np
import pytest
import reference as ref
from bnrs import nn, optim
from fuzzing import (
    FUZZ,
    HUGE,
    NON_FINITE,
    NOT_A_NUMBER,
    Spec,
    adam_step_bounds,
    any_layout,
    as_float32_scalar,
    as_seen,
    assert_matches,
    assert_rejected,
    assert_within,
    floats,
    identical,
    magnitude,
    non_real,
    snapshot,
    value,
)
from hypothesis import given
from hypothesis import strategies as st

pytestmark = pytest.mark.fuzz

SPECS: dict[str, Spec] = {}

# --------------------------------------------------------------------------- helpers


def _run_layer(args):
    """Build ``args["make"](args)``, forward ``input``, backward ``grad_output``."""
    layer = args["make"](args)
    if not args.get("training", True):
        layer.eval()
    output = layer(args["input"])
    grad_input = layer.backward(args["grad_output"], input_grad=args["input_grad"])
    grads = {name: param.grad.copy() for name, param in layer.named_parameters()}
    sample_shape = layer.output_shape(np.shape(args["input"])[1:])
    return {"layer": layer, "output": output, "grad_input": grad_input, "grads": grads,
            "sample_shape": sample_shape}


def _backward_without_forward(draw, args):
    args["call_order"] = "backward first"
    return RuntimeError, "forward"


def _call(args):
    if args.get("call_order") == "backward first":
        layer = args["make"](args)
        return layer.backward(args["grad_output"])
    return _run_layer(args)


def _grad_output_shape(draw, args):
    """An output gradient whose shape is not the output's."""
    shape = np.shape(args["grad_output"])
    options = [shape + (2,), shape[:-1] + (shape[-1] + 1,), (shape[0] + 1,) + shape[1:]]
    args["grad_output"] = floats(draw, draw(st.sampled_from(options), label="grad shape"))
    return ValueError, "grad_output"


def _counts(arg):
    """A bad count (channels, features): not positive, not an int, beyond memory or int64
    (refused before the weight is allocated, naming the count)."""
    return (value(arg, [0, -1], ValueError),
            value(arg, [1.5, "3", None, True], (TypeError, ValueError)),
            value(arg, [2**64, HUGE * HUGE], (ValueError, MemoryError), arg))


def _pairs(arg, minimum, optional=False):
    """Bad window geometry: below ``minimum``, beyond int64, not ints (None too, unless
    the argument is ``optional``)."""
    not_ints = [1.5, "2", (1, 2, 3), True, (1.0, 1)] + ([] if optional else [None])
    return (value(arg, [minimum - 1, (minimum, minimum - 1), -(2**40)], ValueError),
            value(arg, [2**64, (1, 2**64)], ValueError), value(arg, not_ints, TypeError))


# --------------------------------------------------------------------------- Conv2d


def _draw_conv2d(draw):
    kernel = (draw(st.integers(1, 4), label="kh"), draw(st.integers(1, 4), label="kw"))
    stride = (draw(st.integers(1, 3), label="sh"), draw(st.integers(1, 3), label="sw"))
    dilation = (draw(st.integers(1, 2), label="dh"), draw(st.integers(1, 2), label="dw"))
    padding = (draw(st.integers(0, 2), label="ph"), draw(st.integers(0, 2), label="pw"))
    size = tuple(draw(st.integers(max(1, dilation[a] * (kernel[a] - 1) + 1 - 2 * padding[a]),
                                  12), label="size") for a in range(2))
    n, c_in, c_out = (draw(st.integers(1, 5), label="n"), draw(st.integers(1, 3), label="ci"),
                      draw(st.integers(1, 4), label="co"))
    out = tuple(ref.conv2d_output_size(size[a], kernel[a], stride[a], padding[a], dilation[a])
                for a in range(2))
    return {"make": lambda a: nn.Conv2d(a["in_channels"], a["out_channels"],
                                        a["kernel_size"], a["stride"], a["padding"],
                                        a["dilation"], a["bias"], random_state=a["seed"]),
            "in_channels": c_in, "out_channels": c_out, "kernel_size": kernel,
            "stride": stride, "padding": padding, "dilation": dilation,
            "bias": draw(st.booleans(), label="bias"), "seed": draw(st.integers(0, 99)),
            "input": floats(draw, (n, c_in) + size), "grad_output": floats(draw, (n, c_out) + out),
            "input_grad": draw(st.booleans(), label="input_grad")}


def _check_conv2d(result, before):
    layer = result["layer"]
    x, gy = as_seen(before["input"]), as_seen(before["grad_output"])
    w = layer.weight.data.astype(np.float64)
    b = None if layer.bias is None else layer.bias.data.astype(np.float64)
    geometry = {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation}
    scale = magnitude(x) * magnitude(gy)
    assert_matches(result["output"], ref.conv2d(x, w, b, **geometry), name="output",
                   terms=w[0].size, scale=magnitude(x))
    grad_input, grad_weight, grad_bias = ref.conv2d_backward(gy, x, w, **geometry)
    if before["input_grad"]:
        assert_matches(result["grad_input"], grad_input, name="grad_input",
                       terms=w[:, 0].size, scale=magnitude(gy))
    else:
        assert result["grad_input"] is None
    assert_matches(result["grads"]["weight"], grad_weight, name="weight.grad",
                   terms=gy[:, 0].size, scale=scale)
    if b is not None:
        assert_matches(result["grads"]["bias"], grad_bias, name="bias.grad",
                       terms=gy[:, 0].size, scale=magnitude(gy))
    assert result["sample_shape"] == result["output"].shape[1:]


def _channels_mismatch(draw, args):
    shape = list(np.shape(args["input"]))
    shape[1] += draw(st.integers(1, 3), label="extra channels")
    args["input"] = floats(draw, tuple(shape))
    return ValueError, "input"


def _input_ndim(names, accepted=()):
    """One axis fewer or more, or (for layers taking several) a number of axes not
    ``accepted``."""
    def mutate(draw, args):
        shape = np.shape(args["input"])
        options = [s for s in (shape[1:], shape + (2,)) if len(s) not in accepted]
        options += [(2,) * d for d in range(1, 6) if accepted and d not in accepted]
        args["input"] = floats(draw, draw(st.sampled_from(options), label="ndim"))
        return ValueError, names
    return mutate


def _input_too_small(draw, args):
    """An input smaller than the (dilated) kernel after padding."""
    shape = list(np.shape(args["input"]))
    shape[2] = 1
    args["kernel_size"] = (2 * args["padding"][0] + 2, args["kernel_size"][1])
    args["input"] = floats(draw, tuple(shape))
    return ValueError, "input"


def _common_forward_mutations(names):
    return (non_real("input"), _input_ndim(names), _grad_output_shape,
            _backward_without_forward)


SPECS["Conv2d"] = Spec(
    call=_call, draw=_draw_conv2d, check=_check_conv2d, layouts=("input", "grad_output"),
    mutations=(*_counts("in_channels"), *_counts("out_channels"),
               *_pairs("kernel_size", 1), *_pairs("stride", 1), *_pairs("padding", 0),
               *_pairs("dilation", 1), _channels_mismatch, _input_too_small,
               *_common_forward_mutations("input")))


# --------------------------------------------------------------------------- Linear


def _draw_linear(draw):
    features, units = draw(st.integers(1, 17), label="in"), draw(st.integers(1, 17),
                                                                label="out")
    lead = tuple(draw(st.integers(1, 4), label="lead") for _ in range(draw(
        st.integers(1, 3), label="lead axes")))
    return {"make": lambda a: nn.Linear(a["in_features"], a["out_features"], a["bias"],
                                        random_state=a["seed"]),
            "in_features": features, "out_features": units,
            "bias": draw(st.booleans(), label="bias"), "seed": draw(st.integers(0, 99)),
            "input": floats(draw, lead + (features,)),
            "grad_output": floats(draw, lead + (units,)),
            "input_grad": draw(st.booleans(), label="input_grad")}


def _check_linear(result, before):
    layer = result["layer"]
    x, gy = as_seen(before["input"]), as_seen(before["grad_output"])
    rows, grad_rows = x.reshape(-1, x.shape[-1]), gy.reshape(-1, gy.shape[-1])
    w = layer.weight.data.astype(np.float64)
    b = None if layer.bias is None else layer.bias.data.astype(np.float64)
    assert_matches(result["output"], ref.linear(rows, w, b).reshape(gy.shape), name="output",
                   terms=w.shape[1], scale=magnitude(x))
    grad_input, grad_weight, grad_bias = ref.linear_backward(grad_rows, rows, w)
    if before["input_grad"]:
        assert_matches(result["grad_input"], grad_input.reshape(x.shape), name="grad_input",
                       terms=w.shape[0], scale=magnitude(gy))
    assert_matches(result["grads"]["weight"], grad_weight, name="weight.grad",
                   terms=len(rows), scale=magnitude(x) * magnitude(gy))
    if b is not None:
        assert_matches(result["grads"]["bias"], grad_bias, name="bias.grad", terms=len(rows),
                       scale=magnitude(gy))
    assert result["sample_shape"] == result["output"].shape[1:]


def _features_mismatch(draw, args):
    shape = np.shape(args["input"])
    args["input"] = floats(draw, shape[:-1] + (shape[-1] + draw(st.integers(1, 3)),))
    return ValueError, "input"


SPECS["Linear"] = Spec(
    call=_call, draw=_draw_linear, check=_check_linear, layouts=("input", "grad_output"),
    mutations=(*_counts("in_features"), *_counts("out_features"), _features_mismatch,
               non_real("input"), _grad_output_shape, _backward_without_forward,
               value("input", [np.float32(1.0), 3.0], ValueError, "input")))


# --------------------------------------------------------------------------- pooling


def _draw_pool(kind):
    def draw_args(draw):
        kernel = (draw(st.integers(1, 4), label="kh"), draw(st.integers(1, 4), label="kw"))
        stride = (draw(st.integers(1, 3), label="sh"), draw(st.integers(1, 3), label="sw"))
        padding = (draw(st.integers(0, kernel[0] // 2), label="ph"),
                   draw(st.integers(0, kernel[1] // 2), label="pw"))
        size = tuple(draw(st.integers(max(1, kernel[a] - 2 * padding[a]), 12), label="size")
                     for a in range(2))
        n, c = draw(st.integers(1, 4), label="n"), draw(st.integers(1, 4), label="c")
        out = tuple(ref.pool_output_size(size[a], kernel[a], stride[a], padding[a])
                    for a in range(2))
        extra = {} if kind == "max" else {
            "count_include_pad": draw(st.booleans(), label="count_include_pad")}
        make = (lambda a: nn.MaxPool2d(a["kernel_size"], a["stride"], a["padding"])) if (
            kind == "max") else (lambda a: nn.AvgPool2d(a["kernel_size"], a["stride"],
                                                        a["padding"], a["count_include_pad"]))
        return {"make": make, "kernel_size": kernel, "stride": stride, "padding": padding,
                "input": floats(draw, (n, c) + size, special=True),
                "grad_output": floats(draw, (n, c) + out),
                "input_grad": draw(st.booleans(), label="input_grad"), **extra}
    return draw_args


def _check_pool(kind):
    def check(result, before):
        x, gy = as_seen(before["input"]), as_seen(before["grad_output"])
        window = (before["kernel_size"], before["stride"], before["padding"])
        if kind == "max":
            expected, indices = ref.max_pool2d(x, *window)
            expected_grad = ref.max_pool2d_backward(gy, indices, x.shape)
        else:
            expected = ref.avg_pool2d(x, *window, before["count_include_pad"])
            expected_grad = ref.avg_pool2d_backward(gy, x.shape, *window,
                                                    before["count_include_pad"])
        assert_matches(result["output"], expected, name="output", terms=16,
                       scale=magnitude(x))
        if before["input_grad"]:
            assert_matches(result["grad_input"], expected_grad, name="grad_input", terms=16,
                           scale=magnitude(gy))
        else:
            assert result["grad_input"] is None
        assert result["sample_shape"] == result["output"].shape[1:]
    return check


def _pool_padding_over_half(draw, args):
    args["padding"] = (args["kernel_size"][0] // 2 + 1, 0)
    return ValueError, "padding"


POOL_MUTATIONS = (*_pairs("kernel_size", 1), *_pairs("stride", 1, optional=True),
                  *_pairs("padding", 0),
                  _pool_padding_over_half,
                  *_common_forward_mutations("input"))

SPECS["MaxPool2d"] = Spec(call=_call, draw=_draw_pool("max"), check=_check_pool("max"),
                          layouts=("input", "grad_output"), mutations=POOL_MUTATIONS)
SPECS["AvgPool2d"] = Spec(call=_call, draw=_draw_pool("avg"), check=_check_pool("avg"),
                          layouts=("input", "grad_output"), mutations=POOL_MUTATIONS)


def _draw_global_pool(draw):
    shape = tuple(draw(st.integers(1, 5), label="size") for _ in range(4))
    return {"make": lambda a: nn.AdaptiveAvgPool2d(a["output_size"]), "output_size": 1,
            "input": floats(draw, shape), "grad_output": floats(draw, shape[:2] + (1, 1)),
            "input_grad": draw(st.booleans(), label="input_grad")}


def _check_global_pool(result, before):
    x, gy = as_seen(before["input"]), as_seen(before["grad_output"])
    assert_matches(result["output"], ref.adaptive_avg_pool2d(x), name="output",
                   terms=x.shape[2] * x.shape[3], scale=magnitude(x))
    if before["input_grad"]:
        assert_matches(result["grad_input"], ref.adaptive_avg_pool2d_backward(gy, x.shape),
                       name="grad_input", scale=magnitude(gy))
    else:
        assert result["grad_input"] is None
    assert result["sample_shape"] == result["output"].shape[1:]


SPECS["AdaptiveAvgPool2d"] = Spec(
    call=_call, draw=_draw_global_pool, check=_check_global_pool,
    layouts=("input", "grad_output"),
    mutations=(value("output_size", [2, (2, 2), (1, 2), 0, None], ValueError),
               *_common_forward_mutations("input")))


# --------------------------------------------------------------------------- batch norm


def _draw_batch_norm(dims):
    def draw_args(draw):
        ndim = draw(st.sampled_from(dims), label="ndim")
        channels = draw(st.integers(1, 5), label="channels")
        shape = (draw(st.integers(2, 5), label="n"), channels) + tuple(
            draw(st.integers(1, 5), label="size") for _ in range(ndim - 2))
        layer_class = nn.BatchNorm2d if dims == (4,) else nn.BatchNorm1d
        return {"make": lambda a: layer_class(a["num_features"], a["eps"], a["momentum"],
                                              a["affine"], a["track_running_stats"]),
                "num_features": channels,
                "eps": draw(st.sampled_from([1e-5, 1e-3, 0.5]), label="eps"),
                "momentum": draw(st.sampled_from([0.1, 0.0, 1.0, None]), label="momentum"),
                "affine": draw(st.booleans(), label="affine"),
                "track_running_stats": draw(st.booleans(), label="track"),
                "training": draw(st.booleans(), label="training"),
                "input": floats(draw, shape), "grad_output": floats(draw, shape),
                "input_grad": True}
    return draw_args


def _check_batch_norm(result, before):
    layer = result["layer"]
    x, gy = as_seen(before["input"]), as_seen(before["grad_output"])
    tracked = before["track_running_stats"]
    use_batch = before["training"] or not tracked
    channels = x.shape[1]
    mean0, var0 = (np.zeros(channels), np.ones(channels)) if tracked else (None, None)
    momentum = 1.0 if before["momentum"] is None else before["momentum"]
    y, mean, invstd, new_mean, new_var = ref.batch_norm(
        x, None, None, mean0, var0, use_batch, momentum, before["eps"])
    scale = magnitude(x) * float(np.max(invstd))
    terms = x.size
    assert_matches(result["output"], y, name="output", terms=terms, scale=scale)
    grad_input, grad_weight, grad_bias = ref.batch_norm_backward(
        gy, x, np.ones(channels) if before["affine"] else None, mean, invstd, use_batch)
    backward_scale = magnitude(gy) * float(np.max(invstd)) * (1 + scale) ** 2
    assert_matches(result["grad_input"], grad_input, name="grad_input", terms=terms,
                   scale=backward_scale)
    if before["affine"]:
        assert_matches(result["grads"]["weight"], grad_weight, name="weight.grad",
                       terms=terms, scale=backward_scale * magnitude(x))
        assert_matches(result["grads"]["bias"], grad_bias, name="bias.grad", terms=terms,
                       scale=magnitude(gy))
    if tracked:
        expected_mean = new_mean if use_batch else mean0
        expected_var = new_var if use_batch else var0
        assert_matches(layer.running_mean, expected_mean, name="running_mean", terms=terms,
                       scale=magnitude(x) ** 2)
        assert_matches(layer.running_var, expected_var, name="running_var", terms=terms,
                       scale=magnitude(x) ** 2)
        assert int(layer.num_batches_tracked) == int(use_batch)
    else:
        assert layer.running_mean is None and layer.num_batches_tracked is None


def _single_sample(draw, args):
    args["input"] = floats(draw, (1,) + np.shape(args["input"])[1:])
    args["training"] = True
    args["track_running_stats"] = True
    if len(np.shape(args["input"])) == 4:
        args["input"] = floats(draw, (1, args["num_features"], 1, 1))
    elif len(np.shape(args["input"])) == 3:
        args["input"] = floats(draw, (1, args["num_features"], 1))
    return ValueError, "input"


def _bn_channels(names):
    def mutate(draw, args):
        shape = list(np.shape(args["input"]))
        shape[1] += draw(st.integers(1, 3), label="extra")
        args["input"] = floats(draw, tuple(shape))
        return ValueError, names
    return mutate


BN_MUTATIONS = (*_counts("num_features"),
                value("eps", [0.0, -1e-5] + NON_FINITE, ValueError),
                value("eps", NOT_A_NUMBER, TypeError),
                value("momentum", [1.5, -0.1] + NON_FINITE, ValueError),
                value("momentum", ["x", [0.1], {}], TypeError),
                _single_sample, non_real("input"), _grad_output_shape,
                _backward_without_forward)

SPECS["BatchNorm1d"] = Spec(
    call=_call, draw=_draw_batch_norm((2, 3)), check=_check_batch_norm,
    layouts=("input", "grad_output"),
    mutations=BN_MUTATIONS + (_bn_channels("BatchNorm1d"),
                              _input_ndim("input", accepted=(2, 3))))
SPECS["BatchNorm2d"] = Spec(
    call=_call, draw=_draw_batch_norm((4,)), check=_check_batch_norm,
    layouts=("input", "grad_output"),
    mutations=BN_MUTATIONS + (_bn_channels("BatchNorm2d"),
                              _input_ndim("input")))


def _draw_renorm(dims):
    def draw_args(draw):
        args = _draw_batch_norm(dims)(draw)
        plain = draw(st.booleans(), label="r_max=1, d_max=0")
        layer_class = nn.BatchRenorm2d if dims == (4,) else nn.BatchRenorm1d
        args.update(
            make=lambda a: layer_class(a["num_features"], a["eps"], a["momentum"], a["affine"],
                                       a["r_max"], a["d_max"]),
            momentum=draw(st.sampled_from([0.01, 0.5, 1.0]), label="momentum"),
            r_max=1.0 if plain else draw(st.sampled_from([1.5, 3.0]), label="r_max"),
            d_max=0.0 if plain else draw(st.sampled_from([0.5, 5.0]), label="d_max"),
            track_running_stats=True, warm_up=draw(st.booleans(), label="warm up"))
        args["warm_up_batch"] = args["input"] * 2 + 1
        return args
    return draw_args


def _call_renorm(args):
    if args.get("call_order") == "backward first":
        return _call(args)
    layer = args["make"](args)
    if args["warm_up"]:  # running statistics from earlier batches, so r and d act
        layer(args["warm_up_batch"])
        layer.clear_saved()
    if not args["training"]:
        layer.eval()
    output = layer(args["input"])
    grad_input = layer.backward(args["grad_output"])
    return {"layer": layer, "output": output, "grad_input": grad_input,
            "grads": {name: p.grad.copy() for name, p in layer.named_parameters()}}


def _check_renorm(result, before):
    x, gy = as_seen(before["input"]), as_seen(before["grad_output"])
    for name in ("output", "grad_input"):
        assert result[name].dtype == np.float32 and result[name].shape == x.shape, name
        assert np.isfinite(result[name]).all(), name
    layer = result["layer"]
    assert np.isfinite(layer.running_mean).all() and (layer.running_var >= 0).all()
    channels = x.shape[1]
    # Fresh parameters (weight 1, bias 0) and running statistics (0, 1), then the warm-up
    # batch (when drawn) through the reference too.
    weight, bias = (np.ones(channels), np.zeros(channels)) if before["affine"] else (None, None)
    running = (np.zeros(channels), np.ones(channels))
    hyper = {"momentum": before["momentum"], "eps": before["eps"],
             "r_max": before["r_max"], "d_max": before["d_max"]}
    seen = 0
    if before["warm_up"]:
        running = ref.batch_renorm(as_seen(before["warm_up_batch"]), weight, bias, *running,
                                   seen, **hyper)[3:]
        seen = 1
    if before["training"]:
        y, r, d, new_mean, new_var = ref.batch_renorm(x, weight, bias, *running, seen,
                                                      **hyper)
        grad_input, grad_weight, grad_bias = ref.batch_renorm_backward(
            gy, x, weight, r, d, before["eps"])
        invstd = 1.0 / np.sqrt(x.var(axis=ref.stat_axes(x.ndim)) + before["eps"])
        gain = float(np.max(invstd * r))
    else:
        y, mean, invstd, new_mean, new_var = ref.batch_norm(x, weight, bias, *running, False,
                                                            before["momentum"], before["eps"])
        grad_input, grad_weight, grad_bias = ref.batch_norm_backward(gy, x, weight, mean,
                                                                     invstd, False)
        gain = float(np.max(invstd))
    terms = x.size
    # Training: |y| <= |x_hat| r + d; evaluation: (x - running_mean) * invstd.
    scale = (magnitude(x) * gain + before["d_max"] if before["training"]
             else (magnitude(x) + magnitude(*running)) * gain)
    assert_matches(result["output"], y, name="output", terms=terms, scale=scale)
    backward_scale = magnitude(gy) * gain * (1 + scale) ** 2
    assert_matches(result["grad_input"], grad_input, name="grad_input", terms=terms,
                   scale=backward_scale)
    if before["affine"]:
        assert_matches(result["grads"]["weight"], grad_weight, name="weight.grad",
                       terms=terms, scale=magnitude(gy) * (1 + scale))
        assert_matches(result["grads"]["bias"], grad_bias, name="bias.grad", terms=terms,
                       scale=magnitude(gy))
    stats_scale = (magnitude(x) + magnitude(before["warm_up_batch"])) ** 2
    assert_matches(layer.running_mean, new_mean, name="running_mean", terms=terms,
                   scale=stats_scale)
    assert_matches(layer.running_var, new_var, name="running_var", terms=terms,
                   scale=stats_scale)


RENORM_MUTATIONS = (*_counts("num_features"),
                    value("r_max", [0.5, -1.0, math.nan], ValueError),
                    value("d_max", [-0.1, math.nan], ValueError),
                    value("momentum", [0.0, 1.5, -0.1, math.nan, None], ValueError),
                    value("eps", [0.0, -1.0] + NON_FINITE, ValueError),
                    _single_sample, non_real("input"), _grad_output_shape,
                    _backward_without_forward)

SPECS["BatchRenorm1d"] = Spec(
    call=_call_renorm, draw=_draw_renorm((2, 3)), check=_check_renorm,
    layouts=("input", "grad_output"),
    mutations=RENORM_MUTATIONS + (_bn_channels("BatchRenorm1d"),
                                  _input_ndim("input", accepted=(2, 3))))
SPECS["BatchRenorm2d"] = Spec(
    call=_call_renorm, draw=_draw_renorm((4,)), check=_check_renorm,
    layouts=("input", "grad_output"),
    mutations=RENORM_MUTATIONS + (_bn_channels("BatchRenorm2d"),
                                  _input_ndim("input")))


# --------------------------------------------------------------------------- per-sample norms


MAKE_NORM = {
    "GroupNorm": lambda a: nn.GroupNorm(a["num_groups"], a["num_channels"], a["eps"],
                                        a["affine"]),
    "LayerNorm": lambda a: nn.LayerNorm(a["normalized_shape"], a["eps"], a["affine"]),
    "InstanceNorm2d": lambda a: nn.InstanceNorm2d(a["num_features"], a["eps"],
                                                  affine=a["affine"]),
}


def _draw_per_sample_norm(kind):
    def draw_args(draw):
        groups = draw(st.integers(1, 3), label="groups")
        channels = groups * draw(st.integers(1, 3), label="channels per group")
        n = draw(st.integers(1, 4), label="n")
        if kind == "GroupNorm":
            sizes = draw(st.integers(0, 2), label="spatial dims")
            shape = (n, channels) + tuple(draw(st.integers(1, 5), label="size")
                                          for _ in range(sizes))
        elif kind == "LayerNorm":
            shape = (n,) + tuple(draw(st.integers(1, 5), label="size")
                                 for _ in range(draw(st.integers(1, 3), label="ndim")))
        else:
            shape = (n, channels, draw(st.integers(2, 5), label="h"),
                     draw(st.integers(1, 5), label="w"))
        k = draw(st.integers(1, len(shape) - 1), label="normalised dims")
        return {"make": MAKE_NORM[kind], "kind": kind, "num_groups": groups,
                "num_channels": channels, "num_features": channels,
                "normalized_shape": shape[len(shape) - k:],
                "eps": draw(st.sampled_from([1e-5, 1e-3, 0.5]), label="eps"),
                "affine": draw(st.booleans(), label="affine"),
                "training": draw(st.booleans(), label="training"),
                "input": floats(draw, shape), "grad_output": floats(draw, shape),
                "input_grad": True}
    return draw_args


def _check_per_sample_norm(result, before):
    """Fresh parameters (weight 1, bias 0): the references with those, in either mode."""
    x, gy, kind = as_seen(before["input"]), as_seen(before["grad_output"]), before["kind"]
    if kind == "LayerNorm":
        normalized = tuple(before["normalized_shape"])
        ones = np.ones(normalized) if before["affine"] else None
        y, mean, rstd = ref.layer_norm(x, normalized, ones, None, before["eps"])
        grads = ref.layer_norm_backward(gy, x, normalized, ones, mean, rstd)
        terms = int(np.prod(normalized))
    else:
        groups = before["num_groups"] if kind == "GroupNorm" else before["num_channels"]
        ones = np.ones(x.shape[1]) if before["affine"] else None
        y, mean, rstd = ref.group_norm(x, groups, ones, None, before["eps"])
        grads = ref.group_norm_backward(gy, x, groups, ones, mean, rstd)
        terms = x.size // x.shape[0] // groups
    top = float(np.max(rstd))
    assert_matches(result["output"], y, name="output", terms=terms, scale=magnitude(x) * top)
    backward_scale = magnitude(gy) * top * (1 + magnitude(x) * top) ** 2
    assert_matches(result["grad_input"], grads[0], name="grad_input", terms=terms,
                   scale=backward_scale)
    if before["affine"]:
        assert_matches(result["grads"]["weight"], grads[1], name="weight.grad",
                       terms=x.size, scale=backward_scale * magnitude(x))
        assert_matches(result["grads"]["bias"], grads[2], name="bias.grad", terms=x.size,
                       scale=magnitude(gy))
    else:
        assert result["grads"] == {}
    assert result["sample_shape"] == x.shape[1:]


def _norm_channels(names):
    def mutate(draw, args):
        shape = list(np.shape(args["input"]))
        shape[-1 if args["kind"] == "LayerNorm" else 1] += draw(st.integers(1, 3), label="+")
        args["input"] = floats(draw, tuple(shape))
        return ValueError, names
    return mutate


def _norm_counts(arg, kind):
    """As :func:`_counts`; without affine parameters nothing is allocated, so a huge count
    builds (as in PyTorch) and the input is refused by the layer (named by its repr)."""
    return (*_counts(arg)[:2], value(arg, [2**64, HUGE * HUGE], (ValueError, MemoryError),
                                     f"{arg}|{kind}"))


NORM_MUTATIONS = (value("eps", [0.0, -1e-5] + NON_FINITE, ValueError),
                  value("eps", NOT_A_NUMBER, TypeError), non_real("input"),
                  _grad_output_shape, _backward_without_forward)

SPECS["GroupNorm"] = Spec(
    call=_call, draw=_draw_per_sample_norm("GroupNorm"), check=_check_per_sample_norm,
    layouts=("input", "grad_output"),
    mutations=NORM_MUTATIONS + (*_norm_counts("num_channels", "GroupNorm"),
                                _norm_channels("GroupNorm"),
                                value("num_groups", [0, -1, 1.5, None], (ValueError, TypeError)),
                                _input_ndim("GroupNorm|input", accepted=range(2, 32))))
SPECS["LayerNorm"] = Spec(
    call=_call, draw=_draw_per_sample_norm("LayerNorm"), check=_check_per_sample_norm,
    layouts=("input", "grad_output"),
    mutations=NORM_MUTATIONS + (_norm_channels("LayerNorm"),
                                value("normalized_shape", [(0,), (-1, 2), ()], ValueError),
                                value("normalized_shape", ["x", None, (1.5,)], TypeError)))
SPECS["InstanceNorm2d"] = Spec(
    call=_call, draw=_draw_per_sample_norm("InstanceNorm2d"), check=_check_per_sample_norm,
    layouts=("input", "grad_output"),
    mutations=NORM_MUTATIONS + (*_norm_counts("num_features", "InstanceNorm2d"),
                                _norm_channels("InstanceNorm2d"),
                                _input_ndim("InstanceNorm2d|input")))


# --------------------------------------------------------------------------- dropout


def _draw_dropout(layer_class, dims):
    def draw_args(draw):
        shape = tuple(draw(st.integers(1, 6), label="size") for _ in range(
            draw(st.sampled_from(dims), label="ndim")))
        return {"make": lambda a: layer_class(a["p"], random_state=a["seed"]),
                "p": draw(st.sampled_from([0.0, 0.2, 0.5, 0.9, 1.0]), label="p"),
                "seed": draw(st.integers(0, 2**64 - 1), label="seed"),
                "training": draw(st.booleans(), label="training"),
                "input": floats(draw, shape), "grad_output": floats(draw, shape),
                "input_grad": True}
    return draw_args


def _check_dropout(maps: bool):
    def check(result, before):
        x, gy = as_seen(before["input"]), as_seen(before["grad_output"])
        p = before["p"]
        if not before["training"] or p == 0.0:
            assert_matches(result["output"], x, name="output")
            assert_matches(result["grad_input"], gy, name="grad_input")
            return
        # The scaled mask, read back through backward: 0 or 1/(1-p) everywhere.
        mask = as_seen(result["grad_input"]) / np.where(gy == 0, 1.0, gy)
        mask = np.where(gy == 0, np.nan, mask)
        kept = 0.0 if p == 1.0 else float(np.float32(1.0) / np.float32(1.0 - p))
        known = ~np.isnan(mask)
        assert np.all(np.isclose(mask[known], 0.0) | np.isclose(mask[known], kept)), "mask"
        if maps:  # one decision per (n, c) feature map
            per_map = np.nanmax(np.where(known, mask, -1.0), axis=(2, 3), keepdims=True)
            assert np.all(~known | np.isclose(mask, per_map)), "Dropout2d: a map is split"
        same_place = known & (x != 0)
        expected = np.where(np.isclose(mask, 0.0), 0.0, x * kept)
        assert_matches(np.where(same_place, as_seen(result["output"]), 0.0),
                       np.where(same_place, expected, 0.0), name="output", dtype=None,
                       scale=magnitude(x) * max(kept, 1.0))
    return check


DROPOUT_MUTATIONS = (value("p", [1.5, -0.1] + NON_FINITE, ValueError),
                     value("p", ["x", None, [0.5]], TypeError),
                     value("seed", [-1, 1.5, "1"], (ValueError, TypeError), "random_state"),
                     non_real("input"), _grad_output_shape, _backward_without_forward)

SPECS["Dropout"] = Spec(call=_call, draw=_draw_dropout(nn.Dropout, (1, 2, 3, 4)),
                        check=_check_dropout(maps=False), layouts=("input", "grad_output"),
                        mutations=DROPOUT_MUTATIONS)
SPECS["Dropout2d"] = Spec(call=_call, draw=_draw_dropout(nn.Dropout2d, (4,)),
                          check=_check_dropout(maps=True), layouts=("input", "grad_output"),
                          mutations=DROPOUT_MUTATIONS + (
                              _input_ndim("input"),))


# --------------------------------------------------------------------------- activations


def _draw_activation(layer_class, slope=False):
    def draw_args(draw):
        shape = tuple(draw(st.integers(1, 6), label="size") for _ in range(
            draw(st.integers(1, 4), label="ndim")))
        args = {"make": (lambda a: layer_class(a["negative_slope"])) if slope else (
            lambda a: layer_class()),
            "input": floats(draw, shape, special=True), "grad_output": floats(draw, shape),
            "input_grad": True}
        if slope:
            args["negative_slope"] = draw(st.sampled_from([0.01, 0.0, 0.3, -1.0]),
                                          label="negative_slope")
        return args
    return draw_args


def _check_activation(kind):
    def check(result, before):
        x, gy = as_seen(before["input"]), as_seen(before["grad_output"])
        slope = before.get("negative_slope", 0.01)
        forward = {"relu": ref.relu, "sigmoid": ref.sigmoid, "tanh": ref.tanh,
                   "leaky_relu": lambda v: ref.leaky_relu(v, slope)}[kind]
        expected = np.where(np.isnan(x), np.nan, forward(x))
        assert_matches(result["output"], expected, name="output",
                       scale=magnitude(x) * max(1.0, abs(slope)))
        if kind in ("sigmoid", "tanh"):
            backward = ref.sigmoid_backward if kind == "sigmoid" else ref.tanh_backward
            expected_grad = backward(gy, as_seen(result["output"]))
        elif kind == "relu":
            expected_grad = ref.relu_backward(gy, x)
        else:
            expected_grad = ref.leaky_relu_backward(gy, x, slope)
        assert_matches(result["grad_input"], expected_grad, name="grad_input",
                       scale=magnitude(gy) * max(1.0, abs(slope)))
    return check


for _name, _class, _kind, _slope in (("ReLU", nn.ReLU, "relu", False),
                                     ("LeakyReLU", nn.LeakyReLU, "leaky_relu", True),
                                     ("Sigmoid", nn.Sigmoid, "sigmoid", False),
                                     ("Tanh", nn.Tanh, "tanh", False)):
    SPECS[_name] = Spec(
        call=_call, draw=_draw_activation(_class, _slope), check=_check_activation(_kind),
        layouts=("input", "grad_output"),
        mutations=(non_real("input"), _grad_output_shape, _backward_without_forward) + ((
            value("negative_slope", NON_FINITE, ValueError),
            value("negative_slope", NOT_A_NUMBER, TypeError)) if _slope else ()))


# --------------------------------------------------------------------------- Flatten


def _draw_flatten(draw):
    ndim = draw(st.integers(1, 5), label="ndim")
    shape = tuple(draw(st.integers(1, 4), label="size") for _ in range(ndim))
    start = draw(st.integers(-ndim, ndim - 1), label="start_dim")
    first = start + ndim if start < 0 else start
    end = draw(st.integers(first, ndim - 1), label="end")
    end = end - ndim if draw(st.booleans(), label="negative end") else end
    flat = shape[:first] + (int(np.prod(shape[first:(end % ndim) + 1])),) + shape[
        (end % ndim) + 1:]
    return {"make": lambda a: nn.Flatten(a["start_dim"], a["end_dim"]),
            "start_dim": start, "end_dim": end, "input": floats(draw, shape),
            "grad_output": floats(draw, flat), "input_grad": True}


def _check_flatten(result, before):
    x, gy = as_seen(before["input"]), as_seen(before["grad_output"])
    assert_matches(result["output"], x.reshape(gy.shape), name="output", scale=magnitude(x))
    assert_matches(result["grad_input"], gy.reshape(x.shape), name="grad_input",
                   scale=magnitude(gy))


def _flatten_axes_out_of_range(draw, args):
    ndim = len(np.shape(args["input"]))
    which = draw(st.sampled_from(["start_dim", "end_dim"]), label="which")
    args[which] = draw(st.sampled_from([ndim, ndim + 3, -ndim - 1]), label="axis")
    return ValueError, which


SPECS["Flatten"] = Spec(
    call=_call, draw=_draw_flatten, check=_check_flatten, layouts=("input", "grad_output"),
    mutations=(_flatten_axes_out_of_range, value("start_dim", [1.5, "1", None], TypeError),
               value("end_dim", [1.5, "x", [1]], TypeError), non_real("input"),
               _grad_output_shape, _backward_without_forward))


# --------------------------------------------------------------------------- loss


def _draw_loss(draw):
    n, classes = draw(st.integers(1, 6), label="n"), draw(st.integers(1, 12), label="C")
    generator = np.random.default_rng(draw(st.integers(0, 2**32 - 1), label="seed"))
    return {"input": floats(draw, (n, classes)), "target": generator.integers(0, classes, n),
            "grad_output": draw(st.sampled_from([1.0, 0.5, 2.0]), label="scale")}


def _call_loss(args):
    criterion = nn.CrossEntropyLoss()
    if args.get("call_order") == "backward first":
        return criterion.backward()
    loss = criterion(args["input"], args["target"])
    return loss, criterion.backward(args["grad_output"])


def _check_loss(result, before):
    loss, grad = result
    x, target = as_seen(before["input"]), np.asarray(before["target"], np.int64)
    assert isinstance(loss, float)
    assert_matches(np.float64(loss), ref.cross_entropy(x, target), name="loss", dtype=None,
                   terms=x.size, scale=magnitude(x))
    assert_matches(grad, ref.cross_entropy_backward(x, target) * before["grad_output"],
                   name="grad_input", terms=x.shape[1])


def _loss_target(draw, args):
    n, classes = np.shape(args["input"])
    choices = {"float": (np.zeros(n), TypeError), "length": (np.zeros(n + 1, int), ValueError),
               "range": (np.full(n, classes), ValueError), "2d": (np.zeros((n, 1), int),
                                                                  ValueError),
               "negative": (np.full(n, -1), ValueError)}
    target, error = choices[draw(st.sampled_from(sorted(choices)), label="target")]
    args["target"] = target
    return error, "target"


SPECS["CrossEntropyLoss"] = Spec(
    call=_call_loss, draw=_draw_loss, check=_check_loss, layouts=("input", "target"),
    mutations=(_loss_target, non_real("input"),
               _input_ndim("input"), _backward_without_forward))


# --------------------------------------------------------------------------- from_spec

TOKENS_4D = ["c{c}", "c{c}k{k}", "c{c}k{k}s2", "c{c}k1p0", "bn", "relu", "lrelu", "tanh",
             "sigmoid", "mp2", "ap2", "mp3s1", "sd0.2", "d0.3", "gn1", "ln", "in", "gap",
             "inc{c}_1_{c}_1_{c}_1", "inc1_{c}_1_{c}_1_{c}_nobn", "res{c}", "res{c}s2_postbn"]
#: Tokens after which the tensor is flat.
FLATTENING = ("fc", "gap")
TOKENS_2D = ["fc{c}", "bn", "relu", "d0.5", "tanh", "gn1", "ln"]


def _draw_network(draw):
    image = draw(st.booleans(), label="image")
    tokens = []
    for _ in range(draw(st.integers(0, 6), label="tokens")):
        flat = any(t.startswith(FLATTENING) for t in tokens)
        pool = TOKENS_4D if image and not flat else TOKENS_2D
        token = draw(st.sampled_from(pool + TOKENS_2D[:1]), label="token")
        tokens.append(token.format(c=draw(st.integers(1, 6), label="units"),
                                   k=draw(st.sampled_from([1, 3, 5]), label="k")))
    shape = ((draw(st.integers(1, 3), label="C"), draw(st.integers(6, 12), label="H"),
              draw(st.integers(6, 12), label="W")) if image else
             (draw(st.integers(1, 20), label="features"),))
    n = draw(st.integers(2, 5), label="n")
    return {"spec": "-".join(tokens), "input_shape": shape,
            "n_classes": draw(st.integers(1, 5), label="classes"),
            "seed": draw(st.integers(0, 2**32 - 1), label="seed"),
            "input": floats(draw, (n,) + shape)}


def _call_network(args):
    try:
        model = nn.from_spec(args["spec"], args["input_shape"], args["n_classes"],
                             random_state=args["seed"])
    except ValueError as error:
        if any(reason in str(error) for reason in (
                "shrinks below 1", "spatial size", "more than 1 spatial element")):
            # A valid refusal: pooling below 1x1, or instance norm of 1x1 maps.
            return "unbuildable"
        raise
    output = model(args["input"])
    grad = model.backward(np.ones_like(output))
    twin = nn.from_spec(args["spec"], args["input_shape"], args["n_classes"],
                        random_state=args["seed"])
    model.eval()
    twin.eval()
    result = {"model": model, "twin": twin, "output": output, "grad_input": grad,
              "eval": model(args["input"]), "twin_eval": twin(args["input"]),
              "eval_again": model(args["input"])}
    # The layers one by one are the unfused network (fused blocks fold the batch norm
    # into the weights: the same within float32 rounding, tests/test_fusion.py).
    model.fuse = twin.fuse = False
    result["eval_unfused"] = model(args["input"])
    result["twin_eval_unfused"] = twin(args["input"])
    model.fuse = twin.fuse = True
    return result


def _reference_layer(layer, h):
    """(expected output, terms summed per output, magnitude scale) of one layer in
    evaluation mode on the float32 values ``h``, from the plain-NumPy references."""
    size = magnitude(h)
    if isinstance(layer, nn.Conv2d):
        bias = None if layer.bias is None else layer.bias.data
        expected = ref.conv2d(h, layer.weight.data, bias, layer.stride, layer.padding,
                              layer.dilation)
        return expected, layer.weight.data[0].size, size * magnitude(layer.weight.data, bias)
    if isinstance(layer, nn.Linear):
        bias = None if layer.bias is None else layer.bias.data
        expected = ref.linear(h, layer.weight.data, bias)
        return expected, layer.in_features, size * magnitude(layer.weight.data, bias)
    if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
        weight, bias = ((None, None) if layer.weight is None
                        else (layer.weight.data, layer.bias.data))
        expected, _, invstd, _, _ = ref.batch_norm(h, weight, bias, layer.running_mean,
                                                   layer.running_var, False, 0.1, layer.eps)
        gain = float(np.max(invstd)) * magnitude(weight)
        return expected, 1, (size + magnitude(layer.running_mean)) * gain + magnitude(bias)
    if isinstance(layer, (nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)):
        # Per-sample statistics in evaluation too: normalised values are at most
        # sqrt(group size) in magnitude, then scaled and shifted.
        weight = None if layer.weight is None else layer.weight.data
        bias = None if layer.bias is None else layer.bias.data
        if isinstance(layer, nn.GroupNorm):
            expected, _, rstd = ref.group_norm(h, layer.num_groups, weight, bias, layer.eps)
            group = h[0].size // layer.num_groups
        elif isinstance(layer, nn.LayerNorm):
            expected, _, rstd = ref.layer_norm(h, layer.normalized_shape, weight, bias,
                                               layer.eps)
            group = int(np.prod(layer.normalized_shape))
        else:
            expected, _, rstd = ref.instance_norm(h, weight, bias, layer.eps)
            group = h[0, 0].size
        gain = float(np.max(rstd)) * magnitude(weight)
        return expected, group, 2 * size * gain + magnitude(bias)
    if isinstance(layer, nn.MaxPool2d):
        return ref.max_pool2d(h, layer.kernel_size, layer.stride, layer.padding)[0], 1, size
    if isinstance(layer, nn.AvgPool2d):
        expected = ref.avg_pool2d(h, layer.kernel_size, layer.stride, layer.padding,
                                  layer.count_include_pad)
        return expected, layer.kernel_size[0] * layer.kernel_size[1], size
    if isinstance(layer, nn.Flatten):
        return h.reshape(len(h), -1), 1, size  # from_spec's Flatten keeps axis 0 only
    if isinstance(layer, nn.AdaptiveAvgPool2d):
        return ref.adaptive_avg_pool2d(h), h[0, 0].size, size
    if isinstance(layer, nn.Concat):
        outputs = [_run_layer_by_layer(branch, h, "branch") for branch in layer.branches]
        return np.concatenate(outputs, axis=1), 1, magnitude(*outputs)
    if isinstance(layer, nn.Residual):
        body = _run_layer_by_layer(layer.body, h, "body")
        skip = h if layer.shortcut is None else _run_layer_by_layer(layer.shortcut, h,
                                                                       "shortcut")
        total = body.astype(np.float64) + skip
        return ref.relu(total), 2, magnitude(body, skip)
    if isinstance(layer, (nn.Dropout, nn.Dropout2d)):
        return h, 1, size  # the identity in evaluation
    if isinstance(layer, nn.LeakyReLU):
        return ref.leaky_relu(h, layer.negative_slope), 1, size
    elementwise = {nn.ReLU: ref.relu, nn.Sigmoid: ref.sigmoid, nn.Tanh: ref.tanh}
    return elementwise[type(layer)](h), 1, size


def _run_layer_by_layer(model, x, what):
    """The float32 output of the layers of ``model`` run one by one on ``x``, each checked
    against the references fed the previous layer's float32 output (into the branches of
    a block too)."""
    h = np.asarray(x, dtype=np.float32)
    for index, layer in enumerate(model):
        expected, terms, scale = _reference_layer(layer, as_seen(h))
        h = layer(h)
        assert_matches(h, expected, name=f"{what}: layer {index} ({type(layer).__name__})",
                       terms=terms, scale=scale)
    return h


def _assert_matches_layer_by_layer(model, x, output, what):
    """Evaluation of ``model`` on ``x`` agrees, layer by layer, with the references fed
    the previous layer's float32 output, and chains to ``output`` bit for bit."""
    h = _run_layer_by_layer(model, x, what)
    assert identical(h, output), f"{what}: the layers chained differ from the model's output"


def _check_network(result, before):
    if result == "unbuildable":
        return
    n = len(before["input"])
    assert result["output"].shape == (n, before["n_classes"])
    assert result["model"].output_shape(before["input_shape"]) == (before["n_classes"],)
    assert result["grad_input"].shape == np.shape(before["input"])
    for name, param in result["model"].named_parameters():
        assert np.isfinite(param.grad).all(), name
    assert np.isfinite(result["output"]).all() and np.isfinite(result["eval"]).all()
    # Evaluation is deterministic, and the same seed builds the same network (parameters;
    # the model's running statistics moved in its training forward, the twin's did not).
    assert identical(result["eval"], result["eval_again"])
    model, twin = result["model"], result["twin"]
    params, twin_params = list(model.named_parameters()), list(twin.named_parameters())
    assert len(params) == len(twin_params)
    for (name, param), (twin_name, twin_param) in zip(params, twin_params):
        assert name == twin_name and identical(param.data, twin_param.data), name
    x = as_seen(before["input"])
    _assert_matches_layer_by_layer(model, x, result["eval_unfused"], "eval")
    _assert_matches_layer_by_layer(twin, x, result["twin_eval_unfused"], "twin_eval")
    for key in ("eval", "twin_eval"):
        unfused = result[key + "_unfused"]
        np.testing.assert_allclose(result[key], unfused, rtol=1e-4,
                                   atol=1e-5 * max(1.0, float(np.abs(unfused).max())),
                                   err_msg=f"{key}: fused against unfused")


def _bad_spec(draw, args):
    args["spec"] = draw(st.sampled_from(["c", "c0", "fc0", "d1.5", "mp0", "xyz", "c3-",
                                         "c3--relu", "bn bn", "c3k0", "d-0.1", "fc1e3"]),
                        label="spec")
    # The message quotes the bad token and the whole spec ("bad token 'c0' (token 1, ...)
    # in architecture 'c0'"); "spec" itself is the parameter's name, not in the text.
    return ValueError, "bad token"


def _bad_network_shape(draw, args):
    args["input_shape"] = draw(st.sampled_from([(0, 4, 4), (3, 4), (1, -1, 4), (), "x", None,
                                                (1.5, 4, 4), (2**64, 1, 1)]),
                               label="input_shape")
    # (2**64, 1, 1): more elements per sample than a 64-bit size counts.
    return (ValueError, TypeError, MemoryError), "input_shape"


SPECS["from_spec"] = Spec(
    call=_call_network, draw=_draw_network, check=_check_network, layouts=("input",),
    mutations=(_bad_spec, _bad_network_shape,
               value("n_classes", [0, -1], ValueError, "n_classes"),
               value("n_classes", [1.5, "3", None], (TypeError, ValueError), "n_classes"),
               value("spec", [None, 3, b"c3"], TypeError, "spec"),
               value("seed", [-1, "x", 1.5], (ValueError, TypeError), "random_state")))


# --------------------------------------------------------------------------- optimizers


def _draw_optimizer(kind):
    def draw_args(draw):
        generator = np.random.default_rng(draw(st.integers(0, 2**32 - 1), label="seed"))
        shapes = [tuple(draw(st.integers(1, 5), label="size") for _ in range(
            draw(st.integers(1, 3), label="ndim"))) for _ in range(
            draw(st.integers(1, 3), label="params"))]
        params = [generator.standard_normal(s).astype(np.float32) for s in shapes]
        grads = [[generator.standard_normal(s).astype(np.float32) for s in shapes]
                 for _ in range(draw(st.integers(1, 3), label="steps"))]
        hyper = {"lr": draw(st.sampled_from([1e-3, 0.1, 0.0]), label="lr"),
                 "weight_decay": draw(st.sampled_from([0.0, 1e-2]), label="wd")}
        if kind == "SGD":
            momentum = draw(st.sampled_from([0.0, 0.9]), label="momentum")
            dampening = draw(st.sampled_from([0.0, 0.1]), label="dampening")
            hyper.update(momentum=momentum, dampening=dampening,
                         nesterov=momentum > 0 and dampening == 0 and draw(st.booleans()))
        else:
            hyper.update(betas=(draw(st.sampled_from([0.9, 0.5]), label="b1"),
                                draw(st.sampled_from([0.999, 0.9]), label="b2")),
                         eps=draw(st.sampled_from([1e-8, 1e-3]), label="eps"))
        return {"kind": kind, "params": params, "grads": grads, **hyper}
    return draw_args


HYPER_NAMES = {"SGD": ("lr", "momentum", "dampening", "weight_decay", "nesterov"),
               "Adam": ("lr", "betas", "eps", "weight_decay"),
               "AdamW": ("lr", "betas", "eps", "weight_decay")}


def _call_optimizer(args):
    kind = args["kind"]
    params = [nn.Parameter(p) for p in args["params"]]
    given = args.get("given_params", params)  # what a mutation passes instead
    opt = getattr(optim, kind)(given, **{k: args[k] for k in HYPER_NAMES[kind]})
    for grads in args["grads"]:
        for param, grad in zip(params, grads):
            param.grad = grad
        if args.get("lr_between_steps") is not None:
            opt.param_groups[0]["lr"] = args["lr_between_steps"]
        opt.step()
    return [p.data for p in params]


def _reference_steps(args):
    """The float64 reference parameters after the steps and, for Adam, element-wise bounds
    on the float32 kernels' rounding error (None for SGD)."""
    kind, results = args["kind"], []
    for index, param in enumerate(args["params"]):
        value_ = param.astype(np.float64)
        state = {"momentum_buffer": None, "exp_avg": np.zeros_like(value_),
                 "exp_avg_sq": np.zeros_like(value_)}
        bounds = (0.0, 0.0, 0.0)
        for step, grads in enumerate(args["grads"], 1):
            grad = grads[index]
            if kind == "SGD":
                value_, state["momentum_buffer"] = ref.sgd_step(
                    value_, grad, state["momentum_buffer"], lr=args["lr"],
                    momentum=args["momentum"], dampening=args["dampening"],
                    nesterov=args["nesterov"], weight_decay=args["weight_decay"],
                    first_step=step == 1)
                continue
            hyper = {"lr": as_float32_scalar(args["lr"]),
                     "beta1": as_float32_scalar(args["betas"][0]),
                     "beta2": as_float32_scalar(args["betas"][1]),
                     "eps": as_float32_scalar(args["eps"]),
                     "weight_decay": as_float32_scalar(args["weight_decay"])}
            bounds = adam_step_bounds(value_, grad, state["exp_avg"], state["exp_avg_sq"],
                                      step, decoupled=kind == "AdamW", errors=bounds, **hyper)
            value_, state["exp_avg"], state["exp_avg_sq"] = ref.adam_step(
                value_, grad, state["exp_avg"], state["exp_avg_sq"], step,
                decoupled_weight_decay=kind == "AdamW", **hyper)
        results.append((value_, None if kind == "SGD" else bounds[0]))
    return results


def _check_optimizer(result, before):
    expected = _reference_steps(before)
    scale = max(magnitude(*before["params"]), magnitude(*[g for s in before["grads"] for g in s]))
    for index, (got, (want, bound)) in enumerate(zip(result, expected)):
        if bound is None:
            assert_matches(got, want, name=f"param {index}", terms=len(before["grads"]),
                           scale=scale)
        else:
            # Twice the float32 rounding carried through the steps (adam_step_bounds).
            assert_within(got, want, 2 * bound, name=f"param {index}")


def _wrong_grad_shape(draw, args):
    grads = args["grads"][0]
    index = draw(st.integers(0, len(grads) - 1), label="param")
    grads[index] = np.zeros(grads[index].shape + (2,), np.float32)
    return ValueError, "grad"


def _nan_lr_between_steps(draw, args):
    args["lr_between_steps"] = draw(st.sampled_from(NON_FINITE + [-1.0]), label="lr")
    return ValueError, "learning rate"


OPTIMIZER_MUTATIONS = (
    value("lr", NON_FINITE + [-1e-3], ValueError, "learning rate"),
    value("lr", NOT_A_NUMBER, TypeError, "learning rate"),
    value("weight_decay", NON_FINITE + [-0.1], ValueError, "weight_decay"),
    value("given_params", [[]], ValueError, "empty parameter list"),  # PyTorch's words
    value("given_params", [[np.zeros(3)], [1.0]], TypeError,
          "can only optimize bnrs.nn.Parameter"),
    value("given_params", [nn.Parameter(np.zeros(2)), None, 3], TypeError, "params"),
    _wrong_grad_shape, _nan_lr_between_steps)

def _nesterov_without_momentum(draw, args):
    # Nesterov momentum needs a momentum and zero dampening (PyTorch's rule); with them
    # (momentum 0.9, dampening 0) it is a valid setting, not a mutation.
    args["nesterov"] = True
    if draw(st.booleans(), label="no momentum"):
        args["momentum"] = 0.0
    else:
        args["momentum"], args["dampening"] = 0.9, 0.1
    return ValueError, "Nesterov"


SPECS["SGD"] = Spec(
    call=_call_optimizer, draw=_draw_optimizer("SGD"), check=_check_optimizer,
    mutations=OPTIMIZER_MUTATIONS + (
        value("momentum", NON_FINITE + [-0.5], ValueError, "momentum"),
        value("dampening", NON_FINITE, ValueError, "dampening"),
        _nesterov_without_momentum))
for _kind in ("Adam", "AdamW"):
    SPECS[_kind] = Spec(
        call=_call_optimizer, draw=_draw_optimizer(_kind), check=_check_optimizer,
        mutations=OPTIMIZER_MUTATIONS + (
            value("betas", [(1.0, 0.9), (0.9, -0.1), (math.nan, 0.9), (0.9, math.inf)],
                  ValueError, "beta"),
            value("betas", [0.9, (0.9,), (0.1, 0.2, 0.3), ("a", 0.9), None],
                  (TypeError, ValueError), "betas"),
            value("eps", NON_FINITE + [-1.0], ValueError, "epsilon")))


# --------------------------------------------------------------------------- estimator

ARCHITECTURES = ["", "fc8-relu", "c4-bn-relu-mp2-fc8", "c3-relu-d0.2", "bn-fc6-tanh-d0.1"]


def _draw_estimator(draw):
    generator = np.random.default_rng(draw(st.integers(0, 2**32 - 1), label="seed"))
    n = draw(st.integers(4, 24), label="n")
    layout = draw(st.sampled_from(["2d_square", "2d_vector", "3d", "4d"]), label="X")
    architecture = draw(st.sampled_from(ARCHITECTURES), label="architecture")
    if layout == "2d_vector" and any(t in architecture for t in ("c3", "c4")):
        layout = "2d_square"
    shape = {"2d_square": (n, 16), "2d_vector": (n, draw(st.integers(1, 9))),
             "3d": (n, 4, 5), "4d": (n, 2, 4, 4)}[layout]
    classes = draw(st.sampled_from([np.array([0, 1]), np.array([3, 7, 9]),
                                    np.array(["cat", "dog"]), np.array([-1, 2])]),
                   label="classes")
    y = classes[np.arange(n) % len(classes)]
    generator.shuffle(y)
    return {"X": floats(draw, shape), "y": y,
            "params": {"architecture": architecture, "max_epochs": draw(st.integers(1, 2)),
                       "batch_size": draw(st.sampled_from([2, 5, 64]), label="batch"),
                       "optimizer": draw(st.sampled_from(["adam", "adamw", "sgd"])),
                       "learning_rate": draw(st.sampled_from([1e-3, 1e-2])),
                       "random_state": draw(st.integers(0, 2**31), label="random_state"),
                       "early_stopping": False, "n_iter_no_change": 50}}


def _call_estimator(args):
    clf = bnrs.CNNClassifier(**args["params"])
    if args.get("call_order") == "predict first":
        return clf.predict(args["X"])
    clf.fit(args["X"], args["y"])
    X = args.get("X_predict", args["X"])
    twin = bnrs.CNNClassifier(**args["params"]).fit(args["X"], args["y"])
    return {"clf": clf, "predict": clf.predict(X), "proba": clf.predict_proba(X),
            "score": clf.score(args["X"], args["y"]), "twin": twin.predict_proba(X),
            "converted": clf.predict_proba(np.asfortranarray(np.asarray(X, np.float64)))}


def _check_estimator(result, before):
    classes = np.unique(before["y"])
    np.testing.assert_array_equal(result["clf"].classes_, classes)
    assert np.isin(result["predict"], classes).all()
    proba = result["proba"]
    assert proba.shape == (len(before["X"]), len(classes)) and np.isfinite(proba).all()
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    assert 0.0 <= result["score"] <= 1.0
    assert identical(result["twin"], proba), "same random_state, different predictions"
    assert identical(result["converted"], proba), "float64 Fortran X predicts differently"


def _nonfinite_X(draw, args):
    X = np.array(args["X"], dtype=np.float64)
    X.flat[draw(st.integers(0, X.size - 1), label="where")] = draw(
        st.sampled_from([np.nan, np.inf, -np.inf, 1e39]), label="value")
    args["X"] = X
    return ValueError, "X"


def _bad_y(draw, args):
    n = len(args["X"])
    choices = {"length": (args["y"][:-1], ValueError), "one_class": (np.zeros(n), ValueError),
               "2d": (np.zeros((n, 2)), ValueError),
               "continuous": (np.linspace(0, 1, n), ValueError),
               "nan": (np.where(np.arange(n) == 0, np.nan, np.arange(n) % 2), ValueError)}
    y, error = choices[draw(st.sampled_from(sorted(choices)), label="y")]
    args["y"] = y
    return error, "y|samples|class|target|Unknown label|NaN|inconsistent numbers"


def _bad_X_shape(draw, args):
    n = len(args["X"])
    args["X"] = draw(st.sampled_from([np.zeros(n), np.zeros((0, 16)), np.zeros((n, 0)),
                                      np.zeros((n, 1, 2, 2, 2)), np.zeros((n, 15))]),
                     label="X shape")
    if args["X"].ndim == 2 and args["X"].shape[1] == 15:
        args["params"]["architecture"] = "c3-relu"  # 15 is not a square
    return ValueError, "X|sample|feature|array|input_shape|square"


def _bad_param(name, choices, errors=(ValueError, TypeError), names=None):
    def mutate(draw, args):
        args["params"][name] = draw(st.sampled_from(choices), label=name)
        return errors, names or name
    return mutate


def _predict_wrong_features(draw, args):
    X = np.asarray(args["X"])
    args["X_predict"] = np.zeros((3,) + X.shape[1:-1] + (X.shape[-1] + 1,), np.float32)
    return ValueError, "X"


def _non_numeric_X(draw, args):
    """X that is not numbers (scikit-learn's validate_data, which the estimator uses,
    accepts bool, numeric strings and datetime64 as numbers, as every sklearn estimator)."""
    shape = np.shape(args["X"])
    choices = {"complex": np.zeros(shape, np.complex64), "none": np.full(shape, None),
               "text": np.full(shape, "abc"), "dict": {"a": 1}, "ragged": [[1.0], [1.0, 2.0]]}
    args["X"] = choices[draw(st.sampled_from(sorted(choices)), label="X")]
    return (TypeError, ValueError), "X|dtype|[Cc]omplex|convert|could not|sequence|float"


def _predict_before_fit(draw, args):
    args["call_order"] = "predict first"
    return ValueError, "fitted|fit"  # sklearn's NotFittedError is a ValueError


SPECS["CNNClassifier"] = Spec(
    call=_call_estimator, draw=_draw_estimator, check=_check_estimator, layouts=("X",),
    mutations=(_nonfinite_X, _bad_y, _bad_X_shape, _predict_wrong_features,
               # scikit-learn's validate_data words these (e.g. a ragged list: "setting an
               # array element with a sequence"; a dict: "float() argument must be ...").
               _predict_before_fit, _non_numeric_X,
               _bad_param("architecture", ["c0", "xyz", "fc-1", None, 3]),
               _bad_param("learning_rate", [0.0, -1.0, math.nan, math.inf, "x"]),
               _bad_param("batch_size", [0, -1, 1.5, "8"]),
               _bad_param("max_epochs", [0, -2, 2.5]),
               _bad_param("optimizer", ["rmsprop", None, 3]),
               _bad_param("random_state", [-1, "seed", 1.5]),
               _bad_param("input_shape", [(0, 4, 4), (3, 3), "x", (2**64,)])))


# --------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("name", sorted(SPECS))
@FUZZ
@given(data=st.data())
def test_valid_input_matches_reference(name, data):
    spec = SPECS[name]
    args = spec.draw(data.draw)
    for key in spec.layouts:
        args[key] = any_layout(data.draw, args[key])
    before = snapshot(args)
    result = spec.call(args)
    spec.check(result, before)
    for key in spec.layouts:
        assert identical(args[key], before[key]), f"{name} modified its argument {key}"
    longrun.CASES[f"{name} (valid)"] += 1


@pytest.mark.parametrize("name", sorted(SPECS))
@FUZZ
@given(data=st.data())
def test_invalid_input_raises_naming_the_argument(name, data):
    spec = SPECS[name]
    args = spec.draw(data.draw)
    mutation = data.draw(st.sampled_from(spec.mutations), label="mutation")
    errors, names = mutation(data.draw, args)
    if not isinstance(errors, tuple):
        errors = (errors,)
    assert_rejected(lambda: spec.call(args), args, errors, names, name)
    longrun.CASES[f"{name} (invalid)"] += 1
