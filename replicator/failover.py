"""Disaster-recovery failover and failback between sites.

When the primary (the `from` of some rules) is lost, an operator promotes one
of its replicas. Before the rules are rewritten, the promoted site is brought
up to date from the other surviving replicas: one of them may have received
an image the promoted site never got. Which copy of a tag is newest is
decided from the journal (what the primary last had, what was replicated from
it and when); without that knowledge the promoted site's copy is kept and the
disagreement is reported as a conflict. The failover is then recorded in the
journal (`failovers`), so `rules_in_force` - and with it `sync` and the
daemon - follows it after any restart.

The lost site is never contacted: it is down, and a request to it could hang
for as long as its timeouts allow. Every step uses surviving sites only.

Failback is the reverse once the old primary is back. The promoted site is the
truth for the incident window:

* every tag the promoted site holds is copied to the returning site (the
  promoted site's version wins; where the returning site held that tag at a
  digest it never replicated, the conflict is reported);
* a tag the returning site holds and the promoted site does not was deleted
  during the incident only if the promoted site held it when the failover was
  recorded (`detail.held`) or a tombstone records its delete there since the
  incident began: failback deletes it at the returning site (by tag, after
  re-checking the promoted site; tombstoned), so nothing brings it back - unless
  another rule failed back with it (overlapping rules, one renaming) still holds that
  tag at the promoted site under its own name: then it is a conflict, deleted nowhere. A
  delete before the incident does not count: the old primary may have re-pushed
  the tag since, and that write is not lost;
* otherwise it is a tag the old primary took and never replicated: failback
  copies it to every target of the rule;
* a tag the promoted site holds that the returning site deleted before the incident
  (a tombstone there at or before `started_at`, later than anything the journal knows
  of the promoted site's digest, and no push of it at the promoted site since) is a
  delete that had not propagated when the primary failed: it is not copied back.
  Under `deletes: true` failback deletes it at the promoted site (after re-checking
  the returning site lacks it; tombstoned), as the daemon would have; otherwise it is
  reported as a conflict and left where it is.

Then the failover ends. `failback --dry-run` prints this whole plan.

A chain of failovers (p lost to a, then a lost to b) fails back from its end: `failback
--site a` plans with the rules a is the source of once only its own failover ends
(p's rule as a->[...], `returning_rules`), so b's incident reaches a; `failback --site
p` is refused until then (`refuse_out_of_order`), and then plans from a.

Under `latest: N`, only the N newest tags (over every survivor) are caught up.
A tag tombstoned (deleted) at the lost primary or the promoted site after the
replica's version was known is not caught up: that delete had not reached every
replica yet, and catching up would undo it.

Rules with `rename` fail over when the rename can be inverted (prefix added
and/or stripped, every selected repository carrying the stripped prefix): the
rewritten rule speaks the target names (`rules.target_view`) and failback maps
them back (`rules.inverse_rename`). Others are refused, naming the rule.

Pure decisions (`lost_site_for`, `refusals`, `choose_digest`, `_decide`,
`deleted_during_incident`, `returning_decisions`, `unpropagated_delete`) are separate
from the I/O so they can be tested alone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

from replicator.aio import bounded_gather
from replicator.clients import ClientPool
from replicator.config import Config, Rule, TagFilter
from replicator.copy import CopyEngine, CopyOptions
from replicator.deletes import DeleteSite, delete_tag
from replicator.errors import UsageError
from replicator.journal import Failover, Journal, Task
from replicator.manifest import Descriptor
from replicator.registry.client import RegistryClient
from replicator.registry.errors import RegistryError
from replicator.rules import (
    covered_tags,
    covers,
    effective_rules,
    inverse_rename,
    map_repository,
    rename_ambiguity,
    target_view,
)
from replicator.sync import Reconciler, SyncReport, active_failovers
from replicator.task_scope import out_of_scope
from replicator.text import short_digest

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- pure decisions


def lost_site_for(rules: Sequence[Rule], promoted: str, lost: str | None = None) -> str:
    """The lost primary: `lost` when given, else the one `from` of the rules into `promoted`."""
    if lost is not None:
        if lost == promoted:
            raise UsageError(f"--lost and --promote name the same site {lost!r}")
        if not any(r.from_ == lost for r in rules):
            raise UsageError(
                f"no rule in force replicates from {lost!r}; nothing to fail over "
                f"(sources: {', '.join(sorted({r.from_ for r in rules})) or '-'})"
            )
        return lost
    sources = sorted({r.from_ for r in rules if promoted in r.to})
    if not sources:
        raise UsageError(
            f"no rule in force replicates to {promoted!r}, so the lost site cannot "
            "be inferred; give --lost SITE"
        )
    if len(sources) > 1:
        raise UsageError(
            f"rules replicate to {promoted!r} from several sites "
            f"({', '.join(sources)}); say which one is lost with --lost SITE"
        )
    return sources[0]


def refusals(rules: Sequence[Rule], lost: str, promoted: str) -> list[str]:
    """Why this failover cannot be done safely (empty: it can). Only what is really
    ambiguous is refused: a rule from the lost site whose rename cannot be inverted
    (catch-up and failback must map the target names back to source names)."""
    problems = []
    for rule in rules:
        if rule.from_ != lost:
            continue
        why = rename_ambiguity(rule)
        if why is not None:
            problems.append(
                f"{why}; {promoted!r} holds those repositories only under the target "
                "names - make every repository glob start with the stripped prefix, or "
                "fail over by hand"
            )
    return problems


def choose_digest(candidates: Iterable[str], knowledge: Iterable[tuple[float, str]]) -> str | None:
    """The candidate digest the journal knows most recently as the primary's, or None.

    `knowledge` is (time, digest) pairs: when the primary was seen holding the
    tag at that digest (inventory), and when that digest was replicated from
    the primary to a site holding it (`replicated`).
    """
    wanted = set(candidates)
    best: tuple[float, str] | None = None
    for at, digest in knowledge:
        if digest in wanted and (best is None or (at, digest) > best):
            best = (at, digest)
    return best[1] if best else None


# ---------------------------------------------------------------------------- reports


@dataclass(frozen=True)
class CatchUp:
    """One tag copied (or to copy) from a surviving replica to the promoted site."""

    rule: str
    repository: str
    tag: str
    from_site: str
    digest: str
    replaces: str | None  # the promoted site's digest, None when it lacked the tag
    reason: str
    promoted_repository: str | None = None  # when the promoted site names it differently

    @property
    def at_promoted(self) -> str:
        return self.promoted_repository or self.repository

    def describe(self, promoted: str) -> str:
        was = "new" if self.replaces is None else f"was {short_digest(self.replaces)}"
        return (
            f"copy     {self.from_site}/{self.repository}:{self.tag} -> "
            f"{promoted}/{self.at_promoted}:{self.tag} ({short_digest(self.digest)}, {was}; "
            f"{self.reason})"
        )


@dataclass(frozen=True)
class Conflict:
    rule: str
    repository: str
    tag: str
    digests: dict[str, str | None]  # site -> digest
    kept: str | None
    reason: str

    def describe(self) -> str:
        seen = ", ".join(f"{s}={short_digest(d)}" for s, d in self.digests.items())
        return f"conflict {self.repository}:{self.tag}: {seen}; {self.reason}"


@dataclass
class FailoverReport:
    lost: str
    promoted: str
    dry_run: bool
    rules: list[dict] = field(default_factory=list)  # before/after per affected rule
    copies: list[CatchUp] = field(default_factory=list)
    conflicts: list[Conflict] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    recorded: bool = False
    failover_id: int | None = None
    cancelled: list[str] = field(default_factory=list)  # queued tasks the new rules forbid

    def as_dict(self) -> dict:
        return {
            "lost": self.lost,
            "promoted": self.promoted,
            "dry_run": self.dry_run,
            "rules": self.rules,
            "copies": [asdict(c) for c in self.copies],
            "conflicts": [asdict(c) for c in self.conflicts],
            "failures": self.failures,
            "recorded": self.recorded,
            "failover_id": self.failover_id,
            "cancelled_tasks": self.cancelled,
        }


@dataclass
class FailbackReport:
    site: str
    dry_run: bool
    sources: dict[str, str] = field(default_factory=dict)  # rule -> site synced from
    sync: SyncReport | None = None  # the promoted site's tags copied back
    items: list[FailbackItem] = field(default_factory=list)  # deletes, spreads, conflicts
    failures: list[str] = field(default_factory=list)
    ended: list[int] = field(default_factory=list)  # failover ids made inactive
    # the rules failed back: configured, rewritten by the failovers that stay in force
    rules_used: list[Rule] = field(default_factory=list)

    def plan(self) -> list[str]:
        """Every change, one line each: the same list for the dry run and the real run."""
        lines = (
            [a.describe() for a in self.sync.actions if a.kind != "up-to-date"] if self.sync else []
        )
        return lines + [i.describe(self.site) for i in self.items]

    def as_dict(self) -> dict:
        sync = self.sync
        counts: dict[str, object] = dict(sync.counts()) if sync else {}
        kinds = [i.kind for i in self.items]
        counts["planned_deletes"] = kinds.count("delete")
        counts["planned_spread"] = kinds.count("spread")
        counts["failback_conflicts"] = kinds.count("conflict")
        return {
            "site": self.site,
            "dry_run": self.dry_run,
            "sources": self.sources,
            "counts": counts,
            "plan": self.plan(),
            "items": [asdict(i) for i in self.items],
            "failures": self.failures,
            "ended_failovers": self.ended,
        }


def _rule_summary(before: Rule, after: Rule | None) -> dict:
    return {
        "name": before.name,
        "from": before.from_,
        "to": list(before.to),
        "new_from": after.from_ if after else None,
        "new_to": list(after.to) if after else [],
        "dropped": after is None,
    }


# ---------------------------------------------------------------------------- failover


async def _in_force(config: Config, journal: Journal) -> tuple[list[tuple[str, str]], list[Rule]]:
    failovers = await active_failovers(journal)
    return failovers, effective_rules(config, failovers)


@dataclass(frozen=True)
class FailoverRequest:
    """What the operator asked for: promote `promoted` in place of `lost` (None: the
    one source of the rules into `promoted`)."""

    promoted: str
    lost: str | None = None
    dry_run: bool = False
    force: bool = False  # record the failover even when some catch-up copies failed
    parallel: int = 16


async def failover(
    config: Config,
    journal: Journal,
    pool: ClientPool,
    engine: CopyEngine,
    request: FailoverRequest,
) -> FailoverReport:
    """Promote `request.promoted` in place of the lost primary; see the module docstring.

    Raises UsageError (nothing changed) for a bad request. Catch-up failures are
    listed in the report; the failover is then recorded only with `force`.
    """
    promoted, lost, dry_run = request.promoted, request.lost, request.dry_run
    config.site(promoted)  # raises ConfigError naming the unknown site
    if lost is not None:
        config.site(lost)
    failovers, rules = await _in_force(config, journal)
    lost_already = {lo: p for lo, p in failovers}
    if promoted in lost_already:
        raise UsageError(
            f"{promoted!r} is itself failed over to {lost_already[promoted]!r}; "
            f"run failback --site {promoted} first"
        )
    if lost in lost_already:
        raise UsageError(
            f"{lost!r} is already failed over: {lost_already[lost]!r} was promoted in its place"
        )
    lost = lost_site_for(rules, promoted, lost)
    problems = refusals(rules, lost, promoted)
    if problems:
        raise UsageError("failover refused: " + "; ".join(problems))

    affected = [r for r in rules if r.from_ == lost]
    after = {r.name: r for r in effective_rules(config, [*failovers, (lost, promoted)])}
    report = FailoverReport(
        lost, promoted, dry_run, rules=[_rule_summary(r, after.get(r.name)) for r in affected]
    )

    await _catch_up(journal, pool, engine, affected, lost, promoted, report, request.parallel)
    if dry_run:
        pending = await _out_of_scope_tasks(journal, list(after.values()), lost, promoted, None)
        report.cancelled = [why for _, why in pending]
        return report
    if report.failures and not request.force:
        return report
    held: dict[str, list[str]] | None
    try:
        held = await _held(pool[promoted], affected, promoted)
    except RegistryError as exc:
        report.failures.append(f"listing what {promoted} holds: {exc}")
        if not request.force:
            return report
        held = None  # unknown, not empty: failback falls back on the journal
    detail = {
        "held": held,  # failback: what the promoted site held when the incident began
        "rules": report.rules,
        "catch_up": {
            "copied": [asdict(c) for c in report.copies],
            "conflicts": [asdict(c) for c in report.conflicts],
            "failures": report.failures,
        },
    }
    report.failover_id = await journal.failovers.record(lost, promoted, detail)
    report.recorded = True
    await _cancel_queued(journal, list(after.values()), lost, promoted, report)
    log.warning(
        "failover recorded: %s promoted in place of %s (%d rules rewritten, %d catch-up copies)",
        promoted,
        lost,
        len(affected),
        len(report.copies),
    )
    return report


async def _out_of_scope_tasks(
    journal: Journal, rules: Sequence[Rule], lost: str, promoted: str, failover_id: int | None
) -> list[tuple[Task, str]]:
    """Queued (pending) tasks the rules in force after this failover forbid, with why:
    every task from the lost site (its rules now come from the promoted site) and every
    task to the lost site; tasks to the promoted site from elsewhere under a rule
    the failover did not move are kept."""
    failovers = await journal.failovers.active(with_detail=False)
    if failover_id is None:  # the dry run: as if recorded
        failovers.append(Failover(0, lost, promoted, 0.0))
    queued = await journal.task_admin.list_tasks(["pending", "failed"], limit=-1)
    found = [(v.task, out_of_scope(v.task, rules, failovers)) for v in queued]
    return [(task, why) for task, why in found if why is not None]


async def _cancel_queued(
    journal: Journal, rules: Sequence[Rule], lost: str, promoted: str, report: FailoverReport
) -> None:
    """Cancel the queued tasks the new rules forbid, once the failover is recorded (the
    daemon cancels any it leases later by the same test, `task_scope.out_of_scope`)."""
    stale = await _out_of_scope_tasks(journal, rules, lost, promoted, report.failover_id)
    admin = journal.task_admin
    for task, why in stale:  # one transaction each: every task keeps its own reason
        done = await admin.cancel([task.id], actor=f"failover #{report.failover_id}", reason=why)
        if done[0].outcome == "cancelled":  # not if a worker leased it meanwhile
            report.cancelled.append(why)
    if report.cancelled:
        log.warning("failover: %d queued tasks cancelled", len(report.cancelled))


async def _held(
    client: RegistryClient, rules: Sequence[Rule], promoted: str
) -> dict[str, list[str]]:
    """repository -> tags the promoted site holds of `rules` after catch-up: failback's
    record of what was there when the incident began (a tag missing later was deleted
    during the incident)."""
    views = [target_view(r) if promoted in r.to else r for r in rules]
    held: dict[str, list[str]] = {}
    for repo in await client.catalog():
        if any(v.matches_repository(repo) for v in views):
            held[repo] = sorted(await client.list_tags(repo))
    return held


async def _catch_up(
    journal: Journal,
    pool: ClientPool,
    engine: CopyEngine,
    rules: Sequence[Rule],
    lost: str,
    promoted: str,
    report: FailoverReport,
    parallel: int,
) -> None:
    """Compare the promoted site with every other surviving replica; copy what it lacks."""
    lookups = asyncio.Semaphore(parallel)
    site = pool[promoted]
    seen: set[tuple[str, str]] = set()  # (repo, tag) already decided by an earlier rule
    to_promoted: dict[str, Callable[[str], str]] = {}  # rule -> replica name -> promoted's

    async def head(client, repo: str, tag: str) -> str | None:
        async with lookups:
            desc = await client.head_manifest(repo, tag)
        return desc.digest if desc else None

    for configured in rules:
        # replicas hold the rule's target names; `back` maps them to source names
        rule = target_view(configured)
        at_lost = _name_mapper(configured)
        # a promoted target holds the target names; otherwise it takes the source names
        at_promoted = (lambda repo: repo) if promoted in configured.to else at_lost
        to_promoted[rule.name] = at_promoted
        replicas = [t for t in rule.to if t not in (lost, promoted)]
        if not replicas:
            continue
        # What each replica holds of this rule: repo -> tag -> digest.
        holdings: dict[str, dict[str, dict[str, str]]] = {}
        for replica in replicas:
            client = pool[replica]
            try:
                repos = [r for r in await client.catalog() if rule.matches_repository(r)]
                for repo in repos:
                    tags = [t for t in await client.list_tags(repo) if covers(rule, t)]
                    digests = await asyncio.gather(*(head(client, repo, t) for t in tags))
                    for tag, digest in zip(tags, digests, strict=True):
                        if digest:
                            holdings.setdefault(repo, {}).setdefault(tag, {})[replica] = digest
            except RegistryError as exc:
                report.failures.append(f"rule {rule.name}: reading replica {replica}: {exc}")
        if rule.tags is not None and rule.tags.latest is not None:
            try:
                await _keep_latest(journal, site, rule, lost, holdings, (at_promoted, at_lost))
            except RegistryError as exc:
                report.failures.append(f"rule {rule.name}: reading promoted site {promoted}: {exc}")
                continue
        work = [
            (repo, tag, by_site)
            for repo, tags in sorted(holdings.items())
            for tag, by_site in sorted(tags.items())
            if (repo, tag) not in seen
        ]
        seen.update((repo, tag) for repo, tag, _ in work)
        try:
            mine = await asyncio.gather(
                *(head(site, at_promoted(repo), tag) for repo, tag, _ in work)
            )
        except RegistryError as exc:
            report.failures.append(f"rule {rule.name}: reading promoted site {promoted}: {exc}")
            continue
        knowledge = await _knowledge(journal, lost, {at_lost(r) for r, _, _ in work})
        stones = await _deletes_seen(journal, (lost, at_lost), (promoted, at_promoted), work)
        for (repo, tag, by_site), own in zip(work, mine, strict=True):
            when = stones.get((repo, tag))
            if own is None and deleted_since(when, knowledge.get(at_lost(repo), tag), by_site):
                report.conflicts.append(
                    Conflict(
                        rule.name,
                        repo,
                        tag,
                        {promoted: own, **dict(by_site)},
                        None,
                        "deleted (journal tombstone) after the replicas got it; not caught up",
                    )
                )
                continue
            decision = _decide(
                rule, repo, tag, own, by_site, replicas, promoted, knowledge.get(at_lost(repo), tag)
            )
            for item in decision if isinstance(decision, list) else [decision]:
                if isinstance(item, Conflict):
                    report.conflicts.append(item)
                elif item is not None:
                    if at_promoted(repo) != repo:
                        item = replace(item, promoted_repository=at_promoted(repo))
                    report.copies.append(item)
    if report.dry_run or not report.copies:
        return
    rules_by_name = {r.name: r for r in rules}

    async def run(copy: CatchUp) -> None:
        rule = rules_by_name[copy.rule]
        options = CopyOptions(
            platforms=rule.platform_list or None, referrers=rule.referrers, overwrite=True
        )
        current = Descriptor("", copy.replaces, 0) if copy.replaces else None
        result = await engine.copy(
            pool[copy.from_site],
            copy.repository,
            copy.digest,
            site,
            copy.at_promoted,
            tag=copy.tag,
            options=options,
            target_current=current,
        )
        if result.status == "failed":
            report.failures.append(f"catch-up {result.source} -> {result.target}: {result.error}")
        elif result.digest:
            await journal.ledger.record(
                promoted, copy.at_promoted, result.digest, copy.from_site, copy.tag
            )

    await bounded_gather((run(c) for c in report.copies), parallel)


def _name_mapper(rule: Rule) -> Callable[[str], str]:
    """Target name -> source name for a renaming rule (identity without rename)."""
    if rule.rename is None:
        return lambda repo: repo
    back = rule.model_copy(update={"rename": inverse_rename(rule)})
    return lambda repo: map_repository(back, repo)


async def _keep_latest(
    journal: Journal,
    promoted: RegistryClient,
    rule: Rule,
    lost: str,
    holdings: dict[str, dict[str, dict[str, str]]],
    names: tuple[Callable[[str], str], Callable[[str], str]],
) -> None:
    """Under `latest: N` only the N newest tags are the rule's: replicas keep older ones
    (replication adds, retention removes), and those are not caught up. Newest is
    ranked over the tags of every survivor, the promoted site's included, by version
    or else by the lost primary's push times in the journal, as `sync` ranks them."""
    at_promoted, at_lost = names
    for repo, tags in holdings.items():
        own = await promoted.list_tags(at_promoted(repo))
        pushed_at = await journal.inventory.push_times(lost, at_lost(repo))
        keep = set(covered_tags(rule, sorted({*tags, *own}), pushed_at))
        for tag in [t for t in tags if t not in keep]:
            del tags[tag]


