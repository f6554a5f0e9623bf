"""Property-based fuzzing of every public entry point of bnrs.functional (bnrs.nn,
bnrs.optim and CNNClassifier: test_fuzz_nn.py; the machinery: fuzzing.py).

Each entry point has a :class:`Spec`: how to draw valid arguments, how to check a result
against the plain-NumPy references (``tests/reference.py``), and the ways to break one
argument. Two tests run every spec:

- ``test_valid_input_matches_reference``: random shapes (batch 1-5, spatial 1-17, odd
  strides, paddings, dilations), any real dtype and memory layout (Fortran order, strides,
  negative or zero strides, unaligned, byte-swapped, read-only, nested lists) give the
  reference result, NaN and inf propagate where the op defines it, and afterwards every
  argument is unchanged except the documented in-place buffers, which match the reference
  update.
- ``test_invalid_input_raises_naming_the_argument``: one argument broken (wrong ndim,
  mismatched channels, zero-size dimension, kernel larger than the padded input,
  negative or huge padding, stride 0, sizes whose product overflows, NaN/inf
  hyper-parameters, non-numeric dtypes or objects, non-contiguous, read-only, unaligned
  or aliased in-place buffers, wrong-length vectors) raises ValueError or TypeError
  (MemoryError for a size too large to allocate) whose message names the argument, and
  leaves every array argument unchanged.

A panic would surface as RuntimeError and fail both; an abort or hang would stop the run.
The number of cases per entry point is ``longrun.FUZZ_EXAMPLES`` (30 by default, 10,000
in the long run; see ``tests/conftest.py``), and the totals are printed at the end.
"""

from __future__ import annotations

import longrun
import numpy as np
import pytest
import reference as ref
from bnrs import functional as F
from fuzzing import (
    FUZZ,
    HUGE,
    NON_FINITE,
    NOT_A_NUMBER,
    Spec,
    adam_step_bounds,
    alias,
    any_layout,
    as_float32_scalar,
    as_seen,
    assert_matches,
    assert_rejected,
    assert_within,
    channel_vector,
    floats,
    geometry,
    identical,
    inplace,
    magnitude,
    ndim,
    non_real,
    pair_arg,
    pair_value,
    present,
    resize,
    snapshot,
    value,
    zero_size,
)
from hypothesis import given
from hypothesis import strategies as st

pytestmark = pytest.mark.fuzz

SPECS: dict[str, Spec] = {}

# --------------------------------------------------------------------------- conv2d


