"""Plain-NumPy float64 references for every operation in ``bnrs.functional``.

Written to be obviously correct, not fast, and independent of the Rust kernels: convolution
loops over the kernel taps (one strided view of the padded input per tap) instead of
im2col + GEMM, pooling loops over the output windows. Every function works in float64 and
returns new arrays; the optimizer steps return the updated state instead of writing in place.

Shapes and conventions follow PyTorch, as ``bnrs.functional`` does: NCHW inputs, conv weights
(C_out, C_in, kH, kW), linear weights (out_features, in_features).
"""

from __future__ import annotations

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


def conv2d(x, w, b=None, stride=1, padding=0, dilation=1):
    """Cross-correlation with zero padding: y[n,o,i,j] = b[o] + Σ x_pad[...] · w[o,c,p,q]."""
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


def conv2d_backward(gy, x, w, stride=1, padding=0, dilation=1):
    """(grad_input, grad_weight, grad_bias) of :func:`conv2d` for upstream gradient ``gy``."""
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


# --------------------------------------------------------------------------- dropout


def dropout(x, keep, p):
    """Inverted dropout with a given keep mask (bool, broadcastable to x): x·keep/(1−p).

    Also the backward: the gradient goes through the same mask and scale.
    """
    return _f64(x) * np.asarray(keep, dtype=np.float64) / (1.0 - p)


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
