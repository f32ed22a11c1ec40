"""Copy engine against real registries: completeness, digests, mounts, idempotence.

Upload and mount counts come from the target registry's own notifications,
not from our counters (which are checked to agree).
"""

from __future__ import annotations

import asyncio
import json

import pytest

from replicator.blob_index import BlobIndex
from replicator.copy import CopyEngine, CopyOptions
from replicator.journal import Journal
from replicator.manifest import Platform
from replicator.registry.client import RegistryClient
from replicator.registry.site import SiteEndpoint
from tests.harness.images import Pusher, assert_image_complete, digest_of, layer_bytes
from tests.harness.journal import sql
from tests.harness.util import wait_until
from tests.harness.webhook_sink import WebhookSink


@pytest.fixture
def sink():
    s = WebhookSink()
    yield s
    s.close()


@pytest.fixture
def src_dst(registry_factory, sink):
    src = registry_factory("src")
    dst = registry_factory("dst", notify_url=sink.url)
    return src, dst


def client(reg, name):
    return RegistryClient(SiteEndpoint(name=name, url=reg.url, insecure=True))


async def copy_all(engine, src, dst, items, options=CopyOptions()):
    """items: (src_repo, tag, dst_repo)"""
    async with client(src, "src") as s, client(dst, "dst") as d:
        return await asyncio.gather(
            *[
                engine.copy(s, repo, tag, d, dst_repo, options=options)
                for repo, tag, dst_repo in items
            ]
        )


def seed_shared(src, repos=3, tags=2):
    base = layer_bytes("base", 64 * 1024)
    with Pusher(src.url) as p:
        for r in range(repos):
            per_repo = layer_bytes(f"repo{r}", 16 * 1024)
            for t in range(tags):
                p.push_image(
                    f"team/app{r}", f"v{t}", [base, per_repo, layer_bytes(f"u{r}-{t}", 4096)]
                )
    return base


async def test_copy_is_complete_digest_identical_and_mounts_shared_layers(src_dst, sink, tmp_path):
    src, dst = src_dst
    base = seed_shared(src)
    journal = Journal(tmp_path / "j.db")
    engine = CopyEngine(BlobIndex(journal))
    items = [(f"team/app{r}", f"v{t}", f"mirror/app{r}") for r in range(3) for t in range(2)]
    results = await copy_all(engine, src, dst, items)
    assert all(r.status == "copied" for r in results), [r.error for r in results]
    for repo, tag, dst_repo in items:
        src_digest = assert_image_complete(src.url, repo, tag)
        assert assert_image_complete(dst.url, dst_repo, tag) == src_digest
    # unique blobs: base(1) + per-repo(3) + unique(6) + configs(6) = 16, each uploaded once
    pushes = wait_until(
        lambda: len(sink.blob_events("push")) >= 16 and sink.blob_events("push"),
        what="blob push notifications",
    )
    pushed = [e["target"]["digest"] for e in pushes]
    assert len(pushed) == len(set(pushed)) == 16, "a blob was uploaded twice"
    # the base layer is uploaded to one repository and mounted into the two others
    mounts = wait_until(
        lambda: len(sink.blob_events("mount")) >= 2 and sink.blob_events("mount"),
        what="mount notifications",
    )
    assert [e["target"]["digest"] for e in mounts] == [digest_of(base)] * 2
    assert sum(r.stats.blobs_uploaded for r in results) == 16
    assert sum(r.stats.blobs_mounted for r in results) == 2
    # the journal now knows where every blob lives on the target
    rows = sql(journal, "SELECT COUNT(DISTINCT digest) AS n FROM blob_locations")
    assert rows[0]["n"] == 16
    journal.close()


