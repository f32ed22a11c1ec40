"""Webhook events in the journal: the durable hand-over point between intake and bus.

An event is answered 2xx only after it is here, and it stays in state `new` until
whoever consumes it marks it `dispatched` (or `ignored`), so a crash between
intake and dispatch loses nothing: on start the daemon re-reads `new` events.
(site, event id) is the primary key, which makes redelivery harmless; ids are only
unique per registry (and predictable for Harbor), so one site's events can never
suppress another's.

Growth follows the registry's content, not its traffic. Pulls (a busy registry sends
one per manifest and layer fetched, and nothing replicates them) are counted per site
and repository in `pull_counts`; a manifest pull is also kept as a row only when
`keep_pull_rows` is on (the daemon turns it on when a GC policy uses `pulled_within`;
on for a bare store, as it always was) and the pull was not registry-replicator's own
read (`own_read`: copy and verify reads are no client's use of an image). `prune`
deletes handled events older than the retention that no reader needs: blob traffic,
and every event about an object (site, repository, action, tag, digest) but its first
and its last -- readers (GC's
push and pull times) take the earliest or the latest time of each, so their answers
do not change. Events still `new` are never pruned.
Redelivery is de-duplicated within the retention only, which is why it is at least
an hour.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlite_utils

from replicator.events import MANIFEST_TYPES, RegistryEvent
from replicator.journal.core import JournalConnection, changed, rows

EVENT_STATES: frozenset[str] = frozenset({"new", "dispatched", "ignored"})

_COLUMNS = (
    "id",
    "site",
    "received_at",
    "occurred_at",
    "action",
    "repository",
    "tag",
    "digest",
    "media_type",
    "source_format",
    "state",
    "size",
    "from_repository",
    "is_manifest",
    "actor",
    "source_instance",
)
_INSERT = (
    f"INSERT INTO events ({', '.join(_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in _COLUMNS)}) ON CONFLICT(site, id) DO NOTHING"
)
# Not INSERT OR IGNORE: that would also swallow NOT NULL/CHECK failures and report a
# broken event as a harmless duplicate.
_COUNT_PULL = (
    "INSERT INTO pull_counts (site, repository, manifests, blobs, last_pulled_at) "
    "VALUES (?, ?, ?, ?, ?) ON CONFLICT(site, repository) DO UPDATE SET "
    "manifests = manifests + excluded.manifests, blobs = blobs + excluded.blobs, "
    "last_pulled_at = max(coalesce(last_pulled_at, excluded.last_pulled_at), "
    "excluded.last_pulled_at)"
)
# rowids examined per transaction: the journal has one thread, so a prune statement must
# stay short for webhook intake to keep flowing meanwhile
PRUNE_WINDOW = 5000
_WHEN = "coalesce({t}.occurred_at, {t}.received_at)"
_PRUNABLE = (
    "SELECT e.rowid FROM events e WHERE e.rowid >= ? AND e.rowid < ? "
    "AND e.state IN ('dispatched', 'ignored') AND e.received_at < ? AND ("
    # blob traffic: no reader looks at it once handled
    " (e.is_manifest = 0 AND e.tag IS NULL AND e.action IN ('push', 'pull', 'mount') "
    "  AND e.media_type IS NOT NULL AND e.media_type NOT IN ({manifest_types}))"
    # between the first and the last event about the same object: readers take the
    # earliest or the latest time of each, which both stay
    " OR (EXISTS ({same} AND ({n_when} > {e_when} OR ({n_when} = {e_when} "
    "  AND n.rowid > e.rowid)))"
    " AND EXISTS ({same} AND ({n_when} < {e_when} OR ({n_when} = {e_when} "
    "  AND n.rowid < e.rowid))))"
    ")"
).format(
    manifest_types=", ".join("?" for _ in MANIFEST_TYPES),
    same="SELECT 1 FROM events n WHERE n.site = e.site AND n.repository = e.repository "
    "AND n.action = e.action AND n.tag IS e.tag AND n.digest IS e.digest",
    n_when=_WHEN.format(t="n"),
    e_when=_WHEN.format(t="e"),
)


class Events:
    """The `events` table."""

    def __init__(self, journal: JournalConnection) -> None:
        self._journal = journal
        self.keep_pull_rows = True  # also keep manifest pulls as rows (for pulled_within)

    async def record(
        self, events: Sequence[RegistryEvent], received_at: float | None = None
    ) -> list[RegistryEvent]:
        """Insert `events` in ONE transaction; return those not seen before (in order).

        A repeated (site, id) is skipped (ON CONFLICT DO NOTHING); any other failure
        rolls back the whole call and raises.
        """
        return (await self.record_batches([events], received_at))[0]

    async def record_batches(
        self, batches: Sequence[Sequence[RegistryEvent]], received_at: float | None = None
    ) -> list[list[RegistryEvent]]:
        """Group commit: several requests' events in one transaction, new ones per batch.

        Earlier batches win a duplicate id, so two concurrent deliveries of the same
        event make exactly one of them "new".
        """
        at = time.time() if received_at is None else received_at
        return await self._journal.write(_insert_batches, batches, at, self.keep_pull_rows)

    async def by_state(
        self,
        state: str = "new",
        *,
        site: str | None = None,
        received_before: float | None = None,
        limit: int | None = None,
    ) -> list[RegistryEvent]:
        """Events in `state` (received before a time, if given), oldest received first:
        the order they must be dispatched in."""
        _check_state(state)
        sql = "SELECT * FROM events WHERE state = ?"
        params: list[Any] = [state]
        if site is not None:
            sql += " AND site = ?"
            params.append(site)
        if received_before is not None:
            sql += " AND received_at < ?"
            params.append(received_before)
        sql += " ORDER BY received_at, rowid"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        found = await self._journal.read(rows, sql, params)
        return [_event(row) for row in found]

    async def mark(self, keys: Iterable[tuple[str, str]], state: str) -> int:
        """Move the events named by (site, id) to `state` in one transaction; returns
        how many rows changed."""
        _check_state(state)
        params = [(state, site, id_) for site, id_ in dict.fromkeys(keys)]
        return await self._journal.write(_mark, params)

    async def pull_counts(self, site: str | None = None) -> list[dict[str, Any]]:
        """Pulls per (site, repository): `manifests`, `blobs`, `last_pulled_at`. Counted
        at least once: a redelivered pull whose row is not kept counts again."""
        sql = "SELECT site, repository, manifests, blobs, last_pulled_at FROM pull_counts"
        params: tuple[str, ...] = ()
        if site is not None:
            sql += " WHERE site = ?"
            params = (site,)
        return await self._journal.read(rows, sql + " ORDER BY site, repository", params)

    async def prune(self, older_than: float, *, now: float | None = None) -> int:
        """Delete handled events received more than `older_than` seconds before `now`
        that no reader needs (see the module docstring), one short transaction per
        window of rowids so intake never waits long. Returns how many went."""
        cutoff = (time.time() if now is None else now) - older_than
        [span] = await self._journal.read(
            rows, "SELECT min(rowid) AS lo, max(rowid) AS hi FROM events"
        )
        if span["lo"] is None:
            return 0
        total = 0
        for lo in range(span["lo"], span["hi"] + 1, PRUNE_WINDOW):
            total += await self._journal.write(
                changed,
                f"DELETE FROM events WHERE rowid IN ({_PRUNABLE})",
                (lo, lo + PRUNE_WINDOW, cutoff, *sorted(MANIFEST_TYPES)),
            )
        return total

    async def counts(self) -> dict[str, int]:
        """Events per state, every state present (zero when empty)."""
        found = await self._journal.read(
            rows, "SELECT state, COUNT(*) AS n FROM events GROUP BY state"
        )
        return {**dict.fromkeys(sorted(EVENT_STATES), 0), **{r["state"]: r["n"] for r in found}}

    async def last_pulls(self, site: str, repository: str) -> dict[str, float]:
        """digest -> when it was last pulled at `site`, from pull events."""
        return await self._times("max", "pull", site, repository)

    async def first_pushes(self, site: str, repository: str) -> dict[str, float]:
        """digest -> when it was first pushed at `site`, from push events."""
        return await self._times("min", "push", site, repository)

    async def _times(self, agg: str, action: str, site: str, repository: str) -> dict[str, float]:
        found = await self._journal.read(
            rows,
            f"SELECT digest, {agg}(coalesce(occurred_at, received_at)) AS t FROM events "
            "WHERE site=? AND repository=? AND action=? AND digest IS NOT NULL GROUP BY digest",
            (site, repository, action),
        )
        return {r["digest"]: r["t"] for r in found}

    async def registry_times(
        self, site: str, repository: str | None = None
    ) -> dict[str, RegistryTimes]:
        """What `site`'s webhooks say about its repositories (one, or all): per repository
        the latest push of each (tag, digest) and of each manifest, the latest pull of
        each manifest, and the latest delete of each tag and digest (the `prune`d journal
        keeps the latest event of each). The registry's own
        timestamps (`occurred_at`), else when we received the event."""
        sql = (
            "SELECT repository, action, tag, digest, "
            "max(coalesce(occurred_at, received_at)) AS t FROM events "
            "WHERE site = ? AND action IN ('push', 'pull', 'delete') "
            # blob traffic is nobody's question here (a delete by digest has no media type)
            "AND (action = 'delete' OR is_manifest = 1)"
        )
        params: list[Any] = [site]
        if repository is not None:
            sql += " AND repository = ?"
            params.append(repository)
        sql += " GROUP BY repository, action, tag, digest"
        out: dict[str, RegistryTimes] = {}
        for r in await self._journal.read(rows, sql, params):
            times = out.setdefault(r["repository"], RegistryTimes())
            times.add(r["action"], r["tag"], r["digest"], float(r["t"]))
        return out


@dataclass
class RegistryTimes:
    """One repository's webhook history, reduced to the latest time of each kind."""

    pushed: dict[tuple[str, str], float] = field(default_factory=dict)  # (tag, digest)
    manifest_pushed: dict[str, float] = field(default_factory=dict)  # digest, any tag
    pulled: dict[str, float] = field(default_factory=dict)  # digest
    tag_deleted: dict[str, float] = field(default_factory=dict)  # tag
    digest_deleted: dict[str, float] = field(default_factory=dict)  # digest

    def add(self, action: str, tag: str | None, digest: str | None, t: float) -> None:
        if action == "push" and digest:
            if tag:
                _latest(self.pushed, (tag, digest), t)
            _latest(self.manifest_pushed, digest, t)
        elif action == "pull" and digest:
            _latest(self.pulled, digest, t)
        elif action == "delete":
            if tag:
                _latest(self.tag_deleted, tag, t)
            elif digest:
                _latest(self.digest_deleted, digest, t)