def _window(draw, *, max_kernel=5, max_dilation=3, max_padding=3, pool=False):
    """Kernel, stride, padding, dilation and an input size (1-17) the window fits."""
    kernel, stride, padding, dilation, size = [], [], [], [], []
    for _ in range(2):
        k = draw(st.integers(1, max_kernel), label="kernel")
        d = 1 if pool else draw(st.integers(1, max_dilation), label="dilation")
        p = draw(st.integers(0, k // 2 if pool else max_padding), label="padding")
        reach = d * (k - 1) + 1 - 2 * p
        kernel.append(k)
        dilation.append(d)
        padding.append(p)
        stride.append(draw(st.integers(1, 4), label="stride"))
        size.append(draw(st.integers(max(reach, 1), 17), label="size"))
    return tuple(kernel), tuple(stride), tuple(padding), tuple(dilation), tuple(size)


def _draw_conv(draw):
    kernel, stride, padding, dilation, size = _window(draw)
    n, c_in, c_out = (draw(st.integers(1, 5), label="batch"),
                      draw(st.integers(1, 4), label="in_channels"),
                      draw(st.integers(1, 4), label="out_channels"))
    x = floats(draw, (n, c_in) + size, special=True)
    w = floats(draw, (c_out, c_in) + kernel)
    out = tuple(ref.conv2d_output_size(size[a], kernel[a], stride[a], padding[a], dilation[a])
                for a in range(2))
    return {"input": x, "weight": w,
            "bias": floats(draw, (c_out,)) if draw(st.booleans(), label="bias") else None,
            "stride": pair_arg(draw, stride), "padding": pair_arg(draw, padding),
            "dilation": pair_arg(draw, dilation),
            "grad_output": floats(draw, (n, c_out) + out),
            "input_grad": draw(st.booleans(), label="input_grad")}


_bias_length = present(resize("bias", 0),
                       bias=lambda a: np.zeros(np.shape(a["weight"])[0], np.float32))


def _conv_geometry(args):
    return {key: args[key] for key in ("stride", "padding", "dilation")}


def _ref_geometry(args):
    return {key: pair_value(args[key]) for key in ("stride", "padding", "dilation")}


def _check_conv2d(result, before):
    x, w, b = as_seen(before["input"]), as_seen(before["weight"]), as_seen(before["bias"])
    expected = ref.conv2d(x, w, b, **_ref_geometry(before))
    assert_matches(result, expected, name="output", terms=w[0].size,
                    scale=magnitude(x) * magnitude(w) + magnitude(b))


def _draw_conv_finite(draw):
    args = _draw_conv(draw)
    args["input"] = np.nan_to_num(args["input"], posinf=1.0, neginf=-1.0)
    return args


def _check_conv2d_backward(result, before):
    gy, x, w = (as_seen(before[k]) for k in ("grad_output", "input", "weight"))
    grad_input, grad_weight, grad_bias = ref.conv2d_backward(gy, x, w, **_ref_geometry(before))
    scale = magnitude(gy)
    assert isinstance(result, tuple) and len(result) == 3
    if before["input_grad"]:
        assert_matches(result[0], grad_input, name="grad_input", terms=w[:, 0].size,
                        scale=scale * magnitude(w))
    else:
        assert result[0] is None
    assert_matches(result[1], grad_weight, name="grad_weight", terms=gy[:, 0].size,
                    scale=scale * magnitude(x))
    if before["bias"] is not None:
        assert_matches(result[2], grad_bias, name="grad_bias", terms=gy[:, 0].size,
                        scale=scale)
    else:
        assert result[2] is None


def _kernel_too_large(draw, args):
    """A weight whose (dilated) kernel does not fit in the padded input on one axis."""
    padding = pair_value(args["padding"])
    dilation = pair_value(args["dilation"])
    axis = draw(st.integers(0, 1), label="axis")
    shape = list(args["weight"].shape)
    padded = args["input"].shape[2 + axis] + 2 * padding[axis]
    shape[2 + axis] = (padded - 1) // dilation[axis] + 2  # span = d*(k-1)+1 > padded
    args["weight"] = floats(draw, tuple(shape))
    return ValueError, "weight"


def _dilation_too_large(draw, args):
    padding = pair_value(args["padding"])
    padded = [args["input"].shape[2 + a] + 2 * padding[a] for a in range(2)]
    if args["weight"].shape[2] == 1 and args["weight"].shape[3] == 1:
        args["weight"] = floats(draw, args["weight"].shape[:2] + (2, 2))
    args["dilation"] = (max(padded) + 1, max(padded) + 1)
    return ValueError, "dilation"


def _huge_padding(draw, args):
    args["padding"] = draw(st.sampled_from([HUGE, (HUGE, 0), (0, 2**62), 10**9]), label="pad")
    # Too large an output (which an unpadded convolution's would not be), or, on the other
    # axis, a kernel that no longer fits: either way the message names padding.
    return (MemoryError, ValueError), "padding"


def _huge_view(arg, shape_of):
    """A zero-stride view far larger than memory: converting it would allocate terabytes."""
    def mutate(draw, args):
        shape = shape_of(args)
        args[arg] = np.broadcast_to(np.float64(1.0), shape)
        return (MemoryError, ValueError), arg
    return mutate


SPECS["conv2d"] = Spec(
    call=lambda a: F.conv2d(a["input"], a["weight"], a["bias"], **_conv_geometry(a)),
    draw=_draw_conv, check=_check_conv2d, layouts=("input", "weight", "bias"),
    mutations=(non_real("input"), non_real("weight"), non_real("bias", required=False),
               ndim("input"), ndim("weight"), zero_size("input"), zero_size("weight"),
               resize("weight", 1),
               geometry("stride", 1), geometry("padding", 0), geometry("dilation", 1),
               _kernel_too_large, _dilation_too_large, _huge_padding, _bias_length,
               _huge_view("input", lambda a: (HUGE, 1) + a["input"].shape[2:]),
               _huge_view("weight", lambda a: (HUGE,) + a["weight"].shape[1:])))

SPECS["conv2d_backward"] = Spec(
    call=lambda a: F.conv2d_backward(a["grad_output"], a["input"], a["weight"],
                                     **_conv_geometry(a), bias=a["bias"] is not None,
                                     input_grad=a["input_grad"]),
    draw=_draw_conv_finite, check=_check_conv2d_backward,
    layouts=("grad_output", "input", "weight"),
    mutations=(non_real("grad_output"), non_real("input"), non_real("weight"),
               ndim("grad_output"), ndim("input"), ndim("weight"),
               zero_size("grad_output"), zero_size("input"),
               resize("grad_output", 1), resize("grad_output", 2), resize("grad_output", 3),
               resize("weight", 1),
               # Nothing says whether weight or grad_output is wrong: both are named.
               resize("weight", 0, "weight"),
               geometry("stride", 1), geometry("padding", 0), geometry("dilation", 1),
               _kernel_too_large, _huge_padding))


# --------------------------------------------------------------------------- pooling


def _draw_pool(draw):
    kernel, stride, padding, _, size = _window(draw, pool=True)
    n, c = draw(st.integers(1, 5), label="batch"), draw(st.integers(1, 4), label="channels")
    x = floats(draw, (n, c) + size, special=True)
    out = tuple(ref.pool_output_size(size[a], kernel[a], stride[a], padding[a])
                for a in range(2))
    default_stride = draw(st.booleans(), label="default stride") and stride == kernel
    _, indices = ref.max_pool2d(np.nan_to_num(x), kernel, stride, padding)
    return {"input": x, "kernel_size": pair_arg(draw, kernel),
            "stride": None if default_stride else pair_arg(draw, stride),
            "padding": pair_arg(draw, padding),
            "count_include_pad": draw(st.booleans(), label="count_include_pad"),
            "grad_output": floats(draw, (n, c) + out), "indices": indices,
            "input_shape": _pair_shape(draw, (n, c) + size)}


def _pair_shape(draw, shape):
    form = draw(st.sampled_from(["tuple", "list", "numpy"]), label="shape form")
    return {"tuple": tuple, "list": list,
            "numpy": lambda s: np.array(s, dtype=np.int64)}[form](shape)


def _pool_window(before):
    stride = before["stride"]
    return (pair_value(before["kernel_size"]),
            None if stride is None else pair_value(stride), pair_value(before["padding"]))


def _check_max_pool2d(result, before):
    output, indices = result
    kernel, stride, padding = _pool_window(before)
    expected, expected_indices = ref.max_pool2d(as_seen(before["input"]), kernel, stride,
                                                padding)
    assert_matches(output, expected, name="output")
    assert indices.dtype == np.int64
    np.testing.assert_array_equal(indices, expected_indices, err_msg="indices")


def _check_max_pool2d_backward(result, before):
    expected = ref.max_pool2d_backward(as_seen(before["grad_output"]),
                                       np.asarray(before["indices"], np.int64),
                                       tuple(int(d) for d in before["input_shape"]))
    assert_matches(result, expected, name="grad_input", terms=9,
                    scale=magnitude(before["grad_output"]))


def _check_avg_pool2d(result, before):
    kernel, stride, padding = _pool_window(before)
    expected = ref.avg_pool2d(as_seen(before["input"]), kernel, stride, padding,
                              before["count_include_pad"])
    assert_matches(result, expected, name="output", terms=kernel[0] * kernel[1],
                    scale=magnitude(before["input"]))


def _check_avg_pool2d_backward(result, before):
    kernel, stride, padding = _pool_window(before)
    expected = ref.avg_pool2d_backward(as_seen(before["grad_output"]),
                                       tuple(int(d) for d in before["input_shape"]),
                                       kernel, stride, padding, before["count_include_pad"])
    assert_matches(result, expected, name="grad_input", terms=25,
                    scale=magnitude(before["grad_output"]))


def _pool_kernel_too_large(draw, args):
    padding = pair_value(args["padding"])
    axis = draw(st.integers(0, 1), label="axis")
    kernel = list(pair_value(args["kernel_size"]))
    size = args["input"].shape[2 + axis] if "input" in args else args["input_shape"][2 + axis]
    kernel[axis] = int(size) + 2 * padding[axis] + 1
    args["kernel_size"] = tuple(kernel)
    args["stride"] = 1
    return ValueError, "kernel_size"


def _pool_padding_over_half(draw, args):
    kernel = pair_value(args["kernel_size"])
    axis = draw(st.integers(0, 1), label="axis")
    padding = list(pair_value(args["padding"]))
    padding[axis] = kernel[axis] // 2 + draw(st.integers(1, 3), label="excess")
    args["padding"] = tuple(padding)
    return ValueError, "padding"


def _pool_huge_kernel(draw, args):
    args["kernel_size"] = draw(st.sampled_from([HUGE, (2**62, 1), 2**63 - 1]), label="k")
    args["padding"] = 0
    return ValueError, "kernel_size"


def _pool_call(function, with_indices=False):
    def call(a):
        extra = {"return_indices": True} if with_indices else {
            "count_include_pad": a["count_include_pad"]}
        return function(a["input"], a["kernel_size"], a["stride"], a["padding"], **extra)
    return call


POOL_MUTATIONS = (non_real("input"), ndim("input"), zero_size("input"),
                  geometry("kernel_size", 1), geometry("stride", 1, optional=True),
                  geometry("padding", 0),
                  _pool_kernel_too_large, _pool_padding_over_half, _pool_huge_kernel,
                  _huge_view("input", lambda a: (HUGE, 1) + a["input"].shape[2:]))


def _input_shape_mutation(draw, args):
    """input_shape that is not 4 ints, has a zero or negative size, or overflows."""
    n, c, h, w = (int(d) for d in args["input_shape"])
    choices = {
        "three": ((n, c, h), ValueError), "five": ((n, c, h, w, 1), ValueError),
        "not_ints": ((n, c, float(h), w), TypeError), "string": ("nchw", TypeError),
        "none": (None, TypeError), "zero": ((n, c, 0, w), ValueError),
        "negative": ((n, c, -h, w), ValueError),
        "overflow": ((2**32, 2**32, 2**32, 2**32), (MemoryError, ValueError)),
        "huge": ((n, c, HUGE, HUGE), (MemoryError, ValueError)),
        "beyond_int64": ((n, c, 2**64, w), ValueError),
    }
    kind = draw(st.sampled_from(sorted(choices)), label="input_shape")
    args["input_shape"], error = choices[kind]
    return error, "input_shape"


SPECS["max_pool2d"] = Spec(call=_pool_call(F.max_pool2d, with_indices=True),
                           draw=_draw_pool, check=_check_max_pool2d, layouts=("input",),
                           mutations=POOL_MUTATIONS)

SPECS["avg_pool2d"] = Spec(call=_pool_call(F.avg_pool2d), draw=_draw_pool,
                           check=_check_avg_pool2d, layouts=("input",),
                           mutations=POOL_MUTATIONS)


def _bad_indices(draw, args):
    """Indices of a float dtype, out of the plane, or of the wrong shape."""
    indices = np.asarray(args["indices"])
    plane = int(args["input_shape"][2]) * int(args["input_shape"][3])
    kind = draw(st.sampled_from(["float", "negative", "beyond_plane", "shape"]),
                label="bad indices")
    if kind == "float":
        args["indices"] = indices.astype(np.float64)
        return TypeError, "indices"
    if kind == "shape":
        args["indices"] = np.zeros(indices.shape[:-1] + (indices.shape[-1] + 1,), np.int64)
        return ValueError, "indices"
    bad = indices.copy()
    bad.flat[draw(st.integers(0, bad.size - 1), label="where")] = (
        -1 if kind == "negative" else plane + draw(st.integers(0, 2**40), label="beyond"))
    args["indices"] = bad
    return ValueError, "indices"


SPECS["max_pool2d_backward"] = Spec(
    call=lambda a: F.max_pool2d_backward(a["grad_output"], a["indices"], a["input_shape"]),
    draw=_draw_pool, check=_check_max_pool2d_backward,
    layouts=("grad_output", "indices"),
    mutations=(non_real("grad_output"), ndim("grad_output"), resize("grad_output", 0),
               resize("grad_output", 1),
               non_real("indices"), _bad_indices, _input_shape_mutation))

SPECS["avg_pool2d_backward"] = Spec(
    call=lambda a: F.avg_pool2d_backward(a["grad_output"], a["input_shape"],
                                         a["kernel_size"], a["stride"], a["padding"],
                                         a["count_include_pad"]),
    draw=_draw_pool, check=_check_avg_pool2d_backward, layouts=("grad_output",),
    mutations=(non_real("grad_output"), ndim("grad_output"),
               resize("grad_output", 2), resize("grad_output", 1),
               _input_shape_mutation, geometry("kernel_size", 1),
               geometry("stride", 1, optional=True), geometry("padding", 0),
               _pool_kernel_too_large, _pool_padding_over_half))


# --------------------------------------------------------------------------- batch norm


def _draw_batch_norm(draw):
    dims = draw(st.sampled_from([2, 3, 4]), label="ndim")
    channels = draw(st.integers(1, 5), label="channels")
    spatial = tuple(draw(st.integers(1, 6), label="size") for _ in range(dims - 2))
    training = draw(st.booleans(), label="training")
    tracked = draw(st.booleans(), label="running stats")
    batch = draw(st.integers(1 if (not training and tracked) else 2, 5), label="batch")
    shape = (batch, channels) + spatial
    generator = np.random.default_rng(draw(st.integers(0, 2**32 - 1), label="seed"))
    affine = draw(st.booleans(), label="affine")
    return {
        "input": floats(draw, shape),
        "weight": floats(draw, (channels,)) if affine else None,
        "bias": floats(draw, (channels,)) if affine else None,
        "running_mean": generator.standard_normal(channels).astype(np.float32)
        if tracked else None,
        "running_var": generator.uniform(0.1, 3, channels).astype(np.float32)
        if tracked else None,
        "training": training,
        "momentum": draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]), label="momentum"),
        "eps": draw(st.sampled_from([1e-5, 1e-3, 0.1, 1.0]), label="eps"),
        "grad_output": floats(draw, shape),
    }


