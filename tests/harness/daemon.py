"""Run `registry-replicator run` as a real subprocess, with registries that notify it.

The command line is the shipped systemd unit's ExecStart (read from the unit file),
with only the binary and the configuration path replaced: a test passes because the
product works as installed, not because the harness adds an identity or a speed-up
the unit does not. A test may append options (`extra_args`) for what it does not
test, such as a shorter retry delay; never an instance id or MQTT client id.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import sqlite3
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.harness.images import assert_image_complete
from tests.harness.registry import Registry
from tests.harness.util import free_port, wait_until

TOKEN = "hook-token-for-tests"
ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "registry-replicator.service"
INSTALLED_BINARY = "/usr/bin/registry-replicator"
INSTALLED_CONFIG = "/etc/registry-replicator/config.yaml"
# the venv's console script: what `pip install` puts where the unit expects the binary
BINARY = Path(sys.executable).parent / "registry-replicator"
_READY = re.compile(r"daemon (\S+) ready on ")


def unit_command(config: Path) -> list[str]:
    """The unit's ExecStart as argv, running this checkout with `config`."""
    lines = [
        line.strip().partition("=")[2]
        for line in UNIT.read_text().splitlines()
        if line.strip().startswith("ExecStart=")
    ]
    argv = shlex.split(lines[-1])
    assert argv[0] == INSTALLED_BINARY and INSTALLED_CONFIG in argv, argv
    argv[0] = str(BINARY)
    return [str(config) if a == INSTALLED_CONFIG else a for a in argv]


def notify_kwargs(daemon_port: int, site: str) -> dict[str, Any]:
    """Registry(...) arguments that make a registry post its events to the daemon."""
    return {
        "notify_url": f"http://127.0.0.1:{daemon_port}/events/{site}",
        "notify_headers": {"Authorization": [f"Bearer {TOKEN}"]},
    }


@dataclass
class DaemonProcess:
    root: Path
    config: dict[str, Any]
    port: int = field(default_factory=free_port)
    name: str = "daemon"  # names the harness's files (log, default journal); not the daemon
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    _run_starts_at: int = 0  # where the current run's lines begin in the log

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.root / "daemon.yaml"

    @property
    def log_path(self) -> Path:
        return self.root / f"{self.name}.log"

    def write_config(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        cfg = dict(self.config)
        cfg["listen"] = f"127.0.0.1:{self.port}"
        cfg.setdefault("journal", str(self.root / f"{self.name}.db"))
        self.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))

    def start(self, wait: bool = True) -> DaemonProcess:
        self.write_config()
        self._run_starts_at = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*unit_command(self.config_path), *self.extra_args],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "HOOK_TOKEN": TOKEN, **self.env},
        )
        log.close()
        if wait:
            wait_until(self.healthy, timeout=20, what=f"daemon on {self.url}")
        return self

    def healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"daemon exited {self.proc.returncode}: {self.log()[-3000:]}")
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGKILL)
            self.proc.wait()

    @property
    def instance_id(self) -> str | None:
        """The identity the current (or last) run of the daemon chose, from its "ready"
        log line; waits for that line while the run is still starting."""

        def logged() -> str | None:
            with open(self.log_path, "rb") as f:
                f.seek(self._run_starts_at)
                found = _READY.findall(f.read().decode(errors="replace"))
            return found[-1] if found else None

        if self.proc is None:
            return None
        if self.proc.poll() is not None:
            return logged()
        return wait_until(logged, timeout=20, what=f"the ready line of {self.name}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=5).text

    @property
    def journal_path(self) -> Path:
        return Path(self.config.get("journal") or self.root / f"{self.name}.db")

    def journal_rows(self, sql: str, params: tuple = ()) -> list[tuple]:
        """Read the daemon's journal (read-only) while it runs; [] before it exists."""
        if not self.journal_path.exists():
            return []
        conn = sqlite3.connect(f"file:{self.journal_path}?mode=ro", uri=True, timeout=5)
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:  # schema not created yet
            if "no such table" in str(exc):
                return []
            raise
        finally:
            conn.close()


def image_complete(reg: Registry, repo: str, ref: str, digest: str | None = None) -> bool:
    """Whether `repo:ref` is fetchable in full at `reg` (and is `digest`, when given)."""
    try:
        got = assert_image_complete(reg.url, repo, ref)
    except AssertionError:
        return False
    return digest is None or got == digest


def site_config(reg: Registry, **extra: Any) -> dict[str, Any]:
    return {"url": reg.url, "insecure": True, "webhook_token_env": "HOOK_TOKEN", **extra}


def a_to_b_daemon(
    root: Path, registry_factory: Any, rules: list[dict[str, Any]], **daemon: Any
) -> tuple[Registry, Registry, DaemonProcess]:
    """Registry a posting its webhooks to a daemon that replicates a -> b by `rules`: the
    shape most daemon tests start from. Not started, so a test can prepare b first."""
    port = free_port()
    a = registry_factory("a", **notify_kwargs(port, "a"))
    b = registry_factory("b")
    sites = {"a": site_config(a), "b": site_config(b)}
    return a, b, DaemonProcess(root, port=port, config={"sites": sites, "rules": rules}, **daemon)
