"""Keras beside bnrs: any network the architecture grammar builds, mirrored channels last.

:func:`keras_plan` reads a bnrs network with NumPy alone and says which Keras layers
mirror it, with the weights they take (the bench's parent process calls it to refuse a
network Keras cannot mirror before anything is measured, without importing TensorFlow);
:func:`build_keras_network` turns the plan into a ``keras.Model`` (the functional API:
a :class:`~bnrs.nn.Concat` is a ``Concatenate`` on the channel axis, a
:class:`~bnrs.nn.Residual` an ``Add`` then the block's activation).

Channels last, as a Keras user on the CPU runs it: the input is (N, H, W, C), conv kernels
are transposed to (kh, kw, in, out), and the first dense layer after a flatten of a
(C, H, W) map has its rows permuted to the (H, W, C) order that Keras's Flatten reads.
PyTorch pads symmetrically; Keras's ``padding="same"`` puts the odd pixel after (at stride
2 on an even size): a padded conv is "same" only where the two agree on that input size,
else ``ZeroPadding2D`` then "valid".
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from .. import nn


class NoKerasCounterpart(TypeError):
    """A layer that Keras cannot mirror exactly; the message names it."""


@dataclasses.dataclass
class KerasLayer:
    """One ``keras.layers.<name>(**kwargs)``, then ``set_weights(weights)`` if any."""

    name: str
    kwargs: dict = dataclasses.field(default_factory=dict)
    weights: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class KerasConcat:
    """Every branch on the same input, concatenated on the channel (last) axis."""

    branches: list


@dataclasses.dataclass
class KerasResidual:
    """``activation(body(x) + shortcut(x))``; a None shortcut is the identity."""

    body: list
    shortcut: list | None
    activation: list


@dataclasses.dataclass
class _State:
    """The sample shape bnrs sees (channels first) and, after a flatten of a (C, H, W) map
    with H * W > 1, that map's shape: Keras's flat order is then (H, W, C)."""

    shape: tuple[int, ...]
    flattened_from: tuple[int, int, int] | None = None


def _refuse(layer: nn.Module, why: str) -> NoKerasCounterpart:
    return NoKerasCounterpart(f"Keras has no exact counterpart of {layer!r} ({why})")


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's (before, after) padding of ``padding="same"`` on one axis."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _padding_mode(layer: nn.Module, shape: tuple[int, ...], kernel) -> str:
    """"valid" (no padding), "same" (TensorFlow pads as bnrs on this input) or "pad"."""
    if tuple(layer.padding) == (0, 0):
        return "valid"
    same = [_same_padding(size, k, s)
            for size, k, s in zip(shape[1:], kernel, layer.stride)]
    return "same" if same == [(p, p) for p in layer.padding] else "pad"


def _conv(layer: nn.Conv2d, shape: tuple[int, ...]) -> list[KerasLayer]:
    dilation = tuple(layer.dilation)
    if dilation != (1, 1) and tuple(layer.stride) != (1, 1):
        raise _refuse(layer, "TensorFlow does not dilate a strided convolution")
    groups = layer.groups
    if groups not in (1, layer.in_channels):
        # TensorFlow's CPU kernels have no grouped convolution; depthwise they have.
        raise _refuse(layer, f"TensorFlow runs no grouped convolution on the CPU; "
                             f"groups 1 or {layer.in_channels} (depthwise) it does")
    extent = [d * (k - 1) + 1 for d, k in zip(dilation, layer.kernel_size)]
    mode = _padding_mode(layer, shape, extent)
    common = {"kernel_size": tuple(layer.kernel_size), "strides": tuple(layer.stride),
              "padding": "same" if mode == "same" else "valid", "dilation_rate": dilation,
              "use_bias": layer.bias is not None}
    if groups == 1:
        # (out, in, kh, kw) -> (kh, kw, in, out)
        weights = [layer.weight.data.transpose(2, 3, 1, 0)]
        name, kwargs = "Conv2D", {"filters": layer.out_channels, **common}
    else:
        # Output channel c·m + j is input channel c's j-th of m: (in·m, 1, kh, kw) ->
        # (kh, kw, in, m), DepthwiseConv2D's kernel.
        multiplier = layer.out_channels // layer.in_channels
        kh, kw = layer.kernel_size
        weights = [layer.weight.data.reshape(layer.in_channels, multiplier, kh, kw)
                   .transpose(2, 3, 0, 1)]
        name, kwargs = "DepthwiseConv2D", {"depth_multiplier": multiplier, **common}
    if layer.bias is not None:
        weights.append(layer.bias.data)
    conv = KerasLayer(name, kwargs, weights)
    if mode != "pad":
        return [conv]
    return [KerasLayer("ZeroPadding2D", {"padding": tuple((p, p) for p in layer.padding)}),
            conv]


def _pool(layer: nn.Module, shape: tuple[int, ...]) -> list[KerasLayer]:
    is_max = isinstance(layer, nn.MaxPool2d)
    name = "MaxPooling2D" if is_max else "AveragePooling2D"
    mode = _padding_mode(layer, shape, layer.kernel_size)
    kwargs = {"pool_size": tuple(layer.kernel_size), "strides": tuple(layer.stride)}
    if mode == "valid":
        return [KerasLayer(name, {**kwargs, "padding": "valid"})]
    # TensorFlow's "same" pooling leaves the padding out of the max and of the average's
    # count: bnrs's max pooling, and its average pooling without count_include_pad.
    if mode == "same" and (is_max or not layer.count_include_pad):
        return [KerasLayer(name, {**kwargs, "padding": "same"})]
    if not is_max and layer.count_include_pad:
        return [KerasLayer("ZeroPadding2D",
                           {"padding": tuple((p, p) for p in layer.padding)}),
                KerasLayer(name, {**kwargs, "padding": "valid"})]
    raise _refuse(layer, f"TensorFlow's \"same\" padding differs from {tuple(layer.padding)} "
                  f"on a {shape[1]}x{shape[2]} input")


def _batch_norm(layer: nn.Module) -> list[KerasLayer]:
    if isinstance(layer, (nn.BatchRenorm1d, nn.BatchRenorm2d)):
        raise _refuse(layer, "Keras 3 has no batch renormalisation: use bn")
    if not layer.track_running_stats or layer.momentum is None:
        raise _refuse(layer, "Keras keeps an exponential running average")
    # Keras's momentum weighs the old running value: PyTorch's (and bnrs's) 0.1 is 0.9.
    kwargs = {"momentum": 1 - layer.momentum, "epsilon": layer.eps,
              "center": layer.affine, "scale": layer.affine}
    affine = [layer.weight.data, layer.bias.data] if layer.affine else []
    return [KerasLayer("BatchNormalization", kwargs,
                       affine + [layer.running_mean, layer.running_var])]


def _group_norm(layer: nn.Module, groups: int) -> list[KerasLayer]:
    # Keras's GroupNormalization: per-(sample, group) mean and biased variance
    # (tf.nn.moments, two passes) and a per-channel affine, as bnrs's GroupNorm.
    affine = layer.affine
    weights = [layer.weight.data, layer.bias.data] if affine else []
    return [KerasLayer("GroupNormalization", {"groups": groups, "epsilon": layer.eps,
                                              "center": affine, "scale": affine}, weights)]


def _linear(layer: nn.Linear, state: _State) -> list[KerasLayer]:
    if len(state.shape) != 1:
        raise _refuse(layer, f"a dense layer on samples of shape {state.shape}")
    matrix = layer.weight.data  # (out, in)
    if state.flattened_from is not None:
        # The flatten before it read (C, H, W) in bnrs, (H, W, C) in Keras.
        c, h, w = state.flattened_from
        matrix = matrix.reshape(-1, c, h, w).transpose(0, 2, 3, 1).reshape(
            matrix.shape[0], -1)
    weights = [matrix.T]
    if layer.bias is not None:
        weights.append(layer.bias.data)
    return [KerasLayer("Dense", {"units": layer.out_features,
                                 "use_bias": layer.bias is not None}, weights)]


#: Layers that act on each value alone: they keep a flatten's (H, W, C) order as it is.
_ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.Dropout)


def _leaf(layer: nn.Module, state: _State) -> list:
    spatial = len(state.shape) == 3
    if state.flattened_from is not None and not isinstance(layer, (nn.Linear, nn.Flatten,
                                                                   *_ELEMENTWISE)):
        raise _refuse(layer, "after a flatten its features are in another order in Keras")
    if isinstance(layer, nn.Conv2d):
        return _conv(layer, state.shape)
    if isinstance(layer, nn.Linear):
        return _linear(layer, state)
    if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if len(state.shape) not in (1, 3):
            raise _refuse(layer, f"samples of shape {state.shape}")
        return _batch_norm(layer)
    if isinstance(layer, nn.GroupNorm):
        return _group_norm(layer, layer.num_groups)
    if isinstance(layer, nn.InstanceNorm2d):
        return _group_norm(layer, layer.num_features)
    if isinstance(layer, nn.LayerNorm):
        if len(layer.normalized_shape) != 1 or len(state.shape) != 1:
            raise _refuse(layer, "normalised over more than the last axis")
        return [KerasLayer("LayerNormalization", {
            "epsilon": layer.eps, "scale": layer.elementwise_affine,
            "center": layer.bias is not None},
            [p.data for p in (layer.weight, layer.bias) if p is not None])]
    if isinstance(layer, (nn.MaxPool2d, nn.AvgPool2d)):
        return _pool(layer, state.shape)
    if isinstance(layer, nn.AdaptiveAvgPool2d):
        return [KerasLayer("GlobalAveragePooling2D", {"keepdims": True})]
    if isinstance(layer, nn.Flatten):
        if (layer.start_dim, layer.end_dim) != (1, -1):
            raise _refuse(layer, "Keras flattens all but the batch axis")
        return [KerasLayer("Flatten")]
    if isinstance(layer, (nn.Dropout, nn.Dropout2d)):
        if layer.p >= 1:
            raise _refuse(layer, "Keras's dropout rate must be below 1")
        if isinstance(layer, nn.Dropout2d):
            if not spatial:
                raise _refuse(layer, f"samples of shape {state.shape}")
            return [KerasLayer("SpatialDropout2D", {"rate": layer.p})]
        return [KerasLayer("Dropout", {"rate": layer.p})]
    if isinstance(layer, nn.ReLU):
        return [KerasLayer("ReLU")]
    if isinstance(layer, nn.LeakyReLU):
        return [KerasLayer("LeakyReLU", {"negative_slope": layer.negative_slope})]
    if isinstance(layer, (nn.Sigmoid, nn.Tanh)):
        return [KerasLayer("Activation", {"activation": type(layer).__name__.lower()})]
    raise _refuse(layer, "not a layer the bench mirrors")


def _plan(layer: nn.Module, state: _State) -> tuple[list, _State]:
    """The plan of ``layer`` and the state after it."""
    if isinstance(layer, nn.Sequential):
        nodes: list[Any] = []
        for child in layer:
            child_nodes, state = _plan(child, state)
            nodes += child_nodes
        return nodes, state
    if isinstance(layer, (nn.Concat, nn.Residual)):
        if state.flattened_from is not None:
            raise _refuse(layer, "after a flatten its features are in another order in Keras")
        output = _State(tuple(layer.output_shape(state.shape)))
        paths = (list(layer.branches) if isinstance(layer, nn.Concat)
                 else [p for p in (layer.body, layer.shortcut) if p is not None])
        plans = []
        for path in paths:
            nodes, after = _plan(path, state)
            if after.flattened_from is not None:
                raise _refuse(layer, "a path ends in a flatten of a feature map")
            plans.append(nodes)
        if isinstance(layer, nn.Concat):
            return [KerasConcat(plans)], output
        shortcut = None if layer.shortcut is None else plans[1]
        activation: list = []
        if layer.activation is not None:
            summed = _State(tuple(layer.body.output_shape(state.shape)))
            activation, _ = _plan(layer.activation, summed)
        return [KerasResidual(plans[0], shortcut, activation)], output
    nodes = _leaf(layer, state)
    shape = tuple(layer.output_shape(state.shape))
    if isinstance(layer, nn.Flatten) and len(state.shape) == 3 and math.prod(
            state.shape[1:]) > 1:
        return nodes, _State(shape, tuple(state.shape))
    keeps_order = isinstance(layer, (nn.Flatten, *_ELEMENTWISE))
    return nodes, _State(shape, state.flattened_from if keeps_order else None)


def keras_plan(model: nn.Module, input_shape) -> list:
    """The Keras layers that mirror ``model`` on samples of ``input_shape`` (channels
    first, as bnrs takes them), with their weights; NumPy only.

    Returns
    -------
    list
        :class:`KerasLayer`, :class:`KerasConcat` and :class:`KerasResidual` nodes, in
        order.

    Raises
    ------
    NoKerasCounterpart
        A TypeError naming the first layer Keras cannot mirror exactly: batch
        renormalisation (``brn``), batch norm without an exponential running average, a
        padded pooling whose padding TensorFlow's "same" does not reproduce, a dilated
        strided conv, ...
    """
    nodes, _ = _plan(model, _State(tuple(input_shape)))
    return nodes


def keras_problem(model: nn.Module, input_shape) -> str | None:
    """Why Keras cannot mirror ``model`` (one line), or None if it can."""
    try:
        keras_plan(model, input_shape)
    except NoKerasCounterpart as error:
        return str(error)
    return None


def keras_input_shape(input_shape) -> tuple[int, ...]:
    """A sample's shape as the Keras mirror takes it: (H, W, C) for a (C, H, W) image."""
    shape = tuple(input_shape)
    return shape[1:] + shape[:1] if len(shape) == 3 else shape


