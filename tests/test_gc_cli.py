"""`registry-replicator gc` end to end: config, both modes, --dry-run, --json, refusal."""

from __future__ import annotations

import json
import os
import time

import yaml

from replicator.cli import main
from tests.harness.images import Pusher, assert_image_complete, layer_bytes


def write_config(tmp_path, reg, mode: str = "both", **site_extra) -> str:
    cfg = {
        "journal": str(tmp_path / "journal.db"),
        "sites": {
            "a": {
                "url": reg.url,
                "insecure": True,
                "storage": str(reg.storage),
                "registry_config": str(reg.config_path),
                **site_extra,
            }
        },
        "gc": {
            "policies": [
                {
                    "name": "keep-v",
                    "sites": ["a"],
                    "repositories": ["app"],
                    "keep": {"tags": ["v*"]},
                    "untagged": "delete",
                    "grace": "1m",
                    "mode": mode,
                }
            ]
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def age(path, seconds: float) -> None:
    t = time.time() - seconds
    for dirpath, _d, files in os.walk(path):
        for f in files:
            os.utime(os.path.join(dirpath, f), (t, t))


def test_gc_command_dry_run_then_real(registry, tmp_path, capsys) -> None:
    reg = registry
    with Pusher(reg.url) as p:
        p.push_image("app", "v1", [layer_bytes("v1", 500)])
        dev = p.push_image("app", "dev", [layer_bytes("dev", 600)])
    age(reg.storage, 7200)
    cfg = write_config(tmp_path, reg)
    before = reg.all_blob_digests()
    assert main(["gc", "-c", cfg, "--dry-run", "--json", "--quarantine-window", "0s"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert reg.all_blob_digests() == before
    assert dry["dry_run"] is True and dry["manifests_deleted"] == 1
    assert set(dry) >= {
        "dry_run",
        "manifests_deleted",
        "blobs_deleted",
        "bytes_reclaimed",
        "quarantined",
        "restored",
        "errors",
    }
    assert main(["gc", "-c", cfg, "--json", "--quarantine-window", "0s"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["errors"] == [] and out["manifests_deleted"] == 1
    # the API pass deletes the manifest; the storage pass reclaims its bytes
    assert out["blobs_deleted"] >= 3 and out["bytes_reclaimed"] > 600
    assert not reg.has_blob_data(dev.blobs[1]) and not reg.has_blob_data(dev.digest)
    assert_image_complete(reg.url, "app", "v1")


def test_gc_command_refuses_blob_descriptor_cache(registry_factory, tmp_path, capsys) -> None:
    reg = registry_factory(
        "cached", extra_config={"storage": {"cache": {"blobdescriptor": "inmemory"}}}
    )
    with Pusher(reg.url) as p:
        p.push_image("app", "v1", [b"x"])
    cfg = write_config(tmp_path, reg, mode="storage")
    assert main(["gc", "-c", cfg]) == 2
    assert "blobdescriptor" in capsys.readouterr().err
    assert main(["gc", "-c", cfg, "--assume-no-cache", "--quarantine-window", "0s"]) == 0


def test_gc_command_names_missing_storage_and_unknown_policy(registry, tmp_path, capsys) -> None:
    cfg = write_config(tmp_path, registry, mode="storage")
    data = yaml.safe_load(open(cfg))
    del data["sites"]["a"]["storage"]
    open(cfg, "w").write(yaml.safe_dump(data))
    with Pusher(registry.url) as p:
        p.push_image("app", "v1", [b"x"])
    assert main(["gc", "-c", cfg]) == 2
    assert "sites.a.storage" in capsys.readouterr().err
    cfg = write_config(tmp_path, registry)
    assert main(["gc", "-c", cfg, "--policy", "nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_gc_command_lists_what_a_real_run_deleted(registry, tmp_path, capsys) -> None:
    """Without --json, the real run lists its deletions item by item as the dry run
    lists its plan: the same lines, 'deleted' for 'would delete'."""
    reg = registry
    with Pusher(reg.url) as p:
        p.push_image("app", "v1", [layer_bytes("cli-v1", 500)])
        dev = p.push_image("app", "dev", [layer_bytes("cli-dev", 600)])
    age(reg.storage, 7200)
    cfg = write_config(tmp_path, reg, mode="api")
    assert main(["gc", "-c", cfg, "--dry-run"]) == 0
    planned = [
        line.removeprefix("  would delete ")
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("  would delete ")
    ]
    assert any(f"app@{dev.digest}" in line for line in planned), planned
    assert main(["gc", "-c", cfg]) == 0
    out = capsys.readouterr().out
    done = [
        line.removeprefix("  deleted ")
        for line in out.splitlines()
        if line.startswith("  deleted ")
    ]
    assert done == planned, out
