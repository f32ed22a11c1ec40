"""Storage GC tombstones from the quarantine on (red team 2, finding 5).

From the moment a storage GC moves a tag or manifest into quarantine the registry no
longer serves it; the settle that deletes it for good may come a window (10 min by
default) or a timer run later. A failover in between must not bring it back: the
retention tombstones are written in the transaction that journals the quarantine,
before the first move, and withdrawn for whatever the run puts back.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from replicator.blob_index import BlobIndex
from replicator.clients import ClientPool
from replicator.copy import CopyEngine
from replicator.failover import FailoverRequest, failback, failover
from replicator.gc.storage import OnlineGCRefused, StorageGCOptions, collect_storage
from replicator.journal import Journal
from replicator.registry.client import RegistryClient
from replicator.registry.site import SiteEndpoint
from replicator.sync import Reconciler
from tests.harness.images import Pusher, layer_bytes
from tests.test_failback import parts, tags
from tests.test_gc_journal import KEEP_V, age_tree

KEEP_V_STORAGE = replace(KEEP_V, mode="storage", untagged="delete")


def gc_options(reg, **kw) -> StorageGCOptions:
    base = dict(
        site="p",
        grace=0,
        registry_config=reg.config_path,
        workers=2,
        quarantine_window=0,
        policies=[KEEP_V_STORAGE],
    )
    return StorageGCOptions(**{**base, **kw})


def v1_and_dev(reg) -> None:
    with Pusher(reg.url) as push:
        push.push_image("team/app", "v1", [layer_bytes("q-v1", 300)])
        push.push_image("team/app", "dev", [layer_bytes("q-dev", 300)])


async def retention_stones(journal: Journal, site: str = "p") -> list[tuple[str | None, bool]]:
    stones = await journal.tombstones.at_site(site, "team/app")
    return sorted(
        ((s.tag, s.digest is not None) for s in stones if s.origin == "retention"), key=repr
    )


async def test_a_quarantined_tag_is_not_copied_back_by_failback(registry_factory, tmp_path):
    """settle left to a later run; p fails in the window; failover to a, failback:
    `dev` (in p's quarantine) stays deleted at p."""
    p, a = registry_factory("p"), registry_factory("a")
    config, journal, pool = parts(
        tmp_path, {"p": p, "a": a}, [{"name": "apps", "from": "p", "to": ["a"], "deletes": True}]
    )
    engine = CopyEngine(BlobIndex(journal))
    try:
        v1_and_dev(p)
        assert (await Reconciler(config, journal, pool, engine).run()).failures == []
        age_tree(p.storage, 7200)
        res = await collect_storage(
            p.storage, journal, gc_options(p, settle=False, quarantine_window=2)
        )
        assert res.errors == [] and res.quarantined > 0 and res.waiting > 0
        assert tags(p.url) == ["v1"]
        # the tag and its manifest, tombstoned before the settle
        assert await retention_stones(journal) == [("dev", True), (None, True)]

        p.stop()
        await pool.aclose()
        pool = ClientPool(config, retries=1, backoff_base=0.01)
        await failover(config, journal, pool, engine, FailoverRequest("a"))
        p.start()
        back = await failback(config, journal, pool, engine, "p")
        assert back.failures == []
        assert tags(p.url) == ["v1"]

        # the later settle deletes them for good, without a second tombstone each
        done = await collect_storage(p.storage, journal, gc_options(p, settle=True))
        assert done.errors == []
        assert await retention_stones(journal) == [("dev", True), (None, True)]
    finally:
        await pool.aclose()
        journal.close()


async def test_a_tag_re_pushed_before_its_move_loses_its_tombstone(registry, tmp_path):
    """Written ahead, withdrawn when the move finds the tag changed: kept, no record."""
    v1_and_dev(registry)
    age_tree(registry.storage, 7200)
    journal = Journal(tmp_path / "journal.db")

    def re_push(phase: str) -> None:
        if phase == "planned":
            with Pusher(registry.url) as push:
                push.push_image("team/app", "dev", [layer_bytes("q-dev-2", 300)])

    try:
        res = await collect_storage(
            registry.storage, journal, gc_options(registry, settle=True, on_phase=re_push)
        )
        assert res.errors == []
        assert tags(registry.url) == ["dev", "v1"]
        assert ("dev", True) not in await retention_stones(journal)
    finally:
        journal.close()


async def test_a_refused_run_withdraws_the_tombstones_of_what_it_restored(
    registry, proxy_factory, tmp_path
):
    """The cache probe cannot reach the registry: everything is restored, the run
    refused; none of its tombstones stay."""
    v1_and_dev(registry)
    age_tree(registry.storage, 7200)
    proxy = proxy_factory(registry)
    proxy.respond(503, count=1000, method="HEAD", path=r"/blobs/")
    journal = Journal(tmp_path / "journal.db")
    try:
        site = SiteEndpoint(name="p", url=proxy.url, insecure=True)
        async with RegistryClient(site, retries=1, backoff_base=0.01) as api:
            with pytest.raises(OnlineGCRefused):
                await collect_storage(
                    registry.storage, journal, gc_options(registry, registry_api=api)
                )
        assert tags(registry.url) == ["dev", "v1"]
        assert await retention_stones(journal) == []
    finally:
        journal.close()
