"""The study's report: report.md, report.html, results.csv and the plots, from stored runs.

The report is built only from the database and the plan, so ``bnrs study --report-only``
rebuilds it at any time (also while a study is still running: missing runs are counted).

First the table a practitioner reads: one row per piece of advice, its verdict per
training regime with the effect and its Holm-level interval (the p-values, raw and
adjusted, are in each question's sentences and in ``claims.csv``), then the threats to
validity. Per question: a table of every variant (mean and 95% interval over the seeds
that did not diverge, the Kaplan-Meier median time to the target accuracy, seconds per
epoch, runs still improving at the end, and how many diverged), the verdict on each
claim in one sentence, and plots:
learning curves (train and test accuracy and training loss per epoch), the test accuracy
of every variant with its interval, and for sweeps (batch size, learning rate, initial
scale) the accuracy against the factor with and without BN. Question 10 also gets where
each variant stops training and accuracy and training loss against depth; questions 7-10
the per-layer gradient diagnostics (each run's ``curves["layers"]``, recorded by
:func:`bnrs.diagnostics.run_recorder`). Plots need matplotlib (the ``plot`` extra; they
are drawn by :mod:`bnrs.study.plots`); without it the report says so and has everything
else.

Near the end, what BN costs per epoch and what it does to the train-test gap
(:func:`bnrs.study.results.bn_costs`; every BN pair in ``bn-cost.csv``).

The numbers come from :mod:`bnrs.study.results`; this module formats them.
"""

from __future__ import annotations

import calendar
import html
import math
import re
import sys
import time
from collections import Counter
from pathlib import Path

from .. import __version__, diagnostics
from .plots import (
    load_pyplot,
    plot_curves,
    plot_depth,
    plot_diagnostics,
    plot_final,
    plot_sweep,
    plot_time_to_target,
)
from .questions import (
    COUNT_CLAIM_SEED_FACTOR,
    STUCK_FRACTION,
    Question,
    count_claim_variants,
)
from .results import (
    ALPHA,
    DEFAULT_REGIME,
    REGIME_TITLES,
    RISING_FRACTION,
    BnCost,
    ClaimResult,
    VariantSummary,
    adjust_claims,
    bn_costs,
    claim_results,
    diagnosed_variants,
    mean_layers,
    minimum_detectable_effects,
    runs_by_variant,
    seed_values,
    stopping_depths,
    variant_regime,
    variant_summaries,
    write_claims_csv,
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


def _target_cell(summary: VariantSummary) -> str:
    """The Kaplan-Meier median epochs to the target over every stored run (a run that
    never got there, or diverged, counts as not yet there at the end of its budget)."""
    n = summary.n_ok + summary.n_diverged
    median = summary.median_epochs_to_target
    if n == 0 or math.isnan(median):
        return "–"
    text = "not by the end" if math.isinf(median) else f"{median:g}"
    return f"{text} ({summary.n_timed}/{n} reached)"


def _rising_cell(summary: VariantSummary) -> str:
    if summary.n_ok == 0:
        return "–"
    flag = " ↗" if summary.still_rising else ""
    return f"{summary.rising}/{summary.n_ok}{flag}"


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
            + ", ".join(sorted({run["host"] or "?" for run in runs}))
            + "; " + _levels_text(_simd_levels(runs)))


def _levels_text(levels: Counter) -> str:
    """"SIMD level avx2 (1 run)", or "SIMD levels avx2 (3 runs), not recorded (2 runs)"."""
    runs = [f"{level} ({n} run{'s' * (n != 1)})" for level, n in sorted(levels.items())]
    return f"SIMD level{'s' * (len(runs) != 1)} " + ", ".join(runs)


