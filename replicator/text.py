"""Text helpers for messages and logs."""

from __future__ import annotations


def shorten(text: str, limit: int = 120) -> str:
    """`text` cut to `limit` characters (with an ellipsis): a hostile or huge value
    quoted in an error or a log line cannot flood it."""
    return text if len(text) <= limit else text[:limit] + "…"
