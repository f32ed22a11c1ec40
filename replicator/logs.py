"""Logging set-up: human lines on a terminal, JSON lines otherwise (journald, files).

Structured fields (site, repository, reference, tag, digest, task, rule, target,
trace_id) travel beside the message, not inside it: code that works on one task or one
registry wraps the work in `log_context(...)`, and every record logged inside
(in that asyncio task and the tasks it starts) carries those fields as JSON
keys, or as `key=value` suffixes in text mode. The OpenTelemetry trace id of the
current span is added when there is one, so a log line leads to its trace.

Under systemd (stderr is the journal: `JOURNAL_STREAM` names stderr's device
and inode) each line starts with a `<N>` syslog priority, so `journalctl -p err`
filters by level.

Secrets are never passed to loggers in the first place; `redact` exists for
the few places that log URLs or headers that could carry credentials.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any, Literal

LogFormat = Literal["auto", "text", "json"]
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMAT_ENV = "REGISTRY_REPLICATOR_LOG_FORMAT"
LOG_LEVEL_ENV = "REGISTRY_REPLICATOR_LOG_LEVEL"
FIELDS = ("site", "repository", "reference", "tag", "digest", "task", "rule", "target", "trace_id")

_SECRET_QUERY = re.compile(r"(?i)((?:password|token|secret|access_token)=)[^&\s]+")
_URL_USERINFO = re.compile(r"(?i)(\w+://)[^/@\s]+@")
_CONTEXT: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "log_context", default=MappingProxyType({})
)
# syslog priorities (sd-daemon(3)): err 3, warning 4, info 6, debug 7
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6}


def redact(text: str) -> str:
    """Remove credentials embedded in URLs or query strings."""
    text = _URL_USERINFO.sub(r"\1***@", text)
    return _SECRET_QUERY.sub(r"\1***", text)


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Attach `fields` (None values are skipped) to every record logged inside."""
    merged = {**_CONTEXT.get(), **{k: v for k, v in fields.items() if v is not None}}
    token = _CONTEXT.set(merged)
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields of a record: the context's, then `extra={"fields": ...}`."""
    fields = dict(getattr(record, "context_fields", None) or {})
    extra = getattr(record, "fields", None)
    if isinstance(extra, dict):
        fields.update(extra)
    return fields


class _ContextFilter(logging.Filter):
    """Copies the current log context and trace id onto each record, at logging time
    (formatting may happen later, outside the task that logged)."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = dict(_CONTEXT.get())
        trace_id = _current_trace_id()
        if trace_id:
            fields["trace_id"] = trace_id
        record.context_fields = fields
        return True


class JsonFormatter(logging.Formatter):
    def __init__(self, priority_prefix: bool = False) -> None:
        super().__init__()
        self.priority_prefix = priority_prefix

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        for key, value in record_fields(record).items():
            payload.setdefault(key, redact(value) if isinstance(value, str) else value)
        if record.exc_info:
            payload["exc"] = redact(self.formatException(record.exc_info))
        line = json.dumps(payload, default=str)
        return _prefixed(line, record) if self.priority_prefix else line


class TextFormatter(logging.Formatter):
    """`LEVEL logger: message key=value ...` for terminals and plain files."""

    def __init__(self, priority_prefix: bool = False) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")
        self.priority_prefix = priority_prefix

    def format(self, record: logging.LogRecord) -> str:
        line = redact(super().format(record))
        fields = record_fields(record)
        if fields:
            line += " " + " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
        return _prefixed(line, record) if self.priority_prefix else line


def _text_value(value: Any) -> str:
    text = redact(str(value))
    return json.dumps(text) if (not text or any(c.isspace() for c in text)) else text


def _prefixed(text: str, record: logging.LogRecord) -> str:
    priority = _PRIORITY.get(record.levelno, 7)
    return "\n".join(f"<{priority}>{line}" for line in text.split("\n"))


def _current_trace_id() -> str | None:
    try:
        from opentelemetry import trace
    except ImportError:  # pragma: no cover - a dependency
        return None
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


def stderr_is_journal() -> bool:
    """True when systemd connected stderr to the journal (JOURNAL_STREAM=dev:ino)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(part) for part in value.split(":", 1))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def resolve_level(verbosity: int = 0, level: str | None = None) -> int:
    """An explicit `--log-level` (or its environment variable) wins over -v counts."""
    name = level or os.environ.get(LOG_LEVEL_ENV)
    if name:
        if name.lower() not in LOG_LEVELS:
            raise ValueError(
                f"{LOG_LEVEL_ENV}: must be one of {', '.join(LOG_LEVELS)}, got {name!r}"
            )
        return int(getattr(logging, name.upper()))
    return logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG


def resolve_format(fmt: str | None = None) -> Literal["text", "json"]:
    name = (fmt or os.environ.get(LOG_FORMAT_ENV) or "auto").lower()
    if name not in ("auto", "text", "json"):
        raise ValueError(f"{LOG_FORMAT_ENV}: must be auto, text or json, got {name!r}")
    if name == "auto":
        return "text" if sys.stderr.isatty() else "json"
    return "json" if name == "json" else "text"


def setup_logging(
    verbosity: int = 0,
    json_lines: bool | None = None,
    *,
    level: str | None = None,
    fmt: str | None = None,
) -> None:
    """Configure the root logger once per process (the CLI calls it before any command)."""
    if json_lines is not None:
        fmt = "json" if json_lines else "text"
    chosen = resolve_format(fmt)
    prefix = stderr_is_journal()
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ContextFilter())
    handler.setFormatter(JsonFormatter(prefix) if chosen == "json" else TextFormatter(prefix))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(resolve_level(verbosity, level))
    debug = root.level <= logging.DEBUG
    # httpx logs every request at INFO, with full URLs; keep it quiet unless debugging.
    logging.getLogger("httpx").setLevel(logging.DEBUG if verbosity > 2 else logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    # uvicorn's records join ours (same handler, same format); its start-up banner
    # ("Press CTRL+C to quit") and per-request lines are for terminals, not services.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    logging.getLogger("uvicorn.error").setLevel(logging.DEBUG if debug else logging.WARNING)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
