"""Stateless operations with PyTorch's names, over the Rust kernels in ``bnrs._core``.

Every forward takes the arguments of its ``torch.nn.functional`` namesake. Each has a
``*_backward`` counterpart that returns the gradients of its inputs; what a backward needs
from its forward (max-pool indices, batch-norm statistics, the dropout seed) is passed to it
explicitly.

Input rule
----------
Arrays that are already ``float32``, C-contiguous and aligned are passed to the kernels
without a copy. Any other real-valued array (float16/float64, signed or unsigned integers,
any memory order, stride or alignment) is converted once to a new ``float32`` C-contiguous
array; the caller's array is never modified. Boolean, complex, object and string arrays
raise ``TypeError``; a conversion larger than the machine's memory (e.g. of a broadcast
view) raises ``MemoryError`` before allocating. Buffers updated in place (batch-norm running
statistics, optimizer parameters and state) must already be writeable, aligned ``float32``
C-contiguous arrays, or ``TypeError``/``ValueError`` is raised: converting them would
silently drop the update. Hyper-parameters that are not numbers raise ``TypeError``, and
ints beyond 64 bits ``ValueError``, each naming the argument.

Shapes are NCHW for 4-D inputs; conv weights are ``(out_channels, in_channels, kh, kw)``;
linear weights are ``(out_features, in_features)`` and ``linear(x, w, b) = x @ w.T + b``.
"""

from __future__ import annotations

import secrets
from typing import Optional, Tuple, Union

import numpy as np

from . import _core
from ._validation import as_real, check_int, check_int_pair, check_int_tuple, check_real

IntPair = Union[int, Tuple[int, int]]

__all__ = [
    "conv2d",
    "conv2d_backward",
    "max_pool2d",
    "max_pool2d_backward",
    "avg_pool2d",
    "avg_pool2d_backward",
    "batch_norm",
    "native_batch_norm",
    "batch_norm_backward",
    "dropout",
    "dropout2d",
    "dropout_backward",
    "dropout2d_backward",
    "dropout_mask",
    "linear",
    "linear_backward",
    "relu",
    "relu_backward",
    "leaky_relu",
    "leaky_relu_backward",
    "sigmoid",
    "sigmoid_backward",
    "tanh",
    "tanh_backward",
    "log_softmax",
    "log_softmax_backward",
    "cross_entropy",
    "cross_entropy_backward",
    "sgd_step",
    "adam_step",
    "native_group_norm",
    "group_norm",
    "group_norm_backward",
    "native_layer_norm",
    "layer_norm",
    "layer_norm_backward",
    "native_instance_norm",
    "instance_norm",
    "instance_norm_backward",
]


# --------------------------------------------------------------------------- coercion


def as_float32(array, name: str) -> np.ndarray:
    """Return ``array`` as a float32 C-contiguous ndarray, copying only when needed.

    Raises ``TypeError`` naming ``name`` for non-real dtypes (bool, complex, object, str),
    ``ValueError`` for what NumPy cannot make an array of (ragged nested lists), and
    ``MemoryError`` before converting an array larger than this machine's memory (a
    broadcast view is tiny until it is copied).
    """
    arr = _asarray(array, name)
    if arr.dtype.kind not in "fiu":
        raise TypeError(
            f"{name}: expected a real-valued numeric array (float or integer), "
            f"got dtype {arr.dtype}"
        )
    # An unaligned float32 buffer (e.g. np.frombuffer at an odd offset) cannot be read
    # as a Rust slice, so it is copied like any other layout.
    if arr.dtype == np.float32 and arr.flags.c_contiguous and arr.flags.aligned:
        return arr
    check_fits_in_memory(name, arr.size, np.dtype(np.float32).itemsize)
    try:
        return np.require(arr, np.float32, ["C_CONTIGUOUS", "ALIGNED"])
    except MemoryError as error:
        raise MemoryError(f"{name}: converting to float32 failed: {error}") from None


def _asarray(value, name: str) -> np.ndarray:
    """``np.asarray(value)``, with an error that names the argument."""
    if isinstance(value, np.ndarray):
        return value
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{name}: cannot be converted to an array: {error}") from None


def check_fits_in_memory(name: str, elements: int, itemsize: int) -> None:
    """Raise ``MemoryError`` naming ``name`` if ``elements`` items exceed physical memory.

    Checked before allocating, so that an impossible request fails with an exception
    instead of being granted by an overcommitting OS and then killed when touched.
    """
    _core.check_fits_in_memory(name, int(elements), int(itemsize))


def _optional_float32(array, name: str) -> Optional[np.ndarray]:
    return None if array is None else as_float32(array, name)


def _inplace_float32(array, name: str) -> np.ndarray:
    """Check a buffer the kernels update in place: float32, C-contiguous, writeable."""
    if not isinstance(array, np.ndarray):
        raise TypeError(
            f"{name}: expected a numpy.ndarray updated in place, got {type(array).__name__}"
        )
    if array.dtype != np.float32:
        raise TypeError(
            f"{name}: is updated in place, so it must be float32; got dtype {array.dtype}"
        )
    if not array.flags.c_contiguous:
        raise ValueError(f"{name}: is updated in place, so it must be C-contiguous")
    if not array.flags.aligned:
        raise ValueError(f"{name}: is updated in place, so it must be aligned (not a view "
                         "at an odd byte offset)")
    if not array.flags.writeable:
        raise ValueError(f"{name}: is updated in place, but the array is read-only")
    return array


