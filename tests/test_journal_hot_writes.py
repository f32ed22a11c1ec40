"""The journal writes a copy makes per blob and per tag: what they keep, and that each is
one statement in its transaction (no schema read per call, as sqlite-utils' row helpers
do: that was most of the journal's CPU in a `sync`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from replicator.journal import Journal
from replicator.journal.core import JournalConnection


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal(tmp_path / "journal.db")
    yield j
    j.close()


async def _statements(connection: JournalConnection, write) -> list[str]:
    """The SQL `write()` ran, as SQLite traced it on the journal's thread."""
    seen: list[str] = []
    await connection.read(lambda db: db.conn.set_trace_callback(seen.append))
    try:
        await write()
    finally:
        await connection.read(lambda db: db.conn.set_trace_callback(None))
    return [s.split()[0].upper() for s in seen]


async def test_a_blob_location_is_one_upsert_that_refreshes_its_order(journal: Journal):
    blobs = journal.blobs
    await blobs.record("dst", "sha256:a", "app1")
    await blobs.record("dst", "sha256:a", "app2")
    await blobs.record("dst", "sha256:b", "app1")
    statements = await _statements(blobs._journal, lambda: blobs.record("dst", "sha256:a", "app1"))
    assert statements == ["BEGIN", "INSERT", "COMMIT"]
    # the refreshed entry is the most recently verified one, and is there once
    assert await blobs.on_registry("dst") == [
        ("sha256:a", "app2"),
        ("sha256:b", "app1"),
        ("sha256:a", "app1"),
    ]
    assert await blobs.on_registry("other") == []


async def test_a_replicated_tag_is_merged_by_one_select_and_one_insert(journal: Journal):
    ledger = journal.ledger
    await ledger.record("dst", "app", "sha256:1", "src", "v1")
    statements = await _statements(
        ledger._journal, lambda: ledger.record("dst", "app", "sha256:1", "src", "v2")
    )
    assert statements == ["BEGIN", "SELECT", "INSERT", "COMMIT"]
    assert await ledger.tags_at("dst", "app") == [("sha256:1", ["v1", "v2"])]
    assert await ledger.was_replicated_here("dst", "app", "sha256:1", tag="v2") == "src"
    # another source's push of the same digest starts the tags afresh
    await ledger.record("dst", "app", "sha256:1", "other", "v3")
    assert await ledger.tags_at("dst", "app") == [("sha256:1", ["v3"])]
    assert await ledger.was_replicated_here("dst", "app", "sha256:1") == "other"
