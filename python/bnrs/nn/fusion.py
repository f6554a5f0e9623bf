"""Fusion of layer runs in a Sequential: conv/linear → batch norm → activation in
evaluation, batch norm → activation → pool → dropout in training.

In evaluation a batch norm with running statistics is an affine map per channel, so it
folds into the preceding convolution's weights and bias: ``w' = w·γ/√(σ²+ε)`` per output
channel, ``b' = (b-μ)·γ/√(σ²+ε)+β``. After a linear layer it is not folded: the linear
kernel applies the norm's own arithmetic to each block of output rows while it is in
cache (the unfused bits, and no weight copy to compare per call, see
:class:`FusedBlock`). The activation that follows runs inside the convolution or linear
kernel on each output tile while it is in cache (the kernels' epilogue). A 2×2,
stride-2, unpadded MaxPool2d/AvgPool2d after that runs in the same kernel call, on each
image's output while it is in cache (the pool's own plane functions, so its bits). Two
such pooled convolution blocks in a row run as one :class:`FusedChain`: one kernel call
that takes each image through both, so the first block's output never exists for the
whole batch (same bits). Dropout is the identity in evaluation and runs as itself.

The folded weights are exact in real numbers but not in float32: a convolution block's
fused output differs from the unfused one by rounding (one product and one sum per
weight, folded before the convolution instead of applied after it). An activation alone,
without a batch norm, and a linear block give the unfused bits.

Staleness rule: each fused convolution block keeps its folded weights with a copy of
every value they were folded from (weight, bias, γ, β, running mean and variance, ε) and
reuses them only while all of these hold the same bits (dtype, shape and every bit, so
also the sign of a zero and a NaN's payload), checked at every fused forward. That costs
one comparison pass over the parameters per forward and is never stale, whatever changed
them: ``load_state_dict``, an optimizer step, an in-place edit of ``.data`` or of a
running statistic, a new array assigned to ``.data``.

Training: a BatchNorm2d (or BatchNorm1d) in training mode followed by an activation, a
2×2 stride-2 unpadded MaxPool2d/AvgPool2d (after BatchNorm2d) and/or a Dropout/Dropout2d
with 0 < p < 1 runs as one :class:`TrainBlock`: one statistics pass, then one pass that
normalises, activates, pools and drops out each plane in cache; the backward regenerates
what it needs (normalised values, argmax, dropout mask) from the block's input, the
statistics and the seed, in two passes. The convolution or linear layer before it runs as
itself. Every step is the unfused kernels' arithmetic, so outputs, gradients and running
statistics are the unfused bits; each Dropout draws its seed from its own generator as it
would unfused.
"""

from __future__ import annotations

import math
import os

import numpy as np

from .. import _core
from .. import functional as F
from .activation import LeakyReLU, ReLU, Sigmoid, Tanh
from .batchnorm import BatchNorm1d, BatchNorm2d, _BatchNorm
from .dropout import Dropout, Dropout2d, draw_seed
from .layers import AvgPool2d, Conv2d, Linear, MaxPool2d

FUSE_ENV = "BNRS_FUSE"

_ACTIVATIONS = {ReLU: "relu", LeakyReLU: "leaky_relu", Sigmoid: "sigmoid", Tanh: "tanh"}


def fusion_enabled(fuse: bool) -> bool:
    """Whether a Sequential built with ``fuse`` runs fused blocks: ``BNRS_FUSE=0`` turns
    fusion off everywhere (any other value leaves ``fuse`` in charge)."""
    return fuse and os.environ.get(FUSE_ENV, "1").strip() != "0"


def _activation_of(module, training: bool = False) -> tuple[str, float] | None:
    name = _ACTIVATIONS.get(type(module))
    if name is None or module.training != training:
        return None
    return name, float(getattr(module, "negative_slope", 0.0))


def slope_key(slope: float) -> tuple[float, float]:
    """An activation's slope as a key of what was built for it: its value and its sign
    bit, since 0.0 == -0.0 yet the outputs' zeros take the slope's sign."""
    return slope, math.copysign(1.0, slope)


_POOLS = {MaxPool2d: "max", AvgPool2d: "avg"}


def _pool_of(module, norm) -> str | None:
    """"max" or "avg" for a training-mode 2×2, stride 2, unpadded pool after a BatchNorm2d."""
    name = _POOLS.get(type(module))
    if (name is None or not module.training or type(norm) is not BatchNorm2d
            or module.kernel_size != (2, 2) or module.stride != (2, 2)
            or module.padding != (0, 0)):
        return None
    return name


