"""One run of the study: train one network with one seed and measure it after every epoch.

The study trains with its own short loop over :mod:`bnrs.nn` and :mod:`bnrs.optim` (the
pieces :class:`bnrs.CNNClassifier` is built from) rather than through the estimator,
because a paired comparison needs what the estimator does not expose:

* separate random streams per seed for the initial weights, the data order and the
  dropout masks, so that two variants with the same seed start from the *same* weights
  wherever their layer shapes agree (adding BN or dropout layers does not shift the
  initialisation of the others) and see the *same* sequence of mini-batches;
* a hook between building and training (the initial weight scale of question 8);
* an evaluation after every epoch on the validation split, a test sample and a training
  sample, and a snapshot of the network at the best validation epoch;
* a diverged run recorded with its curves instead of an exception.

Protocol of a run (``PROTOCOL`` is part of every run's key, so changing it re-runs):

1. Data: the dataset's training set is split once (seed 0) into a stratified validation
   set of ``n_val`` images and the training pool (the rest); each seed draws its own
   stratified training subset of ``n_train`` images from the pool, in its own order,
   from the seed's subset stream (:func:`bnrs.datasets.split_indices`), so that the
   intervals over seeds include which images were drawn. Within a seed every variant
   with the same ``n_train`` trains on the same subset; the validation set and the test
   set (the dataset's own, complete) are the same for every run.
2. Network: ``bnrs.nn.from_spec(architecture)``; its conv and dense weights and biases are
   then replaced by those of ``from_spec(architecture without dropout tokens)`` built from
   the seed's initialisation stream (``init="default"``: PyTorch's default uniform
   initialisation, U(±1/sqrt(fan_in)), which bnrs layers use; ``init="he"``: He's
   normal initialisation for ReLU, N(0, 2/fan_in) weights and zero biases, drawn in
   layer order from a child of the same stream), and the weights (not the biases) multiplied by
   ``init_scale``.
3. Training: ``epochs`` passes; every epoch a permutation from the seed's data-order
   stream, cut into batches of ``batch_size`` (an incomplete last batch is dropped, as
   ``DataLoader(drop_last=True)``: every step sees exactly ``batch_size`` images, which
   batch norm at batch size 2 needs). Cross-entropy loss, Adam (or SGD with momentum 0.9).
4. After every epoch, in evaluation mode: accuracy and loss on the validation set, on a
   fixed test sample (``n_test_curve`` images, for the curves) and on a fixed training
   sample (``n_train_eval`` images, for train accuracy and loss), plus the mean training
   loss of the epoch's mini-batches (training mode, with dropout), the epoch's training
   seconds and the optimizer steps so far. Also, at initialisation and
   after every epoch, each layer's weight-gradient norm and activation mean and std on a
   probe of 128 training images (:func:`bnrs.diagnostics.run_recorder`; it changes
   nothing in training), in ``curves["layers"]``.
5. Summary, chosen before looking at any test number: the network of the epoch with the
   best validation accuracy (the earliest on ties) is evaluated on the *full* test set:
   ``test_acc``. ``gap`` is that epoch's training-sample accuracy minus ``test_acc``.
   ``final_train_loss`` is the last epoch's mean mini-batch loss. ``epochs_to_target``,
   ``steps_to_target`` and ``seconds_to_target`` are the first epoch whose validation
   accuracy reaches the target, the optimizer steps and the training seconds
   (evaluation excluded) until then: None when it never does (``target_reached``
   False), a run *censored* at ``steps_run`` steps, which a time-to-target comparison
   must count rather than leave out (validation is measured once per epoch, so steps
   are known to an epoch's steps). ``seconds_per_epoch`` is the mean training seconds
   of an epoch. ``val_loss_min_epoch`` is the epoch of the lowest validation loss, and
   ``val_loss_rise`` the last epoch's validation loss minus that lowest one (> 0: the
   validation loss rose again, the mark of overfitting).
6. Divergence: a non-finite training loss stops the run; a run whose best validation
   accuracy is within 5 points of chance also counts as diverged (it did not train).
   ``diverged`` (bool) and ``diverged_reason`` say so in the metrics.
7. MC dropout (``mc_samples`` > 0, a network with dropout): on the network of the best
   validation epoch, the full test set's accuracy of the mean softmax of
   ``mc_samples`` stochastic passes, dropout in training mode (masks from the seed's
   MC stream, so the same seed gives the same passes) and batch norm and everything
   else in evaluation mode: ``mc_test_acc``, and ``mc_gain`` = ``mc_test_acc`` minus
   ``test_acc`` (the deterministic pass on the same weights).
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import asdict, dataclass

import numpy as np

from .. import datasets as bnrs_datasets
from .. import diagnostics, nn, optim
from .. import functional as F
from ..training import batch_bounds, eval_logits, num_threads, train_epoch

__all__ = ["PROTOCOL", "RunConfig", "load_split", "train_run"]

#: Bump when the training or measuring protocol changes: every run's key includes it.
PROTOCOL = 2
#: Evaluation batch size (evaluation mode; only memory depends on it).
_EVAL_BATCH = 500
#: A best validation accuracy below chance + this counts as a run that did not train.
_CHANCE_MARGIN = 0.05


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a run except the seed (the seed is stored beside it).

    Two questions that need the same configuration share its runs.
    """

    dataset: str            # what load_dataset takes: "digits", "fashion-mnist", a path
    data_fingerprint: str   # Dataset.fingerprint: the same name with other data differs
    n_train: int
    n_val: int
    architecture: str
    optimizer: str = "adam"
    lr: float = 1e-3
    batch_size: int = 64
    epochs: int = 10
    init_scale: float = 1.0
    init: str = "default"
    weight_decay: float = 0.0
    n_train_eval: int = 2000
    n_test_curve: int = 2000
    target_accuracy: float | None = None
    mc_samples: int = 0
    protocol: int = PROTOCOL

    def to_dict(self) -> dict:
        return asdict(self)


