"""Batch renormalisation (Ioffe 2017): BatchRenorm1d and BatchRenorm2d, a remedy for small batches.

Batch norm normalises a training batch with its own mean and standard deviation, which are
noisy when the batch is small (2-8 images), and at evaluation time with running averages,
which the network never saw in training. Batch renormalisation trains with the batch
statistics corrected towards the running ones::

    x_hat = (x - mean_B) / std_B                  # as batch norm
    r = clip(std_B / std, 1 / r_max, r_max)       # per channel, treated as a constant
    d = clip((mean_B - mean) / std, -d_max, d_max)
    y = weight * (x_hat * r + d) + bias

where ``mean`` and ``std = sqrt(running_var + eps)`` are the running statistics. With
``r = 1, d = 0`` (``r_max = 1, d_max = 0``) this is exactly batch norm. In evaluation
mode both layers compute ``weight * (x - mean) / std + bias``.

The forward and backward reuse the batch-norm kernels (:func:`bnrs.functional.native_batch_norm`
and :func:`bnrs.functional.batch_norm_backward`); the r/d correction is per-channel NumPy.
Because r and d are constants for the gradient, ``dL/dx_hat = weight * r * dL/dy``, so the
kernel's backward, fed ``r * dL/dy``, gives the input gradient and ``sum(r dL/dy x_hat)``,
to which ``d * sum(dL/dy)`` is added for the weight gradient.

Running statistics are a *bias-corrected* exponential moving average: the t-th training
batch moves them by ``momentum / (1 - (1 - momentum)**t)`` (1 at the first batch, then
towards ``momentum``), so that they are an average of the batches seen so far even early in
training, with the paper's small momentum (0.01) and no r_max/d_max warm-up schedule. The
variance averaged is the unbiased batch variance, as in batch norm.
"""

from __future__ import annotations

import numpy as np

from .. import functional as F
from .._validation import as_real, check_real
from .batchnorm import BatchNorm1d, BatchNorm2d

__all__ = ["BatchRenorm1d", "BatchRenorm2d"]


class _BatchRenorm:
    """The renormalised training forward and backward, mixed into a batch-norm class."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.01,
                 affine: bool = True, r_max: float = 3.0, d_max: float = 5.0, *, rng=None,
                 random_state=None):
        check_real(as_real(momentum, "momentum"), "momentum", 0.0, 1.0, low_open=True)
        super().__init__(num_features, eps, momentum, affine, track_running_stats=True,
                         rng=rng, random_state=random_state)
        self.r_max = check_real(as_real(r_max, "r_max"), "r_max", 1.0)
        self.d_max = check_real(as_real(d_max, "d_max"), "d_max", 0.0)

    def _channel_shape(self, ndim: int) -> tuple[int, ...]:
        return (1, self.num_features) + (1,) * (ndim - 2)

    def _reduce_axes(self, ndim: int) -> tuple[int, ...]:
        return (0,) + tuple(range(2, ndim))

    def forward(self, input) -> np.ndarray:
        """Renormalised batch statistics in training, running statistics in evaluation."""
        if not self.training:
            return super().forward(input)
        x = F.as_float32(input, "input")
        self._check_ndim(x.shape, batched=True)
        x_hat, mean, invstd = F.native_batch_norm(x, training=True, eps=self.eps)
        batch_std = 1.0 / invstd.astype(np.float64)
        running_std = np.sqrt(self.running_var.astype(np.float64) + self.eps)
        r = np.clip(batch_std / running_std, 1.0 / self.r_max, self.r_max)
        d = np.clip((mean - self.running_mean) / running_std, -self.d_max, self.d_max)
        if self.num_batches_tracked == 0:
            r, d = np.ones_like(r), np.zeros_like(d)   # no running statistics yet
        scale, shift = r, d
        if self.weight is not None:
            scale = self.weight.data * r
            shift = self.weight.data * d + self.bias.data
        shape = self._channel_shape(x.ndim)
        output = x_hat * scale.astype(np.float32).reshape(shape)
        output += shift.astype(np.float32).reshape(shape)
        self._update_running_stats(mean, batch_std, x.size // self.num_features)
        self._ctx = ("renorm", x, mean, invstd, r.astype(np.float32), d.astype(np.float32))
        return output

    def _update_running_stats(self, mean, batch_std, count: int) -> None:
        self.num_batches_tracked += 1
        weight = self.momentum / (1.0 - (1.0 - self.momentum) ** int(self.num_batches_tracked))
        # Recovered from the float32 invstd: a zero variance can come out a hair below 0.
        biased_var = np.maximum(batch_std ** 2 - self.eps, 0.0)
        unbiased_var = biased_var * count / max(count - 1, 1)
        self.running_mean += np.float32(weight) * (mean - self.running_mean)
        self.running_var += (weight * (unbiased_var - self.running_var)).astype(np.float32)

    def backward(self, grad_output, input_grad: bool = True) -> np.ndarray | None:
        """Add the weight and bias gradients; return the input gradient (or None)."""
        if self._ctx is None or not isinstance(self._ctx[0], str):   # evaluation mode
            return super().backward(grad_output, input_grad)
        _, x, mean, invstd, r, d = self._saved()
        grad = self._grad_output(grad_output, x.shape)
        shape = self._channel_shape(grad.ndim)
        weight = None if self.weight is None else self.weight.data
        grad_input, grad_weight, _ = F.batch_norm_backward(
            grad * r.reshape(shape), x, weight if weight is not None else np.ones_like(r),
            mean, invstd, training=True)
        if self.weight is not None:
            grad_sum = grad.sum(axis=self._reduce_axes(grad.ndim), dtype=np.float64)
            self.weight.grad += grad_weight + (d * grad_sum).astype(np.float32)
            self.bias.grad += grad_sum.astype(np.float32)
        return grad_input if input_grad else None

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, r_max={self.r_max}, d_max={self.d_max}")


class BatchRenorm1d(_BatchRenorm, BatchNorm1d):
    """Batch renormalisation of (N, C) or (N, C, L) input (Ioffe 2017).

    Parameters
    ----------
    num_features : int
        C, the number of channels (features).
    eps : float, default 1e-5
    momentum : float, default 0.01
        The weight of a new batch in the (bias-corrected) running statistics.
    affine : bool, default True
        Learn ``weight`` (gamma) and ``bias`` (beta).
    r_max, d_max : float, default 3 and 5
        Clipping of the scale and shift corrections; ``r_max=1, d_max=0`` is batch norm.
    rng, random_state : ignored

    Notes
    -----
    The state dict has batch norm's keys (``weight``, ``bias``, ``running_mean``,
    ``running_var``, ``num_batches_tracked``). See the module docstring for the method.
    """


class BatchRenorm2d(_BatchRenorm, BatchNorm2d):
    """Batch renormalisation of (N, C, H, W) input (Ioffe 2017).

    Parameters
    ----------
    num_features : int
        C, the number of channels.
    eps : float, default 1e-5
    momentum : float, default 0.01
        The weight of a new batch in the (bias-corrected) running statistics.
    affine : bool, default True
        Learn ``weight`` (gamma) and ``bias`` (beta).
    r_max, d_max : float, default 3 and 5
        Clipping of the scale and shift corrections; ``r_max=1, d_max=0`` is batch norm.
    rng, random_state : ignored

    Notes
    -----
    Statistics per channel over (N, H, W). See the module docstring for the method.
    """
