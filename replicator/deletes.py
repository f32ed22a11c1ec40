"""The delete protocol: how a delete at a source becomes a delete at a target.

Used by `sync` (planned deletes) and by the daemon's delete tasks alike, so a
delete means the same thing whichever path carries it:

1. Re-check at the source. The source is the truth: a delete is applied only
   when a HEAD at the source answers 404 for the tag (or digest). A stale,
   replayed or forged event for a tag the source still holds changes nothing. A
   5xx or timeout there is "unknown": the RegistryError propagates and the
   caller retries later; nothing is deleted.
2. Delete tags by tag. `RegistryClient.delete_tag` removes the one tag (DELETE
   by tag, else the placeholder trick on distribution 2.8); the manifest and
   every sibling tag stay.
3. Delete a manifest by digest only when no tag at the target still points to
   it (a tag the rule does not cover, or one the source still holds, keeps it).
4. An image deleted at the target takes its cosign tags (`sha256-<hex>.sig`, `.att`,
   `.sbom`) along, by tag, once the image is gone there and at the source: they are
   its attachments, and without their image nothing would ever copy them again (a
   source on distribution 2.8 keeps them orphaned after deleting the image by digest).
5. Record a tombstone for every delete made (`journal.tombstones`, origin
   `performed`), so failback knows what was deleted and the daemon does not
   bounce the target's webhook about our own delete.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from replicator.journal import Journal
from replicator.registry.client import RegistryClient
from replicator.rules import cosign_tags_of

log = logging.getLogger(__name__)

DeleteOutcome = Literal["deleted", "absent", "kept"]


@dataclass(frozen=True)
class DeleteResult:
    """What one delete did at one target; `reason` says why when nothing was deleted."""

    outcome: DeleteOutcome
    site: str
    repository: str
    reference: str  # the tag, or the digest for a delete by digest
    previous: str | None = None  # the digest the tag pointed at, when known
    manifest_deleted: bool = False
    reason: str = ""

    def describe(self) -> str:
        where = f"{self.site}/{self.repository}:{self.reference}"
        if self.outcome == "kept":
            return f"{where} kept: {self.reason}"
        if self.outcome == "absent":
            return f"{where} was already absent"
        manifest = f"; manifest {self.previous} deleted too" if self.manifest_deleted else ""
        return f"{where} deleted{manifest}"


@dataclass(frozen=True)
class DeleteSite:
    """One side of a delete: a client, its site name and the repository there."""

    client: RegistryClient
    site: str
    repository: str


async def _tombstone(
    journal: Journal | None, where: DeleteSite, tag: str | None, digest: str | None
) -> None:
    if journal is not None:
        await journal.tombstones.record(
            where.site, where.repository, tag=tag, digest=digest, origin="performed"
        )


def _placeholder_hook(journal: Journal | None, source: str, target: str, tag: str):
    """The placeholder push is our own: the ledger says so before the target's webhook
    can arrive, so the daemon does not replicate a placeholder anywhere."""
    if journal is None:
        return None

    async def hook(repo: str, digest: str) -> None:
        await journal.ledger.record(target, repo, digest, source, tag)

    return hook


async def delete_tag(
    source: DeleteSite,
    target: DeleteSite,
    tag: str,
    *,
    journal: Journal | None = None,
    prune_digest: str | None = None,
) -> DeleteResult:
    """Delete `tag` at the target if the source no longer holds it; with
    `prune_digest` (the planner found no tag staying on it), delete that manifest
    too once the tag is gone, unless the source still holds the digest."""
    held = await source.client.head_manifest(source.repository, tag)
    if held is not None:
        return DeleteResult(
            "kept",
            target.site,
            target.repository,
            tag,
            reason=f"the source {source.site} still holds it at {held.digest}",
        )
    done = await target.client.delete_tag(
        target.repository,
        tag,
        before_placeholder=_placeholder_hook(journal, source.site, target.site, tag),
    )
    if not done.deleted:
        return DeleteResult("absent", target.site, target.repository, tag)
    previous = done.previous or prune_digest
    await _tombstone(journal, target, tag, previous)
    pruned = False
    if (
        prune_digest is not None
        and await source.client.head_manifest(source.repository, prune_digest) is None
    ):
        pruned = await target.client.delete_manifest(target.repository, prune_digest)
        if pruned:
            await _tombstone(journal, target, None, prune_digest)
    log.info("delete %s/%s:%s: %s", target.site, target.repository, tag, done.describe())
    return DeleteResult(
        "deleted", target.site, target.repository, tag, previous, manifest_deleted=pruned
    )


async def delete_digest(
    source: DeleteSite,
    target: DeleteSite,
    digest: str,
    covers: Callable[[str], bool],
    *,
    journal: Journal | None = None,
) -> DeleteResult:
    """A manifest deleted by digest at the source: at the target, delete the tags on it
    that the rule covers and the source no longer holds (by tag), then the manifest
    itself only when no tag is left pointing to it."""
    if await source.client.head_manifest(source.repository, digest) is not None:
        return DeleteResult(
            "kept",
            target.site,
            target.repository,
            digest,
            reason=f"the source {source.site} still holds the manifest",
        )
    dst = target.client
    if await dst.head_manifest(target.repository, digest) is None:
        return DeleteResult("absent", target.site, target.repository, digest)
    tags = await dst.list_tags(target.repository)
    heads = await asyncio.gather(*(dst.head_manifest(target.repository, t) for t in tags))
    pointing = [t for t, h in zip(tags, heads, strict=True) if h is not None and h.digest == digest]
    staying: list[str] = []
    for tag in pointing:
        if not covers(tag):
            staying.append(tag)
            continue
        result = await delete_tag(source, target, tag, journal=journal)
        if result.outcome == "kept":
            staying.append(tag)
    if staying:
        return DeleteResult(
            "kept",
            target.site,
            target.repository,
            digest,
            reason=f"tag(s) {', '.join(sorted(staying))} still point to it",
        )
    deleted = await dst.delete_manifest(target.repository, digest)
    if not deleted:
        return DeleteResult("absent", target.site, target.repository, digest)
    await _tombstone(journal, target, None, digest)
    for tag in (t for t in cosign_tags_of(digest) if t in tags):
        await delete_attached(source, target, tag, digest, journal=journal)
    return DeleteResult(
        "deleted", target.site, target.repository, digest, digest, manifest_deleted=True
    )


async def delete_attached(
    source: DeleteSite,
    target: DeleteSite,
    tag: str,
    image: str,
    *,
    journal: Journal | None = None,
) -> DeleteResult:
    """Delete cosign tag `tag` of `image` at the target, by tag, when the image is gone
    there and at the source (whatever the source's orphaned tag says: the image is the
    truth it is attached to). Kept while either side still holds the image."""
    for side, where in ((target, "target"), (source, "source")):
        if await side.client.head_manifest(side.repository, image) is not None:
            return DeleteResult(
                "kept",
                target.site,
                target.repository,
                tag,
                reason=f"its image {image} is still at the {where} {side.site}",
            )
    done = await target.client.delete_tag(
        target.repository,
        tag,
        before_placeholder=_placeholder_hook(journal, source.site, target.site, tag),
    )
    if not done.deleted:
        return DeleteResult("absent", target.site, target.repository, tag)
    await _tombstone(journal, target, tag, done.previous)
    log.info(
        "delete %s/%s:%s: cosign tag of deleted %s", target.site, target.repository, tag, image
    )
    return DeleteResult("deleted", target.site, target.repository, tag, done.previous)
