"""Failback semantics and renaming failover on real registries (issue 11, cases 3 and 10).

The promoted site is the truth for the incident window: what it deleted stays
deleted, what it wrote wins; what the old primary took and never replicated is
not lost. `failback --dry-run` prints exactly the plan the real run carries out.
"""

from __future__ import annotations

import time

import pytest

from replicator.blob_index import BlobIndex
from replicator.clients import ClientPool
from replicator.config import config_from_dict
from replicator.copy import CopyEngine
from replicator.errors import UsageError
from replicator.failover import (
    FailoverRequest,
    deleted_since,
    failback,
    failover,
    returning_decisions,
    unpropagated_delete,
)
from replicator.journal import Journal
from replicator.registry.client import RegistryClient
from replicator.registry.site import SiteEndpoint
from replicator.sync import Reconciler
from tests.harness.images import Pusher, assert_image_complete, layer_bytes
from tests.harness.journal import sql


def tags(url: str, repo: str = "team/app") -> list[str]:
    with Pusher(url) as p:
        return sorted(p.tags(repo))


def parts(tmp_path, sites: dict, rules: list[dict]):
    config = config_from_dict(
        {
            "journal": str(tmp_path / "journal.db"),
            "sites": {n: {"url": r.url, "insecure": True} for n, r in sites.items()},
            "rules": rules,
        }
    )
    journal = Journal(config.journal)
    return config, journal, ClientPool(config, retries=1, backoff_base=0.01)


def test_returning_decisions_are_pure():
    config = config_from_dict(
        {
            "sites": {"p": {"url": "https://p.example"}, "a": {"url": "https://a.example"}},
            "rules": [{"name": "r", "from": "p", "to": ["a"], "tags": {"include": ["v*"]}}],
        }
    )
    rule = config.rules[0]
    returning = {"v6": "d6", "v7": "d7", "v9": "d9", "dev": "dx"}
    deletes, spread = returning_decisions(rule, returning, ["v7"], {"v6", "v7"})
    assert deletes == ["v6"] and spread == ["v9"]  # dev is not the rule's


async def test_failback_keeps_incident_deletes_and_spreads_unreplicated_tags(
    registry_factory, tmp_path
):
    p, a, b = registry_factory("p"), registry_factory("a"), registry_factory("b")
    config, journal, pool = parts(
        tmp_path,
        {"p": p, "a": a, "b": b},
        [{"name": "apps", "from": "p", "to": ["a", "b"], "deletes": True}],
    )
    engine = CopyEngine(BlobIndex(journal))
    try:
        with Pusher(p.url) as push:
            push.push_image("team/app", "v6.0.0", [layer_bytes("v6", 200)])
            v7 = push.push_image("team/app", "v7.0.0", [layer_bytes("v7", 200)])
        assert (await Reconciler(config, journal, pool, engine).run()).failures == []
        with Pusher(p.url) as push:  # taken by p, never replicated: p fails now
            v9 = push.push_image("team/app", "v9.0.0", [layer_bytes("v9", 200)])
            push.push_image("team/app", "hot", [layer_bytes("p-hot", 200)])
        p.stop()
        await pool.aclose()
        pool = ClientPool(config, retries=1, backoff_base=0.01)
        done = await failover(config, journal, pool, engine, FailoverRequest("a"))
        assert done.recorded and done.failures == []
        # the incident: a deletes v6.0.0 (no daemon saw it), takes v8.0.0 and its own hot
        async with RegistryClient(SiteEndpoint(name="a", url=a.url, insecure=True)) as ca:
            assert await ca.delete_tag("team/app", "v6.0.0")
        with Pusher(a.url) as push:
            v8 = push.push_image("team/app", "v8.0.0", [layer_bytes("v8", 200)])
            hot = push.push_image("team/app", "hot", [layer_bytes("a-hot", 200)])
        assert (await Reconciler(config, journal, pool, engine).run()).failures == []
        assert tags(b.url) == ["hot", "v7.0.0", "v8.0.0"]
        p.start()

        dry = await failback(config, journal, pool, engine, "p", dry_run=True)
        assert dry.failures == [] and dry.ended == []
        assert tags(p.url) == ["hot", "v6.0.0", "v7.0.0", "v9.0.0"]  # nothing changed
        items = {(i.kind, i.site, i.tag) for i in dry.items}
        assert items == {
            ("delete", "p", "v6.0.0"),
            ("spread", "a", "v9.0.0"),
            ("spread", "b", "v9.0.0"),
            ("conflict", "p", "hot"),
        }
        real = await failback(config, journal, pool, engine, "p")
        assert real.failures == [] and real.ended
        assert real.plan() == dry.plan(), "the dry run predicts the real run item by item"

        assert tags(p.url) == ["hot", "v7.0.0", "v8.0.0", "v9.0.0"]
        assert assert_image_complete(p.url, "team/app", "hot") == hot.digest  # promoted wins
        assert assert_image_complete(p.url, "team/app", "v8.0.0") == v8.digest
        assert assert_image_complete(p.url, "team/app", "v7.0.0") == v7.digest
        for site in (a, b):
            assert assert_image_complete(site.url, "team/app", "v9.0.0") == v9.digest
            assert "v6.0.0" not in tags(site.url)
        stones = await journal.tombstones.at_site("p", "team/app")
        assert [(s.tag, s.origin) for s in stones] == [("v6.0.0", "performed")]
        after = await Reconciler(config, journal, pool, engine).run()
        assert after.failures == [] and after.stats.copied == 0 and after.deleted == 0
        assert not any(x.tag == "v6.0.0" and x.kind == "copy" for x in after.actions)
    finally:
        await pool.aclose()
        journal.close()