def _pair(value, name: str) -> Tuple[int, int]:
    """Expand an int or a 2-sequence of ints to a pair, as PyTorch's ``_pair`` does."""
    first, second = check_int_pair(value, name)
    return _int64(first, name), _int64(second, name)


def _int64(value, name: str) -> int:
    """``int(value)``, or ValueError naming ``name`` when it does not fit in 64 bits."""
    value = int(value)
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"{name}: {value} is out of range (a 64-bit integer)")
    return value


def _count(value, name: str, minimum: int) -> int:
    """An int in [minimum, 2**63), or TypeError/ValueError naming ``name``."""
    return check_int(value, name, minimum, 2**63 - 1)


_real = as_real


def _labels(target, logits: np.ndarray) -> np.ndarray:
    arr = _asarray(target, "target")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"target: expected integer class indices, got dtype {arr.dtype}")
    # Logits of another shape are the kernel's to report, before any class index.
    classes = f"[0, {logits.shape[1]})" if logits.ndim == 2 else "[0, C)"
    return _as_int64(arr, "target", f"class indices in {classes}", "class index")


def _as_int64(arr: np.ndarray, name: str, expected: str, element: str) -> np.ndarray:
    """Integer ``arr`` as C-contiguous int64 for the kernels. An unsigned value past int64
    is refused here, as given: the cast would wrap 2**64 - 1 to -1, and the kernel's
    message would report -1."""
    if arr.dtype.kind == "u" and arr.size:
        past_int64 = arr > np.iinfo(np.int64).max
        if past_int64.any():
            value = int(arr[past_int64][0])
            raise ValueError(f"{name}: expected {expected}, got {element} {value}")
    return np.require(arr, np.int64, ["C_CONTIGUOUS", "ALIGNED"])


def _seed(seed) -> int:
    if seed is None:
        return secrets.randbits(64)
    return check_int(seed, "seed", 0, 2**64 - 1)


def _probability(p) -> float:
    return check_real(as_real(p, "p"), "p", 0.0, 1.0, high_open=True)


# --------------------------------------------------------------------------- conv2d


def conv2d(input, weight, bias=None, stride: IntPair = 1, padding: IntPair = 0,
           dilation: IntPair = 1, groups: int = 1) -> np.ndarray:
    """2-D convolution (cross-correlation, as in PyTorch).

    Parameters
    ----------
    input : array_like, shape (N, C_in, H, W)
    weight : array_like, shape (C_out, C_in / groups, kH, kW)
    bias : array_like, shape (C_out,), optional
    stride, padding, dilation : int or (int, int)
        Per-axis (height, width) or one value for both. Padding is zeros.
    groups : int, default 1
        Channel groups, as PyTorch's: output channel block g (of C_out / groups) sees
        input channel block g (of C_in / groups) only; both counts divisible by
        ``groups``. ``groups == C_in`` is a depthwise convolution (C_out a multiple of
        C_in, the depth multiplier), run by a per-channel stencil.

    Returns
    -------
    ndarray, float32, shape (N, C_out, H_out, W_out)
        ``H_out = (H + 2*pad_h - dil_h*(kH - 1) - 1) // stride_h + 1``, likewise W_out.
    """
    return _core.conv2d_forward(
        as_float32(input, "input"), as_float32(weight, "weight"),
        _optional_float32(bias, "bias"), _pair(stride, "stride"),
        _pair(padding, "padding"), _pair(dilation, "dilation"), groups=_groups(groups))


def _groups(groups) -> int:
    """An int >= 1 (a bool or float raises TypeError); divisibility is the kernel's check,
    which knows the channel counts."""
    return _count(groups, "groups", 1)


def _conv2d_fused(input, weight, bias, stride, padding, dilation, activation=None,
                  negative_slope: float = 0.0, pool: Optional[str] = None,
                  groups: int = 1) -> np.ndarray:
    """:func:`conv2d` with ``activation`` (None or a name: relu, leaky_relu, sigmoid, tanh)
    applied to each output tile inside the kernel: the bits of the activation applied
    afterwards, without a second pass over the output. ``pool`` ("max" or "avg") then
    applies a 2×2, stride-2 unpadded pool to each image's output in cache: the bits of
    :func:`max_pool2d` / :func:`avg_pool2d` afterwards. For the evaluation-mode fusion."""
    return _core.conv2d_forward(
        as_float32(input, "input"), as_float32(weight, "weight"),
        _optional_float32(bias, "bias"), _pair(stride, "stride"),
        _pair(padding, "padding"), _pair(dilation, "dilation"), activation,
        _real(negative_slope, "negative_slope"), pool, _groups(groups))


def _conv2d_pooled_chain(input, first: tuple, second: tuple) -> np.ndarray:
    """Two :func:`_conv2d_fused` calls with a pool, ``second`` on ``first``'s output, in
    one kernel call that takes each image through both blocks while the first's output
    is in cache: the bits of the two calls. Each block is a tuple (weight, bias, stride,
    padding, dilation, activation, negative_slope, pool, groups), as
    :func:`_conv2d_fused` takes them, ``pool`` "max" or "avg"."""
    def block(weight, bias, stride, padding, dilation, activation, negative_slope, pool,
              groups):
        return (as_float32(weight, "weight"), _optional_float32(bias, "bias"),
                _pair(stride, "stride"), _pair(padding, "padding"),
                _pair(dilation, "dilation"), activation,
                _real(negative_slope, "negative_slope"), pool, _groups(groups))

    return _core.conv2d_pooled_chain(as_float32(input, "input"), block(*first),
                                     block(*second))


