"""The study's report: report.md, report.html, results.csv and the plots, from stored runs.

The report is built only from the database and the plan, so ``bnrs study --report-only``
rebuilds it at any time (also while a study is still running: missing runs are counted).

Per question: a table of every variant (mean and 95% interval over the seeds that did not
diverge, and how many diverged), the verdict on each claim in one sentence, and plots:
learning curves (train and test accuracy and training loss per epoch), the test accuracy
of every variant with its interval, and for sweeps (batch size, learning rate, initial
scale) the accuracy against the factor with and without BN. Plots need matplotlib (the
``plot`` extra); without it the report says so and has everything else.
"""

from __future__ import annotations

import csv
import html
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from .depth import report_section
from .stats import Interval, mean_interval, paired_verdict
from .train import PROTOCOL

__all__ = ["build_table", "claim_results", "write_report"]

_METRIC_NAMES = {"test_acc": "test accuracy", "final_train_loss": "final training loss"}


# --------------------------------------------------------------------------- tables

def build_table(entries, runs: dict, questions, out):
    """The per-(question, variant, seed) rows and the claims' verdicts."""
    from .runner import ResultTable

    rows = []
    for q, variant, seed, key in entries:
        run = runs.get(key)
        row = {"question": q.number, "variant": variant.name, "label": variant.label,
               "seed": seed, "status": "missing" if run is None else run["status"],
               "run_key": key}
        if run is not None:
            metrics = run["metrics"]
            for name in ResultTable.columns:
                if name in metrics:
                    row[name] = metrics[name]
            for name in ("architecture", "batch_size", "lr", "init_scale", "epochs",
                         "n_train"):
                row[name] = run["config"][name]
        rows.append(row)
    verdicts = [result.as_dict() for q in questions for result in claim_results(q, entries,
                                                                                runs)]
    return ResultTable(rows, verdicts, out)


def _runs_of(q, entries, runs) -> dict[str, dict[int, dict]]:
    """variant name -> seed -> stored run, for question ``q``."""
    by_variant: dict[str, dict[int, dict]] = {v.name: {} for v in q.variants}
    for question, variant, seed, key in entries:
        if question is q and key in runs:
            by_variant[variant.name][seed] = runs[key]
    return by_variant


def _value(run: dict, metric: str) -> float | None:
    """A run's value for a claim: a diverged run scores chance accuracy (it failed to
    train); for other metrics it has no value and its seed is left out."""
    if run["status"] == "diverged":
        return run["metrics"]["chance"] if metric == "test_acc" else None
    value = run["metrics"].get(metric)
    return None if value is None or not math.isfinite(value) else float(value)


@dataclass
class ClaimResult:
    question: int
    statement: str
    source: str
    metric: str
    verdict: str
    mean: float
    low: float
    high: float
    d_z: float
    n_seeds: int
    diverged: int
    lower_is_better: bool = False
    differences: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def effect_text(self) -> str:
        scale, unit = (100, " points") if self.metric.endswith("acc") else (1, "")
        sign = -1 if self.lower_is_better else 1
        if not math.isfinite(self.mean):
            return "no paired seeds yet"
        text = f"{sign * scale * self.mean:+.2f}{unit}"
        if self.lower_is_better:
            text = f"{sign * scale * self.mean:.3g} lower"
        if math.isfinite(self.low):
            low, high = sorted((sign * scale * self.low, sign * scale * self.high))
            text += (f", 95% CI {low:.3g} to {high:.3g}" if self.lower_is_better
                     else f", 95% CI {low:+.2f} to {high:+.2f}")
        if math.isfinite(self.d_z) or math.isinf(self.d_z):
            text += f", d_z {self.d_z:.2f}"
        return text + f", {self.n_seeds} seeds"

    def sentence(self) -> str:
        what = {"supported": "Supported", "contradicted": "Contradicted",
                "inconclusive": "Inconclusive"}[self.verdict]
        extra = (f"; {self.diverged} diverged run(s) scored at chance"
                 if self.diverged and self.metric == "test_acc" else "")
        metric = _METRIC_NAMES.get(self.metric, self.metric)
        direction = ("how much lower the expected variant's is" if self.lower_is_better
                     else "expected variant minus the other")
        return (f"{what} on this data: \"{self.statement}\" ({metric}, {direction}: "
                f"{self.effect_text()}{extra}).")


