"""What an API-mode GC leaves in the journal, on real registries (issue 11 follow-ups).

A GC that deletes a tag with the placeholder trick pushes a manifest the daemon must
know for its own (the ledger, before the push), or it would copy the placeholder to
replicas; every delete a GC makes is tombstoned, so failback and failover catch-up
do not bring back what retention removed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from replicator.blob_index import BlobIndex
from replicator.clients import ClientPool
from replicator.config import config_from_dict
from replicator.copy import CopyEngine
from replicator.failover import FailoverRequest, failover
from replicator.gc.api import ApiGCOptions, collect_api
from replicator.gc.policy import KeepRules, RetentionPolicy
from replicator.gc.storage import StorageGCOptions, collect_storage, collect_storage_sync
from replicator.journal import Journal
from replicator.registry.client import RegistryClient
from replicator.registry.site import SiteEndpoint
from replicator.sync import Reconciler
from tests.harness.daemon import a_to_b_daemon
from tests.harness.images import Pusher, assert_image_complete, layer_bytes
from tests.harness.journal import sql
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


def primary_and_two_replicas(registry_factory: Any, tmp_path: Path) -> tuple[Any, ...]:
    """Primary p replicating to a and b with deletes, its journal, a client pool, an
    engine, and the rule narrowed to each replica (`only["a"]`: to replicate one alone)."""
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
    return p, a, b, config, journal, pool, engine, only


async def test_failover_does_not_catch_up_a_tag_retention_removed_at_the_primary(
    registry_factory, tmp_path
):
    """`dev` reached b only (a was behind); then GC at the primary p removed it, and p was
    lost. The GC's tombstone at p tells catch-up that b's `dev` is a delete not yet
    propagated: it is not copied to a (without it, a took `dev` back from b)."""
    p, a, _b, config, journal, pool, engine, only = primary_and_two_replicas(
        registry_factory, tmp_path
    )
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


REPO_ROOT = Path(__file__).resolve().parents[1]
# An API GC of site p in its own process, on the command line's registry URL, storage and
# journal: the test kills it at the moment it chooses.
_GC_PROCESS = """
import asyncio, sys
from replicator.gc.api import ApiGCOptions, collect_api
from replicator.journal import Journal
from replicator.registry.client import RegistryClient
from replicator.registry.site import SiteEndpoint
from tests.test_gc_journal import KEEP_V

url, storage, journal_path = sys.argv[1:4]

async def main():
    journal = Journal(journal_path)
    options = ApiGCOptions(site="p", policies=[KEEP_V], storage=storage)
    async with RegistryClient(SiteEndpoint(name="p", url=url, insecure=True)) as client:
        await collect_api(client, journal, options)

