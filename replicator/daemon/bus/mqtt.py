"""MqttBus: events over MQTT v5 (aiomqtt), for several daemons sharing work.

Events go as JSON (see `wire`) to `<topic>/<site>/<repository>` with QoS 1, the W3C
trace context in user properties. The subscriber uses a persistent session (fixed
client id, clean start off, a session expiry interval), so the broker keeps its
subscription and queues QoS 1 messages while the daemon is down; with `group` it
subscribes `$share/<group>/<topic>/#` so instances split the stream. The connection
is re-established forever with capped, jittered exponential backoff until `stop()`.

Acknowledgement: a PUBACK for a received message is sent only after the handler
returned (manual ack, through `PahoAdapter`); a message whose handler did not finish
(crash, stop, lost connection) is redelivered by the broker when the session resumes.
If aiomqtt ever stops exposing its paho client, MqttBus logs a warning and falls back
to paho's automatic ack (on receipt): then an event received but not yet handled when
the process dies is lost to the bus, and only the journal/reconcile backstop catches
it. `manual_ack` tells which mode is active.

Retained messages (`publish_retained`, and the will in `MqttSettings.will`) carry an
instance's status for `registry-replicator status` (`replicator.fleet`); they go to
topics outside `<topic>/`, so the event subscription never sees them.

Our own publishes are checked the same way: a PUBACK with a failure reason code (ACL,
quota) raises `BusRefused` instead of passing for durable.

A publish that was sent but whose PUBACK never came (connection lost) is sent again
on the next connection, so the broker can hold a duplicate: one more reason for
handlers to dedupe on `event.id`. Broker-side limits matter for "nothing lost":
mosquitto's `max_queued_messages` (default 1000 per session) drops QoS 1 messages
beyond it for a slow or absent subscriber, and a session is dropped after its expiry
interval (`session_expiry`, default 7 days).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from replicator import telemetry
from replicator.backoff import jittered_backoff
from replicator.daemon.bus.base import EventBus, Handler, await_cancelled, wait_set
from replicator.daemon.bus.errors import BusClosed, BusError, BusRefused, BusUnavailable
from replicator.daemon.bus.paho_adapter import PahoAdapter
from replicator.daemon.bus.tls import TlsFiles, client_context, explain_tls_failure
from replicator.daemon.bus.wire import event_from_json, event_to_json, trace_dict
from replicator.errors import ConfigError, ReplicatorError
from replicator.events import RegistryEvent
from replicator.logs import redact

log = logging.getLogger("replicator.bus")


@dataclasses.dataclass(frozen=True)
class BrokerAddress:
    """Where the broker is, parsed from mqtt://[user:pass@]host[:port] (or mqtts://)."""

    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)


def parse_broker_url(url: str) -> BrokerAddress:
    """The broker address in `url`; ConfigError naming bus.url if it is not one."""
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
    tls = parts.scheme in ("mqtts", "ssl")
    return BrokerAddress(
        host=parts.hostname,
        port=port or (8883 if tls else 1883),
        tls=tls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )


@dataclasses.dataclass(frozen=True)
class RetainedMessage:
    """A retained message with an MQTT 5 message expiry: the broker keeps it for new
    subscribers until it is replaced or `expiry` seconds have passed."""

    topic: str
    payload: bytes = dataclasses.field(repr=False)
    expiry: int


