"""The on-disk layout of a distribution filesystem store, read without the registry.

Paths follow distribution's registry/storage/paths.go under ``docker/registry/v2``:
``blobs/<alg>/<2 hex>/<hex>/data``; per repository ``_layers/<alg>/<hex>/link``,
``_manifests/revisions/<alg>/<hex>/link``, ``_manifests/tags/<tag>/current/link``
and ``_uploads/<id>/...``. A repository is any directory under ``repositories``
holding ``_layers``, ``_manifests`` or ``_uploads``; names nest (``team/app``),
and a repository may itself contain nested repositories.

Link identity is taken from the directory name, which is what the registry
looks links up by (distribution always writes the same digest inside).
Only tag ``current/link`` files are read, because their content is the point.
Reads here are tolerant: a file vanishing mid-scan (the registry is online) is
simply absent from the snapshot, never an error.

Symbolic links: distribution never writes one, so a link in the store was put
there by hand or by an attacker. Scans never descend through one (scandir
entries are tested with ``follow_symlinks=False``, files are lstat'ed or opened
with ``O_NOFOLLOW``); each link met is recorded (`unsafe`, path -> message) for
the run's errors. The registry does follow links, so what lies behind one is
invisible to us but not to clients. Hence, conservatively: a link that may hide
roots or layer links (a repository or namespace directory, ``_layers``,
``_manifests`` and what they hold, a tag) or a manifest we cannot read because
of a link sets `hides_references`; a link on the blob side or at one layer link
*pins* that digest (`behind_link`: never a candidate, always counted present).
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from replicator.gc.confined import ConfinedFS, UnsafeEntry
from replicator.gc.mark import Node

V2 = Path("docker/registry/v2")
REPO_MARKERS = ("_layers", "_manifests", "_uploads")
_HEX_RE = re.compile(r"^[a-f0-9]{64}$|^[a-f0-9]{128}$")
_LINK_RE = re.compile(r"^(sha256|sha384|sha512):[a-f0-9]{64,128}$")
_FIRST_READ = 64 << 10
_NOFOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NOFOLLOW_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
OnLink = Callable[[str], None]  # told the path of a symbolic link met in the store
Intern = Callable[[str], str]  # a digest -> the one str object a run keeps for it


class BlobEntry(NamedTuple):
    """A NamedTuple, not a frozen dataclass: built 10^5 times per run, 5x cheaper."""

    digest: str
    size: int
    mtime: float


@dataclass(frozen=True)
class UploadEntry:
    repository: str
    upload_id: str
    path: Path
    newest_mtime: float
    size: int


@dataclass
class RepoSnapshot:
    """One repository's links at scan time: digest -> link file mtime."""

    name: str
    layers: dict[str, float] = field(default_factory=dict)
    revisions: dict[str, float] = field(default_factory=dict)
    tags: dict[str, tuple[str, float]] = field(default_factory=dict)  # tag -> (digest, mtime)
    uploads: list[UploadEntry] = field(default_factory=list)


