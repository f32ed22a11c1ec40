"""The durable work queue on a real SQLite journal: coalescing, leasing, retries, crashes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from replicator.daemon.queue import (
    QueueError,
    TaskSpec,
    WorkQueue,
    backoff_delay,
)
from replicator.journal import Journal
from tests.harness.util import wait_until

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
        for r in journal.query("SELECT action, state, digest FROM tasks ORDER BY id")
    ]


# --- coalescing ----------------------------------------------------------------------


def test_ten_pushes_of_one_tag_make_one_copy_of_the_newest_digest(queue, journal):
    digests = [f"sha256:{i:064x}" for i in range(10)]
    ids = queue.enqueue([copy(digest=d, event_id=f"ev{i}") for i, d in enumerate(digests)])
    assert len(set(ids)) == 1
    rows = journal.query("SELECT * FROM tasks")
    assert len(rows) == 1
    assert rows[0]["digest"] == digests[-1] and rows[0]["event_id"] == "ev9"
    assert rows[0]["key"] == "r|b|app|v1"
    # across separate transactions too
    queue.enqueue([copy(digest=D2, event_id="late")])
    assert states(journal) == [("copy", "pending", D2)]


def test_other_tags_targets_and_repositories_do_not_coalesce(queue, journal):
    queue.enqueue(
        [
            copy(tag="v1"),
            copy(tag="v2"),
            copy(target="c"),
            copy(repo="other"),
            copy(tag=None, digest=D2),
        ]
    )
    assert len(journal.query("SELECT id FROM tasks WHERE state='pending'")) == 5


def test_push_while_leased_queues_behind_the_running_copy(queue, journal):
    queue.enqueue([copy(digest=D1)])
    [running] = queue.lease(5)
    queue.enqueue([copy(digest=D2), copy(digest=D3)])
    assert states(journal) == [("copy", "leased", D1), ("copy", "pending", D3)]
    assert queue.lease(5) == []  # same key still running: not handed out in parallel
    assert queue.complete(running.id)
    [after] = queue.lease(5)
    assert after.digest == D3


def test_delete_after_push_cancels_the_copy(queue, journal):
    queue.enqueue([copy(digest=D1)])
    queue.enqueue([delete()])
    assert states(journal) == [("copy", "cancelled", D1), ("delete", "pending", None)]
    [task] = queue.lease(5)
    assert task.action == "delete" and task.tag == "v1"


def test_push_after_delete_cancels_the_delete(queue, journal):
    queue.enqueue([delete(), copy(digest=D2)])
    assert states(journal) == [("delete", "cancelled", None), ("copy", "pending", D2)]


def test_delete_by_digest_cancels_pending_copies_of_that_digest(queue, journal):
    queue.enqueue([copy(tag="v1", digest=D1), copy(tag="v2", digest=D1), copy(tag="v3", digest=D2)])
    queue.enqueue([delete(tag=None, digest=D1)])
    rows = journal.query("SELECT tag, action, state FROM tasks ORDER BY id")
    assert [(r["tag"], r["action"], r["state"]) for r in rows] == [
        ("v1", "copy", "cancelled"),
        ("v2", "copy", "cancelled"),
        ("v3", "copy", "pending"),
        (None, "delete", "pending"),
    ]


def test_bad_spec_is_refused_and_changes_nothing(queue, journal):
    bad = TaskSpec(
        rule="r",
        action="move",
        source_site="a",
        target_site="b",  # type: ignore[arg-type]
        repository="app",
        tag="v1",
    )
    with pytest.raises(QueueError, match=r"tasks\[1\]\.action"):
        queue.enqueue([copy(), bad])
    with pytest.raises(QueueError, match=r"tasks\[0\]: needs a tag or a digest"):
        queue.enqueue([copy(tag=None, digest=None)])
    assert journal.query("SELECT COUNT(*) AS n FROM tasks")[0]["n"] == 0


# --- leasing -------------------------------------------------------------------------


def test_lease_takes_only_ready_tasks_and_respects_target_limits(queue, journal, clock):
    queue.enqueue(
        [copy(tag=f"t{i}", target="b") for i in range(5)]
        + [copy(tag=f"t{i}", target="c") for i in range(5)]
    )
    first = queue.lease(10, target_limits={"b": 2})
    assert sorted(t.target_site for t in first) == ["b", "b"] + ["c"] * 5
    assert all(t.state == "leased" and t.lease_owner == "worker-1" for t in first)
    assert all(t.lease_until == clock.t + queue.lease_seconds for t in first)
    # leases already held count against the limit
    assert queue.lease(10, target_limits={"b": 2}) == []
    queue.complete(next(t for t in first if t.target_site == "b").id)
    assert [t.target_site for t in queue.lease(10, target_limits={"b": 2})] == ["b"]
    # not-yet-due tasks are not handed out
    queue.enqueue([copy(tag="later")])
    journal.execute("UPDATE tasks SET next_try=? WHERE tag='later'", (clock.t + 5,))
    assert sorted(t.tag for t in queue.lease(10)) == ["t3", "t4"]  # 'later' is not due
    assert journal.query("SELECT state FROM tasks WHERE tag='later'")[0]["state"] == "pending"
    clock.t += 5
    assert [t.tag for t in queue.lease(10)] == ["later"]


def test_lease_limit_scans_past_a_saturated_target(queue):
    # 300 tasks for a saturated target ahead of one for another target
    queue.enqueue([copy(tag=f"t{i}", target="b") for i in range(300)] + [copy(target="c")])
    got = queue.lease(3, target_limits={"b": 1})
    assert sorted(t.target_site for t in got) == ["b", "c"]


def test_two_threads_never_lease_the_same_task(tmp_path):
    path = tmp_path / "journal.db"
    setup = Journal(path)
    WorkQueue(setup, "setup").enqueue([copy(tag=f"t{i}") for i in range(150)])
    setup.close()
    got: dict[str, list[int]] = {"x": [], "y": []}
    barrier = threading.Barrier(2)

    errors: list[BaseException] = []

    def work(name: str) -> None:
        try:
            j = Journal(path)  # own connection: exercises SQLite's locking, not our RLock
            q = WorkQueue(j, name)
            barrier.wait()
            while tasks := q.lease(3):
                for t in tasks:
                    got[name].append(t.id)
                    time.sleep(0.002)  # simulated copy work, outside any transaction
                    assert q.complete(t.id)
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
    import sys
    from replicator.journal import Journal
    from replicator.daemon.queue import WorkQueue
    q = WorkQueue(Journal(sys.argv[1]), sys.argv[2])
    while tasks := q.lease(2):
        for t in tasks:
            print(t.id, flush=True)
            q.complete(t.id)
""")


