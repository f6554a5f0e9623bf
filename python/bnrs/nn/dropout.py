"""Dropout layers: element-wise Dropout and channel-wise Dropout2d."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np

from .. import functional as F
from .._validation import as_real, check_real
from .module import Module, as_generator

__all__ = ["Dropout", "Dropout2d", "enable_dropout", "mc_dropout"]


#: Bit generators whose raw output is the uint64 ``Generator.integers(0, 2**64,
#: dtype=np.uint64)`` returns (it takes the next 64 bits whole; MT19937's raw output is 32).
_RAW_IS_UINT64 = (np.random.PCG64, np.random.PCG64DXSM)


def draw_seed(generator: np.random.Generator) -> int:
    """The seed of one dropout mask: ``int(generator.integers(0, 2**64, dtype=np.uint64))``,
    taken from the bit generator directly when it is one of :data:`_RAW_IS_UINT64` (the
    same number and generator state, 0.2 µs rather than 2: the one-call training step
    draws one per dropout layer and step)."""
    bit_generator = generator.bit_generator
    if type(generator) is np.random.Generator and type(bit_generator) in _RAW_IS_UINT64:
        return bit_generator.random_raw()
    return int(generator.integers(0, 2**64, dtype=np.uint64))


def _own_generator(random_state, rng) -> np.random.Generator:
    """A Generator for this layer alone: a given Generator only seeds a new one."""
    given = random_state if rng is None else rng
    generator = as_generator(random_state, rng)
    if isinstance(given, np.random.Generator):
        return np.random.default_rng(int(generator.integers(0, 2**63)))
    return generator


class _Dropout(Module):
    """Shared logic: a fresh 64-bit seed per training forward, kept for backward."""

    def __init__(self, p: float = 0.5, *, rng=None, random_state=None):
        super().__init__()
        self.p = check_real(as_real(p, "p"), "p", 0.0, 1.0)
        self._rng = _own_generator(random_state, rng)

    def _check(self, x: np.ndarray) -> None:
        """Raise for an input the layer does not accept."""

    def forward(self, input) -> np.ndarray:
        """Drop and rescale in training; the input itself (no copy) in evaluation."""
        x = F.as_float32(input, "input")
        self._check(x)
        if not self.training or self.p == 0.0:
            self._ctx = ("identity", x.shape)
            return x
        if self.p == 1.0:
            self._ctx = ("zero", x.shape)
            return np.zeros_like(x)
        seed = draw_seed(self._rng)
        self._ctx = ("mask", x.shape, seed)
        return self._dropout(x, seed)

    def backward(self, grad_output, input_grad: bool = True) -> np.ndarray | None:
        """Apply the forward's mask (same seed) and scale to the gradient."""
        ctx = self._saved()
        grad = self._grad_output(grad_output, ctx[1])
        if not input_grad:
            return None
        if ctx[0] == "identity":
            return grad
        if ctx[0] == "zero":
            return np.zeros_like(grad)
        return self._dropout_backward(grad, ctx[2])

    def output_shape(self, input_shape) -> tuple[int, ...]:
        """The sample shape, unchanged."""
        return tuple(input_shape)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Dropout(_Dropout):
    """Inverted dropout, as ``torch.nn.Dropout``: zero elements with probability ``p``.

    In training each element is zeroed with probability ``p`` and the rest scaled by
    1/(1 - p); in evaluation the layer is the identity.

    Parameters
    ----------
    p : float, default 0.5
        Probability of zeroing an element, in [0, 1].
    rng, random_state : int, numpy.random.Generator or None
        Seeds the layer's own Generator, from which each training forward draws the
        64-bit seed of its mask (a given Generator only seeds the layer's own). The mask
        depends only on that seed, so training is reproducible at any thread count.
    """

    def _dropout(self, x, seed):
        return F.dropout(x, self.p, True, seed)

    def _dropout_backward(self, grad_output, seed):
        return F.dropout_backward(grad_output, self.p, seed)


