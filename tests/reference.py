"""Plain-NumPy float64 references for every operation in ``bnrs.functional``.

Written to be obviously correct, not fast, and independent of the Rust kernels: convolution
loops over the kernel taps (one strided view of the padded input per tap) instead of
im2col + GEMM, pooling loops over the output windows. Every function works in float64 and
returns new arrays; the optimizer steps return the updated state instead of writing in place.

Shapes and conventions follow PyTorch, as ``bnrs.functional`` does: NCHW inputs, conv weights
(C_out, C_in, kH, kW), linear weights (out_features, in_features).
"""

from __future__ import annotations

import math

import numpy as np


def _f64(array):
    return None if array is None else np.asarray(array, dtype=np.float64)


def pair(value):
    """An int or an (int, int) as a pair, like PyTorch's ``_pair``."""
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    first, second = value
    return int(first), int(second)


# --------------------------------------------------------------------------- conv2d


def conv2d_output_size(size, kernel, stride, padding, dilation):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _tap(padded, row, col, out_shape, stride, dilation):
    """The padded-input samples that kernel tap (row, col) meets, one per output position.

    A view of shape (N, C, H_out, W_out); writing to it writes to ``padded``.
    """
    out_h, out_w = out_shape
    top, left = row * dilation[0], col * dilation[1]
    return padded[:, :,
                  top:top + stride[0] * (out_h - 1) + 1:stride[0],
                  left:left + stride[1] * (out_w - 1) + 1:stride[1]]


def _conv_geometry(x, w, stride, padding, dilation):
    stride, padding, dilation = pair(stride), pair(padding), pair(dilation)
    out_shape = tuple(
        conv2d_output_size(x.shape[2 + axis], w.shape[2 + axis], stride[axis],
                           padding[axis], dilation[axis])
        for axis in range(2))
    return stride, padding, dilation, out_shape


def _pad(x, padding):
    return np.pad(x, ((0, 0), (0, 0), (padding[0],) * 2, (padding[1],) * 2))


def _group_slices(x_channels, w, groups):
    """Per group: (its input channels, its output channels) as slices."""
    in_block, out_block = x_channels // groups, w.shape[0] // groups
    assert in_block * groups == x_channels and w.shape[1] == in_block
    return [(slice(g * in_block, (g + 1) * in_block), slice(g * out_block, (g + 1) * out_block))
            for g in range(groups)]


def conv2d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    """Cross-correlation with zero padding: y[n,o,i,j] = b[o] + Σ x_pad[...] · w[o,c,p,q].

    With ``groups`` > 1 each group of output channels sees its own block of input
    channels (as ``torch.nn.functional.conv2d``): one ordinary convolution per group.
    """
    if groups > 1:
        x, w = _f64(x), _f64(w)
        return np.concatenate(
            [conv2d(x[:, cin], w[cout], None if b is None else b[cout], stride, padding,
                    dilation) for cin, cout in _group_slices(x.shape[1], w, groups)], axis=1)
    x, w, b = _f64(x), _f64(w), _f64(b)
    stride, padding, dilation, out_shape = _conv_geometry(x, w, stride, padding, dilation)
    padded = _pad(x, padding)
    y = np.zeros((x.shape[0], w.shape[0]) + out_shape)
    for row in range(w.shape[2]):
        for col in range(w.shape[3]):
            tap = _tap(padded, row, col, out_shape, stride, dilation)
            y += np.einsum("nchw,oc->nohw", tap, w[:, :, row, col])
    if b is not None:
        y += b[None, :, None, None]
    return y


def conv2d_backward(gy, x, w, stride=1, padding=0, dilation=1, groups=1):
    """(grad_input, grad_weight, grad_bias) of :func:`conv2d` for upstream gradient ``gy``."""
    if groups > 1:
        gy, x, w = _f64(gy), _f64(x), _f64(w)
        parts = [conv2d_backward(gy[:, cout], x[:, cin], w[cout], stride, padding, dilation)
                 for cin, cout in _group_slices(x.shape[1], w, groups)]
        return tuple(np.concatenate([part[i] for part in parts], axis=axis)
                     for i, axis in enumerate((1, 0, 0)))
    gy, x, w = _f64(gy), _f64(x), _f64(w)
    stride, padding, dilation, out_shape = _conv_geometry(x, w, stride, padding, dilation)
    padded = _pad(x, padding)
    grad_padded = np.zeros_like(padded)
    grad_weight = np.zeros_like(w)
    for row in range(w.shape[2]):
        for col in range(w.shape[3]):
            tap = _tap(padded, row, col, out_shape, stride, dilation)
            grad_weight[:, :, row, col] = np.einsum("nohw,nchw->oc", gy, tap)
            grad_tap = _tap(grad_padded, row, col, out_shape, stride, dilation)
            grad_tap += np.einsum("nohw,oc->nchw", gy, w[:, :, row, col])
    height, width = x.shape[2:]
    grad_input = grad_padded[:, :, padding[0]:padding[0] + height,
                             padding[1]:padding[1] + width]
    return grad_input, grad_weight, gy.sum(axis=(0, 2, 3))


