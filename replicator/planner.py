"""Reconcile planning: what one rule needs done at one target. Pure: no I/O.

Inputs are what was observed (source tag -> digest, target tag -> digest or
absent); the output is a list of actions. Keeping this pure lets the dry run
print exactly the plan the real run executes, and lets tests cover every
branch without a registry.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from replicator.config import Rule
from replicator.rules import cosign_tags_of, covered_tags, covers, is_cosign_tag, map_repository
from replicator.text import short_digest

ActionKind = Literal["copy", "delete", "conflict", "up-to-date"]


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    rule: str
    source_site: str
    target_site: str
    repository: str  # at the source
    target_repository: str
    tag: str
    source_digest: str | None  # None for deletes
    target_digest: str | None  # None when absent at the target
    reason: str = ""
    # a delete: the tag goes by tag; with this, its manifest too (no tag stays on it)
    prune_manifest: bool = False
    # a cosign tag deleted because its image (this digest) is deleted at the target: it runs
    # after the image's delete, and only once the image is gone there and at the source
    attached_to: str | None = None

    def describe(self) -> str:
        src = f"{self.source_site}/{self.repository}:{self.tag}"
        dst = f"{self.target_site}/{self.target_repository}:{self.tag}"
        if self.kind == "copy":
            what = (
                "new" if self.target_digest is None else f"was {short_digest(self.target_digest)}"
            )
            return f"copy     {src} -> {dst} ({short_digest(self.source_digest)}, {what})"
        if self.kind == "delete":
            manifest = ", then its manifest" if self.prune_manifest else ", manifest kept"
            return (
                f"delete   {dst} (tag{manifest}: {short_digest(self.target_digest)}; {self.reason})"
            )
        if self.kind == "conflict":
            return (
                f"conflict {dst} is {short_digest(self.target_digest)}, source has "
                f"{short_digest(self.source_digest)} (overwrite: false)"
            )
        return f"ok       {dst}"


def selected_tags(
    rule: Rule, source_tags: Mapping[str, str], pushed_at: Mapping[str, float] | None = None
) -> list[str]:
    """The source tags the rule replicates now (`rules.covered_tags`)."""
    return covered_tags(rule, list(source_tags), pushed_at)


def plan_target(
    rule: Rule,
    target_site: str,
    repository: str,
    source_tags: Mapping[str, str],
    selected: list[str],
    target_tags: Mapping[str, str | None],
    target_all_tags: Mapping[str, str] | None = None,
    written: Mapping[str, str] | None = None,
) -> list[Action]:
    """Plan one (rule, repository, target); the target repository is the rule's rename.

    `target_tags` maps each selected tag to the target's digest (None: absent).
    `target_all_tags` (every tag at the target with its digest) is needed only
    when the rule propagates deletes: a target tag the rule covers that the
    source no longer has is deleted (by tag only: its siblings stay).
    `written` maps a tag to the digest the copy writes at the target when that
    differs from the source's (a platform-filtered index); a target already
    holding it is up to date, exactly as the copy engine will find.
    """
    actions: list[Action] = []
    target_repository = map_repository(rule, repository)

    def act(kind: ActionKind, tag: str, src: str | None, dst: str | None, reason: str = "") -> None:
        actions.append(
            Action(
                kind,
                rule.name,
                rule.from_,
                target_site,
                repository,
                target_repository,
                tag,
                src,
                dst,
                reason,
            )
        )

    for tag in selected:
        src_digest = source_tags[tag]
        dst_digest = target_tags.get(tag)
        if dst_digest is not None and dst_digest in (src_digest, (written or {}).get(tag)):
            act("up-to-date", tag, src_digest, dst_digest)
        elif dst_digest is None or rule.overwrite or is_cosign_tag(tag):  # re-signed: follow
            act("copy", tag, src_digest, dst_digest)
        else:
            act("conflict", tag, src_digest, dst_digest)

    if rule.deletes and target_all_tags:
        # covered by the filters alone: a tag the source no longer holds has no rank
        gone = sorted(t for t in target_all_tags if t not in source_tags and covers(rule, t))
        staying_digests = {d for t, d in target_all_tags.items() if t not in gone}
        staying_digests |= {source_tags[t] for t in selected} | set((written or {}).values())
        # the manifest goes with the last of its tags to go, when no tag stays on it
        last_on = {target_all_tags[t]: t for t in gone}
        pruned: list[str] = []
        for tag in gone:
            digest = target_all_tags[tag]
            prune = digest not in staying_digests and last_on[digest] == tag
            if prune:
                pruned.append(digest)
            actions.append(
                Action(
                    "delete",
                    rule.name,
                    rule.from_,
                    target_site,
                    repository,
                    target_repository,
                    tag,
                    None,
                    digest,
                    "gone from the source",
                    prune_manifest=prune,
                )
            )
        # an image deleted at the target takes its cosign tags along (even ones the source
        # still holds: without their image nothing copies them again)
        for digest in pruned:
            for tag in cosign_tags_of(digest):
                if tag in target_all_tags and tag not in gone:
                    actions.append(
                        Action(
                            "delete",
                            rule.name,
                            rule.from_,
                            target_site,
                            repository,
                            target_repository,
                            tag,
                            None,
                            target_all_tags[tag],
                            f"cosign tag of {short_digest(digest)}, deleted with its image",
                            attached_to=digest,
                        )
                    )
    return actions
