"""`status` shows every instance's queue and lag from the retained status message each
daemon publishes on the broker (`replicator.fleet`, `replicator.daemon.fleet_status`).

The end-to-end test runs two daemons as the systemd unit starts them (identity from
their journals, no client id), a real Mosquitto, and `registry-replicator status` as a
subprocess; the rest checks the pure parts and the bus on the same real broker.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from replicator.config import config_from_dict
from replicator.daemon.bus import MqttBus, RetainedMessage
from replicator.daemon.bus.retained import read_retained
from replicator.daemon.fleet_status import StatusPublisher, mqtt_settings, read_fleet
from replicator.errors import ConfigError
from replicator.events import RegistryEvent
from replicator.fleet import (
    InstanceStatus,
    fleet_view,
    format_fleet,
    status_from_json,
    status_to_json,
    status_topic_root,
)
from replicator.journal import Journal
from replicator.journal.status import QueueSummary
from replicator.status import human_age
from tests.harness.daemon import DaemonProcess, notify_kwargs, site_config
from tests.harness.images import Pusher, layer_bytes
from tests.harness.journal import sql
from tests.harness.mosquitto import Mosquitto
from tests.harness.registry import write_htpasswd
from tests.harness.util import async_wait_until, free_port, wait_until

TOPIC = "registry/events"
NOW = 1_700_000_000.0


def status_json(config: Path) -> tuple[int, dict[str, Any], str]:
    out = subprocess.run(
        [sys.executable, "-m", "replicator", "status", "-c", str(config), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return out.returncode, json.loads(out.stdout) if out.stdout else {}, out.stderr


def instances(config: Path) -> dict[str, dict[str, Any]]:
    code, payload, stderr = status_json(config)
    assert code == 0, stderr
    return {i["instance"]: i for i in payload["fleet"]["instances"]}


def journal_queue(daemon: DaemonProcess) -> dict[str, int]:
    """The daemon's queue read straight from its journal, as an operator names it."""
    found = dict(
        daemon.journal_rows(
            "SELECT CASE WHEN state='leased' THEN 'running' WHEN state='dead' THEN 'dead' "
            "WHEN last_error IS NOT NULL THEN 'retry' ELSE 'queued' END, COUNT(*) "
            "FROM tasks WHERE state IN ('pending', 'leased', 'dead') GROUP BY 1"
        )
    )
    return {k: found.get(k, 0) for k in ("queued", "running", "retry", "dead")}