@functools.lru_cache(maxsize=4)
def _load(dataset: str) -> bnrs_datasets.Dataset:
    return bnrs_datasets.load_dataset(dataset)


def _streams(seed: int) -> list[np.random.SeedSequence]:
    """The seed's independent streams: initialisation, data order, dropout masks,
    training subset and MC-dropout passes (spawned children do not depend on how many
    are spawned, so a stream added later leaves the others' numbers as they were)."""
    return np.random.SeedSequence([seed, 20261125]).spawn(5)


@functools.lru_cache(maxsize=8)
def load_split(dataset: str, n_val: int, n_train: int, seed: int):
    """(Dataset, train_indices, val_indices): the fixed validation set and ``seed``'s
    training subset (step 1 of the protocol); cached per process."""
    data = _load(dataset)
    train, val = bnrs_datasets.split_indices(data.y_train, n_val, n_train, seed=0,
                                             subset_seed=_streams(seed)[3])
    return data, train, val


def _parametric_layers(model: nn.Sequential) -> list:
    # modules(), not the top level: the convs inside residual and Inception blocks too
    # (for a plain chain the two lists are the same).
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def build_network(config: RunConfig, input_shape, n_classes: int, seed: int) -> nn.Sequential:
    """The network of step 2 of the protocol (see the module docstring)."""
    init_stream, _, dropout_stream, _, _ = _streams(seed)
    model = nn.from_spec(config.architecture, input_shape, n_classes,
                         random_state=np.random.default_rng(dropout_stream))
    tokens = [t for t in nn.parse(config.architecture)
              if t.kind not in ("dropout", "spatial_dropout")]
    reference = nn.from_spec(tokens, input_shape, n_classes,
                             random_state=np.random.default_rng(init_stream))
    if config.init == "he":
        _he_initialise(reference, np.random.default_rng(init_stream.spawn(1)[0]))
    elif config.init != "default":
        raise ValueError(f"init: expected 'default' or 'he', got {config.init!r}")
    for layer, source in zip(_parametric_layers(model), _parametric_layers(reference)):
        layer.weight.data[...] = source.weight.data * np.float32(config.init_scale)
        if layer.bias is not None:
            layer.bias.data[...] = source.bias.data
    return model


def _he_initialise(model: nn.Sequential, generator: np.random.Generator) -> None:
    """He et al. 2015 for ReLU: weights N(0, 2 / fan_in), biases 0, in layer order
    (PyTorch's ``kaiming_normal_(mode="fan_in", nonlinearity="relu")``)."""
    for layer in _parametric_layers(model):
        weight = layer.weight.data
        fan_in = weight[0].size
        weight[...] = generator.normal(0.0, math.sqrt(2.0 / fan_in), weight.shape)
        if layer.bias is not None:
            layer.bias.data[...] = 0.0


