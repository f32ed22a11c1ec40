"""The copy engine: one artifact from a source registry to a target registry.

Order matters because registries validate references on write: blobs first,
then child manifests, then the index, then the tag. Each blob is obtained at
the target in the cheapest way that is still correct:

1. HEAD on the target repository: already there, nothing to do. This comes
   first even when a mount is possible: mounting a blob into a repository that
   already holds it makes distribution rewrite the link file in place, and
   reads racing the rewrite fail (measured: 18 % of HEADs for that blob
   answered 500 while it was re-mounted in a loop);
2. another copy in this process is uploading it to the same registry: wait,
   then mount from the repository it landed in;
3. mount from a repository of the same target registry known (BlobIndex) to
   hold it: one POST, no bytes;
4. stream it from source to target, hashing while streaming. The last chunk is
   held back until the digest is verified, so a corrupted byte aborts the
   upload before the registry has the whole body: nothing is ever committed
   under a digest that does not match.

Manifest bytes are copied exactly, so digests are identical at the target.
Target manifests are checked with HEAD, never GET (a GET counts as a pull).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import json
import logging
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol

from replicator import telemetry
from replicator.aio import bounded_gather
from replicator.blob_index import BlobIndex
from replicator.logs import log_context
from replicator.manifest import (
    OCI_INDEX,
    Descriptor,
    Manifest,
    ManifestError,
    Platform,
    digest_of,
    hasher_for,
    is_digest,
    parse_manifest,
)
from replicator.registry.client import BlobStream, RegistryClient
from replicator.registry.errors import DigestMismatch, NotFound, RegistryError
from replicator.registry.referrers import fallback_tag
from replicator.rules import cosign_tags_of, is_cosign_tag

log = logging.getLogger(__name__)

Status = Literal["copied", "skipped", "conflict", "failed"]
UNKNOWN = object()  # "not looked up yet", as opposed to None, "known to be absent"


class Progress(Protocol):
    """Receives byte-level progress of blob uploads (a terminal bar, or nothing)."""

    def start(self, digest: str, size: int) -> None: ...
    def advance(self, digest: str, n: int) -> None: ...
    def finish(self, digest: str) -> None: ...


@dataclass
class CopyStats:
    copied: int = 0
    skipped: int = 0
    failed: int = 0
    conflicts: int = 0
    manifests_written: int = 0
    blobs_uploaded: int = 0
    blobs_mounted: int = 0
    blobs_existing: int = 0
    bytes_uploaded: int = 0
    # blob bytes read from the source (a CDN it redirected to included), failed attempts too
    bytes_downloaded: int = 0
    failures: list[str] = field(default_factory=list)

    def add(self, other: CopyStats) -> None:
        for name, value in asdict(other).items():
            if name == "failures":
                self.failures.extend(value)
            else:
                setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class CopyResult:
    source: str
    target: str
    status: Status
    digest: str | None = None
    error: str | None = None
    stats: CopyStats = field(default_factory=CopyStats)
    retryable: bool = False  # a failure that may succeed later (network, 5xx, auth)


@dataclass(frozen=True)
class CopyOptions:
    platforms: Sequence[Platform] | None = None  # None: every child of an index
    referrers: bool = True
    overwrite: bool = True  # False: a differing target tag is a conflict
    # with `referrers`: the image's cosign tags (`sha256-<hex>.sig/.att/.sbom`) follow it;
    # `sync` turns this off, it plans them as items of their own
    cosign_tags: bool = True
    blob_attempts: int = 4  # whole-blob transfer attempts
    blob_parallelism: int = 4  # concurrent blobs per manifest
    # this copy's own hook, run before the engine's (the daemon's lease fence); what it
    # raises aborts the copy and propagates
    before_put: BeforeManifestPut | None = None
    # the source repository's tags as the caller just listed them (sync does): a
    # referrers fallback tag not among them is known absent and not fetched, one
    # round trip per image less on a registry without the referrers API. None: unknown
    source_tags: frozenset[str] | None = None


# Called with (the copy, digest, reference: tag or digest) right before a manifest
# is written, so the daemon can record "we caused this" before the target's webhook
# about it can arrive (the mesh loop guard). Raising aborts the copy before the write.
BeforeManifestPut = Callable[["CopyJob", str, str], Awaitable[None]]


@dataclass
class CopyJob:
    """One copy in progress: where from, where to, how, and what it has done so far.

    Every step of a copy needs the same handful of values; carrying them in one
    object keeps the engine's methods about the item they handle (a manifest, a
    blob) instead of threading eight positional parameters through each of them.
    """

    src: RegistryClient
    src_repo: str
    dst: RegistryClient
    dst_repo: str
    options: CopyOptions
    stats: CopyStats = field(default_factory=CopyStats)
    source_digest: str | None = None  # what the source reference resolved to, once fetched

    @property
    def source_site(self) -> str:
        return self.src.site.name

    @property
    def target_site(self) -> str:
        return self.dst.site.name


class CopyEngine:
    """Copies artifacts; one instance is shared so uploads to a registry are de-duplicated."""

    def __init__(
        self,
        blob_index: BlobIndex | None = None,
        *,
        progress: Progress | None = None,
        before_manifest_put: BeforeManifestPut | None = None,
        retry_base_delay: float = 0.2,
    ) -> None:
        self.blob_index = blob_index or BlobIndex()
        self.progress = progress
        self.before_manifest_put = before_manifest_put
        self.retry_base_delay = retry_base_delay
        # (target registry, digest) -> future of the repository an upload lands in
        self._inflight: dict[tuple[str, str], asyncio.Future[str]] = {}
        # (target registry, digest, repository) -> future of that blob being in place
        self._repo_inflight: dict[tuple[str, str, str], asyncio.Future[str]] = {}
        # (target registry, digest, repository) -> a manifest copied by digest (an index's
        # child, a referrer): two copies of one manifest would PUT it at once, and
        # distribution rewrites its revision link in place, so an index PUT validating
        # its children meanwhile fails with "blob unknown" (seen: an image's referrer
        # copy racing sync's copy of the same image's fallback tag)
        self._manifest_inflight: dict[tuple[str, str, str], asyncio.Future[str]] = {}

    # ------------------------------------------------------------------ public
    async def copy(
        self,
        src: RegistryClient,
        src_repo: str,
        ref: str,
        dst: RegistryClient,
        dst_repo: str,
        *,
        tag: str | None = None,
        options: CopyOptions = CopyOptions(),
        target_current: Descriptor | object | None = UNKNOWN,
    ) -> CopyResult:
        """Copy `src_repo:ref` to `dst_repo`, tagging it `tag` (default: `ref` if it is a tag).

        `target_current` is what the caller already knows the target tag points
        at (None: absent), saving the HEAD. Never raises for a registry failure:
        the result says `failed` with the reason.
        """
        if tag is None and not is_digest(ref):
            tag = ref
        source_name = (
            f"{src.site.name}/{src_repo}:{ref}"
            if not is_digest(ref)
            else f"{src.site.name}/{src_repo}@{ref}"
        )
        target_name = f"{dst.site.name}/{dst_repo}" + (f":{tag}" if tag else "")
        job = CopyJob(src, src_repo, dst, dst_repo, options)
        stats = job.stats
        with log_context(
            site=src.site.name, repository=src_repo, reference=ref, target=target_name
        ):
            try:
                with telemetry.span(
                    "copy",
                    source=src.site.name,
                    target=dst.site.name,
                    repository=src_repo,
                    target_repository=dst_repo,
                    reference=ref,
                    tag=tag,
                ) as span:
                    status, digest = await self._copy(job, ref, tag, target_current)
                    span.set_attribute("replicator.status", status)
            except (RegistryError, ManifestError) as exc:
                stats.failed += 1
                message = f"{source_name} -> {target_name}: {exc}"
                stats.failures.append(message)
                log.warning("copy failed: %s", message)
                # a source that lacks the artifact, or a format we refuse, won't heal by itself
                retryable = not isinstance(exc, (NotFound, ManifestError))
                return CopyResult(
                    source_name, target_name, "failed", None, str(exc), stats, retryable
                )
        if status == "copied":
            stats.copied += 1
        elif status == "skipped":
            stats.skipped += 1
        elif status == "conflict":
            stats.conflicts += 1
        return CopyResult(source_name, target_name, status, digest, None, stats)

    # --------------------------------------------------------------- manifests
    async def _copy(
        self, job: CopyJob, ref: str, tag: str | None, target_current: Descriptor | object | None
    ) -> tuple[Status, str]:
        src, dst = job.src, job.dst
        source_digest = ref if is_digest(ref) else None
        current: Descriptor | None = None
        if tag is not None:
            # One request to the target per tag when nothing changed.
            if target_current is UNKNOWN:
                current = await dst.head_manifest(job.dst_repo, tag)
            else:
                current = target_current  # type: ignore[assignment]
            if source_digest is None and current is not None:
                # only worth a HEAD when it may spare the GET; else fetch by tag below
                head = await src.head_manifest(job.src_repo, ref)
                if head is None:
                    raise NotFound(
                        "manifest unknown",
                        site=job.source_site,
                        repository=job.src_repo,
                        reference=ref,
                        status=404,
                    )
                source_digest = head.digest
            if current is not None and current.digest == source_digest:
                await self._follow_cosign_tags(job, tag, source_digest)
                return "skipped", source_digest
        manifest = await src.get_manifest(job.src_repo, source_digest or ref)
        job.source_digest = manifest.digest
        if source_digest and manifest.digest != source_digest:
            raise DigestMismatch(
                f"content hashes to {manifest.digest}",
                site=job.source_site,
                repository=job.src_repo,
                reference=source_digest,
            )
        if current is not None:
            expected = self._as_written(manifest, job.options)
            if current.digest == expected.digest:  # platform-filtered index already there
                await self._follow_cosign_tags(job, tag, manifest.digest)
                return "skipped", expected.digest
            if not job.options.overwrite:
                return "conflict", current.digest
        written = await self._copy_manifest(job, manifest, tag)
        await self._follow_cosign_tags(job, tag, manifest.digest)
        return "copied", written.digest

    async def _follow_cosign_tags(self, job: CopyJob, tag: str | None, image: str | None) -> None:
        """Also when the image itself was already there: a signature made after the image
        was copied (cosign sign on a replicated image) must reach the target too."""
        if image and job.options.referrers and job.options.cosign_tags and not is_cosign_tag(tag):
            await self._copy_cosign_tags(job, image)

    @staticmethod
    def _as_written(manifest: Manifest, options: CopyOptions) -> Manifest:
        return as_written(manifest, options.platforms)

    async def _copy_manifest(self, job: CopyJob, manifest: Manifest, tag: str | None) -> Manifest:
        """Copy everything `manifest` needs, then the manifest itself; returns what was written."""
        options = job.options
        to_write = self._as_written(manifest, options)
        with telemetry.span(
            "copy manifest",
            digest=to_write.digest,
            media_type=to_write.media_type,
            target=job.target_site,
            target_repository=job.dst_repo,
            tag=tag,
        ):
            # The source's referrers are listed while the blobs travel, so across a WAN
            # the listing adds no round trip to the copy; they are copied after the put.
            listing = (
                asyncio.create_task(self._list_referrers(job, manifest.digest))
                if options.referrers
                else None
            )
            try:
                if manifest.is_index:
                    await bounded_gather(
                        (self._copy_child(job, c) for c in to_write.children),
                        options.blob_parallelism * 2,
                    )
                else:
                    await bounded_gather(
                        (self._ensure_blob(job, b) for b in manifest.blobs),
                        options.blob_parallelism,
                    )
                await self._put_manifest(job, tag or to_write.digest, to_write)
                if listing is not None:
                    await self._copy_referrers(job, manifest, await listing)
            finally:
                if listing is not None:
                    _discard(listing)
        return to_write

    async def _copy_child(self, job: CopyJob, child: Descriptor) -> None:
        if await self._copy_by_digest(job, child.digest) == "present" and job.options.referrers:
            manifest = await job.src.get_manifest(job.src_repo, child.digest)
            await self._copy_referrers(
                job, manifest, await self._list_referrers(job, manifest.digest)
            )

    async def _copy_by_digest(self, job: CopyJob, digest: str) -> str:
        """Make the manifest `digest` present in the target repository, copied once however
        many copies need it right now: "present" (it was there), else "copied"."""
        key = (job.dst.site.url, digest, job.dst_repo)
        running = self._manifest_inflight.get(key)
        if running is not None:
            with contextlib.suppress(Exception):  # it failed: copy it here
                if await _shielded(running) is not None:
                    return "copied"
        if await job.dst.head_manifest(job.dst_repo, digest) is not None:
            return "present"

        async def copy() -> str:
            manifest = await job.src.get_manifest(job.src_repo, digest)
            await self._copy_manifest(job, manifest, None)
            return "copied"

        return await _single_flight(self._manifest_inflight, key, copy())

    async def _put_manifest(self, job: CopyJob, ref: str, manifest: Manifest) -> None:
        if job.options.before_put is not None:
            await job.options.before_put(job, manifest.digest, ref)
        if self.before_manifest_put is not None:
            await self.before_manifest_put(job, manifest.digest, ref)
        digest = await job.dst.put_manifest(job.dst_repo, ref, manifest.raw, manifest.media_type)
        if digest and digest != manifest.digest:
            raise DigestMismatch(
                f"registry stored digest {digest}, expected {manifest.digest}",
                site=job.target_site,
                repository=job.dst_repo,
                reference=ref,
            )
        job.stats.manifests_written += 1

    async def _list_referrers(
        self, job: CopyJob, digest: str
    ) -> tuple[list[Descriptor], Manifest | None]:
        """The source's referrers of `digest` and, when they came from it, the fallback index."""
        return await job.src.referrers_and_fallback(
            job.src_repo, digest, fallback_tagged=_may_be_tagged(job, digest)
        )

    async def _copy_referrers(
        self,
        job: CopyJob,
        subject: Manifest,
        listed: tuple[list[Descriptor], Manifest | None],
    ) -> None:
        """Copy signatures, SBOMs … whose subject is `subject`, and the fallback tag index."""
        src, dst = job.src, job.dst
        referrers, index = listed
        if not referrers:
            return
        for ref in referrers:
            await self._copy_by_digest(job, ref.digest)
        # Targets without a referrers API find referrers through the fallback tag.
        fallback = fallback_tag(subject.digest)
        if index is None and _may_be_tagged(job, subject.digest):
            # the source answered through its referrers API; it may keep the tag as well
            index = await src.fallback_index(job.src_repo, subject.digest)
        if index is not None:
            current = await dst.head_manifest(job.dst_repo, fallback)
            if current is None or current.digest != index.digest:
                await self._put_manifest(job, fallback, index)
        else:
            current = await dst.head_manifest(job.dst_repo, fallback)
            if current is None:
                raw = json.dumps(
                    {
                        "schemaVersion": 2,
                        "mediaType": OCI_INDEX,
                        "manifests": [r.to_json() for r in referrers],
                    },
                    indent=2,
                ).encode()
                await self._put_manifest(job, fallback, parse_manifest(raw, OCI_INDEX))

    async def _copy_cosign_tags(self, job: CopyJob, image: str) -> None:
        """Copy the image's cosign tags that the source has, after the image itself (so a
        signature pushed meanwhile is either seen here or finds the image at the target).
        Three HEADs at once: one round trip, where a tag listing may take many pages."""
        tags = cosign_tags_of(image)
        heads = await asyncio.gather(*(job.src.head_manifest(job.src_repo, t) for t in tags))
        for tag, head in zip(tags, heads, strict=True):
            if head is None:
                continue
            current = await job.dst.head_manifest(job.dst_repo, tag)
            if current is not None and current.digest == head.digest:
                continue
            manifest = await job.src.get_manifest(job.src_repo, head.digest)
            await self._copy_manifest(job, manifest, tag)

    # ------------------------------------------------------------------- blobs
    async def _ensure_blob(self, job: CopyJob, blob: Descriptor) -> None:
        """Make `blob` present in the target repository, once, however many copies need it
        right now."""
        key = (job.dst.site.url, blob.digest, job.dst_repo)
        with telemetry.span(
            "blob",
            digest=blob.digest,
            bytes=blob.size,
            target=job.target_site,
            target_repository=job.dst_repo,
        ):
            running = self._repo_inflight.get(key)
            if running is not None and await _shielded(running) is not None:
                job.stats.blobs_existing += 1
                telemetry.set_attributes(outcome="existing")
                return
            await _single_flight(self._repo_inflight, key, self._obtain_blob(job, blob))

    async def _obtain_blob(self, job: CopyJob, blob: Descriptor) -> str:
        dst, dst_repo = job.dst, job.dst_repo
        registry = dst.site.url
        # HEAD first, even when the index names a holder to mount from: a mount
        # into a repository that already has the blob makes distribution rewrite
        # its link file in place, and pulls racing the rewrite fail (500).
        if await dst.head_blob(dst_repo, blob.digest) is not None:
            job.stats.blobs_existing += 1
            telemetry.set_attributes(outcome="existing")
            await self.blob_index.record(registry, blob.digest, dst_repo)
            return dst_repo
        key = (registry, blob.digest)
        running = self._inflight.get(key)
        if running is not None:
            # Someone is uploading it to this registry right now: mount from there after.
            log.debug(
                "blob %s for %s/%s: waiting, its upload to that registry is already in flight",
                blob.digest,
                job.target_site,
                dst_repo,
            )
            with contextlib.suppress(Exception):  # it failed: try again here
                landed = await _shielded(running)
                if landed and await self._try_mount(job, blob.digest, landed):
                    return dst_repo
            return await self._obtain_blob(job, blob)
        return await _single_flight(self._inflight, key, self._mount_or_upload(job, blob))

    async def _mount_or_upload(self, job: CopyJob, blob: Descriptor) -> str:
        dst, dst_repo = job.dst, job.dst_repo
        registry = dst.site.url
        location = None
        for candidate in await self.blob_index.candidates(registry, blob.digest, dst_repo):
            mounted = await dst.mount_blob(dst_repo, blob.digest, candidate)
            if mounted is None:
                job.stats.blobs_mounted += 1
                telemetry.set_attributes(outcome="mounted", mounted_from=candidate)
                await self.blob_index.record(registry, blob.digest, dst_repo)
                return dst_repo
            # 202: the index was stale; keep the upload session the registry opened.
            await self.blob_index.forget(registry, blob.digest, candidate)
            if location is not None:
                await dst.cancel_upload(location)
            location = mounted
        await self._upload(job, blob, location)
        await self.blob_index.record(registry, blob.digest, dst_repo)
        return dst_repo

    async def _try_mount(self, job: CopyJob, digest: str, from_repo: str) -> bool:
        if from_repo == job.dst_repo:
            job.stats.blobs_existing += 1
            telemetry.set_attributes(outcome="existing")
            return True
        location = await job.dst.mount_blob(job.dst_repo, digest, from_repo)
        if location is None:
            job.stats.blobs_mounted += 1
            telemetry.set_attributes(outcome="mounted", mounted_from=from_repo)
            await self.blob_index.record(job.dst.site.url, digest, job.dst_repo)
            return True
        await job.dst.cancel_upload(location)
        return False

    async def _upload(self, job: CopyJob, blob: Descriptor, location: str | None) -> None:
        """Stream one blob, retrying the whole transfer on transient failures."""
        dst = job.dst
        attempt, chunked = 0, False
        while True:
            attempt += 1
            session: asyncio.Task[str] | None = None
            try:
                if blob.size > (dst.upload_chunk_size or blob.size):
                    # Bigger than the target's body limit: PATCH chunks, digest checked first.
                    await self._upload_chunked(job, blob, location)
                    job.stats.blobs_uploaded += 1
                    job.stats.bytes_uploaded += blob.size
                    telemetry.set_attributes(outcome="uploaded", attempt=attempt, chunked=True)
                    return
                if location is None:
                    # The target's upload session is opened while the source answers its
                    # GET: one round trip less per blob across a WAN, the same requests.
                    session = asyncio.create_task(dst.start_upload(job.dst_repo))
                async with self._source_blob(job, blob.digest) as stream:
                    if session is not None:
                        location = await session
                    size = stream.size if stream.size is not None else blob.size
                    if blob.size and size != blob.size:
                        raise DigestMismatch(
                            f"source reports {size} bytes, manifest says {blob.size}",
                            site=job.source_site,
                            repository=job.src_repo,
                            reference=blob.digest,
                        )
                    body = self._verified(stream, blob.digest, size, job.source_site, job.src_repo)
                    await dst.upload_blob(job.dst_repo, blob.digest, size, body, location=location)
                job.stats.blobs_uploaded += 1
                job.stats.bytes_uploaded += size
                telemetry.set_attributes(outcome="uploaded", attempt=attempt)
                return
            except DigestMismatch:
                location = location or await _opened(session)
                if location is not None:
                    await dst.cancel_upload(location)
                raise
            except RegistryError as exc:
                location_used, location = location or await _opened(session), None
                if location_used is not None:
                    await dst.cancel_upload(location_used)
                if exc.status == 413 and dst.upload_chunk_size is not None and not chunked:
                    chunked, attempt = True, attempt - 1  # body limit learnt: again, in chunks
                    continue
                if not getattr(exc, "retryable", False) or attempt >= job.options.blob_attempts:
                    raise
                delay = self.retry_base_delay * (2 ** (attempt - 1))
                log.info(
                    "blob %s to %s/%s failed (%s); retry %d in %.1fs",
                    blob.digest,
                    job.target_site,
                    job.dst_repo,
                    exc,
                    attempt,
                    delay,
                )
                await asyncio.sleep(delay)
            finally:
                if session is not None:
                    _discard(session)

    @contextlib.asynccontextmanager
    async def _source_blob(
        self, job: CopyJob, digest: str, offset: int = 0
    ) -> AsyncIterator[BlobStream]:
        """The source's blob stream (verify=False: `_verified` or the chunked upload checks the
        digest before the last byte goes out); what it received counts as downloaded."""
        async with job.src.open_blob(job.src_repo, digest, offset, verify=False) as stream:
            try:
                yield stream
            finally:
                job.stats.bytes_downloaded += stream.downloaded

    async def _upload_chunked(self, job: CopyJob, blob: Descriptor, location: str | None) -> None:
        """PATCH the blob in chunks; a cut resumes from the registry's offset, re-reading
        the source from there (a Range GET)."""

        def open_source(offset: int) -> contextlib.AbstractAsyncContextManager[BlobStream]:
            return self._source_blob(job, blob.digest, offset)

        progress = self.progress
        if progress:
            progress.start(blob.digest, blob.size)
        try:
            await job.dst.upload_blob_chunked(
                job.dst_repo,
                blob.digest,
                blob.size,
                open_source,
                location=location,
                progress=(lambda n: progress.advance(blob.digest, n)) if progress else None,
            )
        finally:
            if progress:
                progress.finish(blob.digest)

    async def _verified(
        self, chunks: AsyncIterable[bytes], digest: str, size: int, site: str, repo: str
    ) -> AsyncIterator[bytes]:
        """Yield `chunks`, holding the last one back until the digest is proven.

        Large blobs are hashed on a worker thread (hashlib releases the GIL), so
        hashing overlaps with the network instead of adding to it.
        """
        hasher = _Hasher(digest, threaded=size >= THREADED_HASH_BYTES)
        seen = 0
        pending: bytes | None = None
        if self.progress:
            self.progress.start(digest, size)
        try:
            async for chunk in chunks:
                if not chunk:
                    continue
                await hasher.update(chunk)
                seen += len(chunk)
                if pending is not None:
                    yield pending
                    if self.progress:
                        self.progress.advance(digest, len(pending))
                pending = chunk
            actual = await hasher.hexdigest()
            if actual != digest or seen != size:
                raise DigestMismatch(
                    f"received {seen} bytes hashing to {actual}; refusing to write it",
                    site=site,
                    repository=repo,
                    reference=digest,
                )
            if pending is not None:
                yield pending
                if self.progress:
                    self.progress.advance(digest, len(pending))
        finally:
            hasher.close()
            if self.progress:
                self.progress.finish(digest)

    # ----------------------------------------------------------------- helpers


