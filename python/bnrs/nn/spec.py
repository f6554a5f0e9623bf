"""The architecture grammar: a compact string that describes a CNN, built into a Sequential.

Tokens are joined by ``-``:

============================  =====================================================
``c<out>[k<size>][s<stride>][p<pad>]``  Conv2d; defaults k3, s1, p = size // 2
``dsc<out>[k<size>][s<stride>][p<pad>][_bn]``  depthwise-separable conv: a depthwise
                              Conv2d (groups = C; k, s, p as ``c``'s), then a 1x1
                              Conv2d to ``out`` channels (see below)
``fc<units>``                 Linear; a Flatten is inserted first on a 4-D tensor
``bn[m<momentum>][e<eps>]``   BatchNorm2d on a 4-D tensor, BatchNorm1d on a 2-D one;
                              defaults m0.1, e1e-5 (PyTorch's)
``brn[m<momentum>][e<eps>][r<r_max>][d<d_max>]``  BatchRenorm2d / BatchRenorm1d (batch
                              renormalisation); defaults m0.01, e1e-5, r3, d5
``gn<groups>``                GroupNorm(groups, C) on a 4-D tensor, GroupNorm(groups, F)
                              over the features of a 2-D one; groups must divide C (F)
``ln``                        GroupNorm(1, C) on a 4-D tensor (see below), LayerNorm(F)
                              on a 2-D one
``in``                        InstanceNorm2d(C) (no affine, PyTorch's default), 4-D only
``d<p>``                      Dropout(p)
``sd<p>``                     Dropout2d(p), spatial (channel) dropout, 4-D only
``mp<k>[s<s>]``               MaxPool2d(k, s); the stride defaults to k
``ap<k>[s<s>]``               AvgPool2d(k, s); the stride defaults to k
``relu`` ``lrelu``            ReLU, LeakyReLU(0.01)
``sigmoid`` ``tanh``          Sigmoid, Tanh
``gap``                       global average pooling, AdaptiveAvgPool2d(1), then Flatten
``inc<b1>_<b3r>_<b3>_<b5r>_<b5>_<bp>[_<norm>][_dsc]``  Inception block: four parallel
                              branches concatenated along the channels (see below)
``res<c>[s<s>][_<norm>][_dsc]``  residual block, torchvision's BasicBlock (see below)
============================  =====================================================

The blocks. ``inc<b1>_<b3r>_<b3>_<b5r>_<b5>_<bp>`` is a :class:`~bnrs.nn.Concat` of the
branches conv1x1(b1); conv1x1(b3r) then conv3x3(b3); conv1x1(b5r) then conv5x5(b5);
MaxPool2d(3, 1, padding 1) then conv1x1(bp) (GoogLeNet's), each count at least 1, the
size kept, b1 + b3 + b5 + bp channels out. ``res<c>[s<s>]`` is a
:class:`~bnrs.nn.Residual`: body conv3x3(c, stride s)-conv3x3(c), shortcut the identity,
or conv1x1(c, stride s) when the channels or the stride change, ReLU after the addition.
Each conv is followed by the block's norm and a ReLU (except the last conv of a residual
body and the projection, which have the norm only: the ReLU comes after the addition).
The optional ``_<norm>`` suffix says where the batch norm goes: none for conv-BN-ReLU
(the default), ``_nobn`` for no batch norm, ``_postbn`` for BN after the ReLU
(conv-ReLU-BN; a conv without its own ReLU keeps its BN). A conv directly followed by a BN
has no bias (torchvision's choice); the others have one. The PyTorch mirror of the
containers and their state-dict keys (``3.branches.0.0.weight``, ``2.body.0.weight``,
``2.shortcut.0.weight``) are in :mod:`bnrs.nn.branches`. The ``_dsc`` suffix makes
every conv of a block wider than 1x1 (the 3x3 and 5x5 of ``inc``, the 3x3 of ``res``)
depthwise-separable: the depthwise conv (no bias) then the 1x1 conv, which takes that
conv's place before the norm and ReLU.

``dsc<out>`` is the depthwise-separable convolution of MobileNet and Xception: a
depthwise kxk Conv2d (``groups`` = ``in_channels``, one filter per channel, no bias) then
a pointwise 1x1 Conv2d to ``out`` channels with a bias, as ``c<out>`` has; ``-bn-relu``
after it as after ``c``. Between the two there is nothing (Chollet's Xception found a
nonlinearity there hurt), or with ``_bn`` a BatchNorm2d of the input's channels
(MobileNet's placement without its ReLU). It costs C·k² + C·out weights instead of
C·out·k².

The options of ``bn`` and ``brn`` come in the order shown, each at most once, and take a
decimal number with an optional negative exponent: ``bnm0.01``, ``bne1e-3``,
``bnm0.01e1e-3`` (momentum 0.01, eps 0.001), ``brnr2d1``, ``brnm0.05e1e-4r3d5``. Within
such a number the ``-`` of ``e-3`` is not a token separator (no token starts with a digit,
so a ``-`` between ``<digit>e`` and a digit cannot end a token). The ranges are the
layers': momentum in [0, 1] for ``bn`` and (0, 1] for ``brn``, eps > 0, r_max >= 1,
d_max >= 0.

The output layer ``fc<n_classes>`` (after a Flatten if needed) is appended by
:func:`from_spec`; the empty string is a linear model.

The per-sample norms and their PyTorch mirrors (same state-dict keys and shapes): ``gn8``
after a conv of C channels is ``nn.GroupNorm(8, C)`` (``weight``, ``bias`` of shape (C,));
after a dense layer of F units ``nn.GroupNorm(8, F)``, which PyTorch also applies to an
(N, F) input. ``ln`` after a conv or pool is layer normalisation over (C, H, W) with a
*per-channel* affine, ``nn.GroupNorm(1, C)`` (``weight``, ``bias`` of shape (C,)), as in
Wu and He's comparison of the norms; PyTorch's ``nn.LayerNorm([C, H, W])`` normalises the
same values but learns a per-element affine of shape (C, H, W), which depends on the image
size. After a dense layer ``ln`` is ``nn.LayerNorm(F)``. ``in`` is
``nn.InstanceNorm2d(C)``: no parameters, nothing in the state dict.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Sequence
from typing import NamedTuple

from .._validation import Interval
from .activation import LeakyReLU, ReLU, Sigmoid, Tanh
from .batchnorm import BatchNorm1d, BatchNorm2d
from .branches import AdaptiveAvgPool2d, Concat, Residual
from .dropout import Dropout, Dropout2d
from .layers import AvgPool2d, Conv2d, Flatten, Linear, MaxPool2d, positive_int
from .module import Module, Sequential, as_generator
from .normalization import GroupNorm, InstanceNorm2d, LayerNorm
from .renorm import BatchRenorm1d, BatchRenorm2d

__all__ = ["DEFAULT_ARCHITECTURE", "SpecError", "Token", "from_spec", "parse"]

#: The default network: two conv-bn-relu-pool blocks, then a 128-unit hidden layer.
DEFAULT_ARCHITECTURE = "c16-bn-relu-mp2-c32-bn-relu-mp2-d0.25-fc128-bn-relu-d0.5"

_NUMBER = r"(\d+)"
_PROBABILITY = r"(\d+(?:\.\d*)?|\.\d+)"
#: A positive decimal with an optional negative exponent (``0.01``, ``1e-5``, ``.5e-3``).
_REAL = r"((?:\d+(?:\.\d*)?|\.\d+)(?:e-\d+)?)"
#: A ``-`` that separates tokens: any but the one in an exponent like ``1e-5``.
_SEPARATOR = re.compile(r"(?<!\de)-|-(?!\d)", re.ASCII)

#: The batch-norm tokens' options, in their written order: kind -> (letter, keyword of
#: the layer, allowed values). The ranges are the layers' own.
_NORM_OPTIONS: dict[str, tuple[tuple[str, str, Interval], ...]] = {
    "bn": (("m", "momentum", Interval("real", 0, 1)),
           ("e", "eps", Interval("real", 0, None, closed="right"))),
    "brn": (("m", "momentum", Interval("real", 0, 1, closed="right")),
            ("e", "eps", Interval("real", 0, None, closed="right")),
            ("r", "r_max", Interval("real", 1, None)),
            ("d", "d_max", Interval("real", 0, None))),
}


def _norm_form(kind: str) -> tuple[str, str]:
    """The full-token regex and the written form of a batch-norm token with its options."""
    options = _NORM_OPTIONS[kind]
    pattern = kind + "".join(f"(?:{letter}{_REAL})?" for letter, _, _ in options)
    form = kind + "".join(f"[{letter}<{name}>]" for letter, name, _ in options)
    return pattern, form


#: kind -> (full-token regex, the form shown in errors)
_FORMS: dict[str, tuple[str, str]] = {
    "conv": (rf"c{_NUMBER}(?:k{_NUMBER})?(?:s{_NUMBER})?(?:p{_NUMBER})?",
             "c<out>[k<size>][s<stride>][p<pad>]"),
    "separable": (rf"dsc{_NUMBER}(?:k{_NUMBER})?(?:s{_NUMBER})?(?:p{_NUMBER})?(?:_(bn))?",
                  "dsc<out>[k<size>][s<stride>][p<pad>][_bn]"),
    "fc": (rf"fc{_NUMBER}", "fc<units>"),
    "bn": _norm_form("bn"),
    "brn": _norm_form("brn"),
    "gn": (rf"gn{_NUMBER}", "gn<groups>"),
    "ln": ("ln", "ln"),
    "in": ("in", "in"),
    "dropout": (rf"d{_PROBABILITY}", "d<p>"),
    "spatial_dropout": (rf"sd{_PROBABILITY}", "sd<p>"),
    "maxpool": (rf"mp{_NUMBER}(?:s{_NUMBER})?", "mp<k>[s<s>]"),
    "avgpool": (rf"ap{_NUMBER}(?:s{_NUMBER})?", "ap<k>[s<s>]"),
    "relu": ("relu", "relu"),
    "lrelu": ("lrelu", "lrelu"),
    "sigmoid": ("sigmoid", "sigmoid"),
    "tanh": ("tanh", "tanh"),
    "gap": ("gap", "gap"),
    "inception": ("inc" + "_".join([_NUMBER] * 6) + r"(?:_(nobn|postbn))?(?:_(dsc))?",
                  "inc<b1>_<b3r>_<b3>_<b5r>_<b5>_<bp>[_nobn|_postbn][_dsc]"),
    "residual": (rf"res{_NUMBER}(?:s{_NUMBER})?(?:_(nobn|postbn))?(?:_(dsc))?",
                 "res<c>[s<stride>][_nobn|_postbn][_dsc]"),
}
_PATTERNS = {kind: re.compile(pattern, re.ASCII) for kind, (pattern, _) in _FORMS.items()}
#: A token that starts like this is meant as that kind (for a precise error message).
_PREFIXES = (("inc", "inception"), ("res", "residual"), ("dsc", "separable"), ("fc", "fc"), ("sd", "spatial_dropout"), ("mp", "maxpool"), ("gn", "gn"),
             ("ap", "avgpool"), ("brn", "brn"), ("bn", "bn"), ("c", "conv"),
             ("d", "dropout"))
_EXAMPLES = {"conv": "c32, c32k5, c64k3s2p1", "separable": "dsc32, dsc64s2, dsc32k5_bn",
             "dropout": "d0.5",
             "spatial_dropout": "sd0.1", "maxpool": "mp2, mp3s2", "avgpool": "ap2, ap3s1",
             "fc": "fc128", "gn": "gn8, gn1", "bn": "bn, bnm0.01, bne1e-3, bnm0.01e1e-3",
             "brn": "brn, brnr2d1, brnm0.05e1e-4r3d5",
             "inception": "inc16_8_16_4_8_8, inc8_4_8_2_4_4_nobn, inc16_8_16_4_8_8_dsc",
             "residual": "res16, res32s2, res32s2_postbn, res32s2_dsc"}
_ALL_FORMS = ", ".join(form for _, form in _FORMS.values())


class Token(NamedTuple):
    """One parsed token of an architecture string.

    Attributes
    ----------
    kind : str
        One of ``conv``, ``separable``, ``fc``, ``bn``, ``brn``, ``gn``, ``ln``, ``in``, ``dropout``,
        ``spatial_dropout``, ``maxpool``, ``avgpool``, ``relu``, ``lrelu``, ``sigmoid``,
        ``tanh``, ``gap``, ``inception``, ``residual``.
    text : str
        The token as written.
    index : int
        0-based position among the tokens.
    offset : int
        0-based character offset in the string.
    args : dict
        The values, defaults filled in: conv ``out_channels, kernel_size, stride,
        padding``; separable those and ``norm`` (``"bn"`` or None); fc ``units``; gn ``num_groups``; dropout and spatial_dropout ``p``; maxpool and avgpool
        ``kernel_size, stride``; bn and brn the options written (``momentum``, ``eps``,
        and for brn ``r_max``, ``d_max``), the layer's defaults standing for the others;
        inception ``branches`` (b1, b3r, b3, b5r, b5, bp), ``norm`` and ``separable``;
        residual ``out_channels``, ``stride``, ``norm`` (``"bn"``, ``"nobn"`` or
        ``"postbn"``) and ``separable`` (bool); nothing for the others.
    """

    kind: str
    text: str
    index: int
    offset: int
    args: dict


class SpecError(ValueError):
    """A bad architecture string; says which token, where, and what was expected.

    Attributes
    ----------
    spec : str
    token_index : int
        0-based index of the bad token.
    offset : int
        0-based character offset of the bad token.
    text : str
        The bad token.
    """

    def __init__(self, spec: str, token_index: int, offset: int, text: str, reason: str):
        self.spec, self.token_index, self.offset, self.text = spec, token_index, offset, text
        caret = " " * offset + "^" * max(len(text), 1)
        super().__init__(f"bad token {text!r} (token {token_index + 1}, character "
                         f"{offset + 1}) in architecture {spec!r}: {reason}\n"
                         f"    {spec}\n    {caret}")


def _expected(kind: str) -> str:
    form = _FORMS[kind][1]
    example = _EXAMPLES.get(kind)
    return f"expected {form}" + (f" (e.g. {example})" if example else "")


def _token_args(kind: str, groups: Sequence[str | None]) -> tuple[dict, str | None]:
    """The argument dict of a token that matched, or an error reason for a bad value."""
    if kind in ("conv", "separable"):
        out, size, stride, pad = groups[:4]
        size_value = 3 if size is None else int(size)
        args = {"out_channels": int(out), "kernel_size": size_value,
                "stride": 1 if stride is None else int(stride),
                "padding": size_value // 2 if pad is None else int(pad)}
        if kind == "separable":
            args["norm"] = groups[4]
        if min(args["out_channels"], args["kernel_size"], args["stride"]) < 1:
            return args, "the channel count, kernel size and stride must be at least 1"
        return args, None
    if kind in _NORM_OPTIONS:
        args = {}
        for (letter, name, allowed), written in zip(_NORM_OPTIONS[kind], groups):
            if written is None:
                continue
            args[name] = float(written)
            if not allowed.accepts(args[name]):
                return args, f"{name} ({letter}) must be {allowed.description}, got {written}"
        return args, None
    if kind == "gn":
        args = {"num_groups": int(groups[0])}
        return args, (None if args["num_groups"] >= 1
                      else "the number of groups must be at least 1")
    if kind == "fc":
        args = {"units": int(groups[0])}
        return args, (None if args["units"] >= 1 else "the unit count must be at least 1")
    if kind in ("dropout", "spatial_dropout"):
        args = {"p": float(groups[0])}
        return args, (None if args["p"] < 1.0
                      else f"the dropout probability must be in [0, 1), got {groups[0]}")
    if kind in ("maxpool", "avgpool"):
        size = int(groups[0])
        args = {"kernel_size": size, "stride": size if groups[1] is None else int(groups[1])}
        return args, (None if min(args.values()) >= 1
                      else "the pooling size and stride must be at least 1")
    if kind == "inception":
        args = {"branches": tuple(int(g) for g in groups[:6]), "norm": groups[6] or "bn",
                "separable": groups[7] is not None}
        return args, (None if min(args["branches"]) >= 1
                      else "every branch's channel count must be at least 1")
    if kind == "residual":
        args = {"out_channels": int(groups[0]),
                "stride": 1 if groups[1] is None else int(groups[1]), "norm": groups[2] or "bn",
                "separable": groups[3] is not None}
        return args, (None if min(args["out_channels"], args["stride"]) >= 1
                      else "the channel count and stride must be at least 1")
    return {}, None


def _separable(in_channels: int, out_channels: int, kernel_size: int, stride: int,
               padding: int, generator, bias: bool = True, between=()) -> list[Module]:
    """A depthwise-separable conv: the depthwise conv (no bias: the pointwise conv's
    follows), the layers ``between``, the 1x1 conv."""
    rng = {"random_state": generator}
    return [Conv2d(in_channels, in_channels, kernel_size, stride, padding,
                   groups=in_channels, bias=False, **rng), *between,
            Conv2d(in_channels, out_channels, 1, bias=bias, **rng)]


def _conv_unit(in_channels: int, out_channels: int, kernel_size: int, stride: int,
               norm: str, generator, activation: bool = True,
               separable: bool = False) -> list[Module]:
    """A conv with the block's norm and (if ``activation``) a ReLU, in the norm's order;
    ``separable`` makes a conv wider than 1x1 depthwise-separable."""
    rng = {"random_state": generator}
    bn_next = norm == "bn" or (norm == "postbn" and not activation)
    if separable and kernel_size > 1:
        conv = _separable(in_channels, out_channels, kernel_size, stride, kernel_size // 2,
                          generator, bias=not bn_next)
    else:
        conv = [Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2,
                       bias=not bn_next, **rng)]
    relu = [ReLU()] if activation else []
    batch_norm = [] if norm == "nobn" else [BatchNorm2d(out_channels, **rng)]
    return conv + (relu + batch_norm if norm == "postbn" and activation
                   else batch_norm + relu)


def _inception(channels: int, args: dict, generator) -> Concat:
    b1, b3r, b3, b5r, b5, bp = args["branches"]
    norm = args["norm"]

    def unit(c_in, c_out, k):
        return _conv_unit(c_in, c_out, k, 1, norm, generator, separable=args["separable"])

    return Concat(Sequential(*unit(channels, b1, 1)),
                  Sequential(*unit(channels, b3r, 1), *unit(b3r, b3, 3)),
                  Sequential(*unit(channels, b5r, 1), *unit(b5r, b5, 5)),
                  Sequential(MaxPool2d(3, 1, 1), *unit(channels, bp, 1)))


def _residual(channels: int, args: dict, generator) -> Residual:
    out, stride, norm = args["out_channels"], args["stride"], args["norm"]
    separable = args["separable"]
    body = Sequential(*_conv_unit(channels, out, 3, stride, norm, generator,
                                  separable=separable),
                      *_conv_unit(out, out, 3, 1, norm, generator, activation=False,
                                  separable=separable))
    shortcut = None
    if stride != 1 or out != channels:
        shortcut = Sequential(*_conv_unit(channels, out, 1, stride, norm, generator,
                                          activation=False))
    return Residual(body, shortcut, ReLU())


def parse(spec: str) -> list[Token]:
    """Split an architecture string into validated tokens.

    Parameters
    ----------
    spec : str
        Tokens joined by ``-`` (see the module docstring); the empty string has none.

    Returns
    -------
    list of Token

    Raises
    ------
    SpecError
        A ValueError naming the bad token, its position and what was expected.

    Examples
    --------
    >>> [(t.kind, t.args) for t in parse("c32k5-mp2")]
    [('conv', {'out_channels': 32, 'kernel_size': 5, 'stride': 1, 'padding': 2}), \
('maxpool', {'kernel_size': 2, 'stride': 2})]
    """
    if not isinstance(spec, str):
        raise TypeError(f"spec: expected an architecture string, got {type(spec).__name__}")
    if spec == "":
        return []
    starts = [0] + [separator.end() for separator in _SEPARATOR.finditer(spec)]
    ends = [separator.start() for separator in _SEPARATOR.finditer(spec)] + [len(spec)]
    return [_parse_token(spec, index, start, spec[start:end])
            for index, (start, end) in enumerate(zip(starts, ends))]


def _parse_token(spec: str, index: int, offset: int, text: str) -> Token:
    if not text:
        raise SpecError(spec, index, offset, text,
                        "empty token (two '-' in a row, or one at an end)")
    for kind, pattern in _PATTERNS.items():
        match = pattern.fullmatch(text)
        if match:
            args, reason = _token_args(kind, match.groups())
            if reason:
                raise SpecError(spec, index, offset, text, reason)
            return Token(kind, text, index, offset, args)
    intended = next((kind for prefix, kind in _PREFIXES if text.startswith(prefix)), None)
    if intended is not None:
        raise SpecError(spec, index, offset, text, _expected(intended))
    raise SpecError(spec, index, offset, text, f"unknown token; expected one of {_ALL_FORMS}")


def _build_layer(token: Token, shape: tuple[int, ...], generator) -> list[Module]:
    """The layers for one token given the current sample shape (Flatten where needed)."""
    args, rng = token.args, {"random_state": generator}
    spatial = len(shape) == 3
    if token.kind in ("conv", "separable", "spatial_dropout", "maxpool", "avgpool", "in", "gap",
                      "inception", "residual") and not spatial:
        raise ValueError(f"needs a (C, H, W) feature map, but the tensor is already "
                         f"flat here, shape {shape}")
    if token.kind == "conv":
        return [Conv2d(shape[0], args["out_channels"], args["kernel_size"], args["stride"],
                       args["padding"], **rng)]
    if token.kind == "separable":
        between = [BatchNorm2d(shape[0], **rng)] if args["norm"] == "bn" else []
        return _separable(shape[0], args["out_channels"], args["kernel_size"], args["stride"],
                          args["padding"], generator, between=between)
    if token.kind == "fc":
        flatten = [Flatten()] if spatial else []
        features = shape[0] * shape[1] * shape[2] if spatial else shape[-1]
        return flatten + [Linear(features, args["units"], **rng)]
    if token.kind == "bn":
        return [(BatchNorm2d if spatial else BatchNorm1d)(shape[0], **args, **rng)]
    if token.kind == "brn":
        return [(BatchRenorm2d if spatial else BatchRenorm1d)(shape[0], **args, **rng)]
    if token.kind == "gn":
        return [GroupNorm(args["num_groups"], shape[0], **rng)]
    if token.kind == "ln":
        return [GroupNorm(1, shape[0], **rng) if spatial else LayerNorm(shape[0], **rng)]
    if token.kind == "in":
        return [InstanceNorm2d(shape[0], **rng)]
    if token.kind == "gap":
        return [AdaptiveAvgPool2d(1), Flatten()]
    if token.kind == "inception":
        return [_inception(shape[0], args, generator)]
    if token.kind == "residual":
        return [_residual(shape[0], args, generator)]
    if token.kind == "dropout":
        return [Dropout(args["p"], **rng)]
    if token.kind == "spatial_dropout":
        return [Dropout2d(args["p"], **rng)]
    if token.kind == "maxpool":
        return [MaxPool2d(args["kernel_size"], args["stride"], **rng)]
    if token.kind == "avgpool":
        return [AvgPool2d(args["kernel_size"], args["stride"], **rng)]
    activation = {"relu": ReLU, "lrelu": LeakyReLU, "sigmoid": Sigmoid, "tanh": Tanh}
    return [activation[token.kind](**rng)]


def _check_shape(input_shape) -> tuple[int, ...]:
    try:
        dims = tuple(input_shape)
    except TypeError:
        dims = None
    if dims is None or isinstance(input_shape, str) or not all(
            isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in dims):
        raise TypeError(f"input_shape: expected (C, H, W) or (n_features,) of ints, "
                        f"got {input_shape!r}")
    shape = tuple(int(d) for d in dims)
    if len(shape) not in (1, 3) or min(shape) < 1:
        raise ValueError(f"input_shape: expected positive (C, H, W) or (n_features,), "
                         f"got {input_shape!r}")
    if math.prod(shape) >= 2**63:
        raise ValueError(f"input_shape: {input_shape!r} has more elements per sample than "
                         "a 64-bit size can count")
    return shape


def from_spec(spec: str | Sequence[Token], input_shape, n_classes: int,
              random_state=None) -> Sequential:
    """Build the network an architecture string describes, with its output layer.

    The sample shape is tracked through the tokens to size every layer; the output
    layer ``fc<n_classes>`` (after a Flatten if the tensor is still 4-D) is appended.

    Parameters
    ----------
    spec : str or list of Token
        For example :data:`DEFAULT_ARCHITECTURE`.
    input_shape : tuple of int
        One sample's shape: (C, H, W) for images, or (n_features,).
    n_classes : int
        Width of the output layer (the logits).
    random_state : int, numpy.random.Generator or None
        One Generator made from it initialises the layers in order (each Dropout seeds
        its own Generator from it), so the same seed builds the same network.

    Returns
    -------
    Sequential
        In training mode.

    Raises
    ------
    SpecError
        A ValueError naming the bad token: bad syntax, a layer that needs a feature map
        after the tensor was flattened, or a spatial size that shrinks below 1.

    Examples
    --------
    >>> model = from_spec("c8-bn-relu-mp2", (1, 8, 8), 10, random_state=0)
    >>> [type(m).__name__ for m in model]
    ['Conv2d', 'BatchNorm2d', 'ReLU', 'MaxPool2d', 'Flatten', 'Linear']
    """
    if isinstance(spec, str):
        tokens = parse(spec)
    elif isinstance(spec, Sequence) and all(isinstance(t, Token) for t in spec):
        tokens = list(spec)
    else:
        raise TypeError(f"spec: expected an architecture string or a list of parsed "
                        f"tokens, got {type(spec).__name__}")
    text = spec if isinstance(spec, str) else "-".join(t.text for t in tokens)
    shape = _check_shape(input_shape)
    n_classes = positive_int(n_classes, "n_classes")
    generator = as_generator(random_state)
    layers: list[Module] = []
    for token in tokens:
        try:
            new_layers = _build_layer(token, shape, generator)
            for layer in new_layers:
                shape = layer.output_shape(shape)
        except ValueError as error:
            raise SpecError(text, token.index, token.offset, token.text, str(error)) from None
        layers.extend(new_layers)
    if len(shape) == 3:
        layers.append(Flatten())
        shape = layers[-1].output_shape(shape)
    layers.append(Linear(shape[0], n_classes, random_state=generator))
    return Sequential(*layers)