def _decide(
    rule: Rule,
    repo: str,
    tag: str,
    own: str | None,
    by_site: Mapping[str, str],
    replicas: Sequence[str],
    promoted: str,
    knowledge: Sequence[tuple[float, str]],
) -> CatchUp | Conflict | list[CatchUp | Conflict] | None:
    """What to do about one tag that at least one replica holds."""
    others = {d for d in by_site.values() if d != own}
    if not others:
        return None  # everyone agrees (or only we have it)
    candidates = others | ({own} if own else set())
    digests = {promoted: own, **{s: by_site.get(s) for s in replicas}}

    def source_of(digest: str) -> str:
        return next(s for s in replicas if by_site.get(s) == digest)

    if own is None and len(others) == 1:
        digest = next(iter(others))
        return CatchUp(
            rule.name, repo, tag, source_of(digest), digest, None, "missing on the promoted site"
        )
    winner = choose_digest(candidates, knowledge)
    if winner is None:
        if own is None:
            # Replicas disagree and nothing says which is newer: take the first, say so.
            digest = by_site[next(s for s in replicas if s in by_site)]
            return [
                Conflict(
                    rule.name,
                    repo,
                    tag,
                    digests,
                    digest,
                    f"replicas disagree and the journal does not say which is "
                    f"newer; copied {source_of(digest)}'s",
                ),
                CatchUp(
                    rule.name,
                    repo,
                    tag,
                    source_of(digest),
                    digest,
                    None,
                    "missing on the promoted site; replicas disagree",
                ),
            ]
        return Conflict(
            rule.name,
            repo,
            tag,
            digests,
            own,
            "the journal does not say which is newer; kept the promoted site's",
        )
    if winner == own:
        return None
    return CatchUp(
        rule.name,
        repo,
        tag,
        source_of(winner),
        winner,
        own,
        "newer per the journal" if own else "missing on the promoted site",
    )