class Dropout2d(_Dropout):
    """Channel-wise dropout of (N, C, H, W) input, as ``torch.nn.Dropout2d``.

    In training each whole feature map (n, c) is zeroed with probability ``p`` and the
    rest scaled by 1/(1 - p); in evaluation the layer is the identity.

    Parameters
    ----------
    p : float, default 0.5
        Probability of zeroing a channel, in [0, 1].
    rng, random_state : int, numpy.random.Generator or None
        Seeds the layer's own Generator, as for :class:`Dropout`.
    """

    def _check(self, x: np.ndarray) -> None:
        if x.ndim != 4:
            raise ValueError(f"{self!r}: expected a 4-D input (N, C, H, W), got shape {x.shape}")

    def _dropout(self, x, seed):
        return F.dropout2d(x, self.p, True, seed)

    def _dropout_backward(self, grad_output, seed):
        return F.dropout2d_backward(grad_output, self.p, seed)

    def output_shape(self, input_shape) -> tuple[int, ...]:
        """The sample shape, unchanged; must be (C, H, W)."""
        shape = tuple(input_shape)
        if len(shape) != 3:
            raise ValueError(f"{self!r}: expected samples of shape (C, H, W), got {shape}")
        return shape


def enable_dropout(model: Module, mode: bool = True) -> Module:
    """Set the dropout layers of ``model`` alone to training mode (``mode=True``) or to
    evaluation mode, leaving every other layer's mode as it is.

    After ``model.eval()``, ``enable_dropout(model)`` gives Monte Carlo dropout: batch
    norm uses its running statistics while every forward draws new dropout masks (each
    from its layer's own seed stream, so the passes are reproducible at any thread
    count). ``model.train()`` and ``model.eval()`` set every layer again.

    Parameters
    ----------
    model : bnrs.nn.Module
        Searched with ``model.modules()`` (the module itself included).
    mode : bool, default True

    Returns
    -------
    bnrs.nn.Module
        ``model``.

    Examples
    --------
    >>> from bnrs import nn
    >>> model = nn.from_spec("fc8-bn-relu-d0.5", (4,), 2, random_state=0).eval()
    >>> [layer.training for layer in nn.enable_dropout(model)]
    [False, False, False, True, False]
    """
    if not isinstance(mode, (bool, np.bool_)):
        raise TypeError(f"mode: expected a bool, got {mode!r}")
    for module in model.modules():
        if isinstance(module, _Dropout):
            module.training = bool(mode)
    return model


@contextlib.contextmanager
def mc_dropout(model: Module, seed: int | np.random.SeedSequence) -> Iterator[Module]:
    """Monte Carlo dropout inside a ``with`` block, reproducibly.

    Inside the block every layer but the dropout layers is in evaluation mode (batch norm
    uses its running statistics) and each dropout layer draws its masks from its own
    child stream of ``seed`` (``SeedSequence(seed).spawn``, one per layer in
    ``model.modules()`` order), so the passes are the same at any thread count and for
    the same seed. On leaving, the layers' own generators (those training draws from),
    their modes and what the last forward kept are restored.

    Parameters
    ----------
    model : bnrs.nn.Module
    seed : int or numpy.random.SeedSequence
        The root of the masks' streams (a SeedSequence spawns its next children).

    Yields
    ------
    bnrs.nn.Module
        ``model``.

    Examples
    --------
    >>> import numpy as np
    >>> from bnrs import nn
    >>> model = nn.from_spec("fc8-bn-relu-d0.5", (4,), 2, random_state=0)
    >>> x = np.ones((3, 4), np.float32)
    >>> with nn.mc_dropout(model, seed=1):
    ...     passes = np.stack([model(x) for _ in range(5)])
    >>> passes.shape, model.training
    ((5, 3, 2), True)
    """
    dropouts = [m for m in model.modules() if isinstance(m, _Dropout)]
    root = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    own = [layer._rng for layer in dropouts]
    modes = [m.training for m in model.modules()]
    try:
        for layer, child in zip(dropouts, root.spawn(len(dropouts))):
            layer._rng = np.random.default_rng(child)
        enable_dropout(model.eval())
        yield model
    finally:
        for layer, generator in zip(dropouts, own):
            layer._rng = generator
        for module, mode in zip(model.modules(), modes):
            module.training = mode
        model.clear_saved()
