"""The durable work queue on a real SQLite journal: coalescing, leasing, retries, crashes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from replicator.journal import Journal, Ledger, QueueError, TaskSpec, WorkQueue
from replicator.journal.tasks import backoff_delay
from tests.harness.journal import sql
from tests.harness.util import async_wait_until

D1, D2, D3 = ("sha256:" + c * 64 for c in "123")


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def journal(tmp_path: Path):
    j = Journal(tmp_path / "journal.db")
    yield j
    j.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def queue(journal: Journal, clock: Clock) -> WorkQueue:
    return WorkQueue(journal, "worker-1", clock=clock, rng=lambda: 1.0)


def copy(
    tag: str | None = "v1",
    digest: str | None = D1,
    repo: str = "app",
    target: str = "b",
    event_id: str | None = None,
    **kw,
) -> TaskSpec:
    return TaskSpec(
        rule="r",
        action="copy",
        source_site="a",
        target_site=target,
        repository=repo,
        tag=tag,
        digest=digest,
        event_id=event_id,
        **kw,
    )


def delete(
    tag: str | None = "v1", digest: str | None = None, repo: str = "app", target: str = "b"
) -> TaskSpec:
    return TaskSpec(
        rule="r",
        action="delete",
        source_site="a",
        target_site=target,
        repository=repo,
        tag=tag,
        digest=digest,
    )


def states(journal: Journal) -> list[tuple[str, str, str | None]]:
    return [
        (r["action"], r["state"], r["digest"])
        for r in sql(journal, "SELECT action, state, digest FROM tasks ORDER BY id")
    ]


# --- coalescing ----------------------------------------------------------------------


async def test_ten_pushes_of_one_tag_make_one_copy_of_the_newest_digest(queue, journal):
    digests = [f"sha256:{i:064x}" for i in range(10)]
    ids = await queue.enqueue([copy(digest=d, event_id=f"ev{i}") for i, d in enumerate(digests)])
    assert len(set(ids)) == 1
    rows = sql(journal, "SELECT * FROM tasks")
    assert len(rows) == 1
    assert rows[0]["digest"] == digests[-1] and rows[0]["event_id"] == "ev9"
    assert rows[0]["key"] == "r|b|app|v1"
    # across separate transactions too
    await queue.enqueue([copy(digest=D2, event_id="late")])
    assert states(journal) == [("copy", "pending", D2)]


async def test_other_tags_targets_and_repositories_do_not_coalesce(queue, journal):
    await queue.enqueue(
        [
            copy(tag="v1"),
            copy(tag="v2"),
            copy(target="c"),
            copy(repo="other"),
            copy(tag=None, digest=D2),
        ]
    )
    assert len(sql(journal, "SELECT id FROM tasks WHERE state='pending'")) == 5


async def test_push_while_leased_queues_behind_the_running_copy(queue, journal):
    await queue.enqueue([copy(digest=D1)])
    [running] = await queue.lease(5)
    await queue.enqueue([copy(digest=D2), copy(digest=D3)])
    assert states(journal) == [("copy", "leased", D1), ("copy", "pending", D3)]
    assert await queue.lease(5) == []  # same key still running: not handed out in parallel
    assert await queue.complete(running.id)
    [after] = await queue.lease(5)
    assert after.digest == D3


async def test_delete_after_push_cancels_the_copy(queue, journal):
    await queue.enqueue([copy(digest=D1)])
    await queue.enqueue([delete()])
    assert states(journal) == [("copy", "cancelled", D1), ("delete", "pending", None)]
    [task] = await queue.lease(5)
    assert task.action == "delete" and task.tag == "v1"


async def test_push_after_delete_cancels_the_delete(queue, journal):
    await queue.enqueue([delete(), copy(digest=D2)])
    assert states(journal) == [("delete", "cancelled", None), ("copy", "pending", D2)]


async def test_delete_by_digest_cancels_pending_copies_of_that_digest(queue, journal):
    await queue.enqueue(
        [copy(tag="v1", digest=D1), copy(tag="v2", digest=D1), copy(tag="v3", digest=D2)]
    )
    await queue.enqueue([delete(tag=None, digest=D1)])
    rows = sql(journal, "SELECT tag, action, state FROM tasks ORDER BY id")
    assert [(r["tag"], r["action"], r["state"]) for r in rows] == [
        ("v1", "copy", "cancelled"),
        ("v2", "copy", "cancelled"),
        ("v3", "copy", "pending"),
        (None, "delete", "pending"),
    ]


async def test_bad_spec_is_refused_and_changes_nothing(queue, journal):
    bad = TaskSpec(
        rule="r",
        action="move",
        source_site="a",
        target_site="b",  # type: ignore[arg-type]
        repository="app",
        tag="v1",
    )
    with pytest.raises(QueueError, match=r"tasks\[1\]\.action"):
        await queue.enqueue([copy(), bad])
    with pytest.raises(QueueError, match=r"tasks\[0\]: needs a tag or a digest"):
        await queue.enqueue([copy(tag=None, digest=None)])
    assert sql(journal, "SELECT COUNT(*) AS n FROM tasks")[0]["n"] == 0


# --- leasing -------------------------------------------------------------------------


async def test_lease_takes_only_ready_tasks_and_respects_target_limits(queue, journal, clock):
    await queue.enqueue(
        [copy(tag=f"t{i}", target="b") for i in range(5)]
        + [copy(tag=f"t{i}", target="c") for i in range(5)]
    )
    first = await queue.lease(10, target_limits={"b": 2})
    assert sorted(t.target_site for t in first) == ["b", "b"] + ["c"] * 5
    assert all(t.state == "leased" and t.lease_owner == "worker-1" for t in first)
    assert all(t.lease_until == clock.t + queue.lease_seconds for t in first)
    # leases already held count against the limit
    assert await queue.lease(10, target_limits={"b": 2}) == []
    await queue.complete(next(t for t in first if t.target_site == "b").id)
    assert [t.target_site for t in await queue.lease(10, target_limits={"b": 2})] == ["b"]
    # not-yet-due tasks are not handed out
    await queue.enqueue([copy(tag="later")])
    sql(journal, "UPDATE tasks SET next_try=? WHERE tag='later'", (clock.t + 5,))
    assert sorted(t.tag for t in await queue.lease(10)) == ["t3", "t4"]  # 'later' is not due
    assert sql(journal, "SELECT state FROM tasks WHERE tag='later'")[0]["state"] == "pending"
    clock.t += 5
    assert [t.tag for t in await queue.lease(10)] == ["later"]


async def test_lease_limit_scans_past_a_saturated_target(queue):
    # 300 tasks for a saturated target ahead of one for another target
    await queue.enqueue([copy(tag=f"t{i}", target="b") for i in range(300)] + [copy(target="c")])
    got = await queue.lease(3, target_limits={"b": 1})
    assert sorted(t.target_site for t in got) == ["b", "c"]


def test_two_threads_never_lease_the_same_task(tmp_path):
    path = tmp_path / "journal.db"
    setup = Journal(path)
    asyncio.run(WorkQueue(setup, "setup").enqueue([copy(tag=f"t{i}") for i in range(150)]))
    setup.close()
    got: dict[str, list[int]] = {"x": [], "y": []}
    barrier = threading.Barrier(2)

    errors: list[BaseException] = []

    async def lease_all(q: WorkQueue, name: str) -> None:
        while tasks := await q.lease(3):
            for t in tasks:
                got[name].append(t.id)
                await asyncio.sleep(0.002)  # simulated copy work, outside any transaction
                assert await q.complete(t.id)

    def work(name: str) -> None:
        try:
            j = Journal(path)  # own connection and thread: exercises SQLite's locking
            q = WorkQueue(j, name)
            barrier.wait()
            asyncio.run(lease_all(q, name))
            j.close()
        except BaseException as exc:
            errors.append(exc)
            raise

    threads = [threading.Thread(target=work, args=(n,)) for n in got]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    all_ids = got["x"] + got["y"]
    assert len(all_ids) == len(set(all_ids)) == 150
    assert got["x"] and got["y"]


LEASER = textwrap.dedent("""
    import asyncio, sys
    from replicator.journal import Journal, WorkQueue
    async def main():
        q = WorkQueue(Journal(sys.argv[1]), sys.argv[2])
        while tasks := await q.lease(2):
            for t in tasks:
                print(t.id, flush=True)
                await q.complete(t.id)
    asyncio.run(main())
