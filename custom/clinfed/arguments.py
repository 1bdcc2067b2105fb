"""Checks of the constructor arguments a job configuration sets (executor, workflow, recipe).

Each check returns the value in its proper type or raises :class:`clinfed.errors.ArgumentError`
naming the argument, so a bad job fails when FLARE builds its components at deploy, and the
error FLARE logs (which ``clinfed consortium status`` shows) names the argument.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from clinfed.errors import ArgumentError

# The model's U-Net halves each side four times: every side of the ROI must divide by 16.
ROI_MULTIPLE = 16
ROI_MAX_SIDE = 1024


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if not _is_number(value) or int(value) != value:
        raise ArgumentError(name, f"must be an integer, got {value!r}")
    if value < minimum:
        raise ArgumentError(name, f"must be >= {minimum}, got {value!r}")
    return int(value)


def positive_number(name: str, value: Any) -> float:
    if not _is_number(value) or not math.isfinite(value):
        raise ArgumentError(name, f"must be a finite number, got {value!r}")
    if value <= 0:
        raise ArgumentError(name, f"must be > 0, got {value!r}")
    return float(value)


def optional_positive_number(name: str, value: Any) -> float | None:
    return None if value is None else positive_number(name, value)


def fraction(name: str, value: Any) -> float:
    """A number strictly between 0 and 1 (a DP delta)."""
    value = positive_number(name, value)
    if value >= 1:
        raise ArgumentError(name, f"must be < 1, got {value!r}")
    return value


def choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ArgumentError(name, f"must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def text(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ArgumentError(name, f"must be a non-empty string, got {value!r}")
    return value


def flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ArgumentError(name, f"must be true or false, got {value!r}")
    return value


def roi(name: str, value: Any) -> tuple[int, int, int]:
    """The volume size the model sees: three sides, each a multiple of 16 up to 1024."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 3:
        raise ArgumentError(name, f"must be three sizes [X, Y, Z], got {value!r}")
    for side in value:
        if not _is_number(side) or int(side) != side or not ROI_MULTIPLE <= side <= ROI_MAX_SIDE \
                or side % ROI_MULTIPLE:
            raise ArgumentError(name, f"each side must be a multiple of {ROI_MULTIPLE} between {ROI_MULTIPLE} and "
                                      f"{ROI_MAX_SIDE}, got {list(value)!r}")
    return tuple(int(side) for side in value)
