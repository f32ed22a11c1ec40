"""Storage GC never follows a symbolic link: nothing outside the store is renamed or
removed, and every link met is reported in the run's errors with its path.

The GC runs as the test user: the "victims" outside the store are files the test owns,
which is all it takes to show a sweep reaching through a link."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from replicator.errors import ConfigError
from replicator.gc.confined import ConfinedFS, UnsafeEntry
from replicator.gc.storage import StorageCollector, collect_storage_sync
from replicator.journal import Journal
from tests.harness.images import Pusher, assert_image_complete, layer_bytes
from tests.harness.journal import sql
from tests.test_gc_storage import age_tree, delete_manifest, opts, start_stale_upload

V2 = "docker/registry/v2"


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` (links not followed) with its bytes."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            out[p] = b"<link>" if os.path.islink(p) else Path(p).read_bytes()
    return out


def victim(path: Path, content: bytes = b"precious, not the registry's") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    t = time.time() - 7200  # as old as the garbage: old enough to be swept
    os.utime(path, (t, t))
    return path


def reported(res, path: Path) -> bool:
    return any(str(path) in e and "symbolic link" in e for e in res.errors)


@pytest.fixture
def store(registry, tmp_path):
    """A kept image, a deleted one (its blobs are garbage), a stale upload; all aged."""
    reg = registry
    with Pusher(reg.url) as p:
        kept = p.push_image("app", "v1", [layer_bytes("kept", 900)])
        gone = p.push_image("app", "old", [layer_bytes("gone-a", 700), layer_bytes("gone-b", 800)])
        delete_manifest(reg, "app", gone.digest)
        start_stale_upload(reg, "app", b"half an upload")
    age_tree(reg.storage, 7200)
    outside = tmp_path / "outside"
    outside.mkdir()
    return {
        "reg": reg,
        "v2": reg.storage / V2,
        "kept": kept,
        "gone": gone,
        "garbage": {gone.digest, *gone.blobs},
        "outside": outside,
    }


def unused_prefix(v2: Path) -> str:
    used = {p.name for p in (v2 / "blobs/sha256").iterdir()}
    return next(f"{n:02x}" for n in range(256) if f"{n:02x}" not in used)


def test_symlinked_repository_dir_is_reported_and_nothing_behind_it_is_touched(store) -> None:
    reg, v2, outside = store["reg"], store["v2"], store["outside"]
    evil = outside / "evil"
    missing = "ab" * 32  # a layer link to a blob that does not exist: a sweep removes such links
    victim(evil / "_layers/sha256" / missing / "link", f"sha256:{missing}".encode())
    victim(evil / "_uploads/stale/data")  # an "abandoned upload"
    victim(evil / "_manifests/revisions/sha256" / ("cd" * 32) / "link", b"sha256:" + b"cd" * 32)
    os.symlink(evil, v2 / "repositories/evil")
    before = snapshot(outside)

    res = collect_storage_sync(reg.storage, None, opts(reg))

    assert snapshot(outside) == before
    assert (v2 / "repositories/evil").is_symlink()
    assert reported(res, v2 / "repositories/evil"), res.errors
    # what is behind the link may reference any blob: none is collected, and the run says so
    assert res.deleted_blobs == set() and all(reg.has_blob_data(d) for d in store["garbage"])
    assert any("no blob, layer link, tag or manifest was collected" in e for e in res.errors)
    assert res.uploads_deleted == 1  # the store's own stale upload: not a reference
    assert_image_complete(reg.url, "app", "v1")

    os.unlink(v2 / "repositories/evil")  # the operator removes the link: collection resumes
    again = collect_storage_sync(reg.storage, None, opts(reg))
    assert again.errors == [] and again.deleted_blobs == store["garbage"]
    assert snapshot(outside) == before


@pytest.mark.parametrize("where", ["prefix", "blob-dir", "data"])
def test_symlink_on_the_blob_side_is_reported_and_pins_only_that_blob(store, where) -> None:
    reg, v2, outside = store["reg"], store["v2"], store["outside"]
    if where == "prefix":  # blobs/sha256/<xx> -> outside
        xx = unused_prefix(v2)
        victim(outside / xx / (xx + "e" * 62) / "data")
        link = v2 / "blobs/sha256" / xx
        os.symlink(outside / xx, link)
    elif where == "blob-dir":  # blobs/sha256/<xx>/<hex> -> outside
        hexd = unused_prefix(v2) + "f" * 62
        victim(outside / "blobdir/data")
        link = v2 / "blobs/sha256" / hexd[:2] / hexd
        link.parent.mkdir()
        os.symlink(outside / "blobdir", link)
    else:  # blobs/sha256/<xx>/<hex>/data -> outside
        hexd = unused_prefix(v2) + "0" * 62
        victim(outside / "victim")
        link = v2 / "blobs/sha256" / hexd[:2] / hexd / "data"
        link.parent.mkdir(parents=True)
        os.symlink(outside / "victim", link)
    before = snapshot(outside)

    res = collect_storage_sync(reg.storage, None, opts(reg))

    assert snapshot(outside) == before
    assert link.is_symlink()
    assert reported(res, link), res.errors
    # a link on the blob side hides no reference: the real garbage still goes
    assert res.deleted_blobs == store["garbage"]
    assert all(str(link) in e for e in res.errors), res.errors
    assert_image_complete(reg.url, "app", "v1")


@pytest.mark.parametrize("where", ["link-file", "link-dir"])
def test_symlinked_layer_link_is_reported_and_its_blob_kept(store, where) -> None:
    reg, v2, outside = store["reg"], store["v2"], store["outside"]
    layer = store["gone"].blobs[1]
    hexd = layer.split(":")[1]
    link_dir = v2 / "repositories/app/_layers/sha256" / hexd
    if where == "link-file":  # _layers/sha256/<hex>/link -> outside
        victim(outside / "link", layer.encode())
        link = link_dir / "link"
        link.unlink()
        os.symlink(outside / "link", link)
    else:  # _layers/sha256/<hex> -> outside
        victim(outside / "linkdir/link", layer.encode())
        link = link_dir
        shutil.rmtree(link_dir)
        os.symlink(outside / "linkdir", link)
    before = snapshot(outside)

    res = collect_storage_sync(reg.storage, None, opts(reg))

    assert snapshot(outside) == before
    assert link.is_symlink()
    assert reported(res, link), res.errors
    # the registry sees the blob linked through that link: it stays, the rest goes
    assert reg.has_blob_data(layer)
    assert res.deleted_blobs == store["garbage"] - {layer}


def test_upload_session_holding_a_symlink_is_reported_and_kept(store) -> None:
    reg, v2, outside = store["reg"], store["v2"], store["outside"]
    uploads = v2 / "repositories/app/_uploads"
    (session,) = list(uploads.iterdir())  # the stale one
    victim(outside / "upload-data")
    os.symlink(outside / "upload-data", session / "extra")
    before = snapshot(outside)

    res = collect_storage_sync(reg.storage, None, opts(reg))

    assert snapshot(outside) == before
    assert (session / "extra").is_symlink() and res.uploads_deleted == 0
    assert reported(res, session / "extra"), res.errors
    assert res.deleted_blobs == store["garbage"]


def test_symlinked_quarantine_dir_refuses_the_run(store) -> None:
    reg, v2, outside = store["reg"], store["v2"], store["outside"]
    victim(outside / "q/precious")
    os.symlink(outside / "q", v2 / "_quarantine")
    before, store_before = snapshot(outside), snapshot(reg.storage)

    with pytest.raises(ConfigError, match=r"_quarantine is a symbolic link") as info:
        collect_storage_sync(reg.storage, None, opts(reg))

    assert info.value.exit_code == 2
    assert str(v2 / "_quarantine") in str(info.value)
    assert snapshot(outside) == before  # nothing written, moved or removed there
    assert snapshot(reg.storage) == store_before


def test_resumed_run_does_not_delete_through_a_symlinked_quarantine_run_dir(
    store, tmp_path
) -> None:
    """The journal names where quarantined copies are; a run dir swapped for a link
    must not turn those names into deletions outside the store."""
    reg, v2, outside = store["reg"], store["v2"], store["outside"]
    journal = Journal(tmp_path / "j.db")
    with pytest.raises(RuntimeError, match="injected fault"):
        collect_storage_sync(reg.storage, journal, opts(reg, fault_after_deletions=1))
    run_id = sql(journal, "SELECT id FROM gc_runs ORDER BY id DESC LIMIT 1")[0]["id"]
    run_dir = v2 / "_quarantine" / str(run_id)
    assert any(p.is_file() for p in run_dir.rglob("*"))  # quarantined copies wait here
    # the same names outside, and the run dir pointing there
    shutil.copytree(run_dir, outside / "victims")
    shutil.rmtree(run_dir)
    os.symlink(outside / "victims", run_dir)
    before = snapshot(outside)

    res = collect_storage_sync(reg.storage, journal, opts(reg))

    assert res.resumed_runs == [run_id]
    assert snapshot(outside) == before
    assert run_dir.is_symlink()
    assert reported(res, run_dir), res.errors
    journal.close()


def test_component_swapped_for_a_symlink_after_planning_is_not_followed(store) -> None:
    """Between the re-check and the rename a repository directory becomes a link to a
    copy outside: the renames fail on the link instead of moving what it names."""
    reg, v2, outside = store["reg"], store["v2"], store["outside"]
    col = StorageCollector(reg.storage, None, opts(reg))
    try:
        plan = col.plan()
        col.recheck(plan)
        links = [i for i in plan.items if i.kind == "link"]
        assert links
        os.rename(v2 / "repositories/app", outside / "app")
        os.symlink(outside / "app", v2 / "repositories/app")
        before = snapshot(outside)
        col.assign_quarantine(1, plan.items)
        col.quarantine(plan)
        assert snapshot(outside) == before
        repo_link = str(v2 / "repositories/app")
        assert {i.state for i in links} == {"error"}
        assert all(f"{repo_link} is a symbolic link" in str(i.error) for i in links)
        # a blob whose link could not be moved stays in place with it
        linked = {i.digest for i in links}
        blobs = {i.digest: i.state for i in plan.items if i.kind == "blob" and i.digest in linked}
        assert blobs and set(blobs.values()) == {"kept"}, blobs
    finally:
        col.close()


def test_quarantine_shard_swapped_for_a_symlink_is_not_emptied(store) -> None:
    """After the quarantine a shard directory becomes a link to look-alike files outside:
    the final deletion refuses it and reports the path."""
    reg, outside = store["reg"], store["outside"]
    col = StorageCollector(reg.storage, None, opts(reg))
    try:
        plan = col.plan()
        col.recheck(plan)
        col.assign_quarantine(1, plan.items)
        col.quarantine(plan)
        blob = next(i for i in plan.items if i.kind == "blob" and i.state == "quarantined")
        shard = Path(str(blob.quarantine)).parent
        shutil.copytree(shard, outside / "shard")
        shutil.rmtree(shard)
        os.symlink(outside / "shard", shard)
        before = snapshot(outside)
        col.finalize(plan.items, plan.cutoff)
        assert snapshot(outside) == before
        assert blob.state == "error" and f"{shard} is a symbolic link" in str(blob.error)
    finally:
        col.close()


# --- ConfinedFS on its own ---------------------------------------------------------------


@pytest.fixture
def confined(tmp_path) -> tuple[ConfinedFS, Path, Path]:
    base = tmp_path / "root/base"
    (base / "real/sub").mkdir(parents=True)
    (base / "real/sub/file").write_text("mine")
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub/file").write_text("theirs")
    os.symlink(outside, base / "link")
    fs = ConfinedFS(str(tmp_path / "root"), str(base))
    yield fs, base, outside
    fs.close()


def test_confined_fs_refuses_every_change_through_a_link(confined) -> None:
    fs, base, outside = confined
    before = snapshot(outside)
    for change in (
        lambda: fs.remove_tree(f"{base}/link/sub"),
        lambda: fs.remove_tree(f"{base}/link"),
        lambda: fs.rename(f"{base}/link/sub", f"{base}/real/moved"),
        lambda: fs.rename(f"{base}/real/sub", f"{base}/link/moved"),
        lambda: fs.rename(f"{base}/link", f"{base}/real/moved"),
        lambda: fs.makedirs(f"{base}/link/new"),
        lambda: fs.rmdir(f"{base}/link/sub"),
    ):
        with pytest.raises(UnsafeEntry, match=f"{base}/link is a symbolic link"):
            change()
    assert snapshot(outside) == before and not (outside / "new").exists()
    with pytest.raises(UnsafeEntry, match="outside"):
        fs.remove_tree(str(outside / "sub"))
    with pytest.raises(UnsafeEntry, match="not a plain path"):
        fs.remove_tree(f"{base}/real/../link/sub")
    assert snapshot(outside) == before


def test_confined_fs_removal_leaves_inner_links_and_reports_them(confined) -> None:
    fs, base, outside = confined
    os.symlink(outside / "sub", base / "real/sub/inner")
    with pytest.raises(UnsafeEntry, match=f"{base}/real/sub/inner is a symbolic link"):
        fs.remove_tree(f"{base}/real")
    assert (outside / "sub/file").read_text() == "theirs"
    assert not (base / "real/sub/file").exists()  # the rest is gone
    assert (base / "real/sub/inner").is_symlink()
    assert fs.lexists(f"{base}/link") and not fs.is_dir(f"{base}/link")