async def test_failover_and_failback_of_renaming_rules(registry_factory, tmp_path):
    """Case 10: r1 renames into the promoted site (prefix), r2 (strip_prefix) only
    targets c. Neither is ambiguous: failover proceeds, failback maps names back."""
    p, a, c = registry_factory("p"), registry_factory("a"), registry_factory("c")
    config, journal, pool = parts(
        tmp_path,
        {"p": p, "a": a, "c": c},
        [
            {"name": "r1", "from": "p", "to": ["a"], "rename": {"prefix": "m/"}},
            {
                "name": "r2",
                "from": "p",
                "to": ["c"],
                "repositories": ["team/**"],
                "rename": {"strip_prefix": "team/"},
            },
        ],
    )
    engine = CopyEngine(BlobIndex(journal))
    try:
        with Pusher(p.url) as push:
            push.push_image("team/app", "v1", [layer_bytes("r-v1", 200)])
        assert (await Reconciler(config, journal, pool, engine).run()).failures == []
        assert tags(a.url, "m/team/app") == ["v1"] and tags(c.url, "app") == ["v1"]
        with Pusher(p.url) as push:
            v2 = push.push_image("team/app", "v2", [layer_bytes("r-v2", 200)])
        r2 = [r for r in config.rules if r.name == "r2"]
        assert (await Reconciler(config, journal, pool, engine).run(rules=r2)).failures == []
        p.stop()
        await pool.aclose()
        pool = ClientPool(config, retries=1, backoff_base=0.01)

        done = await failover(config, journal, pool, engine, FailoverRequest("a", "p"))
        assert done.recorded and done.failures == []
        # r2's replica c held app:v2 only; a takes it under the source name
        assert assert_image_complete(a.url, "team/app", "v2") == v2.digest
        with Pusher(a.url) as push:
            v3 = push.push_image("team/app", "v3", [layer_bytes("r-v3", 200)])
            m4 = push.push_image("m/team/app", "v4", [layer_bytes("r-v4", 200)])
        assert (await Reconciler(config, journal, pool, engine).run()).failures == []
        assert assert_image_complete(c.url, "app", "v3") == v3.digest
        p.start()
        dry = await failback(config, journal, pool, engine, "p", dry_run=True)
        real = await failback(config, journal, pool, engine, "p")
        assert real.failures == [] and real.ended and real.plan() == dry.plan()
        assert tags(p.url) == ["v1", "v2", "v3", "v4"]
        assert assert_image_complete(p.url, "team/app", "v4") == m4.digest
    finally:
        await pool.aclose()
        journal.close()


def test_deleted_since_is_pure():
    assert not deleted_since(None, [(5.0, "d1")], {"b": "d1"})
    assert deleted_since(9.0, [(5.0, "d1")], {"b": "d1"})
    assert not deleted_since(3.0, [(5.0, "d1")], {"b": "d1"})  # pushed again after the delete
    assert deleted_since(3.0, [(5.0, "d9")], {"b": "d1"})  # nothing known of b's digest


