"""`metrics_textfile.update` on a real directory: concurrent GC runs, a corrupt or
hostile previous file, and the directory other users may write (red-team findings 4, 8).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import stat
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from replicator import metrics_textfile
from replicator.metrics_textfile import GcOutcome, render, update

P = "registry_replicator_"
RUNS_OK_A = (P + "gc_runs_total", (("outcome", "ok"), ("site", "a")))


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _runs(path: str, n: int) -> int:
    """`n` GC runs recorded in the file at `path`; how many raised OSError."""
    failed = 0
    for _ in range(n):
        try:
            update(Path(path), ["a"], [GcOutcome("a", ok=True, bytes_reclaimed=1)], 1.0)
        except OSError:
            failed += 1
    return failed


def test_concurrent_runs_each_count_once_and_none_fails(tmp_path):
    prom = tmp_path / "gc.prom"
    with multiprocessing.get_context("fork").Pool(2) as pool:
        failed = pool.starmap(_runs, [(str(prom), 60), (str(prom), 60)])
    assert failed == [0, 0]
    got = samples(prom.read_text())
    assert got[RUNS_OK_A] == 120
    assert got[(P + "gc_reclaimed_bytes_total", (("site", "a"),))] == 120
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gc.prom"]  # no temp file left


def test_a_previous_file_that_is_not_utf8_starts_again_from_zero(tmp_path, caplog):
    prom = tmp_path / "gc.prom"
    prom.write_bytes(b"\xff\xfe registry_replicator_gc_runs_total 9\n")
    with caplog.at_level(logging.WARNING):
        update(prom, ["a"], [GcOutcome("a", ok=True)], 1.0)
    assert samples(prom.read_text())[RUNS_OK_A] == 1
    assert any(str(prom) in r.getMessage() and "UTF-8" in r.getMessage() for r in caplog.records)
    update(prom, ["a"], [GcOutcome("a", ok=True)], 2.0)  # and the next run counts on
    assert samples(prom.read_text())[RUNS_OK_A] == 2


def test_sites_no_longer_configured_are_dropped():
    before = render("", ["a", "old"], [GcOutcome("old", ok=True)], 1.0).decode()
    assert any(labels == (("site", "old"),) for _, labels in samples(before))
    after = render(before, ["a"], [GcOutcome("a", ok=True)], 2.0).decode()
    sites = {dict(labels).get("site") for _, labels in samples(after)}
    assert sites == {"a"}


def test_the_file_is_readable_by_the_collector_whatever_the_umask(tmp_path):
    prom = tmp_path / "gc.prom"
    old = os.umask(0o077)
    try:
        update(prom, ["a"], [GcOutcome("a", ok=True)], 1.0)
    finally:
        os.umask(old)
    assert stat.S_IMODE(prom.stat().st_mode) == 0o644


def test_symlinks_planted_in_the_directory_are_never_written_or_read_through(tmp_path):
    victim = tmp_path / "victim.txt"
    secret = "# a file the GC user can write but must not\n"
    victim.write_text(secret)
    counted = tmp_path / "counted.prom"
    counted_text = render("", ["a"], [GcOutcome("a", ok=True)], 1.0).decode()
    counted.write_text(counted_text)
    textfiles = tmp_path / "textfiles"
    textfiles.mkdir()
    prom = textfiles / "gc.prom"
    # the temp name the old code used, and the file itself, as symlinks
    (textfiles / ".gc.prom.tmp").symlink_to(victim)
    prom.symlink_to(counted)
    update(prom, ["a"], [GcOutcome("a", ok=True)], 2.0)
    assert victim.read_text() == secret
    assert prom.is_file() and not prom.is_symlink()
    assert samples(prom.read_text())[RUNS_OK_A] == 1  # the link's target was not read
    assert counted.read_text() == counted_text  # nor written


def test_leftover_temp_files_of_a_killed_run_are_removed(tmp_path):
    prom = tmp_path / "gc.prom"
    (tmp_path / ".gc.prom.k1ll3d.tmp").write_text("half")
    (tmp_path / "other.prom").write_text("# not ours\n")
    update(prom, ["a"], [GcOutcome("a", ok=True)], 1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gc.prom", "other.prom"]


def test_the_file_and_its_directory_are_synced_before_and_after_the_rename(tmp_path, monkeypatch):
    prom = tmp_path / "gc.prom"
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(metrics_textfile.os, "fsync", fsync)
    update(prom, ["a"], [GcOutcome("a", ok=True)], 1.0)
    assert synced == ["file", "dir"]


def test_a_directory_where_the_file_should_be_is_an_oserror(tmp_path):
    prom = tmp_path / "gc.prom"
    prom.mkdir()
    with pytest.raises(OSError):
        update(prom, ["a"], [GcOutcome("a", ok=True)], 1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gc.prom"]