def conv2d_backward(grad_output, input, weight, stride: IntPair = 1, padding: IntPair = 0,
                    dilation: IntPair = 1, bias: bool = True, input_grad: bool = True,
                    groups: int = 1):
    """Gradients of :func:`conv2d`.

    Parameters
    ----------
    grad_output : array_like, shape (N, C_out, H_out, W_out)
    input, weight : the forward's arguments
    stride, padding, dilation, groups : the forward's arguments
    bias : bool
        Whether the forward had a bias (then ``grad_bias`` is returned, else None).
    input_grad : bool
        Compute ``grad_input``; a network's first layer can skip it (then None).

    Returns
    -------
    grad_input : ndarray (N, C_in, H, W) or None
    grad_weight : ndarray (C_out, C_in / groups, kH, kW)
    grad_bias : ndarray (C_out,) or None
    """
    return _core.conv2d_backward(
        as_float32(grad_output, "grad_output"), as_float32(input, "input"),
        as_float32(weight, "weight"), _pair(stride, "stride"), _pair(padding, "padding"),
        _pair(dilation, "dilation"), bool(bias), bool(input_grad), _groups(groups))


# --------------------------------------------------------------------------- pooling


def max_pool2d(input, kernel_size: IntPair, stride: Optional[IntPair] = None,
               padding: IntPair = 0, return_indices: bool = False):
    """2-D max pooling (``ceil_mode=False``, dilation 1); padding counts as -inf.

    Returns
    -------
    output : ndarray (N, C, H_out, W_out)
    indices : ndarray of int64, same shape, only if ``return_indices``
        The argmax as a flat index into each input H×W plane, as PyTorch returns it;
        pass it to :func:`max_pool2d_backward`. Ties keep the first maximum; NaN wins.
    """
    kernel = _pair(kernel_size, "kernel_size")
    out, indices = _core.max_pool2d_forward(
        as_float32(input, "input"), kernel,
        kernel if stride is None else _pair(stride, "stride"), _pair(padding, "padding"),
        bool(return_indices))
    return (out, indices) if return_indices else out


def max_pool2d_backward(grad_output, indices, input_shape) -> np.ndarray:
    """Input gradient of :func:`max_pool2d` from its ``indices``.

    Each output gradient is added at its argmax; overlapping windows accumulate.
    ``input_shape`` is the forward input's shape (N, C, H, W).
    """
    idx = _asarray(indices, "indices")
    if idx.dtype.kind not in "iu":
        raise TypeError(f"indices: expected an integer array, got dtype {idx.dtype}")
    shape = _shape4(input_shape)
    plane = f"an H×W plane of {shape[2] * shape[3]} elements"
    return _core.max_pool2d_backward(
        as_float32(grad_output, "grad_output"),
        _as_int64(idx, "indices", f"flat indices into {plane}", "index"), shape)


def avg_pool2d(input, kernel_size: IntPair, stride: Optional[IntPair] = None,
               padding: IntPair = 0, count_include_pad: bool = True) -> np.ndarray:
    """2-D average pooling (``ceil_mode=False``).

    With ``count_include_pad`` (the default, as in PyTorch) every window divides by
    kH*kW even where it overlaps the zero padding; otherwise by the number of input
    elements it covers.
    """
    kernel = _pair(kernel_size, "kernel_size")
    return _core.avg_pool2d_forward(
        as_float32(input, "input"), kernel,
        kernel if stride is None else _pair(stride, "stride"), _pair(padding, "padding"),
        bool(count_include_pad))


def avg_pool2d_backward(grad_output, input_shape, kernel_size: IntPair,
                        stride: Optional[IntPair] = None, padding: IntPair = 0,
                        count_include_pad: bool = True) -> np.ndarray:
    """Input gradient of :func:`avg_pool2d`; ``input_shape`` is (N, C, H, W)."""
    kernel = _pair(kernel_size, "kernel_size")
    return _core.avg_pool2d_backward(
        as_float32(grad_output, "grad_output"), _shape4(input_shape), kernel,
        kernel if stride is None else _pair(stride, "stride"), _pair(padding, "padding"),
        bool(count_include_pad))


def _shape4(shape) -> Tuple[int, int, int, int]:
    dims = check_int_tuple(shape, "input_shape", (4,), description="4 ints (N, C, H, W)")
    return tuple(_int64(d, "input_shape") for d in dims)  # type: ignore[return-value]


# --------------------------------------------------------------------------- batch norm