def _latest(into: dict[Any, float], key: Any, t: float) -> None:
    if t > into.get(key, float("-inf")):
        into[key] = t


def _insert_batches(
    db: sqlite_utils.Database,
    batches: Sequence[Sequence[RegistryEvent]],
    received_at: float,
    keep_pull_rows: bool = True,
) -> list[list[RegistryEvent]]:
    conn = db.conn
    return [
        [ev for ev in batch if _record_one(conn, ev, received_at, keep_pull_rows)]
        for batch in batches
    ]


def _record_one(
    conn: sqlite3.Connection, ev: RegistryEvent, received_at: float, keep_pull_rows: bool
) -> bool:
    """Journal one event; True when it is news. A pull is counted; it is news when its
    row is new, or when no row is kept (nothing to de-duplicate it against)."""
    if ev.action != "pull":
        return conn.execute(_INSERT, _row(ev, received_at)).rowcount == 1
    manifest = bool(ev.is_manifest)
    if (
        keep_pull_rows
        and manifest
        and not ev.own_read
        and conn.execute(_INSERT, _row(ev, received_at)).rowcount != 1
    ):
        return False  # a redelivery: counted already
    at = ev.occurred_at if ev.occurred_at is not None else received_at
    conn.execute(_COUNT_PULL, (ev.site, ev.repository, int(manifest), int(not manifest), at))
    return True


