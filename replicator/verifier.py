"""Observe the sites for `verify`: list, HEAD, and (with `deep`) walk target manifests.

Cost is the point: an operator runs this on a schedule against registries with
rate limits. Per source repository one tag listing (a page stream) and one
HEAD per covered tag, shared by every target and rule; per target repository
one tag listing and one HEAD per covered tag it lists (a tag it does not list
is missing without asking). So at most one request per tag per site, paced by
each site's limits in the client. `deep` then reads each in-sync target
manifest (index children too) and HEADs every blob it needs, once per target
repository.

A rule with a platform list may write a filtered index whose digest differs
from the source's; for such a rule the source manifest is read with one GET
instead of the HEAD, to know the digest the copy writes.

The comparison itself is pure, in replicator/verify.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence

from replicator.aio import bounded_gather
from replicator.clients import ClientPool
from replicator.config import Config, Rule
from replicator.copy import CopyEngine, CopyOptions
from replicator.journal import Journal
from replicator.manifest import Manifest, ManifestError
from replicator.registry.client import RegistryClient
from replicator.registry.errors import NotFound, RegistryError
from replicator.rules import RenameError, map_repository
from replicator.verify import (
    Drift,
    SourceRepository,
    TargetRepository,
    VerifyReport,
    compare,
    covered_tags,
    in_sync,
)

log = logging.getLogger(__name__)


class Verifier:
    """One verify pass over some rules; caches what it saw so no tag is asked twice."""

    def __init__(
        self,
        config: Config,
        pool: ClientPool,
        *,
        journal: Journal | None = None,
        deep: bool = False,
        parallel: int = 16,
    ) -> None:
        self.config = config
        self.pool = pool
        self.journal = journal
        self.deep = deep
        self.parallel = max(1, parallel)
        self._lookups = asyncio.Semaphore(self.parallel)
        self._listings: dict[tuple[str, str], list[str]] = {}
        self._digests: dict[tuple[str, str, str], tuple[str | None, str | None]] = {}

    async def run(self, rules: Sequence[Rule]) -> VerifyReport:
        report = VerifyReport(deep=self.deep)
        down = await self._unreachable({s for r in rules for s in (r.from_, *r.to)}, report)
        for rule in rules:
            if rule.from_ in down:
                continue
            targets = [t for t in rule.to if t not in down]
            for target in targets:
                report.summary(rule.name, target)
            if targets:
                await self._verify_rule(rule, targets, report)
        return report

    async def _unreachable(self, sites: Iterable[str], report: VerifyReport) -> set[str]:
        """Sites that do not answer /v2/ (named in the report): nothing there is verified."""
        names = sorted(sites)

        async def ping(site: str) -> str | None:
            try:
                await self.pool[site].ping()
            except RegistryError as exc:
                return f"cannot verify site {site}: {exc}"
            return None

        answers = await asyncio.gather(*(ping(s) for s in names))
        report.errors += [a for a in answers if a]
        return {site for site, a in zip(names, answers, strict=True) if a}

    # ----------------------------------------------------------------- source
    async def _verify_rule(self, rule: Rule, targets: list[str], report: VerifyReport) -> None:
        try:
            repos = [r for r in await self.pool[rule.from_].catalog() if rule.matches_repository(r)]
        except RegistryError as exc:
            report.errors.append(f"rule {rule.name}: listing {rule.from_}: {exc}")
            return
        await bounded_gather(
            (self._verify_repository(rule, repo, targets, report) for repo in repos),
            self.parallel,
        )

    async def _verify_repository(
        self, rule: Rule, repo: str, targets: list[str], report: VerifyReport
    ) -> None:
        try:
            source = await self._observe_source(rule, repo)
        except (RegistryError, ManifestError) as exc:
            report.errors.append(f"rule {rule.name}: {exc}")
            return
        await asyncio.gather(*(self._verify_target(rule, source, t, report) for t in targets))

    async def _observe_source(self, rule: Rule, repo: str) -> SourceRepository:
        client = self.pool[rule.from_]
        tags = await self._list(client, repo)
        pushed_at = (
            await self.journal.inventory.push_times(rule.from_, repo) if self.journal else {}
        )
        covered = covered_tags(rule, tags, pushed_at)
        platforms = rule.platform_list or None
        seen = await asyncio.gather(*(self._source_digest(client, repo, t, rule) for t in covered))
        digests = {tag: d for tag, (d, _) in zip(covered, seen, strict=True) if d is not None}
        written = {
            tag: w
            for tag, (d, w) in zip(covered, seen, strict=True)
            if platforms and w is not None and w != d
        }
        return SourceRepository(repo, tags, digests, written)

    async def _source_digest(
        self, client: RegistryClient, repo: str, tag: str, rule: Rule
    ) -> tuple[str | None, str | None]:
        """(digest at the source, digest a copy under `rule` writes): one request."""
        platforms = tuple(rule.platform_list or ())
        key = (client.site.name, repo, tag if not platforms else f"{tag}\0{platforms}")
        if key in self._digests:
            return self._digests[key]
        async with self._lookups:
            answer: tuple[str | None, str | None] = (None, None)
            if not platforms:
                desc = await client.head_manifest(repo, tag)
                if desc is not None:
                    answer = (desc.digest, desc.digest)
            else:
                answer = await self._written_digest(client, repo, tag, rule)
        self._digests[key] = answer
        return answer

    @staticmethod
    async def _written_digest(
        client: RegistryClient, repo: str, tag: str, rule: Rule
    ) -> tuple[str | None, str | None]:
        try:
            manifest = await client.get_manifest(repo, tag)
        except NotFound:
            return None, None  # the tag vanished since the listing
        # the copy engine's own rule for what lands at the target, so the two cannot differ
        written = CopyEngine._as_written(manifest, CopyOptions(platforms=rule.platform_list))
        return manifest.digest, written.digest

    # ----------------------------------------------------------------- target
    async def _verify_target(
        self, rule: Rule, source: SourceRepository, target: str, report: VerifyReport
    ) -> None:
        client = self.pool[target]
        try:
            target_repo = map_repository(rule, source.repository)
            listed = await self._list(client, target_repo)
            listed_set = set(listed)
            present = [t for t in source.digests if t in listed_set]
            heads = await asyncio.gather(*(self._head(client, target_repo, t) for t in present))
        except (RegistryError, RenameError) as exc:
            report.errors.append(f"rule {rule.name}: target {target}: {exc}")
            return
        observed = TargetRepository(
            target, target_repo, listed, dict(zip(present, heads, strict=True))
        )
        drift = compare(rule, source, observed)
        if self.deep:
            try:
                drift += await self._incomplete(rule, source, observed)
            except (RegistryError, ManifestError) as exc:
                report.errors.append(f"rule {rule.name}: target {target}: {exc}")
        report.add(rule.name, target, len(source.digests), drift)

    async def _head(self, client: RegistryClient, repo: str, tag: str) -> str | None:
        async with self._lookups:
            desc = await client.head_manifest(repo, tag)
        return desc.digest if desc else None

    async def _list(self, client: RegistryClient, repo: str) -> list[str]:
        key = (client.site.name, repo)
        if key not in self._listings:
            self._listings[key] = await client.list_tags(repo)
        return self._listings[key]

    # ----------------------------------------------------------------- deep
    async def _incomplete(
        self, rule: Rule, source: SourceRepository, target: TargetRepository
    ) -> list[Drift]:
        """Every in-sync tag whose manifest tree lacks a manifest or blob at the target.

        Each manifest is read once and each blob HEADed once per target repository,
        however many tags share them."""
        client = self.pool[target.site]
        manifests: dict[str, asyncio.Task[Manifest | None]] = {}
        blobs: dict[str, asyncio.Task[bool]] = {}

        def manifest(digest: str) -> asyncio.Task[Manifest | None]:
            if digest not in manifests:
                manifests[digest] = asyncio.ensure_future(
                    self._manifest(client, target.repository, digest)
                )
            return manifests[digest]

        def blob_absent(digest: str) -> asyncio.Task[bool]:
            if digest not in blobs:
                blobs[digest] = asyncio.ensure_future(
                    self._blob_absent(client, target.repository, digest)
                )
            return blobs[digest]

        async def lacking(digest: str) -> list[str]:
            """Digests under `digest` (itself included) that the target does not hold."""
            found = await manifest(digest)
            if found is None:
                return [digest]
            needs = [b.digest for b in found.blobs]
            gone = await asyncio.gather(*(blob_absent(b) for b in needs))
            below = await asyncio.gather(*(lacking(c.digest) for c in found.children))
            return [b for b, g in zip(needs, gone, strict=True) if g] + [
                d for child in below for d in child
            ]

        async def check(tag: str, digest: str) -> list[Drift]:
            return [
                Drift(
                    rule.name,
                    target.site,
                    source.repository,
                    target.repository,
                    tag,
                    "incomplete",
                    source.digests.get(tag),
                    digest,
                    absent,
                )
                for absent in dict.fromkeys(await lacking(digest))
            ]

        tags = in_sync(source, target)
        found = await bounded_gather(
            (check(t, d) for t in tags if (d := target.digests.get(t))), self.parallel
        )
        return [d for per_tag in found for d in per_tag]

    async def _manifest(self, client: RegistryClient, repo: str, digest: str) -> Manifest | None:
        async with self._lookups:
            try:
                return await client.get_manifest(repo, digest)
            except NotFound:
                return None

    async def _blob_absent(self, client: RegistryClient, repo: str, digest: str) -> bool:
        async with self._lookups:
            return await client.head_blob(repo, digest) is None


async def verify(
    config: Config,
    pool: ClientPool,
    rules: Sequence[Rule],
    *,
    journal: Journal | None = None,
    deep: bool = False,
) -> VerifyReport:
    """One verify pass over `rules` (the CLI and the daemon's schedule both call this)."""
    report = await Verifier(config, pool, journal=journal, deep=deep).run(rules)
    log.info(
        "verify%s: %d targets, %d drifting tags, %d could not be verified",
        " --deep" if deep else "",
        len(report.summaries),
        len(report.drift),
        len(report.errors),
    )
    return report
