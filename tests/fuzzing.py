"""Shared machinery of the fuzz suites (test_fuzz.py, test_fuzz_nn.py): the hypothesis
settings, random values, memory layouts, argument snapshots, a comparison with NaN/inf
semantics, and mutations that break one argument of an entry point.

A *spec* of an entry point draws a dict of valid arguments; a *mutation* is a function
``(draw, args) -> (exception types, regex of argument names)`` that breaks one argument of
that dict in place; :func:`assert_rejected` checks the outcome.
"""

from __future__ import annotations

import copy
import math
import re
from typing import Any, Callable, NamedTuple

import longrun
import numpy as np
import pytest
import reference as ref
from conftest import FLOAT32_ATOL, _assert_close
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

FUZZ = settings(max_examples=longrun.FUZZ_EXAMPLES, deadline=None,
                derandomize=not longrun.LONG_RUN, print_blob=True,
                phases=tuple(Phase) if longrun.FUZZ_SHRINK else (
                    Phase.explicit, Phase.reuse, Phase.generate),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])

#: Larger than any machine's memory, and than isize::MAX bytes once squared.
HUGE = 2**40
#: Beyond a 64-bit integer.
BEYOND_INT64 = (2**64, -(2**63) - 1)


class Spec(NamedTuple):
    """One public entry point.

    ``draw(draw)`` returns a dict of valid arguments (and whatever ``check`` needs);
    ``call(args)`` runs the entry point; ``check(result, before)`` compares the result
    with the reference, where ``before`` is a copy of the arguments taken before the call;
    ``layouts`` names the read-only array arguments that may come in any dtype and layout;
    ``inplace`` names the buffers the call documents to update; ``mutations`` are
    functions ``(draw, args) -> (exception types, regex of the argument names)`` that
    break one argument in place.
    """

    call: Callable[[dict], Any]
    draw: Callable[[Callable], dict]
    check: Callable[[Any, dict], None]
    layouts: tuple[str, ...] = ()
    inplace: tuple[str, ...] = ()
    mutations: tuple[Callable, ...] = ()



# --------------------------------------------------------------------------- values


def floats(draw, shape, special: bool = False) -> np.ndarray:
    """A float32 array of ``shape``: normal, small integers (ties, constant channels),
    mixed magnitudes, or (if ``special``) with NaN and ±inf sprinkled in."""
    generator = np.random.default_rng(draw(st.integers(0, 2**32 - 1), label="seed"))
    kinds = ["normal", "small_ints", "magnitudes"] + (["special"] if special else [])
    kind = draw(st.sampled_from(kinds), label="values")
    if kind == "small_ints":
        values = generator.integers(-2, 3, shape)
    elif kind == "magnitudes":
        values = generator.standard_normal(shape) * 10.0 ** generator.integers(-3, 4, shape)
    else:
        values = generator.standard_normal(shape)
        if kind == "special":
            values[generator.random(shape) < 0.15] = np.nan
            values[generator.random(shape) < 0.1] = np.inf
            values[generator.random(shape) < 0.1] = -np.inf
    return np.asarray(values, dtype=np.float32)


def strided(array):
    wide = np.zeros(array.shape + (2,), array.dtype)
    wide[..., 1] = array
    return wide[..., 1]


def unaligned(array):
    if array.size == 0:
        return array
    raw = np.zeros(array.nbytes + 1, np.uint8)
    shifted = np.ndarray(array.shape, array.dtype, buffer=raw, offset=1)
    shifted[...] = array
    return shifted


def read_only(array):
    frozen = array.copy()
    frozen.setflags(write=False)
    return frozen


def zero_strides(array):
    """A broadcast (zero-stride, read-only) view repeating the first entry of axis 0."""
    return np.broadcast_to(array[:1], array.shape) if array.ndim else array


def _small(array):
    return np.abs(array[np.isfinite(array)]).max(initial=0) < 1e4


