"""Human durations in configuration: "90s", "10m", "1h30m", "30d", "2w".

A bare number is refused on purpose: `grace: 60` could mean seconds or
minutes, and guessing wrong in a GC policy deletes data. Values are seconds
(float) everywhere else in the code.
"""

from __future__ import annotations

import re

UNITS: dict[str, float] = {
    "ms": 0.001,
    "s": 1,
    "m": 60,
    "h": 3600,
    "d": 86400,
    "w": 7 * 86400,
}

_PART = r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)"
_PART_RE = re.compile(_PART)
DURATION_PATTERN = rf"^(?:{_PART})+$"
_FULL_RE = re.compile(DURATION_PATTERN)


def parse_duration(text: str) -> float:
    """'1h30m' -> 5400.0. Raises ValueError with an example of the accepted form."""
    if isinstance(text, bool) or not isinstance(text, str):
        raise ValueError(f"a duration needs a unit, e.g. '90s', '10m', '1h', '30d' (got {text!r})")
    s = text.strip().lower()
    if not s or not _FULL_RE.match(s):
        raise ValueError(
            f"invalid duration {text!r}: use a number with a unit (ms, s, m, h, d, w), "
            "e.g. '90s', '10m', '1h30m', '30d'"
        )
    return sum(float(n) * UNITS[u] for n, u in _PART_RE.findall(s))


def format_duration(seconds: float) -> str:
    """The largest whole unit: 600 -> '10m', 30 days -> '30d', 5400 -> '90m', 0 -> '0s'."""
    if seconds < 0:
        raise ValueError("durations are never negative")
    ms = round(seconds * 1000)
    if ms == 0:
        return "0s"
    for unit in ("w", "d", "h", "m", "s", "ms"):
        size = round(UNITS[unit] * 1000)
        if ms % size == 0:
            return f"{ms // size}{unit}"
    raise AssertionError("unreachable: every whole number of ms is a whole number of ms")
