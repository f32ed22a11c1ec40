"""cosign's legacy tags (`sha256-<hex>.sig`, `.att`, `.sbom`) travel with their image (issue 13,
item 6): copied with it whatever the tag filters say, updated when the image is re-signed,
deleted with it when deletes propagate. Real registries; the signatures are pushed the way
cosign pushes them (an OCI manifest whose layer is the simple-signing payload, annotated
with `dev.cosignproject.cosign/signature`), no cosign binary needed.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import pytest

from replicator.config import config_from_dict
from replicator.copy import CopyEngine, CopyOptions
from replicator.daemon.dispatch import needs_source_tags, tasks_for_event
from replicator.events import RegistryEvent
from replicator.planner import plan_target
from replicator.registry.client import RegistryClient
from replicator.registry.site import SiteEndpoint
from replicator.rules import (
    attached_cosign_tags,
    cosign_subject,
    cosign_tags_of,
    covered_tags,
    covers,
    is_cosign_tag,
)
from tests.harness.daemon import DaemonProcess, image_complete, notify_kwargs, site_config
from tests.harness.images import OCI_MANIFEST, Pusher, assert_image_complete, layer_bytes
from tests.harness.referrers_front import referrers_front
from tests.harness.tag_delete_front import tag_delete_front
from tests.harness.util import free_port, wait_until
from tests.test_sync import cli, sync_json, write_config

SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
LAYER_TYPES = {"sig": SIMPLE_SIGNING, "att": "application/vnd.dsse.envelope.v1+json"}
LAYER_TYPES["sbom"] = "text/spdx+json"


def cosign_tag(digest: str, suffix: str) -> str:
    return f"sha256-{digest.split(':', 1)[1]}.{suffix}"


def push_cosign(p: Pusher, repo: str, image: str, suffix: str, seed: str = "1") -> str:
    """Push `sha256-<hex>.<suffix>` as cosign does; returns the tag's manifest digest."""
    payload = json.dumps(
        {
            "critical": {
                "identity": {"docker-reference": repo},
                "image": {"docker-manifest-digest": image},
                "type": "cosign container image signature",
            },
            "optional": {"seed": seed},
        }
    ).encode()
    config = json.dumps({"architecture": "", "os": "", "rootfs": {"type": "layers"}}).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": p.push_blob(repo, config),
            "size": len(config),
        },
        "layers": [
            {
                "mediaType": LAYER_TYPES[suffix],
                "digest": p.push_blob(repo, payload),
                "size": len(payload),
                "annotations": {
                    "dev.cosignproject.cosign/signature": base64.b64encode(
                        f"sig-{seed}".encode()
                    ).decode()
                },
            }
        ],
    }
    raw = json.dumps(manifest).encode()
    return p.push_manifest(repo, cosign_tag(image, suffix), raw, OCI_MANIFEST)


def sign_all(p: Pusher, repo: str, image: str, seed: str = "1") -> dict[str, str]:
    return {cosign_tag(image, s): push_cosign(p, repo, image, s, seed) for s in LAYER_TYPES}


def manifest_bytes(url: str, repo: str, ref: str) -> bytes | None:
    with Pusher(url) as p:
        r = p.get_manifest(repo, ref)
    return r.content if r.status_code == 200 else None


def tags(url: str, repo: str = "team/app") -> list[str]:
    with Pusher(url) as p:
        return sorted(p.tags(repo))


def rule(**extra) -> object:
    cfg = config_from_dict(
        {
            "sites": {"a": {"url": "https://a"}, "b": {"url": "https://b"}},
            "rules": [{"name": "r", "from": "a", "to": ["b"], **extra}],
        }
    )
    return cfg.rules[0]


D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


# ---- pure: recognition, coverage, planning -------------------------------------------------