#: name -> (applies to the array?, transform). Values may change (zero strides, float16,
#: ints): the reference is computed from the transformed argument, as bnrs sees it.
FLOAT_LAYOUTS: dict[str, tuple[Callable, Callable]] = {
    "c": (lambda a: True, lambda a: a),
    "fortran": (lambda a: a.ndim > 0, np.asfortranarray),  # a 0-d array would become 1-d
    "strided": (lambda a: True, strided),
    "negative_strides": (lambda a: a.ndim > 0, lambda a: np.flip(np.flip(a).copy())),
    "zero_strides": (lambda a: a.ndim > 0, zero_strides),
    "unaligned": (lambda a: True, unaligned),
    "read_only": (lambda a: True, read_only),
    "float64": (lambda a: True, lambda a: a.astype(np.float64)),
    "float16": (_small, lambda a: a.astype(np.float16)),
    "int32": (lambda a: _small(a) and np.isfinite(a).all(),
              lambda a: np.round(a).astype(np.int32)),
    "uint8": (lambda a: _small(a) and np.isfinite(a).all(),
              lambda a: np.clip(np.round(a), 0, 255).astype(np.uint8)),
    "big_endian": (lambda a: True, lambda a: a.astype(">f4")),
    "python_list": (lambda a: 0 < a.size <= 64, lambda a: a.tolist()),
}

INT_LAYOUTS: dict[str, tuple[Callable, Callable]] = {
    "c": (lambda a: True, lambda a: a),
    "fortran": (lambda a: a.ndim > 0, np.asfortranarray),
    "strided": (lambda a: True, strided),
    "unaligned": (lambda a: True, unaligned),
    "read_only": (lambda a: True, read_only),
    "int32": (lambda a: True, lambda a: a.astype(np.int32)),
    "uint16": (lambda a: True, lambda a: a.astype(np.uint16)),
    "big_endian": (lambda a: True, lambda a: a.astype(">i8")),
    "python_list": (lambda a: 0 < a.size <= 64, lambda a: a.tolist()),
}


def any_layout(draw, value):
    if not isinstance(value, np.ndarray):
        return value
    table = INT_LAYOUTS if value.dtype.kind in "iu" else FLOAT_LAYOUTS
    names = [name for name, (applies, _) in table.items() if applies(value)]
    return table[draw(st.sampled_from(names), label="layout")][1](value)


def snapshot(args: dict) -> dict:
    """Deep copies of the arguments (arrays keep dtype, layout is irrelevant)."""
    return {key: (np.array(value, copy=True) if isinstance(value, np.ndarray)
                  and value.size < 10**6 else copy.deepcopy(value))
            for key, value in args.items()
            if not (isinstance(value, np.ndarray) and value.size >= 10**6)}


def identical(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))


def as_seen(value):
    """The float32 values bnrs computes with, as float64 for the references."""
    return None if value is None else np.asarray(value, dtype=np.float32).astype(np.float64)


def magnitude(*values) -> float:
    """The largest finite magnitude among the values (at least 1), for tolerances."""
    scale = 1.0
    for value in values:
        if value is not None:
            array = np.asarray(value, dtype=np.float64)
            finite = array[np.isfinite(array)]
            if finite.size:
                scale = max(scale, float(np.abs(finite).max()))
    return scale


def assert_matches(actual, expected, *, name, terms=1, scale=1.0, dtype=np.float32):
    """Same shape and dtype, NaN and ±inf in the same places, finite values within the
    float32 tolerance of ``conftest._assert_close`` scaled by the values' magnitude."""
    if dtype is not None:
        assert isinstance(actual, np.ndarray) and actual.dtype == dtype, (
            f"{name}: got {type(actual).__name__} {getattr(actual, 'dtype', '')}, "
            f"expected a {np.dtype(dtype)} array")
    got = np.asarray(actual, dtype=np.float64)
    want = np.asarray(expected, dtype=np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape}, expected {want.shape}"
    for test in (np.isnan, np.isposinf, np.isneginf):
        differs = test(got) != test(want)
        if differs.any():
            where = tuple(int(i) for i in np.argwhere(differs)[0])
            raise AssertionError(f"{name}: {test.__name__} differs at {where}: got "
                                 f"{got[where]!r}, expected {want[where]!r}")
    finite = np.isfinite(want)
    _assert_close(np.where(finite, got, 0.0), np.where(finite, want, 0.0), terms=terms,
                  atol=FLOAT32_ATOL * scale, dtype=None, name=name)