def claim_results(q, entries, runs) -> list[ClaimResult]:
    """The verdict on each of ``q``'s claims from the paired per-seed contrasts."""
    by_variant = _runs_of(q, entries, runs)
    results = []
    for claim in q.claims:
        names = claim.plus + claim.minus
        seeds = set.intersection(*(set(by_variant[n]) for n in names)) if names else set()
        differences, diverged = [], 0
        for seed in sorted(seeds):
            chosen = [by_variant[n][seed] for n in names]
            diverged += sum(run["status"] == "diverged" for run in chosen)
            values = [_value(run, claim.metric) for run in chosen]
            if any(v is None for v in values):
                continue
            plus = sum(values[:len(claim.plus)])
            minus = sum(values[len(claim.plus):])
            differences.append((minus - plus) if claim.lower_is_better else (plus - minus))
        paired = paired_verdict(differences)
        # Store the difference in the metric's own direction (plus - minus).
        sign = -1 if claim.lower_is_better else 1
        results.append(ClaimResult(
            q.number, claim.statement, claim.source, claim.metric, paired.verdict,
            sign * paired.difference.mean, sign * paired.difference.low,
            sign * paired.difference.high, paired.d_z, paired.difference.n, diverged,
            claim.lower_is_better, [sign * d for d in differences]))
    return results


@dataclass
class VariantSummary:
    name: str
    label: str
    n_ok: int
    n_diverged: int
    n_missing: int
    test_acc: Interval
    final_train_loss: Interval
    gap: Interval
    train_acc: Interval
    epochs_to_target: Interval
    seconds_to_target: Interval
    reached: int
    curves: dict
    chance: float = math.nan


def _summaries(q, entries, runs, n_seeds: int) -> list[VariantSummary]:
    by_variant = _runs_of(q, entries, runs)
    summaries = []
    for variant in q.variants:
        seed_runs = by_variant[variant.name]
        ok = [run for run in seed_runs.values() if run["status"] == "ok"]

        def interval(metric, pool=ok):
            values = [run["metrics"][metric] for run in pool
                      if run["metrics"].get(metric) is not None
                      and math.isfinite(run["metrics"][metric])]
            return mean_interval(values)

        reached = [run for run in ok if run["metrics"].get("epochs_to_target") is not None]
        summaries.append(VariantSummary(
            variant.name, variant.label, len(ok), len(seed_runs) - len(ok),
            n_seeds - len(seed_runs), interval("test_acc"), interval("final_train_loss"),
            interval("gap"), interval("train_acc"), interval("epochs_to_target", reached),
            interval("seconds_to_target", reached), len(reached), _mean_curves(ok),
            next((run["metrics"]["chance"] for run in seed_runs.values()), math.nan)))
    return summaries


def _seed_values(q, entries, runs) -> dict[str, list[tuple[float, str]]]:
    """variant name -> [(test accuracy, status)] over its stored seeds."""
    return {name: [(run["metrics"]["test_acc"], run["status"]) for run in by_seed.values()]
            for name, by_seed in _runs_of(q, entries, runs).items()}


def _mean_curves(runs: list[dict]) -> dict:
    """Per-epoch means over runs (over the runs that reached each epoch)."""
    if not runs:
        return {}
    length = max(len(run["curves"]["epoch"]) for run in runs)
    curves = {}
    for key in ("train_loss", "train_acc", "val_acc", "test_acc"):
        means = []
        for epoch in range(length):
            values = [run["curves"][key][epoch] for run in runs
                      if epoch < len(run["curves"][key])
                      and math.isfinite(run["curves"][key][epoch])]
            means.append(sum(values) / len(values) if values else math.nan)
        curves[key] = means
    curves["epoch"] = list(range(1, length + 1))
    return curves


