"""Blob downloads a registry redirects elsewhere (S3, CloudFront, GCS; issue 13 item 8).

The source registry is a real distribution behind a front that answers every blob
GET with 307 to a "CDN" on another port: a FaultProxy before the same registry, so
it can serve wrong bytes on demand. Whatever the CDN serves is verified against the
digest before the target commits anything, and the bytes are counted (the copy's
`bytes_downloaded`, the transport's, and `copy`/`sync --json`).
"""

from __future__ import annotations

import hashlib
import json

import pytest

from replicator.copy import CopyEngine
from replicator.registry.client import RegistryClient
from replicator.registry.site import SiteEndpoint
from tests.harness.fault_proxy import FaultProxy
from tests.harness.hostile_front import HostileFront, Reply
from tests.harness.images import Pushed, Pusher, assert_image_complete, layer_bytes
from tests.harness.registry import Registry
from tests.test_sync import cli, write_config

LAYERS = [layer_bytes("cdn-a", 300_000), layer_bytes("cdn-b", 70_000)]


class RedirectingSource:
    """`front` (the registry's address) redirects blob GETs to `cdn`; both reach `registry`."""

    def __init__(self, registry: Registry, cdn: FaultProxy) -> None:
        self.registry, self.cdn = registry, cdn
        self.front = HostileFront(registry.port).start()
        self.front.answer(
            "GET", r"/blobs/sha256:", lambda seen: Reply(307, {"Location": cdn.url + seen.target})
        )

    def blob_gets(self) -> tuple[int, int]:
        """(blob GETs the front redirected, blob GETs the CDN answered)."""
        redirected = [s for s in self.front.requests("GET", r"/blobs/sha256:") if s.status == 307]
        return len(redirected), self.cdn.count("GET", "/blobs/sha256:")


@pytest.fixture
def source(registry_factory, proxy_factory):
    registry = registry_factory("src")
    redirecting = RedirectingSource(registry, proxy_factory(registry))
    yield redirecting
    redirecting.front.stop()


def _push(source: RedirectingSource) -> Pushed:
    with Pusher(source.registry.url) as p:
        return p.push_image("team/app", "v1", LAYERS)


def _blob_sizes(registry: Registry, pushed: Pushed) -> int:
    return sum(registry.blob_path(d).stat().st_size for d in pushed.blobs)


async def _copy(source_url: str, target_url: str):
    engine = CopyEngine(retry_base_delay=0.05)
    src = SiteEndpoint(name="src", url=source_url, insecure=True)
    dst = SiteEndpoint(name="dst", url=target_url, insecure=True)
    async with (
        RegistryClient(src, backoff_base=0.05) as s,
        RegistryClient(dst, backoff_base=0.05) as d,
    ):
        result = await engine.copy(s, "team/app", "v1", d, "team/app")
        return result, s.stats["bytes_downloaded"]


async def test_wrong_bytes_from_the_cdn_are_refused_and_nothing_is_written(
    source, registry_factory
):
    dst = registry_factory("dst")
    pushed = _push(source)
    layer = pushed.blobs[1]
    source.cdn.flip_byte(count=100, position=150_000, method="GET", path=f"/blobs/{layer}")
    result, _ = await _copy(source.front.url, dst.url)
    assert result.status == "failed"
    assert layer in (result.error or "") and "refusing" in (result.error or "")
    assert source.blob_gets()[1] >= 1, "the corrupted bytes came from the CDN"
    assert not dst.has_blob_data(layer)
    assert not dst.layer_link("team/app", layer).exists()
    with Pusher(dst.url) as p:
        assert p.get_manifest("team/app", "v1").status_code == 404
    for digest in dst.all_blob_digests():  # whatever else landed hashes to its name
        assert "sha256:" + hashlib.sha256(dst.blob_path(digest).read_bytes()).hexdigest() == digest


async def test_bytes_served_by_the_cdn_are_counted(source, registry_factory):
    dst = registry_factory("dst")
    pushed = _push(source)
    result, transport_bytes = await _copy(source.front.url, dst.url)
    assert result.status == "copied", result.error
    assert assert_image_complete(dst.url, "team/app", "v1") == pushed.digest
    redirected, served = source.blob_gets()
    assert redirected == served == len(pushed.blobs)  # every blob through the redirect
    size = _blob_sizes(source.registry, pushed)
    assert size > sum(map(len, LAYERS))  # the config blob too
    assert result.stats.bytes_downloaded == transport_bytes == size
    assert result.stats.bytes_uploaded == size


def test_copy_and_sync_json_report_bytes_downloaded(source, registry_factory, tmp_path):
    dst, other = registry_factory("dst"), registry_factory("other")
    pushed = _push(source)
    size = _blob_sizes(source.registry, pushed)
    out = cli("copy", "--insecure", "--json", f"{source.front.host}/team/app:v1", f"{dst.host}/m")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["bytes_downloaded"] == size
    text = cli("copy", "--insecure", f"{source.front.host}/team/app:v1", f"{dst.host}/m2")
    assert text.returncode == 0, text.stderr
    assert "uploaded" in text.stdout and "downloaded" in text.stdout  # mounted: 0 B both ways

    config = write_config(
        tmp_path,
        {"src": source.front, "other": other},
        [{"name": "all", "from": "src", "to": ["other"], "repositories": ["team/app"]}],
    )
    synced = cli("sync", "--config", str(config), "--json")
    assert synced.returncode == 0, synced.stderr
    counts = json.loads(synced.stdout)
    assert counts["copied"] == 1 and counts["bytes_downloaded"] == size
    again = cli("sync", "--config", str(config))
    assert again.returncode == 0, again.stderr
    assert "0 B downloaded" in again.stdout, again.stdout