#: float32's unit roundoff: one rounding of x is off by at most UNIT_ROUNDOFF * |x|.
UNIT_ROUNDOFF = 2.0**-24


def as_float32_scalar(value: float) -> float:
    """A hyper-parameter as the float32 kernels see it."""
    return float(np.float32(value))


def adam_step_bounds(param, grad, exp_avg, exp_avg_sq, step, *, lr, beta1, beta2, eps,
                     weight_decay, decoupled, errors=(0.0, 0.0, 0.0)):
    """Bounds on the float32 rounding error of one Adam step, element-wise, given the
    bounds ``errors`` already carried by (param, exp_avg, exp_avg_sq).

    Follows the kernel's evaluation order (``rust/src/kernels/optim.rs``), with float64
    values of its intermediates: every operation adds one rounding of its result
    (UNIT_ROUNDOFF times its magnitude) to the errors it propagates from its operands
    (first order; the hyper-parameters are exact float32 values and 1 - beta is exact for
    beta in [0.5, 1) or 0). The tolerance is this bound times 2 (second-order terms and
    the float64 reference's own rounding), far below a wrong update's error.
    Returns the bounds on (param, exp_avg, exp_avg_sq) after the step.
    """
    u = UNIT_ROUNDOFF
    w, g = as_seen(param), as_seen(grad)
    m, v = as_seen(exp_avg), as_seen(exp_avg_sq)
    err_w, err_m, err_v = (np.broadcast_to(np.asarray(e, np.float64), w.shape)
                           for e in errors)
    if decoupled:
        decay = 1.0 - lr * weight_decay
        err_w = abs(decay) * err_w + u * np.abs(w) * (lr * weight_decay + abs(decay)) \
            + u * np.abs(w * decay)
        w = w * decay
        err_g = np.zeros_like(g)
    else:
        err_g = weight_decay * err_w + u * np.abs(weight_decay * w)
        g = g + weight_decay * w
        err_g = err_g + u * np.abs(g)
    d = g - m
    err_d = err_g + err_m + u * np.abs(d)
    t = d * (1.0 - beta1)
    err_t = (1.0 - beta1) * err_d + u * np.abs(t)
    m_new = m + t
    err_m_new = err_m + err_t + u * np.abs(m_new)
    q = (1.0 - beta2) * g * g
    err_q = 2 * (1.0 - beta2) * np.abs(g) * err_g + 2 * u * q
    r = beta2 * v
    err_r = beta2 * err_v + u * r
    v_new = r + q
    err_v_new = err_r + err_q + u * v_new
    s = np.sqrt(v_new)
    with np.errstate(divide="ignore", invalid="ignore"):
        err_s = np.where(s > 0, err_v_new / (2 * s), 0.0)
    err_s = np.minimum(err_s, np.sqrt(err_v_new)) + u * s
    bias2_sqrt = np.sqrt(1.0 - beta2**step)
    denom = s / bias2_sqrt + eps
    # Division and the float32 rounding of bias2_sqrt, then the addition of eps.
    err_denom = err_s / bias2_sqrt + 2 * u * s / bias2_sqrt + u * denom
    ratio = m_new / denom
    err_ratio = err_m_new / denom + np.abs(ratio) * err_denom / denom + u * np.abs(ratio)
    step_size = lr / (1.0 - beta1**step)
    update = step_size * ratio
    # step_size rounded to float32, then the product, then the subtraction.
    err_w_new = err_w + step_size * err_ratio + 2 * u * np.abs(update) \
        + u * np.abs(w - update)
    return err_w_new, err_m_new, err_v_new


