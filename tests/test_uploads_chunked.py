"""Big blobs through body limits: chunked uploads after a 413 or by configuration,
resumed or restarted after a cut, never committed when the content does not match.

The target sits behind `AcrFront` (tests/harness/acr_front.py), a proxy that
answers 413 to bodies above a limit the way nginx, ACR and CDNs do.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

import pytest

from replicator.copy import CopyEngine
from replicator.manifest import digest_of
from replicator.registry.client import RegistryClient
from replicator.registry.errors import DigestMismatch
from replicator.registry.site import SiteEndpoint
from replicator.registry.uploads import DEFAULT_CHUNK, MIN_CHUNK, chunk_after_413
from tests.harness.acr_front import AcrFront
from tests.harness.images import Pusher, assert_image_complete, layer_bytes
from tests.harness.registry import Registry
from tests.test_registry_client import source_of

MIB = 1024 * 1024


@pytest.fixture
def acr_factory() -> Iterator[Callable[[Registry, int], AcrFront]]:
    started: list[AcrFront] = []

    def make(reg: Registry, max_body: int) -> AcrFront:
        front = AcrFront("127.0.0.1", reg.port, max_body).start()
        started.append(front)
        return front

    yield make
    for front in started:
        front.stop()


class ProgressLog:
    """A copy-engine progress sink that records what it is told."""

    def __init__(self) -> None:
        self.started: dict[str, int] = {}
        self.advanced: dict[str, int] = {}
        self.finished: list[str] = []

    def start(self, digest: str, size: int) -> None:
        self.started[digest] = size

    def advance(self, digest: str, n: int) -> None:
        self.advanced[digest] = self.advanced.get(digest, 0) + n

    def finish(self, digest: str) -> None:
        self.finished.append(digest)


def site(url: str, name: str, **kw) -> SiteEndpoint:
    return SiteEndpoint(name=name, url=url, insecure=True, **kw)


def forwarded_bodies(front: AcrFront, method: str) -> list[int]:
    return [r.request_bytes for r in front.records if r.method == method and r.fault is None]


def test_chunk_size_after_413_is_half_the_refused_body_within_bounds():
    assert chunk_after_413(3 * MIB) == 3 * MIB // 2
    assert chunk_after_413(2 * 1024 * MIB) == DEFAULT_CHUNK
    assert chunk_after_413(100_000) == MIN_CHUNK


async def test_413_on_a_monolithic_put_switches_the_site_to_chunks(registry_factory, acr_factory):
    """The first big blob draws a 413 (PUT, then a PATCH still too large): the copy goes
    through in chunks under the limit, and the next blob to that site goes straight to
    PATCHes: the site is remembered."""
    src, dst = registry_factory("src"), registry_factory("dst")
    big, bigger = layer_bytes("acr-1", 3 * MIB), layer_bytes("acr-2", 2 * MIB + 12345)
    with Pusher(src.url) as p:
        p.push_image("team/app", "v1", [big])
        p.push_image("team/app", "v2", [bigger])
    front = acr_factory(dst, MIB)
    engine = CopyEngine(retry_base_delay=0.05)
    async with (
        RegistryClient(site(src.url, "src"), backoff_base=0.01) as s,
        RegistryClient(site(front.url, "acr"), backoff_base=0.01) as d,
    ):
        assert d.upload_chunk_size is None
        first = await engine.copy(s, "team/app", "v1", d, "team/app")
        assert first.status == "copied", first.error
        assert front.refused == [3 * MIB, 3 * MIB // 2]  # the PUT, then a 1.5 MiB PATCH
        assert d.upload_chunk_size == 3 * MIB // 4
        front.reset_counts()
        second = await engine.copy(s, "team/app", "v2", d, "team/app")
        assert second.status == "copied", second.error
    assert front.refused == [3 * MIB, 3 * MIB // 2]  # nothing more refused
    patches = forwarded_bodies(front, "PATCH")
    assert sum(patches) == len(bigger) and max(patches) <= MIB
    assert max(r.request_bytes for r in front.records if r.method == "PUT") < MIB  # config
    assert_image_complete(dst.url, "team/app", "v1")
    assert_image_complete(dst.url, "team/app", "v2")


async def test_configured_chunk_size_never_sends_a_whole_blob(registry_factory, acr_factory):
    src, dst = registry_factory("src"), registry_factory("dst")
    layer = layer_bytes("configured", 2 * MIB + 1)
    with Pusher(src.url) as p:
        p.push_image("team/app", "v1", [layer])
    front = acr_factory(dst, MIB)
    async with (
        RegistryClient(site(src.url, "src")) as s,
        RegistryClient(site(front.url, "acr", chunk_size=MIB)) as d,
    ):
        result = await CopyEngine().copy(s, "team/app", "v1", d, "team/app")
    assert result.status == "copied", result.error
    assert front.refused == []
    assert sorted(forwarded_bodies(front, "PATCH"), reverse=True)[:3] == [MIB, MIB, 1]
    assert_image_complete(dst.url, "team/app", "v1")


async def test_patch_cut_before_the_registry_resumes_from_its_offset(registry_factory, acr_factory):
    """The second PATCH is cut mid-body in front of the registry: the copy asks for the
    session's offset, re-reads the source from there (a Range GET) and finishes; every
    byte reaches the registry once."""
    src, dst = registry_factory("src"), registry_factory("dst")
    layer = layer_bytes("cut-resume", 3 * MIB)
    with Pusher(src.url) as p:
        p.push_image("team/app", "v1", [layer])
    front = acr_factory(dst, MIB)
    front.cut_request(400_000, method="PATCH", skip=1)
    async with (
        RegistryClient(site(src.url, "src")) as s,
        RegistryClient(site(front.url, "acr", chunk_size=MIB), backoff_base=0.01) as d,
    ):
        result = await CopyEngine().copy(s, "team/app", "v1", d, "team/app")
        assert (d.stats["upload_resumes"], d.stats["upload_restarts"]) == (1, 0)
    assert result.status == "copied", result.error
    patches = [r for r in front.records if r.method == "PATCH" and "/blobs/uploads/" in r.path]
    assert sum(r.request_bytes for r in patches if r.fault is None) == len(layer)
    assert [r.request_bytes for r in patches if r.fault] == [400_000]
    assert_image_complete(dst.url, "team/app", "v1")


async def test_patch_cut_after_part_reached_distribution_restarts_that_blob(
    registry_factory, acr_factory
):
    """A chunk partly written: distribution drops the session, so that blob starts over
    from byte 0 (and only that blob)."""
    src, dst = registry_factory("src"), registry_factory("dst")
    layer = layer_bytes("cut-restart", 2 * MIB + 10)
    with Pusher(src.url) as p:
        p.push_image("team/app", "v1", [layer])
    front = acr_factory(dst, MIB)
    front.cut_request(300_000, method="PATCH", skip=1, forward=True)
    progress = ProgressLog()
    async with (
        RegistryClient(site(src.url, "src")) as s,
        RegistryClient(site(front.url, "acr", chunk_size=MIB), backoff_base=0.01) as d,
    ):
        result = await CopyEngine(progress=progress).copy(s, "team/app", "v1", d, "team/app")
        assert (d.stats["upload_resumes"], d.stats["upload_restarts"]) == (0, 1)
    assert result.status == "copied", result.error
    layer_digest = digest_of(layer)
    assert progress.started[layer_digest] == len(layer)
    assert progress.advanced[layer_digest] == len(layer)  # the restart is not counted twice
    assert layer_digest in progress.finished
    assert_image_complete(dst.url, "team/app", "v1")


async def test_chunked_content_that_does_not_match_is_never_committed(registry, acr_factory):
    """Every chunk is accepted, but the bytes hash to something else: the session is
    cancelled before the closing PUT, so the registry never stores the blob."""
    data = layer_bytes("genuine", 2 * MIB)
    digest = digest_of(data)
    corrupt = data[:MIB] + bytes([data[MIB] ^ 1]) + data[MIB + 1 :]
    front = acr_factory(registry, MIB)
    async with RegistryClient(site(front.url, "acr"), backoff_base=0.01) as c:
        with pytest.raises(DigestMismatch) as err:
            await c.upload_blob_chunked("team/app", digest, len(data), source_of(corrupt), MIB)
        assert "team/app@" + digest in str(err.value)
        assert await c.head_blob("team/app", digest) is None
    assert front.count("PUT") == 0
    assert front.count("DELETE", r"/blobs/uploads/") == 1
    assert not registry.has_blob_data(digest)


async def test_resumed_upload_still_checks_the_whole_digest(registry, acr_factory):
    """After a resume the hash continues from the acknowledged offset: a corrupted byte
    after the resume point is still caught before the commit."""
    data = layer_bytes("resume-verify", 3 * MIB)
    digest = digest_of(data)
    corrupt = data[: 2 * MIB + 5] + bytes([data[2 * MIB + 5] ^ 1]) + data[2 * MIB + 6 :]
    front = acr_factory(registry, MIB)
    front.cut_request(100_000, method="PATCH", skip=1)
    opened: list[int] = []
    async with RegistryClient(site(front.url, "acr"), backoff_base=0.01) as c:
        with pytest.raises(DigestMismatch):
            await c.upload_blob_chunked(
                "team/app", digest, len(data), source_of(corrupt, opened), MIB
            )
        assert c.stats["upload_resumes"] == 1
    assert opened == [0, MIB]
    assert front.count("PUT") == 0
    assert not registry.has_blob_data(digest)
    assert hashlib.sha256(data).hexdigest() in digest


def test_acr_front_refuses_streamed_bodies_over_the_limit_and_passes_the_rest(
    registry, acr_factory
):
    """The stand-in itself: a chunked (streamed) body is judged by its size too, and one
    under the limit reaches the registry intact."""
    import httpx

    front = acr_factory(registry, 100_000)
    small, big = layer_bytes("te-small", 60_000), layer_bytes("te-big", 150_000)

    def stream(data: bytes):
        for i in range(0, len(data), 16_384):
            yield data[i : i + 16_384]

    with httpx.Client(base_url=front.url, timeout=30) as http:
        for data, expected in ((big, 413), (small, 201)):
            loc = http.post("/v2/team/te/blobs/uploads/").headers["location"]
            resp = http.put(f"{loc}&digest={digest_of(data)}", content=stream(data))
            assert resp.status_code == expected, resp.text
    assert front.refused == [7 * 16_384]  # refused once past the limit, mid-stream
    assert registry.has_blob_data(digest_of(small))
    assert not registry.has_blob_data(digest_of(big))
