"""The study's results, computed from the stored runs: the results table and its CSV, the
claims' verdicts, per-variant summaries and question 10's analyses (where a network stops
training, per-layer statistics averaged over seeds).

Nothing here draws: :mod:`bnrs.study.plots` draws these results and :mod:`bnrs.study.report`
writes them out as tables and text.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

from .questions import STUCK_FRACTION, Question, Variant
from .stats import (
    Interval,
    bh_adjust,
    exact_mcnemar,
    holm_adjust,
    mean_interval,
    minimum_detectable_effect,
    paired_verdict,
    t_p_value,
    t_quantile,
    tost,
)

__all__ = ["ALPHA", "ClaimResult", "ResultTable", "VariantSummary", "adjust_claims",
           "build_table", "claim_results", "diagnosed_variants", "final_training_loss",
           "mean_layers", "minimum_detectable_effects", "runs_by_variant", "seed_values",
           "stopping_depths", "variant_summaries", "write_csv"]

#: The study's error rate: Holm's family-wise level and the tests' level.
ALPHA = 0.05

_METRIC_NAMES = {"test_acc": "test accuracy", "final_train_loss": "final training loss"}


class ResultTable(list):
    """The study's results: a list of dicts, one per (question, variant, seed).

    Each row has ``question``, ``variant``, ``label``, ``seed``, ``status``, the metrics
    (``test_acc``, ``final_train_loss``, ``gap``, ``epochs_to_target``, ...), the
    configuration (``architecture``, ``batch_size``, ``lr``, ...) and ``run_key``.

    Attributes
    ----------
    verdicts : list of dict
        One per claim: question, statement, verdict, mean difference, interval, d_z.
    out : Path
        The output directory (report.md, report.html, results.csv, results.sqlite).
    """

    columns = ("question", "variant", "label", "seed", "status", "test_acc",
               "best_epoch", "best_val_acc", "train_acc", "gap", "final_train_loss",
               "epochs_to_target", "seconds_to_target", "train_seconds", "architecture",
               "batch_size", "lr", "init_scale", "epochs", "n_train", "run_key")

    def __init__(self, rows=(), verdicts=(), out=None):
        super().__init__(rows)
        self.verdicts = list(verdicts)
        self.out = None if out is None else Path(out)

    def where(self, **conditions) -> ResultTable:
        """The rows whose fields equal the given values, e.g. ``where(question=1)``."""
        return ResultTable([row for row in self
                            if all(row.get(k) == v for k, v in conditions.items())],
                           self.verdicts, self.out)

    def column(self, name: str) -> list:
        return [row.get(name) for row in self]

    def __repr__(self) -> str:
        return (f"ResultTable({len(self)} rows, {len(self.verdicts)} verdicts"
                + (f", out={str(self.out)!r})" if self.out else ")"))


# --------------------------------------------------------------------------- tables

def build_table(entries, runs: dict, questions, out) -> ResultTable:
    """The per-(question, variant, seed) rows and the claims' verdicts."""
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
    results = adjust_claims([result for q in questions
                             for result in claim_results(q, entries, runs)])
    return ResultTable(rows, [result.as_dict() for result in results], out)


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
    """The verdict on one claim: the paired differences over seeds (in the metric's own
    direction, plus - minus), their mean, 95% interval and d_z; its p-value, raw and
    adjusted for the whole study's claims (:func:`adjust_claims`), and for equivalence
    and divergence claims their own tests.

    ``verdict`` is the adjusted verdict (Holm); ``raw_verdict`` the unadjusted one.
    ``test`` is ``"paired t"`` or ``"exact McNemar"`` (divergence claims, on the counts
    ``only_plus_diverged`` / ``only_minus_diverged`` of seeds where only one side
    diverged). Equivalence claims: ``margin``, the TOST p-value ``tost_p`` (raw and
    ``tost_p_holm``) and its 90% interval ``tost_low``/``tost_high``.
    """

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
    test: str = "paired t"
    p: float = math.nan
    raw_verdict: str = "inconclusive"
    p_holm: float = math.nan
    p_bh: float = math.nan
    adjusted_level: float = math.nan
    adjusted_low: float = math.nan
    adjusted_high: float = math.nan
    sd: float = math.nan
    only_plus_diverged: int = 0
    only_minus_diverged: int = 0
    plus_diverged: int = 0
    minus_diverged: int = 0
    margin: float | None = None
    equivalence_advice: str = ""
    tost_p: float = math.nan
    tost_p_holm: float = math.nan
    tost_low: float = math.nan
    tost_high: float = math.nan

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    @property
    def _scale(self) -> tuple[float, str]:
        return (100, " points") if self.metric.endswith("acc") else (1, "")

    def _range(self, low: float, high: float) -> str:
        scale, _ = self._scale
        sign = -1 if self.lower_is_better else 1
        low, high = sorted((sign * scale * low, sign * scale * high))
        return (f"{low:.3g} to {high:.3g}" if self.lower_is_better
                else f"{low:+.2f} to {high:+.2f}")

    def effect_text(self, interval: bool = True) -> str:
        scale, unit = self._scale
        sign = -1 if self.lower_is_better else 1
        if not math.isfinite(self.mean):
            return "no paired seeds yet"
        text = f"{sign * scale * self.mean:+.2f}{unit}"
        if self.lower_is_better:
            text = f"{sign * scale * self.mean:.3g} lower"
        if not interval:
            return text
        if math.isfinite(self.low):
            text += f", 95% CI {self._range(self.low, self.high)}"
        if math.isfinite(self.d_z) or math.isinf(self.d_z):
            text += f", d_z {self.d_z:.2f}"
        return text + f", {self.n_seeds} seeds"

    def adjusted_interval_text(self) -> str:
        """The interval at Holm's level for this claim, e.g. "+0.12 to +1.84"."""
        if not math.isfinite(self.adjusted_low):
            return "–"
        return self._range(self.adjusted_low, self.adjusted_high)

    def counts_text(self) -> str:
        n = self.n_seeds
        return (f"diverged {self.plus_diverged}/{n} vs {self.minus_diverged}/{n} seeds "
                f"(expected variant vs the other; {self.only_plus_diverged} + "
                f"{self.only_minus_diverged} discordant pairs)")

    def equivalence_verdict(self, adjusted: bool = True) -> str:
        """"equivalent" (TOST rejects at ALPHA, after Holm if ``adjusted``), "not shown
        equivalent", or "" for a claim without a margin."""
        if self.margin is None:
            return ""
        p = self.tost_p_holm if adjusted else self.tost_p
        return "equivalent" if math.isfinite(p) and p < ALPHA else "not shown equivalent"

    def equivalence_text(self) -> str:
        scale, unit = self._scale
        if self.margin is None or not math.isfinite(self.tost_p):
            return ""
        raw = ("" if self.equivalence_verdict(False) == self.equivalence_verdict()
               else f", {self.equivalence_verdict(False)} before adjustment")
        return (f"equivalence within ±{scale * self.margin:g}{unit.rstrip('s')}: "
                f"**{self.equivalence_verdict()}** (TOST p {_p(self.tost_p)}, Holm "
                f"{_p(self.tost_p_holm)}; 90% CI "
                f"{self._range(self.tost_low, self.tost_high)}{raw})")

    def sentence(self) -> str:
        what = {"supported": "Supported", "contradicted": "Contradicted",
                "inconclusive": "Inconclusive"}[self.verdict]
        extra = (f"; {self.diverged} diverged run(s) scored at chance"
                 if self.diverged and self.metric == "test_acc" else "")
        metric = _METRIC_NAMES.get(self.metric, self.metric)
        direction = ("how much lower the expected variant's is" if self.lower_is_better
                     else "expected variant minus the other")
        if self.test == "exact McNemar":
            evidence = (f"{self.counts_text()}, exact McNemar p {_p(self.p)}, Holm "
                        f"{_p(self.p_holm)}, BH {_p(self.p_bh)}; {metric}: "
                        f"{self.effect_text()}{extra}")
        else:
            evidence = (f"{metric}, {direction}: {self.effect_text()}{extra}; p "
                        f"{_p(self.p)}, Holm {_p(self.p_holm)}, BH {_p(self.p_bh)}; "
                        f"Holm-level interval {self.adjusted_interval_text()}")
        raw = ("" if self.raw_verdict == self.verdict
               else f" {self.raw_verdict.capitalize()} before adjustment.")
        text = f"{what} on this data: \"{self.statement}\" ({evidence}).{raw}"
        if self.margin is not None and math.isfinite(self.tost_p):
            text += (f" The competing advice \"{self.equivalence_advice}\": "
                     f"{self.equivalence_text()}.")
        return text + (f" Advice: {self.source}." if self.source else "")


