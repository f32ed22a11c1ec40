"""The ledger of what we replicated where (table `replicated`).

One row per (target site, repository, digest): the site it came from, when, and the
tags we pushed it by. Three readers depend on it:

* loop prevention in an A<->B mesh: the copier records a manifest BEFORE it PUTs
  it at a target; when that target's registry then reports the push,
  `was_replicated_here` names the site it came from and the daemon does not bounce
  the event back;
* the immutable-tag fast path of `sync` (`tags_at`);
* failover, which ranks replicas' digests by what came from the lost primary
  (`from_source`).

Every writer goes through `record`, which merges the tag into those already recorded
for the same source, so one writer cannot wipe another's tags.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import sqlite_utils

from replicator.journal.core import JournalConnection, rows

DEFAULT_REPLICATED_WINDOW = 3600.0
_MAX_TAGS = 64


@dataclass(frozen=True)
class LedgerEntry:
    digest: str
    source_site: str
    at: float
    tags: list[str] | None  # None: recorded by digest only


class Ledger:
    """The `replicated` table; `clock` is injectable for tests of the time window."""

    def __init__(self, journal: JournalConnection, clock: Callable[[], float] = time.time) -> None:
        self._journal = journal
        self._clock = clock

    async def record(
        self,
        target_site: str,
        repository: str,
        digest: str,
        source_site: str,
        tag: str | None = None,
    ) -> None:
        """Record that we push (or pushed) `digest`, by `tag` if any, into `repository` at
        `target_site`, merging the tag into those already recorded for the same source.
        The loop guard calls it BEFORE the manifest PUT: the target's webhook can arrive
        before the PUT returns."""
        await self._journal.write(
            _merge, target_site, repository, digest, source_site, tag, self._clock()
        )

    async def was_replicated_here(
        self,
        site: str,
        repository: str,
        digest: str,
        tag: str | None = None,
        within: float | None = DEFAULT_REPLICATED_WINDOW,
    ) -> str | None:
        """The site we replicated `repository@digest` from into `site`, if our own push
        explains an event there, else None. With `tag`, the record must name that tag
        (a re-tag of the same digest at `site` is a genuine change to replicate); the
        `within` window (seconds, None: forever) stops an old record from silencing a
        genuine later push of the same content."""
        found = await self._journal.read(
            rows,
            "SELECT source_site, at, tags FROM replicated WHERE target_site=? AND "
            "repository=? AND digest=?",
            (site, repository, digest),
        )
        if not found:
            return None
        row = found[0]
        if within is not None and row["at"] < self._clock() - within:
            return None
        if tag is not None and tag not in json.loads(row["tags"] or "[]"):
            return None
        return str(row["source_site"])

    async def tags_at(self, target_site: str, repository: str) -> list[tuple[str, list[str]]]:
        """(digest, tags) we pushed into `repository` at `target_site` by tag, oldest
        first (so a later record of a tag overrides an earlier one when folded)."""
        found = await self._journal.read(
            rows,
            "SELECT digest, tags FROM replicated WHERE target_site = ? AND "
            "repository = ? AND tags IS NOT NULL ORDER BY at",
            (target_site, repository),
        )
        return [(r["digest"], json.loads(r["tags"])) for r in found]

    async def from_source(self, source_site: str, repository: str) -> list[LedgerEntry]:
        """Everything replicated from `source_site`'s `repository`, to any target."""
        found = await self._journal.read(
            rows,
            "SELECT digest, source_site, at, tags FROM replicated "
            "WHERE source_site = ? AND repository = ?",
            (source_site, repository),
        )
        return [
            LedgerEntry(r["digest"], r["source_site"], r["at"], json.loads(r["tags"] or "null"))
            for r in found
        ]


def _merge(
    db: sqlite_utils.Database,
    target_site: str,
    repository: str,
    digest: str,
    source_site: str,
    tag: str | None,
    at: float,
) -> None:
    key = (target_site, repository, digest)
    row = db.execute(
        "SELECT source_site, tags FROM replicated WHERE target_site=? AND "
        "repository=? AND digest=?",
        key,
    ).fetchone()
    tags: list[str] = []
    if row is not None and row[0] == source_site and row[1]:
        tags = json.loads(row[1])
    if tag is not None and tag not in tags:
        tags = [*tags, tag][-_MAX_TAGS:]
    # a statement, not sqlite-utils' insert (which reads the schema each call): once per tag
    db.execute(
        "INSERT OR REPLACE INTO replicated (target_site, repository, digest, source_site, at, "
        "tags) VALUES (?, ?, ?, ?, ?, ?)",
        (target_site, repository, digest, source_site, at, json.dumps(tags) if tags else None),
    )
