"""Bounded reads: a registry cannot make the client read (or hold, or copy on) an answer
of any size. Manifests stop at 4 MiB, index children and referrers lists, listing pages
and pages per listing at documented bounds, each failing with an error that names the
registry and the reference. A hostile front before a real registry serves the answers."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from replicator.copy import CopyEngine
from replicator.manifest import OCI_INDEX, OCI_MANIFEST
from replicator.registry.bounds import MANIFEST_BYTES, ReadBounds
from replicator.registry.client import RegistryClient
from replicator.registry.errors import InvalidManifest, ResponseTooLarge
from replicator.registry.site import SiteEndpoint
from tests.harness.hostile_front import HostileFront, Reply, Seen
from tests.harness.images import Pusher, layer_bytes

MIB = 1024 * 1024


@pytest.fixture
def front(registry) -> Iterator[HostileFront]:
    with HostileFront(registry.port) as f:
        yield f


def client(url: str, **kw) -> RegistryClient:
    site = SiteEndpoint(name="us-east", url=url, insecure=True)
    return RegistryClient(site, retries=1, backoff_base=0.01, **kw)


def spaces(total: int) -> Iterator[bytes]:
    piece = b" " * (64 * 1024)
    for _ in range(total // len(piece)):
        yield piece


def descriptors(n: int, media_type: str = OCI_MANIFEST, **extra: str) -> list[dict]:
    return [
        {"mediaType": media_type, "digest": f"sha256:{i:064x}", "size": 100, **extra}
        for i in range(n)
    ]


@pytest.mark.parametrize("announced", [True, False], ids=["content-length", "chunked"])
async def test_oversized_manifest_is_refused_without_reading_it(front, announced):
    size = 200 * MIB
    front.answer(
        "GET",
        r"/manifests/huge$",
        Reply(
            200,
            {"Content-Type": OCI_MANIFEST},
            lambda: spaces(size),
            length=size if announced else None,
        ),
    )
    async with client(front.url) as c:
        start = time.monotonic()
        with pytest.raises(InvalidManifest) as err:
            await c.get_manifest("team/app", "huge")
        elapsed = time.monotonic() - start
    assert str(err.value).startswith("us-east: team/app:huge: manifest is larger than 4 MiB")
    assert not err.value.retryable
    [seen] = front.requests("GET", r"/manifests/huge")
    # stopped at the cap (plus what the socket buffers held), never read to the end
    assert seen.sent < 64 * MIB, seen.sent
    assert elapsed < 10


async def test_copy_of_an_oversized_manifest_fails_for_good_and_writes_nothing(
    front, registry_factory, proxy_factory
):
    front.answer(
        "GET",
        r"/manifests/huge$",
        Reply(200, {"Content-Type": OCI_MANIFEST}, lambda: spaces(64 * MIB), length=64 * MIB),
    )
    target = proxy_factory(registry_factory("dst"))
    async with client(front.url) as src, client(target.url) as dst:
        result = await CopyEngine().copy(src, "team/app", "huge", dst, "team/app")
    assert result.status == "failed" and not result.retryable
    assert result.error and "manifest is larger than 4 MiB" in result.error
    assert target.count("PUT") == target.count("POST") == target.count("PATCH") == 0


async def test_manifest_at_the_limit_is_read(front):
    raw = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}).encode()
    raw += b" " * (MANIFEST_BYTES - len(raw))
    front.answer("GET", r"/manifests/big$", Reply(200, {"Content-Type": OCI_MANIFEST}, raw))
    async with client(front.url) as c:
        assert len((await c.get_manifest("team/app", "big")).raw) == MANIFEST_BYTES


async def test_index_with_too_many_children_is_refused(front):
    body = json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors(4097)}
    ).encode()
    assert len(body) < MANIFEST_BYTES
    front.answer("GET", r"/manifests/wide$", Reply(200, {"Content-Type": OCI_INDEX}, body))
    async with client(front.url) as c:
        with pytest.raises(InvalidManifest) as err:
            await c.get_manifest("team/app", "wide")
    assert str(err.value) == (
        "us-east: team/app:wide: index lists 4097 manifests; the limit is 4096"
    )


async def test_too_many_referrers_are_refused(front):
    subject = "sha256:" + "ab" * 32
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": descriptors(1025, artifactType="application/x.sig"),
        }
    ).encode()
    front.answer("GET", r"/referrers/sha256:", Reply(200, {"Content-Type": OCI_INDEX}, body))
    async with client(front.url) as c:
        with pytest.raises(InvalidManifest) as err:
            await c.referrers("team/app", subject)
    assert str(err.value) == (
        f"us-east: team/app@{subject}: 1025 referrers listed; the limit is 1024"
    )


async def test_oversized_tags_page_is_refused(front):
    def page() -> Iterator[bytes]:
        yield b'{"name":"team/app","tags":['
        tag = b'"' + b"t" * 100 + b'",'
        for _ in range(10 * MIB // len(tag)):
            yield tag * 1
        yield b'"last"]}'

    front.answer("GET", r"/tags/list", Reply(200, {"Content-Type": "application/json"}, page))
    async with client(front.url) as c:
        with pytest.raises(ResponseTooLarge) as err:
            await c.list_tags("team/app")
    assert str(err.value).startswith("us-east: team/app: tags list page is larger than 8 MiB")


async def test_pages_per_listing_are_bounded(front):
    """A registry that always has one more page: the listing stops at the page bound."""

    def endless(seen: Seen) -> Reply:
        n = int(seen.target.rsplit("last=t", 1)[1]) + 1 if "last=t" in seen.target else 0
        return Reply(
            200,
            {
                "Content-Type": "application/json",
                "Link": f'</v2/team/app/tags/list?n=1&last=t{n}>; rel="next"',
            },
            json.dumps({"name": "team/app", "tags": [f"t{n}"]}).encode(),
        )

    front.answer("GET", r"/tags/list", endless)
    async with client(front.url, bounds=ReadBounds(list_pages=20)) as c:
        with pytest.raises(ResponseTooLarge) as err:
            await c.list_tags("team/app", page_size=1)
    assert str(err.value) == (
        "us-east: team/app: tags list goes on for more than 20 pages; stopped there"
    )
    assert len(front.requests("GET", r"/tags/list")) == 20


async def test_ordinary_listing_is_within_bounds(registry, front):
    with Pusher(registry.url) as p:
        img = p.push_image("team/app", "a", [layer_bytes("b", 100)])
        p.push_manifest("team/app", "b", img.raw, img.media_type)
    async with client(front.url, bounds=ReadBounds(list_pages=2)) as c:
        assert sorted(await c.list_tags("team/app")) == ["a", "b"]
        assert await c.catalog(page_size=1) == ["team/app"]
