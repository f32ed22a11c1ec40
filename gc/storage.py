"""Storage-level mark-and-sweep of a distribution filesystem store, safe while the
registry stays online and takes pushes.

Why distribution's own ``garbage-collect`` must run offline: it marks, then
deletes every unmarked blob. A push that uploads a layer (or finds it present
with HEAD and skips the upload) after the mark, and then PUTs a manifest,
references a blob the sweep is about to delete -> a broken image.

How this collector stays safe online (the argument, step by step)
------------------------------------------------------------------
Facts about distribution 2.8 we rely on (registry/storage, filesystem driver):

F1. A blob is reachable *in a repository* only through that repository's link:
    ``_layers/<alg>/<hex>/link`` (layers, configs) or
    ``_manifests/revisions/<alg>/<hex>/link`` (manifests). HEAD/GET of a blob,
    a cross-repo mount (source side) and manifest-PUT validation all stat the
    link and then the blob data; if either is missing the registry answers
    "blob unknown". (Without a blob-descriptor cache, see F4.)
F2. Every push of a blob writes the link (fresh mtime), even when the data was
    already in the store (then the data file is left untouched). A mount writes
    the link too. A manifest PUT writes manifest data, then its revision link,
    then the tag's ``current/link``.
F3. Manifest PUT validates, before writing anything, that every blob and child
    manifest it references is reachable in the repository (F1).
F4. With ``storage.cache.blobdescriptor`` the registry answers F1's checks from
    memory/redis, so it would say "exists" for data we removed (#2966). We refuse
    to run online when the registry config enables it (`check_registry_config`,
    a fast first refusal), and, because an environment variable
    (``REGISTRY_STORAGE_CACHE_BLOBDESCRIPTOR``) enables it behind the file's back,
    ask the registry itself after step 4 (step 4b).

The run:

1. Enumerate blob data FIRST and keep only blobs whose data mtime is older than
   the cutoff ``start - grace``. Blobs written during or after the run are
   never candidates, whatever marking says.
2. Scan every repository (links + tags), parse manifests, decide per-repo
   retention (optional policies) and mark from the roots: with no policy every
   revision and tag target is a root. A blob is a candidate only if unmarked AND
   every ``_layers`` link to it is older than the cutoff (a fresh link means a
   push or mount in progress, F2).
3. Re-check (batch): rescan all repositories and re-mark from everything that
   now exists; drop candidates that became referenced or gained a link.
4. Quarantine: per item, re-stat right before the move (still older than the
   cutoff, tag still pointing where we decided), then ``rename`` it aside within
   the same filesystem (``v2/_quarantine/<run>/...``): a blob's layer links
   first, then its data directory. A rename is atomic, so the registry sees the
   item either present or gone (not half-deleted), and the bytes still exist.
4b. Live cache probe (when the run has the site's registry API, `registry_api`):
   HEAD a random sample of at most `cache_probe.SAMPLE_SIZE` (16) quarantined
   blobs through ``/v2/<repo>/blobs/<digest>``, each in a repository whose layer
   link named it. Without a cache each answers 404 (its link is in quarantine).
   A 200 while the link or data is still gone from disk can only come from a
   cache (F4): restore everything from quarantine at once (every image is whole
   again) and refuse the run (journalled ``refused``, exit 2). A failed HEAD
   proves nothing: the same. Only then are stale upload sessions removed, so a
   refused run has deleted nothing. Without an API the run says the live check
   was skipped; the YAML check still stands.
5. Wait the quarantine window, then rescan and re-mark from everything that
   exists *now*. Restore (rename back) any item that is referenced again: a
   blob referenced by any existing manifest revision (transitively) or with any
   link in any repository; a link or revision whose quarantined copy changed
   after the cutoff; a manifest listed by an existing index or tag.
6. Only then delete the quarantined copies. Each tag and manifest is tombstoned
   in the journal (origin `retention`: failback and catch-up do not bring it back)
   from step 4 on: in the transaction that journals the quarantine, before the
   first move (the registry stops serving it then, and a settle may be a window
   or a timer run later); withdrawn for what the run restores or keeps.

Steps 5-6 in two runs. The wait of step 5 need not happen in the process that
quarantined: a run journals its items and the time the window ends
(``settle_after``, taken after the last move) and exits with the run in state
``quarantined``; a later run (the timer's next start, or ``gc --settle``, which
waits in the foreground, or the daemon, which waits in the background) performs
steps 5-6 once that time has passed. The argument below only needs "at least a
window after the last move", and a later run waits at least that long. Two more
rules keep it whole: (a) while one run's items wait, no run plans or quarantines
anything new, so at most one run's items are out of the registry's sight at a
time (otherwise run A could delete a blob that a manifest in run B's quarantine
references, and B's step 5 could then restore that manifest without its blob);
(b) everything a waiting run knows comes from the journal and the disk as they
are when it is settled: step 5 rescans and re-marks from scratch, and an item whose
original place was filled again meanwhile (a client re-pushed it) keeps the new
copy and drops the quarantined one.

Why that is enough. A manifest M referencing blob B can only be accepted (F3)
while B's link and data are in place. If M was accepted before step 4 moved
B, M's revision link exists by the time step 5 looks (F2, a PUT completes
within the window), so B is restored; images built in that instant are
unavailable for at most the window, never lost. If M arrives after step 4, its
validation fails ("blob unknown"; the client retries and re-uploads, creating
a fresh link and fresh data). In particular the classic race — a client HEADs
B (exists, via an old link), skips the upload, and PUTs M just before we
quarantine — is covered: either M's PUT fails validation, or M exists at step
5 and B comes back. A layer push or mount that recreates a link while B sits
in quarantine is caught the same way (step 5 sees the link). Quarantined files
are invisible to the registry, so deleting them in step 6 can never break an
image that step 5 did not already see.

Symbolic links. The store may be writable by another user (the registry) and
the collector may run as root, so a link planted in it must never make us change
anything outside it:

S1. Every rename, removal and mkdir goes through `confined.ConfinedFS`: relative
    to directory fds opened one component at a time from the store with
    ``O_NOFOLLOW | O_DIRECTORY``, the last component lstat'ed and refused if it is
    a link. A component swapped for a link between our check and the change fails
    the open instead of redirecting it, so nothing outside the store is ever
    renamed or removed, and nothing is moved out of it; removal never crosses into
    another filesystem. A refused item keeps its place; its error names the path.
S2. Scans never follow a link (`layout`); each one met is reported in the run's
    errors with its path and left alone. The registry does follow links, so what is
    behind one may be served: a link that may hide roots or layer links makes the
    run collect no blob, layer link, tag or manifest (steps 2-3) and restore
    everything it quarantined (step 5); a link on the blob side or at one layer
    link pins that digest (never collected, always counted present).
S3. The quarantine directory must be a real directory of the store: if it is a
    link the run is refused before anything moves.

Residual assumptions (documented, not hidden): a single manifest PUT completes
within the quarantine window (default 10 min, far above distribution's request
times); clocks: mtimes and our clock come from the same host; no
blob-descriptor cache (F4) unless the operator vouches (``assume_no_cache``)
that the registry is read-only or stopped. The live probe (4b) asks one
registry about a sample: a cache that has seen none of the sampled blobs (an
in-memory cache of a registry restarted since they were last touched), or
other replicas behind a load balancer, are not seen by it.

Speed without giving any of that up: the read-only steps (1-3 and the re-mark
in 5) run on one thread — they are ~3 us stats and reads plus JSON parsing
under the GIL, which more threads only slow down — and every step re-reads what
it needs (no step trusts an earlier scan: the re-mark in 5 costs ~5 % of its
step, so skipping unchanged directories by mtime would save little and need a
new argument). The renames of step 4 and the deletions of step 6 block in the
filesystem, so they run on `workers` threads.

Crash safety: every item's quarantine path is journalled before the rename, so
an interrupted run is resumed by the next one: items found in quarantine are
re-checked after a full window (counted from when the resuming run finds them, as
the interrupted run may have moved its last item just before it died) and deleted
or restored (`runs`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import random
import stat
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Container, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from replicator.errors import ConfigError, ReplicatorError
from replicator.gc import cache_probe
from replicator.gc.ages import manifest_times, tag_infos, with_push_times
from replicator.gc.cache_probe import BlobHeadClient
from replicator.gc.confined import UnsafeEntry, open_dir_at
from replicator.gc.layout import (
    BlobEntry,
    Intern,
    RepoSnapshot,
    StoreLayout,
    link_mtime,
    manifest_node,
    newest_mtime,
    read_link,
    read_small_file,
    read_tag_link,
)
from replicator.gc.mark import MarkSet, Node, mark
from replicator.gc.policy import RetentionPolicy, SourceHolds, decide, policies_for
from replicator.gc.policy import summary as kept_summary
from replicator.gc.runs import CandidateRow, CandidateUpdate, RunRecorder
from replicator.journal import Journal, Tombstone
from replicator.journal.events import RegistryTimes
from replicator.journal.tombstones import gc_run_marker

log = logging.getLogger("replicator.gc.storage")
T = TypeVar("T")

HIDDEN_BY_LINK = "a symbolic link in the store hides references (see the run's errors)"
REFUSED_CACHE = "restored: the registry answers from a blob-descriptor cache (run refused)"
QUARANTINE_SHARDS = 64  # directories per item kind under _quarantine/<run>/
SETTLE_AFTER = "settle_after"  # in a run's mark summary: when its quarantine may be settled
# unlink/rmdir throughput on ext4 (2 cores) plateaus at 16 threads: 8 -> 16 cut the
# bench's delete phase ~20 %, 32 gained nothing measurable
DEFAULT_WORKERS = 16


class OnlineGCRefused(ReplicatorError):
    """Running now could break images; the message says what to change."""

    exit_code = 2


class GCLocked(ReplicatorError):
    """Another storage GC run holds this store."""


class GCStopped(ReplicatorError):
    """The run was told to stop (its caller was cancelled: the daemon is stopping) and
    stopped between two items; what it did is journaled and the next run resumes it."""


@dataclass
class StorageGCOptions:
    site: str = "local"
    grace: float = 3600.0  # nothing modified more recently is deleted
    quarantine_window: float = 600.0  # how long removed items wait before deletion
    # True: wait the window in this run, then delete (one command; the daemon, in the
    # background). False: leave the quarantine journaled for a later run to settle.
    settle: bool = True
    upload_grace: float | None = None  # idle time before an upload session is stale
    workers: int = DEFAULT_WORKERS  # threads for renames and deletions
    scan_workers: int = 1  # threads for read-only scanning (see below)
    dry_run: bool = False
    registry_config: str | Path | None = None
    assume_no_cache: bool = False  # operator vouches: no blob-descriptor cache
    registry_api: BlobHeadClient | None = None  # the site's API, for the live cache probe
    policies: Sequence[RetentionPolicy] = ()
    # (repository) -> what the rule's source holds, for follow_source policies
    sources: Callable[[str], Awaitable[SourceHolds | None]] | None = None
    max_manifest_bytes: int = 4 << 20
    resume: bool = True
    fault_after_deletions: int | None = None  # test seam: raise after N final deletions
    on_phase: Callable[[str], None] | None = None  # test seam: "planned", "quarantined"


@dataclass
class GCResult:
    run_id: int
    dry_run: bool
    manifests_deleted: int = 0
    tags_deleted: int = 0
    blobs_deleted: int = 0
    links_deleted: int = 0
    uploads_deleted: int = 0
    bytes_reclaimed: int = 0  # blob data removed from disk
    upload_bytes_reclaimed: int = 0  # abandoned upload sessions removed
    quarantined: int = 0
    quarantined_bytes: int = 0
    restored: int = 0
    kept_by_recheck: int = 0
    # items of this or an earlier run left in quarantine for a later run to settle
    waiting: int = 0
    waiting_bytes: int = 0
    deletable_after: float | None = None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    mark_summary: dict[str, Any] = field(default_factory=dict)
    resumed_runs: list[int] = field(default_factory=list)
    # The per-item collections stay out of repr: at 100k manifests they hold ~300k
    # entries, and Python builds a result's whole repr in places one does not expect
    # (asyncio.run restoring its SIGINT handler reprs the main task, result included:
    # +80-120 MB of peak RSS in bench_gc_storage at 400k blobs).
    deleted_blobs: set[str] = field(default_factory=set, repr=False)
    deleted_manifests: set[str] = field(default_factory=set, repr=False)  # "repo@digest"
    deleted_tags: set[str] = field(default_factory=set, repr=False)  # "repo:tag"
    timings: dict[str, float] = field(default_factory=dict)
    # what was (or, in a dry run, would be) deleted, one dict per item (`gc --json`)
    items: list[dict[str, Any]] = field(default_factory=list, repr=False)
    kept: Counter[str] = field(default_factory=Counter)  # tags kept, by first reason
    notes: list[str] = field(default_factory=list)  # what the run chose not to do, and why

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "dry_run": self.dry_run,
            "manifests_deleted": self.manifests_deleted,
            "tags_deleted": self.tags_deleted,
            "blobs_deleted": self.blobs_deleted,
            "links_deleted": self.links_deleted,
            "uploads_deleted": self.uploads_deleted,
            "bytes_reclaimed": self.bytes_reclaimed,
            "upload_bytes_reclaimed": self.upload_bytes_reclaimed,
            "quarantined": self.quarantined,
            "quarantined_bytes": self.quarantined_bytes,
            "waiting": self.waiting,
            "waiting_bytes": self.waiting_bytes,
            "deletable_after": self.deletable_after,
            "restored": self.restored,
            "kept_by_recheck": self.kept_by_recheck,
            "errors": list(self.errors),
            "warnings": list(self.warnings),
            "resumed_runs": list(self.resumed_runs),
            "kept": dict(self.kept),
            "notes": list(self.notes),
        }


@dataclass(slots=True)
class Item:
    """One thing a run may remove. Identity (`key`) is stable across a crash.
    Slotted, `key` and `quarantine` computed when asked: a run holds 10^5 of them
    (the quarantine paths alone were ~50 MB)."""

    kind: str  # blob | link | manifest | tag | upload
    repository: str | None
    digest: str | None
    name: str | None = None  # tag name or upload id
    bytes: int = 0
    quarantine_path: str | None = None  # as journaled; else from `quarantine_at`
    state: str = "candidate"
    error: str | None = None
    clause: str = ""  # why the policy (or the sweep) deletes it; reported, not journaled
    quarantine_run: str | None = None  # _quarantine/<run>, shared by the run's items
    quarantine_n: int = 0

    def quarantine_at(self, run_dir: str, n: int) -> None:
        """Where `assign_quarantine` puts the n-th item of the run in `run_dir`."""
        self.quarantine_run, self.quarantine_n = run_dir, n

    @property
    def quarantine(self) -> str | None:
        if self.quarantine_path is not None or self.quarantine_run is None:
            return self.quarantine_path
        n = self.quarantine_n
        # sharded: one directory taking 10^4 renames serialises them on its inode
        # lock; 64 shards per kind keep that rare for any sane thread count while
        # costing few mkdir/rmdir (each allocates or frees a block)
        name = str(self.digest).replace(":", "-") if self.kind == "blob" else str(n)
        return f"{self.quarantine_run}/{self.kind}/{n % QUARANTINE_SHARDS:02x}/{name}"

    @property
    def key(self) -> str:
        if self.kind == "blob":
            return str(self.digest)
        if self.kind == "link":
            return f"{self.repository}/_layers/{self.digest}"
        if self.kind == "manifest":
            return f"{self.repository}@{self.digest}"
        if self.kind == "tag":
            return f"{self.repository}:{self.name}"
        return f"{self.repository}/_uploads/{self.name}"

    def original(self, layout: StoreLayout) -> Path:
        assert self.kind == "blob" or self.repository is not None
        if self.kind == "blob":
            return layout.blob_dir(str(self.digest))
        if self.kind == "link":
            return layout.layer_link_dir(str(self.repository), str(self.digest))
        if self.kind == "manifest":
            return layout.revision_link_dir(str(self.repository), str(self.digest))
        if self.kind == "tag":
            return layout.tag_dir(str(self.repository), str(self.name))
        return layout.upload_dir(str(self.repository), str(self.name))

    def path(self, layout: StoreLayout) -> str:
        """`original` as a str, for the per-item hot paths."""
        assert self.kind == "blob" or self.repository is not None
        if self.kind == "blob":
            return layout.blob_dir_str(str(self.digest))
        if self.kind == "link":
            return layout.layer_link_dir_str(str(self.repository), str(self.digest))
        if self.kind == "manifest":
            return layout.revision_link_dir_str(str(self.repository), str(self.digest))
        if self.kind == "tag":
            return layout.tag_dir_str(str(self.repository), str(self.name))
        return layout.upload_dir_str(str(self.repository), str(self.name))

    def row(self) -> CandidateRow:
        return CandidateRow(
            self.kind,
            self.key,
            self.repository,
            self.digest,
            self.bytes,
            self.state,
            self.quarantine,
            self.error,
        )

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Item:
        kind, key = row["kind"], row["key"]
        name = None
        if kind == "tag":
            name = key.rsplit(":", 1)[1]
        elif kind == "upload":
            name = key.split("/_uploads/", 1)[1]
        q = row.get("quarantine_path")
        return cls(
            kind,
            row.get("repository"),
            row.get("digest"),
            name,
            row.get("bytes") or 0,
            str(q) if q else None,
            row["state"],
            row.get("error"),
        )


@dataclass
class Plan:
    started: float
    cutoff: float
    upload_cutoff: float
    items: list[Item]
    mark_summary: dict[str, Any]


def check_registry_config(
    path: str | Path | None, root: str | Path | None = None, *, assume_no_cache: bool = False
) -> None:
    """Refuse an online sweep the registry could undo (blob-descriptor cache, F4)."""
    if assume_no_cache:
        return
    if path is None:
        raise OnlineGCRefused(
            "cannot tell whether the registry caches blob descriptors: set the site's "
            "registry_config to the registry's config.yml, or, if the cache is off or the "
            "registry is read-only/stopped, say so with assume_no_cache (--assume-no-cache)"
        )
    try:
        cfg = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read registry config {path}: {exc}", "registry_config") from exc
    storage = cfg.get("storage") or {} if isinstance(cfg, dict) else {}
    cache = (storage.get("cache") or {}) if isinstance(storage, dict) else {}
    setting = cache.get("blobdescriptor") if isinstance(cache, dict) else None
    if setting:
        raise OnlineGCRefused(
            f"registry config {path} enables storage.cache.blobdescriptor ({setting}): the "
            "registry would keep answering 'exists' for blobs this collector deletes, clients "
            "would skip uploading them and images would break (distribution #2966). Disable "
            "the cache and restart the registry, or make the registry read-only/stop it and "
            "run with assume_no_cache (--assume-no-cache)"
        )
    fs = storage.get("filesystem") if isinstance(storage, dict) else None
    configured = fs.get("rootdirectory") if isinstance(fs, dict) else None
    if root is not None and configured and Path(configured).resolve() != Path(root).resolve():
        raise ConfigError(
            f"registry config {path} serves {configured}, not the storage {root} being collected",
            "storage",
        )


class ManifestCache:
    """digest -> Node for manifests read from blob data. Content-addressed, so a parsed
    node never goes stale; digests we could not read are retried on the next load."""

    def __init__(self, layout: StoreLayout, max_bytes: int) -> None:
        self.layout, self.max_bytes = layout, max_bytes
        self.nodes: dict[str, Node] = {}
        self.parsed = 0
        self.intern: Intern | None = None  # set while planning (see `_interner`)
        # digest -> quarantined blob: a manifest we moved aside may be referenced
        # again, and then what it references must be protected too
        self.quarantined: dict[str, Item] = {}

    def _read(self, digest: str) -> tuple[str, Node | None]:
        raw = self.layout.read_blob(digest, self.max_bytes)
        moved = self.quarantined.get(digest)
        if raw is None and moved is not None and moved.quarantine is not None:
            raw = read_small_file(moved.quarantine + "/data", self.max_bytes)
        return digest, manifest_node(raw, self.intern) if raw is not None else None

    def forget(self) -> None:
        """Drop the parsed manifests (10^5 of them at scale) once a run's marking is over."""
        self.nodes, self.quarantined = {}, {}

    def load(self, digests: Iterable[str], pool: ThreadPoolExecutor | None) -> int:
        todo = [d for d in set(digests) if d not in self.nodes and ":" in d]
        found = 0
        for digest, node in pmap(pool, self._read, todo):
            if node is not None:
                self.nodes[digest] = node
                found += 1
        self.parsed += found
        return found