def _dropout_of(module, norm) -> Dropout | Dropout2d | None:
    """A training-mode dropout that draws a mask (0 < p < 1; Dropout2d after BatchNorm2d)."""
    if type(module) is Dropout2d and type(norm) is not BatchNorm2d:
        return None
    if type(module) not in (Dropout, Dropout2d) or not module.training:
        return None
    return module if 0.0 < module.p < 1.0 else None


def _eval_pool_of(module) -> str | None:
    """"max" or "avg" for an evaluation-mode 2×2, stride 2, unpadded pool."""
    name = _POOLS.get(type(module))
    if (name is None or module.training or module.kernel_size != (2, 2)
            or module.stride != (2, 2) or module.padding != (0, 0)):
        return None
    return name


def _foldable(layer, norm) -> bool:
    """Whether ``norm`` is a batch norm in evaluation with running statistics that matches
    ``layer``'s output channels."""
    expected = BatchNorm2d if isinstance(layer, Conv2d) else BatchNorm1d
    width = layer.out_channels if isinstance(layer, Conv2d) else layer.out_features
    return (type(norm) is expected and not norm.training and norm.track_running_stats
            and norm.num_features == width)


class FusedBlock:
    """A conv or linear layer with an optional batch norm in evaluation and activation, and
    (after a conv) an optional 2×2 pool ("max" or "avg").

    A conv's batch norm is folded into its weight and bias (cached, and refolded when a
    source value changes). A linear layer's is applied by the kernel to each block of
    output rows, from the norm's own parameters: its weight is read as it is, where a fold
    had to compare it with its copy at every call (a read of twice the weight, as much as
    the product itself for one sample), and the output has the bits of the layers one by
    one.

    ``modules`` are the Sequential's children it stands for (for re-running them unfused).
    """

    def __init__(self, layer, norm: _BatchNorm | None, activation: tuple[str, float] | None,
                 modules: list, pool: str | None = None):
        self.layer, self.norm, self.activation, self.modules = layer, norm, activation, modules
        self.pool = pool
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
        name, slope = self.activation if self.activation is not None else (None, 0.0)
        layer = self.layer
        if isinstance(layer, Conv2d):
            weight, bias = self.folded()
            return F._conv2d_fused(x, weight, bias, layer.stride, layer.padding,
                                   layer.dilation, name, slope, self.pool, layer.groups)
        norm = self.norm
        if norm is not None:
            norm = (None if norm.weight is None else norm.weight.data,
                    None if norm.bias is None else norm.bias.data,
                    norm.running_mean, norm.running_var, norm.eps)
        return F._linear_fused(x, layer.weight.data,
                               None if layer.bias is None else layer.bias.data,
                               name, slope, norm)


class TrainBlock:
    """A training-mode batch norm with the activation, 2×2 pool and dropout after it, run
    by one fused kernel forward and one backward (see the module docstring).

    ``modules`` are the Sequential's children it stands for. :meth:`forward` keeps its
    state in the block (the modules keep none), for one :meth:`backward`.
    """

    def __init__(self, norm: _BatchNorm, activation: tuple[str, float] | None,
                 pool: str | None, dropout, modules: list):
        self.norm, self.activation, self.pool, self.dropout = norm, activation, pool, dropout
        self.modules = modules
        self._ctx = None

    def _fits(self, x: np.ndarray) -> bool:
        """Whether the fused kernel takes ``x``; otherwise the unfused modules run (and
        raise their usual errors for a wrong input)."""
        norm = self.norm
        if x.ndim not in norm._input_ndims or x.shape[1] != norm.num_features:
            return False
        if x.size // x.shape[1] < 2:   # a training batch norm refuses it
            return False
        return self.pool is None or (x.shape[2] >= 2 and x.shape[3] >= 2)

    def forward(self, input) -> np.ndarray:
        """The block's output in training mode, updating the batch norm's running statistics
        and ``num_batches_tracked`` and drawing each dropout seed as the modules would."""
        x = F.as_float32(input, "input")
        self._ctx = None
        for module in self.modules:
            module._ctx = None   # a backward must not find an older forward's state
        if not self._fits(x):
            for module in self.modules:
                x = module(x)
            return x
        norm = self.norm
        running_mean = running_var = None
        momentum = 0.1
        if norm.track_running_stats:
            running_mean, running_var = norm.running_mean, norm.running_var
            tracked = int(norm.num_batches_tracked) + 1
            momentum = 1.0 / tracked if norm.momentum is None else norm.momentum
        name, slope = self.activation if self.activation is not None else (None, 0.0)
        dropout, dropout_p, seed = self.dropout, 0.0, 0
        if dropout is not None:
            dropout_p = dropout.p
            seed = draw_seed(dropout._rng)
        channel_wise = type(dropout) is Dropout2d
        weight = None if norm.weight is None else norm.weight.data
        bias = None if norm.bias is None else norm.bias.data
        output, mean, invstd = F._bn_block_forward(
            x, weight, bias, running_mean, running_var, momentum, norm.eps, name, slope,
            self.pool, dropout_p, seed, channel_wise)
        if norm.track_running_stats:
            norm.num_batches_tracked += 1
        self._ctx = (x, mean, invstd, seed, output.shape)
        return output

    def ran_fused(self) -> bool:
        """Whether the last forward ran fused and its state is unused: no module of the
        block ran since (a caller may call the children itself)."""
        return self._ctx is not None and all(m._ctx is None for m in self.modules)

    def backward(self, grad_output, input_grad: bool = True) -> np.ndarray | None:
        """Add the batch norm's gamma and beta gradients; return the block's input gradient
        (or None)."""
        ctx, self._ctx = self._ctx, None
        if ctx is None:
            raise RuntimeError("TrainBlock.backward: no saved forward state")
        x, mean, invstd, seed, output_shape = ctx
        grad = F.as_float32(grad_output, "grad_output")
        if grad.shape != output_shape:
            raise ValueError(f"{type(self.norm).__name__}.backward: grad_output: expected "
                             f"shape {output_shape} (the last forward's output), got "
                             f"{grad.shape}")
        norm = self.norm
        name, slope = self.activation if self.activation is not None else (None, 0.0)
        dropout_p = 0.0 if self.dropout is None else self.dropout.p
        grad_input, grad_weight, grad_bias = F._bn_block_backward(
            grad, x, None if norm.weight is None else norm.weight.data,
            None if norm.bias is None else norm.bias.data, mean, invstd, name, slope,
            self.pool, dropout_p, seed, type(self.dropout) is Dropout2d)
        if norm.weight is not None:
            norm.weight.grad += grad_weight
            norm.bias.grad += grad_bias
        return grad_input if input_grad else None