def _p(p: float) -> str:
    if not math.isfinite(p):
        return "–"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _verdict_from(p: float, direction: float) -> str:
    if math.isfinite(p) and p < ALPHA and direction != 0:
        return "supported" if direction > 0 else "contradicted"
    return "inconclusive"


def adjust_claims(results: list[ClaimResult], alpha: float = ALPHA) -> list[ClaimResult]:
    """Adjust the claims' p-values for their number and set their verdicts from them.

    The family is every test the study reports a verdict on: each claim's own test and
    the equivalence test (TOST) of each claim with a margin. Holm's adjusted p-value
    sets the verdict (supported / contradicted by the sign of the effect; equivalent);
    Benjamini-Hochberg's is reported beside it.

    Each claim's adjusted interval is its t-interval at level ``1 - alpha / (m - k + 1)``,
    Holm's level at step ``k``: its own rank (by raw p-value, 1 = smallest) if Holm
    rejects it, else the step where Holm stopped. So the interval excludes zero exactly
    when the Holm verdict is supported or contradicted (a claim ranked after the stop
    has a raw p-value at least as large as the one that failed there). Returns
    ``results`` (modified in place).
    """
    tests = [(result, "p") for result in results]
    tests += [(result, "tost_p") for result in results if result.margin is not None]
    p_values = [getattr(result, name) for result, name in tests]
    holm, bh = holm_adjust(p_values), bh_adjust(p_values)
    m = sum(math.isfinite(p) for p in p_values)
    order = sorted((i for i, p in enumerate(p_values) if math.isfinite(p)),
                   key=lambda i: p_values[i])
    stop = next((rank for rank, i in enumerate(order)
                 if p_values[i] > alpha / (m - rank)), m)
    # 0-based ranks: step k (1-based) is rank k - 1, whose level is alpha / (m - rank).
    rank_of = {i: min(rank, stop) for rank, i in enumerate(order)}
    for i, (result, name) in enumerate(tests):
        if name == "tost_p":
            result.tost_p_holm = holm[i]
            continue
        result.p_holm, result.p_bh = holm[i], bh[i]
        direction = ((result.only_minus_diverged - result.only_plus_diverged)
                     if result.test == "exact McNemar"
                     else (-1 if result.lower_is_better else 1) * result.mean)
        result.raw_verdict = _verdict_from(result.p, direction)
        result.verdict = _verdict_from(result.p_holm, direction)
        if i in rank_of and result.n_seeds >= 2 and math.isfinite(result.sd):
            level = 1.0 - alpha / (m - rank_of[i])
            half = t_quantile(result.n_seeds - 1, level) * result.sd / math.sqrt(
                result.n_seeds)
            result.adjusted_level = level
            result.adjusted_low, result.adjusted_high = (result.mean - half,
                                                         result.mean + half)
    return results


