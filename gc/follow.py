"""follow_source: what a replica's source holds, for the replica's retention.

A repository at a replica site is fed by the rules that list the site in `to`;
its source repository is the rule's rename undone (prefix removed, the stripped
prefix put back), checked by renaming forward again; the rules are those in force
(a failover recorded in the journal makes the promoted site the source). For each such rule we list
the source's tags (a HEAD-free listing: no pull is counted) and split them:

* held: tags the source holds and the rule covers now (`rules.covered_tags`, the
  one coverage decision sync, the event path and failover use, `latest: N`
  included): never deleted at the replica, they would come back at the next
  reconcile;
* gone: a tag the rule's filters cover that the source no longer holds was
  removed there (by its retention or by hand): the replica follows.

A tag the source still holds but the rule no longer selects (outside `latest: N`)
is neither: the replica's own keep clauses decide. A source that cannot be asked
fails the repository's GC (an error naming it) rather than guessing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from replicator.gc.policy import SourceHolds
from replicator.journal import Journal
from replicator.registry.errors import NotFound
from replicator.rules import covered_tags, covers, map_repository


def source_repositories(rule: Any, repo: str) -> list[str]:
    """The source repositories `rule` copies to `repo` (the rename undone)."""
    rename = rule.rename
    candidates = [repo]
    if rename is not None:
        if rename.prefix and not repo.startswith(rename.prefix):
            return []
        base = repo[len(rename.prefix) :] if rename.prefix else repo
        candidates = [base]
        if rename.strip_prefix:
            candidates.insert(0, rename.strip_prefix + base)
    out = []
    for c in candidates:
        try:
            if rule.matches_repository(c) and map_repository(rule, c) == repo:
                out.append(c)
        except ValueError:
            continue
    return out


async def source_holds(
    rules: Sequence[Any], pool: Any, journal: Journal | None, site: str, repo: str
) -> SourceHolds | None:
    """What the sources of `site`/`repo` hold (None: no rule replicates into it).
    `rules`: the rules in force (`sync.rules_in_force`: during a failover the promoted
    site is the source, and the lost one is never asked)."""
    held: set[str] = set()
    at_source: set[str] = set()
    feeding: list[Any] = []
    names: list[str] = []
    for rule in rules:
        if site not in rule.to:
            continue
        for src_repo in source_repositories(rule, repo):
            try:
                tags = await pool[rule.from_].list_tags(src_repo)
            except NotFound:
                tags = []
            pushed = await journal.inventory.push_times(rule.from_, src_repo) if journal else None
            held |= set(covered_tags(rule, tags, pushed))
            at_source |= set(tags)
            feeding.append(rule)
            names.append(f"{rule.from_}/{src_repo}")
    if not names:
        return None

    def gone_and_covered(tag: str) -> bool:
        # judged by the filters alone, as for any delete (`rules.covers` with no tag list)
        return tag not in at_source and any(covers(r, tag) for r in feeding)

    return SourceHolds(", ".join(names), frozenset(held), gone_and_covered)