async def test_second_copy_uploads_nothing_and_writes_no_manifest(src_dst, sink):
    src, dst = src_dst
    seed_shared(src, repos=2, tags=2)
    engine = CopyEngine()
    items = [(f"team/app{r}", f"v{t}", f"team/app{r}") for r in range(2) for t in range(2)]
    await copy_all(engine, src, dst, items)
    # the registry delivers its events in order: once the four tag pushes (the last
    # write of each copy) have arrived, every event of the first copy has
    wait_until(
        lambda: (
            len([e for e in sink.snapshot() if e["action"] == "push" and e["target"].get("tag")])
            >= 4
        ),
        what="first copy's events",
    )
    count_before = len(dst.all_blob_digests())
    sink.clear()
    results = await copy_all(CopyEngine(), src, dst, items)
    assert [r.status for r in results] == ["skipped"] * 4
    assert sum(r.stats.blobs_uploaded + r.stats.manifests_written for r in results) == 0
    assert len(dst.all_blob_digests()) == count_before
    assert [e for e in sink.snapshot() if e["action"] in ("push", "mount")] == []


async def test_multiarch_index_referrers_and_platform_filter(registry_factory):
    src, dst, dst2 = (registry_factory("src"), registry_factory("dst"), registry_factory("dst2"))
    with Pusher(src.url) as p:
        idx = p.push_multiarch("team/multi", "v1", "m")
        img = p.push_image("team/signed", "v1", [layer_bytes("s", 1000)])
        sig = p.push_referrer("team/signed", img, b"signature-bytes")
    results = await copy_all(
        CopyEngine(),
        src,
        dst,
        [("team/multi", "v1", "team/multi"), ("team/signed", "v1", "team/signed")],
    )
    assert [r.status for r in results] == ["copied", "copied"], [r.error for r in results]
    assert assert_image_complete(dst.url, "team/multi", "v1") == idx.digest
    assert assert_image_complete(dst.url, "team/signed", "v1") == img.digest
    assert assert_image_complete(dst.url, "team/signed", sig.digest) == sig.digest
    fallback = "sha256-" + img.digest.split(":")[1]
    assert assert_image_complete(dst.url, "team/signed", fallback)

    options = CopyOptions(platforms=[Platform.parse("linux/arm64")])
    (result,) = await copy_all(
        CopyEngine(), src, dst2, [("team/multi", "v1", "team/multi")], options
    )
    assert result.status == "copied"
    digest = assert_image_complete(dst2.url, "team/multi", "v1")
    with Pusher(dst2.url) as p:
        doc = json.loads(p.get_manifest("team/multi", "v1").content)
    assert [m["platform"]["architecture"] for m in doc["manifests"]] == ["arm64"]
    (again,) = await copy_all(
        CopyEngine(), src, dst2, [("team/multi", "v1", "team/multi")], options
    )
    assert again.status == "skipped" and again.digest == digest


async def test_concurrent_copies_upload_a_shared_blob_once(src_dst, sink):
    src, dst = src_dst
    big = layer_bytes("big-shared", 2 * 2**20)
    with Pusher(src.url) as p:
        for r in range(4):
            p.push_image(f"team/c{r}", "v1", [big, layer_bytes(f"c{r}", 100)])
    engine = CopyEngine()  # no journal: the in-flight table alone must de-duplicate
    results = await copy_all(
        engine, src, dst, [(f"team/c{r}", "v1", f"team/c{r}") for r in range(4)]
    )
    assert all(r.status == "copied" for r in results)
    big_digest = digest_of(big)
    wait_until(lambda: len(sink.blob_events("mount")) >= 3, what="mount events")
    pushes = [e for e in sink.blob_events("push") if e["target"]["digest"] == big_digest]
    assert len(pushes) == 1


async def test_overwrite_false_reports_conflict_and_leaves_target(registry_factory):
    src, dst = registry_factory("src"), registry_factory("dst")
    with Pusher(src.url) as p:
        p.push_image("team/app", "v1", [layer_bytes("new", 100)])
    with Pusher(dst.url) as p:
        old = p.push_image("team/app", "v1", [layer_bytes("old", 100)])
    (r,) = await copy_all(
        CopyEngine(), src, dst, [("team/app", "v1", "team/app")], CopyOptions(overwrite=False)
    )
    assert r.status == "conflict"
    assert assert_image_complete(dst.url, "team/app", "v1") == old.digest


async def test_missing_source_tag_fails_with_a_clear_error(two_registries):
    src, dst = two_registries
    (r,) = await copy_all(CopyEngine(), src, dst, [("team/none", "v9", "team/none")])
    assert r.status == "failed"
    assert "team/none" in r.error and "v9" in r.error


