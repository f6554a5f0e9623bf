"""The report's plots, drawn with matplotlib (the optional ``plot`` extra).

matplotlib is imported only when a report is drawn (:func:`load_pyplot` returns None without
it, and the report then says so); every ``plot_*`` function takes the ``pyplot`` module it
returned and writes one PNG.
"""

from __future__ import annotations

import math
from pathlib import Path

from .. import diagnostics
from ..nn import parse
from .questions import STUCK_FRACTION, Question, Variant
from .results import (
    TIME_METRICS,
    diagnosed_variants,
    final_training_loss,
    mean_layers,
    runs_by_variant,
    time_to_target,
)
from .stats import kaplan_meier, mean_interval

__all__ = ["load_pyplot", "plot_curves", "plot_depth", "plot_diagnostics", "plot_final",
           "plot_sweep", "plot_time_to_target"]


def load_pyplot():
    """matplotlib.pyplot on the Agg backend, or None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plain_log_axis(ax) -> None:
    """A log y axis labelled with plain numbers (0.3, 1, 2) instead of 10^x."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator

    ax.set_yscale("log")
    ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 3.0, 5.0)))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.tick_params(axis="y", which="minor", labelsize=7)


def _curve_panels(ax_loss, ax_acc, summaries, colours, labels) -> None:
    for summary, colour, label in zip(summaries, colours, labels):
        epochs = summary.curves["epoch"]
        ax_loss.plot(epochs, summary.curves["train_loss"], color=colour, label=label)
        ax_acc.plot(epochs, [100 * v for v in summary.curves["train_acc"]], color=colour,
                    linestyle="--", linewidth=1)
        ax_acc.plot(epochs, [100 * v for v in summary.curves["test_acc"]], color=colour,
                    label=label)
    ax_loss.set(xlabel="epoch", ylabel="training loss (cross-entropy)")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)")
    losses = [v for s in summaries for v in s.curves.get("train_loss", [])
              if math.isfinite(v) and v > 0]
    if losses and max(losses) / min(losses) > 20:   # e.g. weights x10 at init
        _plain_log_axis(ax_loss)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)