def test_cosign_tags_are_recognised_and_never_count_as_ordinary_tags():
    sig = cosign_tag(D1, "sig")
    assert is_cosign_tag(sig) and is_cosign_tag(cosign_tag(D1, "sbom"))
    assert not is_cosign_tag("sha256-" + "1" * 64)  # the OCI referrers fallback tag
    assert not is_cosign_tag("v1.sig") and not is_cosign_tag(sig + "x")
    assert cosign_subject(sig) == D1 and cosign_subject("v1") is None
    assert cosign_tags_of(D1) == [cosign_tag(D1, s) for s in ("sig", "att", "sbom")]
    r = rule(tags={"semver": ">=1.0.0", "latest": 1})
    listing = ["v1.0.0", "v2.0.0", sig, cosign_tag(D2, "att")]
    # not selected by name (their image is not known yet), and they do not take `latest`'s slot
    assert covered_tags(r, listing) == ["v2.0.0"]
    assert covers(r, sig) and not covers(rule(referrers=False), sig)
    assert attached_cosign_tags(r, listing, {D1}) == [sig]
    assert attached_cosign_tags(rule(referrers=False), listing, {D1}) == []


def test_a_pushed_cosign_tag_is_a_task_without_a_listing_whatever_the_filters():
    """A re-signing arrives as a push of the cosign tag alone: the tag filters and `latest`
    do not apply to it (so no listing is needed), `referrers: false` keeps it home."""
    sig = cosign_tag(D1, "sig")
    base = {"sites": {"a": {"url": "https://a"}, "b": {"url": "https://b"}}}
    event = RegistryEvent(
        id="e",
        site="a",
        action="push",
        repository="team/app",
        tag=sig,
        digest=D2,
        is_manifest=True,
    )
    for referrers, wanted in ((True, [sig]), (False, [])):
        config = config_from_dict(
            {
                **base,
                "rules": [
                    {
                        "name": "r",
                        "from": "a",
                        "to": ["b"],
                        "referrers": referrers,
                        "tags": {"semver": ">=1.0.0", "latest": 2},
                    }
                ],
            }
        )
        assert not needs_source_tags(config, config.rules, event)
        assert [t.tag for t in tasks_for_event(config, config.rules, event)] == wanted


def test_planner_deletes_the_cosign_tags_of_a_pruned_image_after_it_and_keeps_a_tagged_ones():
    r = rule(deletes=True, overwrite=False)
    sig1, att1, sig2 = cosign_tag(D1, "sig"), cosign_tag(D1, "att"), cosign_tag(D2, "sig")
    source = {"v2": D2, "stable": D2, sig1: "sha256:" + "a" * 64, sig2: "sha256:" + "c" * 64}
    target = {"v1": D1, "v2": D2, "x": D2, sig1: "sha256:" + "a" * 64, att1: "sha256:" + "b" * 64}
    target[sig2] = "sha256:" + "d" * 64  # re-signed at the source
    selected = ["v2", "stable", sig2]
    actions = plan_target(
        r, "b", "team/app", source, selected, {t: target.get(t) for t in selected}, target
    )
    by_tag = {a.tag: a for a in actions}
    # a moved cosign tag follows the source even under overwrite: false
    assert by_tag[sig2].kind == "copy" and by_tag["v2"].kind == "up-to-date"
    assert by_tag["v1"].kind == "delete" and by_tag["v1"].prune_manifest
    # D1 goes: its cosign tag the source still holds (orphaned) goes after it; the one the
    # source lost goes as any tag the source lost
    assert by_tag[sig1].kind == "delete" and by_tag[sig1].attached_to == D1
    assert by_tag[att1].kind == "delete" and by_tag[att1].attached_to is None
    assert "deleted with its image" in by_tag[sig1].describe()
    assert by_tag["x"].kind == "delete" and not by_tag["x"].prune_manifest
    assert sig2 not in [a.tag for a in actions if a.kind == "delete"]


# ---- sync on real registries ----------------------------------------------------------------


@pytest.fixture
def src_dst(registry_factory, proxy_factory):
    src, dst = registry_factory("src"), registry_factory("dst")
    proxy = proxy_factory(dst)
    return src, dst, proxy