def test_two_processes_never_lease_the_same_task(tmp_path):
    path = tmp_path / "journal.db"
    j = Journal(path)
    WorkQueue(j, "setup").enqueue([copy(tag=f"t{i}") for i in range(200)])
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
    assert WorkQueue(j, "check").counts_by_state()["done"] == 200
    j.close()


# --- failures, backoff, dead letters -------------------------------------------------


def test_backoff_grows_exponentially_is_capped_and_jittered():
    hi = [backoff_delay(n, base=2, cap=60, rng=lambda: 1.0) for n in range(1, 9)]
    assert hi == [2, 4, 8, 16, 32, 60, 60, 60]
    lo = [backoff_delay(n, base=2, cap=60, rng=lambda: 0.0) for n in range(1, 9)]
    assert lo == [h / 2 for h in hi]
    assert backoff_delay(10_000, base=2, cap=60, rng=lambda: 0.5) == 45


def test_fail_schedules_retries_with_growing_waits_then_dead_letters(journal, clock):
    q = WorkQueue(
        journal, "w", max_attempts=4, backoff_base=1, backoff_max=3, clock=clock, rng=lambda: 1.0
    )
    [tid] = q.enqueue([copy()])
    waits = []
    for _ in range(3):
        clock.t += 1000
        [task] = q.lease(1)
        assert q.fail(task.id, "HTTP 503 from registry b")
        row = q.get(tid)
        assert row is not None and row.state == "pending"
        waits.append(row.next_try - clock.t)
        assert q.lease(1) == []  # not before its backoff
    assert waits == [1, 2, 3]  # grows, then capped
    clock.t += 1000
    [task] = q.lease(1)
    assert task.attempts == 4
    q.fail(task.id, "HTTP 503 from registry b")
    [dead] = q.dead_letters()
    assert dead.id == tid and dead.state == "dead" and "503" in (dead.last_error or "")
    assert q.counts_by_state()["dead"] == 1
    assert q.retry_dead(tid)
    assert q.get(tid).attempts == 0  # type: ignore[union-attr]
    assert [t.id for t in q.lease(1)] == [tid]