def assert_within(actual, expected, bound, *, name):
    """``actual`` is a float32 array within ``bound`` (element-wise) of ``expected``."""
    assert isinstance(actual, np.ndarray) and actual.dtype == np.float32, name
    got = np.asarray(actual, dtype=np.float64)
    want = np.asarray(expected, dtype=np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape}, expected {want.shape}"
    error = np.abs(got - want)
    bad = ~(error <= bound)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.size} elements differ; first "
                             f"at {where}: got {got[where]!r}, expected {want[where]!r} "
                             f"(error {error[where]:.3g}, allowed "
                             f"{np.broadcast_to(bound, error.shape)[where]:.3g})")


def pair_arg(draw, pair):
    """A (h, w) pair as the user may write it: int, tuple, list or NumPy ints."""
    forms = ["tuple", "list", "numpy"] + (["int"] if pair[0] == pair[1] else [])
    form = draw(st.sampled_from(forms), label="pair form")
    if form == "int":
        return pair[0]
    if form == "list":
        return list(pair)
    if form == "numpy":
        return np.array(pair, dtype=np.int64)
    return tuple(pair)


def pair_value(value):
    return ref.pair(tuple(int(v) for v in value) if isinstance(value, (list, np.ndarray))
                    else value)


# --------------------------------------------------------------------------- mutations

NON_REAL = {
    "bool": lambda shape: np.zeros(shape, bool),
    "complex": lambda shape: np.zeros(shape, np.complex64),
    "object": lambda shape: np.full(shape, None, dtype=object),
    "str": lambda shape: np.full(shape, "1"),
    "datetime": lambda shape: np.zeros(shape, "datetime64[s]"),
    "void": lambda shape: np.zeros(shape, "V4"),
}

NOT_ARRAYS = {"a string": "abc", "a dict": {"a": 1}, "an object": object(),
              "a ragged list": [[1.0], [1.0, 2.0]]}


def non_real(arg, required=True, names=None):
    """Replace an array argument by a same-shape non-real array or a non-array object."""
    def mutate(draw, args):
        choices = sorted(NON_REAL) + sorted(NOT_ARRAYS) + (["None"] if required else [])
        kind = draw(st.sampled_from(choices), label=f"non-real {arg}")
        if kind in NON_REAL:
            args[arg] = NON_REAL[kind](np.shape(args[arg]))
        elif kind == "None":
            args[arg] = None
        else:
            args[arg] = NOT_ARRAYS[kind]
        return (ValueError if kind == "a ragged list" else TypeError), names or arg
    return mutate


def ndim(arg, names=None, accepted=None):
    """Give an array argument one axis more or one fewer (or more, to reach a number of
    axes outside ``accepted``, when the entry point takes several)."""
    def mutate(draw, args):
        shape = np.shape(args[arg])
        options = [shape + (2,), (1,) + shape] + ([shape[1:], shape[:-1]] if shape else [])
        if accepted:
            options = [s for s in options if len(s) not in accepted]
            options += [(3,) * d for d in range(6) if d not in accepted]
        args[arg] = floats(draw, draw(st.sampled_from(options), label=f"{arg} shape"))
        return ValueError, names or arg
    return mutate


def zero_size(arg, names=None):
    """Make one axis of an array argument empty."""
    def mutate(draw, args):
        shape = list(np.shape(args[arg]))
        shape[draw(st.integers(0, len(shape) - 1), label=f"{arg} empty axis")] = 0
        args[arg] = np.zeros(shape, np.float32)
        return ValueError, names or arg
    return mutate


def resize(arg, axis, names=None):
    """Change the size of one axis of an array argument (mismatched channels, lengths)."""
    def mutate(draw, args):
        value = args[arg]
        shape = list(np.shape(value))
        shape[axis] += draw(st.sampled_from([-1, 1, 2, 5] if shape[axis] > 1 else [1, 2, 5]),
                            label=f"{arg} axis {axis}")
        replacement = floats(draw, tuple(shape))
        if isinstance(value, np.ndarray) and value.dtype.kind in "iu":
            replacement = np.zeros(shape, value.dtype)
        args[arg] = replacement
        return ValueError, names or arg
    return mutate