# --------------------------------------------------------------------------- pooling


def pool_output_size(size, kernel, stride, padding):
    return (size + 2 * padding - kernel) // stride + 1


def _pool_windows(in_shape, kernel, stride, padding):
    """Yield (oh, ow, rows, cols, padded_area) for every output position.

    ``rows``/``cols`` are the window clipped to the real input; ``padded_area`` is the
    window clipped to the padded extent (PyTorch's divisor with count_include_pad).
    """
    (in_h, in_w), (kh, kw), (sh, sw), (ph, pw) = in_shape, kernel, stride, padding
    for oh in range(pool_output_size(in_h, kh, sh, ph)):
        top = oh * sh - ph
        bottom = min(top + kh, in_h + ph)
        for ow in range(pool_output_size(in_w, kw, sw, pw)):
            left = ow * sw - pw
            right = min(left + kw, in_w + pw)
            rows = slice(max(top, 0), min(bottom, in_h))
            cols = slice(max(left, 0), min(right, in_w))
            yield oh, ow, rows, cols, (bottom - top) * (right - left)


def _pool_args(in_shape, kernel_size, stride, padding):
    kernel = pair(kernel_size)
    stride = kernel if stride is None else pair(stride)
    padding = pair(padding)
    out_shape = tuple(pool_output_size(in_shape[axis], kernel[axis], stride[axis],
                                       padding[axis]) for axis in range(2))
    return kernel, stride, padding, out_shape