def _batch_norm_reference(before):
    return ref.batch_norm(as_seen(before["input"]), as_seen(before["weight"]),
                          as_seen(before["bias"]), as_seen(before["running_mean"]),
                          as_seen(before["running_var"]), before["training"],
                          before["momentum"], before["eps"])


def _check_native_batch_norm(result, before):
    y, mean, invstd, _, _ = _batch_norm_reference(before)
    output, save_mean, save_invstd = result
    scale = magnitude(before["input"]) * float(np.max(invstd)) * magnitude(before["weight"])
    terms = np.asarray(before["input"]).size
    assert_matches(output, y, name="output", terms=terms, scale=scale)
    assert_matches(save_mean, mean, name="save_mean", terms=terms,
                    scale=magnitude(before["input"]))
    assert_matches(save_invstd, invstd, name="save_invstd", terms=terms,
                    scale=float(np.max(invstd)) ** 3 * magnitude(before["input"]) ** 2)


def _check_running_stats(before, after):
    _, _, _, new_mean, new_var = _batch_norm_reference(before)
    if before["running_mean"] is None:
        return
    use_batch = before["training"]
    terms = np.asarray(before["input"]).size
    scale = magnitude(before["input"]) ** 2 + magnitude(before["running_var"])
    assert_matches(after["running_mean"], new_mean if use_batch else before["running_mean"],
                    name="running_mean", terms=terms, scale=scale)
    assert_matches(after["running_var"], new_var if use_batch else before["running_var"],
                    name="running_var", terms=terms, scale=scale)


def _check_batch_norm(result, before):
    y = _batch_norm_reference(before)[0]
    invstd = _batch_norm_reference(before)[2]
    assert_matches(result, y, name="output", terms=np.asarray(before["input"]).size,
                    scale=magnitude(before["input"]) * float(np.max(invstd))
                    * magnitude(before["weight"]))


def _bn_stats(before):
    _, mean, invstd, _, _ = _batch_norm_reference(before)
    return mean.astype(np.float32), invstd.astype(np.float32)


def _draw_batch_norm_backward(draw):
    args = _draw_batch_norm(draw)
    mean, invstd = _bn_stats(args)
    args["save_mean"], args["save_invstd"] = mean, invstd
    return args


def _check_batch_norm_backward(result, before):
    use_batch = before["training"] or before["running_mean"] is None
    expected = ref.batch_norm_backward(as_seen(before["grad_output"]), as_seen(before["input"]),
                                       as_seen(before["weight"]), as_seen(before["save_mean"]),
                                       as_seen(before["save_invstd"]), use_batch)
    terms = np.asarray(before["input"]).size
    invstd = float(np.max(before["save_invstd"]))
    scale = (magnitude(before["grad_output"]) * magnitude(before["weight"]) * invstd
             * (1 + magnitude(before["input"]) * invstd) ** 2)
    assert_matches(result[0], expected[0], name="grad_input", terms=terms, scale=scale)
    for index, name in ((1, "grad_weight"), (2, "grad_bias")):
        if before["weight"] is None:
            assert result[index] is None
        else:
            assert_matches(result[index], expected[index], name=name, terms=terms,
                            scale=scale * magnitude(before["input"]))


def _bn_call(a):
    return F.native_batch_norm(a["input"], a["weight"], a["bias"], a["running_mean"],
                               a["running_var"], a["training"], a["momentum"], a["eps"])


def _needs_running(mutation):
    """A running-statistics mutation, on a case that has running statistics."""
    return present(mutation, running_mean=channel_vector(np.zeros), running_var=channel_vector(np.ones))


def _single_value_per_channel(draw, args):
    args["input"] = floats(draw, (1, args["input"].shape[1]))
    args["training"] = True
    args["weight"] = args["bias"] = None
    return ValueError, "input"