THREADED_HASH_BYTES = 16 * 2**20
_HASH_BACKLOG = 8  # chunks queued for hashing before the stream waits for the hasher


class _Hasher:
    """Incremental digest; for large blobs the hashing runs on its own thread, in order."""

    def __init__(self, digest: str, threaded: bool) -> None:
        self._algorithm = digest.split(":", 1)[0]
        self._hash = hasher_for(digest)
        self._executor = concurrent.futures.ThreadPoolExecutor(1, "blob-hash") if threaded else None
        self._backlog: collections.deque[asyncio.Future[None]] = collections.deque()

    async def update(self, chunk: bytes) -> None:
        if self._executor is None:
            self._hash.update(chunk)
            return
        loop = asyncio.get_running_loop()
        self._backlog.append(loop.run_in_executor(self._executor, self._hash.update, chunk))
        while len(self._backlog) > _HASH_BACKLOG:
            await self._backlog.popleft()

    async def hexdigest(self) -> str:
        while self._backlog:
            await self._backlog.popleft()
        return f"{self._algorithm}:{self._hash.hexdigest()}"

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)


async def _shielded(future: asyncio.Future[str]) -> str | None:
    """The outcome of another copy's in-flight work: its result, or None when that copy
    was cancelled (the caller then does the work itself); its failure is raised. This
    task's own cancellation propagates: swallowing it kept a cancelled copy waiting for
    the other one's whole upload, then working on."""
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        return None


