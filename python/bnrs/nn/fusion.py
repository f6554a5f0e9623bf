"""Evaluation-mode fusion of conv/linear → batch norm → activation runs in a Sequential.

In evaluation a batch norm with running statistics is an affine map per channel, so it
folds into the preceding convolution's (or linear layer's) weights and bias:
``w' = w·γ/√(σ²+ε)`` per output channel, ``b' = (b-μ)·γ/√(σ²+ε)+β``; the activation that
follows runs inside the convolution or linear kernel on each output tile while it is in
cache (the kernels' epilogue). Dropout is the identity in evaluation and runs as itself.

The folded weights are exact in real numbers but not in float32: the fused output differs
from the unfused one by rounding (one product and one sum per weight, folded before the
GEMM instead of applied after it). An activation alone, without a batch norm, gives the
unfused bits.

Staleness rule: each fused block keeps its folded weights with a copy of every value they
were folded from (weight, bias, γ, β, running mean and variance, ε) and reuses them only
while all of these are equal in value, checked at every fused forward. That costs one
comparison pass over the parameters per forward and is never stale, whatever changed them:
``load_state_dict``, an optimizer step, an in-place edit of ``.data`` or of a running
statistic, a new array assigned to ``.data``.
"""

from __future__ import annotations

import os

import numpy as np

from .. import functional as F
from .activation import LeakyReLU, ReLU, Sigmoid, Tanh
from .batchnorm import BatchNorm1d, BatchNorm2d, _BatchNorm
from .layers import Conv2d, Linear

FUSE_ENV = "BNRS_FUSE"

_ACTIVATIONS = {ReLU: "relu", LeakyReLU: "leaky_relu", Sigmoid: "sigmoid", Tanh: "tanh"}


def fusion_enabled(fuse: bool) -> bool:
    """Whether a Sequential built with ``fuse`` runs fused blocks: ``BNRS_FUSE=0`` turns
    fusion off everywhere (any other value leaves ``fuse`` in charge)."""
    return fuse and os.environ.get(FUSE_ENV, "1").strip() != "0"


def _activation_of(module) -> tuple[str, float] | None:
    name = _ACTIVATIONS.get(type(module))
    if name is None or module.training:
        return None
    return name, float(getattr(module, "negative_slope", 0.0))


def _foldable(layer, norm) -> bool:
    """Whether ``norm`` is a batch norm in evaluation with running statistics that matches
    ``layer``'s output channels."""
    expected = BatchNorm2d if isinstance(layer, Conv2d) else BatchNorm1d
    width = layer.out_channels if isinstance(layer, Conv2d) else layer.out_features
    return (type(norm) is expected and not norm.training and norm.track_running_stats
            and norm.num_features == width)


class FusedBlock:
    """A conv or linear layer with an optional folded batch norm and activation.

    ``modules`` are the Sequential's children it stands for (for re-running them unfused).
    """

    def __init__(self, layer, norm: _BatchNorm | None, activation: tuple[str, float] | None,
                 modules: list):
        self.layer, self.norm, self.activation, self.modules = layer, norm, activation, modules
        # (copies of the source values, folded weight and bias), replaced as one object so
        # that threads evaluating the model at once never pair one's sources with
        # another's weights.
        self._cache: tuple | None = None

    def _current_sources(self) -> tuple:
        layer, norm = self.layer, self.norm
        sources = [layer.weight.data, None if layer.bias is None else layer.bias.data]
        if norm is not None:
            sources += [None if norm.weight is None else norm.weight.data,
                        None if norm.bias is None else norm.bias.data,
                        norm.running_mean, norm.running_var, np.float64(norm.eps)]
        return tuple(sources)

    def folded(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The weight and bias with the batch norm folded in, recomputed when any source
        value differs from the one they were folded from."""
        current = self._current_sources()
        if self.norm is None:
            return current[0], current[1]
        cache = self._cache
        if cache is not None and all(_same(a, b) for a, b in zip(current, cache[0])):
            return cache[1]
        # The copies are taken before folding: a value changed meanwhile by another
        # thread then fails the next comparison instead of hiding behind it.
        sources = tuple(None if a is None else np.array(a, copy=True) for a in current)
        folded = self._fold(sources)
        self._cache = (sources, folded)
        return folded

    def _fold(self, sources) -> tuple[np.ndarray, np.ndarray | None]:
        weight, bias = sources[0], sources[1]
        gamma, beta, mean, var, eps = sources[2:]
        # In float64, rounded once to float32: the fold adds as little rounding as it can.
        scale = 1.0 / np.sqrt(var.astype(np.float64) + float(eps))
        if gamma is not None:
            scale = scale * gamma
        shift = -mean.astype(np.float64) * scale
        if bias is not None:
            shift = shift + bias * scale
        if beta is not None:
            shift = shift + beta
        shape = (-1,) + (1,) * (weight.ndim - 1)
        folded_weight = np.ascontiguousarray(weight * scale.reshape(shape), dtype=np.float32)
        return folded_weight, shift.astype(np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        weight, bias = self.folded()
        name, slope = self.activation if self.activation is not None else (None, 0.0)
        layer = self.layer
        if isinstance(layer, Conv2d):
            return F._conv2d_fused(x, weight, bias, layer.stride, layer.padding,
                                   layer.dilation, name, slope)
        return F._linear_fused(x, weight, bias, name, slope)


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and np.array_equal(a, b, equal_nan=True)


def fusion_plan(modules: list, cache: dict) -> list:
    """The Sequential's children as steps: each a :class:`FusedBlock` or a module run as
    itself. A block is a Conv2d followed by a BatchNorm2d and/or an activation, or a Linear
    followed by a BatchNorm1d and/or an activation, all in evaluation mode. ``cache`` maps
    the modules of a block to the block, kept between calls with its folded weights."""
    steps, used, i = [], set(), 0
    while i < len(modules):
        layer = modules[i]
        if type(layer) not in (Conv2d, Linear) or layer.training:
            steps.append(layer)
            i += 1
            continue
        end = i + 1
        norm = None
        if end < len(modules) and _foldable(layer, modules[end]):
            norm = modules[end]
            end += 1
        activation = _activation_of(modules[end]) if end < len(modules) else None
        if activation is not None:
            end += 1
        if end == i + 1:
            steps.append(layer)
        else:
            key = (tuple(id(m) for m in modules[i:end]), norm is not None, activation)
            if key not in cache:
                cache[key] = FusedBlock(layer, norm, activation, modules[i:end])
            steps.append(cache[key])
            used.add(key)
        i = end
    for key in set(cache) - used:   # blocks of modules since replaced or retrained
        del cache[key]
    return steps


def run_block(block: FusedBlock, x: np.ndarray) -> np.ndarray:
    """Run ``block`` on ``x``, fused when its input suits the fused kernels (a Linear with
    a batch norm needs 2-D input, where the features are the batch norm's channels), else
    as its modules one after the other."""
    x = F.as_float32(x, "input")
    layer = block.layer
    fits = (x.ndim == 4 and x.shape[1] == layer.in_channels if isinstance(layer, Conv2d)
            else x.ndim >= 1 and x.shape[-1] == layer.in_features
            and (block.norm is None or x.ndim == 2))
    if not fits:
        # The unfused modules give the usual errors for a wrong input.
        for module in block.modules:
            x = module(x)
        return x
    for module in block.modules:
        module._ctx = None   # a backward must not find an older forward's state
    if isinstance(layer, Linear) and x.ndim != 2:
        rows = block(x.reshape(-1, layer.in_features))
        return rows.reshape(x.shape[:-1] + (layer.out_features,))
    return block(x)
