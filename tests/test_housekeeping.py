"""The daemon's housekeeping on real registries: a dead letter whose source image is gone
(a definite 404) is dropped with a log line and an audit entry; one whose source is
present, or cannot be asked, is kept; dead deletes are never dropped this way."""

from __future__ import annotations

import asyncio
import logging
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
    daemon = Daemon(config.source_path, instance_id="hk-daemon")
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
    assert [a.actor for a in audit] == ["daemon hk-daemon"]


def test_pull_times_are_kept_as_rows_only_when_a_policy_reads_them(tmp_path):
    base = {"sites": {"a": {"url": "http://127.0.0.1:1", "insecure": True}}}
    from replicator.config import config_from_dict

    assert not housekeeping.uses_pull_times(config_from_dict(base))
    policy = {"name": "p", "sites": "a", "keep": {"pulled_within": "30d"}}
    assert housekeeping.uses_pull_times(config_from_dict({**base, "gc": {"policies": [policy]}}))