@dataclass
class Live:
    """Everything that exists now and what it references."""

    snaps: dict[str, RepoSnapshot]
    protected: set[str]  # global: manifest and blob digests
    referenced: dict[str, set[str]]  # repo -> manifests its roots reach
    linked: set[str]  # digests with any layer or revision link


class StorageCollector:
    """One storage GC run (plus finishing any interrupted earlier run)."""

    def __init__(
        self,
        root: str | Path,
        journal: Journal | None = None,
        options: StorageGCOptions | None = None,
    ) -> None:
        self.layout = StoreLayout(root)
        self.journal = journal
        self.opts = options or StorageGCOptions()
        # Two pools, because the two kinds of filesystem work scale oppositely (measured
        # on ext4, 2 cores, hot page cache): unlink/rmdir/rename block in the filesystem
        # for 20-150 us and overlap well across threads (8-16 threads: 3-4x faster than
        # one), while scanning is many ~3 us stats and reads plus JSON parsing under the
        # GIL, where extra threads only add GIL hand-offs (4 threads: 2x slower than one).
        # scan_workers > 1 pays off only when metadata reads really wait for a device.
        self.pool = ThreadPoolExecutor(
            max_workers=max(1, self.opts.workers), thread_name_prefix="gc-fs"
        )
        self.scan_pool = (
            ThreadPoolExecutor(max_workers=self.opts.scan_workers, thread_name_prefix="gc-scan")
            if self.opts.scan_workers > 1
            else None
        )
        self.cache = ManifestCache(self.layout, self.opts.max_manifest_bytes)
        # set by `prepare` (async) before planning: the site's webhook history and, for
        # follow_source policies, what each repository's source holds
        self.webhooks: dict[str, RegistryTimes] = {}
        self.follow: dict[str, SourceHolds] = {}
        self.kept: Counter[str] = Counter()
        self._lock_fd: int | None = None
        self._deletions = 0
        # set when the caller is cancelled: the blocking steps, on threads, cannot be
        # cancelled, so they look at this between items (scan, quarantine, settle)
        self.stop = threading.Event()

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise GCStopped(f"storage gc of {self.layout.root} stopped: the caller is stopping")

    # --- setup ---------------------------------------------------------------
    async def prepare(self) -> None:
        """What planning reads besides the disk, fetched on the event loop."""
        if self.journal is not None:
            self.webhooks = await self.journal.events.registry_times(self.opts.site)
        lookup = self.opts.sources
        if lookup is None or not any(p.follow_source for p in self.opts.policies):
            return
        for repo in await asyncio.to_thread(self.layout.list_repositories):
            pol = policies_for(self.opts.policies, self.opts.site, repo, "storage")
            if pol is not None and pol.follow_source:
                holds = await lookup(repo)
                if holds is not None:
                    self.follow[repo] = holds

    def preflight(self) -> list[str]:
        if not self.layout.v2.is_dir():
            raise ConfigError(
                f"{self.layout.root} is not a distribution filesystem store (no {self.layout.v2})",
                "storage",
            )
        try:
            self.layout.fs.fd()  # docker/registry/v2 reached without a symbolic link (S1)
        except UnsafeEntry as exc:
            raise ConfigError(
                f"{exc}: the store must not be reached through it", "storage"
            ) from None
        warnings = []
        if self.opts.registry_api is None and not self.opts.assume_no_cache:
            warnings.append(
                "live blob-descriptor cache check skipped: this storage run has no registry "
                "API for the site, so only the registry config was checked (a "
                "REGISTRY_STORAGE_CACHE_BLOBDESCRIPTOR environment override would go unseen)"
            )
        if self.opts.dry_run:
            try:
                check_registry_config(
                    self.opts.registry_config,
                    self.layout.root,
                    assume_no_cache=self.opts.assume_no_cache,
                )
            except OnlineGCRefused as exc:
                warnings.append(f"a real run would be refused: {exc}")
        else:
            check_registry_config(
                self.opts.registry_config,
                self.layout.root,
                assume_no_cache=self.opts.assume_no_cache,
            )
        return warnings

    def lock(self) -> None:
        fs, quarantine = self.layout.fs, self.layout.quarantine_s
        try:
            fs.makedirs(quarantine)  # S3: a link here is refused, not followed
            with fs.directory(quarantine) as qfd:
                if os.fstat(qfd).st_dev != os.fstat(fs.fd()).st_dev:
                    raise ConfigError(
                        f"{quarantine} is on another filesystem than the "
                        "blobs; quarantine needs an atomic rename",
                        "storage",
                    )
                fd = os.open(
                    ".lock",
                    os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o644,
                    dir_fd=qfd,
                )
        except UnsafeEntry as exc:
            raise ConfigError(
                f"{exc}: the quarantine must be a directory of the store", "storage"
            ) from None
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise ConfigError(
                f"{quarantine}/.lock is a symbolic link: left alone; remove it", "storage"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise GCLocked(f"another gc run is collecting {self.layout.root}") from None
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None
        self.pool.shutdown(wait=True)
        if self.scan_pool is not None:
            self.scan_pool.shutdown(wait=True)
        self.layout.fs.close()

    # --- scanning --------------------------------------------------------------
    def enumerate_blobs(self) -> dict[str, BlobEntry]:
        prefixes = self.layout.blob_prefix_dirs()
        out: dict[str, BlobEntry] = {}
        on_link = self.layout.pin_blob_link
        for entries in pmap(
            self.scan_pool,
            lambda p: StoreLayout.scan_blob_prefix(p[0], p[1], on_link),
            prefixes,
            chunk=8,
        ):
            for e in entries:
                out[e.digest] = e
        return out

    def scan(
        self,
        *,
        full: bool = False,
        tags_for: set[str] | None = None,
        layers_only: Container[str] | None = None,
        intern: Intern | None = None,
    ) -> dict[str, RepoSnapshot]:
        """full: what planning needs (uploads, revision mtimes, tags). Otherwise a light
        listing for re-checks: names only, tags read only for `tags_for` repositories
        (a tag can only be served through a revision link, so revisions are the roots),
        layer links only of `layers_only` digests (the ones the re-check asks about)."""
        repos = self.layout.list_repositories()

        def one(r: str) -> RepoSnapshot:
            self._check_stop()
            if full:
                return self.layout.scan_repository(r, intern=intern)
            return self.layout.scan_repository(
                r,
                with_uploads=False,
                stat_revisions=True,
                with_tags=tags_for is not None and r in tags_for,
                layers_only=layers_only,
            )

        return {s.name: s for s in pmap(self.scan_pool, one, repos, chunk=4)}

    def _mark_closure(self, roots_by_repo: dict[str, set[str]]) -> tuple[MarkSet, dict]:
        """Global mark (manifests count as blobs too) plus per-repo reached manifests."""
        self.cache.load({d for roots in roots_by_repo.values() for d in roots}, self.scan_pool)
        while True:
            total, per_repo = MarkSet(), {}
            for repo, roots in roots_by_repo.items():
                m = mark(self.cache.nodes, roots, follow_referrers=False)
                per_repo[repo] = m.manifests
                total.update(m)
            missing = total.manifests - self.cache.nodes.keys()
            if not self.cache.load(missing, self.scan_pool):
                break
        total.blobs |= total.manifests
        return total, per_repo

    def live(
        self,
        exclude_revisions: set[tuple[str | None, str | None]],
        exclude_tags: set[tuple[str | None, str | None]],
        extra_roots: Iterable[tuple[str | None, str | None]] = (),
        tags_for: set[str] | None = None,
        layers_of: Container[str] | None = None,
    ) -> Live:
        """`layers_of`: the digests whose layer links the caller asks about; `linked` and
        the snapshots' layers then hold only those (all links of 10^5 images: ~50 MB)."""
        snaps = self.scan(tags_for=tags_for, layers_only=layers_of)
        roots: dict[str, set[str]] = {}
        linked: set[str] = set()
        for repo, s in snaps.items():
            r = {d for d in s.revisions if (repo, d) not in exclude_revisions}
            r |= {d for t, (d, _m) in s.tags.items() if (repo, t) not in exclude_tags}
            roots[repo] = r
            linked.update(s.layers)
            linked.update(d for d in s.revisions if (repo, d) not in exclude_revisions)
        for extra_repo, extra_digest in extra_roots:
            if extra_repo is not None and extra_digest is not None:
                roots.setdefault(extra_repo, set()).add(extra_digest)
        total, per_repo = self._mark_closure(roots)
        return Live(snaps, total.blobs, per_repo, linked)

    # --- planning ----------------------------------------------------------------
    def plan(self) -> Plan:
        started = time.time()
        cutoff = started - self.opts.grace
        ug = self.opts.upload_grace if self.opts.upload_grace is not None else self.opts.grace
        upload_cutoff = started - ug
        t = time.monotonic()
        blobs = self.enumerate_blobs()  # 1. candidates before marking
        t_enum = time.monotonic() - t
        intern = self.cache.intern = _interner(blobs)
        snaps = self.scan(full=True, intern=intern)  # 2. links, tags, uploads
        self.cache.load({d for s in snaps.values() for d in s.revisions}, self.scan_pool)
        items: list[Item] = []
        roots: dict[str, set[str]] = {}
        policy_repos = 0
        for repo, s in snaps.items():
            pol = policies_for(self.opts.policies, self.opts.site, repo, "storage")
            if pol is None:
                roots[repo] = set(s.revisions) | {d for d, _m in s.tags.values()}
                continue
            policy_repos += 1
            # the same push times, in the same order, as the API pass (`ages`)
            history = self.webhooks.get(repo)
            nodes = {d: self.cache.nodes.get(d) or Node() for d in s.revisions}
            graph = with_push_times(nodes, manifest_times(nodes, history, s.revisions))
            tags = tag_infos({t_: d for t_, (d, _m) in s.tags.items()}, history, s.tags)
            follow = self.follow.get(repo) if pol.follow_source else None
            dec = decide(pol, tags, graph, started, follow)
            self.kept.update(kept_summary(dec.kept_tags))
            roots[repo] = set(dec.kept_manifests) | {
                d for t_, (d, _m) in s.tags.items() if t_ in dec.kept_tags
            }
            items += [
                Item("tag", repo, s.tags[t_][0], t_, clause=dec.deleted_tags[t_])
                for t_ in sorted(dec.deleted_tags)
            ]
            items += [
                Item("manifest", repo, d, clause=dec.deleted_manifests[d])
                for d in sorted(dec.deleted_manifests)
            ]
        marked, _ = self._mark_closure(roots)
        self.cache.intern = None
        behind_link = self.layout.behind_link  # S2: pinned digests are never candidates
        unmarked = [
            d
            for d, e in blobs.items()
            if e.mtime < cutoff and d not in marked.blobs and not behind_link(d)
        ]
        blobs_marked = sum(1 for d in blobs if d in marked.blobs)
        del marked
        # only links that may go matter: those of unmarked or missing blobs
        doomed = set(unmarked)
        layer_repos: dict[str, list[str]] = {}
        for repo, s in snaps.items():
            for d in s.layers:
                if d in doomed or d not in blobs:
                    layer_repos.setdefault(d, []).append(repo)
        del doomed
        missing = [d for d in layer_repos if d not in blobs and not behind_link(d)]

        def link_mtimes(d: str) -> list[tuple[str, float | None]]:
            """(repository, its layer link's mtime) for every link to `d`, sorted."""
            return [
                (r, self.layout.link_or_dir_mtime(self.layout.layer_link_dir_str(r, d)))
                for r in sorted(layer_repos.get(d, ()))
            ]

        for d, links in zip(unmarked, pmap(self.scan_pool, link_mtimes, unmarked), strict=True):
            # a fresh link file means a push or mount in progress
            if any(m is not None and m >= cutoff for _r, m in links):
                continue
            items.append(Item("blob", None, d, bytes=blobs[d].size))
            items += [Item("link", r, d) for r, m in links if m is not None]
        for d, links in zip(missing, pmap(self.scan_pool, link_mtimes, missing), strict=True):
            if self.layout.blob_present(d):
                continue  # appeared after enumeration
            items += [Item("link", r, d) for r, m in links if m is not None and m < cutoff]
        for s in snaps.values():
            items += [
                Item("upload", u.repository, None, u.upload_id, bytes=u.size)
                for u in s.uploads
                if u.newest_mtime < upload_cutoff
            ]
        if self.layout.hides_references:  # S2: part of the graph is behind a link
            items = [i for i in items if i.kind == "upload"]
        summary = {
            "cutoff": cutoff,
            "upload_cutoff": upload_cutoff,
            "repositories": len(snaps),
            "policy_repositories": policy_repos,
            "blobs_total": len(blobs),
            "blobs_marked": blobs_marked,
            "manifests_parsed": self.cache.parsed,
            "enumerate_seconds": round(t_enum, 3),
        }
        return Plan(started, cutoff, upload_cutoff, items, summary)

    def recheck(self, plan: Plan) -> int:
        """3. Batch re-check against a fresh scan; returns how many items were dropped."""
        drop: set[str] = set()
        tags_for = {str(i.repository) for i in plan.items if i.kind in ("tag", "manifest")}
        blob_keys = {str(i.digest) for i in plan.items if i.kind == "blob"}
        while True:
            active = [i for i in plan.items if i.key not in drop]
            ex_rev = {(i.repository, i.digest) for i in active if i.kind == "manifest"}
            ex_tag = {(i.repository, i.name) for i in active if i.kind == "tag"}
            live = self.live(ex_rev, ex_tag, tags_for=tags_for, layers_of=blob_keys)
            before = len(drop)
            for i in active:
                snap = live.snaps.get(i.repository or "")
                if i.kind == "tag":
                    cur = snap.tags.get(i.name or "") if snap else None
                    if cur is None or cur[0] != i.digest or cur[1] >= plan.cutoff:
                        drop.add(i.key)
                elif i.kind == "manifest":
                    m = link_mtime(
                        self.layout.revision_link_dir_str(str(i.repository), str(i.digest))
                    )
                    if (
                        m is None
                        or m >= plan.cutoff
                        or i.digest in live.referenced.get(i.repository or "", ())
                    ):
                        drop.add(i.key)
            if len(drop) == before:
                break
        planned_links = {(i.repository, i.digest) for i in plan.items if i.kind == "link"}
        # candidate blobs linked now from a repository whose link the plan does not move
        # (live's snapshots list only the candidates' layer links)
        relinked = {
            d
            for r, s in live.snaps.items()
            for d in s.layers
            if d in blob_keys and (r, d) not in planned_links
        }
        del planned_links
        bad_blobs: set[str] = set()
        for i in plan.items:
            if i.kind != "blob" or i.key in drop:
                continue
            # (data mtime is re-checked per blob right before its move)
            if i.digest in live.protected or i.digest in relinked:
                bad_blobs.add(str(i.digest))
                drop.add(i.key)
        for i in plan.items:
            if i.kind != "link" or i.key in drop:
                continue
            if i.digest in blob_keys:
                if i.digest in bad_blobs:
                    drop.add(i.key)
            elif self.layout.blob_present(str(i.digest)) or i.digest in live.protected:
                drop.add(i.key)
        dropped = 0
        for i in plan.items:
            if i.key in drop:
                i.state, i.error = "kept", "changed or referenced again before quarantine"
                dropped += 1
            elif (
                i.kind != "upload"
                and i.state == "candidate"
                and (
                    self.layout.hides_references
                    or (i.kind in ("blob", "link") and self.layout.behind_link(str(i.digest)))
                )
            ):
                i.state, i.error = "kept", HIDDEN_BY_LINK
                dropped += 1
        return dropped

    # --- sweeping -------------------------------------------------------------
    def assign_quarantine(self, run_id: int, items: list[Item]) -> None:
        base = f"{self.layout.quarantine}/{run_id}"
        for n, i in enumerate(items):
            if i.state != "candidate" or i.kind == "upload":
                continue
            i.quarantine_at(base, n)  # the path is `Item.quarantine`

    def _changed(
        self, i: Item, parent_fd: int, name: str, cutoff: float, upload_cutoff: float
    ) -> bool:
        """Right-before-the-move re-check of one item, the directory `name` in `parent_fd`
        (opened without following links: one raises UnsafeEntry)."""
        orig = i.path(self.layout)
        try:
            if i.kind == "upload":
                return newest_mtime(Path(orig), self.layout.report_link)[0] >= upload_cutoff
            fd = open_dir_at(parent_fd, name, orig)  # the item itself is no link either
            try:
                if i.kind == "tag":
                    d, m = read_tag_link(orig)
                    return d != i.digest or m >= cutoff
                main = _MAIN_FILE[i.kind]
                try:
                    st = os.stat(main, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    # a layer link directory without its file is "as old as can be"
                    # (see layout.link_or_dir_mtime); anything else without it changed
                    return i.kind != "link"
                if stat.S_ISLNK(st.st_mode):
                    raise UnsafeEntry(f"{orig}/{main}", "is a symbolic link")
                return st.st_mtime >= cutoff
            finally:
                os.close(fd)
        except OSError:
            return True

    def _move(self, i: Item, cutoff: float, upload_cutoff: float) -> Item:
        """Quarantine one item (an upload session is removed): both ends reached through
        directory fds, never a link (S1)."""
        orig = i.path(self.layout)
        fs = self.layout.fs
        try:
            with fs.parent(orig, reuse=True) as (pfd, name):
                if self._changed(i, pfd, name, cutoff, upload_cutoff):
                    i.state, i.error = "kept", "changed just before quarantine"
                    return i
                if i.kind == "upload":
                    fs.remove_tree(orig)
                    i.state = "deleted"
                    return i
                assert i.quarantine is not None
                with fs.parent(i.quarantine, reuse=True) as (qfd, qname):  # made earlier
                    os.rename(name, qname, src_dir_fd=pfd, dst_dir_fd=qfd)
            i.state = "quarantined"
        except UnsafeEntry as exc:
            self.layout.report(exc)
            i.state, i.error = "error", str(exc)
        except FileNotFoundError:
            i.state, i.error = "kept", "vanished before quarantine"
        except OSError as exc:
            i.state, i.error = "error", f"quarantine {i.key}: {exc}"
        return i

    def _move_unless_stopped(self, i: Item, cutoff: float, upload_cutoff: float) -> Item:
        self._check_stop()
        return self._move(i, cutoff, upload_cutoff)

    def quarantine(self, plan: Plan) -> None:
        """4. Tags, then manifests, then per blob: its links, then its data. (Stale
        upload sessions are removed later, by `remove_stale_uploads`, after step 4b.)"""
        todo = [i for i in plan.items if i.state == "candidate" and i.kind != "upload"]
        shards = {os.path.dirname(i.quarantine) for i in todo if i.quarantine is not None}
        fs = self.layout.fs
        for top in {os.path.dirname(s) for s in shards}:
            fs.makedirs(top)
        pmap(self.pool, fs.makedirs, sorted(shards), chunk=16)
        with fs.reuse_directories():
            for kind in ("tag", "manifest"):
                pmap(
                    self.pool,
                    lambda i: self._move_unless_stopped(i, plan.cutoff, plan.upload_cutoff),
                    [i for i in todo if i.kind == kind],
                )
        by_digest: dict[str, list[Item]] = {}
        for i in todo:
            if i.kind in ("blob", "link"):
                by_digest.setdefault(str(i.digest), []).append(i)

        def blob_group(group: list[Item]) -> None:
            self._check_stop()  # a blob and its links move together, or not at all
            links = [i for i in group if i.kind == "link"]
            blob = [i for i in group if i.kind == "blob"]
            for link in links:
                self._move(link, plan.cutoff, plan.upload_cutoff)
            if blob:
                if any(li.state in ("kept", "error") for li in links):
                    blob[0].state, blob[0].error = (
                        "kept",
                        "a link changed or could not be moved before quarantine",
                    )
                else:
                    self._move(blob[0], plan.cutoff, plan.upload_cutoff)

        with fs.reuse_directories():
            pmap(self.pool, blob_group, list(by_digest.values()), chunk=64)

    def remove_stale_uploads(self, plan: Plan) -> None:
        """Abandoned upload sessions are not referenced by anything: removed at once
        (each re-checked right before), once the cache probe (4b) let the run go on."""
        with self.layout.fs.reuse_directories():
            pmap(
                self.pool,
                lambda i: self._move_unless_stopped(i, plan.cutoff, plan.upload_cutoff),
                [i for i in plan.items if i.kind == "upload" and i.state == "candidate"],
            )

    def gone_from_disk(self, repo: str, digest: str) -> bool:
        """For the cache probe: the layer link or the data of `digest` is missing now
        (a link in the way counts as missing: the registry's 200 is then unexplained)."""
        fs = self.layout.fs
        try:
            return not (
                fs.lexists(self.layout.layer_link_dir_str(repo, digest) + "/link")
                and fs.lexists(self.layout.blob_dir_str(digest) + "/data")
            )
        except UnsafeEntry:
            return True

    def restore_all(self, items: list[Item], why: str) -> None:
        """Move every quarantined item back: blob data first, so that a layer link never
        comes back before its data, then links, manifests (revision links), tags."""
        for kind in ("blob", "link", "manifest", "tag"):
            pmap(  # no directory reuse: restoring may create the directories it needs
                self.pool,
                lambda i: self._restore(i, why),
                [i for i in items if i.kind == kind and i.state == "quarantined"],
                chunk=32,
            )

    def _restore(self, i: Item, why: str | None) -> Item:
        try:
            _restore(i, self.layout)
            i.state, i.error = "restored", why
        except UnsafeEntry as exc:
            self.layout.report(exc)
            i.state, i.error = "error", f"restore {i.key}: {exc}"
        except OSError as exc:
            i.state, i.error = "error", f"restore {i.key}: {exc}"
        return i

    def finalize(self, items: list[Item], cutoff: float) -> None:
        """5 and 6: after the window, restore what is referenced again, delete the rest."""
        with self.layout.fs.reuse_directories():
            self._finalize(items, cutoff)

    def _finalize(self, items: list[Item], cutoff: float) -> None:
        pending = [i for i in items if i.state == "quarantined"]
        if not pending:
            return
        self.cache.quarantined.update(
            {str(i.digest): i for i in pending if i.kind == "blob" and i.quarantine is not None}
        )
        restore: set[str] = set()
        why: dict[str, str] = {}
        q_mtime: dict[str, float] = {}
        for i in pending:
            q_mtime[i.key] = _quarantined_mtime(i, self.layout)
        tag_targets: set[tuple[str | None, str | None]] = set()
        # only these digests' layer links are asked about below (`live.linked`)
        moved_blobs = {str(i.digest) for i in pending if i.kind in ("blob", "link")}
        for i in pending:
            if i.kind == "tag" and i.quarantine is not None:
                d, m = read_link(i.quarantine + "/current/link")
                if not self._exists(i.path(self.layout)) and (d != i.digest or m >= cutoff):
                    restore.add(i.key)  # re-tagged just before our move
                    why[i.key] = "tag was re-pushed just before quarantine"
                    tag_targets.add((i.repository, d))
        while True:
            extra = tag_targets | {
                (i.repository, i.digest)
                for i in pending
                if i.kind == "manifest" and i.key in restore
            }
            live = self.live(set(), set(), extra, layers_of=moved_blobs)
            before = len(restore)
            for i in pending:
                if (
                    i.kind == "manifest"
                    and i.key not in restore
                    and (
                        q_mtime[i.key] >= cutoff
                        or i.digest in live.referenced.get(i.repository or "", ())
                    )
                ):
                    restore.add(i.key)
                    why[i.key] = (
                        "re-pushed just before quarantine"
                        if q_mtime[i.key] >= cutoff
                        else "referenced by an index or tag again"
                    )
            if len(restore) == before:
                break
        blob_restore: set[str] = set()
        by_digest: dict[str, list[Item]] = {}
        for i in pending:
            if i.kind in ("blob", "link"):
                by_digest.setdefault(str(i.digest), []).append(i)
        for digest, group in by_digest.items():
            is_blob = any(i.kind == "blob" for i in group)
            referenced = (
                digest in live.protected
                or digest in live.linked
                or any(q_mtime[i.key] >= cutoff for i in group)
            )
            if not is_blob:
                referenced = referenced or self.layout.blob_present(digest)
            referenced = referenced or self.layout.behind_link(digest)
            if referenced:
                blob_restore.add(digest)
                restore.update(i.key for i in group)
                reason = (
                    "referenced by a manifest"
                    if digest in live.protected
                    else "linked again by a push or mount"
                    if digest in live.linked
                    else "changed just before quarantine"
                )
                why.update((i.key, reason) for i in group)

        if self.layout.hides_references:  # S2: we cannot see everything: delete nothing
            for i in pending:
                if i.key not in restore:
                    restore.add(i.key)
                    why[i.key] = HIDDEN_BY_LINK

        def settle(i: Item) -> Item:
            self._check_stop()
            if i.key in restore:
                return self._restore(i, why.get(i.key))
            assert i.quarantine is not None
            try:
                self.layout.fs.remove_tree(i.quarantine, _ONLY_FILE.get(i.kind))
                i.state = "deleted"
                self._count_deletion()
            except UnsafeEntry as exc:
                self.layout.report(exc)
                i.state, i.error = "error", f"settle {i.key}: {exc}"
            except OSError as exc:
                i.state, i.error = "error", f"settle {i.key}: {exc}"
            return i

        # restore first (shortest unavailability), then delete
        first = [i for i in pending if i.key in restore]
        rest = [i for i in pending if i.key not in restore]
        pmap(self.pool, settle, first, chunk=32)
        pmap(self.pool, settle, rest, chunk=32)

    def _quarantine_exists(self, i: Item) -> bool:
        """For resuming: is the item's quarantined copy there? A link in the way of it
        (S1) makes a pending item an error: both are left alone, the path reported."""
        if i.quarantine is None:
            return False
        try:
            return self.layout.fs.lexists(i.quarantine)
        except UnsafeEntry as exc:
            if i.state in ("candidate", "quarantined"):
                self.layout.report(exc)
                i.state, i.error = "error", f"resume {i.key}: {exc}"
            return False

    def _exists(self, path: str) -> bool:
        """Something is at `path` (a link in the way counts: we will not touch it)."""
        try:
            return self.layout.fs.lexists(path)
        except UnsafeEntry:
            return True

    def _count_deletion(self) -> None:
        self._deletions += 1
        limit = self.opts.fault_after_deletions
        if limit is not None and self._deletions >= limit:
            raise _InjectedFault(f"injected fault after {self._deletions} deletions")

    # --- resume -----------------------------------------------------------------
    async def load_unfinished(
        self,
    ) -> list[tuple[RunRecorder, list[Item], float, dict[str, Any]]]:
        """Interrupted runs: settle what the journal says and return quarantined items.
        Journal reads and writes happen here, in the coroutine; the filesystem checks
        run on a thread (`settle_interrupted`)."""
        journal = self.journal
        if journal is None or not self.opts.resume:
            return []
        out = []
        for run in await journal.gc_runs.unfinished(self.opts.site, "storage"):
            rec = RunRecorder(
                journal,
                site=self.opts.site,
                mode="storage",
                policy=run.get("policy"),
                dry_run=False,
                run_id=run["id"],
            )
            info = await journal.gc_runs.get(run["id"]) or {}
            summary = dict(info.get("mark_summary") or {})
            cutoff = float(summary.get("cutoff", run["started_at"]))
            rows = await journal.gc_runs.candidates(run["id"])
            was = {(str(r["kind"]), str(r["key"])): r.get("state") for r in rows}
            items, updates = await asyncio.to_thread(self.settle_interrupted, rows)
            # deleted by a settle that died before its journal write: tombstoned now
            found_deleted = [
                i for i in items if i.state == "deleted" and was.get((i.kind, i.key)) != "deleted"
            ]
            quarantined = [i for i in items if i.state == "quarantined"]
            await rec.update_states(
                updates,
                _tombstones(self.opts, rec, [*found_deleted, *quarantined], DELETED_OR_AWAY),
                _put_back(self.opts, rec, items),
            )
            out.append((rec, items, cutoff, summary))
        return out

    async def waiting_in_quarantine(self) -> list[tuple[int, int, int, float | None]]:
        """Read-only, for a dry run: (run, items, blob bytes, deletable after) of every
        earlier run whose items still wait in quarantine."""
        journal = self.journal
        if journal is None or not self.opts.resume:
            return []
        out = []
        for run in await journal.gc_runs.unfinished(self.opts.site, "storage"):
            rows = await journal.gc_runs.candidates(run["id"], ("quarantined",))
            if not rows:
                continue
            info = await journal.gc_runs.get(run["id"]) or {}
            after = (info.get("mark_summary") or {}).get(SETTLE_AFTER)
            blob_bytes = sum(int(r.get("bytes") or 0) for r in rows if r.get("kind") == "blob")
            out.append((int(run["id"]), len(rows), blob_bytes, after))
        return out

    def settle_interrupted(
        self, rows: list[dict[str, Any]]
    ) -> tuple[list[Item], list[CandidateUpdate]]:
        """Where an interrupted run's candidates are now, from the filesystem alone."""
        items = [Item.from_row(r) for r in rows]
        updates: list[CandidateUpdate] = []
        for i in items:
            q_exists = self._quarantine_exists(i)
            if i.state == "candidate":
                i.state = "quarantined" if q_exists else "kept"
                if i.state == "kept":
                    i.error = "run interrupted before quarantine"
            elif i.state == "quarantined" and not q_exists:
                i.state = "restored" if self._exists(i.path(self.layout)) else "deleted"
            updates.append((i.kind, i.key, i.state, i.error))
        return items, updates


def _interner(blobs: dict[str, BlobEntry]) -> Intern:
    """Planning reads each digest up to four times (blob listing, layer link, revision
    or tag, manifest body): map every later copy to the listing's own str."""
    get = blobs.get

    def intern(digest: str) -> str:
        entry = get(digest)
        return digest if entry is None else entry.digest

    return intern


def pmap(
    pool: ThreadPoolExecutor | None,
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    chunk: int = 128,
) -> list[Any]:
    """pool.map in chunks: ThreadPoolExecutor ignores `chunksize`, and one future per
    tiny filesystem operation costs more than the operation. No pool: in this thread."""
    if pool is None or len(items) <= chunk:
        return [fn(x) for x in items]
    parts = [items[k : k + chunk] for k in range(0, len(items), chunk)]
    out: list[Any] = []
    for res in pool.map(lambda part: [fn(x) for x in part], parts):
        out.extend(res)
    return out


class _InjectedFault(RuntimeError):
    pass


_MAIN_FILE = {"blob": "data", "link": "link", "manifest": "link", "tag": "current/link"}
# the one file such a directory usually holds: removal tries unlink + rmdir first
_ONLY_FILE = {"blob": "data", "link": "link", "manifest": "link"}


def _quarantined_mtime(i: Item, layout: StoreLayout) -> float:
    q = i.quarantine
    assert q is not None
    try:  # a read, path-based like the scans; what acts on the copy is confined
        return os.lstat(f"{q}/{_MAIN_FILE[i.kind]}").st_mtime
    except OSError:
        return 0.0


def _restore(i: Item, layout: StoreLayout) -> None:
    """Rename the quarantined copy back (S1: never through a link, never onto one)."""
    fs, q, orig = layout.fs, i.quarantine, i.path(layout)
    assert q is not None
    try:
        st = fs.lstat(orig)
    except FileNotFoundError:
        pass
    else:
        if stat.S_ISLNK(st.st_mode):
            raise UnsafeEntry(orig, "is a symbolic link")
        fs.remove_tree(q)  # recreated meanwhile: theirs is as good as ours
        return
    if i.kind == "blob" and not fs.lexists(q + "/data"):
        fs.remove_tree(q)  # a half-deleted copy is useless
        return
    fs.makedirs(os.path.dirname(orig))
    try:
        fs.rename(q, orig)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        fs.remove_tree(q)  # the registry recreated it while we looked


_CLAUSES = {
    "blob": "unreferenced by every manifest",
    "link": "layer link of an unreferenced or missing blob",
    "upload": "abandoned upload session",
}


def _item_json(i: Item) -> dict[str, Any]:
    """One deletion as `gc --json` lists it (the site is added per site)."""
    ref = {"tag": i.name} if i.kind == "tag" else {"upload": i.name} if i.kind == "upload" else {}
    return {
        "repository": i.repository,
        "kind": i.kind,
        **({"digest": i.digest} if i.digest and i.kind != "tag" else {}),
        **ref,
        "bytes": i.bytes,
        "clause": i.clause or _CLAUSES.get(i.kind, ""),
    }


def _tally(result: GCResult, items: list[Item]) -> None:
    for i in items:
        if i.state == "quarantined":  # listed now; a later run deletes or restores it
            result.items.append(_item_json(i) | {"state": "quarantined"})
        if i.state == "deleted":
            result.items.append(_item_json(i))
            if i.kind == "blob":
                result.blobs_deleted += 1
                result.bytes_reclaimed += i.bytes
                result.deleted_blobs.add(str(i.digest))
            elif i.kind == "manifest":
                result.manifests_deleted += 1
                result.deleted_manifests.add(i.key)
            elif i.kind == "tag":
                result.tags_deleted += 1
                result.deleted_tags.add(i.key)
            elif i.kind == "link":
                result.links_deleted += 1
            elif i.kind == "upload":
                result.uploads_deleted += 1
                result.upload_bytes_reclaimed += i.bytes
        elif i.state == "restored":
            result.restored += 1
        elif i.state == "error":
            result.errors.append(i.error or f"{i.key}: error")


async def collect_storage(
    root: str | Path,
    journal: Journal | None = None,
    options: StorageGCOptions | None = None,
    **kw: Any,
) -> GCResult:
    """Run one storage GC (finishing any interrupted run first). Blocking filesystem work
    runs on threads; the quarantine window is an asyncio sleep."""
    opts = options or StorageGCOptions(**kw)
    col = StorageCollector(root, journal, opts)
    try:
        return await _run(col, opts)
    finally:
        await asyncio.to_thread(col.close)


def collect_storage_sync(
    root: str | Path,
    journal: Journal | None = None,
    options: StorageGCOptions | None = None,
    **kw: Any,
) -> GCResult:
    """`collect_storage` for callers without an event loop (CLI, tests, benchmarks)."""
    return asyncio.run(collect_storage(root, journal, options, **kw))


async def _run(col: StorageCollector, opts: StorageGCOptions) -> GCResult:
    warnings = await asyncio.to_thread(col.preflight)
    if not opts.dry_run:
        await asyncio.to_thread(col.lock)
    policy_names = ",".join(p.name for p in opts.policies) or None
    result = GCResult(run_id=0, dry_run=opts.dry_run, warnings=warnings)

    # Earlier runs first. Their quarantined items are settled once they have waited a
    # full window (at once when due; now, after a wait, with `settle`); until then
    # this run plans nothing new, so no two runs' quarantines overlap (a manifest in
    # one run's quarantine never references a blob another run is settling).
    if opts.dry_run:
        for run_id, count, size, after in await col.waiting_in_quarantine():
            result.resumed_runs.append(run_id)
            result.waiting += count
            result.waiting_bytes += size
            if after is not None and after > time.time():
                result.deletable_after = max(result.deletable_after or 0.0, float(after))
        if result.deletable_after is not None and not opts.settle:
            return result  # the real run would only report the wait
    else:
        for rec, items, cutoff, summary in await col.load_unfinished():
            result.resumed_runs.append(int(rec.run_id or 0))
            waiting = [i for i in items if i.state == "quarantined"]
            if waiting:
                after = summary.get(SETTLE_AFTER)
                if after is None:  # interrupted before its wait began: a full window
                    await _refuse_if_cached(col, rec, items, result)
                    after = time.time() + opts.quarantine_window
                    await rec.set_state(
                        "quarantined", mark_summary={**summary, SETTLE_AFTER: after}
                    )
                if not await _wait_until(float(after), opts):
                    _note_waiting(result, waiting, float(after))
                    continue
                await _settle(col, rec, items, cutoff, result)
            sub = GCResult(run_id=int(rec.run_id or 0), dry_run=False)
            _tally(sub, items)
            await rec.finish("done", sub.to_json())
            _merge(result, sub)
        if result.waiting:
            log.info(
                "storage gc (%s): %d item(s) wait in quarantine until %s; nothing new "
                "planned until they are settled",
                opts.site,
                result.waiting,
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(result.deletable_after or 0)),
            )
            return result

    rec = RunRecorder(
        col.journal, site=opts.site, mode="storage", policy=policy_names, dry_run=opts.dry_run
    )
    result.run_id = await rec.start()
    t = time.monotonic()
    sweeping = False
    try:
        await col.prepare()
        plan = await _step(col, col.plan)
        result.kept = col.kept
        result.timings["mark"] = time.monotonic() - t
        result.kept_by_recheck = await _step(col, col.recheck, plan)
        result.mark_summary = plan.mark_summary
        result.timings["recheck"] = time.monotonic() - t - result.timings["mark"]
        if opts.dry_run:
            live = [i for i in plan.items if i.state == "candidate"]
            await rec.add_candidates([i.row() for i in plan.items])
            await rec.set_state("marking", mark_summary=plan.mark_summary)
            for i in live:
                i.state = "deleted"  # what the real run would do
            _tally(result, live)
            _report_unsafe(col, result, plan.items)
            for i in live:
                i.state = "candidate"
            await rec.finish("done", result.to_json())
            return result
        if opts.on_phase:
            await asyncio.to_thread(opts.on_phase, "planned")
        col.assign_quarantine(result.run_id, plan.items)
        # crash safety: every quarantine path is journaled BEFORE the first rename, with
        # the tombstones of the tags and manifests to be moved: from the move on the
        # registry no longer serves them, and a failover meanwhile must not bring them back
        await rec.add_candidates(
            (i.row() for i in plan.items), _tombstones(opts, rec, plan.items, ("candidate",))
        )
        await rec.set_state("sweeping", mark_summary=plan.mark_summary)
        sweeping = True
        t = time.monotonic()
        await _step(col, col.quarantine, plan)
        await _refuse_if_cached(col, rec, plan.items, result)  # 4b
        await _step(col, col.remove_stale_uploads, plan)
        result.timings["quarantine"] = time.monotonic() - t
        await rec.update_states(
            ((i.kind, i.key, i.state, i.error) for i in plan.items if i.state != "candidate"),
            withdrawn=_put_back(opts, rec, plan.items),
        )
        result.quarantined = sum(1 for i in plan.items if i.state == "quarantined")
        result.quarantined_bytes = sum(
            i.bytes for i in plan.items if i.state == "quarantined" and i.kind == "blob"
        )
        result.kept_by_recheck += sum(
            1
            for i in plan.items
            if i.state == "kept" and i.error == "changed just before quarantine"
        )
        if opts.on_phase:
            await asyncio.to_thread(opts.on_phase, "quarantined")
        if result.quarantined:
            # the window runs from the end of the moves (step 5's premise)
            after = time.time() + opts.quarantine_window
            await rec.set_state(
                "quarantined", mark_summary={**plan.mark_summary, SETTLE_AFTER: after}
            )
            if not await _wait_until(after, opts, journaled=col.journal is not None):
                _note_waiting(result, [i for i in plan.items if i.state == "quarantined"], after)
                _report_unsafe(col, result, plan.items)
                _tally(result, plan.items)
                return result  # stays 'quarantined': a later run settles it
        t = time.monotonic()
        await _settle(col, rec, plan.items, plan.cutoff, result)
        result.timings["settle"] = time.monotonic() - t
        col.cache.forget()  # no more marking in this run: free it before the tally
        _report_unsafe(col, result, plan.items)
        _tally(result, plan.items)
        await rec.finish("done", result.to_json())
        return result
    except BaseException as exc:
        # A run that already moved things stays 'sweeping' so the next run resumes it;
        # one that failed while only reading is simply failed.
        log.error("storage gc run %s failed: %s", result.run_id, exc)
        if not sweeping:
            result.errors.append(f"{type(exc).__name__}: {exc}")
            await rec.finish("failed", result.to_json())
        raise


async def _step(col: StorageCollector, fn: Callable[..., T], *args: Any) -> T:
    """One blocking step on a thread. When the caller is cancelled (the daemon stopping),
    the thread cannot be: it is told to stop at its next item and awaited there, so the
    cleanup after it journals what was done and no thread goes on changing the store
    behind a finished run; then the cancellation goes on. (Cancelled again meanwhile,
    e.g. by the daemon's stop timeout, it leaves at once.)"""
    work = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        col.stop.set()
        with contextlib.suppress(Exception):  # GCStopped, or the step's own failure
            await work
        raise


async def _wait_until(when: float, opts: StorageGCOptions, journaled: bool = True) -> bool:
    """Whether `when` has come: at once if it has, after sleeping if `settle` asks to
    wait for it (or nothing is journaled for a later run to find), else False."""
    remaining = when - time.time()
    if remaining <= 0:
        return True
    if not opts.settle and journaled:
        return False
    await asyncio.sleep(remaining)
    return True


def _note_waiting(result: GCResult, items: list[Item], when: float) -> None:
    result.waiting += len(items)
    result.waiting_bytes += sum(i.bytes for i in items if i.kind == "blob")
    result.deletable_after = max(result.deletable_after or 0.0, when)


async def _refuse_if_cached(
    col: StorageCollector, rec: RunRecorder, items: list[Item], result: GCResult
) -> None:
    """4b. Ask the registry whether it still says "exists" for what we just moved out;
    if it does (or cannot say), move everything back and refuse the run."""
    api = col.opts.registry_api
    if api is None or col.opts.assume_no_cache:
        return
    links = [
        (str(i.repository), str(i.digest))
        for i in items
        if i.kind == "link" and i.state == "quarantined"
    ]
    sample = cache_probe.choose_sample(links, cache_probe.SAMPLE_SIZE, random.Random())
    if not sample:
        return
    t = time.monotonic()
    outcome = await cache_probe.probe(api, sample, col.gone_from_disk)
    result.timings["cache_probe"] = time.monotonic() - t
    if outcome.clean:
        return
    log.error(
        "storage gc run %s: the registry answers from a blob-descriptor cache or cannot be "
        "asked (%d of %d sampled HEADs): restoring everything",
        result.run_id,
        len(outcome.cached) + len(outcome.failed),
        outcome.probed,
    )
    quarantined = [i for i in items if i.state == "quarantined"]
    await asyncio.to_thread(col.restore_all, quarantined, REFUSED_CACHE)
    restored = sum(1 for i in quarantined if i.state == "restored")
    result.restored += restored
    result.errors += [i.error or i.key for i in quarantined if i.state == "error"]
    await rec.update_states(
        [(i.kind, i.key, i.state, i.error) for i in items if i.state != "candidate"],
        withdrawn=_put_back(col.opts, rec, items),
    )
    await asyncio.to_thread(_prune_run_dir, col, rec, items)
    url = getattr(getattr(api, "site", None), "url", None)
    message = cache_probe.refusal(
        col.opts.site, url, outcome, restored, len(quarantined) - restored
    )
    result.errors.append(message)
    _report_unsafe(col, result, items)
    await rec.finish("refused", result.to_json())
    raise OnlineGCRefused(message)


def _report_unsafe(col: StorageCollector, result: GCResult, items: Iterable[Item] = ()) -> None:
    """S2: every symbolic link met, once, in the run's errors (not again when an item's
    error, already there or tallied later, names it)."""
    known = [*result.errors, *(i.error or "" for i in items if i.state == "error")]
    result.errors += [m for m in col.layout.unsafe.values() if not any(m in e for e in known)]
    hidden = "no blob, layer link, tag or manifest was collected: " + HIDDEN_BY_LINK
    if col.layout.hides_references and hidden not in known:
        result.errors.append(hidden)


async def _settle(
    col: StorageCollector, rec: RunRecorder, items: list[Item], cutoff: float, result: GCResult
) -> None:
    await rec.set_state("sweeping")  # no longer waiting: re-checking and deleting
    try:
        await _step(col, col.finalize, items, cutoff)
    finally:
        # states and tombstones in one transaction: failback and catch-up do not undo
        # what was deleted, even when the process dies right after this write or before
        # it (then the resumed run finds the deletions and tombstones them, `_resumed`)
        await rec.update_states(
            [
                (i.kind, i.key, i.state, i.error)
                for i in items
                if i.state in ("deleted", "restored", "error")
            ],
            _tombstones(col.opts, rec, items),
            _put_back(col.opts, rec, items),
        )
        await asyncio.to_thread(_prune_run_dir, col, rec, items)


def _tombstones(
    opts: StorageGCOptions,
    rec: RunRecorder,
    items: Iterable[Item],
    states: tuple[str, ...] = ("deleted",),
) -> list[Tombstone]:
    """The tags and manifests in `states`, as retention deletes at the site. Their detail
    ends in the run's marker, so that the run's later steps (maybe in another process)
    find the ones written ahead of the quarantine (`insert_missing_tombstones`)."""
    names = ",".join(p.name for p in opts.policies) or "sweep"
    marker = gc_run_marker(int(rec.run_id or 0))
    now = time.time()
    return [
        Tombstone(
            opts.site,
            str(i.repository),
            i.name if i.kind == "tag" else None,
            i.digest,
            now,
            "retention",
            (f"gc {names}: {i.clause}" if i.clause else f"gc {names}") + marker,
        )
        for i in items
        if i.state in states and i.kind in ("tag", "manifest") and i.repository
    ]


DELETED_OR_AWAY = ("deleted", "quarantined")


def _put_back(opts: StorageGCOptions, rec: RunRecorder, items: Iterable[Item]) -> list[Tombstone]:
    """The run's tombstones to withdraw: tags and manifests it restored, or kept because
    they changed (or vanished) before their move; the registry serves them."""
    return _tombstones(opts, rec, items, ("restored", "kept"))


def _prune_run_dir(col: StorageCollector, rec: RunRecorder, items: list[Item]) -> None:
    """Remove the run's emptied quarantine directories: the shards we know of in
    parallel (each rmdir frees a block and waits on the filesystem), then the rest."""
    shards = {os.path.dirname(i.quarantine) for i in items if i.quarantine is not None}
    fs = col.layout.fs

    def rmdir_if_empty(path: str) -> None:
        try:
            fs.rmdir(path)
        except (OSError, UnsafeEntry):
            pass

    pmap(col.pool, rmdir_if_empty, sorted(shards), chunk=16)
    fs.prune_empty(f"{col.layout.quarantine_s}/{rec.run_id}")


def _merge(into: GCResult, sub: GCResult) -> None:
    for f in (
        "manifests_deleted",
        "tags_deleted",
        "blobs_deleted",
        "links_deleted",
        "uploads_deleted",
        "bytes_reclaimed",
        "upload_bytes_reclaimed",
        "restored",
    ):
        setattr(into, f, getattr(into, f) + getattr(sub, f))
    into.errors += sub.errors
    into.deleted_blobs |= sub.deleted_blobs
    into.items += sub.items


__all__ = [
    "DEFAULT_WORKERS",
    "GCLocked",
    "GCResult",
    "GCStopped",
    "OnlineGCRefused",
    "StorageCollector",
    "StorageGCOptions",
    "check_registry_config",
    "collect_storage",
    "collect_storage_sync",
]
