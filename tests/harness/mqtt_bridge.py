"""Two Mosquitto brokers bridged, one per region, with a link that can be cut.

The regional topology the README describes ("Regions: bridged brokers"): broker A in
region A (where the registries' webhooks arrive), broker B in region B (where the
workers are). Broker A carries the bridge; its connection to B goes through
`LinkProxy`, a TCP proxy standing for the WAN link, so a test can cut the link
(every bridge connection is closed, and new ones are refused until `restore()`) and
watch what queued meanwhile arrive.

Why each bridge setting is what it is (mosquitto.conf(5), section "Bridges":
https://mosquitto.org/man/mosquitto-conf-5.html):

- `topic <topic>/# both 1`: the event topic tree in both directions (a region-B
  intake's events reach region A's workers too) at QoS 1. The QoS here is the
  bridge's own publish/subscribe QoS: at 0 the bridge would drop what the daemons
  publish at QoS 1, whatever they ask for.
- `cleansession false` with a fixed `remote_clientid`: the bridge's session at B
  (its subscription, its unacknowledged messages) outlives a lost link, and a
  reconnecting bridge resumes it under the same id. `local_cleansession false`
  (the default follows `cleansession`) does the same for its session at A, where
  the messages for B queue while the link is down; with persistence on, that queue
  also survives a restart of broker A.
- `bridge_protocol_version mqttv311`, not `mqttv50`: mosquitto (2.0.11 here, and
  2.0.18 still) sends no Session Expiry Interval in a v5 bridge's CONNECT, so the
  remote broker ends the bridge's session as soon as the link drops, and whatever
  queued there for the bridge (here: events published in region B, on their way to
  A) is lost (eclipse-mosquitto/mosquitto#2424, #2793, #2980; `tests/test_mqtt_bridge.py`
  shows the loss). What travels A -> B queues in the bridge's local session at A,
  which either version keeps. Under v3.1.1, clean session 0 means
  "keep the session", with no expiry needed. The daemons still speak MQTT v5 to their
  own broker (shared subscriptions are a v5 feature of that broker, not the bridge).
- `try_private true` (the default): the bridge announces itself as one, so the
  remote mosquitto does not send a message back over the bridge it came from
  (no loop with `both`).
- `max_queued_messages` (a broker-wide per-session limit, default 1000): what
  queues for the bridge during an outage is bounded by it; beyond it mosquitto
  drops QoS 1 messages. Both brokers raise it (see `Mosquitto`).
- `restart_timeout 1 2` and `keepalive_interval 5`: how soon the bridge notices a
  dead link (keepalive, at least 5 s; a closed connection is noticed at once) and the
  back-off between reconnection attempts (base, cap). The one-number (constant) form
  did not take effect in mosquitto 2.0.11: with `restart_timeout 1` the attempts came
  5 and 14 s apart (the default back-off, base 5 s, cap 30 s), with `1 2` every 2 s.
  Small here so tests are fast; over a WAN the default back-off is reasonable, and it
  is what bounds how long after the link's return the queued messages start to flow.
- `notifications true` (the default): the bridge publishes its state, retained, on
  `$SYS/broker/connection/<remote_clientid>/state` (1 up, 0 down); tests wait on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from replicator.fleet import status_topic_root
from tests.harness.daemon import DaemonProcess
from tests.harness.mosquitto import Mosquitto
from tests.harness.util import free_port, wait_until

BRIDGE_ID = "bridge-region-a"


class LinkProxy:
    """A TCP proxy standing for the link between two regions, which can be cut.

    `cut()` closes every connection through it and refuses new ones (accepted, then
    closed at once, as a peer behind a broken route resets) until `restore()`. Runs its
    own event loop in a thread, so a synchronous test can cut and restore at will."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = free_port()
        self.connections = 0  # accepted while the link was up
        self.refused = 0  # accepted and closed while the link was cut
        self._up = True
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def up(self) -> bool:
        return self._up

    def start(self) -> LinkProxy:
        started = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            self._server = loop.run_until_complete(
                asyncio.start_server(self._on_client, "127.0.0.1", self.port)
            )
            started.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="link-proxy", daemon=True)
        self._thread.start()
        assert started.wait(10), "link proxy did not start"
        return self

    def stop(self) -> None:
        if self._loop is None:
            return

        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            self._close_all()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop = None

    def cut(self) -> None:
        """The link goes down: live connections are closed, new ones refused."""
        assert self._loop is not None

        async def down() -> None:
            self._up = False
            self._close_all()

        asyncio.run_coroutine_threadsafe(down(), self._loop).result(10)

    def restore(self) -> None:
        self._up = True

    def _close_all(self) -> None:
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._up:
            self.refused += 1
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        self.connections += 1
        self._writers |= {writer, up_writer}
        await asyncio.gather(
            _pump(reader, up_writer), _pump(up_reader, writer), return_exceptions=True
        )
        self._writers -= {writer, up_writer}
        for w in (writer, up_writer):
            w.close()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