def _train_block_at(modules: list, i: int) -> TrainBlock | None:
    """The training block that starts at ``modules[i]``, if one does."""
    norm = modules[i]
    if type(norm) not in (BatchNorm1d, BatchNorm2d) or not norm.training:
        return None
    def stage(k):
        return modules[k] if k < len(modules) else None

    end = i + 1
    activation = _activation_of(stage(end), training=True)
    end += activation is not None
    pool = _pool_of(stage(end), norm)
    end += pool is not None
    dropout = _dropout_of(stage(end), norm)
    end += dropout is not None
    if end == i + 1:
        return None
    return TrainBlock(norm, activation, pool, dropout, modules[i:end])


def _same(a, b) -> bool:
    """Whether ``a`` and ``b`` hold the same bits (or are both None).

    Compared as bytes (up to :data:`_BYTES_COMPARED`) or as unsigned integers of the
    item's size: one pass, about 10x faster than ``np.array_equal(equal_nan=True)``
    (whose NaN passes were two thirds of LeNetBN's Python time per evaluation forward),
    and stricter than equal values (-0 is not +0), so a fold is reused only for sources
    that give its bits."""
    if a is None or b is None:
        return a is None and b is None
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    bits = _UNSIGNED.get(a.dtype.itemsize)
    if a.nbytes <= _BYTES_COMPARED or bits is None:
        # Small: the bytes compared at once (a copy each and a memcmp) cost less than
        # NumPy's calls.
        return a.tobytes() == b.tobytes()
    if a.dtype == np.float32 and a.flags.c_contiguous and b.flags.c_contiguous:
        # A convolution's parameters: one pass in Rust, where NumPy makes a boolean array
        # and reduces it (an 800 KB weight took a fifth of LeNetBN's one-image forward).
        return _core.same_bits(a, b)
    return bool((a.view(bits) == b.view(bits)).all())


#: Up to this many bytes :func:`_same` compares arrays as bytes objects.
_BYTES_COMPARED = 64 * 1024

#: The unsigned integer type of each item size, for :func:`_same`.
_UNSIGNED = {1: np.dtype(np.uint8), 2: np.dtype(np.uint16), 4: np.dtype(np.uint32),
             8: np.dtype(np.uint64)}


