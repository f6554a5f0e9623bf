"""Question 10 (depth) and the per-layer gradient diagnostics of the report.

**Question 10.** Two claims practitioners repeat: batch norm lets much deeper networks
train (it keeps gradients from vanishing or exploding, above all with saturating
activations), and dropout helps more as a network gets deeper. The networks are plain
stacks of 3x3 convolutions of constant width (:data:`WIDTH` channels), with max-pooling
at fixed points (after convolutions 1 and 2 on 28x28 images, 28 -> 14 -> 7; after
convolution 1 on 8x8 images, 8 -> 4), so that the classifier head
``fc(hidden)-act-fc(classes)`` has the same size at every depth; the extra convolutions
all work at the smallest resolution::

    c16 [bn] act mp2 [d]  c16 [bn] act mp2 [d]  (c16 [bn] act) x (depth - 2)
    fc(hidden) [bn] act [d]  fc(classes)

Variants: depth in :data:`DEPTHS` x {no BN, BN after every conv and dense layer} x {no
dropout, dropout (conv dropout after each pooling and dense dropout, at the study's
usual rates: the same dropout at every depth)}, with ReLU; plus sigmoid networks with and
without BN and no dropout (the saturating case of the claim). Same optimizer, data,
training subset and seeds as the main questions, for half their epochs
(:data:`EPOCH_FRACTION`, rounded up; ``--epochs`` sets the main questions' epochs and
so halves here too): 24 variants x seeds runs; a 12-layer run takes about 4x the time
of a 2-layer one (measured on Fashion-MNIST, 4,000 images, 5 epochs).

**Stops training.** A run is *stuck* when its training loss after the last epoch (on the
fixed training sample, in evaluation mode: dropout's noise inflates the mini-batch loss)
is above :data:`STUCK_FRACTION` x ln(classes) (0.9 x ln 10 = 2.07: within 10% of the loss
of a uniform guess), or it diverged. A variant *stops training* at the smallest depth at
which most of its seeds are stuck.

**Diagnostics.** Every run stores its per-layer weight-gradient norms and activation
statistics at initialisation and after every epoch (:func:`bnrs.diagnostics.run_recorder`,
in ``curves["layers"]``); :func:`report_section` draws them for questions 7 to 10 and the
depth plots of question 10.
"""

from __future__ import annotations

import math
from pathlib import Path

from .. import diagnostics
from ..nn import parse
from .questions import SMALL, Claim, Question, Settings, Variant, question

__all__ = ["DEPTHS", "EPOCH_FRACTION", "FAMILIES", "STUCK_FRACTION", "WIDTH",
           "depth_network", "final_training_loss", "report_section", "stopping_depths"]

#: Conv layers of the stacks compared.
DEPTHS = (2, 4, 8, 12)
#: (activation, dropout) of the variant families, each with and without BN at every depth.
FAMILIES = (("relu", False), ("relu", True), ("sigmoid", False))
#: Channels of every conv layer.
WIDTH = 16
#: Question 10 trains for this fraction of the study's epochs (rounded up): it has many
#: variants, and its deep networks cost up to 3x the template's time per epoch.
EPOCH_FRACTION = 0.5
#: A run whose final training loss exceeds this fraction of ln(classes) did not train.
STUCK_FRACTION = 0.9
#: The questions whose report sections get the per-layer gradient plots.
DIAGNOSED_QUESTIONS = (7, 8, 9, 10)

_NORMS = (("plain", "no BN", False), ("bn", "BN", True))


def depth_network(depth: int, *, bn: bool, activation: str = "relu", pools: int = 2,
                  conv_dropout: float = 0.0, dense_dropout: float = 0.0,
                  hidden: int = 128, width: int = WIDTH) -> str:
    """The architecture string of a ``depth``-conv stack (see the module docstring).

    ``pools`` max-poolings follow the first ``pools`` convolutions; conv dropout (if
    any) follows each pooling, dense dropout the hidden dense layer's activation.
    """
    if depth < max(1, pools):
        raise ValueError(f"depth: expected at least {max(1, pools)} conv layers, got {depth}")
    block = [f"c{width}"] + (["bn"] if bn else []) + [activation]
    tokens: list[str] = []
    for index in range(depth):
        tokens += block
        if index < pools:
            tokens.append("mp2")
            if conv_dropout:
                tokens.append(f"d{conv_dropout:g}")
    tokens += [f"fc{hidden}"] + (["bn"] if bn else []) + [activation]
    if dense_dropout:
        tokens.append(f"d{dense_dropout:g}")
    return "-".join(tokens)