def deleted_since(
    tombstone_at: float | None,
    knowledge: Sequence[tuple[float, str]],
    by_site: Mapping[str, str],
) -> bool:
    """Whether a tag the promoted site lacks was deleted after the replicas' version was
    known (pushed at or replicated from the lost primary): a delete not yet propagated
    everywhere, which catch-up must not undo. Without a tombstone, never."""
    if tombstone_at is None:
        return False
    held = set(by_site.values())
    known = [at for at, digest in knowledge if digest in held]
    return not known or tombstone_at > max(known)


async def _deletes_seen(
    journal: Journal,
    lost: tuple[str, Callable[[str], str]],
    promoted: tuple[str, Callable[[str], str]],
    work: Sequence[tuple[str, str, Mapping[str, str]]],
) -> dict[tuple[str, str], float]:
    """(replica repository, tag) -> the latest tombstone of that tag at the lost primary
    or at the promoted site (under their own names)."""
    latest: dict[tuple[str, str], float] = {}
    for repo in {r for r, _, _ in work}:
        for site, name in (lost, promoted):
            for stone in await journal.tombstones.at_site(site, name(repo)):
                if stone.tag is not None:
                    key = (repo, stone.tag)
                    latest[key] = max(latest.get(key, stone.at), stone.at)
    return latest


