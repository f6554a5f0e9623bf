"""The training loop of :class:`bnrs.CNNClassifier`, ``bnrs study`` and ``bnrs bench``.

One place for what the three share: the training step (:func:`train_step`), an epoch of
steps over the mini-batches the caller chose (:func:`batch_bounds`, :func:`train_epoch`),
the forward passes of evaluation in chunks (:func:`eval_logits`) and the kernel thread
count of a block (:func:`num_threads`). Each caller keeps its own rules (how the batches
are cut, the order of the samples, what a non-finite loss means) and passes them in.
:func:`train_step` is the one entry point of the computation: another engine (a fused
step, say) replaces it, and :func:`train_epoch` and the callers see only its loss.

Examples
--------
>>> import numpy as np
>>> from bnrs import nn, optim
>>> from bnrs.training import batch_bounds, eval_logits, train_epoch
>>> model = nn.from_spec("fc8-bn-relu", (4,), 3, random_state=0)
>>> X = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
>>> y = np.arange(10) % 3
>>> losses = train_epoch(model, nn.CrossEntropyLoss(), optim.Adam(model.parameters()),
...                      X, y, batch_bounds(10, 4))
>>> len(losses)          # batches of 4, 4 and 2 samples
3
>>> np.concatenate(list(eval_logits(model, X, 4))).shape
(10, 3)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import numpy as np

from . import _core, executor, nn, optim

__all__ = ["STAGES", "batch_bounds", "eval_logits", "num_threads", "train_epoch",
           "train_step"]

#: The stages of :func:`train_step`, in order: the names its ``mark`` is called with.
STAGES = ("zero_grad", "forward", "loss fwd+bwd", "backward", "optimizer step")


def _no_mark(stage: str) -> None:
    """The default ``mark``: no instrumentation."""


@contextmanager
def num_threads(n_threads: int | None) -> Iterator[None]:
    """Use ``n_threads`` kernel threads for the calls this thread makes inside the block.

    The count belongs to the calling thread only: the process default
    (``bnrs.set_num_threads``) and other threads' counts are neither changed nor seen, so
    blocks running at the same time in several threads (two fits with different
    ``n_threads``) each keep their own count however they overlap, and each restores only
    its own thread's previous count. Blocks nest.

    Parameters
    ----------
    n_threads : int or None
        The thread count (1 to 1024); None leaves the current one.
    """
    if n_threads is None:
        yield
        return
    previous = _core._set_local_num_threads(n_threads)
    try:
        yield
    finally:
        _core._set_local_num_threads(previous)


def batch_bounds(n_samples: int, batch_size: int,
                 last: Literal["merge_single", "keep", "drop"] = "merge_single",
                 ) -> list[tuple[int, int]]:
    """(start, stop) of each mini-batch of ``batch_size`` consecutive positions.

    Parameters
    ----------
    n_samples : int
        Positions to cover, 0 .. n_samples - 1 (indices into the samples, or into an
        order of them).
    batch_size : int
        Positions per batch (clipped to ``n_samples``).
    last : {"merge_single", "keep", "drop"}, default "merge_single"
        What becomes of a last batch smaller than ``batch_size``: kept, unless it has a
        single sample, which joins the batch before (batch norm has no statistics of one
        value per channel; :class:`bnrs.CNNClassifier`); kept whatever its size; or
        dropped, so that every step sees ``batch_size`` samples (as PyTorch's
        ``DataLoader(drop_last=True)``; ``bnrs study``).

    Returns
    -------
    list of (int, int)
    """
    if last not in ("merge_single", "keep", "drop"):
        raise ValueError(f"last: expected 'merge_single', 'keep' or 'drop', got {last!r}")
    if n_samples < 1:
        return []
    size = min(batch_size, n_samples)
    starts = list(range(0, n_samples, size))
    if last == "drop" and n_samples - starts[-1] < batch_size:
        starts.pop()
        return [(start, start + size) for start in starts]
    if last == "merge_single" and len(starts) > 1 and n_samples - starts[-1] == 1:
        starts.pop()
    return list(zip(starts, starts[1:] + [n_samples]))


def train_step(model: nn.Module, criterion: nn.CrossEntropyLoss, optimizer: optim.Optimizer,
               inputs: np.ndarray, targets: np.ndarray,
               mark: Callable[[str], None] | None = None,
               sample_weight: np.ndarray | None = None) -> float:
    """One training step: zero the gradients, forward, loss, backward, optimizer step.

    The model is left in the mode it is in (:func:`train_epoch` sets training mode). A
    network the step executor runs (:mod:`bnrs.executor`: plain layers, cross-entropy,
    Adam/AdamW/SGD) takes the whole step in one call into Rust, with the bits of the
    layer-by-layer path below; ``mark``, or ``BNRS_FUSED_STEP=0``, keeps the latter.

    Parameters
    ----------
    model : bnrs.nn.Module
    criterion : bnrs.nn.CrossEntropyLoss
    optimizer : bnrs.optim.Optimizer
        Over the model's parameters.
    inputs, targets : ndarray
        One mini-batch.
    mark : callable, optional
        Called with the name of each stage of :data:`STAGES` as it ends (the bench's
        profiler measures the time between the calls).
    sample_weight : ndarray, optional
        One weight per sample of the batch, passed to the criterion (the weighted mean
        loss, a weight of 2 counting as the sample twice); None: the plain mean.

    Returns
    -------
    float
        The loss of the batch. A non-finite loss is returned at once, before the backward
        and the optimizer step: the parameters stay as they were (batch norm's running
        statistics have taken the forward in).
    """
    if mark is None:
        loss = executor.run_step(model, criterion, optimizer, inputs, targets, sample_weight)
        if loss is not None:
            return loss
    mark = mark or _no_mark
    optimizer.zero_grad()
    mark("zero_grad")
    # A diverging network overflows; the caller sees the non-finite loss, so NumPy's
    # warnings would only repeat it.
    with np.errstate(all="ignore"):
        logits = model(inputs)
        mark("forward")
        loss = (criterion(logits, targets) if sample_weight is None
                else criterion(logits, targets, sample_weight))
    if not math.isfinite(loss):
        return loss
    grad_logits = criterion.backward()
    mark("loss fwd+bwd")
    model.backward(grad_logits, input_grad=False)
    mark("backward")
    optimizer.step()
    mark("optimizer step")
    return loss


def train_epoch(model: nn.Module, criterion: nn.CrossEntropyLoss,
                optimizer: optim.Optimizer, X: np.ndarray, y: np.ndarray,
                bounds: Sequence[tuple[int, int]], order: np.ndarray | None = None,
                mark: Callable[[str], None] | None = None,
                sample_weight: np.ndarray | None = None,
                transform: Callable[[np.ndarray], np.ndarray] | None = None,
                after_step: Callable[[], None] | None = None,
                ) -> list[float]:
    """A training step per mini-batch, in training mode; stops at a non-finite loss.

    A network the step executor runs takes the whole epoch in one call into Rust
    (:func:`bnrs.executor.run_epoch`: the batches gathered there, no Python between the
    steps) when there is no ``mark``, ``transform`` or ``after_step``, with the bits,
    losses and state of its steps taken one by one.

    Parameters
    ----------
    model, criterion, optimizer
        As :func:`train_step`.
    X, y : ndarray
        The training samples and their class indices.
    bounds : sequence of (int, int)
        The batches (:func:`batch_bounds`): positions into ``order``, or into X.
    order : ndarray of int, optional
        The order of the samples in this epoch (None: as they are in X).
    mark : callable, optional
        Passed to every :func:`train_step`.
    sample_weight : ndarray, optional
        One weight per sample of X; each batch's share goes to :func:`train_step`. A
        batch whose weights are all 0 is skipped (no step; its loss is recorded as 0.0).
    transform : callable, optional
        Applied to each batch's inputs before its step, in batch order (e.g. the
        estimators' random augmentation); it must not change them in place.
    after_step : callable, optional
        Called with no argument after every batch's step (a per-batch learning-rate
        scheduler's ``step``, as PyTorch users call it after ``optimizer.step()``), and
        in place of the step of a batch skipped for its weights, so that a schedule sized
        by the batches of an epoch (the estimators' OneCycleLR) follows them.

    Returns
    -------
    list of float
        The loss of every step taken, in order. When the last is not finite the epoch
        stopped there, before that step's backward.
    """
    model.train()
    losses = []
    try:
        if mark is None and transform is None and after_step is None:
            bounds = list(bounds)   # read twice should the executor leave it to the steps
            epoch = executor.run_epoch(model, criterion, optimizer, X, y, bounds, order,
                                       sample_weight)
            if epoch is not None:
                return epoch
        for start, stop in bounds:
            index = slice(start, stop) if order is None else order[start:stop]
            weight = None if sample_weight is None else sample_weight[index]
            if weight is not None and not weight.sum() > 0:
                # Samples of weight 0 count as absent, and so does a batch of them only.
                losses.append(0.0)
                if after_step is not None:
                    after_step()
                continue
            inputs = X[index] if transform is None else transform(X[index])
            loss = train_step(model, criterion, optimizer, inputs, y[index], mark, weight)
            losses.append(loss)
            if not math.isfinite(loss):
                break
            if after_step is not None:
                after_step()
    finally:
        model.clear_saved()
    return losses


def eval_logits(model: nn.Module, X: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """The logits of X in evaluation mode, ``batch_size`` samples at a time.

    The logits depend on ``batch_size`` only in their last float32 bits (the dense-layer
    kernel picks its code path by batch size): a caller keeps its size to keep its
    results. The model's mode is restored, and what the last forward kept is dropped,
    when the iteration ends.

    Parameters
    ----------
    model : bnrs.nn.Module
    X : ndarray
        Samples in the network's shape.
    batch_size : int
        Samples per forward pass (the last may have fewer).

    Yields
    ------
    ndarray
        The logits of ``X[start:start + batch_size]``, for start = 0, batch_size, ...
    """
    training = model.training
    model.eval()
    try:
        for start, stop in batch_bounds(len(X), batch_size, last="keep"):
            yield model(X[start:stop])
    finally:
        model.clear_saved()
        model.train(training)