async def test_never_mounts_into_a_repository_that_already_holds_the_blob(src_dst, sink):
    """The index names another holder, but the target repository has the blob
    already (pushed there directly): HEAD finds it and nothing is mounted. A
    mount would rewrite the blob's link in place, and pulls racing it fail."""
    src, dst = src_dst
    base = layer_bytes("base-held", 32 * 1024)
    with Pusher(src.url) as p:
        p.push_image("team/a", "v1", [base, layer_bytes("a", 100)])
        p.push_image("team/b", "v1", [base, layer_bytes("b", 100)])
    with Pusher(dst.url) as p:
        p.push_blob("team/b", base)  # someone else put it there; the index cannot know
    engine = CopyEngine(BlobIndex())
    (first,) = await copy_all(engine, src, dst, [("team/a", "v1", "team/a")])
    assert first.status == "copied"
    assert await engine.blob_index.holders(dst.url, digest_of(base)) == ["team/a"]
    sink.clear()
    (second,) = await copy_all(engine, src, dst, [("team/b", "v1", "team/b")])
    assert second.status == "copied"
    assert second.stats.blobs_existing >= 1 and second.stats.blobs_mounted == 0
    assert_image_complete(dst.url, "team/b", "v1")
    wait_until(
        lambda: [
            e
            for e in sink.snapshot()
            if e["action"] == "push"
            and e["target"].get("repository") == "team/b"
            and e["target"].get("mediaType", "").endswith("json")
            and "manifest" in e["target"].get("mediaType", "")
        ],
        what="the manifest push event",
    )
    assert sink.blob_events("mount") == []


async def test_referrers_fallback_index_is_read_from_the_source_once(
    registry_factory, proxy_factory
):
    src, dst = registry_factory("src"), registry_factory("dst")
    with Pusher(src.url) as p:
        img = p.push_image("team/signed", "v1", [layer_bytes("once", 1000)])
        p.push_referrer("team/signed", img, b"signature-once")
        plain = p.push_image("team/plain", "v1", [layer_bytes("plain", 1000)])
    proxy = proxy_factory(src)
    results = await copy_all(
        CopyEngine(),
        proxy,
        dst,
        [("team/signed", "v1", "team/signed"), ("team/plain", "v1", "team/plain")],
    )
    assert [r.status for r in results] == ["copied", "copied"], [r.error for r in results]
    fallback = "sha256-" + img.digest.split(":")[1]
    assert assert_image_complete(dst.url, "team/signed", fallback)
    # one GET of each subject's fallback tag, whether it exists or not
    assert proxy.count(None, f"/manifests/{fallback}$") == 1
    assert proxy.count(None, "/manifests/sha256-" + plain.digest.split(":")[1] + "$") == 1


async def test_connections_are_kept_alive_and_bounded(registry_factory, proxy_factory):
    """Many concurrent copies through concurrency-2 clients: each side opens at most
    2 x concurrency + 2 connections and reuses them (no churn)."""
    src, dst = registry_factory("src"), registry_factory("dst")
    with Pusher(src.url) as p:
        for r in range(6):
            for t in range(2):
                p.push_image(
                    f"team/k{r}", f"v{t}", [layer_bytes(f"k{r}-{t}-{i}", 20_000) for i in range(3)]
                )
    src_proxy, dst_proxy = proxy_factory(src), proxy_factory(dst)
    engine = CopyEngine()
    async with (
        RegistryClient(SiteEndpoint("src", src_proxy.url, insecure=True, concurrency=2)) as s,
        RegistryClient(SiteEndpoint("dst", dst_proxy.url, insecure=True, concurrency=2)) as d,
    ):
        results = await asyncio.gather(
            *(
                engine.copy(s, f"team/k{r}", f"v{t}", d, f"team/k{r}")
                for r in range(6)
                for t in range(2)
            )
        )
    assert all(r.status == "copied" for r in results), [r.error for r in results]
    assert len(src_proxy.records) > 40 and len(dst_proxy.records) > 100
    assert src_proxy.connections <= 6 and dst_proxy.connections <= 6
