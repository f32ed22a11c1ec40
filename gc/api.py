"""Mark-and-sweep through the registry API, for registries whose disk we cannot see.

Per repository covered by an api/both-mode policy: list tags, HEAD them (a HEAD
is not a pull), GET manifests by digest, follow index children and referrers
(referrers API or the ``sha256-<hex>`` fallback tag), add untagged manifests
the journal knows of, then `policy.decide` and sweep:

* manifests not marked, parents before children and referrers before their
  subjects (an interrupted sweep never leaves an index pointing at a hole);
  DELETE by digest also removes every tag on it, so a digest any kept tag
  points to is marked and never deleted;
* expired tags on digests that stay: DELETE by tag where the registry supports
  it (distribution 3); 2.8 answers 400 and the tag is left, with a warning;
* the repository's links to blobs that only deleted manifests used
  (``DELETE /v2/<repo>/blobs/<digest>``). Bytes are freed by the registry's own
  storage collection (or ours, `storage`), which is why `bytes_reclaimed` counts
  what the deleted manifests referenced exclusively.

Right before deleting, each repository's tags are listed and HEADed again; a
tag that appeared or moved onto a doomed digest saves it. Limits, said plainly:
the API cannot list untagged manifests, so only those the journal has seen
(webhooks, scans) are considered; a push racing the blob-link deletes fails
validation on the registry (the client retries), it does not break an image.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from replicator.gc.mark import Node, mark, parents_index
from replicator.gc.policy import RetentionPolicy, TagInfo, decide, policies_for
from replicator.gc.runs import CandidateRow, RunRecorder
from replicator.gc.storage import GCResult
from replicator.journal import Journal
from replicator.manifest import Manifest
from replicator.registry.errors import NotFound, RegistryError

log = logging.getLogger("replicator.gc.api")


@dataclass
class ApiGCOptions:
    site: str
    policies: Sequence[RetentionPolicy]
    dry_run: bool = False
    concurrency: int = 8
    delete_blob_links: bool = True
    repositories: Sequence[str] | None = None  # default: the catalog


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


class ApiCollector:
    def __init__(self, client: Any, journal: Journal | None, options: ApiGCOptions) -> None:
        self.client = client
        self.journal = journal
        self.opts = options
        self._sem = asyncio.Semaphore(max(1, options.concurrency))

    async def _limited(self, coro):
        async with self._sem:
            return await coro

    # --- reading ---------------------------------------------------------------
    async def _tag_digests(self, repo: str, tags: list[str]) -> dict[str, str]:
        descs = await asyncio.gather(
            *(self._limited(self.client.head_manifest(repo, t)) for t in tags)
        )
        return {t: d.digest for t, d in zip(tags, descs, strict=True) if d is not None}

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

    async def _journal_times(
        self, repo: str
    ) -> tuple[dict[str, float], dict[str, float], dict[str, float], set[str]]:
        """(tag push times, manifest push times, last pull per digest, known untagged)."""
        if self.journal is None:
            return {}, {}, {}, set()
        site = self.opts.site
        tags = await self.journal.inventory.push_times(site, repo)
        pulls = await self.journal.events.last_pulls(site, repo)
        pushed = await self.journal.events.first_pushes(site, repo)
        return tags, pushed, pulls, set(pushed)

    async def _created(self, repo: str, m: Manifest) -> float | None:
        """The image config's `created`, the push time of last resort."""
        cfg = m.config
        if m.is_index or cfg is None or cfg.size > 1 << 20:
            return None
        try:
            doc = json.loads(await self._limited(self.client.get_blob(repo, cfg.digest)))
            created = doc.get("created") if isinstance(doc, dict) else None
            return (
                datetime.fromisoformat(str(created).replace("Z", "+00:00")).timestamp()
                if created
                else None
            )
        except (RegistryError, ValueError, TypeError):
            return None

    async def plan_repository(self, repo: str, policy: RetentionPolicy, now: float) -> RepoPlan:
        tag_names = await self._limited(self.client.list_tags(repo))
        tags = await self._tag_digests(repo, tag_names)
        jt, jm, pulls, known = await self._journal_times(repo)
        graph_m = await self._fetch_graph(repo, set(tags.values()) | known)
        pushed: dict[str, float | None] = {}
        need_created = [d for d in graph_m if d not in jm]
        created = await asyncio.gather(*(self._created(repo, graph_m[d]) for d in need_created))
        pushed.update(dict(zip(need_created, created, strict=True)))
        pushed.update({d: jm[d] for d in graph_m if d in jm})
        graph = {
            d: Node(
                tuple(c.digest for c in m.children),
                tuple(b.digest for b in m.blobs),
                m.subject.digest if m.subject else None,
                pushed.get(d),
            )
            for d, m in graph_m.items()
        }
        infos = [
            TagInfo(t, d, pushed_at=jt.get(t, pushed.get(d)), pulled_at=pulls.get(d))
            for t, d in tags.items()
        ]
        dec = decide(policy, infos, graph, now)
        doomed = set(dec.deleted_manifests)
        # parents and referrers first: delete d only after everything pointing at it
        parents = parents_index(graph)
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
        tag_only = [t for t in dec.deleted_tags if tags[t] not in doomed]
        blobs: dict[str, int] = {}
        if self.opts.delete_blob_links:
            kept_blobs = mark(graph, dec.kept_manifests, follow_referrers=False).blobs
            for d in doomed:
                for b in graph_m[d].blobs:
                    if b.digest not in kept_blobs:
                        blobs[b.digest] = b.size
        reasons = {**dec.deleted_manifests, **{f"tag:{t}": r for t, r in dec.deleted_tags.items()}}
        return RepoPlan(repo, policy, graph_m, tags, order, tag_only, blobs, reasons)

    async def recheck(self, plan: RepoPlan) -> None:
        """Tags as they are now: a tag that appeared on or moved onto a doomed digest, or an
        index that now lists it, saves it."""
        now_tags = await self._tag_digests(
            plan.repository, await self._limited(self.client.list_tags(plan.repository))
        )
        saved = {
            d for t, d in now_tags.items() if d in plan.delete_manifests and plan.tags.get(t) != d
        }
        new_roots = {d for t, d in now_tags.items() if d not in plan.manifests}
        if new_roots:
            extra = await self._fetch_graph(plan.repository, new_roots)
            graph = {d: Node(tuple(c.digest for c in m.children)) for d, m in extra.items()}
            saved |= mark(graph, new_roots, follow_referrers=False).manifests
        if saved:
            plan.delete_manifests = [d for d in plan.delete_manifests if d not in saved]
            for d in saved:
                m = plan.manifests.get(d)
                for b in m.blobs if m else []:
                    plan.delete_blobs.pop(b.digest, None)

    # --- sweeping ----------------------------------------------------------------
    async def sweep(self, plan: RepoPlan, result: GCResult, rec: RunRecorder) -> None:
        repo = plan.repository
        updates: list[tuple[str, str, str, str | None]] = []
        for d in plan.delete_manifests:  # ordered: sequential on purpose
            key = f"{repo}@{d}"
            try:
                await self.client.delete_manifest(repo, d)
                result.manifests_deleted += 1
                result.deleted_manifests.add(key)
                gone_tags = {f"{repo}:{t}" for t, td in plan.tags.items() if td == d}
                result.tags_deleted += len(gone_tags)
                result.deleted_tags |= gone_tags
                updates.append(("manifest", key, "deleted", None))
            except RegistryError as exc:
                result.errors.append(str(exc))
                updates.append(("manifest", key, "error", str(exc)))
        for t in plan.delete_tags:
            key = f"{repo}:{t}"
            try:
                await self.client.delete_manifest(repo, t)
                result.tags_deleted += 1
                result.deleted_tags.add(key)
                updates.append(("tag", key, "deleted", None))
            except RegistryError as exc:
                msg = (
                    f"{repo}:{t}: the registry cannot delete a tag by name "
                    f"(HTTP {exc.status}); left in place"
                )
                result.warnings.append(msg)
                updates.append(("tag", key, "kept", msg))

        async def unlink(b: str, size: int) -> None:
            key = f"{repo}/_layers/{b}"
            try:
                if await self._limited(self.client.delete_blob(repo, b)):
                    result.blobs_deleted += 1
                    result.bytes_reclaimed += size
                    result.deleted_blobs.add(b)
                updates.append(("blob", key, "deleted", None))
            except RegistryError as exc:
                result.errors.append(str(exc))
                updates.append(("blob", key, "error", str(exc)))

        await asyncio.gather(*(unlink(b, s) for b, s in sorted(plan.delete_blobs.items())))
        await rec.update_states(updates)


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
        for repo in sorted(repos):
            pol = policies_for(options.policies, options.site, repo, "api")
            if pol is None:
                continue
            plan = await col.plan_repository(repo, pol, now)
            await col.recheck(plan)
            plans.append(plan)
        await rec.add_candidates([r for p in plans for r in _rows(p)])
        summary = {
            "repositories": len(plans),
            "manifests_seen": sum(len(p.manifests) for p in plans),
            "tags_seen": sum(len(p.tags) for p in plans),
        }
        result.mark_summary = summary
        await rec.set_state("marking" if options.dry_run else "sweeping", mark_summary=summary)
        if options.dry_run:
            for p in plans:
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