def _one_running_buffer(draw, args):
    channels = args["input"].shape[1]
    which = draw(st.sampled_from(["running_mean", "running_var"]), label="given")
    args["running_mean"] = args["running_var"] = None
    args[which] = np.zeros(channels, np.float32)
    return ValueError, "running_var" if which == "running_mean" else "running_mean"


def _updating(mutation):
    """A mutation of ``momentum``, which is only read (and checked) when a training
    forward updates running statistics."""
    def mutate(draw, args):
        args["training"] = True
        errors, names = _needs_running(mutation)(draw, args)
        x = args["input"]
        if x.size <= x.shape[1]:  # one value per channel is itself invalid in training
            args["input"] = np.concatenate([x, x + 1])
        return errors, names
    return mutate


BN_HYPER = (_updating(value("momentum", NON_FINITE, ValueError)),
            value("momentum", NOT_A_NUMBER, TypeError),
            value("eps", NON_FINITE + [-1.0, -1e-9], ValueError),
            value("eps", NOT_A_NUMBER, TypeError))

_weight = present(resize("weight", 0), weight=channel_vector(np.ones))
_bias = present(resize("bias", 0), bias=channel_vector(np.zeros))

SPECS["native_batch_norm"] = Spec(
    call=_bn_call, draw=_draw_batch_norm, check=_check_native_batch_norm,
    layouts=("input", "weight", "bias"), inplace=("running_mean", "running_var"),
    mutations=(non_real("input"), ndim("input", accepted=range(2, 32)),
               zero_size("input"), non_real("weight", required=False),
               non_real("bias", required=False), _weight, _bias,
               _needs_running(resize("running_mean", 0)),
               _needs_running(resize("running_var", 0)),
               # Buffers only read in evaluation may be any array: updated ones may not.
               _updating(inplace("running_mean")), _updating(inplace("running_var")),
               _updating(alias("running_mean", "running_var")),  # read-only in eval
               _one_running_buffer, _single_value_per_channel) + BN_HYPER)

SPECS["batch_norm"] = Spec(
    call=lambda a: F.batch_norm(a["input"], a["running_mean"], a["running_var"], a["weight"],
                                a["bias"], a["training"], a["momentum"], a["eps"]),
    draw=_draw_batch_norm, check=_check_batch_norm,
    layouts=("input", "weight", "bias"), inplace=("running_mean", "running_var"),
    mutations=(non_real("input"), ndim("input", accepted=range(2, 32)),
               zero_size("input"), _weight,
               _updating(inplace("running_mean")), _updating(inplace("running_var")),
               _needs_running(resize("running_var", 0))) + BN_HYPER)

SPECS["batch_norm_backward"] = Spec(
    call=lambda a: F.batch_norm_backward(a["grad_output"], a["input"], a["weight"],
                                         a["save_mean"], a["save_invstd"],
                                         a["training"] or a["running_mean"] is None),
    draw=_draw_batch_norm_backward, check=_check_batch_norm_backward,
    layouts=("grad_output", "input", "weight", "save_mean", "save_invstd"),
    mutations=(non_real("grad_output"), non_real("input"), non_real("save_mean"),
               non_real("save_invstd"),
               ndim("input", accepted=range(2, 32)),
               resize("grad_output", 0), resize("grad_output", 1),
               resize("save_mean", 0), resize("save_invstd", 0), _weight,
               zero_size("input")))


# --------------------------------------------------------------------------- group norm


def _draw_group_norm(draw):
    dims = draw(st.sampled_from([2, 3, 4]), label="ndim")
    groups = draw(st.integers(1, 3), label="groups")
    channels = groups * draw(st.integers(1, 3), label="channels per group")
    spatial = tuple(draw(st.integers(1, 6), label="size") for _ in range(dims - 2))
    shape = (draw(st.integers(1, 4), label="batch"), channels) + spatial
    affine = draw(st.booleans(), label="affine")
    x = floats(draw, shape)
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1, 1.0]), label="eps")
    _, mean, rstd = ref.group_norm(x, groups, eps=eps)
    return {"input": x, "num_groups": groups, "eps": eps,
            "weight": floats(draw, (channels,)) if affine else None,
            "bias": floats(draw, (channels,)) if affine else None,
            "grad_output": floats(draw, shape),
            "mean": mean.astype(np.float32), "rstd": rstd.astype(np.float32)}


def _norm_scales(before, rstd):
    """Tolerance scales of a normalisation's output, rstd and gradients, as for batch norm."""
    x, gy, w = before["input"], before["grad_output"], before["weight"]
    top = float(np.max(rstd))
    output = magnitude(x) * top * magnitude(w) + magnitude(before.get("bias"))
    backward = magnitude(gy) * magnitude(w) * top * (1 + magnitude(x) * top) ** 2
    return output, top ** 3 * magnitude(x) ** 2, backward


def _group_norm_reference(before):
    """(y, mean, rstd) of the reference, and the number of values each statistic sums."""
    x, groups = as_seen(before["input"]), before["num_groups"]
    return (*ref.group_norm(x, groups, as_seen(before["weight"]), as_seen(before["bias"]),
                            before["eps"]), x.size // x.shape[0] // groups)


def _check_norm_forward(reference, with_statistics=True):
    """Check ``(output, mean, rstd)`` (or the output alone) against ``reference(before)``."""
    def check(result, before):
        y, mean, rstd, terms = reference(before)
        output_scale, rstd_scale, _ = _norm_scales(before, rstd)
        output = result[0] if with_statistics else result
        assert_matches(output, y, name="output", terms=terms, scale=output_scale)
        if with_statistics:
            assert_matches(result[1], mean, name="mean", terms=terms,
                           scale=magnitude(before["input"]))
            assert_matches(result[2], rstd, name="rstd", terms=terms, scale=rstd_scale)
    return check


def _check_norm_backward(result, expected, before, terms):
    _, _, scale = _norm_scales(before, before["rstd"])
    assert_matches(result[0], expected[0], name="grad_input", terms=terms, scale=scale)
    for index, name in ((1, "grad_weight"), (2, "grad_bias")):
        if before["weight"] is None:
            assert result[index] is None
        else:
            assert_matches(result[index], expected[index], name=name,
                           terms=np.asarray(before["input"]).size,
                           scale=scale * magnitude(before["input"]))


def _check_group_norm_backward(result, before):
    x = as_seen(before["input"])
    expected = ref.group_norm_backward(as_seen(before["grad_output"]), x,
                                       before["num_groups"], as_seen(before["weight"]),
                                       as_seen(before["mean"]), as_seen(before["rstd"]))
    _check_norm_backward(result, expected, before, x.size // x.shape[0])


def _groups_not_dividing(draw, args):
    args["num_groups"] = np.shape(args["input"])[1] + draw(st.integers(1, 3), label="extra")
    return ValueError, "num_groups"


GROUP_NORM_VECTORS = "input|num_groups|weight|bias"
NUM_GROUPS = (_groups_not_dividing, value("num_groups", [0, -1, 2**64], ValueError),
              value("num_groups", [1.5, "2", None, True], TypeError))
NORM_EPS = (value("eps", NON_FINITE + [-1.0], ValueError), value("eps", NOT_A_NUMBER, TypeError))

SPECS["native_group_norm"] = Spec(
    call=lambda a: F.native_group_norm(a["input"], a["num_groups"], a["weight"], a["bias"],
                                       a["eps"]),
    draw=_draw_group_norm, check=_check_norm_forward(_group_norm_reference),
    layouts=("input", "weight", "bias"),
    mutations=(non_real("input"), ndim("input", GROUP_NORM_VECTORS, accepted=range(2, 32)),
               zero_size("input", GROUP_NORM_VECTORS), non_real("weight", required=False),
               non_real("bias", required=False), _weight, _bias) + NUM_GROUPS + NORM_EPS)

SPECS["group_norm"] = Spec(
    call=lambda a: F.group_norm(a["input"], a["num_groups"], a["weight"], a["bias"],
                                a["eps"]),
    draw=_draw_group_norm, check=_check_norm_forward(_group_norm_reference, False),
    layouts=("input", "weight", "bias"),
    mutations=(non_real("input"), zero_size("input", GROUP_NORM_VECTORS), _weight)
    + NUM_GROUPS + NORM_EPS)

SPECS["group_norm_backward"] = Spec(
    call=lambda a: F.group_norm_backward(a["grad_output"], a["input"], a["num_groups"],
                                         a["weight"], a["mean"], a["rstd"]),
    draw=_draw_group_norm, check=_check_group_norm_backward,
    layouts=("grad_output", "input", "weight", "mean", "rstd"),
    mutations=(non_real("grad_output"), non_real("input"), non_real("mean"),
               non_real("rstd"), resize("grad_output", 0),
               resize("grad_output", 1, "grad_output|input"), resize("mean", 0),
               resize("mean", 1), resize("rstd", 0), _weight,
               zero_size("input", "input|grad_output|num_groups")) + NUM_GROUPS)


def _draw_layer_norm(draw):
    dims = draw(st.integers(1, 4), label="ndim")
    shape = tuple(draw(st.integers(1, 5), label="size") for _ in range(dims))
    k = draw(st.integers(1, dims), label="normalised dims")
    normalized = shape[dims - k:]
    form = draw(st.sampled_from(["tuple", "list"] + (["int"] if k == 1 else [])), label="form")
    affine = draw(st.booleans(), label="affine")
    x = floats(draw, shape)
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1, 1.0]), label="eps")
    _, mean, rstd = ref.layer_norm(x, normalized, eps=eps)
    return {"input": x, "eps": eps,
            "normalized_shape": {"tuple": normalized, "list": list(normalized),
                                 "int": normalized[0]}[form],
            "weight": floats(draw, normalized) if affine else None,
            "bias": floats(draw, normalized) if affine else None,
            "grad_output": floats(draw, shape),
            "mean": mean.astype(np.float32), "rstd": rstd.astype(np.float32)}


