"""Convolution, linear, pooling and reshaping layers over :mod:`bnrs.functional`.

Every layer also has ``output_shape(input_shape)``, the shape arithmetic on one sample
(without the batch axis), which :func:`bnrs.nn.from_spec` uses to size the next layer.
"""

from __future__ import annotations

import math

import numpy as np

from .. import _core
from .. import functional as F
from .._validation import check_int, check_int_pair
from .module import Module, Parameter, as_generator

__all__ = ["AvgPool2d", "Conv2d", "Flatten", "Linear", "MaxPool2d"]


def int_pair(value, name: str, minimum: int) -> tuple[int, int]:
    """Expand an int or a pair of ints to a pair, each at least ``minimum``."""
    pair = check_int_pair(value, name, minimum)
    if max(pair) >= 2**63:
        raise ValueError(f"{name}: {value!r} is out of range (a 64-bit integer)")
    return pair


def positive_int(value, name: str) -> int:
    """Check that ``value`` is an int >= 1 and return it."""
    return check_int(value, name, 1)


def _spatial_output(layer: Module, input_shape, output_hw, *window) -> tuple[int, int]:
    """The (H_out, W_out) of a window layer on a (C, H, W) sample, from ``output_hw``
    (:func:`bnrs._core.conv2d_output_shape` or ``pool2d_output_shape``, the kernels' rule),
    or ValueError naming the layer if the window does not fit."""
    try:
        return output_hw((input_shape[1], input_shape[2]), *window)
    except ValueError as error:
        raise ValueError(f"{layer!r}: {error}") from None


def _check_input(layer: Module, x: np.ndarray, channels: int | None, layout: str) -> None:
    """ValueError naming the expected layout unless ``x`` is 4-D with ``channels``."""
    if x.ndim != 4 or (channels is not None and x.shape[1] != channels):
        raise ValueError(f"{layer!r}: expected a 4-D input {layout}, got shape {x.shape}")


def _check_sample(layer: Module, input_shape, channels: int | None, layout: str):
    shape = tuple(input_shape)
    if len(shape) != 3 or (channels is not None and shape[0] != channels):
        raise ValueError(f"{layer!r}: expected samples of shape {layout}, got {shape}")
    return shape


def _check_weight_fits(shape, sizes: dict[str, tuple[object, int]]) -> None:
    """MemoryError naming the argument at fault if a weight of ``shape`` exceeds memory.

    ``sizes`` maps each argument that sets the shape to (its value, the factor it
    contributes to the size); the one with the largest factor is the one blamed.
    """
    try:
        F.check_fits_in_memory("weight", math.prod(shape), np.dtype(np.float64).itemsize)
    except MemoryError as error:
        arg = max(sizes, key=lambda name: sizes[name][1])
        raise MemoryError(f"{arg}: {sizes[arg][0]!r} makes a weight of shape {shape} too "
                          f"large to allocate ({error})") from None


def _kaiming_uniform(generator: np.random.Generator, shape, fan_in: int) -> np.ndarray:
    """PyTorch's default weight (and bias) initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    ``kaiming_uniform_(a=sqrt(5))`` has gain sqrt(2 / (1 + 5)) and bound
    gain * sqrt(3 / fan_in), which is 1/sqrt(fan_in); PyTorch's bias uses the same bound.
    """
    bound = 1.0 / math.sqrt(fan_in)
    return generator.uniform(-bound, bound, size=shape)