class _Knowledge:
    """What the journal knows about the lost primary's tags, per repository."""

    def __init__(self) -> None:
        self.by_tag: dict[tuple[str, str], list[tuple[float, str]]] = {}
        self.digest_only: dict[str, list[tuple[float, str]]] = {}

    def get(self, repo: str, tag: str) -> list[tuple[float, str]]:
        return self.by_tag.get((repo, tag), []) + self.digest_only.get(repo, [])


async def _knowledge(journal: Journal, lost: str, repos: set[str]) -> _Knowledge:
    """(time, digest) pairs per tag: the primary seen holding the tag at that digest
    (inventory), or that digest replicated from the primary at that time. A
    `replicated` row that names its tags counts for those tags only; one that
    does not counts for any tag of its repository at that digest.
    """
    known = _Knowledge()
    for repo in repos:
        for tag, digest, at in await journal.inventory.sightings(lost, repo):
            known.by_tag.setdefault((repo, tag), []).append((at, digest))
        for entry in await journal.ledger.from_source(lost, repo):
            if entry.tags:
                for tag in entry.tags:
                    known.by_tag.setdefault((repo, tag), []).append((entry.at, entry.digest))
            else:
                known.digest_only.setdefault(repo, []).append((entry.at, entry.digest))
    return known


# ---------------------------------------------------------------------------- failback


