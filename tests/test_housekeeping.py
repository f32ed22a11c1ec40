"""The daemon's housekeeping on real registries: a dead letter whose source image is gone
(a definite 404) is dropped with a log line and an audit entry; one whose source is
present, or cannot be asked, is kept; dead deletes are never dropped this way."""

from __future__ import annotations

import asyncio
import http.server
import logging
import threading
import time

import pytest
import yaml

from replicator.clients import ClientPool
from replicator.config import load_config
from replicator.daemon import housekeeping
from replicator.journal import Journal, TaskSpec, WorkQueue
from tests.harness.images import Pusher, layer_bytes
from tests.harness.util import free_port

MISSING = "sha256:" + "0" * 64


def write_config(tmp_path, src_url: str) -> str:
    data = {
        "journal": str(tmp_path / "journal.db"),
        "sites": {
            "src": {"url": src_url, "insecure": True},
            "down": {"url": f"http://127.0.0.1:{free_port()}", "insecure": True},
            "dst": {"url": f"http://127.0.0.1:{free_port()}", "insecure": True},
        },
        "rules": [
            {"name": "r", "from": "src", "to": "dst"},
            {"name": "d", "from": "down", "to": "dst"},
        ],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


async def dead(queue: WorkQueue, *specs: TaskSpec) -> list[int]:
    ids = await queue.enqueue(specs)
    leased = await queue.lease(len(ids))
    assert {t.id for t in leased} == set(ids)
    for task_id in ids:
        await queue.fail(task_id, "not retryable in this test", retryable=False)
    return ids


def copy(tag: str | None = None, digest: str | None = None, source: str = "src") -> TaskSpec:
    rule = "r" if source == "src" else "d"
    return TaskSpec(rule, "copy", source, "dst", "team/app", tag=tag, digest=digest)


@pytest.fixture
def setup(tmp_path, registry):
    with Pusher(registry.url) as p:
        p.push_image("team/app", "v1", [layer_bytes("hk", 500)])
    config = load_config(write_config(tmp_path, registry.url))
    journal = Journal(config.journal)
    yield config, journal
    journal.close()


async def test_only_dead_copies_whose_source_answers_404_are_dropped(setup, caplog):
    config, journal = setup
    queue = WorkQueue(journal, "w", max_attempts=1)
    present, gone_tag, gone_digest, unreachable = await dead(
        queue,
        copy(tag="v1"),
        copy(tag="withdrawn"),
        copy(digest=MISSING),
        copy(tag="v9", source="down"),
    )
    [dead_delete] = await dead(
        queue, TaskSpec("r", "delete", "src", "dst", "team/app", tag="withdrawn-too")
    )
    [pending] = await queue.enqueue([copy(tag="also-withdrawn")])

    caplog.set_level(logging.INFO, logger="replicator.daemon.housekeeping")
    pool = ClientPool(config, retries=0)
    try:
        report = await housekeeping.housekeep(config, journal, pool, actor="daemon hk-test")
    finally:
        await pool.aclose()

    assert sorted(report.dropped) == sorted([gone_tag, gone_digest])
    assert report.kept == 2  # present, and the site that cannot be asked
    admin = journal.task_admin
    states = {i: (await admin.get(i)).state for i in (present, unreachable, dead_delete, pending)}
    assert states == {
        present: "dead",
        unreachable: "dead",
        dead_delete: "dead",
        pending: "pending",
    }
    view = await admin.get(gone_tag)
    assert view is not None and view.state == "dropped" and view.audit is not None
    assert view.audit.actor == "daemon hk-test"
    assert view.audit.reason == "source image gone: HEAD src team/app@withdrawn answered 404"
    assert (
        f"dropped dead letter {gone_digest} (r copy -> dst): its source image "
        f"src team/app@{MISSING} no longer exists" in caplog.text
    )


async def test_a_dead_letter_retried_meanwhile_is_not_dropped(setup):
    _config, journal = setup
    queue = WorkQueue(journal, "w", max_attempts=1)
    [task_id] = await dead(queue, copy(tag="withdrawn"))
    await journal.task_admin.retry([task_id], actor="ann@h", reason="try again")
    [result] = await journal.task_admin.drop(
        [task_id], actor="daemon x", reason="gone", only_from=("dead",)
    )
    assert result.outcome == "refused"
    assert (await queue.get(task_id)).state == "pending"  # type: ignore[union-attr]


async def test_the_daemon_runs_housekeeping_periodically(setup, monkeypatch, tmp_path):
    from replicator.daemon.service import Daemon

    config, journal = setup
    queue = WorkQueue(journal, "w", max_attempts=1)
    [task_id] = await dead(queue, copy(tag="withdrawn"))
    monkeypatch.setattr(housekeeping, "INTERVAL", 0.05)
    daemon = Daemon(config.source_path)
    loop = asyncio.create_task(daemon._housekeeping_loop())
    try:
        deadline = time.monotonic() + 20
        while (await queue.get(task_id)).state != "dropped":  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "housekeeping never dropped the dead letter"
            assert not loop.done(), loop
            await asyncio.sleep(0.05)
        assert daemon.journal.events.keep_pull_rows is False  # no policy uses pulled_within
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        await daemon.pool.aclose()
        daemon.journal.close()
    audit = await journal.task_admin.audit(task_id)
    assert [a.actor for a in audit] == [f"daemon {daemon.instance_id}"]


def test_pull_times_are_kept_as_rows_only_when_a_policy_reads_them(tmp_path):
    base = {"sites": {"a": {"url": "http://127.0.0.1:1", "insecure": True}}}
    from replicator.config import config_from_dict

    assert not housekeeping.uses_pull_times(config_from_dict(base))
    policy = {"name": "p", "sites": "a", "keep": {"pulled_within": "30d"}}
    assert housekeeping.uses_pull_times(config_from_dict({**base, "gc": {"policies": [policy]}}))


def test_a_running_daemon_counts_pulls_without_a_row_each(registry_factory, tmp_path, daemons):
    """Real distribution webhooks into a real daemon: the pulls (ours while copying, and a
    client's) are counted per repository, never stored one by one or left 'new'."""
    import httpx

    from tests.harness.daemon import DaemonProcess, notify_kwargs, site_config
    from tests.harness.util import wait_until

    port = free_port()
    a = registry_factory("a", **notify_kwargs(port, "a"))
    b = registry_factory("b")
    daemon = DaemonProcess(
        tmp_path / "d",
        port=port,
        config={
            "sites": {"a": site_config(a), "b": site_config(b)},
            "rules": [{"name": "r", "from": "a", "to": ["b"]}],
        },
    )
    daemons.append(daemon)
    daemon.start()
    with Pusher(a.url) as p:
        img = p.push_image("team/app", "v1", [layer_bytes("pulled", 800)])
    accept = {"Accept": img.media_type}
    httpx.get(f"{a.url}/v2/team/app/manifests/v1", headers=accept).raise_for_status()

    def counted() -> bool:
        found = daemon.journal_rows(
            "SELECT manifests, blobs FROM pull_counts WHERE site = 'a' AND repository = 'team/app'"
        )
        return bool(found) and found[0][0] >= 2 and found[0][1] >= 1  # ours + the client's

    wait_until(counted, timeout=30, what="pulls counted")
    assert daemon.journal_rows("SELECT COUNT(*) FROM events WHERE action = 'pull'") == [(0,)]
    wait_until(
        lambda: daemon.journal_rows("SELECT COUNT(*) FROM events WHERE state = 'new'") == [(0,)],
        timeout=10,
        what="every event handled",
    )


async def test_pulls_are_not_handed_to_the_bus(tmp_path):
    """Nothing plans on a pull, so a pull webhook is answered without the broker: an
    outage never holds a registry's later webhooks behind its pulls."""
    from replicator.daemon.service import Daemon
    from replicator.events import RegistryEvent

    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "journal": str(tmp_path / "j.db"),
                "mqtt": {"url": f"mqtt://127.0.0.1:{free_port()}"},  # nobody there
                "sites": {"a": {"url": "http://127.0.0.1:1", "insecure": True}},
            }
        )
    )
    daemon = Daemon(path)
    pull = RegistryEvent(id="u1", site="a", action="pull", repository="r", digest=MISSING)
    try:
        await asyncio.wait_for(daemon._publish([pull]), 2)
        assert daemon._to_mark == [("a", "u1")]
    finally:
        await daemon.bus.stop()
        await daemon.pool.aclose()
        daemon.journal.close()


