"""GC metrics of a `registry-replicator gc` run outside the daemon (the systemd timer's),
as a file for node_exporter's textfile collector.

Why a file: a one-shot command has no /metrics endpoint to scrape, and GC failing or
going stale is exactly what an operator wants an alert for. The series are the daemon's
own (`registry_replicator_gc_runs_total{site,outcome}`, `gc_reclaimed_bytes_total{site}`,
`gc_last_success_timestamp_seconds{site}`, same names, labels and help), so the example
alert rules work whichever of the two runs GC.

Why read-modify-write: counters must keep counting across runs, and the previous file is
their only memory; `render` adds this run to what the file held (a file that cannot be
read as the text format starts again from 0, which Prometheus treats as a counter reset).
Sites no longer in the configuration are dropped, or their GCStale would fire forever.

Why `update` is careful: the file lives in node_exporter's directory, which other
processes write too, and two GC runs may finish at once. The read-modify-write holds an
exclusive flock on the directory, so no run is lost; the new file is written under a
unique temporary name (mkstemp: never a name someone planted a symlink at, and not
`*.prom`, so the collector skips it), made readable by the collector (0644, whatever
the umask), fsynced, renamed over the old one and the directory fsynced, since the
collector may read it at any moment and a crash must leave the old or the new file.
The previous file is opened without following a symlink: a link to another file is
neither read nor written through; it is replaced.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import prometheus_client
from prometheus_client.parser import text_string_to_metric_families

from replicator.metrics import PREFIX, RUN_OUTCOMES, Metrics

log = logging.getLogger(__name__)

RUNS = PREFIX + "gc_runs_total"
RECLAIMED = PREFIX + "gc_reclaimed_bytes_total"
LAST_SUCCESS = PREFIX + "gc_last_success_timestamp_seconds"
SAMPLES = (RUNS, RECLAIMED, LAST_SUCCESS)
LOCK_TIMEOUT = 30.0  # a run holds the lock for milliseconds; longer means something hangs
MAX_PREVIOUS_BYTES = 1 << 20  # a few series per site: anything bigger is not ours
FILE_MODE = 0o644  # node_exporter runs as another user; these counters are no secret


@dataclass(frozen=True)
class GcOutcome:
    """One site's part of a GC run."""

    site: str
    ok: bool
    bytes_reclaimed: int = 0


def _previous(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of the GC samples in an earlier file."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in SAMPLES:
                    out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    except Exception as exc:  # the parser raises more than ValueError on garbage
        log.warning("metrics textfile: the previous file is not the text format (%s)", exc)
        return {}
    return out


def render(previous: str, sites: Iterable[str], outcomes: Sequence[GcOutcome], now: float) -> bytes:
    """The new file: the earlier file's GC series of the configured `sites` plus this run;
    every site in `sites` present, at 0 where nothing happened yet."""
    metrics = Metrics()
    known = set(sites) | {o.site for o in outcomes}
    prior = {key: v for key, v in _previous(previous).items() if dict(key[1]).get("site") in known}
    for site in sorted(known):
        for outcome in RUN_OUTCOMES:
            metrics.gc_runs.inc(0, site=site, outcome=outcome)
        metrics.gc_reclaimed.inc(0, site=site)
        metrics.gc_last_success.labels(site=site)
    for (name, labels), value in prior.items():
        fields = dict(labels)
        if name == RUNS and fields.get("outcome") in RUN_OUTCOMES and value >= 0:
            metrics.gc_runs.inc(value, site=fields["site"], outcome=fields["outcome"])
        elif name == RECLAIMED and set(fields) == {"site"} and value >= 0:
            metrics.gc_reclaimed.inc(value, site=fields["site"])
        elif name == LAST_SUCCESS and set(fields) == {"site"}:
            metrics.gc_last_success.set(value, site=fields["site"])
    for o in outcomes:
        metrics.gc_runs.inc(site=o.site, outcome="ok" if o.ok else "failed")
        metrics.gc_reclaimed.inc(o.bytes_reclaimed, site=o.site)
        if o.ok:
            metrics.gc_last_success.set(now, site=o.site)
    return prometheus_client.generate_latest(metrics.registry.restricted_registry(SAMPLES))


def update(path: Path, sites: Iterable[str], outcomes: Sequence[GcOutcome], now: float) -> None:
    """Add this run to the textfile at `path`, replacing it atomically (see the module);
    OSError when it cannot be."""
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _lock(directory, path)
        _remove_leftovers(path)
        data = render(_read_previous(path), sites, outcomes, now)
        _replace(directory, path, data)
    finally:
        os.close(directory)  # and with it the lock


def _lock(directory: int, path: Path) -> None:
    deadline = time.monotonic() + LOCK_TIMEOUT
    while True:
        try:
            fcntl.flock(directory, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    errno.ETIMEDOUT,
                    f"another process has held the lock on {path.parent} for {LOCK_TIMEOUT:.0f} s",
                ) from None
            time.sleep(0.01)


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def _remove_leftovers(path: Path) -> None:
    """Temporary files of runs killed before their rename: under the lock, no live run
    has one."""
    prefix = _temp_prefix(path)
    for entry in os.scandir(path.parent):
        if entry.name.startswith(prefix) and entry.name.endswith(".tmp"):
            with contextlib.suppress(OSError):  # not ours to remove (a sticky directory)
                os.unlink(entry.path)


def _read_previous(path: Path) -> str:
    """The earlier file's text; "" (logged) when it is not a regular UTF-8 file we may
    read without following a link."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return ""
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        log.warning("metrics textfile %s is a symbolic link: not read, replaced", path)
        return ""
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            log.warning("metrics textfile %s is not a regular file: not read", path)
            return ""
        data = f.read(MAX_PREVIOUS_BYTES + 1)
    if len(data) > MAX_PREVIOUS_BYTES:
        log.warning("metrics textfile %s is over %d bytes: starting again from 0", path, len(data))
        return ""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        log.warning("metrics textfile %s is not UTF-8: starting again from 0", path)
        return ""


def _replace(directory: int, path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), FILE_MODE)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.fsync(directory)
