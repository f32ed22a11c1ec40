"""Blob uploads: cross-repository mount, sessions, monolithic and chunked PUT.

Streamed uploads cannot be replayed, so they fail with a `retryable` error
and the caller decides; chunked uploads resume from the offset the registry
reports, re-opening the source there.

Registries and the proxies in front of them cap request bodies (ACR,
nginx's `client_max_body_size`, CDNs at 100 MB) and answer 413. The chunked
path (PATCH with Content-Range, then `PUT ?digest=`) is used when the site
sets `limits.chunk_size`, and from the first 413 on for the rest of the
client's life (one client per site per process, see clients.py) with chunks
of a safe fraction of the refused body. The chunked path hashes what it
sends and checks the digest before the closing PUT, so a blob that does not
match is never committed; to resume mid-blob it keeps the hash state at the
last offset the registry acknowledged.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import re
from collections.abc import AsyncIterable, AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from urllib.parse import quote, urljoin, urlsplit

import httpx

from replicator.manifest import hasher_for
from replicator.registry.auth import scopes_for
from replicator.registry.blobs import Blobs
from replicator.registry.errors import DigestMismatch, NotFound, RegistryError, RetryableError
from replicator.registry.transport import Request, Transport

log = logging.getLogger("replicator.registry")

_UPLOAD_PATH = re.compile(r"/v2/(.+)/blobs/uploads/")
_RANGE = re.compile(r"(?:bytes=)?0-(\d+)")
_OCTETS = "application/octet-stream"

OpenSource = Callable[[int], AbstractAsyncContextManager[AsyncIterable[bytes]]]
Progress = Callable[[int], None]

# After a 413 on a monolithic PUT: chunks of half the refused body, at most this.
DEFAULT_CHUNK = 50 * 2**20
MIN_CHUNK = 256 * 2**10  # below this a 413 is not a body limit we can work around
TOO_LARGE = 413


def chunk_after_413(refused: int) -> int:
    """The chunk size to use after a body of `refused` bytes drew a 413: half of it
    (a limit is rarely just below what was sent), at most DEFAULT_CHUNK."""
    return max(MIN_CHUNK, min(DEFAULT_CHUNK, refused // 2))


class Uploads:
    """The upload verbs of one registry."""

    def __init__(self, transport: Transport, blobs: Blobs) -> None:
        self._t = transport
        self._blobs = blobs
        self._learnt_chunk: int | None = None  # from a 413; overrides the configured size

    @property
    def chunk_size(self) -> int | None:
        """Bytes per PATCH when blobs go in chunks to this site; None for one PUT."""
        return self._learnt_chunk or self._t.site.chunk_size

    def _learn_chunk(self, refused: int, repo: str, digest: str) -> bool:
        """A body of `refused` bytes drew a 413: use smaller chunks from now on. False when
        the chunks cannot usefully shrink any further."""
        if refused <= MIN_CHUNK:
            return False
        new = chunk_after_413(refused)
        if self.chunk_size is not None and new >= self.chunk_size:
            return False
        self._learnt_chunk = new
        self._t.stats["upload_chunk_size"] = new
        log.warning(
            "%s: %s@%s: the registry refused a %d-byte body (413); uploading in "
            "%d-byte chunks to this site from now on",
            self._t.site.name,
            repo,
            digest,
            refused,
            new,
        )
        return True

    def _sessions_url(self, repo: str) -> str:
        return self._t.url(f"/v2/{repo}/blobs/uploads/")

    async def mount(self, repo: str, digest: str, from_repo: str) -> str | None:
        mount = f"?mount={quote(digest, safe='')}&from={quote(from_repo, safe='')}"
        resp = await self._t.send(
            Request(
                "POST",
                self._sessions_url(repo) + mount,
                repo,
                digest,
                scopes=scopes_for("POST", repo, mount_from=from_repo),
                ok=(201, 202),
            )
        )
        if resp.status_code == 201:
            return None
        return self._location(resp, repo, digest)

    async def start(self, repo: str) -> str:
        resp = await self._t.send(Request("POST", self._sessions_url(repo), repo, ok=(202,)))
        return self._location(resp, repo, None)

    async def cancel(self, location: str) -> None:
        repo = _repo_of_upload(location)
        try:
            await self._t.send(
                Request("DELETE", location, repo, ok=(200, 202, 204, 404), attempts=1)
            )
        except RegistryError as exc:
            log.debug("%s: cancelling upload failed (ignored): %s", self._t.site.name, exc)

    async def put(
        self,
        repo: str,
        digest: str,
        size: int,
        chunks: AsyncIterable[bytes],
        location: str | None = None,
    ) -> None:
        await self._t.prime_auth()
        loc = location or await self.start(repo)
        try:
            await self._t.send(
                Request(
                    "PUT",
                    with_digest(loc, digest),
                    repo,
                    digest,
                    content=self._counting(chunks),
                    headers={"Content-Type": _OCTETS, "Content-Length": str(size)},
                    ok=(201, 204),
                    replayable=False,
                    transfer=True,
                )
            )
        except BaseException as exc:
            if isinstance(exc, RegistryError) and exc.status == TOO_LARGE:
                self._learn_chunk(size, repo, digest)
            await self.cancel(loc)
            raise

    async def put_chunked(
        self,
        repo: str,
        digest: str,
        size: int,
        open_source: OpenSource,
        chunk_size: int | None = None,
        location: str | None = None,
        progress: Progress | None = None,
    ) -> None:
        """PATCH `size` bytes from `open_source(offset)` in chunks (of `chunk_size`, else the
        site's), then close with `PUT ?digest=` once the content hashes to `digest`."""
        if chunk_size is not None and chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        await self._t.prime_auth()
        loc = location or await self.start(repo)
        # The last offset the registry acknowledged, and the hash of the bytes before it.
        acked = _HashPoint(0, hasher_for(digest))
        offset, failures, n, reader = 0, 0, 0, None
        reported = 0  # bytes announced to `progress`
        while True:
            try:
                async with open_source(acked.offset) as source:
                    reader = _SourceReader(source, self._t.site.name, repo, digest, acked, size)
                    await reader.skip(offset - acked.offset)  # held beyond the last ack
                    while offset < size:
                        n = min(chunk_size or self.chunk_size or DEFAULT_CHUNK, size - offset)
                        loc, offset = await self._patch(loc, repo, digest, offset, n, reader)
                        acked = await reader.point()
                        if progress and offset > reported:  # not again after a restart
                            progress(offset - reported)
                            reported = offset
                break
            except BaseException as exc:
                shrunk = (
                    isinstance(exc, RegistryError)
                    and exc.status == TOO_LARGE
                    and self._learn_chunk(n, repo, digest)
                )
                if shrunk:
                    chunk_size = None
                if not (shrunk or _is_retryable(exc)) or failures >= self._t.policy.retries:
                    await self.cancel(loc)
                    raise
                failures += 1
                delay = 0.0 if shrunk else self._t.policy.backoff(failures)
                log.info(
                    "%s: %s: chunked upload failed at byte %d (%s); checking the "
                    "server's offset in %.2fs",
                    self._t.site.name,
                    f"{repo}@{digest}",
                    offset,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                loc, offset = await self._resume_point(loc, repo)
                if offset < acked.offset or offset > size:
                    acked = _HashPoint(0, hasher_for(digest))  # registry holds less: restart
                    if offset > size:
                        loc, offset = await self._restart(loc, repo, "holds too many bytes")
        assert reader is not None
        actual = await reader.digest()
        if actual != digest:
            await self.cancel(loc)
            raise DigestMismatch(
                f"source content hashes to {actual}; upload cancelled before commit",
                site=self._t.site.name,
                repository=repo,
                reference=digest,
            )
        try:
            await self._t.send(
                Request(
                    "PUT",
                    with_digest(loc, digest),
                    repo,
                    digest,
                    content=b"",
                    ok=(201, 204),
                    headers={"Content-Type": _OCTETS},
                )
            )
        except NotFound:
            # A retried PUT whose first answer was lost finds its session already closed.
            if await self._blobs.head(repo, digest) != size:
                raise

    async def _patch(
        self, loc: str, repo: str, digest: str, offset: int, n: int, reader: _SourceReader
    ) -> tuple[str, int]:
        """Send the next `n` bytes of `reader` (from `offset`); returns the session's next
        location and offset."""
        resp = await self._t.send(
            Request(
                "PATCH",
                loc,
                repo,
                digest,
                content=self._counting(reader.take(n)),
                headers={
                    "Content-Type": _OCTETS,
                    "Content-Length": str(n),
                    "Content-Range": f"{offset}-{offset + n - 1}",
                },
                ok=(202, 204),
                replayable=False,
                transfer=True,
            )
        )
        new_loc = self._location(resp, repo, digest)
        reported = range_end(resp.headers.get("range"))
        if reported is not None and reported != offset + n:
            raise RetryableError(
                f"registry holds {reported} bytes after a chunk ending at {offset + n}",
                site=self._t.site.name,
                repository=repo,
                reference=digest,
            )
        return new_loc, offset + n

    async def _resume_point(self, loc: str, repo: str) -> tuple[str, int]:
        """Where to continue: the registry's offset for the session, else a new session."""
        try:
            resp = await self._t.send(Request("GET", loc, repo, ok=(200, 204)))
            offset = range_end(resp.headers.get("range")) or 0
            self._t.stats["upload_resumes"] += 1
            log.info(
                "%s: %s: upload session holds %d bytes; resuming there",
                self._t.site.name,
                repo,
                offset,
            )
            return self._location(resp, repo, None), offset
        except RegistryError as exc:
            if exc.status not in (400, 404, 416):
                raise
            # distribution drops a session whose size no longer matches its upload state
            # (a chunk was partly written): start over.
            return await self._restart(loc, repo, f"lost ({exc.detail})")

    async def _restart(self, loc: str, repo: str, why: str) -> tuple[str, int]:
        self._t.stats["upload_restarts"] += 1
        log.info("%s: %s: upload session %s; restarting from byte 0", self._t.site.name, repo, why)
        await self.cancel(loc)
        return await self.start(repo), 0

    def _location(self, resp: httpx.Response, repo: str, ref: str | None) -> str:
        loc = resp.headers.get("location")
        if not loc:
            raise RegistryError(
                "upload answer has no Location header",
                site=self._t.site.name,
                repository=repo,
                reference=ref,
                status=resp.status_code,
            )
        return urljoin(str(resp.url), loc)

    async def _counting(self, chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
        """Count the bytes sent, paying the site's bandwidth limiter before each piece."""
        stats, bandwidth = self._t.stats, self._blobs.bandwidth
        async for chunk in chunks:
            if bandwidth is not None:
                await bandwidth.take(len(chunk))
            stats["bytes_uploaded"] += len(chunk)
            yield chunk


class _HashPoint:
    """An offset into the blob and the hash state of the bytes before it."""

    def __init__(self, offset: int, hasher: hashlib._Hash) -> None:
        self.offset = offset
        self.hasher = hasher


class _SourceReader:
    """Hands out exactly `n` bytes at a time from a source of arbitrary chunk sizes,
    hashing them, the source opened at `start.offset` with `start`'s hash state."""

    def __init__(
        self,
        source: AsyncIterable[bytes],
        site: str,
        repo: str,
        digest: str,
        start: _HashPoint,
        size: int,
    ) -> None:
        self._it = aiter(source)
        self._buf = b""
        self._pos = start.offset
        self._hasher = start.hasher.copy()
        self._pending: asyncio.Future[None] | None = None
        self._size = size
        self._site, self._repo, self._digest = site, repo, digest

    async def point(self) -> _HashPoint:
        """Where the reader stands (the bytes handed out so far), to resume from later."""
        await self.settle()
        return _HashPoint(self._pos, self._hasher.copy())

    async def digest(self) -> str:
        await self.settle()
        return f"{self._digest.split(':', 1)[0]}:{self._hasher.hexdigest()}"

    async def skip(self, n: int) -> None:
        """Hash `n` bytes without handing them out (the registry holds them already)."""
        async for _ in self.take(n):
            pass

    async def take(self, n: int) -> AsyncIterator[bytes]:
        remaining = n
        while remaining > 0:
            if not self._buf:
                try:
                    self._buf = bytes(await anext(self._it))
                except StopAsyncIteration:
                    raise RetryableError(
                        f"source ended at byte {self._pos} of {self._size}",
                        site=self._site,
                        repository=self._repo,
                        reference=self._digest,
                    ) from None
            piece, self._buf = self._buf[:remaining], self._buf[remaining:]
            remaining -= len(piece)
            self._pos += len(piece)
            await self._hash(piece)
            yield piece

    async def _hash(self, piece: bytes) -> None:
        """Hash on a worker thread (hashlib releases the GIL), one update in flight at a
        time so the order holds, overlapping the hashing with the network."""
        if len(piece) < _THREAD_HASH_MIN:
            await self.settle()
            self._hasher.update(piece)
            return
        await self.settle()
        loop = asyncio.get_running_loop()
        self._pending = loop.run_in_executor(_hash_pool(), self._hasher.update, piece)

    async def settle(self) -> None:
        """Wait for the hashing in flight (before reading or copying the hash state)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            await pending


_THREAD_HASH_MIN = 64 * 2**10  # smaller pieces are hashed inline: a thread hop costs more
_HASH_POOL: concurrent.futures.ThreadPoolExecutor | None = None


def _hash_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _HASH_POOL
    if _HASH_POOL is None:
        _HASH_POOL = concurrent.futures.ThreadPoolExecutor(4, "upload-hash")
    return _HASH_POOL


def _is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, httpx.TransportError):
        return True
    return bool(getattr(exc, "retryable", False))


def range_end(value: str | None) -> int | None:
    """Bytes held by an upload session from its `Range: 0-<last>` header.

    `0-0` is ambiguous (distribution sends it for an empty session); we read it as 0.
    """
    if not value:
        return None
    m = _RANGE.match(value.strip())
    if not m:
        return None
    last = int(m.group(1))
    return 0 if last == 0 else last + 1


# Plain string work on upload locations: they are long (a signed `_state`), and
# httpx.URL validates every character in Python, twice per join or merge.
def with_digest(location: str, digest: str) -> str:
    """`location` with `digest=` added to its query, as the closing PUT needs."""
    sep = "&" if urlsplit(location).query else ("" if location.endswith("?") else "?")
    return f"{location}{sep}digest={quote(digest, safe='')}"


def _repo_of_upload(location: str) -> str | None:
    m = _UPLOAD_PATH.search(urlsplit(location).path)
    return m.group(1) if m else None