class Conv2d(Module):
    """2-D convolution over NCHW input, as ``torch.nn.Conv2d``.

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size : int or (int, int)
    stride : int or (int, int), default 1
    padding : int or (int, int), default 0
        Zero padding on both sides of each spatial axis.
    dilation : int or (int, int), default 1
    bias : bool, default True
    groups : int, default 1
        Channel groups, dividing both channel counts: output channel block g sees input
        channel block g only. ``groups == in_channels`` is a depthwise convolution
        (``out_channels`` a multiple of ``in_channels``), run by a per-channel stencil.
        After ``bias`` (PyTorch has it before), so that positional arguments keep their
        meaning: pass it by name.
    rng, random_state : int, numpy.random.Generator or None
        Seed or generator for the initialisation (one of the two names).

    Attributes
    ----------
    weight : Parameter, shape (out_channels, in_channels / groups, kH, kW)
        Initialised U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
        fan_in = in_channels / groups * kH * kW, PyTorch's default.
    bias : Parameter, shape (out_channels,), or None
        Same distribution.
    """

    _parameter_names = ("weight", "bias")

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1,
                 padding=0, dilation=1, bias: bool = True, groups: int = 1, *, rng=None,
                 random_state=None):
        super().__init__()
        self.in_channels = positive_int(in_channels, "in_channels")
        self.out_channels = positive_int(out_channels, "out_channels")
        self.kernel_size = int_pair(kernel_size, "kernel_size", 1)
        self.stride = int_pair(stride, "stride", 1)
        self.padding = int_pair(padding, "padding", 0)
        self.dilation = int_pair(dilation, "dilation", 1)
        self.groups = positive_int(groups, "groups")
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(
                f"groups: expected a number of groups that divides in_channels "
                f"({self.in_channels}) and out_channels ({self.out_channels}), got {groups!r}")
        generator = as_generator(random_state, rng)
        group_in = self.in_channels // self.groups
        fan_in = group_in * self.kernel_size[0] * self.kernel_size[1]
        shape = (self.out_channels, group_in) + self.kernel_size
        _check_weight_fits(shape, {
            "out_channels": (self.out_channels, self.out_channels),
            "in_channels": (self.in_channels, group_in),
            "kernel_size": (self.kernel_size, math.prod(self.kernel_size))})
        self.weight = Parameter(_kaiming_uniform(generator, shape, fan_in))
        self.bias = (Parameter(_kaiming_uniform(generator, (self.out_channels,), fan_in))
                     if bias else None)

    def forward(self, input) -> np.ndarray:
        """Convolve a (N, in_channels, H, W) batch."""
        x = F.as_float32(input, "input")
        _check_input(self, x, self.in_channels, f"(N, {self.in_channels}, H, W)")
        output = F.conv2d(x, self.weight.data, None if self.bias is None else self.bias.data,
                          self.stride, self.padding, self.dilation, self.groups)
        self._ctx = x
        return output

    def backward(self, grad_output, input_grad: bool = True) -> np.ndarray | None:
        """Add the weight and bias gradients; return the input gradient (or None)."""
        x = self._saved()
        grad_input, grad_weight, grad_bias = F.conv2d_backward(
            grad_output, x, self.weight.data, self.stride, self.padding, self.dilation,
            bias=self.bias is not None, input_grad=input_grad, groups=self.groups)
        self.weight.grad += grad_weight
        if self.bias is not None:
            self.bias.grad += grad_bias
        return grad_input

    def output_shape(self, input_shape) -> tuple[int, int, int]:
        """(out_channels, H_out, W_out) for a (in_channels, H, W) sample."""
        shape = _check_sample(self, input_shape, self.in_channels, f"({self.in_channels}, H, W)")
        return (self.out_channels,) + _spatial_output(
            self, shape, _core.conv2d_output_shape, self.kernel_size, self.stride,
            self.padding, self.dilation)

    def extra_repr(self) -> str:
        text = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}")
        if self.padding != (0, 0):
            text += f", padding={self.padding}"
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        if self.bias is None:
            text += ", bias=False"
        return text