def bridge_config(
    name: str,
    remote_port: int,
    topic: str,
    *,
    remote_clientid: str = BRIDGE_ID,
    protocol: str = "mqttv311",
) -> list[str]:
    """The bridge section of broker A's mosquitto.conf (see the module docstring)."""
    return [
        f"connection {name}",
        f"address 127.0.0.1:{remote_port}",
        f"topic {topic}/# both 1",
        f"topic {status_topic_root(topic)}/# both 1",
        "cleansession false",
        "local_cleansession false",
        f"remote_clientid {remote_clientid}",
        f"local_clientid local.{remote_clientid}",
        f"bridge_protocol_version {protocol}",
        "try_private true",
        "notifications true",
        "keepalive_interval 5",
        "restart_timeout 1 2",
    ]


@dataclass
class BridgingMosquitto(Mosquitto):
    """A Mosquitto whose configuration ends with bridge sections. `save_every_change`
    False saves the state every 30 minutes, as a production broker would, instead of
    after every change (what tests that kill a broker need; it costs CPU per message)."""

    bridge: list[str] = field(default_factory=list)
    save_every_change: bool = True

    def write_config(self) -> None:
        super().write_config()
        text = self.config_path.read_text()
        if not self.save_every_change:
            text = text.replace("autosave_on_changes true", "autosave_on_changes false")
            text = text.replace("autosave_interval 1\n", "autosave_interval 1800\n")
        self.config_path.write_text(text + "\n".join(self.bridge) + "\n")


@dataclass
class BridgedBrokers:
    """Broker A (bridging, through `link`) and broker B, on free loopback ports."""

    root: Path
    topic: str = "registry/events"
    protocol: str = "mqttv311"
    save_every_change: bool = True
    b: BridgingMosquitto = field(init=False)
    link: LinkProxy = field(init=False)
    a: BridgingMosquitto = field(init=False)

    def start(self) -> BridgedBrokers:
        save = self.save_every_change
        self.b = BridgingMosquitto(root=self.root / "broker-b", save_every_change=save).start()
        self.link = LinkProxy(self.b.port).start()
        bridge = bridge_config("region-b", self.link.port, self.topic, protocol=self.protocol)
        self.a = BridgingMosquitto(
            root=self.root / "broker-a", bridge=bridge, save_every_change=save
        ).start()
        self.wait_bridge(up=True)
        return self

    def stop(self) -> None:
        for part in ("a", "link", "b"):
            with contextlib.suppress(AttributeError):
                getattr(self, part).stop()

    @property
    def pids(self) -> dict[str, int]:
        """Process ids of the brokers (for CPU accounting)."""
        return {
            name: broker.proc.pid
            for name, broker in (("broker-a", self.a), ("broker-b", self.b))
            if broker.proc is not None
        }

    def bridge_state(self) -> str | None:
        """'1' while broker A's bridge is connected to B, '0' once it noticed the loss."""
        return self.a.sys_value(f"$SYS/broker/connection/{BRIDGE_ID}/state", timeout=2)

    def wait_bridge(self, *, up: bool, timeout: float = 20) -> None:
        want = "1" if up else "0"
        wait_until(
            lambda: self.bridge_state() == want,
            timeout=timeout,
            interval=0.1,
            what=f"the bridge A->B to be {'up' if up else 'down'}",
        )

    def cut(self) -> None:
        self.link.cut()
        self.wait_bridge(up=False)

    def restore(self) -> None:
        self.link.restore()
        self.wait_bridge(up=True)

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        """The link is down inside the block, back up (and the bridge reconnected) after."""
        self.cut()
        try:
            yield
        finally:
            self.restore()


def regional_daemons(
    root: Path,
    brokers: BridgedBrokers,
    sites: dict[str, Any],
    rule: dict[str, Any],
    *,
    intake_port: int,
    workers: int = 2,
    group: str = "replicators",
) -> tuple[DaemonProcess, list[DaemonProcess]]:
    """The README's regional shape, not started: the intake (site a's webhooks, no rules,
    no group) on broker A, and `workers` daemons with `rule` sharing `group` on broker B."""
    topic = brokers.topic
    intake = DaemonProcess(
        root / "intake",
        port=intake_port,
        name="intake",
        config={
            "sites": {"a": sites["a"]},
            "rules": [],
            "mqtt": {"url": brokers.a.url, "topic": topic},
        },
    )
    region_b = [
        DaemonProcess(
            root / f"worker{i}",
            name=f"worker{i}",
            config={
                "sites": sites,
                "rules": [rule],
                "mqtt": {"url": brokers.b.url, "topic": topic, "group": group},
            },
        )
        for i in range(1, workers + 1)
    ]
    return intake, region_b