def _simd_levels(runs: list[dict]) -> Counter:
    """How many runs trained at each SIMD level ("not recorded" for runs stored before
    the level was)."""
    return Counter(run.get("simd") or "not recorded" for run in runs)


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
    write_claims_csv(every_result, out / "claims.csv")
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
        f"diverged), {_seeds_text(questions, settings)}. Run time: {compute / 60:.1f} min "
        f"summed over runs (each question's below counts a run it shares with another "
        f"in both); {_wall_clock(stored)}. bnrs {__version__}; report written "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.")
    levels = set(_simd_levels(stored))
    recorded = sorted(levels - {"not recorded"})
    if len(recorded) > 1 or (recorded and "not recorded" in levels):
        unknown = (" (and runs stored before the level was recorded, at a level not known)"
                   if "not recorded" in levels else "")
        doc.paragraph(f"**Mixed SIMD levels** ({', '.join(recorded)}{unknown}): the "
                      "kernels block their sums by register width, so the same seed at "
                      "two levels gives two different runs; the study was resumed on "
                      "another CPU, run on unlike machines, or run with `BNRS_SIMD` or "
                      "`bnrs.set_simd` in between.")
    if len(stored) < len(distinct):
        doc.paragraph(f"**Incomplete:** {len(distinct) - len(stored)} runs are missing "
                      "(the study is still running or was interrupted); rerun the same "
                      "command to finish it.")

    summaries_by_question = {q.number: variant_summaries(q, entries, runs)
                             for q in questions}
    doc.heading(2, "What this means for your network")
    _summary(doc, questions, results_by_question, settings)
    _threats(doc, questions, results_by_question, summaries_by_question, settings, data,
             n_tests, entries, runs)

    for q in questions:
        summaries = summaries_by_question[q.number]
        doc.heading(2, f"Q{q.number}. {q.title}", anchor=f"q{q.number}")
        for result in results_by_question[q.number]:
            doc.paragraph(result.sentence())
        mde = _mde_text(results_by_question[q.number], n_tests)
        if mde:
            doc.paragraph(mde)
        budget = f"Budget: {q.n_train} training images, {q.epochs} epochs" + (
            f". {q.note}" if q.note else ".")
        doc.paragraph(f"{budget} {_question_time(q, entries, runs)}")
        header = ["variant", "test acc. (%)", "final train loss",
                  "train−test gap (points)", "median epochs to target", "s / epoch",
                  "still rising", "diverged"]
        rows, architectures = [], []
        for variant, summary in zip(q.variants, summaries):
            extra = []
            if variant.batch_size:
                extra.append(f"batch {variant.batch_size}")
            if variant.lr is not None:
                extra.append(f"lr {variant.lr:.3g}")
            if variant.init_scale != 1.0:
                extra.append(f"init x{variant.init_scale:g}")
            architectures.append(f"{summary.label}: `{variant.architecture}`"
                                 + (f" ({', '.join(extra)})" if extra else ""))
            gap = summary.gap
            gap_points = Interval(100 * gap.mean, 100 * gap.low, 100 * gap.high, gap.n)
            missing = f", {summary.n_missing} missing" if summary.n_missing else ""
            rows.append([summary.label, _pct(summary.test_acc),
                         _num(summary.final_train_loss), _num(gap_points, 2),
                         _target_cell(summary), _num(summary.seconds_per_epoch, 2),
                         _rising_cell(summary),
                         f"{summary.n_diverged}/{summary.n_ok + summary.n_diverged}"
                         + missing])
        doc.table(header, rows)
        doc.paragraph("Architectures (bnrs's grammar):")
        doc.bullets(architectures)
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
            name = f"q{q.number}-time-to-target.png"
            if plot_time_to_target(plt, q, entries, runs, plot_dir / name):
                doc.image(f"plots/{name}", f"Q{q.number} time to target")
        _depth_and_diagnostics(doc, q, entries, runs, plt, plot_dir)

    _bn_cost(doc, questions, entries, runs, out)
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
            "csv": out / "results.csv", "claims": out / "claims.csv",
            "bn_cost": out / "bn-cost.csv"}


# --------------------------------------------------------------------------- summary

_VERDICT_CELL = {"supported": "**supported**", "contradicted": "**contradicted**",
                 "inconclusive": "inconclusive"}


def _p_cell(p: float) -> str:
    if not math.isfinite(p):
        return "–"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _regime_order(regimes) -> list[str]:
    """The regimes present, the default first, the others as they first come."""
    present = list(dict.fromkeys(regimes))
    return sorted(present, key=lambda g: (g != DEFAULT_REGIME, present.index(g)))


