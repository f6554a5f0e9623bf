"""Per-layer diagnostics: weight-gradient norms and activation statistics, and their plots.

The direct evidence behind "batch norm keeps gradients from vanishing or exploding" is
the size of each layer's gradient and of each layer's output, layer by layer.
:func:`layer_statistics` measures them for any :class:`bnrs.nn.Sequential` on one batch
(the *probe*), without disturbing training:

* the network runs in **training mode with dropout switched off**: batch norm uses the
  batch statistics, as training sees them (evaluation mode would use running statistics,
  which at initialisation are 0 and 1, and hide what batch norm does), and dropout, which
  would only add noise (and draw from the layers' random streams), is the identity;
* the loss is the mean cross-entropy of the probe; backward gives every weight's gradient;
* afterwards everything is as before: the parameter gradients (``param.grad``), the
  batch-norm running statistics and ``num_batches_tracked``, every module's mode and the
  dropout layers' random streams (no seed is drawn). No optimizer step is taken.

So training with recording on and off gives bit-identical networks.
:class:`bnrs.CNNClassifier` records them with ``record_layer_stats=True`` (in
``history_[i]["layers"]`` and ``layer_stats_init_``), and ``bnrs study`` stores them with
every run (:func:`run_recorder`).

Examples
--------
>>> import numpy as np
>>> from bnrs import nn
>>> from bnrs.diagnostics import layer_statistics
>>> model = nn.from_spec("c4-bn-relu-mp2", (1, 8, 8), 3, random_state=0)
>>> X = np.random.default_rng(0).standard_normal((16, 1, 8, 8)).astype(np.float32)
>>> stats = layer_statistics(model, X, np.arange(16) % 3)
>>> [(s["name"], s["kind"]) for s in stats]
[('0', 'Conv2d'), ('1', 'BatchNorm2d'), ('2', 'ReLU'), ('5', 'Linear')]
>>> stats[0]["weight_grad_norm"] > 0
True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from . import nn

__all__ = ["ACTIVATIONS", "PROBE_SIZE", "WEIGHT_LAYERS", "activation_positions",
           "draw_layer_statistics", "layer_statistics", "plot_layer_statistics",
           "probe_indices", "run_recorder", "stack_statistics", "weight_layer_positions"]

#: Samples in the probe batch of :class:`bnrs.CNNClassifier` and ``bnrs study``.
PROBE_SIZE = 128
#: Element-wise nonlinearities: their outputs are the "activations" of the plots.
ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh)
#: Layers whose weight gradient is the "per-layer gradient" of the plots.
WEIGHT_LAYERS = (nn.Conv2d, nn.Linear)
_DROPOUT = (nn.Dropout, nn.Dropout2d)
#: Significant digits kept by :func:`run_recorder` (the study database stays small).
_STORED_DIGITS = 4


def probe_indices(n_samples: int, size: int = PROBE_SIZE) -> np.ndarray:
    """``size`` evenly spaced indices into ``n_samples`` samples (all if fewer).

    No random draw, so choosing the probe leaves every random stream untouched; evenly
    spaced, so data sorted by class still give a probe with every class.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples: expected at least 1 sample, got {n_samples}")
    size = min(int(size), n_samples)
    return np.linspace(0, n_samples - 1, size).round().astype(np.int64)


def _recorded(module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, nn.Parameter) or isinstance(module, ACTIVATIONS)


def _norm(array: np.ndarray) -> float:
    return float(np.sqrt(np.sum(np.square(array, dtype=np.float64))))