def _name(activation: str, norm: str, dropout: bool, depth: int) -> str:
    prefix = "" if activation == "relu" else f"{activation}-"
    return f"{prefix}{norm}{'-drop' if dropout else ''}-depth{depth}"


def _variants(s: Settings) -> tuple[Variant, ...]:
    pools = 1 if s.profile == SMALL else 2
    variants = []
    for activation, dropout in FAMILIES:
        for norm, label, bn in _NORMS:
            group = label + (" + dropout" if dropout else "") + (
                f", {activation}" if activation != "relu" else "")
            for depth in DEPTHS:
                architecture = depth_network(
                    depth, bn=bn, activation=activation, pools=pools,
                    conv_dropout=s.conv_dropout if dropout else 0.0,
                    dense_dropout=s.dense_dropout if dropout else 0.0,
                    hidden=s.profile.hidden)
                variants.append(Variant(_name(activation, norm, dropout, depth),
                                        f"{group}, {depth} conv", architecture,
                                        group=group, x=depth))
    return tuple(variants)


@question(10, "depth")
def _depth(s: Settings) -> Question:
    shallow, deep = DEPTHS[0], DEPTHS[-1]
    claims = (
        Claim(f"BN lets deeper networks train: at {deep} conv layers BN beats no BN "
              "(ReLU)", (f"bn-depth{deep}",), (f"plain-depth{deep}",),
              "Ioffe & Szegedy 2015; 'BN lets you train much deeper networks'"),
        Claim(f"BN lets deeper networks train: at {deep} conv layers BN reaches a lower "
              "training loss (ReLU)", (f"bn-depth{deep}",), (f"plain-depth{deep}",),
              "Ioffe & Szegedy 2015 (less internal covariate shift, faster training)",
              metric="final_train_loss", lower_is_better=True),
        Claim(f"BN lets a deep sigmoid network train: at {deep} conv layers BN beats no "
              "BN", (f"sigmoid-bn-depth{deep}",), (f"sigmoid-plain-depth{deep}",),
              "Ioffe & Szegedy 2015 (BN keeps saturating nonlinearities out of "
              "saturation)"),
        Claim(f"Dropout helps more as depth grows (no BN): its gain at {deep} conv "
              f"layers exceeds its gain at {shallow}",
              (f"plain-drop-depth{deep}", f"plain-depth{shallow}"),
              (f"plain-depth{deep}", f"plain-drop-depth{shallow}"),
              "'deeper networks overfit more, so dropout helps them more'"),
        Claim(f"Dropout helps more as depth grows (with BN): its gain at {deep} conv "
              f"layers exceeds its gain at {shallow}",
              (f"bn-drop-depth{deep}", f"bn-depth{shallow}"),
              (f"bn-depth{deep}", f"bn-drop-depth{shallow}"),
              "'deeper networks overfit more, so dropout helps them more'"),
    )
    pools = "after conv 1" if s.profile == SMALL else "after convs 1 and 2"
    return Question(
        10, "depth", f"Depth: {', '.join(map(str, DEPTHS))} conv layers with and without "
        "BN and dropout (and sigmoid networks)",
        variants=_variants(s), claims=claims, n_train=s.n_train,
        epochs=max(1, math.ceil(EPOCH_FRACTION * s.epochs)),
        sweep=("conv layers (depth)", "linear"), baseline=f"bn-depth{shallow}",
        note=(f"Plain stacks of 3x3 convolutions, {WIDTH} channels, max-pooling {pools} "
              f"only, then fc{s.profile.hidden} and the output layer (the same head at "
              f"every depth). Dropout variants: d{s.conv_dropout:g} after each pooling "
              f"and d{s.dense_dropout:g} after the hidden dense layer. A run is *stuck* "
              "(did not train) when its loss on the training sample after the last epoch "
              f"(evaluation mode) exceeds {STUCK_FRACTION:g} x ln(classes), or it "
              "diverged; a variant stops training at the smallest "
              "depth where most seeds are stuck. \"Dropout helps more as depth grows\" "
              "is the paired difference of dropout's gains: (dropout - none) at the "
              f"deepest ({deep}) minus (dropout - none) at the shallowest ({shallow})."))


