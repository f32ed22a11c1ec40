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
   bounce the target's webhook about our own delete. It is written BEFORE the
   DELETE and withdrawn only when the delete certainly did not happen (a 4xx
   refusal, or the item was absent on the first attempt): a process killed after
   the registry carried the DELETE out, or a DELETE answered 500 whose retry found
   the item gone, still leaves the record.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from replicator.journal import Journal
from replicator.registry.client import RegistryClient
from replicator.registry.errors import RegistryError
from replicator.registry.manifests import TagDeletion
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
) -> list[int]:
    """Write the `performed` tombstone ahead of its DELETE (see the module docstring)."""
    if journal is None:
        return []
    stone = await journal.tombstones.record(
        where.site, where.repository, tag=tag, digest=digest, origin="performed"
    )
    return [stone]


async def _withdraw(journal: Journal | None, ids: list[int]) -> None:
    if journal is not None:
        await journal.tombstones.retract(ids)


async def _remove_tag(
    source: DeleteSite,
    target: DeleteSite,
    tag: str,
    journal: Journal | None,
    digest: str | None,
) -> TagDeletion:
    """`delete_tag` at the target between a tombstone written first and its withdrawal
    on a definite "not deleted"; an unknown outcome (5xx, timeout) keeps it."""
    ids = await _tombstone(journal, target, tag, digest)
    try:
        done = await target.client.delete_tag(
            target.repository,
            tag,
            before_placeholder=_placeholder_hook(journal, source.site, target.site, tag),
        )
    except RegistryError as exc:
        if not exc.retryable:
            await _withdraw(journal, ids)
        raise
    if not done.maybe_deleted:
        await _withdraw(journal, ids)
    elif journal is not None and done.previous and done.previous != digest:
        await journal.tombstones.name_digest(ids, done.previous)
    return done


async def _remove_manifest(target: DeleteSite, digest: str, journal: Journal | None) -> bool:
    """Delete a manifest by digest at the target, tombstone first (as `_remove_tag`)."""
    ids = await _tombstone(journal, target, None, digest)
    try:
        deleted = await target.client.delete_manifest(target.repository, digest)
    except RegistryError as exc:
        if not exc.retryable:
            await _withdraw(journal, ids)
        raise
    if not deleted:
        await _withdraw(journal, ids)
    return deleted


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
    done = await _remove_tag(source, target, tag, journal, prune_digest)
    if not done.maybe_deleted:
        return DeleteResult("absent", target.site, target.repository, tag)
    previous = done.previous or prune_digest
    pruned = False
    if (
        prune_digest is not None
        and await source.client.head_manifest(source.repository, prune_digest) is None
    ):
        pruned = await _remove_manifest(target, prune_digest, journal)
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
    if not await _remove_manifest(target, digest, journal):
        return DeleteResult("absent", target.site, target.repository, digest)
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
    done = await _remove_tag(source, target, tag, journal, None)
    if not done.maybe_deleted:
        return DeleteResult("absent", target.site, target.repository, tag)
    log.info(
        "delete %s/%s:%s: cosign tag of deleted %s", target.site, target.repository, tag, image
    )
    return DeleteResult("deleted", target.site, target.repository, tag, done.previous)
