"""What the journal knows each site holds: tag -> digest, with when it was pushed.

Fed by scans (reconcile: first-seen times) and by webhooks (push times from the
registry's own timestamps). Retention policies read push times from here, and
the immutable-tag fast path and failover read the digests.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from replicator.journal.core import JournalConnection, executemany, rows

_UPSERT = (
    "INSERT INTO inventory_tags(site, repository, tag, digest, pushed_at, first_seen) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(site, repository, tag) DO UPDATE SET "
    "pushed_at = CASE WHEN inventory_tags.digest = excluded.digest "
    "  THEN COALESCE(excluded.pushed_at, inventory_tags.pushed_at) "
    "  ELSE excluded.pushed_at END, "
    "first_seen = CASE WHEN inventory_tags.digest = excluded.digest "
    "  THEN inventory_tags.first_seen ELSE excluded.first_seen END, "
    "digest = excluded.digest"
)


class Inventory:
    """The `inventory_tags` table."""

    def __init__(self, journal: JournalConnection) -> None:
        self._journal = journal

    async def record_tags(
        self,
        site: str,
        repository: str,
        tags: Mapping[str, str],
        pushed_at: float | None = None,
    ) -> None:
        """Upsert tag -> digest; first_seen restarts when a tag moves to another digest,
        and a known push time is kept unless a newer one is given."""
        if not tags:
            return
        now = time.time()
        await self._journal.write(
            executemany,
            _UPSERT,
            [(site, repository, t, d, pushed_at, now) for t, d in tags.items()],
        )

    async def forget(
        self, site: str, repository: str, *, tag: str | None = None, digest: str | None = None
    ) -> None:
        """A tag (or every tag pointing at a digest) was deleted at `site`."""
        if tag is not None:
            column, value = "tag", tag
        elif digest is not None:
            column, value = "digest", digest
        else:
            return
        await self._journal.write(
            executemany,
            f"DELETE FROM inventory_tags WHERE site = ? AND repository = ? AND {column} = ?",
            [(site, repository, value)],
        )

    async def push_times(self, site: str, repository: str) -> dict[str, float]:
        """When each tag of `site`/`repository` was pushed (else first seen): what
        `latest: N` and retention policies rank tags by."""
        found = await self._journal.read(
            rows,
            "SELECT tag, COALESCE(pushed_at, first_seen) AS t FROM inventory_tags "
            "WHERE site = ? AND repository = ?",
            (site, repository),
        )
        return {r["tag"]: r["t"] for r in found}

    async def digests(self, site: str, repository: str) -> dict[str, str]:
        """tag -> digest as last recorded at `site`."""
        found = await self._journal.read(
            rows,
            "SELECT tag, digest FROM inventory_tags WHERE site = ? AND repository = ?",
            (site, repository),
        )
        return {r["tag"]: r["digest"] for r in found}

    async def sightings(self, site: str, repository: str) -> list[tuple[str, str, float]]:
        """(tag, digest, latest of push time and first seen) for every recorded tag: when
        `site` was last known to hold the tag at that digest."""
        found = await self._journal.read(
            rows,
            "SELECT tag, digest, MAX(COALESCE(pushed_at, 0), first_seen) AS t "
            "FROM inventory_tags WHERE site = ? AND repository = ?",
            (site, repository),
        )
        return [(r["tag"], r["digest"], r["t"]) for r in found]
