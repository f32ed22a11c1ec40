"""Copy engine under faults a real registry cannot produce on demand (via FaultProxy),
and through real basic and token authentication."""

from __future__ import annotations

import time

from replicator.copy import CopyEngine
from replicator.registry.client import RegistryClient
from replicator.registry.site import Credentials, SiteEndpoint
from tests.harness.images import Pusher, assert_image_complete, layer_bytes
from tests.harness.registry import write_htpasswd
from tests.harness.token_server import TokenServer


def endpoint(url: str, name: str, creds: Credentials | None = None) -> SiteEndpoint:
    return SiteEndpoint(name=name, url=url, insecure=True, credentials=creds)


async def copy_one(
    src_url, dst_url, repo="team/app", tag="v1", src_creds=None, dst_creds=None, engine=None
):
    engine = engine or CopyEngine(retry_base_delay=0.05)
    async with (
        RegistryClient(endpoint(src_url, "src", src_creds), backoff_base=0.05) as s,
        RegistryClient(endpoint(dst_url, "dst", dst_creds), backoff_base=0.05) as d,
    ):
        return await engine.copy(s, repo, tag, d, repo)


async def test_corrupted_byte_from_source_is_never_stored(registry_factory, proxy_factory):
    src, dst = registry_factory("src"), registry_factory("dst")
    layer = layer_bytes("victim", 300_000)
    with Pusher(src.url) as p:
        img = p.push_image("team/app", "v1", [layer])
    layer_digest = img.blobs[1]
    proxy = proxy_factory(src)
    proxy.flip_byte(count=100, position=150_000, method="GET", path=f"/blobs/{layer_digest}")
    result = await copy_one(proxy.url, dst.url)
    assert result.status == "failed"
    assert layer_digest in result.error and "refusing" in result.error
    # nothing under that digest, no link, and no manifest referencing it
    assert not dst.has_blob_data(layer_digest)
    assert not dst.layer_link("team/app", layer_digest).exists()
    with Pusher(dst.url) as p:
        assert p.get_manifest("team/app", "v1").status_code == 404
    # every blob the target holds hashes to its name
    import hashlib

    for digest in dst.all_blob_digests():
        data = dst.blob_path(digest).read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == digest


async def test_429_retry_after_is_honoured(registry_factory, proxy_factory):
    src, dst = registry_factory("src"), registry_factory("dst")
    with Pusher(src.url) as p:
        img = p.push_image("team/app", "v1", [layer_bytes("x", 5000)])
    proxy = proxy_factory(dst)
    proxy.too_many_requests(1, count=2, method="POST", path="/blobs/uploads/")
    start = time.monotonic()
    result = await copy_one(src.url, proxy.url)
    elapsed = time.monotonic() - start
    assert result.status == "copied", result.error
    assert elapsed >= 1.0, "Retry-After: 1 was not waited for"
    assert [r.status for r in proxy.records if r.method == "POST"][:2] == [429, 429]
    assert assert_image_complete(dst.url, "team/app", "v1") == img.digest


async def test_connection_cut_mid_blob_is_retried_and_completes(registry_factory, proxy_factory):
    src, dst = registry_factory("src"), registry_factory("dst")
    layer = layer_bytes("big", 2 * 2**20)
    with Pusher(src.url) as p:
        img = p.push_image("team/app", "v1", [layer])
    proxy = proxy_factory(src)
    proxy.cut_response(2**20, count=1, method="GET", path=f"/blobs/{img.blobs[1]}")
    result = await copy_one(proxy.url, dst.url)
    assert result.status == "copied", result.error
    assert proxy.count("GET", f"/blobs/{img.blobs[1]}") == 2
    assert assert_image_complete(dst.url, "team/app", "v1") == img.digest


async def test_copy_with_basic_auth_on_both_sides(registry_factory, tmp_path):
    htpasswd = write_htpasswd(tmp_path / "htpasswd", {"ci": "s3cret-pw"})
    src = registry_factory("src", htpasswd=htpasswd)
    dst = registry_factory("dst", htpasswd=htpasswd)
    with Pusher(src.url, auth=("ci", "s3cret-pw")) as p:
        img = p.push_image("team/app", "v1", [layer_bytes("auth", 1000)])
    creds = Credentials("ci", "s3cret-pw")
    denied = await copy_one(
        src.url, dst.url, src_creds=creds, dst_creds=Credentials("ci", "wrong-pw")
    )
    assert denied.status == "failed" and "s3cret" not in denied.error
    assert "wrong-pw" not in denied.error
    result = await copy_one(src.url, dst.url, src_creds=creds, dst_creds=creds)
    assert result.status == "copied", result.error
    assert assert_image_complete(dst.url, "team/app", "v1", auth=("ci", "s3cret-pw")) == img.digest


async def test_copy_with_token_auth_mounts_across_repositories(registry_factory, tmp_path):
    ts = TokenServer(tmp_path / "token", users={"robot": "t0ken-pw"}).start()
    try:
        src = registry_factory("src")
        dst = registry_factory("dst", token=ts.token_auth())
        shared = layer_bytes("shared", 4000)
        with Pusher(src.url) as p:
            p.push_image("team/a", "v1", [shared])
            p.push_image("team/b", "v1", [shared, layer_bytes("b", 10)])
        creds = Credentials("robot", "t0ken-pw")
        engine = CopyEngine()
        first = await copy_one(src.url, dst.url, "team/a", dst_creds=creds, engine=engine)
        second = await copy_one(src.url, dst.url, "team/b", dst_creds=creds, engine=engine)
        assert first.status == second.status == "copied", (first.error, second.error)
        assert second.stats.blobs_mounted == 1
        # the mount asked for push on the target and pull on the source repository at once
        assert any(
            sorted(s) == ["repository:team/a:pull", "repository:team/b:pull,push"]
            for s in ts.scope_sets()
        )
    finally:
        ts.stop()