def layer_statistics(model: nn.Sequential, X, y, criterion: nn.Module | None = None
                     ) -> list[dict]:
    """Weight-gradient norm and activation mean and std of every layer, on one batch.

    Parameters
    ----------
    model : bnrs.nn.Sequential
        Any network whose direct children are applied in order (what
        :func:`bnrs.nn.from_spec` builds); its last output must be (N, n_classes) logits.
    X : array-like of shape (N, *sample_shape)
        The probe batch (at least 2 samples when the network has batch norm).
    y : array-like of int of shape (N,)
        Class indices (0 .. n_classes - 1) of the probe (the targets ``criterion`` takes).
    criterion : bnrs.nn loss module, optional
        The loss back-propagated; None is ``nn.CrossEntropyLoss()``
        (:class:`bnrs.CNNRegressor` passes its regression loss).

    Returns
    -------
    list of dict
        One per layer that has a weight (Conv2d, Linear, batch norm) or is an activation,
        in forward order: ``name`` (the child's name in the Sequential, as in
        ``state_dict`` keys), ``kind`` (the class name), ``weight_grad_norm`` (the L2
        norm of the gradient of the probe's mean cross-entropy with respect to the
        layer's weight; None for activations) and ``activation_mean`` and
        ``activation_std`` (over every element of the layer's output on the probe).

    Notes
    -----
    Training mode without dropout, and nothing changed afterwards: see the module
    docstring. Non-finite values (a diverged network) are returned as they are.
    """
    X = np.ascontiguousarray(X, dtype=np.float32)
    y = np.asarray(y)
    modules = list(model.modules())
    modes = [module.training for module in modules]
    buffers = [(module, name, getattr(module, name), getattr(module, name).copy())
               for module in modules for name in module._buffer_names
               if getattr(module, name) is not None]
    grads = [(param, param.grad, param.grad.copy()) for param in model.parameters()]
    criterion = nn.CrossEntropyLoss() if criterion is None else criterion
    try:
        model.train()
        for module in modules:
            if isinstance(module, _DROPOUT):
                module.training = False
        for _, grad, _ in grads:
            grad.fill(0.0)
        stats = []
        output = X
        with np.errstate(all="ignore"):
            for name, module in model.named_children():
                output = module(output)
                if _recorded(module):
                    values = output.astype(np.float64)
                    stats.append({"name": name, "kind": type(module).__name__,
                                  "module": module, "activation_mean": float(values.mean()),
                                  "activation_std": float(values.std())})
            criterion(output, y)
            model.backward(criterion.backward(), input_grad=False)
            for entry in stats:
                weight = getattr(entry.pop("module"), "weight", None)
                entry["weight_grad_norm"] = (_norm(weight.grad)
                                             if isinstance(weight, nn.Parameter) else None)
    finally:
        model.clear_saved()
        for module, mode in zip(modules, modes):
            module.training = mode
        for module, name, original, saved in buffers:
            original[...] = saved
            setattr(module, name, original)
        for param, original, saved in grads:
            original[...] = saved
            param.grad = original
    order = ("name", "kind", "weight_grad_norm", "activation_mean", "activation_std")
    return [{key: entry[key] for key in order} for entry in stats]


# --------------------------------------------------------------------------- the study

def _rounded(value):
    if value is None or not math.isfinite(value):
        return value
    return float(f"{value:.{_STORED_DIGITS}g}")


def stack_statistics(moments: Sequence[Sequence[dict]]) -> dict:
    """Column form of several :func:`layer_statistics` results of one network.

    Returns ``{"name": [...], "kind": [...], "weight_grad_norm": [[moment 0 per layer],
    [moment 1 per layer], ...], "activation_mean": ..., "activation_std": ...}``, values
    rounded to 4 significant digits: what the study stores with a run (the names are
    kept once instead of at every epoch).
    """
    columns = {"name": [], "kind": [], "weight_grad_norm": [], "activation_mean": [],
               "activation_std": []}
    if moments:
        columns["name"] = [entry["name"] for entry in moments[0]]
        columns["kind"] = [entry["kind"] for entry in moments[0]]
    for stats in moments:
        for key in ("weight_grad_norm", "activation_mean", "activation_std"):
            columns[key].append([_rounded(entry[key]) for entry in stats])
    return columns


