"""Prometheus metrics without a dependency: counters, gauges, histograms, text format 0.0.4.

Why not prometheus_client: it is not installed, its process-global default registry
makes isolated test instances awkward, and what the daemon needs fits in this file.
`METRICS` is the daemon's instance; tests build their own with `Metrics()`.

Usage: `METRICS.events_received.labels(site="eu", action="push").inc()`, or the
shorthand `METRICS.events_received.inc(site="eu", action="push")`. Gauges whose
value lives elsewhere (tasks by state, read from the journal) take a callback
with `set_function`; it runs at scrape time and must be cheap and non-blocking.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

LabelValues = tuple[str, ...]
_M = TypeVar("_M", bound="_Metric")
DEFAULT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        if not _NAME_RE.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        for label in labelnames:
            if not _LABEL_RE.match(label) or label.startswith("__") or label == "le":
                raise ValueError(f"invalid label name {label!r} for {name}")
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: Mapping[str, object]) -> LabelValues:
        if set(labels) != set(self.labelnames):
            raise ValueError(
                f"{self.name} takes labels {list(self.labelnames)}, got {sorted(labels)}"
            )
        return tuple(str(labels[n]) for n in self.labelnames)

    def _labels_text(self, key: LabelValues, extra: tuple[tuple[str, str], ...] = ()) -> str:
        pairs = [*zip(self.labelnames, key, strict=True), *extra]
        if not pairs:
            return ""
        return "{" + ",".join(f'{n}="{escape_label_value(v)}"' for n, v in pairs) + "}"

    def _header(self) -> list[str]:
        return [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]

    def render(self) -> list[str]:
        raise NotImplementedError


class _Child:
    def __init__(self, metric: _Metric, key: LabelValues) -> None:
        self._metric = metric
        self._key = key

    def inc(self, amount: float = 1.0) -> None:
        self._metric._inc(self._key, amount)  # type: ignore[attr-defined]

    def dec(self, amount: float = 1.0) -> None:
        self._metric._inc(self._key, -amount)  # type: ignore[attr-defined]

    def set(self, value: float) -> None:
        self._metric._set(self._key, value)  # type: ignore[attr-defined]

    def observe(self, value: float) -> None:
        self._metric._observe(self._key, value)  # type: ignore[attr-defined]


class Counter(_Metric):
    """Only goes up. The name should end in `_total`."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labelnames)
        self._values: dict[LabelValues, float] = {}

    def labels(self, **labels: object) -> _Child:
        return _Child(self, self._key(labels))

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        self._inc(self._key(labels), amount)

    def _inc(self, key: LabelValues, amount: float) -> None:
        if amount < 0:
            raise ValueError(f"counter {self.name} cannot decrease")
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: object) -> float:
        return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self._header() + [
            f"{self.name}{self._labels_text(k)} {format_value(v)}" for k, v in items
        ]


