"""The durable work queue: replication tasks in the SQLite journal (table `tasks`).

Why a journal table and not an in-memory queue: a copy or delete must survive a
crash at any instant. Every state change is one `BEGIN IMMEDIATE` transaction, so
a SIGKILL leaves each task either pending, leased (returned to pending by
`requeue_expired` once its lease runs out) or finished; nothing is half-written.
Several processes may share one journal: `BEGIN IMMEDIATE` takes SQLite's write
lock before the read that picks tasks, so two leasers never claim the same row.

Coalescing by `key` (rule|target_site|target_repository|tag-or-digest) keeps the
queue proportional to what is out of date, not to how busy the source is:

* a copy onto a pending (not leased) copy of the same key replaces its digest, so
  ten pushes of one tag make one copy of the newest digest;
* a delete cancels the pending copy of its key (and, for a delete by digest, every
  pending copy of that digest into the same target repository), then queues itself;
* a copy cancels the pending delete of its key, then queues itself;
* while a task of a key is leased, new work for that key is queued behind it and is
  not leased until the running one finishes (no copy/delete race on one tag).

Use: `WorkQueue(journal, owner_id)`; every method is a coroutine whose SQL runs on
the journal thread, so the event loop never blocks on disk.

`attempts` counts leases, not failures: a task that crashes its worker every time
(SIGKILL mid-copy) still reaches the dead-letter state after `max_attempts`.

A lease is a term, not ownership: the worker `renew`s it while it works, anyone's
`requeue_expired` returns it once the term passes unrenewed (a crashed or frozen
worker), and the worker's `renew` right before its final write tells it whether the
task is still its own.
"""

from __future__ import annotations

import json
import random
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import sqlite_utils

from replicator.backoff import jittered_backoff
from replicator.errors import ReplicatorError
from replicator.journal.core import JournalConnection, changed, rows
from replicator.logs import redact

TaskAction = Literal["copy", "delete"]
TaskState = Literal["pending", "leased", "done", "cancelled", "dead"]

TASK_ACTIONS: frozenset[str] = frozenset({"copy", "delete"})
TASK_STATES: tuple[str, ...] = ("pending", "leased", "done", "cancelled", "dead")

DEFAULT_MAX_ATTEMPTS = 10
DEFAULT_BACKOFF_BASE = 2.0  # seconds before the first retry (before jitter)
DEFAULT_BACKOFF_MAX = 600.0  # cap on one wait
DEFAULT_LEASE_SECONDS = 60.0
_MAX_ERROR = 2000


class QueueError(ReplicatorError):
    """A task spec the queue refuses; the message names the bad field."""


@dataclass(frozen=True)
class TaskSpec:
    """Work to enqueue: copy or delete `tag`/`digest` of `repository` at a target."""

    rule: str
    action: TaskAction
    source_site: str
    target_site: str
    repository: str  # at the source
    target_repository: str | None = None  # defaults to `repository`
    tag: str | None = None
    digest: str | None = None
    event_id: str | None = None  # the RegistryEvent that caused it, if any
    trace_context: Mapping[str, str] | None = None

    @property
    def target_repo(self) -> str:
        return self.target_repository or self.repository

    @property
    def key(self) -> str:
        return task_key(self.rule, self.target_site, self.target_repo, self.tag or self.digest)

    def validate(self, where: str = "task") -> None:
        for name in ("rule", "source_site", "target_site", "repository"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise QueueError(f"{where}.{name}: required non-empty string")
            if "|" in value and name in ("rule", "target_site"):
                raise QueueError(f"{where}.{name}: must not contain '|' ({value!r})")
        if self.action not in TASK_ACTIONS:
            raise QueueError(f"{where}.action: must be 'copy' or 'delete', got {self.action!r}")
        if not self.tag and not self.digest:
            raise QueueError(
                f"{where}: needs a tag or a digest ({self.repository} -> {self.target_site})"
            )
        if self.trace_context is not None and not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.trace_context.items()
        ):
            raise QueueError(f"{where}.trace_context: keys and values must be strings")


