"""Async client for one registry's OCI distribution API: the facade over the verbs.

`RegistryClient` is what the copy engine, sync, failover, GC and the CLI use.
It holds one `Transport` (transport.py: httpx, auth, limits, retries) and
the verbs by kind on top of it: manifests.py, blobs.py, uploads.py,
listing.py and referrers.py, the way regclient splits internal/reghttp from
scheme/reg.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from replicator.manifest import Descriptor, Manifest, digest_of
from replicator.registry.blobs import Blobs, BlobStream
from replicator.registry.bounds import ReadBounds
from replicator.registry.listing import Listing
from replicator.registry.manifests import BeforePlaceholder, Manifests, TagDeletion
from replicator.registry.referrers import Referrers
from replicator.registry.site import SiteEndpoint
from replicator.registry.transport import Request, RetryPolicy, Transport
from replicator.registry.uploads import OpenSource, Progress, Uploads

__all__ = ["BlobStream", "RegistryClient", "TagDeletion"]


class RegistryClient:
    """Talks to one registry (`site`); use as `async with RegistryClient(site) as c:`.

    `site.concurrency` bounds requests in flight and, separately, open blob
    downloads (see Transport); `stats` counts requests, retries and bytes;
    `bounds` caps what it reads into memory (bounds.py).
    """

    def __init__(
        self,
        site: SiteEndpoint,
        *,
        retries: int = 5,
        timeout: float = 60.0,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        max_retry_after: float = 120.0,
        blob_read_timeout: float = 300.0,
        bounds: ReadBounds | None = None,
    ) -> None:
        self.site = site
        policy = RetryPolicy(retries, backoff_base, backoff_max, max_retry_after)
        self._transport = Transport(
            site, policy, timeout=timeout, blob_read_timeout=blob_read_timeout
        )
        self.stats = self._transport.stats
        bounds = bounds or ReadBounds()
        self._manifests = Manifests(self._transport, bounds)
        self._blobs = Blobs(self._transport)
        self._uploads = Uploads(self._transport, self._blobs)
        self._listing = Listing(self._transport, bounds)
        self._referrers = Referrers(self._transport, self._manifests, bounds)

    @property
    def retries(self) -> int:
        return self._transport.policy.retries

    def observe_requests(self, observer: Callable[[str, str, int | None, float], None]) -> None:
        """Call `observer(site, method, status or None, seconds)` after every request
        (the daemon's per-site request metrics)."""
        self._transport.observer = observer

    def pull_budget(self) -> dict[str, Any] | None:
        """The registry's pull budget as last seen (limit, remaining, window, observed_at),
        or None when it reports none (see limits.PullBudget)."""
        return self._transport.budget.snapshot()

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._transport.aclose()

    def __repr__(self) -> str:
        return f"RegistryClient(site={self.site.name!r}, url={self.site.url!r})"

    # ------------------------------------------------------------------ API
    async def ping(self) -> None:
        """GET /v2/ with auth: proves the registry is reachable and we may log in."""
        await self._transport.send(Request("GET", self._transport.url("/v2/"), scopes=()))

    async def head_manifest(self, repo: str, ref: str) -> Descriptor | None:
        """Media type, digest and size of `repo:ref`, or None if absent. HEAD is not a pull."""
        return await self._manifests.head(repo, ref)

    async def get_manifest(self, repo: str, ref: str) -> Manifest:
        """The manifest's exact bytes, digest-verified (against `ref` or Docker-Content-Digest)."""
        return await self._manifests.get(repo, ref)

    async def put_manifest(self, repo: str, ref: str, raw: bytes, media_type: str) -> str:
        """Store `raw` under `ref` (tag or digest); returns its digest."""
        return await self._manifests.put(repo, ref, raw, media_type)

    async def delete_manifest(self, repo: str, digest: str) -> bool:
        """Delete a manifest by digest; False only if it was certainly already gone (a
        404 after a failed attempt counts as deleted: that attempt may have done it)."""
        return await self._manifests.delete(repo, digest)

    async def delete_tag(
        self, repo: str, tag: str, *, before_placeholder: BeforePlaceholder | None = None
    ) -> TagDeletion:
        """Remove the tag `repo:tag` only; the manifest and its other tags stay.

        DELETE by tag where the registry supports it, else (distribution 2.8) a
        placeholder manifest pushed to the tag and deleted by digest; see
        manifests.py. `before_placeholder(repo, digest)` runs before that push.
        A tag already absent is not an error (`TagDeletion.deleted` is False).
        """
        return await self._manifests.delete_tag(
            repo, tag, self._ensure_small_blob, before_placeholder
        )

    async def _ensure_small_blob(self, repo: str, data: bytes) -> None:
        digest = digest_of(data)
        if await self._blobs.head(repo, digest) is None:

            async def body() -> AsyncIterator[bytes]:
                yield data

            await self._uploads.put(repo, digest, len(data), body())

    async def head_blob(self, repo: str, digest: str) -> int | None:
        """Size of the blob in `repo`, or None when the repository does not hold it."""
        return await self._blobs.head(repo, digest)

    @asynccontextmanager
    async def open_blob(
        self, repo: str, digest: str, offset: int = 0, *, verify: bool = True
    ) -> AsyncIterator[BlobStream]:
        """Stream a blob (from `offset` with a Range request), following redirects."""
        async with self._blobs.open(repo, digest, offset, verify=verify) as stream:
            yield stream

    async def get_blob(self, repo: str, digest: str) -> bytes:
        """A small blob (config, signature payload) in memory, digest-verified."""
        async with self._blobs.open(repo, digest) as stream:
            return await stream.read()

    async def delete_blob(self, repo: str, digest: str) -> bool:
        """Unlink a blob from `repo`; False if it was not there."""
        return await self._blobs.delete(repo, digest)

    async def mount_blob(self, repo: str, digest: str, from_repo: str) -> str | None:
        """Cross-repository mount. None when mounted (201); else the upload location (202)."""
        return await self._uploads.mount(repo, digest, from_repo)

    async def start_upload(self, repo: str) -> str:
        """Open an upload session; returns its absolute location."""
        return await self._uploads.start(repo)

    async def cancel_upload(self, location: str) -> None:
        """Best-effort DELETE of an upload session; errors are ignored."""
        await self._uploads.cancel(location)

    async def upload_blob(
        self,
        repo: str,
        digest: str,
        size: int,
        chunks: AsyncIterable[bytes],
        location: str | None = None,
    ) -> None:
        """Monolithic streamed PUT of `size` bytes. Not retried here (the stream is spent):
        failures raise a RegistryError with `retryable` telling whether a new try may work."""
        await self._uploads.put(repo, digest, size, chunks, location)

    @property
    def upload_chunk_size(self) -> int | None:
        """Bytes per PATCH when blobs must go to this site in chunks (`limits.chunk_size`, or
        learnt from a 413 answer); None when one PUT per blob is fine."""
        return self._uploads.chunk_size

    async def upload_blob_chunked(
        self,
        repo: str,
        digest: str,
        size: int,
        open_source: OpenSource,
        chunk_size: int | None = None,
        location: str | None = None,
        progress: Progress | None = None,
    ) -> None:
        """Upload in PATCH chunks (`chunk_size`, else the site's, else 50 MiB); after a
        failure ask the registry how much it holds and resume there via
        `open_source(offset)` (or restart if it dropped the session). The content is
        hashed on the way and the upload cancelled, never committed, if it does not
        match `digest`. `progress(n)` is called after each chunk the registry accepted."""
        await self._uploads.put_chunked(
            repo, digest, size, open_source, chunk_size, location, progress
        )

    async def list_tags(self, repo: str, *, page_size: int = 1000) -> list[str]:
        """Every tag of `repo`, following Link pagination; [] for an unknown repository."""
        return await self._listing.tags(repo, page_size)

    async def list_tags_if_exists(self, repo: str, *, page_size: int = 1000) -> list[str] | None:
        """Every tag of `repo`, or None when the registry does not know the repository."""
        return await self._listing.tags_if_exists(repo, page_size)

    async def catalog(self, *, page_size: int = 1000) -> list[str]:
        """Every repository name, following Link pagination."""
        return await self._listing.catalog(page_size)

    async def referrers(
        self, repo: str, digest: str, *, artifact_type: str | None = None
    ) -> list[Descriptor]:
        """Manifests whose `subject` is `digest`: the referrers API when the registry has it,
        else the `sha256-<hex>` fallback tag's index; [] when neither exists."""
        found, _ = await self._referrers.list(repo, digest, artifact_type)
        return found

    async def referrers_and_fallback(
        self,
        repo: str,
        digest: str,
        *,
        artifact_type: str | None = None,
        fallback_tagged: bool = True,
    ) -> tuple[list[Descriptor], Manifest | None]:
        """`referrers()`, plus the fallback tag's index when that is where they came from
        (a copier needs the index itself, and reading it again costs two more requests).
        `fallback_tagged=False`: the caller listed the tags and the fallback tag is not
        among them; it is not fetched."""
        return await self._referrers.list(
            repo, digest, artifact_type, fallback_tagged=fallback_tagged
        )

    async def fallback_index(self, repo: str, digest: str) -> Manifest | None:
        """The referrers fallback tag (`sha256-<hex>`) of `digest`, or None."""
        return await self._referrers.fallback_index(repo, digest)