class StoreLayout:
    """Path arithmetic and tolerant scanning for one rootdirectory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.v2 = self.root / V2
        self.blobs = self.v2 / "blobs"
        self.repositories = self.v2 / "repositories"
        self.quarantine = self.v2 / "_quarantine"
        # str twins of the paths above, for the per-item hot paths: pathlib's `/`
        # costs more than the stat or rename it feeds, 10^5 times per run
        self.blobs_s = str(self.blobs)
        self.repositories_s = str(self.repositories)
        self.quarantine_s = str(self.quarantine)
        # every change to the store goes through here (never through a link)
        self.fs = ConfinedFS(str(self.root), str(self.v2))
        # what scans met (sticky for the collector's life; see the module docstring)
        self.unsafe: dict[str, str] = {}  # path -> message for the run's errors
        self.hides_references = False
        self.pinned: set[str] = set()  # digests a link sits at (blob dir/data, layer link)
        self.linked_prefixes: set[str] = set()  # "alg" or "alg/xx" blob dirs that are links

    # --- what the scans met ---------------------------------------------------
    def report(self, exc: UnsafeEntry, *, hides: bool = False, pin: str | None = None) -> None:
        self.unsafe.setdefault(exc.path, str(exc))
        if hides:
            self.hides_references = True
        if pin is not None:
            self.pinned.add(pin)

    def report_link(self, path: str, *, hides: bool = False, pin: str | None = None) -> None:
        self.report(UnsafeEntry(path, "is a symbolic link"), hides=hides, pin=pin)

    def behind_link(self, digest: str) -> bool:
        """A link sits at or above this blob: we cannot look, the registry can."""
        if digest in self.pinned or not self.linked_prefixes:
            return digest in self.pinned
        alg, _, hexd = digest.partition(":")
        return alg in self.linked_prefixes or f"{alg}/{hexd[:2]}" in self.linked_prefixes

    def _real_dir(self, path: str, *, hides: bool) -> bool:
        """`path` is a directory and not a link (a link is reported)."""
        try:
            st = os.lstat(path)
        except OSError:
            return False
        if stat.S_ISLNK(st.st_mode):
            self.report_link(path, hides=hides)
            return False
        return stat.S_ISDIR(st.st_mode)

    # --- paths -------------------------------------------------------------
    def blob_dir(self, digest: str) -> Path:
        alg, hexd = digest.split(":", 1)
        return self.blobs / alg / hexd[:2] / hexd

    def blob_data(self, digest: str) -> Path:
        return self.blob_dir(digest) / "data"

    def blob_dir_str(self, digest: str) -> str:
        alg, hexd = digest.split(":", 1)
        return f"{self.blobs_s}/{alg}/{hexd[:2]}/{hexd}"

    def layer_link_dir_str(self, repo: str, digest: str) -> str:
        alg, hexd = digest.split(":", 1)
        return f"{self.repositories_s}/{repo}/_layers/{alg}/{hexd}"

    def revision_link_dir_str(self, repo: str, digest: str) -> str:
        alg, hexd = digest.split(":", 1)
        return f"{self.repositories_s}/{repo}/_manifests/revisions/{alg}/{hexd}"

    def tag_dir_str(self, repo: str, tag: str) -> str:
        return f"{self.repositories_s}/{repo}/_manifests/tags/{tag}"

    def upload_dir_str(self, repo: str, upload_id: str) -> str:
        return f"{self.repositories_s}/{repo}/_uploads/{upload_id}"

    def repo_dir(self, repo: str) -> Path:
        return self.repositories / repo

    def layer_link_dir(self, repo: str, digest: str) -> Path:
        alg, hexd = digest.split(":", 1)
        return self.repo_dir(repo) / "_layers" / alg / hexd

    def revision_link_dir(self, repo: str, digest: str) -> Path:
        alg, hexd = digest.split(":", 1)
        return self.repo_dir(repo) / "_manifests" / "revisions" / alg / hexd

    def tag_dir(self, repo: str, tag: str) -> Path:
        return self.repo_dir(repo) / "_manifests" / "tags" / tag

    def upload_dir(self, repo: str, upload_id: str) -> Path:
        return self.repo_dir(repo) / "_uploads" / upload_id

    # --- blobs -------------------------------------------------------------
    def blob_prefix_dirs(self) -> list[tuple[str, Path]]:
        """(algorithm, blobs/<alg>/<xx>) pairs: the unit of parallel blob listing."""
        out: list[tuple[str, Path]] = []
        # a link here may hide every manifest: `hides` (reads of them also would)
        if not self._real_dir(self.blobs_s, hides=True):
            return out
        for alg_entry in _scandir(self.blobs):
            if alg_entry.is_symlink():
                self.linked_prefixes.add(alg_entry.name)
                self.report_link(alg_entry.path)
            elif alg_entry.is_dir(follow_symlinks=False):
                for p in _scandir(Path(alg_entry.path)):
                    if p.is_symlink():
                        self.linked_prefixes.add(f"{alg_entry.name}/{p.name}")
                        self.report_link(p.path)
                    elif p.is_dir(follow_symlinks=False):
                        out.append((alg_entry.name, Path(p.path)))
        return out

    @staticmethod
    def scan_blob_prefix(
        alg: str, prefix_dir: Path, on_link: Callable[[str, str], None] | None = None
    ) -> list[BlobEntry]:
        """Blobs in one blobs/<alg>/<xx> directory. A blob directory or `data` that is a
        symbolic link is not listed; `on_link(path, digest)` is told about it."""
        out = []
        match = _HEX_RE.match
        for entry in _scandir(prefix_dir):
            if not match(entry.name):
                continue
            digest = f"{alg}:{entry.name}"
            if entry.is_symlink():
                if on_link is not None:
                    on_link(entry.path, digest)
                continue
            try:
                st = os.lstat(entry.path + "/data")
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                if stat.S_ISLNK(st.st_mode) and on_link is not None:
                    on_link(entry.path + "/data", digest)
                continue
            out.append(BlobEntry(digest, st.st_size, st.st_mtime))
        return out

    def pin_blob_link(self, path: str, digest: str) -> None:
        """`scan_blob_prefix`'s on_link: report the link, pin its digest."""
        self.report_link(path, pin=digest)

    def blob_stat(self, digest: str) -> os.stat_result | None:
        """lstat of the blob's data (a link is not followed)."""
        try:
            return os.lstat(self.blob_dir_str(digest) + "/data")
        except OSError:
            return None

    def blob_present(self, digest: str) -> bool:
        """The registry may serve this blob: its data exists, or a link we do not follow
        sits in the way (then the registry, which follows it, might find data)."""
        return self.behind_link(digest) or self.blob_stat(digest) is not None

    def read_blob(self, digest: str, max_bytes: int) -> bytes | None:
        """The blob's bytes if it exists and is at most `max_bytes` long. A manifest
        behind a link is not read; it may still be served, so it hides references."""
        if self.behind_link(digest):
            self.hides_references = True
            return None
        path = self.blob_dir_str(digest) + "/data"
        try:
            return read_small_file(path, max_bytes, strict=True)
        except UnsafeEntry as exc:
            self.report(exc, hides=True, pin=digest)
            return None

    # --- repositories ------------------------------------------------------
    def list_repositories(self) -> list[str]:
        """Repository names. A link met (namespace, repository, ``_layers``,
        ``_manifests``) hides what is behind it: reported, `hides_references`; a link
        at ``_uploads`` hides only upload sessions: reported."""
        out: list[str] = []
        if not self._real_dir(self.repositories_s, hides=True):
            return out
        stack = [(self.repositories, "")]
        while stack:
            path, name = stack.pop()
            children = []
            for e in _scandir(path):
                if e.is_symlink():
                    self.report_link(e.path, hides=e.name != "_uploads")
                elif e.is_dir(follow_symlinks=False):
                    children.append(e)
            if name and any(e.name in REPO_MARKERS for e in children):
                out.append(name)
            for e in children:
                if not e.name.startswith("_"):
                    stack.append((Path(e.path), f"{name}/{e.name}" if name else e.name))
        return sorted(out)

    def scan_repository(
        self,
        repo: str,
        *,
        with_uploads: bool = True,
        stat_revisions: bool = True,
        with_tags: bool = True,
        layers_only: Container[str] | None = None,
        intern: Intern | None = None,
    ) -> RepoSnapshot:
        """Layer links are listed without their mtimes (0.0: not looked at) — only the few
        that matter are stat'ed later. A layer link directory counts as a link even if
        emptied (over-counting is the safe side; planning sweeps old empty ones).
        Revisions are always checked for their link file: distribution's manifest DELETE
        leaves the directory behind, and a root must be a servable manifest.

        Memory, at 10^5 manifests: `layers_only` lists only the layer links of those
        digests (a re-check asks about its candidates, not about every link; links met
        are still reported and pinned); `intern` maps each digest read to one shared
        str (a 71-character digest costs 120 bytes per copy)."""
        snap = RepoSnapshot(repo)
        base = f"{self.repositories_s}/{repo}"
        layers, revisions = base + "/_layers", base + "/_manifests/revisions"
        if self._real_dir(layers, hides=True):
            snap.layers = self._scan_links(
                layers, with_mtimes=False, layers=True, only=layers_only, intern=intern
            )
        if self._real_dir(revisions, hides=True):
            snap.revisions = self._scan_links(
                revisions, with_mtimes=stat_revisions, layers=False, intern=intern
            )
        if not with_tags:
            return snap
        tags = base + "/_manifests/tags"
        if self._real_dir(tags, hides=True):
            for entry in _scandir(tags):
                if entry.is_symlink():
                    self.report_link(entry.path, hides=True)
                    continue
                try:
                    digest, mtime = read_tag_link(entry.path)
                except UnsafeEntry as exc:
                    self.report(exc, hides=True)
                    continue
                if digest:
                    snap.tags[entry.name] = (intern(digest) if intern else digest, mtime)
        if with_uploads:
            for entry in _scandir(base + "/_uploads"):
                if entry.is_symlink():
                    self.report_link(entry.path)
                elif entry.is_dir(follow_symlinks=False):
                    newest, size = newest_mtime(Path(entry.path), self.report_link)
                    snap.uploads.append(
                        UploadEntry(repo, entry.name, Path(entry.path), newest, size)
                    )
        return snap

    def _scan_links(
        self,
        base: str,
        *,
        with_mtimes: bool,
        layers: bool,
        only: Container[str] | None = None,
        intern: Intern | None = None,
    ) -> dict[str, float]:
        """<base>/<alg>/<hex>/link -> {alg:hex: mtime} (mtime 0.0 when not stat'ed).

        A link at <alg> hides unknown digests; one at <hex> (or its link file) of a
        layer pins that digest, of a revision hides a root. `only`: list just these
        digests (symbolic links are still reported)."""
        out: dict[str, float] = {}
        for alg in _scandir(base):
            if alg.is_symlink():
                self.report_link(alg.path, hides=True)
                continue
            for entry in _scandir(alg.path):
                if not _HEX_RE.match(entry.name):
                    continue
                digest = f"{alg.name}:{entry.name}"
                if entry.is_symlink():
                    self.report_link(entry.path, hides=not layers, pin=digest)
                    continue
                if only is not None and digest not in only:
                    continue
                if intern is not None:
                    digest = intern(digest)
                if not with_mtimes:
                    out[digest] = 0.0
                    continue
                try:
                    st = os.lstat(entry.path + "/link")
                except OSError:
                    continue
                if _is_link(st):
                    self.report_link(entry.path + "/link", hides=not layers, pin=digest)
                    continue
                out[digest] = st.st_mtime
        return out

    def link_or_dir_mtime(self, link_dir: str) -> float | None:
        """`link_or_dir_mtime` that reports a link file that is a symbolic link (then
        inf: "just written", so never collected) and pins its digest."""
        try:
            st = os.lstat(link_dir + "/link")
        except OSError:
            return link_or_dir_mtime(link_dir)
        if _is_link(st):
            parts = link_dir.rsplit("/", 2)
            self.report_link(link_dir + "/link", pin=f"{parts[-2]}:{parts[-1]}")
            return math.inf
        return st.st_mtime


