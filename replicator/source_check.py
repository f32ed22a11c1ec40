"""The source is the truth right before a tag is written at a target.

A copy runs for seconds to minutes. Meanwhile the source tag may be deleted or pushed
again, and the event saying so may be handled by another daemon on its own journal (a
shared MQTT group), by the next reconcile, or by nobody yet: no journal can tell a
copy that it went stale. So right before the tag PUT the copy asks the source itself
(one HEAD) where the tag points; when it no longer points at the digest being copied
(moved, or gone), nothing is written and the copy ends superseded: the delete, or the
newer copy, is other work's to do. A source that cannot answer (5xx, timeout) raises
its RegistryError, and the copy fails retryable without writing.

Distribution sends a push event before it writes the tag, so a daemon copying right
after an event could see the previous digest, or 404, for a moment: the daemon asks
again for a short settle time before it believes a mismatch. `sync` needs none (it
planned from a HEAD made after the tag was written).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from replicator import store_tags
from replicator.copy import CopyJob
from replicator.errors import ReplicatorError

# How long a daemon copy keeps asking before it believes the source moved: distribution
# writes the tag right after it queues the push event (microseconds to milliseconds).
DAEMON_SETTLE_SECONDS = 1.0
_FIRST_RETRY = 0.05  # then doubling, within the settle time


class SourceMoved(ReplicatorError):
    """The source tag no longer points at the digest being copied: a newer copy (or the
    delete) is other work, and this copy must not write the older digest over it."""


def moved(expected: str, current: str | None) -> bool:
    """Whether the source tag, now at `current` (None: absent), moved off `expected`."""
    return current != expected


async def confirm_source_tag(
    job: CopyJob, tag: str, *, settle: float = 0.0, store: Path | None = None
) -> None:
    """Raise SourceMoved unless `job`'s source tag `tag` still points at the digest the
    copy read (`job.source_digest`); a mismatch is asked again for up to `settle` s.
    With the source's `store` (its `storage:`), the tag is read from disk where the disk
    settles it (`replicator.store_tags`): no request, as for the rest of such a sync."""
    expected = job.source_digest
    if expected is None:  # nothing read from the source yet: nothing to compare
        return
    deadline = time.monotonic() + settle
    pause = _FIRST_RETRY
    while True:
        current = await _source_digest(job, tag, store)
        if not moved(expected, current):
            return
        left = deadline - time.monotonic()
        if left <= 0:
            break
        await asyncio.sleep(min(pause, left))
        pause *= 2
    where = f"{job.source_site}/{job.src_repo}:{tag}"
    now = f"now points at {current}" if current else "no longer exists"
    raise SourceMoved(
        f"{where} {now}, not {expected}; not writing {job.target_site}/{job.dst_repo}:{tag}"
    )


async def _source_digest(job: CopyJob, tag: str, store: Path | None) -> str | None:
    if store is not None:
        settled, digest = await store_tags.tag(store, job.src_repo, tag)
        if settled:
            return digest
    head = await job.src.head_manifest(job.src_repo, tag)
    return head.digest if head is not None else None
