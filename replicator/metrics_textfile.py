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
The file is replaced atomically (written beside it, then renamed), since the collector
may read it at any moment.
"""

from __future__ import annotations

import logging
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
    """The new file: the earlier file's GC series plus this run; every site in `sites` (and
    in the earlier file) present, at 0 where nothing happened yet."""
    metrics = Metrics()
    prior = _previous(previous)
    known = set(sites) | {dict(labels)["site"] for _, labels in prior if dict(labels).get("site")}
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
    """Add this run to the textfile at `path`, replacing it atomically."""
    try:
        previous = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        previous = ""
    data = render(previous, sites, outcomes, now)
    tmp = path.with_name(f".{path.name}.tmp")  # not *.prom: the collector skips it
    tmp.write_bytes(data)
    tmp.replace(path)
