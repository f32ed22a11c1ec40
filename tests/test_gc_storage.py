"""Storage-level GC against a real distribution registry that stays online."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from replicator.gc.layout import StoreLayout
from replicator.gc.policy import KeepRules, RetentionPolicy
from replicator.gc.storage import (
    GCResult,
    OnlineGCRefused,
    StorageCollector,
    StorageGCOptions,
    check_registry_config,
    collect_storage_sync,
)
from replicator.journal import Journal
from tests.harness.images import Pusher, assert_image_complete, digest_of, layer_bytes
from tests.harness.journal import sql
from tests.harness.util import wait_until

REPO_ROOT = Path(__file__).resolve().parents[1]


def age_tree(path: Path, seconds: float) -> None:
    """Make everything under `path` look `seconds` old (content pushed long ago)."""
    t = time.time() - seconds
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            os.utime(os.path.join(dirpath, name), (t, t))


def delete_manifest(reg, repo: str, digest: str) -> None:
    r = httpx.delete(f"{reg.url}/v2/{repo}/manifests/{digest}")
    assert r.status_code == 202, r.text


def start_stale_upload(reg, repo: str, data: bytes) -> str:
    r = httpx.post(f"{reg.url}/v2/{repo}/blobs/uploads/")
    loc = r.headers["location"]
    loc = loc if loc.startswith("http") else reg.url + loc
    r = httpx.patch(loc, content=data, headers={"content-type": "application/octet-stream"})
    assert r.status_code == 202
    return loc


def store_files(root: Path) -> dict[str, tuple[int, float]]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            st = os.stat(p)
            out[p] = (st.st_size, st.st_mtime)
    return out


def opts(reg, **kw) -> StorageGCOptions:
    base = dict(grace=60, quarantine_window=0, registry_config=reg.config_path, workers=4)
    base.update(kw)
    return StorageGCOptions(**base)


@pytest.fixture
def scene(registry):
    """A store with kept images, a multi-arch index, a signed image, garbage and
    an abandoned upload; everything aged past the grace."""
    reg = registry
    s: dict = {"reg": reg}
    with Pusher(reg.url) as p:
        shared = layer_bytes("shared", 3000)
        s["kept"] = p.push_image("team/app", "v1", [shared, layer_bytes("v1-only", 1500)])
        s["gone"] = p.push_image("team/app", "old", [shared, layer_bytes("old-only", 2500)])
        s["other"] = p.push_image("other", "x", [layer_bytes("old-only", 2500)])
        s["multi"] = p.push_multiarch("team/app/multi", "v1", "ma")
        s["signed"] = p.push_image("signed", "v1", [layer_bytes("signed", 1000)])
        s["sig"] = p.push_referrer("signed", s["signed"], b"signature-payload")
        s["untagged"] = p.push_image("team/app", None, [layer_bytes("untagged", 800)])
        s["loose"] = p.push_blob("team/app", layer_bytes("loose", 4000))
        delete_manifest(reg, "team/app", s["gone"].digest)
        start_stale_upload(reg, "team/app", b"half an upload")
    age_tree(reg.storage, 7200)
    # what must go: the deleted manifest, its config; its unique layer is still used by `other`
    s["garbage"] = {s["gone"].digest, s["gone"].blobs[0], s["loose"]}
    s["garbage_bytes"] = len(s["gone"].raw) + sum(
        reg.blob_path(d).stat().st_size for d in (s["gone"].blobs[0], s["loose"])
    )
    return s


def assert_all_complete(s) -> None:
    url = s["reg"].url
    assert_image_complete(url, "team/app", "v1")
    assert_image_complete(url, "other", "x")
    assert_image_complete(url, "team/app/multi", "v1")
    assert_image_complete(url, "signed", "v1")
    assert_image_complete(url, "signed", s["sig"].digest)
    assert_image_complete(url, "team/app", s["untagged"].digest)


def test_store_level_sweep_removes_exactly_the_garbage(scene, tmp_path) -> None:
    reg = scene["reg"]
    before = reg.all_blob_digests()
    journal = Journal(tmp_path / "j.db")
    res = collect_storage_sync(reg.storage, journal, opts(reg))
    assert res.errors == []
    assert res.deleted_blobs == scene["garbage"]
    assert reg.all_blob_digests() == before - scene["garbage"]
    assert res.bytes_reclaimed == scene["garbage_bytes"]
    assert res.uploads_deleted == 1 and res.manifests_deleted == 0
    assert res.upload_bytes_reclaimed >= len(b"half an upload")  # + startedat, hashstates
    assert not list((reg.storage / "docker/registry/v2/repositories/team/app/_uploads").iterdir())
    for d in scene["garbage"] - {scene["gone"].digest}:
        assert not reg.layer_link("team/app", d).exists()
    assert_all_complete(scene)
    # the journal tells the story
    run = asyncio.run(journal.gc_runs.get(res.run_id))
    assert run["state"] == "done" and run["mark_summary"]["repositories"] == 4
    states = {
        (c["kind"], c["key"]): c["state"]
        for c in asyncio.run(journal.gc_runs.candidates(res.run_id))
    }
    assert states[("blob", scene["loose"])] == "deleted"
    # quarantine is empty afterwards, and a second run finds nothing
    assert not [
        p for p in (reg.storage / "docker/registry/v2/_quarantine").iterdir() if p.name != ".lock"
    ]
    again = collect_storage_sync(reg.storage, journal, opts(reg))
    assert again.deleted_blobs == set() and again.bytes_reclaimed == 0
    journal.close()


def test_dry_run_changes_nothing_and_predicts_the_real_run(scene, tmp_path) -> None:
    reg = scene["reg"]
    before = store_files(reg.storage)
    journal = Journal(tmp_path / "j.db")
    dry = collect_storage_sync(reg.storage, journal, opts(reg, dry_run=True))
    assert store_files(reg.storage) == before
    assert dry.dry_run and dry.deleted_blobs == scene["garbage"]
    real = collect_storage_sync(reg.storage, journal, opts(reg))
    assert real.deleted_blobs == dry.deleted_blobs
    assert (real.bytes_reclaimed, real.blobs_deleted, real.links_deleted, real.uploads_deleted) == (
        dry.bytes_reclaimed,
        dry.blobs_deleted,
        dry.links_deleted,
        dry.uploads_deleted,
    )
    assert asyncio.run(journal.gc_runs.get(dry.run_id))["dry_run"] == 1
    assert_all_complete(scene)
    journal.close()


def test_grace_protects_recent_blobs_and_links(scene) -> None:
    reg = scene["reg"]
    with Pusher(reg.url) as p:
        fresh = p.push_blob("team/app", layer_bytes("fresh", 500))
        # re-pushing an old garbage blob writes a fresh link: a push in progress
        p.http.post(f"{reg.url}/v2/other2/blobs/uploads/?mount={scene['loose']}&from=team/app")
    res = collect_storage_sync(reg.storage, None, opts(reg))
    assert fresh not in res.deleted_blobs and reg.has_blob_data(fresh)
    assert scene["loose"] not in res.deleted_blobs and reg.has_blob_data(scene["loose"])
    assert res.deleted_blobs == scene["garbage"] - {scene["loose"]}


def test_shared_blob_survives_deletion_in_one_repository(registry) -> None:
    reg = registry
    with Pusher(reg.url) as p:
        a = p.push_image("a/nested/deep", "t", [layer_bytes("common", 900), b"a-only"])
        b = p.push_image("b", "t", [layer_bytes("common", 900)])
        delete_manifest(reg, "a/nested/deep", a.digest)
    age_tree(reg.storage, 7200)
    res = collect_storage_sync(reg.storage, None, opts(reg))
    assert res.deleted_blobs == {a.digest, a.blobs[0], a.blobs[2]}  # not the shared layer
    assert_image_complete(reg.url, "b", "t")
    assert reg.has_blob_data(b.blobs[1])


def test_policy_mode_keeps_indexes_children_and_signatures(scene) -> None:
    reg = scene["reg"]
    pol = RetentionPolicy(
        name="keep-v",
        keep=KeepRules(tags=("v*",)),
        untagged="delete",
        grace=60,
        mode="storage",
        repositories=("team/**", "signed"),
    )
    with Pusher(reg.url) as p:
        dev = p.push_image("team/app", "dev", [layer_bytes("dev-only", 700)])
    age_tree(reg.storage, 7200)
    res = collect_storage_sync(reg.storage, None, opts(reg, policies=[pol]))
    assert res.errors == []
    assert res.deleted_tags == {"team/app:dev"}
    assert res.deleted_manifests == {
        f"team/app@{dev.digest}",
        f"team/app@{scene['untagged'].digest}",
    }
    assert set(dev.blobs[1:]) <= res.deleted_blobs
    assert httpx.get(f"{reg.url}/v2/team/app/manifests/dev").status_code == 404
    assert_image_complete(reg.url, "team/app", "v1")
    assert_image_complete(reg.url, "team/app/multi", "v1")  # untagged children kept
    assert_image_complete(reg.url, "signed", "v1")
    assert_image_complete(reg.url, "signed", scene["sig"].digest)  # signature kept
    assert_image_complete(reg.url, "other", "x")  # no policy: untouched
    fallback = "sha256-" + scene["signed"].digest.split(":")[1]
    assert_image_complete(reg.url, "signed", fallback)


def test_signature_of_deleted_image_is_garbage(registry) -> None:
    reg = registry
    with Pusher(reg.url) as p:
        img = p.push_image("s", "tmp", [layer_bytes("img", 600)])
        sig = p.push_referrer("s", img, b"sig-of-tmp")
    age_tree(reg.storage, 7200)
    pol = RetentionPolicy(name="p", keep=KeepRules(tags=("release*",)), grace=60, mode="storage")
    res = collect_storage_sync(reg.storage, None, opts(reg, policies=[pol]))
    assert f"s@{sig.digest}" in res.deleted_manifests
    assert f"s@{img.digest}" in res.deleted_manifests
    assert {img.digest, sig.digest, *img.blobs, *sig.blobs} <= res.deleted_blobs
    assert reg.all_blob_digests() == set()


def test_blob_descriptor_cache_is_refused(registry_factory, tmp_path) -> None:
    reg = registry_factory(
        "cached", extra_config={"storage": {"cache": {"blobdescriptor": "inmemory"}}}
    )
    with Pusher(reg.url) as p:
        p.push_image("c", "t", [b"cached"])
    with pytest.raises(OnlineGCRefused, match=r"blobdescriptor.*#2966"):
        collect_storage_sync(reg.storage, None, opts(reg))
    with pytest.raises(OnlineGCRefused, match="registry_config"):
        check_registry_config(None)
    before = store_files(reg.storage)
    dry = collect_storage_sync(reg.storage, None, opts(reg, dry_run=True))
    assert any("refused" in w for w in dry.warnings)
    res = collect_storage_sync(reg.storage, None, opts(reg, assume_no_cache=True))
    assert res.errors == []
    assert store_files(reg.storage).keys() >= before.keys() - {
        p for p in before if "_quarantine" in p
    }


def test_registry_config_for_another_store_is_refused(registry, tmp_path) -> None:
    other = tmp_path / "elsewhere" / "docker/registry/v2"
    other.mkdir(parents=True)
    with pytest.raises(Exception, match="not the storage"):
        collect_storage_sync(tmp_path / "elsewhere", None, opts(registry))


def test_head_race_image_pushed_just_before_quarantine_is_restored(registry) -> None:
    """A client HEADs old blobs (exist via stale links), skips uploading them and PUTs
    the manifest right after our re-check: after the window the blobs come back."""
    reg = registry
    with Pusher(reg.url) as p:
        img = p.push_image("race", "t", [layer_bytes("race", 1200)])
        delete_manifest(reg, "race", img.digest)
    age_tree(reg.storage, 7200)
    col = StorageCollector(reg.storage, None, opts(reg))
    try:
        plan = col.plan()
        col.recheck(plan)
        assert {i.digest for i in plan.items if i.kind == "blob"} >= set(img.blobs)
        with Pusher(reg.url) as p:  # every HEAD answers 200: skipped
            again = p.push_image("race", "t", [layer_bytes("race", 1200)])
        assert again.digest == img.digest
        col.assign_quarantine(1, plan.items)
        col.quarantine(plan)
        moved = {i.digest for i in plan.items if i.kind == "blob" and i.state == "quarantined"}
        assert set(img.blobs) <= moved  # the image is unavailable for the window...
        assert httpx.get(f"{reg.url}/v2/race/blobs/{img.blobs[1]}").status_code == 404
        col.finalize(plan.items, plan.cutoff)
    finally:
        col.close()
    assert_image_complete(reg.url, "race", "t")  # ...and never lost
    assert {i.state for i in plan.items if i.digest in img.blobs} == {"restored"}


def test_manifest_push_during_quarantine_fails_validation_then_upload_recovers(registry):
    reg = registry
    with Pusher(reg.url) as p:
        img = p.push_image("r2", "t", [layer_bytes("r2", 1200)])
        delete_manifest(reg, "r2", img.digest)
    age_tree(reg.storage, 7200)
    col = StorageCollector(reg.storage, None, opts(reg))
    try:
        plan = col.plan()
        col.recheck(plan)
        col.assign_quarantine(1, plan.items)
        col.quarantine(plan)
        with Pusher(reg.url) as p:
            # layers are gone for the registry: the client uploads them afresh
            again = p.push_image("r2", "t", [layer_bytes("r2", 1200)])
        assert_image_complete(reg.url, "r2", "t")
        col.finalize(plan.items, plan.cutoff)
    finally:
        col.close()
    assert again.digest == img.digest
    assert_image_complete(reg.url, "r2", "t")
    assert not any(i.state == "deleted" for i in plan.items if i.digest in img.blobs)


def test_injected_crash_mid_sweep_then_rerun_finishes(scene, tmp_path) -> None:
    reg = scene["reg"]
    journal = Journal(tmp_path / "j.db")
    with pytest.raises(RuntimeError, match="injected fault"):
        collect_storage_sync(reg.storage, journal, opts(reg, fault_after_deletions=1))
    run = sql(journal, "SELECT * FROM gc_runs ORDER BY id DESC LIMIT 1")[0]
    assert run["state"] == "sweeping"
    res = collect_storage_sync(reg.storage, journal, opts(reg))
    assert res.resumed_runs == [run["id"]]
    assert reg.all_blob_digests().isdisjoint(scene["garbage"])
    assert asyncio.run(journal.gc_runs.get(run["id"]))["state"] == "done"
    leftovers = asyncio.run(journal.gc_runs.candidates(run["id"], ("candidate", "quarantined")))
    assert leftovers == []
    assert_all_complete(scene)
    journal.close()


def test_sigkill_during_quarantine_window_then_rerun_finishes(scene, tmp_path) -> None:
    """The rerun honours the killed run's journaled settle time (its 6 s window), not its
    own shorter one: the window protects uploads that began before the kill."""
    reg = scene["reg"]
    jpath = tmp_path / "j.db"
    code = (
        "import sys\n"
        "from replicator.gc.storage import collect_storage_sync, StorageGCOptions\n"
        "from replicator.journal import Journal\n"
        f"collect_storage_sync({str(reg.storage)!r}, Journal({str(jpath)!r}), "
        f"StorageGCOptions(grace=60, quarantine_window=6, "
        f"registry_config={str(reg.config_path)!r}))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT)
    journal = Journal(jpath)
    try:
        wait_until(
            lambda: sql(journal, "SELECT 1 FROM gc_candidates WHERE state='quarantined'"),
            timeout=30,
            what="the subprocess to quarantine candidates",
        )
        # mid-window the garbage is invisible to the registry but still on disk
        assert not reg.has_blob_data(scene["loose"])
    finally:
        proc.kill()
        proc.wait()
    res = collect_storage_sync(reg.storage, journal, opts(reg, quarantine_window=0.2))
    assert len(res.resumed_runs) == 1
    assert scene["loose"] in res.deleted_blobs
    assert reg.all_blob_digests().isdisjoint(scene["garbage"])
    assert_all_complete(scene)
    qdir = reg.storage / "docker/registry/v2/_quarantine"
    assert [p.name for p in qdir.iterdir()] == [".lock"]
    journal.close()


def test_layer_links_to_missing_blobs_are_removed(registry) -> None:
    reg = registry
    with Pusher(reg.url) as p:
        d = p.push_blob("lm", layer_bytes("lm", 100))
    os.remove(reg.blob_path(d))
    age_tree(reg.storage, 7200)
    res = collect_storage_sync(reg.storage, None, opts(reg))
    assert res.links_deleted == 1 and not reg.layer_link("lm", d).exists()


def test_layout_lists_nested_repositories(registry) -> None:
    with Pusher(registry.url) as p:
        p.push_image("x", "t", [b"1"])
        p.push_image("x/y/z", "t", [b"2"])
    assert StoreLayout(registry.storage).list_repositories() == ["x", "x/y/z"]
    assert digest_of(b"1") in StoreLayout(registry.storage).scan_repository("x").layers


def test_blob_deleted_through_the_api_is_collected_with_its_empty_link_dir(registry) -> None:
    """distribution's blob DELETE removes the link file but leaves its directory."""
    reg = registry
    with Pusher(reg.url) as p:
        d = p.push_blob("bd", layer_bytes("bd", 300))
    assert httpx.delete(f"{reg.url}/v2/bd/blobs/{d}").status_code == 202
    assert reg.layer_link("bd", d).parent.is_dir() and not reg.layer_link("bd", d).exists()
    age_tree(reg.storage, 7200)
    t = time.time() - 7200
    os.utime(reg.layer_link("bd", d).parent, (t, t))
    res = collect_storage_sync(reg.storage, None, opts(reg))
    assert res.deleted_blobs == {d}
    assert not reg.layer_link("bd", d).parent.exists()


def test_a_big_result_has_a_short_repr():
    """asyncio.run reprs its main task, result included, when it restores its SIGINT
    handler: a GCResult of 100k manifests must not become a 100 MB string there."""
    res = GCResult(run_id=1, dry_run=False, blobs_deleted=300_000)
    res.deleted_blobs = {f"sha256:{i:064x}" for i in range(300_000)}
    res.deleted_manifests = {f"r@sha256:{i:064x}" for i in range(1000)}
    res.items = [{"kind": "blob", "digest": d} for d in list(res.deleted_blobs)[:1000]]
    assert len(repr(res)) < 2000 and "blobs_deleted=300000" in repr(res)
