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


class StatusView:
    """Read-only aggregates for `registry-replicator status`."""

    def __init__(self, journal: JournalConnection) -> None:
        self._journal = journal

    async def rows(self, recent_runs: int = 500) -> StatusRows:
        return await self._journal.read(_read, recent_runs)


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