async def _single_flight(table: dict, key: object, work: Awaitable[str]) -> str:
    """Run `work`, publishing its outcome in `table[key]` for concurrent waiters."""
    future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    table[key] = future
    try:
        result = await work
    except Exception as exc:
        future.set_exception(exc)
        future.exception()  # retrieved: waiters see it or fall back to their own attempt
        raise
    except BaseException:
        future.cancel()
        raise
    else:
        future.set_result(result)
        return result
    finally:
        table.pop(key, None)


def as_written(manifest: Manifest, platforms: Sequence[Platform] | None) -> Manifest:
    """The manifest as it will land at the target (an index may be platform-filtered).
    Pure; `sync` plans with it so a dry run predicts the copy's "up to date"."""
    if not manifest.is_index:
        return manifest
    children = manifest.children
    selected = [c for c in children if _platform_selected(c, platforms)]
    if not selected and children:
        raise ManifestError(
            f"index {manifest.digest}: no child matches platforms "
            f"{', '.join(map(str, platforms or []))}"
        )
    return manifest if len(selected) == len(children) else _filtered_index(manifest, selected)


def _may_be_tagged(job: CopyJob, digest: str) -> bool:
    """False when the caller's fresh tag listing shows `digest` has no fallback tag."""
    tags = job.options.source_tags
    return tags is None or fallback_tag(digest) in tags