def _order_stream(seed: int) -> np.random.Generator:
    return np.random.default_rng(_streams(seed)[1])


def _evaluate(model: nn.Sequential, X: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) in evaluation mode."""
    correct, loss_sum, start = 0, 0.0, 0
    criterion = nn.CrossEntropyLoss()
    for logits in eval_logits(model, X, _EVAL_BATCH):
        target = y[start:start + len(logits)]
        start += len(logits)
        with np.errstate(all="ignore"):
            loss_sum += criterion(logits, target) * len(target)
            correct += int(np.sum(np.argmax(logits, axis=1) == target))
    return correct / len(X), loss_sum / len(X)


def _dropout_layers(model: nn.Sequential) -> list:
    return [m for m in model.modules() if isinstance(m, (nn.Dropout, nn.Dropout2d))]


def _mc_dropout_accuracy(model: nn.Sequential, X: np.ndarray, y: np.ndarray,
                         n_passes: int, stream: np.random.SeedSequence) -> float:
    """Accuracy of the mean softmax of ``n_passes`` MC-dropout passes (step 7).

    Each dropout layer draws its masks from its own child of ``stream``
    (:func:`bnrs.nn.mc_dropout`, as the estimators' ``mc_samples``), so the passes are
    reproducible at any thread count.
    """
    bounds = batch_bounds(len(X), _EVAL_BATCH, last="keep")
    probabilities = None
    with nn.mc_dropout(model, stream):
        for _ in range(n_passes):
            # Float64 running sum, pass after pass: the same order whatever the threads.
            softmax = np.exp(np.concatenate([F.log_softmax(model(X[start:stop]), dim=1)
                                             for start, stop in bounds]).astype(np.float64))
            probabilities = softmax if probabilities is None else probabilities + softmax
    return float(np.mean(np.argmax(probabilities, axis=1) == y))


def _optimizer(config: RunConfig, model: nn.Sequential) -> optim.Optimizer:
    if config.optimizer == "adam":
        return optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return optim.SGD(model.parameters(), lr=config.lr, momentum=0.9,
                         weight_decay=config.weight_decay)
    raise ValueError(f"optimizer: expected 'adam' or 'sgd', got {config.optimizer!r}")


def train_run(config: RunConfig, seed: int, n_threads: int | None = None) -> dict:
    """Train and measure one run; returns ``{"status", "metrics", "curves"}``.

    ``status`` is ``"ok"`` or ``"diverged"``; ``metrics`` the summary (step 5 of the
    protocol, and ``diverged_reason`` when it applies); ``curves`` the per-epoch lists.
    ``n_threads`` kernel threads (if given) train and measure it.
    """
    with num_threads(n_threads):
        return _train_and_measure(config, seed)


def _train_and_measure(config: RunConfig, seed: int) -> dict:
    data, train_index, val_index = load_split(config.dataset, config.n_val, config.n_train,
                                              seed)
    if data.fingerprint != config.data_fingerprint:
        raise RuntimeError(f"{config.dataset}: the data differ from those the study was "
                           f"planned on (fingerprint {data.fingerprint}, expected "
                           f"{config.data_fingerprint})")
    X_train, y_train = data.X_train[train_index], data.y_train[train_index]
    X_val, y_val = data.X_train[val_index], data.y_train[val_index]
    # The training sample is the first images of the seed's subset (already in a random
    # order); the test sample is a fixed random subset (seed 0), the same for every run.
    X_train_eval, y_train_eval = X_train[:config.n_train_eval], y_train[:config.n_train_eval]
    test_sample = np.sort(np.random.default_rng(0).permutation(len(data.y_test))
                          [:config.n_test_curve])
    X_test_curve, y_test_curve = data.X_test[test_sample], data.y_test[test_sample]

    model = build_network(config, data.input_shape, data.n_classes, seed)
    optimizer = _optimizer(config, model)
    criterion = nn.CrossEntropyLoss()
    order_stream = _order_stream(seed)
    bounds = batch_bounds(len(X_train), config.batch_size, last="drop")
    n_batches = len(bounds)
    if n_batches < 1:
        raise ValueError(f"batch_size {config.batch_size} exceeds the {len(X_train)} "
                         "training images")

    curves: dict[str, list] = {key: [] for key in (
        "epoch", "steps", "train_loss", "train_acc", "train_eval_loss", "val_acc",
        "val_loss", "test_acc", "test_loss", "seconds", "epoch_seconds")}
    record_layers = diagnostics.run_recorder(model, X_train, y_train, curves)
    best_val, best_epoch, best_state = -1.0, 0, None
    diverged_reason = None
    train_seconds = 0.0
    for epoch in range(1, config.epochs + 1):
        order = order_stream.permutation(len(X_train))
        start = time.perf_counter()
        losses = train_epoch(model, criterion, optimizer, X_train, y_train, bounds, order)
        epoch_seconds = time.perf_counter() - start
        train_seconds += epoch_seconds
        if not math.isfinite(losses[-1]):
            diverged_reason = (f"training loss {losses[-1]} in epoch {epoch}, "
                               f"batch {len(losses)}")
            break
        loss_sum = 0.0
        for loss in losses:   # in order, not sum(): Python 3.12's sum() compensates
            loss_sum += loss
        train_acc, train_eval_loss = _evaluate(model, X_train_eval, y_train_eval)
        val_acc, val_loss = _evaluate(model, X_val, y_val)
        test_curve_acc, test_curve_loss = _evaluate(model, X_test_curve, y_test_curve)
        for key, value in (("epoch", epoch), ("steps", epoch * n_batches),
                           ("train_loss", loss_sum / n_batches),
                           ("train_acc", train_acc), ("train_eval_loss", train_eval_loss),
                           ("val_acc", val_acc), ("val_loss", val_loss),
                           ("test_acc", test_curve_acc), ("test_loss", test_curve_loss),
                           ("seconds", train_seconds), ("epoch_seconds", epoch_seconds)):
            curves[key].append(value)
        record_layers()
        if val_acc > best_val:
            best_val, best_epoch, best_state = val_acc, epoch, model.state_dict()

    chance = 1.0 / data.n_classes
    if diverged_reason is None and best_val < chance + _CHANCE_MARGIN:
        diverged_reason = (f"best validation accuracy {best_val:.3f} is within "
                           f"{_CHANCE_MARGIN:.2f} of chance ({chance:.3f})")
    test_acc = mc_test_acc = math.nan
    if best_state is not None:
        model.load_state_dict(best_state)
        test_acc, _ = _evaluate(model, data.X_test, data.y_test)
        if config.mc_samples and _dropout_layers(model):
            mc_test_acc = _mc_dropout_accuracy(model, data.X_test, data.y_test,
                                               config.mc_samples, _streams(seed)[4])
    target = config.target_accuracy
    reached = [i for i, acc in enumerate(curves["val_acc"])
               if target is not None and acc >= target]
    val_losses = [v if math.isfinite(v) else math.inf for v in curves["val_loss"]]
    lowest = int(np.argmin(val_losses)) if val_losses else None
    epochs_run = len(curves["epoch"])
    metrics = {
        "test_acc": test_acc,
        "best_epoch": best_epoch,
        "best_val_acc": best_val if best_state is not None else math.nan,
        "train_acc": curves["train_acc"][best_epoch - 1] if best_epoch else math.nan,
        "gap": (curves["train_acc"][best_epoch - 1] - test_acc) if best_epoch else math.nan,
        "final_train_loss": curves["train_loss"][-1] if curves["train_loss"] else math.nan,
        "epochs_to_target": curves["epoch"][reached[0]] if reached else None,
        "steps_to_target": curves["steps"][reached[0]] if reached else None,
        "seconds_to_target": curves["seconds"][reached[0]] if reached else None,
        "target_reached": bool(reached),
        "steps_per_epoch": n_batches,
        "steps_run": curves["steps"][-1] if curves["steps"] else 0,
        "train_seconds": train_seconds,
        "seconds_per_epoch": train_seconds / epochs_run if epochs_run else math.nan,
        "epochs_run": epochs_run,
        "val_loss_min_epoch": None if lowest is None else lowest + 1,
        "val_loss_rise": (curves["val_loss"][-1] - curves["val_loss"][lowest]
                          if lowest is not None else math.nan),
        "chance": chance,
        "diverged": diverged_reason is not None,
        "diverged_reason": diverged_reason,
    }
    if config.mc_samples and math.isfinite(mc_test_acc):
        metrics.update(mc_samples=config.mc_samples, mc_test_acc=mc_test_acc,
                       mc_gain=mc_test_acc - test_acc)
    return {"status": "diverged" if diverged_reason else "ok", "metrics": metrics,
            "curves": curves}
