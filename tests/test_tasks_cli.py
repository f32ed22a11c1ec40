"""`tasks`: the operator sees pending, failed, leased and dead work and retries or drops it,
every change recorded with who, when and why."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from replicator.journal import Journal, TaskSpec, WorkQueue
from tests.harness.util import free_port


def write_config(tmp_path: Path) -> Path:
    # Nothing listens on these ports: `tasks` must not need any registry.
    data = {
        "journal": str(tmp_path / "journal.db"),
        "sites": {
            n: {"url": f"http://127.0.0.1:{free_port()}", "insecure": True}
            for n in ("us-east", "eu-west", "ap-south")
        },
        "rules": [
            {"name": "apps", "from": "us-east", "to": ["eu-west", "ap-south"]},
            {"name": "db", "from": "eu-west", "to": ["ap-south"]},
        ],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def spec(tag: str, target: str = "eu-west", rule: str = "apps") -> TaskSpec:
    source = "eu-west" if rule == "db" else "us-east"
    return TaskSpec(rule, "copy", source, target, "team/app", tag=tag, digest=None)


async def seed(path: str) -> dict[str, int]:
    """One task in each state an operator sees, through the queue's own protocol."""
    journal = Journal(path)
    queue = WorkQueue(journal, "worker-1", max_attempts=2)
    ids = await queue.enqueue([spec("failed"), spec("leased"), spec("dead", "ap-south")])
    named = dict(zip(("failed", "leased", "dead"), ids, strict=True))
    assert {t.id for t in await queue.lease(10)} == set(ids)
    await queue.fail(named["failed"], "eu-west: 503 Service Unavailable", retryable=True)
    await queue.fail(named["dead"], "us-east team/app:dead: manifest unknown", retryable=False)
    later = await queue.enqueue([spec("pending"), spec("x", "ap-south", "db")])
    named.update(zip(("pending", "db"), later, strict=True))
    journal.close()
    return named


def cli(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "replicator", "tasks", "-c", str(path), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_listing_states_filters_and_audited_actions(tmp_path):
    db = str(tmp_path / "journal.db")
    named = await seed(db)
    journal = Journal(db)
    admin = journal.task_admin
    try:
        views = {v.task.id: v.state for v in await admin.list_tasks()}
        assert views == {
            named["pending"]: "pending",
            named["failed"]: "failed",
            named["leased"]: "leased",
            named["dead"]: "dead",
            named["db"]: "pending",
        }
        assert await admin.counts() == {
            "pending": 2,
            "failed": 1,
            "leased": 1,
            "dead": 1,
            "dropped": 0,
        }
        assert [v.task.id for v in await admin.list_tasks(["failed"])] == [named["failed"]]
        assert [v.task.id for v in await admin.list_tasks(["pending"], rule="db")] == [named["db"]]
        assert {v.task.id for v in await admin.list_tasks(target="ap-south")} == {
            named["dead"],
            named["db"],
        }

        [refused] = await admin.drop([named["leased"]], actor="ann@h", reason="stuck")
        assert (refused.outcome, refused.detail) == (
            "refused",
            "drop refused: a worker is running it",
        )
        [missing] = await admin.retry([9999], actor="ann@h", reason="x")
        assert missing.outcome == "not found"

        [dropped] = await admin.drop([named["dead"]], actor="ann@h", reason="image withdrawn")
        assert dropped.outcome == "dropped"
        view = await admin.get(named["dead"])
        assert view is not None and view.state == "dropped"
        assert view.audit is not None
        assert (view.audit.actor, view.audit.reason, view.audit.state_before) == (
            "ann@h",
            "image withdrawn",
            "dead",
        )
        assert named["dead"] not in {v.task.id for v in await admin.list_tasks()}  # not by default
        assert [v.task.id for v in await admin.list_tasks(["dropped"])] == [named["dead"]]
        queue = WorkQueue(journal, "worker-2")
        assert named["dead"] not in {t.id for t in await queue.lease(10)}  # never run again

        [again] = await admin.retry([named["dead"]], actor="bob@h", reason="it is back")
        assert again.outcome == "retried"
        task = await queue.get(named["dead"])
        assert task is not None and (task.state, task.attempts) == ("pending", 0)
        assert [(a.action, a.actor) for a in await admin.audit(named["dead"])] == [
            ("drop", "ann@h"),
            ("retry", "bob@h"),
        ]
    finally:
        journal.close()


async def test_retry_of_a_dead_task_with_newer_work_queued_supersedes_it(tmp_path):
    journal = Journal(tmp_path / "j.db")
    try:
        queue = WorkQueue(journal, "w", max_attempts=1)
        [first] = await queue.enqueue([spec("v1")])
        await queue.lease(1)
        await queue.fail(first, "boom", retryable=False)
        [newer] = await queue.enqueue([spec("v1")])
        assert newer != first
        [r] = await journal.task_admin.retry([first], actor="a@h", reason="r")
        assert r.outcome == "superseded"
        task = await queue.get(first)
        assert task is not None and task.state == "cancelled"
    finally:
        journal.close()


def test_cli_lists_retries_and_drops_with_json_and_exit_codes(tmp_path):
    path = write_config(tmp_path)
    named = asyncio.run(seed(str(tmp_path / "journal.db")))

    out = cli(path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["ID", "STATE", "RULE", "ACTION", "TARGET", "IMAGE", "TRIES", "AGE"]
    assert any(x.split()[:2] == [str(named["failed"]), "failed"] for x in lines)
    assert "    error (next try in" in out.stdout and "503 Service Unavailable" in out.stdout
    assert "manifest unknown" in out.stdout and "    running on worker-1" in out.stdout
    assert lines[-1] == "journal: 2 pending, 1 failed, 1 leased, 1 dead"

    js = cli(path, "--json", "--state", "dead", "--site", "ap-south")
    payload = json.loads(js.stdout)
    assert [t["id"] for t in payload["tasks"]] == [named["dead"]]
    assert payload["tasks"][0]["state"] == "dead" and payload["counts"]["dead"] == 1

    drop = cli(path, "drop", "--dead", "--reason", "image withdrawn upstream")
    assert drop.returncode == 0, drop.stderr
    assert drop.stdout.strip() == f"task {named['dead']}: dropped"
    shown = cli(path, "--state", "dropped")
    assert "dropped" in shown.stdout and "image withdrawn upstream" in shown.stdout
    assert "dropped by " in shown.stdout and "(was dead)" in shown.stdout

    refused = cli(path, "retry", str(named["leased"]), "--json")
    assert refused.returncode == 1
    assert json.loads(refused.stdout)["results"][0]["outcome"] == "refused"
    retried = cli(path, "retry", str(named["failed"]), str(named["dead"]))
    assert retried.returncode == 0, retried.stdout + retried.stderr
    assert retried.stdout.count(": retried") == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("retry",), "give task ids or --dead"),
        (("drop", "1", "--dead"), "give task ids or --dead"),
        (("list", "3"), "go with `retry` or `drop`"),
        (("--rule", "nope"), "--rule nope: not in"),
        (("--site", "mars"), "--site mars: not in"),
    ],
)
def test_cli_usage_errors_exit_2_and_say_why(tmp_path, args, message):
    out = cli(write_config(tmp_path), *args)
    assert out.returncode == 2 and message in out.stderr, out.stderr