# --------------------------------------------------------------------------- formatting

def _pct(interval: Interval) -> str:
    if interval.n == 0:
        return "–"
    if not math.isfinite(interval.low):
        return f"{100 * interval.mean:.2f}"
    return f"{100 * interval.mean:.2f} ± {100 * interval.half_width:.2f}"


def _num(interval: Interval, digits: int = 3) -> str:
    if interval.n == 0:
        return "–"
    if not math.isfinite(interval.low):
        return f"{interval.mean:.{digits}f}"
    return f"{interval.mean:.{digits}f} ± {interval.half_width:.{digits}f}"


def _target_cell(summary: VariantSummary, seconds: bool) -> str:
    interval = summary.seconds_to_target if seconds else summary.epochs_to_target
    n = summary.n_ok
    if summary.reached == 0:
        return f"not reached (0/{n})" if n else "–"
    text = _num(interval, 1)
    return text if summary.reached == n else f"{text} ({summary.reached}/{n})"


class _Document:
    """Blocks rendered to both Markdown and HTML."""

    def __init__(self):
        self.blocks: list[tuple] = []

    def heading(self, level: int, text: str, anchor: str | None = None):
        self.blocks.append(("h", level, text, anchor))

    def paragraph(self, text: str):
        self.blocks.append(("p", text))

    def bullets(self, items: list[str]):
        self.blocks.append(("ul", items))

    def table(self, header: list[str], rows: list[list[str]]):
        self.blocks.append(("table", header, rows))

    def image(self, path: str, alt: str):
        self.blocks.append(("img", path, alt))

    def markdown(self) -> str:
        parts = []
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                anchor = f'<a id="{block[3]}"></a>\n\n' if block[3] else ""
                parts.append(anchor + "#" * block[1] + " " + block[2])
            elif kind == "p":
                parts.append(block[1])
            elif kind == "ul":
                parts.append("\n".join(f"- {item}" for item in block[1]))
            elif kind == "table":
                header, rows = block[1], block[2]
                lines = ["| " + " | ".join(header) + " |",
                         "|" + "|".join("---" for _ in header) + "|"]
                lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"
                          for row in rows]
                parts.append("\n".join(lines))
            elif kind == "img":
                parts.append(f"![{block[2]}]({block[1]})")
        return "\n\n".join(parts) + "\n"

    def html(self, title: str) -> str:
        body = []
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                anchor = f' id="{block[3]}"' if block[3] else ""
                body.append(f"<h{block[1]}{anchor}>{_inline(block[2])}</h{block[1]}>")
            elif kind == "p":
                body.append(f"<p>{_inline(block[1])}</p>")
            elif kind == "ul":
                body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in block[1])
                            + "</ul>")
            elif kind == "table":
                head = "".join(f"<th>{_inline(h)}</th>" for h in block[1])
                rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row)
                               + "</tr>" for row in block[2])
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}"
                            "</tbody></table>")
            elif kind == "img":
                body.append(f'<figure><img src="{html.escape(block[1])}" '
                            f'alt="{html.escape(block[2])}"></figure>')
        style = ("body{font-family:system-ui,sans-serif;max-width:70em;margin:2em auto;"
                 "padding:0 1em;line-height:1.45}table{border-collapse:collapse;margin:1em 0;"
                 "font-size:0.92em}th,td{border:1px solid #ccc;padding:0.25em 0.6em;"
                 "text-align:left}th{background:#f3f3f3}img{max-width:100%}"
                 "code{background:#f3f3f3;padding:0 0.2em}")
        return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{html.escape(title)}</title><style>{style}</style></head><body>\n"
                + "\n".join(body) + "\n</body></html>\n")


