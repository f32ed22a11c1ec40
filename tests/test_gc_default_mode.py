"""A policy without `mode` follows the site's configuration: a site with `storage:`
gets both passes (its storage is reclaimed), one without gets the API pass."""

from __future__ import annotations

import asyncio
import json
import time

import yaml

from replicator.cli import main
from replicator.events import RegistryEvent
from replicator.journal import Journal
from tests.harness.images import Pusher, assert_image_complete, layer_bytes
from tests.test_gc_cli import age, write_config


def without_mode(path: str, *, storage: bool) -> str:
    cfg = yaml.safe_load(open(path).read())
    del cfg["gc"]["policies"][0]["mode"]
    if not storage:
        for key in ("storage", "registry_config"):
            cfg["sites"]["a"].pop(key)
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def test_default_mode_reclaims_storage_where_storage_is_configured(registry, tmp_path, capsys):
    reg = registry
    with Pusher(reg.url) as p:
        p.push_image("app", "v1", [layer_bytes("keep", 500)])
        dev = p.push_image("app", "dev", [layer_bytes("dev", 600)])
    age(reg.storage, 7200)
    cfg = without_mode(write_config(tmp_path, reg), storage=True)
    assert main(["gc", "-c", cfg, "--json", "--quarantine-window", "0s"]) == 0
    out = json.loads(capsys.readouterr().out)
    site = out["sites"]["a"]
    assert site["api"] is not None and site["storage"] is not None
    assert not reg.has_blob_data(dev.blobs[1])  # the bytes left the disk
    assert_image_complete(reg.url, "app", "v1")


def journal_pushes(path, pushed: dict[str, str], age: float) -> None:
    """The registry's webhooks for these pushes, `age` seconds ago, as the daemon journals
    them: without `storage:` they are the only way GC can know a tag's age."""
    journal = Journal(path)
    events = [
        RegistryEvent(
            id=f"push-{tag}",
            site="a",
            action="push",
            repository="app",
            tag=tag,
            digest=digest,
            occurred_at=time.time() - age,
            is_manifest=True,
        )
        for tag, digest in pushed.items()
    ]
    asyncio.run(journal.events.record(events))
    journal.close()


def test_default_mode_is_the_api_pass_without_storage(registry, tmp_path, capsys):
    reg = registry
    with Pusher(reg.url) as p:
        v1 = p.push_image("app", "v1", [layer_bytes("keep", 500)])
        dev = p.push_image("app", "dev", [layer_bytes("dev", 600)])
    age(reg.storage, 7200)
    cfg = without_mode(write_config(tmp_path, reg), storage=False)
    journal_pushes(tmp_path / "journal.db", {"v1": v1.digest, "dev": dev.digest}, 7200)
    assert main(["gc", "-c", cfg, "--json"]) == 0
    site = json.loads(capsys.readouterr().out)["sites"]["a"]
    assert site["api"] is not None and site["storage"] is None
    assert site["manifests_deleted"] == 1
