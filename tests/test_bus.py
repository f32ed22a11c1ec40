"""The event bus: JSON wire format, the in-process bus, and MqttBus on a real Mosquitto."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections import Counter

import aiomqtt
import pytest

from replicator.config import TLSConfig
from replicator.daemon.bus import (
    BusClosed,
    BusError,
    BusRefused,
    BusUnavailable,
    InProcessBus,
    MqttBus,
    MqttSettings,
    event_from_json,
    event_to_json,
)
from replicator.errors import ConfigError
from replicator.events import RegistryEvent
from tests.harness.mosquitto import Mosquitto
from tests.harness.tls import Pki, TlsMosquitto, make_pki
from tests.harness.util import async_wait_until, free_port

DIGEST = "sha256:" + "ab" * 32
TRACE = {
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "tracestate": "vendor=1",
}


def event(i: int = 0, site: str = "eu", repository: str = "team/app") -> RegistryEvent:
    return RegistryEvent(
        id=f"ev-{i}",
        site=site,
        action="push",
        repository=repository,
        tag=f"v{i}",
        digest=DIGEST,
        media_type=("application/vnd.oci.image.manifest.v1+json"),
        size=1234,
        occurred_at=1_700_000_000.5,
        is_manifest=True,
        actor="ci",
        source_instance="inst-1",
    )


class Collector:
    """A handler that records (event, trace context) pairs."""

    def __init__(self) -> None:
        self.got: list[tuple[RegistryEvent, dict[str, str]]] = []

    async def __call__(self, ev: RegistryEvent, ctx: dict[str, str]) -> None:
        self.got.append((ev, ctx))

    @property
    def ids(self) -> list[str]:
        return [ev.id for ev, _ in self.got]

    async def wait_for(self, n: int, timeout: float = 10.0) -> None:
        async def enough() -> bool:
            return len(set(self.ids)) >= n

        await async_wait_until(enough, timeout=timeout, what=f"{n} events")


def mqtt(broker: Mosquitto, client_id: str, **kw) -> MqttBus:
    kw.setdefault("reconnect_base", 0.05)
    kw.setdefault("reconnect_max", 0.5)
    return MqttBus(MqttSettings(broker.url, "registry/events", client_id, **kw))


# --- wire format ---------------------------------------------------------------------


def test_event_json_round_trip_and_validation():
    ev = event(3)
    assert event_from_json(event_to_json(ev)) == ev
    assert event_from_json(event_to_json(ev).encode()) == ev
    minimal = RegistryEvent(id="x", site="s", action="delete", repository="r", tag="t")
    assert event_from_json(event_to_json(minimal)) == minimal
    assert (
        event_from_json(
            '{"id":"x","site":"s","action":"pull","repository":"r","new_field":1}'
        ).action
        == "pull"
    )
    for bad, field in [
        ('{"site":"s","action":"push","repository":"r"}', "event.id"),
        ('{"id":"x","site":"s","action":"copy","repository":"r"}', "action"),
        ('{"id":"x","site":"s","action":"push","repository":"Bad Repo"}', "repository"),
        ('{"id":"x","site":"s","action":"push","repository":"r","digest":"md5:1"}', "digest"),
        ('{"id":"x","site":"s","action":"push","repository":"r","size":-1}', "size"),
        ('{"v":2,"id":"x"}', "version"),
        ("[1]", "object"),
        ("{", "JSON"),
    ]:
        with pytest.raises(BusError, match=field):
            event_from_json(bad)


def test_event_json_is_held_to_the_webhook_rules():
    """One set of field rules (replicator.events): what a webhook may not carry, a bus
    message may not either, whoever published it."""
    base = {"id": "x", "site": "eu", "action": "push", "repository": "team/app"}
    for field, value in [
        ("id", "has space"),
        ("id", "x" * 201),
        ("site", "eu/west"),
        ("site", "+"),
        ("digest", DIGEST + "\n"),
        ("tag", "v\u00e9"),
        ("media_type", "not a media type"),
        ("size", 2**63),
        ("actor", "ci\u0007bell"),
        ("source_instance", "x" * 300),
        ("occurred_at", True),
        ("occurred_at", -1),
        ("from_repository", "Up/Per"),
        ("is_manifest", "yes"),
        ("source_format", "quay"),
    ]:
        with pytest.raises(BusError, match=rf"event\.{field}"):
            event_from_json(json.dumps({**base, field: value}))
    ok = event_from_json(json.dumps({**base, "tag": "", "actor": "", "occurred_at": 1.5}))
    assert (ok.tag, ok.actor, ok.occurred_at) == (None, None, 1.5)


# --- in process ------------------------------------------------------------------------


async def test_in_process_bus_delivers_in_order_with_trace_context_and_retries():
    bus = InProcessBus(handler_backoff_base=0.01, handler_backoff_max=0.02)
    got = Collector()
    failures = Counter[str]()

    async def flaky(ev: RegistryEvent, ctx: dict[str, str]) -> None:
        if ev.id == "ev-1" and failures[ev.id] < 2:
            failures[ev.id] += 1
            raise OSError("journal busy")
        await got(ev, ctx)

    await bus.publish(event(0), TRACE)  # before start: queued, not lost
    await bus.start(flaky)
    for i in range(1, 4):
        await bus.publish(event(i), {})
    assert bus.connected
    await bus.stop()  # drains first
    assert got.ids == ["ev-0", "ev-1", "ev-2", "ev-3"]
    assert got.got[0][1] == TRACE and failures["ev-1"] == 2
    assert not bus.connected
    with pytest.raises(BusClosed):
        await bus.publish(event(9))


async def test_in_process_stop_returns_within_its_timeout_while_the_handler_keeps_failing():
    """SIGTERM with the journal on a full disk: every handler call fails. stop() gives
    the queue `stop_timeout` to drain, then must end the consumer and return."""
    bus = InProcessBus(stop_timeout=0.3, handler_backoff_base=0.1, handler_backoff_max=0.2)
    calls = Counter[str]()

    async def disk_full(ev: RegistryEvent, ctx: dict[str, str]) -> None:
        calls[ev.id] += 1
        raise OSError("database or disk is full")

    await bus.start(disk_full)
    for i in range(3):
        await bus.publish(event(i), {})

    async def failing() -> bool:
        return calls["ev-0"] >= 2

    await async_wait_until(failing, timeout=5, what="the handler retried")
    started = time.monotonic()
    stopper = asyncio.create_task(bus.stop())
    done, _ = await asyncio.wait({stopper}, timeout=5)
    assert stopper in done, "stop() hung with a failing handler"
    assert time.monotonic() - started < 0.3 + 1.0
    assert stopper.exception() is None
    assert set(calls) == {"ev-0"}  # the others stay queued (the journal has them)
    assert not bus.connected
    tasks = [t for t in asyncio.all_tasks() if t.get_name() == "bus-inprocess"]
    assert all(t.done() for t in tasks), "the consumer outlived stop()"


async def test_cancelling_in_process_stop_is_not_swallowed_and_still_stops_the_consumer():
    """A caller that bounds stop() (asyncio.timeout, task.cancel) must get its
    cancellation back, and the consumer must be gone anyway."""
    handler_cancelled = asyncio.Event()

    async def slow_to_cancel(ev: RegistryEvent, ctx: dict[str, str]) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            handler_cancelled.set()
            await asyncio.sleep(0.5)  # a handler cleaning up before it lets go
            raise

    bus = InProcessBus(stop_timeout=0.1)
    await bus.start(slow_to_cancel)
    await bus.publish(event(1), {})
    stopper = asyncio.create_task(bus.stop())
    await asyncio.wait_for(handler_cancelled.wait(), 5)  # stop() is past the drain
    stopper.cancel()
    done, _ = await asyncio.wait({stopper}, timeout=5)
    assert stopper in done and stopper.cancelled(), "stop() swallowed its caller's cancel"
    consumer = [t for t in asyncio.all_tasks() if t.get_name() == "bus-inprocess"]
    if consumer:
        await asyncio.wait(consumer, timeout=5)
    assert all(t.done() for t in consumer)


async def test_a_handler_waiting_to_retry_does_not_swallow_the_cancel_of_stop():
    """stop() sets `stopping`, then cancels the consumer. Under Python 3.11 an
    asyncio.wait_for whose inner wait has just finished returns normally when cancelled,
    so a consumer waiting to retry ignored the cancel and went back to the queue."""
    bus = InProcessBus(stop_timeout=0.0, handler_backoff_base=5, handler_backoff_max=5)
    failed = asyncio.Event()

    async def fails(ev: RegistryEvent, ctx: dict[str, str]) -> None:
        failed.set()
        raise OSError("database or disk is full")

    await bus.start(fails)
    await bus.publish(event(1), {})
    await asyncio.wait_for(failed.wait(), 5)  # the consumer now waits 2.5-5 s to retry
    stopper = asyncio.create_task(bus.stop())
    done, _ = await asyncio.wait({stopper}, timeout=2)
    stopper.cancel()  # (cleanup when it hung)
    assert stopper in done, "stop() hung: the consumer swallowed its cancellation"
    consumer = [t for t in asyncio.all_tasks() if t.get_name() == "bus-inprocess"]
    assert all(t.done() for t in consumer), "the consumer outlived stop()"


# --- MQTT ------------------------------------------------------------------------------


async def test_publish_reaches_handler_with_trace_context_on_site_repository_topic(mosquitto):
    watcher_got: list[aiomqtt.Message] = []
    async with aiomqtt.Client("127.0.0.1", mosquitto.port) as watcher:
        await watcher.subscribe("registry/events/#", qos=1)
        bus = mqtt(mosquitto, "daemon-1")
        got = Collector()
        await bus.start(got)
        await bus.wait_connected(timeout=10)
        assert bus.connected and bus.manual_ack
        await bus.publish(event(1), TRACE)
        await bus.publish(event(2, site="us", repository="a/b/c"), {})
        await got.wait_for(2)
        async with asyncio.timeout(5):
            async for message in watcher.messages:
                watcher_got.append(message)
                if len(watcher_got) == 2:
                    break
        await bus.stop()
    assert got.got[0] == (event(1), TRACE)
    assert got.got[1] == (event(2, site="us", repository="a/b/c"), {})
    assert [str(m.topic) for m in watcher_got] == [
        "registry/events/eu/team/app",
        "registry/events/us/a/b/c",
    ]
    assert event_from_json(watcher_got[0].payload) == event(1)
    with pytest.raises(BusClosed):
        await bus.publish(event(3))


async def test_start_after_publishing_subscribes_on_the_live_connection(mosquitto):
    bus = mqtt(mosquitto, "daemon-1")
    await bus.publish(event(1))  # connects lazily, no subscription yet
    attempts = bus.connect_attempts
    got = Collector()
    await bus.start(got)
    await bus.wait_connected(timeout=10)
    await bus.publish(event(2))
    await got.wait_for(1)
    await bus.stop()
    assert got.ids == ["ev-2"] and bus.connect_attempts == attempts


async def test_a_subscriber_that_was_down_receives_what_it_missed(mosquitto):
    first = mqtt(mosquitto, "planner")
    await first.start(Collector())
    await first.wait_connected(timeout=10)  # the broker now holds a session + subscription
    await first.stop()

    publisher = mqtt(mosquitto, "intake")
    for i in range(5):
        await publisher.publish(event(i))
    await publisher.stop()

    again = mqtt(mosquitto, "planner")
    got = Collector()
    await again.start(got)
    await got.wait_for(5)
    await again.stop()
    assert sorted(got.ids) == [f"ev-{i}" for i in range(5)]


async def test_an_event_whose_handler_did_not_finish_is_delivered_again(mosquitto):
    """Ack only after the handler returns: a stop (or crash) mid-handler loses nothing."""
    stuck = asyncio.Event()

    async def hangs(ev: RegistryEvent, ctx: dict[str, str]) -> None:
        stuck.set()
        await asyncio.Event().wait()

    first = mqtt(mosquitto, "planner", stop_timeout=0.2)
    await first.start(hangs)
    await first.wait_connected(timeout=10)
    await first.publish(event(7), TRACE)
    await asyncio.wait_for(stuck.wait(), 10)
    await first.stop()  # the handler is cancelled; the message was never acked

    again = mqtt(mosquitto, "planner")
    got = Collector()
    await again.start(got)
    await got.wait_for(1)
    await again.stop()
    assert got.got[0] == (event(7), TRACE)


async def test_a_bounded_mqtt_stop_times_out_for_its_caller_and_still_cancels_the_handler(
    mosquitto,
):
    """The daemon bounds stop() by what is left of its drain timeout: the timeout must
    reach the caller (it was swallowed), and the stuck handler must still be cancelled."""
    stuck, cancelled = asyncio.Event(), asyncio.Event()

    async def hangs(ev: RegistryEvent, ctx: dict[str, str]) -> None:
        stuck.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    bus = mqtt(mosquitto, "planner", stop_timeout=30)
    await bus.start(hangs)
    await bus.wait_connected(timeout=10)
    await bus.publish(event(1))
    await asyncio.wait_for(stuck.wait(), 10)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await bus.stop()
    assert time.monotonic() - started < 5
    await asyncio.wait_for(cancelled.wait(), 5)
    tasks = [t for t in asyncio.all_tasks() if t.get_name().startswith("bus-mqtt")]
    if tasks:
        await asyncio.wait(tasks, timeout=10)
    assert all(t.done() for t in tasks), "a bus task outlived stop()"


async def test_handler_failures_are_retried_before_the_ack(mosquitto):
    calls = Counter[str]()
    done = Collector()

    async def flaky(ev: RegistryEvent, ctx: dict[str, str]) -> None:
        calls[ev.id] += 1
        if calls[ev.id] < 3:
            raise OSError("journal locked")
        await done(ev, ctx)

    bus = mqtt(mosquitto, "planner", handler_backoff_base=0.01, handler_backoff_max=0.05)
    await bus.start(flaky)
    await bus.publish(event(1))
    await done.wait_for(1)
    await bus.stop()
    assert calls["ev-1"] == 3


async def test_shared_subscription_splits_the_stream_without_duplicates_or_loss(mosquitto):
    a, b = Collector(), Collector()
    bus_a = mqtt(mosquitto, "planner-a", group="planners")
    bus_b = mqtt(mosquitto, "planner-b", group="planners")
    assert bus_a.subscription == "$share/planners/registry/events/#"
    await bus_a.start(a)
    await bus_b.start(b)
    await bus_a.wait_connected(timeout=10)
    await bus_b.wait_connected(timeout=10)
    n = 40
    await asyncio.gather(*(bus_a.publish(event(i)) for i in range(n)))

    async def all_in() -> bool:
        return len(a.ids) + len(b.ids) >= n

    await async_wait_until(all_in, timeout=10, what="all events delivered")
    await bus_a.stop()
    await bus_b.stop()
    ids = a.ids + b.ids
    assert len(ids) == len(set(ids)) == n
    assert a.ids and b.ids  # both instances did some of the work


async def test_broker_restart_mid_stream_loses_nothing(mosquitto):
    got = Collector()
    sub = mqtt(mosquitto, "planner")
    pub = mqtt(mosquitto, "intake", publish_timeout=30)
    await sub.start(got)
    await sub.wait_connected(timeout=10)
    n, stop_at = 200, 40
    published = 0

    async def producer() -> None:
        nonlocal published
        for i in range(n):
            await pub.publish(event(i))  # returns only once durable; retries across restart
            published += 1

    async def reached(count: int) -> bool:
        return published >= count

    task = asyncio.create_task(producer())
    await async_wait_until(lambda: reached(stop_at), timeout=10, what="first events")
    await asyncio.to_thread(mosquitto.stop)  # graceful: the broker saves its state
    attempts = pub.connect_attempts

    async def retried() -> bool:
        return pub.connect_attempts >= attempts + 2

    await async_wait_until(retried, timeout=10, what="publisher reconnect attempts")
    blocked_at = published
    assert blocked_at < n and not task.done()  # publish blocks while the broker is down
    await asyncio.to_thread(mosquitto.start)
    await asyncio.wait_for(task, 30)
    await got.wait_for(n, timeout=20)
    await pub.stop()
    await sub.stop()
    assert set(got.ids) == {f"ev-{i}" for i in range(n)}
    assert sub.connect_attempts >= 2  # the subscriber resumed its session


async def test_reconnect_backoff_grows_and_does_not_spin(tmp_path):
    port = free_port()  # nothing listens here
    bus = MqttBus(
        MqttSettings(
            f"mqtt://127.0.0.1:{port}",
            "registry/events",
            "lonely",
            reconnect_base=0.1,
            reconnect_max=0.4,
        )
    )
    started = time.monotonic()
    await bus.start(Collector())

    async def tried() -> bool:
        return bus.connect_attempts >= 5

    await async_wait_until(tried, timeout=10, what="5 connection attempts")
    elapsed = time.monotonic() - started
    delays = bus.reconnect_delays[:4]
    # equal jitter: each wait is in [half, full] of 0.1, 0.2, 0.4, 0.4 (capped)
    for delay, full in zip(delays, [0.1, 0.2, 0.4, 0.4], strict=True):
        assert full / 2 <= delay <= full
    assert elapsed >= sum(delays) * 0.9
    assert not bus.connected
    with pytest.raises(BusUnavailable, match=rf"127.0.0.1:{port} within 0.3s"):
        await bus.publish(event(1), timeout=0.3)
    await bus.stop()


async def test_credentials_work_and_the_password_is_never_logged(tmp_path, caplog):
    broker = Mosquitto(root=tmp_path / "auth", users={"replicator": "s3cret-pw"}).start()
    caplog.set_level(logging.DEBUG)
    try:
        got = Collector()
        good = MqttBus(
            MqttSettings(
                f"mqtt://replicator:s3cret-pw@127.0.0.1:{broker.port}",
                "ev",
                "good",
                reconnect_base=0.05,
            )
        )
        await good.start(got)
        await good.publish(event(1))
        await got.wait_for(1)
        await good.stop()

        bad = MqttBus(
            MqttSettings(
                broker.url,
                "ev",
                "bad",
                username="replicator",
                password="wr0ng-pw",
                reconnect_base=0.05,
                reconnect_max=0.1,
            )
        )
        with pytest.raises(BusUnavailable) as info:
            await bad.publish(event(2), timeout=0.5)
        await bad.stop()
        assert bad.connect_attempts >= 2
    finally:
        broker.stop()
    text = caplog.text + str(info.value) + repr(good) + repr(bad)
    assert "s3cret-pw" not in text and "wr0ng-pw" not in text
    assert "127.0.0.1" in caplog.text  # the failures were logged, just not the secret


async def test_a_publish_the_broker_refuses_is_an_error_not_a_success(tmp_path):
    """aiomqtt ignores PUBACK reason codes; MqttBus must not call a refused event durable."""
    broker = Mosquitto(root=tmp_path / "acl", acl="topic readwrite registry/events/eu/#\n")
    broker.start()
    try:
        bus = mqtt(broker, "intake")
        await bus.publish(event(1, site="eu"))
        started = time.monotonic()
        with pytest.raises(BusRefused, match=r"ev-2 .*refused.*registry/events/us/team/app"):
            await bus.publish(event(2, site="us"))
        assert time.monotonic() - started < 5  # refused at once, not after the timeout
        await bus.stop()
    finally:
        broker.stop()


# --- TLS ----------------------------------------------------------------------------


@pytest.fixture
def pki(tmp_path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def tls_broker(tmp_path, pki):
    """Mosquitto on TLS that wants a client certificate signed by `pki`'s CA."""
    broker = TlsMosquitto(root=tmp_path / "tls-broker", pki=pki, require_client_cert=True)
    broker.start()
    yield broker
    broker.stop()


