"""The daemon end to end: real registries notify a real daemon process, which replicates.

Completion is always polled with a deadline, never slept for.
"""

from __future__ import annotations

import json
import signal
import socket
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.harness.daemon import DaemonProcess, image_complete, notify_kwargs, site_config
from tests.harness.images import Pusher, layer_bytes
from tests.harness.util import free_port, wait_until


@pytest.fixture
def hub(registry_factory, tmp_path):
    """Primary A notifying a daemon that replicates team/** to B and C."""
    port = free_port()
    a = registry_factory("a", **notify_kwargs(port, "a"))
    b = registry_factory("b", **notify_kwargs(port, "b"))
    c = registry_factory("c", **notify_kwargs(port, "c"))
    daemon = DaemonProcess(
        tmp_path / "d",
        port=port,
        config={
            "sites": {"a": site_config(a), "b": site_config(b), "c": site_config(c)},
            "rules": [
                {
                    "name": "hub",
                    "from": "a",
                    "to": ["b", "c"],
                    "repositories": ["team/**"],
                    "deletes": True,
                }
            ],
        },
    )
    yield a, b, c, daemon
    daemon.stop()


def test_push_to_primary_arrives_complete_on_both_replicas(hub):
    a, b, c, daemon = hub
    daemon.start()
    with Pusher(a.url) as p:
        img = p.push_image(
            "team/app", "v1", [layer_bytes("base", 50_000), layer_bytes("app", 1000)]
        )
        idx = p.push_multiarch("team/multi", "v2", "m")
        p.push_image("other/skip", "v1", [layer_bytes("x", 10)])
    for reg in (b, c):
        wait_until(
            lambda r=reg: image_complete(r, "team/app", "v1", img.digest),
            timeout=30,
            what=f"team/app:v1 on {reg.url}",
        )
        wait_until(
            lambda r=reg: image_complete(r, "team/multi", "v2", idx.digest),
            timeout=30,
            what=f"team/multi:v2 on {reg.url}",
        )
    with Pusher(b.url) as p:
        assert p.tags("other/skip") == []
    # the webhook's push time is in the inventory, for retention policies
    rows = daemon.journal_rows(
        "SELECT digest, pushed_at FROM inventory_tags WHERE site = 'a' "
        "AND repository = 'team/app' AND tag = 'v1'"
    )
    assert rows and rows[0][0] == img.digest and rows[0][1] is not None
    # a manifest delete at the primary propagates (rule has deletes: true)
    with Pusher(a.url) as p:
        assert p.http.delete(f"{a.url}/v2/team/app/manifests/{img.digest}").status_code == 202
    for reg in (b, c):
        wait_until(
            lambda r=reg: Pusher(r.url).get_manifest("team/app", "v1").status_code == 404,
            timeout=30,
            what="delete propagated",
        )
    assert (
        daemon.journal_rows(
            "SELECT tag FROM inventory_tags WHERE site = 'a' AND repository = 'team/app'"
        )
        == []
    )
    metrics = daemon.metrics()
    assert 'registry_replicator_events_received_total{action="push",site="a"}' in metrics
    assert 'registry_replicator_blobs_total{outcome="uploaded",target="b"}' in metrics
    assert daemon.stop() == 0


def test_sigkill_mid_stream_then_restart_loses_nothing(hub):
    a, b, c, daemon = hub
    daemon.start()
    pushed = {}
    with Pusher(a.url) as p:
        for i in range(12):
            if i == 4:
                daemon.kill()  # registries keep retrying their notifications meanwhile
            pushed[f"v{i}"] = p.push_image(
                "team/burst", f"v{i}", [layer_bytes(f"burst{i}", 200_000)]
            ).digest
    daemon.start()
    for reg in (b, c):
        for tag, digest in pushed.items():
            wait_until(
                lambda r=reg, t=tag, d=digest: image_complete(r, "team/burst", t, d),
                timeout=60,
                what=f"team/burst:{tag} on {reg.url}",
            )


def test_target_down_for_a_while_then_everything_arrives(hub):
    a, b, c, daemon = hub
    daemon.start()
    b.stop()
    with Pusher(a.url) as p:
        img = p.push_image("team/late", "v1", [layer_bytes("late", 1000)])
    wait_until(lambda: image_complete(c, "team/late", "v1", img.digest), timeout=30, what="c")
    b.start()
    wait_until(
        lambda: image_complete(b, "team/late", "v1", img.digest),
        timeout=60,
        what="b after it came back",
    )


