"""The event fabric between webhook intake and the replication planner.

`EventBus` is what the daemon codes against:

* `await bus.publish(event, trace_context)` returns only once the event is durable
  in the bus (for MQTT: the broker's QoS 1 PUBACK), so the intake may answer 2xx;
* `await bus.start(handler)` delivers every event to `handler(event, trace_context)`,
  one at a time, in arrival order; a handler that raises is retried with capped
  backoff until it succeeds or `stop()` is called (delivery is at-least-once, so the
  handler must be idempotent -- dedupe on `event.id`);
* `await bus.stop()`; `bus.connected`.

Two implementations:

`InProcessBus` -- the embedded default: an asyncio.Queue in this process. "Durable
in the bus" here only means queued in memory; across crashes the journal (the
intake commits events before publishing) is the backstop.

`MqttBus` -- MQTT v5 through aiomqtt, for several daemons sharing work across
regions. Events go as JSON to `<topic>/<site>/<repository>` with QoS 1 (W3C trace
context in user properties). The subscriber uses a persistent session (fixed
client id, clean start off, a session expiry interval), so the broker keeps its
subscription and queues QoS 1 messages while the daemon is down; with `group` it
subscribes `$share/<group>/<topic>/#` so instances split the stream. The connection
is re-established forever with capped, jittered exponential backoff until `stop()`.

Acknowledgement: aiomqtt 2.x has no public manual-ack API, but its paho-mqtt client
(>= 2.0) does (`manual_ack_set`, `ack`). MqttBus switches it on through aiomqtt's
private `_client` attribute, so a PUBACK is sent only after the handler returned;
a message whose handler did not finish (crash, stop, lost connection) is redelivered
by the broker when the session resumes. If that attribute ever disappears, MqttBus
logs a warning and falls back to paho's automatic ack (on receipt): then an event
received but not yet handled when the process dies is lost to the bus, and only the
journal/reconcile backstop catches it. `manual_ack` tells which mode is active.

aiomqtt also ignores the reason code of a PUBACK, so a publish the broker refused
(ACL, quota) would look durable; MqttBus publishes through the same paho client and
raises `BusRefused` for a failure code (falling back to aiomqtt's publish, without
that check, if the attribute is missing).

A publish that was sent but whose PUBACK never came (connection lost) is sent again
on the next connection, so the broker can hold a duplicate: one more reason for
handlers to dedupe on `event.id`. Broker-side limits matter for "nothing lost":
mosquitto's `max_queued_messages` (default 1000 per session) drops QoS 1 messages
beyond it for a slow or absent subscriber, and a session is dropped after its expiry
interval (`session_expiry`, default 7 days).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from replicator.backoff import jittered_backoff
from replicator.errors import ConfigError, ReplicatorError
from replicator.events import ACTIONS, RegistryEvent
from replicator.logs import redact
from replicator.manifest import is_digest
from replicator.refs import REPOSITORY_RE, TAG_RE

log = logging.getLogger("replicator.bus")

Handler = Callable[[RegistryEvent, dict[str, str]], Awaitable[None]]

EVENT_JSON_VERSION = 1
_SOURCE_FORMATS = frozenset({"distribution", "harbor", "cloudevents"})
_OPTIONAL_TEXT = ("tag", "digest", "media_type", "from_repository", "actor", "source_instance")


class BusError(ReplicatorError):
    """The event bus cannot do what was asked (bad payload, closed, unavailable)."""


class BusClosed(BusError):
    """publish() after stop()."""


class BusUnavailable(BusError):
    """An event could not be made durable in the bus in time (broker unreachable)."""


class BusRefused(BusError):
    """The broker answered the publish with a failure reason code (e.g. not authorized
    by its ACL); retrying will not help."""


# --- wire format -------------------------------------------------------------------


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
            f"event payload version {version!r} is not supported (expected {EVENT_JSON_VERSION})"
        )
    for name in ("id", "site", "repository"):
        if not isinstance(doc.get(name), str) or not doc[name]:
            raise BusError(f"event.{name}: required non-empty string")
    if doc.get("action") not in ACTIONS:
        raise BusError(
            f"event.action: expected push, pull, mount or delete, got {doc.get('action')!r:.60}"
        )
    for name in _OPTIONAL_TEXT:
        if doc.get(name) is not None and not isinstance(doc[name], str):
            raise BusError(f"event.{name}: must be a string or null")
    for name in ("repository", "from_repository"):
        if doc.get(name) is not None and not REPOSITORY_RE.fullmatch(doc[name]):
            raise BusError(f"event.{name}: invalid repository name {doc[name]!r:.120}")
    if doc.get("tag") is not None and not TAG_RE.fullmatch(doc["tag"]):
        raise BusError(f"event.tag: invalid tag {doc['tag']!r:.140}")
    if doc.get("digest") is not None and not is_digest(doc["digest"]):
        raise BusError(f"event.digest: invalid digest {doc['digest']!r:.140}")
    size = doc.get("size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise BusError("event.size: must be a non-negative integer or null")
    occurred = doc.get("occurred_at")
    if occurred is not None and (
        isinstance(occurred, bool) or not isinstance(occurred, int | float)
    ):
        raise BusError("event.occurred_at: must be epoch seconds or null")
    source_format = doc.get("source_format", "distribution")
    if source_format not in _SOURCE_FORMATS:
        raise BusError(f"event.source_format: unknown {source_format!r:.60}")
    if not isinstance(doc.get("is_manifest", False), bool):
        raise BusError("event.is_manifest: must be a boolean")
    return RegistryEvent(
        id=doc["id"],
        site=doc["site"],
        action=doc["action"],
        repository=doc["repository"],
        tag=doc.get("tag"),
        digest=doc.get("digest"),
        media_type=doc.get("media_type"),
        size=size,
        from_repository=doc.get("from_repository"),
        occurred_at=None if occurred is None else float(occurred),
        source_format=source_format,
        is_manifest=doc.get("is_manifest", False),
        actor=doc.get("actor"),
        source_instance=doc.get("source_instance"),
    )


def current_trace_context() -> dict[str, str]:
    """W3C trace context (traceparent/tracestate) of the active OpenTelemetry span, if any."""
    carrier: dict[str, str] = {}
    try:
        from opentelemetry import propagate
    except ImportError:  # pragma: no cover - opentelemetry is a dependency
        return carrier
    propagate.inject(carrier)
    return carrier


# --- the interface -----------------------------------------------------------------


class EventBus(abc.ABC):
    """Where normalized registry events travel from intake to the planner."""

    def __init__(
        self, *, handler_backoff_base: float = 0.2, handler_backoff_max: float = 30.0
    ) -> None:
        self._handler: Handler | None = None
        self._stopping = asyncio.Event()
        self._handler_backoff_base = handler_backoff_base
        self._handler_backoff_max = handler_backoff_max

    @property
    @abc.abstractmethod
    def connected(self) -> bool:
        """True while the bus can accept and deliver events."""

    @abc.abstractmethod
    async def publish(
        self, event: RegistryEvent, trace_context: Mapping[str, str] | None = None
    ) -> None:
        """Return once `event` is durable in the bus; raise BusError otherwise."""

    @abc.abstractmethod
    async def start(self, handler: Handler) -> None:
        """Begin delivering events to `handler`; returns without waiting for a broker."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop delivering; unfinished deliveries stay with the bus for next time."""

    @abc.abstractmethod
    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until `connected` (readiness); TimeoutError after `timeout` seconds."""

    async def _deliver(
        self, handler: Handler, event: RegistryEvent, context: dict[str, str]
    ) -> bool:
        """Call the handler until it succeeds (True) or the bus stops (False)."""
        attempt = 0
        while True:
            try:
                await handler(event, context)
                return True
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                attempt += 1
                delay = jittered_backoff(
                    attempt, self._handler_backoff_base, self._handler_backoff_max
                )
                log.warning(
                    "event handler failed for event %s (%s %s at %s), attempt %d; "
                    "retrying in %.1fs: %s",
                    event.id,
                    event.action,
                    event.repository,
                    event.site,
                    attempt,
                    delay,
                    redact(str(exc))[:300],
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            if self._stopping.is_set():
                return False


def _trace_dict(trace_context: Mapping[str, str] | None) -> dict[str, str]:
    context = dict(trace_context) if trace_context is not None else current_trace_context()
    for key, value in context.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise BusError("trace_context: keys and values must be strings")
    return context


# --- in process ----------------------------------------------------------------------


class InProcessBus(EventBus):
    """The embedded bus: an asyncio.Queue consumed by one task in this process."""

    def __init__(
        self,
        maxsize: int = 0,
        *,
        stop_timeout: float = 10.0,
        handler_backoff_base: float = 0.2,
        handler_backoff_max: float = 30.0,
    ) -> None:
        super().__init__(
            handler_backoff_base=handler_backoff_base, handler_backoff_max=handler_backoff_max
        )
        self._queue: asyncio.Queue[tuple[RegistryEvent, dict[str, str]]] = asyncio.Queue(maxsize)
        self._worker: asyncio.Task[None] | None = None
        self._stop_timeout = stop_timeout

    @property
    def connected(self) -> bool:
        return not self._stopping.is_set()

    async def wait_connected(self, timeout: float | None = None) -> None:
        if self._stopping.is_set():
            raise BusClosed("event bus is stopped")

    async def publish(
        self, event: RegistryEvent, trace_context: Mapping[str, str] | None = None
    ) -> None:
        if self._stopping.is_set():
            raise BusClosed("event bus is stopped")
        await self._queue.put((event, _trace_dict(trace_context)))

    async def start(self, handler: Handler) -> None:
        if self._worker is not None:
            raise BusError("event bus already started")
        self._handler = handler
        self._worker = asyncio.create_task(self._consume(handler), name="bus-inprocess")

    async def _consume(self, handler: Handler) -> None:
        while True:
            event, context = await self._queue.get()
            try:
                await self._deliver(handler, event, context)
            finally:
                self._queue.task_done()

    async def stop(self) -> None:
        """Let queued events drain (up to `stop_timeout`), then stop the consumer."""
        if self._worker is not None and not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), self._stop_timeout)
        self._stopping.set()
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None


# --- MQTT --------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Connection:
    client: Any  # aiomqtt.Client
    lost: asyncio.Event
    manual_ack: bool
    subscribed: bool = False
    # mid -> PUBACK reason code future, when we publish through paho directly (see _send)
    acks: dict[int, asyncio.Future[Any]] | None = None


class MqttBus(EventBus):
    """Events over MQTT v5 (aiomqtt): QoS 1, persistent session, optional shared group.

    `client_id` must be unique per daemon instance and stable across restarts (it
    names the broker-side session). `url` is mqtt://host[:1883] or mqtts://host[:8883];
    credentials may be given as arguments or in the URL's userinfo (never logged).
    """

    def __init__(
        self,
        url: str,
        topic: str,
        client_id: str,
        group: str | None = None,
        username: str | None = None,
        password: str | None = None,
        qos: int = 1,
        session_expiry: int = 7 * 24 * 3600,
        *,
        keepalive: int = 30,
        reconnect_base: float = 0.5,
        reconnect_max: float = 30.0,
        publish_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        stop_timeout: float = 5.0,
        tls_context: ssl.SSLContext | None = None,
        handler_backoff_base: float = 0.2,
        handler_backoff_max: float = 30.0,
    ) -> None:
        super().__init__(
            handler_backoff_base=handler_backoff_base, handler_backoff_max=handler_backoff_max
        )
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ConfigError(
                f"unsupported scheme {parts.scheme!r}; expected mqtt:// or mqtts://", "bus.url"
            )
        try:
            port = parts.port
        except ValueError:
            raise ConfigError("invalid port", "bus.url") from None
        if not parts.hostname:
            raise ConfigError(f"missing host in {redact(url)}", "bus.url")
        self._tls = parts.scheme in ("mqtts", "ssl")
        self.host = parts.hostname
        self.port = port or (8883 if self._tls else 1883)
        self._tls_context = tls_context or (ssl.create_default_context() if self._tls else None)
        self.username = (
            username
            if username is not None
            else (unquote(parts.username) if parts.username else None)
        )
        self._password = (
            password
            if password is not None
            else (unquote(parts.password) if parts.password else None)
        )
        self.topic = topic.strip("/")
        _check_topic_part(self.topic, "bus.topic", allow_slash=True)
        if self.topic.startswith("$"):
            raise ConfigError("must not start with '$' (reserved by MQTT)", "bus.topic")
        if not client_id or len(client_id) > 128:
            raise ConfigError("required, at most 128 characters", "bus.client_id")
        self.client_id = client_id
        if group is not None:
            _check_topic_part(group, "bus.group", allow_slash=False)
        self.group = group
        if qos not in (1, 2):
            raise ConfigError(
                f"must be 1 or 2 (QoS 0 cannot make events durable), got {qos}", "bus.qos"
            )
        self.qos = qos
        if session_expiry <= 0:
            raise ConfigError(
                "must be positive: the broker must keep the session while the daemon is down",
                "bus.session_expiry",
            )
        self.session_expiry = int(session_expiry)
        self.keepalive = keepalive
        self.reconnect_base = reconnect_base
        self.reconnect_max = reconnect_max
        self.publish_timeout = publish_timeout
        self.connect_timeout = connect_timeout
        self.stop_timeout = stop_timeout
        self._conn: _Connection | None = None
        self._conn_changed = asyncio.Condition()
        self._runner: asyncio.Task[None] | None = None
        self._worker: asyncio.Task[None] | None = None
        # (connection, message); (None, None) wakes the handler task to notice stop()
        self._inbox: asyncio.Queue[tuple[_Connection | None, Any]] = asyncio.Queue()
        self._warned_no_handler = False
        # observability (and tests): how the connection loop behaves
        self.connect_attempts = 0
        self.reconnect_delays: list[float] = []
        self.manual_ack: bool | None = None  # known after the first connection

    def __repr__(self) -> str:
        return (
            f"MqttBus({'mqtts' if self._tls else 'mqtt'}://{self.host}:{self.port}, "
            f"topic={self.topic!r}, client_id={self.client_id!r}, group={self.group!r})"
        )

    @property
    def subscription(self) -> str:
        base = f"{self.topic}/#"
        return f"$share/{self.group}/{base}" if self.group else base

    def topic_for(self, event: RegistryEvent) -> str:
        """`<topic>/<site>/<repository>`; repository slashes become topic levels."""
        _check_topic_part(event.site, "event.site", allow_slash=False, error=BusError)
        _check_topic_part(event.repository, "event.repository", allow_slash=True, error=BusError)
        return f"{self.topic}/{event.site}/{event.repository}"

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.lost.is_set()

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until a connection (and, once started, the subscription) is up."""
        self._ensure_running()
        async with asyncio.timeout(timeout), self._conn_changed:
            await self._conn_changed.wait_for(lambda: self.connected)

    # --- publishing ------------------------------------------------------------
    async def publish(
        self,
        event: RegistryEvent,
        trace_context: Mapping[str, str] | None = None,
        *,
        timeout: float | None = None,
    ) -> None:
        """Return once the broker acknowledged the event (PUBACK). Retries across
        reconnects; raises BusUnavailable after `timeout` (default publish_timeout)."""
        if self._stopping.is_set():
            raise BusClosed("event bus is stopped")
        topic = self.topic_for(event)
        payload = event_to_json(event).encode()
        properties = _publish_properties(_trace_dict(trace_context))
        self._ensure_running()
        limit = self.publish_timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        last_error = "no connection to the broker"
        while True:
            if self._stopping.is_set():
                raise BusClosed("event bus stopped before the event was acknowledged")
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(remaining), self._conn_changed:
                    await self._conn_changed.wait_for(
                        lambda: self.connected or self._stopping.is_set()
                    )
            except TimeoutError:
                break
            conn = self._conn
            if conn is None or self._stopping.is_set():
                continue
            sending = asyncio.ensure_future(self._send(conn, topic, payload, properties))
            lost = asyncio.ensure_future(conn.lost.wait())
            try:
                done, _ = await asyncio.wait(
                    {sending, lost},
                    timeout=max(0.0, deadline - loop.time()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                for fut in (sending, lost):
                    if not fut.done():
                        fut.cancel()
            if sending in done:
                exc = sending.exception()
                if exc is None:
                    return
                if isinstance(exc, BusRefused):
                    raise BusRefused(
                        f"event {event.id} ({event.action} {event.repository} "
                        f"at {event.site}): {exc}"
                    ) from None
                last_error = str(exc)
                # the connection is broken; let the runner notice and reconnect
                await asyncio.sleep(0)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(conn.lost.wait(), min(1.0, max(0.0, remaining)))
            elif lost in done:
                last_error = "connection lost before the broker acknowledged"
            else:
                break
        raise BusUnavailable(
            f"event {event.id} ({event.action} {event.repository} at {event.site}) not "
            f"acknowledged by MQTT broker {self.host}:{self.port} within {limit:g}s: "
            f"{redact(last_error)[:200]}"
        )

    async def _send(self, conn: _Connection, topic: str, payload: bytes, properties: Any) -> None:
        """One QoS 1/2 publish on `conn`, returning at the broker's acknowledgement.

        aiomqtt 2.x ignores the PUBACK reason code, so a publish the broker refused
        (ACL, quota) would look durable. When paho is reachable we publish through it
        and check the code; otherwise aiomqtt's publish is used as is."""
        if conn.acks is None:
            await conn.client.publish(
                topic, payload, qos=self.qos, properties=properties, timeout=math.inf
            )
            return
        info = conn.client._client.publish(topic, payload, self.qos, False, properties)
        if info.rc != 0:
            raise BusError(f"publish not accepted by the MQTT client (rc={info.rc})")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        conn.acks[info.mid] = future  # no await since publish(): the ack cannot be missed
        try:
            reason = await future
        finally:
            conn.acks.pop(info.mid, None)
        if getattr(reason, "is_failure", False):
            raise BusRefused(
                f"MQTT broker {self.host}:{self.port} refused the publish to "
                f"{topic[:200]}: {reason}"
            )

    # --- consuming -------------------------------------------------------------
    async def start(self, handler: Handler) -> None:
        if self._handler is not None:
            raise BusError("event bus already started")
        if self._stopping.is_set():
            raise BusClosed("event bus is stopped")
        self._handler = handler
        self._worker = asyncio.create_task(self._consume(handler), name="bus-mqtt-handler")
        conn = self._conn
        if conn is not None and not conn.lost.is_set():
            # already connected for publishing: subscribe on the live connection
            async with self._conn_changed:
                self._conn = None  # not "connected" until the subscription is made
            with contextlib.suppress(Exception):  # a failure here is a lost connection
                await self._subscribe(conn)
            if not conn.lost.is_set():
                await self._set_connection(conn)
        self._ensure_running()

    async def _subscribe(self, conn: _Connection) -> None:
        if self._handler is not None and not conn.subscribed:
            conn.subscribed = True
            await conn.client.subscribe(self.subscription, qos=self.qos)

    async def _consume(self, handler: Handler) -> None:
        while not self._stopping.is_set():
            conn, message = await self._inbox.get()
            if conn is None or self._stopping.is_set():
                return
            if conn.lost.is_set() and conn.manual_ack:
                continue  # never acked: the broker redelivers it on the resumed session
            try:
                event = event_from_json(message.payload)
            except BusError as exc:
                log.error(
                    "dropping undecodable message on topic %s: %s", str(message.topic)[:200], exc
                )
                self._ack(conn, message)
                continue
            context = _user_properties(message)
            if not await self._deliver(handler, event, context):
                return
            self._ack(conn, message)

    def _ack(self, conn: _Connection, message: Any) -> None:
        if not conn.manual_ack or conn.lost.is_set() or message.qos == 0:
            return
        with contextlib.suppress(Exception):
            conn.client._client.ack(message.mid, message.qos)

    async def stop(self) -> None:
        """Stop handling, disconnect gracefully (the broker keeps the session). A handler
        still running after `stop_timeout` is cancelled; its message was not acked and
        comes back on the next start."""
        self._stopping.set()
        self._inbox.put_nowait((None, None))
        async with self._conn_changed:
            self._conn_changed.notify_all()
        if self._worker is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._worker), self.stop_timeout)
            except (TimeoutError, asyncio.CancelledError):
                pass
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self._runner, self.stop_timeout)
            self._runner = None

    # --- the connection loop ---------------------------------------------------
    def _ensure_running(self) -> None:
        if self._runner is None and not self._stopping.is_set():
            self._runner = asyncio.create_task(self._run(), name="bus-mqtt-connection")

    def _new_connection(self) -> _Connection:
        import aiomqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.session_expiry
        client = aiomqtt.Client(
            self.host,
            self.port,
            username=self.username,
            password=self._password,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=False,
            properties=props,
            keepalive=self.keepalive,
            timeout=self.connect_timeout,
            tls_context=self._tls_context,
            logger=logging.getLogger("replicator.bus.mqtt"),
        )
        client.pending_calls_threshold = 10_000  # many concurrent publishes are normal
        paho = getattr(client, "_client", None)
        manual = (
            paho is not None
            and callable(getattr(paho, "manual_ack_set", None))
            and callable(getattr(paho, "ack", None))
        )
        if manual:
            paho.manual_ack_set(True)
        elif self.manual_ack is None:
            log.warning(
                "aiomqtt does not expose paho's manual ack; messages are acked on "
                "receipt, so an event received but unhandled at a crash is left to "
                "the journal/reconcile backstop"
            )
        conn = _Connection(client, asyncio.Event(), manual)
        aiomqtt_on_publish = getattr(paho, "on_publish", None)
        if (
            paho is not None
            and callable(getattr(paho, "publish", None))
            and callable(aiomqtt_on_publish)
        ):
            acks: dict[int, asyncio.Future[Any]] = {}

            def on_publish(
                client_: Any, userdata: Any, mid: int, reason: Any, properties: Any
            ) -> None:
                future = acks.pop(mid, None)
                if future is not None and not future.done():
                    future.set_result(reason)
                aiomqtt_on_publish(client_, userdata, mid, reason, properties)

            paho.on_publish = on_publish
            conn.acks = acks
        return conn

    async def _run(self) -> None:
        import aiomqtt

        attempt = 0
        while not self._stopping.is_set():
            self.connect_attempts += 1
            conn = self._new_connection()
            client = conn.client
            self.manual_ack = conn.manual_ack
            try:
                async with client:
                    _no_delay(client)
                    await self._subscribe(conn)
                    if attempt:
                        log.info(
                            "reconnected to MQTT broker %s:%d as %s after %d attempts",
                            self.host,
                            self.port,
                            self.client_id,
                            attempt,
                        )
                    else:
                        log.info(
                            "connected to MQTT broker %s:%d as %s",
                            self.host,
                            self.port,
                            self.client_id,
                        )
                    attempt = 0
                    await self._set_connection(conn)
                    await self._subscribe(conn)  # in case start() came meanwhile
                    async for message in client.messages:
                        if self._handler is None:
                            if not self._warned_no_handler:
                                log.warning(
                                    "message on %s but no handler started; it stays unacknowledged",
                                    str(message.topic)[:200],
                                )
                                self._warned_no_handler = True
                            continue
                        self._inbox.put_nowait((conn, message))
            except aiomqtt.MqttError as exc:
                if not self._stopping.is_set():
                    # first failure and every 10th retry at warning: visible, not a flood
                    level = logging.WARNING if attempt % 10 == 0 else logging.DEBUG
                    log.log(
                        level,
                        "MQTT broker %s:%d (attempt %d): %s",
                        self.host,
                        self.port,
                        attempt + 1,
                        redact(str(exc))[:300],
                    )
            finally:
                conn.lost.set()
                await self._set_connection(None)
            if self._stopping.is_set():
                break
            attempt += 1
            delay = jittered_backoff(attempt, self.reconnect_base, self.reconnect_max)
            self.reconnect_delays = [*self.reconnect_delays[-99:], delay]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    async def _set_connection(self, conn: _Connection | None) -> None:
        async with self._conn_changed:
            self._conn = conn
            self._conn_changed.notify_all()


def _no_delay(client: Any) -> None:
    """Disable Nagle on the broker connection: paho leaves it on, so every QoS 1 publish
    waited for a delayed ACK (about 40 ms per webhook, capping intake near 23/s)."""
    with contextlib.suppress(Exception):
        sock = client._client.socket()  # aiomqtt exposes no public socket accessor
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _check_topic_part(
    value: str, where: str, *, allow_slash: bool, error: type[ReplicatorError] = ConfigError
) -> None:
    bad = {"+", "#", "\0"} | (set() if allow_slash else {"/"})
    if not isinstance(value, str) or not value or any(c in value for c in bad):
        chars = "'+', '#', NUL" + ("" if allow_slash else " or '/'")
        message = f"must be a non-empty MQTT topic part without {chars}: {value!r:.120}"
        raise error(message, where) if error is ConfigError else error(f"{where}: {message}")


def _publish_properties(context: dict[str, str]) -> Any:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = "application/json"
    props.PayloadFormatIndicator = 1
    if context:
        props.UserProperty = list(context.items())
    return props


def _user_properties(message: Any) -> dict[str, str]:
    props = getattr(message, "properties", None)
    pairs = getattr(props, "UserProperty", None) or []
    return {str(k): str(v) for k, v in pairs}