def minimum_detectable_effects(results: list[ClaimResult], m: int,
                               alpha: float = ALPHA) -> tuple[float, float]:
    """The smallest mean difference (metric units) the paired design detects with 80%
    power, at ``alpha`` and at the strictest Holm level ``alpha / m``, from the pooled SD
    of ``results``' differences (root mean of their variances) and their seeds."""
    usable = [r for r in results if math.isfinite(r.sd) and r.n_seeds >= 2]
    if not usable:
        return math.nan, math.nan
    sd = math.sqrt(sum(r.sd ** 2 for r in usable) / len(usable))
    n = min(r.n_seeds for r in usable)
    return (minimum_detectable_effect(sd, n, alpha),
            minimum_detectable_effect(sd, n, alpha / max(1, m)))


def claim_results(q, entries, runs) -> list[ClaimResult]:
    """The verdict on each of ``q``'s claims from the paired per-seed contrasts, before
    any adjustment for the number of claims (see :func:`adjust_claims`)."""
    by_variant = _runs_of(q, entries, runs)
    results = []
    for claim in q.claims:
        names = claim.plus + claim.minus
        seeds = set.intersection(*(set(by_variant[n]) for n in names)) if names else set()
        differences, diverged = [], 0
        plus_diverged = minus_diverged = only_plus = only_minus = 0
        for seed in sorted(seeds):
            chosen = [by_variant[n][seed] for n in names]
            diverged += sum(run["status"] == "diverged" for run in chosen)
            plus_bad = any(run["status"] == "diverged" for run in chosen[:len(claim.plus)])
            minus_bad = any(run["status"] == "diverged" for run in chosen[len(claim.plus):])
            plus_diverged += plus_bad
            minus_diverged += minus_bad
            only_plus += plus_bad and not minus_bad
            only_minus += minus_bad and not plus_bad
            values = [_value(run, claim.metric) for run in chosen]
            if any(v is None for v in values):
                continue
            plus = sum(values[:len(claim.plus)])
            minus = sum(values[len(claim.plus):])
            differences.append((minus - plus) if claim.lower_is_better else (plus - minus))
        paired = paired_verdict(differences)
        # Store the difference in the metric's own direction (plus - minus).
        sign = -1 if claim.lower_is_better else 1
        result = ClaimResult(
            q.number, claim.statement, claim.source, claim.metric, paired.verdict,
            sign * paired.difference.mean, sign * paired.difference.low,
            sign * paired.difference.high, paired.d_z, paired.difference.n, diverged,
            claim.lower_is_better, [sign * d for d in differences],
            p=t_p_value(differences), raw_verdict=paired.verdict,
            plus_diverged=plus_diverged, minus_diverged=minus_diverged,
            only_plus_diverged=only_plus, only_minus_diverged=only_minus,
            margin=claim.equivalence, equivalence_advice=claim.equivalence_advice)
        if len(differences) >= 2:
            mean = sum(differences) / len(differences)
            result.sd = math.sqrt(sum((d - mean) ** 2 for d in differences)
                                  / (len(differences) - 1))
        if claim.divergence:
            # Paired seeds: only the discordant ones (one side diverged, the other not)
            # carry information about which side diverges more often.
            result.test = "exact McNemar"
            result.p = exact_mcnemar(only_plus, only_minus) if seeds else math.nan
            result.raw_verdict = _verdict_from(result.p, only_minus - only_plus)
            result.verdict = result.raw_verdict
        if claim.equivalence is not None and len(differences) >= 2:
            equivalence = tost([sign * d for d in differences], claim.equivalence)
            result.tost_p, result.tost_low, result.tost_high = (
                equivalence.p, equivalence.low, equivalence.high)
        results.append(result)
    return results


