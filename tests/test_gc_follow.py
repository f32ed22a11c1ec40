"""follow_source and the operator's view of a GC run (`gc --dry-run [--json]`), end to end
through the CLI on real registries."""

from __future__ import annotations

import json
import os
import time

import pytest
import yaml

from replicator.cli import main
from replicator.config import config_from_dict
from replicator.errors import ConfigError
from tests.harness.images import Pusher, assert_image_complete, layer_bytes

HOUR = 3600.0


def age_tree(path, seconds: float) -> None:
    t = time.time() - seconds
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            os.utime(os.path.join(dirpath, name), (t, t))


def config(tmp_path, src, replica, policy: dict) -> dict:
    return {
        "journal": str(tmp_path / "journal.db"),
        "sites": {
            "a": {"url": src.url, "insecure": True},
            "b": {
                "url": replica.url,
                "insecure": True,
                "storage": str(replica.storage),
                "registry_config": str(replica.config_path),
            },
        },
        "rules": [{"name": "r", "from": "a", "to": ["b"], "tags": {"include": ["v*"]}}],
        "gc": {"policies": [{"name": "replica", "sites": ["b"], **policy}]},
    }


def write(tmp_path, cfg: dict) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def gc_json(cfg: str, capsys, *extra: str) -> dict:
    assert main(["gc", "-c", cfg, "--json", *extra]) in (0, 1)
    return json.loads(capsys.readouterr().out)


def keys(out: dict) -> list[tuple]:
    return sorted((i["site"], i["kind"], i.get("tag") or i["digest"]) for i in out["items"])


@pytest.mark.parametrize("mode", ["api", "both"])
def test_follow_source_keeps_what_the_source_holds_and_follows_its_deletes(
    two_registries, tmp_path, capsys, mode
) -> None:
    src, replica = two_registries
    with Pusher(src.url) as p:
        for tag in ("v1", "v2"):
            p.push_image("app", tag, [layer_bytes(tag, 200)])
    with Pusher(replica.url) as p:
        for tag in ("v0", "v1", "v2", "local"):  # v0: the source's retention removed it
            p.push_image("app", tag, [layer_bytes(tag, 200)])
    age_tree(replica.storage, 2 * HOUR)
    policy = {"follow_source": True, "untagged": "delete", "grace": "1h", "mode": mode}
    cfg = write(tmp_path, config(tmp_path, src, replica, policy))

    dry = gc_json(cfg, capsys, "--dry-run", "--quarantine-window", "0s", "--settle")
    real = gc_json(cfg, capsys, "--quarantine-window", "0s", "--settle")
    assert real["errors"] == []
    assert keys(dry) == keys(real)
    by_tag = {i["tags"][0]: i["clause"] for i in real["items"] if i["kind"] == "manifest"}
    assert by_tag == {
        "v0": "all its tags expired: v0 (gone from the source a/app)",
        "local": "all its tags expired: local",
    }
    assert real["kept"] == {"held by the source (follow_source)": 2}
    for tag in ("v1", "v2"):
        assert_image_complete(replica.url, "app", tag)
    assert_image_complete(src.url, "app", "v1")


def test_follow_source_needs_a_site_some_rule_replicates_to(two_registries, tmp_path) -> None:
    src, replica = two_registries
    cfg = config(tmp_path, src, replica, {"follow_source": True})
    cfg["gc"]["policies"][0]["sites"] = ["a"]
    with pytest.raises(ConfigError) as err:
        config_from_dict(cfg)
    assert "gc.policies[0].follow_source" in str(err.value)
    assert "no rule's target" in str(err.value)


def test_dry_run_says_why_nothing_would_be_deleted(two_registries, tmp_path, capsys) -> None:
    src, replica = two_registries
    with Pusher(replica.url) as p:
        for n in range(4):
            p.push_image("app", f"t{n}", [layer_bytes(f"t{n}", 100)])
    age_tree(replica.storage, 2 * HOUR)
    with Pusher(replica.url) as p:
        p.push_image("app", "fresh", [layer_bytes("fresh", 100)])
    policy = {"keep": {"most_recent": 5}, "grace": "1h", "mode": "both"}
    cfg = write(tmp_path, config(tmp_path, src, replica, policy))
    assert main(["gc", "-c", cfg, "--dry-run", "--quarantine-window", "0s"]) == 0
    out = capsys.readouterr().out
    assert "gc: nothing would be deleted: 5 tags kept" in out
    assert "4 kept by most_recent" in out and "1 younger than grace" in out


def test_follow_source_during_a_failover_follows_the_promoted_site(
    registry_factory, tmp_path, capsys
) -> None:
    """Rule a -> [b, c], a lost and c promoted: b follows c, and a is never asked."""
    import asyncio

    from replicator.journal import Journal

    lost, replica, promoted = (registry_factory(n) for n in ("a", "b", "c"))
    with Pusher(promoted.url) as p:
        p.push_image("app", "v1", [layer_bytes("v1", 200)])
    with Pusher(replica.url) as p:
        for tag in ("v1", "v2"):  # v2 was deleted at c during the incident
            p.push_image("app", tag, [layer_bytes(tag, 200)])
    age_tree(replica.storage, 2 * HOUR)
    lost.stop()
    cfg = config(tmp_path, lost, replica, {"follow_source": True, "grace": "1h"})
    cfg["sites"]["c"] = {"url": promoted.url, "insecure": True}
    cfg["rules"][0]["to"] = ["b", "c"]
    journal = Journal(cfg["journal"])
    asyncio.run(journal.failovers.record("a", "c", {}))
    journal.close()
    out = gc_json(write(tmp_path, cfg), capsys)
    assert out["errors"] == []
    manifests = [i for i in out["items"] if i["kind"] == "manifest"]
    assert [(i["tags"], i["clause"]) for i in manifests] == [
        (["v2"], "all its tags expired: v2 (gone from the source c/app)")
    ]
    assert out["kept"] == {"held by the source (follow_source)": 1}
    assert_image_complete(replica.url, "app", "v1")
