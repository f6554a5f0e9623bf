"""A model's summary: a table of its layers, output shapes, parameters and multiply-adds.

As Keras's ``model.summary()`` and torchinfo's ``summary(model, input_size)``: one row per
layer with the shape of its output for one sample, its parameter count and the
multiply-adds of its inference (evaluation-mode) forward for one sample, then the totals.

Multiply-adds are counted as follows (other conventions differ by the bias and the
normalisations; torchinfo, for one, counts biases too):

=====================================  ==============================================
Conv2d                                 C_out * H_out * W_out * C_in / groups * kH * kW
                                       (the bias additions are not counted)
Linear                                 out_features * in_features per row
BatchNorm, BatchRenorm                 1 per element: in evaluation mode a per-channel
                                       scale and shift with the running statistics
GroupNorm, LayerNorm, InstanceNorm2d   2 per element: the sum of squares of the
                                       per-sample statistics, then the scale and shift
pooling, activations, dropout,         0: comparisons, additions, element-wise
Flatten                                functions or nothing
Concat, Residual                       one row each: the sums over the layers of their
                                       branches (the concatenation and the residual
                                       addition count 0)
=====================================  ==============================================
"""

from __future__ import annotations

import math
from typing import NamedTuple

from .batchnorm import _BatchNorm
from .branches import Concat, Residual
from .layers import Conv2d, Linear
from .module import Module, Sequential
from .normalization import GroupNorm, InstanceNorm2d, LayerNorm

__all__ = ["LayerSummary", "ModelSummary", "summary"]


class LayerSummary(NamedTuple):
    """One row of a :class:`ModelSummary`.

    Attributes
    ----------
    name : str
        The layer's name in the state dict (``"0"``, ``"3"``, ``"block.1"``).
    kind : str
        Its class name.
    output_shape : tuple of int
        The shape of its output for one sample (no batch axis).
    params : int
        Its parameter count (the values the optimizer trains).
    buffers : int
        The values of its buffers (running statistics and batch counters).
    mult_adds : int
        Multiply-adds of its evaluation-mode forward for one sample (see the module
        docstring for what is counted).
    """

    name: str
    kind: str
    output_shape: tuple[int, ...]
    params: int
    buffers: int
    mult_adds: int


class ModelSummary(str):
    """The summary table, a ``str`` (print it), with its numbers as attributes.

    Attributes
    ----------
    input_shape : tuple of int
        One sample's shape.
    layers : list of LayerSummary
        One row per layer, in order.
    output_shape : tuple of int
        The model's output shape for one sample.
    total_params : int
        All parameters (all are trainable in bnrs).
    total_buffers : int
        All buffer values (in the state dict, not trained).
    total_mult_adds : int
        Multiply-adds per sample of the evaluation-mode forward.
    """

    input_shape: tuple[int, ...]
    layers: list[LayerSummary]
    output_shape: tuple[int, ...]
    total_params: int
    total_buffers: int
    total_mult_adds: int


def layers_in_order(module: Module, prefix: str = "") -> list[tuple[str, Module]]:
    """``(name, layer)`` for the layers of a (possibly nested) Sequential in the order
    they run, or for ``module`` itself if it has no children.

    Raises TypeError for any other container: the order of its data flow is unknown.
    """
    if isinstance(module, (Concat, Residual)):
        return [(prefix or type(module).__name__, module)]
    if isinstance(module, Sequential):
        layers = []
        for name, child in module.named_children():
            layers += layers_in_order(child, f"{prefix}.{name}" if prefix else name)
        return layers
    if next(module.children(), None) is not None:
        raise TypeError(f"cannot follow the data through a {type(module).__name__} with "
                        "child modules; only Sequential, Concat and Residual containers "
                        "are supported")
    return [(prefix or type(module).__name__, module)]


def _mult_adds(layer: Module, input_shape: tuple[int, ...],
               output_shape: tuple[int, ...]) -> int:
    """Multiply-adds of ``layer``'s evaluation-mode forward on one sample."""
    if isinstance(layer, Concat):
        return sum(_path_mult_adds(branch, input_shape) for branch in layer.branches)
    if isinstance(layer, Residual):
        paths = [layer.body] + ([] if layer.shortcut is None else [layer.shortcut])
        return sum(_path_mult_adds(path, input_shape) for path in paths)
    if isinstance(layer, Conv2d):
        fan_in = layer.in_channels // layer.groups * math.prod(layer.kernel_size)
        return math.prod(output_shape) * fan_in
    if isinstance(layer, Linear):
        return math.prod(output_shape) * layer.in_features
    if isinstance(layer, _BatchNorm):
        return math.prod(output_shape)
    if isinstance(layer, (GroupNorm, LayerNorm, InstanceNorm2d)):
        return 2 * math.prod(output_shape)
    return 0


