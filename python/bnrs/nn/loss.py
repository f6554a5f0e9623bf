"""Loss functions: cross-entropy for classification, mean squared error and Huber for
regression, each a forward returning a float and a backward returning the input gradient."""

from __future__ import annotations

import numpy as np

from .. import functional as F
from .._validation import as_real, check_real
from .module import Module

__all__ = ["CrossEntropyLoss", "HuberLoss", "MSELoss"]


class CrossEntropyLoss(Module):
    """Mean cross-entropy of logits against class indices, as ``torch.nn.CrossEntropyLoss()``.

    ``loss = crit(logits, target)`` returns a Python float and keeps the logits and
    targets; ``crit.backward()`` then returns the gradient of the loss with respect to the
    logits, ``(softmax(logits) - onehot(target)) / N``. ``crit(logits, target,
    sample_weight)`` gives the weighted mean ``sum(w * loss) / sum(w)`` instead (a weight
    of 2 counts as the sample twice, scikit-learn's meaning) and the gradient rows
    scaled by ``w[n] / sum(w)``; weights of 1 give the unweighted bits.

    Examples
    --------
    >>> import numpy as np
    >>> from bnrs import nn
    >>> crit = nn.CrossEntropyLoss()
    >>> round(crit(np.zeros((2, 4), np.float32), np.array([0, 3])), 4)
    1.3863
    >>> crit.backward().shape
    (2, 4)
    """

    def forward(self, input, target, sample_weight=None) -> float:
        """The mean loss of (N, C) logits ``input`` for N class indices ``target``
        (weighted by N finite, non-negative ``sample_weight``, not all zero, if given)."""
        logits = F.as_float32(input, "input")
        if logits.ndim != 2:
            raise ValueError(f"input: expected (N, C) logits, got shape {logits.shape}")
        labels = np.asarray(target)
        if labels.shape != logits.shape[:1]:
            raise ValueError(f"target: expected {logits.shape[0]} class indices (shape "
                             f"{logits.shape[:1]}), got shape {labels.shape}")
        weight = F._sample_weight(sample_weight, len(labels), "sample_weight")
        loss = F.cross_entropy(logits, labels, weight)
        self._ctx = (logits, labels, weight)
        return float(loss)

    def backward(self, grad_output: float = 1.0, input_grad: bool = True) -> np.ndarray:
        """The gradient of the last loss with respect to its logits.

        Parameters
        ----------
        grad_output : float, default 1.0
            Multiplies the gradient (the gradient of the final objective w.r.t. the loss).
        input_grad : bool
            Accepted for the :class:`Module` signature; the logits gradient is always
            returned.

        Returns
        -------
        ndarray, float32, shape (N, C)
        """
        logits, labels, weight = self._saved()
        grad_output = F._real(grad_output, "grad_output")
        grad = F.cross_entropy_backward(logits, labels, weight)
        if grad_output != 1.0:
            grad *= np.float32(grad_output)
        return grad


