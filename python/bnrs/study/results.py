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
    censored_difference,
    exact_mcnemar,
    holm_adjust,
    km_median,
    mean_interval,
    median_interval,
    minimum_detectable_effect,
    paired_sign_test,
    paired_verdict,
    ratio_interval,
    t_p_value,
    t_quantile,
    tost,
)

__all__ = ["ALPHA", "CLAIM_COLUMNS", "DEFAULT_REGIME", "REGIME_TITLES",
           "RISING_FRACTION", "TIME_METRICS", "BnCost", "ClaimResult", "ResultTable",
           "VariantSummary", "adjust_claims", "bn_costs", "bn_pairs", "build_table",
           "claim_results", "diagnosed_variants", "final_training_loss", "is_accuracy",
           "mean_layers", "minimum_detectable_effects", "regime_of", "runs_by_variant",
           "seconds_per_epoch", "seed_values", "still_rising", "stopping_depths",
           "time_to_target", "variant_regime", "variant_summaries", "write_claims_csv",
           "write_csv"]

#: The study's error rate: Holm's family-wise level and the tests' level.
ALPHA = 0.05
#: The regime of a question, variant or claim that names none: the study's original
#: budget (short training, before the network without regularisation overfits).
DEFAULT_REGIME = "short"
#: Claim metrics that are a time to the target accuracy. They are decided on censored
#: times: a run that never reaches the target within its budget counts (as slower than
#: any run that does), instead of being left out of an average of the runs that did.
TIME_METRICS = ("epochs_to_target", "steps_to_target")
#: A run is still improving at the end when its best validation epoch lies in the last
#: RISING_FRACTION of its epochs (at least the last epoch); a variant when most of its
#: runs are. Its verdicts may change with a longer budget.
RISING_FRACTION = 0.1

_METRIC_NAMES = {"test_acc": "test accuracy", "final_train_loss": "final training loss",
                 "gap": "train−test gap",
                 "mc_gain": "MC-dropout minus deterministic test accuracy",
                 "steps_to_target": "steps to the target accuracy",
                 "epochs_to_target": "epochs to the target accuracy"}
