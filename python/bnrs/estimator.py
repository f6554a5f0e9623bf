"""scikit-learn estimators over :mod:`bnrs.nn`: :class:`CNNClassifier`.

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
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.model_selection import train_test_split
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted

from . import nn, optim
from ._validation import (NONE, Boolean, Constraint, Instances, Interval, IntTuple,
                          Options, check_params)
from .diagnostics import layer_statistics, probe_indices
from .nn.module import as_generator
from .nn.spec import DEFAULT_ARCHITECTURE, SpecError, from_spec, parse
from .training import batch_bounds, eval_logits, num_threads, train_epoch

try:
    from sklearn.utils.validation import validate_data
except ImportError:  # scikit-learn < 1.6 has the method instead of the function

    def validate_data(estimator, X="no_validation", y="no_validation", **kwargs):
        return estimator._validate_data(X, y, **kwargs)


__all__ = ["CNNClassifier", "DivergenceError", "FitInterruptedWarning"]

_OPTIMIZERS = {"adam": optim.Adam, "adamw": optim.AdamW, "sgd": optim.SGD}
#: The weight decay of ``weight_decay=None``: each optimizer's own default (PyTorch's).
_DEFAULT_WEIGHT_DECAY = {"adam": 0.0, "adamw": 1e-2, "sgd": 0.0}
#: Samples per forward pass in prediction (bounds the memory of the im2col buffers).
_PREDICT_CHUNK = 512


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
    """Whether some batch-norm layer would see a single value per channel for one sample."""
    shape = tuple(input_shape)
    for layer in model:
        if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)) and math.prod(shape[1:]) == 1:
            return True
        shape = layer.output_shape(shape)
    return False


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


class CNNClassifier(ClassifierMixin, BaseEstimator):
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
        ``relu``/``lrelu``/``sigmoid``/``tanh``, ``mp<k>``/``ap<k>`` (pooling),
        ``d<p>``/``sd<p>`` (dropout, spatial dropout), ``fc<units>``. The empty string
        is a linear (softmax regression) model.
    input_shape : tuple of int, optional
        The shape of one sample as the network sees it, (C, H, W) or (n_features,);
        X is reshaped to ``(n_samples, *input_shape)`` and must have that many values
        per sample. When None it is inferred from X (see Notes).
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
    history_ : list of dict
        One dict per epoch: ``epoch`` (1-based, accumulated like ``n_iter_``),
        ``train_loss``, ``valid_score`` (with ``early_stopping`` only), ``seconds``, and
        with ``record_layer_stats`` ``layers``: the network's per-layer statistics after
        the epoch (see the Notes).
    layer_stats_init_ : list of dict or None
        With ``record_layer_stats``, the per-layer statistics of the network before its
        first epoch (as ``history_[i]["layers"]``); None otherwise (or when the network
        was first trained without recording).

    See Also
    --------
    bnrs.nn.from_spec : builds the network from the architecture string.
    sklearn.neural_network.MLPClassifier : whose parameter names this follows.

    Notes
    -----
    **The input-shape rule.** With ``input_shape`` given, every X is reshaped to
    ``(n_samples, *input_shape)``. Otherwise 4-D X ``(n, C, H, W)`` is used as is, 3-D X
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
    of the last finite epoch is restored (as for Ctrl-C) and :class:`DivergenceError`
    (a RuntimeError) is raised, naming the epoch and batch; lower ``learning_rate``.
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
                 optimizer: str = "adam", learning_rate: float = 1e-3,
                 momentum: float = 0.9, weight_decay: float | None = None,
                 batch_size: int = 64,
                 max_epochs: int = 20, shuffle: bool = True, early_stopping: bool = False,
                 validation_fraction: float = 0.1, n_iter_no_change: int = 10,
                 tol: float = 1e-4, warm_start: bool = False, random_state=None,
                 n_threads: int | None = None, verbose: int = 0,
                 record_layer_stats: bool = False):
        self.architecture = architecture
        self.input_shape = input_shape
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

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.three_d_array = True
        return tags

    # ------------------------------------------------------------------ fitting

    def fit(self, X, y):
        """Train the network on (X, y) for up to ``max_epochs`` epochs.

        Parameters
        ----------
        X : array-like of shape (n_samples, C, H, W), (n_samples, H, W) or (n_samples, d)
            Training samples; see the input-shape rule in the class Notes.
        y : array-like of shape (n_samples,)
            Class labels (ints, strings, ...), at least two distinct ones.

        Returns
        -------
        self : CNNClassifier
        """
        self._validate_params()
        reset = not (self.warm_start and hasattr(self, "model_"))
        return self._fit(X, y, classes=None, reset=reset, incremental=False)

    def partial_fit(self, X, y, classes=None):
        """Train for one epoch over (X, y), continuing from the previous call if any.

        No validation data are held out (``early_stopping`` is ignored), and
        ``max_epochs`` and ``warm_start`` do not apply.

        Parameters
        ----------
        X : array-like of shape (n_samples, C, H, W), (n_samples, H, W) or (n_samples, d)
        y : array-like of shape (n_samples,)
        classes : array-like of shape (n_classes,), optional
            Every class label that will ever be seen; required on the first call (when
            the estimator is not fitted), optional after (then it must be the same).

        Returns
        -------
        self : CNNClassifier
        """
        self._validate_params()
        reset = not hasattr(self, "model_")
        if reset and classes is None:
            raise ValueError("classes must be passed on the first call to partial_fit")
        return self._fit(X, y, classes=classes, reset=reset, incremental=True)

    def _fit(self, X, y, *, classes, reset: bool, incremental: bool):
        # Every check runs, and the new state is built aside, before the first attribute
        # is set: a call that is rejected leaves a fitted estimator exactly as it was.
        with num_threads(self.n_threads):
            # validate_data(reset=True) records n_features_in_ on the estimator it is
            # given, so a new fit validates on an unfitted copy.
            checked = clone(self) if reset else self
            X, y = validate_data(checked, X, y, reset=reset, allow_nd=True,
                                 dtype=np.float32, order="C")
            check_classification_targets(y)
            if X.ndim > 4:
                raise ValueError(f"X: expected a 2-D, 3-D or 4-D array, got shape {X.shape}")
            validate = self.early_stopping and not incremental
            # train_test_split's rule for the size of the validation part
            n_train = len(X) - (math.ceil(self.validation_fraction * len(X)) if validate
                                else 0)
            if reset:
                state, y_index = self._new_state(X, y, classes, n_train)
                for name in ("n_features_in_", "feature_names_in_"):
                    state[name] = getattr(checked, name, None)
            else:
                state, y_index = self._continued_state(X, y, classes, incremental, n_train)
            X = X.reshape((len(X),) + (state["input_shape_"] if reset
                                       else self.input_shape_))
            valid = None
            if validate:
                seed = int(state["_rng"].integers(0, 2**32))
                X, X_valid, y_index, y_valid = train_test_split(
                    X, y_index, test_size=self.validation_fraction, stratify=y_index,
                    random_state=seed)
                valid = (X_valid, y_valid)
            for name, value in state.items():
                if value is None and name == "feature_names_in_":
                    if hasattr(self, name):   # X without column names this time
                        del self.feature_names_in_
                else:
                    setattr(self, name, value)
            if not reset:   # e.g. a lower learning rate for the optimizer kept
                for group in self.optimizer_.param_groups:
                    group.update(self._optimizer_kwargs())
            self._train(X, y_index, 1 if incremental else self.max_epochs, valid)
        return self

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "model_")

    #: The hyper-parameters' types and ranges, checked at every fit and partial_fit (in
    #: the style of scikit-learn's ``_parameter_constraints``); ``architecture``'s
    #: grammar is checked by :func:`bnrs.nn.spec.parse` besides.
    _parameter_constraints: ClassVar[dict[str, list[Constraint]]] = {
        "architecture": [Instances(str, description="an architecture string")],
        "input_shape": [NONE, IntTuple((1, 3), 1, "(C, H, W) or (n_features,) of "
                                                  "positive ints")],
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
    }

    def _validate_params(self) -> None:
        """Check every hyper-parameter against ``_parameter_constraints``.

        ``__init__`` only stores them. A wrong type raises TypeError, a wrong value
        ValueError, naming the parameter.
        """
        check_params(self._parameter_constraints, self.get_params(deep=False))
        parse(self.architecture)

    def _new_state(self, X: np.ndarray, y: np.ndarray, classes,
                   n_train: int) -> tuple[dict, np.ndarray]:
        """The attributes of a new fit: classes_, input_shape_, network, optimizer, history.

        Only checks and builds; the caller sets them. Returns them by name, and y as
        class indices.
        """
        all_classes = np.unique(y if classes is None else np.asarray(classes))
        if len(all_classes) < 2:
            raise ValueError(f"y has only one class ({all_classes[0]!r}); a classifier "
                             "needs at least 2 classes")
        y_index = _encode(y, all_classes)
        input_shape = self._infer_input_shape(X.shape)
        rng = as_generator(self.random_state)
        try:
            model = from_spec(self.architecture, input_shape, len(all_classes),
                              random_state=rng)
        except SpecError as error:
            raise ValueError(f"cannot build the architecture for samples of shape "
                             f"{input_shape} (from X of shape {X.shape}; see the "
                             f"input-shape rule of CNNClassifier): {error}") from error
        min_batch = 2 if _needs_two_samples(model, input_shape) else 1
        self._check_batch_size(min_batch, n_train)
        state = {"classes_": all_classes, "input_shape_": input_shape, "model_": model,
                 "_x_sample_shape": X.shape[1:], "_rng": rng, "_min_batch": min_batch,
                 "_fit_architecture": self.architecture,
                 "optimizer_": self._new_optimizer(model),
                 "loss_": None, "best_loss_": None, "loss_curve_": [], "history_": [],
                 "n_iter_": 0, "validation_scores_": None, "best_validation_score_": None,
                 "layer_stats_init_": None}
        return state, y_index

    def _check_batch_size(self, min_batch: int, n_train: int) -> None:
        if n_train < min_batch or self.batch_size < min_batch:
            raise ValueError(
                f"batch norm in architecture {self.architecture!r} needs at least 2 "
                f"samples per mini-batch; got {n_train} training sample(s) and "
                f"batch_size={self.batch_size}")

    def _infer_input_shape(self, x_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The network's sample shape for X of ``x_shape`` (the class Notes' rule)."""
        sample = tuple(x_shape[1:])
        if self.input_shape is not None:
            given = tuple(int(d) for d in self.input_shape)
            if math.prod(given) != math.prod(sample):
                raise ValueError(f"input_shape={given} has {math.prod(given)} values per "
                                 f"sample, but X of shape {x_shape} has "
                                 f"{math.prod(sample)}")
            return given
        if len(sample) == 3:
            return sample
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
        optimizer, a new one if ``optimizer`` changed) and y as class indices; changes
        nothing itself.
        """
        if incremental and classes is not None and not np.array_equal(
                np.unique(classes), self.classes_):
            raise ValueError(f"classes={np.unique(classes)!r} is not the same as on the "
                             f"first call to partial_fit, {self.classes_!r}")
        y_index = _encode(y, self.classes_)
        if not incremental and len(np.unique(y_index)) != len(self.classes_):
            raise ValueError(f"warm_start: y has the classes {np.unique(y)!r}, but the "
                             f"network was fitted for {self.classes_!r}; set "
                             "warm_start=False to fit anew")
        if self.architecture != self._fit_architecture:
            raise ValueError(f"the architecture changed from {self._fit_architecture!r} "
                             f"to {self.architecture!r} since the network was built; set "
                             "warm_start=False (or fit anew) to build a new network")
        if X.shape[1:] != self._x_sample_shape:
            raise ValueError(f"X has samples of shape {X.shape[1:]}, but "
                             f"{type(self).__name__} was fitted on samples of shape "
                             f"{self._x_sample_shape}")
        self._check_batch_size(self._min_batch, n_train)
        # The kept optimizer gets the current hyper-parameters when the call is accepted.
        optimizer = (self.optimizer_ if type(self.optimizer_) is _OPTIMIZERS[self.optimizer]
                     else self._new_optimizer(self.model_))
        # A copy of the stream: drawing the validation split must not advance the
        # estimator's own before the call is accepted.
        return {"_rng": copy.deepcopy(self._rng), "optimizer_": optimizer}, y_index

    def _optimizer_kwargs(self) -> dict:
        weight_decay = (_DEFAULT_WEIGHT_DECAY[self.optimizer] if self.weight_decay is None
                        else self.weight_decay)
        kwargs = {"lr": float(self.learning_rate), "weight_decay": float(weight_decay)}
        if self.optimizer == "sgd":
            kwargs["momentum"] = float(self.momentum)
        return kwargs

    def _new_optimizer(self, model: nn.Sequential) -> optim.Optimizer:
        return _OPTIMIZERS[self.optimizer](model.parameters(), **self._optimizer_kwargs())

    def _network_input(self, X: np.ndarray) -> np.ndarray:
        """Reshape validated X to (n, *input_shape_); its layout must be that of fit."""
        if X.shape[1:] != self._x_sample_shape:
            raise ValueError(f"X has samples of shape {X.shape[1:]}, but "
                             f"{type(self).__name__} was fitted on samples of shape "
                             f"{self._x_sample_shape}")
        return X.reshape((len(X),) + self.input_shape_)

    # ------------------------------------------------------------------ training loop

    def _train(self, X: np.ndarray, y: np.ndarray, n_epochs: int, valid) -> None:
        """Run up to ``n_epochs`` epochs, validating on ``valid`` (X, y) if given."""
        validate = valid is not None
        if validate and self.validation_scores_ is None:
            self.validation_scores_ = []
        bounds = batch_bounds(len(X), self.batch_size, last="merge_single")
        probe = None
        if self.record_layer_stats:
            index = probe_indices(len(X))
            probe = (X[index], y[index])
            if self.n_iter_ == 0:
                self.layer_stats_init_ = layer_statistics(self.model_, *probe)
        self.best_loss_ = self.best_validation_score_ = None
        best_state, epochs_without_improvement = None, 0
        completed = self._snapshot()
        try:
            for _ in range(n_epochs):
                epoch, start = self.n_iter_ + 1, time.perf_counter()
                try:
                    loss, score, state = self._run_epoch(X, y, bounds, valid)
                    seconds = time.perf_counter() - start   # the probe is not training
                    layers = None if probe is None else layer_statistics(self.model_,
                                                                         *probe)
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
                    raise DivergenceError(
                        f"training diverged in epoch {epoch} (batch {diverged.batch} of "
                        f"{diverged.n_batches}): {what}; the network was restored to its "
                        f"state after epoch {self.n_iter_}. Lower learning_rate (now "
                        f"{self.learning_rate})") from None
                completed = (state, self.optimizer_.state_dict())
                self._record(epoch, loss, score, seconds, layers)
                improved, is_best = self._track_best(loss, score)
                if is_best and validate:
                    best_state = state
                epochs_without_improvement = 0 if improved else epochs_without_improvement + 1
                if epochs_without_improvement >= self.n_iter_no_change:
                    if self.verbose:
                        monitored = "validation score" if validate else "training loss"
                        print(f"stopping: the {monitored} did not improve by tol={self.tol}"
                              f" for {self.n_iter_no_change} epochs", flush=True)
                    break
        finally:
            if best_state is not None:
                self.model_.load_state_dict(best_state)
            self.model_.clear_saved()
            self.model_.eval()

    def _run_epoch(self, X: np.ndarray, y: np.ndarray, bounds, valid):
        """One pass of mini-batch training, then the validation accuracy if ``valid``.

        Returns the mean training loss, the validation accuracy (or None) and the
        network's state dict; raises _Diverged for a non-finite loss or state.
        """
        order = self._rng.permutation(len(X)) if self.shuffle else None
        losses = train_epoch(self.model_, nn.CrossEntropyLoss(), self.optimizer_, X, y,
                             bounds, order)
        if not math.isfinite(losses[-1]):
            raise _Diverged(len(losses), len(bounds), losses[-1])
        total = 0.0
        for loss, (start, stop) in zip(losses, bounds):   # in order (same bits as ever)
            total += loss * (stop - start)
        loss = total / len(X)
        state = self.model_.state_dict()
        if not _all_finite(state):
            raise _Diverged(len(bounds), len(bounds), loss)
        score = None
        if valid is not None:
            X_valid, y_valid = valid
            score = float(np.mean(np.argmax(self._logits(X_valid), axis=1) == y_valid))
        return loss, score, state

    def _track_best(self, loss: float, score: float | None) -> tuple[bool, bool]:
        """Update best_loss_ or best_validation_score_ (when ``score`` is given).

        Returns whether the epoch improved on the best by more than ``tol``, and whether
        it is the new best.
        """
        if score is not None:
            best = self.best_validation_score_
            if best is None or score > best:
                self.best_validation_score_ = score
            return best is None or score > best + self.tol, best is None or score > best
        best = self.best_loss_
        if best is None or loss < best:
            self.best_loss_ = loss
        return best is None or loss < best - self.tol, best is None or loss < best

    def _snapshot(self) -> tuple[dict, dict]:
        return self.model_.state_dict(), self.optimizer_.state_dict()

    def _restore(self, snapshot: tuple[dict, dict]) -> None:
        model_state, optimizer_state = snapshot
        self.model_.clear_saved()
        self.model_.load_state_dict(model_state)
        self.optimizer_.load_state_dict(optimizer_state)

    def _record(self, epoch: int, loss: float, score: float | None, seconds: float,
                layers: list | None = None) -> None:
        self.n_iter_ = epoch
        self.loss_ = loss
        self.loss_curve_.append(loss)
        entry = {"epoch": epoch, "train_loss": loss}
        if score is not None:
            self.validation_scores_.append(score)
            entry["valid_score"] = score
        entry["seconds"] = seconds
        if layers is not None:
            entry["layers"] = layers
        self.history_.append(entry)
        if self.verbose:
            valid = "" if score is None else f"  valid_score {score:.4f}"
            print(f"epoch {epoch:>3}  train_loss {loss:.4f}{valid}  {seconds:.2f} s",
                  file=sys.stdout, flush=True)

    # ------------------------------------------------------------------ prediction

    def _logits(self, X: np.ndarray) -> np.ndarray:
        """Logits of network-shaped X in evaluation mode, in chunks."""
        return np.concatenate(list(eval_logits(self.model_, X, _PREDICT_CHUNK)))

    def predict_log_proba(self, X) -> np.ndarray:
        """Log of the class probabilities (log-softmax of the logits, float64).

        Parameters
        ----------
        X : array-like, of the layout seen in ``fit``

        Returns
        -------
        ndarray of shape (n_samples, n_classes)
            Columns in the order of ``classes_``.
        """
        check_is_fitted(self)
        with num_threads(self.n_threads):
            X = validate_data(self, X, reset=False, allow_nd=True, dtype=np.float32,
                              order="C")
            logits = self._logits(self._network_input(X))
        return _log_softmax(logits)

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities (softmax of the logits, float64; rows sum to 1).

        Parameters
        ----------
        X : array-like, of the layout seen in ``fit``

        Returns
        -------
        ndarray of shape (n_samples, n_classes)
            Columns in the order of ``classes_``.
        """
        return np.exp(self.predict_log_proba(X))

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
        log_proba = self.predict_log_proba(X)
        return self.classes_[np.argmax(log_proba, axis=1)]