def _mark(db: sqlite_utils.Database, params: list[tuple[str, str, str]]) -> int:
    cur = db.conn.executemany("UPDATE events SET state = ? WHERE site = ? AND id = ?", params)
    return int(cur.rowcount)


def _check_state(state: str) -> None:
    if state not in EVENT_STATES:
        raise ValueError(
            f"unknown event state {state!r}; expected one of {', '.join(sorted(EVENT_STATES))}"
        )


def _row(ev: RegistryEvent, received_at: float) -> tuple[Any, ...]:
    return (
        ev.id,
        ev.site,
        received_at,
        ev.occurred_at,
        ev.action,
        ev.repository,
        ev.tag,
        ev.digest,
        ev.media_type,
        ev.source_format,
        "new",
        ev.size,
        ev.from_repository,
        int(ev.is_manifest),
        ev.actor,
        ev.source_instance,
    )


def _event(row: dict[str, Any]) -> RegistryEvent:
    return RegistryEvent(
        id=row["id"],
        site=row["site"],
        action=row["action"],
        repository=row["repository"],
        tag=row["tag"],
        digest=row["digest"],
        media_type=row["media_type"],
        size=row["size"],
        from_repository=row["from_repository"],
        occurred_at=row["occurred_at"],
        source_format=row["source_format"] or "distribution",
        is_manifest=bool(row["is_manifest"]),
        actor=row["actor"],
        source_instance=row["source_instance"],
    )
