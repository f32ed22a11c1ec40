"""The delete protocol (`replicator.deletes`) on real registries, through `sync` and
directly as the daemon's delete tasks call it.

Issue 11, cases 1 and 2: a tag delete removed the manifest and every sibling tag;
a delete was applied although the source still held the tag.
"""

from __future__ import annotations

import pytest

from replicator.blob_index import BlobIndex
from replicator.clients import ClientPool
from replicator.config import config_from_dict
from replicator.copy import CopyEngine
from replicator.deletes import DeleteSite, delete_digest, delete_tag
from replicator.journal import Journal
from replicator.registry.client import RegistryClient
from replicator.registry.errors import RegistryError
from replicator.registry.site import SiteEndpoint
from replicator.sync import Reconciler
from tests.harness.images import Pusher, assert_image_complete, layer_bytes
from tests.harness.tag_delete_front import tag_delete_front


def client(url: str, name: str) -> RegistryClient:
    return RegistryClient(SiteEndpoint(name=name, url=url, insecure=True), retries=1)


def tags(url: str, repo: str = "team/app") -> list[str]:
    with Pusher(url) as p:
        return sorted(p.tags(repo))


def siblings(url: str):
    """`latest` and `v1` on one manifest, `v2` on another."""
    with Pusher(url) as p:
        img = p.push_image("team/app", "latest", [layer_bytes("siblings", 300)])
        p.push_manifest("team/app", "v1", img.raw, img.media_type)
        other = p.push_image("team/app", "v2", [layer_bytes("other", 300)])
    return img, other


def config_for(tmp_path, src, dst, **rule):
    return config_from_dict(
        {
            "journal": str(tmp_path / "journal.db"),
            "sites": {
                "a": {"url": src.url, "insecure": True},
                "b": {"url": dst.url, "insecure": True},
            },
            "rules": [{"name": "r", "from": "a", "to": ["b"], "deletes": True, **rule}],
        }
    )


async def test_sync_deletes_a_tag_and_keeps_its_siblings(two_registries, tmp_path):
    """Case 1 through `sync`: v1 deleted at the source by tag; latest (same digest)
    stays at the target, complete."""
    src, dst = two_registries
    img, _ = siblings(src.url)
    config = config_for(tmp_path, src, dst)
    journal = Journal(config.journal)
    pool = ClientPool(config, retries=1, backoff_base=0.01)
    engine = CopyEngine(BlobIndex(journal))
    try:
        assert (await Reconciler(config, journal, pool, engine).run()).failures == []
        assert tags(dst.url) == ["latest", "v1", "v2"]
        async with client(src.url, "a") as a:
            assert await a.delete_tag("team/app", "v1")
        plan = await Reconciler(config, journal, pool, engine).run(dry_run=True)
        deletes = [a for a in plan.actions if a.kind == "delete"]
        assert [(d.tag, d.prune_manifest) for d in deletes] == [("v1", False)]
        assert "manifest kept" in deletes[0].describe()
        real = await Reconciler(config, journal, pool, engine).run()
        assert real.failures == [] and real.deleted == 1
        assert tags(dst.url) == ["latest", "v2"]
        assert assert_image_complete(dst.url, "team/app", "latest") == img.digest
        stones = await journal.tombstones.at_site("b", "team/app")
        assert [(t.tag, t.digest, t.origin) for t in stones] == [("v1", img.digest, "performed")]
    finally:
        await pool.aclose()
        journal.close()


async def test_sync_deletes_the_manifest_with_its_last_tag(two_registries, tmp_path):
    src, dst = two_registries
    _, other = siblings(src.url)
    config = config_for(tmp_path, src, dst)
    journal = Journal(config.journal)
    pool = ClientPool(config, retries=1, backoff_base=0.01)
    engine = CopyEngine(BlobIndex(journal))
    try:
        assert (await Reconciler(config, journal, pool, engine).run()).failures == []
        with Pusher(src.url) as p:
            assert (
                p.http.delete(f"{src.url}/v2/team/app/manifests/{other.digest}").status_code == 202
            )
        real = await Reconciler(config, journal, pool, engine).run()
        assert [(a.tag, a.prune_manifest) for a in real.actions if a.kind == "delete"] == [
            ("v2", True)
        ]
        assert real.failures == [] and tags(dst.url) == ["latest", "v1"]
        with Pusher(dst.url) as p:
            assert p.get_manifest("team/app", other.digest).status_code == 404
    finally:
        await pool.aclose()
        journal.close()