@dataclass(frozen=True)
class FailbackItem:
    """One thing failback does (or would do) beyond copying the promoted site's tags back.

    `delete`: the tag was deleted at the promoted site during the incident; it goes
    from the returning site. `spread`: the returning site took the tag before it
    failed and never replicated it; it is copied to `site`. `conflict`: reported,
    nothing done (the promoted site's write wins, or a target holds the tag otherwise).
    """

    kind: Literal["delete", "spread", "conflict"]
    rule: str
    site: str  # where it happens
    repository: str  # the repository at `site`
    tag: str
    digest: str | None
    reason: str
    from_repository: str | None = None  # spread: the returning site's repository

    def describe(self, returning: str) -> str:
        dst = f"{self.site}/{self.repository}:{self.tag}"
        short = short_digest(self.digest)
        if self.kind == "delete":
            return f"delete   {dst} ({short}; {self.reason})"
        if self.kind == "spread":
            return (
                f"copy     {returning}/{self.from_repository}:{self.tag} -> {dst} "
                f"({short}, new; {self.reason})"
            )
        return f"conflict {dst} ({short}; {self.reason})"


def deleted_during_incident(
    held_at_start: Iterable[str],
    promoted_now: Iterable[str],
    tombstoned_since: Iterable[str],
) -> set[str]:
    """Tags the promoted site deleted during the incident. Pure.

    Held when the incident began and gone now, or tombstoned there since it began (pushed
    and deleted during the incident). Nothing else: a tag deleted before the incident and
    re-pushed at the old primary is the old primary's unreplicated write, and a tag the
    promoted site holds now is never an incident delete."""
    return (set(held_at_start) | set(tombstoned_since)) - set(promoted_now)