def test_status_shows_both_instances_their_journal_queues_a_freeze_and_a_kill(
    registry_factory, mosquitto, tmp_path, daemons
):
    port1 = free_port()
    a = registry_factory("a", **notify_kwargs(port1, "a"))
    # `locked` wants credentials the rule's target has not: the copy fails at once (401)
    # and the task waits for a retry in the journal of the instance that planned it
    locked = registry_factory(
        "locked", htpasswd=write_htpasswd(tmp_path / "htpasswd", {"ci": "pw"})
    )
    sites = {"a": site_config(a), "locked": site_config(locked)}
    rules = [{"name": "team", "from": "a", "to": ["locked"], "repositories": ["team/**"]}]
    mqtt = {"url": mosquitto.url, "topic": TOPIC, "group": "replicators", "status_interval": "1s"}
    config = {"sites": sites, "rules": rules, "mqtt": mqtt}
    d1, d2 = (
        DaemonProcess(
            tmp_path / name, config, port=port, name=name, extra_args=["--retry-base", "600"]
        )
        for name, port in (("one", port1), ("two", free_port()))
    )
    daemons += [d1, d2]
    d1.start()
    d2.start()
    id1, id2 = d1.instance_id, d2.instance_id
    assert id1 and id2 and id1 != id2

    with Pusher(a.url) as p:
        p.push_image("team/app", "v1", [layer_bytes("fleet", 500)])
    wait_until(
        lambda: sum(journal_queue(d)["retry"] for d in (d1, d2)) == 1,
        timeout=30,
        what="the copy to the locked site failed once, in one of the journals",
    )

    def reported_as_journaled() -> dict[str, dict[str, Any]] | None:
        seen = instances(d1.config_path)
        for d, iid in ((d1, id1), (d2, id2)):
            if iid not in seen or seen[iid]["queue"] != journal_queue(d):
                return None
        return seen

    seen = wait_until(reported_as_journaled, timeout=20, what="both instances' queues in status")
    for iid in (id1, id2):
        assert seen[iid]["state"] == "online" and not seen[iid]["stale"]
        assert seen[iid]["group"] == "replicators" and seen[iid]["interval"] == 1.0
        assert seen[iid]["age_seconds"] is not None and seen[iid]["age_seconds"] <= 3
    worked = next(s for s in seen.values() if s["queue"]["retry"] == 1)
    assert worked["lag_seconds"] > 0 and worked["last_event_at"] is not None
    text = subprocess.run(
        [sys.executable, "-m", "replicator", "status", "-c", str(d2.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert text.returncode == 0, text.stderr
    assert "instances (retained status on registry/status/+): 2" in text.stdout
    rows = {line.split()[0]: line.split() for line in text.stdout.splitlines()[-2:]}
    assert set(rows) == {id1, id2} and {r[2] for r in rows.values()} == {"online"}

    # frozen (its connection stays open, so no will): silent for 3 intervals is stale
    d1.signal(signal.SIGSTOP)
    try:
        wait_until(lambda: instances(d2.config_path)[id1]["stale"], timeout=20, what="one stale")
    finally:
        d1.signal(signal.SIGCONT)
    wait_until(lambda: not instances(d2.config_path)[id1]["stale"], timeout=20, what="one back")

    # SIGKILL: the broker publishes its will
    d2.kill()
    gone = wait_until(
        lambda: (i := instances(d1.config_path)[id2])["state"] == "offline" and i,
        timeout=20,
        what="two offline",
    )
    assert gone["reason"] == "connection lost" and gone["queue"] is None
    # SIGTERM: a last message says so
    assert d1.stop() == 0
    final = instances(d1.config_path)
    assert final[id1]["state"] == "stopped" and final[id1]["queue"] == journal_queue(d1)
    assert final[id2]["state"] == "offline"
    # a status message is never taken for an event (it is not under registry/events/)
    for d in (d1, d2):
        assert "undecodable" not in d.log()


def test_status_topic_is_a_sibling_of_the_events_topic():
    assert status_topic_root("registry/events") == "registry/status"
    assert status_topic_root("/registry/events/") == "registry/status"
    assert status_topic_root("events") == "status"
    assert status_topic_root("fleet/status") == "fleet/status-status"
    assert status_topic_root("registry/events", "ops/replicators") == "ops/replicators"
    for bad in ("registry/events", "registry/events/status"):
        with pytest.raises(ValueError, match="would be delivered as events"):
            status_topic_root("registry/events", bad)


def test_a_status_topic_under_the_events_topic_is_refused_naming_the_field(tmp_path):
    base = {"sites": {"a": {"url": "http://127.0.0.1:1", "insecure": True}}, "rules": []}
    mqtt = {"url": "mqtt://127.0.0.1:1883", "topic": "registry/events"}
    with pytest.raises(ConfigError, match="mqtt") as err:
        config_from_dict({**base, "mqtt": {**mqtt, "status_topic": "registry/events/st"}})
    assert "delivered as events" in str(err.value)
    with pytest.raises(ConfigError, match="status_topic"):
        config_from_dict({**base, "mqtt": {**mqtt, "status_topic": "ops/#"}})
    with pytest.raises(ConfigError, match="status_interval"):
        config_from_dict({**base, "mqtt": {**mqtt, "status_interval": "0s"}})
    ok = config_from_dict({**base, "mqtt": mqtt}).mqtt
    assert ok is not None and ok.status_root == "registry/status" and ok.status_interval == 15


def _status(**changes: Any) -> InstanceStatus:
    fields: dict[str, Any] = {
        "instance": "eu-1-0",
        "host": "node-a",
        "version": "1.0",
        "state": "online",
        "started_at": NOW - 600,
        "interval": 15.0,
        "expiry": 604800,
        "group": "replicators",
        "published_at": NOW - 5,
        "queue": {"queued": 3, "running": 1, "retry": 2, "dead": 0},
        "oldest_unfinished_at": NOW - 125,
        "last_event_at": NOW - 65,
    }
    return InstanceStatus(**{**fields, **changes})


def test_a_status_message_round_trips_and_its_age_comes_from_the_broker_clock():
    status = _status()
    assert status_from_json(status_to_json(status)) == status
    assert status.lag_seconds == 120
    will = status.offline("connection lost")
    assert status_from_json(status_to_json(will)) == will
    assert will.queue is None and will.lag_seconds is None and will.published_at is None
    messages = [
        # the instance's clock says 5 s ago; the broker (expiry left) says 10 s
        ("registry/status/eu-1-0", status_to_json(status), 604800 - 10),
        (
            "registry/status/eu-2-0",
            status_to_json(_status(instance="eu-2-0", published_at=NOW - 50)),
            None,
        ),
        (
            "registry/status/eu-3-0",
            status_to_json(_status(instance="eu-3-0").offline("connection lost")),
            604800 - 300,
        ),
        ("registry/status/junk", b"{not json", 60),
    ]
    view = fleet_view("registry/status", messages, NOW)
    by_id = {m.status.instance: m for m in view.members}
    assert by_id["eu-1-0"].age_seconds == 10 and not by_id["eu-1-0"].stale
    assert by_id["eu-2-0"].age_seconds == 50 and by_id["eu-2-0"].stale  # > 3 x 15 s
    assert by_id["eu-3-0"].age_seconds == 300 and not by_id["eu-3-0"].stale
    assert view.unreadable and view.unreadable[0].startswith("registry/status/junk: not JSON")
    lines = format_fleet(view, human_age)
    assert lines[0] == "instances (retained status on registry/status/+): 3"
    header, one, two, three = (line.split() for line in lines[1:5])
    assert header[:3] == ["INSTANCE", "HOST", "STATE"]
    # queued running retry dead, lag, last event (seen 10 s ago + 60 s before that)
    assert one[:9] == ["eu-1-0", "node-a", "online", "3", "1", "2", "0", "2", "min"]
    assert "70 s ago" in lines[2]
    assert two[2] == "stale"
    assert three[2:7] == ["offline", "-", "-", "-", "-"] and "(connection lost)" in lines[4]
    assert "unreadable status message on registry/status/junk" in lines[-1]
    doc = view.as_dict()
    assert [i["instance"] for i in doc["instances"]] == ["eu-1-0", "eu-2-0", "eu-3-0"]
    assert doc["instances"][0]["lag_seconds"] == 120 and doc["instances"][1]["stale"]


def test_status_messages_never_reach_the_event_handler_and_hold_no_secret(tmp_path, monkeypatch):
    """On the same broker and connection: the status is retained where the reader finds
    it, the event subscription delivers only the event."""
    broker = Mosquitto(root=tmp_path / "broker", users={"svc": "s3cret-broker-pw"}).start()
    monkeypatch.setenv("BROKER_PW", "s3cret-broker-pw")
    mqtt_section = {"url": broker.url, "topic": TOPIC, "group": "g", "username": "svc"}
    cfg = config_from_dict(
        {
            "sites": {"a": {"url": "http://127.0.0.1:1", "insecure": True}},
            "rules": [],
            "mqtt": {**mqtt_section, "password_env": "BROKER_PW"},
        }
    )
    assert cfg.mqtt is not None
    mqtt = cfg.mqtt

    async def queue() -> QueueSummary:
        return QueueSummary({"queued": 4, "running": 0, "retry": 0, "dead": 1}, NOW)

    async def scenario() -> None:
        publisher = StatusPublisher(mqtt, "inst-0", queue, lambda: None)
        bus = MqttBus(mqtt_settings(mqtt, "inst-0", will=publisher.will))
        got: list[RegistryEvent] = []

        async def handler(event: RegistryEvent, _context: dict[str, str]) -> None:
            got.append(event)

        await bus.start(handler)
        try:
            await bus.wait_connected(10)
            assert await publisher.publish(bus)
            await bus.publish_retained(
                RetainedMessage(f"{TOPIC}-not-under/x", b"{}", 60), timeout=5
            )
            event = RegistryEvent(id="e1", site="a", action="push", repository="team/app", tag="v1")
            await bus.publish(event)
            await async_wait_until(lambda: _true(got), timeout=10, what="the event")
            fleet = await read_fleet(mqtt)
            assert [m.status.instance for m in fleet.members] == ["inst-0"]
            assert set(fleet.as_dict()["instances"][0]) == {
                *("instance", "host", "version", "group", "state", "reason", "started_at"),
                *("published_at", "interval", "expiry", "queue", "oldest_unfinished_at"),
                *("lag_seconds", "last_event_at", "age_seconds", "age_from", "stale"),
            }
            raw = await read_retained(mqtt_settings(mqtt, "peek"), "registry/status/+")
            assert len(raw) == 1 and b"s3cret" not in raw[0].payload
            assert b"s3cret" not in publisher.will.payload
            assert fleet.members[0].status.queue == {
                "queued": 4,
                "running": 0,
                "retry": 0,
                "dead": 1,
            }
            assert [e.id for e in got] == ["e1"]
        finally:
            await bus.stop()

    try:
        asyncio.run(scenario())
    finally:
        broker.stop()


async def _true(value: Any) -> bool:
    return bool(value)


def one_pending_task(tmp_path: Path, mqtt: dict[str, Any]) -> Path:
    """A journal holding one pending task and a config (with `mqtt`) over it; registries
    that nobody runs: what status shows of the journal needs none."""
    journal_path = tmp_path / "journal.db"
    journal = Journal(journal_path)
    sql(
        journal,
        "INSERT INTO tasks(key, rule, action, source_site, target_site, repository, "
        "target_repository, tag, state, next_try, created_at, updated_at) "
        "VALUES ('k', 'team', 'copy', 'a', 'b', 'team/app', 'team/app', 'v1', 'pending', 0, 0, 0)",
    )
    journal.close()
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "journal": str(journal_path),
                "sites": {
                    n: {"url": f"http://127.0.0.1:{free_port()}", "insecure": True} for n in "ab"
                },
                "rules": [{"name": "team", "from": "a", "to": ["b"]}],
                "mqtt": mqtt,
            }
        )
    )
    return config


