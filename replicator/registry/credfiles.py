"""Where the ecosystem keeps registry credentials, and which entry applies to a host.

Two file formats share one shape:

- docker's `config.json` ($DOCKER_CONFIG/config.json, ~/.docker/config.json):
  `auths` {host: {auth | username/password | identitytoken}}, plus credential
  helpers: `credHelpers` {host: NAME} for one host, `credsStore: NAME` for all.
  A per-host helper wins over the store; `auths` apply when no helper does.
- the containers `auth.json` (podman, skopeo, buildah): `auths` only, whose
  keys may be scoped to a namespace (`quay.io/team`); the most specific key
  matching a repository wins. Found at $REGISTRY_AUTH_FILE, else
  $XDG_RUNTIME_DIR/containers/auth.json, else ~/.config/containers/auth.json.

What applies is a `CredentialSource`: fixed credentials, or the name of a helper
to run (credhelpers.py runs it). Choosing is pure; reading a file is the only
I/O here. Errors name the file and the key, never a secret.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from replicator.errors import ConfigError
from replicator.registry.credentials import Credentials

# docker stores Docker Hub credentials under its v1 index URL; all these are one registry.
_DOCKER_HUB = ("docker.io", "index.docker.io", "registry-1.docker.io")
DOCKER_HUB_INDEX = "https://index.docker.io/v1/"


@dataclass(frozen=True)
class CredentialSource:
    """What to present to one registry: fixed credentials or a helper's answer."""

    credentials: Credentials | None = None
    helper: str | None = None  # NAME of docker-credential-NAME
    origin: str = ""  # for messages: "docker config /p/config.json auths['reg']"

    def __repr__(self) -> str:  # the credentials' own repr hides their secrets
        return f"CredentialSource(helper={self.helper!r}, origin={self.origin!r})"


def same_registry(a: str, b: str) -> bool:
    """Whether two hosts name one registry (Docker Hub goes by three names)."""
    a, b = a.lower(), b.lower()
    return a == b or (a in _DOCKER_HUB and b in _DOCKER_HUB)


def helper_server_address(host: str) -> str:
    """What to write to a helper's stdin for `host`: docker stores Docker Hub's
    credentials under its v1 index URL, every other registry under its host."""
    return DOCKER_HUB_INDEX if host.lower() in _DOCKER_HUB else host


def key_host_and_path(key: str) -> tuple[str, str]:
    """`https://reg.example/v1/` -> (`reg.example`, ``); `quay.io/team/app` ->
    (`quay.io`, `team/app`). A URL key's path is an API path, not a namespace."""
    if "://" in key:
        return urlsplit(key).netloc, ""
    host, _, path = key.partition("/")
    return host, path.strip("/")


def _in_namespace(repository: str | None, namespace: str) -> bool:
    if not namespace:
        return True
    return repository is not None and (
        repository == namespace or repository.startswith(namespace + "/")
    )


def matching_auths_key(
    auths: Mapping[str, Any], host: str, repository: str | None = None
) -> str | None:
    """The `auths` key that applies to `host` (and `repository`): the longest
    namespace containing the repository, else the host-wide entry."""
    best: tuple[int, str] | None = None
    for key in auths:
        key_host, namespace = key_host_and_path(str(key))
        if not same_registry(key_host, host) or not _in_namespace(repository, namespace):
            continue
        rank = len(namespace.split("/")) if namespace else 0
        if best is None or rank > best[0]:
            best = (rank, str(key))
    return best[1] if best else None


def parse_auth_entry(entry: Any, where: str) -> Credentials | None:
    """Credentials of one `auths` entry (`auth` base64 user:password, `username` and
    `password`, `identitytoken`); None when it holds none (a helper's marker)."""
    if not isinstance(entry, dict):
        return None
    creds = Credentials(identity_token=str(entry.get("identitytoken") or "") or None)
    if entry.get("auth"):
        try:
            decoded = base64.b64decode(str(entry["auth"]), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            decoded = ""
        if ":" not in decoded:
            raise ConfigError(f"{where}.auth is not base64 of user:password")
        creds.username, creds.password = decoded.split(":", 1)
    elif entry.get("username") is not None:
        creds.username = str(entry["username"])
        creds.password = str(entry.get("password") or "")
    if creds.username == "<token>" and creds.password and not creds.identity_token:
        # how helpers and some tools write an identity token
        creds.username, creds.identity_token, creds.password = None, creds.password, None
    return creds if creds.usable else None


def read_json_file(path: Path, what: str, label: str = "") -> dict[str, Any]:
    """A credentials file as a JSON object; ConfigError names the file (never its content)."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{label}{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"{label}{what} {path} is not readable JSON: {type(exc).__name__}"
        ) from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{label}{what} {path} is not a JSON object")
    return doc


def docker_config_source(
    doc: Mapping[str, Any], host: str, repository: str | None = None, *, path: str = "config.json"
) -> CredentialSource | None:
    """Which of a docker config.json's credentials apply to `host`, by docker's rules:
    `credHelpers[host]`, else `credsStore`, else the `auths` entry. Pure."""
    helpers = doc.get("credHelpers")
    if isinstance(helpers, dict):
        for key, name in helpers.items():
            if same_registry(key_host_and_path(str(key))[0], host) and name:
                return CredentialSource(
                    helper=str(name), origin=f"docker config {path} credHelpers[{key!r}]"
                )
    store = doc.get("credsStore")
    if isinstance(store, str) and store:
        return CredentialSource(helper=store, origin=f"docker config {path} credsStore")
    return auths_source(doc, host, repository, what=f"docker config {path}")


def auths_source(
    doc: Mapping[str, Any], host: str, repository: str | None = None, *, what: str
) -> CredentialSource | None:
    """The `auths` entry of a docker config.json or containers auth.json for `host`."""
    auths = doc.get("auths")
    if not isinstance(auths, dict):
        return None
    key = matching_auths_key(auths, host, repository)
    if key is None:
        return None
    where = f"{what}: auths[{key!r}]"
    creds = parse_auth_entry(auths[key], where)
    return CredentialSource(credentials=creds, origin=where) if creds else None


def auth_file_candidates(environ: Mapping[str, str], home: Path) -> list[Path]:
    """containers-auth.json(5) lookup order: $REGISTRY_AUTH_FILE, else
    $XDG_RUNTIME_DIR/containers/auth.json, else ~/.config/containers/auth.json."""
    if environ.get("REGISTRY_AUTH_FILE"):
        return [Path(environ["REGISTRY_AUTH_FILE"])]
    out = []
    if environ.get("XDG_RUNTIME_DIR"):
        out.append(Path(environ["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    out.append(home / ".config" / "containers" / "auth.json")
    return out


def default_auth_file() -> Path:
    """The auth.json podman and skopeo would use here (the first that exists, else the first)."""
    candidates = auth_file_candidates(os.environ, Path.home())
    return next((p for p in candidates if p.is_file()), candidates[0])


def default_docker_config() -> Path:
    """Where `docker login` keeps credentials: $DOCKER_CONFIG/config.json or ~/.docker."""
    base = os.environ.get("DOCKER_CONFIG")
    return (Path(base) if base else Path.home() / ".docker").expanduser() / "config.json"