def native_batch_norm(input, weight=None, bias=None, running_mean=None, running_var=None,
                      training: bool = False, momentum: float = 0.1, eps: float = 1e-5):
    """Batch normalisation returning what its backward needs.

    Statistics are per channel (axis 1) over every other axis: (N, H, W) for a 4-D input,
    N for a 2-D (N, C) input, (N, L) for a 3-D one.

    In training (or when ``running_mean``/``running_var`` are None) the input is normalised
    with the batch mean and *biased* variance; if running buffers are given they are
    updated in place: ``running = (1 - momentum) * running + momentum * batch_stat``, with
    the *unbiased* batch variance for ``running_var`` (PyTorch's rule). A training batch
    with a single value per channel raises ``ValueError``. In evaluation the running
    statistics are used and left unchanged.

    Buffers updated in place (training) must be writeable float32 C-contiguous arrays;
    buffers only read (evaluation) may be of any real dtype or layout, and read-only.

    Returns
    -------
    output : ndarray, same shape as input
    save_mean, save_invstd : ndarray (C,)
        The mean and 1/sqrt(var + eps) that were used; pass them to
        :func:`batch_norm_backward`.
    """
    x = as_float32(input, "input")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean, running_var: give both or neither")
    use_batch_stats = bool(training) or running_mean is None
    if use_batch_stats:
        rm = None if running_mean is None else _inplace_float32(running_mean, "running_mean")
        rv = None if running_var is None else _inplace_float32(running_var, "running_var")
    else:
        rm = as_float32(running_mean, "running_mean")
        rv = as_float32(running_var, "running_var")
    return _core.batch_norm_forward(
        x, _optional_float32(weight, "weight"), _optional_float32(bias, "bias"), rm, rv,
        use_batch_stats, _real(momentum, "momentum"), _real(eps, "eps"))


def _bn_block_forward(input, weight, bias, running_mean, running_var, momentum: float,
                      eps: float, activation=None, negative_slope: float = 0.0, pool=None,
                      dropout_p: float = 0.0, dropout_seed: int = 0,
                      dropout_channel_wise: bool = False):
    """Training-mode batch norm → activation (None or a name) → 2×2 pool (None, "max",
    "avg") → dropout (``dropout_p`` 0: none) in one kernel, for the training fusion: the
    bits of :func:`native_batch_norm` (``training=True``), the activation, the pool and
    :func:`dropout`/:func:`dropout2d` with ``dropout_seed`` applied one after the other.
    Returns ``(output, save_mean, save_invstd)``; running buffers move as in training."""
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean, running_var: give both or neither")
    rm = None if running_mean is None else _inplace_float32(running_mean, "running_mean")
    rv = None if running_var is None else _inplace_float32(running_var, "running_var")
    return _core.bn_block_forward(
        as_float32(input, "input"), _optional_float32(weight, "weight"),
        _optional_float32(bias, "bias"), rm, rv, _real(momentum, "momentum"), _real(eps, "eps"),
        activation, _real(negative_slope, "negative_slope"), pool,
        _real(dropout_p, "dropout_p"), _seed(dropout_seed), bool(dropout_channel_wise))


def _bn_block_backward(grad_output, input, weight, bias, save_mean, save_invstd,
                       activation=None, negative_slope: float = 0.0, pool=None,
                       dropout_p: float = 0.0, dropout_seed: int = 0,
                       dropout_channel_wise: bool = False):
    """Gradients of :func:`_bn_block_forward` from its arguments and saved statistics:
    ``(grad_input, grad_weight or None, grad_bias or None)``, the unfused chain's bits."""
    return _core.bn_block_backward(
        as_float32(grad_output, "grad_output"), as_float32(input, "input"),
        _optional_float32(weight, "weight"), _optional_float32(bias, "bias"),
        as_float32(save_mean, "save_mean"), as_float32(save_invstd, "save_invstd"),
        activation, _real(negative_slope, "negative_slope"), pool,
        _real(dropout_p, "dropout_p"), _seed(dropout_seed), bool(dropout_channel_wise))


def batch_norm(input, running_mean, running_var, weight=None, bias=None,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5) -> np.ndarray:
    """Batch normalisation with ``torch.nn.functional.batch_norm``'s signature.

    See :func:`native_batch_norm` for the semantics; this returns only the output.
    """
    return native_batch_norm(input, weight, bias, running_mean, running_var, training,
                             momentum, eps)[0]


def batch_norm_backward(grad_output, input, weight, save_mean, save_invstd,
                        training: bool = True):
    """Gradients of batch normalisation.

    Parameters
    ----------
    grad_output, input : arrays of the forward's shape
    weight : array (C,) or None (``affine=False``: gamma = 1, and no parameter gradients)
    save_mean, save_invstd : the statistics :func:`native_batch_norm` returned
    training : bool
        True when the forward used batch statistics (the gradient then flows through
        them), False for running statistics (a fixed affine map).

    Returns
    -------
    grad_input : ndarray, shape of input
    grad_weight, grad_bias : ndarray (C,), or None when ``weight`` is None
    """
    return _core.batch_norm_backward(
        as_float32(grad_output, "grad_output"), as_float32(input, "input"),
        _optional_float32(weight, "weight"), as_float32(save_mean, "save_mean"),
        as_float32(save_invstd, "save_invstd"), bool(training))


# --------------------------------------------------------------------------- dropout


def dropout(input, p: float = 0.5, training: bool = True, seed: Optional[int] = None):
    """Inverted dropout: zero each element with probability ``p``, scale the rest by 1/(1-p).

    Element i is kept or dropped by a counter-based generator (Philox4x32-10) keyed by
    ``seed`` and indexed by i, so the result depends only on ``(seed, input)``, never on
    the number of threads. Pass the same ``seed`` to :func:`dropout_backward`. With
    ``seed=None`` a fresh random seed is drawn. Identity (a copy) when not training or
    ``p == 0``.
    """
    x = as_float32(input, "input")
    p = _probability(p)
    seed = _seed(seed)
    if not training or p == 0.0:
        return x.copy()
    return _core.dropout_forward(x, p, seed, 1)


