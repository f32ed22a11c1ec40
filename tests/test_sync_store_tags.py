"""A source with `storage:` configured is observed from its store, not one HEAD per tag."""

from __future__ import annotations

import os

from replicator.blob_index import BlobIndex
from replicator.clients import ClientPool
from replicator.config import config_from_dict
from replicator.copy import CopyEngine
from replicator.store_tags import read_tags
from replicator.sync import Reconciler
from tests.harness.images import Pusher, assert_image_complete, layer_bytes


def _config(src_url: str, dst_url: str, storage, journal) -> object:
    return config_from_dict(
        {
            "journal": str(journal),
            "sites": {
                "a": {"url": src_url, "insecure": True, "storage": str(storage)},
                "b": {"url": dst_url, "insecure": True},
            },
            "rules": [{"name": "all", "from": "a", "to": "b", "repositories": ["**"]}],
        }
    )


async def test_source_tags_come_from_the_store(registry_factory, proxy_factory, tmp_path):
    src, dst = registry_factory("src"), registry_factory("dst")
    with Pusher(src.url) as p:
        pushed = {
            (repo, tag): p.push_image(repo, tag, [layer_bytes(f"{repo}{tag}", 200)]).digest
            for repo in ("team/app", "web")
            for tag in ("v1", "v2", "latest")
        }
    # One tag the store cannot settle: its link is a symbolic link (never followed),
    # so the registry is asked about it, as before.
    tags_dir = src.storage / "docker/registry/v2/repositories/web/_manifests/tags"
    os.rename(tags_dir / "latest", tmp_path / "latest-real")
    os.symlink(tmp_path / "latest-real", tags_dir / "latest")
    seen = read_tags(src.storage, "web")
    assert seen.unsettled == ["latest"] and set(seen.digests) == {"v1", "v2"}
    assert seen.tags == ["latest", "v1", "v2"]
    assert read_tags(src.storage, "no/such").tags == []

    proxy = proxy_factory(src)
    config = _config(proxy.url, dst.url, src.storage, tmp_path / "journal.db")
    async with ClientPool(config) as pool:
        report = await Reconciler(config, None, pool, CopyEngine(BlobIndex(None))).run()
    assert report.failures == []
    assert report.stats.copied == 6
    for (repo, tag), digest in pushed.items():
        assert assert_image_complete(dst.url, repo, tag) == digest
    # No catalog, no tags list; manifest HEADs only for the symlinked tag: the plan's,
    # and the one right before its write (the source is the truth then, issue 12 item 8;
    # for the other tags the store answers that too)
    assert proxy.count(path="/_catalog") == 0
    assert proxy.count(path="/tags/list") == 0
    heads = [r.path for r in proxy.records if r.method == "HEAD" and "/manifests/" in r.path]
    assert heads == ["/v2/web/manifests/latest"] * 2

    # Nothing changed: the source costs no request at all.
    before = len(proxy.records)
    async with ClientPool(config) as pool:
        again = await Reconciler(config, None, pool, CopyEngine(BlobIndex(None))).run()
    assert again.failures == [] and again.stats.copied == 0
    after = [r for r in proxy.records[before:] if "/manifests/" in r.path]
    assert [(r.method, r.path) for r in after] == [("HEAD", "/v2/web/manifests/latest")]


async def test_a_tag_whose_manifest_revision_is_gone_is_asked_of_the_registry(
    registry_factory, proxy_factory, tmp_path
):
    """The registry answers 404 for a tag whose revision link is missing: the store
    must not claim it exists, or the copy would fail instead of the tag being skipped."""
    src, dst = registry_factory("src"), registry_factory("dst")
    with Pusher(src.url) as p:
        gone = p.push_image("app", "broken", [layer_bytes("b", 200)]).digest
        kept = p.push_image("app", "ok", [layer_bytes("o", 200)]).digest
    alg, hexd = gone.split(":")
    revision = (
        src.storage / f"docker/registry/v2/repositories/app/_manifests/revisions/{alg}/{hexd}"
    )
    os.remove(revision / "link")
    assert read_tags(src.storage, "app").unsettled == ["broken"]

    proxy = proxy_factory(src)
    config = _config(proxy.url, dst.url, src.storage, tmp_path / "journal.db")
    async with ClientPool(config) as pool:
        report = await Reconciler(config, None, pool, CopyEngine(BlobIndex(None))).run()
    assert report.failures == []
    assert report.stats.copied == 1
    assert assert_image_complete(dst.url, "app", "ok") == kept
    assert proxy.count(method="HEAD", path="/manifests/broken") == 1
