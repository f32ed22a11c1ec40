"""What the journal knows each site holds: tag -> digest, with when it was pushed.

Fed by scans (reconcile: first-seen times) and by webhooks (push times from the
registry's own timestamps). Retention policies read push times from here, and
the immutable-tag fast path and failover read the digests.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from replicator.journal import Journal


def record_tags(
    journal: Journal,
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
    with journal.transaction() as conn:
        conn.executemany(
            "INSERT INTO inventory_tags(site, repository, tag, digest, pushed_at, first_seen) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(site, repository, tag) DO UPDATE SET "
            "pushed_at = CASE WHEN inventory_tags.digest = excluded.digest "
            "  THEN COALESCE(excluded.pushed_at, inventory_tags.pushed_at) "
            "  ELSE excluded.pushed_at END, "
            "first_seen = CASE WHEN inventory_tags.digest = excluded.digest "
            "  THEN inventory_tags.first_seen ELSE excluded.first_seen END, "
            "digest = excluded.digest",
            [(site, repository, t, d, pushed_at, now) for t, d in tags.items()],
        )


def forget(
    journal: Journal,
    site: str,
    repository: str,
    *,
    tag: str | None = None,
    digest: str | None = None,
) -> None:
    """A tag (or every tag pointing at a digest) was deleted at `site`."""
    if tag is not None:
        journal.execute(
            "DELETE FROM inventory_tags WHERE site = ? AND repository = ? AND tag = ?",
            (site, repository, tag),
        )
    elif digest is not None:
        journal.execute(
            "DELETE FROM inventory_tags WHERE site = ? AND repository = ? AND digest = ?",
            (site, repository, digest),
        )
