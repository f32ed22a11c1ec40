"""Tasks queued before a failover never run under the rewritten rule (red team 2, 1).

A copy queued from the old primary would overwrite the promoted site's incident write
once the primary is back; a delete queued from it would delete one. `failover` cancels
the queued ones it can see; the daemon cancels any other it leases (queued later by a
daemon still running the pre-failover rules), whether it was reloaded or not.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from replicator.config import config_from_dict
from replicator.journal import Failover, Journal, Task, TaskSpec, WorkQueue
from replicator.rules import effective_rules
from replicator.task_scope import out_of_scope
from tests.harness.daemon import DaemonProcess, notify_kwargs, site_config
from tests.harness.images import Pusher, layer_bytes
from tests.harness.util import free_port, wait_until

FAILOVER = [sys.executable, "-m", "replicator", "failover"]


def digest_of(url: str, tag: str) -> str | None:
    with Pusher(url) as p:
        r = p.get_manifest("team/app", tag)
        return r.headers.get("docker-content-digest") if r.status_code == 200 else None


def _task(task_id: int, source: str, target: str, action: str = "copy", rule: str = "apps") -> Task:
    row = {
        "id": task_id,
        "key": "k",
        "rule": rule,
        "action": action,
        "source_site": source,
        "target_site": target,
        "repository": "team/app",
        "target_repository": "team/app",
        "tag": "v1",
        "digest": None,
        "state": "pending",
        "attempts": 0,
        "next_try": 0.0,
        "lease_owner": None,
        "lease_until": None,
        "last_error": None,
        "event_id": None,
        "created_at": 0.0,
        "updated_at": 0.0,
    }
    return Task.from_row(row)


def test_out_of_scope_is_pure_and_names_the_failover():
    config = config_from_dict(
        {
            "journal": ":memory:",
            "sites": {
                s: {"url": f"http://{s}.invalid", "insecure": True} for s in ("p", "a", "b", "q")
            },
            "rules": [
                {"name": "apps", "from": "p", "to": ["a", "b"]},
                {"name": "other", "from": "q", "to": ["a"]},
            ],
        }
    )
    failovers = [Failover(7, "p", "a", 0.0)]
    rules = effective_rules(config, [("p", "a")])
    assert out_of_scope(_task(1, "p", "a"), config.rules, []) is None
    assert out_of_scope(_task(2, "a", "b"), rules, failovers) is None
    from_lost = out_of_scope(_task(3, "p", "b", "delete"), rules, failovers)
    assert from_lost is not None
    assert "task 3 (delete p/team/app:v1 -> b/team/app)" in from_lost
    assert "now replicates from 'a', not 'p'" in from_lost
    assert from_lost.endswith("since failover #7 (p lost, a promoted)")
    to_promoted = out_of_scope(_task(4, "a", "a"), rules, failovers)
    assert to_promoted is not None and "no longer replicates to 'a' (to: b)" in to_promoted
    other = _task(5, "q", "a", rule="other")
    assert out_of_scope(other, rules, failovers) is None  # a rule the failover did not move
    dropped = effective_rules(config, [("p", "a"), ("b", "q")])  # apps: a -> [] is dropped
    assert "not in force" in (out_of_scope(_task(6, "a", "b"), dropped, failovers) or "")


def enqueue(journal_path: Path, specs: list[TaskSpec]) -> list[int]:
    """Queue tasks as a daemon still running the pre-failover rules would."""

    async def run() -> list[int]:
        journal = Journal(journal_path)
        try:
            return await WorkQueue(journal, "not-reloaded").enqueue(specs)
        finally:
            journal.close()

    return asyncio.run(run())


def test_tasks_from_the_lost_site_are_cancelled_not_run(registry_factory, tmp_path):
    port = free_port()
    p = registry_factory("p", **notify_kwargs(port, "p"))
    a, b = registry_factory("a"), registry_factory("b")
    daemon = DaemonProcess(
        tmp_path / "d",
        port=port,
        config={
            "sites": {"p": site_config(p), "a": site_config(a), "b": site_config(b)},
            "rules": [{"name": "apps", "from": "p", "to": ["a", "b"], "deletes": True}],
        },
    )
    daemon.write_config()
    try:
        with Pusher(p.url) as push:
            old = push.push_image("team/app", "v1", [layer_bytes("stale-old", 300)])
        # the daemon queued v1's copies and stopped before running them (or they wait
        # for a retry, their target unreachable)
        spec = TaskSpec("apps", "copy", "p", "a", "team/app", tag="v1", digest=old.digest)
        to_a, to_b = enqueue(daemon.journal_path, [spec, replace(spec, target_site="b")])
        p.stop()  # the primary is lost

        config = str(daemon.config_path)
        dry = subprocess.run(
            [*FAILOVER, "-c", config, "--promote", "a", "--dry-run", "--json"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert dry.returncode == 0, dry.stderr
        would = json.loads(dry.stdout)["cancelled_tasks"]
        assert len(would) == 2 and f"task {to_a} " in would[0] and f"task {to_b} " in would[1]
        assert all("since failover (p lost, a promoted)" in why for why in would)
        states = "SELECT state, last_error FROM tasks WHERE id IN (?, ?) ORDER BY id"
        assert [s for s, _ in daemon.journal_rows(states, (to_a, to_b))] == ["pending"] * 2

        out = subprocess.run(
            [*FAILOVER, "-c", config, "--promote", "a", "--json"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout)
        assert report["recorded"]
        assert report["cancelled_tasks"] == [
            why.replace("since failover (", "since failover #1 (") for why in would
        ]
        for state, error in daemon.journal_rows(states, (to_a, to_b)):
            assert state == "cancelled" and "failover #1 (p lost, a promoted)" in error

        with Pusher(a.url) as push:  # the incident's writes at the promoted site
            new = push.push_image("team/app", "v1", [layer_bytes("stale-new", 300)])
            push.push_image("team/app", "v2", [layer_bytes("stale-v2", 300)])
        p.start()  # the old primary is back (still holding the old v1, no v2)

        # a daemon still running the pre-failover rules queues work from p
        ids = enqueue(
            daemon.journal_path,
            [
                TaskSpec("apps", "copy", "p", "a", "team/app", tag="v1", digest=old.digest),
                TaskSpec("apps", "delete", "p", "a", "team/app", tag="v2"),
            ],
        )
        daemon.start()
        finished = f"SELECT state, last_error FROM tasks WHERE id IN ({ids[0]}, {ids[1]})"
        wait_until(
            lambda: all(s not in ("pending", "leased") for s, _ in daemon.journal_rows(finished)),
            timeout=30,
            what="the stale tasks finished",
        )
        for state, error in daemon.journal_rows(finished):
            assert state == "cancelled"
            assert "now replicates from 'a', not 'p'" in error and "failover #1" in error
        assert digest_of(a.url, "v1") == new.digest  # the incident write stands
        assert digest_of(a.url, "v2") is not None
    finally:
        daemon.stop()
