"""scikit-learn estimators over :mod:`bnrs.nn`: :class:`CNNClassifier` and
:class:`CNNRegressor`.

The network is described by an architecture string (see :mod:`bnrs.nn.spec`), built by
:func:`bnrs.nn.from_spec` at the first ``fit`` and trained with mini-batches in training
mode (batch statistics, dropout on); every prediction runs in evaluation mode (running
statistics, dropout off), so predictions are deterministic.

Examples
--------
>>> from sklearn.datasets import load_digits
>>> from bnrs import CNNClassifier
>>> X, y = load_digits(return_X_y=True)
>>> clf = CNNClassifier("c8-bn-relu-mp2-fc32-bn-relu", max_epochs=2, random_state=0)
>>> clf.fit(X[:200] / 16, y[:200]).input_shape_   # 64 features: 1x8x8 images
(1, 8, 8)
"""

from __future__ import annotations

import copy
import math
import sys
import time
from typing import ClassVar

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin, clone
from sklearn.metrics import r2_score
from sklearn.model_selection import train_test_split
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted

from . import nn, optim
from ._validation import (NONE, Boolean, Callables, Constraint, Instances, Interval,
                          IntTuple, Options, check, check_params)
from .diagnostics import layer_statistics, probe_indices
from .nn.module import Parameter, as_generator
from .nn.spec import DEFAULT_ARCHITECTURE, SpecError, from_spec, parse
from .optim.lr_scheduler import (CosineAnnealingLR, LinearLR, LRScheduler, MultiStepLR,
                                 OneCycleLR, ReduceLROnPlateau, StepLR)
from .training import batch_bounds, eval_logits, num_threads, train_epoch

try:
    from sklearn.utils.validation import validate_data
except ImportError:  # scikit-learn < 1.6 has the method instead of the function

    def validate_data(estimator, X="no_validation", y="no_validation", **kwargs):
        return estimator._validate_data(X, y, **kwargs)


__all__ = ["CNNClassifier", "CNNRegressor", "DivergenceError", "FitInterruptedWarning"]

_OPTIMIZERS = {"adam": optim.Adam, "adamw": optim.AdamW, "sgd": optim.SGD}
#: The weight decay of ``weight_decay=None``: each optimizer's own default (PyTorch's).
_DEFAULT_WEIGHT_DECAY = {"adam": 0.0, "adamw": 1e-2, "sgd": 0.0}
#: Samples per forward pass in prediction (bounds the memory of the im2col buffers).
_PREDICT_CHUNK = 512
_DATA_FORMATS = ("channels_first", "channels_last", "auto")
#: CNNRegressor's losses, with scikit-learn's names.
_REGRESSION_LOSSES = ("squared_error", "huber")
#: Channel counts of images as PIL, OpenCV, Keras and TensorFlow hold them: grey, RGB, RGBA.
_IMAGE_CHANNELS = (1, 3, 4)
#: ``lr_scheduler`` names: the :mod:`bnrs.optim.lr_scheduler` classes.
_LR_SCHEDULERS = {"step": StepLR, "multistep": MultiStepLR, "cosine": CosineAnnealingLR,
                  "linear": LinearLR, "onecycle": OneCycleLR, "plateau": ReduceLROnPlateau}
