"""How to reach one registry: URL, TLS, credentials and politeness limits.

Built from a configured site (`SiteEndpoint.from_config`, which reads the
site's secrets at that moment) or from a bare URL on the command line. Free
of I/O otherwise; `resolve_credentials()` reads the credential files named
(credprovider.py). Secrets never appear in a repr.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, tzinfo
from pathlib import Path
from urllib.parse import urlsplit

from replicator.config import AuthConfig, Config, LimitsConfig, read_secret
from replicator.errors import ConfigError
from replicator.registry.credentials import Credentials
from replicator.registry.credfiles import (
    auths_source,
    default_auth_file,
    default_docker_config,
    read_json_file,
)
from replicator.registry.credprovider import CredentialFiles, CredentialProvider
from replicator.registry.limits import BandwidthSchedule, RateWindow

__all__ = [
    "Credentials",
    "SiteEndpoint",
    "default_docker_config",
    "explicit_credentials",
    "load_docker_credentials",
]
from replicator.registry.dockerhub import api_url


def explicit_credentials(auth: AuthConfig | None, where: str) -> Credentials | None:
    """The explicit credentials of a site's `auth` (at config path `where`), secrets
    read now; None without `auth` or when it names credential files instead. Raises
    ConfigError naming the missing variable or file, never a secret."""
    if auth is None or auth.docker_config or auth.auth_file:
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
    return Credentials(username=auth.username, password=password, identity_token=token)


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
    auth_file: str | None = None  # a containers auth.json
    helper_max_age: float = 900.0  # seconds to keep a helper's answer of unknown lifetime
    concurrency: int = 8
    requests_per_second: float | None = None
    chunk_size: int | None = None  # upload blobs in PATCH chunks of this many bytes
    bandwidth: BandwidthSchedule | None = None  # bytes/s cap, shared by the process

    def __post_init__(self) -> None:
        self.url = api_url(self.url.rstrip("/"))  # docker.io answers at registry-1.docker.io
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
        auth = site.auth
        docker_config: str | None = None
        auth_file: str | None = None
        if auth and auth.docker_config is True:
            docker_config = str(default_docker_config())
        elif auth and isinstance(auth.docker_config, Path):
            docker_config = str(auth.docker_config)
        if auth and auth.auth_file is True:
            auth_file = str(default_auth_file())
        elif auth and isinstance(auth.auth_file, Path):
            auth_file = str(auth.auth_file)
        return cls(
            name=name,
            url=site.url,
            insecure=site.insecure,
            ca_file=str(tls.ca) if tls and tls.ca else None,
            cert_file=str(tls.cert) if tls and tls.cert else None,
            key_file=str(tls.key) if tls and tls.key else None,
            credentials=explicit_credentials(auth, f"sites.{name}.auth"),
            docker_config=docker_config,
            auth_file=auth_file,
            helper_max_age=auth.helper_max_age if auth else 900.0,
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

    def resolve_credentials(self) -> CredentialProvider:
        """Where this site's credentials come from: the explicit ones, else the docker
        config.json (its helpers, else its auths), else the containers auth.json. Reads
        the credential files now: ConfigError names a missing or unreadable one."""
        return CredentialProvider(
            self.name,
            self.host,
            explicit=self.credentials,
            files=CredentialFiles(
                docker_config=Path(self.docker_config) if self.docker_config else None,
                auth_file=Path(self.auth_file) if self.auth_file else None,
                helper_max_age=self.helper_max_age,
            ),
        )


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


def load_docker_credentials(path: str, host: str, *, site: str = "") -> Credentials | None:
    """The `auths` credentials for `host` in a docker config.json or containers
    auth.json, or None (helpers are run by `CredentialProvider`, not here)."""
    label = f"site {site!r}: " if site else ""
    doc = read_json_file(Path(path), "docker config", label)
    found = auths_source(doc, host, what=f"{label}docker config {path}")
    return found.credentials if found else None
