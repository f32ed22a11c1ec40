"""What an API-mode GC leaves in the journal, on real registries (issue 11 follow-ups).

A GC that deletes a tag with the placeholder trick pushes a manifest the daemon must
know for its own (the ledger, before the push), or it would copy the placeholder to
replicas; every delete a GC makes is tombstoned, so failback and failover catch-up
do not bring back what retention removed.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import replace

from replicator.blob_index import BlobIndex
from replicator.clients import ClientPool
from replicator.config import config_from_dict
from replicator.copy import CopyEngine
from replicator.failover import FailoverRequest, failover
from replicator.gc.api import ApiGCOptions, collect_api
from replicator.gc.policy import KeepRules, RetentionPolicy
from replicator.gc.storage import StorageGCOptions, collect_storage
from replicator.journal import Journal
from replicator.registry.client import RegistryClient
from replicator.registry.site import SiteEndpoint
from replicator.sync import Reconciler
from tests.harness.daemon import a_to_b_daemon
from tests.harness.images import Pusher, assert_image_complete, layer_bytes
from tests.harness.util import wait_until

KEEP_V = RetentionPolicy(
    name="keep-v", keep=KeepRules(tags=("v*",)), untagged="keep", grace=0, mode="api"
)


def age_tree(path, seconds: float) -> None:
    """Make everything stored so far look `seconds` old (by the registry's file times)."""
    t = time.time() - seconds
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            os.utime(os.path.join(dirpath, name), (t, t))


def api_gc(reg, journal: Journal, site: str = "a", **kw):
    async def go():
        async with RegistryClient(SiteEndpoint(name=site, url=reg.url, insecure=True)) as client:
            return await collect_api(
                client, journal, ApiGCOptions(site=site, policies=[KEEP_V], **kw)
            )

    return asyncio.run(go())


def test_a_daemon_does_not_replicate_the_placeholder_of_a_gc_tag_delete(
    registry_factory, tmp_path, daemons
):
    """`nightly` shares v9's digest, so API GC deletes the tag alone: a placeholder pushed
    to it and deleted by digest. The daemon watching the registry sees that push; the
    GC's ledger record makes it our own, so no task copies the placeholder anywhere."""
    a, b, daemon = a_to_b_daemon(
        tmp_path / "d", registry_factory, [{"name": "r", "from": "a", "to": ["b"]}]
    )
    daemons.append(daemon)
    daemon.start()
    with Pusher(a.url) as p:
        v9 = p.push_image("app", "v9", [layer_bytes("gcj-v9", 300)])
        p.push_manifest("app", "nightly", v9.raw, v9.media_type)

    def settled() -> bool:
        events = daemon.journal_rows("SELECT COUNT(*) FROM events WHERE state = 'new'")
        open_tasks = daemon.journal_rows(
            "SELECT COUNT(*) FROM tasks WHERE state IN ('pending', 'leased')"
        )
        return events == [(0,)] and open_tasks == [(0,)]

    wait_until(
        lambda: settled() and len(daemon.journal_rows("SELECT id FROM tasks")) >= 2,
        timeout=30,
        what="v9 and nightly replicated",
    )
    assert assert_image_complete(b.url, "app", "nightly") == v9.digest
    journal = Journal(daemon.journal_path)
    try:
        result = api_gc(a, journal)
    finally:
        journal.close()
    assert result.errors == [] and result.deleted_tags == {"app:nightly"}
    # the registry notifies the placeholder's push and its delete; wait until handled
    wait_until(
        lambda: (
            daemon.journal_rows(
                "SELECT COUNT(*) FROM events WHERE site = 'a' AND action = 'delete'"
            )
            >= [(1,)]
            and settled()
        ),
        timeout=30,
        what="the GC's events handled",
    )
    copied = daemon.journal_rows("SELECT DISTINCT digest, state FROM tasks WHERE action = 'copy'")
    assert copied == [(v9.digest, "done")], "only v9's digest was ever copied"
    assert daemon.journal_rows("SELECT COUNT(*) FROM tasks WHERE state = 'dead'") == [(0,)]
    assert assert_image_complete(b.url, "app", "nightly") == v9.digest


def storage_gc(reg, journal: Journal, policy: RetentionPolicy):
    opts = StorageGCOptions(
        site="a",
        grace=0,
        quarantine_window=0,
        registry_config=reg.config_path,
        workers=2,
        policies=[policy],
    )
    return asyncio.run(collect_storage(reg.storage, journal, opts))


def stones(journal: Journal, site: str, repo: str = "app") -> set[tuple]:
    found = asyncio.run(journal.tombstones.at_site(site, repo))
    return {(s.tag, s.digest, s.origin) for s in found}


def test_every_delete_of_an_api_gc_is_tombstoned(registry, tmp_path):
    """A tag deleted alone (placeholder) and a manifest deleted with its tag: both are
    remembered with their digest, as a propagated delete is; a dry run records none."""
    with Pusher(registry.url) as p:
        v1 = p.push_image("app", "v1", [layer_bytes("ts-v1", 300)])
        p.push_manifest("app", "nightly", v1.raw, v1.media_type)
        dev = p.push_image("app", "dev", [layer_bytes("ts-dev", 300)])
    age_tree(registry.storage, 7200)  # ages by the registry's link file times
    journal = Journal(tmp_path / "j.db")
    try:
        api_gc(registry, journal, dry_run=True, storage=registry.storage)
        assert stones(journal, "a") == set()
        result = api_gc(registry, journal, storage=registry.storage)
        assert result.errors == [] and result.deleted_tags == {"app:nightly", "app:dev"}
        assert stones(journal, "a") == {
            ("nightly", v1.digest, "retention"),
            ("dev", dev.digest, "retention"),
            (None, dev.digest, "retention"),
        }
        details = {s.detail for s in asyncio.run(journal.tombstones.at_site("a", "app"))}
        assert all(d and d.startswith("gc keep-v") for d in details), details
    finally:
        journal.close()


def test_every_delete_of_a_storage_gc_is_tombstoned(registry, tmp_path):
    with Pusher(registry.url) as p:
        p.push_image("app", "v1", [layer_bytes("st-v1", 300)])
        dev = p.push_image("app", "dev", [layer_bytes("st-dev", 300)])
    age_tree(registry.storage, 7200)
    journal = Journal(tmp_path / "j.db")
    policy = replace(KEEP_V, mode="storage", untagged="delete")
    try:
        result = storage_gc(registry, journal, policy)
        assert result.errors == [] and result.deleted_tags == {"app:dev"}
        assert stones(journal, "a") == {
            ("dev", dev.digest, "retention"),
            (None, dev.digest, "retention"),
        }
    finally:
        journal.close()


async def test_failover_does_not_catch_up_a_tag_retention_removed_at_the_primary(
    registry_factory, tmp_path
):
    """`dev` reached b only (a was behind); then GC at the primary p removed it, and p was
    lost. The GC's tombstone at p tells catch-up that b's `dev` is a delete not yet
    propagated: it is not copied to a (without it, a took `dev` back from b)."""
    p, a, b = registry_factory("p"), registry_factory("a"), registry_factory("b")
    sites = {"p": p, "a": a, "b": b}
    config = config_from_dict(
        {
            "journal": str(tmp_path / "journal.db"),
            "sites": {n: {"url": r.url, "insecure": True} for n, r in sites.items()},
            "rules": [{"name": "apps", "from": "p", "to": ["a", "b"], "deletes": True}],
        }
    )
    journal = Journal(config.journal)
    pool = ClientPool(config, retries=1, backoff_base=0.01)
    engine = CopyEngine(BlobIndex(journal))
    only = {t: config.rules[0].model_copy(update={"to": [t]}) for t in ("a", "b")}
    try:
        with Pusher(p.url) as push:
            push.push_image("app", "v1", [layer_bytes("fo-v1", 300)])
            push.push_image("app", "dev", [layer_bytes("fo-dev", 300)])
        assert (
            await Reconciler(config, journal, pool, engine).run(rules=[only["b"]])
        ).failures == []
        age_tree(p.storage, 7200)
        options = ApiGCOptions(site="p", policies=[KEEP_V], storage=p.storage)
        result = await collect_api(pool["p"], journal, options)
        assert result.deleted_tags == {"app:dev"}
        assert (
            await Reconciler(config, journal, pool, engine).run(rules=[only["a"]])
        ).failures == []
        p.stop()
        await pool.aclose()
        pool = ClientPool(config, retries=1, backoff_base=0.01)
        done = await failover(config, journal, pool, engine, FailoverRequest("a"))
        assert done.recorded and done.copies == [], [c.describe("a") for c in done.copies]
        assert [c.tag for c in done.conflicts] == ["dev"]
        with Pusher(a.url) as push:
            assert sorted(push.tags("app")) == ["v1"]
    finally:
        await pool.aclose()
        journal.close()