class Linear(Module):
    """Fully connected layer ``y = x @ weight.T + bias``, as ``torch.nn.Linear``.

    Parameters
    ----------
    in_features, out_features : int
    bias : bool, default True
    rng, random_state : int, numpy.random.Generator or None
        Seed or generator for the initialisation (one of the two names).

    Attributes
    ----------
    weight : Parameter, shape (out_features, in_features)
        Initialised U(-1/sqrt(in_features), 1/sqrt(in_features)), PyTorch's default.
    bias : Parameter, shape (out_features,), or None
        Same distribution.

    Notes
    -----
    The input is (*, in_features): any leading axes are treated as the batch.
    """

    _parameter_names = ("weight", "bias")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 rng=None, random_state=None):
        super().__init__()
        self.in_features = positive_int(in_features, "in_features")
        self.out_features = positive_int(out_features, "out_features")
        generator = as_generator(random_state, rng)
        shape = (self.out_features, self.in_features)
        _check_weight_fits(shape, {"out_features": (self.out_features, self.out_features),
                                   "in_features": (self.in_features, self.in_features)})
        self.weight = Parameter(_kaiming_uniform(generator, shape, self.in_features))
        self.bias = (Parameter(_kaiming_uniform(generator, (self.out_features,),
                                                self.in_features)) if bias else None)

    def forward(self, input) -> np.ndarray:
        """Apply the affine map to a (*, in_features) input."""
        x = F.as_float32(input, "input")
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"{self!r}: expected input (*, {self.in_features}), "
                             f"got shape {x.shape}")
        rows = x.reshape(-1, self.in_features)
        output = F.linear(rows, self.weight.data,
                          None if self.bias is None else self.bias.data)
        self._ctx = (rows, x.shape)
        return output.reshape(x.shape[:-1] + (self.out_features,))

    def backward(self, grad_output, input_grad: bool = True) -> np.ndarray | None:
        """Add the weight and bias gradients; return the input gradient (or None)."""
        rows, input_shape = self._saved()
        grad = self._grad_output(grad_output, input_shape[:-1] + (self.out_features,))
        grad_rows = grad.reshape(-1, self.out_features)
        grad_input, grad_weight, grad_bias = F.linear_backward(
            grad_rows, rows, self.weight.data, bias=self.bias is not None,
            input_grad=input_grad)
        self.weight.grad += grad_weight
        if self.bias is not None:
            self.bias.grad += grad_bias
        return None if grad_input is None else grad_input.reshape(input_shape)

    def output_shape(self, input_shape) -> tuple[int, ...]:
        """The sample shape with its last axis (in_features) replaced by out_features."""
        shape = tuple(input_shape)
        if not shape or shape[-1] != self.in_features:
            raise ValueError(f"{self!r}: expected samples of shape (*, {self.in_features}), "
                             f"got {shape}")
        return shape[:-1] + (self.out_features,)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class _Pool2d(Module):
    """Shared arguments and checks of the 2-D pooling layers."""

    def __init__(self, kernel_size, stride=None, padding=0, *, rng=None, random_state=None):
        super().__init__()
        self.kernel_size = int_pair(kernel_size, "kernel_size", 1)
        self.stride = self.kernel_size if stride is None else int_pair(stride, "stride", 1)
        self.padding = int_pair(padding, "padding", 0)
        # The kernels' padding rule and message, checked now rather than at the first
        # forward: an input the size of the kernel fits any valid window.
        _core.pool2d_output_shape(self.kernel_size, self.kernel_size, self.stride,
                                  self.padding)

    def _input(self, input) -> np.ndarray:
        x = F.as_float32(input, "input")
        _check_input(self, x, None, "(N, C, H, W)")
        return x

    def output_shape(self, input_shape) -> tuple[int, int, int]:
        """(C, H_out, W_out) for a (C, H, W) sample."""
        shape = _check_sample(self, input_shape, None, "(C, H, W)")
        return (shape[0],) + _spatial_output(
            self, shape, _core.pool2d_output_shape, self.kernel_size, self.stride,
            self.padding)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}")


class MaxPool2d(_Pool2d):
    """2-D max pooling, as ``torch.nn.MaxPool2d`` (dilation 1, ``ceil_mode=False``).

    Parameters
    ----------
    kernel_size : int or (int, int)
    stride : int or (int, int), optional
        Defaults to ``kernel_size``.
    padding : int or (int, int), default 0
        Implicit -inf padding, at most half the kernel size.
    rng, random_state : ignored
        Accepted so that every layer takes them.

    Notes
    -----
    Only the argmax indices (int64, the output's shape) are kept for backward.
    """

    def forward(self, input) -> np.ndarray:
        """Pool a (N, C, H, W) batch."""
        x = self._input(input)
        if not self.training:
            # Inference needs no argmax: keep the input instead, in case of a backward.
            output = F.max_pool2d(x, self.kernel_size, self.stride, self.padding)
            self._ctx = (None, x)
            return output
        output, indices = F.max_pool2d(x, self.kernel_size, self.stride, self.padding,
                                       return_indices=True)
        self._ctx = (indices, x.shape)
        return output

    def backward(self, grad_output, input_grad: bool = True) -> np.ndarray | None:
        """Route each output gradient to its argmax."""
        indices, saved = self._saved()
        if indices is None:  # after an evaluation-mode forward: find the argmax now
            _, indices = F.max_pool2d(saved, self.kernel_size, self.stride, self.padding,
                                      return_indices=True)
            saved = saved.shape
        grad = self._grad_output(grad_output, indices.shape)
        return F.max_pool2d_backward(grad, indices, saved) if input_grad else None


