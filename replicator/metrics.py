"""Prometheus metrics of one daemon, on prometheus-client with a registry per instance.

Why prometheus-client: the exposition format, escaping, process metrics and the
OpenMetrics details are its job, kept right by its maintainers. Why a registry per
`Metrics` instance (and not the library's process-global default): tests, the
demo and benchmarks run several daemons in one process, each with its own numbers.

Every series an alert needs exists from the start: `Metrics.know(config)` creates
the counters and gauges for every configured site, rule and target at 0, so
`rate()` and `absent()`-style alerts work before the first event, and the lag
gauge reads 0 when caught up instead of vanishing.

Names all start with `registry_replicator_` (no collision with other exporters);
byte counters end in `_bytes_total`. Gauges whose values live in the journal
(tasks by state, lag) are computed by a callback at scrape time from values the
daemon refreshed beforehand: a scrape never runs SQL.

Usage: `metrics.blobs.inc(3, target="eu", outcome="mounted")`, or
`metrics.blobs.labels(target="eu", outcome="mounted").inc(3)`.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import prometheus_client
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from replicator import __version__

if TYPE_CHECKING:
    from replicator.config import Config

log = logging.getLogger(__name__)

PREFIX = "registry_replicator_"
LabelValues = tuple[str, ...]
DEFAULT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
TASK_STATES = ("pending", "leased", "done", "cancelled", "dead")
EVENT_ACTIONS = ("push", "delete", "pull", "mount")
BLOB_OUTCOMES = ("uploaded", "mounted", "existing")
RUN_OUTCOMES = ("ok", "failed")
DRIFT_KINDS = ("missing", "different", "extra", "incomplete")  # replicator.verify's kinds
# what intake refuses with: bad body, token, size, content type; journal unavailable
WEBHOOK_REJECTION_STATUSES = ("400", "401", "413", "415", "503")
HTTP_METHODS = ("GET", "HEAD", "PUT", "POST", "PATCH", "DELETE")
STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx", "error")  # 3xx: a redirect not followed

# `_created` series double every counter for nothing a dashboard uses
prometheus_client.disable_created_metrics()


class _Labelled:
    """Shared by the wrappers: label checking with messages that name the metric."""

    def __init__(self, metric: Any, name: str, labelnames: Sequence[str]) -> None:
        self._metric = metric
        self.name = name
        self.labelnames = tuple(labelnames)

    def labels(self, **labels: object) -> Any:
        if set(labels) != set(self.labelnames):
            raise ValueError(
                f"{self.name} takes labels {', '.join(self.labelnames) or '(none)'}, "
                f"got {', '.join(sorted(labels)) or '(none)'}"
            )
        if not self.labelnames:
            return self._metric
        return self._metric.labels(**{k: str(v) for k, v in labels.items()})


class Counter(_Labelled):
    def inc(self, amount: float = 1.0, **labels: object) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter cannot decrease (inc by {amount})")
        if amount:
            self.labels(**labels).inc(amount)
        elif labels:
            self.labels(**labels)  # the series exists (at 0) from now on

    def value(self, **labels: object) -> float:
        return float(self.labels(**labels)._value.get())


class Gauge(_Labelled):
    def set(self, value: float, **labels: object) -> None:
        self.labels(**labels).set(value)

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        self.labels(**labels).inc(amount)

    def value(self, **labels: object) -> float:
        return float(self.labels(**labels)._value.get())


class Histogram(_Labelled):
    def observe(self, value: float, **labels: object) -> None:
        self.labels(**labels).observe(value)

    def count(self, **labels: object) -> int:
        child = self.labels(**labels)
        return int(sum(b.get() for b in child._buckets))


class FunctionGauge(Collector):
    """A labelled gauge computed at scrape time by a callback returning
    {label values: value}; series for `known` label values are always present (0)."""

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str]) -> None:
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labelnames)
        self._fn: Callable[[], Mapping[LabelValues, float]] | None = None
        self._known: set[LabelValues] = set()

    def set_function(self, fn: Callable[[], Mapping[LabelValues, float]] | None) -> None:
        self._fn = fn

    def know(self, keys: Iterable[LabelValues]) -> None:
        self._known = {tuple(str(v) for v in k) for k in keys}

    def values(self) -> dict[LabelValues, float]:
        out = dict.fromkeys(self._known, 0.0)
        if self._fn is not None:
            try:
                out.update({tuple(k): float(v) for k, v in self._fn().items()})
            except Exception as exc:  # a broken reader must not break the scrape
                log.debug("metric %s: reading failed: %s", self.name, exc)
        return out

    def describe(self) -> list[Metric]:
        return [GaugeMetricFamily(self.name, self.help, labels=list(self.labelnames))]

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(self.name, self.help, labels=list(self.labelnames))
        for key, value in sorted(self.values().items()):
            family.add_metric(list(key), value)
        yield family


class Metrics:
    """Every metric the daemon exports. One instance per daemon (or per test)."""

    # the text format every Prometheus server reads (what generate_latest writes)
    CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._names: set[str] = set()
        prometheus_client.ProcessCollector(registry=self.registry)
        prometheus_client.PlatformCollector(registry=self.registry)
        build = self.gauge(
            "build_info", "The running version (value 1).", ["version", "python_version"]
        )
        build.set(1, version=__version__, python_version=platform.python_version())
        c, g, h = self.counter, self.gauge, self.histogram
        # webhook intake
        self.events_received = c(
            "events_received_total",
            "New (non-duplicate) registry events journaled by intake.",
            ["site", "action"],
        )
        self.events_duplicate = c(
            "events_duplicate_total", "Redelivered events answered 200 and not passed on.", ["site"]
        )
        self.webhook_rejections = c(
            "webhook_rejections_total", "Webhook requests refused, by HTTP status.", ["status"]
        )
        self.webhook_seconds = h(
            "webhook_duration_seconds", "Time from request to durable answer for accepted webhooks."
        )
        # work queue and replication
        self.tasks = self.function_gauge(
            "tasks", "Tasks in the journal by state (0 for a state with none).", ["state"]
        )
        self.replication_lag = self.function_gauge(
            "replication_lag_seconds",
            "Age of the oldest change not yet replicated, per rule and target (0 when caught up).",
            ["rule", "target"],
        )
        self.bytes_uploaded = c(
            "uploaded_bytes_total", "Blob bytes uploaded to a target registry.", ["target"]
        )
        self.blobs = c(
            "blobs_total",
            "Blobs handled per target: outcome is uploaded, mounted or existing.",
            ["target", "outcome"],
        )
        self.retries = c(
            "task_retries_total",
            "Task attempts that failed and were scheduled again (a last attempt counts in "
            "dead_letters_total instead).",
            ["rule", "target"],
        )
        self.dead_letters = c(
            "dead_letters_total", "Tasks given up after their last attempt.", ["rule", "target"]
        )
        self.reconcile_runs = c(
            "reconcile_runs_total",
            "Periodic reconcile runs by outcome (ok, failed).",
            ["rule", "outcome"],
        )
        # registries
        self.requests = c(
            "registry_requests_total",
            "HTTP requests to each registry, by method and status class (2xx..5xx, or error "
            "when no answer came).",
            ["site", "method", "status_class"],
        )
        self.request_seconds = h(
            "registry_request_duration_seconds",
            "Time to each registry's answer (headers), by method and status class.",
            ["site", "method", "status_class"],
            buckets=REQUEST_BUCKETS,
        )
        # pull budgets (Docker Hub's ratelimit headers), read from the clients at scrape
        # time; 0 and 0 for a site that reports none, so alert on remaining == 0 and limit > 0
        self.ratelimit_remaining = self.function_gauge(
            "ratelimit_remaining",
            "Pulls left in the registry's rate-limit window as last reported (0 when none).",
            ["site"],
        )
        self.ratelimit_limit = self.function_gauge(
            "ratelimit_limit",
            "Pulls the registry allows per window as last reported (0: no limit reported).",
            ["site"],
        )
        # the bus and garbage collection
        self.bus_connected = self.function_gauge(
            "bus_connected", "1 while the event bus (MQTT broker) is connected, else 0.", []
        )
        self.gc_runs = c(
            "gc_runs_total",
            "Garbage collection runs per site by outcome (ok, failed).",
            ["site", "outcome"],
        )
        self.gc_reclaimed = c(
            "gc_reclaimed_bytes_total", "Bytes reclaimed by garbage collection per site.", ["site"]
        )
        self.gc_last_success = g(
            "gc_last_success_timestamp_seconds",
            "When garbage collection last finished without error, per site (0: never).",
            ["site"],
        )
        # scheduled verify
        self.drift_tags = g(
            "drift_tags",
            "Tags whose replica differs from the source at the last verify, per rule, target "
            "and kind (missing, different, extra, incomplete; 0 when in sync).",
            ["rule", "target", "kind"],
        )
        self.verify_last_success = g(
            "verify_last_success_timestamp_seconds",
            "When a scheduled verify last compared every site (0: never).",
        )

    # ------------------------------------------------------------------ building
    def _register_name(self, name: str) -> str:
        full = name if name.startswith(PREFIX) else PREFIX + name
        if full in self._names:
            raise ValueError(f"metric {full} registered twice")
        self._names.add(full)
        return full

    def counter(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Counter:
        full = self._register_name(name)
        metric = prometheus_client.Counter(full, help_text, labelnames, registry=self.registry)
        return Counter(metric, full, labelnames)

    def gauge(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Gauge:
        full = self._register_name(name)
        metric = prometheus_client.Gauge(full, help_text, labelnames, registry=self.registry)
        return Gauge(metric, full, labelnames)

    def histogram(
        self,
        name: str,
        help_text: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> Histogram:
        full = self._register_name(name)
        metric = prometheus_client.Histogram(
            full, help_text, labelnames, buckets=sorted(buckets), registry=self.registry
        )
        return Histogram(metric, full, labelnames)

    def function_gauge(self, name: str, help_text: str, labelnames: Sequence[str]) -> FunctionGauge:
        gauge = FunctionGauge(self._register_name(name), help_text, labelnames)
        self.registry.register(gauge)
        return gauge

    # ----------------------------------------------------------------- labels
    def know(self, config: Config) -> None:
        """Create every series the configuration implies, at 0 (called at start and
        after a reload; series of sites and rules that went away keep their values)."""
        sites = list(config.sites)
        targets = sorted({t for rule in config.rules for t in rule.to})
        pairs = sorted({(rule.name, t) for rule in config.rules for t in rule.to})
        for site in sites:
            self.events_duplicate.inc(0, site=site)
            for action in EVENT_ACTIONS:
                self.events_received.inc(0, site=site, action=action)
            for outcome in RUN_OUTCOMES:
                self.gc_runs.inc(0, site=site, outcome=outcome)
            self.gc_reclaimed.inc(0, site=site)
            self.gc_last_success.labels(site=site)
            for method in HTTP_METHODS:
                # latency of answers from the start; other classes' histograms appear with
                # their first request (16 series each: too many to create for nothing)
                self.request_seconds.labels(site=site, method=method, status_class="2xx")
                for status_class in STATUS_CLASSES:
                    self.requests.inc(0, site=site, method=method, status_class=status_class)
        for target in targets:
            self.bytes_uploaded.inc(0, target=target)
            for outcome in BLOB_OUTCOMES:
                self.blobs.inc(0, target=target, outcome=outcome)
        for rule_name, target in pairs:
            self.dead_letters.inc(0, rule=rule_name, target=target)
            self.retries.inc(0, rule=rule_name, target=target)
            for kind in DRIFT_KINDS:
                self.drift_tags.labels(rule=rule_name, target=target, kind=kind)
        for name in {rule.name for rule in config.rules}:
            for outcome in RUN_OUTCOMES:
                self.reconcile_runs.inc(0, rule=name, outcome=outcome)
        for status in WEBHOOK_REJECTION_STATUSES:
            self.webhook_rejections.inc(0, status=status)
        self.tasks.know((state,) for state in TASK_STATES)
        self.bus_connected.know([()])
        self.ratelimit_remaining.know((site,) for site in sites)
        self.ratelimit_limit.know((site,) for site in sites)
        self.replication_lag.know(pairs)

    def request_observer(self) -> Callable[[str, str, int | None, float], None]:
        """A callback for the registry transport: (site, method, status or None, seconds)."""

        def observe(site: str, method: str, status: int | None, seconds: float) -> None:
            status_class = f"{status // 100}xx" if status else "error"
            self.requests.inc(site=site, method=method, status_class=status_class)
            self.request_seconds.observe(
                seconds, site=site, method=method, status_class=status_class
            )

        return observe

    def watch_budgets(self, read: Callable[[], Mapping[str, Mapping[str, Any]]]) -> None:
        """Read the pull budgets ({site: {limit, remaining, ...}}, e.g. ClientPool.budgets)
        at scrape time."""

        def field_of(name: str) -> Callable[[], dict[LabelValues, float]]:
            def values() -> dict[LabelValues, float]:
                return {(site,): float(budget.get(name) or 0) for site, budget in read().items()}

            return values

        self.ratelimit_remaining.set_function(field_of("remaining"))
        self.ratelimit_limit.set_function(field_of("limit"))

    def render(self) -> str:
        return prometheus_client.generate_latest(self.registry).decode()


METRICS = Metrics()
