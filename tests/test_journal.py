"""The state journal: versioned migrations, refusal of a newer schema, crash safety,
and no secrets in it."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest
import yaml

from replicator.errors import JournalError
from replicator.events import RegistryEvent
from replicator.journal import MIGRATIONS, SCHEMA_VERSION, Journal
from tests.harness.images import Pusher, layer_bytes
from tests.harness.journal import sql
from tests.harness.registry import write_htpasswd
from tests.harness.util import free_port, wait_until


def test_migrations_apply_once_and_reopen_is_idempotent(tmp_path):
    path = tmp_path / "j.db"
    j = Journal(path)
    assert j.schema_version == SCHEMA_VERSION == MIGRATIONS[-1][0]
    asyncio.run(j.sync_runs.start(None, dry_run=False))
    j.close()
    j = Journal(path)  # nothing re-applied, data kept
    assert j.schema_version == SCHEMA_VERSION
    assert sql(j, "SELECT COUNT(*) AS n FROM sync_runs")[0]["n"] == 1
    assert sql(j, "PRAGMA journal_mode")[0]["journal_mode"] == "wal"
    j.close()


@pytest.mark.parametrize("shipped", [1, 2, 3])
def test_journals_of_every_shipped_schema_open_and_upgrade(tmp_path, shipped):
    """A journal last written at schema 1, 2 or 3 (built here by running exactly the
    shipped migrations) opens, keeps its rows and loses the tables nothing wrote."""
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
        for _version, _desc, step in MIGRATIONS[:shipped]:
            assert isinstance(step, str)  # shipped migrations are plain SQL
            conn.executescript(step)
        conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(shipped),))
        conn.execute("INSERT INTO inventory_tags VALUES ('a', 'app', 'v1', 'sha256:1', NULL, 5.0)")
        conn.execute(
            "INSERT INTO replicated(target_site, repository, digest, source_site, at) "
            "VALUES ('b', 'app', 'sha256:1', 'a', 7.0)"
        )
        conn.execute(
            "INSERT INTO events(id, site, received_at, action, repository) "
            "VALUES ('e1', 'a', 3.0, 'push', 'app')"
        )
    j = Journal(path)
    try:
        assert j.schema_version == SCHEMA_VERSION
        tables = {r["name"] for r in sql(j, "SELECT name FROM sqlite_master WHERE type='table'")}
        assert "inventory_manifests" not in tables and "manifest_refs" not in tables
        indexes = {r["name"] for r in sql(j, "SELECT name FROM sqlite_master WHERE type='index'")}
        assert "events_state" in indexes  # kept when events was rebuilt for its new key
        assert [e.id for e in asyncio.run(j.events.by_state("new"))] == ["e1"]
        # events are keyed per site now: the same id from another site is a new event
        again = RegistryEvent(id="e1", site="b", action="push", repository="app")
        assert asyncio.run(j.events.record([again])) == [again]
        assert asyncio.run(j.inventory.digests("a", "app")) == {"v1": "sha256:1"}
        assert asyncio.run(j.ledger.was_replicated_here("b", "app", "sha256:1", within=None)) == "a"
        asyncio.run(j.ledger.record("b", "app", "sha256:1", "a", "v1"))  # column of schema 3
        assert asyncio.run(j.ledger.tags_at("b", "app")) == [("sha256:1", ["v1"])]
    finally:
        j.close()


def test_a_journal_from_a_newer_version_is_refused(tmp_path):
    path = tmp_path / "j.db"
    Journal(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute(
            "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),)
        )
    with pytest.raises(JournalError, match="newer than this registry-replicator"):
        Journal(path)
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {"journal": str(path), "sites": {"a": {"url": "http://127.0.0.1:1", "insecure": True}}}
        )
    )
    out = subprocess.run(
        [sys.executable, "-m", "replicator", "status", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "newer than this" in out.stderr


def test_sigkill_during_writes_leaves_a_usable_journal(tmp_path):
    path = tmp_path / "j.db"
    Journal(path).close()
    writer = textwrap.dedent(f"""
        import asyncio
        from replicator.events import RegistryEvent
        from replicator.journal import Journal
        async def main():
            j = Journal({str(path)!r})
            i = 0
            while True:  # 50 events of ~2 kB per transaction
                batch = [RegistryEvent(id=str(i + k), site="a", action="push",
                                       repository="app", actor="x" * 2000) for k in range(50)]
                await j.events.record(batch)
                i += 50
        asyncio.run(main())
    """)
    proc = subprocess.Popen([sys.executable, "-c", writer], start_new_session=True)
    try:

        def written() -> bool:
            try:
                with sqlite3.connect(path, timeout=5) as conn:
                    return conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] > 2000
            except sqlite3.OperationalError:
                return False

        wait_until(written, timeout=30, what="writes in progress")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    j = Journal(path)
    assert sql(j, "PRAGMA integrity_check")[0]["integrity_check"] == "ok"
    count = sql(j, "SELECT COUNT(*) AS n FROM events")[0]["n"]
    assert count % 50 == 0, "a transaction was half applied"
    j.close()


def test_secrets_never_reach_the_journal(registry_factory, tmp_path):
    password = "s3cret-Pa55word-xyz"
    htpasswd = write_htpasswd(tmp_path / "htpasswd", {"ci": password})
    src = registry_factory("src", htpasswd=htpasswd)
    dst = registry_factory("dst", htpasswd=htpasswd)
    with Pusher(src.url, auth=("ci", password)) as p:
        p.push_image("team/app", "v1", [layer_bytes("secret-test", 100)])
    journal = tmp_path / "journal.db"
    site = {"insecure": True, "auth": {"username": "ci", "password_env": "REG_PASS"}}
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "journal": str(journal),
                "sites": {"a": {"url": src.url, **site}, "b": {"url": dst.url, **site}},
                "rules": [{"name": "r", "from": "a", "to": ["b"]}],
            }
        )
    )
    out = subprocess.run(
        [sys.executable, "-m", "replicator", "-vv", "sync", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "REG_PASS": password},
    )
    assert out.returncode == 0, out.stderr
    basic = base64.b64encode(f"ci:{password}".encode()).decode()
    for secret in (password, basic):
        assert secret not in out.stdout + out.stderr
    for file in tmp_path.glob("journal.db*"):
        assert password.encode() not in file.read_bytes()


def _journal_with_events(path, n: int = 2000) -> None:
    """A journal of a few hundred pages, closed (so everything is in the main file)."""
    j = Journal(path)
    events = [
        RegistryEvent(id=f"e{i}", site="a", action="push", repository="app", actor="x" * 200)
        for i in range(n)
    ]
    asyncio.run(j.events.record(events))
    j.close()


def _overwrite(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _cli(tmp_path, journal, *command: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "journal": str(journal),
                "listen": f"127.0.0.1:{free_port()}",
                "sites": {"a": {"url": "http://127.0.0.1:1", "insecure": True}},
            }
        )
    )
    return subprocess.run(
        [sys.executable, "-m", "replicator", *command, "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_journal_with_corrupt_pages_is_refused_with_what_to_do(tmp_path):
    path = tmp_path / "j.db"
    _journal_with_events(path)
    _overwrite(path, 4096 * 40 + 100, b"\xff" * 3000)  # inside the events b-tree
    with pytest.raises(JournalError) as info:
        Journal(path)
    message = str(info.value)
    assert str(path) in message and "damaged" in message and "backup" in message
    # the daemon refuses to start (so it never answers a webhook 202 it cannot keep)
    out = _cli(tmp_path, path, "run")
    assert out.returncode == 2, out.stderr
    assert "damaged" in out.stderr and str(path) in out.stderr
    assert "internal error" not in out.stderr


def test_a_journal_with_a_broken_header_gives_a_clear_error(tmp_path):
    path = tmp_path / "j.db"
    _journal_with_events(path, 10)
    _overwrite(path, 0, b"not a database!!")
    out = _cli(tmp_path, path, "status")
    assert out.returncode == 2, out.stderr
    assert "internal error" not in out.stderr and "DatabaseError" not in out.stderr
    assert str(path) in out.stderr and "not a SQLite database" in out.stderr


def test_the_start_up_check_is_bounded_in_time(tmp_path, caplog):
    path = tmp_path / "j.db"
    _journal_with_events(path)
    with caplog.at_level(logging.WARNING, logger="replicator.journal"):
        j = Journal(path, quick_check_seconds=0.0)
    try:
        assert "quick_check" in caplog.text and "not finished" in caplog.text
        assert (asyncio.run(j.events.counts()))["new"] == 2000  # opened all the same
    finally:
        j.close()
