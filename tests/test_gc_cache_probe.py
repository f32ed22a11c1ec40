"""The live blob-descriptor cache probe: after the quarantine the storage GC asks the
registry itself, so a cache switched on behind config.yml's back (an environment
override) refuses the run, with everything restored and nothing deleted."""

from __future__ import annotations

import json
import random
import re

import pytest
import yaml

from replicator.cli import main
from replicator.gc import cache_probe
from replicator.gc.storage import (
    OnlineGCRefused,
    StorageCollector,
    check_registry_config,
    collect_storage,
    collect_storage_sync,
)
from replicator.journal import Journal
from replicator.registry.client import RegistryClient
from replicator.registry.site import SiteEndpoint
from tests.harness.images import Pusher, assert_image_complete, layer_bytes
from tests.harness.journal import sql
from tests.test_gc_storage import age_tree, delete_manifest, opts, start_stale_upload, store_files

CACHE_ENV = {"REGISTRY_STORAGE_CACHE_BLOBDESCRIPTOR": "inmemory"}
LAYERS = 20  # more garbage blobs than the probe samples


def garbage_scene(reg) -> dict:
    """A kept image, a deleted one with LAYERS unique layers (garbage, each linked in
    `app`), and a stale upload; all aged past the grace."""
    with Pusher(reg.url) as p:
        p.push_image("app", "v1", [layer_bytes("kept", 900)])
        gone = p.push_image("app", "old", [layer_bytes(f"g{n}", 300) for n in range(LAYERS)])
        delete_manifest(reg, "app", gone.digest)
        start_stale_upload(reg, "app", b"half an upload")
    age_tree(reg.storage, 7200)
    return {"garbage": {gone.digest, *gone.blobs}, "layers": set(gone.blobs)}


def without_quarantine(files: dict) -> dict:
    return {p: v for p, v in files.items() if "/_quarantine/" not in p}


def client(url: str, **kw) -> RegistryClient:
    return RegistryClient(SiteEndpoint(name="a", url=url, insecure=True), **kw)


@pytest.fixture
def cached_registry(registry_factory):
    """distribution with an in-memory blob-descriptor cache set only by the environment:
    its config.yml has no cache section, so the YAML check passes."""
    reg = registry_factory("cached", env=CACHE_ENV)
    assert "cache" not in yaml.safe_load(reg.config_path.read_text())["storage"]
    check_registry_config(reg.config_path, reg.storage)  # the fast check sees nothing
    return reg


async def test_cache_set_by_environment_refuses_the_run_and_restores_everything(
    cached_registry, tmp_path
) -> None:
    reg = cached_registry
    scene = garbage_scene(reg)
    before = store_files(reg.storage)
    journal = Journal(tmp_path / "j.db")
    async with client(reg.url) as api:
        with pytest.raises(OnlineGCRefused) as info:
            await collect_storage(reg.storage, journal, opts(reg, registry_api=api))
    message = str(info.value)
    assert info.value.exit_code == 2
    assert "storage.cache.blobdescriptor" in message
    assert "REGISTRY_STORAGE_CACHE_BLOBDESCRIPTOR" in message
    assert "nothing was deleted" in message
    # every quarantined item is back where it was, untouched; the upload too
    assert without_quarantine(store_files(reg.storage)) == before
    assert all(reg.has_blob_data(d) for d in scene["garbage"])
    run = sql(journal, "SELECT * FROM gc_runs ORDER BY id DESC LIMIT 1")[0]
    assert run["state"] == "refused"
    states = {
        c["state"] for c in (await journal.gc_runs.candidates(run["id"])) if c["kind"] != "upload"
    }
    assert states == {"restored"}
    assert json.loads(run["stats"])["restored"] >= LAYERS
    assert (await journal.gc_runs.get(run["id"]))["finished_at"] is not None
    # a refused run is finished: the next run does not resume (or delete) its items
    async with client(reg.url) as api:
        with pytest.raises(OnlineGCRefused):
            await collect_storage(reg.storage, journal, opts(reg, registry_api=api))
    assert all(reg.has_blob_data(d) for d in scene["garbage"])
    assert_image_complete(reg.url, "app", "v1")
    journal.close()