def dropout2d(input, p: float = 0.5, training: bool = True, seed: Optional[int] = None):
    """Channel-wise ("spatial") inverted dropout of a 4-D (N, C, H, W) input.

    Whole feature maps are kept or dropped: the decision for map (n, c) is drawn from
    ``(seed, n*C + c)``. Otherwise as :func:`dropout`.
    """
    x = as_float32(input, "input")
    if x.ndim != 4:
        raise ValueError(f"input: dropout2d expects a 4-D (N, C, H, W) array, got {x.ndim}-D")
    p = _probability(p)
    seed = _seed(seed)
    if not training or p == 0.0:
        return x.copy()
    return _core.dropout_forward(x, p, seed, x.shape[2] * x.shape[3])


def dropout_backward(grad_output, p: float, seed: int) -> np.ndarray:
    """Input gradient of :func:`dropout` (training, same ``p`` and ``seed``)."""
    g = as_float32(grad_output, "grad_output")
    p, seed = _probability(p), _seed(seed)
    return g.copy() if p == 0.0 else _core.dropout_forward(g, p, seed, 1)


def dropout2d_backward(grad_output, p: float, seed: int) -> np.ndarray:
    """Input gradient of :func:`dropout2d` (training, same ``p`` and ``seed``)."""
    g = as_float32(grad_output, "grad_output")
    if g.ndim != 4:
        raise ValueError(f"grad_output: expects a 4-D array, got {g.ndim}-D")
    p, seed = _probability(p), _seed(seed)
    if p == 0.0:
        return g.copy()
    return _core.dropout_forward(g, p, seed, g.shape[2] * g.shape[3])


def dropout_mask(n: int, p: float, seed: int) -> np.ndarray:
    """The keep decisions (bool, length ``n``) that dropout with ``(p, seed)`` uses.

    Element i of :func:`dropout` (or map i of :func:`dropout2d`) is kept iff ``mask[i]``.
    """
    return _core.dropout_mask(_count(n, "n", 0), _probability(p), _seed(seed)).astype(bool)


# --------------------------------------------------------------------------- linear


def linear(input, weight, bias=None) -> np.ndarray:
    """``input @ weight.T + bias`` for a 2-D input (N, in_features)."""
    return _core.linear_forward(as_float32(input, "input"), as_float32(weight, "weight"),
                                _optional_float32(bias, "bias"))


def _linear_fused(input, weight, bias, activation=None, negative_slope: float = 0.0,
                  norm: tuple | None = None) -> np.ndarray:
    """:func:`linear` with a batch norm in evaluation, then ``activation``, applied to each
    block of rows inside the kernel (see :func:`_conv2d_fused`), with the bits of the
    layers one by one. ``norm`` is ``(weight, bias, running_mean, running_var, eps)`` of
    the batch norm, or None."""
    if norm is not None:
        gamma, beta, running_mean, running_var, eps = norm
        norm = (_optional_float32(gamma, "norm weight"), _optional_float32(beta, "norm bias"),
                as_float32(running_mean, "running_mean"),
                as_float32(running_var, "running_var"), _real(eps, "eps"))
    return _core.linear_forward(as_float32(input, "input"), as_float32(weight, "weight"),
                                _optional_float32(bias, "bias"), activation,
                                _real(negative_slope, "negative_slope"), norm)


def linear_backward(grad_output, input, weight, bias: bool = True, input_grad: bool = True):
    """Gradients of :func:`linear`: ``(grad_input or None, grad_weight, grad_bias or None)``."""
    return _core.linear_backward(
        as_float32(grad_output, "grad_output"), as_float32(input, "input"),
        as_float32(weight, "weight"), bool(bias), bool(input_grad))


# --------------------------------------------------------------------------- activations


def relu(input) -> np.ndarray:
    """max(x, 0)."""
    return _core.activation_forward(as_float32(input, "input"), "relu", 0.0)


def relu_backward(grad_output, input) -> np.ndarray:
    """Gradient of :func:`relu` given the forward's *input* (0 at x <= 0)."""
    return _core.activation_backward(as_float32(grad_output, "grad_output"),
                                     as_float32(input, "input"), "relu", 0.0)


def leaky_relu(input, negative_slope: float = 0.01) -> np.ndarray:
    """x if x > 0 else negative_slope * x."""
    return _core.activation_forward(as_float32(input, "input"), "leaky_relu",
                                    _real(negative_slope, "negative_slope"))


def leaky_relu_backward(grad_output, input, negative_slope: float = 0.01) -> np.ndarray:
    """Gradient of :func:`leaky_relu` given the forward's *input*."""
    return _core.activation_backward(as_float32(grad_output, "grad_output"),
                                     as_float32(input, "input"), "leaky_relu",
                                     _real(negative_slope, "negative_slope"))


def sigmoid(input) -> np.ndarray:
    """1 / (1 + exp(-x))."""
    return _core.activation_forward(as_float32(input, "input"), "sigmoid", 0.0)


