"""The regional topology over bridged brokers (README "Regions: bridged brokers").

Region A: registry a (the source) notifies the intake daemon, connected to broker A.
Region B: two worker daemons, connected to broker B, share a group and copy a -> b.
Broker A bridges the event topic tree to B through a link the test can cut. The
daemons run as the systemd unit runs them (no instance or client id: each identity
comes from its own journal). The intake has no rules: it journals and publishes,
and the events it gets back from broker A plan nothing.

Duplicates are counted on the wire: a proxy in front of registry b records every
manifest PUT the workers make.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.harness.daemon import DaemonProcess, image_complete, notify_kwargs, site_config
from tests.harness.fault_proxy import FaultProxy
from tests.harness.images import Pusher, layer_bytes
from tests.harness.mqtt_bridge import (
    BridgedBrokers,
    BridgingMosquitto,
    bridge_config,
    regional_daemons,
)
from tests.harness.util import free_port, wait_until

TOPIC = "registry/events"
GROUP = "replicators"
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture
def brokers(tmp_path: Path) -> Iterator[BridgedBrokers]:
    bridged = BridgedBrokers(tmp_path / "brokers", topic=TOPIC).start()
    yield bridged
    bridged.stop()


def ready(daemon: DaemonProcess) -> bool:
    """/readyz is 200 once the daemon is connected to its broker and subscribed."""
    daemon.healthy()
    try:
        return httpx.get(f"{daemon.url}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def regional(
    tmp_path: Path,
    brokers: BridgedBrokers,
    registry_factory: Any,
    proxy_factory: Any,
    workers: int = 2,
    interval: str | None = None,
) -> tuple[Any, Any, FaultProxy, DaemonProcess, list[DaemonProcess]]:
    intake_port = free_port()
    a = registry_factory("a", **notify_kwargs(intake_port, "a"))
    b = registry_factory("b")
    b_wire = proxy_factory(b)
    sites = {"a": site_config(a), "b": site_config(b, url=b_wire.url)}
    rule = {"name": "a-to-b", "from": "a", "to": ["b"], "repositories": ["team/**"]}
    if interval:
        rule["interval"] = interval
    intake, region_b = regional_daemons(
        tmp_path, brokers, sites, rule, intake_port=intake_port, workers=workers, group=GROUP
    )
    return a, b, b_wire, intake, region_b


def push(a_url: str, names: list[str]) -> dict[str, str]:
    with Pusher(a_url) as p:
        return {
            name: p.push_image(f"team/{name}", "v1", [layer_bytes(f"bridge-{name}", 1500)]).digest
            for name in names
        }


def test_bridge_outage_loses_nothing_and_duplicates_nothing(
    tmp_path, brokers, registry_factory, proxy_factory, daemons
):
    a, b, b_wire, intake, workers = regional(tmp_path, brokers, registry_factory, proxy_factory)
    daemons += [*workers, intake]
    for daemon in [*workers, intake]:
        daemon.start()
    for daemon in [*workers, intake]:
        wait_until(lambda d=daemon: ready(d), timeout=20, what=f"{daemon.name} subscribed")

    before = push(a.url, ["app0", "app1", "app2"])
    for name, digest in before.items():
        wait_until(
            lambda n=name, d=digest: image_complete(b, f"team/{n}", "v1", d),
            timeout=30,
            what=f"team/{name}:v1 at b before the outage",
        )

    with brokers.outage():
        during = push(a.url, ["app3", "app4", "app5"])
        # the intake has them durable at broker A (dispatched = PUBACK received) ...
        published = (
            "SELECT repository FROM events WHERE action='push' AND tag='v1' AND state='dispatched'"
        )
        wait_until(
            lambda: {r for (r,) in intake.journal_rows(published)} >= {f"team/{n}" for n in during},
            timeout=15,
            what="the intake to publish the outage's manifest events to broker A",
        )
        # ... and none can have crossed the cut link
        assert not any(image_complete(b, f"team/{n}", "v1") for n in during)
        assert brokers.bridge_state() == "0"

    for name, digest in during.items():
        wait_until(
            lambda n=name, d=digest: image_complete(b, f"team/{n}", "v1", d),
            timeout=30,
            what=f"team/{name}:v1 at b after the outage",
        )

    # once each on the wire, however many times the bridge delivered the event
    puts = Counter(r.path for r in b_wire.records if r.method == "PUT" and "/manifests/" in r.path)
    assert puts == {f"/v2/team/{n}/manifests/v1": 1 for n in [*before, *during]}
    # every copy task ran in region B, each image in exactly one worker's journal
    done = Counter(
        repo
        for w in workers
        for (repo,) in w.journal_rows("SELECT repository FROM tasks WHERE state='done'")
    )
    assert done == {f"team/{n}": 1 for n in [*before, *during]}
    assert intake.journal_rows("SELECT COUNT(*) FROM tasks") == [(0,)]
    assert all(w.journal_rows("SELECT COUNT(*) FROM events") == [(0,)] for w in workers)

    # `status` in region A lists the region-B workers too: their retained status
    # messages cross the bridge like the events do
    def fleet() -> dict[str, dict[str, Any]]:
        out = subprocess.run(
            [sys.executable, "-m", "replicator", "status", "-c", str(intake.config_path), "--json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        return {i["instance"]: i for i in json.loads(out.stdout)["fleet"]["instances"]}

    def all_three() -> dict[str, dict[str, Any]] | None:
        found = fleet()
        return found if len(found) == 3 else None

    seen = wait_until(
        all_three,
        timeout=20,
        what="the intake and both workers in status at broker A",
    )
    assert sorted(i.get("group") or "" for i in seen.values()) == ["", GROUP, GROUP]
    assert {i["state"] for i in seen.values()} == {"online"}


def test_a_worker_lost_for_good_is_repaired_by_the_next_reconcile_of_a_survivor(
    tmp_path, brokers, registry_factory, proxy_factory, daemons
):
    """Worker 2's machine is gone (SIGKILL, never restarted): its session at broker B
    stays in the group and keeps taking its share of the events, which nobody handles.
    The first reconcile of worker 1 that starts after the pushes copies them all (the
    README's bound: one interval + jitter + two reconcile runs)."""
    a, b, _wire, intake, (survivor, lost) = regional(
        tmp_path, brokers, registry_factory, proxy_factory, interval="2s"
    )
    daemons += [survivor, lost, intake]
    for daemon in (survivor, lost, intake):
        daemon.start()
    for daemon in (survivor, lost, intake):
        wait_until(lambda d=daemon: ready(d), timeout=20, what=f"{daemon.name} subscribed")
    lost.kill()

    pushed = push(a.url, ["app0", "app1", "app2", "app3"])
    pushed_at = time.time()
    runs_since = "SELECT COUNT(*) FROM sync_runs WHERE state='done' AND started_at > ?"
    wait_until(
        lambda: survivor.journal_rows(runs_since, (pushed_at,)) != [(0,)],
        timeout=30,
        what="a reconcile of the survivor that started after the pushes",
    )
    assert all(image_complete(b, f"team/{n}", "v1", d) for n, d in pushed.items())
    by_event = {r for (r,) in survivor.journal_rows("SELECT repository FROM tasks")}
    assert {f"team/{n}" for n in pushed} - by_event, "the lost session took no share"


# --- why the bridge speaks MQTT v3.1.1 ------------------------------------------------


class _Subscriber:
    """A persistent MQTT v5 session (as the daemons use) recording what it receives."""

    def __init__(self, port: int, client_id: str, topic: str) -> None:
        self.got: list[str] = []
        self._lock = threading.Lock()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id, protocol=paho.MQTTv5)
        subscribed = threading.Event()
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.client.connect("127.0.0.1", port, clean_start=False, properties=props)
        self.client.loop_start()
        assert subscribed.wait(10), f"{client_id} could not subscribe to {topic}"

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        with self._lock:
            self.got.append(msg.payload.decode())

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _publish(port: int, topic: str, payloads: list[str]) -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        for payload in payloads:
            client.publish(topic, payload, qos=1).wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()