def _normalized(before):
    shape = before["normalized_shape"]
    return (shape,) if isinstance(shape, int) else tuple(shape)


def _layer_norm_reference(before):
    normalized = _normalized(before)
    return (*ref.layer_norm(as_seen(before["input"]), normalized, as_seen(before["weight"]),
                            as_seen(before["bias"]), before["eps"]),
            int(np.prod(normalized)))


def _check_layer_norm_backward(result, before):
    x, normalized = as_seen(before["input"]), _normalized(before)
    expected = ref.layer_norm_backward(as_seen(before["grad_output"]), x, normalized,
                                       as_seen(before["weight"]), as_seen(before["mean"]),
                                       as_seen(before["rstd"]))
    _check_norm_backward(result, expected, before, int(np.prod(normalized)))


def _normalized_shape_mismatch(draw, args):
    shape = np.shape(args["input"])
    args["normalized_shape"] = draw(st.sampled_from(
        [(shape[-1] + 1,), (2,) + shape, [shape[-1], 7], ()]), label="normalized_shape")
    return ValueError, "normalized_shape"


def _layer_parameter(arg):
    def mutate(draw, args):
        args[arg] = floats(draw, _normalized(args) + (2,))
        return ValueError, arg
    return mutate


LAYER_SHAPE = (_normalized_shape_mismatch,
               value("normalized_shape", ["3", 2.0, [1.5], None], TypeError))

SPECS["native_layer_norm"] = Spec(
    call=lambda a: F.native_layer_norm(a["input"], a["normalized_shape"], a["weight"],
                                       a["bias"], a["eps"]),
    draw=_draw_layer_norm, check=_check_norm_forward(_layer_norm_reference),
    layouts=("input", "weight", "bias"),
    mutations=(non_real("input"), zero_size("input", "input|normalized_shape"),
               non_real("weight", required=False), _layer_parameter("weight"),
               _layer_parameter("bias")) + LAYER_SHAPE + NORM_EPS)

SPECS["layer_norm"] = Spec(
    call=lambda a: F.layer_norm(a["input"], a["normalized_shape"], a["weight"], a["bias"],
                                a["eps"]),
    draw=_draw_layer_norm, check=_check_norm_forward(_layer_norm_reference, False),
    layouts=("input", "weight", "bias"),
    mutations=(non_real("input"), _layer_parameter("weight")) + LAYER_SHAPE + NORM_EPS)

SPECS["layer_norm_backward"] = Spec(
    call=lambda a: F.layer_norm_backward(a["grad_output"], a["input"], a["normalized_shape"],
                                         a["weight"], a["mean"], a["rstd"]),
    draw=_draw_layer_norm, check=_check_layer_norm_backward,
    layouts=("grad_output", "input", "weight", "mean", "rstd"),
    mutations=(non_real("grad_output"), non_real("input"), non_real("mean"),
               non_real("rstd"), resize("grad_output", 0, "grad_output|input"),
               _layer_parameter("weight")) + LAYER_SHAPE)


def _draw_instance_norm(draw):
    dims = draw(st.sampled_from([3, 4]), label="ndim")
    channels = draw(st.integers(1, 4), label="channels")
    spatial = (draw(st.integers(2, 6), label="size"),) + tuple(
        draw(st.integers(1, 6), label="size") for _ in range(dims - 3))
    shape = (draw(st.integers(1, 4), label="batch"), channels) + spatial
    args = _draw_group_norm(draw)
    x = floats(draw, shape)
    _, mean, rstd = ref.instance_norm(x, eps=args["eps"])
    args.update(input=x, num_groups=channels, grad_output=floats(draw, shape),
                mean=mean.astype(np.float32), rstd=rstd.astype(np.float32),
                weight=floats(draw, (channels,)) if args["weight"] is not None else None,
                bias=floats(draw, (channels,)) if args["bias"] is not None else None)
    return args


def _single_spatial_value(draw, args):
    args["input"] = floats(draw, np.shape(args["input"])[:2] + (1, 1))
    return ValueError, "input"


def _running_statistics(draw, args):
    channels = np.shape(args["input"])[1]
    args["running_mean"] = np.zeros(channels, np.float32)
    return NotImplementedError, "running_mean"


SPECS["instance_norm"] = Spec(
    call=lambda a: F.instance_norm(a["input"], a.get("running_mean"), None, a["weight"],
                                   a["bias"], eps=a["eps"]),
    draw=_draw_instance_norm, check=_check_norm_forward(_group_norm_reference, False),
    layouts=("input", "weight", "bias"),
    mutations=(non_real("input"), _single_spatial_value, _running_statistics, _weight)
    + NORM_EPS)

SPECS["instance_norm_backward"] = Spec(
    call=lambda a: F.instance_norm_backward(a["grad_output"], a["input"], a["weight"],
                                            a["mean"], a["rstd"]),
    draw=_draw_instance_norm, check=_check_group_norm_backward,
    layouts=("grad_output", "input", "weight", "mean", "rstd"),
    mutations=(non_real("grad_output"), non_real("input"), resize("mean", 1),
               resize("grad_output", 1, "grad_output|input"), _single_spatial_value, _weight))


# --------------------------------------------------------------------------- dropout