def sigmoid_backward(grad_output, output) -> np.ndarray:
    """Gradient of :func:`sigmoid` given the forward's *output* y: grad * y * (1 - y)."""
    return _core.activation_backward(as_float32(grad_output, "grad_output"),
                                     as_float32(output, "output"), "sigmoid", 0.0)


def tanh(input) -> np.ndarray:
    """Hyperbolic tangent."""
    return _core.activation_forward(as_float32(input, "input"), "tanh", 0.0)


def tanh_backward(grad_output, output) -> np.ndarray:
    """Gradient of :func:`tanh` given the forward's *output* y: grad * (1 - y**2)."""
    return _core.activation_backward(as_float32(grad_output, "grad_output"),
                                     as_float32(output, "output"), "tanh", 0.0)


# --------------------------------------------------------------------------- loss


def _check_dim(dim) -> None:
    if dim not in (1, -1):
        raise ValueError(f"dim: only the class axis of a 2-D (N, C) input is supported "
                         f"(1 or -1), got {dim!r}")


def log_softmax(input, dim: int = 1) -> np.ndarray:
    """Numerically stable log-softmax over the classes of a 2-D (N, C) input."""
    _check_dim(dim)
    return _core.log_softmax_forward(as_float32(input, "input"))


def log_softmax_backward(grad_output, output, dim: int = 1) -> np.ndarray:
    """Gradient of :func:`log_softmax` given its *output* y: g - exp(y) * sum(g)."""
    _check_dim(dim)
    return _core.log_softmax_backward(as_float32(grad_output, "grad_output"),
                                      as_float32(output, "output"))


def _sample_weight(weight, n: int, name: str = "weight") -> np.ndarray | None:
    """``weight`` as the loss kernels take it: None, or n float64 values (the kernel checks
    that they are finite, non-negative and not all zero)."""
    if weight is None:
        return None
    arr = _asarray(weight, name)
    if arr.dtype.kind not in "iuf" or arr.dtype == np.float16:
        raise TypeError(f"{name}: expected real sample weights, got dtype {arr.dtype}")
    if arr.shape != (n,):
        raise ValueError(f"{name}: expected shape ({n},), one weight per sample, got "
                         f"shape {arr.shape}")
    return np.require(arr, np.float64, ["C_CONTIGUOUS", "ALIGNED"])


def cross_entropy(input, target, weight=None) -> float:
    """Mean over the batch of -log_softmax(input)[n, target[n]] (PyTorch's default).

    ``input`` is (N, C) logits, ``target`` N integer class indices in [0, C). With
    ``weight``, N finite non-negative sample weights (not all zero), the weighted mean
    ``sum(weight * loss) / sum(weight)``: a weight of 2 counts as the row twice (as
    scikit-learn's ``sample_weight``); weights of 1 give the unweighted bits.
    """
    logits = as_float32(input, "input")
    labels = _labels(target, logits)
    return _core.cross_entropy_forward(logits, labels,
                                       _sample_weight(weight, labels.shape[0]))


def cross_entropy_backward(input, target, weight=None) -> np.ndarray:
    """Gradient of :func:`cross_entropy` w.r.t. the logits: (softmax - onehot) / N, or with
    ``weight`` row n scaled by ``weight[n] / sum(weight)`` instead of 1 / N."""
    logits = as_float32(input, "input")
    labels = _labels(target, logits)
    return _core.cross_entropy_backward(logits, labels,
                                        _sample_weight(weight, labels.shape[0]))


# --------------------------------------------------------------------------- optimizers


def sgd_step(param, grad, momentum_buffer=None, *, lr: float, momentum: float = 0.0,
             dampening: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
             first_step: bool = False) -> None:
    """One in-place step of PyTorch's SGD on ``param`` (and ``momentum_buffer``).

    ``d = grad + weight_decay * param``; with momentum, ``buf = d`` on the first step
    (``first_step=True``) and ``buf = momentum * buf + (1 - dampening) * d`` after;
    ``d = d + momentum * buf`` (nesterov) or ``buf``; ``param -= lr * d``.
    """
    p = _inplace_float32(param, "param")
    buf = None if momentum_buffer is None else _inplace_float32(momentum_buffer,
                                                                "momentum_buffer")
    if _real(momentum, "momentum") != 0.0 and buf is None:
        raise ValueError("momentum_buffer: required when momentum != 0")
    _core.sgd_step(p, as_float32(grad, "grad"), buf, _real(lr, "lr"),
                   _real(momentum, "momentum"), _real(dampening, "dampening"), bool(nesterov),
                   _real(weight_decay, "weight_decay"), bool(first_step))


def adam_step(param, grad, exp_avg, exp_avg_sq, step: int, *, lr: float = 1e-3,
              beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
              weight_decay: float = 0.0, decoupled_weight_decay: bool = False) -> None:
    """One in-place step of PyTorch's Adam (or AdamW with ``decoupled_weight_decay``).

    ``step`` counts this step (1 for the first) and sets the bias corrections.
    """
    step = _count(step, "step", 1)  # the 1-based index of this step
    _core.adam_step(
        _inplace_float32(param, "param"), as_float32(grad, "grad"),
        _inplace_float32(exp_avg, "exp_avg"), _inplace_float32(exp_avg_sq, "exp_avg_sq"),
        step, _real(lr, "lr"), _real(beta1, "beta1"), _real(beta2, "beta2"), _real(eps, "eps"),
        _real(weight_decay, "weight_decay"), bool(decoupled_weight_decay))