def _path_mult_adds(path: Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-adds of a branch (a Sequential or a layer) on one sample."""
    total, shape = 0, input_shape
    for _, layer in layers_in_order(path):
        output_shape = tuple(layer.output_shape(shape))
        total += _mult_adds(layer, shape, output_shape)
        shape = output_shape
    return total


def _group(number: int) -> str:
    return f"{number:,}"


def _shape_text(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(["N"] + [str(d) for d in shape]) + ")"


def summary(model: Module, input_shape) -> ModelSummary:
    """Summarise ``model`` for samples of ``input_shape``: layers, shapes, counts.

    Parameters
    ----------
    model : Module
        A :class:`Sequential` (nested ones are followed; a Concat or Residual block is
        one row) or a single layer.
    input_shape : tuple of int
        One sample's shape, without the batch axis: (C, H, W) or (n_features,).

    Returns
    -------
    ModelSummary
        The table as a ``str`` (``print`` it), with the rows and totals as attributes.

    Raises
    ------
    ValueError
        If a layer does not accept the shape it gets (the layer's own message).
    TypeError
        For a module with children that is not a Sequential, Concat or Residual.

    Examples
    --------
    >>> from bnrs import nn
    >>> model = nn.from_spec("c8-bn-relu-mp2", (1, 8, 8), 10, random_state=0)
    >>> info = nn.summary(model, (1, 8, 8))
    >>> info.total_params, info.total_mult_adds
    (1386, 6400)
    >>> print(info.splitlines()[3])
    0      Conv2d       (N, 8, 8, 8)                80         4,608
    """
    if not isinstance(model, Module):
        raise TypeError(f"model: expected a bnrs.nn.Module, got {type(model).__name__}")
    try:
        shape = tuple(int(d) for d in input_shape)
    except TypeError:
        raise TypeError(f"input_shape: expected a tuple of ints, "
                        f"got {input_shape!r}") from None
    input_shape = shape
    rows = []
    for name, layer in layers_in_order(model):
        output_shape = tuple(layer.output_shape(shape))
        params = sum(param.data.size for _, param in layer.named_parameters())
        buffers = sum(buffer.size for _, buffer in layer.named_buffers())
        rows.append(LayerSummary(name, type(layer).__name__, output_shape, params, buffers,
                                 _mult_adds(layer, shape, output_shape)))
        shape = output_shape
    total_params = sum(row.params for row in rows)
    total_buffers = sum(row.buffers for row in rows)
    total_mult_adds = sum(row.mult_adds for row in rows)

    header = ("Layer", "Type", "Output shape", "Params", "Mult-adds")
    cells = [(row.name, row.kind, _shape_text(row.output_shape), _group(row.params),
              _group(row.mult_adds)) for row in rows]
    input_row = ("input", "", _shape_text(input_shape), "", "")
    widths = [max(len(cell[i]) for cell in [header, input_row] + cells) for i in range(5)]
    widths[2] = max(widths[2], 16)
    widths[3:] = [max(w, 12) for w in widths[3:]]

    def line(cell) -> str:
        return (f"{cell[0]:<{widths[0]}}  {cell[1]:<{widths[1]}}  {cell[2]:<{widths[2]}}  "
                f"{cell[3]:>{widths[3]}}  {cell[4]:>{widths[4]}}").rstrip()

    width = sum(widths) + 8
    lines = [line(header), "-" * width, line(input_row)] + [line(cell) for cell in cells]
    lines += ["=" * width,
              (f"Total params: {_group(total_params)} "
               f"({_group(4 * total_params)} bytes as float32)"),
              f"Buffers (running statistics, not trained): {_group(total_buffers)}",
              f"Mult-adds per sample: {_group(total_mult_adds)}",
              f"Output shape: {_shape_text(shape)}"]
    result = ModelSummary("\n".join(lines))
    result.input_shape, result.layers, result.output_shape = input_shape, rows, shape
    result.total_params, result.total_buffers = total_params, total_buffers
    result.total_mult_adds = total_mult_adds
    return result
