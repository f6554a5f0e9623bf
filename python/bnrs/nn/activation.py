"""Element-wise activation layers: ReLU, LeakyReLU, Sigmoid, Tanh."""

from __future__ import annotations


import numpy as np

from .. import functional as F
from .._validation import as_real, check_real
from .module import Module

__all__ = ["LeakyReLU", "ReLU", "Sigmoid", "Tanh"]


class _Activation(Module):
    """An element-wise layer; subclasses keep its input or output for backward."""

    def __init__(self, *, rng=None, random_state=None):
        super().__init__()

    def output_shape(self, input_shape) -> tuple[int, ...]:
        """The sample shape, unchanged."""
        return tuple(input_shape)


class ReLU(_Activation):
    """``max(x, 0)``, as ``torch.nn.ReLU``; keeps its input for backward.

    Parameters
    ----------
    rng, random_state : ignored
        Accepted so that every layer takes them.
    """

    def forward(self, input) -> np.ndarray:
        """Apply the rectifier."""
        x = F.as_float32(input, "input")
        self._ctx = x
        return F.relu(x)

    def backward(self, grad_output, input_grad: bool = True) -> np.ndarray | None:
        """Pass the gradient where the input was positive."""
        x = self._saved()
        grad = self._grad_output(grad_output, x.shape)
        return F.relu_backward(grad, x) if input_grad else None


class LeakyReLU(_Activation):
    """``x if x > 0 else negative_slope * x``, as ``torch.nn.LeakyReLU``.

    Parameters
    ----------
    negative_slope : float, default 0.01
    rng, random_state : ignored
        Accepted so that every layer takes them.
    """

    def __init__(self, negative_slope: float = 0.01, *, rng=None, random_state=None):
        super().__init__()
        self.negative_slope = check_real(as_real(negative_slope, "negative_slope"),
                                         "negative_slope")

    def forward(self, input) -> np.ndarray:
        """Apply the leaky rectifier."""
        x = F.as_float32(input, "input")
        self._ctx = x
        return F.leaky_relu(x, self.negative_slope)

    def backward(self, grad_output, input_grad: bool = True) -> np.ndarray | None:
        """Scale the gradient by 1 or ``negative_slope`` by the input's sign."""
        x = self._saved()
        grad = self._grad_output(grad_output, x.shape)
        return F.leaky_relu_backward(grad, x, self.negative_slope) if input_grad else None

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope}"


class Sigmoid(_Activation):
    """The logistic function, as ``torch.nn.Sigmoid``; keeps its output for backward.

    Parameters
    ----------
    rng, random_state : ignored
        Accepted so that every layer takes them.
    """

    def forward(self, input) -> np.ndarray:
        """Apply 1 / (1 + exp(-x))."""
        output = F.sigmoid(input)
        self._ctx = output
        return output

    def backward(self, grad_output, input_grad: bool = True) -> np.ndarray | None:
        """``grad * y * (1 - y)`` from the saved output y."""
        output = self._saved()
        grad = self._grad_output(grad_output, output.shape)
        return F.sigmoid_backward(grad, output) if input_grad else None


class Tanh(_Activation):
    """Hyperbolic tangent, as ``torch.nn.Tanh``; keeps its output for backward.

    Parameters
    ----------
    rng, random_state : ignored
        Accepted so that every layer takes them.
    """

    def forward(self, input) -> np.ndarray:
        """Apply tanh."""
        output = F.tanh(input)
        self._ctx = output
        return output

    def backward(self, grad_output, input_grad: bool = True) -> np.ndarray | None:
        """``grad * (1 - y**2)`` from the saved output y."""
        output = self._saved()
        grad = self._grad_output(grad_output, output.shape)
        return F.tanh_backward(grad, output) if input_grad else None
