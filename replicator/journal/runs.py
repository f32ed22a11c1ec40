"""Runs in the journal: reconcile passes, GC runs with their candidates, failovers.

* `sync_runs`: one row per reconcile pass (status shows the last one per rule).
* `gc_runs` / `gc_candidates`: a GC run moves marking -> sweeping -> done (or
  failed); each candidate moves candidate -> quarantined -> deleted, or ->
  restored, or -> kept (dropped by a re-check) / error. The storage collector
  journals each quarantine path *before* it renames anything, so after a crash the
  journal always says where a moved item may be and a later run finishes the job.
* `failovers`: an active row rewrites the rules in force (`rules_in_force`) until
  failback ends it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import astuple, dataclass, field
from typing import Any

import sqlite_utils

from replicator.journal.core import JournalConnection, executemany, rows
from replicator.journal.tombstones import (
    Tombstone,
    gc_run_marker,
    insert_missing_tombstones,
    withdraw_tombstones,
)

UNFINISHED_GC = ("marking", "sweeping", "quarantined")


class SyncRuns:
    """The `sync_runs` table."""

    def __init__(self, journal: JournalConnection) -> None:
        self._journal = journal

    async def start(self, rule_names: Sequence[str] | None, dry_run: bool) -> int:
        """A reconcile pass over `rule_names` (None: every rule) began; returns its id."""
        row = {
            "rule": ",".join(rule_names) if rule_names else None,
            "started_at": time.time(),
            "dry_run": int(dry_run),
            "state": "running",
        }
        return await self._journal.write(_insert, "sync_runs", row)

    async def finish(self, run_id: int, state: str, result: dict[str, Any]) -> None:
        await self._journal.write(
            _update,
            "sync_runs",
            run_id,
            {"finished_at": time.time(), "state": state, "result": json.dumps(result)},
        )


@dataclass
class CandidateRow:
    """One thing a GC run may delete."""

    kind: str  # blob | manifest | tag | link | upload
    key: str
    repository: str | None
    digest: str | None
    bytes: int
    state: str = "candidate"
    quarantine_path: str | None = None
    error: str | None = None


# (kind, key, state, error) of one candidate
CandidateUpdate = tuple[str, str, str, str | None]


class GCRuns:
    """The `gc_runs` and `gc_candidates` tables."""

    def __init__(self, journal: JournalConnection) -> None:
        self._journal = journal

    async def start(self, site: str, mode: str, policy: str | None, dry_run: bool) -> int:
        row = {
            "site": site,
            "mode": mode,
            "policy": policy,
            "dry_run": int(dry_run),
            "state": "marking",
            "started_at": time.time(),
        }
        return await self._journal.write(_insert, "gc_runs", row)

    async def set_state(
        self, run_id: int, state: str, *, mark_summary: dict[str, Any] | None = None
    ) -> None:
        changes: dict[str, Any] = {"state": state}
        if mark_summary is not None:
            changes["mark_summary"] = json.dumps(mark_summary)
        await self._journal.write(_update, "gc_runs", run_id, changes)

    async def add_candidates(
        self,
        run_id: int,
        candidates: Iterable[CandidateRow],
        tombstones: Sequence[Tombstone] = (),
    ) -> None:
        """Insert (or replace) candidates in one transaction; a sweep can name 10^5. With
        the tombstones of the tags and manifests about to be moved out of the registry's
        sight (detail ending in `gc_run_marker(run_id)`), in the same transaction."""
        await self._journal.write(
            _insert_candidates,
            [(run_id, *astuple(c)) for c in candidates],
            tombstones,
            time.time(),
            gc_run_marker(run_id),
        )

    async def update_candidates(
        self,
        run_id: int,
        updates: Iterable[CandidateUpdate],
        tombstones: Sequence[Tombstone] = (),
        withdrawn: Sequence[Tombstone] = (),
    ) -> None:
        """New state and error for many candidates in one transaction, together with the
        tombstones of those deleted (unless the run wrote them already): a crash never
        leaves "deleted" without its record; and without the run's tombstones of items
        it put back (`withdrawn`)."""
        await self._journal.write(
            _update_candidates,
            [(state, error, run_id, kind, key) for kind, key, state, error in updates],
            (tombstones, withdrawn),
            time.time(),
            gc_run_marker(run_id),
        )

    async def finish(self, run_id: int, state: str, stats: dict[str, Any]) -> None:
        await self._journal.write(
            _update,
            "gc_runs",
            run_id,
            {"state": state, "finished_at": time.time(), "stats": json.dumps(stats)},
        )

    async def unfinished(self, site: str, mode: str) -> list[dict[str, Any]]:
        """Real (not dry) runs of this site and mode that never reached done/failed."""
        return await self._journal.read(
            rows,
            "SELECT * FROM gc_runs WHERE site=? AND mode=? AND dry_run=0 AND state IN (?, ?, ?) "
            "ORDER BY id",
            (site, mode, *UNFINISHED_GC),
        )

    async def candidates(
        self, run_id: int, states: tuple[str, ...] | None = None
    ) -> list[dict[str, Any]]:
        if not states:
            return await self._journal.read(
                rows, "SELECT * FROM gc_candidates WHERE run_id=?", (run_id,)
            )
        marks = ",".join("?" * len(states))
        return await self._journal.read(
            rows,
            f"SELECT * FROM gc_candidates WHERE run_id=? AND state IN ({marks})",
            (run_id, *states),
        )

    async def get(self, run_id: int) -> dict[str, Any] | None:
        """The run's row, its JSON columns decoded; None when there is no such run."""
        found = await self._journal.read(rows, "SELECT * FROM gc_runs WHERE id=?", (run_id,))
        if not found:
            return None
        row = found[0]
        for k in ("mark_summary", "stats"):
            if row.get(k):
                row[k] = json.loads(row[k])
        return row


