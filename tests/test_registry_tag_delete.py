"""Deleting one tag and nothing else (`RegistryClient.delete_tag`), on real registries.

distribution 2.8 has no tag DELETE: the placeholder path is tested against it. The
spec's DELETE by tag is tested through `tests/harness/tag_delete_front.py`, which
implements it in front of a real distribution the way distribution v3 does.
"""

from __future__ import annotations

import asyncio

import pytest

from replicator.registry.client import RegistryClient
from replicator.registry.errors import RegistryError
from replicator.registry.site import SiteEndpoint
from tests.harness.fault_proxy import FaultProxy
from tests.harness.images import Pusher, assert_image_complete, layer_bytes
from tests.harness.tag_delete_front import tag_delete_front


def client(url: str, name: str = "t") -> RegistryClient:
    return RegistryClient(SiteEndpoint(name=name, url=url, insecure=True), retries=1)


def push_siblings(url: str):
    with Pusher(url) as p:
        img = p.push_image("team/app", "latest", [layer_bytes("siblings", 300)])
        p.push_manifest("team/app", "v1", img.raw, img.media_type)
        other = p.push_image("team/app", "v2", [layer_bytes("other", 300)])
    return img, other


def tags(url: str) -> list[str]:
    with Pusher(url) as p:
        return sorted(p.tags("team/app"))


async def test_distribution_2_8_deletes_one_tag_through_a_placeholder(registry):
    img, other = push_siblings(registry.url)
    announced: list[tuple[str, str]] = []

    async def before(repo: str, digest: str) -> None:
        announced.append((repo, digest))

    async with client(registry.url) as c:
        done = await c.delete_tag("team/app", "v1", before_placeholder=before)
    assert done.method == "placeholder" and done and done.previous == img.digest
    assert "placeholder" in done.describe() and "team/app:v1" in done.describe()
    assert tags(registry.url) == ["latest", "v2"]
    # the sibling and the manifest itself are untouched, and complete
    assert assert_image_complete(registry.url, "team/app", "latest") == img.digest
    assert assert_image_complete(registry.url, "team/app", img.digest) == img.digest
    assert assert_image_complete(registry.url, "team/app", "v2") == other.digest
    # the placeholder was announced before it was pushed, and is gone again
    [(repo, placeholder)] = announced
    assert repo == "team/app" and placeholder not in (img.digest, other.digest)
    with Pusher(registry.url) as p:
        assert p.get_manifest("team/app", placeholder).status_code == 404


async def test_an_absent_tag_is_reported_and_nothing_is_pushed(registry):
    push_siblings(registry.url)
    announced: list[tuple[str, str]] = []

    async def before(repo: str, digest: str) -> None:
        announced.append((repo, digest))

    async with client(registry.url) as c:
        done = await c.delete_tag("team/app", "nope", before_placeholder=before)
    assert done.method is None and not done.deleted and "already absent" in done.describe()
    assert not done  # false when nothing was removed
    assert announced == [] and tags(registry.url) == ["latest", "v1", "v2"]


async def test_a_registry_with_deletes_disabled_keeps_the_tag_and_says_why(registry_factory):
    reg = registry_factory("nodelete", extra_config={"storage": {"delete": {"enabled": False}}})
    img, _ = push_siblings(reg.url)
    async with client(reg.url) as c:
        with pytest.raises(RegistryError, match=r"storage\.delete\.enabled.*left in place"):
            await c.delete_tag("team/app", "v1")
    # nothing was pushed over the tag: it still holds the image
    assert assert_image_complete(reg.url, "team/app", "v1") == img.digest
    assert tags(reg.url) == ["latest", "v1", "v2"]


async def test_a_registry_with_tag_delete_gets_one_delete_by_tag(registry):
    img, _ = push_siblings(registry.url)
    front = tag_delete_front(registry)
    try:
        async with client(front.url) as c:
            done = await c.delete_tag("team/app", "v1")
            again = await c.delete_tag("team/app", "v1")
        assert done.method == "tag-delete" and "DELETE by tag" in done.describe()
        assert again.method is None
        assert tags(registry.url) == ["latest", "v2"]
        assert assert_image_complete(registry.url, "team/app", "latest") == img.digest
        assert front.requests("PUT") == [], "no placeholder where the registry deletes tags"
        assert [s.path for s in front.requests("DELETE")] == ["/v2/team/app/manifests/v1"] * 2
    finally:
        front.stop()


async def test_a_digest_is_refused_as_a_tag(registry):
    async with client(registry.url) as c:
        with pytest.raises(ValueError, match="not the digest"):
            await c.delete_tag("team/app", "sha256:" + "0" * 64)


async def test_concurrent_tag_deletes_in_one_repository_leave_no_dangling_tag(registry):
    """distribution 2.8 fails a manifest DELETE with a 500 when another delete removes a
    tag while it looks up the tags to untag, after the revision is gone: the tag stays
    listed and answers 404. Deletes in one repository go one at a time."""
    with Pusher(registry.url) as p:
        keep = p.push_image("team/app", "keep", [layer_bytes("keep", 300)])
        doomed = [f"t{i}" for i in range(12)]
        for tag in doomed:
            p.push_manifest("team/app", tag, keep.raw, keep.media_type)
    async with client(registry.url) as c:
        done = await asyncio.gather(*(c.delete_tag("team/app", t) for t in doomed))
    assert all(d.deleted for d in done)
    assert tags(registry.url) == ["keep"]  # nothing listed that does not resolve


async def test_a_lost_placeholder_delete_answer_is_redone_and_the_tag_is_gone(registry):
    img, _ = push_siblings(registry.url)
    with FaultProxy("127.0.0.1", registry.port) as proxy:
        # the registry deletes the placeholder and answers 500 (as when its tag lookup
        # failed): the retry meets a 404 and cannot tell whether the tag was untagged
        proxy.respond_after(500, method="DELETE", path=r"/manifests/sha256:", skip=1)
        async with client(proxy.url) as c:
            done = await c.delete_tag("team/app", "v1")
        assert done.deleted and proxy.count("PUT", r"/manifests/v1$") == 2
    assert tags(registry.url) == ["latest", "v2"]
    assert assert_image_complete(registry.url, "team/app", "latest") == img.digest
