"""How to reach one registry: URL, TLS, credentials and politeness limits.

Built from a configured site (`SiteEndpoint.from_config`, which reads the
site's secrets at that moment) or from a bare URL on the command line. Free
of I/O otherwise, except reading a docker `config.json` on request. Secrets
never appear in a repr.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from datetime import UTC, tzinfo
from pathlib import Path
from urllib.parse import urlsplit

from replicator.config import AuthConfig, Config, LimitsConfig, read_secret
from replicator.errors import ConfigError
from replicator.registry.limits import BandwidthSchedule, RateWindow


@dataclass
class Credentials:
    username: str | None = None
    password: str | None = None
    identity_token: str | None = None

    def __repr__(self) -> str:
        hidden = "'***'"
        return (
            f"Credentials(username={self.username!r}, "
            f"password={hidden if self.password else None}, "
            f"identity_token={hidden if self.identity_token else None})"
        )

    __str__ = __repr__

    @property
    def has_basic(self) -> bool:
        return self.username is not None and self.password is not None

    @classmethod
    def from_config(cls, auth: AuthConfig | None, where: str) -> Credentials | None:
        """The explicit credentials of a site's `auth` (at config path `where`), secrets
        read now; None without `auth` or with `docker_config` (the client then reads
        config.json itself). Raises ConfigError naming the missing variable or file,
        never a secret."""
        if auth is None or auth.docker_config:
            return None
        password = read_secret(
            auth.password_env,
            auth.password_file,
            where + (".password_env" if auth.password_env else ".password_file"),
        )
        token = read_secret(
            auth.identity_token_env,
            auth.identity_token_file,
            where + (".identity_token_env" if auth.identity_token_env else ".identity_token_file"),
        )
        return cls(username=auth.username, password=password, identity_token=token)


@dataclass
class SiteEndpoint:
    name: str
    url: str
    insecure: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    credentials: Credentials | None = None
    docker_config: str | None = None
    concurrency: int = 8
    requests_per_second: float | None = None
    chunk_size: int | None = None  # upload blobs in PATCH chunks of this many bytes
    bandwidth: BandwidthSchedule | None = None  # bytes/s cap, shared by the process

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(
                f"site {self.name!r}: url {self.url!r} must look like "
                "https://host[:port] or http://host:port"
            )
        if parts.scheme == "http" and not self.insecure:
            raise ConfigError(
                f"site {self.name!r}: {self.url} uses plain http; set insecure: true to allow it"
            )
        if self.concurrency < 1:
            raise ConfigError(f"site {self.name!r}: concurrency must be at least 1")
        if self.requests_per_second is not None and self.requests_per_second <= 0:
            raise ConfigError(f"site {self.name!r}: requests_per_second must be positive")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ConfigError(f"site {self.name!r}: chunk_size must be positive")
        if self.key_file and not self.cert_file:
            raise ConfigError(f"site {self.name!r}: key_file given without cert_file")

    @classmethod
    def from_config(cls, config: Config, name: str) -> SiteEndpoint:
        """Everything the registry client needs to talk to configured site `name`,
        secrets read now (ConfigError names a missing one, or an unknown site)."""
        site = config.site(name)
        tls = site.tls
        docker_config: str | None = None
        if site.auth and site.auth.docker_config is True:
            docker_config = str(default_docker_config())
        elif site.auth and isinstance(site.auth.docker_config, Path):
            docker_config = str(site.auth.docker_config)
        return cls(
            name=name,
            url=site.url,
            insecure=site.insecure,
            ca_file=str(tls.ca) if tls and tls.ca else None,
            cert_file=str(tls.cert) if tls and tls.cert else None,
            key_file=str(tls.key) if tls and tls.key else None,
            credentials=Credentials.from_config(site.auth, f"sites.{name}.auth"),
            docker_config=docker_config,
            concurrency=site.limits.concurrency,
            requests_per_second=site.limits.requests_per_second,
            chunk_size=site.limits.chunk_size,
            bandwidth=bandwidth_schedule(site.limits, config.tzinfo),
        )

    @classmethod
    def from_url(
        cls, host_or_url: str, insecure: bool = False, name: str | None = None
    ) -> SiteEndpoint:
        """`127.0.0.1:5000` -> http when insecure else https; full URLs are kept."""
        text = host_or_url.strip().rstrip("/")
        if "://" not in text:
            text = f"{'http' if insecure else 'https'}://{text}"
        return cls(name=name or urlsplit(text).netloc, url=text, insecure=insecure)

    @property
    def host(self) -> str:
        """host[:port], the key used in docker config.json `auths`."""
        return urlsplit(self.url).netloc

    def resolve_credentials(self) -> Credentials | None:
        """Explicit credentials win; else the docker config.json entry for this host."""
        if self.credentials is not None:
            return self.credentials
        if self.docker_config:
            return load_docker_credentials(self.docker_config, self.host, site=self.name)
        return None


def bandwidth_schedule(limits: LimitsConfig, tz: tzinfo = UTC) -> BandwidthSchedule | None:
    """A site's `limits.bandwidth` and `limits.bandwidth_windows` as a schedule, its
    windows read in `tz` (the configuration's `timezone`)."""
    if limits.bandwidth is None and not limits.bandwidth_windows:
        return None
    days = {name: i for i, name in enumerate(("mon", "tue", "wed", "thu", "fri", "sat", "sun"))}
    windows = tuple(
        RateWindow(frozenset(days[d] for d in w.days), *w.minutes(), limit=w.limit)
        for w in limits.bandwidth_windows
    )
    return BandwidthSchedule(limits.bandwidth, windows, tz)


def default_docker_config() -> Path:
    """Where `docker login` keeps credentials: $DOCKER_CONFIG/config.json or ~/.docker."""
    base = os.environ.get("DOCKER_CONFIG")
    return (Path(base) if base else Path.home() / ".docker").expanduser() / "config.json"


def _auth_key_host(key: str) -> str:
    """`https://reg.example/v1/` -> `reg.example`; bare `host:port` unchanged."""
    if "://" in key:
        return urlsplit(key).netloc
    return key.split("/", 1)[0]


def load_docker_credentials(path: str, host: str, *, site: str = "") -> Credentials | None:
    """Credentials for `host` from a docker config.json `auths` map, or None.

    Accepts `auth` (base64 user:password), `username`/`password`, and
    `identitytoken`. Credential helpers (credsStore/credHelpers) are not run.
    """
    label = f"site {site!r}: " if site else ""
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{label}docker config {path} does not exist") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"{label}docker config {path} is not readable JSON: {type(exc).__name__}"
        ) from exc
    auths = doc.get("auths") if isinstance(doc, dict) else None
    if not isinstance(auths, dict):
        return None
    for key, entry in auths.items():
        if _auth_key_host(str(key)) != host or not isinstance(entry, dict):
            continue
        creds = Credentials(identity_token=entry.get("identitytoken") or None)
        if entry.get("auth"):
            try:
                decoded = base64.b64decode(str(entry["auth"]), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError) as exc:
                raise ConfigError(
                    f"{label}docker config {path}: auths[{key!r}].auth is not "
                    "base64 of user:password"
                ) from exc
            if ":" not in decoded:
                raise ConfigError(
                    f"{label}docker config {path}: auths[{key!r}].auth is not "
                    "base64 of user:password"
                )
            creds.username, creds.password = decoded.split(":", 1)
        elif entry.get("username") is not None:
            creds.username = str(entry["username"])
            creds.password = str(entry.get("password") or "")
        if creds.username is None and creds.identity_token is None:
            continue
        return creds
    return None