# --------------------------------------------------------------------------- group norm
# LayerNorm and InstanceNorm are group norm: one group of the trailing values, or one
# group per channel. All three run the same kernel (rust/src/kernels/group_norm.rs).


def native_group_norm(input, num_groups: int, weight=None, bias=None, eps: float = 1e-5):
    """Group normalisation returning what its backward needs (``torch.native_group_norm``).

    The C channels of an (N, C, *) input are split into ``num_groups`` consecutive groups;
    each (sample, group) is normalised with its own mean and *biased* variance, the same
    in training and evaluation, then scaled and shifted per channel:
    ``y = (x - mean) * rstd * weight[c] + bias[c]`` with ``rstd = 1 / sqrt(var + eps)``.

    Parameters
    ----------
    input : array_like, shape (N, C, *)
        2-D (N, C) or more.
    num_groups : int
        Must divide C.
    weight, bias : array_like (C,), optional
        Per-channel scale (gamma) and shift (beta).
    eps : float, default 1e-5

    Returns
    -------
    output : ndarray, same shape as input
    mean, rstd : ndarray (N, num_groups)
        Pass them to :func:`group_norm_backward`.
    """
    return _core.group_norm_forward(
        as_float32(input, "input"), _int64(_integer(num_groups, "num_groups"), "num_groups"),
        _optional_float32(weight, "weight"), _optional_float32(bias, "bias"),
        _real(eps, "eps"))


def group_norm(input, num_groups: int, weight=None, bias=None, eps: float = 1e-5) -> np.ndarray:
    """Group normalisation with ``torch.nn.functional.group_norm``'s signature.

    See :func:`native_group_norm`; this returns only the output.
    """
    return native_group_norm(input, num_groups, weight, bias, eps)[0]


def group_norm_backward(grad_output, input, num_groups: int, weight, mean, rstd):
    """Gradients of group normalisation.

    Parameters
    ----------
    grad_output, input : arrays of the forward's shape (N, C, *)
    num_groups : int
    weight : array (C,) or None (no affine: gamma = 1, and no parameter gradients)
    mean, rstd : ndarray (N, num_groups), what :func:`native_group_norm` returned

    Returns
    -------
    grad_input : ndarray, shape of input
    grad_weight, grad_bias : ndarray (C,), or None when ``weight`` is None
    """
    return _core.group_norm_backward(
        as_float32(grad_output, "grad_output"), as_float32(input, "input"),
        _int64(_integer(num_groups, "num_groups"), "num_groups"),
        _optional_float32(weight, "weight"), as_float32(mean, "mean"),
        as_float32(rstd, "rstd"))


