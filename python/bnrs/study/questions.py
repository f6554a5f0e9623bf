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
(:func:`depth_network`).

Adding a question: write a function ``(settings) -> Question`` and decorate it with
``@question(number, key)``; it then runs with ``--questions <number>`` and appears in
the report (a ``sweep`` gives it an accuracy-versus-factor plot).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

__all__ = [
    "DEPTHS",
    "EPOCH_FRACTION",
    "EQUIVALENCE_MARGIN",
    "FAMILIES",
    "QUESTIONS",
    "STUCK_FRACTION",
    "WIDTH",
    "Claim",
    "Profile",
    "Question",
    "Settings",
    "Variant",
    "build_questions",
    "custom_question",
    "depth_network",
    "network",
    "question",
    "settings_for",
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
    target_accuracy: float | None = None
    n_train_eval: int = 2000
    n_test_curve: int = 2000
    conv_dropout: float = 0.2
    dense_dropout: float = 0.5

    def scaled(self, scale: float, n_available: int) -> Settings:
        """The same study on ``scale`` times the training images (capped by the data)."""
        room = n_available - self.n_val
        return replace(self, n_train=min(room, round(self.n_train * scale)),
                       small_batch_n_train=min(room, round(self.small_batch_n_train * scale)))


#: (dataset kind, quick) -> Settings without the dataset name. See the README/report.
PRESETS: dict[tuple[str, bool], dict] = {
    # Measured: the whole default study (questions 1-10, 375 runs) takes 104.5 min of
    # summed run time, 53 min on 2 idle cores with 2 jobs (docs/study).
    ("fashion-mnist", False): {
        "profile": MEDIUM, "seeds": 5, "n_train": 4000, "n_val": 2000, "epochs": 10,
        "small_batch_n_train": 4000, "small_batch_epochs": 4, "target_accuracy": 0.85},
    ("fashion-mnist", True): {
        "profile": MEDIUM, "seeds": 2, "n_train": 2000, "n_val": 1000, "epochs": 3,
        "small_batch_n_train": 1000, "small_batch_epochs": 2, "target_accuracy": 0.80,
        "n_train_eval": 1000, "n_test_curve": 1000},
    ("small", False): {
        "profile": SMALL, "seeds": 5, "n_train": 1000, "n_val": 258, "epochs": 20,
        "small_batch_n_train": 1000, "small_batch_epochs": 10, "batch_size": 32,
        "target_accuracy": 0.95, "n_train_eval": 1000, "n_test_curve": 1000},
    ("small", True): {
        "profile": SMALL, "seeds": 3, "n_train": 1000, "n_val": 258, "epochs": 8,
        "small_batch_n_train": 500, "small_batch_epochs": 4, "batch_size": 32,
        "target_accuracy": 0.90, "n_train_eval": 1000, "n_test_curve": 1000},
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
                                               n_available - n_val))
    if seeds is not None:
        settings = replace(settings, seeds=seeds)
    if epochs is not None:
        settings = replace(settings, epochs=epochs, small_batch_epochs=epochs)
    if scale != 1.0:
        settings = settings.scaled(scale, n_available)
    return settings


@dataclass(frozen=True)
class Variant:
    """One network and its training overrides within a question.

    ``group`` and ``x`` place it on a sweep plot (e.g. group "BN", x = batch size).
    """

    name: str
    label: str
    architecture: str
    batch_size: int | None = None
    lr: float | None = None
    init_scale: float = 1.0
    group: str | None = None
    x: float | None = None


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


#: The equivalence margin of accuracy claims: ±1 point. Why 1 point: seed-to-seed noise
#: of a single run's test accuracy is 0.5-1.4 points on this kind of network (the
#: pilot; the study's variant tables agree), so a practitioner comparing two single runs
#: cannot see, and would not act on, a difference under about 1 point; and with 5 seeds
#: and paired differences whose SD is of that order (0.4-1 point in the study), a
#: narrower margin could hardly ever be established. Chosen from that noise level
#: (added after the committed study's runs, not tuned to their mean effects).
EQUIVALENCE_MARGIN = 0.01


@dataclass(frozen=True)
class Question:
    """A question: its variants, the claims tested, and its training budget."""

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


def _lr_for_batch(settings: Settings, batch_size: int) -> float:
    """Square-root scaling: lr = base_lr * sqrt(batch / base_batch) (Adam, see Q6)."""
    return settings.lr * math.sqrt(batch_size / settings.batch_size)