def _inline(text: str) -> str:
    """Escape for HTML, and render `code`, **bold**, *italic* and [links](#anchor)."""
    import re

    escaped = html.escape(text, quote=False)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    escaped = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped)
    escaped = re.sub(r"(?<![*\w])\*([^*]+)\*(?![*\w])", r"<em>\1</em>", escaped)
    return re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r'<a href="\2">\1</a>', escaped)


# --------------------------------------------------------------------------- plots

def _matplotlib():
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


def _plot_curves(plt, q, summaries, path: Path) -> None:
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


def _plot_final(plt, q, summaries, seed_values, path: Path) -> None:
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


def _plot_sweep(plt, q, summaries, path: Path) -> None:
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


# --------------------------------------------------------------------------- writing

_ADVICE_MARK = {"supported": "agree", "contradicted": "disagree",
                "inconclusive": "cannot tell"}


def _run_seconds(run: dict) -> float:
    return run["metrics"].get("wall_seconds", run["metrics"]["train_seconds"])


def _wall_clock(runs: list[dict]) -> str:
    """From the first run's start to the last run's end (including any pause between
    an interrupted study and its resumption)."""
    import calendar

    if not runs:
        return "no runs yet"
    ends = [calendar.timegm(time.strptime(run["finished_at"], "%Y-%m-%dT%H:%M:%SZ"))
            for run in runs]
    start = min(end - _run_seconds(run) for end, run in zip(ends, runs))
    stamp = time.strftime("%Y-%m-%d %H:%M", time.gmtime(start))
    return (f"wall clock {(max(ends) - start) / 60:.0f} min from the first run's start "
            f"({stamp} UTC) to the last one's end, hosts "
            + ", ".join(sorted({run["host"] or "?" for run in runs})))


def _question_time(q, entries, runs) -> str:
    """The compute of one question's distinct stored runs (a run that two questions
    share counts in both)."""
    keys = {key for question, _, _, key in entries if question is q and key in runs}
    if not keys:
        return "Run time: no runs stored yet."
    minutes = sum(_run_seconds(runs[key]) for key in keys) / 60
    runs_text = "1 stored run" if len(keys) == 1 else f"{len(keys)} stored runs"
    return f"Run time: {minutes:.1f} min summed over its {runs_text}."


def write_csv(table, path: Path) -> None:
    columns = list(table.columns)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in table:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})


