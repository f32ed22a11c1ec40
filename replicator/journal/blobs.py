"""Where each blob is known to live on each registry (table `blob_locations`).

Cross-repository mount only works inside one registry, so to avoid uploading a
shared layer again the copy engine needs a repository on *that* registry holding
it. This store keeps those facts across restarts; `replicator.blob_index.BlobIndex`
is the in-memory copy that answers the copy engine's hot path.
"""

from __future__ import annotations

import time

import sqlite_utils

from replicator.journal.core import JournalConnection, rows


class BlobLocations:
    """The `blob_locations` table."""

    def __init__(self, journal: JournalConnection) -> None:
        self._journal = journal

    async def on_registry(self, registry: str) -> list[tuple[str, str]]:
        """(digest, repository) known on `registry`, least recently verified first."""
        found = await self._journal.read(
            rows,
            "SELECT digest, repository FROM blob_locations WHERE registry = ? ORDER BY verified_at",
            (registry,),
        )
        return [(r["digest"], r["repository"]) for r in found]

    async def record(self, registry: str, digest: str, repository: str) -> None:
        """`repository` on `registry` holds `digest`, verified now."""
        await self._journal.write(_upsert, registry, digest, repository, time.time())

    async def forget(self, registry: str, digest: str, repository: str) -> None:
        """A mount from `repository` proved it no longer holds `digest`."""
        await self._journal.write(_delete, registry, digest, repository)


# One statement, not sqlite-utils' upsert: that reads the table's schema on every call,
# about 0.1 ms of CPU, and the copy engine records every blob it uploads, mounts or finds.
_UPSERT = (
    "INSERT INTO blob_locations (registry, digest, repository, verified_at) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (registry, digest, repository) DO UPDATE SET verified_at = excluded.verified_at"
)


def _upsert(
    db: sqlite_utils.Database, registry: str, digest: str, repository: str, at: float
) -> None:
    db.execute(_UPSERT, (registry, digest, repository, at))


def _delete(db: sqlite_utils.Database, registry: str, digest: str, repository: str) -> None:
    db.execute(
        "DELETE FROM blob_locations WHERE registry = ? AND digest = ? AND repository = ?",
        (registry, digest, repository),
    )
