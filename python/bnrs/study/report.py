"""The study's report: report.md, report.html, results.csv and the plots, from stored runs.

The report is built only from the database and the plan, so ``bnrs study --report-only``
rebuilds it at any time (also while a study is still running: missing runs are counted).

Per question: a table of every variant (mean and 95% interval over the seeds that did not
diverge, and how many diverged), the verdict on each claim in one sentence, and plots:
learning curves (train and test accuracy and training loss per epoch), the test accuracy
of every variant with its interval, and for sweeps (batch size, learning rate, initial
scale) the accuracy against the factor with and without BN. Question 10 also gets where
each variant stops training and accuracy and training loss against depth; questions 7-10
the per-layer gradient diagnostics (each run's ``curves["layers"]``, recorded by
:func:`bnrs.diagnostics.run_recorder`). Plots need matplotlib (the ``plot`` extra; they
are drawn by :mod:`bnrs.study.plots`); without it the report says so and has everything
else.

The numbers come from :mod:`bnrs.study.results`; this module formats them.
"""

from __future__ import annotations

import calendar
import html
import math
import re
import sys
import time
from pathlib import Path

from .. import __version__, diagnostics
from .plots import (
    load_pyplot,
    plot_curves,
    plot_depth,
    plot_diagnostics,
    plot_final,
    plot_sweep,
)
from .questions import STUCK_FRACTION, Question
from .results import (
    ALPHA,
    VariantSummary,
    adjust_claims,
    claim_results,
    diagnosed_variants,
    mean_layers,
    minimum_detectable_effects,
    runs_by_variant,
    seed_values,
    stopping_depths,
    variant_summaries,
    write_csv,
)
from .stats import Interval
from .train import PROTOCOL

__all__ = ["write_report"]

#: The questions whose report sections get the per-layer gradient diagnostics.
DIAGNOSED_QUESTIONS = (7, 8, 9, 10)


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
    escaped = html.escape(text, quote=False)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    escaped = re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped)
    escaped = re.sub(r"(?<![*\w])\*([^*]+)\*(?![*\w])", r"<em>\1</em>", escaped)
    return re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r'<a href="\2">\1</a>', escaped)


# --------------------------------------------------------------------------- writing



def _run_seconds(run: dict) -> float:
    return run["metrics"].get("wall_seconds", run["metrics"]["train_seconds"])


def _wall_clock(runs: list[dict]) -> str:
    """From the first run's start to the last run's end (including any pause between
    an interrupted study and its resumption)."""
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


def write_report(out, questions, settings, data, entries, runs, table, *,
                 progress: bool = True) -> dict:
    """Write report.md, report.html, results.csv and the plots into ``out``."""
    out = Path(out)
    write_csv(table, out / "results.csv")
    plt = load_pyplot()
    plot_dir = out / "plots"
    if plt is not None:
        plot_dir.mkdir(exist_ok=True)
    results_by_question = {q.number: claim_results(q, entries, runs) for q in questions}
    every_result = [r for q in questions for r in results_by_question[q.number]]
    adjust_claims(every_result)
    n_tests = sum(math.isfinite(r.p) for r in every_result) + sum(
        math.isfinite(r.tost_p) for r in every_result)
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
    _summary(doc, questions, results_by_question, settings)

    for q in questions:
        summaries = variant_summaries(q, entries, runs, settings.seeds)
        doc.heading(2, f"Q{q.number}. {q.title}", anchor=f"q{q.number}")
        for result in results_by_question[q.number]:
            doc.paragraph(result.sentence())
        mde = _mde_text(results_by_question[q.number], n_tests)
        if mde:
            doc.paragraph(mde)
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
            plot_curves(plt, q, summaries, plot_dir / names[0])
            plot_final(plt, q, summaries, seed_values(q, entries, runs),
                       plot_dir / names[1])
            if q.sweep:
                names.append(f"q{q.number}-sweep.png")
                plot_sweep(plt, q, summaries, plot_dir / names[2])
            for name in names[::-1] if q.sweep else names:
                doc.image(f"plots/{name}", f"Q{q.number} {name.split('-', 1)[1][:-4]}")
        _depth_and_diagnostics(doc, q, entries, runs, plt, plot_dir)

    _method(doc, settings, data, plt is not None)
    (out / "report.md").write_text(doc.markdown())
    (out / "report.html").write_text(doc.html("bnrs study report"))
    if progress:
        print(f"report: {out / 'report.md'}, {out / 'report.html'}, "
              f"{out / 'results.csv'}", file=sys.stderr)
        for q in questions:
            for result in results_by_question[q.number]:
                print(f"  Q{q.number}: {result.verdict:<12} {result.statement} "
                      f"({result.effect_text()}, Holm p {_p_cell(result.p_holm)})",
                      file=sys.stderr)
    return {"markdown": out / "report.md", "html": out / "report.html",
            "csv": out / "results.csv"}


