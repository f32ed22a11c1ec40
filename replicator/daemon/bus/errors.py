"""What the event bus raises; all are ReplicatorErrors so the CLI maps them to exit 1."""

from __future__ import annotations

from replicator.errors import ReplicatorError


class BusError(ReplicatorError):
    """The event bus cannot do what was asked (bad payload, closed, unavailable)."""


class BusClosed(BusError):
    """publish() after stop()."""


class BusUnavailable(BusError):
    """An event could not be made durable in the bus in time (broker unreachable)."""


class BusRefused(BusError):
    """The broker answered the publish with a failure reason code (e.g. not authorized
    by its ACL); retrying will not help."""
