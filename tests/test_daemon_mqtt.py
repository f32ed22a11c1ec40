"""The daemon's MQTT fabric end to end: real registries, a real Mosquitto, real daemon
processes. Each daemon has its own journal; the journals are read directly (SQLite WAL
allows a reader next to the writer) to tell which instance did what.

To prove an event travelled over the broker, the registry notifies one daemon (the
"intake" instance) whose rules do not cover the repository, while a second daemon that
receives no webhooks at all holds the rule: only the broker can have told it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness.daemon import DaemonProcess, image_complete, notify_kwargs, site_config
from tests.harness.images import Pusher, layer_bytes
from tests.harness.mosquitto import Mosquitto
from tests.harness.tls import TlsMosquitto, make_pki
from tests.harness.util import free_port, wait_until

TOPIC = "registry/events"


def rows(daemon: DaemonProcess, sql: str, params: tuple = ()) -> list[tuple]:
    return daemon.journal_rows(sql, params)


def ready(daemon: DaemonProcess) -> bool:
    """/readyz is 200 only once the bus is connected -- and subscribed, since the
    subscription is made before the connection is published as usable."""
    daemon.healthy()  # raises if the process died
    try:
        return httpx.get(f"{daemon.url}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def start(daemon: DaemonProcess) -> DaemonProcess:
    daemon.start()
    wait_until(lambda: ready(daemon), timeout=20, what=f"{daemon.name} subscribed")
    return daemon


def mqtt_daemon(
    tmp_path: Path,
    broker: Mosquitto,
    instance: str,
    sites: dict[str, Any],
    rules: list[dict[str, Any]],
    *,
    group: str | None = None,
    port: int | None = None,
) -> DaemonProcess:
    """A daemon as the unit runs it: no client id, so its identity (and MQTT session) is
    the one its journal gives it; `instance` only names its directory."""
    mqtt: dict[str, Any] = {"url": broker.url, "topic": TOPIC}
    if group:
        mqtt["group"] = group
    return DaemonProcess(
        tmp_path / instance,
        port=port or free_port(),
        name=instance,
        config={"sites": sites, "rules": rules, "mqtt": mqtt},
    )


@pytest.fixture
def intake_and_worker(registry_factory, mosquitto, tmp_path, daemons):
    """Registry a notifies only `intake`, whose rule covers other/** alone; `worker` gets no
    webhooks but holds the rule for team/** (a -> b). Neither reconciles periodically."""
    intake_port = free_port()
    a = registry_factory("a", **notify_kwargs(intake_port, "a"))
    b = registry_factory("b")
    sites = {"a": site_config(a), "b": site_config(b)}
    intake = mqtt_daemon(
        tmp_path,
        mosquitto,
        "intake",
        sites,
        [{"name": "elsewhere", "from": "a", "to": ["b"], "repositories": ["other/**"]}],
        port=intake_port,
    )
    worker = mqtt_daemon(
        tmp_path,
        mosquitto,
        "worker",
        sites,
        [{"name": "team", "from": "a", "to": ["b"], "repositories": ["team/**"]}],
    )
    daemons += [worker, intake]
    return a, b, intake, worker


def test_events_travel_between_daemons_over_the_broker(intake_and_worker):
    a, b, intake, worker = intake_and_worker
    start(worker)
    start(intake)
    with Pusher(a.url) as p:
        img = p.push_image("team/app", "v1", [layer_bytes("mqtt-hop", 2000)])
    wait_until(
        lambda: image_complete(b, "team/app", "v1", img.digest),
        timeout=30,
        what="team/app:v1 replicated by the worker",
    )

    # the worker never received a webhook: its events table is empty ...
    assert rows(worker, "SELECT COUNT(*) FROM events") == [(0,)]
    # ... yet it ran the copy, for the very event the intake journaled and published
    done = rows(worker, "SELECT event_id, state, tag, digest FROM tasks")
    assert [(state, tag, digest) for _, state, tag, digest in done] == [("done", "v1", img.digest)]
    # (marked 'dispatched' asynchronously after the broker's PUBACK, so poll)
    wait_until(
        lambda: (
            rows(intake, "SELECT id, state FROM events WHERE is_manifest=1 AND tag='v1'")
            == [(done[0][0], "dispatched")]
        ),
        timeout=10,
        what="the intake's event, published, is the one the worker copied",
    )
    # and the intake, whose rules do not cover team/**, made no task of it
    assert rows(intake, "SELECT COUNT(*) FROM tasks") == [(0,)]


def test_a_killed_daemon_gets_what_was_published_meanwhile_from_its_session(intake_and_worker):
    a, b, intake, worker = intake_and_worker
    start(worker)
    start(intake)
    worker.kill()  # SIGKILL: no goodbye to the broker; the persistent session stays
    pushed = {}
    with Pusher(a.url) as p:
        for i in range(5):
            pushed[f"v{i}"] = p.push_image(
                "team/missed", f"v{i}", [layer_bytes(f"missed{i}", 1500)]
            ).digest

    def all_published() -> bool:
        got = rows(
            intake,
            "SELECT COUNT(*) FROM events WHERE is_manifest=1 AND "
            "repository='team/missed' AND state='dispatched'",
        )
        return got == [(len(pushed),)]

    wait_until(all_published, timeout=30, what="the intake published every push")
    with Pusher(b.url) as p:
        assert p.tags("team/missed") == []  # nobody replicated while the worker was down
    start(worker)  # same client id: resumes its session and drains the queued messages
    for tag, digest in pushed.items():
        wait_until(
            lambda t=tag, d=digest: image_complete(b, "team/missed", t, d),
            timeout=30,
            what=f"team/missed:{tag} after the worker came back",
        )
    assert rows(worker, "SELECT COUNT(*) FROM events") == [(0,)]
    assert sorted(rows(worker, "SELECT tag, state FROM tasks")) == [
        (tag, "done") for tag in sorted(pushed)
    ]


def test_a_shared_group_splits_the_work_without_duplicates(
    registry_factory, mosquitto, tmp_path, daemons
):
    port1 = free_port()
    a = registry_factory("a", **notify_kwargs(port1, "a"))
    b = registry_factory("b")
    sites = {"a": site_config(a), "b": site_config(b)}
    rules = [{"name": "team", "from": "a", "to": ["b"], "repositories": ["team/**"]}]
    d1 = mqtt_daemon(tmp_path, mosquitto, "member-1", sites, rules, group="replicators", port=port1)
    d2 = mqtt_daemon(tmp_path, mosquitto, "member-2", sites, rules, group="replicators")
    daemons += [d1, d2]
    start(d1)
    start(d2)
    n = 16
    pushed = {}
    with Pusher(a.url) as p:
        for i in range(n):
            pushed[f"v{i}"] = p.push_image(
                "team/shared", f"v{i}", [layer_bytes(f"shared{i}", 1200)]
            ).digest
    for tag, digest in pushed.items():
        wait_until(
            lambda t=tag, d=digest: image_complete(b, "team/shared", t, d),
            timeout=40,
            what=f"team/shared:{tag} on b",
        )

    share1 = rows(d1, "SELECT tag, state FROM tasks")
    share2 = rows(d2, "SELECT tag, state FROM tasks")
    tags1, tags2 = [t for t, _ in share1], [t for t, _ in share2]
    assert tags1 and tags2, f"one member did all the work: {len(tags1)} / {len(tags2)}"
    assert len(tags1) + len(tags2) == n
    assert not set(tags1) & set(tags2), "an event was handled by both members"
    assert set(tags1) | set(tags2) == set(pushed)
    assert {s for _, s in share1 + share2} == {"done"}
    # only member-1 is notified by the registry, yet member-2 worked: via the broker
    assert rows(d2, "SELECT COUNT(*) FROM events") == [(0,)]


def test_a_restarted_group_member_resumes_its_own_session_and_loses_nothing(
    registry_factory, mosquitto, tmp_path, daemons
):
    """Issue 12 item 9. With a shared group and no client id, a member restarted (as
    `systemctl restart` does) must come back as the same MQTT client: under a new id, its
    old persistent session stays in the group and the broker keeps queueing that
    session's share of the events for nobody."""
    port1 = free_port()
    a = registry_factory("a", **notify_kwargs(port1, "a"))
    b = registry_factory("b")
    sites = {"a": site_config(a), "b": site_config(b)}
    rules = [{"name": "team", "from": "a", "to": ["b"], "repositories": ["team/**"]}]
    d1 = mqtt_daemon(tmp_path, mosquitto, "member-1", sites, rules, group="replicators", port=port1)
    d2 = mqtt_daemon(tmp_path, mosquitto, "member-2", sites, rules, group="replicators")
    daemons += [d1, d2]
    start(d1)
    start(d2)
    before = d2.instance_id
    assert before and before != d1.instance_id
    d2.kill()
    start(d2)
    pushed = {}
    with Pusher(a.url) as p:
        for i in range(12):
            pushed[f"v{i}"] = p.push_image(
                "team/regroup", f"v{i}", [layer_bytes(f"regroup{i}", 1200)]
            ).digest
    for tag, digest in pushed.items():
        wait_until(
            lambda t=tag, d=digest: image_complete(b, "team/regroup", t, d),
            timeout=40,
            what=f"team/regroup:{tag} on b (lost to an orphaned session?)",
        )
    tags1 = [t for (t,) in rows(d1, "SELECT tag FROM tasks")]
    tags2 = [t for (t,) in rows(d2, "SELECT tag FROM tasks")]
    assert sorted(tags1 + tags2) == sorted(pushed)
    assert tags2, "the restarted member got no share of the group's events"
    assert d2.instance_id == before
    # under a new id, the old session would stay in the group, offline, taking its share
    wait_until(lambda: mosquitto.offline_sessions() == 0, timeout=15, what="no orphaned session")


def test_replacing_a_machine_as_the_readme_says_leaves_no_orphaned_session(
    registry_factory, mosquitto, tmp_path, daemons
):
    """The README's two ways to replace a group member for good: move its journal (the
    new machine is the same instance and resumes its session), or start afresh and end
    the old session under its id; either way no offline session keeps a share."""
    port1 = free_port()
    a = registry_factory("a", **notify_kwargs(port1, "a"))
    b = registry_factory("b")
    sites = {"a": site_config(a), "b": site_config(b)}
    rules = [{"name": "team", "from": "a", "to": ["b"], "repositories": ["team/**"]}]
    d1 = mqtt_daemon(tmp_path, mosquitto, "member", sites, rules, group="g", port=port1)
    old = mqtt_daemon(tmp_path, mosquitto, "old-machine", sites, rules, group="g")
    daemons += [d1, old]
    start(d1)
    start(old)
    old_id = old.instance_id
    old.stop()  # decommissioned; its persistent session stays with the broker
    wait_until(lambda: mosquitto.offline_sessions() == 1, timeout=15, what="the old session")

    moved = mqtt_daemon(tmp_path, mosquitto, "new-machine", sites, rules, group="g")
    moved.root.mkdir(parents=True)
    shutil.copy(old.journal_path, moved.journal_path)
    daemons.append(moved)
    start(moved)
    assert moved.instance_id == old_id
    wait_until(lambda: mosquitto.offline_sessions() == 0, timeout=15, what="the session resumed")
    moved.stop()

    fresh = mqtt_daemon(tmp_path, mosquitto, "fresh-machine", sites, rules, group="g")
    daemons.append(fresh)
    start(fresh)
    assert fresh.instance_id != old_id
    wait_until(lambda: mosquitto.offline_sessions() == 1, timeout=15, what="the orphan")
    assert old_id is not None
    mosquitto.end_session(old_id)
    wait_until(lambda: mosquitto.offline_sessions() == 0, timeout=15, what="the orphan gone")
    pushed = {}
    with Pusher(a.url) as p:
        for i in range(3):
            pushed[f"v{i}"] = p.push_image(
                "team/replaced", f"v{i}", [layer_bytes(f"replaced{i}", 1200)]
            ).digest
    for tag, digest in pushed.items():
        wait_until(
            lambda t=tag, d=digest: image_complete(b, "team/replaced", t, d),
            timeout=30,
            what=f"team/replaced:{tag} on b",
        )


def test_broker_restarted_mid_stream_loses_nothing(registry_factory, mosquitto, tmp_path, daemons):
    port = free_port()
    a = registry_factory("a", **notify_kwargs(port, "a"))
    b = registry_factory("b")
    sites = {"a": site_config(a), "b": site_config(b)}
    daemon = mqtt_daemon(
        tmp_path,
        mosquitto,
        "solo",
        sites,
        [{"name": "team", "from": "a", "to": ["b"], "repositories": ["team/**"]}],
        port=port,
    )
    daemons.append(daemon)
    start(daemon)
    pushed: dict[str, str] = {}
    with Pusher(a.url) as p:

        def push(i: int) -> None:
            pushed[f"v{i}"] = p.push_image(
                "team/restart", f"v{i}", [layer_bytes(f"restart{i}", 1500)]
            ).digest

        for i in range(4):
            push(i)
        mosquitto.stop(kill=True)  # abrupt: in-flight PUBACKs and deliveries are lost
        for i in range(4, 8):
            push(i)  # webhooks arrive while there is no broker
        # the intake journals them but cannot publish: they stay 'new', unanswered
        wait_until(
            lambda: rows(daemon, "SELECT COUNT(*) FROM events WHERE state='new'")[0][0] >= 1,
            timeout=20,
            what="an event journaled during the outage",
        )
        assert not ready(daemon)
        mosquitto.restart()  # persistent state: sessions and queued messages
        for i in range(8, 12):
            push(i)
    for tag, digest in pushed.items():
        wait_until(
            lambda t=tag, d=digest: image_complete(b, "team/restart", t, d),
            timeout=45,
            what=f"team/restart:{tag} on b",
        )
    assert sorted(rows(daemon, "SELECT DISTINCT tag FROM tasks WHERE state='done'")) == [
        (t,) for t in sorted(pushed)
    ]
    # every journaled event ends up published (marking is asynchronous, so poll)
    wait_until(
        lambda: rows(daemon, "SELECT COUNT(*) FROM events WHERE state='new'") == [(0,)],
        timeout=10,
        what="no event left unpublished",
    )
    assert "reconnected to MQTT broker" in daemon.log()


def test_the_daemon_connects_with_the_configured_tls_ca_and_client_certificate(tmp_path, daemons):
    """mqtt.tls reaches the bus: the broker wants a client certificate from our private
    CA, and /readyz is 200 only once the daemon is connected and subscribed."""
    pki = make_pki(tmp_path / "pki")
    broker = TlsMosquitto(root=tmp_path / "tls-broker", pki=pki, require_client_cert=True)
    broker.start()
    try:
        # no registry is contacted: sites only need to be valid
        sites = {
            name: {"url": f"http://127.0.0.1:{free_port()}", "insecure": True}
            for name in ("a", "b")
        }
        daemon = mqtt_daemon(
            tmp_path,
            broker,
            "tls-member",
            sites,
            [{"name": "team", "from": "a", "to": ["b"], "repositories": ["team/**"]}],
        )
        daemon.config["mqtt"]["tls"] = {
            "ca": str(pki.ca),
            "cert": str(pki.client_cert),
            "key": str(pki.client_key),
        }
        daemons.append(daemon)
        start(daemon)
        assert "connected to MQTT broker 127.0.0.1" in daemon.log()
    finally:
        broker.stop()