# --------------------------------------------------------------------------- analysis

def final_training_loss(run: dict) -> float:
    """The loss on the fixed training sample after the last epoch, in evaluation mode
    (without dropout's noise, which inflates the mini-batch loss of dropout networks);
    the last mini-batch loss for a run stored without it."""
    losses = run["curves"].get("train_eval_loss") or []
    if losses and losses[-1] is not None and math.isfinite(losses[-1]):
        return float(losses[-1])
    loss = run["metrics"].get("final_train_loss")
    return math.nan if loss is None else float(loss)


def _is_stuck(run: dict) -> bool:
    """Diverged (incl. never above chance + 5 points), or a final training loss above
    STUCK_FRACTION x ln(classes)."""
    if run["status"] == "diverged":
        return True
    chance = run["metrics"].get("chance", math.nan)
    loss = final_training_loss(run)
    return not math.isfinite(loss) or loss > STUCK_FRACTION * math.log(1 / chance)


def _runs_by_variant(q: Question, entries, runs) -> dict[str, list[dict]]:
    by_variant: dict[str, list[dict]] = {v.name: [] for v in q.variants}
    for question_, variant, _seed, key in entries:
        if question_ is q and key in runs:
            by_variant[variant.name].append(runs[key])
    return by_variant


def stopping_depths(q: Question, entries, runs) -> dict[str, dict]:
    """Per group of question 10: the stuck counts at each depth and the depth at which
    the group stops training (None: it trains at every depth; "?" with no runs).

    Returns ``{group: {"stuck": {depth: (n_stuck, n_runs)}, "stops_at": depth}}``.
    """
    by_variant = _runs_by_variant(q, entries, runs)
    groups: dict[str, dict] = {}
    for variant in q.variants:
        group = groups.setdefault(variant.group, {"stuck": {}, "stops_at": None})
        seed_runs = by_variant[variant.name]
        group["stuck"][int(variant.x)] = (sum(_is_stuck(r) for r in seed_runs),
                                          len(seed_runs))
    for group in groups.values():
        if all(n == 0 for _, n in group["stuck"].values()):
            group["stops_at"] = "?"
            continue
        for depth, (stuck, n) in sorted(group["stuck"].items()):
            if n and stuck * 2 > n:
                group["stops_at"] = depth
                break
    return groups


def _mean(values) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else math.nan


def _geometric_mean(values) -> float:
    values = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else math.nan


def _mean_layers(seed_runs: list[dict], moment: int) -> dict | None:
    """The per-layer statistics at ``moment`` (0: initial, -1: last epoch) averaged
    over seeds (gradient norms and stds geometrically), or None if none recorded."""
    stored = [run["curves"].get("layers") for run in seed_runs]
    stored = [s for s in stored if s and s.get("weight_grad_norm")]
    if not stored:
        return None
    kinds = stored[0]["kind"]
    stored = [s for s in stored if s["kind"] == kinds]
    columns = {"name": stored[0]["name"], "kind": kinds}
    for key, average in (("weight_grad_norm", _geometric_mean),
                         ("activation_mean", _mean),
                         ("activation_std", _geometric_mean)):
        columns[key] = [average([s[key][moment][i] for s in stored
                                 if len(s[key]) > abs(moment)])
                        for i in range(len(kinds))]
    return columns


def _has_bn(variant: Variant) -> bool:
    return any(token.kind in ("bn", "brn") for token in parse(variant.architecture))


def _diagnosed_variants(q: Question) -> list[Variant]:
    """The variants whose per-layer statistics are drawn: for question 10 the deepest
    networks without dropout; otherwise every variant."""
    if q.number == 10:
        deep = max(v.x for v in q.variants)
        return [v for v in q.variants if v.x == deep and "drop" not in v.name]
    return list(q.variants)


# --------------------------------------------------------------------------- report

def _plot_depth(plt, q: Question, entries, runs, path: Path) -> None:
    """Test accuracy and final training loss against depth, per group, with intervals."""
    from .stats import mean_interval

    by_variant = _runs_by_variant(q, entries, runs)
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