def build_keras_network(model: nn.Module, keras, input_shape):
    """``model`` as a channels-last ``keras.Model`` with the same weights and running
    statistics: its input is (N, H, W, C) for (C, H, W) samples, (N, F) for flat ones.

    Raises
    ------
    NoKerasCounterpart
        As :func:`keras_plan`.
    """
    plan = keras_plan(model, input_shape)
    layers = keras.layers
    weighted: list[tuple[Any, list]] = []

    def emit(nodes: list, tensor):
        for node in nodes:
            if isinstance(node, KerasConcat):
                tensor = layers.Concatenate(axis=-1)([emit(branch, tensor)
                                                      for branch in node.branches])
            elif isinstance(node, KerasResidual):
                skip = tensor if node.shortcut is None else emit(node.shortcut, tensor)
                tensor = emit(node.activation, layers.Add()([emit(node.body, tensor), skip]))
            else:
                layer = getattr(layers, node.name)(**node.kwargs)
                tensor = layer(tensor)
                if node.weights:
                    weighted.append((layer, node.weights))
        return tensor

    inputs = keras.Input(keras_input_shape(input_shape))
    network = keras.Model(inputs, emit(plan, inputs))
    for layer, values in weighted:
        layer.set_weights([np.ascontiguousarray(v, dtype=np.float32) for v in values])
    return network