@dataclass(frozen=True)
class Task:
    """One row of `tasks` as a worker sees it."""

    id: int
    key: str
    rule: str
    action: TaskAction
    source_site: str
    target_site: str
    repository: str
    target_repository: str
    tag: str | None
    digest: str | None
    state: TaskState
    attempts: int
    next_try: float
    lease_owner: str | None
    lease_until: float | None
    last_error: str | None
    event_id: str | None
    trace_context: dict[str, str] | None = field(default=None, compare=False)
    created_at: float = 0.0
    updated_at: float = 0.0

    @property
    def reference(self) -> str:
        """Digest when known, else the tag: what to fetch at the source."""
        return self.digest or self.tag or ""

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Task:
        data = dict(row)
        tc = data.get("trace_context")
        data["trace_context"] = json.loads(tc) if tc else None
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


def task_key(rule: str, target_site: str, target_repository: str, reference: str | None) -> str:
    """The coalescing key: one pending task per (rule, target, repository, tag-or-digest)."""
    return f"{rule}|{target_site}|{target_repository}|{reference or ''}"


def backoff_delay(
    attempt: int,
    base: float = DEFAULT_BACKOFF_BASE,
    cap: float = DEFAULT_BACKOFF_MAX,
    rng: Callable[[], float] = random.random,
) -> float:
    """Wait before retry number `attempt` (1-based), with the queue's defaults."""
    return jittered_backoff(attempt, base, cap, rng)