def _draw_dropout(draw):
    dims = draw(st.integers(1, 4), label="ndim")
    shape = tuple(draw(st.integers(1, 9), label="size") for _ in range(dims))
    return {"input": floats(draw, shape, special=True),
            "p": draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 0.999]), label="p"),
            "training": draw(st.booleans(), label="training"),
            "seed": draw(st.integers(0, 2**64 - 1), label="seed"),
            "n": draw(st.integers(0, 2000), label="n")}


def _draw_dropout2d(draw):
    args = _draw_dropout(draw)
    shape = tuple(draw(st.integers(1, 6), label="size") for _ in range(4))
    args["input"] = floats(draw, shape, special=True)
    return args


def _check_dropout(maps: bool, backward: bool = False):
    def check(result, before):
        x = as_seen(before["input"])
        if (not before["training"] and not backward) or before["p"] == 0.0:
            assert_matches(result, x, name="output")
            return
        # The mask from the reference's own Philox, not from bnrs's dropout_mask.
        if maps:
            keep = ref.dropout2d_keep(ref.dropout_mask(x.shape[0] * x.shape[1], before["p"],
                                                       before["seed"]), x.shape)
        else:
            keep = ref.dropout_mask(x.size, before["p"], before["seed"]).reshape(x.shape)
        expected = ref.dropout(x, keep, before["p"])  # as PyTorch: a dropped NaN stays NaN
        assert_matches(result, expected, name="output", scale=magnitude(x) / (1 - before["p"]))
    return check


def _check_dropout_mask(result, before):
    n, p = before["n"], before["p"]
    assert result.dtype == bool and result.shape == (n,)
    np.testing.assert_array_equal(result, ref.dropout_mask(n, p, before["seed"]))


DROPOUT_MUTATIONS = (non_real("input"), value("p", [1.0, -0.1, 1.5] + NON_FINITE, ValueError),
                     value("p", ["half", None, [0.5]], TypeError),
                     value("seed", [-1, 2**64, 2**70], ValueError),
                     value("seed", [1.5, "1", True, [1]], TypeError))

SPECS["dropout"] = Spec(
    call=lambda a: F.dropout(a["input"], a["p"], a["training"], a["seed"]),
    draw=_draw_dropout, check=_check_dropout(maps=False), layouts=("input",),
    mutations=DROPOUT_MUTATIONS)
SPECS["dropout_backward"] = Spec(
    call=lambda a: F.dropout_backward(a["input"], a["p"], a["seed"]),
    draw=_draw_dropout, check=_check_dropout(maps=False, backward=True), layouts=("input",),
    mutations=(non_real("input", names="grad_output"),) + DROPOUT_MUTATIONS[1:])
SPECS["dropout2d"] = Spec(
    call=lambda a: F.dropout2d(a["input"], a["p"], a["training"], a["seed"]),
    draw=_draw_dropout2d, check=_check_dropout(maps=True), layouts=("input",),
    mutations=DROPOUT_MUTATIONS + (ndim("input"),))
SPECS["dropout2d_backward"] = Spec(
    call=lambda a: F.dropout2d_backward(a["input"], a["p"], a["seed"]),
    draw=_draw_dropout2d, check=_check_dropout(maps=True, backward=True),
    layouts=("input",),
    mutations=(non_real("input", names="grad_output"), ndim("input", "grad_output"))
    + DROPOUT_MUTATIONS[1:])
SPECS["dropout_mask"] = Spec(
    call=lambda a: F.dropout_mask(a["n"], a["p"], a["seed"]),
    draw=_draw_dropout, check=_check_dropout_mask,
    mutations=(value("n", [-1, -(2**40), 2**64], ValueError),
               value("n", [1.5, "3", None, True], TypeError),
               value("n", [2**62, 2**63 - 1], (MemoryError, ValueError),
                     "n|mask"),
               value("p", [1.0, -0.5] + NON_FINITE, ValueError),
               value("seed", [-1, 2**64], ValueError)))


# --------------------------------------------------------------------------- linear


def _draw_linear(draw):
    n, features, units = (draw(st.integers(1, 5), label="batch"),
                          draw(st.integers(1, 17), label="in_features"),
                          draw(st.integers(1, 17), label="out_features"))
    return {"input": floats(draw, (n, features), special=True),
            "weight": floats(draw, (units, features)),
            "bias": floats(draw, (units,)) if draw(st.booleans(), label="bias") else None,
            "grad_output": floats(draw, (n, units)),
            "input_grad": draw(st.booleans(), label="input_grad")}


def _draw_linear_finite(draw):
    args = _draw_linear(draw)
    args["input"] = np.nan_to_num(args["input"], posinf=1.0, neginf=-1.0)
    return args


def _check_linear(result, before):
    x, w, b = as_seen(before["input"]), as_seen(before["weight"]), as_seen(before["bias"])
    assert_matches(result, ref.linear(x, w, b), name="output", terms=w.shape[1],
                    scale=magnitude(x) * magnitude(w) + magnitude(b))


def _check_linear_backward(result, before):
    gy, x, w = (as_seen(before[k]) for k in ("grad_output", "input", "weight"))
    grad_input, grad_weight, grad_bias = ref.linear_backward(gy, x, w)
    if before["input_grad"]:
        assert_matches(result[0], grad_input, name="grad_input", terms=w.shape[0],
                        scale=magnitude(gy) * magnitude(w))
    else:
        assert result[0] is None
    assert_matches(result[1], grad_weight, name="grad_weight", terms=x.shape[0],
                    scale=magnitude(gy) * magnitude(x))
    if before["bias"] is not None:
        assert_matches(result[2], grad_bias, name="grad_bias", terms=x.shape[0],
                        scale=magnitude(gy))
    else:
        assert result[2] is None


SPECS["linear"] = Spec(
    call=lambda a: F.linear(a["input"], a["weight"], a["bias"]),
    draw=_draw_linear, check=_check_linear, layouts=("input", "weight", "bias"),
    mutations=(non_real("input"), non_real("weight"), non_real("bias", required=False),
               ndim("input"), ndim("weight"), zero_size("input"), zero_size("weight"),
               resize("weight", 1), _bias_length,
               _huge_view("weight", lambda a: (HUGE, a["weight"].shape[1])),
               _huge_view("input", lambda a: (HUGE, a["input"].shape[1]))))

SPECS["linear_backward"] = Spec(
    call=lambda a: F.linear_backward(a["grad_output"], a["input"], a["weight"],
                                     a["bias"] is not None, a["input_grad"]),
    draw=_draw_linear_finite, check=_check_linear_backward,
    layouts=("grad_output", "input", "weight"),
    mutations=(non_real("grad_output"), non_real("input"), non_real("weight"),
               ndim("grad_output"), ndim("input"), ndim("weight"),
               resize("grad_output", 0), resize("grad_output", 1),
               resize("weight", 1), zero_size("input")))


# --------------------------------------------------------------------------- activations


def _draw_elementwise(draw):
    dims = draw(st.integers(0, 4), label="ndim")
    shape = tuple(draw(st.integers(0 if dims else 1, 9), label="size") for _ in range(dims))
    x = floats(draw, shape, special=True)
    return {"input": x, "grad_output": floats(draw, shape),
            "negative_slope": draw(st.sampled_from([0.01, 0.0, 0.2, 1.0, -0.5, 3.0]),
                                   label="negative_slope")}


def _forward_check(reference, slope=False):
    def check(result, before):
        x = as_seen(before["input"])
        expected = reference(x, before["negative_slope"]) if slope else reference(x)
        # PyTorch propagates NaN through every activation; the references compare
        # (NaN > 0 is False) and would give 0 for ReLU.
        expected = np.where(np.isnan(x), np.nan, expected)
        assert_matches(result, expected, name="output",
                        scale=magnitude(x) * (abs(before["negative_slope"]) if slope else 1))
    return check