def read_small_file(path: str | Path, max_bytes: int, *, strict: bool = False) -> bytes | None:
    """The file's bytes if it exists and is at most `max_bytes` long. A symbolic link
    is not followed: None, or UnsafeEntry when `strict`.

    Raw fd calls and a 64 KiB first read: `f.read(max_bytes + 1)` allocates the whole
    4 MiB limit for every 1 KiB manifest, which made reading one cost 24 us, not 5."""
    try:
        fd = os.open(path, _NOFOLLOW_FILE)
    except OSError as exc:
        if strict and exc.errno == errno.ELOOP:
            raise UnsafeEntry(str(path), "is a symbolic link") from None
        return None
    try:
        data = os.read(fd, min(_FIRST_READ, max_bytes + 1))
        if len(data) < _FIRST_READ or len(data) > max_bytes:
            return data if len(data) <= max_bytes else None
        parts, total = [data], len(data)
        while total <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            parts.append(chunk)
            total += len(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)
    return b"".join(parts) if total <= max_bytes else None


def read_link(path: str | Path, dir_fd: int | None = None) -> tuple[str | None, float]:
    """(digest, mtime) of a link file, (None, 0) when missing, malformed or a
    symbolic link (not followed)."""
    try:
        fd = os.open(path, _NOFOLLOW_FILE, dir_fd=dir_fd)
    except OSError:
        return None, 0.0
    try:
        text = os.read(fd, 300).decode("ascii", "replace").strip()
        mtime = os.fstat(fd).st_mtime
    except OSError:
        return None, 0.0
    finally:
        os.close(fd)
    return (text, mtime) if _LINK_RE.match(text) else (None, 0.0)


