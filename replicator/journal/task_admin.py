"""Operator actions on the work queue: list tasks, retry or drop them, with an audit trail.

Apart from `tasks.py` (the daemon's leasing protocol) because these are the hands of a
person or a housekeeping job, not of a worker: every change is recorded in
`task_audit` (who, when, why, the state before) in the same transaction as the change.

States an operator sees: `pending`, `leased`, `failed` (pending, waiting for a retry
after an error: a pending row with `last_error`), `dead` (out of attempts or not
retryable) and `dropped` (given up on by an operator or by the daemon; the row stays,
with its audit, so a dropped task never silently disappears).

A leased task is neither retried nor dropped: a worker is running it, and changing
the row under it would race its completion. Retrying a task whose key already has
newer pending work supersedes (cancels) it instead, as the queue would.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import sqlite_utils

from replicator.journal.core import JournalConnection, rows
from replicator.journal.tasks import Task

VIEW_STATES: tuple[str, ...] = ("pending", "failed", "leased", "dead", "dropped")
DEFAULT_VIEW: tuple[str, ...] = ("pending", "failed", "leased", "dead")
RETRYABLE_FROM = ("pending", "dead", "dropped")
DROPPABLE_FROM = ("pending", "dead")

Outcome = Literal["retried", "superseded", "dropped", "cancelled", "not found", "refused"]


@dataclass(frozen=True)
class AuditEntry:
    task_id: int
    action: str  # retry | drop
    actor: str
    reason: str
    state_before: str
    at: float


@dataclass(frozen=True)
class TaskView:
    """A task as `tasks` lists it: the row, the state an operator reads, the last audit."""

    task: Task
    state: str  # one of VIEW_STATES (or done/cancelled when asked by id)
    audit: AuditEntry | None

    def as_dict(self) -> dict[str, Any]:
        t = self.task
        return {
            "id": t.id,
            "state": self.state,
            "rule": t.rule,
            "action": t.action,
            "source": t.source_site,
            "target": t.target_site,
            "repository": t.repository,
            "target_repository": t.target_repository,
            "tag": t.tag,
            "digest": t.digest,
            "attempts": t.attempts,
            "next_try": t.next_try,
            "lease_owner": t.lease_owner,
            "lease_until": t.lease_until,
            "last_error": t.last_error,
            "created_at": t.created_at,
            "updated_at": t.updated_at,
            "audit": None if self.audit is None else self.audit.__dict__,
        }


@dataclass(frozen=True)
class ActionResult:
    task_id: int
    outcome: Outcome
    detail: str = ""


def view_state(state: str, last_error: str | None) -> str:
    """The state an operator reads: a pending task with an error is `failed`."""
    return "failed" if state == "pending" and last_error else state


class TaskAdmin:
    """Listing, retry and drop of tasks, for the `tasks` command and housekeeping."""

    def __init__(self, journal: JournalConnection, clock: Callable[[], float] = time.time) -> None:
        self._journal = journal
        self._clock = clock

    async def list_tasks(
        self,
        states: Iterable[str] = DEFAULT_VIEW,
        *,
        rule: str | None = None,
        target: str | None = None,
        action: str | None = None,
        limit: int = 1000,
    ) -> list[TaskView]:
        """Tasks in the given operator states, oldest first, with their last audit entry."""
        wanted = set(states)
        unknown = wanted - set(VIEW_STATES)
        if unknown:
            raise ValueError(f"unknown task state(s): {', '.join(sorted(unknown))}")
        db_states = {"pending" if s == "failed" else s for s in wanted}
        marks = ",".join("?" * len(db_states))
        sql = f"SELECT * FROM tasks WHERE state IN ({marks})"
        params: list[Any] = sorted(db_states)
        if "pending" in wanted and "failed" not in wanted:
            sql += " AND NOT (state = 'pending' AND last_error IS NOT NULL)"
        elif "failed" in wanted and "pending" not in wanted:
            sql += " AND NOT (state = 'pending' AND last_error IS NULL)"
        for column, value in (("rule", rule), ("target_site", target), ("action", action)):
            if value is not None:
                sql += f" AND {column} = ?"
                params.append(value)
        sql += " ORDER BY created_at, id LIMIT ?"
        params.append(limit)
        return await self._journal.read(_views, sql, params)

    async def get(self, task_id: int) -> TaskView | None:
        found = await self._journal.read(_views, "SELECT * FROM tasks WHERE id = ?", (task_id,))
        return found[0] if found else None

    async def counts(self) -> dict[str, int]:
        """Tasks per operator state (every state in VIEW_STATES present, 0 when none)."""
        found = await self._journal.read(
            rows,
            "SELECT state, last_error IS NOT NULL AS err, COUNT(*) AS n FROM tasks "
            "WHERE state IN ('pending', 'leased', 'dead', 'dropped') GROUP BY state, err",
        )
        out = dict.fromkeys(VIEW_STATES, 0)
        for r in found:
            out[view_state(r["state"], "x" if r["err"] else None)] += r["n"]
        return out

    async def audit(self, task_id: int) -> list[AuditEntry]:
        found = await self._journal.read(
            rows, "SELECT * FROM task_audit WHERE task_id = ? ORDER BY id", (task_id,)
        )
        return [_audit(r) for r in found]

    async def retry(
        self, task_ids: Sequence[int], *, actor: str, reason: str
    ) -> list[ActionResult]:
        """Make tasks ready now with a fresh set of attempts (dead, dropped, or pending
        waiting out a backoff). One transaction."""
        return await self._journal.write(
            self._apply, "retry", list(task_ids), actor, reason, RETRYABLE_FROM
        )

    async def drop(
        self,
        task_ids: Sequence[int],
        *,
        actor: str,
        reason: str,
        only_from: Sequence[str] = DROPPABLE_FROM,
    ) -> list[ActionResult]:
        """Give up on tasks (pending or dead; `only_from` narrows it, e.g. to `dead` for a
        job that decided on a dead letter and must not drop it once an operator retried
        it): state `dropped`, never leased again. One transaction."""
        allowed = tuple(s for s in only_from if s in DROPPABLE_FROM)
        return await self._journal.write(
            self._apply, "drop", list(task_ids), actor, reason, allowed
        )

    async def cancel(
        self, task_ids: Sequence[int], *, actor: str, reason: str
    ) -> list[ActionResult]:
        """End pending tasks as `cancelled` with `reason` as their last error: work the
        rules in force no longer allow (a failover moved their rule). One transaction."""
        return await self._journal.write(
            self._apply, "cancel", list(task_ids), actor, reason, ("pending",)
        )

    async def dead_ids(self, *, rule: str | None = None, target: str | None = None) -> list[int]:
        return [
            v.task.id for v in await self.list_tasks(["dead"], rule=rule, target=target, limit=-1)
        ]

    def _apply(
        self,
        db: sqlite_utils.Database,
        action: str,
        task_ids: list[int],
        actor: str,
        reason: str,
        allowed: tuple[str, ...],
    ) -> list[ActionResult]:
        now = self._clock()
        results: list[ActionResult] = []
        for task_id in task_ids:
            row = db.execute("SELECT state, key FROM tasks WHERE id = ?", (task_id,)).fetchone()
            if row is None:
                results.append(ActionResult(task_id, "not found"))
                continue
            state, key = row
            if state not in allowed:
                why = "a worker is running it" if state == "leased" else f"it is {state}"
                results.append(ActionResult(task_id, "refused", f"{action} refused: {why}"))
                continue
            outcome: Outcome
            if action == "cancel":
                db.execute(
                    "UPDATE tasks SET state = 'cancelled', last_error = ?, updated_at = ? "
                    "WHERE id = ?",
                    (reason[:2000], now, task_id),
                )
                outcome, detail = "cancelled", ""
            elif action == "drop":
                db.execute(
                    "UPDATE tasks SET state = 'dropped', next_try = ?, updated_at = ? WHERE id = ?",
                    (now, now, task_id),
                )
                outcome, detail = "dropped", ""
            elif (
                state != "pending"
                and db.execute(
                    "SELECT 1 FROM tasks WHERE key = ? AND state IN ('pending', 'leased') "
                    "AND id <> ?",
                    (key, task_id),
                ).fetchone()
            ):
                db.execute(
                    "UPDATE tasks SET state = 'cancelled', updated_at = ? WHERE id = ?",
                    (now, task_id),
                )
                outcome, detail = "superseded", "newer work for the same tag is queued"
            else:
                db.execute(
                    "UPDATE tasks SET state = 'pending', attempts = 0, next_try = ?, "
                    "updated_at = ? WHERE id = ?",
                    (now, now, task_id),
                )
                outcome, detail = "retried", ""
            db.execute(
                "INSERT INTO task_audit (task_id, action, actor, reason, state_before, at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (task_id, action, actor, reason, state, now),
            )
            results.append(ActionResult(task_id, outcome, detail))
        return results


def _views(db: sqlite_utils.Database, sql: str, params: Any) -> list[TaskView]:
    tasks = [Task.from_row(r) for r in db.query(sql, params)]
    audits: dict[int, AuditEntry] = {}
    ids = [t.id for t in tasks]
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        for r in db.query(
            f"SELECT * FROM task_audit WHERE task_id IN ({marks}) ORDER BY id", chunk
        ):
            audits[r["task_id"]] = _audit(r)  # the last one wins
    return [TaskView(t, view_state(t.state, t.last_error), audits.get(t.id)) for t in tasks]


def _audit(r: dict[str, Any]) -> AuditEntry:
    return AuditEntry(
        task_id=r["task_id"],
        action=r["action"],
        actor=r["actor"],
        reason=r["reason"],
        state_before=r["state_before"],
        at=r["at"],
    )