async def test_same_store_without_the_cache_collects_and_probes_a_bounded_sample(
    registry, proxy_factory, tmp_path
) -> None:
    reg = registry
    scene = garbage_scene(reg)
    proxy = proxy_factory(reg)
    async with client(proxy.url) as api:
        res = await collect_storage(reg.storage, None, opts(reg, registry_api=api))
    assert res.errors == []
    assert res.deleted_blobs == scene["garbage"]
    assert res.uploads_deleted == 1
    assert not any("skipped" in w for w in res.warnings)
    heads = [r for r in proxy.records if r.method == "HEAD" and "/blobs/" in r.path]
    assert len(heads) == cache_probe.SAMPLE_SIZE  # LAYERS + 1 candidates, 16 asked
    for r in heads:
        repo, digest = re.fullmatch(r"/v2/(.+)/blobs/(sha256:[0-9a-f]+)", r.path).groups()
        assert repo == "app" and digest in scene["garbage"] and r.status == 404
    assert len({r.path for r in heads}) == len(heads)
    assert_image_complete(reg.url, "app", "v1")


async def test_probe_that_cannot_reach_the_registry_refuses_and_restores(
    registry, proxy_factory, tmp_path
) -> None:
    reg = registry
    scene = garbage_scene(reg)
    proxy = proxy_factory(reg)
    proxy.respond(503, count=1000, method="HEAD", path=r"/blobs/")
    before = store_files(reg.storage)
    async with client(proxy.url, retries=1, backoff_base=0.01) as api:
        with pytest.raises(OnlineGCRefused, match=r"could not verify.*blobdescriptor") as info:
            await collect_storage(reg.storage, None, opts(reg, registry_api=api))
    assert "nothing was deleted" in str(info.value) and proxy.url in str(info.value)
    assert without_quarantine(store_files(reg.storage)) == before
    assert all(reg.has_blob_data(d) for d in scene["garbage"])


async def test_a_push_between_quarantine_and_probe_is_not_mistaken_for_a_cache(
    registry,
) -> None:
    """A 200 for a blob whose link and data are back on disk is a push, not a cache."""
    reg = registry
    with Pusher(reg.url) as p:
        img = p.push_image("r", "t", [layer_bytes("race", 1200)])
        delete_manifest(reg, "r", img.digest)
    age_tree(reg.storage, 7200)
    col = StorageCollector(reg.storage, None, opts(reg))
    try:
        plan = col.plan()
        col.recheck(plan)
        col.assign_quarantine(1, plan.items)
        col.quarantine(plan)
        sample = [(str(i.repository), str(i.digest)) for i in plan.items if i.kind == "link"]
        assert len(sample) == 2  # the layer and the config
        with Pusher(reg.url) as p:  # the layer is pushed again: fresh link, fresh data
            p.push_blob("r", layer_bytes("race", 1200))
        async with client(reg.url) as api:
            outcome = await cache_probe.probe(api, sample, col.gone_from_disk)
        assert outcome.probed == 2 and outcome.clean, outcome
    finally:
        col.close()


def test_without_an_api_the_run_says_the_live_check_was_skipped(registry) -> None:
    reg = registry
    scene = garbage_scene(reg)
    res = collect_storage_sync(reg.storage, None, opts(reg))
    assert res.deleted_blobs == scene["garbage"]
    assert any("live blob-descriptor cache check skipped" in w for w in res.warnings)
    vouched = collect_storage_sync(reg.storage, None, opts(reg, assume_no_cache=True))
    assert vouched.warnings == []


def test_gc_command_exits_2_for_a_cache_set_by_the_environment(
    cached_registry, tmp_path, capsys
) -> None:
    reg = cached_registry
    scene = garbage_scene(reg)
    cfg = {
        "journal": str(tmp_path / "journal.db"),
        "sites": {
            "a": {
                "url": reg.url,
                "insecure": True,
                "storage": str(reg.storage),
                "registry_config": str(reg.config_path),
            }
        },
        "gc": {
            "policies": [
                {
                    "name": "sweep",
                    "sites": ["a"],
                    "keep": {"tags": ["*"]},
                    "grace": "1m",
                    "mode": "storage",
                }
            ]
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["gc", "-c", str(path), "--quarantine-window", "0s"]) == 2
    err = capsys.readouterr().err
    assert "storage.cache.blobdescriptor" in err and "REGISTRY_STORAGE_CACHE_BLOBDESCRIPTOR" in err
    assert all(reg.has_blob_data(d) for d in scene["garbage"])


def test_sample_is_bounded_distinct_and_names_a_linking_repository() -> None:
    links = [(f"repo{n % 3}", f"sha256:{n // 2:064x}") for n in range(60)]  # 30 digests
    sample = cache_probe.choose_sample(links, 16, random.Random(7))
    assert len(sample) == 16 and len({d for _r, d in sample}) == 16
    assert all((r, d) in links for r, d in sample)
    assert cache_probe.choose_sample(links[:4], 16) and len(cache_probe.choose_sample([], 16)) == 0
    assert len(cache_probe.choose_sample(links[:4], 16)) == 2