def _advice_text(result: ClaimResult) -> str:
    """The advice in plain words: a trailing parenthesis that cites the literature (it
    has a year) is left for the question's section; others (a variant's name) stay."""
    return re.sub(r"\s*\([^()]*(19|20)\d\d[^()]*\)$", "", result.advice or result.statement)


def _verdict_cell(result: ClaimResult) -> str:
    """verdict: effect (Holm-level interval), plus the notes a reader needs."""
    r = result
    if r.n_seeds == 0:
        return "not run yet"
    notes = []
    if r.overall_verdict == "equivalent":
        scale, unit = r._scale
        text = (f"**equivalent** within ±{scale * r.margin:g}{unit.rstrip('s')} "
                f"(90% CI {r._range(r.tost_low, r.tost_high)})")
    else:
        text = _VERDICT_CELL[r.verdict]
        if r.test == "exact McNemar":
            text += (f": diverged {r.plus_diverged}/{r.n_seeds} vs "
                     f"{r.minus_diverged}/{r.n_seeds}")
        elif r.test == "exact sign":
            text += (f": {r.effect_text(interval=False)}"
                     + (f" ({r.adjusted_interval_text()})"
                        if r.adjusted_interval_text() != "–" else "")
                     + f"; reached {r.plus_reached}/{r.n_seeds} vs "
                     f"{r.minus_reached}/{r.n_seeds}")
        else:
            text += f": {r.effect_text(interval=False)}"
            if r.adjusted_interval_text() != "–":
                # A lower-is-better interval is of how much lower (the effect may say
                # "higher").
                lower = " lower" if r.lower_is_better else ""
                text += f" ({r.adjusted_interval_text()}{lower})"
        if r.equivalence_verdict(False) == "equivalent":
            notes.append("within the margin before adjustment")
    if r.raw_verdict != r.verdict:
        notes.append(f"{r.raw_verdict} before adjustment")
    if notes:
        text += "; " + ", ".join(notes)
    return text + (" ↗" if r.rising else "")


def _summary_rows(questions, results_by_question) -> tuple[list[str], list[list[str]]]:
    """The regimes (columns) and one row per piece of advice: the same advice in
    several regimes shares a row."""
    results = [(q, r) for q in questions for r in results_by_question[q.number]]
    regimes = _regime_order(r.regime for _, r in results)
    rows: list[dict] = []
    for q, r in results:
        advice = _advice_text(r)
        row = next((row for row in rows if row["advice"] == advice
                    and r.regime not in row["cells"]), None)
        if row is None:
            row = {"advice": advice, "questions": [], "cells": {}}
            rows.append(row)
        if q.number not in row["questions"]:
            row["questions"].append(q.number)
        row["cells"][r.regime] = _verdict_cell(r)
    table = []
    for row in rows:
        links = ", ".join(f"[Q{n}](#q{n})" for n in row["questions"])
        table.append([f"{links} {row['advice']}"]
                     + [row["cells"].get(g, "–") for g in regimes])
    return regimes, table