async def test_catch_up_does_not_undo_a_delete_not_yet_propagated(registry_factory, tmp_path):
    """v1 deleted at the primary (the daemon saw the webhook: a tombstone), propagated to
    a but not yet to b when the primary is lost: failover must not copy v1 from b to a."""
    p, a, b = registry_factory("p"), registry_factory("a"), registry_factory("b")
    config, journal, pool = parts(
        tmp_path,
        {"p": p, "a": a, "b": b},
        [{"name": "apps", "from": "p", "to": ["a", "b"], "deletes": True}],
    )
    engine = CopyEngine(BlobIndex(journal))
    only_a = config.rules[0].model_copy(update={"to": ["a"]})
    try:
        with Pusher(p.url) as push:
            push.push_image("team/app", "v1", [layer_bytes("c-v1", 200)])
            push.push_image("team/app", "v2", [layer_bytes("c-v2", 200)])
        assert (await Reconciler(config, journal, pool, engine).run()).failures == []
        async with RegistryClient(SiteEndpoint(name="p", url=p.url, insecure=True)) as cp:
            assert await cp.delete_tag("team/app", "v1")
        await journal.tombstones.record("p", "team/app", tag="v1", digest=None, origin="observed")
        assert (await Reconciler(config, journal, pool, engine).run(rules=[only_a])).deleted == 1
        assert tags(b.url) == ["v1", "v2"]
        p.stop()
        plan = await failover(config, journal, pool, engine, FailoverRequest("a", dry_run=True))
        assert plan.copies == [] and [c.tag for c in plan.conflicts] == ["v1"]
        done = await failover(config, journal, pool, engine, FailoverRequest("a"))
        assert done.recorded and tags(a.url) == ["v2"]
        # the rules now run a -> b, and the delete reaches b
        after = await Reconciler(config, journal, pool, engine).run()
        assert after.failures == [] and tags(b.url) == ["v2"]
    finally:
        await pool.aclose()
        journal.close()


async def test_failback_keeps_a_tag_re_pushed_at_the_old_primary_before_the_incident(
    registry_factory, tmp_path
):
    """Only a delete seen since the incident began (a tombstone since `started_at`) or a
    tag the promoted site held at failover and lacks now counts as "deleted during the
    incident". v1 was replicated, deleted (tombstoned at a) and re-pushed at p, which
    then failed before replicating it: failback must spread p's new v1, not delete it.
    v2, deleted before the incident, stays deleted everywhere."""
    p, a = registry_factory("p"), registry_factory("a")
    config, journal, pool = parts(
        tmp_path, {"p": p, "a": a}, [{"name": "apps", "from": "p", "to": ["a"], "deletes": True}]
    )
    engine = CopyEngine(BlobIndex(journal))
    try:
        with Pusher(p.url) as push:
            push.push_image("team/app", "v1", [layer_bytes("rp-v1", 200)])
            push.push_image("team/app", "v2", [layer_bytes("rp-v2", 200)])
            push.push_image("team/app", "v3", [layer_bytes("rp-v3", 200)])
        assert (await Reconciler(config, journal, pool, engine).run()).failures == []
        async with RegistryClient(SiteEndpoint(name="p", url=p.url, insecure=True)) as cp:
            assert await cp.delete_tag("team/app", "v1")
            assert await cp.delete_tag("team/app", "v2")
        deleted = await Reconciler(config, journal, pool, engine).run()
        assert deleted.failures == [] and deleted.deleted == 2 and tags(a.url) == ["v3"]
        assert {s.tag for s in await journal.tombstones.at_site("a", "team/app")} == {"v1", "v2"}
        with Pusher(p.url) as push:  # re-pushed at p, never replicated: p fails now
            new_v1 = push.push_image("team/app", "v1", [layer_bytes("rp-v1-new", 200)])
        p.stop()
        await pool.aclose()
        pool = ClientPool(config, retries=1, backoff_base=0.01)
        done = await failover(config, journal, pool, engine, FailoverRequest("a"))
        assert done.recorded and done.failures == []
        p.start()

        dry = await failback(config, journal, pool, engine, "p", dry_run=True)
        assert dry.failures == []
        assert [(i.kind, i.site, i.tag) for i in dry.items] == [("spread", "a", "v1")]
        real = await failback(config, journal, pool, engine, "p")
        assert real.failures == [] and real.ended and real.plan() == dry.plan()
        for site in (p, a):
            assert tags(site.url) == ["v1", "v3"]
            assert assert_image_complete(site.url, "team/app", "v1") == new_v1.digest
    finally:
        await pool.aclose()
        journal.close()


