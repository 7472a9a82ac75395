"""Argument checks, written once.

Each check returns the value in its plain Python type (``int`` or ``float``) or raises
``ValueError`` with a message that names the value and says what is allowed::

    K = positive_int(K, "queue size K")       # "queue size K must be a positive integer, got 2.5"
    p = probability(p_gray, "p_gray")         # "p_gray must be in [0, 1], got 1.5"
    tau = in_range(tau_plus, "tau_plus", 0, 1, high_open=True)   # "... must be in [0, 1), got 1.0"

Whole numbers may be given as floats (2.0 is taken as 2, 2.5 is refused); booleans are
never numbers here.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

__all__ = ["integer", "positive_int", "nonneg_int", "number", "in_range", "probability", "finite_positive", "choice"]


def _show(value) -> str:
    """How a value is quoted in a message: repr for Python's own types (quotes on strings), else str."""
    return repr(value) if type(value).__module__ == "builtins" else str(value)


def _whole(value) -> int | None:
    """``value`` as an int when it is a whole number (not a bool), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and math.isfinite(float(value)) and float(value).is_integer():
        return int(value)
    return None


def integer(value, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int, or ``ValueError`` unless it is a whole number in [minimum, maximum]."""
    if minimum is not None and maximum is not None:
        allowed = f"an integer in {minimum}..{maximum}"
    elif minimum is not None:
        allowed = f"an integer >= {minimum}"
    else:
        allowed = "an integer" if maximum is None else f"an integer <= {maximum}"
    whole = _whole(value)
    if whole is None or (minimum is not None and whole < minimum) or (maximum is not None and whole > maximum):
        raise ValueError(f"{name} must be {allowed}, got {_show(value)}")
    return whole


def positive_int(value, name: str) -> int:
    """``value`` as an int, or ``ValueError`` unless it is a whole number >= 1."""
    whole = _whole(value)
    if whole is None or whole < 1:
        raise ValueError(f"{name} must be a positive integer, got {_show(value)}")
    return whole


def nonneg_int(value, name: str) -> int:
    """``value`` as an int, or ``ValueError`` unless it is a whole number >= 0."""
    return integer(value, name, 0)


def number(value, name: str, allowed: str = "") -> float:
    """``value`` as a float, or ``ValueError`` if it is not a number (a bool or a string is not)."""
    if not isinstance(value, (bool, str, bytes)):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    raise ValueError(f"{name} must be a number{' ' + allowed if allowed else ''}, got {_show(value)}")


def in_range(value, name: str, low: float, high: float, *, low_open: bool = False, high_open: bool = False,
             why: str = "") -> float:
    """``value`` as a float, or ``ValueError`` unless it lies in the interval from low to high.

    ``low_open`` / ``high_open`` exclude the end points; ``why`` is added to the message in parentheses.
    """
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    x = number(value, name, f"in {interval}")
    above = x > low if low_open else x >= low
    below = x < high if high_open else x <= high
    if not (above and below):
        raise ValueError(f"{name} must be in {interval}{f' ({why})' if why else ''}, got {_show(value)}")
    return x


def probability(value, name: str) -> float:
    """``value`` as a float, or ``ValueError`` unless 0 <= value <= 1."""
    return in_range(value, name, 0.0, 1.0)


def finite_positive(value, name: str) -> float:
    """``value`` as a float, or ``ValueError`` unless it is a finite number > 0."""
    x = number(value, name, "> 0")
    if not (x > 0 and math.isfinite(x)):
        raise ValueError(f"{name} must be a finite number > 0, got {_show(value)}")
    return x


def choice(value: Any, name: str, choices: Sequence) -> Any:
    """``value`` itself, or ``ValueError`` unless it is one of ``choices``."""
    if value not in tuple(choices):
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {_show(value)}")
    return value
