"""Registry authentication: challenges, scopes, and the Bearer token cache.

The registry tells us how to authenticate in `WWW-Authenticate` on a 401.
For Bearer we ask the token server (realm) for all the scopes a request needs
in one go (`scope=` repeated) and cache the token per scope set until shortly
before it expires. Which scopes a request needs is inferred from its method:
pull for reads, pull,push for writes, delete for DELETE, plus pull on the
source repository of a cross-repository mount.

The token realm may live on another host (auth.docker.io serves Docker Hub),
but it receives our credentials, so an https registry's realm must be https
too: a challenge naming an http:// realm is refused, not followed.

Credentials come from a `CredentialProvider` (explicit, docker config.json
with its credential helpers, containers auth.json), asked per repository. When
the token server or a Basic registry refuses credentials a helper gave, they
are dropped and asked for once more: short-lived helper tokens are renewed
without a restart.

Parsing and scope arithmetic are pure; `Authenticator` does the token I/O.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx

from replicator.registry.credentials import Credentials
from replicator.registry.credprovider import CredentialProvider
from replicator.registry.errors import RegistryUnavailable, RetryableError, Unauthorized
from replicator.registry.origin import where

log = logging.getLogger("replicator.registry.auth")

_ITEM_RE = re.compile(r'([A-Za-z0-9_.-]+)(?:\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,]*))?')


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower case: "bearer", "basic"
    params: dict[str, str] = field(default_factory=dict, hash=False)

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")

    @property
    def service(self) -> str | None:
        return self.params.get("service")

    @property
    def scopes(self) -> list[str]:
        return self.params.get("scope", "").split()


def parse_challenges(values: Iterable[str]) -> list[Challenge]:
    """Parse `WWW-Authenticate` values; a bare word starts a challenge, `k=v` adds a param."""
    out: list[Challenge] = []
    for value in values:
        for m in _ITEM_RE.finditer(value):
            key, raw = m.group(1), m.group(2)
            if raw is None:
                out.append(Challenge(key.lower(), {}))
            elif out:
                if raw.startswith('"') and raw.endswith('"') and len(raw) >= 2:
                    raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
                out[-1].params[key.lower()] = raw
    return out


def merge_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    """Combine actions per resource: `repository:a:pull` + `repository:a:push` ->
    `repository:a:pull,push`. Sorted, so equal needs give equal cache keys."""
    actions: dict[tuple[str, str], set[str]] = {}
    for scope in scopes:
        scope = scope.strip()
        if not scope:
            continue
        head, _, acts = scope.rpartition(":")
        rtype, _, name = head.partition(":")
        if not rtype or not name:
            continue
        actions.setdefault((rtype, name), set()).update(a for a in acts.split(",") if a)
    return tuple(f"{t}:{n}:{','.join(sorted(a))}" for (t, n), a in sorted(actions.items()))


@functools.lru_cache(maxsize=4096)
def scopes_for(
    method: str, repository: str | None, *, mount_from: str | None = None, catalog: bool = False
) -> tuple[str, ...]:
    """The token scopes a request needs, inferred from its method (as distribution checks)."""
    scopes: list[str] = []
    if catalog:
        scopes.append("registry:catalog:*")
    if repository:
        method = method.upper()
        if method in ("GET", "HEAD"):
            scopes.append(f"repository:{repository}:pull")
        elif method == "DELETE":
            scopes.append(f"repository:{repository}:delete")
        else:
            scopes.append(f"repository:{repository}:pull,push")
        if mount_from:
            scopes.append(f"repository:{mount_from}:pull")
    return merge_scopes(scopes)


def scope_repository(scopes: Iterable[str]) -> str | None:
    """The repository whose credentials a scope set needs: the one pushed to, else the first."""
    first: str | None = None
    for scope in scopes:
        head, _, actions = scope.rpartition(":")
        rtype, _, name = head.partition(":")
        if rtype != "repository" or not name:
            continue
        if "push" in actions.split(","):
            return name
        first = first or name
    return first


@dataclass
class _Token:
    value: str
    expires_at: float  # time.monotonic()


class Authenticator:
    """Per-registry auth state: the scheme learnt from challenges and cached tokens."""

    def __init__(
        self,
        site: str,
        http: httpx.AsyncClient,
        credentials: CredentialProvider | Credentials | None,
        stats: dict[str, int],
        *,
        registry_url: str,
    ) -> None:
        self.site = site
        self._registry_https = registry_url.startswith("https://")
        self._http = http
        if not isinstance(credentials, CredentialProvider):
            credentials = CredentialProvider(
                site, registry_url.split("://", 1)[-1].split("/", 1)[0], explicit=credentials
            )
        self._creds = credentials
        self._stats = stats
        self.scheme: str | None = None  # None until a challenge or success says
        self.anonymous_ok = False  # a request without auth succeeded
        self._bearer: Challenge | None = None
        self._tokens: dict[tuple[str, ...], _Token] = {}
        self._locks: dict[tuple[str, ...], asyncio.Lock] = {}
        self._scope_map: dict[tuple[str, ...], tuple[str, ...]] = {}

    @property
    def credentials(self) -> Credentials | None:
        """The credentials last presented (or about to be)."""
        return self._creds.last

    def identity(self) -> str:
        """Who we were for an error: ` as user 'bob'`, ` (no credentials configured)`."""
        return self._creds.describe()

    async def has_basic_credentials(self, scopes: tuple[str, ...]) -> bool:
        creds = await self._creds.get(scope_repository(scopes))
        return bool(creds and creds.has_basic)

    def refresh_credentials(self, scopes: tuple[str, ...]) -> bool:
        """The registry refused our credentials: drop them (a helper runs again, a file is
        read again) and say whether trying once more may help."""
        return self._creds.refresh(scope_repository(scopes))

    def effective_scopes(self, scopes: tuple[str, ...]) -> tuple[str, ...]:
        """The scope set to request for `scopes`, widened by earlier challenges."""
        return self._scope_map.get(scopes, scopes)

    def remember_scopes(self, scopes: tuple[str, ...], effective: tuple[str, ...]) -> None:
        if effective != scopes:
            self._scope_map[scopes] = effective

    @property
    def known(self) -> bool:
        return self.scheme is not None or self.anonymous_ok

    def note_success_without_auth(self) -> None:
        if self.scheme is None:
            self.anonymous_ok = True

    def learn(self, response: httpx.Response) -> Challenge | None:
        """Record the challenge of a 401; return it (None if the header is unusable)."""
        challenges = parse_challenges(response.headers.get_list("www-authenticate"))
        for ch in challenges:
            if ch.scheme == "bearer" and ch.realm:
                self._check_realm(ch.realm)
                self.scheme, self._bearer = "bearer", ch
                return ch
        for ch in challenges:
            if ch.scheme == "basic":
                self.scheme = "basic"
                return ch
        return None

    def _check_realm(self, realm: str) -> None:
        scheme = realm.split("://", 1)[0].lower() if "://" in realm else ""
        if scheme == "https" or (scheme == "http" and not self._registry_https):
            return
        why = "is not https while the registry is" if scheme == "http" else "is not an http(s) URL"
        raise Unauthorized(
            f"token realm {where(realm)} {why}; refusing to send credentials there",
            site=self.site,
            status=401,
        )

    def invalidate(self, scopes: tuple[str, ...]) -> None:
        self._tokens.pop(scopes, None)

    async def headers_for(self, scopes: tuple[str, ...]) -> dict[str, str]:
        """Authorization header for a request needing `scopes` (fetching a token if needed)."""
        if self.scheme == "basic":
            creds = await self._creds.get(scope_repository(scopes))
            if creds and creds.has_basic:
                return {"Authorization": _basic(creds)}
            return {}
        if self.scheme == "bearer":
            return {"Authorization": f"Bearer {await self.token(scopes)}"}
        return {}

    async def token(self, scopes: tuple[str, ...]) -> str:
        tok = self._tokens.get(scopes)
        if tok and tok.expires_at > time.monotonic():
            return tok.value
        lock = self._locks.setdefault(scopes, asyncio.Lock())
        async with lock:
            tok = self._tokens.get(scopes)
            if tok and tok.expires_at > time.monotonic():
                return tok.value
            tok = await self._fetch(scopes)
            self._tokens[scopes] = tok
            return tok.value

    async def _fetch(self, scopes: tuple[str, ...]) -> _Token:
        """A token for `scopes`; when the token server refuses credentials that may
        have expired (a helper's, a file's), they are renewed and tried once more."""
        repository = scope_repository(scopes)
        creds = await self._creds.get(repository)
        try:
            return await self._fetch_with(scopes, creds)
        except Unauthorized as exc:
            if exc.status not in (401, 403) or creds is None:
                raise
            if not self._creds.refresh(repository):
                raise
            renewed = await self._creds.get(repository)
            log.info(
                "%s: token server refused our credentials; asking again with renewed ones",
                self.site,
            )
            return await self._fetch_with(scopes, renewed)

    async def _fetch_with(self, scopes: tuple[str, ...], creds: Credentials | None) -> _Token:
        assert self._bearer is not None and self._bearer.realm
        realm, service = self._bearer.realm, self._bearer.service
        self._stats["token_requests"] = self._stats.get("token_requests", 0) + 1
        log.debug(
            "%s: requesting token from %s for %s",
            self.site,
            where(realm),
            " ".join(scopes) or "(no scope)",
        )
        try:
            if creds and creds.identity_token:
                form = {
                    "grant_type": "refresh_token",
                    "refresh_token": creds.identity_token,
                    "client_id": "registry-replicator",
                    "scope": " ".join(scopes),
                }
                if service:
                    form["service"] = service
                resp = await self._http.post(realm, data=form)
            else:
                params: list[tuple[str, str | int | float | bool | None]] = []
                if service:
                    params.append(("service", service))
                params += [("scope", s) for s in scopes]
                headers = {"Authorization": _basic(creds)} if creds and creds.has_basic else {}
                resp = await self._http.get(realm, params=params, headers=headers)
        except httpx.TransportError as exc:
            raise RegistryUnavailable(
                f"token server {where(realm)} unreachable: {type(exc).__name__}", site=self.site
            ) from exc
        if resp.status_code in (401, 403):
            who = (
                f"user {creds.username!r}"
                if creds and creds.username
                else "our identity token"
                if creds and creds.identity_token
                else "anonymous access"
            )
            if creds is None and self._creds.configured:
                who += self._creds.describe()  # why anonymous: a helper had none, ...
            raise Unauthorized(
                f"token server {where(realm)} refused {who}",
                site=self.site,
                status=resp.status_code,
            )
        if resp.status_code >= 500 or resp.status_code == 429:
            raise RetryableError(
                f"token server {where(realm)} failed", site=self.site, status=resp.status_code
            )
        if resp.status_code != 200:
            raise Unauthorized(
                f"token server {where(realm)} answered unexpectedly",
                site=self.site,
                status=resp.status_code,
            )
        try:
            body: dict[str, Any] = resp.json()
            value = str(body.get("token") or body.get("access_token") or "")
            expires_in = float(body.get("expires_in") or 60)
        except (ValueError, TypeError, AttributeError) as exc:
            raise Unauthorized(
                f"token server {where(realm)} sent an unreadable answer", site=self.site
            ) from exc
        if not value:
            raise Unauthorized(f"token server {where(realm)} sent no token", site=self.site)
        # Renew a little early so a token never expires between check and use.
        margin = min(30.0, expires_in / 10)
        return _Token(value, time.monotonic() + max(1.0, expires_in - margin))


def _basic(creds: Credentials | None) -> str:
    assert creds is not None
    raw = f"{creds.username}:{creds.password}".encode()
    return "Basic " + base64.b64encode(raw).decode()
