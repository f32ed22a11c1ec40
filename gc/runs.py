"""One GC run's progress as the collectors report it: what it marked, what it will
delete, and how far it got (stored by `replicator.journal.runs.GCRuns`).

A run moves marking -> sweeping -> done (or failed). Each candidate moves
candidate -> quarantined -> deleted, or -> restored, or -> kept (dropped by a
re-check) / error. The quarantine path is written *before* anything is renamed, so
after a crash the journal always says where a moved item may be; a later run
finishes the job (see storage.resume).

Without a journal the recorder still works in memory, so a one-off CLI run or
a benchmark needs no database (it just cannot resume).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

from replicator.journal import Journal, Tombstone
from replicator.journal.runs import CandidateRow, CandidateUpdate

__all__ = ["CandidateRow", "CandidateUpdate", "RunRecorder"]


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

    async def start(self) -> int:
        if self.journal is None:
            self.run_id = int(time.time() * 1000)
        else:
            self.run_id = await self.journal.gc_runs.start(
                self.site, self.mode, self.policy, self.dry_run
            )
        return self.run_id

    async def set_state(self, state: str, *, mark_summary: dict[str, Any] | None = None) -> None:
        if self.journal is not None:
            await self.journal.gc_runs.set_state(self._id, state, mark_summary=mark_summary)

    async def add_candidates(
        self, rows: Iterable[CandidateRow], tombstones: Sequence[Tombstone] = ()
    ) -> None:
        """Journal the candidates, with the tombstones of those about to leave the
        registry's sight (one transaction, before any of them moves)."""
        if self.journal is not None:
            await self.journal.gc_runs.add_candidates(self._id, rows, tombstones)

    async def update_states(
        self,
        updates: Iterable[CandidateUpdate],
        tombstones: Sequence[Tombstone] = (),
        withdrawn: Sequence[Tombstone] = (),
    ) -> None:
        """(kind, key, state, error) for many candidates in one transaction, with the
        tombstones of what they deleted (the same transaction: no "deleted" without one)
        and without those of what the run put back (`withdrawn`)."""
        if self.journal is not None:
            await self.journal.gc_runs.update_candidates(self._id, updates, tombstones, withdrawn)

    async def finish(self, state: str, stats: dict[str, Any]) -> None:
        if self.journal is not None:
            await self.journal.gc_runs.finish(self._id, state, stats)

    @property
    def _id(self) -> int:
        if self.run_id is None:
            raise RuntimeError("RunRecorder: start() the run first")
        return self.run_id
