"""Batch normalisation layers: BatchNorm1d and BatchNorm2d."""

from __future__ import annotations


import numpy as np

from .. import functional as F
from .._validation import as_real, check_real
from .layers import positive_int
from .module import Module, Parameter

__all__ = ["BatchNorm1d", "BatchNorm2d"]


class _BatchNorm(Module):
    """Shared state and arithmetic of BatchNorm1d / BatchNorm2d."""

    _parameter_names = ("weight", "bias")
    _buffer_names = ("running_mean", "running_var", "num_batches_tracked")
    #: Accepted numbers of input axes, and the layout named in errors.
    _input_ndims: tuple[int, ...] = ()
    _layout = ""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, *, rng=None,
                 random_state=None):
        super().__init__()
        self.num_features = positive_int(num_features, "num_features")
        self.eps = check_real(as_real(eps, "eps"), "eps", 0.0, low_open=True)
        if momentum is not None:  # None: the cumulative average
            momentum = check_real(as_real(momentum, "momentum"), "momentum", 0.0, 1.0)
        self.momentum = momentum
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        channels = self.num_features
        F.check_fits_in_memory("num_features", 4 * channels, np.dtype(np.float64).itemsize)
        self.weight = Parameter(np.ones(channels)) if self.affine else None
        self.bias = Parameter(np.zeros(channels)) if self.affine else None
        if self.track_running_stats:
            self.running_mean = np.zeros(channels, dtype=np.float32)
            self.running_var = np.ones(channels, dtype=np.float32)
            self.num_batches_tracked = np.zeros((), dtype=np.int64)
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None

    def _check_ndim(self, shape: tuple[int, ...], batched: bool) -> None:
        ndims = self._input_ndims if batched else tuple(n - 1 for n in self._input_ndims)
        channel_axis = 1 if batched else 0
        if len(shape) not in ndims or shape[channel_axis] != self.num_features:
            layout = self._layout.format(C=self.num_features)
            if not batched:
                layout = layout.replace("(N, ", "(")
            raise ValueError(f"{self!r}: expected input of shape {layout}, got {shape}")

    def forward(self, input) -> np.ndarray:
        """Normalise per channel with batch statistics (training) or running ones (eval).

        In training with running statistics, ``num_batches_tracked`` is incremented and the
        running mean and (unbiased) variance move by ``momentum`` (or by
        1/num_batches_tracked, a cumulative average, when ``momentum`` is None).
        """
        x = F.as_float32(input, "input")
        self._check_ndim(x.shape, batched=True)
        weight = None if self.weight is None else self.weight.data
        bias = None if self.bias is None else self.bias.data
        use_batch_stats = self.training or not self.track_running_stats
        if not self.track_running_stats:
            output, mean, invstd = F.native_batch_norm(x, weight, bias, training=True,
                                                       eps=self.eps)
        else:
            tracked = int(self.num_batches_tracked) + 1
            momentum = 1.0 / tracked if self.momentum is None else self.momentum
            output, mean, invstd = F.native_batch_norm(
                x, weight, bias, self.running_mean, self.running_var,
                training=use_batch_stats, momentum=momentum, eps=self.eps)
            if use_batch_stats:
                # After the kernel, so that a rejected batch leaves the count unchanged.
                self.num_batches_tracked += 1
        self._ctx = (x, mean, invstd, use_batch_stats)
        return output

    def backward(self, grad_output, input_grad: bool = True) -> np.ndarray | None:
        """Add the gamma and beta gradients; return the input gradient (or None)."""
        x, mean, invstd, use_batch_stats = self._saved()
        grad_input, grad_weight, grad_bias = F.batch_norm_backward(
            grad_output, x, None if self.weight is None else self.weight.data, mean, invstd,
            training=use_batch_stats)
        if self.weight is not None:
            self.weight.grad += grad_weight
            self.bias.grad += grad_bias
        return grad_input if input_grad else None

    def output_shape(self, input_shape) -> tuple[int, ...]:
        """The sample shape, unchanged (checked against ``num_features``)."""
        shape = tuple(input_shape)
        self._check_ndim(shape, batched=False)
        return shape

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}")


class BatchNorm1d(_BatchNorm):
    """Batch normalisation of (N, C) or (N, C, L) input, as ``torch.nn.BatchNorm1d``.

    Parameters
    ----------
    num_features : int
        C, the number of channels (features).
    eps : float, default 1e-5
        Added to the variance.
    momentum : float or None, default 0.1
        Weight of the new batch in the running statistics; None means a cumulative
        average (1 / num_batches_tracked).
    affine : bool, default True
        Learn a per-channel scale ``weight`` (gamma, init 1) and shift ``bias`` (beta,
        init 0).
    track_running_stats : bool, default True
        Keep ``running_mean`` (init 0), ``running_var`` (init 1) and the int64
        ``num_batches_tracked``, used in evaluation mode. When False the three buffers
        are None (absent from the state dict) and batch statistics are always used.
    rng, random_state : ignored
        Accepted so that every layer takes them.

    Notes
    -----
    Statistics are per channel over N (and L). Keeps its input and the per-channel
    mean and 1/std for backward.
    """

    _input_ndims = (2, 3)
    _layout = "(N, {C}) or (N, {C}, L)"


class BatchNorm2d(_BatchNorm):
    """Batch normalisation of (N, C, H, W) input, as ``torch.nn.BatchNorm2d``.

    Parameters
    ----------
    num_features : int
        C, the number of channels.
    eps : float, default 1e-5
        Added to the variance.
    momentum : float or None, default 0.1
        Weight of the new batch in the running statistics; None means a cumulative
        average (1 / num_batches_tracked).
    affine : bool, default True
        Learn a per-channel scale ``weight`` (gamma, init 1) and shift ``bias`` (beta,
        init 0).
    track_running_stats : bool, default True
        Keep ``running_mean`` (init 0), ``running_var`` (init 1) and the int64
        ``num_batches_tracked``, used in evaluation mode. When False the three buffers
        are None (absent from the state dict) and batch statistics are always used.
    rng, random_state : ignored
        Accepted so that every layer takes them.

    Notes
    -----
    Statistics are per channel over (N, H, W). Keeps its input and the per-channel
    mean and 1/std for backward.
    """

    _input_ndims = (4,)
    _layout = "(N, {C}, H, W)"
