"""Blob reads and deletes: HEAD, streamed GET (from an offset), DELETE.

Blob GETs follow redirects: registries commonly send them to a storage
backend or CDN on another host. httpx drops our Authorization header on a
redirect to another origin, so those hosts never see our credentials.

Downloads pay the site's bandwidth limiter (limits.py) for each chunk before
handing it on; TCP flow control then holds the sender to that rate.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx

from replicator.manifest import hasher_for
from replicator.registry.errors import DigestMismatch, RetryableError
from replicator.registry.limits import ByteRateLimiter, bandwidth_for
from replicator.registry.transport import Request, Transport, exc_text

CHUNK = 1 << 20  # download chunks handed to callers
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


class BlobStream:
    """A blob being downloaded: `size` (total), `offset` (first byte), chunks by iteration.

    From offset 0 the content is hashed on the fly and the iteration ends
    with DigestMismatch if it does not match; a stream that ends early raises
    a RetryableError naming the byte reached, so the caller can resume there.
    """

    def __init__(
        self,
        transport: Transport,
        response: httpx.Response,
        repository: str,
        digest: str,
        offset: int,
        *,
        verify: bool,
        bandwidth: ByteRateLimiter | None = None,
    ) -> None:
        self._transport = transport
        self._bandwidth = bandwidth
        self._resp = response
        self.repository = repository
        self.digest = digest
        self.offset = offset
        self.size, self._skip = stream_extent(response, offset)  # skip: server ignored Range
        self.received = 0  # bytes yielded so far (after `offset`)
        self.downloaded = 0  # bytes off the wire, including any the server sent before `offset`
        self._verify = verify and offset == 0
        self._consumed = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        if self._consumed:
            raise RuntimeError("a BlobStream can be iterated only once")
        self._consumed = True
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        hasher = hasher_for(self.digest) if self._verify else None
        site = self._transport.site.name
        stats = self._transport.stats
        skip = self._skip
        bandwidth = self._bandwidth
        try:
            async for chunk in self._resp.aiter_bytes(CHUNK):
                stats["bytes_downloaded"] += len(chunk)
                self.downloaded += len(chunk)
                if bandwidth is not None:
                    await bandwidth.take(len(chunk))
                if skip:
                    cut = min(skip, len(chunk))
                    chunk, skip = chunk[cut:], skip - cut
                    if not chunk:
                        continue
                self.received += len(chunk)
                if hasher:
                    hasher.update(chunk)
                yield chunk
        except httpx.TransportError as exc:
            raise RetryableError(
                f"blob download interrupted at byte {self.offset + self.received}"
                f"{_of(self.size)}: {exc_text(exc)}",
                site=site,
                repository=self.repository,
                reference=self.digest,
            ) from exc
        end = self.offset + self.received
        if self.size is not None and end != self.size:
            raise RetryableError(
                f"blob download ended at byte {end}{_of(self.size)}",
                site=site,
                repository=self.repository,
                reference=self.digest,
            )
        if hasher:
            actual = f"{self.digest.split(':', 1)[0]}:{hasher.hexdigest()}"
            if actual != self.digest:
                raise DigestMismatch(
                    f"blob content hashes to {actual}",
                    site=site,
                    repository=self.repository,
                    reference=self.digest,
                )

    async def read(self) -> bytes:
        """The whole (remaining) content; for small blobs such as image configs."""
        return b"".join([chunk async for chunk in self])


class Blobs:
    """The blob verbs of one registry (uploads live in uploads.py)."""

    def __init__(self, transport: Transport) -> None:
        self._t = transport
        site = transport.site
        self.bandwidth = bandwidth_for(site.name, site.url, site.bandwidth)

    def url(self, repo: str, digest: str) -> str:
        return self._t.url(f"/v2/{repo}/blobs/{digest}")

    async def head(self, repo: str, digest: str) -> int | None:
        resp = await self._t.send(
            Request(
                "HEAD", self.url(repo, digest), repo, digest, ok=(200, 404), follow_redirects=True
            )
        )
        if resp.status_code == 404:
            return None
        length = resp.headers.get("content-length")
        return int(length) if length and length.isdigit() else 0

    @asynccontextmanager
    async def open(
        self, repo: str, digest: str, offset: int = 0, *, verify: bool = True
    ) -> AsyncIterator[BlobStream]:
        headers = {"Range": f"bytes={offset}-"} if offset else None
        async with self._t.downloads:
            resp = await self._t.send(
                Request(
                    "GET",
                    self.url(repo, digest),
                    repo,
                    digest,
                    headers=headers,
                    ok=(200, 206),
                    stream=True,
                    follow_redirects=True,
                    transfer=True,
                )
            )
            try:
                yield BlobStream(
                    self._t, resp, repo, digest, offset, verify=verify, bandwidth=self.bandwidth
                )
            finally:
                await resp.aclose()

    async def delete(self, repo: str, digest: str) -> bool:
        resp = await self._t.send(
            Request("DELETE", self.url(repo, digest), repo, digest, ok=(200, 202, 204, 404))
        )
        return resp.status_code != 404


def stream_extent(resp: httpx.Response, offset: int) -> tuple[int | None, int]:
    """(total blob size, bytes to skip) for a blob GET answer."""
    if resp.status_code == 206:
        m = _CONTENT_RANGE.match(resp.headers.get("content-range", ""))
        if m and m.group(3) != "*":
            return int(m.group(3)), 0
        length = resp.headers.get("content-length")
        return (offset + int(length) if length and length.isdigit() else None), 0
    length = resp.headers.get("content-length")
    return (int(length) if length and length.isdigit() else None), offset


def _of(size: int | None) -> str:
    return f" of {size}" if size is not None else ""
