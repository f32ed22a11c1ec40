"""Where one site's credentials come from, asked again when they stop working.

In order: explicit credentials (the site's `auth` with secrets from env/file),
else the docker config.json (a credential helper or its `auths`), else the
containers auth.json. File documents are read when the site's client is made
(so a missing file is a configuration error at once) and again, off the
event loop, after the registry refused what they gave. A helper's answer
comes from the process-wide `HelperCache`; a refusal drops it so the helper
runs again (a short-lived ECR/GCR token refreshed without a restart).

Per-repository, because auth.json keys may be scoped to a namespace.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from replicator.errors import ConfigError
from replicator.registry.credentials import Credentials
from replicator.registry.credfiles import (
    CredentialSource,
    auths_source,
    docker_config_source,
    helper_server_address,
    read_json_file,
)
from replicator.registry.credhelpers import SHARED_CACHE, HelperCache, helper_program, run_helper
from replicator.registry.errors import Unauthorized


@dataclass
class CredentialFiles:
    """The credential files a site reads (None: not configured)."""

    docker_config: Path | None = None
    auth_file: Path | None = None
    helper_max_age: float = 900.0  # seconds a helper answer without a known expiry is kept
    helper_timeout: float = 30.0


@dataclass
class _Seen:
    """What the last lookup found, for error messages."""

    source: CredentialSource | None = None
    reason: str = ""  # a helper's "exited 1: credentials not found"
    credentials: Credentials | None = field(default=None, repr=False)


class CredentialProvider:
    """The credentials to present to one registry, per repository."""

    def __init__(
        self,
        site: str,
        host: str,
        *,
        explicit: Credentials | None = None,
        files: CredentialFiles | None = None,
        cache: HelperCache = SHARED_CACHE,
    ) -> None:
        self.site = site
        self.host = host
        self._explicit = explicit
        self._files = files or CredentialFiles()
        self._cache = cache
        self._docs: dict[str, dict[str, Any]] | None = None
        self._seen = _Seen()
        self._helper_lock = asyncio.Lock()
        if explicit is None:
            self._docs = self._read_docs()

    def __repr__(self) -> str:
        return f"CredentialProvider(site={self.site!r}, host={self.host!r})"

    @property
    def configured(self) -> bool:
        """Whether any credentials are configured (they may still lack this host)."""
        return self._explicit is not None or bool(
            self._files.docker_config or self._files.auth_file
        )

    @property
    def last(self) -> Credentials | None:
        """The credentials the last lookup found."""
        return self._explicit if self._explicit is not None else self._seen.credentials

    def _read_docs(self) -> dict[str, dict[str, Any]]:
        label = f"site {self.site!r}: "
        docs = {}
        if self._files.docker_config:
            docs["docker"] = read_json_file(self._files.docker_config, "docker config", label)
        if self._files.auth_file:
            docs["containers"] = read_json_file(self._files.auth_file, "auth file", label)
        return docs

    def source_for(self, repository: str | None) -> CredentialSource | None:
        """Which configured source applies to `repository` on this host. Pure over the
        files read."""
        if self._explicit is not None:
            return CredentialSource(credentials=self._explicit, origin="the site's auth")
        docs = self._docs or {}
        if "docker" in docs:
            found = docker_config_source(
                docs["docker"], self.host, repository, path=str(self._files.docker_config)
            )
            if found:
                return found
        if "containers" in docs:
            return auths_source(
                docs["containers"],
                self.host,
                repository,
                what=f"auth file {self._files.auth_file}",
            )
        return None

    async def get(self, repository: str | None = None) -> Credentials | None:
        """The credentials for `repository` (running a helper if its answer is not cached)."""
        if self._explicit is not None:
            return self._explicit
        if self._docs is None:
            try:
                self._docs = await asyncio.to_thread(self._read_docs)
            except ConfigError as exc:  # the file went away or broke since start-up
                raise Unauthorized(str(exc), site=self.site) from None
        source = self.source_for(repository)
        self._seen = _Seen(source=source)
        if source is None:
            return None
        if source.helper is None:
            self._seen.credentials = source.credentials
            return source.credentials
        answer = self._cache.get(source.helper, self.host)
        if answer is None:
            async with self._helper_lock:  # concurrent requests share one helper run
                answer = self._cache.get(source.helper, self.host)
                if answer is None:
                    answer = await run_helper(
                        source.helper,
                        helper_server_address(self.host),
                        site=self.site,
                        timeout=self._files.helper_timeout,
                    )
                    self._cache.runs += 1
                    self._cache.put(source.helper, self.host, answer, self._files.helper_max_age)
        self._seen.credentials, self._seen.reason = answer.credentials, answer.reason
        return answer.credentials

    def refresh(self, repository: str | None = None) -> bool:
        """Forget what was refused; True when asking again may give something new (a
        helper runs again, a file is read again), False for fixed credentials."""
        if self._explicit is not None:
            return False
        source = self.source_for(repository)
        if source is not None and source.helper is not None:
            self._cache.forget(source.helper, self.host)
        self._docs = None  # `docker login` may have written new credentials
        return True

    def describe(self) -> str:
        """Who we were, for an error after a refusal: ` as user 'bob'`,
        ` (no credentials configured)`, ` (docker-credential-pass exited 1: ...)`."""
        if self._explicit is not None:
            user = self._explicit.username
            return f" as user {user!r}" if user else ""
        source, creds = self._seen.source, self._seen.credentials
        if source is None:
            if self.configured:
                return f" (no credentials for {self.host} in {self._file_names()})"
            return " (no credentials configured)"
        via = helper_program(source.helper) if source.helper else source.origin
        if creds is None:
            return f" ({self._seen.reason or via + ' has no credentials'})"
        if creds.username:
            return f" as user {creds.username!r} (from {via})"
        return f" with an identity token (from {via})"

    def _file_names(self) -> str:
        names = [str(p) for p in (self._files.docker_config, self._files.auth_file) if p]
        return " or ".join(names)
