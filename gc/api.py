"""Mark-and-sweep through the registry API, for registries whose disk we may not see.

Per repository covered by an api/both-mode policy: list tags, HEAD them (a HEAD
is not a pull), GET manifests by digest, follow index children and referrers
(referrers API or the ``sha256-<hex>`` fallback tag), add the untagged manifests
the journal's webhooks name and, when the site's storage directory is known,
every manifest revision stored there; rank tags by the registry's push times
(`ages`: webhooks, else link file times, else unknown = kept); then
`policy.decide` and sweep:

* manifests not marked, parents before children and referrers before their
  subjects (an interrupted sweep never leaves an index pointing at a hole);
  DELETE by digest also removes every tag on it, so a digest any kept tag
  points to is marked and never deleted;
* expired tags on digests that stay: `RegistryClient.delete_tag` (DELETE by tag
  where the registry supports it, else a placeholder pushed to the tag and
  deleted by digest, recorded in the ledger first so a daemon watching the site
  does not replicate it), which removes that tag and nothing else;
* a doomed index's children only when every manifest of the repository is known
  (storage): an untagged index the API cannot see may list them; without storage
  the index goes alone and the storage pass decides its children;
* blob links (``DELETE /v2/<repo>/blobs/<digest>``) only when every manifest of
  the repository is known, which needs the storage directory: the API cannot list
  untagged manifests, and unlinking a layer an unseen untagged manifest uses
  breaks it. Without storage the pass deletes manifests and tags only, says so,
  and leaves blobs to the storage pass.

Every manifest and tag deleted is tombstoned (origin `retention`), so failover
catch-up and failback tell "removed by retention" from "never copied". The
tombstone is written before its DELETE is sent and withdrawn if the DELETE fails:
a GC killed mid-sweep leaves a record of every delete the registry carried out.

Right before deleting, each repository's tags are listed and HEADed again (and
its stored revisions re-read); a tag that appeared or moved onto a doomed digest
saves it, a new revision saves its blobs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from replicator.gc.ages import manifest_times, tag_infos, with_push_times
from replicator.gc.layout import RepoSnapshot, StoreLayout
from replicator.gc.mark import Node, mark, parents_index
from replicator.gc.policy import (
    RetentionPolicy,
    SourceHolds,
    decide,
    policies_for,
    summary,
)
from replicator.gc.runs import CandidateRow, RunRecorder
from replicator.gc.storage import GCResult
from replicator.journal import Journal, Tombstone
from replicator.journal.events import RegistryTimes
from replicator.manifest import Manifest
from replicator.registry.errors import NotFound, RegistryError
from replicator.registry.manifests import BeforePlaceholder

log = logging.getLogger("replicator.gc.api")

NO_BLOBS_WITHOUT_STORAGE = (
    "blob links left to the storage pass: without the site's storage directory the "
    "registry API cannot list untagged manifests, so no blob can be proven unused"
)
NO_CHILDREN_WITHOUT_STORAGE = (
    "{n} child manifest(s) of deleted indexes left to the storage pass: without the "
    "site's storage directory an untagged index the API cannot list may use them"
)
# (repository) -> what the rule's source holds, for follow_source policies
SourceLookup = Callable[[str], Awaitable[SourceHolds | None]]


@dataclass
class ApiGCOptions:
    site: str
    policies: Sequence[RetentionPolicy]
    dry_run: bool = False
    concurrency: int = 8
    delete_blob_links: bool = True  # where every manifest of the repository is known
    repositories: Sequence[str] | None = None  # default: the catalog
    storage: str | Path | None = None  # the site's storage directory, read only
    sources: SourceLookup | None = None  # for follow_source policies


@dataclass
class RepoPlan:
    repository: str
    policy: RetentionPolicy
    manifests: dict[str, Manifest]
    tags: dict[str, str]  # tag -> digest
    delete_manifests: list[str]  # in deletion order
    delete_tags: list[str]  # tags whose digest stays
    delete_blobs: dict[str, int]  # digest -> size
    reasons: dict[str, str]
    kept: dict[str, list[str]] = field(default_factory=dict)  # tag -> why kept
    revisions: set[str] | None = None  # every stored manifest, when storage is known
    # doomed children of indexes left in place: no storage, so an unseen index may list them
    spared_children: list[str] = field(default_factory=list)


def item(site: str, repo: str, kind: str, ref: str, size: int, clause: str) -> dict[str, Any]:
    """One deletion as `gc --json` lists it; dry run and real run list the same."""
    key = "tag" if kind == "tag" else "digest"
    return {
        "site": site,
        "repository": repo,
        "kind": kind,
        key: ref,
        "bytes": size,
        "clause": clause,
    }


class ApiCollector:
    def __init__(self, client: Any, journal: Journal | None, options: ApiGCOptions) -> None:
        self.client = client
        self.journal = journal
        self.opts = options
        self._sem = asyncio.Semaphore(max(1, options.concurrency))
        self.layout = StoreLayout(options.storage) if options.storage is not None else None
        self.webhooks: dict[str, RegistryTimes] = {}

    async def _limited(self, coro):
        async with self._sem:
            return await coro

    # --- reading ---------------------------------------------------------------
    async def load_history(self) -> None:
        """The site's webhook history, once per run."""
        if self.journal is not None:
            self.webhooks = await self.journal.events.registry_times(self.opts.site)

    async def _tag_digests(self, repo: str, tags: list[str]) -> dict[str, str]:
        descs = await asyncio.gather(
            *(self._limited(self.client.head_manifest(repo, t)) for t in tags)
        )
        return {t: d.digest for t, d in zip(tags, descs, strict=True) if d is not None}

    async def _stored(self, repo: str) -> RepoSnapshot | None:
        if self.layout is None:
            return None
        layout = self.layout
        return await asyncio.to_thread(layout.scan_repository, repo, with_uploads=False)

    async def _fetch_graph(self, repo: str, roots: set[str]) -> dict[str, Manifest]:
        found: dict[str, Manifest] = {}
        todo = set(roots)
        while todo:
            batch = sorted(todo - found.keys())
            todo = set()
            results = await asyncio.gather(
                *(self._limited(self.client.get_manifest(repo, d)) for d in batch),
                return_exceptions=True,
            )
            for d, m in zip(batch, results, strict=True):
                if isinstance(m, NotFound):
                    continue
                if isinstance(m, BaseException):
                    raise m
                found[d] = m
                todo.update(c.digest for c in m.children)
            refs = await asyncio.gather(
                *(self._limited(self.client.referrers(repo, d)) for d in batch if d in found),
                return_exceptions=True,
            )
            for r in refs:
                if isinstance(r, list):
                    todo.update(x.digest for x in r)
            todo -= found.keys()
        return found

    async def plan_repository(self, repo: str, policy: RetentionPolicy, now: float) -> RepoPlan:
        tag_names = await self._limited(self.client.list_tags(repo))
        tags = await self._tag_digests(repo, tag_names)
        history = self.webhooks.get(repo)
        snap = await self._stored(repo)
        roots = set(tags.values())
        if history is not None:
            roots |= set(history.manifest_pushed)
        if snap is not None:
            roots |= set(snap.revisions)
        graph_m = await self._fetch_graph(repo, roots)
        times = manifest_times(graph_m, history, snap.revisions if snap else None)
        graph = with_push_times(
            {
                d: Node(
                    tuple(c.digest for c in m.children),
                    tuple(b.digest for b in m.blobs),
                    m.subject.digest if m.subject else None,
                )
                for d, m in graph_m.items()
            },
            times,
        )
        infos = tag_infos(tags, history, snap.tags if snap else None)
        follow = None
        if policy.follow_source and self.opts.sources is not None:
            follow = await self.opts.sources(repo)
        dec = decide(policy, infos, graph, now, follow)
        doomed = set(dec.deleted_manifests)
        parents = parents_index(graph)
        spared: list[str] = []
        if snap is None:
            spared = _children_to_spare(doomed, graph, parents)
            doomed -= set(spared)
        # parents and referrers first: delete d only after everything pointing at it
        order: list[str] = []
        seen: set[str] = set()

        def visit(d: str) -> None:
            if d in seen:
                return
            seen.add(d)
            for p in parents.get(d, []):
                if p in doomed:
                    visit(p)
            for r, n in graph.items():
                if n.subject == d and r in doomed:
                    visit(r)
            order.append(d)

        for d in sorted(doomed):
            visit(d)
        tag_only = sorted(t for t in dec.deleted_tags if tags[t] not in doomed)
        reasons = {**dec.deleted_manifests, **{f"tag:{t}": r for t, r in dec.deleted_tags.items()}}
        plan = RepoPlan(repo, policy, graph_m, tags, order, tag_only, {}, reasons, dec.kept_tags)
        plan.spared_children = spared
        if snap is not None and self.opts.delete_blob_links:
            plan.revisions = set(snap.revisions)
            plan.delete_blobs = _unused_blobs(plan, snap.layers)
        return plan

    async def recheck(self, plan: RepoPlan) -> None:
        """Tags as they are now: a tag that appeared on or moved onto a doomed digest, or an
        index that now lists it, saves it; a tag moved elsewhere is not deleted; a new
        stored revision saves the blobs it uses."""
        repo = plan.repository
        now_tags = await self._tag_digests(repo, await self._limited(self.client.list_tags(repo)))
        saved = {
            d for t, d in now_tags.items() if d in plan.delete_manifests and plan.tags.get(t) != d
        }
        new_roots = {d for t, d in now_tags.items() if d not in plan.manifests}
        snap = await self._stored(repo) if plan.revisions is not None else None
        if snap is not None:
            new_roots |= set(snap.revisions) - plan.manifests.keys()
        extra: dict[str, Manifest] = {}
        if new_roots:
            extra = await self._fetch_graph(repo, new_roots)
            graph = {d: Node(tuple(c.digest for c in m.children)) for d, m in extra.items()}
            saved |= mark(graph, new_roots, follow_referrers=False).manifests
        plan.delete_tags = [t for t in plan.delete_tags if now_tags.get(t) == plan.tags[t]]
        if saved:
            plan.delete_manifests = [d for d in plan.delete_manifests if d not in saved]
        if plan.delete_blobs:
            plan.manifests.update(extra)
            if snap is None or not set(snap.revisions) <= plan.manifests.keys():
                plan.delete_blobs = {}
            else:
                plan.revisions = set(snap.revisions)
                plan.delete_blobs = _unused_blobs(plan, snap.layers)

    def items(self, plan: RepoPlan) -> list[dict[str, Any]]:
        """What `plan` deletes, in the order the sweep does it."""
        site, repo = self.opts.site, plan.repository
        out = [
            item(site, repo, "manifest", d, len(plan.manifests[d].raw), plan.reasons.get(d, ""))
            | {"tags": sorted(t for t, td in plan.tags.items() if td == d)}
            for d in plan.delete_manifests
        ]
        out += [
            item(site, repo, "tag", t, 0, plan.reasons.get(f"tag:{t}", ""))
            for t in plan.delete_tags
        ]
        out += [
            item(site, repo, "blob", b, s, "used only by deleted manifests")
            for b, s in sorted(plan.delete_blobs.items())
        ]
        return out

    # --- sweeping ----------------------------------------------------------------
    def _placeholder_hook(self, tag: str) -> BeforePlaceholder | None:
        """A tag deleted with the placeholder trick pushes a manifest the registry notifies:
        the ledger names it our own before the push (as the daemon's delete path does), so
        a daemon watching the site does not replicate the placeholder."""
        journal, site = self.journal, self.opts.site
        if journal is None:
            return None

        async def hook(repo: str, digest: str) -> None:
            await journal.ledger.record(site, repo, digest, site, tag)

        return hook

    async def _tombstoned(
        self, plan: RepoPlan, marks: list[tuple[str | None, str]], reason: str
    ) -> list[int]:
        """Write the tombstones of one delete BEFORE it is sent (ids, for `_retract`): a
        process killed once the registry carried it out, before it heard back, still
        leaves the record failover catch-up and failback read. One whose delete then
        certainly did not happen (refused, or the item was not there) is withdrawn; a
        crash in between, or a delete whose outcome is unknown, may leave a tombstone
        of a tag still there, whose only effect is that catch-up reports it instead of
        copying it (the site still holds it, so nothing is lost)."""
        if self.journal is None:
            return []
        detail = f"gc {plan.policy.name}: {reason}" if reason else f"gc {plan.policy.name}"
        site, repo, now = self.opts.site, plan.repository, time.time()
        stones = [Tombstone(site, repo, t, d, now, "retention", detail) for t, d in marks]
        return await self.journal.tombstones.record_all(stones)

    async def _retract(self, ids: list[int]) -> None:
        if self.journal is not None:
            await self.journal.tombstones.retract(ids)

    async def _retract_if_refused(self, ids: list[int], exc: RegistryError) -> None:
        """Withdraw on a definite refusal only (a 4xx, a tag seen still in place): after
        a 5xx, timeout or cut the registry may have carried the delete out, and a
        withdrawn tombstone would let failback copy the deleted item back."""
        if not exc.retryable:
            await self._retract(ids)

    async def sweep(self, plan: RepoPlan, result: GCResult, rec: RunRecorder) -> None:
        repo = plan.repository
        planned = {(i["kind"], i.get("tag") or i.get("digest")): i for i in self.items(plan)}
        updates: list[tuple[str, str, str, str | None]] = []

        for d in plan.delete_manifests:  # ordered: sequential on purpose
            key = f"{repo}@{d}"
            on_it = sorted(t for t, td in plan.tags.items() if td == d)
            marks: list[tuple[str | None, str]] = [(None, d), *((t, d) for t in on_it)]
            stones = await self._tombstoned(plan, marks, plan.reasons.get(d, ""))
            try:
                await self.client.delete_manifest(repo, d)
            except RegistryError as exc:
                await self._retract_if_refused(stones, exc)
                result.errors.append(str(exc))
                updates.append(("manifest", key, "error", str(exc)))
                continue
            result.manifests_deleted += 1
            result.deleted_manifests.add(key)
            gone_tags = {f"{repo}:{t}" for t in on_it}
            result.tags_deleted += len(gone_tags)
            result.deleted_tags |= gone_tags
            result.items.append(planned[("manifest", d)])
            updates.append(("manifest", key, "deleted", None))
        for t in plan.delete_tags:
            key = f"{repo}:{t}"
            stones = await self._tombstoned(
                plan, [(t, plan.tags[t])], plan.reasons.get(f"tag:{t}", "")
            )
            try:
                done = await self.client.delete_tag(
                    repo, t, before_placeholder=self._placeholder_hook(t)
                )
            except RegistryError as exc:
                await self._retract_if_refused(stones, exc)
                result.errors.append(str(exc))
                updates.append(("tag", key, "error", str(exc)))
                continue
            if done.maybe_deleted:  # gone after a failed attempt: ours, most likely
                if not done:
                    result.notes.append(done.describe())
                result.tags_deleted += 1
                result.deleted_tags.add(key)
                result.items.append(planned[("tag", t)])
                updates.append(("tag", key, "deleted", None))
            else:
                await self._retract(stones)
                result.notes.append(done.describe())
                updates.append(("tag", key, "kept", done.describe()))

        async def unlink(b: str, size: int) -> bool:
            key = f"{repo}/_layers/{b}"
            try:
                gone = await self._limited(self.client.delete_blob(repo, b))
                if gone:
                    result.blobs_deleted += 1
                    result.bytes_reclaimed += size
                    result.deleted_blobs.add(b)
                updates.append(("blob", key, "deleted", None))
                return gone
            except RegistryError as exc:
                result.errors.append(str(exc))
                updates.append(("blob", key, "error", str(exc)))
                return False

        blobs = sorted(plan.delete_blobs.items())
        unlinked = await asyncio.gather(*(unlink(b, s) for b, s in blobs))
        # listed in the plan's order, not as the concurrent DELETEs finish: the report
        # lists the same items as the dry run, in the same order
        result.items += [
            planned[("blob", b)] for (b, _), gone in zip(blobs, unlinked, strict=True) if gone
        ]
        await rec.update_states(updates)


