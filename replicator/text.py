"""Text helpers for messages and logs."""

from __future__ import annotations


def shorten(text: str, limit: int = 120) -> str:
    """`text` cut to `limit` characters (with an ellipsis): a hostile or huge value
    quoted in an error or a log line cannot flood it."""
    return text if len(text) <= limit else text[:limit] + "…"


def short_digest(digest: str | None) -> str:
    """`sha256:` and its first 12 hex digits, or `-` for none: enough to tell digests apart
    in a plan or a report line, short enough to keep the line readable."""
    return digest[:19] if digest else "-"


def human_bytes(n: float) -> str:
    """`1536` -> `1.5 KiB`: sizes an operator reads at a glance (exact bytes go in --json)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")  # pragma: no cover
