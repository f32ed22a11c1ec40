"""Logging set-up: human lines on a terminal, JSON lines otherwise (journald, files).

Secrets are never passed to loggers in the first place; `redact` exists for
the few places that log URLs or headers that could carry credentials.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

_SECRET_QUERY = re.compile(r"(?i)((?:password|token|secret|access_token)=)[^&\s]+")
_URL_USERINFO = re.compile(r"(?i)(\w+://)[^/@\s]+@")


def redact(text: str) -> str:
    """Remove credentials embedded in URLs or query strings."""
    text = _URL_USERINFO.sub(r"\1***@", text)
    return _SECRET_QUERY.sub(r"\1***", text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            payload.update(extra)
        if record.exc_info:
            payload["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(payload, default=str)


def setup_logging(verbosity: int = 0, json_lines: bool | None = None) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    if json_lines is None:
        json_lines = not sys.stderr.isatty()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if json_lines else logging.Formatter("%(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request at INFO, with full URLs; keep it quiet unless debugging.
    logging.getLogger("httpx").setLevel(logging.DEBUG if verbosity > 2 else logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