def returning_decisions(
    rule: Rule,
    returning_tags: Mapping[str, str],
    promoted_tags: Iterable[str],
    deleted_at_promoted: Iterable[str],
    pushed_at: Mapping[str, float] | None = None,
) -> tuple[list[str], list[str]]:
    """(tags to delete at the returning site, tags to spread from it) for one repository.

    Pure. Only tags the returning site holds and the promoted site does not are
    decided here: deleted when the promoted site deleted them during the incident
    (`deleted_at_promoted`, see `deleted_during_incident`); otherwise the old
    primary's unreplicated tags, spread when the rule covers them now."""
    promoted = set(promoted_tags)
    deleted = set(deleted_at_promoted)
    missing = sorted(t for t in returning_tags if t not in promoted and covers(rule, t))
    deletes = [t for t in missing if t in deleted]
    everything = [*returning_tags, *promoted]
    spread = [t for t in missing if t not in deleted and covers(rule, t, everything, pushed_at)]
    return deletes, spread


def unpropagated_delete(
    tombstone_at: float | None,
    started_at: float,
    known: Sequence[tuple[float, str]],
    digest: str,
    pushed_at_promoted: float | None,
) -> bool:
    """Whether the promoted site's `digest` of a tag the returning site lacks is one the
    returning site deleted before the incident, a delete that never reached the
    promoted site (so failback must not copy it back). Pure.

    Yes when the returning site's latest tombstone of the tag is at or before the
    incident began and later than every time the journal knows `digest` there
    (`known`: seen at, or replicated from, the returning site), and the promoted site
    took no push of it since. A digest the journal never saw at the returning site is
    the promoted site's own write: never."""
    if tombstone_at is None or tombstone_at > started_at:
        return False
    times = [at for at, d in known if d == digest]
    if not times or tombstone_at < max(times):
        return False
    return pushed_at_promoted is None or pushed_at_promoted <= tombstone_at


def refuse_out_of_order(failovers: Sequence[Failover], site: str) -> None:
    """Raise UsageError when `site`'s promoted site is itself failed over (a chain: p lost
    to a, then a lost to b): a is to fail back first (its plan brings b's incident to
    a), then p from a. Failing p back first would end the chain's first link with a
    still lost, and what a took as the source before it failed would have no plan."""
    for mine in (f for f in failovers if f.lost_site == site):
        for later in failovers:
            if later.lost_site == mine.promoted_site:
                raise UsageError(
                    f"failback of {site!r} refused: {mine.promoted_site!r}, promoted in its "
                    f"place by failover #{mine.id}, is itself failed over to "
                    f"{later.promoted_site!r} (failover #{later.id}); fail back the last "
                    f"failover first: failback --site {mine.promoted_site}, then "
                    f"failback --site {site}"
                )


def returning_rules(config: Config, chain: Sequence[tuple[str, str]], site: str) -> list[Rule]:
    """The rules `site` is the source of once its failovers end: the configured rules
    rewritten by every other failover in force. In a chain (p lost to a, then a lost to
    b) failing a back plans with p's rule as a->[...] (a stands in for p again), so b's
    incident writes and deletes reach a before a is the source; a site still lost is no
    target of the plan (it cannot be written, and its own failback catches it up)."""
    others = [(lost, promoted) for lost, promoted in chain if lost != site]
    return [r for r in effective_rules(config, others) if r.from_ == site]


def _held_back(rule: Rule, held_back: Mapping[str, Iterable[str]]) -> list[Rule]:
    """`rule` (a failback sync rule) less the tags held back per repository (the
    promoted site's names): the rest as before, and each such repository alone with
    those tags excluded, so neither the dry nor the real run plans to copy them."""
    if not held_back:
        return [rule]
    repos = sorted(held_back)
    rest = rule.model_copy(update={"exclude_repositories": [*rule.exclude_repositories, *repos]})
    tags = rule.tags or TagFilter()
    narrowed = [
        rule.model_copy(
            update={
                "repositories": [repo],
                "exclude_repositories": [],
                "tags": tags.model_copy(
                    update={"exclude": [*tags.exclude, *sorted(held_back[repo])]}
                ),
            }
        )
        for repo in repos
    ]
    return [rest, *narrowed]


def _failback_rule(configured: Rule, source: str, site: str) -> Rule:
    """The rule that copies the promoted site's tags back to `site`: over the names the
    promoted site holds, renamed back to `site`'s names."""
    if source in configured.to and configured.rename is not None:
        view = target_view(configured).model_copy(update={"rename": inverse_rename(configured)})
    else:  # the promoted site holds the source names (catch-up brought them there)
        view = configured.model_copy(update={"rename": None})
    return view.model_copy(
        update={
            "from_": source,
            "to": [site],
            "overwrite": True,
            "deletes": False,
            "immutable_tags": [],
        }
    )