""")


def test_two_processes_never_lease_the_same_task(tmp_path):
    path = tmp_path / "journal.db"
    j = Journal(path)
    asyncio.run(WorkQueue(j, "setup").enqueue([copy(tag=f"t{i}") for i in range(200)]))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", LEASER, str(path), f"p{i}"], stdout=subprocess.PIPE, text=True
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=60)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    ids = [int(x) for out in outs for x in out]
    assert len(ids) == len(set(ids)) == 200
    assert asyncio.run(WorkQueue(j, "check").counts_by_state())["done"] == 200
    j.close()


# --- failures, backoff, dead letters -------------------------------------------------


def test_backoff_grows_exponentially_is_capped_and_jittered():
    hi = [backoff_delay(n, base=2, cap=60, rng=lambda: 1.0) for n in range(1, 9)]
    assert hi == [2, 4, 8, 16, 32, 60, 60, 60]
    lo = [backoff_delay(n, base=2, cap=60, rng=lambda: 0.0) for n in range(1, 9)]
    assert lo == [h / 2 for h in hi]
    assert backoff_delay(10_000, base=2, cap=60, rng=lambda: 0.5) == 45


async def test_fail_schedules_retries_with_growing_waits_then_dead_letters(journal, clock):
    q = WorkQueue(
        journal, "w", max_attempts=4, backoff_base=1, backoff_max=3, clock=clock, rng=lambda: 1.0
    )
    [tid] = await q.enqueue([copy()])
    waits = []
    for _ in range(3):
        clock.t += 1000
        [task] = await q.lease(1)
        assert await q.fail(task.id, "HTTP 503 from registry b")
        row = await q.get(tid)
        assert row is not None and row.state == "pending"
        waits.append(row.next_try - clock.t)
        assert await q.lease(1) == []  # not before its backoff
    assert waits == [1, 2, 3]  # grows, then capped
    clock.t += 1000
    [task] = await q.lease(1)
    assert task.attempts == 4
    await q.fail(task.id, "HTTP 503 from registry b")
    [dead] = await q.dead_letters()
    assert dead.id == tid and dead.state == "dead" and "503" in (dead.last_error or "")
    assert (await q.counts_by_state())["dead"] == 1
    assert await q.retry_dead(tid)
    assert (await q.get(tid)).attempts == 0  # type: ignore[union-attr]
    assert [t.id for t in await q.lease(1)] == [tid]


async def test_non_retryable_failure_is_dead_at_once_and_retry_after_is_honoured(queue, clock):
    [a, b] = await queue.enqueue([copy(tag="a"), copy(tag="b")])
    await queue.lease(2)
    await queue.fail(a, "manifest schema1 is not supported", retryable=False)
    await queue.fail(b, "HTTP 429", retry_after=120)
    assert (await queue.get(a)).state == "dead"  # type: ignore[union-attr]
    assert (await queue.get(b)).next_try == clock.t + 120  # type: ignore[union-attr]


async def test_error_text_is_redacted_and_bounded(queue):
    [tid] = await queue.enqueue([copy()])
    await queue.lease(1)
    await queue.fail(tid, "GET https://bob:hunter2@reg.example/v2/?token=abc " + "x" * 5000)
    err = (await queue.get(tid)).last_error  # type: ignore[union-attr]
    assert "hunter2" not in err and "abc" not in err and len(err) <= 2000


async def test_retry_dead_is_superseded_by_newer_pending_work(queue):
    [tid] = await queue.enqueue([copy(digest=D1)])
    await queue.lease(1)
    await queue.fail(tid, "boom", retryable=False)
    await queue.enqueue([copy(digest=D2)])
    assert not await queue.retry_dead(tid)
    assert (await queue.get(tid)).state == "cancelled"  # type: ignore[union-attr]


# --- leases: expiry, loss, crashes ---------------------------------------------------


async def test_expired_leases_return_to_pending_and_the_old_owner_loses_them(journal, clock):
    old = WorkQueue(journal, "old", clock=clock)
    new = WorkQueue(journal, "new", clock=clock)
    [tid] = await old.enqueue([copy()])
    await old.lease(1, lease_seconds=30)
    clock.t += 10
    assert await old.renew(tid, 30)  # now valid until +40
    clock.t += 29
    assert await new.requeue_expired() == 0
    clock.t += 2
    assert await new.requeue_expired() == 1
    [task] = await new.lease(1)
    assert task.id == tid and task.attempts == 2
    assert not await old.complete(tid) and not await old.renew(tid) and not await old.fail(tid, "x")
    assert await new.complete(tid)


async def test_a_task_that_keeps_crashing_its_worker_ends_dead(journal, clock):
    q = WorkQueue(journal, "w", max_attempts=2, clock=clock)
    [tid] = await q.enqueue([copy()])
    for _ in range(2):
        await q.lease(1, lease_seconds=1)
        clock.t += 2
        await q.requeue_expired()
    assert (await q.get(tid)).state == "dead"  # type: ignore[union-attr]


async def test_release_owned_returns_leases_without_spending_an_attempt(queue):
    await queue.enqueue([copy(tag="a"), copy(tag="b")])
    await queue.lease(2)
    assert await queue.release_owned() == 2
    assert {t.attempts for t in await queue.lease(2)} == {1}


async def test_a_restart_returns_its_predecessors_leases_at_once_keeping_the_attempt(
    journal, clock
):
    """Issue 12 item 7: the same identity after a crash means the leases it holds belong
    to the dead process; they return at start, but still count as an attempt."""
    dead = WorkQueue(journal, "inst-0", max_attempts=2, clock=clock)
    other = WorkQueue(journal, "inst-1", clock=clock)
    [mine, theirs] = await dead.enqueue([copy(tag="a"), copy(tag="b")])
    await dead.lease(1)
    await other.lease(1)
    restarted = WorkQueue(journal, "inst-0", max_attempts=2, clock=clock)
    assert await restarted.release_predecessor() == 1
    task = await restarted.get(mine)
    assert task is not None and task.state == "pending" and task.attempts == 1
    assert "inst-0 was restarted" in (task.last_error or "")
    assert (await other.get(theirs)).state == "leased"  # type: ignore[union-attr]
    [again] = await restarted.lease(1)
    assert again.id == mine and again.attempts == 2
    assert await restarted.release_predecessor() == 1  # crashed once more: out of attempts
    task = await restarted.get(mine)
    assert task is not None and task.state == "dead" and "restarted" in (task.last_error or "")


async def test_supersede_cancels_only_a_task_still_leased_by_us(journal, clock):
    q = WorkQueue(journal, "w", clock=clock)
    [tid, lost] = await q.enqueue([copy(tag="a"), copy(tag="b")])
    await q.lease(2, lease_seconds=5)
    assert await q.supersede(tid, "superseded: a/app:a now points at " + D2)
    task = await q.get(tid)
    assert task is not None and task.state == "cancelled" and D2 in (task.last_error or "")
    assert task.lease_owner is None
    clock.t += 6
    await WorkQueue(journal, "other", clock=clock).requeue_expired()
    assert not await q.supersede(lost, "too late")
    assert (await q.get(lost)).state == "pending"  # type: ignore[union-attr]


async def test_a_lease_term_must_be_positive(journal):
    with pytest.raises(QueueError, match="lease time"):
        WorkQueue(journal, "w", lease_seconds=0)


CRASHER = textwrap.dedent("""
    import asyncio, sys, time
    from replicator.journal import Journal, WorkQueue
    q = WorkQueue(Journal(sys.argv[1]), "crasher")
    print(" ".join(str(t.id) for t in asyncio.run(q.lease(3, lease_seconds=0.3))), flush=True)
    time.sleep(600)