class _NotARegistry(http.server.BaseHTTPRequestHandler):
    """A web server at a mistyped source URL: 404 for everything."""

    def do_HEAD(self) -> None:
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD

    def log_message(self, *args: object) -> None:
        pass


async def _housekeep_once(config) -> housekeeping.HousekeepingReport:
    journal = Journal(config.journal)
    pool = ClientPool(config, retries=0)
    try:
        return await housekeeping.housekeep(config, journal, pool, actor="daemon hk-test")
    finally:
        await pool.aclose()
        journal.close()


async def test_a_404_from_a_source_that_is_no_registry_drops_nothing(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotARegistry)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        config = load_config(write_config(tmp_path, url))
        journal = Journal(config.journal)
        ids = await dead(WorkQueue(journal, "w", max_attempts=1), copy(tag="v1"), copy(tag="v2"))
        journal.close()
        report = await _housekeep_once(config)
    finally:
        server.shutdown()
    assert report.dropped == [] and report.kept == 2
    journal = Journal(config.journal)
    assert [(await journal.task_admin.get(i)).state for i in ids] == ["dead", "dead"]  # type: ignore[union-attr]
    journal.close()


async def test_a_404_from_a_registry_without_the_repository_drops_nothing(tmp_path, two_registries):
    """After a failover the source's name may lead to another registry that never had
    the repository: its 404s say nothing about the image."""
    original, other = two_registries
    with Pusher(original.url) as p:
        p.push_image("team/app", "v1", [layer_bytes("hk2", 300)])
    config = load_config(write_config(tmp_path, other.url))
    journal = Journal(config.journal)
    [task_id] = await dead(WorkQueue(journal, "w", max_attempts=1), copy(tag="v1"))
    journal.close()
    report = await _housekeep_once(config)
    assert report.dropped == [] and report.kept == 1
    journal = Journal(config.journal)
    assert (await journal.task_admin.get(task_id)).state == "dead"  # type: ignore[union-attr]
    journal.close()


