"""`verify` against real registries: drift kinds, --deep, exit codes, request budget, daemon."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import yaml

from tests.harness.daemon import DaemonProcess
from tests.harness.images import Pusher, layer_bytes
from tests.harness.registry import Registry
from tests.harness.util import free_port, wait_until


def write_config(tmp_path: Path, urls: dict[str, str], rules: list[dict], **extra) -> Path:
    cfg = {
        "journal": str(tmp_path / "journal.db"),
        "sites": {name: {"url": url, "insecure": True} for name, url in urls.items()},
        "rules": rules,
        **extra,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def verify(config: Path, *extra: str) -> tuple[int, dict, str]:
    out = subprocess.run(
        [sys.executable, "-m", "replicator", "verify", "-c", str(config), "--json", *extra],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode in (0, 1, 2), out.stderr
    return out.returncode, json.loads(out.stdout), out.stderr


def push(p: Pusher, repo: str, tag: str, seed: str | None = None):
    """An image of its own per tag (same bytes, same digest, wherever it is pushed)."""
    return p.push_image(repo, tag, [layer_bytes(seed or f"{repo}:{tag}", 300)])


def seed_both(src: Registry, dst: Registry, images: dict[str, list[str]], prefix: str = "") -> None:
    with Pusher(src.url) as s, Pusher(dst.url) as d:
        for repo, tags in images.items():
            for tag in tags:
                push(s, repo, tag)
                push(d, prefix + repo, tag, seed=f"{repo}:{tag}")


def kinds(report: dict) -> set[tuple[str, str, str]]:
    return {(d["kind"], d["target_repository"], d["tag"]) for d in report["drift"]}


def delete_manifest(reg: Registry, repo: str, digest: str) -> None:
    r = httpx.delete(f"{reg.url}/v2/{repo}/manifests/{digest}")
    assert r.status_code == 202, r.text


def test_in_sync_replicas_with_a_rename_exit_0(two_registries, tmp_path):
    src, dst = two_registries
    seed_both(src, dst, {"team/api": ["v1", "v2", "dev"], "team/web": ["v1"]}, prefix="mirror/")
    config = write_config(
        tmp_path,
        {"us": src.url, "eu": dst.url},
        [
            {
                "name": "apps",
                "from": "us",
                "to": ["eu"],
                "repositories": ["team/**"],
                "tags": {"include": ["v*"]},
                "rename": {"strip_prefix": "", "prefix": "mirror/"},
                "deletes": True,
            }
        ],
    )
    rc, report, _ = verify(config)
    assert rc == 0, report
    assert report["in_sync"] is True and report["drift"] == []
    assert report["targets"] == [
        {
            "rule": "apps",
            "target": "eu",
            "checked": 3,  # dev is not covered; its absence is no drift
            "drift": {"missing": 0, "different": 0, "extra": 0, "incomplete": 0},
        }
    ]


def test_missing_different_and_extra_are_reported_and_exit_1(registry_factory, tmp_path):
    src, eu, ap = registry_factory("src"), registry_factory("eu"), registry_factory("ap")
    images = {"team/api": ["v1", "v2", "v3"]}
    seed_both(src, eu, images)
    seed_both(src, ap, images)
    with Pusher(eu.url) as e, Pusher(ap.url) as a:
        gone = push(e, "team/api", "v1")
        delete_manifest(eu, "team/api", gone.digest)  # missing at eu
        push(e, "team/api", "v2", seed="elsewhere")  # different at eu
        push(e, "team/api", "v9")  # only at eu: extra (deletes propagate to eu)
        push(a, "team/api", "v9")  # only at ap: not extra (rule "keep" has no deletes)
    config = write_config(
        tmp_path,
        {"us": src.url, "eu": eu.url, "ap": ap.url},
        [
            {"name": "mirror", "from": "us", "to": ["eu"], "deletes": True},
            {"name": "keep", "from": "us", "to": ["ap"]},
        ],
    )
    rc, report, _ = verify(config)
    assert rc == 1
    assert kinds(report) == {
        ("missing", "team/api", "v1"),
        ("different", "team/api", "v2"),
        ("extra", "team/api", "v9"),
    }
    different = next(d for d in report["drift"] if d["kind"] == "different")
    with Pusher(src.url) as s:
        assert (
            different["source_digest"]
            == s.get_manifest("team/api", "v2").headers["docker-content-digest"]
        )
    assert different["target_digest"] != different["source_digest"]
    by_target = {t["target"]: t["drift"] for t in report["targets"]}
    assert by_target["eu"] == {"missing": 1, "different": 1, "extra": 1, "incomplete": 0}
    assert by_target["ap"] == {"missing": 0, "different": 0, "extra": 0, "incomplete": 0}

    rc, report, _ = verify(config, "--rule", "keep")
    assert rc == 0 and [t["target"] for t in report["targets"]] == ["ap"]

    human = subprocess.run(
        [sys.executable, "-m", "replicator", "verify", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert human.returncode == 1
    lines = human.stdout.splitlines()
    assert lines[0] == "keep -> ap: 3 tags checked, in sync"
    assert lines[1] == "mirror -> eu: 3 tags checked, drift: 1 missing, 1 different, 1 extra"
    assert any(line.startswith("missing    eu/team/api:v1") for line in lines)


def test_deep_finds_a_blob_gone_from_the_target_storage(two_registries, tmp_path):
    src, dst = two_registries
    with Pusher(src.url) as s, Pusher(dst.url) as d:
        for p in (s, d):
            push(p, "app", "v1")
            p.push_multiarch("app", "multi", seed="m")
        layer = d.push_image("app", "v1", [layer_bytes("app:v1", 300)]).blobs[1]
        arm_layer = digest_of_layer("m-arm64")
    config = write_config(
        tmp_path, {"us": src.url, "eu": dst.url}, [{"name": "r", "from": "us", "to": ["eu"]}]
    )
    assert verify(config, "--deep")[0] == 0
    dst.blob_path(layer).unlink()
    dst.blob_path(arm_layer).unlink()

    rc, report, _ = verify(config)
    assert rc == 0, "plain verify compares digests only"
    rc, report, _ = verify(config, "--deep")
    assert rc == 1
    assert {(d["kind"], d["tag"], d["blob"]) for d in report["drift"]} == {
        ("incomplete", "v1", layer),
        ("incomplete", "multi", arm_layer),  # found through the index's child
    }
    assert report["targets"][0]["drift"]["incomplete"] == 2


def digest_of_layer(seed: str) -> str:
    from tests.harness.images import digest_of

    return digest_of(layer_bytes(seed, 2048))


def test_at_most_one_request_per_tag_per_site(two_registries, proxy_factory, tmp_path):
    src, dst = two_registries
    tags = [f"v{i}" for i in range(12)]
    seed_both(src, dst, {"app": tags})
    with Pusher(dst.url) as d:
        delete_manifest(dst, "app", push(d, "app", "v0").digest)  # missing: no HEAD needed
    src_proxy, dst_proxy = proxy_factory(src), proxy_factory(dst)
    config = write_config(
        tmp_path,
        {"us": src_proxy.url, "eu": dst_proxy.url},
        [{"name": "r", "from": "us", "to": ["eu"], "deletes": True}],
    )
    rc, report, _ = verify(config)
    assert rc == 1 and kinds(report) == {("missing", "app", "v0")}
    for proxy in (src_proxy, dst_proxy):
        for tag in tags:
            assert proxy.count(path=rf"/manifests/{tag}$") <= 1, (proxy, tag)
        # besides the per-tag HEADs: /v2/ once, the catalog (source), one tag listing
        per_tag = proxy.count(path=r"/manifests/")
        assert proxy.count() - per_tag <= 3, [r.path for r in proxy.records]
    assert src_proxy.count(path=r"/manifests/") == len(tags)
    assert dst_proxy.count(path=r"/manifests/") == len(tags) - 1


def test_an_unreachable_target_is_named_and_exits_2(registry, tmp_path):
    seed_both(registry, registry, {"app": ["v1"]})
    dead = f"http://127.0.0.1:{free_port()}"
    config = write_config(
        tmp_path, {"us": registry.url, "gone": dead}, [{"name": "r", "from": "us", "to": ["gone"]}]
    )
    rc, report, stderr = verify(config, "--retries", "0")
    assert rc == 2
    assert report["in_sync"] is False
    assert any("cannot verify site gone" in e for e in report["errors"])
    assert "cannot verify site gone" in stderr


def _gauge(text: str, **labels: str) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    m = re.search(rf"^registry_replicator_drift_tags\{{{re.escape(want)}\}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def test_the_daemon_verifies_on_its_schedule_and_exports_the_drift(
    two_registries, daemons, tmp_path
):
    src, dst = two_registries
    seed_both(src, dst, {"app": ["v1", "v2"]})
    daemon = DaemonProcess(
        tmp_path / "daemon",
        {
            "sites": {
                "us": {"url": src.url, "insecure": True},
                "eu": {"url": dst.url, "insecure": True},
            },
            "rules": [{"name": "r", "from": "us", "to": ["eu"]}],
            # every 2 seconds (croniter's optional sixth field), and once at start
            "verify": {"schedule": "* * * * * */2"},
        },
    )
    daemons.append(daemon.start())

    def last_success() -> float:
        m = re.search(
            r"^registry_replicator_verify_last_success_timestamp_seconds (\S+)$",
            daemon.metrics(),
            re.M,
        )
        return float(m.group(1)) if m else 0.0

    wait_until(lambda: last_success() > 0, timeout=20, what="the first verify")
    text = daemon.metrics()
    for kind in ("missing", "different", "extra", "incomplete"):
        assert _gauge(text, rule="r", target="eu", kind=kind) == 0.0

    with Pusher(dst.url) as d:
        delete_manifest(dst, "app", push(d, "app", "v2").digest)
    wait_until(
        lambda: _gauge(daemon.metrics(), rule="r", target="eu", kind="missing") == 1.0,
        timeout=20,
        what="the scheduled verify to see the missing tag",
    )
    assert "verify: r -> eu: 2 tags checked, drift: 1 missing" in daemon.log()


def test_a_platform_filtered_replica_made_by_sync_is_in_sync(
    two_registries, proxy_factory, tmp_path
):
    """The filtered index at the target has its own digest; verify knows the one sync writes
    (a GET at the source instead of the HEAD: still one request per tag)."""
    src, dst = two_registries
    with Pusher(src.url) as s:
        s.push_multiarch("app", "multi", seed="p")
        push(s, "app", "single")
    src_proxy = proxy_factory(src)
    rules = [{"name": "r", "from": "us", "to": ["eu"], "platforms": ["linux/amd64"]}]
    config = write_config(tmp_path, {"us": src_proxy.url, "eu": dst.url}, rules)
    synced = subprocess.run(
        [sys.executable, "-m", "replicator", "sync", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert synced.returncode == 0, synced.stderr
    src_proxy.reset_counts()
    rc, report, _ = verify(config, "--deep")
    assert rc == 0, report
    assert report["targets"][0]["checked"] == 2
    for tag in ("multi", "single"):
        assert src_proxy.count(path=rf"/manifests/{tag}$") == 1
    with Pusher(dst.url) as d:
        d.push_multiarch("app", "multi", seed="other")  # another image under the tag
    rc, report, _ = verify(config)
    assert rc == 1 and kinds(report) == {("different", "app", "multi")}