class _RegressionLoss(Module):
    """A mean over the elements of an elementwise loss of ``input - target`` (NumPy).

    Subclasses give the elementwise loss and its derivative; the float32 difference is
    kept for the backward, the loss is summed in float64. With ``sample_weight`` (one
    finite, non-negative weight per row, not all zero) each row's elements count
    ``w[n]`` times: the loss is ``sum(w[n] * loss[n, j]) / (sum(w) * n_columns)``
    (scikit-learn's meaning: a weight of 2 counts as the row twice) and weights of 1
    give the unweighted bits.
    """

    def _elementwise(self, diff: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _derivative(self, diff: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def forward(self, input, target, sample_weight=None) -> float:
        """The mean loss of ``input`` against ``target`` of the same shape (weighted by
        one ``sample_weight`` per row of ``input``, if given)."""
        prediction = F.as_float32(input, "input")
        target = F.as_float32(target, "target")
        if target.shape != prediction.shape:
            # PyTorch broadcasts with a warning; an (N,) target against (N, 1) outputs
            # would silently become an N x N loss.
            raise ValueError(f"target: expected the shape of input {prediction.shape}, got "
                             f"{target.shape}")
        diff = prediction - target
        weight = None
        if sample_weight is not None:
            weight = _row_weights(sample_weight, diff.shape)
        self._ctx = (diff, weight)
        with np.errstate(over="ignore", invalid="ignore"):
            elementwise = self._elementwise(diff.astype(np.float64))
            if weight is None:
                return float(np.mean(elementwise))
            # Same summation as np.mean's (weights of 1 multiply exactly), then one
            # division, so that weights of 1 give np.mean's bits.
            return float(np.sum(elementwise * weight)
                         / (weight.sum() * (diff.size // max(len(diff), 1))))

    def backward(self, grad_output: float = 1.0, input_grad: bool = True) -> np.ndarray:
        """The gradient of the last loss with respect to its input.

        Parameters
        ----------
        grad_output : float, default 1.0
            Multiplies the gradient (the gradient of the final objective w.r.t. the loss).
        input_grad : bool
            Accepted for the :class:`Module` signature; the input gradient is always
            returned.

        Returns
        -------
        ndarray, float32, of the input's shape
        """
        diff, weight = self._saved()
        grad_output = F._real(grad_output, "grad_output")
        scale = np.float32(grad_output / max(diff.size, 1))
        if weight is not None:
            # w[n] / sum(w) per row in place of 1 / N (the same float for weights of 1)
            scale = (grad_output * weight
                     / (weight.sum() * (diff.size // max(len(diff), 1)))).astype(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            return (self._derivative(diff) * scale).astype(np.float32, copy=False)


def _row_weights(sample_weight, shape: tuple[int, ...]) -> np.ndarray:
    """Checked sample weights as a float64 column broadcasting over ``shape``'s rows."""
    weight = F._sample_weight(sample_weight, shape[0] if shape else 1, "sample_weight")
    if not np.isfinite(weight).all() or (weight < 0).any():
        raise ValueError("sample_weight: expected finite, non-negative sample weights, "
                         f"got {weight[~np.isfinite(weight) | (weight < 0)][0]!r}")
    if not weight.sum() > 0:
        raise ValueError("sample_weight: expected at least one positive sample weight, "
                         "got weights that are all zero")
    return weight.reshape((-1,) + (1,) * (len(shape) - 1))


class MSELoss(_RegressionLoss):
    """Mean squared error, as ``torch.nn.MSELoss()`` (mean over every element).

    ``loss = crit(input, target)`` returns ``mean((input - target) ** 2)`` as a Python
    float; ``crit.backward()`` returns ``2 * (input - target) / input.size``. ``input`` and
    ``target`` must have the same shape (PyTorch would broadcast them, with a warning).

    Examples
    --------
    >>> import numpy as np
    >>> from bnrs import nn
    >>> crit = nn.MSELoss()
    >>> crit(np.array([[1.0], [3.0]], np.float32), np.array([[0.0], [1.0]], np.float32))
    2.5
    >>> crit.backward().ravel().tolist()
    [1.0, 2.0]
    """

    def _elementwise(self, diff):
        return np.square(diff)

    def _derivative(self, diff):
        return np.float32(2.0) * diff


class HuberLoss(_RegressionLoss):
    """Huber loss, as ``torch.nn.HuberLoss(delta=delta)`` (mean over every element).

    Elementwise, for ``x = input - target``: ``0.5 * x**2`` where ``|x| < delta``, else
    ``delta * (|x| - 0.5 * delta)``: squared error near the target, absolute error (so a
    bounded gradient, ``delta * sign(x)``) far from it.

    Parameters
    ----------
    delta : float, default 1.0
        Where the loss turns from quadratic to linear; a finite number > 0.

    Examples
    --------
    >>> import numpy as np
    >>> from bnrs import nn
    >>> crit = nn.HuberLoss(delta=1.0)
    >>> crit(np.array([0.5, 3.0], np.float32), np.zeros(2, np.float32))
    1.3125
    >>> crit.backward().tolist()
    [0.25, 0.5]
    """

    def __init__(self, delta: float = 1.0):
        super().__init__()
        self.delta = check_real(as_real(delta, "delta", numbers_only=True), "delta", 0.0,
                                low_open=True)

    def _elementwise(self, diff):
        magnitude = np.abs(diff)
        return np.where(magnitude < self.delta, 0.5 * np.square(diff),
                        self.delta * (magnitude - 0.5 * self.delta))

    def _derivative(self, diff):
        return np.clip(diff, np.float32(-self.delta), np.float32(self.delta))

    def extra_repr(self) -> str:
        return f"delta={self.delta}"