def _outage_delivery(root: Path, protocol: str) -> set[str]:
    """What a subscriber on broker A receives of messages published on broker B while
    the link was cut: they travel B -> A in the bridge's session at B."""
    brokers = BridgedBrokers(root, topic=TOPIC, protocol=protocol).start()
    sub = _Subscriber(brokers.a.port, "region-a-listener", f"{TOPIC}/#")
    try:
        _publish(brokers.b.port, f"{TOPIC}/b/probe", ["before"])
        wait_until(lambda: "before" in sub.got, timeout=10, what="a message across the bridge")
        with brokers.outage():
            _publish(brokers.b.port, f"{TOPIC}/b/probe", ["during-1", "during-2"])
        _publish(brokers.b.port, f"{TOPIC}/b/probe", ["after"])
        # QoS 1 keeps one session's order: whatever queued during the outage is
        # delivered before 'after', or was dropped
        wait_until(lambda: "after" in sub.got, timeout=15, what="a message after the outage")
        return set(sub.got)
    finally:
        sub.close()
        brokers.stop()


def test_a_v311_bridge_keeps_its_remote_session_a_v5_bridge_loses_it(tmp_path):
    """mosquitto's v5 bridge sends no Session Expiry Interval: the remote broker ends
    its session when the link drops (eclipse-mosquitto/mosquitto#2424), and what queued
    there for the bridge is gone. If the v5 half starts failing, mosquitto fixed it and
    the bridge may move to mqttv50. Both pairs run at once (an outage takes seconds)."""
    with ThreadPoolExecutor(2) as pool:
        v311, v5 = pool.map(lambda p: _outage_delivery(tmp_path / p, p), ["mqttv311", "mqttv50"])
    assert {"before", "during-1", "during-2", "after"} <= v311
    assert {"before", "after"} <= v5
    assert not {"during-1", "during-2"} & v5


def test_the_readme_shows_the_bridge_the_tests_run(tmp_path):
    """The README's broker A snippet is the configuration tested here (but the address)."""
    section = README.read_text().split("### Regions: bridged brokers", 1)[1]
    block = section.split("```text\n", 1)[1].split("```", 1)[0]
    shown = [line for line in block.splitlines() if line and not line.startswith("address ")]
    tested = [line for line in bridge_config("region-b", 1883, TOPIC) if "address" not in line]
    assert shown[shown.index("connection region-b") :] == tested
    broker = BridgingMosquitto(root=tmp_path / "a", bridge=bridge_config("region-b", 1, TOPIC))
    broker.write_config()
    written = broker.config_path.read_text().splitlines()
    assert {"persistence true", "max_queued_messages 100000"} <= set(written)
    assert {"persistence true", "max_queued_messages 100000"} <= set(shown)