def test_sync_copies_the_image_with_its_cosign_tags_whatever_the_filter_and_once(
    src_dst, tmp_path: Path
):
    src, dst, proxy = src_dst
    with Pusher(src.url) as p:
        old = p.push_image("team/app", "0.9.0", [layer_bytes("old", 300)])
        p.push_image("team/app", "1.1.0", [layer_bytes("mid", 300)])
        img = p.push_image("team/app", "1.2.0", [layer_bytes("new", 300)])
        signed = sign_all(p, "team/app", img.digest)
        push_cosign(p, "team/app", old.digest, "sig")  # its image is not copied: neither is it
    config = write_config(
        tmp_path,
        {"a": src, "b": proxy},
        [{"name": "r", "from": "a", "to": ["b"], "tags": {"semver": ">=1.0.0", "latest": 1}}],
    )
    dry = sync_json(config, "--dry-run")
    assert dry["planned_copies"] == 4 and tags(dst.url) == []
    assert sorted(line.split()[1].rsplit(":", 1)[1] for line in dry["plan"]) == sorted(
        ["1.2.0", *signed]
    )
    first = sync_json(config)
    assert first["_rc"] == 0 and first["copied"] == 4, first
    assert tags(dst.url) == sorted(["1.2.0", *signed])
    for tag, digest in signed.items():
        assert manifest_bytes(dst.url, "team/app", tag) == manifest_bytes(src.url, "team/app", tag)
        assert assert_image_complete(dst.url, "team/app", tag) == digest
    # a second sync finds everything in place: nothing written
    proxy.reset_counts()
    second = sync_json(config)
    assert second["planned_copies"] == 0 and second["copied"] == 0
    assert sum(proxy.count(m) for m in ("PUT", "POST", "PATCH", "DELETE")) == 0
    assert proxy.count() == proxy.count("HEAD") == 4  # the image and its three cosign tags
    # re-signed: the .sig tag moved at the source, and moves at the target
    with Pusher(src.url) as p:
        resigned = push_cosign(p, "team/app", img.digest, "sig", seed="2")
    third = sync_json(config, "--dry-run")
    assert third["planned_copies"] == 1 and cosign_tag(img.digest, "sig") in third["plan"][0]
    assert sync_json(config)["copied"] == 1
    assert assert_image_complete(dst.url, "team/app", cosign_tag(img.digest, "sig")) == resigned


def test_sync_with_referrers_false_leaves_cosign_tags_home(src_dst, tmp_path: Path):
    src, dst, _ = src_dst
    with Pusher(src.url) as p:
        img = p.push_image("team/app", "v1", [layer_bytes("img", 300)])
        sign_all(p, "team/app", img.digest)
    config = write_config(
        tmp_path,
        {"a": src, "b": dst},
        [{"name": "r", "from": "a", "to": ["b"], "referrers": False}],
    )
    assert sync_json(config)["copied"] == 1
    assert tags(dst.url) == ["v1"]


def test_sync_deletes_cosign_tags_with_their_image_and_keeps_them_while_a_tag_stays(
    src_dst, tmp_path: Path
):
    src, dst, _ = src_dst
    with Pusher(src.url) as p:
        gone = p.push_image("team/app", "v1", [layer_bytes("gone", 300)])
        kept = p.push_image("team/app", "v2", [layer_bytes("kept", 300)])
        p.push_manifest("team/app", "stable", kept.raw, kept.media_type)
        gone_sigs, kept_sigs = (
            sign_all(p, "team/app", gone.digest),
            sign_all(p, "team/app", kept.digest),
        )
    config = write_config(
        tmp_path, {"a": src, "b": dst}, [{"name": "r", "from": "a", "to": ["b"], "deletes": True}]
    )
    assert sync_json(config)["copied"] == 9
    # the image's only tag goes with the image (distribution 2.8 deletes by digest; the
    # source keeps its cosign tags orphaned); of the other image, one of two tags goes
    assert httpx.delete(f"{src.url}/v2/team/app/manifests/{gone.digest}").status_code == 202
    front = tag_delete_front(src)
    try:
        assert httpx.delete(f"{front.url}/v2/team/app/manifests/stable").status_code == 202
    finally:
        front.stop()
    dry = sync_json(config, "--dry-run")
    assert dry["planned_deletes"] == 5, dry["plan"]
    for tag in gone_sigs:
        assert any(tag in line and "deleted with its image" in line for line in dry["plan"])
    result = sync_json(config)
    assert result["_rc"] == 0 and result["deleted"] == 5, result
    assert tags(dst.url) == sorted(["v2", *kept_sigs])
    assert manifest_bytes(dst.url, "team/app", gone.digest) is None
    assert sync_json(config)["planned_deletes"] == 0