""")


def test_sigkill_while_holding_leases_loses_nothing(tmp_path):
    path = tmp_path / "journal.db"
    j = Journal(path)
    q = WorkQueue(j, "survivor")
    asyncio.run(q.enqueue([copy(tag=f"t{i}") for i in range(5)]))
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHER, str(path)], stdout=subprocess.PIPE, text=True
    )
    leased = [int(x) for x in proc.stdout.readline().split()]  # type: ignore[union-attr]
    assert len(leased) == 3
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    proc.stdout.close()  # type: ignore[union-attr]

    async def survive() -> list[int]:
        assert (await q.counts_by_state())["leased"] == 3
        await async_wait_until(
            q.requeue_expired, timeout=10, what="the crashed worker's leases to expire"
        )
        done = []
        while tasks := await q.lease(10):
            for t in tasks:
                assert await q.complete(t.id)
                done.append(t.id)
        return done

    done = asyncio.run(survive())
    assert sorted(done) == sorted(set(done)) and len(done) == 5 and set(leased) <= set(done)
    j.close()


ENQUEUER = textwrap.dedent("""
    import asyncio, sys
    from replicator.journal import Journal, TaskSpec, WorkQueue
    async def main():
        q = WorkQueue(Journal(sys.argv[1]), "enq")
        batch = 0
        while True:
            await q.enqueue([TaskSpec(rule="r", action="copy", source_site="a", target_site="b",
                                repository="app", tag=f"b{batch}-{i}", digest="sha256:" + "1" * 64)
                       for i in range(50)])
            batch += 1
            print(batch, flush=True)
    asyncio.run(main())