def read_tag_link(tag_dir: str) -> tuple[str | None, float]:
    """`read_link` of <tag_dir>/current/link; UnsafeEntry when `current` or the link
    file is a symbolic link (the registry would follow it: we cannot know the tag)."""
    try:
        fd = os.open(tag_dir + "/current", _NOFOLLOW_DIR)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(tag_dir + "/current"):
            raise UnsafeEntry(tag_dir + "/current", "is a symbolic link") from None
        return None, 0.0
    try:
        found = read_link("link", dir_fd=fd)
        if found[0] is None and os.path.islink(tag_dir + "/current/link"):
            raise UnsafeEntry(tag_dir + "/current/link", "is a symbolic link")
        return found
    finally:
        os.close(fd)


def link_mtime(link_dir: Path | str) -> float | None:
    """mtime of <link_dir>/link; a symbolic link counts as just written (inf)."""
    try:
        st = os.lstat(os.path.join(link_dir, "link"))
    except OSError:
        return None
    return math.inf if _is_link(st) else st.st_mtime


def link_or_dir_mtime(link_dir: Path | str) -> float | None:
    """The link file's mtime; 0.0 ("as old as can be") for a directory without a link
    file — distribution's blob DELETE removes the file and leaves the directory, and
    such a directory serves nothing (a push writing a link into it right now is caught
    by the post-window re-check); None when the directory is gone. Nothing is
    followed: a link file that is a symbolic link counts as just written (inf)."""
    try:
        st = os.lstat(os.path.join(link_dir, "link"))
    except OSError:
        pass
    else:
        return math.inf if _is_link(st) else st.st_mtime
    try:
        return 0.0 if stat.S_ISDIR(os.lstat(link_dir).st_mode) else None
    except OSError:
        return None