def _children_to_spare(
    doomed: set[str], graph: Mapping[str, Node], parents: Mapping[str, Sequence[str]]
) -> list[str]:
    """Doomed manifests listed by an index (platform children), when not every manifest
    of the repository is known: an untagged index the API cannot list (pushed before
    the daemon, or its webhook lost) may list them too, and deleting one would break
    it. The index goes alone; the storage pass, which sees every index, decides the
    children. A referrer (it has a subject) follows its subject as before."""
    return sorted(d for d in doomed if d in parents and graph[d].subject is None)


def _unused_blobs(plan: RepoPlan, layers: dict[str, float]) -> dict[str, int]:
    """Blobs linked in the repository that only doomed manifests use, when every stored
    manifest is known (else none: an unseen one may use any of them)."""
    if plan.revisions is None or not plan.revisions <= plan.manifests.keys():
        return {}
    doomed = set(plan.delete_manifests)
    used = {b.digest for d, m in plan.manifests.items() if d not in doomed for b in m.blobs}
    out: dict[str, int] = {}
    for d in doomed:
        for b in plan.manifests[d].blobs:
            if b.digest not in used and b.digest in layers:
                out[b.digest] = b.size
    return out


def _rows(plan: RepoPlan) -> list[CandidateRow]:
    repo = plan.repository
    rows = [
        CandidateRow(
            "manifest",
            f"{repo}@{d}",
            repo,
            d,
            len(plan.manifests[d].raw),
            error=plan.reasons.get(d),
        )
        for d in plan.delete_manifests
    ]
    rows += [
        CandidateRow(
            "tag", f"{repo}:{t}", repo, plan.tags[t], 0, error=plan.reasons.get(f"tag:{t}")
        )
        for t in plan.delete_tags
    ]
    rows += [
        CandidateRow("blob", f"{repo}/_layers/{b}", repo, b, s)
        for b, s in plan.delete_blobs.items()
    ]
    return rows


