"""Async client for one registry's OCI distribution API.

One `httpx.AsyncClient` per registry; a semaphore bounds concurrent requests
and an optional token bucket bounds the request rate. Replayable requests are
retried with tenacity (connection errors, 5xx, 429 honouring Retry-After);
other 4xx are answered at once. Streamed uploads cannot be replayed, so they
fail with a `retryable` error and the caller decides; chunked uploads resume
from the offset the registry reports, re-opening the source there.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import httpcore
import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from replicator.backoff import jittered_backoff
from replicator.errors import ConfigError
from replicator.logs import redact
from replicator.manifest import (
    ACCEPT_MANIFESTS,
    OCI_INDEX,
    Descriptor,
    Manifest,
    ManifestError,
    digest_of,
    hasher_for,
    is_digest,
    parse_manifest,
)
from replicator.registry.auth import Authenticator, merge_scopes, scopes_for
from replicator.registry.errors import (
    DigestMismatch,
    InvalidManifest,
    NotFound,
    RegistryError,
    RegistryUnavailable,
    RetryableError,
    Unauthorized,
)
from replicator.registry.limits import TokenBucket, parse_retry_after
from replicator.registry.site import SiteEndpoint

log = logging.getLogger("replicator.registry")

CHUNK = 1 << 20  # download chunks handed to callers

# httpcore reads responses 64 KiB at a time, and every read costs the same
# Python work whatever its size. Blob bodies are megabytes and asyncio hands
# over up to 256 KiB per socket read, so take that much: about 10 % less CPU
# copying the benchmark workload (benchmarks/bench_copy.py).
httpcore.AsyncHTTP11Connection.READ_NUM_BYTES = max(
    httpcore.AsyncHTTP11Connection.READ_NUM_BYTES, 256 * 1024
)
_LINK_NEXT = re.compile(r'<([^>]+)>\s*;\s*(?:[^,]*;\s*)?rel="?next"?', re.I)
_UPLOAD_PATH = re.compile(r"/v2/(.+)/blobs/uploads/")
_MAX_ERROR_BODY = 64 * 1024

Target = tuple[str | None, str | None]  # (repository, reference) for messages


class _TransientStatus(Exception):
    """A 5xx/429 answer, raised inside the retry loop and turned into RetryableError."""

    def __init__(self, status: int, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


class BlobStream:
    """A blob being downloaded: `size` (total), `offset` (first byte), chunks by iteration.

    From offset 0 the content is hashed on the fly and the iteration ends
    with DigestMismatch if it does not match; a stream that ends early raises
    a RetryableError naming the byte reached, so the caller can resume there.
    """

    def __init__(
        self,
        client: RegistryClient,
        response: httpx.Response,
        repository: str,
        digest: str,
        offset: int,
        size: int | None,
        skip: int,
        verify: bool,
    ) -> None:
        self._client = client
        self._resp = response
        self.repository = repository
        self.digest = digest
        self.offset = offset
        self.size = size
        self.received = 0  # bytes yielded so far (after `offset`)
        self._skip = skip  # server ignored Range: drop the bytes before offset
        self._verify = verify and offset == 0
        self._consumed = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        if self._consumed:
            raise RuntimeError("a BlobStream can be iterated only once")
        self._consumed = True
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        hasher = hasher_for(self.digest) if self._verify else None
        site = self._client.site.name
        skip = self._skip
        try:
            async for chunk in self._resp.aiter_bytes(CHUNK):
                self._client.stats["bytes_downloaded"] += len(chunk)
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
                f"{_of(self.size)}: {_exc_text(exc)}",
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


class RegistryClient:
    """Talks to one registry (`site`); use as `async with RegistryClient(site) as c:`.

    `site.concurrency` bounds requests being sent or awaiting their answer
    (an upload holds its slot while its body streams), and separately the
    open blob downloads. An open download does not hold a request slot:
    clients shared between sites that replicate both ways would otherwise
    deadlock, each side's downloads waiting on uploads that wait for the
    other side's slots. (A download takes its stream slot before any request
    slot, and an upload's source stream is open before its slot is taken, so
    the two kinds cannot wait on each other in a cycle.)
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
    ) -> None:
        self.site = site
        self.retries = retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.max_retry_after = max_retry_after
        self.stats: dict[str, int] = {
            "requests": 0,
            "retries": 0,
            "bytes_uploaded": 0,
            "bytes_downloaded": 0,
            "token_requests": 0,
            "upload_resumes": 0,
            "upload_restarts": 0,
        }
        self._timeout = httpx.Timeout(timeout, connect=min(timeout, 15.0))
        self._blob_timeout = httpx.Timeout(
            timeout,
            connect=min(timeout, 15.0),
            read=max(timeout, blob_read_timeout),
            write=max(timeout, blob_read_timeout),
        )
        self._http = httpx.AsyncClient(
            http1=True,
            http2=False,
            verify=_tls_verify(site),
            timeout=self._timeout,
            follow_redirects=False,
            # Room for every request slot and every open download, so requests
            # do not queue inside httpcore's pool (which rescans every connection,
            # a system call each, whenever its queue moves), and all of them kept
            # alive (fewer keep-alive slots churned ~160 TCP connections per
            # 60-image copy).
            limits=httpx.Limits(
                max_connections=2 * site.concurrency + 2,
                max_keepalive_connections=2 * site.concurrency + 2,
            ),
            headers={"User-Agent": "registry-replicator/0.1"},
        )
        self._slots = asyncio.Semaphore(site.concurrency)
        self._streams = asyncio.Semaphore(site.concurrency)  # open blob downloads
        self._referrers_api: bool | None = None  # None: not known yet
        self._bucket = TokenBucket(site.requests_per_second) if site.requests_per_second else None
        self._auth = Authenticator(site.name, self._http, site.resolve_credentials(), self.stats)

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    def __repr__(self) -> str:
        return f"RegistryClient(site={self.site.name!r}, url={self.site.url!r})"

    # ------------------------------------------------------------------ API
    async def ping(self) -> None:
        """GET /v2/ with auth: proves the registry is reachable and we may log in."""
        await self._request("GET", self._url("/v2/"), (None, None), ())

    async def head_manifest(self, repo: str, ref: str) -> Descriptor | None:
        """Media type, digest and size of `repo:ref`, or None if absent. HEAD is not a pull."""
        resp = await self._request(
            "HEAD",
            self._manifest_url(repo, ref),
            (repo, ref),
            scopes_for("HEAD", repo),
            headers={"Accept": ACCEPT_MANIFESTS},
            allow_404=True,
        )
        if resp.status_code == 404:
            return None
        digest = resp.headers.get("docker-content-digest")
        media_type = _media_type(resp.headers.get("content-type"))
        size = resp.headers.get("content-length")
        if not digest or not media_type or size is None or not size.isdigit():
            return (await self.get_manifest(repo, ref)).descriptor()
        if is_digest(ref) and digest != ref:
            raise DigestMismatch(
                f"registry announces digest {digest}",
                site=self.site.name,
                repository=repo,
                reference=ref,
            )
        return Descriptor(media_type, digest, int(size))

    async def get_manifest(self, repo: str, ref: str) -> Manifest:
        """The manifest's exact bytes, digest-verified (against `ref` or Docker-Content-Digest)."""
        resp = await self._request(
            "GET",
            self._manifest_url(repo, ref),
            (repo, ref),
            scopes_for("GET", repo),
            headers={"Accept": ACCEPT_MANIFESTS},
        )
        raw = resp.content
        announced = resp.headers.get("docker-content-digest")
        expected = (
            ref if is_digest(ref) else (announced if announced and is_digest(announced) else None)
        )
        if expected:
            actual = digest_of(raw, expected.split(":", 1)[0])
            if actual != expected:
                raise DigestMismatch(
                    f"manifest content hashes to {actual}, expected {expected}",
                    site=self.site.name,
                    repository=repo,
                    reference=ref,
                )
        try:
            return parse_manifest(raw, resp.headers.get("content-type"), expected)
        except ManifestError as exc:
            raise InvalidManifest(
                str(exc), site=self.site.name, repository=repo, reference=ref
            ) from exc

    async def put_manifest(self, repo: str, ref: str, raw: bytes, media_type: str) -> str:
        """Store `raw` under `ref` (tag or digest); returns its digest."""
        digest = digest_of(raw)
        if is_digest(ref) and digest_of(raw, ref.split(":", 1)[0]) != ref:
            raise DigestMismatch(
                f"manifest content hashes to {digest}",
                site=self.site.name,
                repository=repo,
                reference=ref,
            )
        resp = await self._request(
            "PUT",
            self._manifest_url(repo, ref),
            (repo, ref),
            scopes_for("PUT", repo),
            content=raw,
            headers={"Content-Type": media_type},
            ok=(200, 201, 202, 204),
        )
        announced = resp.headers.get("docker-content-digest")
        if announced and announced.startswith("sha256:") and announced != digest:
            raise DigestMismatch(
                f"registry stored digest {announced}, we sent {digest}",
                site=self.site.name,
                repository=repo,
                reference=ref,
            )
        return digest

    async def delete_manifest(self, repo: str, digest: str) -> bool:
        """Delete a manifest by digest; False if it was already gone."""
        resp = await self._request(
            "DELETE",
            self._manifest_url(repo, digest),
            (repo, digest),
            scopes_for("DELETE", repo),
            ok=(200, 202, 204),
            allow_404=True,
        )
        return resp.status_code != 404

    async def head_blob(self, repo: str, digest: str) -> int | None:
        """Size of the blob in `repo`, or None when the repository does not hold it."""
        resp = await self._request(
            "HEAD",
            self._blob_url(repo, digest),
            (repo, digest),
            scopes_for("HEAD", repo),
            allow_404=True,
            follow_redirects=True,
        )
        if resp.status_code == 404:
            return None
        length = resp.headers.get("content-length")
        return int(length) if length and length.isdigit() else 0

    @asynccontextmanager
    async def open_blob(
        self, repo: str, digest: str, offset: int = 0, *, verify: bool = True
    ) -> AsyncIterator[BlobStream]:
        """Stream a blob (from `offset` with a Range request), following redirects."""
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        async with self._streams:
            resp = await self._request(
                "GET",
                self._blob_url(repo, digest),
                (repo, digest),
                scopes_for("GET", repo),
                headers=headers,
                ok=(200, 206),
                stream=True,
                follow_redirects=True,
                timeout=self._blob_timeout,
            )
            try:
                size, skip = _stream_extent(resp, offset)
                yield BlobStream(self, resp, repo, digest, offset, size, skip, verify)
            finally:
                await resp.aclose()

    async def get_blob(self, repo: str, digest: str) -> bytes:
        """A small blob (config, signature payload) in memory, digest-verified."""
        async with self.open_blob(repo, digest) as stream:
            return await stream.read()

    async def delete_blob(self, repo: str, digest: str) -> bool:
        """Unlink a blob from `repo`; False if it was not there."""
        resp = await self._request(
            "DELETE",
            self._blob_url(repo, digest),
            (repo, digest),
            scopes_for("DELETE", repo),
            ok=(200, 202, 204),
            allow_404=True,
        )
        return resp.status_code != 404

    async def mount_blob(self, repo: str, digest: str, from_repo: str) -> str | None:
        """Cross-repository mount. None when mounted (201); else the upload location (202)."""
        resp = await self._request(
            "POST",
            self._url(f"/v2/{repo}/blobs/uploads/"),
            (repo, digest),
            scopes_for("POST", repo, mount_from=from_repo),
            params={"mount": digest, "from": from_repo},
            ok=(201, 202),
        )
        if resp.status_code == 201:
            return None
        return self._location(resp, (repo, digest))

    async def start_upload(self, repo: str) -> str:
        """Open an upload session; returns its absolute location."""
        resp = await self._request(
            "POST",
            self._url(f"/v2/{repo}/blobs/uploads/"),
            (repo, None),
            scopes_for("POST", repo),
            ok=(202,),
        )
        return self._location(resp, (repo, None))

    async def cancel_upload(self, location: str) -> None:
        """Best-effort DELETE of an upload session; errors are ignored."""
        repo = _repo_of_upload(location)
        try:
            await self._request(
                "DELETE",
                location,
                (repo, None),
                scopes_for("DELETE", repo),
                ok=(200, 202, 204),
                allow_404=True,
                attempts=1,
            )
        except RegistryError as exc:
            log.debug("%s: cancelling upload failed (ignored): %s", self.site.name, exc)

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
        await self._prime_auth()
        loc = location or await self.start_upload(repo)
        counted = self._counting(chunks)
        try:
            await self._request(
                "PUT",
                _with_digest(loc, digest),
                (repo, digest),
                scopes_for("PUT", repo),
                content=counted,
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
                ok=(201, 204),
                replayable=False,
                timeout=self._blob_timeout,
            )
        except BaseException:
            await self.cancel_upload(loc)
            raise

    async def upload_blob_chunked(
        self,
        repo: str,
        digest: str,
        size: int,
        open_source: Callable[[int], AbstractAsyncContextManager[AsyncIterable[bytes]]],
        chunk_size: int = 64 * 2**20,
        location: str | None = None,
    ) -> None:
        """Upload in PATCH chunks; after a failure ask the registry how much it holds and
        resume there via `open_source(offset)` (or restart if it dropped the session)."""
        if chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        await self._prime_auth()
        target: Target = (repo, digest)
        loc = location or await self.start_upload(repo)
        offset, failures = 0, 0
        while offset < size:
            try:
                async with open_source(offset) as source:
                    reader = _SourceReader(source, self.site.name, repo, digest, offset, size)
                    while offset < size:
                        n = min(chunk_size, size - offset)
                        loc, offset = await self._patch(loc, target, offset, n, reader)
            except BaseException as exc:
                if not _is_retryable(exc) or failures >= self.retries:
                    await self.cancel_upload(loc)
                    raise
                failures += 1
                delay = jittered_backoff(failures, self.backoff_base, self.backoff_max)
                log.info(
                    "%s: %s: chunked upload failed at byte %d (%s); checking the "
                    "server's offset in %.2fs",
                    self.site.name,
                    f"{repo}@{digest}",
                    offset,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                loc, offset = await self._resume_point(loc, repo)
        try:
            await self._request(
                "PUT",
                _with_digest(loc, digest),
                target,
                scopes_for("PUT", repo),
                content=b"",
                ok=(201, 204),
                headers={"Content-Type": "application/octet-stream"},
            )
        except NotFound:
            # A retried PUT whose first answer was lost finds its session already closed.
            if await self.head_blob(repo, digest) != size:
                raise

    async def list_tags(self, repo: str, *, page_size: int = 1000) -> list[str]:
        """Every tag of `repo`, following Link pagination; [] for an unknown repository."""
        url: str | None = self._url(f"/v2/{repo}/tags/list?n={page_size}")
        tags: list[str] = []
        while url:
            resp = await self._request(
                "GET", url, (repo, None), scopes_for("GET", repo), allow_404=True
            )
            if resp.status_code == 404:
                return tags
            tags += self._json_list(resp, "tags", (repo, None))
            url = _next_link(resp)
        return tags

    async def catalog(self, *, page_size: int = 1000) -> list[str]:
        """Every repository name, following Link pagination."""
        url: str | None = self._url(f"/v2/_catalog?n={page_size}")
        repos: list[str] = []
        while url:
            resp = await self._request(
                "GET", url, (None, None), scopes_for("GET", None, catalog=True)
            )
            repos += self._json_list(resp, "repositories", (None, None))
            url = _next_link(resp)
        return repos

    async def referrers(
        self, repo: str, digest: str, *, artifact_type: str | None = None
    ) -> list[Descriptor]:
        """Manifests whose `subject` is `digest`: the referrers API when the registry has it,
        else the `sha256-<hex>` fallback tag's index; [] when neither exists."""
        found, _ = await self.referrers_and_fallback(repo, digest, artifact_type=artifact_type)
        return found

    async def referrers_and_fallback(
        self, repo: str, digest: str, *, artifact_type: str | None = None
    ) -> tuple[list[Descriptor], Manifest | None]:
        """`referrers()`, plus the fallback tag's index when that is where they came from
        (a copier needs the index itself, and reading it again costs two more requests)."""
        target: Target = (repo, digest)
        fallback: Manifest | None = None
        index: Manifest | None = None
        resp = None
        if self._referrers_api is not False:
            resp = await self._request(
                "GET",
                self._url(f"/v2/{repo}/referrers/{digest}"),
                target,
                scopes_for("GET", repo),
                headers={"Accept": OCI_INDEX},
                ok=(200,),
                allow_404=True,
                pass_4xx=True,
            )
            if resp.status_code == 200:
                self._referrers_api = True
            elif resp.status_code in (404, 405) and "json" not in resp.headers.get(
                "content-type", ""
            ):
                # no such route (distribution 2.8 answers a plain-text 404): do not ask again
                self._referrers_api = False
        if (
            resp is not None
            and resp.status_code == 200
            and _media_type(resp.headers.get("content-type")) in (OCI_INDEX, "application/json")
        ):
            try:
                index = parse_manifest(resp.content, OCI_INDEX)
            except ManifestError as exc:
                raise InvalidManifest(
                    f"referrers answer: {exc}",
                    site=self.site.name,
                    repository=repo,
                    reference=digest,
                ) from exc
        else:
            index = fallback = await self.fallback_index(repo, digest)
        if index is None or not index.is_index:
            return [], None
        found = index.children
        if artifact_type:
            found = [d for d in found if d.artifact_type == artifact_type]
        return found, fallback

    async def fallback_index(self, repo: str, digest: str) -> Manifest | None:
        """The referrers fallback tag (`sha256-<hex>`) of `digest`, or None. One GET:
        a 404 costs what a HEAD would, and a hit needs the body anyway."""
        try:
            return await self.get_manifest(repo, digest.replace(":", "-", 1))
        except NotFound:
            return None

    # ------------------------------------------------------------------ plumbing
    def _url(self, path: str) -> str:
        return self.site.url + path

    def _manifest_url(self, repo: str, ref: str) -> str:
        return self._url(f"/v2/{repo}/manifests/{ref}")

    def _blob_url(self, repo: str, digest: str) -> str:
        return self._url(f"/v2/{repo}/blobs/{digest}")

    def _location(self, resp: httpx.Response, target: Target) -> str:
        loc = resp.headers.get("location")
        if not loc:
            raise RegistryError(
                "upload answer has no Location header",
                site=self.site.name,
                repository=target[0],
                reference=target[1],
                status=resp.status_code,
            )
        return urljoin(str(resp.url), loc)

    def _json_list(self, resp: httpx.Response, key: str, target: Target) -> list[str]:
        try:
            body = resp.json()
            items = body.get(key) or []
            if not isinstance(items, list):
                raise TypeError(key)
            return [str(x) for x in items]
        except (ValueError, TypeError, AttributeError) as exc:
            raise RegistryError(
                f"unreadable {key} list",
                site=self.site.name,
                repository=target[0],
                reference=target[1],
                status=resp.status_code,
            ) from exc

    async def _prime_auth(self) -> None:
        """Learn the auth scheme before a request whose body cannot be sent twice."""
        if not self._auth.known:
            await self.ping()

    async def _counting(self, chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            self.stats["bytes_uploaded"] += len(chunk)
            yield chunk

    async def _patch(
        self, loc: str, target: Target, offset: int, n: int, reader: _SourceReader
    ) -> tuple[str, int]:
        repo = target[0]
        resp = await self._request(
            "PATCH",
            loc,
            target,
            scopes_for("PATCH", repo),
            content=self._counting(reader.take(n)),
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Length": str(n),
                "Content-Range": f"{offset}-{offset + n - 1}",
            },
            ok=(202, 204),
            replayable=False,
            timeout=self._blob_timeout,
        )
        new_loc = self._location(resp, target)
        reported = _range_end(resp.headers.get("range"))
        if reported is not None and reported != offset + n:
            raise RetryableError(
                f"registry holds {reported} bytes after a chunk ending at {offset + n}",
                site=self.site.name,
                repository=repo,
                reference=target[1],
            )
        return new_loc, offset + n

    async def _resume_point(self, loc: str, repo: str) -> tuple[str, int]:
        """Where to continue: the registry's offset for the session, else a new session."""
        try:
            resp = await self._request(
                "GET", loc, (repo, None), scopes_for("GET", repo), ok=(200, 204)
            )
            offset = _range_end(resp.headers.get("range")) or 0
            self.stats["upload_resumes"] += 1
            log.info(
                "%s: %s: upload session holds %d bytes; resuming there",
                self.site.name,
                repo,
                offset,
            )
            return self._location(resp, (repo, None)), offset
        except RegistryError as exc:
            if exc.status not in (400, 404, 416):
                raise
            # distribution drops a session whose size no longer matches its upload state
            # (a chunk was partly written): start over.
            self.stats["upload_restarts"] += 1
            log.info(
                "%s: %s: upload session lost (%s); restarting from byte 0",
                self.site.name,
                repo,
                exc.detail,
            )
            await self.cancel_upload(loc)
            return await self.start_upload(repo), 0

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _TransientStatus) and exc.retry_after is not None:
            return min(exc.retry_after, self.max_retry_after)
        return jittered_backoff(state.attempt_number, self.backoff_base, self.backoff_max)

    async def _request(
        self,
        method: str,
        url: str,
        target: Target,
        scopes: tuple[str, ...],
        *,
        headers: Mapping[str, str] | None = None,
        content: Any = None,
        params: Mapping[str, str] | None = None,
        ok: tuple[int, ...] = (200,),
        allow_404: bool = False,
        pass_4xx: bool = False,
        stream: bool = False,
        follow_redirects: bool = False,
        replayable: bool = True,
        attempts: int | None = None,
        timeout: httpx.Timeout | None = None,
    ) -> httpx.Response:
        """Send with auth, limits and retries; return responses in `ok` (and 404 when
        `allow_404`, any 4xx but 401/403 when `pass_4xx`), raise RegistryError otherwise."""

        def before_sleep(state: RetryCallState) -> None:
            self.stats["retries"] += 1
            exc = state.outcome.exception() if state.outcome else None
            reason = f"HTTP {exc.status}" if isinstance(exc, _TransientStatus) else _exc_text(exc)
            delay = state.next_action.sleep if state.next_action else 0.0
            log.warning(
                "%s: %s %s failed (%s); retry %d/%d in %.2fs",
                self.site.name,
                method,
                urlsplit(url).path,
                reason,
                state.attempt_number,
                self.retries,
                delay,
            )

        retrying = AsyncRetrying(
            stop=stop_after_attempt(attempts or (self.retries + 1 if replayable else 1)),
            wait=self._wait,
            retry=retry_if_exception(_is_transient),
            reraise=True,
            before_sleep=before_sleep,
            sleep=asyncio.sleep,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._attempt(
                        method,
                        url,
                        target,
                        scopes,
                        headers,
                        content,
                        params,
                        ok,
                        allow_404,
                        pass_4xx,
                        stream,
                        follow_redirects,
                        replayable,
                        timeout,
                    )
        except _TransientStatus as exc:
            raise RetryableError(
                exc.message,
                site=self.site.name,
                repository=target[0],
                reference=target[1],
                status=exc.status,
            ) from None
        except (httpx.TransportError, ssl.SSLError) as exc:
            raise self._transport_error(exc, method, url, target) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def _attempt(
        self,
        method: str,
        url: str,
        target: Target,
        scopes: tuple[str, ...],
        headers: Mapping[str, str] | None,
        content: Any,
        params: Mapping[str, str] | None,
        ok: tuple[int, ...],
        allow_404: bool,
        pass_4xx: bool,
        stream: bool,
        follow_redirects: bool,
        replayable: bool,
        timeout: httpx.Timeout | None,
    ) -> httpx.Response:
        key = self._auth.effective_scopes(scopes)
        for auth_round in (0, 1):
            auth = await self._auth.headers_for(key)
            request = self._http.build_request(
                method,
                url,
                params=params,
                headers={**(headers or {}), **auth},
                content=content,
                timeout=timeout or self._timeout,
            )
            resp = await self._send(request, stream, follow_redirects)
            if resp.status_code != 401:
                break
            challenge = self._auth.learn(resp)
            if auth_round or challenge is None:
                break
            if challenge.scheme == "bearer":
                new_key = merge_scopes((*key, *challenge.scopes))
                if auth and new_key == key:
                    self._auth.invalidate(key)  # our cached token went stale
                self._auth.remember_scopes(scopes, new_key)
                key = new_key
            elif auth or not self._auth.has_basic_credentials:
                break  # basic credentials were wrong / missing
            if not replayable:
                await resp.aclose()
                raise Unauthorized(
                    "authorization expired during a streamed upload",
                    site=self.site.name,
                    repository=target[0],
                    reference=target[1],
                    status=401,
                    retryable=True,
                )
            await resp.aclose()
        status = resp.status_code
        if (
            status in ok
            or (status == 404 and allow_404)
            or (pass_4xx and 400 <= status < 500 and status not in (401, 403, 429))
        ):
            if not auth:
                self._auth.note_success_without_auth()
            return resp
        body = await _read_bounded(resp)
        message = _registry_message(body, status)
        if status == 429 or status >= 500:
            raise _TransientStatus(
                status, message, parse_retry_after(resp.headers.get("retry-after"))
            )
        raise self._status_error(status, message, body, target)

    async def _send(
        self, request: httpx.Request, stream: bool, follow_redirects: bool
    ) -> httpx.Response:
        if self._bucket:
            await self._bucket.acquire()
        self.stats["requests"] += 1
        async with self._slots:
            resp = await self._http.send(request, stream=stream, follow_redirects=follow_redirects)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s: %s %s -> %d",
                self.site.name,
                request.method,
                request.url.path,
                resp.status_code,
            )
        return resp

    def _status_error(
        self, status: int, message: str, body: bytes, target: Target
    ) -> RegistryError:
        kw: dict[str, Any] = dict(
            site=self.site.name, repository=target[0], reference=target[1], status=status
        )
        if status == 404:
            return NotFound(message, **kw)
        if status in (401, 403):
            creds = self._auth.credentials
            who = (
                f" as user {creds.username!r}"
                if creds and creds.username
                else " (no credentials configured)"
                if not creds
                else ""
            )
            return Unauthorized(message + who, **kw)
        if status == 400 and b"DIGEST_INVALID" in body:
            return DigestMismatch(message, **kw)
        return RegistryError(message, **kw)

    def _transport_error(
        self, exc: httpx.TransportError | ssl.SSLError, method: str, url: str, target: Target
    ) -> RegistryError:
        kw: dict[str, Any] = dict(site=self.site.name, repository=target[0], reference=target[1])
        if isinstance(exc, ssl.SSLError):  # e.g. the registry refused our certificate
            return RegistryUnavailable(
                f"TLS failure talking to {self.site.url}: {_exc_text(exc)}", **kw
            )
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            return RegistryUnavailable(f"cannot connect to {self.site.url}: {_exc_text(exc)}", **kw)
        path = urlsplit(url).path
        return RetryableError(f"{method} {path} failed: {_exc_text(exc)}", **kw)


