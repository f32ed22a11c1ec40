"""What travels on the bus: an event as versioned JSON, plus its W3C trace context.

Pure functions, no I/O. The event's fields are validated by
`replicator.events.event_from_fields`, the same rules a webhook's fields pass, so a
message from the broker is trusted exactly as much as a webhook and no more.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping

from replicator.daemon.bus.errors import BusError
from replicator.events import RegistryEvent, WebhookError, event_from_fields

EVENT_JSON_VERSION = 1


def event_to_json(event: RegistryEvent) -> str:
    """The normalized event as compact JSON (all RegistryEvent fields plus `v`)."""
    return json.dumps(
        {"v": EVENT_JSON_VERSION, **dataclasses.asdict(event)},
        separators=(",", ":"),
        sort_keys=True,
    )


def event_from_json(data: str | bytes) -> RegistryEvent:
    """Parse and validate what `event_to_json` wrote; BusError names the bad field.
    Unknown fields are ignored so a newer publisher does not break an older consumer."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise BusError(f"event payload is not JSON: {str(exc)[:120]}") from None
    if not isinstance(doc, dict):
        raise BusError("event payload must be a JSON object")
    version = doc.get("v", EVENT_JSON_VERSION)
    if version != EVENT_JSON_VERSION:
        raise BusError(
            f"event payload version {version!r:.60} is not supported "
            f"(expected {EVENT_JSON_VERSION})"
        )
    try:
        return event_from_fields(doc, "event")
    except WebhookError as exc:
        raise BusError(exc.message) from None


def current_trace_context() -> dict[str, str]:
    """W3C trace context (traceparent/tracestate) of the active OpenTelemetry span, if any."""
    carrier: dict[str, str] = {}
    try:
        from opentelemetry import propagate
    except ImportError:  # pragma: no cover - opentelemetry is a dependency
        return carrier
    propagate.inject(carrier)
    return carrier


def trace_dict(trace_context: Mapping[str, str] | None) -> dict[str, str]:
    """The trace context to send with an event: the one given, else the active span's."""
    context = dict(trace_context) if trace_context is not None else current_trace_context()
    for key, value in context.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise BusError("trace_context: keys and values must be strings")
    return context