def test_the_replicators_own_reads_are_not_pull_times(registry_factory, tmp_path, daemons):
    """Copy, verify and the lease fence read source manifests; distribution reports each
    read as a pull. Kept as pull rows they would be `pulled_within`'s "last pulled", and a
    scheduled verify would keep every verified image from pull-based GC forever. Ours
    are counted, never pull times; a client's pull is both."""
    import httpx

    from tests.harness.daemon import DaemonProcess, notify_kwargs, site_config
    from tests.harness.util import wait_until

    port = free_port()
    a = registry_factory("a", **notify_kwargs(port, "a"))
    b = registry_factory("b")
    policy = {"name": "p", "sites": "a", "keep": {"pulled_within": "30d"}}
    daemon = DaemonProcess(
        tmp_path / "d",
        port=port,
        config={
            "sites": {"a": site_config(a), "b": site_config(b)},
            "rules": [{"name": "r", "from": "a", "to": ["b"], "repositories": ["team/**"]}],
            "gc": {"policies": [policy]},
        },
    )
    daemons.append(daemon)
    daemon.start()
    with Pusher(a.url) as p:
        img = p.push_image("team/app", "v1", [layer_bytes("own-reads", 800)])
        p.push_image("other/app", "v1", [layer_bytes("client-reads", 800)])
    accept = {"Accept": img.media_type}
    wait_until(
        lambda: httpx.head(f"{b.url}/v2/team/app/manifests/v1", headers=accept).status_code == 200,
        timeout=30,
        what="the copy at b",
    )
    # a client's pull after the copy: a delivers its events in order, so once the
    # client's is counted the copy's reads were handled before it
    httpx.get(f"{a.url}/v2/other/app/manifests/v1", headers=accept).raise_for_status()

    def pulls(repo: str) -> tuple[int, int]:
        counted = daemon.journal_rows(
            "SELECT manifests FROM pull_counts WHERE site = 'a' AND repository = ?", (repo,)
        )
        [(rows,)] = daemon.journal_rows(
            "SELECT COUNT(*) FROM events WHERE action = 'pull' AND repository = ?", (repo,)
        )
        return (counted[0][0] if counted else 0), rows

    wait_until(lambda: pulls("other/app")[0] >= 1, timeout=30, what="the client's pull counted")
    assert pulls("other/app") == (1, 1)
    counted, rows = pulls("team/app")
    assert counted >= 1 and rows == 0


async def test_dead_letters_beyond_one_pass_are_reached_in_later_passes(
    setup, registry, monkeypatch
):
    """Each pass checks a few dead letters; those it keeps (source present) must not be
    the only ones checked forever, or a gone one behind them is never dropped."""
    from replicator.daemon.service import Daemon

    config, journal = setup
    queue = WorkQueue(journal, "w", max_attempts=1)
    with Pusher(registry.url) as p:
        p.push_image("team/app", "v2", [layer_bytes("hk-v2", 400)])
    *present, gone = await dead(queue, copy(tag="v1"), copy(tag="v2"), copy(tag="gone"))
    monkeypatch.setattr(housekeeping, "INTERVAL", 0.05)
    monkeypatch.setattr(housekeeping, "DEAD_LETTERS_PER_PASS", 2)
    daemon = Daemon(config.source_path, instance_id="hk-rotation")
    loop = asyncio.create_task(daemon._housekeeping_loop())
    try:
        deadline = time.monotonic() + 10
        while (await queue.get(gone)).state != "dropped":  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the third dead letter was never checked"
            assert not loop.done(), loop
            await asyncio.sleep(0.05)
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        await daemon.pool.aclose()
        daemon.journal.close()
    assert [(await queue.get(i)).state for i in present] == ["dead", "dead"]  # type: ignore[union-attr]