def _integer(value, name: str) -> int:
    """An int (not a bool), or TypeError naming ``name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {value!r}")
    return int(value)


def _normalized_shape(normalized_shape) -> tuple[int, ...]:
    """``normalized_shape`` as a tuple of ints (an int is a 1-tuple, as in PyTorch)."""
    if isinstance(normalized_shape, (int, np.integer)) and not isinstance(
            normalized_shape, (bool, np.bool_)):
        return (int(normalized_shape),)
    try:
        dims = tuple(normalized_shape)
    except TypeError:
        raise TypeError(f"normalized_shape: expected an int or a sequence of ints, got "
                        f"{normalized_shape!r}") from None
    if isinstance(normalized_shape, str) or not all(
            isinstance(d, (int, np.integer)) and not isinstance(d, (bool, np.bool_))
            for d in dims):
        raise TypeError(f"normalized_shape: expected an int or a sequence of ints, got "
                        f"{normalized_shape!r}")
    if not dims:
        raise ValueError("normalized_shape: expected at least one dimension, got ()")
    return tuple(int(d) for d in dims)


def _layer_rows(x: np.ndarray, normalized_shape) -> tuple[tuple[int, ...], np.ndarray]:
    """``normalized_shape`` checked against the trailing axes of ``x``, and ``x`` as
    (rows, features): one group of ``features`` one-value channels per row."""
    dims = _normalized_shape(normalized_shape)
    if x.ndim < len(dims) or x.shape[x.ndim - len(dims):] != dims:
        raise ValueError(f"normalized_shape: expected the trailing dimensions of the input, "
                         f"got {dims} for an input of shape {x.shape}")
    features = int(np.prod(dims))
    rows = int(np.prod(x.shape[:x.ndim - len(dims)]))
    return dims, x.reshape(rows, features)


def _affine_vector(array, name: str, dims: tuple[int, ...]) -> np.ndarray | None:
    """A weight or bias of exactly ``normalized_shape``, flattened for the kernel."""
    if array is None:
        return None
    vector = as_float32(array, name)
    if vector.shape != dims:
        raise ValueError(f"{name}: expected shape {dims} (normalized_shape), got "
                         f"{vector.shape}")
    return vector.reshape(-1)


def native_layer_norm(input, normalized_shape, weight=None, bias=None, eps: float = 1e-5):
    """Layer normalisation returning what its backward needs (``torch.native_layer_norm``).

    The trailing dimensions given by ``normalized_shape`` are normalised together, each
    leading index on its own (mean and biased variance), then scaled and shifted per
    *element*: ``weight`` and ``bias`` have shape ``normalized_shape``.

    Parameters
    ----------
    input : array_like, shape (*, *normalized_shape)
    normalized_shape : int or sequence of int
        Must equal the input's trailing dimensions.
    weight, bias : array_like of shape ``normalized_shape``, optional
    eps : float, default 1e-5

    Returns
    -------
    output : ndarray, same shape as input
    mean, rstd : ndarray of shape ``input.shape[:-k] + (1,) * k`` (k = len(normalized_shape))
        As PyTorch returns them; pass them to :func:`layer_norm_backward`.
    """
    x = as_float32(input, "input")
    dims, rows = _layer_rows(x, normalized_shape)
    output, mean, rstd = _core.group_norm_forward(
        rows, 1, _affine_vector(weight, "weight", dims), _affine_vector(bias, "bias", dims),
        _real(eps, "eps"))
    stats_shape = x.shape[:x.ndim - len(dims)] + (1,) * len(dims)
    return output.reshape(x.shape), mean.reshape(stats_shape), rstd.reshape(stats_shape)


def layer_norm(input, normalized_shape, weight=None, bias=None,
               eps: float = 1e-5) -> np.ndarray:
    """Layer normalisation with ``torch.nn.functional.layer_norm``'s signature.

    See :func:`native_layer_norm`; this returns only the output.
    """
    return native_layer_norm(input, normalized_shape, weight, bias, eps)[0]


def layer_norm_backward(grad_output, input, normalized_shape, weight, mean, rstd):
    """Gradients of layer normalisation.

    Parameters
    ----------
    grad_output, input : arrays of the forward's shape
    normalized_shape : the forward's
    weight : array of shape ``normalized_shape``, or None (no parameter gradients then)
    mean, rstd : what :func:`native_layer_norm` returned

    Returns
    -------
    grad_input : ndarray, shape of input
    grad_weight, grad_bias : ndarray of shape ``normalized_shape``, or None
    """
    x = as_float32(input, "input")
    dims, rows = _layer_rows(x, normalized_shape)
    grad = as_float32(grad_output, "grad_output")
    if grad.shape != x.shape:
        raise ValueError(f"grad_output: expected shape {x.shape} (the input's), got "
                         f"{grad.shape}")
    stats = (rows.shape[0], 1)
    mean, rstd = as_float32(mean, "mean"), as_float32(rstd, "rstd")
    for name, array in (("mean", mean), ("rstd", rstd)):
        if array.size != rows.shape[0]:
            raise ValueError(f"{name}: expected {rows.shape[0]} values (one per normalised "
                             f"row), got shape {array.shape}")
    grad_input, grad_weight, grad_bias = _core.group_norm_backward(
        grad.reshape(rows.shape), rows, 1, _affine_vector(weight, "weight", dims),
        mean.reshape(stats), rstd.reshape(stats))
    if grad_weight is not None:
        grad_weight, grad_bias = grad_weight.reshape(dims), grad_bias.reshape(dims)
    return grad_input.reshape(x.shape), grad_weight, grad_bias


def _instance_input(input) -> np.ndarray:
    """An (N, C, *) input with more than one value per channel, as PyTorch requires."""
    x = as_float32(input, "input")
    if x.ndim < 3:
        raise ValueError(f"input: expected an (N, C, *) array of 3 or more dimensions, got "
                         f"shape {x.shape}")
    if int(np.prod(x.shape[2:])) == 1:
        raise ValueError(f"input: expected more than 1 spatial element per channel, got "
                         f"input of shape {x.shape}")
    return x


def native_instance_norm(input, weight=None, bias=None, eps: float = 1e-5):
    """Instance normalisation (batch statistics) returning what its backward needs.

    Every (sample, channel) of an (N, C, *) input is normalised with its own mean and
    biased variance: group normalisation with C groups.

    Returns
    -------
    output : ndarray, same shape as input
    mean, rstd : ndarray (N, C)
        Pass them to :func:`instance_norm_backward`.
    """
    x = _instance_input(input)
    return native_group_norm(x, x.shape[1], weight, bias, eps)


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats: bool = True, momentum: float = 0.1,
                  eps: float = 1e-5) -> np.ndarray:
    """Instance normalisation with ``torch.nn.functional.instance_norm``'s signature.

    Only the statistics of the input are supported (PyTorch's default,
    ``use_input_stats=True`` without running buffers); ``running_mean``/``running_var``
    raise ``NotImplementedError``. ``momentum`` is accepted and unused, as in PyTorch
    without running buffers. See :func:`native_instance_norm`.
    """
    if running_mean is not None or running_var is not None or not use_input_stats:
        raise NotImplementedError(
            "running_mean, running_var, use_input_stats: instance norm with running "
            "statistics is not implemented; use the input's statistics (the default)")
    _real(momentum, "momentum")
    return native_instance_norm(input, weight, bias, eps)[0]


def instance_norm_backward(grad_output, input, weight, mean, rstd):
    """Gradients of instance normalisation: ``(grad_input, grad_weight, grad_bias)``.

    ``mean``/``rstd`` are the (N, C) statistics :func:`native_instance_norm` returned; the
    parameter gradients are None when ``weight`` is None.
    """
    x = _instance_input(input)
    return group_norm_backward(grad_output, x, x.shape[1], weight, mean, rstd)