async def failback(
    config: Config,
    journal: Journal,
    pool: ClientPool,
    engine: CopyEngine,
    site: str,
    *,
    dry_run: bool = False,
    parallel: int = 16,
) -> FailbackReport:
    """Bring `site` (a recovered lost primary) up to date, then end its failover(s);
    the semantics are in the module docstring."""
    config.site(site)
    failovers = await journal.failovers.active()
    mine = [f for f in failovers if f.lost_site == site]
    if not mine:
        active = ", ".join(f"{f.lost_site} -> {f.promoted_site}" for f in failovers) or "none"
        raise UsageError(f"no active failover of {site!r} (active failovers: {active})")
    refuse_out_of_order(failovers, site)
    chain = [(f.lost_site, f.promoted_site) for f in failovers]
    report = FailbackReport(site, dry_run)
    sync_rules: list[Rule] = []
    returning: list[tuple[Rule, str]] = []
    for rule in returning_rules(config, chain, site):
        source = _current_source(rule.from_, chain)
        if source == site:
            continue
        report.sources[rule.name] = source
        returning.append((rule, source))
        report.rules_used.append(rule)
    incident = mine[0]  # failover refuses a second failover of the same site
    for rule, source in returning:
        held_back: dict[str, set[str]] = {}
        try:
            await _plan_returning(journal, pool, rule, source, site, report, incident)
            held_back = await _plan_unpropagated(
                journal, pool, rule, source, site, report, incident
            )
        except RegistryError as exc:
            report.failures.append(f"rule {rule.name}: failback plan: {exc}")
        sync_rules += _held_back(_failback_rule(rule, source, site), held_back)
    if sync_rules:
        # the dry run ranks `latest: N` by the journal's push times as the real run does
        reconciler = Reconciler(config, journal, pool, engine, parallel=parallel, read_only=dry_run)
        report.sync = await reconciler.run(rules=sync_rules, dry_run=dry_run)
        report.failures.extend(report.sync.failures)
        await _report_overwritten(journal, site, report)
    if dry_run or report.failures:
        return report
    await _apply_returning(journal, pool, engine, site, report, parallel)
    if report.failures:
        return report
    ids = [f.id for f in mine]
    await journal.failovers.end(ids)
    report.ended = ids
    log.warning("failback: %s is the source of its rules again (failovers %s ended)", site, ids)
    return report


async def _plan_returning(
    journal: Journal,
    pool: ClientPool,
    rule: Rule,
    source: str,
    site: str,
    report: FailbackReport,
    incident: Failover,
) -> None:
    """Decide the tags `site` holds that `source` (the promoted site) does not.

    Deleted during the incident (`deleted_during_incident`): held at `source` when the
    failover was recorded (`held`) and gone now, or tombstoned at `source` since the
    incident began. When `held` does not describe `source` (a failover recorded before
    `held` existed, or a chain of failovers ending elsewhere), the ledger and inventory
    stand in for it, less any tag whose delete there before the incident is recorded."""
    back, there = pool[site], pool[source]
    at_promoted = (lambda r: map_repository(rule, r)) if source in rule.to else (lambda r: r)
    record: dict[str, list[str]] | None = incident.detail.get("held")
    if incident.promoted_site != source:
        record = None
    for repo in [r for r in await back.catalog() if rule.matches_repository(r)]:
        theirs_repo = at_promoted(repo)
        listed = await back.list_tags(repo)
        theirs = await there.list_tags(theirs_repo)
        stones = await journal.tombstones.at_site(source, theirs_repo)
        since = {s.tag for s in stones if s.tag and s.at >= incident.started_at}
        if record is not None:
            at_start = set(record.get(theirs_repo, []))
        else:
            at_start = await _held_per_journal(journal, source, theirs_repo)
            at_start -= {s.tag for s in stones if s.tag and s.at < incident.started_at}
        deleted = deleted_during_incident(at_start, theirs, since)
        pushed_at = await journal.inventory.push_times(site, repo)
        candidates = {t: "" for t in listed if t not in theirs}
        deletes, spread = returning_decisions(rule, candidates, theirs, deleted, pushed_at)
        for tag in deletes:
            head = await back.head_manifest(repo, tag)
            kept = await _still_held(pool, report, rule, repo, tag)
            report.items.append(
                FailbackItem(
                    "delete" if kept is None else "conflict",
                    rule.name,
                    site,
                    repo,
                    tag,
                    head.digest if head else None,
                    f"deleted at {source} during the incident"
                    if kept is None
                    else f"deleted at {source} as {theirs_repo}:{tag} during the incident, "
                    f"but {kept}; kept",
                )
            )
        for tag in spread:
            head = await back.head_manifest(repo, tag)
            if head is None:
                continue
            for target in rule.to:
                target_repo = map_repository(rule, repo)
                held = await pool[target].head_manifest(target_repo, tag)
                if held is not None and held.digest == head.digest:
                    continue
                kind: Literal["spread", "conflict"] = "spread" if held is None else "conflict"
                reason = (
                    f"{site} took it before it failed and never replicated it"
                    if held is None
                    else f"{target} holds it at {short_digest(held.digest)}; left as it is"
                )
                report.items.append(
                    FailbackItem(
                        kind, rule.name, target, target_repo, tag, head.digest, reason, repo
                    )
                )


async def _still_held(
    pool: ClientPool, report: FailbackReport, rule: Rule, repository: str, tag: str
) -> str | None:
    """Whether another rule failed back with `rule` still holds `repository:tag` (the
    returning site's names) at its promoted site under its own name, and where: then a
    delete under `rule`'s name there is no delete of the source tag (two rules, one
    renaming, replicate the same repository), and deleting it at the returning site
    would let the next sync delete the other name too. None: no rule holds it."""
    for other in report.rules_used:
        if other.name == rule.name or not other.matches_repository(repository):
            continue
        if not covers(other, tag):
            continue
        source = report.sources[other.name]
        name = map_repository(other, repository) if source in other.to else repository
        if await pool[source].head_manifest(name, tag) is not None:
            return f"{source} still holds it as {name}:{tag} (rule {other.name})"
    return None


