"""The state journal: the one place that remembers what the daemon knows.

SQLite in WAL mode through sqlite-utils. Every write happens inside a
transaction, so a crash at any instant leaves a journal the next start can use.
Schema changes are numbered migrations applied at open; a journal written by a
newer version of the tool is refused instead of being silently misread.

The daemon is async; SQLite is not. `Journal.run` executes a function on one
dedicated thread that owns all database access, so the event loop never blocks
on disk and writes are naturally serialised.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from replicator.errors import JournalError

T = TypeVar("T")

# (version, description, SQL). Append only; never edit a migration that has shipped.
MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "initial schema",
        """
        CREATE TABLE blob_locations (
            registry TEXT NOT NULL,          -- site name or registry URL
            digest TEXT NOT NULL,
            repository TEXT NOT NULL,
            verified_at REAL NOT NULL,
            PRIMARY KEY (registry, digest, repository)
        );
        CREATE TABLE inventory_tags (
            site TEXT NOT NULL,
            repository TEXT NOT NULL,
            tag TEXT NOT NULL,
            digest TEXT NOT NULL,
            pushed_at REAL,                   -- from webhook timestamps, when known
            first_seen REAL NOT NULL,
            PRIMARY KEY (site, repository, tag)
        );
        CREATE TABLE inventory_manifests (
            site TEXT NOT NULL,
            repository TEXT NOT NULL,
            digest TEXT NOT NULL,
            media_type TEXT,
            size INTEGER,
            subject TEXT,                     -- digest of the subject, for referrers
            artifact_type TEXT,
            created TEXT,                     -- image 'created' annotation, if any
            pushed_at REAL,
            first_seen REAL NOT NULL,
            PRIMARY KEY (site, repository, digest)
        );
        CREATE TABLE manifest_refs (
            site TEXT NOT NULL,
            repository TEXT NOT NULL,
            digest TEXT NOT NULL,             -- the manifest
            ref_digest TEXT NOT NULL,         -- what it references
            kind TEXT NOT NULL,               -- 'blob' | 'manifest'
            PRIMARY KEY (site, repository, digest, ref_digest)
        );
        CREATE TABLE events (
            id TEXT PRIMARY KEY,              -- event id, for de-duplication
            site TEXT NOT NULL,
            received_at REAL NOT NULL,
            occurred_at REAL,
            action TEXT NOT NULL,             -- push | delete | pull | mount
            repository TEXT NOT NULL,
            tag TEXT,
            digest TEXT,
            media_type TEXT,
            source_format TEXT,               -- distribution | harbor | cloudevents
            state TEXT NOT NULL DEFAULT 'new' -- new | dispatched | ignored
        );
        CREATE INDEX events_state ON events(state, received_at);
        CREATE TABLE tasks (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            key TEXT NOT NULL,                -- coalescing key: rule|target|repo|tag-or-digest
            rule TEXT NOT NULL,
            action TEXT NOT NULL,             -- copy | delete
            source_site TEXT NOT NULL,
            target_site TEXT NOT NULL,
            repository TEXT NOT NULL,         -- at the source
            target_repository TEXT NOT NULL,
            tag TEXT,
            digest TEXT,
            state TEXT NOT NULL,              -- pending | leased | done | cancelled | dead
            attempts INTEGER NOT NULL DEFAULT 0,
            next_try REAL NOT NULL,
            lease_owner TEXT,
            lease_until REAL,
            last_error TEXT,
            event_id TEXT,
            trace_context TEXT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        );
        CREATE INDEX tasks_ready ON tasks(state, next_try);
        CREATE INDEX tasks_key ON tasks(key, state);
        CREATE TABLE replicated (
            target_site TEXT NOT NULL,
            repository TEXT NOT NULL,
            digest TEXT NOT NULL,
            source_site TEXT NOT NULL,
            at REAL NOT NULL,
            PRIMARY KEY (target_site, repository, digest)
        );
        CREATE TABLE sync_runs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            rule TEXT,
            started_at REAL NOT NULL,
            finished_at REAL,
            dry_run INTEGER NOT NULL DEFAULT 0,
            state TEXT NOT NULL,              -- running | done | failed
            result TEXT                       -- JSON counts
        );
        CREATE TABLE failovers (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            lost_site TEXT NOT NULL,
            promoted_site TEXT NOT NULL,
            started_at REAL NOT NULL,
            ended_at REAL,                    -- set by failback
            active INTEGER NOT NULL DEFAULT 1,
            detail TEXT                       -- JSON: rules rewritten, catch-up done
        );
        CREATE TABLE gc_runs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            site TEXT NOT NULL,
            mode TEXT NOT NULL,               -- api | storage
            policy TEXT,
            dry_run INTEGER NOT NULL DEFAULT 0,
            state TEXT NOT NULL,              -- marking | sweeping | done | failed
            started_at REAL NOT NULL,
            finished_at REAL,
            mark_summary TEXT,                -- JSON
            stats TEXT                        -- JSON
        );
        CREATE TABLE gc_candidates (
            run_id INTEGER NOT NULL,
            kind TEXT NOT NULL,               -- blob | manifest | tag | link | upload
            key TEXT NOT NULL,                -- path or repo@digest
            repository TEXT,
            digest TEXT,
            bytes INTEGER NOT NULL DEFAULT 0,
            state TEXT NOT NULL,              -- candidate|quarantined|deleted|restored|kept|error
            quarantine_path TEXT,
            error TEXT,
            PRIMARY KEY (run_id, kind, key)
        );
        CREATE INDEX gc_candidates_state ON gc_candidates(run_id, state);
        """,
    ),
    (
        2,
        "events: keep every RegistryEvent field so a restart can re-dispatch faithfully",
        """
        ALTER TABLE events ADD COLUMN size INTEGER;
        ALTER TABLE events ADD COLUMN from_repository TEXT;
        ALTER TABLE events ADD COLUMN is_manifest INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE events ADD COLUMN actor TEXT;
        ALTER TABLE events ADD COLUMN source_instance TEXT
        """,
    ),
    (
        3,
        "replicated.tags (JSON array, NULL = digest only): the tags we pushed, so a later "
        "re-tag of the same digest is not mistaken for our own push in an A<->B mesh",
        """
        ALTER TABLE replicated ADD COLUMN tags TEXT
        """,
    ),
]

SCHEMA_VERSION = MIGRATIONS[-1][0]


class Journal:
    """A handle on the SQLite journal. Safe to share across threads and tasks."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._executor: ThreadPoolExecutor | None = None
        try:
            if str(path) != ":memory:":
                self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                str(path), check_same_thread=False, isolation_level=None, timeout=30
            )
        except (OSError, sqlite3.Error) as exc:
            raise JournalError(f"cannot open journal {path}: {exc}") from exc
        self.db = sqlite_utils.Database(conn)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes in WAL
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=30000")
        self._migrate()

    # --- schema -----------------------------------------------------------
    def _migrate(self) -> None:
        with self.transaction() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            current = int(row[0]) if row else 0
            if current > SCHEMA_VERSION:
                raise JournalError(
                    f"journal {self.path} has schema version {current}, newer than this "
                    f"registry-replicator understands ({SCHEMA_VERSION}); upgrade the tool "
                    "or point it at another journal"
                )
            for version, _desc, sql in MIGRATIONS:
                if version > current:
                    for statement in _split_sql(sql):
                        conn.execute(statement)
                    conn.execute(
                        "INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?)",
                        (str(version),),
                    )

    @property
    def schema_version(self) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        return int(row[0])

    # --- access -----------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT; rolls back on any exception."""
        with self._lock:
            conn = self.db.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            else:
                conn.execute("COMMIT")

    def query(self, sql: str, params: Any = ()) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.db.query(sql, params))

    def execute(self, sql: str, params: Any = ()) -> int:
        """One write statement in its own transaction; returns rows changed."""
        with self.transaction() as conn:
            return conn.execute(sql, params).rowcount

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the journal thread so the event loop never blocks on disk."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args))

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        with self._lock:
            self.db.conn.close()


def now() -> float:
    return time.time()


def _split_sql(sql: str) -> list[str]:
    return [s.strip() for s in sql.split(";") if s.strip()]