""")


def test_sigkill_during_enqueue_keeps_whole_batches(tmp_path):
    path = tmp_path / "journal.db"
    Journal(path).close()
    proc = subprocess.Popen(
        [sys.executable, "-c", ENQUEUER, str(path)], stdout=subprocess.PIPE, text=True
    )
    for _ in range(5):
        committed = int(proc.stdout.readline())  # type: ignore[union-attr]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    proc.stdout.close()  # type: ignore[union-attr]
    Journal(path).close()  # opens (recovering the WAL) like the next start would
    assert sql(path, "PRAGMA integrity_check")[0]["integrity_check"] == "ok"
    n = sql(path, "SELECT COUNT(*) AS n FROM tasks")[0]["n"]
    assert n % 50 == 0 and n >= committed * 50


# --- metrics and loop prevention ------------------------------------------------------


async def test_counts_and_replication_lag(queue, clock):
    assert await queue.oldest_pending_age() is None
    await queue.enqueue([copy(tag="a", target="b")])
    clock.t += 30
    await queue.enqueue([copy(tag="b", target="c"), copy(tag="c", target="c")])
    clock.t += 10
    assert await queue.oldest_pending_age() == 40
    assert await queue.oldest_pending_age(target="c") == 10
    assert await queue.oldest_pending_age(rule="other") is None
    [t] = await queue.lease(1, target_limits={"c": 0})
    assert await queue.oldest_pending_age(target="b") == 40  # leased still counts as lag
    await queue.complete(t.id)
    assert await queue.oldest_pending_age(target="b") is None
    assert await queue.counts_by_state() == {
        "pending": 2,
        "leased": 0,
        "done": 1,
        "cancelled": 0,
        "dead": 0,
    }


async def test_loop_prevention_recognises_our_own_pushes(journal, clock):
    ledger = Ledger(journal, clock=clock)
    assert await ledger.was_replicated_here("b", "app", D1) is None
    await ledger.record("b", "app", D1, "a", tag="v1")
    await ledger.record("b", "app", D2, "a")  # a child manifest, pushed by digest
    assert await ledger.was_replicated_here("b", "app", D1) == "a"
    assert await ledger.was_replicated_here("b", "app", D1, tag="v1") == "a"
    assert await ledger.was_replicated_here("b", "app", D1, tag="v2") is None  # a re-tag
    assert await ledger.was_replicated_here("b", "app", D2) == "a"
    assert await ledger.was_replicated_here("a", "app", D1) is None
    assert await ledger.was_replicated_here("b", "other", D1) is None
    await ledger.record("b", "app", D1, "a", tag="v2")
    assert await ledger.was_replicated_here("b", "app", D1, tag="v1") == "a"
    assert await ledger.was_replicated_here("b", "app", D1, tag="v2") == "a"
    clock.t += 3601
    assert await ledger.was_replicated_here("b", "app", D1) is None
    assert await ledger.was_replicated_here("b", "app", D1, within=None) == "a"


async def test_queue_methods_run_on_the_journal_thread(queue, journal):
    [tid] = await queue.enqueue(
        [copy(trace_context={"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"})]
    )
    [task] = await queue.lease(1)
    assert task.trace_context and task.trace_context["traceparent"].startswith("00-a")
    assert await queue.renew(tid)
    assert await queue.complete(tid)
    assert (await queue.counts_by_state())["done"] == 1
    await journal.ledger.record("b", "app", D1, "a", "v1")
    assert await journal.ledger.was_replicated_here("b", "app", D1, "v1") == "a"