async def _plan_unpropagated(
    journal: Journal,
    pool: ClientPool,
    rule: Rule,
    source: str,
    site: str,
    report: FailbackReport,
    incident: Failover,
) -> dict[str, set[str]]:
    """Tags `source` (the promoted site) holds that `site` deleted before the incident and
    whose delete never reached `source` (`unpropagated_delete`): held back from the copy
    back (returned per repository, `source`'s names) and deleted at `source` under
    `deletes: true`, else reported as conflicts. A tag `source` did not hold when the
    failover was recorded (`held`) is its own write during the incident, never held
    back; one it held then and rewrote identically since, with no webhook seen, cannot
    be told from the stale replica and goes too."""
    back, there = pool[site], pool[source]
    at_promoted = (lambda r: map_repository(rule, r)) if source in rule.to else (lambda r: r)
    record: dict[str, list[str]] | None = incident.detail.get("held")
    if incident.promoted_site != source:
        record = None
    latest: dict[tuple[str, str], tuple[float, str | None]] = {}
    for stone in await journal.tombstones.at_site(site):
        if stone.tag is not None and rule.matches_repository(stone.repository):
            key = (stone.repository, stone.tag)
            if key not in latest or stone.at >= latest[key][0]:
                latest[key] = (stone.at, stone.digest)
    held_back: dict[str, set[str]] = {}
    for (repo, tag), (stone_at, deleted) in sorted(latest.items()):
        if stone_at > incident.started_at or not covers(rule, tag):
            continue
        theirs_repo = at_promoted(repo)
        if record is not None and tag not in record.get(theirs_repo, []):
            continue  # not there when the incident began: the promoted site's own write
        head = await there.head_manifest(theirs_repo, tag)
        if head is None or await back.head_manifest(repo, tag) is not None:
            continue
        known = (await _knowledge(journal, site, {repo})).get(repo, tag)
        if deleted is not None:  # the returning site held that digest until the delete
            known = [*known, (stone_at, deleted)]
        times = await journal.events.registry_times(source, theirs_repo)
        pushed = times[theirs_repo].pushed.get((tag, head.digest)) if theirs_repo in times else None
        if not unpropagated_delete(stone_at, incident.started_at, known, head.digest, pushed):
            continue
        held_back.setdefault(theirs_repo, set()).add(tag)
        why = f"deleted at {site} before the incident (journal tombstone); not copied back"
        if rule.deletes:
            kind: Literal["delete", "conflict"] = "delete"
            reason = f"{why}; the delete had not reached {source}"
        else:
            kind, reason = "conflict", f"{why}; {source} keeps it (the rule does not delete)"
        report.items.append(
            FailbackItem(kind, rule.name, source, theirs_repo, tag, head.digest, reason, repo)
        )
    return held_back


async def _held_per_journal(journal: Journal, site: str, repository: str) -> set[str]:
    """Tags the journal says `site` held (we copied them there, or its inventory lists
    them): the stand-in for a failover's `held` record where there is none."""
    copied = {t for _, tags in await journal.ledger.tags_at(site, repository) for t in tags}
    return copied | set(await journal.inventory.digests(site, repository))


async def _report_overwritten(journal: Journal, site: str, report: FailbackReport) -> None:
    """The promoted site wins a tag it wrote during the incident; where the returning site
    held that tag at a digest it never replicated, its version is lost: say so."""
    assert report.sync is not None
    for action in report.sync.actions:
        if action.kind != "copy" or action.target_digest is None:
            continue
        sent = await journal.ledger.from_source(site, action.target_repository)
        if any(e.digest == action.target_digest for e in sent):
            continue
        report.items.append(
            FailbackItem(
                "conflict",
                action.rule,
                site,
                action.target_repository,
                action.tag,
                action.target_digest,
                f"{site}'s unreplicated version is replaced by {action.source_site}'s "
                f"{short_digest(action.source_digest)} (the promoted site wins)",
            )
        )


async def _apply_returning(
    journal: Journal,
    pool: ClientPool,
    engine: CopyEngine,
    site: str,
    report: FailbackReport,
    parallel: int,
) -> None:
    rules = {r.name: r for r in report.rules_used}

    async def one(item: FailbackItem) -> None:
        rule = rules[item.rule]
        if item.kind == "delete":
            source = report.sources[item.rule]
            if item.site == site:  # deleted at the promoted site during the incident
                kept = await _still_held(pool, report, rule, item.repository, item.tag)
                if kept is not None:  # since the plan: re-plan (a conflict now), delete nothing
                    report.failures.append(f"failback delete {item.describe(site)}: {kept}")
                    return
                promoted_repo = (
                    map_repository(rule, item.repository) if source in rule.to else item.repository
                )
                truth = DeleteSite(pool[source], source, promoted_repo)
            else:  # deleted at the returning site before it, never propagated
                repo = item.from_repository or item.repository
                truth = DeleteSite(pool[site], site, repo)
            deletion = await delete_tag(
                truth,
                DeleteSite(pool[item.site], item.site, item.repository),
                item.tag,
                journal=journal,
            )
            if deletion.outcome == "kept":
                report.failures.append(f"failback delete {deletion.describe()}")
            return
        if item.kind != "spread" or item.digest is None:
            return
        options = CopyOptions(
            platforms=rule.platform_list or None, referrers=rule.referrers, overwrite=False
        )
        result = await engine.copy(
            pool[site],
            item.from_repository or item.repository,
            item.digest,
            pool[item.site],
            item.repository,
            tag=item.tag,
            options=options,
        )
        if result.status == "failed":
            report.failures.append(f"failback {result.source} -> {result.target}: {result.error}")
        elif result.digest:
            await journal.ledger.record(item.site, item.repository, result.digest, site, item.tag)

    async def guarded(item: FailbackItem) -> None:
        try:
            await one(item)
        except RegistryError as exc:
            report.failures.append(f"failback {item.describe(site)}: {exc}")

    await bounded_gather((guarded(i) for i in report.items), parallel)


def _current_source(source: str, chain: Sequence[tuple[str, str]]) -> str:
    for lost, promoted in chain:
        if source == lost:
            source = promoted
    return source
