"""Argument checks shared by :mod:`bnrs.functional`, :mod:`bnrs.nn`, :mod:`bnrs.optim` and
the estimators: one place that decides what an int, a real number, a bool, one of some
strings or a tuple of ints is, and how the error reads.

An error names the argument, what it expected and what it got:
``"batch_size: expected an int >= 1, got 0"``. A value of the wrong type raises
:class:`ParameterTypeError` (a TypeError), a value of the right type outside its range
raises ValueError.

Constraints are objects (:class:`Interval`, :class:`Options`, :class:`Boolean`,
:class:`IntTuple`, :class:`Instances`) so that an estimator can declare a table of them
per parameter, in the style of scikit-learn's ``_parameter_constraints``, and check the
table once with :func:`check_params`. The ``check_*`` functions are the one-argument
shorthands the layers and kernels' wrappers call.

scikit-learn's own ``sklearn.utils._param_validation`` is private API and its intervals
accept bools as ints and infinity as a real number, which bnrs rejects; hence this module.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

__all__ = ["Boolean", "Callables", "Constraint", "Instances", "IntTuple", "Interval", "Options",
           "ParameterTypeError", "as_real", "check", "check_bool", "check_int",
           "check_int_pair", "check_int_tuple", "check_options", "check_params",
           "check_real"]

_BOOLS = (bool, np.bool_)


class ParameterTypeError(TypeError, ValueError):
    """An argument of the wrong type.

    A TypeError, and also a ValueError (as scikit-learn's ``InvalidParameterError``), so
    that code written when some of these checks raised ValueError still catches them.
    """


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, _BOOLS)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, _BOOLS)


class Constraint:
    """What an argument may be: ``description`` for the message, two tests for the check."""

    description = "?"

    def accepts_type(self, value) -> bool:
        """Whether ``value`` is of a type this constraint can accept (any value)."""
        raise NotImplementedError

    def accepts(self, value) -> bool:
        """Whether ``value`` is of the right type and value."""
        return self.accepts_type(value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description!r})"


class Interval(Constraint):
    """An int (``kind="int"``, bools excluded) or a finite real number in an interval.

    ``low``/``high`` of None leave that side open-ended; ``closed`` is one of "both",
    "left", "right", "neither" (which ends belong to the interval).
    """

    def __init__(self, kind: str, low=None, high=None, closed: str = "both"):
        if kind not in ("int", "real") or closed not in ("both", "left", "right", "neither"):
            raise ValueError(f"Interval: bad kind {kind!r} or closed {closed!r}")
        self.kind, self.low, self.high, self.closed = kind, low, high, closed
        self.description = self._describe()

    def _describe(self) -> str:
        low_closed = self.closed in ("both", "left")
        high_closed = self.closed in ("both", "right")
        if self.kind == "int" and self.high is None:
            return "an int" if self.low is None else f"an int >= {self.low}"
        interval = ("[" if low_closed and self.low is not None else "(") + (
            f"{'-inf' if self.low is None else _bound(self.low)}, "
            f"{'inf' if self.high is None else _bound(self.high)}") + (
            "]" if high_closed and self.high is not None else ")")
        return f"{'an int' if self.kind == 'int' else 'a finite real number'} in {interval}"

    def accepts_type(self, value) -> bool:
        return _is_int(value) if self.kind == "int" else _is_real(value)

    def accepts(self, value) -> bool:
        if not self.accepts_type(value):
            return False
        if self.kind == "real" and not math.isfinite(value):  # also rejects NaN
            return False
        if self.low is not None and not (
                value >= self.low if self.closed in ("both", "left") else value > self.low):
            return False
        return self.high is None or (
            value <= self.high if self.closed in ("both", "right") else value < self.high)


def _bound(value) -> str:
    """An interval's end as read: 2**63 - 1 rather than 9223372036854775807."""
    if isinstance(value, int) and value >= 2**31 and (value + 1) & value == 0:
        return f"2**{(value + 1).bit_length() - 1} - 1"
    return str(value)


class Options(Constraint):
    """One of some strings."""

    def __init__(self, options: Iterable[str]):
        self.options = frozenset(options)
        self.description = f"one of {sorted(self.options)}"

    def accepts_type(self, value) -> bool:
        return isinstance(value, str)

    def accepts(self, value) -> bool:
        return isinstance(value, str) and value in self.options


class Boolean(Constraint):
    """A bool or a NumPy bool (not a string, not an int)."""

    description = "a bool"

    def accepts_type(self, value) -> bool:
        return isinstance(value, _BOOLS)


class Instances(Constraint):
    """An instance of some types (``None`` for None), any value."""

    def __init__(self, *types, description: str):
        self.types = tuple(type(None) if kind is None else kind for kind in types)
        self.description = description

    def accepts_type(self, value) -> bool:
        return isinstance(value, self.types)


class IntTuple(Constraint):
    """A sequence of ints (not a string), of one of ``lengths``, each at least ``low``."""

    def __init__(self, lengths: Iterable[int], low: int | None = None, description: str = ""):
        self.lengths, self.low = tuple(lengths), low
        self.description = description or (
            f"a tuple of {' or '.join(map(str, self.lengths))} ints"
            + ("" if low is None else f" >= {low}"))

    @staticmethod
    def _items(value) -> tuple | None:
        if isinstance(value, (str, bytes)):
            return None
        try:
            return tuple(value)
        except TypeError:
            return None

    def accepts_type(self, value) -> bool:
        items = self._items(value)
        return items is not None and all(_is_int(item) for item in items)

    def accepts(self, value) -> bool:
        if not self.accepts_type(value):
            return False
        items = self._items(value)
        return len(items) in self.lengths and (
            self.low is None or all(item >= self.low for item in items))


class Callables(Constraint):
    """A list or tuple of callables (a wrong element is a wrong type)."""

    description = "a list of callables"

    def accepts_type(self, value) -> bool:
        return isinstance(value, (list, tuple)) and all(callable(item) for item in value)


NONE = Instances(None, description="None")


def check(value, name: str, *constraints: Constraint):
    """Return ``value`` if some constraint accepts it, else raise naming ``name``.

    ParameterTypeError (a TypeError) when no constraint accepts its type, ValueError when
    one does but not its value.
    """
    if any(constraint.accepts(value) for constraint in constraints):
        return value
    expected = " or ".join(constraint.description for constraint in constraints)
    error = (ValueError if any(constraint.accepts_type(value) for constraint in constraints)
             else ParameterTypeError)
    raise error(f"{name}: expected {expected}, got {value!r}")


def check_params(constraints: Mapping[str, Iterable[Constraint]],
                 params: Mapping[str, Any]) -> None:
    """Check every parameter against its constraints (a scikit-learn-style table)."""
    for name, allowed in constraints.items():
        check(params[name], name, *allowed)


def check_bool(value, name: str) -> bool:
    """A bool or NumPy bool as bool; a string, int or anything else raises TypeError."""
    return bool(check(value, name, Boolean()))


def check_int(value, name: str, low: int | None = None, high: int | None = None) -> int:
    """An int (NumPy ints too, bools not) in [low, high] as int."""
    if type(value) is int and _within(value, low, high):
        # What the general check returns, without its 4 µs: the common case of a
        # layer's own settings, checked at every call of its kernels.
        return value
    return int(check(value, name, Interval("int", low, high)))


def _within(value: int, low: int | None, high: int | None) -> bool:
    return (low is None or value >= low) and (high is None or value <= high)


def check_real(value, name: str, low: float | None = None, high: float | None = None, *,
               low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number (not a bool) in the interval as float."""
    closed = {(False, False): "both", (False, True): "left", (True, False): "right",
              (True, True): "neither"}[low_open, high_open]
    return float(check(value, name, Interval("real", low, high, closed)))


def check_options(value, name: str, options: Iterable[str]) -> str:
    """One of the strings ``options``."""
    return check(value, name, Options(options))


def check_int_tuple(value, name: str, lengths: Iterable[int], low: int | None = None,
                    description: str = "") -> tuple[int, ...]:
    """A sequence of ints of one of ``lengths``, each >= ``low``, as a tuple of int."""
    return tuple(int(item) for item in check(value, name,
                                             IntTuple(lengths, low, description)))


def check_int_pair(value, name: str, low: int | None = None) -> tuple[int, int]:
    """An int or a pair of ints, each >= ``low``, as a pair (PyTorch's ``_pair``)."""
    if (type(value) is tuple and len(value) == 2 and type(value[0]) is int
            and type(value[1]) is int and _within(value[0], low, None)
            and _within(value[1], low, None)):
        # A layer's own pair as its constructor stored it: what the checks below return,
        # without their 8 µs.
        return value
    if _is_int(value):
        value = (value, value)
    elif not IntTuple((2,)).accepts(value):
        # The message names both forms, as the argument may take either.
        got = repr(value) if IntTuple._items(value) is not None else type(value).__name__
        raise ParameterTypeError(f"{name}: expected an int or a pair of ints, got {got}")
    return check_int_tuple(value, name, (2,), low,
                           "an int or a pair of ints" + ("" if low is None else f" >= {low}"))


def as_real(value, name: str, *, numbers_only: bool = False) -> float:
    """``float(value)`` for anything float() takes, else TypeError naming ``name``.

    Looser than :func:`check_real` (a NumPy 0-d array passes; a numeric string and a bool
    too unless ``numbers_only``), for the hyper-parameters of the functional API, the
    layers and the optimizers, which have always been converted this way. Check the
    range of the result with :func:`check_real`.
    """
    if numbers_only and isinstance(value, (*_BOOLS, str, bytes)):
        raise ParameterTypeError(f"{name}: expected a real number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ParameterTypeError(f"{name}: expected a real number, got {value!r}") from None
