"""Which replication tasks a registry event creates. Pure: no I/O.

Only manifest pushes by tag, and deletes under rules that propagate them, make
work. Pulls, blob uploads and mounts are facts for the inventory and the mount
index, not work. A manifest pushed by digest alone (an index child, a referrer)
travels with the tagged manifest that references it, or with its subject's
referrers fallback tag; the periodic reconcile catches anything else.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from replicator.config import Config, Rule
from replicator.events import RegistryEvent
from replicator.journal.tasks import TaskAction, TaskSpec
from replicator.rules import rules_for, tag_passes

# distribution has no referrers API; referrers live under this tag of their subject
REFERRERS_TAG_RE = re.compile(r"sha256-[a-f0-9]{64}")


def is_referrers_tag(tag: str | None) -> bool:
    return bool(tag and REFERRERS_TAG_RE.fullmatch(tag))


def _covers_tag(rule: Rule, tag: str) -> bool:
    if is_referrers_tag(tag):
        return rule.referrers
    return tag_passes(rule.tags, tag)


def tasks_for_event(
    config: Config,
    rules: Sequence[Rule],
    event: RegistryEvent,
    trace_context: Mapping[str, str] | None = None,
) -> list[TaskSpec]:
    """The task specs an event fans out to under `rules` (the rules in force)."""
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
        if event.tag and not _covers_tag(rule, event.tag):
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