async def test_failback_deletes_only_what_the_incident_deleted(registry_factory, tmp_path):
    """During the incident a deletes v3, which it held at failover (no daemon saw it), and
    v4, which it took, and deleted with a tombstone, while p held an unreplicated v4: both
    go from p. v5, which p took and a never held nor deleted, is spread."""
    p, a = registry_factory("p"), registry_factory("a")
    config, journal, pool = parts(
        tmp_path, {"p": p, "a": a}, [{"name": "apps", "from": "p", "to": ["a"], "deletes": True}]
    )
    engine = CopyEngine(BlobIndex(journal))
    try:
        with Pusher(p.url) as push:
            push.push_image("team/app", "v3", [layer_bytes("id-v3", 200)])
        assert (await Reconciler(config, journal, pool, engine).run()).failures == []
        with Pusher(p.url) as push:
            push.push_image("team/app", "v4", [layer_bytes("id-v4-p", 200)])
            v5 = push.push_image("team/app", "v5", [layer_bytes("id-v5", 200)])
        p.stop()
        await pool.aclose()
        pool = ClientPool(config, retries=1, backoff_base=0.01)
        done = await failover(config, journal, pool, engine, FailoverRequest("a"))
        assert done.recorded and done.failures == []
        async with RegistryClient(SiteEndpoint(name="a", url=a.url, insecure=True)) as ca:
            assert await ca.delete_tag("team/app", "v3")
            with Pusher(a.url) as push:
                push.push_image("team/app", "v4", [layer_bytes("id-v4-a", 200)])
            assert await ca.delete_tag("team/app", "v4")
        await journal.tombstones.record("a", "team/app", tag="v4", digest=None, origin="observed")
        p.start()

        dry = await failback(config, journal, pool, engine, "p", dry_run=True)
        assert dry.failures == []
        assert sorted((i.kind, i.site, i.tag) for i in dry.items) == [
            ("delete", "p", "v3"),
            ("delete", "p", "v4"),
            ("spread", "a", "v5"),
        ]
        real = await failback(config, journal, pool, engine, "p")
        assert real.failures == [] and real.ended and real.plan() == dry.plan()
        for site in (p, a):
            assert tags(site.url) == ["v5"]
            assert assert_image_complete(site.url, "team/app", "v5") == v5.digest
    finally:
        await pool.aclose()
        journal.close()


async def test_failback_dry_run_ranks_latest_by_the_journal_as_the_real_run(
    registry_factory, tmp_path
):
    """`latest: 1` over non-version tags ranks by push times, which only the journal
    knows (the daemon's webhooks at the promoted site): the dry run must read them as
    the real run does, or it plans another tag. It writes nothing to the journal."""
    p, a = registry_factory("p"), registry_factory("a")
    config, journal, pool = parts(
        tmp_path,
        {"p": p, "a": a},
        [{"name": "apps", "from": "p", "to": ["a"], "tags": {"latest": 1}}],
    )
    engine = CopyEngine(BlobIndex(journal))
    try:
        with Pusher(p.url) as push:
            zulu = push.push_image("team/app", "zulu", [layer_bytes("lj-zulu", 200)])
        assert (await Reconciler(config, journal, pool, engine).run()).failures == []
        p.stop()
        await pool.aclose()
        pool = ClientPool(config, retries=1, backoff_base=0.01)
        assert (await failover(config, journal, pool, engine, FailoverRequest("a"))).recorded
        with Pusher(a.url) as push:  # the incident: a takes `alpha`, newer than `zulu`
            alpha = push.push_image("team/app", "alpha", [layer_bytes("lj-alpha", 200)])
        await journal.inventory.record_tags("a", "team/app", {"zulu": zulu.digest}, 1000.0)
        await journal.inventory.record_tags("a", "team/app", {"alpha": alpha.digest}, 2000.0)
        p.start()

        def journal_rows() -> dict[str, int]:
            counts = {}
            for table in ("inventory_tags", "replicated", "sync_runs", "tombstones"):
                counts[table] = sql(journal, f"SELECT COUNT(*) AS n FROM {table}")[0]["n"]
            return counts

        before = journal_rows()
        dry = await failback(config, journal, pool, engine, "p", dry_run=True)
        assert dry.failures == [] and journal_rows() == before, "a dry run writes nothing"
        real = await failback(config, journal, pool, engine, "p")
        assert real.failures == [] and real.ended
        assert dry.plan() == real.plan()
        assert any("team/app:alpha" in line for line in real.plan()), real.plan()
        assert assert_image_complete(p.url, "team/app", "alpha") == alpha.digest
    finally:
        await pool.aclose()
        journal.close()