def _summary(doc: _Document, questions, results_by_question, settings) -> None:
    """The table a practitioner reads first: one row per piece of advice."""
    results = [r for q in questions for r in results_by_question[q.number]]
    run = [r for r in results if r.n_seeds > 0]
    n_tests = sum(math.isfinite(r.p) for r in run) + sum(math.isfinite(r.tost_p)
                                                         for r in run)
    counts = {v: sum(r.overall_verdict == v for r in run)
              for v in ("supported", "contradicted", "equivalent", "inconclusive")}
    raw = {v: sum(r.raw_verdict == v for r in run)
           for v in ("supported", "contradicted", "inconclusive")}
    with_margin = [r for r in run if r.margin is not None and math.isfinite(r.tost_p)]
    equivalent_raw = sum(r.equivalence_verdict(False) == "equivalent" for r in with_margin)
    doc.paragraph(
        "One row per piece of common advice, with the study's verdict on this data in "
        "each training regime, the effect (expected variant minus the other: accuracy "
        "in points; loss as how much lower; time to the target accuracy as the median "
        "paired difference; for divergence the diverged runs) and, in parentheses, its "
        "interval at the claim's Holm level. Verdicts are Holm-adjusted over all "
        f"{n_tests} tests of the study (family-wise error {ALPHA:g}): *supported* / "
        f"*contradicted*: Holm p < {ALPHA:g} with the effect on the side the advice "
        "expects / the other side; *equivalent*: the advice's \"makes no difference\" "
        "counterpart is shown by two one-sided tests within the margin stated up front "
        "(Holm-adjusted too); *inconclusive*: not shown either way at this budget (see "
        "each question's smallest detectable effect). ↗: a variant of the claim was "
        "still improving when training stopped (its best validation epoch in the last "
        f"{100 * RISING_FRACTION:g}% of the epochs for most seeds): a longer budget may "
        "change the verdict. The p-values (raw, Holm, Benjamini-Hochberg) are in each "
        "question's section and, with every other statistic, in `claims.csv`.")
    doc.paragraph(
        f"**{counts['supported']} claims supported, {counts['contradicted']} "
        f"contradicted, {counts['equivalent']} equivalent, {counts['inconclusive']} "
        f"inconclusive** after Holm's adjustment ({raw['supported']}, "
        f"{raw['contradicted']} and {raw['inconclusive']} supported, contradicted and "
        f"inconclusive unadjusted; {equivalent_raw} of {len(with_margin)} \"makes no "
        "difference\" counterparts within the margin unadjusted). The verdicts hold for "
        f"this setting only (see [Threats to validity](#threats)).")
    regimes, rows = _summary_rows(questions, results_by_question)
    doc.table(["advice"] + [REGIME_TITLES.get(g, g) for g in regimes], rows)


def _seeds_text(questions, settings) -> str:
    """The seeds per variant, with the count claims' variants' own number if any."""
    counted = any(count_claim_variants(q) for q in questions)
    return f"{settings.seeds} seeds per variant" + (
        f" ({COUNT_CLAIM_SEED_FACTOR * settings.seeds} for the variants of claims decided "
        "on counts: steps to a target accuracy, diverged runs)" if counted else "")


def _undecidable_counts(results, n_tests: int) -> list[str]:
    """The threat item for claims whose exact test on counts cannot pass Holm here.

    Over n paired seeds an exact sign or McNemar test gives p >= 2 * 0.5**n even when
    every seed agrees. Holm's step-down compares the k-th smallest p-value with
    alpha / (m - k + 1), so that p is reached only after m - floor(alpha / p) other tests
    have been rejected; where the study rejected fewer, the claim can be neither
    supported nor contradicted, whatever its data.
    """
    rejected = sum(r.p_holm < ALPHA for r in results if math.isfinite(r.p_holm)) + sum(
        r.tost_p_holm < ALPHA for r in results if math.isfinite(r.tost_p_holm))
    blocked = []
    for r in results:
        if r.test not in ("exact sign", "exact McNemar") or r.n_seeds < 1:
            continue
        p_min = min(1.0, 2 * 0.5 ** r.n_seeds)
        if n_tests - math.floor(ALPHA / p_min) > rejected:
            blocked.append((r, p_min))
    if not blocked:
        return []
    n_seeds = sorted({r.n_seeds for r, _ in blocked})
    p_min = max(p for _, p in blocked)
    needed = next(n for n in range(1, 64) if 2 * 0.5 ** n < ALPHA / n_tests)
    advice = list(dict.fromkeys(f"Q{r.question} {_advice_text(r)}" for r, _ in blocked))
    return [(f"**Claims this design cannot decide.** {len(blocked)} claims ("
             f"{len(advice)} pieces of advice, some in both regimes) are tested on "
             f"counts over {' or '.join(map(str, n_seeds))} paired seeds (steps to a "
             "target accuracy by the exact sign test, diverged runs by the exact McNemar "
             f"test): even when every seed agrees their p-value is at least {p_min:.3g}, "
             f"which Holm's step-down reaches only after about "
             f"{n_tests - math.floor(ALPHA / p_min)} of the {n_tests} tests have been "
             f"rejected before it (this study rejected {rejected}). Their verdict is "
             f"*inconclusive* by construction, not for lack of an effect; {needed} "
             f"seeds would bring the smallest p under Holm's strictest level "
             f"{ALPHA / n_tests:.2g}. They are: {'; '.join(advice)}.")]


