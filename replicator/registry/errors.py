"""Errors from talking to one registry.

Every message names the site, and the repository and reference when there is
one, so an operator reading a log line knows which registry and image failed:
`us-east: team/app:v1: manifest unknown (HTTP 404)`. `retryable` tells callers
whether trying the same operation again may succeed (the client retries
replayable requests itself; streamed uploads cannot be replayed, so their
retry belongs to the caller).
"""

from __future__ import annotations

from replicator.errors import ReplicatorError
from replicator.manifest import ManifestError


def describe_target(repository: str | None, reference: str | None) -> str:
    """`team/app:v1`, `team/app@sha256:…`, or just the repository."""
    if not repository:
        return reference or ""
    if not reference:
        return repository
    sep = "@" if ":" in reference else ":"
    return f"{repository}{sep}{reference}"


class RegistryError(ReplicatorError):
    """A request to a registry failed; `str()` names site, repository and reference."""

    retryable = False

    def __init__(
        self,
        message: str,
        *,
        site: str,
        repository: str | None = None,
        reference: str | None = None,
        status: int | None = None,
        retryable: bool | None = None,
    ) -> None:
        self.site = site
        self.repository = repository
        self.reference = reference
        self.status = status
        self.detail = message
        if retryable is not None:
            self.retryable = retryable
        parts = [site]
        target = describe_target(repository, reference)
        if target:
            parts.append(target)
        text = ": ".join([*parts, message])
        if status is not None:
            text += f" (HTTP {status})"
        super().__init__(text)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"


class NotFound(RegistryError):
    """The repository, manifest, blob or upload does not exist (404)."""


class Unauthorized(RegistryError):
    """Authentication failed or access was denied (401/403, or the token server refused)."""


class DigestMismatch(RegistryError):
    """Content did not hash to the digest it was requested or announced by.

    Usually corruption in transit, so it is retryable; a registry that keeps
    serving bad bytes fails again and the caller's retry budget ends it.
    """

    retryable = True


class InvalidManifest(RegistryError, ManifestError):
    """The registry served a manifest we cannot use (schema 1, not JSON, unknown type)."""


class RetryableError(RegistryError):
    """A transient failure: 5xx, 429, or a connection lost mid-transfer."""

    retryable = True


class RegistryUnavailable(RetryableError):
    """The registry could not be reached at all (refused, DNS, TLS, timeouts) after retries."""


class ResponseTooLarge(RegistryError):
    """An answer exceeded a read bound (`bounds.py`); reading stopped at the bound.

    Not retryable: the registry would send the same oversized answer again.
    """
