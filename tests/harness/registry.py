"""Real CNCF distribution registries (`docker-registry serve`) for tests.

Each instance listens on a free 127.0.0.1 port with its own storage directory
and deletes enabled. Optional: htpasswd basic auth, token auth (trusting a
test token server's certificate), and notifications to a webhook URL.

Deliberately not shared with replicator/demo/registries.py, the launcher that ships in
the wheel for the demo: the fixtures stay independent of the product code under test,
and the test-only knobs here (auth, config overrides, storage inspection) stay out of
the product.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.harness.util import free_port, wait_until

REGISTRY_BIN = shutil.which("docker-registry") or "/usr/bin/docker-registry"


@dataclass
class TokenAuth:
    realm: str
    service: str
    issuer: str
    rootcertbundle: str


@dataclass
class Registry:
    root: Path
    port: int = field(default_factory=free_port)
    htpasswd: Path | None = None
    token: TokenAuth | None = None
    notify_url: str | None = None
    notify_headers: dict[str, list[str]] | None = None
    extra_config: dict[str, Any] | None = None
    env: dict[str, str] | None = None  # extra environment (REGISTRY_* overrides config.yml)
    proc: subprocess.Popen | None = None

    @property
    def storage(self) -> Path:
        return self.root / "storage"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        """host:port as used in image references."""
        return f"127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.root / "config.yml"

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "error", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": f"127.0.0.1:{self.port}", "secret": "test-secret"},
        }
        if self.htpasswd:
            cfg["auth"] = {"htpasswd": {"realm": "test", "path": str(self.htpasswd)}}
        if self.token:
            cfg["auth"] = {"token": self.token.__dict__.copy()}
        if self.notify_url:
            cfg["notifications"] = {
                "events": {"includereferences": True},
                "endpoints": [
                    {
                        "name": "replicator",
                        "url": self.notify_url,
                        "headers": self.notify_headers or {},
                        "timeout": "2s",
                        "threshold": 3,
                        "backoff": "200ms",
                    }
                ],
            }
        if self.extra_config:
            _deep_merge(cfg, self.extra_config)
        return cfg

    def start(self) -> Registry:
        self.root.mkdir(parents=True, exist_ok=True)
        self.storage.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config()))
        log = open(self.root / "registry.log", "ab")
        self.proc = subprocess.Popen(
            [REGISTRY_BIN, "serve", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "OTEL_TRACES_EXPORTER": "none", **(self.env or {})},
        )
        log.close()
        wait_until(self._ready, timeout=15, what=f"registry on {self.url}")
        return self

    def _ready(self) -> bool:
        if self.proc and self.proc.poll() is not None:
            raise RuntimeError(
                f"registry exited: {(self.root / 'registry.log').read_text()[-2000:]}"
            )
        try:
            r = httpx.get(f"{self.url}/v2/", timeout=1)
        except httpx.TransportError:
            return False
        return r.status_code in (200, 401)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> Registry:
        self.stop()
        return self.start()

    def log_text(self) -> str:
        p = self.root / "registry.log"
        return p.read_text(errors="replace") if p.exists() else ""

    # --- storage inspection: the registry's own truth, not our counters ---
    def blob_path(self, digest: str) -> Path:
        hexd = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"

    def has_blob_data(self, digest: str) -> bool:
        return self.blob_path(digest).exists()

    def layer_link(self, repo: str, digest: str) -> Path:
        hexd = digest.split(":", 1)[1]
        return (
            self.storage
            / "docker/registry/v2/repositories"
            / repo
            / "_layers/sha256"
            / hexd
            / "link"
        )

    def all_blob_digests(self) -> set[str]:
        base = self.storage / "docker/registry/v2/blobs/sha256"
        if not base.exists():
            return set()
        return {f"sha256:{p.parent.name}" for p in base.glob("*/*/data")}


def _deep_merge(into: dict[str, Any], other: dict[str, Any]) -> None:
    for k, v in other.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _deep_merge(into[k], v)
        else:
            into[k] = v


def write_htpasswd(path: Path, users: dict[str, str]) -> Path:
    import bcrypt

    lines = [
        f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=4)).decode()}"
        for u, p in users.items()
    ]
    path.write_text("\n".join(lines) + "\n")
    return path