class _SourceReader:
    """Hands out exactly `n` bytes at a time from a source of arbitrary chunk sizes."""

    def __init__(
        self,
        source: AsyncIterable[bytes],
        site: str,
        repo: str,
        digest: str,
        offset: int,
        size: int,
    ) -> None:
        self._it = aiter(source)
        self._buf = b""
        self._pos = offset
        self._size = size
        self._where = dict(site=site, repository=repo, reference=digest)

    async def take(self, n: int) -> AsyncIterator[bytes]:
        remaining = n
        while remaining > 0:
            if not self._buf:
                try:
                    self._buf = bytes(await anext(self._it))
                except StopAsyncIteration:
                    raise RetryableError(
                        f"source ended at byte {self._pos} of {self._size}", **self._where
                    ) from None
            piece, self._buf = self._buf[:remaining], self._buf[remaining:]
            remaining -= len(piece)
            self._pos += len(piece)
            yield piece


def _tls_verify(site: SiteEndpoint) -> ssl.SSLContext | bool:
    if not site.url.startswith("https://"):
        return True
    if not (site.insecure or site.ca_file or site.cert_file):
        return True
    try:
        if site.ca_file:
            ctx = ssl.create_default_context(cafile=site.ca_file)
        else:
            import certifi

            ctx = ssl.create_default_context(cafile=certifi.where())
        if site.insecure and not site.ca_file:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if site.cert_file:
            ctx.load_cert_chain(site.cert_file, site.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"site {site.name!r}: cannot load TLS files: {exc}") from exc
    return ctx


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, _TransientStatus):
        return True
    if isinstance(exc, httpx.TransportError):
        return "CERTIFICATE_VERIFY_FAILED" not in str(exc)
    return False


