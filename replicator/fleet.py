"""Every instance's queue and lag, as each daemon tells the fleet and `status` shows it.

A daemon with MQTT publishes a retained QoS 1 message about itself on
`<status topic>/<instance id>` every `mqtt.status_interval`, at every (re)connection and
when it stops; its MQTT will is the same message saying `offline`, so the broker
publishes that when the daemon dies without a word. `status` subscribes to
`<status topic>/+` and reads the retained messages: one per instance, the newest.

The status topic is a sibling of the events topic, never under it (`registry/events` ->
`registry/status`): the subscription `<topic>/#` would deliver a status message as an
event otherwise.

Age is read from the broker's clock where it can be: every message carries an MQTT 5
message expiry, and the broker hands a retained message on with the expiry that is left,
so `expiry - remaining` is how long ago it was published -- also for a will, whose
moment of publication its sender cannot know. No clock skew between machines enters.
A broker that holds the message without an expiry (it came over an MQTT 3.1.1 bridge,
which carries none) leaves only the instance's own `published_at`: the age is then
read from the instance's clock, flagged as such, and the expiry is applied by that
clock, as the broker at the other end of the bridge does (`member`).

Anyone who may publish on the status topic writes what `status` prints, so a message
is read as untrusted input: it must name the instance of its own topic, texts must be
printable (no terminal escapes, no line breaks that would forge a row), and numbers
must be plausible (timestamps from 1970 to a day ahead, positive intervals). A message
that is not is skipped and named (`FleetView.unreadable`), never fatal.

Pure: no I/O. Messages are versioned JSON; unknown fields are ignored.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from replicator.journal.status import QUEUE_KINDS

STATUS_JSON_VERSION = 1
STALE_AFTER_INTERVALS = 3  # an online instance not heard from for this many intervals
STATES = ("online", "stopped", "offline")
FUTURE_LIMIT = 24 * 3600.0  # a timestamp further ahead than this is no clock's skew
CLOCK_AHEAD_TOLERANCE = 60.0  # an instance clock this far ahead still gives an age (0)
MAX_EXPIRY = 2**32 - 1  # MQTT's Message Expiry Interval is a four-byte integer
MAX_COUNT = 2**53  # tasks in a journal; beyond this a float no longer counts exactly
AGE_FROM_BROKER = "broker"
AGE_FROM_INSTANCE = "instance clock"


class FleetMessageError(ValueError):
    """A message on the status topic that is not an instance status we can read."""


def status_topic_root(events_topic: str, configured: str | None = None) -> str:
    """Where instances publish their status: `configured`, else the events topic with its
    last level replaced by `status` (`registry/events` -> `registry/status`; a one-level
    `events` -> `status`). When that would be the events topic itself (`x/status`), it
    is `<topic>-status`. ValueError if `configured` lies under the events topic."""
    topic = events_topic.strip("/")
    if configured is not None:
        root = configured.strip("/")
        if under_events_topic(root, topic):
            raise ValueError(
                f"the status topic {root!r} is under the events topic {topic!r}: its "
                "messages would be delivered as events; use a sibling such as "
                f"{status_topic_root(topic)!r}"
            )
        return root
    parent, _, _last = topic.rpartition("/")
    root = f"{parent}/status" if parent else "status"
    return f"{topic}-status" if under_events_topic(root, topic) else root


def under_events_topic(root: str, events_topic: str) -> bool:
    """Whether topics under `root` match the events subscription `<events_topic>/#`."""
    topic = events_topic.strip("/")
    return root == topic or root.startswith(topic + "/")


@dataclass(frozen=True)
class InstanceStatus:
    """What one daemon says about itself. `queue` and `published_at` are None in the
    will (`offline`): it is written when the connection is made, not when it fires."""

    instance: str
    host: str
    version: str
    state: str  # online | stopped | offline
    started_at: float
    interval: float  # seconds between the instance's status messages
    expiry: int  # the MQTT message expiry it was published with (seconds)
    group: str | None = None
    published_at: float | None = None
    queue: Mapping[str, int] | None = None  # QUEUE_KINDS -> tasks in its journal
    oldest_unfinished_at: float | None = None  # oldest queued, running or retry task
    last_event_at: float | None = None  # when it last handled an event from the bus
    reason: str | None = None  # why offline / stopped

    @property
    def lag_seconds(self) -> float | None:
        """Age of its oldest unfinished task when it published (0 when idle)."""
        if self.queue is None or self.published_at is None:
            return None
        if self.oldest_unfinished_at is None:
            return 0.0
        return max(0.0, self.published_at - self.oldest_unfinished_at)

    def offline(self, reason: str) -> InstanceStatus:
        """The will: the same instance, `offline`, nothing that would be stale by then."""
        return replace(
            self,
            state="offline",
            reason=reason,
            published_at=None,
            queue=None,
            oldest_unfinished_at=None,
            last_event_at=None,
        )


def status_to_json(status: InstanceStatus) -> bytes:
    doc = {"v": STATUS_JSON_VERSION, **asdict(status), "lag_seconds": status.lag_seconds}
    if status.queue is not None:
        doc["queue"] = dict(status.queue)
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def status_from_json(data: bytes | str, now: float | None = None) -> InstanceStatus:
    """Parse what `status_to_json` wrote; FleetMessageError says what is wrong. With
    `now`, timestamps more than a day ahead of it are refused too."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise FleetMessageError(f"not JSON: {str(exc)[:80]}") from None
    if not isinstance(doc, dict):
        raise FleetMessageError("not a JSON object")
    if doc.get("v") != STATUS_JSON_VERSION:
        raise FleetMessageError(
            f"version {printable(repr(doc.get('v'))):.40} is not {STATUS_JSON_VERSION}"
        )
    latest = (now if now is not None else 1e11) + FUTURE_LIMIT
    try:
        queue = doc.get("queue")
        status = InstanceStatus(
            instance=_text(doc["instance"]),
            host=_text(doc["host"]),
            version=_text(doc["version"]),
            state=_text(doc["state"]),
            started_at=_timestamp(doc["started_at"], latest),
            interval=_positive(doc["interval"], MAX_EXPIRY),
            expiry=int(_positive(doc["expiry"], MAX_EXPIRY)),
            group=_optional(doc.get("group"), _text),
            published_at=_optional(doc.get("published_at"), lambda v: _timestamp(v, latest)),
            queue=None if queue is None else {k: _count(queue.get(k, 0)) for k in QUEUE_KINDS},
            oldest_unfinished_at=_optional(
                doc.get("oldest_unfinished_at"), lambda v: _timestamp(v, latest)
            ),
            last_event_at=_optional(doc.get("last_event_at"), lambda v: _timestamp(v, latest)),
            reason=_optional(doc.get("reason"), _text),
        )
    except KeyError as exc:
        raise FleetMessageError(f"missing field {printable(repr(exc.args[0])):.40}") from None
    except (TypeError, AttributeError, ValueError) as exc:
        raise FleetMessageError(f"bad field: {str(exc)[:80]}") from None
    if status.state not in STATES:
        raise FleetMessageError(f"unknown state {printable(repr(status.state)):.40}")
    return status