def _threats(doc: _Document, questions, results_by_question, summaries_by_question,
             settings, data, n_tests: int, entries, runs) -> None:
    """What limits the verdicts, with the numbers of this study where it has them."""
    results = [r for q in questions for r in results_by_question[q.number]]
    summaries = [s for q in questions for s in summaries_by_question[q.number]]
    rising = [s for s in summaries if s.still_rising]
    timed = [s for s in summaries if s.n_ok + s.n_diverged]
    budgets: dict[tuple, list[int]] = {}
    for q, variant, _, key in entries:
        run = runs.get(key)
        if run is not None:
            budget = (variant_regime(q, variant), run["config"]["n_train"],
                      run["config"]["epochs"])
            numbers = budgets.setdefault(budget, [])
            if q.number not in numbers:
                numbers.append(q.number)
    several_regimes = len({regime for regime, _, _ in budgets}) > 1
    # Protocol 2 draws each seed's own training subset; protocol 1 one fixed subset.
    per_seed_subset = bool(runs) and all(run["config"].get("protocol", 1) >= 2
                                         for run in runs.values())
    mdes = [100 * r.mde_holm for r in results
            if r.test == "paired t" and r.unit == "points" and math.isfinite(r.mde_holm)]
    optimizer = {"adam": "Adam", "sgd": "SGD with momentum 0.9"}.get(settings.optimizer,
                                                                    settings.optimizer)
    doc.heading(2, "Threats to validity", anchor="threats")
    items = [
        (f"**Dataset.** One dataset, {data.name} ({data.description}). BN's and "
         "dropout's published effects come mostly from larger natural-image datasets; "
         "on other data the sizes, and some signs, of the effects can differ."),
        (f"**Network size.** Small CNNs (the template conv{settings.profile.conv1}-"
         f"conv{settings.profile.conv2}-fc{settings.profile.hidden}; question 10's "
         "plain stacks of 16-channel convolutions). Claims about deep or wide networks "
         "are tested only at these sizes."),
        ("**Budget.** " + "; ".join(
            f"{n} training images, {e} epochs"
            + (f", {REGIME_TITLES.get(regime, regime)}" if several_regimes else "")
            + f" ({', '.join(f'Q{number}' for number in numbers)})"
            for (regime, n, e), numbers in budgets.items())
         + f". {len(rising)} of {len(timed)} variants were still improving when "
         "training stopped (marked ↗ next to the verdicts they enter): a longer budget "
         "can change those verdicts, a regulariser's (dropout's) above all, which pays "
         "off only once the network without it overfits (compare the train−test "
         "gaps)."),
        (f"**Optimizer.** {optimizer}, learning rate {settings.lr:g}, batch "
         f"{settings.batch_size}, unless a question varies them. Claims about learning "
         "rates and initialisation are claims about this optimizer; with another one "
         "(plain SGD, where BN's higher-learning-rate advice comes from) the answer "
         "can change."),
        ("**Statistical power.** " + (
            f"At the strictest Holm level over {n_tests} tests the design detects, "
            f"with 80% power, accuracy effects of {min(mdes):.2f} to {max(mdes):.2f} "
            "points (per claim, from its seeds and the SD of its paired differences): "
            "*inconclusive* below that is no evidence of no effect (only "
            "*equivalent* is)." if mdes else "Too few seeds for a power estimate.")),
        *_undecidable_counts(results, n_tests),
        ("**What varies between seeds.** Initial weights, the order of mini-batches and "
         "dropout masks" + (", and each seed's own training subset" if per_seed_subset
                            else "; the training subset is one fixed draw for all seeds "
                            "(protocol 1), so the intervals leave out which images were "
                            "drawn") + "."),
        ("**Timing.** Seconds per epoch are measured while other runs shared the "
         "machine's cores, so BN's time cost is noisy; the paired ratio (same seed, "
         "with and without BN) removes part of that noise, not all."),
        ("**What would change the answer.** Other data (natural images, more classes), "
         "larger or deeper networks, a training budget long enough for every variant "
         "to converge, another optimizer or learning-rate schedule, and, for small "
         "batches, normalisations that do not depend on the batch."),
    ]
    doc.bullets(items)


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