asyncio.run(main())
"""


async def test_an_api_gc_killed_right_after_a_delete_leaves_its_tombstone(
    registry_factory, proxy_factory, tmp_path
):
    """Red-team finding 2: the GC process dies once the registry has carried out its
    first DELETE and before it hears back (the proxy holds the answer; the test SIGKILLs
    the process). The tombstone, written before the DELETE, is there, so failover
    catch-up does not copy `dev` back from b (the kill used to leave none, and a took
    `dev` back)."""
    p, a, _b, config, journal, pool, engine, only = primary_and_two_replicas(
        registry_factory, tmp_path
    )
    proxy = proxy_factory(p)
    proxy.delay(120, method="DELETE", path="/manifests/")
    child = None
    try:
        with Pusher(p.url) as push:
            push.push_image("app", "v1", [layer_bytes("gk-v1", 300)])
            dev = push.push_image("app", "dev", [layer_bytes("gk-dev", 300)])
        assert (
            await Reconciler(config, journal, pool, engine).run(rules=[only["b"]])
        ).failures == []
        age_tree(p.storage, 7200)
        args = [proxy.url, str(p.storage), str(config.journal)]
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _GC_PROCESS, *args, cwd=REPO_ROOT
        )

        def delete_carried_out() -> bool:
            assert child is not None and child.returncode is None, "the GC process ended"
            return any(r.method == "DELETE" and r.status == 202 for r in proxy.records)

        await asyncio.to_thread(
            wait_until, delete_carried_out, timeout=60, what="the registry did the DELETE"
        )
        child.kill()
        assert await asyncio.wait_for(child.wait(), 30) != 0
        with Pusher(p.url) as push:
            assert sorted(push.tags("app")) == ["v1"]
        assert {(s.tag, s.digest) for s in await journal.tombstones.at_site("p", "app")} == {
            ("dev", dev.digest),
            (None, dev.digest),
        }
        assert (
            await Reconciler(config, journal, pool, engine).run(rules=[only["a"]])
        ).failures == []
        p.stop()
        await pool.aclose()
        pool = ClientPool(config, retries=1, backoff_base=0.01)
        done = await failover(config, journal, pool, engine, FailoverRequest("a"))
        assert done.recorded and done.copies == [], [c.describe("a") for c in done.copies]
        with Pusher(a.url) as push:
            assert sorted(push.tags("app")) == ["v1"]
    finally:
        if child is not None and child.returncode is None:
            child.kill()
            await asyncio.wait_for(child.wait(), 30)
        await pool.aclose()
        journal.close()


def test_an_api_gc_delete_that_fails_leaves_no_tombstone(registry, proxy_factory, tmp_path):
    """The tombstone written ahead of a DELETE is withdrawn when the DELETE fails: the
    tag is still there, and a record of its delete would stop catch-up copying it."""
    proxy = proxy_factory(registry)
    proxy.respond(403, 50, method="DELETE")
    with Pusher(registry.url) as p:
        v1 = p.push_image("app", "v1", [layer_bytes("gf-v1", 300)])
        p.push_manifest("app", "nightly", v1.raw, v1.media_type)
        p.push_image("app", "dev", [layer_bytes("gf-dev", 300)])
    age_tree(registry.storage, 7200)
    journal = Journal(tmp_path / "j.db")
    try:
        result = api_gc(proxy, journal, storage=registry.storage)
        assert result.errors and result.deleted_tags == set()
        assert proxy.count("DELETE") >= 2, "both deletes were tried"
        assert stones(journal, "a") == set()
        with Pusher(registry.url) as p:
            assert sorted(p.tags("app")) == ["dev", "nightly", "v1"]
    finally:
        journal.close()


def test_a_storage_gc_interrupted_after_its_deletes_tombstones_them_when_resumed(
    registry, tmp_path
):
    """A settle that removed the quarantined copies and died before its journal write:
    the next run finds them gone, records them deleted and tombstones them (in the same
    transaction). Simulated by a run left waiting in quarantine whose copies are then
    removed, as the dead settle had done."""
    with Pusher(registry.url) as p:
        p.push_image("app", "v1", [layer_bytes("sr-v1", 300)])
        dev = p.push_image("app", "dev", [layer_bytes("sr-dev", 300)])
    age_tree(registry.storage, 7200)
    journal = Journal(tmp_path / "j.db")
    policy = replace(KEEP_V, mode="storage", untagged="delete")
    opts = StorageGCOptions(
        site="a",
        grace=0,
        quarantine_window=3600,
        settle=False,
        registry_config=registry.config_path,
        assume_no_cache=True,
        workers=2,
        policies=[policy],
    )
    try:
        first = collect_storage_sync(registry.storage, journal, opts)
        # tombstoned from the quarantine on (red team 2, finding 5), before any settle
        at_quarantine = {("dev", dev.digest, "retention"), (None, dev.digest, "retention")}
        assert first.waiting > 0 and stones(journal, "a") == at_quarantine
        moved = sql(
            journal,
            "SELECT kind, quarantine_path AS q FROM gc_candidates WHERE state = 'quarantined'",
        )
        for row in moved:  # what the settle did before it died
            if os.path.isdir(row["q"]):
                shutil.rmtree(row["q"])
            else:
                os.remove(row["q"])
        sql(
            journal, "UPDATE gc_runs SET mark_summary = json_set(mark_summary, '$.settle_after', 0)"
        )
        collect_storage_sync(registry.storage, journal, replace(opts, quarantine_window=0))
        assert {("dev", dev.digest), (None, dev.digest)} <= {
            (t, d) for t, d, _ in stones(journal, "a")
        }
        # the resumed run confirms the tombstones written ahead, it does not repeat them
        assert len(asyncio.run(journal.tombstones.at_site("a", "app"))) == 2
    finally:
        journal.close()