async def test_failback_without_a_held_record_reads_the_journal(registry_factory, tmp_path):
    """A failover recorded without `held` (an older version, or its listing failed): the
    ledger and inventory stand in for it, less tags whose delete at the promoted site
    before the incident is recorded. v1 (deleted before, re-pushed at p) is spread; v3,
    copied to a and deleted there during the incident unseen, is deleted at p."""
    p, a = registry_factory("p"), registry_factory("a")
    config, journal, pool = parts(
        tmp_path, {"p": p, "a": a}, [{"name": "apps", "from": "p", "to": ["a"], "deletes": True}]
    )
    engine = CopyEngine(BlobIndex(journal))
    try:
        with Pusher(p.url) as push:
            push.push_image("team/app", "v1", [layer_bytes("lg-v1", 200)])
            push.push_image("team/app", "v3", [layer_bytes("lg-v3", 200)])
        assert (await Reconciler(config, journal, pool, engine).run()).failures == []
        async with RegistryClient(SiteEndpoint(name="p", url=p.url, insecure=True)) as cp:
            assert await cp.delete_tag("team/app", "v1")
        assert (await Reconciler(config, journal, pool, engine).run()).deleted == 1
        with Pusher(p.url) as push:
            new_v1 = push.push_image("team/app", "v1", [layer_bytes("lg-v1-new", 200)])
        p.stop()
        await pool.aclose()
        pool = ClientPool(config, retries=1, backoff_base=0.01)
        assert (await failover(config, journal, pool, engine, FailoverRequest("a"))).recorded
        sql(journal, "UPDATE failovers SET detail = '{}'")  # as an older version wrote it
        async with RegistryClient(SiteEndpoint(name="a", url=a.url, insecure=True)) as ca:
            assert await ca.delete_tag("team/app", "v3")
        p.start()

        dry = await failback(config, journal, pool, engine, "p", dry_run=True)
        real = await failback(config, journal, pool, engine, "p")
        assert real.failures == [] and real.ended and real.plan() == dry.plan()
        assert sorted((i.kind, i.site, i.tag) for i in real.items) == [
            ("delete", "p", "v3"),
            ("spread", "a", "v1"),
        ]
        for site in (p, a):
            assert tags(site.url) == ["v1"]
            assert assert_image_complete(site.url, "team/app", "v1") == new_v1.digest
    finally:
        await pool.aclose()
        journal.close()


async def test_a_registry_clock_ahead_does_not_turn_a_re_push_into_an_incident_delete(
    registry_factory, tmp_path
):
    """Red-team finding 1: a's webhook for the propagated delete of v1 carries a's clock,
    10 minutes ahead. Stamped so, the tombstone looked newer than the failover's start
    (our clock) and failback deleted the v1 p re-pushed before it failed. A tombstone is
    never stamped later than it is recorded: v1 is p's unreplicated write and spreads."""
    p, a = registry_factory("p"), registry_factory("a")
    config, journal, pool = parts(
        tmp_path, {"p": p, "a": a}, [{"name": "apps", "from": "p", "to": ["a"], "deletes": True}]
    )
    engine = CopyEngine(BlobIndex(journal))
    try:
        with Pusher(p.url) as push:
            old = push.push_image("team/app", "v1", [layer_bytes("sk-v1", 200)])
            push.push_image("team/app", "v3", [layer_bytes("sk-v3", 200)])
        assert (await Reconciler(config, journal, pool, engine).run()).failures == []
        async with RegistryClient(SiteEndpoint(name="p", url=p.url, insecure=True)) as cp:
            assert await cp.delete_tag("team/app", "v1")
        assert (await Reconciler(config, journal, pool, engine).run()).deleted == 1
        ahead = time.time() + 600  # a's delete webhook, as the daemon records it
        await journal.tombstones.record(
            "a", "team/app", tag="v1", digest=old.digest, origin="observed", at=ahead
        )
        assert all(s.at < ahead for s in await journal.tombstones.at_site("a", "team/app"))
        with Pusher(p.url) as push:  # re-pushed at p, never replicated: p fails now
            new_v1 = push.push_image("team/app", "v1", [layer_bytes("sk-v1-new", 200)])
        p.stop()
        await pool.aclose()
        pool = ClientPool(config, retries=1, backoff_base=0.01)
        assert (await failover(config, journal, pool, engine, FailoverRequest("a"))).recorded
        p.start()

        dry = await failback(config, journal, pool, engine, "p", dry_run=True)
        assert [(i.kind, i.site, i.tag) for i in dry.items] == [("spread", "a", "v1")]
        real = await failback(config, journal, pool, engine, "p")
        assert real.failures == [] and real.ended and real.plan() == dry.plan()
        for site in (p, a):
            assert tags(site.url) == ["v1", "v3"]
            assert assert_image_complete(site.url, "team/app", "v1") == new_v1.digest
    finally:
        await pool.aclose()
        journal.close()