class AvgPool2d(_Pool2d):
    """2-D average pooling, as ``torch.nn.AvgPool2d`` (``ceil_mode=False``).

    Parameters
    ----------
    kernel_size : int or (int, int)
    stride : int or (int, int), optional
        Defaults to ``kernel_size``.
    padding : int or (int, int), default 0
        Zero padding, at most half the kernel size.
    count_include_pad : bool, default True
        Divide by the full window size even where it overlaps the padding.
    rng, random_state : ignored
        Accepted so that every layer takes them.
    """

    def __init__(self, kernel_size, stride=None, padding=0, count_include_pad: bool = True,
                 *, rng=None, random_state=None):
        super().__init__(kernel_size, stride, padding)
        self.count_include_pad = bool(count_include_pad)

    def forward(self, input) -> np.ndarray:
        """Pool a (N, C, H, W) batch."""
        x = self._input(input)
        output = F.avg_pool2d(x, self.kernel_size, self.stride, self.padding,
                              self.count_include_pad)
        self._ctx = (x.shape, output.shape)
        return output

    def backward(self, grad_output, input_grad: bool = True) -> np.ndarray | None:
        """Spread each output gradient over its window."""
        input_shape, output_shape = self._saved()
        grad = self._grad_output(grad_output, output_shape)
        if not input_grad:
            return None
        return F.avg_pool2d_backward(grad, input_shape, self.kernel_size, self.stride,
                                     self.padding, self.count_include_pad)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text if self.count_include_pad else text + ", count_include_pad=False"


class Flatten(Module):
    """Merge the axes ``start_dim`` .. ``end_dim`` into one, as ``torch.nn.Flatten``.

    Parameters
    ----------
    start_dim : int, default 1
    end_dim : int, default -1
    rng, random_state : ignored
        Accepted so that every layer takes them.

    Notes
    -----
    The output is a view of a C-contiguous input (no copy).
    """

    def __init__(self, start_dim: int = 1, end_dim: int = -1, *, rng=None,
                 random_state=None):
        super().__init__()
        self.start_dim = check_int(start_dim, "start_dim")
        self.end_dim = check_int(end_dim, "end_dim")

    def _flat_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        ndim = len(shape)
        start = self.start_dim + ndim if self.start_dim < 0 else self.start_dim
        end = self.end_dim + ndim if self.end_dim < 0 else self.end_dim
        if not 0 <= start <= end < ndim:
            raise ValueError(f"{self!r}: cannot flatten axes {self.start_dim}..{self.end_dim} "
                             f"of a {ndim}-D input")
        merged = math.prod(int(d) for d in shape[start:end + 1])  # exact, never overflows
        return shape[:start] + (merged,) + shape[end + 1:]

    def forward(self, input) -> np.ndarray:
        """Reshape the input."""
        x = F.as_float32(input, "input")
        self._ctx = x.shape
        return x.reshape(self._flat_shape(x.shape))

    def backward(self, grad_output, input_grad: bool = True) -> np.ndarray | None:
        """Reshape the gradient back to the input's shape."""
        input_shape = self._saved()
        grad = self._grad_output(grad_output, self._flat_shape(input_shape))
        return grad.reshape(input_shape) if input_grad else None

    def output_shape(self, input_shape) -> tuple[int, ...]:
        """The flattened sample shape (axes count the batch axis, as in forward)."""
        return self._flat_shape((1,) + tuple(input_shape))[1:]

    def extra_repr(self) -> str:
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"
