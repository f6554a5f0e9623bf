"""Loss functions."""

from __future__ import annotations

import numpy as np

from .. import functional as F
from .module import Module

__all__ = ["CrossEntropyLoss"]


class CrossEntropyLoss(Module):
    """Mean cross-entropy of logits against class indices, as ``torch.nn.CrossEntropyLoss()``.

    ``loss = crit(logits, target)`` returns a Python float and keeps the logits and
    targets; ``crit.backward()`` then returns the gradient of the loss with respect to the
    logits, ``(softmax(logits) - onehot(target)) / N``.

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

    def forward(self, input, target) -> float:
        """The mean loss of (N, C) logits ``input`` for N class indices ``target``."""
        logits = F.as_float32(input, "input")
        if logits.ndim != 2:
            raise ValueError(f"input: expected (N, C) logits, got shape {logits.shape}")
        labels = np.asarray(target)
        if labels.shape != logits.shape[:1]:
            raise ValueError(f"target: expected {logits.shape[0]} class indices (shape "
                             f"{logits.shape[:1]}), got shape {labels.shape}")
        loss = F.cross_entropy(logits, labels)
        self._ctx = (logits, labels)
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
        logits, labels = self._saved()
        grad_output = F._real(grad_output, "grad_output")
        grad = F.cross_entropy_backward(logits, labels)
        if grad_output != 1.0:
            grad *= np.float32(grad_output)
        return grad
