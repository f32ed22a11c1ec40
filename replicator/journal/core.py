"""The journal's connection: one SQLite file, the one thread that owns it, its migrations.

SQLite in WAL mode through sqlite-utils. Every write is one transaction, so a crash
at any instant leaves a journal the next start can use. Schema changes are numbered
migrations applied at open; a journal written by a newer version of the tool is
refused instead of being silently misread.

The daemon is async; SQLite is not. Every statement runs on one dedicated thread that
owns the connection (`read` and `write` hand it a function), so the event loop never
blocks on disk and the process's writes are naturally serialised. `write` is
`BEGIN IMMEDIATE ... COMMIT`: SQLite's write lock is taken before the first read, so
several processes sharing one file (daemons, the CLI) never interleave a
read-modify-write.

The journal also names its installation: `installation_id`, made once (hostname at
creation plus random bits) and kept in `meta`, so a daemon restarted on the same
journal is the same instance (its task leases, its MQTT session), while a fresh journal
on a replacement machine is a new one.

Commands that only read (`status`, `verify`) open the journal `read_only`: SQLite's
`mode=ro` (`immutable` when nobody has it open, see `read_only_uri`), so no migration,
no WAL checkpoint, no probe and no left-over -wal/-shm file ever changes a journal the
daemon owns, and they work for a user who may only read it. A journal that is missing,
older than this version (not migrated yet) or not a journal is refused, naming the file.

Only the stores of this package call `read` and `write`; code elsewhere uses the stores.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import secrets
import socket
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar

import sqlite_utils

from replicator.errors import JournalError

T = TypeVar("T")
P = ParamSpec("P")

log = logging.getLogger(__name__)

READY_MAX_AGE = 1.0  # seconds a write's outcome answers readiness before a new probe
QUICK_CHECK_SECONDS = 10.0  # a start-up integrity check never delays a start by more
_REMEDY = (
    "stop every process using it, then restore it from a backup, or move it aside "
    "(with its -wal and -shm files) to start with an empty journal: its pending tasks "
    "and undispatched events are then forgotten (the next reconcile re-copies what is "
    "missing) and active failovers must be recorded again"
)

Step = str | Callable[[sqlite_utils.Database], None]


def _drop_never_used_tables(db: sqlite_utils.Database) -> None:
    for name in ("inventory_manifests", "manifest_refs"):
        db.table(name).drop(ignore=True)


def _key_events_by_site(db: sqlite_utils.Database) -> None:
    # sqlite-utils rebuilds the table (copy, drop, rename) and its events_state index
    db.table("events").transform(pk=("site", "id"))


# (version, description, SQL or a function of the database). Append only; never edit a
# migration that has shipped.
MIGRATIONS: list[tuple[int, str, Step]] = [
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
    (
        4,
        "drop inventory_manifests (read by API GC, never written) and manifest_refs (never used)",
        _drop_never_used_tables,
    ),
    (
        5,
        "events: primary key (site, id), so de-duplication is per site: another site "
        "posting the same (predictable) id cannot suppress an event",
        _key_events_by_site,
    ),
    (
        6,
        "task_audit: who retried or dropped a task, when and why (a dropped task keeps "
        "its row, in state 'dropped')",
        """
        CREATE TABLE task_audit (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            task_id INTEGER NOT NULL,
            action TEXT NOT NULL,             -- retry | drop
            actor TEXT NOT NULL,              -- user@host, or daemon <instance id>
            reason TEXT NOT NULL,
            state_before TEXT NOT NULL,
            at REAL NOT NULL
        );
        CREATE INDEX task_audit_task ON task_audit(task_id)
        """,
    ),
    (
        7,
        "pull_counts: pulls per site and repository, so a pull need not be an events row; "
        "events_subject: finds the newer event about the same object when pruning",
        """
        CREATE TABLE pull_counts (
            site TEXT NOT NULL,
            repository TEXT NOT NULL,
            manifests INTEGER NOT NULL DEFAULT 0,
            blobs INTEGER NOT NULL DEFAULT 0,
            last_pulled_at REAL,
            PRIMARY KEY (site, repository)
        );
        CREATE INDEX events_subject ON events(site, repository, action, tag, digest)
        """,
    ),
    (
        8,
        "tombstones: every delete the tool observed or performed, so failback and reconcile "
        "tell 'missing because deleted' from 'missing because never copied'",
        """
        CREATE TABLE IF NOT EXISTS tombstones (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            site TEXT NOT NULL,
            repository TEXT NOT NULL,
            tag TEXT,                        -- NULL: a delete by digest
            digest TEXT,                     -- NULL: the digest was not known
            at REAL NOT NULL,
            origin TEXT NOT NULL,            -- observed (a webhook) | performed (by us)
            detail TEXT
        );
        CREATE INDEX IF NOT EXISTS tombstones_where ON tombstones(site, repository, tag)
        """,
    ),
]

SCHEMA_VERSION = MIGRATIONS[-1][0]


class JournalConnection:
    """A handle on the SQLite journal: usable from any task of any event loop and any
    thread; all SQL runs on the journal's own thread."""

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
        quick_check_seconds: float = QUICK_CHECK_SECONDS,
        read_only: bool = False,
    ) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self.schema_version = 0
        self.installation_id = ""  # set at open: see `_installation_id`
        self.commits = 0  # write transactions committed through `write`
        # (monotonic time, None or what went wrong) of the last `write`
        self._last_write: tuple[float, str | None] | None = None
        self._probe: asyncio.Task[str | None] | None = None
        self._db: sqlite_utils.Database | None = None
        self._executor: ThreadPoolExecutor | None = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="journal"
        )
        try:
            if read_only:
                self._executor.submit(self._open_read_only, quick_check_seconds).result()
            else:
                self._executor.submit(self._open, synchronous, quick_check_seconds).result()
        except BaseException:
            self._executor.shutdown(wait=True)
            self._executor = None
            raise

    # --- on the journal thread --------------------------------------------------------
    def _open(self, synchronous: str, quick_check_seconds: float) -> None:
        try:
            if str(self.path) != ":memory:":
                self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=30)
        except (OSError, sqlite3.Error) as exc:
            raise JournalError(f"cannot open journal {self.path}: {exc}") from exc
        self._db = sqlite_utils.Database(conn)
        try:
            conn.execute("PRAGMA busy_timeout=30000")
            self._quick_check(conn, quick_check_seconds)
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL is durable across process crashes in WAL; FULL also across power loss
            conn.execute(f"PRAGMA synchronous={synchronous}")
            conn.execute("PRAGMA foreign_keys=ON")
            self.schema_version = self._transaction(_migrate, self.path)
            self.installation_id = self._transaction(_installation_id, new_installation_id())
        except BaseException:
            self._close()
            raise

    def _open_read_only(self, quick_check_seconds: float) -> None:
        """`mode=ro`: nothing is created, migrated or checkpointed (see the module)."""
        if not self.path.is_file():
            raise JournalError(
                f"no journal at {self.path}: nothing has run with this configuration yet "
                "(or the path is wrong)"
            )
        try:
            conn = sqlite3.connect(
                read_only_uri(self.path), uri=True, isolation_level=None, timeout=30
            )
        except (OSError, sqlite3.Error) as exc:
            raise JournalError(f"cannot open journal {self.path} read-only: {exc}") from exc
        self._db = sqlite_utils.Database(conn)
        try:
            conn.execute("PRAGMA busy_timeout=30000")
            self._quick_check(conn, quick_check_seconds)  # reads only; a clear error
            version = _schema_version(self._db)
            if version > SCHEMA_VERSION:
                raise JournalError(
                    f"journal {self.path} has schema version {version}, newer than this "
                    f"registry-replicator understands ({SCHEMA_VERSION}); upgrade the tool"
                )
            if version < SCHEMA_VERSION:
                what = f"schema version {version}" if version else "no schema version"
                raise JournalError(
                    f"journal {self.path} has {what}, older than this registry-replicator "
                    f"reads ({SCHEMA_VERSION}): it is migrated when the daemon (or any "
                    "command that writes the journal) starts with this version; reading "
                    "commands never change it"
                )
            self.schema_version = version
            row = conn.execute("SELECT value FROM meta WHERE key = 'installation_id'").fetchone()
            self.installation_id = str(row[0]) if row else ""
        except sqlite3.DatabaseError as exc:
            self._close()
            if "not a database" in str(exc):
                raise JournalError(
                    f"journal {self.path} is not a SQLite database, or its header is "
                    f"damaged ({exc}); {_REMEDY}"
                ) from exc
            raise JournalError(f"cannot read journal {self.path}: {exc}") from exc
        except BaseException:
            self._close()
            raise

    def _quick_check(self, conn: sqlite3.Connection, seconds: float) -> None:
        """Refuse a damaged journal before anything is acknowledged from it: a start on
        corrupt pages would answer webhooks 202 and lose them later. Bounded: a check
        still running after `seconds` is abandoned with a warning (a journal that big
        is checked by `sqlite3 FILE 'PRAGMA integrity_check'` offline)."""
        deadline = time.monotonic() + seconds
        interrupted = False

        def past_deadline() -> bool:
            nonlocal interrupted
            interrupted = time.monotonic() > deadline
            return interrupted

        conn.set_progress_handler(past_deadline, 1000)
        try:
            rows = conn.execute("PRAGMA quick_check(20)").fetchall()
            problems = [
                line
                for r in rows
                for line in str(r[0]).splitlines()
                if line and not line.startswith("*** in database")
            ]
        except sqlite3.DatabaseError as exc:
            if interrupted:
                log.warning(
                    "journal %s: PRAGMA quick_check not finished after %.0f s; starting without it",
                    self.path,
                    seconds,
                )
                return
            if "not a database" in str(exc):
                raise JournalError(
                    f"journal {self.path} is not a SQLite database, or its header is "
                    f"damaged ({exc}); {_REMEDY}"
                ) from exc
            if isinstance(exc, sqlite3.OperationalError):
                raise JournalError(f"cannot open journal {self.path}: {exc}") from exc
            problems = [str(exc)]
        finally:
            conn.set_progress_handler(None, 0)
        if problems != ["ok"]:
            more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
            raise JournalError(
                f"journal {self.path} is damaged (PRAGMA quick_check: "
                f"{'; '.join(problems[:3])}{more}); {_REMEDY}"
            )

    def _call(
        self,
        fn: Callable[Concatenate[sqlite_utils.Database, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        if self._db is None:
            raise JournalError(f"journal {self.path} is closed")
        return fn(self._db, *args, **kwargs)

    def _transaction(
        self,
        fn: Callable[Concatenate[sqlite_utils.Database, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """BEGIN IMMEDIATE ... COMMIT around `fn`; rolls back on any exception."""
        if self._db is None:
            raise JournalError(f"journal {self.path} is closed")
        conn = self._db.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(self._db, *args, **kwargs)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result

    def _recorded_transaction(
        self,
        fn: Callable[Concatenate[sqlite_utils.Database, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """`_transaction`, remembering whether the journal took the write (readiness)."""
        try:
            result = self._transaction(fn, *args, **kwargs)
        except sqlite3.IntegrityError:
            raise  # the data was refused, the journal is fine
        except (sqlite3.DatabaseError, JournalError) as exc:
            self._last_write = (time.monotonic(), f"{type(exc).__name__}: {exc}")
            raise
        self.commits += 1
        self._last_write = (time.monotonic(), None)
        return result

    def _close(self) -> None:
        if self._db is not None:
            self._db.conn.close()
            self._db = None

    # --- for the stores -----------------------------------------------------------------
    async def read(
        self,
        fn: Callable[Concatenate[sqlite_utils.Database, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """`fn(db, *args)` on the journal thread, outside any transaction (WAL readers see
        the last commit and never wait for writers)."""
        return await self._submit(functools.partial(self._call, fn, *args, **kwargs))

    async def write(
        self,
        fn: Callable[Concatenate[sqlite_utils.Database, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """`fn(db, *args)` on the journal thread inside one BEGIN IMMEDIATE transaction."""
        if self.read_only:
            raise JournalError(f"journal {self.path} is open read-only; this command may not write")
        return await self._submit(
            functools.partial(self._recorded_transaction, fn, *args, **kwargs)
        )

    async def _submit(self, job: Callable[[], T]) -> T:
        executor = self._executor
        if executor is None:
            raise JournalError(f"journal {self.path} is closed")
        return await asyncio.get_running_loop().run_in_executor(executor, job)

    async def check_writable(self, max_age: float = READY_MAX_AGE) -> str | None:
        """None when the journal takes writes, else what went wrong. Cheap enough for
        every /readyz: the outcome of the last write answers when it is younger than
        `max_age` seconds; otherwise one probe write answers, shared by every caller
        that asks meanwhile (a flood costs at most about one write per `max_age`)."""
        last = self._last_write
        if last is not None and time.monotonic() - last[0] < max_age:
            return last[1]
        loop = asyncio.get_running_loop()
        probe = self._probe
        if probe is None or probe.done() or probe.get_loop() is not loop:
            probe = self._probe = loop.create_task(self._run_probe())
        return await asyncio.shield(probe)

    async def _run_probe(self) -> str | None:
        """A tiny write and read-back: proves the journal is open, writable and not stuck."""
        stamp = repr(time.time())
        try:
            if await self.write(_write_probe, stamp) != stamp:
                return "the journal's read-back did not return the probe just written"
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def close(self) -> None:
        """Finish queued work, close the connection and stop the thread. Idempotent."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        try:
            executor.submit(self._close).result()
        finally:
            executor.shutdown(wait=True)


def _migrate(db: sqlite_utils.Database, path: Path) -> int:
    db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
    current = _schema_version(db)
    if current > SCHEMA_VERSION:
        raise JournalError(
            f"journal {path} has schema version {current}, newer than this "
            f"registry-replicator understands ({SCHEMA_VERSION}); upgrade the tool "
            "or point it at another journal"
        )
    for version, _description, step in MIGRATIONS:
        if version <= current:
            continue
        if isinstance(step, str):
            for statement in _split_sql(step):
                db.execute(statement)
        else:
            step(db)
        db.table("meta").upsert({"key": "schema_version", "value": str(version)}, pk="key")
        current = version
    return current


def read_only_uri(path: Path) -> str:
    """The URI that reads `path` without leaving anything behind. SQLite opening a WAL
    database read-only creates its -wal and -shm files and, being read-only, leaves them:
    owned by whoever reads (root, say), they would stop the daemon's user from opening the
    journal. With neither file present nobody has the journal open, so it is read as
    immutable, which creates nothing; while a daemon has it open, its files are used."""
    real = path.resolve()
    in_use = any(real.with_name(real.name + suffix).exists() for suffix in ("-wal", "-shm"))
    return f"{real.as_uri()}?mode=ro" + ("" if in_use else "&immutable=1")


def new_installation_id(hostname: str | None = None) -> str:
    """A readable, unique installation name: the host it was made on (sanitised, short)
    and 32 random bits, e.g. `eu-west-1-3f9a1c2b`. Usable as an MQTT client id."""
    host = socket.gethostname() if hostname is None else hostname
    host = re.sub(r"[^A-Za-z0-9.-]+", "-", host).strip("-.")
    return f"{host[:40] or 'replicator'}-{secrets.token_hex(4)}"


def _installation_id(db: sqlite_utils.Database, proposed: str) -> str:
    """The journal's installation id, `proposed` when it has none yet."""
    db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('installation_id', ?)", (proposed,))
    row = db.execute("SELECT value FROM meta WHERE key = 'installation_id'").fetchone()
    return str(row[0])


def _schema_version(db: sqlite_utils.Database) -> int:
    if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone():
        return 0
    row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return int(row[0]) if row else 0


def _write_probe(db: sqlite_utils.Database, stamp: str) -> str | None:
    db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('readyz_probe', ?)", (stamp,))
    row = db.execute("SELECT value FROM meta WHERE key = 'readyz_probe'").fetchone()
    return row[0] if row else None


def rows(db: sqlite_utils.Database, sql: str, params: Any = ()) -> list[dict[str, Any]]:
    """Every row of a query as dicts: the stores' most common read."""
    return list(db.query(sql, params))


def executemany(db: sqlite_utils.Database, sql: str, params: list[tuple[Any, ...]]) -> None:
    db.conn.executemany(sql, params)


def changed(db: sqlite_utils.Database, sql: str, params: Any = ()) -> int:
    """One write statement; returns how many rows it changed."""
    return int(db.execute(sql, params).rowcount)


def _split_sql(sql: str) -> list[str]:
    return [s.strip() for s in sql.split(";") if s.strip()]