def run_recorder(model: nn.Sequential, X: np.ndarray, y: np.ndarray, curves: dict,
                 size: int = PROBE_SIZE) -> Callable[[], None]:
    """Record the statistics of ``model`` at initialisation now, and return the
    recorder to call after every epoch.

    The probe is ``size`` evenly spaced samples of ``(X, y)`` (:func:`probe_indices`).
    ``curves["layers"]`` becomes the column form of :func:`stack_statistics`, with
    moment 0 the initial network and moment ``e`` the network after epoch ``e``; it is
    updated in place by every call of the recorder.

    Examples
    --------
    In a training loop (what ``bnrs.study.train.train_run`` does)::

        record_layers = run_recorder(model, X_train, y_train, curves)   # initial
        for epoch in ...:
            ...                                                         # train
            record_layers()                                             # after it
    """
    index = probe_indices(len(X), size)
    X_probe, y_probe = X[index], np.asarray(y)[index]
    moments = [layer_statistics(model, X_probe, y_probe)]

    def record() -> None:
        moments.append(layer_statistics(model, X_probe, y_probe))
        curves["layers"] = stack_statistics(moments)

    curves["layers"] = stack_statistics(moments)
    return record


# --------------------------------------------------------------------------- plots

def weight_layer_positions(kinds: Sequence[str]) -> list[int]:
    """Indices (into ``kinds``) of the Conv2d and Linear layers, in forward order."""
    names = {cls.__name__ for cls in WEIGHT_LAYERS}
    return [i for i, kind in enumerate(kinds) if kind in names]


def activation_positions(kinds: Sequence[str]) -> list[int]:
    """Indices (into ``kinds``) of the activation layers, in forward order."""
    names = {cls.__name__ for cls in ACTIVATIONS}
    return [i for i, kind in enumerate(kinds) if kind in names]


def _as_columns(stats) -> dict:
    """A layer_statistics list (one moment) or a stored column dict, as columns of one
    moment: {"kind": [...], "weight_grad_norm": [...], ...}."""
    if isinstance(stats, Mapping):
        return stats
    return {key: [entry[key] for entry in stats] for key in (
        "name", "kind", "weight_grad_norm", "activation_mean", "activation_std")}


def _finite(values) -> list[float]:
    return [math.nan if v is None or not math.isfinite(v) else float(v) for v in values]


def draw_layer_statistics(axes, series: Mapping[str, object], *, styles=None) -> None:
    """Draw per-layer curves on three axes: weight-gradient norm (log), activation
    mean and activation std (log) against the layer's position.

    ``series`` maps a label to one moment's statistics (a :func:`layer_statistics`
    list, or a dict of columns); ``styles`` optionally maps a label to plot keywords.
    """
    ax_grad, ax_mean, ax_std = axes
    for label, stats in series.items():
        columns = _as_columns(stats)
        style = dict((styles or {}).get(label, {}))
        weights = weight_layer_positions(columns["kind"])
        acts = activation_positions(columns["kind"])
        grads = [columns["weight_grad_norm"][i] for i in weights]
        ax_grad.plot(range(1, len(weights) + 1), _finite(grads), marker=".",
                     label=label, **style)
        ax_mean.plot(range(1, len(acts) + 1),
                     _finite([columns["activation_mean"][i] for i in acts]), marker=".",
                     label=label, **style)
        ax_std.plot(range(1, len(acts) + 1),
                    _finite([columns["activation_std"][i] for i in acts]), marker=".",
                    label=label, **style)
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    for ax in (ax_grad, ax_std):   # plain labels: mathtext ones are slow to lay out
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax_grad.set(xlabel="weight layer (conv/dense, from the input)",
                ylabel="weight-gradient norm")
    ax_mean.set(xlabel="activation layer (from the input)", ylabel="activation mean")
    ax_std.set(xlabel="activation layer (from the input)", ylabel="activation std")
    for ax in axes:
        ax.grid(alpha=0.3)


def plot_layer_statistics(series: Mapping[str, object], path=None, *, title: str = ""):
    """Plot per-layer gradient norms and activation statistics (needs matplotlib).

    Parameters
    ----------
    series : mapping of label to statistics
        Each value one moment of one network: a :func:`layer_statistics` list, e.g.
        ``{"initial": clf.layer_stats_init_, "after training":
        clf.history_[-1]["layers"]}``.
    path : path, optional
        Save the figure there (and close it); otherwise return it.
    title : str

    Returns
    -------
    matplotlib.figure.Figure or None
    """
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    draw_layer_statistics(axes, series)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is None:
        return fig
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