def _main_budget(settings: Settings) -> dict:
    return {"n_train": settings.n_train, "epochs": settings.epochs}


# --------------------------------------------------------------------------- questions

@question(1, "bn")
def _bn_or_not(s: Settings) -> Question:
    p = s.profile
    return Question(
        1, "bn", "Does batch norm help? (none vs BN after every conv and dense layer)",
        variants=(Variant("plain", "no BN", network(p)),
                  Variant("bn", "BN everywhere", network(p, bn=ALL_SITES))),
        claims=(Claim("BN improves test accuracy", ("bn",), ("plain",),
                      "Ioffe & Szegedy 2015; 'add BN after every conv layer'"),
                Claim("BN reaches a lower training loss in the same epochs", ("bn",),
                      ("plain",), "Ioffe & Szegedy 2015 (faster training)",
                      metric="final_train_loss", lower_is_better=True)),
        baseline="plain", **_main_budget(s))


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


@question(4, "dropout-placement")
def _dropout_placement(s: Settings) -> Question:
    p, conv_p, dense_p = s.profile, s.conv_dropout, s.dense_dropout
    return Question(
        4, "dropout-placement", "Where does dropout go in a conv net (no BN)?",
        variants=(
            Variant("plain", "no dropout", network(p)),
            Variant("drop-conv-before-pool", f"conv d{conv_p:g} before pooling",
                    network(p, conv_dropout=conv_p, conv_dropout_where="before_pool")),
            Variant("drop-conv", f"conv d{conv_p:g} after pooling",
                    network(p, conv_dropout=conv_p)),
            Variant("drop-dense", f"dense d{dense_p:g} only", network(p, dense_dropout=dense_p)),
            Variant("drop-both", f"conv d{conv_p:g} after pooling + dense d{dense_p:g}",
                    network(p, conv_dropout=conv_p, dense_dropout=dense_p)),
            Variant("sdrop-conv", f"conv spatial sd{conv_p:g} after pooling",
                    network(p, conv_dropout=conv_p, spatial=True))),
        claims=(Claim("Dropout in the dense layers improves test accuracy", ("drop-dense",),
                      ("plain",), "Srivastava et al. 2014; Keras/PyTorch tutorials"),
                Claim("Dropout in conv and dense layers improves test accuracy",
                      ("drop-both",), ("plain",), "Srivastava et al. 2014"),
                Claim("Conv dropout works better after pooling than before it",
                      ("drop-conv",), ("drop-conv-before-pool",),
                      "common in Keras examples (conv-pool-dropout)"),
                Claim("Spatial dropout beats element dropout in conv layers",
                      ("sdrop-conv",), ("drop-conv",),
                      "Tompson et al. 2015 (neighbouring pixels are correlated)"),
                Claim("Dropout is more useful in dense than in conv layers",
                      ("drop-dense",), ("drop-conv",), "'dropout belongs in the dense "
                      "layers'")),
        baseline="plain", **_main_budget(s))


@question(5, "dropout-with-bn")
def _dropout_with_bn(s: Settings) -> Question:
    p, dense_p = s.profile, s.dense_dropout
    return Question(
        5, "dropout-with-bn", "Dropout with BN: BN only, dropout only, both; dropout "
        "before vs after BN",
        variants=(
            Variant("bn", "BN only", network(p, bn=ALL_SITES)),
            Variant("drop-dense", f"dropout only (dense d{dense_p:g})",
                    network(p, dense_dropout=dense_p)),
            Variant("bn-drop-after", f"BN + dense d{dense_p:g} after BN and ReLU",
                    network(p, bn=ALL_SITES, dense_dropout=dense_p)),
            Variant("bn-drop-before", f"BN + dense d{dense_p:g} before BN (variance shift)",
                    network(p, bn=ALL_SITES, dense_dropout=dense_p,
                            dense_dropout_before_bn=True))),
        claims=(Claim("BN alone beats dropout alone", ("bn",), ("drop-dense",),
                      "Ioffe & Szegedy 2015 (BN regularises, reducing the need for "
                      "dropout)"),
                Claim("Adding dropout to a BN network still helps", ("bn-drop-after",),
                      ("bn",), "many tutorials combine both",
                      equivalence=EQUIVALENCE_MARGIN,
                      equivalence_advice="dropout can be removed once BN is there (it "
                      "makes no difference with BN)"),
                Claim("Dropout after BN beats dropout before BN", ("bn-drop-after",),
                      ("bn-drop-before",), "Li et al. 2019 (variance shift)",
                      equivalence=EQUIVALENCE_MARGIN,
                      equivalence_advice="where dropout goes relative to BN makes no "
                      "difference")),
        baseline="bn", **_main_budget(s))