@dataclass
class VariantSummary:
    """One variant over its seeds: counts, intervals of its metrics (over the seeds
    that did not diverge) and its mean learning curves."""

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


def variant_summaries(q, entries, runs, n_seeds: int) -> list[VariantSummary]:
    """The summary of each of ``q``'s variants, in the question's order."""
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


def seed_values(q, entries, runs) -> dict[str, list[tuple[float, str]]]:
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


def write_csv(table, path: Path) -> None:
    """Write the table's rows to ``path``, one column per ``table.columns`` (empty if
    missing)."""
    columns = list(table.columns)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in table:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})


# --------------------------------------------------------------------------- question 10 and diagnostics

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


def runs_by_variant(q: Question, entries, runs) -> dict[str, list[dict]]:
    """variant name -> its stored runs (in seed order), for question ``q``."""
    return {name: list(by_seed.values())
            for name, by_seed in _runs_of(q, entries, runs).items()}


def stopping_depths(q: Question, entries, runs) -> dict[str, dict]:
    """Per group of question 10: the stuck counts at each depth and the depth at which
    the group stops training (None: it trains at every depth; "?" with no runs).

    Returns ``{group: {"stuck": {depth: (n_stuck, n_runs)}, "stops_at": depth}}``.
    """
    by_variant = runs_by_variant(q, entries, runs)
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


def mean_layers(seed_runs: list[dict], moment: int) -> dict | None:
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


def diagnosed_variants(q: Question) -> list[Variant]:
    """The variants whose per-layer statistics are drawn: for question 10 the deepest
    networks without dropout; otherwise every variant."""
    if q.number == 10:
        deep = max(v.x for v in q.variants)
        return [v for v in q.variants if v.x == deep and "drop" not in v.name]
    return list(q.variants)