class Gauge(_Metric):
    """Goes up and down; or, with `set_function`, read from a callback at scrape time."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labelnames)
        self._values: dict[LabelValues, float] = {}
        self._function: Callable[[], Mapping[LabelValues, float] | float] | None = None

    def labels(self, **labels: object) -> _Child:
        return _Child(self, self._key(labels))

    def set(self, value: float, **labels: object) -> None:
        self._set(self._key(labels), value)

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        self._inc(self._key(labels), amount)

    def dec(self, amount: float = 1.0, **labels: object) -> None:
        self._inc(self._key(labels), -amount)

    def remove(self, **labels: object) -> None:
        with self._lock:
            self._values.pop(self._key(labels), None)

    def set_function(self, fn: Callable[[], Mapping[LabelValues, float] | float] | None) -> None:
        """fn() -> {label-values tuple: value} (or a bare number when unlabelled)."""
        self._function = fn

    def _set(self, key: LabelValues, value: float) -> None:
        with self._lock:
            self._values[key] = float(value)

    def _inc(self, key: LabelValues, amount: float) -> None:
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: object) -> float:
        return self._snapshot().get(self._key(labels), 0.0)

    def _snapshot(self) -> dict[LabelValues, float]:
        if self._function is not None:
            got = self._function()
            if not isinstance(got, Mapping):
                return {(): float(got)}
            out = {}
            for key, v in got.items():
                k = (key,) if isinstance(key, str) else tuple(str(x) for x in key)
                if len(k) != len(self.labelnames):
                    raise ValueError(
                        f"{self.name}: callback label key {key!r} does not "
                        f"match labels {list(self.labelnames)}"
                    )
                out[k] = float(v)
            return out
        with self._lock:
            return dict(self._values)

    def render(self) -> list[str]:
        try:
            items = sorted(self._snapshot().items())
        except Exception:  # a failing callback must not break the whole scrape
            items = []
        return self._header() + [
            f"{self.name}{self._labels_text(k)} {format_value(v)}" for k, v in items
        ]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(
        self,
        name: str,
        help_text: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        super().__init__(name, help_text, labelnames)
        self.buckets = tuple(sorted(float(b) for b in buckets if not math.isinf(b)))
        # per label set: [bucket counts..., +Inf count], sum
        self._data: dict[LabelValues, tuple[list[int], list[float]]] = {}

    def labels(self, **labels: object) -> _Child:
        return _Child(self, self._key(labels))

    def observe(self, value: float, **labels: object) -> None:
        self._observe(self._key(labels), value)

    def _observe(self, key: LabelValues, value: float) -> None:
        with self._lock:
            counts, total = self._data.setdefault(key, ([0] * (len(self.buckets) + 1), [0.0]))
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    counts[i] += 1
            counts[-1] += 1
            total[0] += value

    def count(self, **labels: object) -> int:
        data = self._data.get(self._key(labels))
        return data[0][-1] if data else 0

    def render(self) -> list[str]:
        with self._lock:
            items = sorted((k, (list(c), s[0])) for k, (c, s) in self._data.items())
        lines = self._header()
        for key, (counts, total) in items:
            for bound, n in zip([*self.buckets, math.inf], counts, strict=True):
                le = (("le", format_value(bound)),)
                lines.append(f"{self.name}_bucket{self._labels_text(key, le)} {n}")
            lines.append(f"{self.name}_sum{self._labels_text(key)} {format_value(total)}")
            lines.append(f"{self.name}_count{self._labels_text(key)} {counts[-1]}")
        return lines


class Metrics:
    """Every metric the daemon exports. One instance per daemon (or per test)."""

    CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self) -> None:
        self._metrics: list[_Metric] = []
        c, g, h = self.counter, self.gauge, self.histogram
        # webhook intake
        self.events_received = c(
            "replicator_events_received_total",
            "New (non-duplicate) registry events journaled by intake.",
            ["site", "action"],
        )
        self.events_duplicate = c(
            "replicator_events_duplicate_total",
            "Redelivered events answered 200 and not passed on.",
            ["site"],
        )
        self.webhook_rejections = c(
            "replicator_webhook_rejections_total",
            "Webhook requests refused, by HTTP status.",
            ["status"],
        )
        self.webhook_seconds = h(
            "replicator_webhook_duration_seconds",
            "Time from request to durable answer for accepted webhooks.",
        )
        # work queue and replication
        self.tasks = g("replicator_tasks", "Tasks in the journal by state.", ["state"])
        self.replication_lag = g(
            "replicator_replication_lag_seconds",
            "Age of the oldest event not yet replicated, per rule and target (0 when caught up).",
            ["rule", "target"],
        )
        self.bytes_uploaded = c(
            "replicator_bytes_uploaded_total",
            "Blob bytes uploaded to a target registry.",
            ["target"],
        )
        self.blobs = c(
            "replicator_blobs_total",
            "Blobs handled per target: outcome is uploaded, mounted or existing.",
            ["target", "outcome"],
        )
        self.retries = c(
            "replicator_task_retries_total",
            "Task attempts that failed and were scheduled again.",
            ["target"],
        )
        self.dead_letters = c(
            "replicator_dead_letters_total",
            "Tasks given up after their last attempt.",
            ["rule", "target"],
        )

    def counter(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Counter:
        return self._add(Counter(name, help_text, labelnames))

    def gauge(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> Gauge:
        return self._add(Gauge(name, help_text, labelnames))

    def histogram(
        self,
        name: str,
        help_text: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> Histogram:
        return self._add(Histogram(name, help_text, labelnames, buckets))

    def _add(self, metric: _M) -> _M:
        if any(m.name == metric.name for m in self._metrics):
            raise ValueError(f"metric {metric.name} registered twice")
        self._metrics.append(metric)
        return metric

    def render(self) -> str:
        lines: list[str] = []
        for metric in self._metrics:
            lines += metric.render()
        return "\n".join(lines) + "\n"


METRICS = Metrics()