BATCH_SIZES = (2, 4, 8, 16, 32, 64, 128, 256)
_NORMS = (("plain", "no BN", ()), ("bn", "BN", ALL_SITES), ("brn", "batch renorm", ALL_SITES))


@question(6, "batch-size")
def _batch_size(s: Settings) -> Question:
    p = s.profile
    sizes = [b for b in BATCH_SIZES if b <= s.small_batch_n_train]
    variants = tuple(
        Variant(f"{norm}-b{b}", f"{label}, batch {b}",
                network(p, bn=sites, norm="brn" if norm == "brn" else "bn"),
                batch_size=b, lr=_lr_for_batch(s, b), group=label, x=b)
        for norm, label, sites in _NORMS for b in sizes)
    small, normal = sizes[0], min(32, sizes[-1])
    claims = [Claim(f"BN at batch {normal} beats BN at batch {small} (Wu & He 2018: "
                    "ImageNet error 23.6% at 32 vs 34.7% at 2)", (f"bn-b{normal}",),
                    (f"bn-b{small}",), "Wu & He 2018"),
              Claim(f"BN's gain over no BN is smaller at batch {small} than at {normal}",
                    (f"bn-b{normal}", f"plain-b{small}"), (f"plain-b{normal}", f"bn-b{small}"),
                    "Ioffe 2017; Wu & He 2018 (BN needs large enough batches)")]
    for b in sizes[:2]:
        claims.append(Claim(f"Batch renormalisation beats BN at batch {b}",
                            (f"brn-b{b}",), (f"bn-b{b}",), "Ioffe 2017"))
    return Question(
        6, "batch-size", "Batch size 2 to 256 with and without BN, and batch "
        "renormalisation as the small-batch remedy",
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
              "running statistics), no warm-up."))


@question(7, "learning-rate")
def _learning_rate(s: Settings) -> Question:
    p = s.profile
    multipliers = (1, 3, 10, 30)
    variants = tuple(
        Variant(f"{norm}-lr{m}", f"{label}, lr x{m}", network(p, bn=sites),
                lr=s.lr * m, group=label, x=s.lr * m)
        for norm, label, sites in _NORMS[:2] for m in multipliers)
    return Question(
        7, "learning-rate", f"Learning-rate tolerance: x1, x3, x10, x30 of {s.lr:g}, "
        "with and without BN",
        variants=variants,
        claims=(Claim("With BN the network tolerates a 10x learning rate better",
                      ("bn-lr10",), ("plain-lr10",), "Ioffe & Szegedy 2015 (higher "
                      "learning rates)"),
                Claim("With BN fewer runs diverge at a 30x learning rate",
                      ("bn-lr30",), ("plain-lr30",), "Ioffe & Szegedy 2015",
                      divergence=True),
                Claim("BN loses less accuracy from x1 to x10 than no BN",
                      ("bn-lr10", "plain-lr1"), ("plain-lr10", "bn-lr1"),
                      "Bjorck et al. 2018 (BN enables large learning rates)")),
        sweep=("learning rate (Adam)", "log"), baseline="bn-lr1", **_main_budget(s))


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
    networks with and without BN and no dropout (the saturating case of the claim). Same
    optimizer, data, training subset and seeds as the main questions, for half their
    epochs (:data:`EPOCH_FRACTION`, rounded up; ``--epochs`` sets the main questions'
    epochs and so halves here too): 24 variants x seeds runs; a 12-layer run takes about
    4x the time of a 2-layer one (measured on Fashion-MNIST, 4,000 images, 5 epochs).

    A run is *stuck* (did not train) when its training loss after the last epoch is
    above :data:`STUCK_FRACTION` x ln(classes), or it diverged; a variant *stops
    training* at the smallest depth at which most of its seeds are stuck
    (:func:`bnrs.study.results.stopping_depths`).
    """
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
        variants=_depth_variants(s), claims=claims, n_train=s.n_train,
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

