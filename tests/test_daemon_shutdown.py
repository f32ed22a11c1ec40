"""SIGTERM while the event handler keeps failing: the daemon, run the way the systemd
unit runs it (`registry-replicator run -c FILE --drain-timeout N`), must exit within its
drain timeout and leave the unfinished event in the journal for the next start.

The failure is a real one: the daemon runs with RLIMIT_FSIZE at one block (systemd's
LimitFSIZE=), so SQLite cannot extend the journal's WAL and every write the handler
makes fails, as on a full disk (the kernel says EFBIG rather than ENOSPC, so SQLite
reports "disk I/O error" rather than "database or disk is full"). Reads still work.
Output goes to a pipe, as to journald under systemd, which the limit does not touch.
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from replicator.events import RegistryEvent
from replicator.journal import Journal
from tests.harness.daemon import TOKEN, DaemonProcess
from tests.harness.util import free_port, wait_until

BINARY = Path(sys.executable).parent / "registry-replicator"
DRAIN_TIMEOUT = 2.0
# Python's own exit after the drain (threads joined, journal closed), on a busy machine
EXIT_SLACK = 2.5
EVENT = RegistryEvent(
    id="ev-disk-full",
    site="a",
    action="push",
    repository="team/app",
    tag="v1",
    digest="sha256:" + "ab" * 32,
    media_type="application/vnd.oci.image.manifest.v1+json",
    is_manifest=True,
)


class UnitProcess:
    """`registry-replicator run` as ExecStart runs it, output collected from a pipe."""

    def __init__(self, config: Path, file_size_limit: int | None = None) -> None:
        def limit() -> None:
            if file_size_limit is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [str(BINARY), "run", "-c", str(config), "--drain-timeout", str(DRAIN_TIMEOUT)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "HOOK_TOKEN": TOKEN},
            preexec_fn=limit,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"daemon exited {self.proc.returncode}: {self.output[-3000:]}")
        return True

    def terminate_and_time(self, timeout: float) -> tuple[int | None, float]:
        """SIGTERM; (exit code or None if still running after `timeout`, seconds taken)."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        return code, time.monotonic() - started

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._reader.join(timeout=5)


@pytest.fixture
def unit_daemon(tmp_path: Path):
    """A daemon configuration with a rule covering EVENT, and a journal in which EVENT
    was recorded by a previous life but never handled (state 'new')."""
    sites = {
        name: {
            "url": f"http://127.0.0.1:{free_port()}",
            "insecure": True,
            "webhook_token_env": "HOOK_TOKEN",
        }
        for name in ("a", "b")
    }
    rules = [{"name": "team", "from": "a", "to": ["b"], "repositories": ["team/**"]}]
    daemon = DaemonProcess(tmp_path / "d", config={"sites": sites, "rules": rules})
    daemon.write_config()
    journal = Journal(daemon.journal_path)
    asyncio.run(journal.events.record([EVENT]))
    journal.close()
    started: list[UnitProcess] = []
    yield daemon, started
    for unit in started:
        unit.kill()


def test_sigterm_ends_a_daemon_whose_handler_keeps_failing_within_its_drain_timeout(unit_daemon):
    daemon, started = unit_daemon
    # Another reader of the journal (as `status` would be) keeps its -wal and -shm files
    # in place: SQLite needs the -shm to read, and the limit would forbid creating it.
    reader = sqlite3.connect(daemon.journal_path)
    try:
        reader.execute("SELECT COUNT(*) FROM events").fetchall()
        unit = UnitProcess(daemon.config_path, file_size_limit=4096)
        started.append(unit)

        def handler_failing() -> bool:
            unit.alive()
            return (
                f"failed for event {EVENT.id}" in unit.output
                and "attempt 2;" in unit.output
                and "disk I/O error" in unit.output
            )

        wait_until(handler_failing, timeout=20, what="the handler failing on the full disk")
        code, took = unit.terminate_and_time(timeout=DRAIN_TIMEOUT + 15)
        assert code == 0, f"exit {code} after {took:.1f}s: {unit.output[-3000:]}"
        assert took < DRAIN_TIMEOUT + EXIT_SLACK, f"SIGTERM took {took:.1f}s"
    finally:
        reader.close()

    # the event is still waiting in the journal, and nothing was planned from it ...
    assert daemon.journal_rows("SELECT id, state FROM events") == [(EVENT.id, "new")]
    assert daemon.journal_rows("SELECT COUNT(*) FROM tasks") == [(0,)]
    # ... so the next start, with space again, handles it
    again = UnitProcess(daemon.config_path)
    started.append(again)

    def planned() -> bool:
        again.alive()
        return daemon.journal_rows("SELECT state FROM events") == [("dispatched",)] and bool(
            daemon.journal_rows("SELECT 1 FROM tasks WHERE event_id=?", (EVENT.id,))
        )

    wait_until(planned, timeout=20, what="the event handled after the restart")
    code, took = again.terminate_and_time(timeout=DRAIN_TIMEOUT + 15)
    assert code == 0, again.output[-3000:]