def _is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, httpx.TransportError):
        return True
    return bool(getattr(exc, "retryable", False))


def _exc_text(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    text = str(exc).strip()
    return redact(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


def _of(size: int | None) -> str:
    return f" of {size}" if size is not None else ""


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip()


def _registry_message(body: bytes, status: int) -> str:
    """The registry's `errors[].message` texts, else the HTTP reason phrase."""
    try:
        doc = json.loads(body)
        msgs = [
            str(e.get("message") or e.get("code") or "").strip()
            for e in doc.get("errors") or []
            if isinstance(e, dict)
        ]
        msgs = [m for m in msgs if m]
        if msgs:
            return redact("; ".join(dict.fromkeys(msgs)))
    except (ValueError, AttributeError, TypeError):
        pass
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase.lower()
    except ValueError:
        return "unexpected answer"


async def _read_bounded(resp: httpx.Response) -> bytes:
    try:
        if resp.is_stream_consumed:
            return resp.content[:_MAX_ERROR_BODY]
        out = b""
        async for chunk in resp.aiter_bytes():
            out += chunk
            if len(out) >= _MAX_ERROR_BODY:
                break
        return out[:_MAX_ERROR_BODY]
    except httpx.HTTPError:
        return b""
    finally:
        await resp.aclose()


def _stream_extent(resp: httpx.Response, offset: int) -> tuple[int | None, int]:
    """(total blob size, bytes to skip) for a blob GET answer."""
    if resp.status_code == 206:
        cr = resp.headers.get("content-range", "")
        m = re.match(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", cr)
        if m and m.group(3) != "*":
            return int(m.group(3)), 0
        length = resp.headers.get("content-length")
        return (offset + int(length) if length and length.isdigit() else None), 0
    length = resp.headers.get("content-length")
    return (int(length) if length and length.isdigit() else None), offset


def _range_end(value: str | None) -> int | None:
    """Bytes held by an upload session from its `Range: 0-<last>` header.

    `0-0` is ambiguous (distribution sends it for an empty session); we read it as 0.
    """
    if not value:
        return None
    m = re.match(r"(?:bytes=)?0-(\d+)", value.strip())
    if not m:
        return None
    last = int(m.group(1))
    return 0 if last == 0 else last + 1


def _next_link(resp: httpx.Response) -> str | None:
    for value in resp.headers.get_list("link"):
        m = _LINK_NEXT.search(value)
        if m:
            return str(resp.url.join(m.group(1)))
    return None


# Plain string work on upload locations: they are long (a signed `_state`), and
# httpx.URL validates every character in Python, twice per join or merge.
def _with_digest(location: str, digest: str) -> str:
    sep = "&" if urlsplit(location).query else ("" if location.endswith("?") else "?")
    return f"{location}{sep}digest={quote(digest, safe='')}"


def _repo_of_upload(location: str) -> str | None:
    m = _UPLOAD_PATH.search(urlsplit(location).path)
    return m.group(1) if m else None
