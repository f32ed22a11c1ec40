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

Failback is the reverse once the old primary is back: copy to it everything
its replacement received during the incident, then end the failover.

Under `latest: N`, only the N newest tags (over every survivor) are caught up.

Rules with `rename` are refused: the promoted replica holds the *target*
names, and expressing a rule over those names (and inverting the rename for
failback) is not something a rule can say today.

Pure decisions (`lost_site_for`, `refusals`, `choose_digest`, `_decide`) are
separate from the I/O so they can be tested alone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

from replicator.aio import bounded_gather
from replicator.clients import ClientPool
from replicator.config import Config, Rule
from replicator.copy import CopyEngine, CopyOptions
from replicator.errors import UsageError
from replicator.journal import Journal
from replicator.manifest import Descriptor
from replicator.registry.client import RegistryClient
from replicator.registry.errors import RegistryError
from replicator.rules import effective_rules, select_tags, tag_passes
from replicator.sync import Reconciler, SyncReport, active_failovers

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
    """Why this failover cannot be done safely (empty: it can)."""
    problems = []
    for rule in rules:
        if rule.from_ != lost:
            continue
        if rule.rename is not None:
            problems.append(
                f"rule {rule.name!r} renames repositories, so {promoted!r} holds them under the "
                "target names; failover of renaming rules is not supported - remove the "
                "rename or fail over by hand"
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

    def describe(self, promoted: str) -> str:
        was = "new" if self.replaces is None else f"was {self.replaces[:19]}"
        return (
            f"copy     {self.from_site}/{self.repository}:{self.tag} -> "
            f"{promoted}/{self.repository}:{self.tag} ({self.digest[:19]}, {was}; "
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
        seen = ", ".join(f"{s}={d[:19] if d else '-'}" for s, d in self.digests.items())
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
        }


@dataclass
class FailbackReport:
    site: str
    dry_run: bool
    sources: dict[str, str] = field(default_factory=dict)  # rule -> site synced from
    sync: SyncReport | None = None
    failures: list[str] = field(default_factory=list)
    ended: list[int] = field(default_factory=list)  # failover ids made inactive

    def as_dict(self) -> dict:
        sync = self.sync
        return {
            "site": self.site,
            "dry_run": self.dry_run,
            "sources": self.sources,
            "counts": sync.counts() if sync else {},
            "plan": [a.describe() for a in sync.actions if a.kind != "up-to-date"] if sync else [],
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
        return report
    if report.failures and not request.force:
        return report
    detail = {
        "rules": report.rules,
        "catch_up": {
            "copied": [asdict(c) for c in report.copies],
            "conflicts": [asdict(c) for c in report.conflicts],
            "failures": report.failures,
        },
    }
    report.failover_id = await journal.failovers.record(lost, promoted, detail)
    report.recorded = True
    log.warning(
        "failover recorded: %s promoted in place of %s (%d rules rewritten, %d catch-up copies)",
        promoted,
        lost,
        len(affected),
        len(report.copies),
    )
    return report


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

    async def head(client, repo: str, tag: str) -> str | None:
        async with lookups:
            desc = await client.head_manifest(repo, tag)
        return desc.digest if desc else None

    for rule in rules:
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
                    tags = [t for t in await client.list_tags(repo) if tag_passes(rule.tags, t)]
                    digests = await asyncio.gather(*(head(client, repo, t) for t in tags))
                    for tag, digest in zip(tags, digests, strict=True):
                        if digest:
                            holdings.setdefault(repo, {}).setdefault(tag, {})[replica] = digest
            except RegistryError as exc:
                report.failures.append(f"rule {rule.name}: reading replica {replica}: {exc}")
        if rule.tags is not None and rule.tags.latest is not None:
            try:
                await _keep_latest(journal, site, rule, lost, holdings)
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
            mine = await asyncio.gather(*(head(site, repo, tag) for repo, tag, _ in work))
        except RegistryError as exc:
            report.failures.append(f"rule {rule.name}: reading promoted site {promoted}: {exc}")
            continue
        knowledge = await _knowledge(journal, lost, {r for r, _, _ in work})
        for (repo, tag, by_site), own in zip(work, mine, strict=True):
            decision = _decide(
                rule, repo, tag, own, by_site, replicas, promoted, knowledge.get(repo, tag)
            )
            for item in decision if isinstance(decision, list) else [decision]:
                if isinstance(item, Conflict):
                    report.conflicts.append(item)
                elif item is not None:
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
            copy.repository,
            tag=copy.tag,
            options=options,
            target_current=current,
        )
        if result.status == "failed":
            report.failures.append(f"catch-up {result.source} -> {result.target}: {result.error}")
        elif result.digest:
            await journal.ledger.record(
                promoted, copy.repository, result.digest, copy.from_site, copy.tag
            )

    await bounded_gather((run(c) for c in report.copies), parallel)


async def _keep_latest(
    journal: Journal,
    promoted: RegistryClient,
    rule: Rule,
    lost: str,
    holdings: dict[str, dict[str, dict[str, str]]],
) -> None:
    """Under `latest: N` only the N newest tags are the rule's: replicas keep older ones
    (replication adds, retention removes), and those are not caught up. Newest is
    ranked over the tags of every survivor, the promoted site's included, by version
    or else by the lost primary's push times in the journal, as `sync` ranks them."""
    for repo, tags in holdings.items():
        own = await promoted.list_tags(repo)
        pushed_at = await journal.inventory.push_times(lost, repo)
        keep = set(select_tags(sorted({*tags, *own}), rule.tags, pushed_at))
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
    """Bring `site` (a recovered lost primary) up to date, then end its failover(s)."""
    config.site(site)
    failovers = await journal.failovers.active()
    mine = [f for f in failovers if f.lost_site == site]
    if not mine:
        active = ", ".join(f"{f.lost_site} -> {f.promoted_site}" for f in failovers) or "none"
        raise UsageError(f"no active failover of {site!r} (active failovers: {active})")
    chain = [(f.lost_site, f.promoted_site) for f in failovers]
    report = FailbackReport(site, dry_run)
    sync_rules: list[Rule] = []
    for rule in config.rules:
        if rule.from_ != site:
            continue
        source = _current_source(rule.from_, chain)
        if source == site:
            continue
        report.sources[rule.name] = source
        sync_rules.append(
            rule.model_copy(
                update={
                    "from_": source,
                    "to": [site],
                    "overwrite": True,
                    "deletes": False,
                    "immutable_tags": [],
                }
            )
        )
    if sync_rules:
        reconciler = Reconciler(
            config, None if dry_run else journal, pool, engine, parallel=parallel
        )
        report.sync = await reconciler.run(rules=sync_rules, dry_run=dry_run)
        report.failures.extend(report.sync.failures)
    if dry_run or report.failures:
        return report
    ids = [f.id for f in mine]
    await journal.failovers.end(ids)
    report.ended = ids
    log.warning("failback: %s is the source of its rules again (failovers %s ended)", site, ids)
    return report


def _current_source(source: str, chain: Sequence[tuple[str, str]]) -> str:
    for lost, promoted in chain:
        if source == lost:
            source = promoted
    return source