@dataclasses.dataclass(frozen=True, repr=False)
class MqttSettings:
    """Everything an MqttBus is made of, checked on creation (ConfigError names the
    field). `client_id` must be unique per daemon instance and stable across restarts
    (it names the broker-side session). Credentials may be given as fields or in the
    URL's userinfo; they never appear in repr, logs or errors."""

    url: str
    topic: str
    client_id: str
    group: str | None = None
    username: str | None = None
    password: str | None = None
    qos: int = 1
    session_expiry: int = 7 * 24 * 3600
    keepalive: int = 30
    reconnect_base: float = 0.5
    reconnect_max: float = 30.0
    publish_timeout: float = 30.0
    connect_timeout: float = 10.0
    stop_timeout: float = 5.0
    tls: TlsFiles | None = None  # CA, client certificate and key (mqtts:// only)
    handler_backoff_base: float = 0.2
    handler_backoff_max: float = 30.0
    will: RetainedMessage | None = None  # the broker publishes it if we vanish
    broker: BrokerAddress = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        parsed = parse_broker_url(self.url)
        object.__setattr__(
            self,
            "broker",
            dataclasses.replace(
                parsed,
                username=self.username if self.username is not None else parsed.username,
                password=self.password if self.password is not None else parsed.password,
            ),
        )
        topic = self.topic.strip("/") if isinstance(self.topic, str) else self.topic
        _check_topic_part(topic, "bus.topic", allow_slash=True)
        if topic.startswith("$"):
            raise ConfigError("must not start with '$' (reserved by MQTT)", "bus.topic")
        object.__setattr__(self, "topic", topic)
        if not self.client_id or len(self.client_id) > 128:
            raise ConfigError("required, at most 128 characters", "bus.client_id")
        if self.group is not None:
            _check_topic_part(self.group, "bus.group", allow_slash=False)
        if self.qos not in (1, 2):
            raise ConfigError(
                f"must be 1 or 2 (QoS 0 cannot make events durable), got {self.qos}", "bus.qos"
            )
        if self.session_expiry <= 0:
            raise ConfigError(
                "must be positive: the broker must keep the session while the daemon is down",
                "bus.session_expiry",
            )
        object.__setattr__(self, "session_expiry", int(self.session_expiry))
        if self.tls is not None and not self.broker.tls:
            raise ConfigError(
                "CA or client certificate given for a plain-text broker: use an mqtts:// URL",
                "bus.tls",
            )

    def __repr__(self) -> str:
        b = self.broker
        return (
            f"MqttSettings({'mqtts' if b.tls else 'mqtt'}://{b.host}:{b.port}, "
            f"topic={self.topic!r}, client_id={self.client_id!r}, group={self.group!r})"
        )


@dataclasses.dataclass(eq=False)
class _Connection:
    client: Any  # aiomqtt.Client
    paho: PahoAdapter
    lost: asyncio.Event
    subscribed: bool = False


