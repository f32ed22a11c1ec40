"""Issue 12 item 10: a copy waiting on another copy's in-flight blob stays cancellable.

Two copies of one image to two repositories of one target registry share the blob's
upload: the second waits for the first, then mounts. Cancelling the waiter (SIGTERM's
drain, a lost lease) must end it at once, not when the other upload ends; cancelling
the uploader must not strand the waiter, which then uploads itself. The upload is held
by a fault proxy in front of the real target registry.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from replicator.copy import CopyEngine, CopyOptions, CopyResult
from replicator.registry.client import RegistryClient
from replicator.registry.site import SiteEndpoint
from tests.harness.fault_proxy import FaultProxy
from tests.harness.images import Pusher, assert_image_complete, layer_bytes

HOLD = 6.0  # the held upload's answer; "promptly" is well under it
PROMPT = 2.0
BLOB_PUT = r"^/v2/x/app/blobs/uploads/"
OPTIONS = CopyOptions(referrers=False)


def client(url: str, name: str) -> RegistryClient:
    return RegistryClient(SiteEndpoint(name=name, url=url, insecure=True))


async def poll(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def held(proxy: FaultProxy) -> bool:
    return any(r.fault == "delay" for r in proxy.records)


def waiting_for_upload(caplog: pytest.LogCaptureFixture, repo: str) -> bool:
    return any(
        "already in flight" in r.getMessage() and f"/{repo}" in r.getMessage()
        for r in caplog.records
    )


async def start_two(engine, s, d, proxy, caplog) -> tuple[asyncio.Task, asyncio.Task]:
    """The uploader (to x/app) held in its upload, and the waiter (y/app) waiting on it."""
    uploader = asyncio.create_task(engine.copy(s, "team/app", "v1", d, "x/app", options=OPTIONS))
    await poll(lambda: held(proxy), 20, "the upload held by the target")
    waiter = asyncio.create_task(engine.copy(s, "team/app", "v1", d, "y/app", options=OPTIONS))
    await poll(lambda: waiting_for_upload(caplog, "y/app"), 20, "the second copy waiting")
    return uploader, waiter


@pytest.fixture
def setup(two_registries, proxy_factory, caplog):
    src, dst = two_registries
    with Pusher(src.url) as p:
        p.push_image("team/app", "v1", [layer_bytes("cancel-shared", 200_000)])
    proxy = proxy_factory(dst)
    proxy.delay(HOLD, count=2, method="PUT", path=BLOB_PUT)  # the config and the layer
    caplog.set_level(logging.DEBUG, logger="replicator.copy")
    return src, dst, proxy


async def test_cancelling_a_copy_waiting_on_a_shared_blob_ends_it_promptly(setup, caplog):
    src, dst, proxy = setup
    engine = CopyEngine()
    async with client(src.url, "src") as s, client(proxy.url, "dst") as d:
        uploader, waiter = await start_two(engine, s, d, proxy, caplog)
        cancelled_at = time.monotonic()
        waiter.cancel()
        await poll(waiter.done, PROMPT, "the cancelled copy to end")
        assert waiter.cancelled(), f"the cancel was swallowed: {waiter.result()}"
        assert time.monotonic() - cancelled_at < PROMPT
        assert not uploader.done(), "the held upload ended early: nothing was tested"
        result: CopyResult = await uploader
    assert result.status == "copied", result.error
    assert_image_complete(dst.url, "x/app", "v1")


async def test_cancelling_the_uploader_leaves_the_waiter_to_finish(setup, caplog):
    src, dst, proxy = setup
    engine = CopyEngine()
    async with client(src.url, "src") as s, client(proxy.url, "dst") as d:
        uploader, waiter = await start_two(engine, s, d, proxy, caplog)
        uploader.cancel()
        await poll(uploader.done, PROMPT, "the cancelled uploader to end")
        assert uploader.cancelled()
        result: CopyResult = await asyncio.wait_for(waiter, 30)
    assert result.status == "copied", result.error
    assert_image_complete(dst.url, "y/app", "v1")
