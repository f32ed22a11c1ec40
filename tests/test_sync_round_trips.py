"""The requests `sync` makes per image, counted at real registries through proxies.

Across a WAN every request is a round trip (benchmarks/bench_sync.py --rtt-ms 50), so
the request pattern is pinned here: a change that adds a request per image or per
blob fails a test instead of slowing replication silently.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import yaml

from replicator.copy import CopyEngine
from replicator.manifest import OCI_MANIFEST
from replicator.registry.client import RegistryClient
from replicator.registry.site import SiteEndpoint
from tests.harness.fault_proxy import FaultProxy
from tests.harness.images import Pusher, assert_image_complete, layer_bytes

FALLBACK_TAG_GET = r"/manifests/sha256-[0-9a-f]{64}$"


def _sync(tmp_path: Path, src: FaultProxy, dst: FaultProxy) -> dict:
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "journal": str(tmp_path / "journal.db"),
                "sites": {
                    "src": {"url": src.url, "insecure": True},
                    "dst": {"url": dst.url, "insecure": True},
                },
                "rules": [{"name": "all", "from": "src", "to": ["dst"], "repositories": ["**"]}],
            }
        )
    )
    out = subprocess.run(
        [sys.executable, "-m", "replicator", "sync", "-c", str(config), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_sync_asks_each_side_only_what_it_needs_per_image(
    registry_factory, proxy_factory, tmp_path
):
    src, dst = registry_factory("src"), registry_factory("dst")
    repos, tags = ("team/api", "team/web"), ("v1", "v2")
    blobs: set[tuple[str, str]] = set()
    with Pusher(src.url) as p:
        for repo in repos:
            for tag in tags:
                pushed = p.push_image(repo, tag, [layer_bytes(f"{repo}:{tag}", 4000)])
                blobs.update((repo, b) for b in pushed.blobs)
    src_proxy, dst_proxy = proxy_factory(src), proxy_factory(dst)

    result = _sync(tmp_path, src_proxy, dst_proxy)

    images = len(repos) * len(tags)
    assert result["copied"] == images and result["failed"] == 0
    for repo in repos:
        for tag in tags:
            assert_image_complete(dst.url, repo, tag)
    # source: the catalog, one tag list per repository, one HEAD (plan) and one GET
    # (copy) per image, each blob once; no fallback-tag GET for tags the listing lacks;
    # and per copied tag one HEAD right before its write (the source is the truth: a tag
    # deleted or moved since the plan is not written, issue 12 item 8)
    assert src_proxy.count("GET", r"/v2/_catalog") == 1
    assert src_proxy.count("GET", r"/tags/list") == len(repos)
    assert src_proxy.count("HEAD", r"/manifests/v\d$") == 2 * images
    assert src_proxy.count("HEAD", r"/manifests/") == 2 * images
    assert src_proxy.count("GET", FALLBACK_TAG_GET) == 0
    assert src_proxy.count("GET", r"/manifests/sha256:") == images
    assert src_proxy.count("GET", r"/blobs/sha256:") == len(blobs)
    # the referrers API is probed once: distribution 2.8 answers that it has none, and
    # the copies that started meanwhile waited for that answer instead of asking too
    assert src_proxy.count("GET", r"/referrers/") == 1
    # target: one HEAD per tag (plan), one HEAD per blob (mount safety), one session and
    # one PUT per blob, one manifest PUT per image; nothing else
    assert dst_proxy.count("HEAD", r"/manifests/") == images
    assert dst_proxy.count("HEAD", r"/blobs/") == len(blobs)
    assert dst_proxy.count("POST", r"/blobs/uploads/") == len(blobs)
    assert dst_proxy.count("PUT", r"/blobs/uploads/") == result["blobs_uploaded"]
    assert dst_proxy.count("PUT", r"/manifests/") == images
    assert len(dst_proxy.records) == images * 2 + len(blobs) * 2 + result["blobs_uploaded"]


def test_sync_still_copies_referrers_found_under_a_listed_fallback_tag(
    registry_factory, proxy_factory, tmp_path
):
    src, dst = registry_factory("src"), registry_factory("dst")
    with Pusher(src.url) as p:
        image = p.push_image("team/api", "v1", [layer_bytes("signed", 3000)])
        signature = p.push_referrer("team/api", image, b'{"critical": {}}')
        p.push_image("team/api", "v2", [layer_bytes("unsigned", 3000)])
    src_proxy, dst_proxy = proxy_factory(src), proxy_factory(dst)

    assert _sync(tmp_path, src_proxy, dst_proxy)["failed"] == 0

    with Pusher(dst.url) as p:
        answer = p.http.head(
            f"{dst.url}/v2/team/api/manifests/{signature.digest}",
            headers={"Accept": OCI_MANIFEST},
        )
        assert answer.status_code == 200
    # the signature is copied once, though the image's referrers and the listed fallback
    # tag (an index of it) both need it: two PUTs of one manifest race its revision link
    assert dst_proxy.count("PUT", rf"/manifests/{signature.digest}$") == 1
    fallback = "sha256-" + image.digest.split(":", 1)[1]
    # the signed image's fallback tag is read (it is listed); the unsigned one's is not
    assert src_proxy.count("GET", rf"/manifests/{fallback}$") >= 1
    assert src_proxy.count("GET", FALLBACK_TAG_GET) == src_proxy.count(
        "GET", rf"/manifests/{fallback}$"
    )


def test_a_failed_source_get_leaves_no_upload_session_open(registry_factory, proxy_factory):
    """The target's upload session is opened while the source answers; when the source
    fails, the session is cancelled, not left behind."""
    src, dst = registry_factory("src"), registry_factory("dst")
    with Pusher(src.url) as p:
        pushed = p.push_image("team/api", "v1", [layer_bytes("layer", 3000)])
    src_proxy, dst_proxy = proxy_factory(src), proxy_factory(dst)
    src_proxy.respond(404, count=10, method="GET", path=rf"/blobs/{pushed.blobs[-1]}")

    async def copy() -> str:
        async with (
            RegistryClient(SiteEndpoint("src", src_proxy.url, insecure=True)) as s,
            RegistryClient(SiteEndpoint("dst", dst_proxy.url, insecure=True)) as d,
        ):
            result = await CopyEngine().copy(s, "team/api", "v1", d, "team/api")
            return result.status

    assert asyncio.run(copy()) == "failed"
    opened = dst_proxy.count("POST", r"/blobs/uploads/")
    # each session the copy opened was either completed (PUT) or cancelled (DELETE)
    closed = {
        r.path.split("/blobs/uploads/", 1)[1].split("?", 1)[0]
        for r in dst_proxy.records
        if r.method in ("PUT", "DELETE") and "/blobs/uploads/" in r.path
    }
    assert opened == len(closed) >= 1
    assert dst_proxy.count("DELETE", r"/blobs/uploads/") >= 1