def _backward_check(reference, saved, slope=False):
    def check(result, before):
        gy, s = as_seen(before["grad_output"]), as_seen(before["input"])
        s = np.nan_to_num(s, nan=0.5, posinf=1.0, neginf=-1.0) if saved == "output" else s
        expected = reference(gy, s, before["negative_slope"]) if slope else reference(gy, s)
        assert_matches(result, expected, name="grad_input", scale=magnitude(gy) * magnitude(s)
                        * max(1.0, abs(before["negative_slope"])))
    return check


def _backward_args(saved):
    """Backward cases: the saved tensor (input or output) is the drawn ``input``; outputs
    of sigmoid/tanh are kept finite."""
    def draw_args(draw):
        args = _draw_elementwise(draw)
        if saved == "output":
            args["input"] = np.nan_to_num(args["input"], nan=0.5, posinf=1.0, neginf=-1.0)
        return args
    return draw_args


ACTIVATION_MUTATIONS = (non_real("input"),)


def _activation_backward_mutations(saved):
    return (non_real("grad_output"), non_real("input", names=saved),
            resize_elementwise("grad_output", "grad_output"))


def resize_elementwise(arg, names):
    """A grad_output whose shape differs from the saved tensor's."""
    def mutate(draw, args):
        shape = np.shape(args[arg])
        options = [shape + (2,), (3,) + shape] + (
            [shape[:-1] + (shape[-1] + 1,)] if shape else [])
        args[arg] = floats(draw, draw(st.sampled_from(options), label="shape"))
        return ValueError, names
    return mutate


SLOPE_MUTATIONS = (value("negative_slope", NON_FINITE, ValueError),
                   value("negative_slope", NOT_A_NUMBER, TypeError))

for _name, _forward, _reference, _slope in (
        ("relu", lambda a: F.relu(a["input"]), ref.relu, False),
        ("leaky_relu", lambda a: F.leaky_relu(a["input"], a["negative_slope"]),
         ref.leaky_relu, True),
        ("sigmoid", lambda a: F.sigmoid(a["input"]), ref.sigmoid, False),
        ("tanh", lambda a: F.tanh(a["input"]), ref.tanh, False)):
    SPECS[_name] = Spec(call=_forward, draw=_draw_elementwise,
                        check=_forward_check(_reference, _slope), layouts=("input",),
                        mutations=ACTIVATION_MUTATIONS + (SLOPE_MUTATIONS if _slope else ()))

for _name, _backward, _reference, _saved, _slope in (
        ("relu_backward", lambda a: F.relu_backward(a["grad_output"], a["input"]),
         ref.relu_backward, "input", False),
        ("leaky_relu_backward",
         lambda a: F.leaky_relu_backward(a["grad_output"], a["input"], a["negative_slope"]),
         ref.leaky_relu_backward, "input", True),
        ("sigmoid_backward", lambda a: F.sigmoid_backward(a["grad_output"], a["input"]),
         ref.sigmoid_backward, "output", False),
        ("tanh_backward", lambda a: F.tanh_backward(a["grad_output"], a["input"]),
         ref.tanh_backward, "output", False)):
    SPECS[_name] = Spec(call=_backward, draw=_backward_args(_saved),
                        check=_backward_check(_reference, _saved, _slope),
                        layouts=("grad_output", "input"),
                        mutations=_activation_backward_mutations(_saved)
                        + (SLOPE_MUTATIONS if _slope else ()))


# --------------------------------------------------------------------------- loss


def _draw_logits(draw):
    n, classes = draw(st.integers(1, 5), label="batch"), draw(st.integers(1, 17),
                                                              label="classes")
    logits = floats(draw, (n, classes))
    if draw(st.booleans(), label="large logits"):
        logits = logits * np.float32(draw(st.sampled_from([1e2, 1e4, 1e30]), label="×"))
    generator = np.random.default_rng(draw(st.integers(0, 2**32 - 1), label="seed"))
    output = ref.log_softmax(logits).astype(np.float32)
    return {"input": logits, "target": generator.integers(0, classes, n),
            "grad_output": floats(draw, (n, classes)), "output": output,
            "dim": draw(st.sampled_from([1, -1]), label="dim")}


def _check_log_softmax(result, before):
    x = as_seen(before["input"])
    assert_matches(result, ref.log_softmax(x), name="output", terms=x.shape[1],
                    scale=magnitude(x))


def _check_log_softmax_backward(result, before):
    gy = as_seen(before["grad_output"])
    expected = ref.log_softmax_backward(gy, as_seen(before["output"]))
    assert_matches(result, expected, name="grad_input", terms=gy.shape[1], scale=magnitude(gy))


def _check_cross_entropy(result, before):
    x = as_seen(before["input"])
    expected = ref.cross_entropy(x, np.asarray(before["target"], np.int64))
    assert isinstance(result, float)
    assert_matches(np.float64(result), expected, name="loss", terms=x.size,
                    scale=magnitude(x), dtype=None)


def _check_cross_entropy_backward(result, before):
    x = as_seen(before["input"])
    expected = ref.cross_entropy_backward(x, np.asarray(before["target"], np.int64))
    assert_matches(result, expected, name="grad_input", terms=x.shape[1])


def _bad_target(draw, args):
    classes = args["input"].shape[1]
    n = args["input"].shape[0]
    choices = {
        "float": (np.zeros(n), TypeError), "negative": (np.full(n, -1), ValueError),
        "too_large": (np.full(n, classes), ValueError),
        "huge": (np.full(n, 2**62), ValueError),
        "length": (np.zeros(n + 1, np.int64), ValueError),
        "2d": (np.zeros((n, 1), np.int64), ValueError), "bool": (np.zeros(n, bool), TypeError),
        "str": (np.array(["0"] * n), TypeError), "ragged": ([[0], [0, 1]], ValueError),
    }
    target, error = choices[draw(st.sampled_from(sorted(choices)), label="target")]
    args["target"] = target
    return error, "target"


LOSS_MUTATIONS = (non_real("input"), ndim("input"), zero_size("input"))

SPECS["log_softmax"] = Spec(call=lambda a: F.log_softmax(a["input"], a["dim"]),
                            draw=_draw_logits, check=_check_log_softmax, layouts=("input",),
                            mutations=LOSS_MUTATIONS + (
                                value("dim", [0, 2, -2, None, "1"], ValueError, "dim"),))
SPECS["log_softmax_backward"] = Spec(
    call=lambda a: F.log_softmax_backward(a["grad_output"], a["output"], a["dim"]),
    draw=_draw_logits, check=_check_log_softmax_backward, layouts=("grad_output", "output"),
    mutations=(non_real("grad_output"), non_real("output"), ndim("output"),
               resize("grad_output", 1), resize("grad_output", 0)))
SPECS["cross_entropy"] = Spec(call=lambda a: F.cross_entropy(a["input"], a["target"]),
                              draw=_draw_logits, check=_check_cross_entropy,
                              layouts=("input", "target"),
                              mutations=LOSS_MUTATIONS + (_bad_target,))
SPECS["cross_entropy_backward"] = Spec(
    call=lambda a: F.cross_entropy_backward(a["input"], a["target"]),
    draw=_draw_logits, check=_check_cross_entropy_backward, layouts=("input", "target"),
    mutations=LOSS_MUTATIONS + (_bad_target,))