def _ratio_text(interval: Interval) -> str:
    if interval.n == 0:
        return "–"
    if math.isnan(interval.low):
        return f"{interval.mean:.2f}x"
    return f"{interval.mean:.2f}x ({interval.low:.2f} to {interval.high:.2f})"


def _difference_text(interval: Interval) -> str:
    """A difference of accuracies (fractions) in points, with its 95% interval."""
    if interval.n == 0:
        return "–"
    if math.isnan(interval.low):
        return f"{100 * interval.mean:+.2f}"
    return (f"{100 * interval.mean:+.2f} ({100 * interval.low:+.2f} to "
            f"{100 * interval.high:+.2f})")


BN_COST_COLUMNS = ("question", "regime", "with_bn", "without_bn", "n_seeds",
                   "seconds_per_epoch_with", "seconds_per_epoch_without",
                   "seconds_ratio", "seconds_ratio_low", "seconds_ratio_high",
                   "gap_with", "gap_without", "gap_difference", "gap_difference_low",
                   "gap_difference_high")


def _write_bn_costs(costs: list[BnCost], path: Path) -> None:
    import csv

    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(BN_COST_COLUMNS)
        for c in costs:
            values = [c.question, c.regime, c.with_bn, c.without_bn, c.seconds_ratio.n,
                      c.seconds_with.mean, c.seconds_without.mean, c.seconds_ratio.mean,
                      c.seconds_ratio.low, c.seconds_ratio.high, c.gap_with.mean,
                      c.gap_without.mean, c.gap_difference.mean, c.gap_difference.low,
                      c.gap_difference.high]
            writer.writerow(["" if isinstance(v, float) and math.isnan(v) else v
                             for v in values])


def _bn_cost(doc: _Document, questions, entries, runs, out: Path) -> None:
    """BN's time per epoch and its effect on the train-test gap: per question the BN
    pair at its baseline setting (a pair two questions share is shown once), every pair
    in bn-cost.csv."""
    every, shown, seen = [], [], set()
    for q in questions:
        costs = bn_costs(q, entries, runs)
        every += costs
        baseline = q.variant(q.baseline).label if q.baseline else None
        chosen = next((c for c in costs if baseline in (c.with_bn, c.without_bn)),
                      costs[0] if costs else None)
        if chosen is None:
            continue
        # Questions that share their baseline runs (Q1's pair is Q7's x1 and Q8's x1)
        # give identical numbers under other labels.
        key = (chosen.regime, chosen.seconds_ratio, chosen.gap_difference)
        if key not in seen:
            seen.add(key)
            shown.append(chosen)
    _write_bn_costs(every, out / "bn-cost.csv")
    if not shown:
        return
    doc.heading(2, "What BN costs, and what it does to overfitting", anchor="bn-cost")
    doc.paragraph(
        "Per question, its variants with and without BN at the question's baseline "
        "setting, paired by seed over the seeds where both trained: training seconds "
        "per epoch (evaluation excluded) and their ratio with BN over without (the "
        "geometric mean of the per-seed ratios, 95% interval); the train−test gap "
        "(training-sample minus test accuracy at the best validation epoch) and its "
        "difference with BN minus without (points, 95% interval; positive: BN "
        "overfits more). Every BN pair of the study is in `bn-cost.csv`. The runs "
        "shared the machine with other runs, so the times are noisy.")
    rows = []
    for c in shown:
        regime = f" ({c.regime})" if c.regime != DEFAULT_REGIME else ""
        rows.append([(f"[Q{c.question}](#q{c.question}){regime} {c.with_bn} vs "
                      f"{c.without_bn}"),
                     f"{c.seconds_with.mean:.2f} vs {c.seconds_without.mean:.2f}",
                     _ratio_text(c.seconds_ratio),
                     f"{100 * c.gap_with.mean:.2f} vs {100 * c.gap_without.mean:.2f}",
                     _difference_text(c.gap_difference), str(c.seconds_ratio.n)])
    doc.table(["variants (with vs without BN)", "s / epoch", "time ratio",
               "gap (points)", "gap difference", "seeds"], rows)


