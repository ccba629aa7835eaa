"""Checks of attributors' constructor arguments: a wrong type is a TypeError, a wrong value a ValueError, each naming the argument."""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["nonnegative", "positive", "positive_int", "nonnegative_int", "flag"]


def _real(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__} {value!r}")
    return float(value)


def nonnegative(value: Any, name: str) -> float:
    """``value`` as a float, which must be finite and ``>= 0``."""
    number = _real(value, name)
    if not 0 <= number < math.inf:
        raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
    return number


def positive(value: Any, name: str) -> float:
    """``value`` as a float, which must be finite and ``> 0``."""
    number = _real(value, name)
    if not 0 < number < math.inf:
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
    return number


def positive_int(value: Any, name: str) -> int:
    """``value``, which must be an integer ``>= 1``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer >= 1, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
    return int(value)


def nonnegative_int(value: Any, name: str) -> int:
    """``value``, which must be an integer ``>= 0`` (a seed)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer >= 0, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"{name}: expected an integer >= 0, got {value!r}")
    return int(value)


def flag(value: Any, name: str) -> bool:
    """``value``, which must be a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {type(value).__name__} {value!r}")
    return value