async def test_tls_with_a_private_ca_and_a_client_certificate(tls_broker, pki):
    tls = TLSConfig(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)
    bus = mqtt(tls_broker, "planner", tls=tls)
    got = Collector()
    await bus.start(got)
    await bus.wait_connected(timeout=10)
    await bus.publish(event(1), TRACE)
    await got.wait_for(1)
    await bus.stop()
    assert got.got == [(event(1), TRACE)]


async def test_tls_without_the_client_certificate_the_broker_refuses(tls_broker, pki, caplog):
    caplog.set_level(logging.WARNING, logger="replicator.bus")
    # the broker's alert ends the connection before CONNACK; the attempt ends at the
    # connect timeout, whose error carries the alert
    bus = mqtt(tls_broker, "anonymous", tls=TLSConfig(ca=pki.ca), connect_timeout=0.5)
    where = rf"MQTT broker 127\.0\.0\.1:{tls_broker.port}"
    with pytest.raises(BusUnavailable, match=rf"{where}.*bus\.tls\.cert.*CERTIFICATE_REQUIRED"):
        await bus.publish(event(1), timeout=1.5)
    await bus.stop()
    assert re.search(rf"TLS .*{where}.*CERTIFICATE_REQUIRED", caplog.text), caplog.text


async def test_tls_with_the_wrong_ca_fails_with_an_error_naming_the_broker(
    tls_broker, tmp_path, caplog
):
    caplog.set_level(logging.WARNING, logger="replicator.bus")
    other = make_pki(tmp_path / "other-pki", name="other")
    bus = mqtt(
        tls_broker,
        "planner",
        tls=TLSConfig(ca=other.ca, cert=other.client_cert, key=other.client_key),
    )
    where = rf"MQTT broker 127\.0\.0\.1:{tls_broker.port}"
    with pytest.raises(BusUnavailable, match=rf"{where}.*certificate verify failed"):
        await bus.publish(event(1), timeout=1)
    await bus.stop()
    assert re.search(rf"TLS .*{where}.*certificate verify failed", caplog.text), caplog.text
    assert "bus.tls.ca" in caplog.text  # what to fix


