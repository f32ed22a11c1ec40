"""`status` and `verify` only read the journal: SQLite `mode=ro`, no migration, no WAL
checkpoint, nothing created. They run as a user who may only read a journal the daemon
owns, and leave its bytes as they were."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from replicator.errors import JournalError
from replicator.journal import Journal
from tests.harness.journal import sql

WRITER = """
import os, sys
from replicator.journal import Journal
from tests.harness.journal import sql
journal = Journal(sys.argv[1])
sql(journal, "INSERT INTO tasks(key, rule, action, source_site, target_site, repository, "
    "target_repository, tag, state, next_try, created_at, updated_at) VALUES "
    "('k', 'r', 'copy', 'a', 'b', 'app', 'app', 'v1', 'pending', 0, 1, 1)")
os._exit(0)  # like a SIGKILLed daemon: the commit is in the -wal, not yet in the file
"""


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def journal_left_by_a_killed_daemon(path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", WRITER, str(path)], check=True, cwd=root, timeout=60)
    wal = path.with_name(path.name + "-wal")
    assert wal.exists() and wal.stat().st_size > 0  # a checkpoint would change the file


def write_config(config: Path, journal: Path, a: Any, b: Any) -> None:
    """A rule a -> b over `journal`: what status and verify read."""
    sites = {"a": {"url": a.url, "insecure": True}, "b": {"url": b.url, "insecure": True}}
    rules = [{"name": "r", "from": "a", "to": ["b"]}]
    config.write_text(yaml.safe_dump({"journal": str(journal), "sites": sites, "rules": rules}))


def run_as_reader(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Without the power to write what its permissions forbid: root (as tests run here)
    drops CAP_DAC_OVERRIDE and CAP_FOWNER, so a file mode 0444 is read-only for it too."""
    drop = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", "--"]
    return subprocess.run(
        [*(drop if os.geteuid() == 0 else []), sys.executable, "-m", "replicator", *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_status_and_verify_read_a_journal_they_may_not_write_and_leave_it_unchanged(
    tmp_path, two_registries
):
    a, b = two_registries
    shared_dir = tmp_path / "state"
    shared_dir.mkdir()
    journal = shared_dir / "journal.db"
    journal_left_by_a_killed_daemon(journal)
    config = shared_dir / "config.yaml"
    write_config(config, journal, a, b)
    for f in shared_dir.iterdir():
        f.chmod(0o444)
    shared_dir.chmod(0o555)
    try:
        before = {f.name: digest(f) for f in shared_dir.iterdir() if not f.name.endswith("-shm")}
        status = run_as_reader(["status", "-c", str(config), "--json"])
        assert status.returncode == 0, status.stderr
        verify = run_as_reader(["verify", "-c", str(config), "--json"])
        assert verify.returncode == 0, verify.stderr
        after = {f.name: digest(f) for f in shared_dir.iterdir() if not f.name.endswith("-shm")}
        assert after == before  # the journal, its -wal, nothing new
    finally:
        shared_dir.chmod(0o755)
    # the commit in the -wal was read: status counted the pending task
    assert json.loads(status.stdout)["pending"] == 1, status.stdout
    assert sql(journal, "SELECT COUNT(*) AS n FROM tasks")[0]["n"] == 1


def test_reading_a_journal_nobody_has_open_leaves_no_file_behind(tmp_path, two_registries):
    """SQLite's read-only open of a WAL journal would create -wal and -shm and leave them,
    owned by the reader: root's, they would lock the daemon's user out of its journal."""
    a, b = two_registries
    journal = tmp_path / "state" / "journal.db"
    Journal(journal).close()  # a clean stop: no -wal, no -shm
    config = tmp_path / "config.yaml"
    write_config(config, journal, a, b)
    before = sorted(p.name for p in journal.parent.iterdir()), digest(journal)
    for command in ("status", "verify"):
        out = subprocess.run(
            [sys.executable, "-m", "replicator", command, "-c", str(config)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert (sorted(p.name for p in journal.parent.iterdir()), digest(journal)) == before


def test_status_of_a_missing_journal_says_so_and_creates_nothing(tmp_path):
    journal = tmp_path / "state" / "journal.db"
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "journal": str(journal),
                "sites": {"a": {"url": "http://127.0.0.1:1", "insecure": True}},
            }
        )
    )
    out = subprocess.run(
        [sys.executable, "-m", "replicator", "status", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert f"no journal at {journal}" in out.stderr
    assert not journal.parent.exists()
    with pytest.raises(JournalError, match="no journal at"):
        Journal(journal, read_only=True)
    assert not journal.parent.exists()


def test_a_read_only_journal_refuses_writes_and_an_unmigrated_journal(tmp_path):
    path = tmp_path / "journal.db"
    Journal(path).close()
    reader = Journal(path, read_only=True)
    try:
        assert reader.installation_id and reader.schema_version > 0
        with pytest.raises(JournalError, match="read-only"):
            asyncio.run(reader.write(lambda db: None))
        assert "read-only" in (asyncio.run(reader.check_writable(max_age=0)) or "")
    finally:
        reader.close()

    old = tmp_path / "old.db"
    conn = sqlite3.connect(old)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    conn.execute("INSERT INTO meta VALUES ('schema_version', '3')")
    conn.commit()
    conn.close()
    before = digest(old)
    with pytest.raises(JournalError, match=r"schema version 3, older .* reading commands never"):
        Journal(old, read_only=True)
    assert digest(old) == before

    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all, just some bytes" * 200)
    with pytest.raises(JournalError, match=f"journal {junk} is not a SQLite database"):
        Journal(junk, read_only=True)