class WorkQueue:
    """The replication task queue of one daemon process (`owner_id` names its leases)."""

    def __init__(
        self,
        journal: JournalConnection,
        owner_id: str,
        *,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        backoff_base: float = DEFAULT_BACKOFF_BASE,
        backoff_max: float = DEFAULT_BACKOFF_MAX,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        clock: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if not owner_id:
            raise QueueError("owner_id: required")
        if max_attempts < 1:
            raise QueueError(f"max_attempts: must be at least 1, got {max_attempts}")
        if not lease_seconds > 0:
            raise QueueError(f"lease time: must be more than 0 seconds, got {lease_seconds}")
        self.journal = journal
        self.owner_id = owner_id
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.lease_seconds = lease_seconds
        self._clock = clock
        self._rng = rng

    # --- enqueue ----------------------------------------------------------------
    async def enqueue(self, tasks: Iterable[TaskSpec]) -> list[int]:
        """Add tasks in one transaction, coalescing by key. Returns, per spec, the id of
        the row that now carries its work (an existing pending row when coalesced)."""
        specs = list(tasks)
        for i, spec in enumerate(specs):
            spec.validate(f"tasks[{i}]")
        return await self.journal.write(self._enqueue, specs)

    def _enqueue(self, db: sqlite_utils.Database, specs: list[TaskSpec]) -> list[int]:
        now = self._clock()
        return [self._enqueue_one(db.conn, spec, now) for spec in specs]

    def _enqueue_one(self, conn: sqlite3.Connection, spec: TaskSpec, now: float) -> int:
        key = spec.key
        tc = json.dumps(dict(spec.trace_context)) if spec.trace_context else None
        pending = conn.execute(
            "SELECT id, action, digest FROM tasks WHERE key=? AND state='pending' ORDER BY id",
            (key,),
        ).fetchall()
        if spec.action == "delete" and spec.digest and not spec.tag:
            # Copies of the deleted digest (by tag) into this repository are moot now.
            conn.execute(
                "UPDATE tasks SET state='cancelled', updated_at=?, last_error=? "
                "WHERE state='pending' AND action='copy' AND rule=? AND target_site=? "
                "AND target_repository=? AND digest=? AND key<>?",
                (
                    now,
                    f"superseded by delete of {spec.digest}",
                    spec.rule,
                    spec.target_site,
                    spec.target_repo,
                    spec.digest,
                    key,
                ),
            )
        for row_id, action, digest in pending:
            if action == spec.action:
                # Same kind of work on the same key: carry the newest event in this row.
                reset = action == "copy" and digest != spec.digest
                conn.execute(
                    "UPDATE tasks SET digest=?, tag=?, source_site=?, repository=?, event_id=?, "
                    "trace_context=?, updated_at=?, "
                    "attempts=CASE WHEN ? THEN 0 ELSE attempts END, "
                    "next_try=CASE WHEN ? THEN MIN(next_try, ?) ELSE next_try END "
                    "WHERE id=?",
                    (
                        spec.digest,
                        spec.tag,
                        spec.source_site,
                        spec.repository,
                        spec.event_id,
                        tc,
                        now,
                        reset,
                        reset,
                        now,
                        row_id,
                    ),
                )
                return int(row_id)
            conn.execute(
                "UPDATE tasks SET state='cancelled', updated_at=?, last_error=? WHERE id=?",
                (now, f"superseded by {spec.action}", row_id),
            )
        cur = conn.execute(
            "INSERT INTO tasks (key, rule, action, source_site, target_site, repository, "
            "target_repository, tag, digest, state, attempts, next_try, event_id, "
            "trace_context, created_at, updated_at) "
            "VALUES (?,?,?,?,?,?,?,?,?,'pending',0,?,?,?,?,?)",
            (
                key,
                spec.rule,
                spec.action,
                spec.source_site,
                spec.target_site,
                spec.repository,
                spec.target_repo,
                spec.tag,
                spec.digest,
                now,
                spec.event_id,
                tc,
                now,
                now,
            ),
        )
        return int(cur.lastrowid or 0)

    # --- leasing ----------------------------------------------------------------
    async def lease(
        self,
        n: int,
        lease_seconds: float | None = None,
        target_limits: Mapping[str, int] | None = None,
    ) -> list[Task]:
        """Claim up to `n` ready tasks (pending, next_try <= now, no leased task with the
        same key), never exceeding `target_limits[target_site]` concurrently leased
        tasks per target (targets not listed are unlimited). One transaction: atomic
        across tasks, threads and processes."""
        if n <= 0:
            return []
        seconds = self.lease_seconds if lease_seconds is None else lease_seconds
        return await self.journal.write(self._lease, n, seconds, dict(target_limits or {}))

    def _lease(
        self, db: sqlite_utils.Database, n: int, seconds: float, limits: dict[str, int]
    ) -> list[Task]:
        conn = db.conn
        now = self._clock()
        busy = dict(
            conn.execute(
                "SELECT target_site, COUNT(*) FROM tasks WHERE state='leased' GROUP BY target_site"
            ).fetchall()
        )
        chosen: list[int] = []
        keys: set[str] = set()
        page, offset = max(4 * n, 64), 0
        full: list[str] = []
        while len(chosen) < n:
            now_full = [t for t, lim in limits.items() if busy.get(t, 0) >= lim]
            if now_full != full:  # the filter changed: rescan from the top
                full, offset = now_full, 0
            marks = ",".join("?" * len(full))
            found = conn.execute(
                "SELECT id, key, target_site FROM tasks t WHERE state='pending' "
                "AND next_try <= ? "
                + (f"AND target_site NOT IN ({marks}) " if full else "")
                + "AND NOT EXISTS (SELECT 1 FROM tasks l WHERE l.key = t.key "
                "AND l.state='leased') ORDER BY next_try, id LIMIT ? OFFSET ?",
                (now, *full, page, offset),
            ).fetchall()
            for row_id, key, target in found:
                if len(chosen) >= n:
                    break
                if key in keys or busy.get(target, 0) >= limits.get(target, 1 << 62):
                    continue
                chosen.append(row_id)
                keys.add(key)
                busy[target] = busy.get(target, 0) + 1
            if len(found) < page:
                break
            if [t for t, lim in limits.items() if busy.get(t, 0) >= lim] == full:
                offset += page
        if not chosen:
            return []
        marks = ",".join("?" * len(chosen))
        conn.execute(
            f"UPDATE tasks SET state='leased', lease_owner=?, lease_until=?, "
            f"attempts=attempts+1, updated_at=? WHERE id IN ({marks})",
            (self.owner_id, now + seconds, now, *chosen),
        )
        return [
            Task.from_row(r)
            for r in db.query(
                f"SELECT * FROM tasks WHERE id IN ({marks}) ORDER BY next_try, id", chosen
            )
        ]

    async def renew(self, task_id: int, lease_seconds: float | None = None) -> bool:
        """Extend our lease; False when it is no longer ours (expired and requeued)."""
        seconds = self.lease_seconds if lease_seconds is None else lease_seconds
        now = self._clock()
        return await self._owned_update(
            task_id, "lease_until=?, updated_at=?", (now + seconds, now)
        )

    async def complete(self, task_id: int) -> bool:
        """Mark our leased task done; False when the lease was lost meanwhile."""
        return await self._owned_update(
            task_id,
            "state='done', lease_owner=NULL, lease_until=NULL, last_error=NULL, updated_at=?",
            (self._clock(),),
        )

    async def fail(
        self, task_id: int, error: str, retryable: bool = True, retry_after: float | None = None
    ) -> bool:
        """Record a failed attempt: back to pending after a capped, jittered exponential
        wait (at least `retry_after` seconds, e.g. a 429's Retry-After), or `dead` when
        not retryable or after `max_attempts`. False when the lease was lost meanwhile."""
        message = redact(str(error))[:_MAX_ERROR]
        return await self.journal.write(self._fail, task_id, message, retryable, retry_after)

    def _fail(
        self,
        db: sqlite_utils.Database,
        task_id: int,
        message: str,
        retryable: bool,
        retry_after: float | None,
    ) -> bool:
        now = self._clock()
        row = db.execute(
            "SELECT attempts FROM tasks WHERE id=? AND state='leased' AND lease_owner=?",
            (task_id, self.owner_id),
        ).fetchone()
        if row is None:
            return False
        attempts = int(row[0])
        if not retryable or attempts >= self.max_attempts:
            db.execute(
                "UPDATE tasks SET state='dead', lease_owner=NULL, lease_until=NULL, "
                "last_error=?, updated_at=? WHERE id=?",
                (message, now, task_id),
            )
            return True
        delay = backoff_delay(attempts, self.backoff_base, self.backoff_max, self._rng)
        if retry_after is not None:
            delay = max(delay, float(retry_after))
        db.execute(
            "UPDATE tasks SET state='pending', lease_owner=NULL, lease_until=NULL, "
            "last_error=?, next_try=?, updated_at=? WHERE id=?",
            (message, now + delay, now, task_id),
        )
        return True

    async def requeue_expired(self) -> int:
        """Return leases past their deadline (a crashed or hung worker) to pending, or to
        `dead` when they already used `max_attempts`. Returns how many rows moved."""
        return await self.journal.write(self._requeue_expired)

    def _requeue_expired(self, db: sqlite_utils.Database) -> int:
        now = self._clock()
        dead = db.execute(
            "UPDATE tasks SET state='dead', last_error=COALESCE(last_error || '; ', '') || "
            "'lease expired (owner ' || COALESCE(lease_owner, '?') || ')', "
            "lease_owner=NULL, lease_until=NULL, updated_at=? "
            "WHERE state='leased' AND lease_until <= ? AND attempts >= ?",
            (now, now, self.max_attempts),
        ).rowcount
        back = db.execute(
            "UPDATE tasks SET state='pending', next_try=?, "
            "last_error='lease expired (owner ' || COALESCE(lease_owner, '?') || ')', "
            "lease_owner=NULL, lease_until=NULL, updated_at=? "
            "WHERE state='leased' AND lease_until <= ?",
            (now, now, now),
        ).rowcount
        return int(dead + back)

    async def release_owned(self) -> int:
        """Return every lease of this owner to pending at once (graceful shutdown), without
        spending an attempt."""
        now = self._clock()
        return await self.journal.write(
            changed,
            "UPDATE tasks SET state='pending', next_try=?, attempts=MAX(attempts-1, 0), "
            "lease_owner=NULL, lease_until=NULL, updated_at=? "
            "WHERE state='leased' AND lease_owner=?",
            (now, now, self.owner_id),
        )

    async def release_predecessor(self) -> int:
        """At start: return every lease still held under this owner id at once. Only a
        dead earlier process of this same identity can hold them (the identity is unique
        among live processes), so there is no need to wait for them to expire. The
        attempt is kept, and a task out of attempts goes `dead` as in `requeue_expired`:
        a task that kills its worker every time must not crash-loop the daemon."""
        return await self.journal.write(self._release_predecessor)

    def _release_predecessor(self, db: sqlite_utils.Database) -> int:
        now = self._clock()
        note = (
            "'lease returned at start: its owner ' || lease_owner || "
            "' was restarted while running it'"
        )
        dead = db.execute(
            f"UPDATE tasks SET state='dead', last_error={note}, "
            "lease_owner=NULL, lease_until=NULL, updated_at=? "
            "WHERE state='leased' AND lease_owner=? AND attempts >= ?",
            (now, self.owner_id, self.max_attempts),
        ).rowcount
        back = db.execute(
            f"UPDATE tasks SET state='pending', next_try=?, last_error={note}, "
            "lease_owner=NULL, lease_until=NULL, updated_at=? "
            "WHERE state='leased' AND lease_owner=?",
            (now, now, self.owner_id),
        ).rowcount
        return int(dead + back)

    async def supersede(self, task_id: int, reason: str) -> bool:
        """Finish our leased task as `cancelled` because newer work makes it moot (the
        source moved on); `reason` is kept in last_error. False when the lease was lost."""
        return await self._owned_update(
            task_id,
            "state='cancelled', lease_owner=NULL, lease_until=NULL, last_error=?, updated_at=?",
            (redact(reason)[:_MAX_ERROR], self._clock()),
        )

    async def _owned_update(self, task_id: int, assignments: str, params: tuple[Any, ...]) -> bool:
        count = await self.journal.write(
            changed,
            f"UPDATE tasks SET {assignments} WHERE id=? AND state='leased' AND lease_owner=?",
            (*params, task_id, self.owner_id),
        )
        return count == 1

    # --- inspection -------------------------------------------------------------
    async def get(self, task_id: int) -> Task | None:
        found = await self.journal.read(rows, "SELECT * FROM tasks WHERE id=?", (task_id,))
        return Task.from_row(found[0]) if found else None

    async def counts_by_state(self) -> dict[str, int]:
        found = await self.journal.read(
            rows, "SELECT state, COUNT(*) AS n FROM tasks GROUP BY state"
        )
        return {**dict.fromkeys(TASK_STATES, 0), **{r["state"]: r["n"] for r in found}}

    async def oldest_pending_age(
        self, rule: str | None = None, target: str | None = None
    ) -> float | None:
        """Replication lag: seconds since the oldest unfinished (pending or leased) task
        was first queued, optionally for one rule and/or target site; None when idle."""
        sql = "SELECT MIN(created_at) AS t FROM tasks WHERE state IN ('pending','leased')"
        params: list[Any] = []
        if rule is not None:
            sql += " AND rule=?"
            params.append(rule)
        if target is not None:
            sql += " AND target_site=?"
            params.append(target)
        oldest = (await self.journal.read(rows, sql, params))[0]["t"]
        return None if oldest is None else max(0.0, self._clock() - oldest)

    async def oldest_unfinished(self) -> dict[tuple[str, str], float]:
        """(rule, target site) -> when its oldest pending or leased task was queued: the
        replication lag per route, in one query."""
        found = await self.journal.read(
            rows,
            "SELECT rule, target_site, MIN(created_at) AS oldest FROM tasks "
            "WHERE state IN ('pending', 'leased') GROUP BY rule, target_site",
        )
        return {(r["rule"], r["target_site"]): r["oldest"] for r in found}

    async def dead_letters(self, limit: int = 100) -> list[Task]:
        found = await self.journal.read(
            rows,
            "SELECT * FROM tasks WHERE state='dead' ORDER BY updated_at DESC, id DESC LIMIT ?",
            (limit,),
        )
        return [Task.from_row(r) for r in found]

    async def retry_dead(self, task_id: int) -> bool:
        """Give a dead task a fresh set of attempts. When newer work for the same key is
        already pending, the dead task is superseded instead (cancelled) and False is
        returned; False too when the task is not dead."""
        return await self.journal.write(self._retry_dead, task_id)

    def _retry_dead(self, db: sqlite_utils.Database, task_id: int) -> bool:
        now = self._clock()
        row = db.execute("SELECT key FROM tasks WHERE id=? AND state='dead'", (task_id,)).fetchone()
        if row is None:
            return False
        if db.execute("SELECT 1 FROM tasks WHERE key=? AND state='pending'", (row[0],)).fetchone():
            db.execute(
                "UPDATE tasks SET state='cancelled', updated_at=? WHERE id=?", (now, task_id)
            )
            return False
        db.execute(
            "UPDATE tasks SET state='pending', attempts=0, next_try=?, updated_at=? WHERE id=?",
            (now, now, task_id),
        )
        return True

    async def purge_finished(self, older_than: float) -> int:
        """Delete done/cancelled rows last touched more than `older_than` seconds ago."""
        return await self.journal.write(
            changed,
            "DELETE FROM tasks WHERE state IN ('done','cancelled') AND updated_at < ?",
            (self._clock() - older_than,),
        )
