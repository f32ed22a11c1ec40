"""The state journal: the one place that remembers what the daemon knows.

One SQLite file (`core`: connection, migrations, the thread that owns SQLite) and
one store per concept, each with one async API; no SQL lives outside this package.

    journal = Journal(path)
    await journal.events.record(events)                  # webhook events
    await WorkQueue(journal, owner_id).lease(4)          # replication tasks
    await journal.ledger.record(target, repo, digest, source, tag)   # what went where
    await journal.inventory.record_tags(site, repo, {tag: digest})  # what sites hold
    await journal.blobs.record(registry, digest, repo)   # mount sources
    await journal.tombstones.record(site, repo, tag=..., digest=..., origin=...)  # deletes
    await journal.sync_runs.start(...) / journal.gc_runs / journal.failovers
    await journal.status.rows()                          # for `status`
    await journal.task_admin.drop([id], actor=..., reason=...)  # for `tasks`
"""

from __future__ import annotations

from functools import cached_property

from replicator.journal.blobs import BlobLocations
from replicator.journal.core import MIGRATIONS, SCHEMA_VERSION, JournalConnection
from replicator.journal.events import EVENT_STATES, Events, RegistryTimes
from replicator.journal.inventory import Inventory
from replicator.journal.ledger import DEFAULT_REPLICATED_WINDOW, Ledger, LedgerEntry
from replicator.journal.runs import CandidateRow, Failover, Failovers, GCRuns, SyncRuns
from replicator.journal.status import StatusRows, StatusView
from replicator.journal.task_admin import TaskAdmin, TaskView
from replicator.journal.tasks import QueueError, Task, TaskSpec, WorkQueue
from replicator.journal.tombstones import Tombstone, Tombstones


class Journal(JournalConnection):
    """The journal with its stores. The work queue needs an owner, so it is built
    apart: `WorkQueue(journal, owner_id)`."""

    @cached_property
    def events(self) -> Events:
        return Events(self)

    @cached_property
    def ledger(self) -> Ledger:
        return Ledger(self)

    @cached_property
    def inventory(self) -> Inventory:
        return Inventory(self)

    @cached_property
    def blobs(self) -> BlobLocations:
        return BlobLocations(self)

    @cached_property
    def sync_runs(self) -> SyncRuns:
        return SyncRuns(self)

    @cached_property
    def gc_runs(self) -> GCRuns:
        return GCRuns(self)

    @cached_property
    def failovers(self) -> Failovers:
        return Failovers(self)

    @cached_property
    def tombstones(self) -> Tombstones:
        return Tombstones(self)

    @cached_property
    def status(self) -> StatusView:
        return StatusView(self)

    @cached_property
    def task_admin(self) -> TaskAdmin:
        return TaskAdmin(self)


__all__ = [
    "DEFAULT_REPLICATED_WINDOW",
    "EVENT_STATES",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "BlobLocations",
    "CandidateRow",
    "Events",
    "Failover",
    "Failovers",
    "GCRuns",
    "Inventory",
    "Journal",
    "JournalConnection",
    "Ledger",
    "LedgerEntry",
    "QueueError",
    "RegistryTimes",
    "StatusRows",
    "StatusView",
    "SyncRuns",
    "Task",
    "TaskAdmin",
    "TaskSpec",
    "TaskView",
    "Tombstone",
    "Tombstones",
    "WorkQueue",
]
