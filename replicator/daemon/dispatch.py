"""Which replication tasks a registry event creates. Pure: no I/O.

Only manifest pushes by tag, and deletes under rules that propagate them, make
work. Whether a rule covers the event's tag is `rules.covers`, the same function
`sync` plans with; under `latest: N` it needs the source's tag list, which the
caller fetches (one listing per event, only when such a rule matches:
`needs_source_tags`). Pulls, blob uploads and mounts are facts for the inventory and the mount
index, not work. A manifest pushed by digest alone (an index child, a referrer)
travels with the tagged manifest that references it, or with its subject's
referrers fallback tag; the periodic reconcile catches anything else. A cosign tag
(`sha256-<hex>.sig/.att/.sbom`) pushed on its own (a re-signed image) is a task
like any tag; the worker copies it only where the target holds its image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

from replicator.config import Config, Rule
from replicator.events import RegistryEvent
from replicator.journal.tasks import TaskAction, TaskSpec
from replicator.rules import (
    REFERRERS_TAG_RE,
    covers,
    is_cosign_tag,
    is_referrers_tag,
    needs_tag_list,
    rules_for,
)

__all__ = [
    "REFERRERS_TAG_RE",
    "SourceTags",
    "is_referrers_tag",
    "needs_source_tags",
    "tasks_for_event",
]


class SourceTags(NamedTuple):
    """The source repository's tags and push times, for rules with `latest: N`."""

    tags: Sequence[str]
    pushed_at: Mapping[str, float]


def needs_source_tags(config: Config, rules: Sequence[Rule], event: RegistryEvent) -> bool:
    """Whether deciding this event needs the source's tag list: a tagged manifest push
    that a `latest: N` rule matches. Deletes never do (a deleted tag has no rank)."""
    if event.action != "push" or not event.is_manifest or not event.tag:
        return False
    if is_referrers_tag(event.tag) or is_cosign_tag(event.tag):
        return False  # attachments: never ranked, the tag filters do not apply
    return any(
        needs_tag_list(t.rule) for t in rules_for(config, event.site, event.repository, rules)
    )


def tasks_for_event(
    config: Config,
    rules: Sequence[Rule],
    event: RegistryEvent,
    trace_context: Mapping[str, str] | None = None,
    source: SourceTags | None = None,
) -> list[TaskSpec]:
    """The task specs an event fans out to under `rules` (the rules in force).

    `source` (the source's tags now) is required when `needs_source_tags` says so."""
    if source is None and needs_source_tags(config, rules, event):
        raise ValueError(
            f"event {event.id}: a rule with tags.latest matches {event.site}/"
            f"{event.repository}; deciding needs the source's tag list"
        )
    action: TaskAction
    if event.action == "push":
        if not event.is_manifest or not event.tag:
            return []
        action = "copy"
    elif event.action == "delete":
        if not (event.tag or event.digest):
            return []
        action = "delete"
    else:
        return []
    specs: list[TaskSpec] = []
    for target in rules_for(config, event.site, event.repository, rules):
        rule = target.rule
        if action == "delete" and not rule.deletes:
            continue
        if event.tag:
            listing = source if action == "copy" else None  # a deleted tag has no rank
            if not covers(
                rule,
                event.tag,
                listing.tags if listing else None,
                listing.pushed_at if listing else None,
            ):
                continue
        specs.append(
            TaskSpec(
                rule=rule.name,
                action=action,
                source_site=event.site,
                target_site=target.target_site,
                repository=event.repository,
                target_repository=target.target_repo,
                tag=event.tag,
                digest=event.digest,
                event_id=event.id,
                trace_context=dict(trace_context) if trace_context else None,
            )
        )
    return specs
