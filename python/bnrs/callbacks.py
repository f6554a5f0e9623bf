"""Ready callbacks for the ``callbacks`` parameter of :class:`bnrs.CNNClassifier` and
:class:`bnrs.CNNRegressor`.

A callback is any callable; the estimator calls it after every epoch with the epoch's
record, a dict with ``epoch`` (1-based, counted over warm-start fits and ``partial_fit``
calls), ``train_loss``, ``valid_loss`` and ``valid_score`` (with ``early_stopping``
only), ``lr`` (the learning rate the epoch started with), ``seconds``, ``layers`` (with
``record_layer_stats``) and ``estimator`` (the estimator being fitted). A callback that
returns True (any true value) stops training after that epoch; every callback still sees
the epoch first. An exception raised by a callback propagates out of ``fit``.

Examples
--------
>>> import numpy as np
>>> from bnrs import CNNClassifier
>>> from bnrs.callbacks import Checkpoint
>>> rng = np.random.default_rng(0)
>>> X = rng.standard_normal((60, 1, 8, 8)).astype(np.float32)
>>> y = (X[:, 0, :4].mean(axis=(1, 2)) > 0).astype(int)
>>> checkpoint = Checkpoint(monitor="valid_loss")
>>> clf = CNNClassifier("c4-bn-relu-mp2-fc8", max_epochs=4, early_stopping=True,
...                     random_state=0, callbacks=[checkpoint]).fit(X, y)
>>> checkpoint.best_epoch_ in (1, 2, 3, 4)
True
"""

from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

from ._validation import Boolean, Instances, check

__all__ = ["Checkpoint"]


class Checkpoint:
    """Keep the network of the best epoch by a monitored quantity, in memory or on disk.

    After every epoch whose ``monitor`` value is the best so far in the fit, either keeps
    a copy of the network's state dict (``best_state_``; :meth:`restore` loads it into an
    estimator) or, with ``path``, pickles the whole estimator there (written to a
    temporary file first, then renamed, so the file is always a whole pickle);
    ``pickle.load`` of the file gives a fitted estimator that predicts as the network of
    that epoch does.

    Parameters
    ----------
    monitor : str, default "valid_loss"
        A key of the epoch record: "valid_loss" or "valid_score" (both need
        ``early_stopping=True``, which holds out the validation data), "train_loss", or
        another number-valued key.
    path : str or os.PathLike, optional
        Where to pickle the estimator; None keeps the state dict in memory instead.
    lower_is_better : bool, optional
        Whether smaller values are better; None means True for a key ending in "loss",
        False otherwise.

    Attributes
    ----------
    best_epoch_ : int or None
        The epoch of the best value (None before the first epoch).
    best_value_ : float or None
    best_state_ : dict or None
        The network's state dict at ``best_epoch_`` (copies), when ``path`` is None.

    Notes
    -----
    A fit that starts again from epoch 1 (a new ``fit``) starts a new best. ``clone`` (a
    grid search) copies the callback with the estimator: each candidate fills its own
    copy, read it from ``estimator.callbacks``. Candidates fitted in parallel with the
    same ``path`` write the same file.
    """

    def __init__(self, monitor: str = "valid_loss", path: str | os.PathLike | None = None,
                 lower_is_better: bool | None = None):
        self.monitor = check(monitor, "monitor", Instances(str, description="a str"))
        self.path = check(path, "path", Instances(None, str, os.PathLike,
                                                  description="None, a str or a path"))
        if lower_is_better is not None:
            check(lower_is_better, "lower_is_better", Boolean())
        self.lower_is_better = (monitor.endswith("loss") if lower_is_better is None
                                else bool(lower_is_better))
        self.best_epoch_: int | None = None
        self.best_value_: float | None = None
        self.best_state_: dict | None = None
        self._last_epoch = 0

    def __call__(self, record: dict[str, Any]) -> bool:
        """Record one epoch; save the network if it is the best so far. Never stops."""
        if self.monitor not in record:
            raise ValueError(
                f"monitor: the epoch record has no {self.monitor!r} (it has "
                f"{sorted(key for key in record if key != 'estimator')}); 'valid_loss' and "
                "'valid_score' need early_stopping=True")
        if record["epoch"] <= self._last_epoch:   # a new fit numbers its epochs from 1
            self.best_epoch_ = self.best_value_ = self.best_state_ = None
        self._last_epoch = record["epoch"]
        value = float(record[self.monitor])
        best = self.best_value_
        if best is None or (value < best if self.lower_is_better else value > best):
            self.best_epoch_, self.best_value_ = record["epoch"], value
            estimator = record["estimator"]
            if self.path is None:
                self.best_state_ = estimator.model_.state_dict()
            else:
                self._write(estimator)
        return False

    def _write(self, estimator) -> None:
        target = Path(self.path)
        model = estimator.model_
        training = model.training
        model.eval()   # the pickle predicts in evaluation mode, as a fitted estimator does
        try:
            handle, temporary = tempfile.mkstemp(dir=target.parent,
                                                 prefix=f".{target.name}.")
            try:
                with os.fdopen(handle, "wb") as file:
                    pickle.dump(estimator, file)
                os.replace(temporary, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
                raise
        finally:
            model.train(training)

    def restore(self, estimator) -> None:
        """Load the best network kept in memory into ``estimator.model_``.

        Parameters
        ----------
        estimator : CNNClassifier or CNNRegressor
            The fitted estimator (the one the callback saw, or one like it).
        """
        if self.best_state_ is None:
            raise ValueError("Checkpoint.restore: no network kept in memory (no epoch "
                             "recorded yet, or path was given: pickle.load the file)")
        estimator.model_.load_state_dict(self.best_state_)

    def __repr__(self) -> str:
        return (f"Checkpoint(monitor={self.monitor!r}, path={self.path!r}, "
                f"lower_is_better={self.lower_is_better!r})")
