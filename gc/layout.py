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
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from replicator.gc.mark import Node

V2 = Path("docker/registry/v2")
REPO_MARKERS = ("_layers", "_manifests", "_uploads")
_HEX_RE = re.compile(r"^[a-f0-9]{64}$|^[a-f0-9]{128}$")
_LINK_RE = re.compile(r"^(sha256|sha384|sha512):[a-f0-9]{64,128}$")
_FIRST_READ = 64 << 10


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
        for alg_entry in _scandir(self.blobs):
            if alg_entry.is_dir():
                out.extend(
                    (alg_entry.name, Path(p.path))
                    for p in _scandir(Path(alg_entry.path))
                    if p.is_dir()
                )
        return out

    @staticmethod
    def scan_blob_prefix(alg: str, prefix_dir: Path) -> list[BlobEntry]:
        out = []
        match = _HEX_RE.match
        for entry in _scandir(prefix_dir):
            if not match(entry.name):
                continue
            try:
                st = os.stat(entry.path + "/data")
            except OSError:
                continue
            out.append(BlobEntry(f"{alg}:{entry.name}", st.st_size, st.st_mtime))
        return out

    def blob_stat(self, digest: str) -> os.stat_result | None:
        try:
            return os.stat(self.blob_dir_str(digest) + "/data")
        except OSError:
            return None

    def read_blob(self, digest: str, max_bytes: int) -> bytes | None:
        """The blob's bytes if it exists and is at most `max_bytes` long."""
        return read_small_file(self.blob_dir_str(digest) + "/data", max_bytes)

    # --- repositories ------------------------------------------------------
    def list_repositories(self) -> list[str]:
        out: list[str] = []
        stack = [(self.repositories, "")]
        while stack:
            path, name = stack.pop()
            children = [e for e in _scandir(path) if e.is_dir()]
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
    ) -> RepoSnapshot:
        """Layer links are listed without their mtimes (0.0: not looked at) — only the few
        that matter are stat'ed later. A layer link directory counts as a link even if
        emptied (over-counting is the safe side; planning sweeps old empty ones).
        Revisions are always checked for their link file: distribution's manifest DELETE
        leaves the directory behind, and a root must be a servable manifest."""
        snap = RepoSnapshot(repo)
        base = f"{self.repositories_s}/{repo}"
        snap.layers = _scan_links(base + "/_layers", stat=False)
        snap.revisions = _scan_links(base + "/_manifests/revisions", stat=stat_revisions)
        if not with_tags:
            return snap
        for entry in _scandir(base + "/_manifests/tags"):
            link = os.path.join(entry.path, "current", "link")
            digest, mtime = read_link(link)
            if digest:
                snap.tags[entry.name] = (digest, mtime)
        if with_uploads:
            for entry in _scandir(base + "/_uploads"):
                if entry.is_dir():
                    newest, size = newest_mtime(Path(entry.path))
                    snap.uploads.append(
                        UploadEntry(repo, entry.name, Path(entry.path), newest, size)
                    )
        return snap


def read_small_file(path: str | Path, max_bytes: int) -> bytes | None:
    """The file's bytes if it exists and is at most `max_bytes` long.

    Raw fd calls and a 64 KiB first read: `f.read(max_bytes + 1)` allocates the whole
    4 MiB limit for every 1 KiB manifest, which made reading one cost 24 us, not 5."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
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


def read_link(path: str | Path) -> tuple[str | None, float]:
    """(digest, mtime) of a link file, (None, 0) when missing or malformed."""
    try:
        fd = os.open(path, os.O_RDONLY)
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


def link_mtime(link_dir: Path | str) -> float | None:
    try:
        return os.stat(os.path.join(link_dir, "link")).st_mtime
    except OSError:
        return None


def link_or_dir_mtime(link_dir: Path | str) -> float | None:
    """The link file's mtime; 0.0 ("as old as can be") for a directory without a link
    file — distribution's blob DELETE removes the file and leaves the directory, and
    such a directory serves nothing (a push writing a link into it right now is caught
    by the post-window re-check); None when the directory is gone."""
    try:
        return os.stat(os.path.join(link_dir, "link")).st_mtime
    except OSError:
        pass
    return 0.0 if os.path.isdir(link_dir) else None


def manifest_node(raw: bytes) -> Node | None:
    """References a stored manifest makes, or None if the bytes are not a manifest.

    Lenient on purpose (no media-type gate, schema 1 understood): anything a
    manifest could point at must be marked, whatever we think of its format.
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
    return Node(children=tuple(children), blobs=tuple(blobs), subject=subject)


def _scandir(path: Path | str) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except OSError:
        return []


def _scan_links(base: Path | str, stat: bool = True) -> dict[str, float]:
    """<base>/<alg>/<hex>/link -> {alg:hex: mtime} (mtime 0.0 when not stat'ed)."""
    out: dict[str, float] = {}
    for alg in _scandir(base):
        for entry in _scandir(alg.path):
            if not _HEX_RE.match(entry.name):
                continue
            if not stat:
                out[f"{alg.name}:{entry.name}"] = 0.0
                continue
            try:
                out[f"{alg.name}:{entry.name}"] = os.stat(entry.path + "/link").st_mtime
            except OSError:
                continue
    return out


def newest_mtime(path: Path) -> tuple[float, int]:
    """Newest file mtime and total size under `path` (an upload session): every write
    the registry makes to a session touches a file."""
    newest, size, seen = 0.0, 0, False
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.stat(os.path.join(dirpath, name))
            except OSError:
                continue
            newest = max(newest, st.st_mtime)
            size += st.st_size
            seen = True
    if not seen:  # an empty session: only the directory says when
        try:
            newest = path.stat().st_mtime
        except OSError:
            return 0.0, 0
    return newest, size