def _method(doc: _Document, settings, data, plots: bool) -> None:
    doc.heading(2, "Method", anchor="method")
    target = ("none" if settings.target_accuracy is None
              else f"{100 * settings.target_accuracy:g}% validation accuracy")
    overfit = getattr(settings, "overfit_target_accuracy", None)
    overfit_target = ("" if overfit is None else
                      f" ({100 * overfit:g}% in the overfitting regime)")
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
        (f"Seeds 0..{settings.seeds - 1} (0..{COUNT_CLAIM_SEED_FACTOR * settings.seeds - 1} "
         "for the variants of claims decided on counts, whose exact tests need them to "
         "pass Holm's adjustment). The same seed gives every variant the same "
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
         f"loss; time to target: the first epoch reaching {target}{overfit_target} "
         "(and the optimizer steps until then); seconds per epoch: the training seconds "
         "(evaluation excluded) over the epochs (the machine may be shared, so seconds "
         "are noisy)."),
        ("Time to the target accuracy counts every run: one that never reaches the "
         "target within its budget (or diverged) is censored at the budget, not left "
         "out. Per variant the table gives the Kaplan-Meier median (\"not by the end\" "
         "when fewer than half the runs are known to get there); a claim that one "
         "variant gets there sooner is decided by the exact sign test over the paired "
         "seeds (a run that never gets there is slower than any that does; two that "
         "never do tie), its effect is the median paired difference with the "
         "distribution-free (order-statistic) interval, infinite where too many runs "
         "never got there. No average is taken over only the runs that got there."),
        ("Still rising (↗): a run whose best validation epoch lies in the last "
         f"{100 * RISING_FRACTION:g}% of its epochs (at least the last one); a variant "
         "when most of its runs do. The flag is shown next to every verdict whose "
         "variants it concerns."),
        ("BN's cost: for variants that differ only in BN, the per-seed ratio of training "
         "seconds per epoch (with / without BN), averaged on the log scale (geometric "
         "mean, 95% t-interval), and the paired difference of train−test gaps (95% "
         "t-interval), over the seeds where both runs trained."),
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
         "difference or can be removed also get two one-sided t-tests (TOST) with a "
         "margin of ±1 accuracy point (EQUIVALENCE_MARGIN in questions.py, stated per "
         "claim; single runs differ by 0.5-1.4 points between seeds, so a smaller "
         "difference is invisible in practice; the margin comes from that noise level, "
         "not from the study's effects). The TOST p-values join the Holm family; a claim "
         "not supported or contradicted is *equivalent* if its Holm-adjusted TOST p is "
         "below the level (the 90% interval lies inside ±1 point before adjustment); "
         "otherwise its equivalence is *not shown* (not the same as different)."),
        ("Divergence: whether runs diverge is a count, so the divergence claim is "
         "decided by the exact McNemar test (the two-sided binomial test of the seeds "
         "where exactly one of the two paired variants diverged); with "
         f"{COUNT_CLAIM_SEED_FACTOR * settings.seeds} seeds its smallest possible "
         f"p-value is {min(1.0, 2 * 0.5 ** (COUNT_CLAIM_SEED_FACTOR * settings.seeds)):.3g}."),
        ("Smallest detectable effect: (t(1 − α/2, n−1) + t(0.8, n−1)) · sd / √n for n "
         "seeds (the normal-shift approximation to the noncentral t); per question with "
         "the pooled SD of its paired accuracy differences, per claim (threats to "
         "validity, `claims.csv`) with the SD of its own, at α and at Holm's strictest "
         "level α/m."),
        "Plots: " + ("see each question." if plots else
                     "**not drawn: matplotlib is not installed** (pip install "
                     "'bnrs[plot]')."),
    ])
