"""Local `docker-registry` processes standing in for regions in the demo.

The test harness has its own launcher (tests/harness/registry.py) on purpose: this one
ships in the wheel and holds only what the demo needs (an async start, errors that say
what to install); the harness adds test-only knobs (basic and token auth, config
overrides, storage inspection) and stays independent of the product code it tests.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

from replicator.errors import ReplicatorError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def registry_binary() -> str:
    found = shutil.which("docker-registry") or shutil.which("registry")
    if not found:
        raise ReplicatorError(
            "the demo needs Debian's docker-registry package (CNCF "
            "distribution); run `bash .ci/setup` or "
            "`apt-get install docker-registry`"
        )
    return found


@dataclass
class LocalRegistry:
    name: str
    root: Path
    port: int
    notify_url: str | None = None
    notify_token: str | None = None
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def storage(self) -> Path:
        return self.root / "storage"

    @property
    def config_path(self) -> Path:
        return self.root / "registry.yml"

    def write_config(self) -> None:
        config: dict = {
            "version": 0.1,
            "log": {"level": "error", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": f"127.0.0.1:{self.port}", "secret": "demo-only"},
        }
        if self.notify_url:
            config["notifications"] = {
                "events": {"includereferences": True},
                "endpoints": [
                    {
                        "name": "replicator",
                        "url": self.notify_url,
                        "timeout": "2s",
                        "threshold": 3,
                        "backoff": "500ms",
                        "headers": {"Authorization": [f"Bearer {self.notify_token}"]},
                    }
                ],
            }
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(config))

    def spawn(self) -> None:
        self.write_config()
        with open(self.root / "registry.log", "ab") as log:
            self.proc = subprocess.Popen(
                [registry_binary(), "serve", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    async def start(self) -> None:
        await asyncio.to_thread(self.spawn)
        assert self.proc is not None
        deadline = time.monotonic() + 15
        async with httpx.AsyncClient() as http:
            while True:
                if self.proc.poll() is not None:
                    raise ReplicatorError(
                        f"registry {self.name} exited; see {self.root / 'registry.log'}"
                    )
                try:
                    if (await http.get(f"{self.url}/v2/", timeout=1)).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise ReplicatorError(f"registry {self.name} did not start on {self.url}")
                await asyncio.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def blob_bytes(self) -> int:
        base = self.storage / "docker/registry/v2/blobs"
        return sum(p.stat().st_size for p in base.rglob("data")) if base.exists() else 0