def value(arg, choices, errors, names=None):
    """Set a scalar argument to one of ``choices``."""
    def mutate(draw, args):
        args[arg] = draw(st.sampled_from(choices), label=arg)
        return errors, names or arg
    return mutate


def inplace(arg):
    """Pass a buffer updated in place that cannot be: wrong dtype, layout or writeability."""
    bad = {
        "float64": (lambda a: a.astype(np.float64), TypeError),
        "int32": (lambda a: a.astype(np.int32), TypeError),
        "big_endian": (lambda a: a.astype(">f4"), TypeError),
        "python_list": (lambda a: a.tolist(), TypeError),
        "strided": (strided, ValueError),
        "read_only": (read_only, ValueError),
        "unaligned": (unaligned, ValueError),
        "zero_strides": (lambda a: np.broadcast_to(a[:1], a.shape), ValueError),
    }

    def mutate(draw, args):
        choices = [k for k in sorted(bad) if k != "unaligned" or args[arg].size > 0]
        if np.size(args[arg]) < 2:  # a view of one element is contiguous
            choices = [k for k in choices if k not in ("zero_strides", "strided")]
        kind = draw(st.sampled_from(choices), label=f"bad buffer {arg}")
        transform, error = bad[kind]
        args[arg] = transform(args[arg])
        return error, arg
    return mutate


def alias(first, second):
    """Pass the same buffer for two arguments, one of them updated in place."""
    def mutate(draw, args):
        args[second] = args[first]
        return ValueError, second
    return mutate


def present(mutation, **defaults):
    """Apply ``mutation`` after giving the optional arguments it breaks a value:
    ``defaults[name](args)`` when ``args[name]`` is None."""
    def mutate(draw, args):
        for name, make in defaults.items():
            if args[name] is None:
                args[name] = make(args)
        return mutation(draw, args)
    return mutate


def channel_vector(make):
    return lambda args: make(np.shape(args["input"])[1], np.float32)


NOT_A_NUMBER = ["x", None, [1.0], {}]
NON_FINITE = [math.nan, math.inf, -math.inf]


def geometry(arg, minimum, optional=False):
    """Break stride/padding/dilation/kernel_size: below ``minimum``, beyond int64, not an int
    (None too, unless the argument is ``optional``)."""
    low = [minimum - 1, (minimum, minimum - 1), (minimum - 3, minimum), -(2**40)]

    def mutate(draw, args):
        kind = draw(st.sampled_from(["low", "beyond_int64", "not_int"]), label=f"bad {arg}")
        if kind == "low":
            args[arg] = draw(st.sampled_from(low), label=arg)
            return ValueError, arg
        if kind == "beyond_int64":
            huge = draw(st.sampled_from(BEYOND_INT64), label=arg)
            args[arg] = draw(st.sampled_from([huge, (1, huge), (huge, huge)]))
            return ValueError, arg
        not_int = [1.5, "2", (1, 2, 3), (1,), True, (1, 2.0), np.float64(2.0)]
        args[arg] = draw(st.sampled_from(not_int + ([] if optional else [None])), label=arg)
        return TypeError, arg
    return mutate


def assert_rejected(call, args, errors, names, what):
    """``call()`` raises one of ``errors`` naming one of ``names``, changing no array."""
    before = snapshot(args)
    with pytest.raises(errors) as info:
        call()
    message = str(info.value)
    assert re.search(rf"\b({names})\b", message), (
        f"{what}: {type(info.value).__name__} does not name {names!r}: {message}")
    for key, original in before.items():
        if isinstance(original, np.ndarray):
            assert identical(args[key], original), f"{what}: {key} changed by a failing call"