#: How the report names the regimes (others by their own name).
REGIME_TITLES = {"short": "short training", "overfit": "overfitting regime",
                 "overfitting": "overfitting regime"}


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

    columns = ("question", "regime", "variant", "label", "seed", "status", "test_acc",
               "best_epoch", "best_val_acc", "train_acc", "gap", "final_train_loss",
               "epochs_to_target", "steps_to_target", "seconds_to_target",
               "train_seconds", "seconds_per_epoch", "still_rising", "architecture",
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
        row = {"question": q.number, "regime": variant_regime(q, variant),
               "variant": variant.name, "label": variant.label, "seed": seed,
               "status": "missing" if run is None else run["status"], "run_key": key}
        if run is not None:
            metrics = run["metrics"]
            for name in ResultTable.columns:
                if name in metrics:
                    row[name] = metrics[name]
            for name in ("architecture", "batch_size", "lr", "init_scale", "epochs",
                         "n_train"):
                row[name] = run["config"][name]
            steps, reached = time_to_target(run, "steps")
            row["steps_to_target"] = int(steps) if reached else None
            row["seconds_per_epoch"] = seconds_per_epoch(run)
            row["still_rising"] = still_rising(run)
        rows.append(row)
    results = adjust_claims([result for q in questions
                             for result in claim_results(q, entries, runs)])
    return ResultTable(rows, [result.as_dict() for result in results], out)


def is_accuracy(metric: str) -> bool:
    """Whether ``metric`` is an accuracy or a difference of accuracies (a fraction,
    shown in points): ``*acc``, ``gap`` (train minus test accuracy) and ``*_gain``
    (e.g. ``mc_gain``, MC-dropout minus deterministic test accuracy)."""
    return metric.endswith(("acc", "_gain")) or metric == "gap"


def variant_regime(q, variant) -> str:
    """A variant's regime: its own, else its question's, else :data:`DEFAULT_REGIME`."""
    return (getattr(variant, "regime", None) or getattr(q, "regime", None)
            or DEFAULT_REGIME)


def regime_of(q, claim=None) -> str:
    """The training regime of question ``q`` or of one of its claims: the claim's own
    ``regime`` if it has one, else that of its variants (joined by "/" if they differ),
    else the question's, else :data:`DEFAULT_REGIME` (runs and questions from before
    regimes existed)."""
    if claim is not None:
        if getattr(claim, "regime", None):
            return claim.regime
        names = set(claim.plus + claim.minus)
        regimes = {variant_regime(q, v) for v in q.variants if v.name in names}
        if regimes:
            return "/".join(sorted(regimes))
    return getattr(q, "regime", None) or DEFAULT_REGIME


def time_to_target(run: dict, unit: str = "epochs") -> tuple[float, bool]:
    """When ``run`` first reached its target validation accuracy (``config
    ["target_accuracy"]``), in epochs or optimizer steps, and whether it did.

    A run that never reached it (also one that diverged, or had no target) is censored
    at its budget: ``(config epochs, False)`` in epochs, times the steps per epoch in
    steps. Steps: the run's ``curves["steps"]`` (optimizer steps after each epoch) where
    stored, else epochs x ``metrics["steps_per_epoch"]`` if stored, else epochs x
    ``n_train // batch_size`` (the study drops an incomplete last batch).
    """
    if unit not in ("epochs", "steps"):
        raise ValueError(f"unit: expected 'epochs' or 'steps', got {unit!r}")
    config = run["config"]
    target = config.get("target_accuracy")
    epoch = None
    if target is not None:
        epoch = next((i + 1 for i, accuracy in enumerate(run["curves"].get("val_acc") or [])
                      if accuracy is not None and accuracy >= target), None)
    reached = epoch is not None
    epochs = float(epoch if reached else config["epochs"])
    if unit == "epochs":
        return epochs, reached
    steps = run["curves"].get("steps") or []
    if reached and len(steps) >= epoch:
        return float(steps[epoch - 1]), reached
    per_epoch = (run["metrics"].get("steps_per_epoch")
                 or config["n_train"] // config["batch_size"])
    return epochs * per_epoch, reached


def seconds_per_epoch(run: dict) -> float:
    """Training seconds per epoch (evaluation excluded): the stored
    ``metrics["seconds_per_epoch"]``, else ``train_seconds`` over the epochs run; NaN
    for a run that diverged (its last epoch stopped part-way)."""
    metrics = run["metrics"]
    if run["status"] != "ok":
        return math.nan
    if metrics.get("seconds_per_epoch") is not None:
        return float(metrics["seconds_per_epoch"])
    epochs = metrics.get("epochs_run") or len(run["curves"].get("epoch") or [])
    seconds = metrics.get("train_seconds")
    if not epochs or seconds is None or not math.isfinite(seconds):
        return math.nan
    return float(seconds) / epochs


def still_rising(run: dict) -> bool | None:
    """Whether the run's validation accuracy was still improving at the end: its best
    epoch (the earliest on ties) lies in the last :data:`RISING_FRACTION` of its epochs,
    at least the last one. None for a diverged run or one of fewer than 2 epochs."""
    curve = run.get("curves", {}).get("val_acc") or []
    if run["status"] != "ok" or len(curve) < 2:
        return None
    values = [v if v is not None and math.isfinite(v) else -math.inf for v in curve]
    best = values.index(max(values))
    window = max(1, math.ceil(RISING_FRACTION * len(values)))
    return best >= len(values) - window


def _rising_labels(q, names, by_variant) -> list[str]:
    """The labels of the variants ``names`` most of whose runs were still rising."""
    labels = []
    for name in names:
        flags = [still_rising(run) for run in by_variant[name].values()]
        flags = [f for f in flags if f is not None]
        if flags and 2 * sum(flags) > len(flags):
            labels.append(q.variant(name).label)
    return labels


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

    ``verdict`` is the adjusted verdict (Holm); ``raw_verdict`` the unadjusted one;
    :attr:`overall_verdict` adds "equivalent". ``test`` is ``"paired t"``, ``"exact
    McNemar"`` (divergence claims, on the counts ``only_plus_diverged`` /
    ``only_minus_diverged`` of seeds where only one side diverged) or ``"exact sign"``
    (times to the target, :data:`TIME_METRICS`: ``plus_faster`` / ``minus_faster`` /
    ``ties`` seeds, a run that never got there being the slower; ``mean``, ``low`` and
    ``high`` are then the median paired difference and its distribution-free interval,
    possibly infinite, and ``plus_median`` / ``minus_median`` the Kaplan-Meier medians,
    ``inf`` when fewer than half the runs got there). Equivalence claims: ``margin``,
    the TOST p-value ``tost_p`` (raw and ``tost_p_holm``) and its 90% interval
    ``tost_low``/``tost_high``.

    ``regime`` is the training regime (:func:`regime_of`); ``advice`` the advice in
    plain words (the claim's ``advice`` if it has one, else its statement);
    ``rising`` the labels of its variants whose curves were still rising at the end;
    ``mde`` / ``mde_holm`` the smallest mean difference its paired t-test detects with
    80% power at ALPHA and at the strictest Holm level (paired t claims only).
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
    regime: str = DEFAULT_REGIME
    advice: str = ""
    rising: list = field(default_factory=list)
    mde: float = math.nan
    mde_holm: float = math.nan
    plus_faster: int = 0
    minus_faster: int = 0
    ties: int = 0
    plus_median: float = math.nan
    minus_median: float = math.nan
    plus_reached: int = 0
    minus_reached: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    @property
    def overall_verdict(self) -> str:
        """supported / contradicted (Holm), else "equivalent" when the claim's TOST
        shows equivalence after Holm, else inconclusive."""
        if self.verdict in ("supported", "contradicted"):
            return self.verdict
        if self.equivalence_verdict() == "equivalent":
            return "equivalent"
        return "inconclusive"

    @property
    def unit(self) -> str:
        """The unit of the effect as written: points, epochs, steps or ''."""
        if self.metric in TIME_METRICS:
            return self.metric.split("_")[0]
        return "points" if is_accuracy(self.metric) else ""

    @property
    def _scale(self) -> tuple[float, str]:
        return (100, " points") if self.unit == "points" else (1, "")

    def _range(self, low: float, high: float) -> str:
        scale, _ = self._scale
        sign = -1 if self.lower_is_better else 1
        low, high = sorted((sign * scale * low, sign * scale * high))
        return (f"{low:.3g} to {high:.3g}" if self.lower_is_better
                else f"{low:+.2f} to {high:+.2f}")

    def effect_text(self, interval: bool = True) -> str:
        scale, unit = self._scale
        sign = -1 if self.lower_is_better else 1
        if self.test == "exact sign":
            return self._time_text(interval)
        if not math.isfinite(self.mean):
            return "no paired seeds yet"
        text = f"{sign * scale * self.mean:+.2f}{unit}"
        if self.lower_is_better:
            # How much lower the expected variant's is; negative: higher.
            lower = sign * scale * self.mean
            text = f"{abs(lower):.3g}{unit} {'lower' if lower >= 0 else 'higher'}"
        if not interval:
            return text
        if math.isfinite(self.low):
            text += f", 95% CI {self._range(self.low, self.high)}"
        if math.isfinite(self.d_z) or math.isinf(self.d_z):
            text += f", d_z {self.d_z:.2f}"
        return text + f", {self.n_seeds} seeds"

    def _time_text(self, interval: bool) -> str:
        """A time claim's effect: the median of (plus - minus) per seed, e.g. "-2
        epochs"; with ``interval``, its 95% interval, the sign counts and the KM
        medians."""
        if self.n_seeds == 0:
            return "no paired seeds yet"
        text = f"median {_signed_time(self.mean)} {self.unit}"
        if not interval:
            return text
        if not math.isnan(self.low):
            text += f", 95% CI {_signed_time(self.low)} to {_signed_time(self.high)}"
        n = self.n_seeds
        return (text + f"; first there on {self.plus_faster} of {n} seeds, last on "
                f"{self.minus_faster}, {self.ties} tied; Kaplan-Meier median "
                f"{self.medians_text()} (reached by {self.plus_reached}/{n} vs "
                f"{self.minus_reached}/{n})")

    def medians_text(self) -> str:
        """The two Kaplan-Meier medians of a time claim, e.g. "72 steps vs never"."""
        return " vs ".join("never" if math.isinf(m) else f"{_time(m)} {self.unit}"
                           for m in (self.plus_median, self.minus_median))

    def adjusted_interval_text(self) -> str:
        """The interval at Holm's level for this claim, e.g. "+0.12 to +1.84"."""
        if math.isnan(self.adjusted_low):
            return "–"
        if self.test == "exact sign":
            return (f"{_signed_time(self.adjusted_low)} to "
                    f"{_signed_time(self.adjusted_high)}")
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
        elif self.test == "exact sign":
            evidence = (f"{metric}, expected variant minus the other: "
                        f"{self.effect_text()}; exact sign test p {_p(self.p)}, Holm "
                        f"{_p(self.p_holm)}, BH {_p(self.p_bh)}; Holm-level interval "
                        f"{self.adjusted_interval_text()}")
        else:
            evidence = (f"{metric}, {direction}: {self.effect_text()}{extra}; p "
                        f"{_p(self.p)}, Holm {_p(self.p_holm)}, BH {_p(self.p_bh)}; "
                        f"Holm-level interval {self.adjusted_interval_text()}")
        raw = ("" if self.raw_verdict == self.verdict
               else f" {self.raw_verdict.capitalize()} before adjustment.")
        regime = (f" ({REGIME_TITLES.get(self.regime, self.regime)})"
                  if self.regime != DEFAULT_REGIME else "")
        text = f"{what} on this data{regime}: \"{self.statement}\" ({evidence}).{raw}"
        if self.rising:
            text += (" Still improving at the end of training: "
                     f"{', '.join(self.rising)} (a longer budget may change this).")
        if self.margin is not None and math.isfinite(self.tost_p):
            text += (f" The competing advice \"{self.equivalence_advice}\": "
                     f"{self.equivalence_text()}.")
        return text + (f" Advice: {self.source}." if self.source else "")


def _p(p: float) -> str:
    if not math.isfinite(p):
        return "–"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _time(value: float) -> str:
    """A time in epochs or steps; ``inf``: never within the budget."""
    if math.isnan(value):
        return "–"
    return "never" if math.isinf(value) else f"{value:g}"


def _signed_time(value: float) -> str:
    if math.isnan(value):
        return "–"
    if math.isinf(value):
        return "+∞" if value > 0 else "−∞"
    return f"{value:+g}" if value else "0"


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
        if result.test == "exact McNemar":
            direction = result.only_minus_diverged - result.only_plus_diverged
        elif result.test == "exact sign":
            direction = result.plus_faster - result.minus_faster
        else:
            direction = (-1 if result.lower_is_better else 1) * result.mean
        result.raw_verdict = _verdict_from(result.p, direction)
        result.verdict = _verdict_from(result.p_holm, direction)
        if result.test == "paired t" and math.isfinite(result.sd) and result.n_seeds >= 2:
            result.mde = minimum_detectable_effect(result.sd, result.n_seeds, alpha)
            result.mde_holm = minimum_detectable_effect(result.sd, result.n_seeds,
                                                        alpha / max(1, m))
        if i in rank_of and result.test == "exact sign":
            level = 1.0 - alpha / (m - rank_of[i])
            median = median_interval(result.differences, level)
            result.adjusted_level = level
            result.adjusted_low, result.adjusted_high = median.low, median.high
        elif i in rank_of and result.n_seeds >= 2 and math.isfinite(result.sd):
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
        if claim.metric in TIME_METRICS:
            results.append(_time_claim(q, claim, by_variant))
            continue
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
        low, high = sorted((sign * paired.difference.low, sign * paired.difference.high))
        result = ClaimResult(
            q.number, claim.statement, claim.source, claim.metric, paired.verdict,
            sign * paired.difference.mean, low, high, paired.d_z, paired.difference.n,
            diverged,
            claim.lower_is_better, [sign * d for d in differences],
            p=t_p_value(differences), raw_verdict=paired.verdict,
            plus_diverged=plus_diverged, minus_diverged=minus_diverged,
            only_plus_diverged=only_plus, only_minus_diverged=only_minus,
            margin=claim.equivalence, equivalence_advice=claim.equivalence_advice,
            regime=regime_of(q, claim),
            advice=getattr(claim, "advice", "") or claim.statement,
            rising=_rising_labels(q, names, by_variant))
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


def _time_claim(q, claim, by_variant) -> ClaimResult:
    """A claim that the ``plus`` variant reaches the target accuracy sooner: the exact
    sign test over the paired seeds, with runs that never get there counted."""
    if len(claim.plus) != 1 or len(claim.minus) != 1:
        raise ValueError(f"Q{q.number} {claim.statement!r}: a claim on {claim.metric} "
                         "compares one variant with one other (censored times do not "
                         f"add up); got {claim.plus} against {claim.minus}")
    unit = claim.metric.split("_")[0]
    plus_runs, minus_runs = by_variant[claim.plus[0]], by_variant[claim.minus[0]]
    seeds = sorted(set(plus_runs) & set(minus_runs))
    plus = [time_to_target(plus_runs[s], unit) for s in seeds]
    minus = [time_to_target(minus_runs[s], unit) for s in seeds]
    plus_times = [t if reached else math.inf for t, reached in plus]
    minus_times = [t if reached else math.inf for t, reached in minus]
    sign = paired_sign_test(plus_times, minus_times)
    differences = [censored_difference(a, b) for a, b in zip(plus_times, minus_times)]
    median = median_interval(differences)
    direction = sign.first_faster - sign.second_faster
    verdict = _verdict_from(sign.p, direction) if seeds else "inconclusive"
    diverged = sum(runs[s]["status"] == "diverged" for runs in (plus_runs, minus_runs)
                   for s in seeds)
    return ClaimResult(
        q.number, claim.statement, claim.source, claim.metric, verdict, median.mean,
        median.low, median.high, math.nan, len(seeds), diverged, True, differences,
        test="exact sign", p=sign.p if seeds else math.nan, raw_verdict=verdict,
        margin=None, regime=regime_of(q, claim),
        advice=getattr(claim, "advice", "") or claim.statement,
        rising=_rising_labels(q, claim.plus + claim.minus, by_variant),
        plus_faster=sign.first_faster, minus_faster=sign.second_faster, ties=sign.ties,
        plus_median=km_median(*zip(*plus)) if plus else math.nan,
        minus_median=km_median(*zip(*minus)) if minus else math.nan,
        plus_reached=sum(reached for _, reached in plus),
        minus_reached=sum(reached for _, reached in minus))


@dataclass
class VariantSummary:
    """One variant over its seeds: counts, intervals of its metrics (over the seeds
    that did not diverge) and its mean learning curves.

    ``epochs_to_target`` / ``seconds_to_target`` average only the runs that reached the
    target (kept for old callers; the report uses the Kaplan-Meier medians
    ``median_epochs_to_target`` / ``median_steps_to_target`` over every stored run,
    ``inf`` when fewer than half of them reached it). ``rising``: runs still improving
    at the end (:func:`still_rising`) out of ``n_ok``.
    """

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
    median_epochs_to_target: float = math.nan
    median_steps_to_target: float = math.nan
    n_timed: int = 0
    seconds_per_epoch: Interval = field(default_factory=lambda: mean_interval([]))
    rising: int = 0

    @property
    def still_rising(self) -> bool:
        """Most of its runs were still improving at the end of training."""
        return self.n_ok > 0 and 2 * self.rising > self.n_ok


def variant_summaries(q, entries, runs) -> list[VariantSummary]:
    """The summary of each of ``q``'s variants, in the question's order."""
    by_variant = _runs_of(q, entries, runs)
    planned = {v.name: 0 for v in q.variants}
    for question, variant, _, _ in entries:
        if question is q:
            planned[variant.name] += 1
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
        timed = {unit: [time_to_target(run, unit) for run in seed_runs.values()]
                 for unit in ("epochs", "steps")}
        medians = {unit: km_median(*zip(*times)) if times else math.nan
                   for unit, times in timed.items()}
        summaries.append(VariantSummary(
            variant.name, variant.label, len(ok), len(seed_runs) - len(ok),
            planned[variant.name] - len(seed_runs), interval("test_acc"), interval("final_train_loss"),
            interval("gap"), interval("train_acc"), interval("epochs_to_target", reached),
            interval("seconds_to_target", reached), len(reached), _mean_curves(ok),
            next((run["metrics"]["chance"] for run in seed_runs.values()), math.nan),
            medians["epochs"], medians["steps"],
            sum(reached for _, reached in timed["epochs"]),
            mean_interval([t for t in map(seconds_per_epoch, ok) if math.isfinite(t)]),
            sum(bool(still_rising(run)) for run in ok)))
    return summaries


@dataclass
class BnCost:
    """What BN costs and does to overfitting, for one pair of variants that differ only
    in BN (paired by seed, over the seeds where both runs trained).

    ``seconds_ratio``: training seconds per epoch with BN over without, the geometric
    mean of the per-seed ratios with its 95% interval; ``seconds_with`` /
    ``seconds_without`` the means. ``gap_difference``: the train-test gap with BN minus
    without (accuracy as a fraction; positive: BN overfits more), 95% t-interval.
    """

    question: int
    regime: str
    with_bn: str
    without_bn: str
    seconds_ratio: Interval
    seconds_with: Interval
    seconds_without: Interval
    gap_difference: Interval
    gap_with: Interval
    gap_without: Interval


def bn_pairs(q) -> list[tuple[Variant, Variant]]:
    """The pairs (with BN, without BN) of ``q``'s variants whose names differ only in a
    ``bn`` part against a ``plain`` one (``bn`` / ``plain``, ``bn-lr10`` /
    ``plain-lr10``, ``sigmoid-bn`` / ``sigmoid-plain``)."""
    by_name = {variant.name: variant for variant in q.variants}
    pairs = []
    for variant in q.variants:
        # A regime's copy of a variant is named "<name>@<regime>".
        name, at, regime = variant.name.partition("@")
        parts = name.split("-")
        if "bn" in parts:
            other = "-".join("plain" if part == "bn" else part for part in parts)
            if other + at + regime in by_name:
                pairs.append((variant, by_name[other + at + regime]))
    return pairs


def bn_costs(q, entries, runs) -> list[BnCost]:
    """:class:`BnCost` of each of ``q``'s BN pairs (:func:`bn_pairs`) with stored runs."""
    by_variant = _runs_of(q, entries, runs)
    costs = []
    for with_bn, without_bn in bn_pairs(q):
        plus, minus = by_variant[with_bn.name], by_variant[without_bn.name]
        seeds = sorted(s for s in set(plus) & set(minus)
                       if plus[s]["status"] == "ok" and minus[s]["status"] == "ok")
        if not seeds:
            continue
        seconds = [(seconds_per_epoch(plus[s]), seconds_per_epoch(minus[s])) for s in seeds]
        gaps = [(plus[s]["metrics"].get("gap", math.nan),
                 minus[s]["metrics"].get("gap", math.nan)) for s in seeds]
        gaps = [(a, b) for a, b in gaps if math.isfinite(a) and math.isfinite(b)]
        costs.append(BnCost(
            q.number, variant_regime(q, with_bn), with_bn.label, without_bn.label,
            ratio_interval([a for a, _ in seconds], [b for _, b in seconds]),
            mean_interval([a for a, _ in seconds if math.isfinite(a)]),
            mean_interval([b for _, b in seconds if math.isfinite(b)]),
            mean_interval([a - b for a, b in gaps]),
            mean_interval([a for a, _ in gaps]), mean_interval([b for _, b in gaps])))
    return costs


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


#: The columns of claims.csv, one row per claim (the report's tables show a part).
CLAIM_COLUMNS = ("question", "regime", "statement", "advice", "metric", "test",
                 "overall_verdict", "verdict", "raw_verdict", "mean", "low", "high",
                 "adjusted_level", "adjusted_low", "adjusted_high", "d_z", "sd",
                 "n_seeds", "p", "p_holm", "p_bh", "mde", "mde_holm", "margin", "tost_p",
                 "tost_p_holm", "tost_low", "tost_high", "diverged", "plus_diverged",
                 "minus_diverged", "only_plus_diverged", "only_minus_diverged",
                 "plus_faster", "minus_faster", "ties", "plus_median", "minus_median",
                 "plus_reached", "minus_reached", "rising", "source")


def write_claims_csv(claims: list[ClaimResult], path: Path) -> None:
    """One row per claim with every statistic (:data:`CLAIM_COLUMNS`; the metric's own
    units, accuracies as fractions; empty where not applicable)."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CLAIM_COLUMNS)
        for claim in claims:
            row = []
            for name in CLAIM_COLUMNS:
                value = getattr(claim, name)
                if isinstance(value, list):
                    value = "; ".join(map(str, value))
                elif value is None or (isinstance(value, float) and math.isnan(value)):
                    value = ""
                row.append(value)
            writer.writerow(row)


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