# ---- the copy engine (the daemon's tasks, `registry-replicator copy`) ------------------------


def client(reg, name: str) -> RegistryClient:
    return RegistryClient(SiteEndpoint(name=name, url=reg.url, insecure=True))


async def test_copy_brings_the_cosign_tags_the_source_has_and_not_with_referrers_off(
    registry_factory,
):
    src, dst, bare = registry_factory("src"), registry_factory("dst"), registry_factory("bare")
    with Pusher(src.url) as p:
        img = p.push_image("team/app", "v1", [layer_bytes("img", 300)])
        sig = push_cosign(p, "team/app", img.digest, "sig")
        att = push_cosign(p, "team/app", img.digest, "att")
    engine = CopyEngine()
    async with client(src, "src") as s, client(dst, "dst") as d, client(bare, "bare") as b:
        result = await engine.copy(s, "team/app", "v1", d, "mirror/app")
        assert result.status == "copied", result.error
        plain = await engine.copy(
            s, "team/app", "v1", b, "team/app", options=CopyOptions(referrers=False)
        )
        assert plain.status == "copied"
    assert tags(dst.url, "mirror/app") == sorted(
        ["v1", cosign_tag(img.digest, "sig"), cosign_tag(img.digest, "att")]
    )
    assert assert_image_complete(dst.url, "mirror/app", cosign_tag(img.digest, "sig")) == sig
    assert assert_image_complete(dst.url, "mirror/app", cosign_tag(img.digest, "att")) == att
    assert tags(bare.url) == ["v1"]


async def test_copy_of_an_image_already_there_brings_a_signature_made_since(registry_factory):
    """The image is at the target already (skipped); cosign signed it at the source since:
    copying it again brings the new signature, and a re-signing replaces the old one."""
    src, dst = registry_factory("src"), registry_factory("dst")
    with Pusher(src.url) as p:
        img = p.push_image("team/app", "v1", [layer_bytes("signed-later", 300)])
    engine = CopyEngine()
    async with client(src, "src") as s, client(dst, "dst") as d:
        assert (await engine.copy(s, "team/app", "v1", d, "team/app")).status == "copied"
        with Pusher(src.url) as p:
            sig = push_cosign(p, "team/app", img.digest, "sig")
        again = await engine.copy(s, "team/app", "v1", d, "team/app")
        assert again.status == "skipped", again.error
        assert assert_image_complete(dst.url, "team/app", cosign_tag(img.digest, "sig")) == sig
        with Pusher(src.url) as p:
            resigned = push_cosign(p, "team/app", img.digest, "sig", seed="2")
        assert (await engine.copy(s, "team/app", "v1", d, "team/app")).status == "skipped"
    assert resigned != sig
    assert assert_image_complete(dst.url, "team/app", cosign_tag(img.digest, "sig")) == resigned


# ---- the daemon's event path -------------------------------------------------------------------


@pytest.fixture
def pair(registry_factory, tmp_path):
    port = free_port()
    a = registry_factory("a", **notify_kwargs(port, "a"))
    b = registry_factory("b", **notify_kwargs(port, "b"))
    daemon = DaemonProcess(
        tmp_path / "d",
        port=port,
        config={
            "sites": {"a": site_config(a), "b": site_config(b)},
            "rules": [
                {"name": "r", "from": "a", "to": ["b"], "deletes": True, "tags": {"semver": ">=1"}}
            ],
        },
    )
    yield a, b, daemon.start()
    daemon.stop()


