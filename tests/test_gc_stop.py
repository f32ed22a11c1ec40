"""Issue 12 item 10: stopping while a storage GC runs.

Storage GC's blocking steps run on threads, which asyncio cannot cancel: a stopping
daemon either waited for the whole step (a sweep of a large store) or, once its task
was cancelled, left the thread changing the store behind a finished run. Now a
cancelled run tells its thread to stop between two items and waits for that, so what
was done is journaled and the next run resumes; and the daemon's stop is bounded
whatever a thread does (`--drain-timeout` + STOP_GRACE), abandoning what did not stop.

A step is held in place with a named pipe planted in the store as a tag's link file:
the scan's open() and read() of it block until the test writes to it, as a slow or
hung disk would block them (the pipe only stands in for that disk).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from replicator.daemon.service import STOP_GRACE
from replicator.gc.policy import KeepRules, RetentionPolicy
from replicator.gc.storage import StorageGCOptions, collect_storage
from replicator.journal import Journal
from tests.harness.daemon import DaemonProcess
from tests.harness.images import Pusher, assert_image_complete, layer_bytes
from tests.harness.journal import sql
from tests.harness.registry import Registry
from tests.harness.util import wait_until

PROMPT = 2.0
EXIT_SLACK = 2.5  # the process's own exit after the stop, on a busy machine


def age_tree(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            os.utime(os.path.join(dirpath, name), (t, t))


def push_scene(reg: Registry) -> tuple[str, set[str]]:
    """app:v1 (kept by the policy) and app:dev (deleted by it), pushed long ago."""
    with Pusher(reg.url) as p:
        kept = p.push_image("app", "v1", [layer_bytes("stop-v1", 1500)])
        dev = p.push_image("app", "dev", [layer_bytes("stop-dev", 2500)])
    age_tree(reg.storage, 7200)
    return kept.digest, set(dev.blobs) - set(kept.blobs)


def tag_dir(reg: Registry, repo: str, tag: str) -> Path:
    return reg.storage / f"docker/registry/v2/repositories/{repo}/_manifests/tags/{tag}"


def plant_pipe(reg: Registry) -> Path:
    """A tag `hold` in app whose link file is a named pipe."""
    current = tag_dir(reg, "app", "hold") / "current"
    current.mkdir(parents=True)
    os.mkfifo(current / "link")
    return current / "link"


FAKE = "f" * 64  # a manifest revision that appears while a run waits


def plant_manifest_pipe(reg: Registry) -> Path:
    """A new revision of app whose manifest's data file is a named pipe: marking from
    the revisions reads it."""
    v2 = reg.storage / "docker/registry/v2"
    link = v2 / f"repositories/app/_manifests/revisions/sha256/{FAKE}/link"
    link.parent.mkdir(parents=True)
    link.write_text(f"sha256:{FAKE}")
    data = v2 / f"blobs/sha256/{FAKE[:2]}/{FAKE}/data"
    data.parent.mkdir(parents=True)
    os.mkfifo(data)
    return data


def remove_manifest_pipe(reg: Registry) -> None:
    v2 = reg.storage / "docker/registry/v2"
    for d in (f"repositories/app/_manifests/revisions/sha256/{FAKE}", f"blobs/sha256/{FAKE[:2]}"):
        for p in sorted((v2 / d).rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        (v2 / d).rmdir()


EMPTY_INDEX = b'{"schemaVersion": 2, "manifests": []}'  # nothing to mark


def release(reg: Registry) -> None:
    """Let a scan stuck in a planted pipe go on, and turn the pipe into a plain file so
    no later read blocks (a test that failed leaves no thread stuck behind it)."""
    for pipe in [p for p in (reg.storage / "docker/registry/v2").rglob("*") if p.is_fifo()]:
        writer = None
        with contextlib.suppress(OSError):
            writer = os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)
            os.write(writer, EMPTY_INDEX)
        plain = pipe.with_name("plain")
        plain.write_bytes(EMPTY_INDEX)
        os.replace(plain, pipe)
        if writer is not None:
            os.close(writer)


def reader_blocked(pipe: Path) -> int | None:
    """The write end, once a scan has the pipe open for reading (it then blocks in read()
    until the write end is written to or closed); None until then."""
    try:
        return os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # no reader yet
            return None
        raise


POLICY = RetentionPolicy(name="p", keep=KeepRules(tags=("v*",)), grace=60, mode="storage")


async def poll(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)
    return value


async def test_a_cancelled_storage_gc_stops_between_items_and_the_rerun_resumes(registry, tmp_path):
    reg = registry
    _v1, garbage = push_scene(reg)
    journal = Journal(tmp_path / "j.db")
    options = StorageGCOptions(
        grace=60,
        quarantine_window=3.0,
        registry_config=reg.config_path,
        workers=2,
        policies=[POLICY],
    )
    run = asyncio.create_task(collect_storage(reg.storage, journal, options))
    try:
        # app:dev is in quarantine; during the window a manifest appears whose data blocks
        # the re-check's marking, inside the step that then deletes
        await poll(lambda: not tag_dir(reg, "app", "dev").exists(), 30, "the quarantine")
        pipe = plant_manifest_pipe(reg)
        writer = await poll(lambda: reader_blocked(pipe), 30, "the settle step in the pipe")

        run.cancel()
        done, _ = await asyncio.wait({run}, timeout=0.5)
        assert not done, "the cancelled run ended while its thread still worked on the store"
        os.write(writer, EMPTY_INDEX)  # the read ends, and the step goes on
        os.close(writer)
        done, _ = await asyncio.wait({run}, timeout=PROMPT)
        assert done and run.cancelled(), "the run did not stop at the next item"
    finally:
        release(reg)
        if not run.done():
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)

    [row] = sql(journal, "SELECT id, state FROM gc_runs")
    assert row["state"] == "sweeping"  # left for the next run to resume
    states = {r["state"] for r in sql(journal, "SELECT state FROM gc_candidates")}
    assert states == {"quarantined"}, f"items settled after the stop: {states}"
    held = [str(p) for p in (reg.storage / "docker/registry/v2/_quarantine").rglob("data")]
    assert all(any(d.split(":")[1] in p for p in held) for d in garbage), "deleted after the stop"

    # the next run (the pipe gone) resumes the stopped one and finishes it
    remove_manifest_pipe(reg)
    again = await collect_storage(reg.storage, journal, options)
    assert again.resumed_runs == [row["id"]]
    assert garbage <= again.deleted_blobs, (garbage, again.deleted_blobs, again.errors)
    assert not (garbage & reg.all_blob_digests())
    assert_image_complete(reg.url, "app", "v1")
    journal.close()


def test_sigterm_during_a_stuck_storage_gc_exits_within_the_stop_timeout(
    registry, tmp_path, daemons
):
    """The daemon, run as the unit runs it, with a storage GC every second whose scan is
    stuck in the store: SIGTERM ends the process within the stop timeout, saying what
    it abandoned, and the next GC run (the pipe gone) collects the garbage."""
    reg = registry
    _v1, garbage = push_scene(reg)
    pipe = plant_pipe(reg)
    site = {"url": reg.url, "insecure": True, "storage": str(reg.storage)}
    site["registry_config"] = str(reg.config_path)
    gc = {
        "schedule": "* * * * * *",  # every second
        "policies": [
            {
                "name": "p",
                "sites": ["a"],
                "keep": {"tags": ["v*"]},
                "grace": "1m",
                "mode": "storage",
            }
        ],
    }
    daemon = DaemonProcess(tmp_path / "d", config={"sites": {"a": site}, "gc": gc})
    daemons.append(daemon)
    daemon.start()
    writer = wait_until(lambda: reader_blocked(pipe), timeout=30, what="the GC scan in the pipe")
    try:
        daemon.signal(signal.SIGTERM)
        t = time.monotonic()
        assert daemon.proc is not None
        try:
            code = daemon.proc.wait(timeout=STOP_GRACE + EXIT_SLACK + 10)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"SIGTERM did not end the daemon: {daemon.log()[-3000:]}"
            ) from None
        took = time.monotonic() - t
    finally:
        os.close(writer)
    assert code == 0, daemon.log()[-3000:]
    assert took < STOP_GRACE + EXIT_SLACK, f"SIGTERM took {took:.1f}s"
    assert "gc did not end within the stop timeout" in daemon.log(), daemon.log()[-3000:]

    os.remove(pipe)
    tag_dir(reg, "app", "hold").joinpath("current").rmdir()
    tag_dir(reg, "app", "hold").rmdir()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "replicator",
            "gc",
            "-c",
            str(daemon.config_path),
            "--settle",
            "--quarantine-window",
            "1s",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert not (garbage & reg.all_blob_digests())
    assert_image_complete(reg.url, "app", "v1")
