"""Per-sample normalisation layers: GroupNorm, LayerNorm and InstanceNorm2d.

Unlike batch norm, these normalise each sample with its own statistics, so they behave the
same at any batch size (1 included) and in training and evaluation: the standard remedies
for the small batches where batch norm's statistics are noisy. All three run the one
group-norm kernel (:func:`bnrs.functional.native_group_norm`): LayerNorm over the trailing
dimensions is one group, InstanceNorm2d is one group per channel without affine.
"""

from __future__ import annotations

import math

import numpy as np

from .. import functional as F
from .layers import positive_int
from .module import Module, Parameter

__all__ = ["GroupNorm", "InstanceNorm2d", "LayerNorm"]


def _eps(eps) -> float:
    value = F._real(eps, "eps")
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"eps: expected a positive finite float, got {eps!r}")
    return value


class _PerSampleNorm(Module):
    """Shared parameters, forward and backward: per-channel affine over group norm.

    A subclass gives ``_check_shape(shape, batched)`` and its kernels:
    ``_normalise(x, weight, bias) -> (output, mean, rstd)`` and
    ``_normalise_backward(grad, x, weight, mean, rstd) -> (grad_input, grad_weight,
    grad_bias)``.
    """

    _parameter_names = ("weight", "bias")

    def _init_affine(self, name: str, shape: tuple[int, ...], weight: bool,
                     bias: bool) -> None:
        """Create ``weight`` (ones) and ``bias`` (zeros) of ``shape``, as asked; ``name``
        is the argument that sets the shape, for the error when it is too large."""
        if weight or bias:
            F.check_fits_in_memory(name, 2 * math.prod(shape), np.dtype(np.float64).itemsize)
        self.weight = Parameter(np.ones(shape)) if weight else None
        self.bias = Parameter(np.zeros(shape)) if bias else None

    def _affine(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        return (None if self.weight is None else self.weight.data,
                None if self.bias is None else self.bias.data)

    def forward(self, input) -> np.ndarray:
        """Normalise each sample's values with their own statistics (see the class)."""
        x = F.as_float32(input, "input")
        self._check_shape(x.shape, batched=True)
        weight, bias = self._affine()
        output, mean, rstd = self._normalise(x, weight, bias)
        self._ctx = (x, mean, rstd)
        return output

    def backward(self, grad_output, input_grad: bool = True) -> np.ndarray | None:
        """Add the weight and bias gradients; return the input gradient (or None)."""
        x, mean, rstd = self._saved()
        grad = self._grad_output(grad_output, x.shape)
        grad_input, grad_weight, grad_bias = self._normalise_backward(
            grad, x, self._affine()[0], mean, rstd)
        if self.weight is not None:
            self.weight.grad += grad_weight
        if self.bias is not None:   # a bias never comes without a weight here
            self.bias.grad += grad_bias
        return grad_input if input_grad else None

    def output_shape(self, input_shape) -> tuple[int, ...]:
        """The sample shape, unchanged (checked against the layer's sizes)."""
        shape = tuple(input_shape)
        self._check_shape(shape, batched=False)
        return shape


class GroupNorm(_PerSampleNorm):
    """Group normalisation of (N, C, *) input, as ``torch.nn.GroupNorm`` (Wu and He 2018).

    Parameters
    ----------
    num_groups : int
        The C channels are split into this many consecutive groups; must divide C.
    num_channels : int
        C.
    eps : float, default 1e-5
        Added to the variance.
    affine : bool, default True
        Learn a per-channel scale ``weight`` (init 1) and shift ``bias`` (init 0), both
        of shape (C,).
    rng, random_state : ignored
        Accepted so that every layer takes them.

    Notes
    -----
    Each (sample, group) is normalised with its own mean and biased variance, in training
    and evaluation alike; there are no running statistics. ``GroupNorm(1, C)`` is layer
    normalisation over (C, *) with a per-channel affine; ``GroupNorm(C, C)`` is instance
    normalisation with one. Keeps its input and the (N, num_groups) mean and 1/std for
    backward.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5,
                 affine: bool = True, *, rng=None, random_state=None):
        super().__init__()
        self.num_groups = positive_int(num_groups, "num_groups")
        self.num_channels = positive_int(num_channels, "num_channels")
        if self.num_channels % self.num_groups:
            raise ValueError(f"num_groups: {num_groups} does not divide num_channels "
                             f"({num_channels})")
        self.eps = _eps(eps)
        self.affine = bool(affine)
        self._init_affine("num_channels", (self.num_channels,), self.affine, self.affine)

    def _check_shape(self, shape: tuple[int, ...], batched: bool) -> None:
        channel_axis = 1 if batched else 0
        if len(shape) < channel_axis + 1 or shape[channel_axis] != self.num_channels:
            layout = f"(N, {self.num_channels}, *)" if batched else f"({self.num_channels}, *)"
            raise ValueError(f"{self!r}: expected input of shape {layout}, got {shape}")

    def _normalise(self, x, weight, bias):
        return F.native_group_norm(x, self.num_groups, weight, bias, self.eps)

    def _normalise_backward(self, grad, x, weight, mean, rstd):
        return F.group_norm_backward(grad, x, self.num_groups, weight, mean, rstd)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"


class LayerNorm(_PerSampleNorm):
    """Layer normalisation over the trailing dimensions, as ``torch.nn.LayerNorm``.

    Parameters
    ----------
    normalized_shape : int or sequence of int
        The trailing dimensions normalised together (``n_features`` for an (N, F) input).
    eps : float, default 1e-5
        Added to the variance.
    elementwise_affine : bool, default True
        Learn a per-element scale ``weight`` (init 1) and shift ``bias`` (init 0), both of
        shape ``normalized_shape``.
    bias : bool, default True
        With ``elementwise_affine``, whether to learn the ``bias`` (PyTorch >= 2.1).
    rng, random_state : ignored
        Accepted so that every layer takes them.

    Notes
    -----
    Each leading index is normalised with the mean and biased variance of its
    ``normalized_shape`` values, in training and evaluation alike. For conv feature maps
    ``LayerNorm([C, H, W])`` has per-element parameters of shape (C, H, W); the grammar's
    ``ln`` token uses ``GroupNorm(1, C)`` instead (per-channel parameters).
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, *, rng=None, random_state=None):
        super().__init__()
        dims = F._normalized_shape(normalized_shape)
        self.normalized_shape = tuple(positive_int(d, "normalized_shape") for d in dims)
        self.eps = _eps(eps)
        self.elementwise_affine = bool(elementwise_affine)
        self._init_affine("normalized_shape", self.normalized_shape, self.elementwise_affine,
                          self.elementwise_affine and bool(bias))

    def _check_shape(self, shape: tuple[int, ...], batched: bool) -> None:
        k = len(self.normalized_shape)
        if len(shape) < k + int(batched) or tuple(shape[len(shape) - k:]) != \
                self.normalized_shape:
            dims = ", ".join(str(d) for d in self.normalized_shape)
            layout = f"(N, ..., {dims})" if batched else f"(..., {dims})"
            raise ValueError(f"{self!r}: expected input of shape {layout}, got {shape}")

    def _normalise(self, x, weight, bias):
        return F.native_layer_norm(x, self.normalized_shape, weight, bias, self.eps)

    def _normalise_backward(self, grad, x, weight, mean, rstd):
        return F.layer_norm_backward(grad, x, self.normalized_shape, weight, mean, rstd)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}")


