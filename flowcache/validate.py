"""Checks for user-facing numbers: every widget value is validated here, so the messages read the same.

ComfyUI's min/max checks let NaN and ±inf through (every comparison with NaN is false), so each number is
checked for being finite before its range.
"""
from __future__ import annotations

import math

from .errors import InputError


def _range_text(lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f"between {lo} and {hi}"
    return f"≥ {lo}" if lo is not None else f"≤ {hi}"


def finite(value: object, name: str, lo: float | None = None, hi: float | None = None) -> float:
    """``value`` as a float; raises an InputError naming ``name`` for NaN, ±inf, non-numbers or out-of-range."""
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InputError(f"{name}={value!r}: must be a number.") from None
    if not math.isfinite(v):
        raise InputError(f"{name}={value}: must be a finite number, not NaN or infinity.")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise InputError(f"{name}={v:g}: must be {_range_text(lo, hi)}.")
    return v


def whole(value: object, name: str, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an int (a float must be integral); errors as ``finite``."""
    v = finite(value, name, lo, hi)
    if v != int(v):
        raise InputError(f"{name}={v:g}: must be a whole number.")
    return int(v)


def whole_fields(obj: object, *names: str) -> None:
    """Each named attribute of ``obj`` (a settings dataclass) replaced by its value as a whole number; errors as
    ``whole``, naming the attribute (the widget of the same name)."""
    for name in names:
        setattr(obj, name, whole(getattr(obj, name), name))


def one_of(value: object, name: str, choices: "tuple[str, ...] | list[str]") -> None:
    """Raises an InputError naming ``name`` unless ``value`` is one of ``choices`` (a widget's words)."""
    if value not in choices:
        raise InputError(f"{name}={value!r}: must be one of {', '.join(map(str, choices))}.")