@dataclass(frozen=True)
class Failover:
    id: int
    lost_site: str
    promoted_site: str
    started_at: float
    detail: dict[str, Any] = field(default_factory=dict, compare=False)


class Failovers:
    """The `failovers` table."""

    def __init__(self, journal: JournalConnection) -> None:
        self._journal = journal

    async def record(self, lost: str, promoted: str, detail: dict[str, Any]) -> int:
        """`promoted` replaces `lost` from now on; returns the failover's id."""
        row = {
            "lost_site": lost,
            "promoted_site": promoted,
            "started_at": time.time(),
            "active": 1,
            "detail": json.dumps(detail),
        }
        return await self._journal.write(_insert, "failovers", row)

    async def active(self, *, with_detail: bool = True) -> list[Failover]:
        """Failovers in force, oldest first (the order `effective_rules` applies them).
        Without `detail` (its `held` record can be large) for a check made per task."""
        found = await self._journal.read(
            rows,
            "SELECT id, lost_site, promoted_site, started_at"
            + (", detail" if with_detail else "")
            + " FROM failovers WHERE active = 1 ORDER BY id",
        )
        return [Failover(**{**r, "detail": json.loads(r.get("detail") or "{}")}) for r in found]

    async def end(self, ids: Sequence[int]) -> None:
        """Failback: these failovers no longer rewrite the rules."""
        now = time.time()
        await self._journal.write(
            executemany,
            "UPDATE failovers SET active = 0, ended_at = ? WHERE id = ?",
            [(now, i) for i in ids],
        )


def _insert(db: sqlite_utils.Database, table: str, row: dict[str, Any]) -> int:
    rowid = db.table(table).insert(row).last_rowid
    assert rowid is not None  # an INSERT without OR IGNORE either inserts or raises
    return rowid


def _update(db: sqlite_utils.Database, table: str, row_id: int, changes: dict[str, Any]) -> None:
    db.table(table).update(row_id, changes)


def _insert_candidates(
    db: sqlite_utils.Database,
    rows: list[tuple[Any, ...]],
    tombstones: Sequence[Tombstone],
    now: float,
    marker: str,
) -> None:
    db.conn.executemany(
        "INSERT OR REPLACE INTO gc_candidates(run_id, kind, key, repository, digest, "
        "bytes, state, quarantine_path, error) VALUES (?,?,?,?,?,?,?,?,?)",
        rows,
    )
    insert_missing_tombstones(db, tombstones, now, marker)


def _update_candidates(
    db: sqlite_utils.Database,
    states: list[tuple[Any, ...]],
    tombstones: tuple[Sequence[Tombstone], Sequence[Tombstone]],
    now: float,
    marker: str,
) -> None:
    db.conn.executemany(
        "UPDATE gc_candidates SET state=?, error=? WHERE run_id=? AND kind=? AND key=?", states
    )
    written, withdrawn = tombstones
    insert_missing_tombstones(db, written, now, marker)
    withdraw_tombstones(db, withdrawn, marker)
