"""A source's repositories and tag -> digest read from its filesystem store.

Why: a reconcile observes every source tag, and through the API that is one
HEAD per tag (100,000 at scale), each costing the registry and us about a
millisecond of CPU. A site with `storage:` configured (as storage-mode GC uses)
answers the same question from disk: distribution serves a tag by reading
``_manifests/tags/<tag>/current/link`` and has no tag cache, so the link file
is what the API would answer.

The trade-off: the store must be the one the registry serves (the same
promise `storage:` makes for GC), and a read races writes exactly as a HEAD
does. Anything the disk does not settle cleanly is left to the API: a tag whose
link is a symbolic link, unreadable or malformed, or names a manifest with no
revision link in the repository (the registry would answer 404 for it), is
returned in `unsettled` and HEADed as before. Reads are tolerant and never
follow a symbolic link (gc/layout.py); they run in a worker thread, so the event
loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from pathlib import Path

from replicator.gc.confined import UnsafeEntry
from replicator.gc.layout import StoreLayout, read_tag_link


@dataclass
class StoredTags:
    """One repository's tags as the store holds them."""

    digests: dict[str, str] = field(default_factory=dict)  # tag -> digest, settled on disk
    unsettled: list[str] = field(default_factory=list)  # tags to ask the registry about

    @property
    def tags(self) -> list[str]:
        return sorted([*self.digests, *self.unsettled])  # as the tags list orders them


def read_repositories(root: Path) -> list[str]:
    """Every repository in the store, sorted (what the catalog lists)."""
    return StoreLayout(root).list_repositories()


def read_tags(root: Path, repo: str) -> StoredTags:
    """The repository's tags; an absent repository has none (as a 404 tags list)."""
    layout = StoreLayout(root)
    base = f"{layout.repositories_s}/{repo}/_manifests"
    out = StoredTags()
    try:
        entries = sorted(e.name for e in os.scandir(base + "/tags"))
    except OSError:
        return out
    for tag in entries:
        tag_dir = f"{base}/tags/{tag}"
        if os.path.islink(tag_dir):
            out.unsettled.append(tag)
            continue
        try:
            digest, _mtime = read_tag_link(tag_dir)
        except UnsafeEntry:
            digest = None
        if digest is None or not _has_revision(base, digest):
            out.unsettled.append(tag)
        else:
            out.digests[tag] = digest
    return out


def read_tag(root: Path, repo: str, tag: str) -> tuple[bool, str | None]:
    """One tag as the store holds it, settled as `read_tags` settles it: (True, digest),
    (True, None) when the store has no such tag, (False, None) to ask the registry."""
    base = f"{StoreLayout(root).repositories_s}/{repo}/_manifests"
    tag_dir = f"{base}/tags/{tag}"
    if os.path.islink(tag_dir):
        return False, None
    if not os.path.isdir(tag_dir):
        return (True, None) if not os.path.lexists(tag_dir) else (False, None)
    try:
        digest, _mtime = read_tag_link(tag_dir)
    except UnsafeEntry:
        return False, None
    if digest is None or not _has_revision(base, digest):
        return False, None
    return True, digest


def _has_revision(manifests_dir: str, digest: str) -> bool:
    alg, _, hexd = digest.partition(":")
    try:
        st = os.lstat(f"{manifests_dir}/revisions/{alg}/{hexd}/link")
    except OSError:
        return False
    return not os.path.islink(f"{manifests_dir}/revisions/{alg}/{hexd}") and st.st_size > 0


async def repositories(root: Path) -> list[str]:
    return await asyncio.to_thread(read_repositories, root)


async def tags(root: Path, repo: str) -> StoredTags:
    return await asyncio.to_thread(read_tags, root, repo)


async def tag(root: Path, repo: str, tag: str) -> tuple[bool, str | None]:
    return await asyncio.to_thread(read_tag, root, repo, tag)