# --------------------------------------------------------------------------- optimizer steps


def _draw_step(draw):
    dims = draw(st.integers(1, 3), label="ndim")
    shape = tuple(draw(st.integers(1, 9), label="size") for _ in range(dims))
    momentum = draw(st.sampled_from([0.0, 0.5, 0.9]), label="momentum")
    dampening = draw(st.sampled_from([0.0, 0.1]), label="dampening")
    generator = np.random.default_rng(draw(st.integers(0, 2**32 - 1), label="seed"))

    def buffer(nonnegative=False):
        values = generator.standard_normal(shape)
        return np.abs(values).astype(np.float32) if nonnegative else values.astype(np.float32)

    return {"param": buffer(), "grad": floats(draw, shape),
            "momentum_buffer": buffer() if momentum else (
                buffer() if draw(st.booleans(), label="buffer anyway") else None),
            "exp_avg": buffer(), "exp_avg_sq": buffer(nonnegative=True),
            "lr": draw(st.sampled_from([0.0, 1e-3, 0.1, 1.0]), label="lr"),
            "momentum": momentum, "dampening": dampening,
            "nesterov": momentum > 0 and dampening == 0 and draw(st.booleans(), label="nest"),
            "weight_decay": draw(st.sampled_from([0.0, 1e-4, 0.1]), label="weight_decay"),
            "first_step": draw(st.booleans(), label="first_step"),
            "step": draw(st.integers(1, 10**6), label="step"),
            "beta1": draw(st.sampled_from([0.0, 0.5, 0.9]), label="beta1"),
            "beta2": draw(st.sampled_from([0.0, 0.9, 0.999]), label="beta2"),
            "eps": draw(st.sampled_from([1e-8, 1e-3, 1.0]), label="eps"),
            "decoupled": draw(st.booleans(), label="decoupled")}


SGD_KEYS = ("lr", "momentum", "dampening", "nesterov", "weight_decay", "first_step")
ADAM_KEYS = ("lr", "beta1", "beta2", "eps", "weight_decay")


def _sgd_call(a):
    return F.sgd_step(a["param"], a["grad"], a["momentum_buffer"],
                      **{key: a[key] for key in SGD_KEYS})


def _adam_call(a):
    return F.adam_step(a["param"], a["grad"], a["exp_avg"], a["exp_avg_sq"], a["step"],
                       decoupled_weight_decay=a["decoupled"],
                       **{key: a[key] for key in ADAM_KEYS})


def _check_sgd(result, before, after):
    assert result is None
    param, buffer = ref.sgd_step(as_seen(before["param"]), as_seen(before["grad"]),
                                 as_seen(before["momentum_buffer"]),
                                 **{key: before[key] for key in SGD_KEYS})
    scale = (magnitude(before["param"]) + magnitude(before["grad"])
             + magnitude(before["momentum_buffer"])) * 2
    assert_matches(after["param"], param, name="param", scale=scale)
    if buffer is not None:
        assert_matches(after["momentum_buffer"], buffer, name="momentum_buffer", scale=scale)
    elif before["momentum_buffer"] is not None:
        assert identical(after["momentum_buffer"], before["momentum_buffer"])


def _check_adam(result, before, after):
    assert result is None
    hyper = {key: as_float32_scalar(before[key]) for key in ADAM_KEYS}
    param, exp_avg, exp_avg_sq = ref.adam_step(
        as_seen(before["param"]), as_seen(before["grad"]), as_seen(before["exp_avg"]),
        as_seen(before["exp_avg_sq"]), before["step"], decoupled_weight_decay=before["decoupled"],
        **hyper)
    # Twice the float32 rounding of the update's terms: a wrong update (halved, a lost
    # bias correction) is off by far more unless it is below param's own rounding.
    bounds = adam_step_bounds(before["param"], before["grad"], before["exp_avg"],
                              before["exp_avg_sq"], before["step"],
                              decoupled=before["decoupled"], **hyper)
    for name, expected, bound in zip(("param", "exp_avg", "exp_avg_sq"),
                                     (param, exp_avg, exp_avg_sq), bounds):
        assert_within(after[name], expected, 2 * bound, name=name)


STEP_HYPER = (value("lr", NON_FINITE + [-0.1], ValueError),
              value("lr", NOT_A_NUMBER, TypeError),
              value("weight_decay", NON_FINITE + [-1.0], ValueError))

SPECS["sgd_step"] = Spec(
    call=_sgd_call, draw=_draw_step, check=_check_sgd, layouts=("grad",),
    inplace=("param", "momentum_buffer"),
    mutations=(inplace("param"),
               present(inplace("momentum_buffer"),
                       momentum_buffer=lambda a: np.zeros_like(a["param"])),
               present(resize("momentum_buffer", 0),
                       momentum_buffer=lambda a: np.zeros_like(a["param"])),
               non_real("grad"), resize("grad", 0), alias("param", "momentum_buffer"),
               value("momentum", NON_FINITE + [-0.5], ValueError),
               value("dampening", NON_FINITE, ValueError),
               value("momentum", NOT_A_NUMBER, TypeError)) + STEP_HYPER)

SPECS["adam_step"] = Spec(
    call=_adam_call, draw=_draw_step, check=_check_adam, layouts=("grad",),
    inplace=("param", "exp_avg", "exp_avg_sq"),
    mutations=(inplace("param"), inplace("exp_avg"), inplace("exp_avg_sq"),
               non_real("grad"), resize("grad", 0), resize("exp_avg", 0),
               resize("exp_avg_sq", 0), alias("param", "exp_avg"),
               alias("exp_avg", "exp_avg_sq"),
               value("step", [0, -1, 2**64], ValueError),
               value("step", [1.5, "1", None, True], TypeError),
               value("beta1", NON_FINITE + [1.0, -0.1], ValueError),
               value("beta2", NON_FINITE + [1.0, 2.0], ValueError),
               value("eps", NON_FINITE + [-1.0], ValueError),
               value("beta1", NOT_A_NUMBER, TypeError)) + STEP_HYPER)


# --------------------------------------------------------------------------- the tests

IN_PLACE_CHECKS = {"sgd_step": _check_sgd, "adam_step": _check_adam}


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
    if name in IN_PLACE_CHECKS:
        IN_PLACE_CHECKS[name](result, before, args)
    else:
        spec.check(result, before)
    if name in ("native_batch_norm", "batch_norm"):
        _check_running_stats(before, args)
    for key, original in before.items():
        if key not in spec.inplace:
            assert identical(args[key], original) if isinstance(original, np.ndarray) else True, (
                f"{name} modified its argument {key}")
    longrun.CASES[f"F.{name} (valid)"] += 1


@pytest.mark.parametrize("name", sorted(SPECS))
@FUZZ
@given(data=st.data())
def test_invalid_input_raises_naming_the_argument(name, data):
    spec = SPECS[name]
    args = spec.draw(data.draw)
    mutation = data.draw(st.sampled_from(spec.mutations), label="mutation")
    errors, names = mutation(data.draw, args)
    assert_rejected(lambda: spec.call(args), args, errors, names, name)
    longrun.CASES[f"F.{name} (invalid)"] += 1


# --------------------------------------------------------------------------- known bugs


@pytest.mark.parametrize("output", [np.zeros((2, 3, 4), np.float32),
                                    np.zeros((0, 3), np.float32)])
def test_log_softmax_backward_names_its_output_argument(output):
    with pytest.raises(ValueError, match=r"^output\b"):
        F.log_softmax_backward(np.zeros(output.shape, np.float32), output)