def test_tls_files_that_cannot_be_loaded_are_refused_naming_the_field(tmp_path, pki):
    missing = tmp_path / "nope.pem"
    url = "mqtts://127.0.0.1:8883"
    with pytest.raises(ConfigError, match=r"bus\.tls\.ca: .*nope\.pem"):
        MqttBus(MqttSettings(url, "ev", "x", tls=TLSConfig(ca=missing)))
    with pytest.raises(ConfigError, match=r"bus\.tls\.cert: .*client\.pem"):
        MqttBus(
            MqttSettings(url, "ev", "x", tls=TLSConfig(cert=pki.client_cert, key=pki.server_key))
        )
    with pytest.raises(ConfigError, match=r"bus\.tls: .*mqtts://"):
        MqttSettings("mqtt://127.0.0.1:1883", "ev", "x", tls=TLSConfig(ca=pki.ca))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"url": "http://127.0.0.1:1"}, "bus.url"),
        ({"url": "mqtt://"}, "bus.url"),
        ({"topic": "events/+/x"}, "bus.topic"),
        ({"topic": "$SYS/x"}, "bus.topic"),
        ({"group": "a/b"}, "bus.group"),
        ({"qos": 0}, "bus.qos"),
        ({"client_id": ""}, "bus.client_id"),
        ({"session_expiry": 0}, "bus.session_expiry"),
    ],
)
async def test_bad_settings_are_refused_naming_the_field(kwargs, field):
    args = {"url": "mqtt://127.0.0.1:1883", "topic": "events", "client_id": "x", **kwargs}
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        MqttBus(MqttSettings(**args))