class InstanceNorm2d(_PerSampleNorm):
    """Instance normalisation of (N, C, H, W) input, as ``torch.nn.InstanceNorm2d``.

    Parameters
    ----------
    num_features : int
        C, the number of channels.
    eps : float, default 1e-5
        Added to the variance.
    momentum : float, default 0.1
        Accepted for PyTorch's signature; unused without running statistics.
    affine : bool, default False
        Learn a per-channel scale ``weight`` (init 1) and shift ``bias`` (init 0).
    track_running_stats : bool, default False
        Only False is implemented: True raises ``NotImplementedError``.
    rng, random_state : ignored
        Accepted so that every layer takes them.

    Notes
    -----
    Each (sample, channel) map is normalised with its own mean and biased variance, in
    training and evaluation alike. As in PyTorch, a map of a single value is rejected
    (its normalised value would be 0 whatever the input). With the defaults the layer
    has no parameters and an empty state dict.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = False, track_running_stats: bool = False, *, rng=None,
                 random_state=None):
        super().__init__()
        self.num_features = positive_int(num_features, "num_features")
        self.eps = _eps(eps)
        self.momentum = None if momentum is None else F._real(momentum, "momentum")
        if track_running_stats:
            raise NotImplementedError(
                "track_running_stats: InstanceNorm2d with running statistics is not "
                "implemented; use track_running_stats=False (PyTorch's default)")
        self.affine = bool(affine)
        self.track_running_stats = False
        self._init_affine("num_features", (self.num_features,), self.affine, self.affine)

    def _check_shape(self, shape: tuple[int, ...], batched: bool) -> None:
        channel_axis = 1 if batched else 0
        if len(shape) != channel_axis + 3 or shape[channel_axis] != self.num_features:
            layout = f"(N, {self.num_features}, H, W)" if batched else \
                f"({self.num_features}, H, W)"
            raise ValueError(f"{self!r}: expected input of shape {layout}, got {shape}")
        if shape[-1] * shape[-2] == 1:
            raise ValueError(f"{self!r}: expected more than 1 spatial element per channel, "
                             f"got input of shape {shape}")

    def _normalise(self, x, weight, bias):
        return F.native_instance_norm(x, weight, bias, self.eps)

    def _normalise_backward(self, grad, x, weight, mean, rstd):
        return F.instance_norm_backward(grad, x, weight, mean, rstd)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}")
