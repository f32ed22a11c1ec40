"""GC runs in the journal: what a run marked, what it will delete, and how far it got.

Tables gc_runs / gc_candidates (schema v1). A run moves marking -> sweeping ->
done (or failed). Each candidate moves candidate -> quarantined -> deleted, or
-> restored, or -> kept (dropped by a re-check) / error. The quarantine path is
written *before* anything is renamed, so after a crash the journal always says
where a moved item may be; a later run finishes the job (see storage.resume).

Without a journal the recorder still works in memory, so a one-off CLI run or
a benchmark needs no database (it just cannot resume).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from replicator.journal import Journal

UNFINISHED = ("marking", "sweeping")


@dataclass
class CandidateRow:
    kind: str  # blob | manifest | tag | link | upload
    key: str
    repository: str | None
    digest: str | None
    bytes: int
    state: str = "candidate"
    quarantine_path: str | None = None
    error: str | None = None


class RunRecorder:
    """Writes one run's progress; batched, because a sweep can touch 10^5 items."""

    def __init__(
        self,
        journal: Journal | None,
        *,
        site: str,
        mode: str,
        policy: str | None,
        dry_run: bool,
        run_id: int | None = None,
    ) -> None:
        self.journal = journal
        self.site, self.mode, self.policy, self.dry_run = site, mode, policy, dry_run
        self.run_id = run_id

    def start(self) -> int:
        if self.journal is None:
            self.run_id = int(time.time() * 1000)
            return self.run_id
        with self.journal.transaction() as conn:
            cur = conn.execute(
                "INSERT INTO gc_runs(site, mode, policy, dry_run, state, started_at) "
                "VALUES (?, ?, ?, ?, 'marking', ?)",
                (self.site, self.mode, self.policy, int(self.dry_run), time.time()),
            )
            self.run_id = int(cur.lastrowid)
        return self.run_id

    def set_state(self, state: str, *, mark_summary: dict[str, Any] | None = None) -> None:
        if self.journal is None:
            return
        if mark_summary is not None:
            self.journal.execute(
                "UPDATE gc_runs SET state=?, mark_summary=? WHERE id=?",
                (state, json.dumps(mark_summary), self.run_id),
            )
        else:
            self.journal.execute("UPDATE gc_runs SET state=? WHERE id=?", (state, self.run_id))

    def add_candidates(self, rows: Iterable[CandidateRow]) -> None:
        if self.journal is None:
            return
        with self.journal.transaction() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO gc_candidates(run_id, kind, key, repository, digest, "
                "bytes, state, quarantine_path, error) VALUES (?,?,?,?,?,?,?,?,?)",
                [
                    (
                        self.run_id,
                        r.kind,
                        r.key,
                        r.repository,
                        r.digest,
                        r.bytes,
                        r.state,
                        r.quarantine_path,
                        r.error,
                    )
                    for r in rows
                ],
            )

    def update_states(self, updates: Iterable[tuple[str, str, str, str | None]]) -> None:
        """(kind, key, state, error) for many candidates in one transaction."""
        if self.journal is None:
            return
        with self.journal.transaction() as conn:
            conn.executemany(
                "UPDATE gc_candidates SET state=?, error=? WHERE run_id=? AND kind=? AND key=?",
                [(state, error, self.run_id, kind, key) for kind, key, state, error in updates],
            )

    def finish(self, state: str, stats: dict[str, Any]) -> None:
        if self.journal is None:
            return
        self.journal.execute(
            "UPDATE gc_runs SET state=?, finished_at=?, stats=? WHERE id=?",
            (state, time.time(), json.dumps(stats), self.run_id),
        )


def unfinished_runs(journal: Journal, site: str, mode: str) -> list[dict[str, Any]]:
    """Real (not dry) runs of this site and mode that never reached done/failed."""
    return journal.query(
        "SELECT * FROM gc_runs WHERE site=? AND mode=? AND dry_run=0 AND state IN (?, ?) "
        "ORDER BY id",
        (site, mode, *UNFINISHED),
    )


def run_candidates(
    journal: Journal, run_id: int, states: tuple[str, ...] | None = None
) -> list[dict[str, Any]]:
    if states:
        marks = ",".join("?" * len(states))
        return journal.query(
            f"SELECT * FROM gc_candidates WHERE run_id=? AND state IN ({marks})", (run_id, *states)
        )
    return journal.query("SELECT * FROM gc_candidates WHERE run_id=?", (run_id,))


def get_run(journal: Journal, run_id: int) -> dict[str, Any] | None:
    rows = journal.query("SELECT * FROM gc_runs WHERE id=?", (run_id,))
    if not rows:
        return None
    row = rows[0]
    for k in ("mark_summary", "stats"):
        if row.get(k):
            row[k] = json.loads(row[k])
    return row
