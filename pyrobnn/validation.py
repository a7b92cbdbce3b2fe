"""Argument checks at the library's boundary: one line each, naming the argument and the value.

Every check returns the value converted (``int`` or ``float``), so a caller writes
``self.num_samples = positive_int("num_samples", num_samples)``. ``True`` and ``False`` are not numbers
here (``epochs=True`` is a mistake, not 1); NaN is never accepted; infinities only where asked for.

A value of the wrong type raises :class:`ArgumentTypeError`, which is both a ``TypeError`` and a
``ValueError``: callers that catch either keep working. A value of the right type outside its range
raises ``ValueError``.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Collection, Optional

__all__ = ["ArgumentTypeError", "integer", "positive_int", "non_negative_int", "real", "finite_float",
           "positive_float", "non_negative_float", "probability", "boolean", "one_of"]


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type (a ``TypeError`` that is also a ``ValueError``)."""


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _fmt(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else repr(bound)


def integer(name: str, value: Any, *, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
    """``value`` as an ``int`` if it is an integer (not a bool) in ``[minimum, maximum]`` (either bound
    may be None)."""
    if minimum is not None and maximum is not None:
        what = f"an integer in [{minimum}, {maximum}]"
    elif minimum == 1:
        what = "a positive integer"
    elif minimum == 0:
        what = "a non-negative integer"
    elif minimum is not None:
        what = f"an integer ≥ {minimum}"
    elif maximum is not None:
        what = f"an integer ≤ {maximum}"
    else:
        what = "an integer"
    if not _is_integer(value):
        raise ArgumentTypeError(f"{name} must be {what}, got {value!r} ({type(value).__name__})")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


def positive_int(name: str, value: Any) -> int:
    """An integer ≥ 1."""
    return integer(name, value, minimum=1)


def non_negative_int(name: str, value: Any) -> int:
    """An integer ≥ 0."""
    return integer(name, value, minimum=0)


def _describe(minimum, maximum, exclusive_minimum, exclusive_maximum, finite) -> str:
    if minimum is not None and maximum is not None:
        return (f"a number in {'(' if exclusive_minimum else '['}{_fmt(minimum)}, "
                f"{_fmt(maximum)}{')' if exclusive_maximum else ']'}")
    kind = "finite number" if finite else "number"
    if minimum == 0 and exclusive_minimum:
        return f"a positive {kind}"
    if minimum is not None:
        return f"a {kind} {'>' if exclusive_minimum else '≥'} {_fmt(minimum)}"
    if maximum is not None:
        return f"a {kind} {'<' if exclusive_maximum else '≤'} {_fmt(maximum)}"
    return f"a {kind}"


def real(name: str, value: Any, *, minimum: Optional[float] = None, maximum: Optional[float] = None,
         exclusive_minimum: bool = False, exclusive_maximum: bool = False, finite: bool = True) -> float:
    """``value`` as a ``float`` if it is a real number (not a bool, not NaN; finite unless
    ``finite=False``) within the bounds (each inclusive unless its ``exclusive_*`` flag is set)."""
    what = _describe(minimum, maximum, exclusive_minimum, exclusive_maximum, finite)
    if not _is_real(value):
        raise ArgumentTypeError(f"{name} must be {what}, got {value!r} ({type(value).__name__})")
    v = float(value)
    bad = (math.isnan(v) or (finite and math.isinf(v))
           or (minimum is not None and (v <= minimum if exclusive_minimum else v < minimum))
           or (maximum is not None and (v >= maximum if exclusive_maximum else v > maximum)))
    if bad:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return v


def finite_float(name: str, value: Any) -> float:
    """A finite real number."""
    return real(name, value)


def positive_float(name: str, value: Any) -> float:
    """A finite real number > 0."""
    return real(name, value, minimum=0, exclusive_minimum=True)


def non_negative_float(name: str, value: Any) -> float:
    """A finite real number ≥ 0."""
    return real(name, value, minimum=0)


def probability(name: str, value: Any) -> float:
    """A real number in [0, 1]."""
    return real(name, value, minimum=0, maximum=1)


def boolean(name: str, value: Any) -> bool:
    """``True`` or ``False`` (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def one_of(name: str, value: Any, choices: Collection) -> Any:
    """``value`` if it is one of ``choices``."""
    try:
        ok = value in choices
    except TypeError:  # an unhashable value tested against a set
        ok = False
    if not ok:
        listed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {listed}; got {value!r}")
    return value