def fusion_plan(modules: list, cache: dict, training: bool = False) -> list:
    """The Sequential's children as steps: each a :class:`FusedBlock`, a
    :class:`TrainBlock` or a module run as itself.

    In evaluation (``training`` False, the Sequential's mode) a block is a Conv2d followed
    by a BatchNorm2d and/or an activation and/or a 2×2 stride-2 unpadded MaxPool2d or
    AvgPool2d, or a Linear followed by a BatchNorm1d and/or an
    activation, all in evaluation mode. ``cache`` maps the modules of a block to the block,
    kept between calls with its folded weights. In training a block is a batch norm in
    training mode and what follows it (see :class:`TrainBlock`); it keeps nothing between
    steps, so it is not cached."""
    if training:
        steps, i = [], 0
        while i < len(modules):
            block = _train_block_at(modules, i)
            steps.append(modules[i] if block is None else block)
            i += 1 if block is None else len(block.modules)
        return steps
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
        pool = None
        if type(layer) is Conv2d and end < len(modules):
            pool = _eval_pool_of(modules[end])
            end += pool is not None
        if end == i + 1:
            steps.append(layer)
        else:
            key = (tuple(id(m) for m in modules[i:end]), norm is not None,
                   activation and (activation[0], *slope_key(activation[1])), pool)
            if key not in cache:
                cache[key] = FusedBlock(layer, norm, activation, modules[i:end], pool)
            steps.append(cache[key])
            used.add(key)
        i = end
    for key in set(cache) - used:   # blocks of modules since replaced or retrained
        del cache[key]
    return steps


def _conv_output_size(layer: Conv2d, size) -> tuple[int, int]:
    """The convolution's output (H, W) for an input of ``size`` (H, W), at most 0."""
    return tuple(max((n + 2 * p - d * (k - 1) - 1) // s + 1, 0) for n, p, d, k, s in zip(
        size, layer.padding, layer.dilation, layer.kernel_size, layer.stride))


def _fits(block: FusedBlock, shape: tuple) -> bool:
    """Whether an input of ``shape`` suits ``block``'s fused kernel (a Linear with a batch
    norm needs 2-D input, where the features are the batch norm's channels)."""
    layer = block.layer
    fits = (len(shape) == 4 and shape[1] == layer.in_channels if isinstance(layer, Conv2d)
            else len(shape) >= 1 and shape[-1] == layer.in_features
            and (block.norm is None or len(shape) == 2))
    if fits and block.pool is not None:
        # A conv output under 2×2 leaves the pool to raise its usual error.
        fits = min(_conv_output_size(layer, shape[2:])) >= 2
    return fits


def run_block(block: FusedBlock, x: np.ndarray) -> np.ndarray:
    """Run ``block`` on ``x``, fused when its input suits the fused kernels, else as its
    modules one after the other."""
    x = F.as_float32(x, "input")
    layer = block.layer
    if not _fits(block, x.shape):
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


class FusedChain:
    """Two pooled convolution blocks in a row (evaluation), run by one kernel call that
    takes each image through both while the first block's output is in cache, so that
    output is never written for the whole batch: the bits of the two blocks one after
    the other (:func:`run_chain`)."""

    def __init__(self, first: FusedBlock, second: FusedBlock):
        self.first, self.second = first, second
        self.modules = first.modules + second.modules

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return run_chain(self, x)


def _pooled_conv(step) -> bool:
    return (isinstance(step, FusedBlock) and type(step.layer) is Conv2d
            and step.pool is not None)


def chain_blocks(steps: list) -> list:
    """``steps`` (of :func:`fusion_plan` in evaluation) with each two pooled convolution
    blocks in a row as one :class:`FusedChain`."""
    chained, i = [], 0
    while i < len(steps):
        if i + 1 < len(steps) and _pooled_conv(steps[i]) and _pooled_conv(steps[i + 1]):
            chained.append(FusedChain(steps[i], steps[i + 1]))
            i += 2
        else:
            chained.append(steps[i])
            i += 1
    return chained


def _chain_arguments(block: FusedBlock) -> tuple:
    weight, bias = block.folded()
    name, slope = block.activation if block.activation is not None else (None, 0.0)
    layer = block.layer
    return (weight, bias, layer.stride, layer.padding, layer.dilation, name, slope,
            block.pool, layer.groups)


def run_chain(chain: FusedChain, x: np.ndarray) -> np.ndarray:
    """Run ``chain`` on ``x`` in one kernel call when both blocks' inputs suit the fused
    kernels, else block by block (:func:`run_block`)."""
    x = F.as_float32(x, "input")
    first, second = chain.first, chain.second
    if _fits(first, x.shape):
        size = _conv_output_size(first.layer, x.shape[2:])
        between = (x.shape[0], first.layer.out_channels, size[0] // 2, size[1] // 2)
        if _fits(second, between):
            for module in chain.modules:
                module._ctx = None   # a backward must not find an older forward's state
            return F._conv2d_pooled_chain(x, _chain_arguments(first),
                                          _chain_arguments(second))
    return run_block(second, run_block(first, x))
