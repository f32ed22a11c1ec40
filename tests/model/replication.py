"""A hypothesis state machine over three real registries: replication, deletes,
failover and failback, checked after each step against a simple model.

Sites: `p` (the primary), `a` and `b` (replicas); one rule `p -> [a, b]` with
`deletes: true` that leaves `tmp*` tags alone. Steps act on the current source
(`p`, or `a` while failed over): push, re-tag, tag delete, digest delete; and
reconcile (`sync`), failover (`p` stopped, `a` promoted) and failback.

Invariants, each checked where it applies:
* after a reconcile, every tag the source holds and the rule covers is at every
  target with the same digest, no target holds a covered tag the source lacks
  (deleted there), and every image at a target is complete (blobs present);
* `--dry-run` predicts the real run item by item, for sync, failover and failback;
* failback neither resurrects a tag deleted at the promoted site during the
  incident nor loses a tag the old primary took and never replicated (even one
  deleted everywhere before the incident and re-pushed: tests/test_model_replication.py
  spells that sequence out); the old primary ends with exactly the promoted site's
  tags plus its own unreplicated ones, less the tags it deleted before it failed
  (the daemon saw the webhook: `tag_delete_seen`) whose delete had not reached the
  promoted site: failback does not copy those back and deletes them there.

The daemon's view of deletes is simulated where it matters to failback: a delete at
the primary with its webhook seen (a tombstone, the registry's clock sometimes 10
minutes ahead), and the targets' webhooks about the deletes a reconcile makes
(always stamped 10 minutes ahead: a registry clock ahead must not turn them into
incident deletes).

The registries are reused across examples: each example works in a fresh
repository (`m<N>/app`) with a fresh journal. `World` holds what outlives an
example. To add steps (the retention engineer's GC steps), subclass
`ReplicationMachine` in another module and add `@rule`s there; `holdings`,
`covered` and `run` are the helpers to build on.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from replicator.blob_index import BlobIndex
from replicator.clients import ClientPool
from replicator.config import Config, config_from_dict
from replicator.copy import CopyEngine
from replicator.failover import FailoverRequest, failback, failover
from replicator.journal import Journal
from replicator.registry.client import RegistryClient
from replicator.registry.site import SiteEndpoint
from replicator.sync import Reconciler
from tests.harness.images import Pusher, assert_image_complete, digest_of, layer_bytes
from tests.harness.registry import Registry

T = TypeVar("T")

TAGS = ["v1", "v2", "v3", "latest", "tmp1"]


@dataclass
class World:
    """What outlives one example: the three registries and a scratch directory."""

    sites: dict[str, Registry]
    scratch: Path
    examples: itertools.count = field(default_factory=itertools.count)
    steps: Counter[str] = field(default_factory=Counter)


def holdings(reg: Registry, repo: str) -> dict[str, str]:
    """tag -> digest at `reg` (read by GET: the test's own view, not the tool's)."""
    with Pusher(reg.url) as p:
        out = {}
        for tag in p.tags(repo):
            resp = p.get_manifest(repo, tag)
            if resp.status_code == 200:
                out[tag] = digest_of(resp.content)
        return out


def covered(tags: dict[str, str]) -> dict[str, str]:
    """What the rule covers of a tag -> digest map."""
    return {t: d for t, d in tags.items() if not t.startswith("tmp")}


class ReplicationMachine(RuleBasedStateMachine):
    world: World  # set by the test before running

    def __init__(self) -> None:
        super().__init__()
        world = self.world
        n = next(world.examples)
        self.repo = f"m{n}/app"
        self.seed_prefix = f"ex{n}"
        self.sites = world.sites
        if self.sites["p"].proc is None:
            self.sites["p"].start()
        self.config: Config = config_from_dict(
            {
                "journal": str(world.scratch / f"journal-{n}.db"),
                "sites": {
                    name: {"url": reg.url, "insecure": True} for name, reg in self.sites.items()
                },
                "rules": [
                    {
                        "name": "r",
                        "from": "p",
                        "to": ["a", "b"],
                        "repositories": [self.repo],
                        "deletes": True,
                        "tags": {"exclude": ["tmp*"]},
                    }
                ],
            }
        )
        self.loop = asyncio.new_event_loop()
        self.journal = Journal(self.config.journal)
        self.engine = CopyEngine(BlobIndex(self.journal))
        self.pool = self._new_pool()
        self.source = "p"
        self.p_at_fail: dict[str, str] = {}
        self.a_at_failover: dict[str, str] = {}
        # tag -> digest p deleted with its webhook seen, and not pushed again since
        self.p_deleted_seen: dict[str, str] = {}
        # (tag, digest) a reconcile saw p hold: what the journal knows of p's tags
        self.seen_at_p: set[tuple[str, str]] = set()

    # ------------------------------------------------------------------ helpers
    def run(self, work: Awaitable[T]) -> T:
        return self.loop.run_until_complete(work)

    def _new_pool(self) -> ClientPool:
        return ClientPool(self.config, retries=1, backoff_base=0.01)

    def _renew_pool(self) -> None:
        self.run(self.pool.aclose())
        self.pool = self._new_pool()

    def teardown(self) -> None:
        self.run(self.pool.aclose())
        self.journal.close()
        self.loop.close()
        if self.sites["p"].proc is None:
            self.sites["p"].start()

    @property
    def targets(self) -> list[str]:
        return ["a", "b"] if self.source == "p" else ["b"]

    def at(self, site: str) -> dict[str, str]:
        return holdings(self.sites[site], self.repo)

    def _step(self) -> None:
        self.world.steps[sys._getframe(1).f_code.co_name] += 1

    # ------------------------------------------------------------------ steps at the source
    @rule(tag=st.sampled_from(TAGS), seed=st.integers(0, 3))
    def push(self, tag: str, seed: int) -> None:
        self._step()
        with Pusher(self.sites[self.source].url) as p:
            p.push_image(self.repo, tag, [layer_bytes(f"{self.seed_prefix}-{seed}", 300)])
        if self.source == "p":
            self.p_deleted_seen.pop(tag, None)

    # Tags to act on are drawn as indexes into what the source holds: every draw
    # happens whatever the registry holds, so hypothesis can replay a sequence.
    @rule(pick=st.integers(0, 7), new_tag=st.sampled_from(TAGS))
    def retag(self, pick: int, new_tag: str) -> None:
        held = self.at(self.source)
        if not held:
            return
        self._step()
        src_tag = sorted(held)[pick % len(held)]
        with Pusher(self.sites[self.source].url) as p:
            resp = p.get_manifest(self.repo, src_tag)
            p.push_manifest(self.repo, new_tag, resp.content, resp.headers["content-type"])
        if self.source == "p":
            self.p_deleted_seen.pop(new_tag, None)

    @rule(pick=st.integers(0, 7))
    def tag_delete(self, pick: int) -> None:
        held = self.at(self.source)
        if not held:
            return
        self._step()
        self._delete_tag(sorted(held)[pick % len(held)])

    def _delete_tag(self, tag: str) -> None:
        reg = self.sites[self.source]

        async def delete() -> None:
            async with RegistryClient(
                SiteEndpoint(name=self.source, url=reg.url, insecure=True)
            ) as client:
                assert await client.delete_tag(self.repo, tag)

        self.run(delete())

    @precondition(lambda self: self.source == "p")
    @rule(pick=st.integers(0, 7), ahead=st.sampled_from([0.0, 600.0]))
    def tag_delete_seen(self, pick: int, ahead: float) -> None:
        """A tag delete at p whose webhook the daemon saw, recorded as `_remember` does
        (inventory forgotten, an `observed` tombstone at the registry's time, `ahead`
        of ours)."""
        held = self.at("p")
        if not held:
            return
        self._step()
        tag = sorted(held)[pick % len(held)]
        self._delete_tag(tag)
        self.p_deleted_seen[tag] = held[tag]

        async def remember() -> None:
            await self.journal.inventory.forget("p", self.repo, tag=tag)
            await self.journal.tombstones.record(
                "p",
                self.repo,
                tag=tag,
                digest=held[tag],
                origin="observed",
                at=time.time() + ahead,
            )

        self.run(remember())

    @rule(pick=st.integers(0, 7))
    def digest_delete(self, pick: int) -> None:
        held = self.at(self.source)
        if not held:
            return
        self._step()
        digest = held[sorted(held)[pick % len(held)]]
        url = self.sites[self.source].url
        with Pusher(url) as p:
            assert p.http.delete(f"{url}/v2/{self.repo}/manifests/{digest}").status_code == 202

    # ------------------------------------------------------------------ the tool
    @rule()
    def reconcile(self) -> None:
        self._step()
        reconciler = Reconciler(self.config, self.journal, self.pool, self.engine)
        dry = self.run(reconciler.run(dry_run=True))
        real = self.run(Reconciler(self.config, self.journal, self.pool, self.engine).run())
        assert dry.failures == [] and real.failures == [], (dry.failures, real.failures)
        # targets are planned concurrently: compare item by item, in a stable order
        planned = sorted(a.describe() for a in dry.actions)
        done = sorted(a.describe() for a in real.actions)
        assert planned == done, f"dry run {planned} != real run {done}"
        source = covered(self.at(self.source))
        if self.source == "p":
            self.seen_at_p |= set(source.items())
        # the targets' webhooks about our deletes, their registry clocks 10 minutes ahead
        for action in (a for a in real.actions if a.kind == "delete" and a.tag):
            self.run(
                self.journal.tombstones.record(
                    action.target_site,
                    action.target_repository,
                    tag=action.tag,
                    digest=action.target_digest,
                    origin="observed",
                    at=time.time() + 600,
                )
            )
        for target in self.targets:
            there = covered(self.at(target))
            assert there == source, f"{target} after reconcile: {there} != source {source}"
            for tag in there:
                assert_image_complete(self.sites[target].url, self.repo, tag)

    @precondition(lambda self: self.source == "p")
    @rule()
    def fail_over(self) -> None:
        self._step()
        self.p_at_fail = covered(self.at("p"))
        b_before = covered(self.at("b"))
        self.sites["p"].stop()
        self._renew_pool()
        dry = self.run(
            failover(
                self.config,
                self.journal,
                self.pool,
                self.engine,
                FailoverRequest("a", dry_run=True),
            )
        )
        real = self.run(
            failover(self.config, self.journal, self.pool, self.engine, FailoverRequest("a"))
        )
        assert real.recorded and real.failures == [], real.failures
        assert sorted(c.describe("a") for c in dry.copies) == sorted(
            c.describe("a") for c in real.copies
        )
        assert sorted(c.describe() for c in dry.conflicts) == sorted(
            c.describe() for c in real.conflicts
        )
        self.source = "a"
        self.a_at_failover = covered(self.at("a"))
        if not real.conflicts:  # a took whatever b had that it lacked
            assert all(self.a_at_failover.get(t) == d for t, d in b_before.items())

    @precondition(lambda self: self.source == "a")
    @rule()
    def fail_back(self) -> None:
        self._step()
        self.sites["p"].start()
        self._renew_pool()
        a_now = covered(self.at("a"))
        dry = self.run(
            failback(self.config, self.journal, self.pool, self.engine, "p", dry_run=True)
        )
        real = self.run(failback(self.config, self.journal, self.pool, self.engine, "p"))
        assert real.failures == [] and real.ended, real.failures
        assert sorted(dry.plan()) == sorted(real.plan()), (dry.plan(), real.plan())
        self.source = "p"
        p_now, a_after, b_after = (covered(self.at(s)) for s in ("p", "a", "b"))
        # deleted at p before it failed (webhook seen), not yet at a: held back from the
        # copy back and deleted at a. Certainly when a holds the very digest p deleted;
        # when a holds an older replica of the tag, the journal's ledger usually tells
        # (either outcome is checked for consistency below).
        # a tag a did not hold at failover is its own incident write: never held back
        unpropagated = {
            t: d
            for t, d in a_now.items()
            if t not in self.p_at_fail and t in self.p_deleted_seen and t in self.a_at_failover
        }
        certain = {
            t
            for t, d in unpropagated.items()
            if self.p_deleted_seen[t] == d == self.a_at_failover[t]
        }
        held_back = {t for t in unpropagated if t not in a_after}
        assert certain <= held_back <= set(unpropagated), (certain, held_back, unpropagated)
        for t in held_back - certain:
            assert (t, a_now[t]) in self.seen_at_p or a_now[t] == self.p_deleted_seen[t]
        a_kept = {t: d for t, d in a_now.items() if t not in held_back}
        for tag, digest in a_kept.items():  # the promoted site's tags win
            assert p_now.get(tag) == digest, f"p:{tag} after failback"
        for tag in held_back:
            assert tag not in p_now, f"failback resurrected {tag}, deleted at p before it failed"
        for tag in set(self.a_at_failover) - set(a_now):  # deleted during the incident
            assert tag not in p_now, f"failback resurrected {tag} at p"
        # exactly: the promoted site's tags, plus p's own that a neither held at failover
        # nor holds now (p took them and never replicated them; nothing here deletes at a
        # with a tombstone during the incident), less the held back ones
        unreplicated = {
            t: d
            for t, d in self.p_at_fail.items()
            if t not in self.a_at_failover and t not in a_now
        }
        assert p_now == {**unreplicated, **a_kept}, (p_now, a_now, self.p_at_fail)
        assert a_after == {**unreplicated, **a_kept}, (a_after, a_now)
        self.p_deleted_seen = {t: d for t, d in self.p_deleted_seen.items() if t not in p_now}
        for tag, digest in self.p_at_fail.items():  # taken by p, never replicated
            if tag in self.a_at_failover or tag in a_now:
                continue
            for name, held in (("p", p_now), ("a", a_after), ("b", b_after)):
                assert held.get(tag) == digest, f"{name} lost p's unreplicated {tag}"

    @invariant()
    def source_is_reachable(self) -> None:
        assert self.sites[self.source].proc is not None


def machine_for(world: World) -> type[ReplicationMachine]:
    """The machine class bound to `world` (hypothesis builds one per example)."""
    return type("BoundReplicationMachine", (ReplicationMachine,), {"world": world})


def settings_kwargs(examples: int, steps: int) -> dict[str, Any]:
    from hypothesis import HealthCheck

    return {
        "max_examples": examples,
        "stateful_step_count": steps,
        "deadline": None,
        "suppress_health_check": list(HealthCheck),
        "derandomize": False,
    }