def test_mesh_does_not_loop(registry_factory, tmp_path):
    port = free_port()
    a = registry_factory("a", **notify_kwargs(port, "a"))
    b = registry_factory("b", **notify_kwargs(port, "b"))
    daemon = DaemonProcess(
        tmp_path / "d",
        port=port,
        config={
            "sites": {"a": site_config(a), "b": site_config(b)},
            "rules": [
                {"name": "ab", "from": "a", "to": ["b"]},
                {"name": "ba", "from": "b", "to": ["a"]},
            ],
        },
    )
    daemon.start()
    try:
        with Pusher(a.url) as p:
            from_a = p.push_image("team/x", "v1", [layer_bytes("from-a", 100)])
        with Pusher(b.url) as p:
            from_b = p.push_image("team/y", "v1", [layer_bytes("from-b", 100)])
        wait_until(lambda: image_complete(b, "team/x", "v1", from_a.digest), timeout=30)
        wait_until(lambda: image_complete(a, "team/y", "v1", from_b.digest), timeout=30)
        # settle: no task keeps bouncing between the sites
        wait_until(
            lambda: (
                daemon.journal_rows(
                    "SELECT COUNT(*) FROM tasks WHERE state IN ('pending','leased')"
                )[0][0]
                == 0
            ),
            timeout=20,
            what="queue drained",
        )
        total = daemon.journal_rows("SELECT COUNT(*) FROM tasks")[0][0]
        assert total == 2, f"{total} tasks: replication bounced between the sites"
    finally:
        daemon.stop()


def test_sigterm_exits_zero_within_10s_and_notify_protocol(hub, tmp_path):
    *_, daemon = hub
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(20)
    daemon.env = {"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "1000000"}
    try:
        daemon.start(wait=False)
        messages = []
        deadline = time.monotonic() + 20
        while not any("READY=1" in m for m in messages) and time.monotonic() < deadline:
            messages.append(sock.recv(4096).decode())
        assert any("READY=1" in m for m in messages), messages
        # the watchdog pings at half of WATCHDOG_USEC
        while not any("WATCHDOG=1" in m for m in messages):
            messages.append(sock.recv(4096).decode())
        start = time.monotonic()
        daemon.signal(signal.SIGTERM)
        assert daemon.proc.wait(timeout=10) == 0
        assert time.monotonic() - start < 10
        sock.settimeout(1)
        while True:
            try:
                messages.append(sock.recv(4096).decode())
            except TimeoutError:
                break
        assert any("STOPPING=1" in m for m in messages)
    finally:
        sock.close()


def test_bad_webhooks_get_4xx_and_daemon_stays_healthy(hub):
    *_, daemon = hub
    daemon.start()
    url = f"{daemon.url}/events/a"
    good = {
        "Authorization": "Bearer hook-token-for-tests",
        "Content-Type": "application/vnd.docker.distribution.events.v1+json",
    }
    cases = [
        (url, {**good, "Authorization": "Bearer wrong"}, b'{"events":[]}', 401),
        (f"{daemon.url}/events/nope", good, b'{"events":[]}', 401),
        (url, good, b"{not json", 400),
        (url, {**good, "Content-Type": "text/plain"}, b"hello", 415),
        (url, good, b'{"events":[' + b"0," * 600_000 + b"0]}", 413),
    ]
    for target, headers, body, status in cases:
        assert httpx.post(target, headers=headers, content=body).status_code == status
    assert httpx.get(f"{daemon.url}/healthz").status_code == 200
    assert httpx.get(f"{daemon.url}/readyz").status_code == 200


def test_sighup_reload_keeps_running_and_refuses_a_bad_file(hub):
    a, b, _c, daemon = hub
    daemon.start()
    good = daemon.config_path.read_text()
    daemon.config_path.write_text(good + "\nbogus_key: 1\n")
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: "reload refused" in daemon.log(), timeout=10, what="refusal logged")
    daemon.config_path.write_text(good.replace("team/**", "other/**"))
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: "configuration reloaded" in daemon.log(), timeout=10)
    with Pusher(a.url) as p:
        img = p.push_image("other/now", "v1", [layer_bytes("now", 100)])
    wait_until(lambda: image_complete(b, "other/now", "v1", img.digest), timeout=30)


def test_a_scrape_never_waits_for_a_journal_stuck_on_a_lock(hub):
    """Another process holds the journal's write lock, so the daemon's next write waits
    (busy_timeout). Meanwhile /metrics and /healthz must answer: the gauges read from the
    journal render their last values instead of blocking the event loop on SQLite."""
    *_, daemon = hub
    daemon.start()
    body = json.loads((Path(__file__).parent / "data/distribution-2.8-push.json").read_text())
    body["events"][0]["id"] = "held-by-a-lock"
    headers = {
        "Authorization": "Bearer hook-token-for-tests",
        "Content-Type": "application/vnd.docker.distribution.events.v1+json",
    }
    answers: list[int] = []
    locker = sqlite3.connect(daemon.journal_path, isolation_level=None, timeout=10)
    locker.execute("BEGIN IMMEDIATE")
    try:
        poster = threading.Thread(
            target=lambda: answers.append(
                httpx.post(
                    f"{daemon.url}/events/a", headers=headers, json=body, timeout=60
                ).status_code
            )
        )
        poster.start()
        for _ in range(3):  # the webhook's write is waiting for the lock by the 2nd round
            assert httpx.get(f"{daemon.url}/metrics", timeout=3).status_code == 200
            assert httpx.get(f"{daemon.url}/healthz", timeout=2).status_code == 200
        assert answers == []  # still waiting: the lock really held the journal up
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    poster.join(timeout=30)
    assert answers == [202]
