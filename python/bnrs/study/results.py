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
from .stats import Interval, mean_interval, paired_verdict

__all__ = ["ClaimResult", "ResultTable", "VariantSummary", "build_table", "claim_results",
           "diagnosed_variants", "final_training_loss", "mean_layers", "runs_by_variant",
           "seed_values", "stopping_depths", "variant_summaries", "write_csv"]

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
    """The verdict on one claim: the paired differences over seeds (in the metric's own
    direction, plus - minus), their mean, 95% interval and d_z."""

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
