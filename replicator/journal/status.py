"""The journal rows `replicator.status` turns into a status report: one read, one snapshot.

Aggregates over tasks, reconcile runs, active failovers and the replication ledger;
read inside one read transaction so the four agree with each other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlite_utils

from replicator.journal.core import JournalConnection, rows


@dataclass
class StatusRows:
    """What `compute_status` needs from the journal."""

    tasks: Sequence[Mapping[str, Any]]  # rule, target_site, state, n, oldest
    runs: Sequence[Mapping[str, Any]]  # sync_runs rows, newest first, no dry runs
    failovers: Sequence[Mapping[str, Any]]  # active failovers rows, oldest first
    replicated: Sequence[Mapping[str, Any]]  # source_site, target_site, last_at


# what an operator calls the unfinished states: pending without an error is `queued`,
# pending after a failed attempt (waiting out its backoff) is `retry`, leased is `running`
QUEUE_KINDS: tuple[str, ...] = ("queued", "running", "retry", "dead")


@dataclass(frozen=True)
class QueueSummary:
    counts: Mapping[str, int]  # QUEUE_KINDS -> tasks
    oldest_unfinished_at: float | None  # created_at of the oldest queued, running or retry


class StatusView:
    """Read-only aggregates for `registry-replicator status`."""

    def __init__(self, journal: JournalConnection) -> None:
        self._journal = journal

    async def rows(self, recent_runs: int = 500) -> StatusRows:
        return await self._journal.read(_read, recent_runs)

    async def queue_summary(self) -> QueueSummary:
        """What an instance tells the fleet about its queue (one small grouped read)."""
        found = await self._journal.read(
            rows,
            "SELECT CASE WHEN state = 'leased' THEN 'running' WHEN state = 'dead' THEN 'dead' "
            "WHEN last_error IS NOT NULL THEN 'retry' ELSE 'queued' END AS kind, "
            "COUNT(*) AS n, MIN(created_at) AS oldest "
            "FROM tasks WHERE state IN ('pending', 'leased', 'dead') GROUP BY kind",
        )
        counts = {kind: 0 for kind in QUEUE_KINDS}
        oldest: float | None = None
        for row in found:
            counts[row["kind"]] = int(row["n"])
            if row["kind"] != "dead" and row["oldest"] is not None:
                oldest = row["oldest"] if oldest is None else min(oldest, row["oldest"])
        return QueueSummary(counts, oldest)


def _read(db: sqlite_utils.Database, recent_runs: int) -> StatusRows:
    db.conn.execute("BEGIN")  # deferred: a read snapshot, no lock taken
    try:
        return StatusRows(
            tasks=rows(
                db,
                "SELECT rule, target_site, state, COUNT(*) AS n, MIN(created_at) AS oldest "
                "FROM tasks WHERE state IN ('pending', 'leased', 'dead') "
                "GROUP BY rule, target_site, state",
            ),
            runs=rows(
                db,
                "SELECT id, rule, started_at, finished_at, state, result FROM sync_runs "
                "WHERE dry_run = 0 ORDER BY id DESC LIMIT ?",
                (recent_runs,),
            ),
            failovers=rows(
                db,
                "SELECT id, lost_site, promoted_site, started_at, detail FROM failovers "
                "WHERE active = 1 ORDER BY id",
            ),
            replicated=rows(
                db,
                "SELECT source_site, target_site, MAX(at) AS last_at FROM replicated "
                "GROUP BY source_site, target_site",
            ),
        )
    finally:
        db.conn.execute("COMMIT")
