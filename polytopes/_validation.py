"""Argument checks shared by the polytope families."""

from __future__ import annotations

import numbers


def check_int(value, name: str, minimum: int | None = None, why: str = "") -> int:
    """``value`` as an int (bools rejected), at least ``minimum``; errors name the argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} ({value!r})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}{f' ({why})' if why else ''}, got {value}")
    return int(value)