def test_unpropagated_delete_is_pure():
    known = [(5.0, "d1")]
    assert unpropagated_delete(8.0, 10.0, known, "d1", None)
    assert unpropagated_delete(8.0, 10.0, known, "d1", 6.0)  # our copy's push event there
    assert not unpropagated_delete(None, 10.0, known, "d1", None)
    assert not unpropagated_delete(12.0, 10.0, known, "d1", None)  # during the incident
    assert not unpropagated_delete(4.0, 10.0, known, "d1", None)  # re-pushed after the delete
    assert not unpropagated_delete(8.0, 10.0, known, "d2", None)  # the promoted site's own
    assert not unpropagated_delete(8.0, 10.0, known, "d1", 9.0)  # pushed there again since


@pytest.mark.parametrize("deletes", [True, False])
async def test_failback_does_not_resurrect_a_delete_the_primary_made_before_failing(
    registry_factory, tmp_path, deletes
):
    """Red-team finding 3: v1 replicated to a, deleted at p (the daemon saw it: a
    tombstone at p), and p failed before the delete reached a. Catch-up leaves a's v1
    alone, but failback used to copy it back to p silently. Now it is held back: under
    `deletes: true` failback deletes it at a, as the daemon would have; otherwise a
    keeps it and the plan says so (a conflict item)."""
    p, a = registry_factory("p"), registry_factory("a")
    rule = {"name": "apps", "from": "p", "to": ["a"], "deletes": deletes}
    config, journal, pool = parts(tmp_path, {"p": p, "a": a}, [rule])
    engine = CopyEngine(BlobIndex(journal))
    try:
        with Pusher(p.url) as push:
            v1 = push.push_image("team/app", "v1", [layer_bytes("rs-v1", 200)])
            v2 = push.push_image("team/app", "v2", [layer_bytes("rs-v2", 200)])
        assert (await Reconciler(config, journal, pool, engine).run()).failures == []
        async with RegistryClient(SiteEndpoint(name="p", url=p.url, insecure=True)) as cp:
            assert await cp.delete_tag("team/app", "v1")
        await journal.tombstones.record(
            "p", "team/app", tag="v1", digest=v1.digest, origin="observed"
        )
        p.stop()
        await pool.aclose()
        pool = ClientPool(config, retries=1, backoff_base=0.01)
        assert (await failover(config, journal, pool, engine, FailoverRequest("a"))).recorded
        assert tags(a.url) == ["v1", "v2"]
        p.start()

        dry = await failback(config, journal, pool, engine, "p", dry_run=True)
        assert dry.failures == []
        kind = "delete" if deletes else "conflict"
        assert [(i.kind, i.site, i.tag) for i in dry.items] == [(kind, "a", "v1")]
        assert not any("v1" in line and line.startswith("copy") for line in dry.plan())
        real = await failback(config, journal, pool, engine, "p")
        assert real.failures == [] and real.ended and real.plan() == dry.plan()
        assert tags(p.url) == ["v2"], "v1 is not copied back to p"
        assert tags(a.url) == (["v2"] if deletes else ["v1", "v2"])
        assert assert_image_complete(a.url, "team/app", "v2") == v2.digest
        after = await Reconciler(config, journal, pool, engine).run()
        assert after.failures == [] and after.stats.copied == 0 and tags(p.url) == ["v2"]
    finally:
        await pool.aclose()
        journal.close()


