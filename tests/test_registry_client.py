"""RegistryClient against a real registry: manifests, blobs, uploads, mounts, listing."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

import httpx
import pytest

from replicator.manifest import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    digest_of,
)
from replicator.registry.client import RegistryClient
from replicator.registry.errors import (
    DigestMismatch,
    InvalidManifest,
    NotFound,
    RegistryError,
)
from replicator.registry.site import SiteEndpoint
from replicator.registry.uploads import with_digest as _with_digest
from tests.harness.images import Pusher, assert_image_complete, layer_bytes

SIGNATURE = "application/vnd.dev.cosign.simplesigning.v1+json"


def site_for(url: str, **kw) -> SiteEndpoint:
    return SiteEndpoint(name="us-east", url=url, insecure=True, **kw)


def client_for(url: str, **kw) -> RegistryClient:
    site_kw = {
        k: kw.pop(k)
        for k in list(kw)
        if k in ("concurrency", "requests_per_second", "credentials", "docker_config")
    }
    kw.setdefault("backoff_base", 0.01)
    return RegistryClient(site_for(url, **site_kw), **kw)


async def pieces(data: bytes, size: int = 256 * 1024):
    for i in range(0, len(data), size):
        yield data[i : i + size]


def source_of(data: bytes, opened: list[int] | None = None, piece: int = 200 * 1024):
    """open_source for upload_blob_chunked: re-openable at any offset, records offsets."""

    @asynccontextmanager
    async def open_source(offset: int):
        if opened is not None:
            opened.append(offset)
        yield pieces(data[offset:], piece)

    return open_source


async def test_ping_and_site_from_url(registry):
    site = SiteEndpoint.from_url(registry.host, insecure=True)
    assert site.url == registry.url and site.name == registry.host
    async with RegistryClient(site) as c:
        await c.ping()
        assert c.stats["requests"] == 1


async def test_manifest_head_get_put_delete(registry):
    with Pusher(registry.url) as p:
        img = p.push_image("team/app", "v1", [layer_bytes("base", 4096)])
    async with client_for(registry.url) as c:
        desc = await c.head_manifest("team/app", "v1")
        assert desc is not None
        assert (desc.media_type, desc.digest, desc.size) == (OCI_MANIFEST, img.digest, len(img.raw))
        by_tag = await c.get_manifest("team/app", "v1")
        by_digest = await c.get_manifest("team/app", img.digest)
        assert by_tag.raw == by_digest.raw == img.raw
        assert by_tag.digest == img.digest and by_tag.media_type == OCI_MANIFEST
        assert [b.digest for b in by_tag.blobs] == img.blobs

        # copy blobs and manifest into another repository with the client alone
        for blob in by_tag.blobs:
            async with c.open_blob("team/app", blob.digest) as stream:
                assert stream.size == blob.size
                await c.upload_blob("team/copy", blob.digest, blob.size, stream)
        assert await c.put_manifest("team/copy", "v1", img.raw, OCI_MANIFEST) == img.digest
        assert assert_image_complete(registry.url, "team/copy", "v1") == img.digest

        assert await c.head_manifest("team/app", "missing") is None
        assert await c.delete_manifest("team/copy", img.digest) is True
        assert await c.delete_manifest("team/copy", img.digest) is False
        assert await c.head_manifest("team/copy", img.digest) is None


async def test_docker_manifest_list_round_trip(registry):
    with Pusher(registry.url) as p:
        idx = p.push_multiarch("team/multi", "latest", "m", docker=True)
    async with client_for(registry.url) as c:
        m = await c.get_manifest("team/multi", "latest")
        assert m.media_type == DOCKER_LIST and m.is_index and m.digest == idx.digest
        assert {str(ch.platform) for ch in m.children} == {"linux/amd64", "linux/arm64"}
        child = await c.get_manifest("team/multi", m.children[0].digest)
        assert child.media_type == DOCKER_MANIFEST
        head = await c.head_manifest("team/multi", "latest")
        assert head is not None and head.media_type == DOCKER_LIST


async def test_missing_manifest_error_names_site_repo_and_ref(registry):
    async with client_for(registry.url) as c:
        with pytest.raises(NotFound) as err:
            await c.get_manifest("team/app", "v9")
    assert str(err.value) == "us-east: team/app:v9: manifest unknown (HTTP 404)"
    assert (err.value.site, err.value.repository, err.value.reference, err.value.status) == (
        "us-east",
        "team/app",
        "v9",
        404,
    )
    assert err.value.retryable is False


async def test_invalid_manifest_put_is_a_clear_400(registry, proxy_factory):
    proxy = proxy_factory(registry)
    async with client_for(proxy.url) as c:
        with pytest.raises(RegistryError) as err:
            await c.put_manifest("team/app", "bad", b"not json", OCI_MANIFEST)
    assert err.value.status == 400 and not err.value.retryable
    assert str(err.value).startswith("us-east: team/app:bad: manifest invalid")
    assert proxy.count("PUT") == 1  # 4xx is not retried


async def test_put_manifest_refuses_digest_that_does_not_match(registry):
    async with client_for(registry.url) as c:
        wrong = digest_of(b"something else")
        with pytest.raises(DigestMismatch) as err:
            await c.put_manifest("team/app", wrong, b"{}", OCI_MANIFEST)
        assert c.stats["requests"] == 0
    assert f"team/app@{wrong}" in str(err.value)


async def test_blob_upload_download_range_delete(registry):
    data = layer_bytes("blob", 3 * 1024 * 1024 + 17)
    digest = digest_of(data)
    async with client_for(registry.url) as c:
        assert await c.head_blob("team/app", digest) is None
        await c.upload_blob("team/app", digest, len(data), pieces(data))
        assert c.stats["bytes_uploaded"] == len(data)
        assert await c.head_blob("team/app", digest) == len(data)
        assert registry.has_blob_data(digest)

        async with c.open_blob("team/app", digest) as s:
            chunks = [chunk async for chunk in s]
        assert b"".join(chunks) == data and max(map(len, chunks)) <= 1 << 20
        offset = 2 * 1024 * 1024 + 5
        async with c.open_blob("team/app", digest, offset) as s:
            assert (s.size, s.offset) == (len(data), offset)
            assert await s.read() == data[offset:]
        assert c.stats["bytes_downloaded"] == len(data) + len(data) - offset
        assert await c.get_blob("team/app", digest) == data

        assert await c.delete_blob("team/app", digest) is True
        assert await c.delete_blob("team/app", digest) is False
        assert await c.head_blob("team/app", digest) is None
        with pytest.raises(NotFound) as err:
            async with c.open_blob("team/app", digest):
                pass
    assert f"us-east: team/app@{digest}: blob unknown" in str(err.value)


async def test_upload_blob_with_wrong_digest_is_refused(registry):
    data = b"payload" * 100
    wrong = digest_of(b"other")
    async with client_for(registry.url) as c:
        with pytest.raises(DigestMismatch) as err:
            await c.upload_blob("team/app", wrong, len(data), pieces(data))
        assert await c.head_blob("team/app", wrong) is None
    assert err.value.status == 400 and "team/app@" in str(err.value)


async def test_source_errors_propagate_unchanged_and_session_is_cancelled(registry, proxy_factory):
    proxy = proxy_factory(registry)

    class SourceBroke(Exception):
        pass

    async def broken():
        yield b"x" * 1000
        raise SourceBroke("source went away")

    @asynccontextmanager
    async def open_broken(offset: int):
        yield broken()

    digest = digest_of(b"whatever")
    async with client_for(proxy.url) as c:
        with pytest.raises(SourceBroke):
            await c.upload_blob("team/app", digest, 5000, broken())
        with pytest.raises(SourceBroke):
            await c.upload_blob_chunked("team/app", digest, 5000, open_broken, chunk_size=2000)
        await c.ping()  # the client is still usable
    # both sessions were cancelled (distribution's own clean-up of an aborted request races
    # with the DELETE, so count what we sent rather than inspecting its storage)
    assert proxy.count("DELETE", r"/blobs/uploads/") == 2


async def test_stream_feeding_upload_on_same_client_cannot_deadlock(registry):
    """With one slot, a download stream feeding an upload to the same registry must not
    wait on itself (the two-way replication case with shared per-site clients)."""
    data = layer_bytes("deadlock", 300_000)
    digest = digest_of(data)
    with Pusher(registry.url) as p:
        p.push_blob("team/a", data)
    async with client_for(registry.url, concurrency=1) as c:

        async def copy() -> None:
            async with c.open_blob("team/a", digest) as stream:
                await c.upload_blob("team/b", digest, len(data), stream)

        await asyncio.wait_for(copy(), timeout=10)
        assert await c.head_blob("team/b", digest) == len(data)


async def test_more_streams_than_slots_feeding_uploads_all_finish(registry):
    """Open downloads wait for their own slots, never for request slots held by
    the uploads they feed: six copies through one request slot all complete."""
    blobs = [layer_bytes(f"many{i}", 60_000) for i in range(6)]
    with Pusher(registry.url) as p:
        for data in blobs:
            p.push_blob("team/a", data)
    async with client_for(registry.url, concurrency=1) as c:

        async def copy(data: bytes) -> None:
            async with c.open_blob("team/a", digest_of(data)) as stream:
                await c.upload_blob("team/b", digest_of(data), len(data), stream)

        await asyncio.wait_for(asyncio.gather(*(copy(d) for d in blobs)), timeout=20)
        for data in blobs:
            assert await c.head_blob("team/b", digest_of(data)) == len(data)


def test_digest_is_added_to_any_upload_location():
    digest = "sha256:" + "ab" * 32
    quoted = "sha256%3A" + "ab" * 32
    assert _with_digest("http://r/v2/a/blobs/uploads/u?_state=x%3D", digest) == (
        f"http://r/v2/a/blobs/uploads/u?_state=x%3D&digest={quoted}"
    )
    assert _with_digest("http://r/v2/a/blobs/uploads/u", digest) == (
        f"http://r/v2/a/blobs/uploads/u?digest={quoted}"
    )
    assert _with_digest("http://r/v2/a/blobs/uploads/u?", digest) == (
        f"http://r/v2/a/blobs/uploads/u?digest={quoted}"
    )


async def test_chunked_upload_sends_patches(registry, proxy_factory):
    proxy = proxy_factory(registry)
    data = layer_bytes("chunked", 2 * 1024 * 1024 + 1234)
    digest = digest_of(data)
    opened: list[int] = []
    async with client_for(proxy.url) as c:
        await c.upload_blob_chunked(
            "team/app", digest, len(data), source_of(data, opened), chunk_size=1024 * 1024
        )
        assert await c.head_blob("team/app", digest) == len(data)
    patches = [r for r in proxy.records if r.method == "PATCH"]
    assert [r.request_bytes for r in patches] == [1 << 20, 1 << 20, 1234]
    assert opened == [0]
    assert registry.has_blob_data(digest)
    with Pusher(registry.url) as p:
        assert p.http.get(f"{registry.url}/v2/team/app/blobs/{digest}").content == data


async def test_mount_201_and_202(registry):
    data = layer_bytes("shared", 5000)
    digest = digest_of(data)
    with Pusher(registry.url) as p:
        p.push_blob("team/src", data)
    async with client_for(registry.url) as c:
        assert await c.mount_blob("team/dst", digest, from_repo="team/src") is None
        assert await c.head_blob("team/dst", digest) == len(data)
        assert registry.layer_link("team/dst", digest).exists()

        # not in from-repo: distribution opens an ordinary upload session instead (202)
        other = layer_bytes("other", 3000)
        other_digest = digest_of(other)
        location = await c.mount_blob("team/dst", other_digest, from_repo="team/src")
        assert location is not None and location.startswith(registry.url + "/v2/team/dst/")
        await c.upload_blob("team/dst", other_digest, len(other), pieces(other), location=location)
        assert await c.head_blob("team/dst", other_digest) == len(other)


async def test_start_and_cancel_upload(registry):
    async with client_for(registry.url) as c:
        location = await c.start_upload("team/app")
        assert location.startswith(f"{registry.url}/v2/team/app/blobs/uploads/")
        uploads = registry.storage / "docker/registry/v2/repositories/team/app/_uploads"
        [session] = list(uploads.iterdir())
        assert (session / "startedat").exists()
        await c.cancel_upload(location)
        assert not (session / "startedat").exists() and not (session / "data").exists()
        async with httpx.AsyncClient() as http:
            assert (await http.get(location)).status_code == 404
        await c.cancel_upload(location)  # already gone: ignored


async def test_list_tags_complete_with_small_pages(registry, proxy_factory):
    """distribution 2.8 ignores `n` on tags/list (one page); v3 pages with Link, which the
    catalog test below proves we follow (same code path)."""
    proxy = proxy_factory(registry)
    with Pusher(registry.url) as p:
        img = p.push_image("team/app", "t00", [layer_bytes("t", 100)])
        for i in range(1, 23):
            p.push_manifest("team/app", f"t{i:02d}", img.raw, img.media_type)
    async with client_for(proxy.url) as c:
        tags = await c.list_tags("team/app", page_size=10)
        assert sorted(tags) == [f"t{i:02d}" for i in range(23)]
        assert proxy.count("GET", r"/tags/list$") >= 1
        assert await c.list_tags("team/nothing-here") == []


async def test_catalog_follows_pagination(registry, proxy_factory):
    proxy = proxy_factory(registry)
    names = [f"proj/r{i:02d}" for i in range(12)]
    with Pusher(registry.url) as p:
        for name in names:
            p.push_image(name, "v1", [layer_bytes("c", 64)])
    async with client_for(proxy.url) as c:
        assert await c.catalog(page_size=5) == names
        assert proxy.count("GET", r"/_catalog$") == 3


async def test_referrers_fallback_tag(registry, proxy_factory):
    proxy = proxy_factory(registry)
    with Pusher(registry.url) as p:
        img = p.push_image("team/app", "v1", [layer_bytes("r", 100)])
        sig = p.push_referrer("team/app", img, b"signature")
        sbom = p.push_referrer("team/app", img, b"sbom", artifact_type="application/spdx+json")
        lonely = p.push_image("team/app", "v2", [layer_bytes("l", 100)])
    async with client_for(proxy.url) as c:
        found = await c.referrers("team/app", img.digest)
        assert [d.digest for d in found] == [sig.digest, sbom.digest]
        assert found[0].artifact_type == SIGNATURE
        only = await c.referrers("team/app", img.digest, artifact_type="application/spdx+json")
        assert [d.digest for d in only] == [sbom.digest]
        assert await c.referrers("team/app", lonely.digest) == []
    # distribution has no referrers API: asked once (a plain 404: no such route), then
    # remembered, and the fallback tag was read every time, with one GET each
    assert proxy.count("GET", r"/referrers/") == 1
    assert proxy.count("GET", r"/manifests/sha256-") == 3
    assert proxy.count("HEAD", r"/manifests/sha256-") == 0


async def test_flipped_byte_is_a_digest_mismatch(registry, proxy_factory):
    proxy = proxy_factory(registry)
    data = layer_bytes("flip", 10_000)
    digest = digest_of(data)
    with Pusher(registry.url) as p:
        img = p.push_image("team/app", "v1", [data])
    async with client_for(proxy.url) as c:
        proxy.flip_byte(position=5000, method="GET", path=r"/blobs/sha256:")
        with pytest.raises(DigestMismatch) as err:
            async with c.open_blob("team/app", digest) as s:
                await s.read()
        assert f"us-east: team/app@{digest}: blob content hashes to sha256:" in str(err.value)
        assert err.value.retryable is True
        assert await c.get_blob("team/app", digest) == data  # fault was one-shot

        proxy.flip_byte(position=30, method="GET", path=r"/manifests/")
        with pytest.raises(DigestMismatch):
            await c.get_manifest("team/app", img.digest)
        proxy.flip_byte(position=30, method="GET", path=r"/manifests/")
        with pytest.raises(DigestMismatch):  # by tag: checked against the header
            await c.get_manifest("team/app", "v1")


async def test_invalid_manifest_is_both_registry_and_manifest_error(registry):
    from replicator.manifest import ManifestError

    assert issubclass(InvalidManifest, RegistryError)
    assert issubclass(InvalidManifest, ManifestError)


async def test_head_manifest_does_not_pull(registry, proxy_factory):
    proxy = proxy_factory(registry)
    with Pusher(registry.url) as p:
        p.push_image("team/app", "v1", [layer_bytes("h", 100)])
    async with client_for(proxy.url) as c:
        assert await c.head_manifest("team/app", "v1") is not None
    assert proxy.count("GET") == 0 and proxy.count("HEAD") == 1


async def test_index_put_and_oci_index_media_type(registry):
    with Pusher(registry.url) as p:
        idx = p.push_multiarch("team/multi", "v1", "x")
    async with client_for(registry.url) as c:
        m = await c.get_manifest("team/multi", "v1")
        assert m.media_type == OCI_INDEX
        # children are missing in team/multi2: mount their blobs, push children, then index
        for child in m.children:
            cm = await c.get_manifest("team/multi", child.digest)
            for blob in cm.blobs:
                assert await c.mount_blob("team/multi2", blob.digest, "team/multi") is None
            await c.put_manifest("team/multi2", child.digest, cm.raw, cm.media_type)
        assert await c.put_manifest("team/multi2", "v1", m.raw, m.media_type) == idx.digest
    assert assert_image_complete(registry.url, "team/multi2", "v1") == idx.digest
