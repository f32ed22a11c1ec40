"""Can `run` open this journal? Answered without creating or changing anything.

`check` asks before a deployment: opening the journal for real would create the file
and migrate it, and a check must write nothing. So: the directory the journal lives
in (or the nearest existing ancestor `run` would create it under) must take a new
file, and an existing file must be a SQLite database whose schema this version reads.
A running daemon may hold the journal meanwhile: the file is only read.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path

from replicator.journal.core import SCHEMA_VERSION


@dataclass(frozen=True)
class JournalProbe:
    ok: bool
    detail: str  # what was found, or what is wrong (naming the path)


def probe_journal(path: str | Path) -> JournalProbe:
    """Whether `run` can open and write the journal at `path`; reads only."""
    path = Path(path)
    if str(path) == ":memory:":
        return JournalProbe(True, "in memory")
    directory = path.parent
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return JournalProbe(False, f"{existing} is not a directory (the journal is {path})")
    try:  # the only reliable test (ACLs, read-only mounts, root): create a file
        fd, probe = tempfile.mkstemp(prefix=".registry-replicator-check-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        what = "directory" if existing == directory else "nearest existing directory"
        return JournalProbe(False, f"{what} {existing} is not writable: {exc.strerror}")
    if not path.exists():
        return JournalProbe(True, f"{path} (new: created at the first run)")
    if not path.is_file():
        return JournalProbe(False, f"{path} is not a file")
    try:
        with open(path, "r+b"):
            pass
    except OSError as exc:
        return JournalProbe(False, f"{path} is not writable: {exc.strerror}")
    try:
        version = _schema_version(path)
    except sqlite3.DatabaseError as exc:
        return JournalProbe(False, f"{path} cannot be read as a SQLite database: {exc}")
    if version > SCHEMA_VERSION:
        return JournalProbe(
            False,
            f"{path} has schema version {version}, newer than this registry-replicator "
            f"understands ({SCHEMA_VERSION}): upgrade it or point `journal` elsewhere",
        )
    pending = (
        f", {SCHEMA_VERSION - version} migration(s) at the next run"
        if version < SCHEMA_VERSION
        else ""
    )
    return JournalProbe(True, f"{path} (schema {version}{pending})")


def _schema_version(path: Path) -> int:
    # A WAL database opened read-only gets -wal and -shm files created beside it (owned
    # by whoever runs `check`, maybe root). Without them nobody has the journal open, so
    # it cannot change under us: read it as immutable, which creates nothing.
    real = path.resolve()
    in_use = any(real.with_name(real.name + suffix).exists() for suffix in ("-wal", "-shm"))
    mode = "mode=ro" if in_use else "mode=ro&immutable=1"
    conn = sqlite3.connect(f"{real.as_uri()}?{mode}", uri=True, timeout=10)
    try:
        has_meta = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
        ).fetchone()
        if not has_meta:
            return 0
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return int(row[0]) if row else 0
    finally:
        conn.close()