# --------------------------------------------------------------------------- summary

_VERDICT_CELL = {"supported": "**supported**", "contradicted": "**contradicted**",
                 "inconclusive": "inconclusive"}


def _p_cell(p: float) -> str:
    if not math.isfinite(p):
        return "–"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _summary(doc: _Document, questions, results_by_question, settings) -> None:
    """The table a practitioner reads first: one row per piece of advice."""
    results = [r for q in questions for r in results_by_question[q.number]]
    run = [r for r in results if r.n_seeds > 0]
    n_tests = sum(math.isfinite(r.p) for r in run) + sum(math.isfinite(r.tost_p)
                                                         for r in run)
    counts = {v: sum(r.verdict == v for r in run)
              for v in ("supported", "contradicted", "inconclusive")}
    raw = {v: sum(r.raw_verdict == v for r in run)
           for v in ("supported", "contradicted", "inconclusive")}
    with_margin = [r for r in run if r.margin is not None and math.isfinite(r.tost_p)]
    equivalent = sum(r.equivalence_verdict() == "equivalent" for r in with_margin)
    equivalent_raw = sum(r.equivalence_verdict(False) == "equivalent" for r in with_margin)
    doc.paragraph(
        "One row per piece of common advice: the study's verdict on this data, the "
        "effect (expected variant minus the other, accuracy in points; for the "
        "divergence claim the diverged runs), its interval at the claim's Holm level and "
        f"its p-value raw, Holm-adjusted and Benjamini-Hochberg-adjusted (BH). Verdicts "
        f"are Holm-adjusted over all {n_tests} tests of the study (family-wise error "
        f"{ALPHA:g}): *supported* / *contradicted*: Holm p < {ALPHA:g} with the effect "
        "on the side the advice expects / the other side; *inconclusive*: not shown "
        "either way at this budget (see each question's smallest detectable effect). "
        "Rows marked *≈* also test the competing advice that the factor makes no "
        "difference (equivalence within ±1 point, TOST, Holm-adjusted).")
    doc.paragraph(
        f"**{counts['supported']} claims supported, {counts['contradicted']} "
        f"contradicted, {counts['inconclusive']} inconclusive** after Holm's adjustment "
        f"({raw['supported']}, {raw['contradicted']} and {raw['inconclusive']} "
        f"unadjusted); of the {len(with_margin)} \"makes no difference\" counterparts, "
        f"{equivalent} shown equivalent ({equivalent_raw} unadjusted). The verdicts hold "
        f"for this setting (a small CNN, {settings.n_train} training images, "
        f"{settings.epochs} epochs, Adam; see [Method](#method)); a longer training, a "
        "larger network or other data can change them, dropout's in particular (a "
        "regulariser pays off once the network without it overfits; compare the "
        "train−test gaps).")
    rows = []
    for q in questions:
        for r in results_by_question[q.number]:
            # The table stays narrow: a statement's parenthesis (its numbers from the
            # literature) is in the question's section.
            advice = f"[Q{q.number}](#q{q.number}) {r.statement.split(' (')[0]}"
            if r.n_seeds == 0:
                rows.append([advice, "not run yet", "–", "–", "–", "–", "–"])
                continue
            if r.test == "exact McNemar":
                effect = f"{r.plus_diverged}/{r.n_seeds} vs {r.minus_diverged}/{r.n_seeds} diverged"
                interval = "exact McNemar"
            else:
                effect = r.effect_text(interval=False)
                interval = r.adjusted_interval_text()
            verdict = _VERDICT_CELL[r.verdict]
            if r.raw_verdict != r.verdict:
                verdict += f" (raw: {r.raw_verdict})"
            rows.append([advice, verdict, effect, interval, _p_cell(r.p),
                         _p_cell(r.p_holm), _p_cell(r.p_bh)])
            if r.margin is not None and math.isfinite(r.tost_p):
                scale, unit = (100, " point") if r.metric.endswith("acc") else (1, "")
                eq = r.equivalence_verdict()
                if r.equivalence_verdict(False) != eq:
                    eq += f" (raw: {r.equivalence_verdict(False)})"
                rows.append([f"≈ {r.equivalence_advice}", eq,
                             f"margin ±{scale * r.margin:g}{unit}",
                             f"90%: {r._range(r.tost_low, r.tost_high)}",
                             _p_cell(r.tost_p), _p_cell(r.tost_p_holm), "–"])
    doc.table(["advice", "verdict (Holm)", "effect", "Holm-level CI", "p", "p Holm",
               "p BH"], rows)