def test_non_retryable_failure_is_dead_at_once_and_retry_after_is_honoured(queue, clock):
    [a, b] = queue.enqueue([copy(tag="a"), copy(tag="b")])
    queue.lease(2)
    queue.fail(a, "manifest schema1 is not supported", retryable=False)
    queue.fail(b, "HTTP 429", retry_after=120)
    assert queue.get(a).state == "dead"  # type: ignore[union-attr]
    assert queue.get(b).next_try == clock.t + 120  # type: ignore[union-attr]


def test_error_text_is_redacted_and_bounded(queue):
    [tid] = queue.enqueue([copy()])
    queue.lease(1)
    queue.fail(tid, "GET https://bob:hunter2@reg.example/v2/?token=abc " + "x" * 5000)
    err = queue.get(tid).last_error  # type: ignore[union-attr]
    assert "hunter2" not in err and "abc" not in err and len(err) <= 2000


def test_retry_dead_is_superseded_by_newer_pending_work(queue):
    [tid] = queue.enqueue([copy(digest=D1)])
    queue.lease(1)
    queue.fail(tid, "boom", retryable=False)
    queue.enqueue([copy(digest=D2)])
    assert not queue.retry_dead(tid)
    assert queue.get(tid).state == "cancelled"  # type: ignore[union-attr]


# --- leases: expiry, loss, crashes ---------------------------------------------------


def test_expired_leases_return_to_pending_and_the_old_owner_loses_them(journal, clock):
    old = WorkQueue(journal, "old", clock=clock)
    new = WorkQueue(journal, "new", clock=clock)
    [tid] = old.enqueue([copy()])
    old.lease(1, lease_seconds=30)
    clock.t += 10
    assert old.renew(tid, 30)  # now valid until +40
    clock.t += 29
    assert new.requeue_expired() == 0
    clock.t += 2
    assert new.requeue_expired() == 1
    [task] = new.lease(1)
    assert task.id == tid and task.attempts == 2
    assert not old.complete(tid) and not old.renew(tid) and not old.fail(tid, "x")
    assert new.complete(tid)


def test_a_task_that_keeps_crashing_its_worker_ends_dead(journal, clock):
    q = WorkQueue(journal, "w", max_attempts=2, clock=clock)
    [tid] = q.enqueue([copy()])
    for _ in range(2):
        q.lease(1, lease_seconds=1)
        clock.t += 2
        q.requeue_expired()
    assert q.get(tid).state == "dead"  # type: ignore[union-attr]


def test_release_owned_returns_leases_without_spending_an_attempt(queue):
    queue.enqueue([copy(tag="a"), copy(tag="b")])
    queue.lease(2)
    assert queue.release_owned() == 2
    assert {t.attempts for t in queue.lease(2)} == {1}


CRASHER = textwrap.dedent("""
    import sys, time
    from replicator.journal import Journal
    from replicator.daemon.queue import WorkQueue
    q = WorkQueue(Journal(sys.argv[1]), "crasher")
    print(" ".join(str(t.id) for t in q.lease(3, lease_seconds=0.3)), flush=True)
    time.sleep(600)
""")