def _plot_diagnostics(plt, q: Question, entries, runs, path: Path) -> bool:
    """Per-layer gradient norm and activation statistics at initialisation and after
    training, one row per moment, BN and no-BN variants in one colour each."""
    by_variant = _runs_by_variant(q, entries, runs)
    variants = _diagnosed_variants(q)
    moments = [("at initialisation", 0), ("after the last epoch", -1)]
    series = {moment: {} for moment in moments}
    for variant in variants:
        for moment in moments:
            columns = _mean_layers(by_variant[variant.name], moment[1])
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


def _gradient_ratio_rows(q: Question, entries, runs) -> list[list[str]]:
    """Per diagnosed variant: first/last weight layer's gradient norm at init and end."""
    by_variant = _runs_by_variant(q, entries, runs)
    rows = []
    for variant in _diagnosed_variants(q):
        cells = [variant.label]
        for moment in (0, -1):
            columns = _mean_layers(by_variant[variant.name], moment)
            if columns is None:
                cells += ["–", "–"]
                continue
            weights = diagnostics.weight_layer_positions(columns["kind"])
            first = columns["weight_grad_norm"][weights[0]]
            last = columns["weight_grad_norm"][weights[-1]]
            cells += [f"{first:.2g} / {last:.2g}",
                      f"{first / last:.2g}" if last and math.isfinite(last) else "–"]
        rows.append(cells)
    return rows


def _stops_text(stops_at, shallowest: int) -> str:
    if stops_at is None:
        return "trains at every depth"
    if stops_at == "?":
        return "no runs yet"
    if stops_at == shallowest:
        return f"does not train even at {shallowest} conv layers"
    return f"{stops_at} conv layers"


def report_section(doc, q: Question, entries, runs, plt, plot_dir) -> None:
    """Add question 10's depth table and plots, and for questions 7-10 the per-layer
    gradient diagnostics, to the report document ``doc`` (after the question's table).

    ``plt`` is matplotlib.pyplot or None (no plots); ``plot_dir`` the plots directory.
    """
    plot_dir = Path(plot_dir)
    if q.number == 10:
        groups = stopping_depths(q, entries, runs)
        depths = sorted({int(v.x) for v in q.variants})
        header = ["variant"] + [f"{d} conv: stuck" for d in depths] + ["stops training at"]
        rows = []
        for group, info in groups.items():
            cells = [group]
            for depth in depths:
                stuck, n = info["stuck"].get(depth, (0, 0))
                cells.append(f"{stuck}/{n}" if n else "–")
            cells.append(_stops_text(info["stops_at"], depths[0]))
            rows.append(cells)
        doc.paragraph("Where each variant stops training: per depth, the seeds that did "
                      "not train (diverged, or a loss on the fixed training sample after "
                      f"the last epoch, in evaluation mode, above {STUCK_FRACTION:g} x "
                      "ln(classes)); a variant stops at the smallest depth where most "
                      "seeds did not train.")
        doc.table(header, rows)
        if plt is not None and runs:
            _plot_depth(plt, q, entries, runs, plot_dir / f"q{q.number}-depth.png")
            doc.image(f"plots/q{q.number}-depth.png", f"Q{q.number} depth")
    if q.number not in DIAGNOSED_QUESTIONS:
        return
    rows = _gradient_ratio_rows(q, entries, runs)
    if all(cell == "–" for row in rows for cell in row[1:]):
        return
    doc.paragraph("Gradient diagnostics: the L2 norm of each conv and dense weight's "
                  "gradient of the mean cross-entropy on a fixed probe of 128 training "
                  "images (training mode, dropout off), at initialisation and after the "
                  "last epoch (geometric mean over seeds). A first-to-last ratio far below "
                  "1 is a vanishing gradient at the input end, far above 1 an exploding "
                  "one.")
    doc.table(["variant", "first / last layer's gradient norm, initial",
               "ratio, initial", "first / last, after training", "ratio, after training"],
              rows)
    name = f"q{q.number}-layers.png"
    if plt is not None and _plot_diagnostics(plt, q, entries, runs, plot_dir / name):
        doc.image(f"plots/{name}", f"Q{q.number} per-layer gradients and activations")
