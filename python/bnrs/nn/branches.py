"""Branching networks: global average pooling, parallel branches and residual blocks.

The containers mirror these PyTorch modules, so a state dict loads either way (the keys
are ``branches.<i>.<j>.<name>`` for :class:`Concat` and ``body.<j>.<name>``,
``shortcut.<j>.<name>`` for :class:`Residual`)::

    class Concat(torch.nn.Module):
        def __init__(self, *branches):
            super().__init__()
            self.branches = torch.nn.ModuleList(branches)

        def forward(self, x):
            return torch.cat([branch(x) for branch in self.branches], dim=1)

    class Residual(torch.nn.Module):
        def __init__(self, body, shortcut=None, activation=None):
            super().__init__()
            self.body, self.shortcut, self.activation = body, shortcut, activation

        def forward(self, x):
            y = self.body(x) + (x if self.shortcut is None else self.shortcut(x))
            return y if self.activation is None else self.activation(y)

Every branch reads the same input array (no copy per branch); in backward the input
gradients of the branches are summed in branch order (body before shortcut), so the
result is the same bits at any thread count.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .. import functional as F
from .module import Module

__all__ = ["AdaptiveAvgPool2d", "Concat", "ModuleList", "Residual"]


class AdaptiveAvgPool2d(Module):
    """Global average pooling, as ``torch.nn.AdaptiveAvgPool2d(1)``: (N, C, H, W) to
    (N, C, 1, 1).

    Parameters
    ----------
    output_size : 1 or (1, 1), default 1
        Only the global pooling is supported.
    rng, random_state : ignored
        Accepted so that every layer takes them.

    Notes
    -----
    The mean is NumPy's float32 sum over each (H*W) plane (pairwise, in a fixed order)
    divided by H*W; backward spreads ``grad / (H*W)`` over the plane, as PyTorch does.
    """

    def __init__(self, output_size=1, *, rng=None, random_state=None):
        super().__init__()
        if output_size not in (1, (1, 1)) or isinstance(output_size, bool):
            raise ValueError(f"output_size: only global pooling (1 or (1, 1)) is "
                             f"supported, got {output_size!r}")
        self.output_size = (1, 1)

    def forward(self, input) -> np.ndarray:
        """Average each channel of a (N, C, H, W) batch."""
        x = F.as_float32(input, "input")
        if x.ndim != 4:
            raise ValueError(f"{self!r}: expected a 4-D input (N, C, H, W), got shape "
                             f"{x.shape}")
        n, c, h, w = x.shape
        planes = x.reshape(n, c, h * w)
        output = planes.sum(axis=2, dtype=np.float32) / np.float32(max(h * w, 1))
        self._ctx = x.shape
        return output.reshape(n, c, 1, 1)

    def backward(self, grad_output, input_grad: bool = True) -> np.ndarray | None:
        """Spread each output gradient evenly over its plane."""
        input_shape = self._saved()
        n, c, h, w = input_shape
        grad = self._grad_output(grad_output, (n, c, 1, 1))
        if not input_grad:
            return None
        grad_input = np.empty(input_shape, dtype=np.float32)
        grad_input[...] = grad / np.float32(max(h * w, 1))
        return grad_input

    def output_shape(self, input_shape) -> tuple[int, int, int]:
        """(C, 1, 1) for a (C, H, W) sample."""
        shape = tuple(input_shape)
        if len(shape) != 3:
            raise ValueError(f"{self!r}: expected samples of shape (C, H, W), got {shape}")
        return (shape[0], 1, 1)

    def extra_repr(self) -> str:
        return "output_size=1"


class ModuleList(Module):
    """Modules held in a list, named ``"0"``, ``"1"``, ..., as ``torch.nn.ModuleList``.

    A holder only (no forward): the containers below use it so that their state-dict keys
    are PyTorch's (``branches.0.0.weight``).
    """

    def __init__(self, modules=()):
        super().__init__()
        for index, module in enumerate(modules):
            self.add_module(str(index), module)

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())

    def __getitem__(self, index: int) -> Module:
        return list(self._modules.values())[index]


def _sum_in_order(grads: list[np.ndarray]) -> np.ndarray:
    """The sum of the branches' input gradients, left to right, in a new array when
    there are several (a gradient may be a view of the caller's ``grad_output``)."""
    total = grads[0]
    if len(grads) > 1:
        total = np.add(grads[0], grads[1])
        for grad in grads[2:]:
            total += grad
    return total


class Concat(Module):
    """Parallel branches on the same input, outputs concatenated along the channels.

    As ``torch.cat([branch(x) for branch in branches], dim=1)``; an Inception block is a
    Concat of four branches.

    Parameters
    ----------
    *branches : Module
        At least one; usually each a :class:`Sequential`. Their outputs must agree in
        every axis but the channel axis (1).

    Attributes
    ----------
    branches : ModuleList
        The branches; state-dict keys are ``branches.<i>.<key in branch i>``.
    """

    def __init__(self, *branches: Module):
        super().__init__()
        if not branches:
            raise ValueError("Concat: expected at least one branch")
        self.add_module("branches", ModuleList(branches))

    def forward(self, input) -> np.ndarray:
        """Run every branch on the same input and concatenate along axis 1."""
        x = F.as_float32(input, "input")
        outputs = [branch(x) for branch in self.branches]
        try:
            output = np.concatenate(outputs, axis=1)
        except ValueError:
            shapes = ", ".join(str(np.shape(o)) for o in outputs)
            raise ValueError(f"Concat: the branches' outputs differ in an axis other "
                             f"than 1: {shapes}") from None
        self._ctx = ([o.shape[1] for o in outputs], output.shape)
        return output

    def backward(self, grad_output, input_grad: bool = True) -> np.ndarray | None:
        """Give each branch its channels of the gradient; sum their input gradients."""
        channels, output_shape = self._saved()
        grad = self._grad_output(grad_output, output_shape)
        bounds = np.cumsum([0] + channels)
        grads = [branch.backward(np.ascontiguousarray(grad[:, start:stop]),
                                 input_grad=input_grad)
                 for branch, start, stop in zip(self.branches, bounds[:-1], bounds[1:])]
        return _sum_in_order(grads) if input_grad else None

    def output_shape(self, input_shape) -> tuple[int, ...]:
        """The branches' common sample shape with their channel counts summed."""
        shapes = [tuple(branch.output_shape(input_shape)) for branch in self.branches]
        if any(len(s) < 1 or s[1:] != shapes[0][1:] for s in shapes):
            raise ValueError(f"Concat: the branches' outputs differ in an axis other than "
                             f"the channels: {shapes}")
        return (sum(s[0] for s in shapes),) + shapes[0][1:]


class Residual(Module):
    """``activation(body(x) + shortcut(x))``, a residual block (identity shortcut if None).

    With ``body`` conv-bn-relu-conv-bn, a conv1x1-bn ``shortcut`` when the shape changes
    and ``activation=ReLU()``, this is torchvision's ``BasicBlock``.

    Parameters
    ----------
    body : Module
    shortcut : Module or None, default None
        None is the identity: then ``body`` must keep the input's shape.
    activation : Module or None, default None
        Applied after the addition.

    Attributes
    ----------
    body, shortcut, activation : Module or None
        State-dict keys ``body.<key>`` and ``shortcut.<key>``.
    """

    def __init__(self, body: Module, shortcut: Module | None = None,
                 activation: Module | None = None):
        super().__init__()
        self.add_module("body", body)
        for name, module in (("shortcut", shortcut), ("activation", activation)):
            if module is not None:
                self.add_module(name, module)
            setattr(self, name, module)

    def forward(self, input) -> np.ndarray:
        """The body and the shortcut on the same input, added, then the activation."""
        x = F.as_float32(input, "input")
        body = self.body(x)
        skip = x if self.shortcut is None else self.shortcut(x)
        if body.shape != skip.shape:
            raise ValueError(f"Residual: the body's output {body.shape} and the shortcut's "
                             f"{skip.shape} differ; give a shortcut that matches")
        output = np.add(body, skip)
        self._ctx = output.shape
        return output if self.activation is None else self.activation(output)

    def backward(self, grad_output, input_grad: bool = True) -> np.ndarray | None:
        """The gradient of the sum goes to both paths; their input gradients are added."""
        output_shape = self._saved()
        grad = grad_output
        if self.activation is not None:
            grad = self.activation.backward(grad)
        grad = self._grad_output(grad, output_shape)
        grads = [self.body.backward(grad, input_grad=input_grad)]
        if self.shortcut is not None:
            grads.append(self.shortcut.backward(grad, input_grad=input_grad))
        elif input_grad:
            grads.append(grad)
        return _sum_in_order(grads) if input_grad else None

    def output_shape(self, input_shape) -> tuple[int, ...]:
        """The body's output shape (checked against the shortcut's)."""
        body = tuple(self.body.output_shape(input_shape))
        skip = tuple(input_shape if self.shortcut is None
                     else self.shortcut.output_shape(input_shape))
        if body != skip:
            raise ValueError(f"Residual: the body's output {body} and the shortcut's "
                             f"{skip} differ; give a shortcut that matches")
        return body if self.activation is None else tuple(
            self.activation.output_shape(body))