async def test_drop_dead_leaves_a_task_retried_after_it_was_listed(tmp_path, monkeypatch):
    """`tasks drop --dead` lists the dead tasks, then drops them: a task another operator
    (or a script) retried in between is pending again and is not the operator's target."""
    import argparse

    from replicator.commands import tasks as tasks_cmd

    db = str(tmp_path / "journal.db")
    named = await seed(db)
    journal = Journal(db)
    admin = journal.task_admin
    listed = admin.dead_ids

    async def retried_meanwhile(**filters: str | None) -> list[int]:
        ids = await listed(**filters)
        await admin.retry([named["dead"]], actor="bob@h", reason="fixed the source")
        return ids

    monkeypatch.setattr(admin, "dead_ids", retried_meanwhile)
    args = argparse.Namespace(
        verb="drop", ids=[], dead=True, rule=None, site=None, reason="", json=True
    )
    try:
        assert await tasks_cmd._act(journal, args) == 1  # refused: no longer dead
        view = await admin.get(named["dead"])
        assert view is not None and view.task.state == "pending"  # retried, not dropped
    finally:
        journal.close()


@pytest.mark.parametrize("task_id", ["99999999999999999999999", "0", "-3"])
def test_a_task_id_out_of_range_is_a_usage_error(tmp_path, task_id):
    """A mistyped id was an 'internal error: OverflowError' (exit 1, which means a task
    was refused or not found)."""
    out = cli(write_config(tmp_path), "drop", "--", task_id)
    assert out.returncode == 2 and "task id" in out.stderr, out.stderr
    assert "internal error" not in out.stderr


def test_a_journal_whose_tasks_all_finished_says_nothing_is_unfinished(tmp_path):
    """The demo's journal after its story: every task done. 'no tasks' read as if nothing
    had ever run; the summary counts unfinished states only, and says so."""
    path = write_config(tmp_path)

    async def finish_one() -> None:
        queue = WorkQueue(Journal(str(tmp_path / "journal.db")), "worker-1", max_attempts=2)
        (task_id,) = await queue.enqueue([spec("done")])
        (task,) = await queue.lease(10)
        assert task.id == task_id and await queue.complete(task_id)

    asyncio.run(finish_one())
    out = cli(path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "journal: nothing unfinished"