class MqttBus(EventBus):
    """Events over MQTT v5 (aiomqtt): QoS 1, persistent session, optional shared group."""

    def __init__(self, settings: MqttSettings) -> None:
        super().__init__(
            handler_backoff_base=settings.handler_backoff_base,
            handler_backoff_max=settings.handler_backoff_max,
        )
        self.settings = settings
        broker = settings.broker
        self.host = broker.host
        self.port = broker.port
        self.topic = settings.topic
        self.client_id = settings.client_id
        self.group = settings.group
        self.qos = settings.qos
        self.publish_timeout = settings.publish_timeout
        self.stop_timeout = settings.stop_timeout
        self._tls_context = client_context(settings.tls) if broker.tls else None
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
        self.last_connect_error: str | None = None  # why the last connection attempt failed
        self.connections = 0  # connections made so far (see `wait_new_connection`)

    def __repr__(self) -> str:
        return repr(self.settings).replace("MqttSettings", "MqttBus", 1)

    @property
    def subscription(self) -> str:
        base = f"{self.topic}/#"
        return f"$share/{self.group}/{base}" if self.group else base

    @property
    def _topic_template(self) -> str:
        return f"{self.topic}/{{site}}/{{repository}}"

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

    async def wait_new_connection(self, seen: int, timeout: float) -> int:
        """Wait at most `timeout` for a connection after the `seen`-th one; returns the
        count of connections made so far (unchanged: none came within `timeout`)."""
        self._ensure_running()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout), self._conn_changed:
                await self._conn_changed.wait_for(
                    lambda: self.connected and self.connections > seen
                )
        return self.connections

    # --- publishing ------------------------------------------------------------
    async def publish_retained(self, message: RetainedMessage, *, timeout: float) -> None:
        """Publish `message` retained (QoS `qos`), once, on the current connection;
        returns at the broker's acknowledgement. BusUnavailable when not connected
        within `timeout` or the connection drops meanwhile: the caller publishes again
        later (a status is replaced by the next one anyway)."""
        if self._stopping.is_set():
            raise BusClosed("event bus is stopped")
        self._ensure_running()
        try:
            async with asyncio.timeout(timeout):
                async with self._conn_changed:
                    await self._conn_changed.wait_for(
                        lambda: self.connected or self._stopping.is_set()
                    )
                conn = self._conn
                if conn is None or self._stopping.is_set():
                    raise BusClosed("event bus stopped")
                properties = _publish_properties({}, expiry=message.expiry)
                await self._send(conn, message.topic, message.payload, properties, retain=True)
        except TimeoutError:
            detail = self.last_connect_error or "no connection to the broker"
            raise BusUnavailable(
                f"retained message on {message.topic[:200]} not acknowledged by MQTT broker "
                f"{self.host}:{self.port} within {timeout:g}s: {redact(detail)[:300]}"
            ) from None
        except BusError:
            raise
        except Exception as exc:  # the connection broke under the publish
            raise BusUnavailable(
                f"retained message on {message.topic[:200]} to MQTT broker "
                f"{self.host}:{self.port} failed: {redact(str(exc))[:300]}"
            ) from None

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
        given = trace_dict(trace_context)
        with telemetry.messaging_span(
            "publish",
            topic,
            self._topic_template,
            message_id=event.id,
            broker=(self.host, self.port),
            parent=trace_context,
        ):  # the message carries this span's context (the given one is its parent)
            await self._publish(event, topic, telemetry.trace_context() or given, timeout)

    async def _publish(
        self, event: RegistryEvent, topic: str, carrier: dict[str, str], timeout: float | None
    ) -> None:
        payload = event_to_json(event).encode()
        properties = _publish_properties(carrier)
        self._ensure_running()
        limit = self.publish_timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        last_error: str | None = None
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
                await wait_set(conn.lost, min(1.0, max(0.0, remaining)))
            elif lost in done:
                last_error = "connection lost before the broker acknowledged"
            else:
                break
        detail = last_error or self.last_connect_error or "no connection to the broker"
        raise BusUnavailable(
            f"event {event.id} ({event.action} {event.repository} at {event.site}) not "
            f"acknowledged by MQTT broker {self.host}:{self.port} within {limit:g}s: "
            f"{redact(detail)[:300]}"
        )

    async def _send(
        self,
        conn: _Connection,
        topic: str,
        payload: bytes,
        properties: Any,
        *,
        retain: bool = False,
    ) -> None:
        """One QoS 1/2 publish on `conn`, returning at the broker's acknowledgement;
        BusRefused when the broker answered with a failure reason code."""
        if not conn.paho.checks_publish_acks:
            await conn.client.publish(
                topic,
                payload,
                qos=self.qos,
                retain=retain,
                properties=properties,
                timeout=math.inf,
            )
            return
        reason = await conn.paho.publish(topic, payload, self.qos, properties, retain=retain)
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
            if conn.lost.is_set() and conn.paho.manual_ack:
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
            with telemetry.messaging_span(
                "process",
                str(message.topic),
                self._topic_template,
                message_id=event.id,
                broker=(self.host, self.port),
                parent=context,
            ):  # tasks the handler journals carry this span's context
                delivered = await self._deliver(
                    handler, event, telemetry.trace_context() or context
                )
            if not delivered:
                return
            self._ack(conn, message)

    def _ack(self, conn: _Connection, message: Any) -> None:
        if conn.lost.is_set() or message.qos == 0:
            return
        conn.paho.ack(message.mid, message.qos)

    async def stop(self) -> None:
        """Stop handling, disconnect gracefully (the broker keeps the session). A handler
        still running after `stop_timeout` is cancelled; its message was not acked and
        comes back on the next start. Returns within about twice `stop_timeout` whatever
        the handler does; a caller's cancellation propagates (the tasks are cancelled)."""
        self._stopping.set()
        self._inbox.put_nowait((None, None))
        async with self._conn_changed:
            self._conn_changed.notify_all()
        worker, self._worker = self._worker, None
        runner, self._runner = self._runner, None
        try:
            if worker is not None:  # the event in hand may finish (and be acked)
                await asyncio.wait({worker}, timeout=self.stop_timeout)
        finally:
            for task in (worker, runner):
                if task is not None:
                    task.cancel()
        await await_cancelled([worker, runner], self.stop_timeout)

    # --- the connection loop ---------------------------------------------------
    def _ensure_running(self) -> None:
        if self._runner is None and not self._stopping.is_set():
            self._runner = asyncio.create_task(self._run(), name="bus-mqtt-connection")

    def _new_connection(self) -> _Connection:
        import aiomqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        settings = self.settings
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = settings.session_expiry
        will = None
        if settings.will is not None:
            will_props = _publish_properties(
                {}, expiry=settings.will.expiry, packet=PacketTypes.WILLMESSAGE
            )
            will = aiomqtt.Will(
                settings.will.topic, settings.will.payload, self.qos, True, will_props
            )
        client = aiomqtt.Client(
            self.host,
            self.port,
            username=settings.broker.username,
            password=settings.broker.password,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=False,
            properties=props,
            will=will,
            keepalive=settings.keepalive,
            timeout=settings.connect_timeout,
            tls_context=self._tls_context,
            logger=logging.getLogger("replicator.bus.mqtt"),
        )
        client.pending_calls_threshold = 10_000  # many concurrent publishes are normal
        paho = PahoAdapter(client)
        if not paho.manual_ack and self.manual_ack is None:
            log.warning(
                "aiomqtt does not expose paho's manual ack; messages are acked on "
                "receipt, so an event received but unhandled at a crash is left to "
                "the journal/reconcile backstop"
            )
        return _Connection(client, paho, asyncio.Event())

    async def _run(self) -> None:
        import aiomqtt

        attempt = 0
        while not self._stopping.is_set():
            self.connect_attempts += 1
            conn = self._new_connection()
            client = conn.client
            self.manual_ack = conn.paho.manual_ack
            try:
                async with client:
                    conn.paho.set_no_delay()
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
                    self.last_connect_error = None
                    self.connections += 1
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
                    error = str(exc)
                    cause = conn.paho.last_error
                    if cause and cause not in error:
                        error = f"{error} ({cause})"
                    self._connection_failed(redact(error)[:400], attempt)
            finally:
                conn.lost.set()
                await self._set_connection(None)
            if self._stopping.is_set():
                break
            attempt += 1
            delay = jittered_backoff(
                attempt, self.settings.reconnect_base, self.settings.reconnect_max
            )
            self.reconnect_delays = [*self.reconnect_delays[-99:], delay]
            await wait_set(self._stopping, delay)

    def _connection_failed(self, error: str, attempt: int) -> None:
        """Remember and log why the broker could not be reached: the first failure and
        every 10th retry, so it is visible without flooding. A TLS failure says what to
        check, at error level: it will not heal by retrying."""
        hint = explain_tls_failure(error) if self.settings.broker.tls else None
        if hint is None:
            self.last_connect_error = error
            level = logging.WARNING
            message = "MQTT broker %s:%d (attempt %d): %s"
            args: tuple[Any, ...] = (self.host, self.port, attempt + 1, error)
        else:
            self.last_connect_error = f"TLS: {hint}: {error}"
            level = logging.ERROR
            message = "TLS with MQTT broker %s:%d failed (attempt %d): %s: %s"
            args = (self.host, self.port, attempt + 1, hint, error)
        log.log(level if attempt % 10 == 0 else logging.DEBUG, message, *args)

    async def _set_connection(self, conn: _Connection | None) -> None:
        async with self._conn_changed:
            self._conn = conn
            self._conn_changed.notify_all()


def _check_topic_part(
    value: str, where: str, *, allow_slash: bool, error: type[ReplicatorError] = ConfigError
) -> None:
    bad = {"+", "#", "\0"} | (set() if allow_slash else {"/"})
    if not isinstance(value, str) or not value or any(c in value for c in bad):
        chars = "'+', '#', NUL" + ("" if allow_slash else " or '/'")
        message = f"must be a non-empty MQTT topic part without {chars}: {value!r:.120}"
        raise error(message, where) if error is ConfigError else error(f"{where}: {message}")


def _publish_properties(
    context: dict[str, str], *, expiry: int | None = None, packet: int | None = None
) -> Any:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.PUBLISH if packet is None else packet)
    props.ContentType = "application/json"
    props.PayloadFormatIndicator = 1
    if expiry is not None:
        props.MessageExpiryInterval = expiry
    if context:
        props.UserProperty = list(context.items())
    return props


def _user_properties(message: Any) -> dict[str, str]:
    props = getattr(message, "properties", None)
    pairs = getattr(props, "UserProperty", None) or []
    return {str(k): str(v) for k, v in pairs}
