"""Small parsers shared by probe SPEC arguments: ``key=value`` lists and durations."""

from __future__ import annotations

import math
import re
from typing import Final

from xctl.core.errors import ProbeError

_DURATION: Final = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_UNIT_S: Final[dict[str, float]] = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str, *, what: str) -> float:
    """``500ms``, ``10s``, ``1.5s``, ``2m``, ``1h`` or a bare number of seconds → seconds.

    ``what`` names the setting in the error message (e.g. ``sim: interval``).
    """
    match = _DURATION.match(text)
    if match is None:
        raise ProbeError(f"{what}: {text!r} is not a duration: write e.g. 500ms, 10s, 2m or 1h")
    seconds = float(match.group(1)) * _UNIT_S[match.group(2) or "s"]
    if not math.isfinite(seconds):
        raise ProbeError(f"{what}: {text!r} is too large: write e.g. 10s or 2m")
    return seconds


def format_duration(seconds: float) -> str:
    """The inverse of :func:`parse_duration`, for messages: 0.5 → ``500ms``, 120 → ``2m``."""
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    for unit, size in (("h", 3600.0), ("m", 60.0)):
        if seconds >= size and (seconds / size).is_integer():
            return f"{int(seconds / size)}{unit}"
    return f"{seconds:g}s"


def split_pairs(text: str, *, what: str) -> list[tuple[str, str]]:
    """``a=1,b=2,fault=x@y:after=3s`` → ``[("a", "1"), ("b", "2"), ("fault", "x@y:after=3s")]``.

    Splits on commas, then each item on its first ``=``; empty items are skipped. Keys are
    stripped and lower-cased; values are stripped.
    """
    pairs: list[tuple[str, str]] = []
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or not key:
            raise ProbeError(f"{what}: {item.strip()!r} is not key=value: write e.g. gpus=8")
        pairs.append((key, value.strip()))
    return pairs


def parse_int(text: str, *, what: str, example: str, minimum: int = 0, maximum: int | None = None) -> int:
    """A whole number within bounds, or a :class:`ProbeError` that shows ``example``."""
    try:
        number = int(text.strip(), 10)
    except ValueError:
        raise ProbeError(f"{what}: {text!r} is not a whole number: write e.g. {example}") from None
    if number < minimum:
        raise ProbeError(f"{what}: {number} is too small (at least {minimum}): write e.g. {example}")
    if maximum is not None and number > maximum:
        raise ProbeError(f"{what}: {number} is too large (at most {maximum}): write e.g. {example}")
    return number