def max_pool2d(x, kernel_size, stride=None, padding=0):
    """(output, indices): window max over the real input (padding is -inf, never chosen).

    ``indices`` is the flat index into the H×W plane of the first maximum (a NaN wins).
    """
    x = _f64(x)
    n, c, h, w = x.shape
    kernel, stride, padding, out_shape = _pool_args((h, w), kernel_size, stride, padding)
    y = np.empty((n, c) + out_shape)
    indices = np.empty((n, c) + out_shape, dtype=np.int64)
    for oh, ow, rows, cols, _ in _pool_windows((h, w), kernel, stride, padding):
        window = x[:, :, rows, cols].reshape(n, c, -1)
        best = np.argmax(window, axis=2)  # first occurrence; a NaN counts as the maximum
        y[:, :, oh, ow] = np.take_along_axis(window, best[:, :, None], axis=2)[:, :, 0]
        width = cols.stop - cols.start
        indices[:, :, oh, ow] = (rows.start + best // width) * w + cols.start + best % width
    return y, indices


def max_pool2d_backward(gy, indices, input_shape):
    """Scatter-add each output gradient to its argmax."""
    gy = _f64(gy)
    n, c, h, w = input_shape
    grad_input = np.zeros((n, c, h * w))
    for image in range(n):
        for channel in range(c):
            np.add.at(grad_input[image, channel], indices[image, channel].ravel(),
                      gy[image, channel].ravel())
    return grad_input.reshape(n, c, h, w)


def avg_pool2d(x, kernel_size, stride=None, padding=0, count_include_pad=True):
    x = _f64(x)
    n, c, h, w = x.shape
    kernel, stride, padding, out_shape = _pool_args((h, w), kernel_size, stride, padding)
    y = np.empty((n, c) + out_shape)
    for oh, ow, rows, cols, padded_area in _pool_windows((h, w), kernel, stride, padding):
        divisor = padded_area if count_include_pad else (
            (rows.stop - rows.start) * (cols.stop - cols.start))
        y[:, :, oh, ow] = x[:, :, rows, cols].sum(axis=(2, 3)) / divisor
    return y


def avg_pool2d_backward(gy, input_shape, kernel_size, stride=None, padding=0,
                        count_include_pad=True):
    gy = _f64(gy)
    n, c, h, w = input_shape
    kernel, stride, padding, _ = _pool_args((h, w), kernel_size, stride, padding)
    grad_input = np.zeros((n, c, h, w))
    for oh, ow, rows, cols, padded_area in _pool_windows((h, w), kernel, stride, padding):
        divisor = padded_area if count_include_pad else (
            (rows.stop - rows.start) * (cols.stop - cols.start))
        grad_input[:, :, rows, cols] += (gy[:, :, oh, ow] / divisor)[:, :, None, None]
    return grad_input


# --------------------------------------------------------------------------- batch norm


def stat_axes(ndim):
    """Every axis but the channel axis 1."""
    return (0,) + tuple(range(2, ndim))


def per_channel(vector, ndim):
    """Reshape a (C,) vector to broadcast along axis 1 of an ndim-D array."""
    return np.reshape(vector, (1, -1) + (1,) * (ndim - 2))


def batch_norm(x, weight=None, bias=None, running_mean=None, running_var=None,
               training=False, momentum=0.1, eps=1e-5):
    """PyTorch's batch norm.

    Returns (y, save_mean, save_invstd, new_running_mean, new_running_var); the running
    statistics are returned updated (None if not given), the arguments are not modified.
    """
    x = _f64(x)
    axes = stat_axes(x.ndim)
    count = x.size // x.shape[1]
    new_mean, new_var = _f64(running_mean), _f64(running_var)
    if training or running_mean is None:
        if count < 2:
            raise ValueError("batch norm needs more than one value per channel to train")
        mean = x.mean(axis=axes)
        var = x.var(axis=axes)  # biased: what normalises the batch
        if running_mean is not None:
            unbiased = var * count / (count - 1)
            new_mean = (1 - momentum) * new_mean + momentum * mean
            new_var = (1 - momentum) * new_var + momentum * unbiased
    else:
        mean, var = new_mean, new_var
    invstd = 1.0 / np.sqrt(var + eps)
    y = (x - per_channel(mean, x.ndim)) * per_channel(invstd, x.ndim)
    if weight is not None:
        y = y * per_channel(_f64(weight), x.ndim)
    if bias is not None:
        y = y + per_channel(_f64(bias), x.ndim)
    return y, mean, invstd, new_mean, new_var


def batch_norm_backward(gy, x, weight, save_mean, save_invstd, training=True):
    """(grad_input, grad_weight, grad_bias); the parameter gradients are None without weight.

    In training the statistics depend on x, so the gradient is projected:
    gx = invstd · (g − mean(g) − x̂ · mean(g · x̂)) with g = gy · gamma; in evaluation
    the map is a fixed affine one, gx = gy · gamma · invstd.
    """
    gy, x = _f64(gy), _f64(x)
    axes = stat_axes(x.ndim)
    invstd = per_channel(_f64(save_invstd), x.ndim)
    x_hat = (x - per_channel(_f64(save_mean), x.ndim)) * invstd
    gamma = 1.0 if weight is None else per_channel(_f64(weight), x.ndim)
    g = gy * gamma
    if training:
        grad_input = invstd * (g - g.mean(axis=axes, keepdims=True)
                               - x_hat * (g * x_hat).mean(axis=axes, keepdims=True))
    else:
        grad_input = g * invstd
    if weight is None:
        return grad_input, None, None
    return grad_input, (gy * x_hat).sum(axis=axes), gy.sum(axis=axes)


def batch_renorm(x, weight, bias, running_mean, running_var, batches_seen, *, momentum,
                 eps, r_max, d_max):
    """Batch renormalisation (Ioffe 2017) of a training batch, as bnrs documents it.

    x̂ = (x − μ_B)/σ_B, r = clip(σ_B/σ, 1/r_max, r_max), d = clip((μ_B − μ)/σ, −d_max,
    d_max) with σ = sqrt(running_var + eps), y = weight·(x̂·r + d) + bias; r = 1, d = 0
    while ``batches_seen`` is 0. The running statistics move by the bias-corrected weight
    momentum / (1 − (1 − momentum)^t) of batch t towards μ_B and the unbiased variance.
    Returns (y, r, d, new_running_mean, new_running_var).
    """
    x = _f64(x)
    axes = stat_axes(x.ndim)
    count = x.size // x.shape[1]
    mean, var = x.mean(axis=axes), x.var(axis=axes)
    batch_std = np.sqrt(var + eps)
    running_mean, running_var = _f64(running_mean), _f64(running_var)
    running_std = np.sqrt(running_var + eps)
    if batches_seen == 0:
        r, d = np.ones_like(mean), np.zeros_like(mean)
    else:
        r = np.clip(batch_std / running_std, 1.0 / r_max, r_max)
        d = np.clip((mean - running_mean) / running_std, -d_max, d_max)
    x_hat = (x - per_channel(mean, x.ndim)) / per_channel(batch_std, x.ndim)
    y = x_hat * per_channel(r, x.ndim) + per_channel(d, x.ndim)
    if weight is not None:
        y = y * per_channel(_f64(weight), x.ndim) + per_channel(_f64(bias), x.ndim)
    step = momentum / (1.0 - (1.0 - momentum) ** (batches_seen + 1))
    new_mean = running_mean + step * (mean - running_mean)
    new_var = running_var + step * (var * count / (count - 1) - running_var)
    return y, r, d, new_mean, new_var


def batch_renorm_backward(gy, x, weight, r, d, eps):
    """(grad_input, grad_weight, grad_bias) of :func:`batch_renorm` with r and d held
    constant (the paper's rule); the parameter gradients are None without weight."""
    gy, x = _f64(gy), _f64(x)
    axes = stat_axes(x.ndim)
    mean, var = x.mean(axis=axes), x.var(axis=axes)
    invstd = 1.0 / np.sqrt(var + eps)
    x_hat = (x - per_channel(mean, x.ndim)) * per_channel(invstd, x.ndim)
    gamma = 1.0 if weight is None else per_channel(_f64(weight), x.ndim)
    g = gy * gamma * per_channel(_f64(r), x.ndim)  # dL/dx̂
    grad_input = per_channel(invstd, x.ndim) * (
        g - g.mean(axis=axes, keepdims=True)
        - x_hat * (g * x_hat).mean(axis=axes, keepdims=True))
    if weight is None:
        return grad_input, None, None
    y_hat = x_hat * per_channel(_f64(r), x.ndim) + per_channel(_f64(d), x.ndim)
    return grad_input, (gy * y_hat).sum(axis=axes), gy.sum(axis=axes)


# --------------------------------------------------------------------------- group norm


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5):
    """PyTorch's group norm: (y, mean, rstd), the statistics of shape (N, num_groups).

    Each (sample, group of C/num_groups consecutive channels) is normalised with its own
    mean and biased variance, then scaled and shifted per channel.
    """
    x = _f64(x)
    grouped = x.reshape(x.shape[0], num_groups, -1)
    mean = grouped.mean(axis=2)
    rstd = 1.0 / np.sqrt(grouped.var(axis=2) + eps)
    y = ((grouped - mean[:, :, None]) * rstd[:, :, None]).reshape(x.shape)
    if weight is not None:
        y = y * per_channel(_f64(weight), x.ndim)
    if bias is not None:
        y = y + per_channel(_f64(bias), x.ndim)
    return y, mean, rstd


