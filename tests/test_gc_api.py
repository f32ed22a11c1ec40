"""API-mode GC against a real registry: policies applied through DELETE calls."""

from __future__ import annotations

import asyncio
import os
import time

import httpx

from replicator.gc.api import ApiGCOptions, collect_api
from replicator.gc.policy import KeepRules, RetentionPolicy
from replicator.journal import Journal
from replicator.registry.client import RegistryClient
from replicator.registry.site import SiteEndpoint
from tests.harness.images import ACCEPT, Pusher, assert_image_complete, layer_bytes
from tests.harness.journal import sql

POLICY = RetentionPolicy(
    name="keep-v", keep=KeepRules(tags=("v*",)), untagged="delete", grace=3600, mode="api"
)


def status(reg, ref: str) -> int:
    return httpx.head(f"{reg.url}/v2/app/manifests/{ref}", headers={"accept": ACCEPT}).status_code


def age_tree(path, seconds: float) -> None:
    """Make everything stored so far look `seconds` old (pushed long ago, by the
    registry's own link file times)."""
    t = time.time() - seconds
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            os.utime(os.path.join(dirpath, name), (t, t))


def scene(reg):
    s = {}
    with Pusher(reg.url) as p:
        s["v1"] = p.push_image("app", "v1", [layer_bytes("base", 900), layer_bytes("v1", 700)])
        s["dev"] = p.push_image("app", "dev", [layer_bytes("base", 900), layer_bytes("dev", 800)])
        s["multi"] = p.push_multiarch("app", "v2", "ma")
        s["signed"] = p.push_image("app", "v3", [layer_bytes("v3", 500)])
        s["sig"] = p.push_referrer("app", s["signed"], b"sig-v3")
        s["old"] = p.push_image("app", "old", [layer_bytes("old", 600)])
        s["oldsig"] = p.push_referrer("app", s["old"], b"sig-old")
        s["other"] = p.push_image("untouched", "dev", [layer_bytes("u", 300)])
        age_tree(reg.storage, 7200)
        # pushed now, though its config claims 2024: the registry's time is what counts
        s["fresh"] = p.push_image("app", "fresh", [layer_bytes("fresh", 300)])
    return s


def run(reg, journal=None, storage=True, **kw):
    async def go():
        site = SiteEndpoint(name="a", url=reg.url, insecure=True)
        async with RegistryClient(site) as client:
            return await collect_api(
                client,
                journal,
                ApiGCOptions(
                    site="a",
                    policies=[RetentionPolicy(**{**POLICY.__dict__, "repositories": ("app",)})],
                    storage=reg.storage if storage else None,
                    **kw,
                ),
            )

    return asyncio.run(go())


def test_api_gc_applies_policy_and_dry_run_predicts_it(registry, tmp_path) -> None:
    reg = registry
    s = scene(reg)
    journal = Journal(tmp_path / "j.db")
    before = reg.all_blob_digests()
    fallback_old = "sha256-" + s["old"].digest.split(":")[1]
    fallback_index = httpx.head(
        f"{reg.url}/v2/app/manifests/{fallback_old}", headers={"accept": ACCEPT}
    ).headers["docker-content-digest"]
    dry = run(reg, journal, dry_run=True)
    assert reg.all_blob_digests() == before
    assert status(reg, "dev") == 200
    real = run(reg, journal)
    assert real.errors == []
    assert (dry.deleted_manifests, dry.deleted_tags, dry.deleted_blobs) == (
        real.deleted_manifests,
        real.deleted_tags,
        real.deleted_blobs,
    )
    assert real.deleted_manifests == {
        f"app@{s['dev'].digest}",
        f"app@{s['old'].digest}",
        f"app@{s['oldsig'].digest}",
        f"app@{fallback_index}",
    }
    assert {"app:dev", "app:old"} <= real.deleted_tags
    # fallback tag of the deleted subject goes too (its index is only kept with its subject)
    assert status(reg, fallback_old) == 404
    for tag in ("v1", "v2", "v3", "fresh"):
        assert_image_complete(reg.url, "app", tag)
    assert_image_complete(reg.url, "app", s["sig"].digest)  # signature kept
    assert_image_complete(reg.url, "untouched", "dev")  # no policy there
    assert status(reg, "dev") == 404
    dev_layer = s["dev"].blobs[2]
    assert dev_layer in real.deleted_blobs
    assert httpx.head(f"{reg.url}/v2/app/blobs/{dev_layer}").status_code == 404
    assert s["v1"].blobs[1] not in real.deleted_blobs  # shared base stays
    rows = sql(
        journal,
        "SELECT state, count(*) AS n FROM gc_candidates WHERE run_id=? GROUP BY state",
        (real.run_id,),
    )
    assert {r["state"] for r in rows} == {"deleted"}
    journal.close()


def test_tag_on_kept_digest_is_deleted_alone_on_distribution_2_8(registry) -> None:
    """Issue 11 item 9: distribution 2.8 has no tag DELETE; the placeholder trick removes
    `nightly` and nothing else, and no message claims the tag was left in place."""
    reg = registry
    with Pusher(reg.url) as p:
        p.push_image("app", "v9", [layer_bytes("x", 100)])
        p.push_image("app", "nightly", [layer_bytes("x", 100)])  # same digest
    age_tree(reg.storage, 7200)
    dry = run(reg, dry_run=True)
    res = run(reg)
    assert res.errors == []
    assert res.deleted_manifests == set()
    assert res.deleted_tags == {"app:nightly"} == dry.deleted_tags
    assert res.items == dry.items
    assert not any("cannot delete a tag by name" in w for w in res.warnings + res.notes)
    assert status(reg, "nightly") == 404
    assert_image_complete(reg.url, "app", "v9")