async def test_failback_holds_back_an_unpropagated_delete_under_a_rename(
    registry_factory, tmp_path
):
    """Finding 3 through a prefix rename: a holds p's team/app as m/team/app. The held
    back tag is excluded from the copy back of that repository only (a's incident writes
    to both repositories come back), and deleted at a under a's name."""
    p, a = registry_factory("p"), registry_factory("a")
    rule = {"name": "r1", "from": "p", "to": ["a"], "rename": {"prefix": "m/"}, "deletes": True}
    config, journal, pool = parts(tmp_path, {"p": p, "a": a}, [rule])
    engine = CopyEngine(BlobIndex(journal))
    try:
        with Pusher(p.url) as push:
            v1 = push.push_image("team/app", "v1", [layer_bytes("rn-v1", 200)])
            push.push_image("team/app", "v2", [layer_bytes("rn-v2", 200)])
            push.push_image("team/other", "v1", [layer_bytes("rn-o1", 200)])
        assert (await Reconciler(config, journal, pool, engine).run()).failures == []
        async with RegistryClient(SiteEndpoint(name="p", url=p.url, insecure=True)) as cp:
            assert await cp.delete_tag("team/app", "v1")
        await journal.tombstones.record(
            "p", "team/app", tag="v1", digest=v1.digest, origin="observed"
        )
        p.stop()
        await pool.aclose()
        pool = ClientPool(config, retries=1, backoff_base=0.01)
        assert (await failover(config, journal, pool, engine, FailoverRequest("a"))).recorded
        with Pusher(a.url) as push:  # the incident: a writes v3 of both repositories
            push.push_image("m/team/app", "v3", [layer_bytes("rn-v3", 200)])
            push.push_image("m/team/other", "v3", [layer_bytes("rn-o3", 200)])
        p.start()

        dry = await failback(config, journal, pool, engine, "p", dry_run=True)
        assert [(i.kind, i.site, i.repository, i.tag) for i in dry.items] == [
            ("delete", "a", "m/team/app", "v1")
        ]
        real = await failback(config, journal, pool, engine, "p")
        assert real.failures == [] and real.ended and real.plan() == dry.plan()
        assert tags(p.url) == ["v2", "v3"] and tags(p.url, "team/other") == ["v1", "v3"]
        assert tags(a.url, "m/team/app") == ["v2", "v3"]
        assert tags(a.url, "m/team/other") == ["v1", "v3"]
    finally:
        await pool.aclose()
        journal.close()


async def test_failback_of_the_middle_site_of_a_chain_plans_with_the_chain(
    registry_factory, tmp_path
):
    """Red team 2, finding 2: p lost (a promoted), then a lost (b promoted); a comes back
    first. Failing a back plans with the rule in force once only the later failover
    ends (a -> [b]), so b's incident writes and deletes reach a, and what a took as the
    source before it failed reaches b; p's failback later brings all of it to p."""
    p, a, b = registry_factory("p"), registry_factory("a"), registry_factory("b")
    config, journal, pool = parts(
        tmp_path,
        {"p": p, "a": a, "b": b},
        [{"name": "apps", "from": "p", "to": ["a", "b"], "deletes": True}],
    )
    engine = CopyEngine(BlobIndex(journal))

    async def fresh_pool(old: ClientPool) -> ClientPool:
        await old.aclose()  # a stopped registry leaves dead connections behind
        return ClientPool(config, retries=1, backoff_base=0.01)

    try:
        with Pusher(p.url) as push:
            push.push_image("team/app", "v1", [layer_bytes("ch-v1", 200)])
            v2 = push.push_image("team/app", "v2", [layer_bytes("ch-v2", 200)])
        assert (await Reconciler(config, journal, pool, engine).run()).failures == []
        p.stop()
        pool = await fresh_pool(pool)
        assert (await failover(config, journal, pool, engine, FailoverRequest("a"))).recorded
        with Pusher(a.url) as push:  # a, the source now, takes v5 and fails before syncing
            v5 = push.push_image("team/app", "v5", [layer_bytes("ch-v5", 200)])
        a.stop()
        pool = await fresh_pool(pool)
        second = await failover(config, journal, pool, engine, FailoverRequest("b"))
        assert second.recorded and second.lost == "a"
        with Pusher(b.url) as push:  # the second incident, at b
            v9 = push.push_image("team/app", "v9", [layer_bytes("ch-v9", 200)])
        async with RegistryClient(SiteEndpoint(name="b", url=b.url, insecure=True)) as cb:
            assert await cb.delete_tag("team/app", "v1")
        p.start()  # p is back first: it waits for a, which stands in for it
        with pytest.raises(UsageError) as refused:
            await failback(config, journal, pool, engine, "p", dry_run=True)
        assert "failback --site a, then failback --site p" in str(refused.value)
        assert "failover #2" in str(refused.value)
        a.start()
        pool = await fresh_pool(pool)

        dry = await failback(config, journal, pool, engine, "a", dry_run=True)
        assert dry.failures == [] and dry.sources == {"apps": "b"}
        assert {(i.kind, i.site, i.tag) for i in dry.items} == {
            ("delete", "a", "v1"),  # deleted at b during the second incident
            ("spread", "b", "v5"),  # a's write as the source, never replicated
        }
        real = await failback(config, journal, pool, engine, "a")
        assert real.failures == [] and real.ended == [second.failover_id]
        assert real.plan() == dry.plan()
        for site in (a, b):
            assert tags(site.url) == ["v2", "v5", "v9"]
            assert assert_image_complete(site.url, "team/app", "v9") == v9.digest
            assert assert_image_complete(site.url, "team/app", "v5") == v5.digest
        after = await Reconciler(config, journal, pool, engine).run()  # a -> [b] in force
        assert after.failures == [] and after.stats.copied == 0 and after.deleted == 0
        assert tags(b.url) == ["v2", "v5", "v9"]

        back = await failback(config, journal, pool, engine, "p")
        assert back.failures == [] and back.ended
        for site in (p, a, b):
            assert tags(site.url) == ["v2", "v5", "v9"]
        assert assert_image_complete(p.url, "team/app", "v2") == v2.digest
        final = await Reconciler(config, journal, pool, engine).run()
        assert final.failures == [] and final.stats.copied == 0 and final.deleted == 0
    finally:
        await pool.aclose()
        journal.close()