def _mde_text(results, n_tests: int) -> str:
    """The question's smallest detectable accuracy effect at 80% power."""
    # A divergence claim is decided on counts; its accuracy differences (a diverged run
    # at chance) would swamp the SD that the t-tests of the other claims face.
    accuracy = [r for r in results if r.metric.endswith("acc") and r.test == "paired t"]
    raw, strict = minimum_detectable_effects(accuracy, n_tests)
    if not math.isfinite(raw):
        return ""
    n = min(r.n_seeds for r in accuracy if r.n_seeds >= 2)
    return (f"Smallest effect this design detects (80% power, paired t over {n} seeds, "
            f"pooled SD of this question's accuracy differences): {100 * raw:.2f} points "
            f"at p < {ALPHA:g} unadjusted, {100 * strict:.2f} points at the strictest "
            f"Holm level ({ALPHA:g}/{n_tests}). Smaller true effects are likely to come "
            "out *inconclusive*.")


# --------------------------------------------------------------------------- question 10 and diagnostics

def _gradient_ratio_rows(q: Question, entries, runs) -> list[list[str]]:
    """Per diagnosed variant: first/last weight layer's gradient norm at init and end."""
    by_variant = runs_by_variant(q, entries, runs)
    rows = []
    for variant in diagnosed_variants(q):
        cells = [variant.label]
        for moment in (0, -1):
            columns = mean_layers(by_variant[variant.name], moment)
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


def _depth_and_diagnostics(doc, q: Question, entries, runs, plt, plot_dir) -> None:
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
            plot_depth(plt, q, entries, runs, plot_dir / f"q{q.number}-depth.png")
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
    if plt is not None and plot_diagnostics(plt, q, entries, runs, plot_dir / name):
        doc.image(f"plots/{name}", f"Q{q.number} per-layer gradients and activations")


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
        ("Effect: per seed, the difference of the claim's contrast; its mean, 95% "
         "Student-t interval over seeds and two-sided paired t-test p-value. Effect "
         "sizes: the mean difference and Cohen's d_z (mean / sd of the differences)."),
        ("Multiple comparisons: the study tests every claim and every equivalence "
         "counterpart (one family, the whole study). The verdicts are taken from "
         f"Holm's step-down adjusted p-values (family-wise error {ALPHA:g}): supported "
         "or contradicted when the Holm-adjusted p is below it, by the sign of the "
         "effect; inconclusive otherwise. The Benjamini-Hochberg (false discovery rate) "
         "adjusted p-value is shown beside it, and the raw verdict wherever it differs. "
         "The Holm-level interval is the t-interval at level 1 − "
         f"{ALPHA:g}/(m − k + 1), Holm's level at step k: the claim's own rank by raw "
         "p-value among the m tests if Holm rejects it, else the step where Holm "
         "stopped; it excludes zero exactly when the verdict is supported or "
         "contradicted."),
        ("Equivalence: claims whose competing advice says the factor makes no "
         "difference or can be removed (marked ≈) also get two one-sided t-tests "
         "(TOST) with a margin of ±1 accuracy point, stated per claim in questions.py "
         "(single runs differ by 0.5-1.4 points between seeds, so a smaller difference "
         "is invisible in practice; the margin was added after the runs, from that "
         "noise level, not tuned to their results): *equivalent* if the Holm-adjusted TOST "
         "p is below the level (the 90% interval lies inside ±1 point before "
         "adjustment), otherwise *not shown equivalent* (not the same as different)."),
        ("Divergence: whether runs diverge is a count, so the divergence claim is "
         "decided by the exact McNemar test (the two-sided binomial test of the seeds "
         "where exactly one of the two paired variants diverged); with "
         f"{settings.seeds} seeds its smallest possible p-value is "
         f"{min(1.0, 2 * 0.5 ** settings.seeds):.3g}."),
        ("Smallest detectable effect per question: (t(1 − α/2, n−1) + t(0.8, n−1)) · "
         "sd / √n for n seeds and the pooled SD of the question's paired accuracy "
         "differences (the normal-shift approximation to the noncentral t)."),
        "Plots: " + ("see each question." if plots else
                     "**not drawn: matplotlib is not installed** (pip install "
                     "'bnrs[plot]')."),
    ])
