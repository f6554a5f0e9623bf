"""The study's questions: a registry of variants, the claims they test, and the budgets.

A question is a list of *variants* (a name, an architecture string and training overrides)
and the *claims* it tests. A claim comes from common advice and is a paired contrast:
the mean over seeds of ``sum(metric of plus variants) - sum(metric of minus variants)``,
which the advice expects to be positive (see :mod:`bnrs.study.stats` for the verdict).
Variants within a question differ only in the factor studied: same data, split, epochs,
optimizer and seeds. A variant's configuration that appears in several questions (the
plain and the BN baseline) is trained once per seed and shared.

Every network is one template (:func:`network`) on a per-dataset :class:`Profile`::

    conv(c1) [bn] act [drop] mp2 [drop]  conv(c2) [bn] act [drop] mp2 [drop]
    fc(h) [bn] act [drop]  fc(n_classes)

with three BN *sites*: ``conv1`` (between the two convolutions: conv→conv), ``conv2``
(at the conv→dense transition) and ``fc`` (between the dense layers: dense→dense).

Question 10 (depth) uses plain conv stacks of several depths instead of the template
(:func:`depth_network`), question 13 small Inception-style and residual networks
(:func:`branching_network`).

Regimes (:data:`REGIMES`): each question declares the training regimes it runs in, the
short budget and/or the overfitting one (a small subset, many epochs); the dropout
questions 4, 5 and 13, question 10's dropout claims, and question 1 (BN's train-test gap
and speed) run in both, questions 11 (dropout rate) and 12 (MC dropout) in the
overfitting regime only. A variant in the overfitting regime is
named ``<name>@overfit`` and each claim carries its regime (:func:`in_regimes`), so the
same advice gets one verdict per regime.

Adding a question: write a function ``(settings) -> Question`` and decorate it with
``@question(number, key)``; it then runs with ``--questions <number>`` and appears in
the report (a ``sweep`` gives it an accuracy-versus-factor plot).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

__all__ = [
    "COUNT_CLAIM_SEED_FACTOR",
    "DEPTHS",
    "EPOCH_FRACTION",
    "EQUIVALENCE_MARGIN",
    "FAMILIES",
    "QUESTIONS",
    "REGIMES",
    "REGIME_LABELS",
    "STUCK_FRACTION",
    "WIDTH",
    "Claim",
    "Profile",
    "Question",
    "Settings",
    "Variant",
    "build_questions",
    "count_claim_variants",
    "custom_question",
    "depth_network",
    "in_regimes",
    "network",
    "question",
    "settings_for",
    "variant_seeds",
]


@dataclass(frozen=True)
class Profile:
    """Layer widths of the template network for one input size."""

    conv1: int
    conv2: int
    hidden: int


#: Profiles by input size: 8x8 digits, 28x28 Fashion-MNIST.
SMALL = Profile(conv1=8, conv2=16, hidden=32)
MEDIUM = Profile(conv1=8, conv2=16, hidden=128)


@dataclass(frozen=True)
class Settings:
    """The shared training budget of a study (one per dataset and mode).

    ``small_batch_*`` is question 6's budget: batch sizes down to 2 cost many more
    Python-level steps per image, so question 6 trains all its variants on a smaller
    subset for fewer epochs (every variant within a question shares one budget).

    ``overfit_*`` is the overfitting regime's budget (:data:`REGIMES`): a training
    subset small enough, trained long enough, that the network without dropout
    overfits; ``overfit_target_accuracy`` its target for the steps-to-target metric.
    ``mc_samples`` stochastic passes measure MC dropout in every run of that regime
    whose network has dropout.
    """

    dataset: str
    profile: Profile
    seeds: int
    n_train: int
    n_val: int
    epochs: int
    small_batch_n_train: int
    small_batch_epochs: int
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    sgd_lr: float = 0.01
    target_accuracy: float | None = None
    n_train_eval: int = 2000
    n_test_curve: int = 2000
    conv_dropout: float = 0.2
    dense_dropout: float = 0.5
    overfit_n_train: int = 1000
    overfit_epochs: int = 40
    overfit_target_accuracy: float | None = None
    mc_samples: int = 20

    def scaled(self, scale: float, n_available: int) -> Settings:
        """The same study on ``scale`` times the training images (capped by the data);
        the overfitting regime keeps its size (it is small by design)."""
        room = n_available - self.n_val
        return replace(self, n_train=min(room, round(self.n_train * scale)),
                       small_batch_n_train=min(room, round(self.small_batch_n_train * scale)))

    def budget(self, regime: str) -> tuple[int, int]:
        """(training images, epochs) of a regime of :data:`REGIMES`."""
        if regime == "short":
            return self.n_train, self.epochs
        if regime == "overfit":
            return self.overfit_n_train, self.overfit_epochs
        raise ValueError(f"regime: expected one of {REGIMES}, got {regime!r}")

    def target(self, regime: str) -> float | None:
        """The target accuracy of a regime (for steps and seconds to target)."""
        return self.overfit_target_accuracy if regime == "overfit" else self.target_accuracy


#: The training regimes a question can run in. "short": the study's main budget (the
#: networks are still improving at its end, none overfits much). "overfit": a small
#: training subset trained for many epochs, where the network without dropout overfits
#: (its train-test gap is large and its validation loss rises), so that a regulariser
#: can show its value. Each question declares its regimes; the dropout questions run
#: in both, and each claim's verdict is per regime (:attr:`Claim.regime`).
#:
#: The Fashion-MNIST overfitting budget, 1,000 images for 50 epochs, was measured before
#: the study on the template network without dropout or BN (seeds 0 and 1): training
#: accuracy 98.5% / 97.1% at the end, train-test gap 10.3 / 11.4 points at the best
#: validation epoch, validation loss lowest at epoch 25 / 31 and 0.16 / 0.13 higher at
#: epoch 50. In the short regime (4,000 images, 10 epochs) the gap was 4.6 / 3.1
#: points and the validation loss lowest at epoch 10 / 8 (+0.05 at 10). Also tried:
#: 1,000 images for 60 epochs (seed 0: the loss rose 0.24 from epoch 25, training
#: accuracy 99.5%) and 2,000 for 40 (gap 10.0 points, lowest validation loss at epoch
#: 15); 50 epochs on 1,000 overfits clearly at a quarter of the 2,000-image cost.
REGIMES = ("short", "overfit")
REGIME_LABELS = {"short": "short training", "overfit": "overfitting regime"}


#: (dataset kind, quick) -> Settings without the dataset name. See the README/report.
PRESETS: dict[tuple[str, bool], dict] = {
    # Measured for protocol 2 (questions 1-13, 10 seeds, both regimes): 1,510 distinct
    # runs took 3.1 h of wall clock with 2 jobs on 2 cores shared with other work; the
    # variants of count claims' 10 extra seeds add 160 runs (1,870 entries, 1,670 runs).
    # Estimated before it: 1,710 entries, 1,510 distinct runs, about 4.1 h of summed run time, so about 2.0 h with 2 jobs on
    # 2 idle cores. Measured as CPU time (one kernel thread per run, on a shared 2-core
    # AMD EPYC with AVX-512) of 3-4 runs of each question, scaled by the cost model
    # within the question: Q13 (Inception, ResNet) ~75 min, Q10 ~107 min (its 12-layer
    # overfitting runs ~45 s each), Q6 ~17 min, Q4 ~14 min, the rest under 10 min each.
    # A loaded machine can take 2-3x the wall time: still within a working day. (Protocol
    # 1's study, 375 runs, took 104.5 min summed, 53 min on 2 idle cores.)
    ("fashion-mnist", False): {
        "profile": MEDIUM, "seeds": 10, "n_train": 4000, "n_val": 2000, "epochs": 10,
        "small_batch_n_train": 4000, "small_batch_epochs": 4, "target_accuracy": 0.85,
        "overfit_n_train": 1000, "overfit_epochs": 50, "overfit_target_accuracy": 0.80},
    ("fashion-mnist", True): {
        "profile": MEDIUM, "seeds": 2, "n_train": 2000, "n_val": 1000, "epochs": 3,
        "small_batch_n_train": 1000, "small_batch_epochs": 2, "target_accuracy": 0.80,
        "n_train_eval": 1000, "n_test_curve": 1000, "overfit_n_train": 500,
        "overfit_epochs": 10, "overfit_target_accuracy": 0.75, "mc_samples": 5},
    ("small", False): {
        "profile": SMALL, "seeds": 10, "n_train": 1000, "n_val": 258, "epochs": 20,
        "small_batch_n_train": 1000, "small_batch_epochs": 10, "batch_size": 32,
        "target_accuracy": 0.95, "n_train_eval": 1000, "n_test_curve": 1000,
        # Measured on digits without dropout or BN (seeds 0, 1): training accuracy 100%,
        # gap 8.7 / 8.0 points (short regime: 2.8 / 3.9); the validation loss only
        # flattens (lowest at epoch 92 / 98) rather than rising, unlike Fashion-MNIST's.
        "overfit_n_train": 200, "overfit_epochs": 100, "overfit_target_accuracy": 0.90},
    ("small", True): {
        "profile": SMALL, "seeds": 3, "n_train": 1000, "n_val": 258, "epochs": 8,
        "small_batch_n_train": 500, "small_batch_epochs": 4, "batch_size": 32,
        "target_accuracy": 0.90, "n_train_eval": 1000, "n_test_curve": 1000,
        "overfit_n_train": 200, "overfit_epochs": 20, "overfit_target_accuracy": 0.85,
        "mc_samples": 5},
}


def settings_for(dataset: str, kind: str, quick: bool, n_available: int, *,
                 seeds: int | None = None, epochs: int | None = None,
                 scale: float = 1.0, input_side: int | None = None) -> Settings:
    """The preset for a dataset kind (``fashion-mnist``, or ``small`` for small images)
    with the user's overrides; ``--epochs`` sets both budgets' epochs."""
    preset = dict(PRESETS[(kind, quick)])
    if kind != "fashion-mnist" and input_side is not None and input_side >= 20:
        preset["profile"] = MEDIUM
    settings = Settings(dataset=dataset, **preset)
    n_val = min(settings.n_val, max(1, n_available // 5))
    settings = replace(settings, n_val=n_val,
                       n_train=min(settings.n_train, n_available - n_val),
                       small_batch_n_train=min(settings.small_batch_n_train,
                                               n_available - n_val),
                       overfit_n_train=min(settings.overfit_n_train, n_available - n_val))
    if seeds is not None:
        settings = replace(settings, seeds=seeds)
    if epochs is not None:
        settings = replace(settings, epochs=epochs, small_batch_epochs=epochs,
                           overfit_epochs=epochs)
    if scale != 1.0:
        settings = settings.scaled(scale, n_available)
    return settings


@dataclass(frozen=True)
class Variant:
    """One network and its training overrides within a question.

    ``group`` and ``x`` place it on a sweep plot (e.g. group "BN", x = batch size).
    ``regime`` (one of :data:`REGIMES`; None: "short", as
    :func:`bnrs.study.results.variant_regime` reads it) sets its training images and
    epochs (the question's own budget for "short"); ``optimizer`` overrides the study's, ``init``
    is ``"default"`` (PyTorch's) or ``"he"`` (see :class:`bnrs.study.train.RunConfig`).
    """

    name: str
    label: str
    architecture: str
    batch_size: int | None = None
    lr: float | None = None
    init_scale: float = 1.0
    group: str | None = None
    x: float | None = None
    regime: str | None = None
    optimizer: str | None = None
    init: str = "default"


@dataclass(frozen=True)
class Claim:
    """A claim from common advice, tested as the paired contrast ``plus - minus``.

    ``statement`` says what the advice expects (a positive contrast); ``source`` where
    the advice comes from. Higher is better for ``metric`` unless ``lower_is_better``.

    ``equivalence`` marks a claim whose competing advice says the factor *makes no
    difference* or *can be removed* (e.g. "dropout is unnecessary once BN is there"): it
    also gets an equivalence test (TOST) within ``±equivalence`` (in the metric's units;
    :data:`EQUIVALENCE_MARGIN` for accuracies), stated before looking at the results.
    ``equivalence_advice`` is that competing advice in plain words.

    ``divergence`` marks a claim about whether runs diverge: its verdict comes from an
    exact test on the counts of diverged runs over the paired seeds (exact McNemar), not
    from a t-test on accuracies (a diverged run is a count, and one at chance among
    trained runs makes the accuracy t-interval meaningless).

    ``regime`` is the training regime (:data:`REGIMES`) its variants were trained in
    (None: theirs, which :func:`bnrs.study.results.regime_of` reads; :func:`in_regimes`
    always sets it): the same advice tested in two regimes is two claims with the same
    ``statement``, one verdict per regime.

    ``metric`` is any per-run metric of :func:`bnrs.study.train.train_run`; besides
    ``test_acc`` and ``final_train_loss``: ``gap`` (train minus test accuracy),
    ``steps_to_target`` (optimizer steps until the validation accuracy first reached
    the target; None for a run that never did: censored at ``steps_run``, not a
    missing value) and ``mc_gain`` (MC-dropout minus deterministic test accuracy).
    """

    statement: str
    plus: tuple[str, ...]
    minus: tuple[str, ...]
    source: str = ""
    metric: str = "test_acc"
    lower_is_better: bool = False
    equivalence: float | None = None
    equivalence_advice: str = ""
    divergence: bool = False
    regime: str | None = None


#: The equivalence margin of accuracy claims: ±1 point. Why 1 point: seed-to-seed noise
#: of a single run's test accuracy is 0.5-1.4 points on this kind of network (the
#: pilot; the study's variant tables agree), so a practitioner comparing two single runs
#: cannot see, and would not act on, a difference under about 1 point; and with 5 seeds
#: and paired differences whose SD is of that order (0.4-1 point in the study), a
#: narrower margin could hardly ever be established. Chosen from that noise level
#: (added after the committed study's runs, not tuned to their mean effects).
EQUIVALENCE_MARGIN = 0.01


#: How many times the study's seeds a variant gets when it enters a claim decided by an
#: exact test on counts (steps to a target accuracy, diverged runs). Over n paired seeds
#: such a test gives p >= 2 * 0.5**n even when every seed agrees: 0.002 at 10 seeds,
#: which Holm's adjustment over the study's ~100 tests cannot pass (its strictest level
#: is ~0.0005), so the claim would be inconclusive by construction. At 20 seeds the
#: floor is 2e-6. Runs of these variants are cheap or few (questions 1, 7 and 13).
COUNT_CLAIM_SEED_FACTOR = 2


def count_claim_variants(q: Question) -> set[str]:
    """The variants of ``q`` that enter a claim decided on counts."""
    return {name for claim in q.claims
            if claim.divergence or claim.metric in ("steps_to_target", "epochs_to_target")
            for name in (*claim.plus, *claim.minus)}


def variant_seeds(q: Question, variant: Variant, seeds: int) -> int:
    """How many seeds ``variant`` of ``q`` runs when the study runs ``seeds``."""
    if variant.name in count_claim_variants(q):
        return COUNT_CLAIM_SEED_FACTOR * seeds
    return seeds


@dataclass(frozen=True)
class Question:
    """A question: its variants, the claims tested, and its training budget.

    ``n_train`` and ``epochs`` are the budget of its variants in the short regime (or
    of all of them when it runs in the overfitting regime only); a variant in the
    overfitting regime trains on :meth:`Settings.budget` ("overfit"). ``regimes``
    lists the regimes it runs in (:func:`in_regimes` makes its variants and claims).
    """

    number: int
    key: str
    title: str
    variants: tuple[Variant, ...]
    claims: tuple[Claim, ...]
    n_train: int
    epochs: int
    note: str = ""
    sweep: tuple[str, str] | None = None   # (x-axis label, "log" or "linear")
    baseline: str | None = None
    regimes: tuple[str, ...] = ("short",)

    def variant(self, name: str) -> Variant:
        for variant in self.variants:
            if variant.name == name:
                return variant
        raise KeyError(f"question {self.number} has no variant {name!r}")


QuestionBuilder = Callable[[Settings], Question]
#: number -> (key, builder), in the order of the numbers.
QUESTIONS: dict[int, tuple[str, QuestionBuilder]] = {}


def question(number: int, key: str) -> Callable[[QuestionBuilder], QuestionBuilder]:
    """Register a question builder under ``number`` (used by ``--questions``)."""
    def register(builder: QuestionBuilder) -> QuestionBuilder:
        if number in QUESTIONS:
            raise ValueError(f"question {number} is already registered")
        QUESTIONS[number] = (key, builder)
        return builder
    return register


# --------------------------------------------------------------------------- networks

ALL_SITES = ("conv1", "conv2", "fc")


def network(profile: Profile, *, bn: tuple[str, ...] = (), norm: str = "bn",
            bn_after_activation: bool = False, activation: str = "relu",
            conv_dropout: float = 0.0, conv_dropout_where: str = "after_pool",
            spatial: bool = False, dense_dropout: float = 0.0,
            dense_dropout_before_bn: bool = False) -> str:
    """The template network's architecture string (see the module docstring).

    Parameters
    ----------
    bn : subset of ``("conv1", "conv2", "fc")``
        Where the normalisation layers go.
    norm : ``"bn"`` or ``"brn"`` (batch renormalisation)
    bn_after_activation : put BN after the activation instead of before it
    conv_dropout : p of the dropout in each conv block (0: none)
    conv_dropout_where : ``"before_pool"`` (right after the activation) or ``"after_pool"``
    spatial : channel-wise (``sd``) instead of element-wise (``d``) conv dropout
    dense_dropout : p of the dropout of the hidden dense layer
    dense_dropout_before_bn : put that dropout between the dense layer and its BN
        (the "variance shift" placement) instead of after the activation
    """
    unknown = set(bn) - set(ALL_SITES)
    if unknown:
        raise ValueError(f"bn: unknown sites {sorted(unknown)}; expected {ALL_SITES}")

    def normalised(site: str) -> list[str]:
        layers = [norm, activation] if site in bn else [activation]
        if site in bn and bn_after_activation:
            layers.reverse()
        return layers

    conv_drop = f"{'sd' if spatial else 'd'}{conv_dropout:g}" if conv_dropout else None
    tokens: list[str] = []
    for site, width in (("conv1", profile.conv1), ("conv2", profile.conv2)):
        tokens += [f"c{width}"] + normalised(site)
        if conv_drop and conv_dropout_where == "before_pool":
            tokens.append(conv_drop)
        tokens.append("mp2")
        if conv_drop and conv_dropout_where == "after_pool":
            tokens.append(conv_drop)
    tokens.append(f"fc{profile.hidden}")
    dense_drop = f"d{dense_dropout:g}" if dense_dropout else None
    if dense_drop and dense_dropout_before_bn:
        tokens.append(dense_drop)
    tokens += normalised("fc")
    if dense_drop and not dense_dropout_before_bn:
        tokens.append(dense_drop)
    return "-".join(tokens)


def in_regimes(regimes, variants, claims) -> tuple[tuple[Variant, ...], tuple[Claim, ...]]:
    """Each variant and claim once per regime of ``regimes``.

    The short regime keeps the names (so that its runs are the ones other questions
    share); in another regime a variant is named ``<name>@<regime>``, its label and group
    say the regime, and each claim compares the same regime's variants.
    """
    all_variants: list[Variant] = []
    all_claims: list[Claim] = []
    for regime in regimes:
        if regime not in REGIMES:
            raise ValueError(f"regime: expected one of {REGIMES}, got {regime!r}")

        def renamed(name: str, regime: str = regime) -> str:
            return name if regime == "short" else f"{name}@{regime}"

        suffix = "" if regime == "short" else f" ({REGIME_LABELS[regime]})"
        all_variants += [replace(v, name=renamed(v.name), label=v.label + suffix,
                                 group=None if v.group is None else v.group + suffix,
                                 regime=regime) for v in variants]
        all_claims += [replace(c, plus=tuple(map(renamed, c.plus)),
                               minus=tuple(map(renamed, c.minus)), regime=regime)
                       for c in claims]
    return tuple(all_variants), tuple(all_claims)


def _lr_for_batch(settings: Settings, batch_size: int) -> float:
    """Square-root scaling: lr = base_lr * sqrt(batch / base_batch) (Adam, see Q6)."""
    return settings.lr * math.sqrt(batch_size / settings.batch_size)


def _main_budget(settings: Settings) -> dict:
    return {"n_train": settings.n_train, "epochs": settings.epochs}


def _regime_note(settings: Settings, regimes) -> str:
    """The question's regimes and their budgets, in words."""
    parts = []
    for regime in regimes:
        n_train, epochs = settings.budget(regime)
        parts.append(f"{REGIME_LABELS[regime]} ({n_train:,} training images, {epochs} "
                     "epochs)")
    if len(parts) == 1:
        return f"Trained in the {parts[0]}."
    return ("Trained in two regimes, each claim tested in each (variants of the "
            f"overfitting regime are named ...@overfit): the {parts[0]} and the "
            f"{parts[1]}, where the network without dropout overfits.")


# --------------------------------------------------------------------------- questions

@question(1, "bn")
def _bn_or_not(s: Settings) -> Question:
    p = s.profile
    regimes = ("short", "overfit")
    variants, claims = in_regimes(
        regimes,
        (Variant("plain", "no BN", network(p)),
         Variant("bn", "BN everywhere", network(p, bn=ALL_SITES))),
        (Claim("BN improves test accuracy", ("bn",), ("plain",),
               "Ioffe & Szegedy 2015; 'add BN after every conv layer'"),
         Claim("BN reaches a lower training loss in the same epochs", ("bn",),
               ("plain",), "Ioffe & Szegedy 2015 (faster training)",
               metric="final_train_loss", lower_is_better=True),
         Claim("BN reaches the target accuracy in fewer steps", ("bn",), ("plain",),
               "Ioffe & Szegedy 2015 ('BN shortens training')",
               metric="steps_to_target", lower_is_better=True),
         Claim("BN reduces overfitting: a smaller train-test gap", ("bn",), ("plain",),
               "Ioffe & Szegedy 2015 (BN regularises)", metric="gap",
               lower_is_better=True)))
    return Question(
        1, "bn", "Does batch norm help? (none vs BN after every conv and dense layer)",
        variants=variants, claims=claims, baseline="plain", regimes=regimes,
        note=_regime_note(s, regimes), **_main_budget(s))


@question(2, "bn-placement")
def _bn_placement(s: Settings) -> Question:
    p = s.profile
    return Question(
        2, "bn-placement", "Where does BN help? conv→conv, conv→dense transition, "
        "dense→dense, everywhere",
        variants=(Variant("plain", "no BN", network(p)),
                  Variant("bn-conv-conv", "BN conv→conv only", network(p, bn=("conv1",))),
                  Variant("bn-transition", "BN at the conv→dense transition only",
                          network(p, bn=("conv2",))),
                  Variant("bn-dense", "BN dense→dense only", network(p, bn=("fc",))),
                  Variant("bn", "BN everywhere", network(p, bn=ALL_SITES))),
        claims=(Claim("BN between conv layers alone helps", ("bn-conv-conv",), ("plain",),
                      "'BN belongs after conv layers'"),
                Claim("BN at the conv→dense transition alone helps", ("bn-transition",),
                      ("plain",), "common practice (BN after the last conv block)"),
                Claim("BN between dense layers alone helps", ("bn-dense",), ("plain",),
                      "Ioffe & Szegedy 2015 (BN for any layer)"),
                Claim("BN everywhere beats BN between conv layers only", ("bn",),
                      ("bn-conv-conv",), "'use BN after every layer'",
                      equivalence=EQUIVALENCE_MARGIN,
                      equivalence_advice="BN between the conv layers is enough: the "
                      "other BN layers can be removed")),
        baseline="plain", **_main_budget(s))


@question(3, "bn-position")
def _bn_position(s: Settings) -> Question:
    p = s.profile
    return Question(
        3, "bn-position", "BN before or after the activation?",
        variants=(Variant("bn", "BN before ReLU (conv-BN-ReLU)", network(p, bn=ALL_SITES)),
                  Variant("bn-after-act", "BN after ReLU (conv-ReLU-BN)",
                          network(p, bn=ALL_SITES, bn_after_activation=True))),
        claims=(Claim("BN before the activation beats BN after it", ("bn",),
                      ("bn-after-act",), "Ioffe & Szegedy 2015 (BN before the "
                      "nonlinearity); practitioners often report the opposite",
                      equivalence=EQUIVALENCE_MARGIN,
                      equivalence_advice="BN before or after the activation makes no "
                      "difference"),),
        baseline="bn", **_main_budget(s))


#: Question 4's before-pooling rate, matched in strength to the after-pooling rate
#: (see :func:`_dropout_placement`).
BEFORE_POOL_DROPOUT = 0.5
#: How BEFORE_POOL_DROPOUT was chosen, for the question's note. Measured before the
#: study (Fashion-MNIST, the template network, seeds 0 and 1, final mini-batch training
#: loss in training mode; test accuracies not used): overfitting regime (1,000 images,
#: 50 epochs): none 0.073/0.115, d0.2 after pooling 0.242/0.255, before pooling d0.2
#: 0.098/0.136, d0.35 0.146/0.179, d0.5 0.229/0.230, d0.65 0.326/0.299; short regime
#: (4,000 images, 10 epochs): none 0.318/0.314, after d0.2 0.405/0.413, before d0.2
#: 0.333/0.333, d0.35 0.350/0.345, d0.5 0.390/0.377, d0.65 0.441/0.444.
BEFORE_POOL_CALIBRATION = (
    "Matched by the final training loss (the mean mini-batch loss with dropout on, the "
    "regularisation the optimiser feels), calibrated before the study on Fashion-MNIST "
    "with this network and 2 seeds, chosen by training loss alone: d0.5 before pooling "
    "ended at 0.230 (overfitting regime) and 0.384 (short), d0.2 after pooling at 0.249 "
    "and 0.409, no dropout at 0.094 and 0.316; d0.2 before pooling only at 0.117 and "
    "0.333. The mismatch that remains: d0.5 before pooling is still slightly weaker "
    "(about 0.02 lower training loss: it adds 88% (overfitting) and 73% (short) of the "
    "training loss that d0.2 after pooling adds over no dropout); and the noise differs in kind: before pooling a window's output is zeroed "
    "only when all four inputs drop (6% at p = 0.5, against 20% of the outputs after "
    "pooling), but its maximum is dropped half of the time.")


@question(4, "dropout-placement")
def _dropout_placement(s: Settings) -> Question:
    """Question 4: where dropout goes in a conv net (no BN), in both regimes.

    Before vs after pooling at matched strength: the same rate before a 2x2 max-pooling
    is a weaker regulariser than after it (the pooling keeps the largest of four
    values, and a dropped one is usually not the largest), so the claim compares conv
    dropout at the study's conv rate (d0.2) after pooling with
    :data:`BEFORE_POOL_DROPOUT` before it, the rate whose final training loss matched in
    a calibration on Fashion-MNIST (see the question's note); the same-rate pair is kept
    as a variant for reference.
    """
    p, conv_p, dense_p = s.profile, s.conv_dropout, s.dense_dropout
    regimes = ("short", "overfit")
    matched = BEFORE_POOL_DROPOUT
    variants, claims = in_regimes(regimes, (
            Variant("plain", "no dropout", network(p)),
            Variant("drop-conv-before-pool", f"conv d{conv_p:g} before pooling "
                    "(same rate: weaker)",
                    network(p, conv_dropout=conv_p, conv_dropout_where="before_pool")),
            Variant("drop-conv-before-pool-matched", f"conv d{matched:g} before pooling "
                    "(matched strength)",
                    network(p, conv_dropout=matched, conv_dropout_where="before_pool")),
            Variant("drop-conv", f"conv d{conv_p:g} after pooling",
                    network(p, conv_dropout=conv_p)),
            Variant("drop-dense", f"dense d{dense_p:g} only", network(p, dense_dropout=dense_p)),
            Variant("drop-both", f"conv d{conv_p:g} after pooling + dense d{dense_p:g}",
                    network(p, conv_dropout=conv_p, dense_dropout=dense_p)),
            Variant("sdrop-conv", f"conv spatial sd{conv_p:g} after pooling",
                    network(p, conv_dropout=conv_p, spatial=True))),
        (Claim("Dropout in the dense layers improves test accuracy", ("drop-dense",),
               ("plain",), "Srivastava et al. 2014; Keras/PyTorch tutorials"),
         Claim("Dropout in conv and dense layers improves test accuracy",
               ("drop-both",), ("plain",), "Srivastava et al. 2014"),
         Claim("Conv dropout works better after pooling than before it (matched "
               "strength)", ("drop-conv",), ("drop-conv-before-pool-matched",),
               "common in Keras examples (conv-pool-dropout)"),
         Claim("Spatial dropout beats element dropout in conv layers",
               ("sdrop-conv",), ("drop-conv",),
               "Tompson et al. 2015 (neighbouring pixels are correlated)"),
         Claim("Dropout is more useful in dense than in conv layers",
               ("drop-dense",), ("drop-conv",), "'dropout belongs in the dense "
               "layers'"),
         Claim("Dropout reduces overfitting: a smaller train-test gap (conv and dense)",
               ("drop-both",), ("plain",), "Srivastava et al. 2014", metric="gap",
               lower_is_better=True)))
    return Question(
        4, "dropout-placement", "Where does dropout go in a conv net (no BN)?",
        variants=variants, claims=claims, baseline="plain", regimes=regimes,
        note=(f"Before vs after pooling at matched strength: d{conv_p:g} after each 2x2 "
              f"max-pooling against d{matched:g} before it. "
              f"{BEFORE_POOL_CALIBRATION} The same rate before pooling "
              f"(d{conv_p:g}) is kept as a variant for reference. "
              + _regime_note(s, regimes)),
        **_main_budget(s))


@question(5, "dropout-with-bn")
def _dropout_with_bn(s: Settings) -> Question:
    p, dense_p = s.profile, s.dense_dropout
    regimes = ("short", "overfit")
    variants, claims = in_regimes(
        regimes,
        (
            Variant("bn", "BN only", network(p, bn=ALL_SITES)),
            Variant("drop-dense", f"dropout only (dense d{dense_p:g})",
                    network(p, dense_dropout=dense_p)),
            Variant("bn-drop-after", f"BN + dense d{dense_p:g} after BN and ReLU",
                    network(p, bn=ALL_SITES, dense_dropout=dense_p)),
            Variant("bn-drop-before", f"BN + dense d{dense_p:g} before BN (variance shift)",
                    network(p, bn=ALL_SITES, dense_dropout=dense_p,
                            dense_dropout_before_bn=True))),
        (Claim("BN alone beats dropout alone", ("bn",), ("drop-dense",),
               "Ioffe & Szegedy 2015 (BN regularises, reducing the need for dropout)"),
         Claim("Adding dropout to a BN network still helps", ("bn-drop-after",),
               ("bn",), "many tutorials combine both",
               equivalence=EQUIVALENCE_MARGIN,
               equivalence_advice="dropout can be removed once BN is there (it "
               "makes no difference with BN)"),
         Claim("Dropout after BN beats dropout before BN", ("bn-drop-after",),
               ("bn-drop-before",), "Li et al. 2019 (variance shift)",
               equivalence=EQUIVALENCE_MARGIN,
               equivalence_advice="where dropout goes relative to BN makes no "
               "difference")))
    return Question(
        5, "dropout-with-bn", "Dropout with BN: BN only, dropout only, both; dropout "
        "before vs after BN", variants=variants, claims=claims, baseline="bn",
        regimes=regimes, note=_regime_note(s, regimes), **_main_budget(s))


BATCH_SIZES = (2, 4, 8, 16, 32, 64, 128, 256)
_NORMS = (("plain", "no BN", ()), ("bn", "BN", ALL_SITES), ("brn", "batch renorm", ALL_SITES))
#: GroupNorm's groups in question 6: 4 divides every layer's width (8, 16, 32, 128), so
#: the first conv layer has 2 channels per group (Wu & He's 32 groups need wider layers).
GROUPS = 4
#: Question 6's normalisations: (name, label, grammar token); every one at every site.
SMALL_BATCH_NORMS = (("plain", "no BN", None), ("bn", "BN", "bn"),
                     ("brn", "batch renorm", "brn"),
                     ("gn", f"GroupNorm ({GROUPS} groups)", f"gn{GROUPS}"),
                     ("ln", "LayerNorm", "ln"))


@question(6, "batch-size")
def _batch_size(s: Settings) -> Question:
    p = s.profile
    sizes = [b for b in BATCH_SIZES if b <= s.small_batch_n_train]
    variants = tuple(
        Variant(f"{norm}-b{b}", f"{label}, batch {b}",
                network(p, bn=ALL_SITES if token else (), norm=token or "bn"),
                batch_size=b, lr=_lr_for_batch(s, b), group=label, x=b)
        for norm, label, token in SMALL_BATCH_NORMS for b in sizes)
    small, normal = sizes[0], min(32, sizes[-1])
    # At batch 2 a dense layer's BN normalises two values per feature to about +-1;
    # the conv layers' BN has 2 x H x W values per channel.
    variants += (Variant(f"bn-conv-b{small}", f"BN on the conv layers only, batch {small}",
                         network(p, bn=("conv1", "conv2")), batch_size=small,
                         lr=_lr_for_batch(s, small), group="BN on the conv layers only",
                         x=small),)
    claims = [Claim(f"BN at batch {normal} beats BN at batch {small} (Wu & He 2018: "
                    "ImageNet error 23.6% at 32 vs 34.7% at 2)", (f"bn-b{normal}",),
                    (f"bn-b{small}",), "Wu & He 2018"),
              Claim(f"BN's gain over no BN is smaller at batch {small} than at {normal}",
                    (f"bn-b{normal}", f"plain-b{small}"), (f"plain-b{normal}", f"bn-b{small}"),
                    "Ioffe 2017; Wu & He 2018 (BN needs large enough batches)")]
    for b in sizes[:2]:
        claims.append(Claim(f"Batch renormalisation beats BN at batch {b}",
                            (f"brn-b{b}",), (f"bn-b{b}",), "Ioffe 2017"))
    claims += [Claim(f"GroupNorm beats BN at batch {small}", (f"gn-b{small}",),
                     (f"bn-b{small}",), "Wu & He 2018 (GroupNorm for small batches)"),
               Claim(f"LayerNorm beats BN at batch {small}", (f"ln-b{small}",),
                     (f"bn-b{small}",), "Ba et al. 2016; Wu & He 2018"),
               Claim(f"GroupNorm at batch {small} does as well as BN at batch {normal}",
                     (f"gn-b{small}",), (f"bn-b{normal}",),
                     "Wu & He 2018 (GroupNorm's accuracy is stable across batch sizes)",
                     equivalence=EQUIVALENCE_MARGIN,
                     equivalence_advice=f"GroupNorm at batch {small} is as good as BN at "
                     f"batch {normal}"),
               Claim(f"At batch {small}, BN on the conv layers only beats BN everywhere "
                     "(the dense layer's BN of two samples is the harm)",
                     (f"bn-conv-b{small}",), (f"bn-b{small}",),
                     "Ioffe 2017 (batch statistics of a few samples)")]
    return Question(
        6, "batch-size", "Batch size 2 to 256: no BN, BN, batch renormalisation, "
        "GroupNorm and LayerNorm (the small-batch remedies)",
        variants=variants, claims=tuple(claims), n_train=s.small_batch_n_train,
        epochs=s.small_batch_epochs, sweep=("batch size (images per step)", "log"),
        baseline=f"bn-b{normal}",
        note=(f"Learning rate by the square-root rule lr = {s.lr:g} x sqrt(batch / "
              f"{s.batch_size}) (Adam); the same epochs for every batch size, so small "
              "batches take more steps. Smaller budget than the other questions (batch 2 "
              f"costs ~5x more per image): {s.small_batch_epochs} epochs instead of "
              f"{s.epochs}" + (f", {s.small_batch_n_train} training images"
                               if s.small_batch_n_train != s.n_train else "") +
              ". Batch renormalisation: r_max 3, d_max 5, momentum 0.01 (bias-corrected "
              f"running statistics), no warm-up. GroupNorm: {GROUPS} groups at every "
              "layer; LayerNorm: over (C, H, W) with a per-channel affine after a conv, "
              "over the features after the dense layer (both independent of the batch). "
              f"BN on the conv layers only: at batch {small} only, the dense layer "
              "without a norm."))


#: Question 7's optimizers: (name, label, base learning rate attribute of Settings).
#: The advice "BN allows higher learning rates" is about SGD; Adam rescales each step.
LR_OPTIMIZERS = (("adam", "Adam"), ("sgd", "SGD + momentum 0.9"))
LR_MULTIPLIERS = (1, 3, 10, 30)


@question(7, "learning-rate")
def _learning_rate(s: Settings) -> Question:
    p = s.profile
    base = {"adam": s.lr, "sgd": s.sgd_lr}
    variants = []
    claims = []
    for optimizer, optimizer_label in LR_OPTIMIZERS:
        prefix = "" if optimizer == "adam" else f"{optimizer}-"
        variants += [
            Variant(f"{norm}-{prefix}lr{m}", f"{label}, {optimizer_label}, lr x{m}",
                    network(p, bn=sites), lr=base[optimizer] * m,
                    group=f"{label}, {optimizer_label}", x=m, optimizer=optimizer)
            for norm, label, sites in _NORMS[:2] for m in LR_MULTIPLIERS]
        claims += [
            Claim(f"With BN the network tolerates a 10x learning rate better "
                  f"({optimizer_label})", (f"bn-{prefix}lr10",), (f"plain-{prefix}lr10",),
                  "Ioffe & Szegedy 2015 (higher learning rates)"),
            Claim(f"With BN fewer runs diverge at a 30x learning rate ({optimizer_label})",
                  (f"bn-{prefix}lr30",), (f"plain-{prefix}lr30",), "Ioffe & Szegedy 2015",
                  divergence=True),
            Claim(f"BN loses less accuracy from x1 to x10 than no BN ({optimizer_label})",
                  (f"bn-{prefix}lr10", f"plain-{prefix}lr1"),
                  (f"plain-{prefix}lr10", f"bn-{prefix}lr1"),
                  "Bjorck et al. 2018 (BN enables large learning rates)")]
    return Question(
        7, "learning-rate", f"Learning-rate tolerance: x1, x3, x10, x30 of the base "
        f"rate (Adam {s.lr:g}, SGD + momentum {s.sgd_lr:g}), with and without BN",
        variants=tuple(variants), claims=tuple(claims),
        sweep=("learning rate (x the optimizer's base rate)", "log"), baseline="bn-lr1",
        note=(f"Adam (base {s.lr:g}) and SGD with momentum 0.9 (base {s.sgd_lr:g}), no "
              "weight decay, no schedule. A run diverges when its training loss becomes "
              "non-finite or its best validation accuracy stays within 5 points of "
              "chance; the divergence claims compare the counts of diverged runs "
              "(paired by seed)."), **_main_budget(s))


@question(8, "init-scale")
def _init_scale(s: Settings) -> Question:
    p = s.profile
    scales = (0.1, 1.0, 10.0)
    variants = tuple(
        Variant(f"{norm}-init{k:g}", f"{label}, weights x{k:g}", network(p, bn=sites),
                init_scale=k, group=label, x=k)
        for norm, label, sites in _NORMS[:2] for k in scales)
    return Question(
        8, "init-scale", "Initialisation: weights x0.1, x1, x10 with and without BN",
        variants=variants,
        claims=(Claim("With BN, weights x10 at init do less harm", ("bn-init10",),
                      ("plain-init10",), "Ioffe & Szegedy 2015 (less care about "
                      "initialisation)"),
                Claim("With BN, weights x0.1 at init do less harm", ("bn-init0.1",),
                      ("plain-init0.1",), "Ioffe & Szegedy 2015")),
        sweep=("initial weight scale (x PyTorch default)", "log"), baseline="bn-init1",
        note="Every conv and dense weight tensor (not the biases) is multiplied by the "
             "scale after PyTorch's default initialisation.", **_main_budget(s))


@question(9, "activations")
def _activations(s: Settings) -> Question:
    p = s.profile
    variants = tuple(
        Variant(f"{act}-{norm}", f"{act}, {label}", network(p, bn=sites, activation=act),
                group=label)
        for act in ("sigmoid", "tanh") for norm, label, sites in _NORMS[:2])
    return Question(
        9, "activations", "Saturating activations: sigmoid and tanh networks with and "
        "without BN",
        variants=variants,
        claims=(Claim("BN helps a sigmoid network", ("sigmoid-bn",), ("sigmoid-plain",),
                      "Ioffe & Szegedy 2015 (BN keeps sigmoids out of saturation)"),
                Claim("BN helps a tanh network", ("tanh-bn",), ("tanh-plain",),
                      "Ioffe & Szegedy 2015")),
        baseline="sigmoid-plain", **_main_budget(s))


# --------------------------------------------------------------------------- question 10

#: Conv layers of question 10's stacks.
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


def depth_network(depth: int, *, bn: bool, activation: str = "relu", pools: int = 2,
                  conv_dropout: float = 0.0, dense_dropout: float = 0.0,
                  hidden: int = 128, width: int = WIDTH) -> str:
    """The architecture string of a ``depth``-conv stack (question 10's networks).

    A plain stack of 3x3 convolutions of constant width (:data:`WIDTH` channels), with
    max-pooling at fixed points (after convolutions 1 and 2 on 28x28 images, 28 -> 14
    -> 7; after convolution 1 on 8x8 images, 8 -> 4), so that the classifier head
    ``fc(hidden)-act-fc(classes)`` has the same size at every depth; the extra
    convolutions all work at the smallest resolution::

        c16 [bn] act mp2 [d]  c16 [bn] act mp2 [d]  (c16 [bn] act) x (depth - 2)
        fc(hidden) [bn] act [d]  fc(classes)

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


def _depth_variant_name(activation: str, norm: str, dropout: bool, depth: int) -> str:
    prefix = "" if activation == "relu" else f"{activation}-"
    return f"{prefix}{norm}{'-drop' if dropout else ''}-depth{depth}"


def _depth_variants(s: Settings) -> tuple[Variant, ...]:
    pools = 1 if s.profile == SMALL else 2
    variants = []
    for activation, dropout in FAMILIES:
        for norm, label, sites in _NORMS[:2]:
            group = label + (" + dropout" if dropout else "") + (
                f", {activation}" if activation != "relu" else "")
            for depth in DEPTHS:
                architecture = depth_network(
                    depth, bn=bool(sites), activation=activation, pools=pools,
                    conv_dropout=s.conv_dropout if dropout else 0.0,
                    dense_dropout=s.dense_dropout if dropout else 0.0,
                    hidden=s.profile.hidden)
                name = _depth_variant_name(activation, norm, dropout, depth)
                variants.append(Variant(name, f"{group}, {depth} conv", architecture,
                                        group=group, x=depth))
    # The fair no-BN baseline of a deep ReLU stack: He initialisation (PyTorch's default
    # uniform one, which bnrs layers use, shrinks the activations layer after layer).
    group = "no BN, He init"
    for depth in DEPTHS:
        variants.append(Variant(f"plain-he-depth{depth}", f"{group}, {depth} conv",
                                depth_network(depth, bn=False, pools=pools,
                                              hidden=s.profile.hidden),
                                group=group, x=depth, init="he"))
    return tuple(variants)


@question(10, "depth")
def _depth(s: Settings) -> Question:
    """Question 10: depth, with and without BN and dropout.

    Two claims practitioners repeat: batch norm lets much deeper networks train (it
    keeps gradients from vanishing or exploding, above all with saturating activations),
    and dropout helps more as a network gets deeper. The networks are plain conv stacks
    with the same classifier head at every depth (:func:`depth_network`).

    Variants: depth in :data:`DEPTHS` x {no BN, BN after every conv and dense layer} x
    {no dropout, dropout (conv dropout after each pooling and dense dropout, at the
    study's usual rates: the same dropout at every depth)}, with ReLU; plus sigmoid
    networks with and without BN and no dropout (the saturating case of the claim), and
    ReLU networks without BN initialised by He's rule (the fair no-BN baseline). Same
    optimizer, data, training subset and seeds as the main questions, for half their
    epochs (:data:`EPOCH_FRACTION`, rounded up; ``--epochs`` sets the main questions'
    epochs and so halves here too): 28 variants x seeds runs, and 16 more (the ReLU
    families without sigmoid or He init) in the overfitting regime for the dropout
    claims; a 12-layer run takes about
    4x the time of a 2-layer one (measured on Fashion-MNIST, 4,000 images, 5 epochs).

    A run is *stuck* (did not train) when its training loss after the last epoch is
    above :data:`STUCK_FRACTION` x ln(classes), or it diverged; a variant *stops
    training* at the smallest depth at which most of its seeds are stuck
    (:func:`bnrs.study.results.stopping_depths`).
    """
    shallow, deep = DEPTHS[0], DEPTHS[-1]
    bn_claims = (
        Claim(f"BN lets deeper networks train: at {deep} conv layers BN beats no BN "
              "(ReLU)", (f"bn-depth{deep}",), (f"plain-depth{deep}",),
              "Ioffe & Szegedy 2015; 'BN lets you train much deeper networks'"),
        Claim(f"BN lets deeper networks train: at {deep} conv layers BN reaches a lower "
              "training loss (ReLU)", (f"bn-depth{deep}",), (f"plain-depth{deep}",),
              "Ioffe & Szegedy 2015 (less internal covariate shift, faster training)",
              metric="final_train_loss", lower_is_better=True),
        Claim(f"BN lets deeper networks train: at {deep} conv layers BN beats no BN "
              "with He initialisation (ReLU)", (f"bn-depth{deep}",),
              (f"plain-he-depth{deep}",),
              "Ioffe & Szegedy 2015; against He et al. 2015's initialisation for ReLU"),
        Claim(f"BN lets a deep sigmoid network train: at {deep} conv layers BN beats no "
              "BN", (f"sigmoid-bn-depth{deep}",), (f"sigmoid-plain-depth{deep}",),
              "Ioffe & Szegedy 2015 (BN keeps saturating nonlinearities out of "
              "saturation)"),
    )
    dropout_claims = (
        # Worded as what is measured: the difference of dropout's effects, whatever
        # their sign ("helps more" would presuppose that it helps at all).
        Claim(f"Dropout's effect on test accuracy is more favourable at {deep} conv "
              f"layers than at {shallow} (no BN)",
              (f"plain-drop-depth{deep}", f"plain-depth{shallow}"),
              (f"plain-depth{deep}", f"plain-drop-depth{shallow}"),
              "'deeper networks overfit more, so dropout helps them more'"),
        Claim(f"Dropout's effect on test accuracy is more favourable at {deep} conv "
              f"layers than at {shallow} (with BN)",
              (f"bn-drop-depth{deep}", f"bn-depth{shallow}"),
              (f"bn-depth{deep}", f"bn-drop-depth{shallow}"),
              "'deeper networks overfit more, so dropout helps them more'"),
        Claim(f"Dropout improves test accuracy at {deep} conv layers (no BN)",
              (f"plain-drop-depth{deep}",), (f"plain-depth{deep}",),
              "'dropout helps deep networks'"),
    )
    short_variants = _depth_variants(s)
    # The dropout claims also in the overfitting regime, where dropout can pay: the
    # ReLU families with and without BN and dropout (not sigmoid, not He).
    overfit_variants, overfit_claims = in_regimes(
        ("overfit",), [v for v in short_variants
                       if not v.name.startswith("sigmoid") and v.init == "default"],
        dropout_claims)
    regimes = ("short", "overfit")
    pools = "after conv 1" if s.profile == SMALL else "after convs 1 and 2"
    return Question(
        10, "depth", f"Depth: {', '.join(map(str, DEPTHS))} conv layers with and without "
        "BN and dropout (and sigmoid networks)",
        variants=short_variants + overfit_variants,
        claims=bn_claims + dropout_claims + overfit_claims, n_train=s.n_train,
        epochs=max(1, math.ceil(EPOCH_FRACTION * s.epochs)), regimes=regimes,
        sweep=("conv layers (depth)", "linear"), baseline=f"bn-depth{shallow}",
        note=(f"Plain stacks of 3x3 convolutions, {WIDTH} channels, max-pooling {pools} "
              f"only, then fc{s.profile.hidden} and the output layer (the same head at "
              f"every depth). Dropout variants: d{s.conv_dropout:g} after each pooling "
              f"and d{s.dense_dropout:g} after the hidden dense layer. A run is *stuck* "
              "(did not train) when its loss on the training sample after the last epoch "
              f"(evaluation mode) exceeds {STUCK_FRACTION:g} x ln(classes), or it "
              "diverged; a variant stops training at the smallest "
              "depth where most seeds are stuck. \"Dropout's effect is more favourable "
              "deeper\" is the paired difference of dropout's effects: (dropout - none) "
              f"at the deepest ({deep}) minus (dropout - none) at the shallowest "
              f"({shallow}); supported means dropout helps more or hurts less when deep "
              "(the variant table says which). He initialisation: weights N(0, "
              "2/fan_in), biases 0, every conv and dense layer. The BN claims are "
              "tested in the short regime (half the study's epochs); the dropout claims "
              "in both: the ReLU families with and without BN and dropout also train in "
              "the " + _regime_note(s, ("overfit",))[len("Trained in the "):]))


# --------------------------------------------------------------------------- questions 11-13

#: Question 11's dropout rates: the dense layer's, and the conv blocks' (after pooling).
DENSE_RATES = (0.0, 0.1, 0.25, 0.5)
CONV_RATES = (0.0, 0.1, 0.2, 0.3)


@question(11, "dropout-rate")
def _dropout_rate(s: Settings) -> Question:
    """Question 11: the dropout rate, in the overfitting regime only (where a rate can
    pay): dense rates :data:`DENSE_RATES` alone, conv rates :data:`CONV_RATES` (after
    each pooling) alone; rate 0 is the network without dropout in both groups."""
    p = s.profile
    base = (
        [Variant(f"dense-d{r:g}", f"dense d{r:g}", network(p, dense_dropout=r),
                 group="dense dropout", x=r) for r in DENSE_RATES]
        + [Variant(f"conv-d{r:g}", f"conv d{r:g} after pooling",
                   network(p, conv_dropout=r), group="conv dropout", x=r)
           for r in CONV_RATES])
    variants, claims = in_regimes(("overfit",), base, (
        Claim("Light conv dropout (d0.1 after pooling) improves test accuracy",
              ("conv-d0.1",), ("conv-d0",), "'dropout helps conv nets too' (Srivastava "
              "et al. 2014 kept 0.75-0.9 of conv units)"),
        Claim("Dense dropout d0.5 beats the lighter d0.25", ("dense-d0.5",),
              ("dense-d0.25",), "Srivastava et al. 2014 (p = 0.5 for hidden units)",
              equivalence=EQUIVALENCE_MARGIN,
              equivalence_advice="the dense rate makes no difference between 0.25 and "
              "0.5"),
        Claim("Dense dropout d0.5 shrinks the train-test gap", ("dense-d0.5",),
              ("dense-d0",), "Srivastava et al. 2014 (dropout prevents overfitting)",
              metric="gap", lower_is_better=True)))
    n_train, epochs = s.budget("overfit")
    return Question(
        11, "dropout-rate", "Dropout rate: dense 0-0.5 and conv 0-0.3 (overfitting regime)",
        variants=variants, claims=claims, n_train=n_train, epochs=epochs,
        sweep=("dropout rate", "linear"), baseline="dense-d0@overfit",
        regimes=("overfit",), note=_regime_note(s, ("overfit",)))


@question(12, "mc-dropout")
def _mc_dropout(s: Settings) -> Question:
    """Question 12: dropout as an implicit ensemble. Does averaging many dropout masks
    at test time (MC dropout) beat the deterministic pass that scales the weights
    instead? Measured on each run's own network (``mc_gain``), overfitting regime."""
    p, conv_p, dense_p = s.profile, s.conv_dropout, s.dense_dropout
    base = (Variant("drop-dense", f"dense d{dense_p:g}", network(p, dense_dropout=dense_p)),
            Variant("drop-both", f"conv d{conv_p:g} + dense d{dense_p:g}",
                    network(p, conv_dropout=conv_p, dense_dropout=dense_p)),
            Variant("bn-drop-after", f"BN + dense d{dense_p:g}",
                    network(p, bn=ALL_SITES, dense_dropout=dense_p)))
    source = ("Gal & Ghahramani 2016 (MC dropout); Srivastava et al. 2014 (weight scaling "
              "approximates the average)")
    advice = ("the deterministic pass (weight scaling) is as good as averaging the masks")
    variants, claims = in_regimes(("overfit",), base, tuple(
        Claim(f"MC dropout ({s.mc_samples} passes) beats the deterministic pass "
              f"({variant.label})", (variant.name,), (), source, metric="mc_gain",
              equivalence=EQUIVALENCE_MARGIN, equivalence_advice=advice)
        for variant in base))
    n_train, epochs = s.budget("overfit")
    return Question(
        12, "mc-dropout", "Dropout as an ensemble: MC dropout against the deterministic "
        "pass (overfitting regime)", variants=variants, claims=claims, n_train=n_train,
        epochs=epochs, baseline="drop-dense@overfit", regimes=("overfit",),
        note=(f"On the network of each run's best validation epoch: the test accuracy of "
              f"the mean softmax of {s.mc_samples} stochastic passes (dropout on, masks "
              "from the run's seed; BN and all else in evaluation mode) minus the "
              "deterministic pass's (mc_gain), paired within the run. The runs are "
              "questions 4's and 5's, shared. " + _regime_note(s, ("overfit",))))


def branching_network(family: str, *, bn: bool, dropout: float = 0.0,
                      hidden: int = 128) -> str:
    """Question 13's networks: a small Inception-style or residual network.

    ``family`` ``"inception"``: a stem conv and max-pooling, two Inception blocks
    (branches of 8, 8->12, 4->8 and pool->4 channels: 32 out) with a max-pooling
    between them; ``"residual"``: a stem conv and max-pooling, a residual block of 16
    channels and one of 32 with stride 2. Both end at 7 x 7 x 32 on 28 x 28 images, then
    a dense head ``fc(hidden)-[bn]-relu-[dropout]`` before the output layer. ``bn``: BN
    after every conv (conv-BN-ReLU, in the blocks too) and in the head, or none;
    ``dropout``: its rate after the head's activation, or none.

    Why a dense head and not global average pooling (GoogLeNet's, ResNet's): measured on
    Fashion-MNIST (seed 0), these small networks with ``gap`` before the output layer
    underfit, 68-80% test accuracy after 10 epochs on 4,000 images and train-test gaps
    of 0-4 points without BN even on 1,000 images for 50 epochs, so dropout could not
    pay and the target accuracy was never reached; with the head they reach 85-86%
    (short regime) and without BN overfit (gaps 8-15 points, validation loss rising).
    """
    norm = "-bn" if bn else ""
    block_norm = "" if bn else "_nobn"
    if family == "inception":
        block = f"inc8_8_12_4_8_4{block_norm}"
        body = f"c16{norm}-relu-mp2-{block}-mp2-{block}"
    elif family == "residual":
        body = f"c16{norm}-relu-mp2-res16{block_norm}-res32s2{block_norm}"
    else:
        raise ValueError(f"family: expected 'inception' or 'residual', got {family!r}")
    return f"{body}-fc{hidden}{norm}-relu" + (f"-d{dropout:g}" if dropout else "")


#: Question 13's dropout rate in the dense head (the template's dense rate).
BRANCHING_DROPOUT = 0.5


@question(13, "inception-residual")
def _branching(s: Settings) -> Question:
    """Question 13 (the Inception claim): in an Inception-style network, BN without
    dropout vs dropout without BN vs both vs neither; the same for a residual network,
    to see whether the answer is about Inception or about BN. Both regimes."""
    regimes = ("short", "overfit")
    base, claims = [], []
    for family, short in (("inception", "inc"), ("residual", "res")):
        for name, label, bn, dropout in (
                ("plain", "neither", False, 0.0),
                ("bn", "BN, no dropout", True, 0.0),
                ("drop", f"dropout d{BRANCHING_DROPOUT:g}, no BN", False, BRANCHING_DROPOUT),
                ("bn-drop", f"BN + dropout d{BRANCHING_DROPOUT:g}", True, BRANCHING_DROPOUT)):
            base.append(Variant(f"{short}-{name}", f"{family}: {label}",
                                branching_network(family, bn=bn, dropout=dropout,
                                                  hidden=s.profile.hidden),
                                group=family))
        claims += [
            Claim(f"BN without dropout reaches the target accuracy in fewer steps than "
                  f"dropout without BN ({family})", (f"{short}-bn",), (f"{short}-drop",),
                  "Ioffe & Szegedy 2015 (BN-Inception: faster learning)",
                  metric="steps_to_target", lower_is_better=True),
            Claim(f"BN without dropout generalises at least as well as dropout without "
                  f"BN ({family})", (f"{short}-bn",), (f"{short}-drop",),
                  "Ioffe & Szegedy 2015 ('use BN on Inception instead of dropout')",
                  equivalence=EQUIVALENCE_MARGIN,
                  equivalence_advice="BN instead of dropout makes no difference to "
                  "generalisation"),
            Claim(f"Adding dropout to a BN network still helps ({family})",
                  (f"{short}-bn-drop",), (f"{short}-bn",), "many tutorials combine both",
                  equivalence=EQUIVALENCE_MARGIN,
                  equivalence_advice="with BN, dropout can be removed (no loss of "
                  "generalisation)")]
    variants, claims = in_regimes(regimes, base, claims)
    return Question(
        13, "inception-residual", "Inception-style and residual networks: BN instead "
        "of dropout?", variants=variants, claims=tuple(claims), baseline="inc-plain",
        regimes=regimes,
        note=(f"Inception: {branching_network('inception', bn=True, hidden=s.profile.hidden)}; "
              f"residual: {branching_network('residual', bn=True, hidden=s.profile.hidden)} "
              "(the BN variants; without BN the "
              "blocks are _nobn and the stem and head have no bn; dropout "
              f"d{BRANCHING_DROPOUT:g} after the head's ReLU). A dense head rather than "
              "global average pooling: with global average pooling these small networks "
              "underfit (68-80% on Fashion-MNIST, no overfitting to regularise). Steps to "
              "target count a run that never reached the target as censored at its last "
              "step. " + _regime_note(s, regimes)),
        **_main_budget(s))


def build_questions(settings: Settings, numbers=None) -> list[Question]:
    """The questions ``numbers`` (default: all registered), built for ``settings``."""
    numbers = sorted(QUESTIONS) if numbers is None else list(numbers)
    unknown = [n for n in numbers if n not in QUESTIONS]
    if unknown:
        raise ValueError(f"questions: unknown {unknown}; expected some of {sorted(QUESTIONS)}")
    return [QUESTIONS[n][1](settings) for n in dict.fromkeys(numbers)]


def custom_question(settings: Settings, architectures) -> Question:
    """The user's own comparison: every architecture against the first one."""
    architectures = list(dict.fromkeys(architectures))
    if len(architectures) < 1:
        raise ValueError("architectures: give at least one architecture string")
    names = [f"a{i + 1}" for i in range(len(architectures))]
    variants = tuple(Variant(name, arch, arch) for name, arch in zip(names, architectures))
    claims = tuple(Claim(f"{arch} beats {architectures[0]}", (name,), (names[0],),
                         "your comparison")
                   for name, arch in zip(names[1:], architectures[1:]))
    return Question(0, "custom", "Your architectures, each against the first",
                    variants=variants, claims=claims, baseline=names[0],
                    **_main_budget(settings))