def printable(text: str) -> str:
    """`text` with every character a terminal would act on (escapes, line breaks, bidi
    overrides) written as a Python escape: safe to print, still recognisable."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > 256:
        raise ValueError(f"expected a short string, got {printable(repr(value)):.40}")
    if not value.isprintable():
        raise ValueError(f"control characters in {printable(repr(value)):.40}")
    return value


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"expected a number, got {printable(repr(value)):.40}")
    return float(value)


def _timestamp(value: Any, latest: float) -> float:
    """Seconds since the epoch: from 1970 to `latest`."""
    t = _number(value)
    if not 0 <= t <= latest:
        raise ValueError(f"timestamp {t!r:.40} is not between 1970 and a day from now")
    return t


def _positive(value: Any, limit: float) -> float:
    n = _number(value)
    if not 0 < n <= limit:
        raise ValueError(f"expected seconds in (0, {limit}], got {n!r:.40}")
    return n


def _count(value: Any) -> int:
    n = _number(value)
    if not 0 <= n <= MAX_COUNT or n != int(n):
        raise ValueError(f"expected a count of tasks, got {n!r:.40}")
    return int(n)


def _optional(value: Any, parse: Any) -> Any:
    return None if value is None else parse(value)


# ------------------------------------------------------------------ the reader's view


@dataclass(frozen=True)
class FleetMember:
    """One instance as `status` saw it: its message, and how old that is."""

    status: InstanceStatus
    age_seconds: float | None  # since it was published; None: unknown
    stale: bool  # online, but silent for > STALE_AFTER_INTERVALS intervals, or age unknown
    age_from: str | None = None  # AGE_FROM_BROKER | AGE_FROM_INSTANCE; None: unknown

    def as_dict(self) -> dict[str, Any]:
        doc = json.loads(status_to_json(self.status))
        doc.pop("v", None)
        return {
            **doc,
            "age_seconds": self.age_seconds,
            "age_from": self.age_from,
            "stale": self.stale,
        }


@dataclass
class FleetView:
    """Every instance that published a status (by instance id), plus the messages on
    the status topic that could not be read."""

    topic: str
    members: list[FleetMember] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)  # "topic: why", printable

    def as_dict(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "instances": [m.as_dict() for m in self.members],
            **({"unreadable": self.unreadable} if self.unreadable else {}),
        }


def fleet_view(
    topic: str,
    messages: Iterable[tuple[str, bytes, int | None]],
    now: float,
) -> FleetView:
    """Turn the retained messages read under `topic` -- (topic, payload, remaining
    message expiry) -- into the fleet. The last message of a topic wins; a message
    about another instance than its topic names is unreadable (one topic, one
    instance: nobody can add a second row for an id); one whose expiry has passed by
    the instance's clock is left out, as the broker would have dropped it."""
    latest: dict[str, tuple[bytes, int | None]] = {}
    for where, payload, remaining in messages:
        latest[where] = (payload, remaining)
    view = FleetView(topic)
    for where, (payload, remaining) in sorted(latest.items()):
        try:
            status = status_from_json(payload, now)
            named = where.rpartition("/")[2]
            if status.instance != named:
                raise FleetMessageError(
                    f"instance {status.instance!r} is not its topic's {printable(named)!r:.60}"
                )
        except FleetMessageError as exc:
            view.unreadable.append(f"{printable(where)}: {exc}")
            continue
        seen = member(status, remaining, now)
        if seen.age_from == AGE_FROM_INSTANCE and (seen.age_seconds or 0.0) > status.expiry:
            continue
        view.members.append(seen)
    view.members.sort(key=lambda m: m.status.instance)
    return view