def test_sigkill_while_holding_leases_loses_nothing(tmp_path):
    path = tmp_path / "journal.db"
    j = Journal(path)
    q = WorkQueue(j, "survivor")
    q.enqueue([copy(tag=f"t{i}") for i in range(5)])
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHER, str(path)], stdout=subprocess.PIPE, text=True
    )
    leased = [int(x) for x in proc.stdout.readline().split()]  # type: ignore[union-attr]
    assert len(leased) == 3
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    proc.stdout.close()  # type: ignore[union-attr]
    assert q.counts_by_state()["leased"] == 3
    wait_until(q.requeue_expired, timeout=10, what="the crashed worker's leases to expire")
    done = []
    while tasks := q.lease(10):
        for t in tasks:
            assert q.complete(t.id)
            done.append(t.id)
    assert sorted(done) == sorted(set(done)) and len(done) == 5 and set(leased) <= set(done)
    j.close()


ENQUEUER = textwrap.dedent("""
    import sys
    from replicator.journal import Journal
    from replicator.daemon.queue import TaskSpec, WorkQueue
    q = WorkQueue(Journal(sys.argv[1]), "enq")
    batch = 0
    while True:
        q.enqueue([TaskSpec(rule="r", action="copy", source_site="a", target_site="b",
                            repository="app", tag=f"b{batch}-{i}", digest="sha256:" + "1" * 64)
                   for i in range(50)])
        batch += 1
        print(batch, flush=True)
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
    j = Journal(path)
    assert j.query("PRAGMA integrity_check")[0]["integrity_check"] == "ok"
    n = j.query("SELECT COUNT(*) AS n FROM tasks")[0]["n"]
    assert n % 50 == 0 and n >= committed * 50
    j.close()


# --- metrics and loop prevention ------------------------------------------------------


def test_counts_and_replication_lag(queue, clock):
    assert queue.oldest_pending_age() is None
    queue.enqueue([copy(tag="a", target="b")])
    clock.t += 30
    queue.enqueue([copy(tag="b", target="c"), copy(tag="c", target="c")])
    clock.t += 10
    assert queue.oldest_pending_age() == 40
    assert queue.oldest_pending_age(target="c") == 10
    assert queue.oldest_pending_age(rule="other") is None
    [t] = queue.lease(1, target_limits={"c": 0})
    assert queue.oldest_pending_age(target="b") == 40  # leased still counts as lag
    queue.complete(t.id)
    assert queue.oldest_pending_age(target="b") is None
    assert queue.counts_by_state() == {
        "pending": 2,
        "leased": 0,
        "done": 1,
        "cancelled": 0,
        "dead": 0,
    }


def test_loop_prevention_recognises_our_own_pushes(queue, clock):
    assert queue.was_replicated_here("b", "app", D1) is None
    queue.record_replicated("b", "app", D1, "a", tag="v1")
    queue.record_replicated("b", "app", D2, "a")  # a child manifest, pushed by digest
    assert queue.was_replicated_here("b", "app", D1) == "a"
    assert queue.was_replicated_here("b", "app", D1, tag="v1") == "a"
    assert queue.was_replicated_here("b", "app", D1, tag="v2") is None  # a genuine re-tag
    assert queue.was_replicated_here("b", "app", D2) == "a"
    assert queue.was_replicated_here("a", "app", D1) is None
    assert queue.was_replicated_here("b", "other", D1) is None
    queue.record_replicated("b", "app", D1, "a", tag="v2")
    assert queue.was_replicated_here("b", "app", D1, tag="v1") == "a"
    assert queue.was_replicated_here("b", "app", D1, tag="v2") == "a"
    clock.t += 3601
    assert queue.was_replicated_here("b", "app", D1) is None
    assert queue.was_replicated_here("b", "app", D1, within=None) == "a"


async def test_async_twins_run_on_the_journal_thread(queue):
    [tid] = await queue.aenqueue(
        [copy(trace_context={"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"})]
    )
    [task] = await queue.alease(1)
    assert task.trace_context and task.trace_context["traceparent"].startswith("00-a")
    assert await queue.arenew(tid)
    assert await queue.acomplete(tid)
    assert (await queue.acounts_by_state())["done"] == 1
    await queue.arecord_replicated("b", "app", D1, "a", "v1")
    assert await queue.awas_replicated_here("b", "app", D1, "v1") == "a"
