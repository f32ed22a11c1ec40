"""Storage GC's quarantine as journaled state across runs, not a foreground sleep.

A run quarantines, says when the items become deletable, and exits; a later run
re-checks and deletes them (or restores what became referenced); `--settle` waits in
the foreground. While items wait, no run plans anything new.
"""

from __future__ import annotations

import json
import time

from replicator.cli import main
from replicator.journal import Journal
from tests.harness.images import Pusher, assert_image_complete, layer_bytes
from tests.harness.util import wait_until
from tests.test_gc_cli import age, write_config


def gc(capsys, cfg: str, *args: str) -> dict:
    assert main(["gc", "-c", cfg, "--json", *args]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def storage_run_states(tmp_path) -> list[str]:
    import asyncio

    async def read() -> list[str]:
        journal = Journal(tmp_path / "journal.db")
        try:
            rows = await journal.gc_runs.unfinished("a", "storage")
            return [r["state"] for r in rows]
        finally:
            journal.close()

    return asyncio.run(read())


def test_a_run_quarantines_and_exits_then_a_later_run_deletes(registry, tmp_path, capsys):
    reg = registry
    with Pusher(reg.url) as p:
        p.push_image("app", "v1", [layer_bytes("keep", 500)])
        dev = p.push_image("app", "dev", [layer_bytes("dev", 600)])
    age(reg.storage, 7200)
    cfg = write_config(tmp_path, reg, mode="storage")

    # A window far longer than this test: the run must not wait for it.
    started = time.monotonic()
    assert main(["gc", "-c", cfg, "--quarantine-window", "1h"]) == 0
    took = time.monotonic() - started
    out = capsys.readouterr().out
    assert took < 60, f"gc waited {took:.0f}s in the foreground"
    assert "deletable after" in out and "safe to interrupt" in out, out
    assert not reg.has_blob_data(dev.blobs[1])  # moved aside, invisible to the registry
    assert storage_run_states(tmp_path) == ["quarantined"]
    assert_image_complete(reg.url, "app", "v1")

    # Something new to collect appears meanwhile; nothing new is planned while the
    # earlier run's items wait, and nothing is deleted before its time.
    with Pusher(reg.url) as p:
        p.push_blob("app", layer_bytes("orphan", 700))
    age(reg.storage, 7200)
    early = gc(capsys, cfg, "--quarantine-window", "1h")
    assert early["quarantined"] == 0 and early["blobs_deleted"] == 0
    assert early["waiting"] > 0 and early["deletable_after"] > time.time() + 3000
    dry = gc(capsys, cfg, "--dry-run", "--quarantine-window", "1h")
    assert dry["blobs_deleted"] == 0 and dry["waiting"] == early["waiting"]
    assert storage_run_states(tmp_path) == ["quarantined"]


def test_the_next_run_after_the_window_deletes_and_restores_what_came_back(
    registry, tmp_path, capsys
):
    reg = registry
    reused = layer_bytes("reused", 800)
    with Pusher(reg.url) as p:
        p.push_image("app", "v1", [layer_bytes("keep", 500)])
        dev = p.push_image("app", "dev", [layer_bytes("dev", 600), reused])
    age(reg.storage, 7200)
    cfg = write_config(tmp_path, reg, mode="storage")  # the policy drops dev
    first = gc(capsys, cfg, "--quarantine-window", "1s")
    assert first["quarantined"] > 0 and first["blobs_deleted"] == 0
    deletable_after = first["deletable_after"]
    assert not reg.has_blob_data(dev.blobs[2])

    # A client pushes an image that uses one quarantined layer again (it re-uploads
    # it: the registry does not see the quarantined copy).
    with Pusher(reg.url) as p:
        again = p.push_image("app", "v2", [reused])
    wait_until(lambda: time.time() >= deletable_after, timeout=10, what="the window to pass")

    second = gc(capsys, cfg, "--quarantine-window", "1s")
    assert second["errors"] == []
    assert second["blobs_deleted"] >= 2 and second["waiting"] == 0
    assert not reg.has_blob_data(dev.blobs[1]) and not reg.has_blob_data(dev.digest)
    assert_image_complete(reg.url, "app", "v2")  # the re-pushed layer kept its new copy
    assert_image_complete(reg.url, "app", "v1")
    assert again.blobs[1] == dev.blobs[2]
    assert storage_run_states(tmp_path) in ([], ["quarantined"])


def test_settle_waits_in_the_foreground_and_deletes_in_one_run(registry, tmp_path, capsys):
    reg = registry
    with Pusher(reg.url) as p:
        p.push_image("app", "v1", [layer_bytes("keep", 500)])
        dev = p.push_image("app", "dev", [layer_bytes("dev", 600)])
    age(reg.storage, 7200)
    cfg = write_config(tmp_path, reg, mode="storage")
    out = gc(capsys, cfg, "--settle", "--quarantine-window", "1s")
    assert out["blobs_deleted"] >= 2 and out["waiting"] == 0 and out["deletable_after"] is None
    assert not reg.has_blob_data(dev.blobs[1])
    assert storage_run_states(tmp_path) == []


def test_without_a_journal_nothing_is_left_waiting(registry, tmp_path):
    """A library caller without a journal cannot have a later run find the quarantine:
    the run settles it itself rather than leave items nobody will ever settle."""
    import asyncio

    from replicator.gc.policy import KeepRules, RetentionPolicy
    from replicator.gc.storage import StorageGCOptions, collect_storage

    reg = registry
    with Pusher(reg.url) as p:
        p.push_image("app", "v1", [layer_bytes("keep", 500)])
        dev = p.push_image("app", "dev", [layer_bytes("dev", 600)])
    age(reg.storage, 7200)
    policy = RetentionPolicy(name="p", keep=KeepRules(tags=("v*",)), untagged="delete", grace=60)
    res = asyncio.run(
        collect_storage(
            reg.storage,
            None,
            StorageGCOptions(
                grace=60,
                quarantine_window=0.5,
                settle=False,
                registry_config=reg.config_path,
                policies=[policy],
            ),
        )
    )
    assert res.waiting == 0 and res.blobs_deleted >= 2
    assert not reg.has_blob_data(dev.blobs[1])
    assert_image_complete(reg.url, "app", "v1")