def group_norm_backward(gy, x, num_groups, weight, mean, rstd):
    """(grad_input, grad_weight, grad_bias) of :func:`group_norm`; None without weight.

    With x̂ the normalised input and g = gy · gamma, per (sample, group):
    gx = rstd · (g − mean(g) − x̂ · mean(g · x̂)).
    """
    gy, x = _f64(gy), _f64(x)
    n = x.shape[0]
    gamma = 1.0 if weight is None else per_channel(_f64(weight), x.ndim)
    grouped_shape = (n, num_groups, -1)
    rstd = _f64(rstd).reshape(n, num_groups, 1)
    x_hat = (x.reshape(grouped_shape) - _f64(mean).reshape(n, num_groups, 1)) * rstd
    g = (gy * gamma).reshape(grouped_shape)
    grad_input = rstd * (g - g.mean(axis=2, keepdims=True)
                         - x_hat * (g * x_hat).mean(axis=2, keepdims=True))
    grad_input = grad_input.reshape(x.shape)
    if weight is None:
        return grad_input, None, None
    axes = stat_axes(x.ndim)
    return grad_input, (gy * x_hat.reshape(x.shape)).sum(axis=axes), gy.sum(axis=axes)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """PyTorch's layer norm over the trailing ``normalized_shape`` dimensions, with a
    per-element affine: (y, mean, rstd), the statistics shaped like PyTorch's (the leading
    dimensions, then 1 for each normalised one)."""
    x = _f64(x)
    axes = tuple(range(x.ndim - len(normalized_shape), x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    rstd = 1.0 / np.sqrt(x.var(axis=axes, keepdims=True) + eps)
    y = (x - mean) * rstd
    if weight is not None:
        y = y * _f64(weight)
    if bias is not None:
        y = y + _f64(bias)
    return y, mean, rstd


def layer_norm_backward(gy, x, normalized_shape, weight, mean, rstd):
    """(grad_input, grad_weight, grad_bias) of :func:`layer_norm`; None without weight."""
    gy, x = _f64(gy), _f64(x)
    axes = tuple(range(x.ndim - len(normalized_shape), x.ndim))
    lead = tuple(range(x.ndim - len(normalized_shape)))
    rstd = _f64(rstd)
    x_hat = (x - _f64(mean)) * rstd
    g = gy * (1.0 if weight is None else _f64(weight))
    grad_input = rstd * (g - g.mean(axis=axes, keepdims=True)
                         - x_hat * (g * x_hat).mean(axis=axes, keepdims=True))
    if weight is None:
        return grad_input, None, None
    return grad_input, (gy * x_hat).sum(axis=lead), gy.sum(axis=lead)


def instance_norm(x, weight=None, bias=None, eps=1e-5):
    """PyTorch's instance norm with the input's statistics: group norm with C groups."""
    return group_norm(x, np.shape(x)[1], weight, bias, eps)


def instance_norm_backward(gy, x, weight, mean, rstd):
    """(grad_input, grad_weight, grad_bias) of :func:`instance_norm`."""
    return group_norm_backward(gy, x, np.shape(x)[1], weight, mean, rstd)


# --------------------------------------------------------------------------- dropout


def dropout(x, keep, p):
    """Inverted dropout with a given keep mask (bool, broadcastable to x): x·keep/(1−p).

    Also the backward: the gradient goes through the same mask and scale.
    """
    return _f64(x) * np.asarray(keep, dtype=np.float64) / (1.0 - p)


_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_LOW32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(counter, key):
    """Philox4x32 with 10 rounds (Salmon et al., SC'11): four uint32 arrays of counter
    words and a (k0, k1) key in, the four uint32 output words out, element-wise."""
    c = [np.asarray(word, dtype=np.uint64) & _LOW32 for word in counter]
    k0, k1 = int(key[0]) & 0xFFFFFFFF, int(key[1]) & 0xFFFFFFFF
    for _ in range(10):
        p0 = np.uint64(_PHILOX_M[0]) * c[0]  # below 2**64: no wrap-around
        p1 = np.uint64(_PHILOX_M[1]) * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ np.uint64(k0), p1 & _LOW32,
             (p0 >> np.uint64(32)) ^ c[3] ^ np.uint64(k1), p0 & _LOW32]
        k0, k1 = (k0 + _PHILOX_W[0]) & 0xFFFFFFFF, (k1 + _PHILOX_W[1]) & 0xFFFFFFFF
    return [word.astype(np.uint32) for word in c]


def dropout_mask(n, p, seed):
    """The keep decisions of units 0..n-1 (bool), as bnrs documents them.

    Units go in groups of 32: unit i (g = i // 32, r = i % 32) takes word r // 8 of the
    Philox4x32-10 block at counter (8g + r % 8) keyed by the 64-bit seed, and is kept iff
    that word is below round((1 - p) * 2**32) (capped at 2**32 - 1), with p as float32.
    """
    p = float(np.float32(p))
    if p == 0.0:
        return np.ones(n, dtype=bool)
    unit = np.arange(n, dtype=np.uint64)
    group, within = unit // np.uint64(32), unit % np.uint64(32)
    block = group * np.uint64(8) + within % np.uint64(8)
    zeros = np.zeros(n, dtype=np.uint64)
    words = philox4x32_10((block & _LOW32, block >> np.uint64(32), zeros, zeros),
                          (seed & 0xFFFFFFFF, seed >> 32))
    word = np.choose((within // np.uint64(8)).astype(np.intp), words)
    threshold = min(math.floor((1.0 - p) * 2.0**32 + 0.5), 2**32 - 1)  # round half up
    return word.astype(np.uint64) < np.uint64(threshold)


def dropout2d_keep(map_mask, shape):
    """A keep mask over the N*C feature maps, shaped to broadcast over an (N, C, H, W) array."""
    return np.reshape(map_mask, (shape[0], shape[1], 1, 1))


# --------------------------------------------------------------------------- linear


def linear(x, w, b=None):
    y = _f64(x) @ _f64(w).T
    return y if b is None else y + _f64(b)


def linear_backward(gy, x, w):
    """(grad_input, grad_weight, grad_bias) of :func:`linear`."""
    gy, x, w = _f64(gy), _f64(x), _f64(w)
    return gy @ w, gy.T @ x, gy.sum(axis=0)


# --------------------------------------------------------------------------- activations


def relu(x):
    x = _f64(x)
    return np.where(x > 0, x, 0.0)


def relu_backward(gy, x):
    return np.where(_f64(x) > 0, _f64(gy), 0.0)


def leaky_relu(x, negative_slope=0.01):
    x = _f64(x)
    return np.where(x > 0, x, negative_slope * x)


def leaky_relu_backward(gy, x, negative_slope=0.01):
    """PyTorch's rule: slope 1 where x > 0, ``negative_slope`` elsewhere (x = 0 included)."""
    gy = _f64(gy)
    return np.where(_f64(x) > 0, gy, negative_slope * gy)


def sigmoid(x):
    # 1 / (1 + exp(-x)) written so that no exp overflows
    return np.exp(-np.logaddexp(0.0, -_f64(x)))


def sigmoid_backward(gy, y):
    y = _f64(y)
    return _f64(gy) * y * (1.0 - y)


def tanh(x):
    return np.tanh(_f64(x))


def tanh_backward(gy, y):
    return _f64(gy) * (1.0 - _f64(y) ** 2)


# --------------------------------------------------------------------------- loss


def log_softmax(x):
    """Row-wise log-softmax of an (N, C) array, shifted by the row max."""
    x = _f64(x)
    shifted = x - x.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def log_softmax_backward(gy, y):
    gy = _f64(gy)
    return gy - np.exp(_f64(y)) * gy.sum(axis=1, keepdims=True)


def cross_entropy(x, target):
    """Mean over rows of −log_softmax(x)[n, target[n]]."""
    target = np.asarray(target)
    return float(-log_softmax(x)[np.arange(len(target)), target].mean())


def cross_entropy_backward(x, target):
    """(softmax(x) − onehot(target)) / N."""
    target = np.asarray(target)
    grad = np.exp(log_softmax(x))
    grad[np.arange(len(target)), target] -= 1.0
    return grad / len(target)



def mse_loss(x, target):
    """Mean over every element of (x − target)²."""
    return float(np.mean((_f64(x) - _f64(target)) ** 2))


def mse_loss_backward(x, target):
    """2 (x − target) / numel."""
    diff = _f64(x) - _f64(target)
    return 2.0 * diff / diff.size


def huber_loss(x, target, delta=1.0):
    """Mean over every element of ½d² where |d| < delta, else delta (|d| − ½ delta)."""
    diff = _f64(x) - _f64(target)
    quadratic = np.abs(diff) < delta
    return float(np.mean(np.where(quadratic, 0.5 * diff ** 2,
                                  delta * (np.abs(diff) - 0.5 * delta))))


def huber_loss_backward(x, target, delta=1.0):
    """d / numel where |d| <= delta, else delta sign(d) / numel."""
    diff = _f64(x) - _f64(target)
    return np.clip(diff, -delta, delta) / diff.size

# --------------------------------------------------------------------------- optimizers


def sgd_step(param, grad, momentum_buffer=None, *, lr, momentum=0.0, dampening=0.0,
             nesterov=False, weight_decay=0.0, first_step=False):
    """One step of torch.optim.SGD; returns (new_param, new_momentum_buffer or None)."""
    param, d = _f64(param), _f64(grad)
    if weight_decay != 0:
        d = d + weight_decay * param
    buffer = None
    if momentum != 0:
        if first_step:
            buffer = d.copy()
        else:
            buffer = momentum * _f64(momentum_buffer) + (1 - dampening) * d
        d = d + momentum * buffer if nesterov else buffer
    return param - lr * d, buffer


def adam_step(param, grad, exp_avg, exp_avg_sq, step, *, lr=1e-3, beta1=0.9, beta2=0.999,
              eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False):
    """One step of torch.optim.Adam (AdamW when decoupled); returns (param, exp_avg, exp_avg_sq)."""
    param, grad = _f64(param), _f64(grad)
    if decoupled_weight_decay:
        param = param * (1 - lr * weight_decay)
    elif weight_decay != 0:
        grad = grad + weight_decay * param
    exp_avg = beta1 * _f64(exp_avg) + (1 - beta1) * grad
    exp_avg_sq = beta2 * _f64(exp_avg_sq) + (1 - beta2) * grad * grad
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    denom = np.sqrt(exp_avg_sq) / np.sqrt(bias_correction2) + eps
    return param - (lr / bias_correction1) * exp_avg / denom, exp_avg, exp_avg_sq


# --------------------------------------------------------------------------- gradient check


# How close an exact float64 gradient comes to central differences with the default step:
# truncation error ~ step², rounding error ~ 1e-16·|loss| / step.
FD_TOLERANCE = {"rtol": 1e-6, "atol": 1e-7, "dtype": None}


def numerical_gradients(loss, *arrays, step=1e-6):
    """Central-difference gradients of the scalar ``loss(*arrays)`` with respect to each array.

    Each array is copied to float64 and perturbed one element at a time; returns a tuple with
    one gradient per array.
    """
    points = [np.array(array, dtype=np.float64) for array in arrays]  # private copies
    gradients = []
    for point in points:
        flat = point.reshape(-1)  # a view: writing to it perturbs ``point``
        grad = np.empty_like(flat)
        for i in range(flat.size):
            original = flat[i]
            flat[i] = original + step
            above = loss(*points)
            flat[i] = original - step
            below = loss(*points)
            flat[i] = original
            grad[i] = (above - below) / (2 * step)
        gradients.append(grad.reshape(point.shape))
    return tuple(gradients)


def weighted_sum(y, gy):
    """The scalar Σ y·gy whose gradient with respect to y is gy (the fixtures' convention)."""
    return float(np.sum(_f64(y) * _f64(gy)))


def adaptive_avg_pool2d(x):
    """Global average pooling, (N, C, H, W) to (N, C, 1, 1)."""
    return _f64(x).mean(axis=(2, 3), keepdims=True)


def adaptive_avg_pool2d_backward(gy, input_shape):
    """Each output gradient spread evenly over its H×W plane."""
    return np.broadcast_to(_f64(gy) / (input_shape[2] * input_shape[3]), input_shape).copy()


def network_forward(module, x, params, prefix=""):
    """float64 forward of a bnrs module tree, with the parameters taken from ``params``
    (a dict keyed by state-dict names) and batch norm on batch statistics (training mode).

    Only the structure (layer kinds and their geometry) is read from ``module``; the
    computation is this file's. Branches: ``Concat`` concatenates its branches' outputs
    along axis 1, ``Residual`` is ``activation(body(x) + shortcut(x))``.
    """
    kind = type(module).__name__
    if kind == "Sequential":
        for name, child in module.named_children():
            x = network_forward(child, x, params, f"{prefix}{name}.")
        return x
    if kind == "Concat":
        return np.concatenate(
            [network_forward(branch, x, params, f"{prefix}branches.{i}.")
             for i, branch in enumerate(module.branches)], axis=1)
    if kind == "Residual":
        y = network_forward(module.body, x, params, f"{prefix}body.")
        y = y + (x if module.shortcut is None else
                 network_forward(module.shortcut, x, params, f"{prefix}shortcut."))
        return y if module.activation is None else network_forward(
            module.activation, y, params, f"{prefix}activation.")
    if kind == "Conv2d":
        return conv2d(x, params[prefix + "weight"], params.get(prefix + "bias"),
                      module.stride, module.padding, module.dilation, module.groups)
    if kind == "BatchNorm2d":
        return batch_norm(x, params[prefix + "weight"], params[prefix + "bias"],
                          training=True, eps=module.eps)[0]
    if kind == "ReLU":
        return relu(x)
    if kind == "MaxPool2d":
        return max_pool2d(x, module.kernel_size, module.stride, module.padding)[0]
    if kind == "AdaptiveAvgPool2d":
        return adaptive_avg_pool2d(x)
    if kind == "Flatten":
        return _f64(x).reshape(x.shape[0], -1)
    if kind == "Linear":
        return linear(x, params[prefix + "weight"], params.get(prefix + "bias"))
    raise NotImplementedError(f"network_forward: no reference for {kind}")