def write_report(out, questions, settings, data, entries, runs, table, *,
                 progress: bool = True) -> dict:
    """Write report.md, report.html, results.csv and the plots into ``out``."""
    out = Path(out)
    write_csv(table, out / "results.csv")
    plt = _matplotlib()
    plot_dir = out / "plots"
    if plt is not None:
        plot_dir.mkdir(exist_ok=True)
    results_by_question = {q.number: claim_results(q, entries, runs) for q in questions}
    doc = _Document()
    doc.heading(1, "bnrs study: batch norm and dropout, with evidence")
    distinct = {key for *_, key in entries}
    stored = [runs[k] for k in distinct if k in runs]
    compute = sum(_run_seconds(run) for run in stored)
    doc.paragraph(
        f"Data: **{data.name}** ({data.description}). {len(stored)} of {len(distinct)} "
        f"distinct runs stored ({sum(r['status'] == 'diverged' for r in stored)} "
        f"diverged), {settings.seeds} seeds per variant. Run time: {compute / 60:.1f} min "
        f"summed over runs (each question's below counts a run it shares with another "
        f"in both); {_wall_clock(stored)}. bnrs {__version__}; report written "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.")
    if len(stored) < len(distinct):
        doc.paragraph(f"**Incomplete:** {len(distinct) - len(stored)} runs are missing "
                      "(the study is still running or was interrupted); rerun the same "
                      "command to finish it.")

    doc.heading(2, "What this means for your network")
    doc.paragraph("Each line is a piece of common advice, the study's verdict on this "
                  "data, and the effect (expected variant minus the other; accuracy in "
                  "points). *Supported*: the 95% interval of the paired difference is on "
                  "the side the advice expects; *contradicted*: on the other side; "
                  "*inconclusive*: it includes zero (the effect, if any, is smaller than "
                  "the seed-to-seed noise at this budget).")
    items = []
    for q in questions:
        for result in results_by_question[q.number]:
            if result.n_seeds == 0:
                outcome = "not run yet"
            else:
                outcome = (f"**{result.verdict}**, the data {_ADVICE_MARK[result.verdict]}"
                           f" ({result.effect_text()})")
            items.append(f"[Q{q.number}](#q{q.number}) {result.statement}: {outcome}."
                         + (f" Advice: {result.source}." if result.source else ""))
    counts = {v: sum(r.verdict == v and r.n_seeds > 0 for rs in results_by_question.values()
                     for r in rs) for v in ("supported", "contradicted", "inconclusive")}
    doc.paragraph(f"{counts['supported']} claims supported, {counts['contradicted']} "
                  f"contradicted, {counts['inconclusive']} inconclusive on this data. The "
                  "verdicts hold for this setting (a small CNN, "
                  f"{settings.n_train} training images, {settings.epochs} epochs, Adam; "
                  "see [Method](#method)); a longer training, a larger network or other "
                  "data can change them, dropout's in particular (a regulariser pays off "
                  "once the network without it overfits; compare the train−test gaps).")
    doc.bullets(items)

    for q in questions:
        summaries = _summaries(q, entries, runs, settings.seeds)
        doc.heading(2, f"Q{q.number}. {q.title}", anchor=f"q{q.number}")
        for result in results_by_question[q.number]:
            doc.paragraph(result.sentence())
        budget = f"Budget: {q.n_train} training images, {q.epochs} epochs" + (
            f". {q.note}" if q.note else ".")
        doc.paragraph(f"{budget} {_question_time(q, entries, runs)}")
        header = ["variant", "architecture", "test acc. (%)", "final train loss",
                  "train−test gap (points)", "epochs to target", "seconds to target",
                  "diverged"]
        rows = []
        for variant, summary in zip(q.variants, summaries):
            extra = []
            if variant.batch_size:
                extra.append(f"batch {variant.batch_size}")
            if variant.lr is not None:
                extra.append(f"lr {variant.lr:.3g}")
            if variant.init_scale != 1.0:
                extra.append(f"init x{variant.init_scale:g}")
            arch = f"`{variant.architecture}`" + (f" ({', '.join(extra)})" if extra else "")
            gap = summary.gap
            gap_points = Interval(100 * gap.mean, 100 * gap.low, 100 * gap.high, gap.n)
            missing = f", {summary.n_missing} missing" if summary.n_missing else ""
            rows.append([summary.label, arch, _pct(summary.test_acc),
                         _num(summary.final_train_loss), _num(gap_points, 2),
                         _target_cell(summary, False), _target_cell(summary, True),
                         f"{summary.n_diverged}/{summary.n_ok + summary.n_diverged}"
                         + missing])
        doc.table(header, rows)
        if plt is not None and any(s.curves for s in summaries):
            names = [f"q{q.number}-curves.png", f"q{q.number}-accuracy.png"]
            _plot_curves(plt, q, summaries, plot_dir / names[0])
            _plot_final(plt, q, summaries, _seed_values(q, entries, runs),
                        plot_dir / names[1])
            if q.sweep:
                names.append(f"q{q.number}-sweep.png")
                _plot_sweep(plt, q, summaries, plot_dir / names[2])
            for name in names[::-1] if q.sweep else names:
                doc.image(f"plots/{name}", f"Q{q.number} {name.split('-', 1)[1][:-4]}")
        report_section(doc, q, entries, runs, plt, plot_dir)   # Q10 depths; Q7-10 gradients

    _method(doc, settings, data, plt is not None)
    (out / "report.md").write_text(doc.markdown())
    (out / "report.html").write_text(doc.html("bnrs study report"))
    if progress:
        import sys

        print(f"report: {out / 'report.md'}, {out / 'report.html'}, "
              f"{out / 'results.csv'}", file=sys.stderr)
        for q in questions:
            for result in results_by_question[q.number]:
                print(f"  Q{q.number}: {result.verdict:<12} {result.statement} "
                      f"({result.effect_text()})", file=sys.stderr)
    return {"markdown": out / "report.md", "html": out / "report.html",
            "csv": out / "results.csv"}


def _method(doc: _Document, settings, data, plots: bool) -> None:
    doc.heading(2, "Method", anchor="method")
    target = ("none" if settings.target_accuracy is None
              else f"{100 * settings.target_accuracy:g}% validation accuracy")
    profile = settings.profile
    doc.bullets([
        (f"Data: {data.description}. The training set is split once (seed 0) into a "
         f"stratified validation set of {settings.n_val} images and a stratified training "
         f"subset ({settings.n_train} images; question 6: {settings.small_batch_n_train})."
         " The test set is the dataset's own, complete."),
        (f"Networks: one template, `conv{profile.conv1}-[BN]-act-pool2-conv{profile.conv2}"
         f"-[BN]-act-pool2-fc{profile.hidden}-[BN]-act-fc(classes)`, 3x3 convolutions with "
         "padding 1, with only the studied factor changed (each table gives the "
         "architecture string in bnrs's grammar)."),
        (f"Training: Adam, learning rate {settings.lr:g}, batch {settings.batch_size}, "
         f"{settings.epochs} epochs (question 6: {settings.small_batch_epochs}), "
         "cross-entropy; an incomplete last batch is dropped. Question 6 scales the "
         f"learning rate by the square-root rule lr = {settings.lr:g} x sqrt(batch / "
         f"{settings.batch_size}). The loop is the study's own (bnrs.study.train) over "
         "bnrs.nn and bnrs.optim, so that it can pair seeds, scale the initial weights and "
         f"evaluate after every epoch (protocol version {PROTOCOL})."),
        (f"Seeds 0..{settings.seeds - 1}. The same seed gives every variant the same "
         "initial weights wherever the layer shapes agree (the conv and dense weights come "
         "from a separate random stream, unaffected by BN or dropout layers), the same "
         "order of mini-batches (for the same batch size) and the same data split; the "
         "comparisons are therefore paired by seed."),
        ("Measured after every epoch in evaluation mode: validation accuracy, accuracy on "
         f"a fixed sample of {settings.n_test_curve} test images (the curves), accuracy "
         f"and loss on {settings.n_train_eval} training images, and the epoch's mean "
         "mini-batch training loss."),
        ("Summary metric, fixed before looking at test data: the network of the epoch "
         "with the best validation accuracy is evaluated on the full test set (test "
         "accuracy); the train-test gap is that epoch's training-sample accuracy minus "
         "its test accuracy; final training loss is the last epoch's mean mini-batch "
         f"loss; epochs and seconds to target: the first epoch reaching {target}, and "
         "the training seconds until then (evaluation excluded; the machine may be "
         "shared, so seconds are noisy)."),
        ("A run diverged if its training loss became NaN or infinite, or if its best "
         "validation accuracy stayed within 5 points of chance. Tables average only the "
         "runs that did not diverge and count the others; in the paired verdicts a "
         "diverged run scores chance accuracy (a failed training is the outcome)."),
        ("Verdict: per seed, the difference of the claim's contrast; its mean and 95% "
         "Student-t interval over seeds. Supported if the interval is above zero, "
         "contradicted if below, inconclusive otherwise. Effect sizes: the mean "
         "difference and Cohen's d_z (mean / sd of the differences). No correction for "
         "the number of claims: at 95%, about one claim in twenty with no true effect "
         "would still get a verdict."),
        "Plots: " + ("see each question." if plots else
                     "**not drawn: matplotlib is not installed** (pip install "
                     "'bnrs[plot]')."),
    ])