def plot_curves(plt, q, summaries, path: Path) -> None:
    """Training loss, and test (solid) / training (dashed) accuracy per epoch.

    A sweep gets one column per group (no BN, BN, ...), coloured by the swept value.
    """
    if q.sweep:
        groups: dict[str, list] = {}
        for variant, summary in zip(q.variants, summaries):
            if summary.curves:
                groups.setdefault(variant.group, []).append((variant, summary))
        fig, axes = plt.subplots(2, len(groups), figsize=(4.6 * len(groups), 7.2),
                                 squeeze=False, sharey="row")
        cmap = plt.get_cmap("viridis")
        for column, (group, members) in enumerate(groups.items()):
            colours = [cmap(i / max(1, len(members) - 1)) for i in range(len(members))]
            _curve_panels(axes[0, column], axes[1, column], [m[1] for m in members],
                          colours, [f"{m[0].x:g}" for m in members])
            axes[0, column].set_title(group)
            axes[1, column].legend(title=q.sweep[0].split(" (")[0], fontsize=7,
                                   title_fontsize=7, loc="lower right")
        fig.suptitle(f"Q{q.number}: learning curves (mean over seeds that did not diverge); "
                     "accuracy: test sample solid, training sample dashed")
    else:
        shown = [s for s in summaries if s.curves]
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.6))
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        _curve_panels(ax_loss, ax_acc, shown,
                      [colours[i % len(colours)] for i in range(len(shown))],
                      [s.label for s in shown])
        ax_loss.set_title("Training loss (mini-batch mean per epoch)")
        ax_acc.set_title("Accuracy: test sample (solid), training sample (dashed)")
        ax_acc.legend(fontsize=8, loc="lower right")
        fig.suptitle(f"Q{q.number}: learning curves (mean over seeds that did not diverge)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_final(plt, q, summaries, seed_values, path: Path) -> None:
    """Test accuracy per variant: every seed (grey; diverged: red x at its accuracy),
    and the mean with its 95% interval over the seeds that did not diverge."""
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(summaries) + 1.6))
    labels, lowest = [], 100.0
    for position, summary in enumerate(reversed(summaries)):
        labels.append(summary.label + (f"  [{summary.n_diverged} diverged]"
                                       if summary.n_diverged else ""))
        for value, status in seed_values.get(summary.name, []):
            if not math.isfinite(value):
                continue
            lowest = min(lowest, 100 * value)
            ax.plot(100 * value, position + 0.18, "x" if status == "diverged" else ".",
                    color="red" if status == "diverged" else "0.55", markersize=6)
        interval = summary.test_acc
        if interval.n == 0:
            continue
        error = 100 * interval.half_width if math.isfinite(interval.low) else 0
        ax.errorbar(100 * interval.mean, position, xerr=error, fmt="o", color="C0",
                    capsize=4)
        lowest = min(lowest, 100 * interval.mean - error)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels)
    ax.set_xlim(max(0.0, lowest - 1.0), 100.0 if lowest > 90 else None)
    ax.set_xlabel("test accuracy (%)")
    from matplotlib.lines import Line2D

    ax.legend(handles=[
        Line2D([], [], color="C0", marker="o", label="mean, 95% interval (not diverged)"),
        Line2D([], [], color="0.55", marker=".", linestyle="", label="one seed"),
        Line2D([], [], color="red", marker="x", linestyle="", label="a diverged seed")],
        fontsize=8, loc="best")
    ax.set_title(f"Q{q.number}: test accuracy per variant")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(plt, q, summaries, path: Path) -> None:
    by_name = {s.name: s for s in summaries}
    groups: dict[str, list] = {}
    for variant in q.variants:
        groups.setdefault(variant.group, []).append(variant)
    fig, ax = plt.subplots(figsize=(8, 4.6))
    markers = "osD^v"
    for index, (group, variants) in enumerate(groups.items()):
        xs, ys, errors = [], [], []
        for variant in variants:
            interval = by_name[variant.name].test_acc
            if interval.n == 0:
                continue
            xs.append(variant.x)
            ys.append(100 * interval.mean)
            errors.append(100 * interval.half_width if math.isfinite(interval.low) else 0)
            diverged = by_name[variant.name].n_diverged
            if diverged:
                ax.annotate(f"{diverged} div.", (variant.x, 100 * interval.mean),
                            textcoords="offset points", xytext=(4, -12), fontsize=7)
        ax.errorbar(xs, ys, yerr=errors, marker=markers[index % len(markers)], capsize=3,
                    label=group)
        for variant in variants:   # variants whose every seed diverged
            summary = by_name[variant.name]
            if summary.test_acc.n == 0 and summary.n_diverged:
                ax.plot(variant.x, 100 * summary.chance, marker="x", color="red")
    low, high = ax.get_ylim()
    ax.set_ylim(max(low, 0.0), min(high, 100.0))
    ax.set_xscale(q.sweep[1])
    ax.set_xlabel(q.sweep[0])
    ax.set_ylabel("test accuracy (%), mean and 95% interval")
    ax.set_title(f"Q{q.number}: test accuracy vs {q.sweep[0].split(' (')[0]}")
    if q.sweep[1] == "log":
        xs = sorted({v.x for v in q.variants})
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{x:g}" for x in xs])
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_time_to_target(plt, q: Question, entries, runs, path: Path) -> bool:
    """The Kaplan-Meier fraction of runs at the target accuracy against optimizer steps,
    for the variants of ``q``'s time-to-target claims (a run that never gets there keeps
    the curve below 1: it is counted, not left out). False if there is nothing to
    draw."""
    names = list(dict.fromkeys(name for claim in q.claims if claim.metric in TIME_METRICS
                               for name in claim.plus + claim.minus))
    by_variant = runs_by_variant(q, entries, runs)
    shown = [(name, [time_to_target(run, "steps") for run in by_variant[name]])
             for name in names if by_variant.get(name)]
    if not shown:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.4))
    budget = max(t for _, times in shown for t, _ in times)
    for name, times in shown:
        steps = kaplan_meier([t for t, _ in times], [reached for _, reached in times])
        xs, ys = [0.0], [0.0]
        for t, survival in steps:
            xs += [t, t]
            ys += [ys[-1], 100 * (1 - survival)]
        xs.append(budget)
        ys.append(ys[-1])
        reached = sum(r for _, r in times)
        ax.plot(xs, ys, label=f"{q.variant(name).label} ({reached}/{len(times)} reached)")
    ax.set(xlabel="optimizer steps", ylabel="runs at the target accuracy (%)",
           ylim=(-2, 102), title=f"Q{q.number}: time to the target validation accuracy "
                                 "(Kaplan-Meier)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- question 10 and diagnostics

def _has_bn(variant: Variant) -> bool:
    return any(token.kind in ("bn", "brn") for token in parse(variant.architecture))


def plot_depth(plt, q: Question, entries, runs, path: Path) -> None:
    """Test accuracy and final training loss against depth, per group, with intervals."""
    by_variant = runs_by_variant(q, entries, runs)
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.4))
    groups: dict[str, list[Variant]] = {}
    for variant in q.variants:
        groups.setdefault(variant.group, []).append(variant)
    chance = math.nan
    for index, (group, variants) in enumerate(groups.items()):
        style = {"marker": "osD^v<>"[index % 7], "capsize": 3, "label": group,
                 "linestyle": "--" if "sigmoid" in group else "-"}
        for ax, metric, scale in ((ax_acc, "test_acc", 100), (ax_loss, "loss", 1)):
            xs, ys, errors = [], [], []
            for variant in variants:
                values = []
                for run in by_variant[variant.name]:
                    chance = run["metrics"].get("chance", chance)
                    if metric == "loss":
                        value = final_training_loss(run)
                    elif run["status"] == "diverged":
                        value = run["metrics"].get("chance")   # a failed training
                    else:
                        value = run["metrics"].get(metric)
                    if value is not None and math.isfinite(value):
                        values.append(scale * value)
                interval = mean_interval(values)
                if interval.n:
                    xs.append(variant.x)
                    ys.append(interval.mean)
                    errors.append(interval.half_width if interval.n > 1 else 0.0)
            ax.errorbar(xs, ys, yerr=errors, **style)
    if math.isfinite(chance) and chance > 0:
        ax_acc.axhline(100 * chance, color="0.5", linewidth=0.8, linestyle=":")
        ax_loss.axhline(STUCK_FRACTION * math.log(1 / chance), color="red", linewidth=0.8,
                        linestyle=":", label="stuck above this")
    low, high = ax_acc.get_ylim()   # intervals of 2-3 seeds can reach past 0-100%
    ax_acc.set_ylim(max(low, 0.0), min(high, 100.0))
    ax_loss.set_ylim(bottom=max(ax_loss.get_ylim()[0], 0.0))
    depths = sorted({v.x for v in q.variants})
    for ax in (ax_acc, ax_loss):
        ax.set_xticks(depths)
        ax.set_xlabel("conv layers (depth)")
        ax.grid(alpha=0.3)
    ax_acc.set(ylabel="test accuracy (%), mean and 95% interval",
               title=f"Q{q.number}: test accuracy vs depth")
    ax_loss.set(ylabel="training loss after the last epoch (eval mode)",
                title=f"Q{q.number}: training loss vs depth")
    ax_loss.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_diagnostics(plt, q: Question, entries, runs, path: Path) -> bool:
    """Per-layer gradient norm and activation statistics at initialisation and after
    training, one row per moment, BN and no-BN variants in one colour each."""
    by_variant = runs_by_variant(q, entries, runs)
    variants = diagnosed_variants(q)
    moments = [("at initialisation", 0), ("after the last epoch", -1)]
    series = {moment: {} for moment in moments}
    for variant in variants:
        for moment in moments:
            columns = mean_layers(by_variant[variant.name], moment[1])
            if columns is not None:
                series[moment][variant.label] = columns
    if not any(series.values()):
        return False
    fig, axes = plt.subplots(len(moments), 3, figsize=(14, 3.6 * len(moments)),
                             squeeze=False)
    # One colour per level of the other factor, solid with BN, dashed without.
    with_bn = [v for v in variants if _has_bn(v)]
    without_bn = [v for v in variants if not _has_bn(v)]
    styles = {v.label: {"color": f"C{i % 10}", "linestyle": "-" if _has_bn(v) else "--"}
              for same in (without_bn, with_bn) for i, v in enumerate(same)}
    for row, moment in enumerate(moments):
        diagnostics.draw_layer_statistics(axes[row], series[moment], styles=styles)
        axes[row][0].set_title(f"gradient norm per layer, {moment[0]}", fontsize=9)
        axes[row][1].set_title(f"activation mean per layer, {moment[0]}", fontsize=9)
        axes[row][2].set_title(f"activation std per layer, {moment[0]}", fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Q{q.number}: per-layer gradients and activations (probe of 128 "
                 "training images; geometric mean over seeds; dashed: no BN)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
