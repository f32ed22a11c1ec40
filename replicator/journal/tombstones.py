"""Tombstones: every delete the tool observed (a webhook) or made, propagating a delete
or applying a retention policy (table `tombstones`).

A tag missing at a site means either "deleted" or "never copied there"; only a
record of the delete tells them apart. Failback reads them (a tag deleted at the
promoted site during the incident must not come back from the returning site),
and the daemon reads its own (`performed`) to not bounce the delete webhook a
target sends about a delete we made there back to where it came from.

Tombstones are on our clock: failback and catch-up compare them with the ledger and
the failover's `started_at`, both ours. The daemon stamps an observed delete with the
time it handles the webhook, not the registry's timestamp (a registry clock behind
made a delete look older than the copy it undid, and the tag came back). An `at`
given by a caller is still never later than the moment it is recorded: a clock
ahead would make a delete from before an incident look like one during it and
delete a tag re-pushed since.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import sqlite_utils

from replicator.journal.core import JournalConnection, executemany, rows

# observed: a webhook; performed: a delete we propagated (the daemon does not echo its
# webhook); retention: a GC policy deleted it (its webhook still propagates as any delete)
Origin = Literal["observed", "performed", "retention"]
DEFAULT_OWN_DELETE_WINDOW = 3600.0


@dataclass(frozen=True)
class Tombstone:
    site: str
    repository: str
    tag: str | None  # None: deleted by digest
    digest: str | None  # None: not known (a tag delete event without one)
    at: float
    origin: Origin
    detail: str | None = None


INSERT = (
    "INSERT INTO tombstones(site, repository, tag, digest, at, origin, detail) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)


def tombstone_rows(stones: Sequence[Tombstone], now: float) -> list[tuple[object, ...]]:
    """Rows for INSERT, each stamped at most `now` (see the module docstring). Pure."""
    if any(s.tag is None and s.digest is None for s in stones):
        raise ValueError("a tombstone names a tag or a digest")
    return [
        (s.site, s.repository, s.tag, s.digest, min(s.at, now), s.origin, s.detail) for s in stones
    ]


def insert_tombstones(
    db: sqlite_utils.Database, stones: Sequence[Tombstone], now: float
) -> list[int]:
    """INSERT inside the caller's transaction (a GC settle writes its candidates' states
    and their tombstones together); returns the new ids."""
    ids = []
    for row in tombstone_rows(stones, now):
        cursor = db.conn.execute(INSERT, row)
        ids.append(int(cursor.lastrowid or 0))
    return ids


# one GC run's own tombstones: same place and name, and a detail ending in its marker
_SAME_RUN = (
    "site = ? AND repository = ? AND tag IS ? AND digest IS ? AND origin = ? AND detail LIKE ?"
)


def gc_run_marker(run_id: int) -> str:
    """The end of the detail of every tombstone a storage GC run writes: how the run's
    settle (maybe in a later process) finds the ones it wrote ahead of its moves."""
    return f" (gc run {run_id})"


def _same_run(s: Tombstone, marker: str) -> tuple[object, ...]:
    return (s.site, s.repository, s.tag, s.digest, s.origin, "%" + marker)


def insert_missing_tombstones(
    db: sqlite_utils.Database, stones: Sequence[Tombstone], now: float, marker: str
) -> None:
    """INSERT, inside the caller's transaction, each tombstone the run (`marker`) has
    not written yet: a settle confirms what its quarantine already recorded."""
    for stone, row in zip(stones, tombstone_rows(stones, now), strict=True):
        sql = "SELECT 1 FROM tombstones WHERE " + _SAME_RUN + " LIMIT 1"
        if db.conn.execute(sql, _same_run(stone, marker)).fetchone() is None:
            db.conn.execute(INSERT, row)


def withdraw_tombstones(
    db: sqlite_utils.Database, stones: Sequence[Tombstone], marker: str
) -> None:
    """DELETE, inside the caller's transaction, the run's tombstones of items it put
    back (restored, or kept because they changed before the move)."""
    db.conn.executemany(
        "DELETE FROM tombstones WHERE " + _SAME_RUN, [_same_run(s, marker) for s in stones]
    )


class Tombstones:
    """The `tombstones` table; `clock` is injectable for tests of time windows."""

    def __init__(self, journal: JournalConnection, clock: Callable[[], float] = time.time) -> None:
        self._journal = journal
        self._clock = clock

    async def record(
        self,
        site: str,
        repository: str,
        *,
        tag: str | None,
        digest: str | None,
        origin: Origin,
        at: float | None = None,
        detail: str | None = None,
    ) -> int:
        """Remember that `repository:tag` (or `@digest`) was deleted at `site`; `at` (the
        registry's time, if known) is clamped to now. Returns its id (for `retract`)."""
        now = self._clock()
        stone = Tombstone(site, repository, tag, digest, now if at is None else at, origin, detail)
        return (await self.record_all([stone]))[0]

    async def record_all(self, stones: Sequence[Tombstone]) -> list[int]:
        """Remember many deletes in one write; times clamped to now. Returns their ids (for
        `retract`: a GC writes a tombstone BEFORE its DELETE, so a process killed right
        after the registry carried it out still leaves the record)."""
        if not stones:
            return []
        return await self._journal.write(insert_tombstones, stones, self._clock())

    async def retract(self, ids: Sequence[int]) -> None:
        """Withdraw tombstones written ahead of a delete that then did not happen."""
        if ids:
            await self._journal.write(
                executemany, "DELETE FROM tombstones WHERE id = ?", [(i,) for i in ids]
            )

    async def name_digest(self, ids: Sequence[int], digest: str) -> None:
        """Set the digest of tombstones written ahead of a tag delete, once the delete
        found out what the tag pointed at."""
        if ids:
            await self._journal.write(
                executemany,
                "UPDATE tombstones SET digest = ? WHERE id = ?",
                [(digest, i) for i in ids],
            )

    async def at_site(
        self, site: str, repository: str | None = None, since: float | None = None
    ) -> list[Tombstone]:
        """Deletes at `site` (optionally one repository, at or after `since`), oldest first."""
        query = (
            "SELECT site, repository, tag, digest, at, origin, detail FROM tombstones "
            "WHERE site = ?"
        )
        params: list[object] = [site]
        if repository is not None:
            query += " AND repository = ?"
            params.append(repository)
        if since is not None:
            query += " AND at >= ?"
            params.append(since)
        found = await self._journal.read(rows, query + " ORDER BY at, id", tuple(params))
        return [Tombstone(**r) for r in found]

    async def performed_here(
        self,
        site: str,
        repository: str,
        *,
        tag: str | None = None,
        digest: str | None = None,
        within: float = DEFAULT_OWN_DELETE_WINDOW,
    ) -> bool:
        """Whether we deleted `repository:tag` (or `@digest`) at `site` in the last `within`
        seconds: the target's webhook about it is then our own delete, not news."""
        column, value = ("tag", tag) if tag is not None else ("digest", digest)
        if value is None:
            return False
        found = await self._journal.read(
            rows,
            f"SELECT 1 FROM tombstones WHERE site = ? AND repository = ? AND {column} = ? "
            "AND origin = 'performed' AND at >= ? LIMIT 1",
            (site, repository, value, self._clock() - within),
        )
        return bool(found)