def test_status_names_an_unreachable_broker_and_still_shows_the_journal(tmp_path):
    port = free_port()  # nothing listens here
    config = one_pending_task(tmp_path, {"url": f"mqtt://127.0.0.1:{port}"})
    text = subprocess.run(
        [sys.executable, "-m", "replicator", "status", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert text.returncode == 1
    assert "a -> b: lag" in text.stdout and "1 pending" in text.stdout
    unreachable = [line for line in text.stdout.splitlines() if line.startswith("instances")]
    assert unreachable == [
        next(line for line in text.stdout.splitlines() if line.startswith("instances"))
    ]
    assert f"MQTT broker 127.0.0.1:{port} unreachable" in unreachable[0]
    assert f"MQTT broker 127.0.0.1:{port} unreachable" in text.stderr
    code, payload, _ = status_json(config)
    assert code == 1 and payload["pending"] == 1 and "fleet" not in payload
    assert f"127.0.0.1:{port} unreachable" in payload["fleet_error"]
    journal_only = subprocess.run(
        [sys.executable, "-m", "replicator", "status", "-c", str(config), "--no-instances"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert journal_only.returncode == 0 and "instances" not in journal_only.stdout


def test_an_instance_publishes_again_at_once_when_its_broker_comes_back(
    mosquitto: Mosquitto,
):
    """The interval is long: only the new connection can explain the new message. A
    broker restart is where a will may have been published meanwhile."""
    cfg = config_from_dict(
        {
            "sites": {"a": {"url": "http://127.0.0.1:1", "insecure": True}},
            "rules": [],
            "mqtt": {"url": mosquitto.url, "topic": TOPIC, "status_interval": "10m"},
        }
    )
    assert cfg.mqtt is not None
    mqtt = cfg.mqtt

    async def queue() -> QueueSummary:
        return QueueSummary({"queued": 0, "running": 0, "retry": 0, "dead": 0}, None)

    async def published_at() -> float | None:
        fleet = await read_fleet(mqtt)
        return fleet.members[0].status.published_at if fleet.members else None

    async def scenario() -> None:
        publisher = StatusPublisher(mqtt, "inst-0", queue, lambda: None)
        bus = MqttBus(mqtt_settings(mqtt, "inst-0", will=publisher.will))
        loop = asyncio.create_task(publisher.loop(bus))
        try:
            first = await async_wait_until(published_at, timeout=10, what="the first status")
            await asyncio.to_thread(mosquitto.restart, kill=True)
            await async_wait_until(
                lambda: _newer(published_at, first), timeout=15, what="a status after reconnecting"
            )
            assert bus.connections >= 2
        finally:
            loop.cancel()
            await asyncio.gather(loop, return_exceptions=True)
            await bus.stop()

    asyncio.run(scenario())


async def _newer(read: Any, than: float) -> bool:
    value = await read()
    return value is not None and value > than


def test_the_queue_an_instance_reports_is_its_journal_s_unfinished_work(tmp_path):
    journal = Journal(tmp_path / "journal.db")
    for n, (state, error, created) in enumerate(
        [
            ("pending", None, NOW - 30),  # queued
            ("pending", "503 from b", NOW - 400),  # retry: waiting out its backoff
            ("leased", None, NOW - 90),  # running
            ("dead", "gave up", NOW - 9000),  # dead: counted, but not lag
            ("done", None, NOW - 8000),  # finished: neither
        ]
    ):
        sql(
            journal,
            "INSERT INTO tasks(key, rule, action, source_site, target_site, repository, "
            "target_repository, tag, state, last_error, next_try, created_at, updated_at) "
            "VALUES (?, 'team', 'copy', 'a', 'b', 'team/app', 'team/app', 'v1', ?, ?, 0, ?, ?)",
            (f"k{n}", state, error, created, created),
        )
    try:
        summary = asyncio.run(journal.status.queue_summary())
    finally:
        journal.close()
    assert dict(summary.counts) == {"queued": 1, "running": 1, "retry": 1, "dead": 1}
    assert summary.oldest_unfinished_at == NOW - 400