async def collect_api(client: Any, journal: Journal | None, options: ApiGCOptions) -> GCResult:
    """One API-mode GC run over the repositories the policies cover."""
    col = ApiCollector(client, journal, options)
    rec = RunRecorder(
        journal,
        site=options.site,
        mode="api",
        policy=",".join(p.name for p in options.policies) or None,
        dry_run=options.dry_run,
    )
    run_id = await rec.start()
    result = GCResult(run_id=run_id, dry_run=options.dry_run)
    repos = (
        list(options.repositories) if options.repositories is not None else await client.catalog()
    )
    now = time.time()
    plans: list[RepoPlan] = []
    try:
        await col.load_history()
        for repo in sorted(repos):
            pol = policies_for(options.policies, options.site, repo, "api")
            if pol is None:
                continue
            plan = await col.plan_repository(repo, pol, now)
            await col.recheck(plan)
            plans.append(plan)
            result.kept.update(summary(plan.kept))
        if options.storage is None and plans:
            result.notes.append(NO_BLOBS_WITHOUT_STORAGE)
        spared = sum(len(p.spared_children) for p in plans)
        if spared:
            result.notes.append(NO_CHILDREN_WITHOUT_STORAGE.format(n=spared))
        await rec.add_candidates([r for p in plans for r in _rows(p)])
        mark_summary = {
            "repositories": len(plans),
            "manifests_seen": sum(len(p.manifests) for p in plans),
            "tags_seen": sum(len(p.tags) for p in plans),
        }
        result.mark_summary = mark_summary
        await rec.set_state("marking" if options.dry_run else "sweeping", mark_summary=mark_summary)
        if options.dry_run:
            for p in plans:
                result.items += col.items(p)
                result.manifests_deleted += len(p.delete_manifests)
                result.deleted_manifests |= {f"{p.repository}@{d}" for d in p.delete_manifests}
                doomed = set(p.delete_manifests)
                tags = {t for t, d in p.tags.items() if d in doomed} | set(p.delete_tags)
                result.tags_deleted += len(tags)
                result.deleted_tags |= {f"{p.repository}:{t}" for t in tags}
                result.blobs_deleted += len(p.delete_blobs)
                result.deleted_blobs |= set(p.delete_blobs)
                result.bytes_reclaimed += sum(p.delete_blobs.values())
        else:
            for p in plans:
                await col.sweep(p, result, rec)
        await rec.finish("done", result.to_json())
        return result
    except BaseException as exc:
        result.errors.append(f"{type(exc).__name__}: {exc}")
        await rec.finish("failed", result.to_json())
        raise