async def _opened(session: asyncio.Task[str] | None) -> str | None:
    """Where an upload session opened alongside a failed transfer is, to cancel it;
    None when there was none or opening it failed too."""
    if session is None:
        return None
    try:
        return await session
    except RegistryError:
        return None


def _discard(task: asyncio.Task) -> None:
    """Cancel `task` if still running; retrieve its outcome so none is logged as lost."""
    if not task.done():
        task.cancel()
    elif not task.cancelled():
        task.exception()


def _platform_selected(desc: Descriptor, platforms: Sequence[Platform] | None) -> bool:
    if not platforms:
        return True
    if desc.platform is None or (desc.platform.os, desc.platform.architecture) == (
        "unknown",
        "unknown",
    ):
        # attestation manifests carry no real platform: keep them with the images they describe
        return True
    return any(desc.platform.matches(p) for p in platforms)


def _filtered_index(index: Manifest, selected: list[Descriptor]) -> Manifest:
    """An index restricted to the selected children (its digest necessarily changes)."""
    doc = json.loads(index.raw)
    keep = {d.digest for d in selected}
    doc["manifests"] = [m for m in doc.get("manifests", []) if m.get("digest") in keep]
    raw = json.dumps(doc, indent=3).encode()
    return Manifest(raw=raw, media_type=index.media_type, digest=digest_of(raw))
