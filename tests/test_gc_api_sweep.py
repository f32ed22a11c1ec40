"""What the API-mode GC sweep deletes and reports, on a real registry (issue 11).

The real run reports the items the dry run planned, in the same order. Without the
site's storage directory the registry API cannot list untagged manifests: an untagged
index pushed before the daemon existed (or whose webhook was lost) is invisible, and
it may list a child of an index the policy deletes. So the API pass deletes a child
manifest only where every manifest of the repository is known; otherwise it deletes
the index alone and leaves its children, as it leaves blobs, to the storage pass.
"""

from __future__ import annotations

import asyncio
import os
import time

import httpx

from replicator.events import RegistryEvent
from replicator.gc.api import ApiGCOptions, collect_api
from replicator.gc.policy import KeepRules, RetentionPolicy
from replicator.journal import Journal
from replicator.registry.client import RegistryClient
from replicator.registry.site import SiteEndpoint
from tests.harness.images import ACCEPT, Pusher, assert_image_complete, layer_bytes

POLICY = RetentionPolicy(
    name="keep-v", keep=KeepRules(tags=("v*",)), untagged="keep", grace=3600, mode="api"
)


def age_tree(path, seconds: float) -> None:
    t = time.time() - seconds
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            os.utime(os.path.join(dirpath, name), (t, t))


def pushed(journal: Journal, repo: str, tag: str | None, digest: str, at: float) -> None:
    """The webhook the registry sent for a manifest push, as the intake journals it."""
    ev = RegistryEvent(
        id=f"{repo}-{tag}-{digest[-8:]}",
        site="a",
        action="push",
        repository=repo,
        tag=tag,
        digest=digest,
        media_type="application/vnd.oci.image.index.v1+json",
        occurred_at=at,
        is_manifest=True,
    )
    asyncio.run(journal.events.record([ev]))


def api_gc(reg, journal: Journal, *, storage: bool, dry_run: bool = False, url: str = ""):
    async def go():
        site = SiteEndpoint(name="a", url=url or reg.url, insecure=True)
        async with RegistryClient(site) as client:
            options = ApiGCOptions(
                site="a",
                policies=[POLICY],
                storage=reg.storage if storage else None,
                dry_run=dry_run,
            )
            return await collect_api(client, journal, options)

    return asyncio.run(go())


def status(reg, ref: str) -> int:
    return httpx.head(f"{reg.url}/v2/app/manifests/{ref}", headers={"accept": ACCEPT}).status_code


def scene(reg):
    """`dev`: an index of amd64 + arm64; an untagged index of amd64 + s390x (kept by
    `untagged: keep`) shares the amd64 child; `v1` is kept by name."""
    with Pusher(reg.url) as p:
        kids = {
            arch: p.push_image(
                "app", None, [layer_bytes(f"ix-{arch}", 400)], platform=("linux", arch)
            )
            for arch in ("amd64", "arm64", "s390x")
        }
        dev = p.push_index(
            "app", "dev", [(kids["amd64"], "linux", "amd64"), (kids["arm64"], "linux", "arm64")]
        )
        unseen = p.push_index(
            "app", None, [(kids["amd64"], "linux", "amd64"), (kids["s390x"], "linux", "s390x")]
        )
        p.push_image("app", "v1", [layer_bytes("ix-v1", 300)])
    age_tree(reg.storage, 7200)
    return kids, dev, unseen


def test_without_storage_an_index_goes_alone(registry, tmp_path) -> None:
    """The journal knows `dev` (its webhook, 2 h old), not the untagged index: the API
    pass deletes `dev` and none of its children, so the untagged index stays whole."""
    kids, dev, unseen = scene(registry)
    journal = Journal(tmp_path / "j.db")
    try:
        pushed(journal, "app", "dev", dev.digest, time.time() - 7200)
        dry = api_gc(registry, journal, storage=False, dry_run=True)
        real = api_gc(registry, journal, storage=False)
    finally:
        journal.close()
    assert real.errors == [] and real.items == dry.items
    assert real.deleted_manifests == {f"app@{dev.digest}"}
    assert any("2 child manifest(s) of deleted indexes left" in n for n in real.notes)
    assert status(registry, "dev") == 404
    assert assert_image_complete(registry.url, "app", unseen.digest) == unseen.digest
    for kid in kids.values():
        assert status(registry, kid.digest) == 200


def test_with_storage_children_of_a_kept_index_stay(registry, tmp_path) -> None:
    """With the storage directory every index is known: `dev` goes with its arm64 child,
    the child the untagged index shares stays."""
    kids, dev, unseen = scene(registry)
    journal = Journal(tmp_path / "j.db")
    try:
        real = api_gc(registry, journal, storage=True)
    finally:
        journal.close()
    assert real.errors == []
    assert real.deleted_manifests == {f"app@{dev.digest}", f"app@{kids['arm64'].digest}"}
    assert assert_image_complete(registry.url, "app", unseen.digest) == unseen.digest


def test_the_real_run_reports_blobs_in_the_planned_order(registry, fault_proxy, tmp_path):
    """Blob links are unlinked concurrently; the report lists them in the plan's order
    however the DELETEs finish (the first one answers last here)."""
    with Pusher(registry.url) as p:
        p.push_image("app", "v1", [layer_bytes("or-v1", 300)])
        dev = p.push_image("app", "dev", [layer_bytes("or-a", 300), layer_bytes("or-b", 300)])
    age_tree(registry.storage, 7200)
    journal = Journal(tmp_path / "j.db")
    try:
        dry = api_gc(registry, journal, storage=True, dry_run=True)
        blobs = [i["digest"] for i in dry.items if i["kind"] == "blob"]
        assert sorted(blobs) == sorted(dev.blobs) and len(blobs) == 3
        fault_proxy.delay(1.0, method="DELETE", path=f"/blobs/{blobs[0]}$")
        real = api_gc(registry, journal, storage=True, url=fault_proxy.url)
    finally:
        journal.close()
    assert real.errors == [] and real.items == dry.items
