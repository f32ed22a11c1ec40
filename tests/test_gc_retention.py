"""Retention on real registries (issue 11, items 6-9): ranked by the registry's own push
times, unknown age kept, blobs only where provably unused, tags deleted alone, and the
API and storage passes deciding the same way."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import httpx

from replicator.events import RegistryEvent
from replicator.gc.api import NO_BLOBS_WITHOUT_STORAGE, ApiGCOptions, collect_api
from replicator.gc.policy import KeepRules, RetentionPolicy
from replicator.gc.storage import GCResult, StorageGCOptions, collect_storage
from replicator.journal import Journal
from replicator.registry.client import RegistryClient
from replicator.registry.site import SiteEndpoint
from tests.harness.images import ACCEPT, Pusher, assert_image_complete, layer_bytes

HOUR = 3600.0


def age_tree(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            os.utime(os.path.join(dirpath, name), (t, t))


def pushed(journal: Journal, site: str, repo: str, tag: str | None, digest: str, at: float):
    """The webhook the registry sent for a manifest push, as the intake journals it."""
    ev = RegistryEvent(
        id=f"{repo}-{tag}-{digest[-8:]}-{at}",
        site=site,
        action="push",
        repository=repo,
        tag=tag,
        digest=digest,
        media_type="application/vnd.oci.image.manifest.v1+json",
        occurred_at=at,
        is_manifest=True,
    )
    asyncio.run(journal.events.record([ev]))


def api_gc(reg, policy, journal=None, *, storage: bool = True, **kw) -> GCResult:
    async def go():
        async with RegistryClient(SiteEndpoint(name="a", url=reg.url, insecure=True)) as c:
            return await collect_api(
                c,
                journal,
                ApiGCOptions(
                    site="a",
                    policies=[policy],
                    storage=reg.storage if storage else None,
                    **kw,
                ),
            )

    return asyncio.run(go())


def storage_gc(reg, policy, journal=None, **kw) -> GCResult:
    opts = StorageGCOptions(
        site="a",
        grace=policy.grace,
        quarantine_window=0,
        registry_config=reg.config_path,
        workers=2,
        policies=[policy],
        **kw,
    )
    return asyncio.run(collect_storage(reg.storage, journal, opts))


def tags_of(res: GCResult) -> set[str]:
    """Tags a run deletes, with the manifests it deletes by digest."""
    return set(res.deleted_tags)


def item_keys(res: GCResult) -> list[tuple]:
    return sorted(
        (i["kind"], i.get("repository") or "", i.get("tag") or i.get("digest") or "")
        for i in res.items
    )


def status(reg, repo: str, ref: str) -> int:
    return httpx.head(
        f"{reg.url}/v2/{repo}/manifests/{ref}", headers={"accept": ACCEPT}
    ).status_code


def test_most_recent_ranks_by_webhook_time_not_config_created(registry, tmp_path) -> None:
    """Item 6: keep {tags: [latest], most_recent: 2}. Webhook times say r3 and r4 are the
    two newest; the configs' `created` and the push order say otherwise. Exactly
    latest + r3 + r4 survive, and the API pass (dry and real) and the storage pass
    decide the same."""
    reg = registry
    j = Journal(tmp_path / "j.db")
    now = time.time()
    order = {"r1": 5, "r2": 4, "latest": 6, "r4": 2, "r3": 3}  # hours ago, per webhook
    created = {"r1": "2099-01-01T00:00:00Z", "r2": "2098-01-01T00:00:00Z"}
    with Pusher(reg.url) as p:
        for tag in ("r4", "r3", "latest", "r2", "r1"):
            img = p.push_image(
                "app",
                tag,
                [layer_bytes(tag, 200)],
                created=created.get(tag, "1970-01-01T00:00:00Z"),
            )
            pushed(j, "a", "app", tag, img.digest, now - order[tag] * HOUR)
    policy = RetentionPolicy(
        name="p",
        keep=KeepRules(tags=("latest",), most_recent=2),
        untagged="delete",
        grace=HOUR,
        mode="both",
    )
    # the link files say all were pushed 10 h ago (ranking them by name would keep
    # latest and r1): the journal's later times rank
    age_tree(reg.storage, 10 * HOUR)
    store_dry = storage_gc(reg, policy, j, dry_run=True)
    api_dry = api_gc(reg, policy, j, dry_run=True)
    assert tags_of(api_dry) == tags_of(store_dry) == {"app:r1", "app:r2"}
    assert {i["clause"] for i in api_dry.items if i["kind"] == "manifest"} == {
        "all its tags expired: r1",
        "all its tags expired: r2",
    }
    real = api_gc(reg, policy, j)
    assert real.errors == []
    assert item_keys(real) == item_keys(api_dry)
    for tag in ("latest", "r3", "r4"):
        assert_image_complete(reg.url, "app", tag)
    assert status(reg, "app", "r1") == status(reg, "app", "r2") == 404
    j.close()


def test_storage_link_times_rank_when_the_journal_has_no_history(registry, tmp_path) -> None:
    """Item 6, second source: no webhooks, so the tag link files' times rank; both passes
    agree and keep exactly N."""
    reg = registry
    with Pusher(reg.url) as p:
        for tag in ("t1", "t2", "t3", "t4"):
            p.push_image("app", tag, [layer_bytes(tag, 100)], created="2099-01-01T00:00:00Z")
    base = reg.storage / "docker/registry/v2/repositories/app/_manifests/tags"
    age_tree(reg.storage, 10 * HOUR)
    for hours, tag in ((4, "t1"), (3, "t4"), (2, "t2"), (5, "t3")):
        t = time.time() - hours * HOUR
        os.utime(base / tag / "current/link", (t, t))
    policy = RetentionPolicy(
        name="p", keep=KeepRules(most_recent=2), untagged="delete", grace=HOUR, mode="both"
    )
    api_dry = api_gc(reg, policy, dry_run=True)
    store_dry = storage_gc(reg, policy, dry_run=True)
    assert tags_of(api_dry) == tags_of(store_dry) == {"app:t1", "app:t3"}
    assert api_dry.kept == store_dry.kept == {"kept by most_recent": 2}


def test_unknown_age_is_too_young_to_delete(registry, tmp_path) -> None:
    """Item 7: grace 1h, a fresh journal, no storage directory, configs claiming 2024:
    nothing is deleted, and the run says why ("age unknown")."""
    reg = registry
    with Pusher(reg.url) as p:
        p.push_image("app", "dev", [layer_bytes("dev", 100)], created="2024-01-01T00:00:00Z")
        p.push_image("app", "old", [layer_bytes("old", 100)], created="2000-01-01T00:00:00Z")
    policy = RetentionPolicy(name="p", untagged="delete", grace=HOUR, mode="api")
    j = Journal(tmp_path / "j.db")
    for dry in (True, False):
        res = api_gc(reg, policy, j, storage=False, dry_run=dry)
        assert res.items == [] and res.deleted_manifests == set()
        assert res.kept == {"age unknown": 2}
    # with the storage directory the same tags are known to be seconds old
    res = api_gc(reg, policy, j, dry_run=True)
    assert res.items == [] and res.kept == {"younger than grace": 2}
    assert_image_complete(reg.url, "app", "dev")
    j.close()


def test_api_mode_without_storage_never_unlinks_a_blob(registry, tmp_path) -> None:
    """Item 8: an untagged manifest the journal never saw (pushed before the daemon) shares
    the base layer of an expiring tag; `untagged: keep` keeps it. Without storage the API
    pass deletes the tag's manifest only and says that blobs are left; with storage it
    sees the untagged manifest and unlinks only the expiring image's own layer."""
    reg = registry
    j = Journal(tmp_path / "j.db")
    base = layer_bytes("base", 900)
    with Pusher(reg.url) as p:
        loose = p.push_image("app", None, [base, layer_bytes("loose", 300)])
        dev = p.push_image("app", "dev", [base, layer_bytes("dev", 400)])
    age_tree(reg.storage, 2 * HOUR)
    pushed(j, "a", "app", "dev", dev.digest, time.time() - 2 * HOUR)
    policy = RetentionPolicy(name="p", untagged="keep", grace=HOUR, mode="api")
    res = api_gc(reg, policy, j, storage=False)
    assert res.errors == []
    assert res.deleted_manifests == {f"app@{dev.digest}"}
    assert res.deleted_blobs == set()
    assert NO_BLOBS_WITHOUT_STORAGE in res.notes
    assert_image_complete(reg.url, "app", loose.digest)

    with Pusher(reg.url) as p:
        dev = p.push_image("app", "dev", [base, layer_bytes("dev", 400)])
    age_tree(reg.storage, 2 * HOUR)
    dry = api_gc(reg, policy, j, dry_run=True)
    res = api_gc(reg, policy, j)
    assert res.errors == [] and NO_BLOBS_WITHOUT_STORAGE not in res.notes
    dev_layer = dev.blobs[2]
    assert res.deleted_blobs == {dev.blobs[0], dev_layer} == dry.deleted_blobs  # config, layer
    assert item_keys(res) == item_keys(dry)
    assert_image_complete(reg.url, "app", loose.digest)  # the shared base stays linked
    j.close()


def test_storage_pass_dry_run_lists_the_items_the_real_run_deletes(registry) -> None:
    reg = registry
    with Pusher(reg.url) as p:
        for tag in ("v1", "v2", "dev"):
            p.push_image("app", tag, [layer_bytes("base", 500), layer_bytes(tag, 300)])
        p.push_image("app", None, [layer_bytes("loose", 300)])
    age_tree(reg.storage, 2 * HOUR)
    policy = RetentionPolicy(
        name="p", keep=KeepRules(tags=("v*",)), untagged="delete", grace=HOUR, mode="storage"
    )
    dry = storage_gc(reg, policy, dry_run=True)
    real = storage_gc(reg, policy)
    assert real.errors == []
    assert item_keys(dry) == item_keys(real)
    kinds = {i["kind"] for i in real.items}
    assert {"tag", "manifest", "blob", "link"} <= kinds
    assert {i["clause"] for i in real.items if i["kind"] == "tag"} == {"no keep clause matched"}
    assert real.kept == {"kept by keep.tags": 2}
    for tag in ("v1", "v2"):
        assert_image_complete(reg.url, "app", tag)
