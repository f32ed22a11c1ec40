"""Failures a real registry cannot produce on demand, injected by the fault proxy:
429 + Retry-After, 5xx, cut connections, and the client's retry / resume answers to them."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import pytest

from replicator.manifest import digest_of
from replicator.registry.client import RegistryClient
from replicator.registry.errors import (
    NotFound,
    RegistryUnavailable,
    RetryableError,
)
from replicator.registry.limits import TokenBucket, parse_retry_after
from replicator.registry.site import SiteEndpoint
from tests.harness.images import Pusher, layer_bytes
from tests.harness.util import free_port
from tests.test_registry_client import client_for, pieces, source_of

MIB = 1024 * 1024


@pytest.fixture
def pushed(registry):
    with Pusher(registry.url) as p:
        return p.push_image("team/app", "v1", [layer_bytes("fault", 300_000)])


async def test_429_retry_after_seconds_is_honoured(fault_proxy, pushed):
    fault_proxy.too_many_requests(1, path=r"/manifests/v1$")
    async with client_for(fault_proxy.url) as c:
        start = time.monotonic()
        desc = await c.head_manifest("team/app", "v1")
        elapsed = time.monotonic() - start
        assert desc is not None and desc.digest == pushed.digest
        assert c.stats["retries"] == 1
    assert elapsed >= 1.0
    assert fault_proxy.count("HEAD", r"/manifests/v1$") == 2


async def test_429_retry_after_is_capped(fault_proxy, pushed):
    fault_proxy.too_many_requests(3600, path=r"/manifests/")
    async with client_for(fault_proxy.url, max_retry_after=0.2) as c:
        start = time.monotonic()
        assert await c.head_manifest("team/app", "v1") is not None
    assert 0.2 <= time.monotonic() - start < 5


async def test_429_exhausted_is_retryable_error_with_registry_message(fault_proxy, pushed):
    fault_proxy.too_many_requests(0, count=10, path=r"/manifests/")
    async with client_for(fault_proxy.url, retries=2) as c:
        with pytest.raises(RetryableError) as err:
            await c.get_manifest("team/app", "v1")
    assert str(err.value) == "us-east: team/app:v1: slow down (HTTP 429)"
    assert err.value.retryable and fault_proxy.count("GET") == 3


def test_parse_retry_after_forms():
    now = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("7", now) == 7.0
    assert parse_retry_after("Wed, 01 May 2024 12:00:30 GMT", now) == 30.0
    assert parse_retry_after("Wed, 01 May 2024 11:00:00 GMT", now) == 0.0  # past: go now
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None) is None


async def test_5xx_is_retried_then_succeeds(fault_proxy, pushed):
    fault_proxy.respond(503, count=2, path=r"/manifests/")
    async with client_for(fault_proxy.url) as c:
        m = await c.get_manifest("team/app", "v1")
        assert m.digest == pushed.digest
        assert c.stats["retries"] == 2
    assert fault_proxy.count("GET", r"/manifests/") == 3


async def test_5xx_exhausted_names_site_and_is_retryable(fault_proxy, pushed):
    fault_proxy.respond(500, count=10, path=r"/blobs/")
    async with client_for(fault_proxy.url, retries=2) as c:
        with pytest.raises(RetryableError) as err:
            await c.head_blob("team/app", pushed.blobs[1])
    assert str(err.value) == (
        f"us-east: team/app@{pushed.blobs[1]}: internal server error (HTTP 500)"
    )
    assert err.value.status == 500 and err.value.retryable
    assert fault_proxy.count("HEAD") == 3


async def test_404_and_other_4xx_are_not_retried(fault_proxy, pushed):
    async with client_for(fault_proxy.url) as c:
        with pytest.raises(NotFound):
            await c.get_manifest("team/app", "nope")
        fault_proxy.respond(
            400, path=r"/manifests/v1$", body=b'{"errors":[{"code":"X","message":"bad thing"}]}'
        )
        with pytest.raises(Exception) as err:
            await c.get_manifest("team/app", "v1")
        assert c.stats["retries"] == 0
    assert "bad thing (HTTP 400)" in str(err.value)
    assert fault_proxy.count("GET", r"/manifests/") == 2


async def test_unreachable_registry_names_the_site():
    url = f"http://127.0.0.1:{free_port()}"
    site = SiteEndpoint(name="eu-west", url=url, insecure=True)
    async with RegistryClient(site, retries=2, backoff_base=0.01) as c:
        with pytest.raises(RegistryUnavailable) as err:
            await c.ping()
        assert c.stats["requests"] == 3 and c.stats["retries"] == 2
    text = str(err.value)
    assert text.startswith(f"eu-west: cannot connect to {url}: ConnectError")
    assert err.value.retryable


async def test_blob_download_cut_can_resume_with_range(fault_proxy, pushed):
    data = layer_bytes("fault", 300_000)
    digest = pushed.blobs[1]
    fault_proxy.cut_response(100_000, method="GET", path=r"/blobs/sha256:")
    got = b""
    async with client_for(fault_proxy.url) as c:
        with pytest.raises(RetryableError) as err:
            async with c.open_blob("team/app", digest) as s:
                async for chunk in s:
                    got += chunk
        assert f"blob download interrupted at byte {len(got)} of 300000" in str(err.value)
        async with c.open_blob("team/app", digest, offset=len(got)) as s:
            assert s.offset == len(got) and s.size == 300_000
            got += await s.read()
    assert got == data and 0 < fault_proxy.records[0].response_bytes <= 100_000


async def test_monolithic_upload_cut_is_retryable_for_the_caller(fault_proxy):
    data = layer_bytes("mono", 2 * MIB)
    digest = digest_of(data)
    fault_proxy.cut_request(300_000, method="PUT", path=r"/blobs/uploads/")
    async with client_for(fault_proxy.url) as c:
        with pytest.raises(RetryableError) as err:
            await c.upload_blob("team/app", digest, len(data), pieces(data))
        assert err.value.retryable and "team/app@sha256:" in str(err.value)
        assert fault_proxy.count("PUT") == 1  # a streamed body is never replayed
        assert fault_proxy.count("DELETE", r"/blobs/uploads/") == 1  # session cleaned up
        await c.upload_blob("team/app", digest, len(data), pieces(data))  # caller's retry
        assert await c.head_blob("team/app", digest) == len(data)


async def test_chunked_upload_resumes_from_server_offset(registry, fault_proxy):
    """The 2nd PATCH is cut before reaching the registry: the client asks the registry for
    its offset (1 MiB) and reopens the source there instead of starting over."""
    data = layer_bytes("resume", 3 * MIB)
    digest = digest_of(data)
    fault_proxy.cut_request(300_000, method="PATCH", skip=1)
    opened: list[int] = []
    async with client_for(fault_proxy.url) as c:
        await c.upload_blob_chunked(
            "team/app", digest, len(data), source_of(data, opened), chunk_size=MIB
        )
        assert (c.stats["upload_resumes"], c.stats["upload_restarts"]) == (1, 0)
        assert await c.head_blob("team/app", digest) == len(data)
    assert opened == [0, MIB]
    patches = [r for r in fault_proxy.records if r.method == "PATCH"]
    delivered = sum(r.request_bytes for r in patches if r.fault is None)
    assert delivered == len(data)  # every byte reached the registry once
    assert [r.request_bytes for r in patches] == [MIB, 300_000, MIB, MIB]
    assert fault_proxy.count("GET", r"/blobs/uploads/") == 1  # the status query
    with Pusher(registry.url) as p:
        assert p.http.get(f"{registry.url}/v2/team/app/blobs/{digest}").content == data


async def test_chunked_upload_restarts_when_registry_dropped_partial_session(registry, fault_proxy):
    """When part of a chunk reached distribution, its upload state no longer matches and it
    drops the session on the status query; the client starts a new session from byte 0."""
    data = layer_bytes("restart", 2 * MIB + 10)
    digest = digest_of(data)
    fault_proxy.cut_request(300_000, method="PATCH", skip=1, forward=True)
    opened: list[int] = []
    async with client_for(fault_proxy.url) as c:
        await c.upload_blob_chunked(
            "team/app", digest, len(data), source_of(data, opened), chunk_size=MIB
        )
        assert (c.stats["upload_resumes"], c.stats["upload_restarts"]) == (0, 1)
    assert opened == [0, 0]
    with Pusher(registry.url) as p:
        assert p.http.get(f"{registry.url}/v2/team/app/blobs/{digest}").content == data


async def test_chunked_upload_survives_5xx_on_a_patch(registry, fault_proxy):
    data = layer_bytes("patch5xx", 2 * MIB)
    digest = digest_of(data)
    fault_proxy.respond(503, method="PATCH", skip=1)
    opened: list[int] = []
    async with client_for(fault_proxy.url) as c:
        await c.upload_blob_chunked(
            "team/app", digest, len(data), source_of(data, opened), chunk_size=MIB
        )
        assert await c.head_blob("team/app", digest) == len(data)
    assert opened == [0, MIB]


async def test_concurrency_limit_bounds_requests_in_flight(fault_proxy, pushed):
    fault_proxy.delay(0.2, count=6, method="HEAD")
    async with client_for(fault_proxy.url, concurrency=2) as c:
        start = time.monotonic()
        sizes = await asyncio.gather(*[c.head_blob("team/app", pushed.blobs[1]) for _ in range(6)])
        elapsed = time.monotonic() - start
    assert sizes == [300_000] * 6
    assert fault_proxy.max_inflight == 2
    assert elapsed >= 0.6


async def test_requests_per_second_limit(registry):
    async with client_for(registry.url, requests_per_second=20) as c:
        start = time.monotonic()
        for _ in range(11):
            await c.ping()
        assert time.monotonic() - start >= 0.45


async def test_token_bucket_spacing():
    bucket = TokenBucket(50)
    start = time.monotonic()
    await asyncio.gather(*[bucket.acquire() for _ in range(6)])
    assert time.monotonic() - start >= 0.09  # 5 waits of 20 ms after the first