def member(status: InstanceStatus, remaining_expiry: int | None, now: float) -> FleetMember:
    """Age from the broker's clock when it handed on the remaining expiry, else from the
    instance's own clock (`published_at`, flagged so): a `published_at` more than
    CLOCK_AHEAD_TOLERANCE ahead of `now` gives no age. An online instance whose age
    cannot be told counts as stale: nothing shows it is alive."""
    age: float | None = None
    age_from: str | None = None
    if remaining_expiry is not None and 0 <= remaining_expiry <= status.expiry:
        age, age_from = float(status.expiry - remaining_expiry), AGE_FROM_BROKER
    elif status.published_at is not None and status.published_at <= now + CLOCK_AHEAD_TOLERANCE:
        age, age_from = max(0.0, now - status.published_at), AGE_FROM_INSTANCE
    stale = status.state == "online" and (
        age is None or age > STALE_AFTER_INTERVALS * status.interval
    )
    return FleetMember(status, age, stale, age_from)


def format_fleet(view: FleetView, age: Callable[[float], str]) -> list[str]:
    """The fleet as a table for a terminal; `age` renders seconds ('45 s', '2 min')."""

    def ago(seconds: float | None) -> str:
        return "-" if seconds is None else f"{age(seconds)} ago"

    by_instance_clock = False

    header = ["INSTANCE", "HOST", "STATE", "QUEUED", "RUNNING", "RETRY", "DEAD", "LAG"]
    header += ["LAST EVENT", "LAST SEEN"]
    table: list[list[str]] = [header]
    for m in view.members:
        s = m.status
        counts = [str(s.queue.get(k, 0)) if s.queue is not None else "-" for k in QUEUE_KINDS]
        lag = s.lag_seconds
        last_event = None
        if s.last_event_at is not None and s.published_at is not None and m.age_seconds is not None:
            last_event = m.age_seconds + max(0.0, s.published_at - s.last_event_at)
        seen = ago(m.age_seconds)
        if m.age_from == AGE_FROM_INSTANCE:
            seen += "*"
            by_instance_clock = True
        seen += f" ({s.reason})" if s.reason else ""
        state = "stale" if m.stale else s.state
        lag_text = "-" if lag is None else age(lag)
        table.append([s.instance, s.host, state, *counts, lag_text, ago(last_event), seen])
    lines = [f"instances (retained status on {view.topic}/+): {len(view.members)}"]
    if view.members:
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        numeric = {3, 4, 5, 6}
        for row in table:
            cells = [
                cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i])
                for i, cell in enumerate(row)
            ]
            lines.append("  " + "  ".join(cells).rstrip())
    if by_instance_clock:
        lines.append(
            "  * by the instance's own clock: the broker gave no message expiry (an MQTT "
            "3.1.1 bridge carries none), so that clock's skew is in the age"
        )
    lines += [f"  unreadable status message on {u}" for u in view.unreadable]
    return lines