@pytest.mark.parametrize("tag_delete", [False, True], ids=["placeholder", "tag-DELETE"])
async def test_delete_tag_keeps_siblings_on_either_registry_kind(
    registry_factory, tag_delete: bool
):
    """Case 1 as the daemon's delete task runs it, on distribution 2.8 (placeholder) and
    on a registry with the spec's DELETE by tag (the front of tests/harness)."""
    src, dst = registry_factory("a"), registry_factory("b")
    img, _ = siblings(dst.url)
    front = tag_delete_front(dst) if tag_delete else None
    try:
        async with client(src.url, "a") as a, client(front.url if front else dst.url, "b") as b:
            result = await delete_tag(
                DeleteSite(a, "a", "team/app"), DeleteSite(b, "b", "team/app"), "v1"
            )
        assert result.outcome == "deleted" and not result.manifest_deleted
        assert tags(dst.url) == ["latest", "v2"]
        assert assert_image_complete(dst.url, "team/app", "latest") == img.digest
    finally:
        if front:
            front.stop()


async def test_delete_is_refused_while_the_source_holds_the_tag(two_registries, tmp_path):
    """Case 2: a stale or forged delete for a tag the source still has changes nothing."""
    src, dst = two_registries
    siblings(src.url)
    img, _ = siblings(dst.url)
    journal = Journal(tmp_path / "j.db")
    try:
        async with client(src.url, "a") as a, client(dst.url, "b") as b:
            source, target = DeleteSite(a, "a", "team/app"), DeleteSite(b, "b", "team/app")
            kept = await delete_tag(source, target, "v1", journal=journal)
            assert kept.outcome == "kept" and "still holds" in kept.reason
            by_digest = await delete_digest(
                source, target, img.digest, lambda t: True, journal=journal
            )
            assert by_digest.outcome == "kept"
        assert tags(dst.url) == ["latest", "v1", "v2"]
        assert await journal.tombstones.at_site("b") == []
    finally:
        journal.close()


async def test_source_error_means_unknown_and_nothing_is_deleted(two_registries, proxy_factory):
    """Case 2: a 5xx at the source is not a 404; the delete raises (retried later)."""
    src, dst = two_registries
    siblings(dst.url)
    proxy = proxy_factory(src)
    proxy.respond(503, count=100, method="HEAD")
    async with client(proxy.url, "a") as a, client(dst.url, "b") as b:
        with pytest.raises(RegistryError):
            await delete_tag(DeleteSite(a, "a", "team/app"), DeleteSite(b, "b", "team/app"), "v1")
    assert tags(dst.url) == ["latest", "v1", "v2"]


async def test_delete_by_digest_keeps_the_manifest_a_tag_still_needs(two_registries):
    """A digest deleted at the source: covered tags on it go (by tag); a tag the rule does
    not cover keeps the manifest, so it is not deleted by digest."""
    src, dst = two_registries
    img, _ = siblings(dst.url)
    with Pusher(dst.url) as p:
        p.push_manifest("team/app", "pinned", img.raw, img.media_type)
    async with client(src.url, "a") as a, client(dst.url, "b") as b:
        source, target = DeleteSite(a, "a", "team/app"), DeleteSite(b, "b", "team/app")
        kept = await delete_digest(source, target, img.digest, lambda t: t != "pinned")
        assert kept.outcome == "kept" and "pinned" in kept.reason
        assert tags(dst.url) == ["pinned", "v2"]
        assert assert_image_complete(dst.url, "team/app", "pinned") == img.digest
        gone = await delete_digest(source, target, img.digest, lambda t: True)
        assert gone.outcome == "deleted" and gone.manifest_deleted
    assert tags(dst.url) == ["v2"]
