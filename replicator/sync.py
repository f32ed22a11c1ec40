"""Reconcile: bring every target up to date with its rules, once.

Observe (catalog, tags, one HEAD per tag on each side), plan (pure, in
replicator.planner), then execute through the copy engine with bounded
concurrency. The same function serves `registry-replicator sync`, the daemon's
periodic reconcile, and failover catch-up. A dry run stops after planning, so
it prints exactly what the real run would do.

A rule's literal repository names (`library/nginx`) are listed by their tags
alone, so sources without a catalog (Docker Hub, GHCR, Quay) work; only globs
read the catalog. Failures are counted in tags, the unit of `copied` and
`skipped`, and one failing repository or target does not stop the others.

Nothing here needs to be undone after a crash: copies are idempotent (blobs
already at the target are skipped), so the next run simply finishes the work.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from replicator import store_tags
from replicator.aio import bounded_gather
from replicator.clients import ClientPool
from replicator.config import Config, Rule
from replicator.copy import CopyEngine, CopyJob, CopyOptions, CopyStats, as_written
from replicator.deletes import DeleteSite, delete_attached, delete_tag
from replicator.globs import is_literal
from replicator.journal import Journal
from replicator.manifest import Descriptor, ManifestError
from replicator.planner import Action, plan_target, selected_tags
from replicator.registry.errors import RegistryError
from replicator.registry.listing import CatalogUnavailable
from replicator.rules import (
    attached_cosign_tags,
    effective_rules,
    glob_match,
    is_cosign_tag,
    map_repository,
)
from replicator.source_check import SourceMoved, confirm_source_tag
from replicator.store_tags import StoredTags

log = logging.getLogger(__name__)


@dataclass
class SyncReport:
    dry_run: bool = False
    actions: list[Action] = field(default_factory=list)
    stats: CopyStats = field(default_factory=CopyStats)
    deleted: int = 0
    failures: list[str] = field(default_factory=list)  # one message per failed step
    target_requests: dict[str, int] = field(default_factory=dict)
    # Listings that failed (a rule's catalog, a repository's tags): their tags are unknown.
    failed_listings: int = 0
    # copies not written because the source tag moved or went since the plan
    superseded: int = 0
    _failed_beyond_one: int = 0  # steps that failed several tags with one message
    # site -> its pull budget at the end (limit, remaining, window, observed_at), if metered
    ratelimits: dict[str, dict[str, Any]] = field(default_factory=dict)

    def fail_tags(self, message: str, tags: int) -> None:
        """A step failed `tags` (>= 1) tags at once, e.g. a target that cannot be read."""
        self.failures.append(message)
        self._failed_beyond_one += tags - 1

    def fail_listing(self, message: str) -> None:
        self.failures.append(message)
        self.failed_listings += 1

    @property
    def failed_tags(self) -> int:
        """Tags (per target) not brought up to date, the unit of `copied` and `skipped`:
        a failed copy or delete is one message for one tag; listings do not count."""
        return len(self.failures) - self.failed_listings + self._failed_beyond_one

    def counts(self) -> dict[str, object]:
        kinds = [a.kind for a in self.actions]
        return {
            "dry_run": self.dry_run,
            "planned_copies": kinds.count("copy"),
            "planned_deletes": kinds.count("delete"),
            "copied": self.stats.copied,
            "skipped": kinds.count("up-to-date") + self.stats.skipped,
            "failed": self.failed_tags,
            "failed_listings": self.failed_listings,
            "deleted": self.deleted,
            "conflicts": kinds.count("conflict") + self.stats.conflicts,
            "blobs_uploaded": self.stats.blobs_uploaded,
            "blobs_mounted": self.stats.blobs_mounted,
            "blobs_existing": self.stats.blobs_existing,
            "bytes_uploaded": self.stats.bytes_uploaded,
            "bytes_downloaded": self.stats.bytes_downloaded,
            "superseded": self.superseded,
            **({"ratelimits": self.ratelimits} if self.ratelimits else {}),
        }


async def active_failovers(journal: Journal) -> list[tuple[str, str]]:
    """(lost, promoted) of every failover in force, oldest first."""
    return [(f.lost_site, f.promoted_site) for f in await journal.failovers.active()]


async def rules_in_force(config: Config, journal: Journal | None) -> list[Rule]:
    """Configured rules, rewritten by any failover recorded in the journal."""
    if journal is None:
        return list(config.rules)
    return effective_rules(config, await active_failovers(journal))


class Reconciler:
    """Runs sync passes; holds the shared clients and copy engine."""

    def __init__(
        self,
        config: Config,
        journal: Journal | None,
        pool: ClientPool,
        engine: CopyEngine,
        *,
        parallel: int = 16,
        on_action: Callable[[Action, str], None] | None = None,
        read_only: bool = False,  # read the journal, write nothing (failback's dry run)
    ) -> None:
        self.config = config
        self.journal = journal
        self.read_only = read_only
        self.pool = pool
        self.engine = engine
        self.parallel = parallel
        self.on_action = on_action
        self._lookups = asyncio.Semaphore(parallel)
        # (site, repository) -> its tags as listed in this pass, while its copies run
        self._listed: dict[tuple[str, str], frozenset[str]] = {}

    async def run(
        self,
        rule_names: Sequence[str] | None = None,
        *,
        dry_run: bool = False,
        rules: Sequence[Rule] | None = None,
    ) -> SyncReport:
        report = SyncReport(dry_run=dry_run)
        if rules is None:
            rules = await rules_in_force(self.config, self.journal)
        if rule_names:
            unknown = set(rule_names) - {r.name for r in rules}
            if unknown:
                from replicator.errors import UsageError

                raise UsageError(
                    f"unknown rule(s): {', '.join(sorted(unknown))}; known: "
                    f"{', '.join(r.name for r in rules)}"
                )
            rules = [r for r in rules if r.name in rule_names]
        run_id = await self._start_run(rule_names, dry_run)
        targets_before = self._request_counts(rules)
        ok = False
        try:
            for rule in rules:
                await self._sync_rule(rule, report)
            ok = True
        finally:
            after = self._request_counts(rules)
            report.target_requests = {s: after[s] - targets_before.get(s, 0) for s in after}
            report.ratelimits = self._ratelimits(rules)
            await self._finish_run(run_id, report, ok)
        return report

    # ----------------------------------------------------------------- observe
    async def _sync_rule(self, rule: Rule, report: SyncReport) -> None:
        repos = await self._source_repositories(rule, report)
        await bounded_gather(
            (self._sync_repo(rule, repo, named, report) for repo, named in repos.items()),
            self.parallel,
        )

    async def _source_repositories(self, rule: Rule, report: SyncReport) -> dict[str, bool]:
        """The rule's source repositories -> whether the rule names it literally.

        Literal names need no catalog (public registries serve none to users);
        globs do, and a source without one fails the rule's globs with a message
        saying so, while its literal names still replicate."""
        literal = [p for p in rule.repositories if is_literal(p) and rule.matches_repository(p)]
        globs = [p for p in rule.repositories if not is_literal(p)]
        repos = dict.fromkeys(literal, True)
        if not globs:
            return repos
        store = self.config.sites[rule.from_].storage
        try:
            names = await store_tags.repositories(store) if store else None
            for repo in names if names is not None else await self.pool[rule.from_].catalog():
                if rule.matches_repository(repo):
                    repos.setdefault(repo, False)
        except CatalogUnavailable as exc:
            report.fail_listing(
                f"rule {rule.name}: site {rule.from_} serves no repository catalog ({exc}); "
                f"the repository globs {', '.join(globs)} need one. Name the repositories "
                "literally (e.g. library/nginx): those are listed by their tags alone"
            )
        except RegistryError as exc:
            report.fail_listing(f"rule {rule.name}: listing {rule.from_}: {exc}")
        return repos

    async def _sync_repo(self, rule: Rule, repo: str, named: bool, report: SyncReport) -> None:
        src = self.pool[rule.from_]
        store = self.config.sites[rule.from_].storage
        stored = await store_tags.tags(store, repo) if store else None
        try:
            if stored is not None:
                listed = stored.tags if stored.tags or not named else None
            elif named:
                listed = await src.list_tags_if_exists(repo)
            else:
                listed = await src.list_tags(repo)
        except RegistryError as exc:
            report.fail_listing(f"rule {rule.name}: {rule.from_}/{repo}: {exc}")
            return
        if listed is None:  # a literal name the source does not have (yet)
            log.warning("rule %s: site %s has no repository %s", rule.name, rule.from_, repo)
            return
        tags = listed
        pushed_at = await self._pushed_at(rule.from_, repo)
        wanted = selected_tags(rule, dict.fromkeys(tags, ""), pushed_at)
        try:
            digests = await self._observe_source(src, repo, wanted, stored)
            images = {d for d in digests.values() if d is not None}
            cosign = attached_cosign_tags(rule, tags, images)  # travel with their images
            digests |= await self._observe_source(src, repo, cosign, stored)
        except RegistryError as exc:
            message = f"rule {rule.name}: {rule.from_}/{repo}: {exc}"
            report.fail_tags(message, len(wanted) * len(rule.to))  # per target, as copies
            return
        source_tags = {t: d for t, d in digests.items() if d is not None}
        selected = [t for t in [*wanted, *cosign] if t in source_tags]  # a tag may vanish
        all_source = dict.fromkeys(tags, "") | source_tags  # for delete decisions
        await self._record_inventory(rule.from_, repo, source_tags)
        self._listed[(rule.from_, repo)] = frozenset(tags)
        try:
            await asyncio.gather(
                *(
                    self._sync_target(rule, repo, target, all_source, source_tags, selected, report)
                    for target in rule.to
                )
            )
        finally:
            self._listed.pop((rule.from_, repo), None)

    async def _sync_target(
        self,
        rule: Rule,
        repo: str,
        target: str,
        all_source: dict[str, str],
        source_tags: dict[str, str],
        selected: list[str],
        report: SyncReport,
    ) -> None:
        dst = self.pool[target]
        try:
            target_repo = map_repository(rule, repo)
            trusted = await self._immutable_known(rule, target, target_repo, source_tags, selected)
            observed = await self._head_all(
                dst, target_repo, [t for t in selected if t not in trusted]
            )
            target_tags = {**trusted, **observed}
            if rule.immutable_tags:
                await self._record_inventory(
                    target, target_repo, {t: d for t, d in observed.items() if d}
                )
            everything = None
            if rule.deletes:
                listed = await dst.list_tags(target_repo)
                rest = [t for t in listed if t not in target_tags]
                everything = {
                    t: d
                    for t, d in (
                        {**target_tags, **await self._head_all(dst, target_repo, rest)}
                    ).items()
                    if d is not None
                }
        except RegistryError as exc:
            message = f"rule {rule.name}: {target}/{repo}: {exc}"
            if selected:
                report.fail_tags(message, len(selected))
            else:  # only the target's tag list (for deletes) was wanted
                report.fail_listing(message)
            return
        try:
            written = await self._written(rule, repo, source_tags, selected, target_tags)
        except (RegistryError, ManifestError) as exc:
            message = f"rule {rule.name}: {rule.from_}/{repo}: {exc}"
            report.fail_tags(message, max(1, len(selected)))
            return
        plan_source = {t: source_tags.get(t) or all_source[t] for t in all_source}
        actions = plan_target(
            rule, target, repo, plan_source, selected, target_tags, everything, written
        )
        report.actions.extend(actions)
        for action in actions:
            if self.on_action and action.kind != "up-to-date":
                self.on_action(action, "planned")
        if not report.dry_run:
            work = [a for a in actions if a.kind in ("copy", "delete")]
            await bounded_gather(
                (self._execute(rule, a, report) for a in work if a.attached_to is None),
                self.parallel,
            )
            # cosign tags of deleted images: once their image's delete has run
            await bounded_gather(
                (self._execute(rule, a, report) for a in work if a.attached_to is not None),
                self.parallel,
            )

    async def _written(
        self,
        rule: Rule,
        repo: str,
        source_tags: dict[str, str],
        selected: list[str],
        target_tags: dict[str, str | None],
    ) -> dict[str, str]:
        """tag -> the digest the copy engine writes at the target, where that differs from
        the source's (an index filtered to the rule's platforms). Asked only for tags the
        target holds at another digest, so the dry run predicts "up to date" exactly when
        the copy will find it so."""
        if not rule.platform_list:
            return {}
        differing = [t for t in selected if target_tags.get(t) not in (None, source_tags[t])]
        by_digest: dict[str, str] = {}
        src = self.pool[rule.from_]
        for digest in dict.fromkeys(source_tags[t] for t in differing):
            async with self._lookups:
                manifest = await src.get_manifest(repo, digest)
            by_digest[digest] = as_written(manifest, rule.platform_list).digest
        return {t: by_digest[source_tags[t]] for t in differing}

    async def _observe_source(
        self, src: Any, repo: str, wanted: list[str], stored: StoredTags | None
    ) -> dict[str, str | None]:
        """Source digests of `wanted`: from the store where it settles them (no request),
        else one HEAD each (store_tags.py says why and when)."""
        if stored is None:
            return await self._head_all(src, repo, wanted)
        known: dict[str, str | None] = {t: stored.digests[t] for t in wanted if t in stored.digests}
        rest = [t for t in wanted if t not in known]
        return {**known, **await self._head_all(src, repo, rest)} if rest else known

    async def _head_all(self, client, repo: str, tags: Iterable[str]) -> dict[str, str | None]:
        async def one(tag: str) -> tuple[str, str | None]:
            async with self._lookups:
                desc = await client.head_manifest(repo, tag)
            return tag, desc.digest if desc else None

        return dict(await asyncio.gather(*(one(t) for t in tags)))

    # ----------------------------------------------------------------- execute
    async def _execute(self, rule: Rule, action: Action, report: SyncReport) -> None:
        src, dst = self.pool[action.source_site], self.pool[action.target_site]
        if action.kind == "delete":
            source = DeleteSite(src, action.source_site, action.repository)
            target = DeleteSite(dst, action.target_site, action.target_repository)
            try:
                if action.attached_to is not None:
                    deletion = await delete_attached(
                        source, target, action.tag, action.attached_to, journal=self.journal
                    )
                else:
                    deletion = await delete_tag(
                        source,
                        target,
                        action.tag,
                        journal=self.journal,
                        prune_digest=action.target_digest if action.prune_manifest else None,
                    )
                status: str = deletion.outcome
                if deletion.outcome == "deleted":
                    report.deleted += 1
                elif deletion.outcome == "kept":  # re-pushed since the plan: not a failure
                    log.info("sync: delete %s", deletion.describe())
            except RegistryError as exc:
                report.failures.append(
                    f"delete {action.target_site}/{action.target_repository}:{action.tag}: {exc}"
                )
                status = "failed"
            if self.on_action:
                self.on_action(action, status)
            return
        assert action.source_digest is not None  # the planner copies what the source has
        current = Descriptor("", action.target_digest, 0) if action.target_digest else None
        cosign = is_cosign_tag(action.tag)  # an attachment follows its source when re-signed
        options = CopyOptions(
            platforms=rule.platform_list or None,
            referrers=rule.referrers,
            overwrite=rule.overwrite or cosign,
            cosign_tags=False,  # planned here as actions of their own
            source_tags=self._listed.get((action.source_site, action.repository)),
            before_put=functools.partial(
                _source_fence, action.tag, self.config.sites[action.source_site].storage
            ),
        )
        try:
            result = await self.engine.copy(
                src,
                action.repository,
                action.source_digest,
                dst,
                action.target_repository,
                tag=action.tag,
                options=options,
                target_current=current,
            )
        except SourceMoved as exc:
            log.info("sync: superseded since the plan: %s", exc)
            report.superseded += 1
            if self.on_action:
                self.on_action(action, "superseded")
            return
        report.stats.add(result.stats)
        if result.status == "failed":
            report.failures.append(f"{result.source} -> {result.target}: {result.error}")
        elif result.status == "copied":
            await self._record_replicated(action, result.digest)
            if rule.immutable_tags and result.digest:
                await self._record_inventory(
                    action.target_site, action.target_repository, {action.tag: result.digest}
                )
        if self.on_action:
            self.on_action(action, result.status)

    # ----------------------------------------------------------------- journal
    def _request_counts(self, rules: Sequence[Rule]) -> dict[str, int]:
        sites = {t for r in rules for t in r.to}
        return {s: self.pool[s].stats.get("requests", 0) for s in sites}

    def _ratelimits(self, rules: Sequence[Rule]) -> dict[str, dict[str, Any]]:
        """The pull budgets of the rules' sites that have one, for the journal (status)."""
        sites = sorted({r.from_ for r in rules} | {t for r in rules for t in r.to})
        budgets = {s: self.pool[s].pull_budget() for s in sites}
        return {s: b for s, b in budgets.items() if b is not None}

    async def _pushed_at(self, site: str, repo: str) -> dict[str, float]:
        if self.journal is None:
            return {}
        return await self.journal.inventory.push_times(site, repo)

    async def _immutable_known(
        self,
        rule: Rule,
        target: str,
        target_repo: str,
        source_tags: dict[str, str],
        selected: list[str],
    ) -> dict[str, str]:
        """Immutable tags the journal already records at the target with the source digest.

        Such a tag never moves, so asking the target again is wasted requests
        (rate limits, a 2,000-tag reconcile). The record is the target's
        inventory (written when we observed or copied the tag) or a `replicated`
        row naming the tag; a tag whose recorded digest differs is HEADed as usual.
        """
        if self.journal is None or not rule.immutable_tags:
            return {}
        immutable = [
            t for t in selected if not is_cosign_tag(t) and glob_match(rule.immutable_tags, t)
        ]
        if not immutable:
            return {}
        known = await self.journal.inventory.digests(target, target_repo)
        for digest, tags in await self.journal.ledger.tags_at(target, target_repo):
            for tag in tags:
                known[tag] = digest
        return {t: source_tags[t] for t in immutable if known.get(t) == source_tags[t]}

    async def _record_inventory(self, site: str, repo: str, tags: dict[str, str]) -> None:
        if self.journal is None or self.read_only or not tags:
            return
        await self.journal.inventory.record_tags(site, repo, tags)

    async def _record_replicated(self, action: Action, digest: str | None) -> None:
        if self.journal is None or self.read_only or not digest:
            return
        await self.journal.ledger.record(
            action.target_site, action.target_repository, digest, action.source_site, action.tag
        )

    async def _start_run(self, rule_names: Sequence[str] | None, dry_run: bool) -> int | None:
        if self.journal is None or self.read_only:
            return None
        return await self.journal.sync_runs.start(rule_names, dry_run)

    async def _finish_run(self, run_id: int | None, report: SyncReport, ok: bool) -> None:
        if self.journal is None or run_id is None:
            return
        state = "done" if ok and not report.failures else "failed"
        await self.journal.sync_runs.finish(run_id, state, report.counts())


async def _source_fence(tag: str, store: Path | None, job: CopyJob, digest: str, ref: str) -> None:
    """Before the planned tag is written: the source must still hold what was planned (a
    tag deleted or moved at the source since the listing is not written back)."""
    if ref == tag:
        await confirm_source_tag(job, tag, store=store)