def test_daemon_copies_cosign_tags_follows_a_re_signing_and_deletes_them_with_the_image(pair):
    a, b, daemon = pair
    with Pusher(a.url) as p:
        old = p.push_image("team/app", "0.5.0", [layer_bytes("old", 300)])  # not covered
        old_sig = cosign_tag(old.digest, "sig")
        push_cosign(p, "team/app", old.digest, "sig")
        img = p.push_image("team/app", "1.0.0", [layer_bytes("img", 300)])
        signed = sign_all(p, "team/app", img.digest)
    wait_until(lambda: tags(b.url) == sorted(["1.0.0", *signed]), timeout=30, what="signed image")
    # the signature of an image the rule does not copy waits for it, at a: not copied
    done = "SELECT COUNT(*) FROM tasks WHERE tag = ? AND state = 'done'"
    wait_until(lambda: daemon.journal_rows(done, (old_sig,))[0][0] == 1, timeout=30, what="task")
    assert old_sig not in tags(b.url)
    sig = cosign_tag(img.digest, "sig")
    with Pusher(a.url) as p:
        resigned = push_cosign(p, "team/app", img.digest, "sig", seed="2")
    wait_until(
        lambda: image_complete(b, "team/app", sig, resigned), timeout=30, what="re-signed at b"
    )
    # the image's only tag goes with the image; a keeps its cosign tags orphaned
    assert httpx.delete(f"{a.url}/v2/team/app/manifests/{img.digest}").status_code == 202
    wait_until(lambda: tags(b.url) == [], timeout=30, what="image and cosign tags gone at b")
    assert manifest_bytes(b.url, "team/app", img.digest) is None
    assert tags(a.url) == sorted(["0.5.0", old_sig, *signed])
    stones = daemon.journal_rows("SELECT tag FROM tombstones WHERE site = 'b' AND tag IS NOT NULL")
    assert set(signed) <= {row[0] for row in stones}


# ---- with and without the referrers API: the OCI referrers path is unchanged -------------------


@pytest.mark.parametrize("api", [False, True], ids=["distribution-2.8", "referrers-api"])
def test_cosign_tags_and_oci_referrers_travel_side_by_side(
    registry_factory, tmp_path: Path, api: bool
):
    src, dst = registry_factory("src"), registry_factory("dst")
    with Pusher(src.url) as p:
        img = p.push_image("team/app", "v1", [layer_bytes("img", 300)])
        referrer = p.push_referrer("team/app", img, b"an spdx sbom", "application/spdx+json")
        signed = sign_all(p, "team/app", img.digest)
    fallback = "sha256-" + img.digest.split(":", 1)[1]
    front = referrers_front(src) if api else None
    try:
        source = front if front is not None else src
        config = write_config(
            tmp_path, {"a": source, "b": dst}, [{"name": "r", "from": "a", "to": ["b"]}]
        )
        result = sync_json(config)
        assert result["_rc"] == 0 and result["failed"] == 0, result
        if front is not None:  # the source answered through its referrers API
            assert any("/referrers/" in s.path and s.status == 200 for s in front.seen)
    finally:
        if front is not None:
            front.stop()
    assert tags(dst.url) == sorted(["v1", fallback, *signed])
    assert assert_image_complete(dst.url, "team/app", referrer.digest) == referrer.digest
    for tag in [fallback, *signed]:
        assert manifest_bytes(dst.url, "team/app", tag) == manifest_bytes(src.url, "team/app", tag)


def test_cli_copy_brings_the_cosign_tags_and_no_referrers_leaves_them(registry_factory):
    src, dst = registry_factory("src"), registry_factory("dst")
    with Pusher(src.url) as p:
        img = p.push_image("team/app", "v1", [layer_bytes("cli", 300)])
        signed = sign_all(p, "team/app", img.digest)
    ref = f"{src.host}/team/app:v1"
    out = cli("copy", "--insecure", "--json", ref, f"{dst.host}/mirror/app")
    assert out.returncode == 0, out.stderr
    assert tags(dst.url, "mirror/app") == sorted(["v1", *signed])
    for tag, digest in signed.items():
        assert assert_image_complete(dst.url, "mirror/app", tag) == digest
    out = cli("copy", "--insecure", "--no-referrers", ref, f"{dst.host}/plain/app")
    assert out.returncode == 0, out.stderr
    assert tags(dst.url, "plain/app") == ["v1"]
