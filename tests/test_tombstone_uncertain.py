"""Deletes whose outcome is unknown keep their tombstones (red team 2, finding 4).

A DELETE the registry carried out but whose answer was lost (a 500 after the work, a
timeout, a cut connection) is retried; the retry answers 404. "Already absent" then
is a guess, and the wrong one: our first attempt deleted it. A tombstone withdrawn
on that guess lets failback copy the deleted tag back. Only a definite refusal (a
4xx the registry answered, or a tag seen still in place) withdraws a tombstone.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3

import pytest

from replicator.blob_index import BlobIndex
from replicator.clients import ClientPool
from replicator.copy import CopyEngine
from replicator.deletes import DeleteSite, delete_digest
from replicator.failover import FailoverRequest, failback, failover
from replicator.gc.api import ApiGCOptions, collect_api
from replicator.journal import Journal
from replicator.registry.client import RegistryClient
from replicator.registry.errors import RegistryError
from replicator.registry.site import SiteEndpoint
from replicator.sync import Reconciler
from tests.harness.hostile_front import HostileFront, Reply, Seen
from tests.harness.images import Pusher, layer_bytes
from tests.harness.tag_delete_front import _TAG_DELETE
from tests.test_failback import parts, tags
from tests.test_gc_journal import KEEP_V, age_tree


def lossy_tag_delete_front(registry) -> HostileFront:
    """distribution v3's tag DELETE (see tag_delete_front) whose first answer is a 500
    although the tag was removed: the retry then finds it gone (404)."""
    front = HostileFront(registry.port)
    pattern = re.compile(_TAG_DELETE)
    root = registry.storage / "docker" / "registry" / "v2" / "repositories"
    answered: list[int] = []

    def untag(seen: Seen) -> Reply:
        m = pattern.match(seen.path)
        assert m is not None
        tag_dir = root / m["name"] / "_manifests" / "tags" / m["tag"]
        if not tag_dir.is_dir():
            body = {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]}
            answered.append(404)
            return Reply(404, {"Content-Type": "application/json"}, json.dumps(body).encode())
        shutil.rmtree(tag_dir)
        answered.append(500 if not answered else 202)
        return Reply(answered[-1])

    front.answer("DELETE", _TAG_DELETE, untag)
    front.answered = answered  # type: ignore[attr-defined]
    return front.start()


async def test_tag_deletion_after_a_failed_attempt_is_maybe_deleted(registry):
    with Pusher(registry.url) as push:
        push.push_image("team/app", "dev", [layer_bytes("maybe", 100)])
    front = lossy_tag_delete_front(registry)
    try:
        site = SiteEndpoint(name="p", url=front.url, insecure=True)
        async with RegistryClient(site, retries=2, backoff_base=0.01) as c:
            done = await c.delete_tag("team/app", "dev")
        assert front.answered == [500, 404]  # type: ignore[attr-defined]
        assert not done.deleted and done.maybe_deleted
        assert "may have deleted it" in done.describe()
        assert tags(registry.url) == []
    finally:
        front.stop()


async def test_gc_keeps_the_tombstone_when_the_tag_delete_answer_was_lost(
    registry_factory, tmp_path
):
    """GC deletes `dev` (v1 keeps its digest) through a tag DELETE answered 500 after
    the work, 404 on retry; p fails before the delete propagates; failback must not
    copy `dev` back to p."""
    p, a = registry_factory("p"), registry_factory("a")
    front = lossy_tag_delete_front(p)
    config, journal, pool = parts(
        tmp_path,
        {"p": p, "a": a},
        [{"name": "apps", "from": "p", "to": ["a"], "deletes": True}],
    )
    engine = CopyEngine(BlobIndex(journal))
    try:
        with Pusher(p.url) as push:
            push.push_image("team/app", "v1", [layer_bytes("g-v1", 200)])
            push.push_image("team/app", "dev", [layer_bytes("g-v1", 200)])
        assert (await Reconciler(config, journal, pool, engine).run()).failures == []
        age_tree(p.storage, 7200)
        site = SiteEndpoint(name="p", url=front.url, insecure=True)
        async with RegistryClient(site, retries=2, backoff_base=0.01) as c:
            res = await collect_api(
                c, journal, ApiGCOptions(site="p", policies=[KEEP_V], storage=p.storage)
            )
        assert front.answered == [500, 404]  # type: ignore[attr-defined]
        assert res.errors == []
        assert "team/app:dev" in res.deleted_tags
        assert tags(p.url) == ["v1"]
        stones = await journal.tombstones.at_site("p", "team/app")
        assert [(s.tag, s.origin) for s in stones] == [("dev", "retention")]

        p.stop()  # p dies before the delete propagates to a
        await pool.aclose()
        pool = ClientPool(config, retries=1, backoff_base=0.01)
        await failover(config, journal, pool, engine, FailoverRequest("a"))
        p.start()
        back = await failback(config, journal, pool, engine, "p")
        assert back.failures == []
        assert tags(p.url) == ["v1"]
    finally:
        front.stop()
        await pool.aclose()
        journal.close()


async def test_delete_digest_keeps_the_tombstone_when_the_answer_was_lost(
    two_registries, proxy_factory, tmp_path
):
    """The target's manifest DELETE is carried out but answered 500; the retry says
    404. The manifest is gone: the `performed` tombstone stays."""
    src, dst = two_registries
    with Pusher(src.url) as s, Pusher(dst.url) as d:
        img = s.push_image("team/app", "v1", [layer_bytes("lost", 100)])
        assert d.push_image("team/app", "v1", [layer_bytes("lost", 100)]).digest == img.digest
    proxy = proxy_factory(dst)
    proxy.respond_after(500, method="DELETE", path=f"/manifests/{img.digest}$")
    journal = Journal(tmp_path / "journal.db")
    try:
        async with (
            RegistryClient(SiteEndpoint(name="a", url=src.url, insecure=True), retries=1) as a,
            RegistryClient(
                SiteEndpoint(name="b", url=proxy.url, insecure=True),
                retries=2,
                backoff_base=0.01,
            ) as b,
        ):
            assert await a.delete_manifest("team/app", img.digest)
            result = await delete_digest(
                DeleteSite(a, "a", "team/app"),
                DeleteSite(b, "b", "team/app"),
                img.digest,
                lambda _tag: True,
                journal=journal,
            )
        assert result.outcome == "deleted", result.describe()
        stones = await journal.tombstones.at_site("b", "team/app")
        assert (None, img.digest, "performed") in [(t.tag, t.digest, t.origin) for t in stones]
    finally:
        journal.close()


def _deleted_at_source_and_target(src, dst):
    """v1 at both sites (one digest), deleted at the source by digest (returns it)."""
    with Pusher(src.url) as s, Pusher(dst.url) as d:
        img = s.push_image("team/app", "v1", [layer_bytes("ahead", 100)])
        assert d.push_image("team/app", "v1", [layer_bytes("ahead", 100)]).digest == img.digest
    return img.digest


async def _propagate(src_url: str, dst_url: str, digest: str, journal: Journal):
    async with (
        RegistryClient(SiteEndpoint(name="a", url=src_url, insecure=True), retries=1) as a,
        RegistryClient(
            SiteEndpoint(name="b", url=dst_url, insecure=True), retries=1, backoff_base=0.01
        ) as b,
    ):
        await a.delete_manifest("team/app", digest)
        return await delete_digest(
            DeleteSite(a, "a", "team/app"),
            DeleteSite(b, "b", "team/app"),
            digest,
            lambda _tag: True,
            journal=journal,
        )


async def test_the_performed_tombstone_is_written_before_the_delete(two_registries, tmp_path):
    """The journal already holds the tombstone when the registry receives the DELETE:
    a process killed right after the registry carried it out leaves the record."""
    src, dst = two_registries
    digest = _deleted_at_source_and_target(src, dst)
    db = tmp_path / "journal.db"
    journal = Journal(db)
    seen_then: list[list[tuple[str | None, str | None]]] = []

    def look(_seen: Seen) -> None:
        with sqlite3.connect(db) as conn:
            found = conn.execute(
                "SELECT tag, digest FROM tombstones WHERE site = 'b' AND origin = 'performed'"
            ).fetchall()
        seen_then.append(sorted(found, key=repr))
        return None  # forward it

    front = HostileFront(dst.port)
    front.intercept("DELETE", f"/manifests/{digest}$", look, lambda _s, reply: reply)
    front.start()
    try:
        result = await _propagate(src.url, front.url, digest, journal)
        assert result.outcome == "deleted", result.describe()
        # the tag went first (its own tombstone), then the manifest's, ahead of its DELETE
        assert seen_then == [sorted([("v1", digest), (None, digest)], key=repr)]
    finally:
        front.stop()
        journal.close()


async def test_a_refused_delete_withdraws_its_tombstone(two_registries, proxy_factory, tmp_path):
    """A definite refusal (405: deletes disabled) means nothing was deleted: no tombstone."""
    src, dst = two_registries
    digest = _deleted_at_source_and_target(src, dst)
    proxy = proxy_factory(dst)
    proxy.respond(405, count=10, method="DELETE", path=f"/manifests/{digest}$")
    journal = Journal(tmp_path / "journal.db")
    try:
        with pytest.raises(RegistryError):
            await _propagate(src.url, proxy.url, digest, journal)
        stones = await journal.tombstones.at_site("b", "team/app")
        assert [(t.tag, t.digest) for t in stones if t.tag is None] == []
    finally:
        journal.close()