#: What ``lr_scheduler="plateau"`` may monitor (its ``monitor`` in lr_scheduler_params).
_PLATEAU_MONITORS = ("train_loss", "valid_loss", "valid_score")
#: OneCycleLR arguments the estimator sets from max_epochs and the batches of an epoch.
_ONECYCLE_LENGTH_ARGS = ("total_steps", "epochs", "steps_per_epoch")
_EARLY_STOPPING_MONITORS = ("valid_score", "valid_loss")


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or parameter (NaN or inf).

    Raised by :meth:`CNNClassifier.fit` and :meth:`CNNClassifier.partial_fit`; the
    estimator is left as it was at the end of the last epoch that finished with finite
    values (with ``early_stopping``, the best validated epoch), still usable, and the
    message names the epoch and batch.
    """


class FitInterruptedWarning(UserWarning):
    """No longer issued: an interrupted ``fit`` now re-raises the KeyboardInterrupt (see
    "Ctrl-C" in :class:`CNNClassifier`). Kept so that code importing it still works."""


class _Diverged(Exception):
    """Internal: training became non-finite at ``batch`` (1-based) of the epoch."""

    def __init__(self, batch: int, n_batches: int, loss: float):
        super().__init__(batch, n_batches, loss)
        self.batch, self.n_batches, self.loss = batch, n_batches, loss


#: Moved to :func:`bnrs.training.batch_bounds`, whose default is the estimator's rule (a
#: last batch of one sample joins the one before); this name stays for existing imports.
_batch_bounds = batch_bounds


def _needs_two_samples(model: nn.Sequential, input_shape: tuple[int, ...]) -> bool:
    """Whether some batch-norm layer (inside the blocks too) would see a single value per
    channel for one sample."""
    shape = tuple(input_shape)
    for layer in model:
        if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)) and math.prod(shape[1:]) == 1:
            return True
        if isinstance(layer, nn.Concat):
            paths = list(layer.branches)
        elif isinstance(layer, nn.Residual):
            paths = [path for path in (layer.body, layer.shortcut) if path is not None]
        else:
            paths = []
        if any(_needs_two_samples(path, shape) for path in paths):
            return True
        shape = layer.output_shape(shape)
    return False


def _x_layout(x_shape: tuple[int, ...], data_format: str, input_shape) -> str:
    """Where X of ``x_shape`` holds its channels (the class Notes' data-format rule)."""
    if data_format != "auto":
        return data_format
    sample = tuple(x_shape[1:])
    if len(sample) != 3:   # (n, H, W) has one channel; rows of (n, d) are read as (C, H, W)
        return "channels_first"
    if input_shape is not None and len(input_shape) == 3:
        channels, height, width = (int(d) for d in input_shape)
        first, last = (channels, height, width), (height, width, channels)
        if first != last and sample in (first, last):
            return "channels_first" if sample == first else "channels_last"
    first_is_channels = sample[0] in _IMAGE_CHANNELS
    last_is_channels = sample[2] in _IMAGE_CHANNELS
    if last_is_channels and not first_is_channels:
        return "channels_last"
    if first_is_channels and not last_is_channels:
        return "channels_first"
    # Both ends, or neither, look like image channels (e.g. (n, 3, 8, 3), or feature maps
    # such as (n, 16, 8, 8) that may as well be 8-channel 16x8 images): never guess.
    raise ValueError(
        f"data_format='auto' cannot tell the layout of X of shape {tuple(x_shape)}: it "
        f"may be {sample[0]}-channel {sample[1]}x{sample[2]} images (channels first) or "
        f"{sample[2]}-channel {sample[0]}x{sample[1]} images (channels last); pass "
        "data_format='channels_first' or data_format='channels_last'")


def _to_network(X: np.ndarray, input_shape: tuple[int, ...], layout: str) -> np.ndarray:
    """X brought to (n, C, H, W) from its layout, then reshaped to (n, *input_shape)."""
    if layout == "channels_last":
        if X.ndim == 4:
            X = X.transpose(0, 3, 1, 2)
        elif len(input_shape) == 3:   # rows of (H, W, C) values
            channels, height, width = input_shape
            X = X.reshape(len(X), height, width, channels).transpose(0, 3, 1, 2)
        X = np.ascontiguousarray(X)
    return X.reshape((len(X),) + tuple(input_shape))


def _all_finite(state: dict) -> bool:
    return all(np.isfinite(value).all() for value in state.values()
               if np.asarray(value).dtype.kind == "f")


def _encode(y: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Indices into the sorted ``classes`` of the labels ``y`` (ValueError if unknown)."""
    index = np.searchsorted(classes, y)
    index[index == len(classes)] = 0
    unknown = classes[index] != y
    if unknown.any():
        raise ValueError(f"y contains labels not in classes_ {classes!r}: "
                         f"{np.unique(y[unknown])!r}")
    return index.astype(np.int64)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (probabilities then sum to 1 within 1e-15)."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _checked_sample_weight(sample_weight, n_samples: int) -> np.ndarray | None:
    """``sample_weight`` of ``fit`` as float64 (n_samples,): a number (the same for every
    sample) or n_samples finite, non-negative reals, not all zero; None stays None."""
    if sample_weight is None:
        return None
    try:
        weight = np.asarray(sample_weight)
    except (TypeError, ValueError) as error:
        raise TypeError(f"sample_weight: expected an array of real numbers: {error}") from None
    if weight.dtype.kind not in "iuf":
        raise TypeError(f"sample_weight: expected real numbers, got an array of dtype "
                        f"{weight.dtype}")
    if weight.ndim == 0:
        weight = np.full(n_samples, weight)
    if weight.shape != (n_samples,):
        raise ValueError(f"sample_weight: expected shape ({n_samples},), one weight per "
                         f"sample of X, got shape {weight.shape}")
    weight = weight.astype(np.float64)
    bad = ~np.isfinite(weight) | (weight < 0)
    if bad.any():
        raise ValueError(f"sample_weight: expected finite, non-negative weights, got "
                         f"{float(weight[bad][0])!r} at index {int(np.flatnonzero(bad)[0])}")
    if not weight.sum() > 0:
        raise ValueError("sample_weight: expected at least one positive weight, got "
                         "weights that are all zero")
    return weight


def _mc_seed(rng: np.random.Generator) -> int:
    """The seed of the MC-dropout passes, taken from ``rng`` without advancing its stream
    (so that training draws the same numbers as without it)."""
    try:
        child = rng.spawn(1)[0]   # advances the seed sequence's child count only
    except TypeError:   # a bit generator made from a state has no seed sequence
        child = copy.deepcopy(rng)
    return int(child.integers(0, 2**63))


def _augment(X: np.ndarray, rng: np.random.Generator, shift: int, flip: bool) -> np.ndarray:
    """A randomly translated (zero padding, then a crop) and mirrored copy of the
    (N, C, H, W) batch X, drawing from ``rng`` in a fixed order: the N row and N column
    offsets, then the N flips."""
    n, channels, height, width = X.shape
    if shift:
        offsets = rng.integers(0, 2 * shift + 1, size=(2, n))
        padded = np.pad(X, ((0, 0), (0, 0), (shift, shift), (shift, shift)))
        rows = offsets[0][:, None] + np.arange(height)
        cols = offsets[1][:, None] + np.arange(width)
        X = padded[np.arange(n)[:, None, None, None], np.arange(channels)[None, :, None, None],
                   rows[:, None, :, None], cols[:, None, None, :]]
    if flip:
        mirrored = rng.random(n) < 0.5
        X = X.copy() if not shift else X   # never write into the caller's batch
        X[mirrored] = X[mirrored, :, :, ::-1]
    return X


class _BaseCNN(BaseEstimator):
    """What :class:`CNNClassifier` and :class:`CNNRegressor` share: the parameters and their
    checks, the input-shape rule, the network's construction, the training loop (early
    stopping, warm start, Ctrl-C, divergence) and the fitted state.

    A subclass says what its targets are and how they are scored, through ``_y_checks``,
    ``_check_targets``, ``_new_targets``, ``_continued_targets``, ``_criterion``,
    ``_validation_score`` and ``_stratify``.
    """

    def __init__(self, architecture: str = DEFAULT_ARCHITECTURE, *, input_shape=None,
                 data_format: str = "auto", optimizer: str = "adam",
                 learning_rate: float = 1e-3, momentum: float = 0.9,
                 weight_decay: float | None = None, batch_size: int = 64,
                 max_epochs: int = 20, shuffle: bool = True, early_stopping: bool = False,
                 validation_fraction: float = 0.1, n_iter_no_change: int = 10,
                 tol: float = 1e-4, warm_start: bool = False, random_state=None,
                 n_threads: int | None = None, verbose: int = 0,
                 record_layer_stats: bool = False, mc_samples: int = 0,
                 augment_shift: int = 0, augment_flip: bool = False,
                 lr_scheduler: str | None = None, lr_scheduler_params: dict | None = None,
                 callbacks: list | None = None, early_stopping_monitor: str = "valid_score",
                 weight_decay_exclude: str | None = None):
        self.architecture = architecture
        self.input_shape = input_shape
        self.data_format = data_format
        self.optimizer = optimizer
        self.learning_rate = learning_rate
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.shuffle = shuffle
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.tol = tol
        self.warm_start = warm_start
        self.random_state = random_state
        self.n_threads = n_threads
        self.verbose = verbose
        self.record_layer_stats = record_layer_stats
        self.mc_samples = mc_samples
        self.augment_shift = augment_shift
        self.augment_flip = augment_flip
        self.lr_scheduler = lr_scheduler
        self.lr_scheduler_params = lr_scheduler_params
        self.callbacks = callbacks
        self.early_stopping_monitor = early_stopping_monitor
        self.weight_decay_exclude = weight_decay_exclude

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.three_d_array = True
        return tags

    def __setstate__(self, state):
        # Estimators pickled before data_format existed read every X channels first.
        state.setdefault("data_format", "auto")
        for name, default in (("mc_samples", 0), ("augment_shift", 0),
                              ("augment_flip", False), ("lr_scheduler", None),
                              ("lr_scheduler_params", None), ("callbacks", None),
                              ("early_stopping_monitor", "valid_score"),
                              ("weight_decay_exclude", None)):
            state.setdefault(name, default)
        if "model_" in state:
            state.setdefault("data_format_", "channels_first")
            state.setdefault("lr_scheduler_", None)
        super().__setstate__(state)

    # ------------------------------------------------------------------ fitting

    def fit(self, X, y, sample_weight=None):
        """Train the network on (X, y) for up to ``max_epochs`` epochs.

        Parameters
        ----------
        X : array-like of 4-D (channels first or last), 3-D or 2-D shape
            Training samples, (n_samples, ...); see the data-format and input-shape
            rules in the class Notes of :class:`CNNClassifier`.
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)
            Class labels (ints, strings, ...), at least two distinct ones, for
            :class:`CNNClassifier`; real-valued targets for :class:`CNNRegressor`.
        sample_weight : array-like of shape (n_samples,) or float, optional
            Finite, non-negative weights, not all zero (a number: the same for every
            sample). Each mini-batch's loss is the weighted mean ``sum(w * loss) /
            sum(w)`` over its samples, as in scikit-learn's ``MLPClassifier``, so a
            weight of 2 counts as the sample twice in its batch and weights of 1 train
            exactly as none. With ``early_stopping`` the validation score is weighted too.

        Returns
        -------
        self : object
            The fitted estimator.
        """
        self._validate_params()
        reset = not (self.warm_start and hasattr(self, "model_"))
        return self._fit(X, y, classes=None, reset=reset, incremental=False,
                         sample_weight=sample_weight)

    def _fit(self, X, y, *, classes, reset: bool, incremental: bool, sample_weight=None):
        # Every check runs, and the new state is built aside, before the first attribute
        # is set: a call that is rejected leaves a fitted estimator exactly as it was.
        with num_threads(self.n_threads):
            # validate_data(reset=True) records n_features_in_ on the estimator it is
            # given, so a new fit validates on an unfitted copy.
            checked = clone(self) if reset else self
            X, y = validate_data(checked, X, y, reset=reset, allow_nd=True,
                                 dtype=np.float32, order="C", **self._y_checks)
            self._check_targets(y)
            if X.ndim > 4:
                raise ValueError(f"X: expected a 2-D, 3-D or 4-D array, got shape {X.shape}")
            sample_weight = _checked_sample_weight(sample_weight, len(X))
            validate = self.early_stopping and not incremental
            # train_test_split's rule for the size of the validation part
            n_train = len(X) - (math.ceil(self.validation_fraction * len(X)) if validate
                                else 0)
            if reset:
                state, targets = self._new_state(X, y, classes, n_train)
                for name in ("n_features_in_", "feature_names_in_"):
                    state[name] = getattr(checked, name, None)
            else:
                state, targets = self._continued_state(X, y, classes, incremental, n_train)
            input_shape = state["input_shape_"] if reset else self.input_shape_
            self._check_augment(input_shape)
            sample_weight = self._training_weights(
                targets, sample_weight, incremental,
                state.get("classes_", getattr(self, "classes_", None)))
            X = _to_network(X, input_shape,
                            state["data_format_"] if reset else self.data_format_)
            n_batches = len(batch_bounds(n_train, self.batch_size))
            continue_schedule = self._check_lr_scheduler(state, validate, incremental,
                                                         n_batches)
            valid = None
            if validate:
                seed = int(state["_rng"].integers(0, 2**32))
                parts = train_test_split(
                    *((X, targets) if sample_weight is None else (X, targets, sample_weight)),
                    test_size=self.validation_fraction,
                    stratify=self._stratify(targets), random_state=seed)
                X, X_valid, targets, y_valid = parts[:4]
                weight_valid = None if sample_weight is None else parts[5]
                if weight_valid is not None and not weight_valid.sum() > 0:
                    # Held-out samples all of weight 0 have nothing to average by: the
                    # validation score and loss are then unweighted.
                    weight_valid = None
                valid = (X_valid, y_valid, weight_valid)
                sample_weight = None if sample_weight is None else parts[4]
                if sample_weight is not None and not sample_weight.sum() > 0:
                    raise ValueError("sample_weight: every sample left for training after "
                                     "the validation split has weight 0")
            for name, value in state.items():
                if value is None and name == "feature_names_in_":
                    if hasattr(self, name):   # X without column names this time
                        del self.feature_names_in_
                else:
                    setattr(self, name, value)
            if not reset:   # e.g. a lower learning rate for the optimizer kept
                self._refresh_optimizer(continue_schedule)
            if not continue_schedule:
                self.lr_scheduler_ = self._new_lr_scheduler(self.optimizer_, n_batches)
            self._train(X, targets, 1 if incremental else self.max_epochs, valid,
                        sample_weight)
        return self

    def _training_weights(self, targets: np.ndarray, sample_weight: np.ndarray | None,
                          incremental: bool, classes) -> np.ndarray | None:
        """The per-sample loss weights: ``sample_weight`` (checked), times the class
        weights of a classifier; None when neither is given (the unweighted loss)."""
        return sample_weight

    def _check_augment(self, input_shape: tuple[int, ...]) -> None:
        """Refuse augmentation of samples that are not images (or smaller than the shift)."""
        if not (self.augment_shift or self.augment_flip):
            return
        given = "augment_shift" if self.augment_shift else "augment_flip"
        if len(input_shape) != 3:
            raise ValueError(f"{given}: augmentation needs image samples (C, H, W), but the "
                             f"network takes vectors of shape {tuple(input_shape)} (2-D X "
                             "with an architecture of dense layers only); pass X of shape "
                             "(n, C, H, W) or input_shape=(C, H, W)")
        if self.augment_shift >= min(input_shape[1:]):
            raise ValueError(f"augment_shift: expected fewer pixels than the images' "
                             f"height and width {tuple(input_shape[1:])}, got "
                             f"{self.augment_shift}")

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "model_")

    def summary(self) -> nn.ModelSummary:
        """The fitted network's layers, output shapes, parameters and multiply-adds.

        Returns
        -------
        bnrs.nn.ModelSummary
            A ``str`` to print, for samples of ``input_shape_``, with the rows and totals
            as attributes (see :func:`bnrs.nn.summary`).
        """
        check_is_fitted(self)
        return self.model_.summary(self.input_shape_)

    #: The hyper-parameters' types and ranges, checked at every fit and partial_fit (in
    #: the style of scikit-learn's ``_parameter_constraints``); ``architecture``'s
    #: grammar is checked by :func:`bnrs.nn.spec.parse` besides.
    _parameter_constraints: ClassVar[dict[str, list[Constraint]]] = {
        "architecture": [Instances(str, description="an architecture string")],
        "input_shape": [NONE, IntTuple((1, 3), 1, "(C, H, W) or (n_features,) of "
                                                  "positive ints")],
        "data_format": [Options(_DATA_FORMATS)],
        "optimizer": [Options(_OPTIMIZERS)],
        "learning_rate": [Interval("real", 0.0, None, closed="neither")],
        "momentum": [Interval("real", 0.0, None)],
        "weight_decay": [NONE, Interval("real", 0.0, None)],
        "batch_size": [Interval("int", 1)],
        "max_epochs": [Interval("int", 1)],
        "shuffle": [Boolean()],
        "early_stopping": [Boolean()],
        "validation_fraction": [Interval("real", 0.0, 1.0, closed="neither")],
        "n_iter_no_change": [Interval("int", 1)],
        "tol": [Interval("real", 0.0, None)],
        "warm_start": [Boolean()],
        "random_state": [NONE, Interval("int", 0),
                         Instances(np.random.Generator, np.random.RandomState,
                                   description="a numpy.random.Generator or RandomState")],
        "n_threads": [NONE, Interval("int", 1)],
        "verbose": [Interval("int", 0), Boolean()],
        "record_layer_stats": [Boolean()],
        "mc_samples": [Interval("int", 0)],
        "augment_shift": [Interval("int", 0)],
        "augment_flip": [Boolean()],
        "lr_scheduler": [NONE, Options(_LR_SCHEDULERS)],
        "lr_scheduler_params": [NONE, Instances(dict, description="a dict of the "
                                                "scheduler's keyword arguments")],
        "callbacks": [NONE, Callables()],
        "early_stopping_monitor": [Options(_EARLY_STOPPING_MONITORS)],
        "weight_decay_exclude": [NONE, Options(("norm_and_bias",))],
    }

    def _validate_params(self) -> None:
        """Check every hyper-parameter against ``_parameter_constraints``.

        ``__init__`` only stores them. A wrong type raises TypeError, a wrong value
        ValueError, naming the parameter.
        """
        check_params(self._parameter_constraints, self.get_params(deep=False))
        parse(self.architecture)
        if self.lr_scheduler is not None:
            # Made once on a stand-in optimizer: the scheduler's own checks, naming its
            # argument, before anything is built.
            stand_in = _OPTIMIZERS[self.optimizer]([Parameter(np.zeros(1))],
                                                   **self._optimizer_kwargs())
            self._new_lr_scheduler(stand_in, n_batches=1)

    def _new_state(self, X: np.ndarray, y: np.ndarray, classes,
                   n_train: int) -> tuple[dict, np.ndarray]:
        """The attributes of a new fit: the targets' (classes_, ...), input_shape_, network,
        optimizer, history.

        Only checks and builds; the caller sets them. Returns them by name, and y as the
        loss takes it (class indices, float32 targets).
        """
        target_state, targets, n_outputs = self._new_targets(y, classes)
        layout = _x_layout(X.shape, self.data_format, self.input_shape)
        input_shape = self._infer_input_shape(X.shape, layout)
        rng = as_generator(self.random_state)
        try:
            model = from_spec(self.architecture, input_shape, n_outputs, random_state=rng)
        except SpecError as error:
            raise ValueError(f"cannot build the architecture for samples of shape "
                             f"{input_shape} (from X of shape {X.shape}; see the "
                             f"input-shape rule of {type(self).__name__}): {error}") from error
        min_batch = 2 if _needs_two_samples(model, input_shape) else 1
        self._check_batch_size(min_batch, n_train)
        state = {**target_state, "input_shape_": input_shape, "data_format_": layout,
                 "model_": model,
                 "_x_sample_shape": X.shape[1:], "_rng": rng, "_min_batch": min_batch,
                 "_mc_seed": _mc_seed(rng),
                 "_fit_architecture": self.architecture,
                 "optimizer_": self._new_optimizer(model),
                 "loss_": None, "best_loss_": None, "loss_curve_": [], "history_": [],
                 "n_iter_": 0, "validation_scores_": None, "best_validation_score_": None,
                 "best_validation_loss_": None, "layer_stats_init_": None,
                 "lr_scheduler_": None}
        return state, targets

    def _check_batch_size(self, min_batch: int, n_train: int) -> None:
        if n_train < min_batch or self.batch_size < min_batch:
            raise ValueError(
                f"batch norm in architecture {self.architecture!r} needs at least 2 "
                f"samples per mini-batch; got {n_train} training sample(s) and "
                f"batch_size={self.batch_size}")

    def _infer_input_shape(self, x_shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
        """The network's sample shape (C, H, W) or (n_features,) for X of ``x_shape`` held
        in ``layout`` (the class Notes' rule)."""
        sample = tuple(x_shape[1:])
        if self.input_shape is not None:
            given = tuple(int(d) for d in self.input_shape)
            if math.prod(given) != math.prod(sample):
                raise ValueError(f"input_shape={given} has {math.prod(given)} values per "
                                 f"sample, but X of shape {x_shape} has "
                                 f"{math.prod(sample)}")
            return given
        if len(sample) == 3:
            return (sample[2],) + sample[:2] if layout == "channels_last" else sample
        if len(sample) == 2:
            return (1,) + sample
        n_features = sample[0]
        try:  # a throwaway build: does any layer need a feature map?
            from_spec(self.architecture, (n_features,), 2, random_state=0)
            return (n_features,)
        except SpecError:
            pass
        side = math.isqrt(n_features)
        if side * side != n_features:
            raise ValueError(f"X has {n_features} features per sample, which is not a "
                             f"square number, and architecture {self.architecture!r} has "
                             "convolution or pooling layers that need images: pass "
                             "input_shape=(C, H, W), or X of shape (n, C, H, W)")
        return (1, side, side)

    def _continued_state(self, X: np.ndarray, y: np.ndarray, classes, incremental: bool,
                         n_train: int) -> tuple[dict, np.ndarray]:
        """Check that a warm-start fit or a later partial_fit can reuse the network.

        Returns the attributes to set (the random stream, to be advanced, and the
        optimizer, a new one if ``optimizer`` changed) and y as the loss takes it; changes
        nothing itself.
        """
        targets = self._continued_targets(y, classes, incremental)
        if self.architecture != self._fit_architecture:
            raise ValueError(f"the architecture changed from {self._fit_architecture!r} "
                             f"to {self.architecture!r} since the network was built; set "
                             "warm_start=False (or fit anew) to build a new network")
        if X.shape[1:] != self._x_sample_shape:
            raise ValueError(f"X has samples of shape {X.shape[1:]}, but "
                             f"{type(self).__name__} was fitted on samples of shape "
                             f"{self._x_sample_shape}")
        if self.data_format not in ("auto", self.data_format_):
            raise ValueError(f"data_format={self.data_format!r}, but the network was fitted "
                             f"on X held {self.data_format_!r}; set warm_start=False (or "
                             "fit anew) to change the layout")
        self._check_batch_size(self._min_batch, n_train)
        # The kept optimizer gets the current hyper-parameters when the call is accepted.
        optimizer = (self.optimizer_ if type(self.optimizer_) is _OPTIMIZERS[self.optimizer]
                     else self._new_optimizer(self.model_))
        if optimizer is self.optimizer_ and not self._has_parameter_groups(optimizer):
            # weight_decay_exclude changed: new groups, the same moments and buffers.
            optimizer = self._new_optimizer(self.model_)
            optimizer.state = dict(self.optimizer_.state)
        # A copy of the stream: drawing the validation split must not advance the
        # estimator's own before the call is accepted.
        return {"_rng": copy.deepcopy(self._rng), "optimizer_": optimizer}, targets

    def _optimizer_kwargs(self) -> dict:
        weight_decay = (_DEFAULT_WEIGHT_DECAY[self.optimizer] if self.weight_decay is None
                        else self.weight_decay)
        kwargs = {"lr": float(self.learning_rate), "weight_decay": float(weight_decay)}
        if self.optimizer == "sgd":
            kwargs["momentum"] = float(self.momentum)
        return kwargs

    def _new_optimizer(self, model: nn.Sequential) -> optim.Optimizer:
        return _OPTIMIZERS[self.optimizer](self._parameter_groups(model),
                                           **self._optimizer_kwargs())

    def _parameter_groups(self, model: nn.Sequential) -> list:
        """The optimizer's parameters: all in one group, or with ``weight_decay_exclude``
        the weights of convolutions and dense layers, then a group without decay of the
        1-D parameters (normalisation layers' scales and shifts, every bias)."""
        params = list(model.parameters())
        if self.weight_decay_exclude is None:
            return params
        groups = [{"params": [p for p in params if p.data.ndim > 1]},
                  {"params": [p for p in params if p.data.ndim <= 1], "weight_decay": 0.0}]
        return [group for group in groups if group["params"]]

    def _excluded_from_decay(self, group: dict) -> bool:
        return (self.weight_decay_exclude is not None
                and all(param.data.ndim <= 1 for param in group["params"]))

    def _has_parameter_groups(self, optimizer: optim.Optimizer) -> bool:
        """Whether ``optimizer`` groups the parameters as ``weight_decay_exclude`` asks."""
        wanted = self._parameter_groups(self.model_)
        if self.weight_decay_exclude is None:
            wanted = [{"params": wanted}]
        return ([[id(p) for p in group["params"]] for group in optimizer.param_groups]
                == [[id(p) for p in group["params"]] for group in wanted])

    def _refresh_optimizer(self, continue_schedule: bool) -> None:
        """Give the kept optimizer the current hyper-parameters (a warm-start fit or a
        later partial_fit); a schedule that goes on keeps the rates it set."""
        kwargs = self._optimizer_kwargs()
        if continue_schedule:
            del kwargs["lr"]
            if isinstance(self.lr_scheduler_, OneCycleLR):
                kwargs.pop("momentum", None)
        elif "betas" in self.optimizer_.defaults:   # OneCycleLR may have cycled beta1
            kwargs["betas"] = self.optimizer_.defaults["betas"]
        for group in self.optimizer_.param_groups:
            group.update(kwargs)
            if self._excluded_from_decay(group):
                group["weight_decay"] = 0.0

    # ------------------------------------------------------------------ lr schedule

    def _lr_scheduler_kwargs(self, n_batches: int) -> dict:
        """The scheduler's arguments: ``lr_scheduler_params`` over the estimator's
        defaults (see the ``lr_scheduler`` parameter); ``monitor`` taken out."""
        params = dict(self.lr_scheduler_params or {})
        params.pop("monitor", None)
        name, epochs = self.lr_scheduler, self.max_epochs
        if name == "step":
            params.setdefault("step_size", max(1, epochs // 3))
        elif name == "multistep":
            params.setdefault("milestones", sorted({max(1, epochs // 2),
                                                    max(1, 3 * epochs // 4)}))
        elif name == "cosine":
            params.setdefault("T_max", epochs)
        elif name == "onecycle":
            given = [key for key in _ONECYCLE_LENGTH_ARGS if key in params]
            if given:
                raise ValueError(
                    f"lr_scheduler_params: {given} of lr_scheduler='onecycle' are set by "
                    "the estimator (max_epochs times the batches of an epoch); leave them "
                    "out")
            params.setdefault("max_lr", float(self.learning_rate))
            params["total_steps"] = epochs * n_batches
        elif name == "plateau":
            params.setdefault("mode", "max" if self._plateau_monitor(True) == "valid_score"
                              else "min")
        return params

    def _plateau_monitor(self, validate: bool) -> str:
        """What ReduceLROnPlateau steps on: lr_scheduler_params' ``monitor``, else the
        validation loss when there is validation data, else the training loss."""
        monitor = (self.lr_scheduler_params or {}).get("monitor")
        if monitor is None:
            return "valid_loss" if validate else "train_loss"
        return monitor

    def _new_lr_scheduler(self, optimizer: optim.Optimizer,
                          n_batches: int) -> LRScheduler | None:
        """The ``lr_scheduler`` on ``optimizer`` (None without one); an error names
        lr_scheduler_params."""
        if self.lr_scheduler is None:
            return None
        monitor = (self.lr_scheduler_params or {}).get("monitor")
        if monitor is not None and (self.lr_scheduler != "plateau"
                                    or monitor not in _PLATEAU_MONITORS):
            raise ValueError(f"lr_scheduler_params: monitor={monitor!r} is for "
                             f"lr_scheduler='plateau', one of {list(_PLATEAU_MONITORS)}")
        for group in optimizer.param_groups:
            group.pop("initial_lr", None)   # a new schedule starts from learning_rate
        try:
            return _LR_SCHEDULERS[self.lr_scheduler](optimizer,
                                                     **self._lr_scheduler_kwargs(n_batches))
        except (TypeError, ValueError) as error:
            raise type(error)(f"lr_scheduler_params: {error} (lr_scheduler="
                              f"{self.lr_scheduler!r}, lr_scheduler_params="
                              f"{self.lr_scheduler_params!r})") from error

    def _check_lr_scheduler(self, state: dict, validate: bool, incremental: bool,
                            n_batches: int) -> bool:
        """Reject a schedule this call cannot run; return whether the schedule of the
        previous call goes on (partial_fit with the same scheduler and optimizer)."""
        if self.lr_scheduler is None:
            return False
        if self.lr_scheduler == "plateau" and not validate and self._plateau_monitor(
                False) != "train_loss":
            raise ValueError(f"lr_scheduler_params: monitor="
                             f"{self._plateau_monitor(False)!r} needs validation data: "
                             "early_stopping=True in fit (partial_fit has none)")
        scheduler = getattr(self, "lr_scheduler_", None)
        if not (incremental and scheduler is not None
                and type(scheduler) is _LR_SCHEDULERS[self.lr_scheduler]
                and state.get("optimizer_", self.optimizer_) is scheduler.optimizer):
            return False
        if isinstance(scheduler, OneCycleLR) and (
                scheduler.last_epoch + n_batches > scheduler.total_steps):
            raise ValueError(
                f"lr_scheduler='onecycle': the cycle of {scheduler.total_steps} steps has "
                f"{scheduler.total_steps - scheduler.last_epoch} left and this partial_fit "
                f"needs {n_batches}; fit anew (or set lr_scheduler=None) to go on")
        return True

    def _step_lr_scheduler(self, loss: float, score: float | None,
                           valid_loss: float | None) -> None:
        """The end-of-epoch step of an epoch scheduler (OneCycleLR steps per batch)."""
        scheduler = self.lr_scheduler_
        if scheduler is None or isinstance(scheduler, OneCycleLR):
            return
        if isinstance(scheduler, ReduceLROnPlateau):
            monitored = {"train_loss": loss, "valid_loss": valid_loss, "valid_score": score}
            scheduler.step(monitored[self._plateau_monitor(score is not None)])
        else:
            scheduler.step()

    def _network_input(self, X: np.ndarray) -> np.ndarray:
        """Validated X as the network takes it, (n, *input_shape_); X must have the sample
        shape (and so the layout, ``data_format_``) seen in fit."""
        if X.shape[1:] != self._x_sample_shape:
            raise ValueError(f"X has samples of shape {X.shape[1:]}, but "
                             f"{type(self).__name__} was fitted on samples of shape "
                             f"{self._x_sample_shape}")
        return _to_network(X, self.input_shape_, self.data_format_)

    # ------------------------------------------------------------------ training loop

    def _train(self, X: np.ndarray, y: np.ndarray, n_epochs: int, valid,
               sample_weight: np.ndarray | None = None) -> None:
        """Run up to ``n_epochs`` epochs, validating on ``valid`` (X, y, sample_weight) if
        given."""
        validate = valid is not None
        if validate and self.validation_scores_ is None:
            self.validation_scores_ = []
        bounds = batch_bounds(len(X), self.batch_size, last="merge_single")
        probe = None
        if self.record_layer_stats:
            index = probe_indices(len(X))
            probe = (X[index], y[index])
            if self.n_iter_ == 0:
                self.layer_stats_init_ = layer_statistics(self.model_, *probe,
                                                          criterion=self._criterion())
        self.best_loss_ = self.best_validation_score_ = self.best_validation_loss_ = None
        best_state, best_epoch, epochs_without_improvement = None, None, 0
        completed = self._snapshot()
        try:
            for _ in range(n_epochs):
                epoch, start = self.n_iter_ + 1, time.perf_counter()
                lr = self.optimizer_.param_groups[0]["lr"]   # every group has the same
                try:
                    loss, score, valid_loss, state = self._run_epoch(X, y, bounds, valid,
                                                                     sample_weight)
                    seconds = time.perf_counter() - start   # the probe is not training
                    layers = None if probe is None else layer_statistics(
                        self.model_, *probe, criterion=self._criterion())
                except KeyboardInterrupt:
                    # A request to stop the program, not to shorten this one fit among
                    # those a search or script makes: it goes on up, with the model of
                    # the completed epochs kept.
                    self._restore(completed)
                    raise
                except _Diverged as diverged:
                    self._restore(completed)
                    what = ("a parameter or batch-norm statistic became NaN or infinite"
                            if math.isfinite(diverged.loss)
                            else f"the training loss became {diverged.loss}")
                    # With early stopping the network ends as the best epoch's (the
                    # `finally` below), as after Ctrl-C: the message names that epoch.
                    kept = (f"its best epoch so far, epoch {best_epoch}"
                            if best_state is not None else f"its state after epoch "
                            f"{self.n_iter_}")
                    raise DivergenceError(
                        f"training diverged in epoch {epoch} (batch {diverged.batch} of "
                        f"{diverged.n_batches}): {what}; the network was restored to "
                        f"{kept}. Lower learning_rate (now {self.learning_rate})") from None
                self._step_lr_scheduler(loss, score, valid_loss)
                completed = self._snapshot(state)
                self._record(epoch, loss, score, seconds, layers, valid_loss=valid_loss, lr=lr)
                improved, is_best = self._track_best(loss, score, valid_loss)
                if is_best and validate:
                    best_state, best_epoch = state, epoch
                epochs_without_improvement = 0 if improved else epochs_without_improvement + 1
                stop = self._run_callbacks()
                if epochs_without_improvement >= self.n_iter_no_change:
                    if self.verbose:
                        monitored = ("training loss" if not validate else "validation loss"
                                     if self.early_stopping_monitor == "valid_loss"
                                     else "validation score")
                        print(f"stopping: the {monitored} did not improve by tol={self.tol}"
                              f" for {self.n_iter_no_change} epochs", flush=True)
                    break
                if stop:
                    if self.verbose:
                        print("stopping: a callback returned True", flush=True)
                    break
        finally:
            if best_state is not None:
                self.model_.load_state_dict(best_state)
            self.model_.clear_saved()
            self.model_.eval()

    def _run_epoch(self, X: np.ndarray, y: np.ndarray, bounds, valid,
                   sample_weight: np.ndarray | None = None):
        """One pass of mini-batch training, then the validation score and loss if
        ``valid``.

        Returns the mean (or weighted mean) training loss, the validation score and loss
        (or None, None) and the network's state dict; raises _Diverged for a non-finite
        loss or state.
        """
        order = self._rng.permutation(len(X)) if self.shuffle else None
        transform = None
        if self.augment_shift or self.augment_flip:
            def transform(batch, rng=self._rng, shift=self.augment_shift,
                          flip=self.augment_flip):
                return _augment(batch, rng, shift, flip)
        per_batch = isinstance(self.lr_scheduler_, OneCycleLR)
        losses = train_epoch(self.model_, self._criterion(), self.optimizer_, X, y, bounds,
                             order, sample_weight=sample_weight, transform=transform,
                             after_step=self.lr_scheduler_.step if per_batch else None)
        if not math.isfinite(losses[-1]):
            raise _Diverged(len(losses), len(bounds), losses[-1])
        total = 0.0
        for loss, (start, stop) in zip(losses, bounds):   # in order (same bits as ever)
            if sample_weight is None:
                total += loss * (stop - start)
            else:
                index = slice(start, stop) if order is None else order[start:stop]
                total += loss * float(sample_weight[index].sum())
        loss = total / (len(X) if sample_weight is None else float(sample_weight.sum()))
        state = self.model_.state_dict()
        if not _all_finite(state):
            raise _Diverged(len(bounds), len(bounds), loss)
        score = valid_loss = None
        if valid is not None:
            X_valid, y_valid, weight_valid = valid
            outputs = self._logits(X_valid)
            score = self._validation_score(outputs, y_valid, weight_valid)
            valid_loss = float(self._criterion()(outputs, y_valid, weight_valid))
        return loss, score, valid_loss, state

    def _track_best(self, loss: float, score: float | None,
                    valid_loss: float | None = None) -> tuple[bool, bool]:
        """Update best_loss_, or best_validation_score_ and best_validation_loss_ (when
        ``score`` is given).

        Returns whether the epoch improved on the best of the monitored quantity (the
        training loss, or ``early_stopping_monitor``) by more than ``tol``, and whether
        it is the new best.
        """
        if score is not None:
            best = self.best_validation_score_
            if best is None or score > best:
                self.best_validation_score_ = score
            best_loss = self.best_validation_loss_
            if best_loss is None or valid_loss < best_loss:
                self.best_validation_loss_ = valid_loss
            if self.early_stopping_monitor == "valid_loss":
                return (best_loss is None or valid_loss < best_loss - self.tol,
                        best_loss is None or valid_loss < best_loss)
            return best is None or score > best + self.tol, best is None or score > best
        best = self.best_loss_
        if best is None or loss < best:
            self.best_loss_ = loss
        return best is None or loss < best - self.tol, best is None or loss < best

    def _snapshot(self, model_state: dict | None = None) -> tuple[dict, dict, dict | None]:
        """The network's (``model_state`` if given), optimizer's and scheduler's state."""
        scheduler = self.lr_scheduler_
        return (self.model_.state_dict() if model_state is None else model_state,
                self.optimizer_.state_dict(),
                None if scheduler is None else scheduler.state_dict())

    def _restore(self, snapshot: tuple[dict, dict, dict | None]) -> None:
        model_state, optimizer_state, scheduler_state = snapshot
        self.model_.clear_saved()
        self.model_.load_state_dict(model_state)
        self.optimizer_.load_state_dict(optimizer_state)
        if scheduler_state is not None:
            self.lr_scheduler_.load_state_dict(scheduler_state)

    def _run_callbacks(self) -> bool:
        """Call every callback with the last epoch's record; whether one asked to stop."""
        stop = False
        for callback in self.callbacks or ():
            if callback({**self.history_[-1], "estimator": self}):
                stop = True
        return stop

    def _record(self, epoch: int, loss: float, score: float | None, seconds: float,
                layers: list | None = None, *, valid_loss: float | None = None,
                lr: float | None = None) -> None:
        self.n_iter_ = epoch
        self.loss_ = loss
        self.loss_curve_.append(loss)
        entry = {"epoch": epoch, "train_loss": loss}
        if score is not None:
            self.validation_scores_.append(score)
            entry["valid_loss"] = valid_loss
            entry["valid_score"] = score
        entry["lr"] = lr
        entry["seconds"] = seconds
        if layers is not None:
            entry["layers"] = layers
        self.history_.append(entry)
        if self.verbose:
            valid = "" if score is None else f"  valid_score {score:.4f}"
            if self.lr_scheduler is not None:
                valid += f"  lr {lr:.3g}"
            print(f"epoch {epoch:>3}  train_loss {loss:.4f}{valid}  {seconds:.2f} s",
                  file=sys.stdout, flush=True)

    # ------------------------------------------------------------------ prediction

    def _logits(self, X: np.ndarray) -> np.ndarray:
        """The network's outputs (logits, for a classifier) of network-shaped X in
        evaluation mode, in chunks."""
        return np.concatenate(list(eval_logits(self.model_, X, _PREDICT_CHUNK)))

    def _predict_outputs(self, X) -> np.ndarray:
        """The network's float32 outputs for user X (checked, in the fitted layout)."""
        check_is_fitted(self)
        with num_threads(self.n_threads):
            X = validate_data(self, X, reset=False, allow_nd=True, dtype=np.float32,
                              order="C")
            return self._logits(self._network_input(X))

    def _mc_passes(self, X) -> np.ndarray:
        """The ``mc_samples`` stochastic passes over user X: batch norm (and every other
        layer) in evaluation mode, dropout in training mode, as a float64 array
        (mc_samples, n_samples, n_outputs) of ``_mc_output`` values.

        The dropout layers draw their masks' seeds from streams seeded by ``_mc_seed``
        (:func:`bnrs.nn.mc_dropout`: one per layer, in layer order; pass after pass,
        chunk after chunk), so predictions are reproducible and training's streams are
        untouched.
        """
        mc_samples = check(self.mc_samples, "mc_samples",
                           *self._parameter_constraints["mc_samples"])
        check_is_fitted(self)
        with num_threads(self.n_threads):
            X = self._network_input(validate_data(self, X, reset=False, allow_nd=True,
                                                  dtype=np.float32, order="C"))
            model = self.model_
            # Estimators pickled before mc_samples existed have no seed of their own.
            seed = getattr(self, "_mc_seed", None)
            if seed is None:
                seed = _mc_seed(copy.deepcopy(self._rng))
            bounds = batch_bounds(len(X), _PREDICT_CHUNK, last="keep")
            with nn.mc_dropout(model, seed):
                return np.stack([
                    self._mc_output(np.concatenate([model(X[start:stop])
                                                    for start, stop in bounds]))
                    for _ in range(mc_samples)])

    def _mc_output(self, outputs: np.ndarray) -> np.ndarray:
        """What an MC-dropout pass contributes for the network's outputs (float64)."""
        raise NotImplementedError

    def _uncertainty(self, X) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation over the MC-dropout passes (mc_samples >= 1)."""
        if self.mc_samples == 0:
            check(self.mc_samples, "mc_samples", *self._parameter_constraints["mc_samples"])
            raise ValueError("mc_samples: predict_uncertainty needs Monte Carlo dropout "
                             "passes; set mc_samples to 1 or more (e.g. 30), got 0")
        passes = self._mc_passes(X)
        return passes.mean(axis=0), passes.std(axis=0)

    # ------------------------------------------------------------------ the subclass's part

    #: Keyword arguments of ``validate_data`` for y (e.g. ``multi_output``).
    _y_checks: ClassVar[dict] = {}

    def _check_targets(self, y: np.ndarray) -> None:
        """Reject y that is not of the estimator's kind (after ``validate_data``)."""
        raise NotImplementedError

    def _new_targets(self, y: np.ndarray, classes) -> tuple[dict, np.ndarray, int]:
        """For a new fit: the target attributes to set, y as the loss takes it, and the
        width of the output layer."""
        raise NotImplementedError

    def _continued_targets(self, y: np.ndarray, classes, incremental: bool) -> np.ndarray:
        """For a warm-start fit or a later partial_fit: y as the loss takes it, checked
        against the fitted targets."""
        raise NotImplementedError

    def _criterion(self) -> nn.Module:
        """The training loss (a :mod:`bnrs.nn` loss module)."""
        raise NotImplementedError

    def _validation_score(self, outputs: np.ndarray, targets: np.ndarray,
                          sample_weight: np.ndarray | None = None) -> float:
        """The early-stopping score (higher is better) of network outputs, weighted by
        ``sample_weight`` if given."""
        raise NotImplementedError

    def _stratify(self, targets: np.ndarray) -> np.ndarray | None:
        """``stratify`` of the validation split."""
        raise NotImplementedError


class CNNClassifier(ClassifierMixin, _BaseCNN):
    """A convolutional network classifier with batch norm and dropout, trained on the CPU.

    The network is given as an architecture string (see :mod:`bnrs.nn.spec`), e.g.
    ``"c16-bn-relu-mp2-c32-bn-relu-mp2-d0.25-fc128-bn-relu-d0.5"``; the output layer
    ``fc<n_classes>`` is appended, and the loss is the mean cross-entropy (softmax).
    Training runs mini-batches in training mode (batch-norm batch statistics, dropout
    on); ``predict``, ``predict_proba``, ``predict_log_proba`` and ``score`` run in
    evaluation mode (running statistics, no dropout) and are deterministic.

    Parameters
    ----------
    architecture : str, default ``bnrs.nn.DEFAULT_ARCHITECTURE``
        Tokens joined by ``-``: ``c<out>[k<size>][s<stride>][p<pad>]`` (Conv2d), ``bn``,
        ``brn``, ``gn<groups>``, ``ln``, ``in`` (batch norm, batch renorm, group, layer and
        instance norm), ``relu``/``lrelu``/``sigmoid``/``tanh``, ``mp<k>``/``ap<k>``
        (pooling), ``d<p>``/``sd<p>`` (dropout, spatial dropout), ``fc<units>``; see
        :mod:`bnrs.nn.spec`. The empty string is a linear (softmax regression) model.
    input_shape : tuple of int, optional
        The shape of one sample as the network sees it, (C, H, W) or (n_features,);
        X is reshaped to ``(n_samples, *input_shape)`` and must have that many values
        per sample. When None it is inferred from X (see Notes).
    data_format : {"auto", "channels_first", "channels_last"}, default "auto"
        Where 4-D X holds the channels: ``(n, C, H, W)`` ("channels_first", PyTorch's
        layout) or ``(n, H, W, C)`` ("channels_last", as PIL, OpenCV, Keras and
        TensorFlow hold images). "auto" decides from X's shape (see Notes). The network
        always sees (N, C, H, W): X is transposed once in ``fit`` and in prediction.
    optimizer : {"adam", "adamw", "sgd"}, default "adam"
        :class:`bnrs.optim.Adam`, :class:`bnrs.optim.AdamW` or :class:`bnrs.optim.SGD`.
    learning_rate : float, default 1e-3
        The optimizer's ``lr``.
    momentum : float, default 0.9
        SGD momentum (ignored by Adam and AdamW).
    weight_decay : float or None, default None
        L2 penalty added to the gradient (SGD, Adam) or decoupled weight decay (AdamW),
        applied to every parameter. None means the optimizer's own default, as in
        PyTorch: 0 for "adam" and "sgd", 0.01 for "adamw" (pass 0.0 for AdamW without
        decay, which is Adam).
    batch_size : int, default 64
        Samples per mini-batch, clipped to the number of training samples. A last batch
        of a single sample is merged into the one before (batch norm has no statistics
        for one value per channel).
    max_epochs : int, default 20
        Passes over the training data in one call to ``fit``.
    shuffle : bool, default True
        Draw a new order of the training samples for every epoch.
    early_stopping : bool, default False
        Hold out ``validation_fraction`` of the training data (stratified) and stop when
        its accuracy has not improved by ``tol`` for ``n_iter_no_change`` epochs; at the
        end the network of the epoch with the best validation accuracy is restored.
        When False, training stops when the training loss has not improved by ``tol``
        for ``n_iter_no_change`` epochs (as in MLPClassifier).
    validation_fraction : float, default 0.1
        Fraction of the training data held out with ``early_stopping``, in (0, 1).
    n_iter_no_change : int, default 10
        Epochs without an improvement of at least ``tol`` before training stops.
    tol : float, default 1e-4
        Minimum improvement of the training loss (or of the validation accuracy with
        ``early_stopping``) that counts.
    warm_start : bool, default False
        Continue from the network and optimizer of the previous ``fit`` (same
        architecture, sample shape and classes) instead of starting anew.
    random_state : int, numpy.random.Generator, numpy.random.RandomState or None
        Seeds one ``numpy.random.Generator`` that draws, in order, the initial weights
        and each dropout layer's seed (through :func:`bnrs.nn.from_spec`), the
        validation split and the order of every epoch. The same int gives bit-identical
        predictions at any thread count.
    n_threads : int, optional
        Kernel threads during ``fit`` and prediction, for this call's thread only (see
        :func:`bnrs.training.num_threads`: concurrent fits keep their own counts, and
        ``bnrs.get_num_threads()`` is unchanged); None uses the current setting.
    verbose : int or bool, default 0
        With 1 (or True) or more, print a line per epoch (loss, validation accuracy, seconds) to
        standard output.
    record_layer_stats : bool, default False
        Record every layer's weight-gradient norm and activation mean and standard
        deviation at initialisation (``layer_stats_init_``) and after every epoch
        (``history_[i]["layers"]``), measured on a fixed probe batch of the training data
        with :func:`bnrs.diagnostics.layer_statistics`. Recording does not change
        training: the fitted network is bit-identical with and without it.
    mc_samples : int, default 0
        With k > 0, ``predict_proba``, ``predict_log_proba``, ``predict`` and ``score``
        average the class probabilities of k passes with dropout on and batch norm in
        evaluation mode (Monte Carlo dropout), and :meth:`predict_uncertainty` gives
        their mean and standard deviation; 0 predicts in evaluation mode, as before.
        Training is the same whatever the value.
    augment_shift : int, default 0
        With k > 0, every training batch is translated at random by up to k pixels in
        each direction (zero padding by k, then a random crop, per sample, as
        torchvision's ``RandomCrop(size, padding=k)``); k must be smaller than the
        images' height and width. Images only: refused when the network takes
        vectors.
    augment_flip : bool, default False
        Mirror each training sample left to right with probability 1/2 (images only).
        Augmentation draws from the ``random_state`` stream, batch after batch, so it
        is reproducible at any thread count; prediction is not augmented.
    class_weight : dict, "balanced" or None, default None
        Weights of the classes in the loss, multiplying ``sample_weight``: a dict
        ``{label: weight}`` (finite, >= 0; classes not named weigh 1) or "balanced",
        ``n_samples / (n_classes * np.bincount(y))`` from the y of ``fit``
        (scikit-learn's meaning, refused by ``partial_fit``).
    lr_scheduler : {"step", "multistep", "cosine", "linear", "onecycle", "plateau"} or None
        A learning-rate schedule from :mod:`bnrs.optim.lr_scheduler` (PyTorch's), stepped
        after every epoch, except "onecycle" (``OneCycleLR``), stepped after every batch
        as PyTorch users run it. Its arguments are ``lr_scheduler_params`` over these
        defaults: "step" ``StepLR(step_size=max(1, max_epochs // 3))``, "multistep"
        ``MultiStepLR(milestones=[max_epochs // 2, 3 * max_epochs // 4])`` (each at
        least 1), "cosine" ``CosineAnnealingLR(T_max=max_epochs)``, "linear"
        ``LinearLR()`` (a 5-epoch warm-up from a third of ``learning_rate``), "onecycle"
        ``OneCycleLR(max_lr=learning_rate, total_steps=max_epochs * batches per epoch)``
        (it also cycles SGD's momentum or Adam's beta1 unless ``cycle_momentum=False``),
        "plateau" ``ReduceLROnPlateau`` on the validation loss with ``early_stopping``,
        else on the training loss (``monitor`` in lr_scheduler_params: "train_loss",
        "valid_loss" or "valid_score"; ``mode`` follows it). ``learning_rate`` is the
        base rate. Each ``fit`` (warm start too) starts a new schedule; ``partial_fit``
        goes on with the schedule of the previous call (one epoch per call; a "onecycle"
        cycle ends after ``max_epochs`` calls, then ValueError). None (the default):
        a constant rate. The rate of every epoch is ``history_[i]["lr"]``; the
        scheduler is ``lr_scheduler_``.
    lr_scheduler_params : dict or None, default None
        Keyword arguments of the scheduler, e.g. ``{"step_size": 5, "gamma": 0.5}``
        (ignored without ``lr_scheduler``). A bad argument raises a ValueError or
        TypeError starting "lr_scheduler_params:" and naming it.
    callbacks : list of callable or None, default None
        Called after every epoch, in order, with the epoch's record: a dict of
        ``epoch``, ``train_loss``, ``valid_loss`` and ``valid_score`` (with
        ``early_stopping``), ``lr``, ``seconds``, ``layers`` (with
        ``record_layer_stats``) and ``estimator`` (this estimator). A callback that
        returns True (any true value) stops training after that epoch (each callback
        still sees it); an exception raised by one propagates out of ``fit``. Ready
        ones are in :mod:`bnrs.callbacks` (:class:`bnrs.callbacks.Checkpoint` keeps the
        best network by a monitored quantity). ``clone`` copies them.
    early_stopping_monitor : {"valid_score", "valid_loss"}, default "valid_score"
        What ``early_stopping`` watches on the validation data: the score (accuracy,
        higher is better; as before this parameter existed) or the loss (lower is
        better), with ``tol`` and ``n_iter_no_change`` as for the score; the network of
        the best epoch by it is restored. Ignored without ``early_stopping``.
    weight_decay_exclude : {"norm_and_bias"} or None, default None
        "norm_and_bias" applies ``weight_decay`` to the weights of convolutions and
        dense layers only: the 1-D parameters (scales and shifts of the normalisation
        layers, every bias) go into a second parameter group with ``weight_decay=0``
        (PyTorch's ``[{"params": ...}, {"params": ..., "weight_decay": 0}]``). None:
        every parameter is decayed, as before this parameter existed.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        The class labels (sorted).
    n_features_in_ : int
        The length of the second axis of X in ``fit``, as scikit-learn counts features:
        the number of features of 2-D X, H of 3-D X, C of 4-D X.
    feature_names_in_ : ndarray of str
        The column names of X, when X was a DataFrame with string column names.
    input_shape_ : tuple of int
        The shape of one sample as the network sees it, (C, H, W) or (n_features,).
    data_format_ : {"channels_first", "channels_last"}
        The layout of X in ``fit``, which prediction takes too.
    model_ : bnrs.nn.Sequential
        The network, left in evaluation mode; ``model_.state_dict()`` has PyTorch's key
        names.
    optimizer_ : bnrs.optim.Optimizer
        The optimizer and its state (moments, momentum buffers).
    loss_ : float or None
        The training loss of the last epoch (None if no epoch finished).
    loss_curve_ : list of float
        The mean training loss of every epoch (in training mode: with dropout).
    best_loss_ : float or None
        The smallest training loss of the last ``fit``; None with ``early_stopping``.
    validation_scores_ : list of float or None
        The validation accuracy after every epoch with ``early_stopping``, else None.
    best_validation_score_ : float or None
        The best of ``validation_scores_`` in the last ``fit``, else None.
    n_iter_ : int
        Epochs run (accumulated over ``warm_start`` fits and ``partial_fit`` calls).
    best_validation_loss_ : float or None
        The smallest validation loss in the last ``fit`` with ``early_stopping``, else
        None.
    history_ : list of dict
        One dict per epoch: ``epoch`` (1-based, accumulated like ``n_iter_``),
        ``train_loss``, ``valid_loss`` and ``valid_score`` (with ``early_stopping``
        only; the loss is the training criterion on the validation data), ``lr`` (the
        learning rate the epoch started with), ``seconds``, and with
        ``record_layer_stats`` ``layers``: the network's per-layer statistics after the
        epoch (see the Notes).
    lr_scheduler_ : bnrs.optim.lr_scheduler.LRScheduler or None
        The scheduler of ``lr_scheduler`` on ``optimizer_``, as the last epoch left it.
    layer_stats_init_ : list of dict or None
        With ``record_layer_stats``, the per-layer statistics of the network before its
        first epoch (as ``history_[i]["layers"]``); None otherwise (or when the network
        was first trained without recording).

    See Also
    --------
    bnrs.nn.from_spec : builds the network from the architecture string.
    CNNRegressor : the same network and training for real-valued targets.
    sklearn.neural_network.MLPClassifier : whose parameter names this follows.

    Notes
    -----
    **The data-format rule.** With ``data_format="auto"``, 4-D X ``(n, a, b, c)`` is
    channels last when ``c`` is 1, 3 or 4 (grey, RGB, RGBA) and ``a`` is not, channels
    first when ``a`` is 1, 3 or 4 and ``c`` is not. When both are, as in ``(n, 3, 8,
    3)``, or neither is, as in ``(n, 16, 8, 8)`` (16-channel 8x8 maps, or 8-channel 16x8
    images?), a ValueError asks for ``data_format``: the layout is never guessed. An
    ``input_shape=(C, H, W)`` given decides instead when X's samples are ``(C, H, W)`` or
    ``(H, W, C)`` (and the two differ). 2-D X is read as rows of (C, H, W) values (of
    (H, W, C) values with ``data_format="channels_last"``), 3-D X as one channel.
    Channels-last X trains exactly the network channels-first X does (bit for bit);
    ``input_shape_`` is (C, H, W) in both cases.

    **The input-shape rule.** With ``input_shape`` given, every X (brought to channels
    first) is reshaped to ``(n_samples, *input_shape)``. Otherwise 4-D X ``(n, C, H, W)``
    (or ``(n, H, W, C)``, channels last) is used as is, 3-D X
    ``(n, H, W)`` becomes ``(n, 1, H, W)``, and 2-D X ``(n, d)`` depends on the
    architecture: if it can be built on vectors (only ``fc``, ``bn``, dropout and
    activations: a multilayer perceptron), each row is a vector of ``d`` features;
    if it cannot (it has a convolution, pooling or spatial-dropout token), ``d`` must
    be a perfect square and each row is a 1 x sqrt(d) x sqrt(d) image (the 64 columns
    of scikit-learn's digits become 8 x 8 images; otherwise a ValueError asks for
    ``input_shape``). An architecture that cannot be built for the resulting shape
    (e.g. pooling below 1 x 1) raises a ValueError naming the token. Prediction takes
    X of the layout seen in ``fit``.

    **Parameters and rejected calls.** Every parameter is checked against
    ``_parameter_constraints`` (type and range) at each ``fit`` and ``partial_fit``:
    TypeError for a wrong type (a flag must be a bool or NumPy bool, so ``"no"`` is
    refused rather than taken as true), ValueError for a value out of range, both naming
    the parameter. A call rejected before training starts (bad parameters, X or y)
    leaves a fitted estimator exactly as it was: everything is checked, and the new
    network and state built aside, before the first attribute is set.

    **Small batches.** Batch norm cannot normalise a single value per channel, so a
    last mini-batch of one sample is merged into the previous one, and when some
    batch-norm layer would see one value per channel (``BatchNorm1d``, or
    ``BatchNorm2d`` on a 1 x 1 map) a training set of one sample, or ``batch_size=1``,
    raises ValueError.

    **Ctrl-C.** A KeyboardInterrupt during ``fit`` or ``partial_fit`` stops training at
    once and restores the network, its batch-norm statistics and the optimizer to their
    state at the end of the last completed epoch (the initial state if none completed;
    with ``early_stopping``, the best epoch so far); then the KeyboardInterrupt
    propagates, as from Keras's ``fit``. Ctrl-C is a request to stop, so a grid search,
    pipeline, script or thread that called ``fit`` stops too, instead of going on with a
    model fitted on fewer epochs. The estimator stays fitted and usable (at the
    interactive prompt the model of the completed epochs is kept): ``predict`` works and
    the attributes describe the completed epochs only. Only the main thread sees Ctrl-C:
    a ``fit`` running in another thread is not interrupted by it.

    **Divergence.** When the training loss of a batch, or a parameter or batch-norm
    statistic after an epoch, is NaN or infinite, training stops, the state of the end
    of the last finite epoch is restored (with ``early_stopping``, that of the best epoch
    so far, as for Ctrl-C) and :class:`DivergenceError` (a RuntimeError) is raised,
    naming the epoch and batch and the epoch restored; lower ``learning_rate``.
    In a grid search, ``error_score`` then applies to that candidate.

    **Layer statistics.** With ``record_layer_stats=True``, before the first epoch and
    after every epoch the network is run on a probe batch of up to 128 training samples
    (evenly spaced through the training part of X, so no random number is drawn), in
    training mode (batch norm with the probe's batch statistics, as training sees it) but
    with dropout switched off. The probe's mean cross-entropy is back-propagated, and
    each layer that has a weight (Conv2d, Linear, batch norm) or is an activation gets a
    dict ``{"name", "kind", "weight_grad_norm", "activation_mean", "activation_std"}``
    (``name`` as in the ``model_.state_dict()`` keys, ``kind`` the class name;
    ``weight_grad_norm`` is None for activations). The parameter gradients, batch-norm
    running statistics, modes and dropout random streams are restored afterwards, so
    training is unchanged. :func:`bnrs.diagnostics.plot_layer_statistics` draws them;
    :func:`bnrs.diagnostics.layer_statistics` measures any network.

    **Reproducibility.** The same int ``random_state`` and data give bit-identical
    training and predictions at any ``n_threads``. Calls on the same X agree exactly, but
    a sample's probabilities may differ in the last float32 bits with the number of
    samples predicted together (the dense-layer kernel picks its code path by batch
    size): ``predict_proba(X[:1])`` and ``predict_proba(X)[:1]`` may differ by ~1e-8.

    Examples
    --------
    >>> import numpy as np
    >>> from bnrs import CNNClassifier
    >>> rng = np.random.default_rng(0)
    >>> X = rng.standard_normal((40, 1, 8, 8)).astype(np.float32)
    >>> y = np.where(X[:, 0, :4].mean(axis=(1, 2)) > 0, "top", "bottom")
    >>> clf = CNNClassifier("c8-bn-relu-mp2-fc16", max_epochs=5, random_state=0)
    >>> clf.fit(X, y).classes_
    array(['bottom', 'top'], dtype='<U6')
    >>> clf.predict_proba(X[:2]).shape
    (2, 2)
    """

    def __init__(self, architecture: str = DEFAULT_ARCHITECTURE, *, input_shape=None,
                 data_format: str = "auto", optimizer: str = "adam",
                 learning_rate: float = 1e-3, momentum: float = 0.9,
                 weight_decay: float | None = None, batch_size: int = 64,
                 max_epochs: int = 20, shuffle: bool = True, early_stopping: bool = False,
                 validation_fraction: float = 0.1, n_iter_no_change: int = 10,
                 tol: float = 1e-4, warm_start: bool = False, random_state=None,
                 n_threads: int | None = None, verbose: int = 0,
                 record_layer_stats: bool = False, mc_samples: int = 0,
                 augment_shift: int = 0, augment_flip: bool = False,
                 lr_scheduler: str | None = None, lr_scheduler_params: dict | None = None,
                 callbacks: list | None = None, early_stopping_monitor: str = "valid_score",
                 weight_decay_exclude: str | None = None, class_weight=None):
        super().__init__(
            architecture, input_shape=input_shape, data_format=data_format,
            optimizer=optimizer, learning_rate=learning_rate, momentum=momentum,
            weight_decay=weight_decay, batch_size=batch_size, max_epochs=max_epochs,
            shuffle=shuffle, early_stopping=early_stopping,
            validation_fraction=validation_fraction, n_iter_no_change=n_iter_no_change,
            tol=tol, warm_start=warm_start, random_state=random_state,
            n_threads=n_threads, verbose=verbose, record_layer_stats=record_layer_stats,
            mc_samples=mc_samples, augment_shift=augment_shift, augment_flip=augment_flip,
            lr_scheduler=lr_scheduler, lr_scheduler_params=lr_scheduler_params,
            callbacks=callbacks, early_stopping_monitor=early_stopping_monitor,
            weight_decay_exclude=weight_decay_exclude)
        self.class_weight = class_weight

    _parameter_constraints: ClassVar[dict[str, list[Constraint]]] = {
        **_BaseCNN._parameter_constraints,
        "class_weight": [NONE, Options({"balanced"}),
                         Instances(dict, description="a dict {class label: weight}")],
    }

    def __setstate__(self, state):
        state.setdefault("class_weight", None)
        super().__setstate__(state)

    def partial_fit(self, X, y, classes=None, sample_weight=None):
        """Train for one epoch over (X, y), continuing from the previous call if any.

        No validation data are held out (``early_stopping`` is ignored), and
        ``max_epochs`` and ``warm_start`` do not apply.

        Parameters
        ----------
        X : array-like of 4-D (channels first or last), 3-D or 2-D shape
        y : array-like of shape (n_samples,)
        classes : array-like of shape (n_classes,), optional
            Every class label that will ever be seen; required on the first call (when
            the estimator is not fitted), optional after (then it must be the same).
        sample_weight : array-like of shape (n_samples,) or float, optional
            As for :meth:`fit`. ``class_weight="balanced"`` is refused here (one call's
            y does not tell the class frequencies); pass a dict of weights instead.

        Returns
        -------
        self : CNNClassifier
        """
        self._validate_params()
        reset = not hasattr(self, "model_")
        if reset and classes is None:
            raise ValueError("classes must be passed on the first call to partial_fit")
        return self._fit(X, y, classes=classes, reset=reset, incremental=True,
                         sample_weight=sample_weight)

    _y_checks: ClassVar[dict] = {}

    def _check_targets(self, y: np.ndarray) -> None:
        check_classification_targets(y)

    def _new_targets(self, y: np.ndarray, classes) -> tuple[dict, np.ndarray, int]:
        all_classes = np.unique(y if classes is None else np.asarray(classes))
        if len(all_classes) < 2:
            raise ValueError(f"y has only one class ({all_classes[0]!r}); a classifier "
                             "needs at least 2 classes")
        return {"classes_": all_classes}, _encode(y, all_classes), len(all_classes)

    def _continued_targets(self, y: np.ndarray, classes, incremental: bool) -> np.ndarray:
        if incremental and classes is not None and not np.array_equal(
                np.unique(classes), self.classes_):
            raise ValueError(f"classes={np.unique(classes)!r} is not the same as on the "
                             f"first call to partial_fit, {self.classes_!r}")
        y_index = _encode(y, self.classes_)
        if not incremental and len(np.unique(y_index)) != len(self.classes_):
            raise ValueError(f"warm_start: y has the classes {np.unique(y)!r}, but the "
                             f"network was fitted for {self.classes_!r}; set "
                             "warm_start=False to fit anew")
        return y_index

    def _training_weights(self, targets: np.ndarray, sample_weight: np.ndarray | None,
                          incremental: bool, classes) -> np.ndarray | None:
        if self.class_weight is None:
            return sample_weight
        if isinstance(self.class_weight, str):   # "balanced", n / (n_classes * count)
            if incremental:
                raise ValueError(
                    "class_weight='balanced' is not supported by partial_fit (one call's y "
                    "does not give the class frequencies); pass a dict, e.g. from "
                    "sklearn.utils.class_weight.compute_class_weight('balanced', "
                    "classes=classes, y=y) on a sample of the training targets")
            present = np.unique(targets)
            per_class = np.ones(len(classes))
            per_class[present] = compute_class_weight("balanced", classes=present, y=targets)
        else:
            per_class = np.ones(len(classes))
            for label, weight in self.class_weight.items():
                where = np.flatnonzero(classes == label) if np.ndim(label) == 0 else []
                if len(where) == 0:
                    raise ValueError(f"class_weight: the key {label!r} is not a class; the "
                                     f"classes are {classes!r}")
                if isinstance(weight, (bool, np.bool_)) or not isinstance(
                        weight, (int, float, np.integer, np.floating)) or not (
                        math.isfinite(weight) and weight >= 0):
                    raise ValueError(f"class_weight: expected finite, non-negative weights, "
                                     f"got {weight!r} for class {label!r}")
                per_class[where[0]] = weight
        weight = per_class[targets]
        if sample_weight is not None:
            weight = weight * sample_weight
        if not weight.sum() > 0:
            raise ValueError("class_weight and sample_weight: every sample has weight 0")
        return weight

    def _criterion(self) -> nn.Module:
        return nn.CrossEntropyLoss()

    def _validation_score(self, outputs: np.ndarray, targets: np.ndarray,
                          sample_weight: np.ndarray | None = None) -> float:
        correct = np.argmax(outputs, axis=1) == targets
        if sample_weight is None or not sample_weight.sum() > 0:   # no weights to average by
            return float(np.mean(correct))
        return float(np.average(correct, weights=sample_weight))

    def _stratify(self, targets: np.ndarray) -> np.ndarray | None:
        return targets

    # ------------------------------------------------------------------ prediction

    def predict_log_proba(self, X) -> np.ndarray:
        """Log of the class probabilities (log-softmax of the logits, float64).

        With ``mc_samples`` > 0, the log of the mean of the passes' probabilities.

        Parameters
        ----------
        X : array-like, of the layout seen in ``fit``

        Returns
        -------
        ndarray of shape (n_samples, n_classes)
            Columns in the order of ``classes_``.
        """
        if self.mc_samples:
            with np.errstate(divide="ignore"):   # a probability may underflow to 0
                return np.log(self.predict_proba(X))
        return _log_softmax(self._predict_outputs(X))

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities (softmax of the logits, float64; rows sum to 1).

        With ``mc_samples`` > 0, the mean of the softmax probabilities of that many
        passes with dropout on (Monte Carlo dropout; see :meth:`predict_uncertainty`).

        Parameters
        ----------
        X : array-like, of the layout seen in ``fit``

        Returns
        -------
        ndarray of shape (n_samples, n_classes)
            Columns in the order of ``classes_``.
        """
        if self.mc_samples:
            return self._mc_passes(X).mean(axis=0)
        return np.exp(self.predict_log_proba(X))

    def predict_uncertainty(self, X) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation of the class probabilities over ``mc_samples``
        Monte Carlo dropout passes.

        Each pass runs the network with dropout on and everything else (batch norm
        with its running statistics) in evaluation mode. The dropout masks come from a
        seed fixed at the first ``fit`` (drawn from ``random_state`` without changing
        training's draws), so an int ``random_state`` gives the same result at every
        call and any ``n_threads``; the masks depend on how many samples are predicted
        together (chunks of up to 512), as the mask of a batch does.

        Parameters
        ----------
        X : array-like, of the layout seen in ``fit``

        Returns
        -------
        mean, std : ndarray of shape (n_samples, n_classes)
            float64; ``mean`` is :meth:`predict_proba`, ``std`` the spread (population
            standard deviation) of the passes. A network without dropout layers gives
            std 0.

        Raises
        ------
        ValueError
            When ``mc_samples`` is 0.
        """
        return self._uncertainty(X)

    def _mc_output(self, outputs: np.ndarray) -> np.ndarray:
        return np.exp(_log_softmax(outputs))

    def predict(self, X) -> np.ndarray:
        """The most probable class of each sample.

        Parameters
        ----------
        X : array-like, of the layout seen in ``fit``

        Returns
        -------
        ndarray of shape (n_samples,)
            Labels from ``classes_``.
        """
        scores = self.predict_proba(X) if self.mc_samples else self.predict_log_proba(X)
        return self.classes_[np.argmax(scores, axis=1)]


class CNNRegressor(RegressorMixin, _BaseCNN):
    """A convolutional network regressor with batch norm and dropout, trained on the CPU.

    The network is given as an architecture string, as for :class:`CNNClassifier`; the
    output layer, a linear ``fc<n_outputs>`` (no activation), is appended, and the loss
    is the mean squared error or the Huber loss (:class:`bnrs.nn.MSELoss`,
    :class:`bnrs.nn.HuberLoss`, PyTorch's). Targets of shape (n_samples,) give
    predictions of shape (n_samples,), targets of shape (n_samples, n_outputs)
    predictions of that shape. Training, prediction modes, the input-shape and
    data-format rules, ``partial_fit``, ``warm_start``, Ctrl-C, divergence, pickling,
    ``n_threads`` and ``random_state`` behave as for :class:`CNNClassifier` (see its
    Notes); ``score`` is the coefficient of determination R² (``RegressorMixin``).

    Parameters
    ----------
    architecture : str, default ``bnrs.nn.DEFAULT_ARCHITECTURE``
        The hidden layers (see :class:`CNNClassifier`); the empty string is a linear
        model.
    loss : {"squared_error", "huber"}, default "squared_error"
        The training loss, named as scikit-learn names them: the mean squared error
        (``nn.MSELoss``) or the Huber loss (``nn.HuberLoss(delta)``), quadratic within
        ``delta`` of the target and linear beyond, so outliers pull less.
    delta : float, default 1.0
        The Huber loss's threshold, as PyTorch's ``HuberLoss(delta=1.0)``, in the units
        of y; a finite number > 0, used only with ``loss="huber"``.
    input_shape : tuple of int, optional
        The shape of one sample as the network sees it, (C, H, W) or (n_features,).
    data_format : {"auto", "channels_first", "channels_last"}, default "auto"
        Where 4-D X holds the channels (see :class:`CNNClassifier`).
    optimizer : {"adam", "adamw", "sgd"}, default "adam"
    learning_rate : float, default 1e-3
    momentum : float, default 0.9
        SGD momentum.
    weight_decay : float or None, default None
        None: the optimizer's own default (0 for "adam" and "sgd", 0.01 for "adamw").
    batch_size : int, default 64
    max_epochs : int, default 20
    shuffle : bool, default True
    early_stopping : bool, default False
        Hold out ``validation_fraction`` of the training data (at random) and stop when
        its R² has not improved by ``tol`` for ``n_iter_no_change`` epochs, restoring
        the network of the best epoch (as ``MLPRegressor``, which also scores the
        validation part by R²). R² rather than the validation loss: it is what ``score``
        reports, and ``validation_scores_`` then means the same for both estimators
        (higher is better). When False, the training loss is monitored.
    validation_fraction : float, default 0.1
    n_iter_no_change : int, default 10
    tol : float, default 1e-4
    warm_start : bool, default False
        Continue from the network and optimizer of the previous ``fit`` (same
        architecture, sample shape and number of outputs).
    random_state : int, numpy.random.Generator, numpy.random.RandomState or None
        As for :class:`CNNClassifier`: the same int gives bit-identical predictions at
        any thread count.
    n_threads : int, optional
    verbose : int or bool, default 0
    record_layer_stats : bool, default False
        As for :class:`CNNClassifier`, with the training loss back-propagated.
    mc_samples : int, default 0
        With k > 0, ``predict`` (and ``score``) average k Monte Carlo dropout passes and
        :meth:`predict_uncertainty` gives their mean and standard deviation (see
        :class:`CNNClassifier`).
    augment_shift : int, default 0
    augment_flip : bool, default False
        Random translation and left-right mirroring of the training images, as for
        :class:`CNNClassifier`.
    lr_scheduler : {"step", "multistep", "cosine", "linear", "onecycle", "plateau"} or None
        As for :class:`CNNClassifier`.
    lr_scheduler_params : dict or None, default None
    callbacks : list of callable or None, default None
        As for :class:`CNNClassifier` (``valid_score`` is R²).
    early_stopping_monitor : {"valid_score", "valid_loss"}, default "valid_score"
        The validation R² or the validation loss (of ``loss``).
    weight_decay_exclude : {"norm_and_bias"} or None, default None

    Attributes
    ----------
    n_outputs_ : int
        The number of targets (columns of y; 1 for 1-D y).
    n_features_in_ : int
    feature_names_in_ : ndarray of str
    input_shape_ : tuple of int
        (C, H, W) or (n_features,), as the network sees a sample.
    data_format_ : {"channels_first", "channels_last"}
    model_ : bnrs.nn.Sequential
    optimizer_ : bnrs.optim.Optimizer
    loss_ : float or None
    loss_curve_ : list of float
    best_loss_ : float or None
    validation_scores_ : list of float or None
        The validation R² after every epoch with ``early_stopping``, else None.
    best_validation_score_ : float or None
    best_validation_loss_ : float or None
    n_iter_ : int
    history_ : list of dict
    lr_scheduler_ : bnrs.optim.lr_scheduler.LRScheduler or None
    layer_stats_init_ : list of dict or None

    See Also
    --------
    CNNClassifier : the classifier, whose attributes these are.
    sklearn.neural_network.MLPRegressor : whose parameter names this follows.

    Notes
    -----
    Targets are trained on in float32, as the network computes; predictions are
    float64. Targets far from unit scale train slowly (as with ``MLPRegressor``):
    standardise y, e.g. with ``sklearn.compose.TransformedTargetRegressor``.

    Examples
    --------
    >>> import numpy as np
    >>> from bnrs import CNNRegressor
    >>> rng = np.random.default_rng(0)
    >>> X = rng.standard_normal((64, 1, 8, 8)).astype(np.float32)
    >>> y = X[:, 0, :4].mean(axis=(1, 2))
    >>> reg = CNNRegressor("c8-bn-relu-mp2-fc16", max_epochs=5, random_state=0)
    >>> reg.fit(X, y).predict(X[:3]).shape
    (3,)
    >>> reg.n_outputs_
    1
    """

    def __init__(self, architecture: str = DEFAULT_ARCHITECTURE, *,
                 loss: str = "squared_error", delta: float = 1.0, input_shape=None,
                 data_format: str = "auto", optimizer: str = "adam",
                 learning_rate: float = 1e-3, momentum: float = 0.9,
                 weight_decay: float | None = None, batch_size: int = 64,
                 max_epochs: int = 20, shuffle: bool = True, early_stopping: bool = False,
                 validation_fraction: float = 0.1, n_iter_no_change: int = 10,
                 tol: float = 1e-4, warm_start: bool = False, random_state=None,
                 n_threads: int | None = None, verbose: int = 0,
                 record_layer_stats: bool = False, mc_samples: int = 0,
                 augment_shift: int = 0, augment_flip: bool = False,
                 lr_scheduler: str | None = None, lr_scheduler_params: dict | None = None,
                 callbacks: list | None = None, early_stopping_monitor: str = "valid_score",
                 weight_decay_exclude: str | None = None):
        super().__init__(
            architecture, input_shape=input_shape, data_format=data_format,
            optimizer=optimizer, learning_rate=learning_rate, momentum=momentum,
            weight_decay=weight_decay, batch_size=batch_size, max_epochs=max_epochs,
            shuffle=shuffle, early_stopping=early_stopping,
            validation_fraction=validation_fraction, n_iter_no_change=n_iter_no_change,
            tol=tol, warm_start=warm_start, random_state=random_state,
            n_threads=n_threads, verbose=verbose, record_layer_stats=record_layer_stats,
            mc_samples=mc_samples, augment_shift=augment_shift, augment_flip=augment_flip,
            lr_scheduler=lr_scheduler, lr_scheduler_params=lr_scheduler_params,
            callbacks=callbacks, early_stopping_monitor=early_stopping_monitor,
            weight_decay_exclude=weight_decay_exclude)
        self.loss = loss
        self.delta = delta

    _parameter_constraints: ClassVar[dict[str, list[Constraint]]] = {
        **_BaseCNN._parameter_constraints,
        "loss": [Options(_REGRESSION_LOSSES)],
        "delta": [Interval("real", 0.0, None, closed="neither")],
    }

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    def partial_fit(self, X, y, sample_weight=None):
        """Train for one epoch over (X, y), continuing from the previous call if any.

        No validation data are held out (``early_stopping`` is ignored), and
        ``max_epochs`` and ``warm_start`` do not apply.

        Parameters
        ----------
        X : array-like of 4-D (channels first or last), 3-D or 2-D shape
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)
            As many outputs as on the first call.
        sample_weight : array-like of shape (n_samples,) or float, optional
            As for :meth:`fit`.

        Returns
        -------
        self : CNNRegressor
        """
        self._validate_params()
        return self._fit(X, y, classes=None, reset=not hasattr(self, "model_"),
                         incremental=True, sample_weight=sample_weight)

    # ------------------------------------------------------------------ the targets

    _y_checks: ClassVar[dict] = {"multi_output": True, "y_numeric": True}

    def _check_targets(self, y: np.ndarray) -> None:
        if y.ndim not in (1, 2) or (y.ndim == 2 and y.shape[1] < 1):
            raise ValueError(f"y: expected shape (n_samples,) or (n_samples, n_outputs), "
                             f"got {y.shape}")

    @staticmethod
    def _as_targets(y: np.ndarray) -> np.ndarray:
        """y as the loss takes it: float32 (n_samples, n_outputs)."""
        return np.ascontiguousarray(y, dtype=np.float32).reshape(len(y), -1)

    def _new_targets(self, y: np.ndarray, classes) -> tuple[dict, np.ndarray, int]:
        targets = self._as_targets(y)
        return ({"n_outputs_": targets.shape[1], "_y_ndim": y.ndim}, targets,
                targets.shape[1])

    def _continued_targets(self, y: np.ndarray, classes, incremental: bool) -> np.ndarray:
        targets = self._as_targets(y)
        if targets.shape[1] != self.n_outputs_ or y.ndim != self._y_ndim:
            raise ValueError(f"y has shape {y.shape}, but the network was fitted on y of "
                             f"{self._y_ndim} dimension(s) with {self.n_outputs_} "
                             "output(s); set warm_start=False (or fit anew) to change them")
        return targets

    def _criterion(self) -> nn.Module:
        return nn.HuberLoss(self.delta) if self.loss == "huber" else nn.MSELoss()

    def _validation_score(self, outputs: np.ndarray, targets: np.ndarray,
                          sample_weight: np.ndarray | None = None) -> float:
        if sample_weight is not None and not sample_weight.sum() > 0:
            sample_weight = None   # no weights to average by
        return float(r2_score(targets.astype(np.float64), outputs.astype(np.float64),
                              sample_weight=sample_weight))

    def _stratify(self, targets: np.ndarray) -> np.ndarray | None:
        return None

    # ------------------------------------------------------------------ prediction

    def predict(self, X) -> np.ndarray:
        """The network's outputs for X, in evaluation mode.

        Parameters
        ----------
        X : array-like, of the layout seen in ``fit``

        Returns
        -------
        ndarray of float64, of shape (n_samples,) or (n_samples, n_outputs)
            1-D when y was 1-D in ``fit``.
        """
        if self.mc_samples:
            return self._as_predictions(self._mc_passes(X).mean(axis=0))
        return self._as_predictions(self._predict_outputs(X).astype(np.float64))

    def predict_uncertainty(self, X) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation of the outputs over ``mc_samples`` Monte Carlo
        dropout passes (see :meth:`CNNClassifier.predict_uncertainty`).

        Parameters
        ----------
        X : array-like, of the layout seen in ``fit``

        Returns
        -------
        mean, std : ndarray of float64, of shape (n_samples,) or (n_samples, n_outputs)
            ``mean`` is :meth:`predict`, ``std`` the spread of the passes (in the units
            of y).

        Raises
        ------
        ValueError
            When ``mc_samples`` is 0.
        """
        mean, std = self._uncertainty(X)
        return self._as_predictions(mean), self._as_predictions(std)

    def _mc_output(self, outputs: np.ndarray) -> np.ndarray:
        return outputs.astype(np.float64)

    def _as_predictions(self, outputs: np.ndarray) -> np.ndarray:
        """(n_samples, n_outputs) outputs in the shape of y in fit."""
        return outputs.ravel() if self._y_ndim == 1 else outputs