async def test_failback_keeps_a_tag_another_rule_still_holds_at_the_promoted_site(
    registry_factory, tmp_path
):
    """Red team 2, finding 3: two rules replicate p/team/app to a, as is and as
    mirror/team/app. During the incident a deletes only mirror/team/app:v1. a still holds
    team/app:v1, so failback must not delete p/team/app:v1 (the next sync would then
    delete a/team/app:v1 too: the image gone everywhere): a conflict, nothing deleted."""
    p, a = registry_factory("p"), registry_factory("a")
    config, journal, pool = parts(
        tmp_path,
        {"p": p, "a": a},
        [
            {"name": "plain", "from": "p", "to": ["a"], "repositories": ["team/**"]}
            | {"deletes": True},
            {"name": "mirror", "from": "p", "to": ["a"], "repositories": ["team/**"]}
            | {"rename": {"prefix": "mirror/"}, "deletes": True},
        ],
    )
    engine = CopyEngine(BlobIndex(journal))
    try:
        with Pusher(p.url) as push:
            v1 = push.push_image("team/app", "v1", [layer_bytes("ov-v1", 200)])
            push.push_image("team/app", "v2", [layer_bytes("ov-v2", 200)])
        assert (await Reconciler(config, journal, pool, engine).run()).failures == []
        p.stop()
        await pool.aclose()
        pool = ClientPool(config, retries=1, backoff_base=0.01)
        assert (await failover(config, journal, pool, engine, FailoverRequest("a"))).recorded
        async with RegistryClient(SiteEndpoint(name="a", url=a.url, insecure=True)) as ca:
            assert await ca.delete_tag("mirror/team/app", "v1")
            assert await ca.delete_tag("mirror/team/app", "v2")
            assert await ca.delete_tag("team/app", "v2")  # v2: gone under both names
        p.start()

        dry = await failback(config, journal, pool, engine, "p", dry_run=True)
        assert dry.failures == []
        items = {(i.kind, i.rule, i.site, i.repository, i.tag) for i in dry.items}
        assert ("delete", "mirror", "p", "team/app", "v1") not in items
        assert ("conflict", "mirror", "p", "team/app", "v1") in items
        assert ("delete", "mirror", "p", "team/app", "v2") in items
        [why] = [i.reason for i in dry.items if i.kind == "conflict" and i.tag == "v1"]
        assert "a still holds it as team/app:v1 (rule plain)" in why
        real = await failback(config, journal, pool, engine, "p")
        assert real.failures == [] and real.ended
        assert real.plan() == dry.plan()
        assert tags(p.url) == ["v1"]
        after = await Reconciler(config, journal, pool, engine).run()
        assert after.failures == []
        assert assert_image_complete(p.url, "team/app", "v1") == v1.digest
        assert assert_image_complete(a.url, "team/app", "v1") == v1.digest
        assert tags(a.url) == ["v1"]
    finally:
        await pool.aclose()
        journal.close()