def _is_link(st: os.stat_result) -> bool:
    return stat.S_ISLNK(st.st_mode)


def manifest_node(raw: bytes, intern: Intern | None = None) -> Node | None:
    """References a stored manifest makes, or None if the bytes are not a manifest.

    Lenient on purpose (no media-type gate, schema 1 understood): anything a
    manifest could point at must be marked, whatever we think of its format.
    `intern` maps each digest to a shared str (see `scan_repository`).
    """
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(doc, dict) or "schemaVersion" not in doc:
        return None
    children: list[str] = []
    blobs: list[str] = []
    for d in doc.get("manifests") or []:
        if isinstance(d, dict) and isinstance(d.get("digest"), str):
            children.append(d["digest"])
    cfg = doc.get("config")
    if isinstance(cfg, dict) and isinstance(cfg.get("digest"), str):
        blobs.append(cfg["digest"])
    for d in doc.get("layers") or doc.get("blobs") or []:
        if isinstance(d, dict) and isinstance(d.get("digest"), str):
            blobs.append(d["digest"])
    for d in doc.get("fsLayers") or []:  # schema 1
        if isinstance(d, dict) and isinstance(d.get("blobSum"), str):
            blobs.append(d["blobSum"])
    sub = doc.get("subject")
    subject = (
        sub["digest"] if isinstance(sub, dict) and isinstance(sub.get("digest"), str) else None
    )
    if intern is not None:
        children, blobs = [intern(d) for d in children], [intern(d) for d in blobs]
    return Node(children=tuple(children), blobs=tuple(blobs), subject=subject)


def _scandir(path: Path | str) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except OSError:
        return []


def newest_mtime(path: Path, on_link: OnLink | None = None) -> tuple[float, int]:
    """Newest file mtime and total size under `path` (an upload session): every write
    the registry makes to a session touches a file. Links are not followed: one inside
    makes the session "just written" (inf), so it is never collected; `on_link` is told."""
    newest, size, seen = 0.0, 0, False
    stack = [str(path)]
    while stack:
        for e in _scandir(stack.pop()):
            if e.is_symlink():
                if on_link is not None:
                    on_link(e.path)
                newest = math.inf
            elif e.is_dir(follow_symlinks=False):
                stack.append(e.path)
            else:
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                newest = max(newest, st.st_mtime)
                size += st.st_size
                seen = True
    if not seen and newest != math.inf:  # an empty session: only the directory says when
        try:
            newest = os.lstat(path).st_mtime
        except OSError:
            return 0.0, 0
    return newest, size
