"""OpenTelemetry traces and metrics: one trace per pushed image, across sites.

Why: a push at one site becomes a webhook, an MQTT message, tasks in other
regions' journals and blob transfers; when a copy is slow or fails, the trace
shows where the time went (upload vs. mount vs. waiting) in every region at once.

Off by default and then nearly free: every helper returns a shared no-op context
until `setup_telemetry` enables it. Enabled when the configuration has
`telemetry.otlp_endpoint` (OTLP over HTTP; needs the `otlp` extra,
`pip install 'registry-replicator[otlp]'`), or when OTEL_TRACES_EXPORTER=console
(spans printed to stdout, for a quick look), or when a test passes an exporter.

Spans (attributes are namespaced `replicator.*`):

  event          intake published a registry event (site, action, repository, tag,
                 digest); its W3C traceparent travels in the MQTT user properties
                 and is stored with every task the event fans out to
  replicate      one task, child of the context stored with the task (rule, action,
                 source, target, repository, target_repository, tag, digest, task_id)
    copy         CopyEngine.copy: source, target, status (copied/skipped/conflict/failed)
      copy manifest   one manifest written (digest, media_type, target, repository)
        blob          one blob made present (digest, bytes, target, repository,
                      outcome existing/mounted/uploaded)
  gc <name>      garbage collection, see `gc_span`

Metrics: the daemon's Prometheus metrics (replicator/metrics.py) are
mirrored as OTel observable instruments, read at export time (`bridge_metrics`).

The provider is this module's own, not OpenTelemetry's process-global one, so
it can be replaced (tests, a second setup) without the global "cannot override"
dead end.
"""

from __future__ import annotations

import contextlib
import logging
import os
import urllib.parse
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry import propagate, trace
from opentelemetry.trace import Span, Tracer

from replicator import __version__
from replicator.errors import ConfigError

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

    from replicator.config import Config, TelemetryConfig
    from replicator.metrics import Metrics

log = logging.getLogger(__name__)

SCOPE = "replicator"
OTLP_EXTRA_HINT = (
    "install the OTLP exporter: pip install 'registry-replicator[otlp]' "
    "(the package opentelemetry-exporter-otlp-proto-http)"
)

_NOOP: AbstractContextManager[Span] = contextlib.nullcontext(trace.INVALID_SPAN)


@dataclass
class Telemetry:
    """What `setup_telemetry` built; `shutdown()` flushes and stops the exporters."""

    tracer_provider: TracerProvider | None = None
    meter_provider: MeterProvider | None = None

    @property
    def enabled(self) -> bool:
        return self.tracer_provider is not None

    def shutdown(self) -> None:
        global _tracer, _current
        if self.tracer_provider is not None:
            with contextlib.suppress(Exception):
                self.tracer_provider.shutdown()
        if self.meter_provider is not None:
            with contextlib.suppress(Exception):
                self.meter_provider.shutdown()
        if _current is self:
            _tracer, _current = None, None


_tracer: Tracer | None = None
_current: Telemetry | None = None


# ---------------------------------------------------------------------------- set-up


def setup_telemetry(
    config: Config | TelemetryConfig | None = None,
    *,
    span_exporter: SpanExporter | None = None,
    metric_reader: MetricReader | None = None,
    metrics: Metrics | None = None,
    instance_id: str | None = None,
) -> Telemetry:
    """Enable tracing (and metrics) as configured; returns the handle, also kept globally.

    `config` is the whole Config or its `telemetry` section. Exporters, in order:
    OTLP/HTTP when `otlp_endpoint` is set; console when OTEL_TRACES_EXPORTER=console;
    `span_exporter` (tests: an InMemorySpanExporter, exported synchronously). With
    none of them, telemetry stays as it is (off, unless an embedding program or test
    set it up) and every helper is a no-op while off. Metrics go to OTLP (or
    `metric_reader`) and mirror `metrics` (default: the daemon's METRICS). A previous
    setup is replaced (shut down). Raises ConfigError when OTLP is configured but its
    exporter package is not installed.
    """
    global _tracer, _current
    section = getattr(config, "telemetry", config)
    endpoint = getattr(section, "otlp_endpoint", None)
    service_name = getattr(section, "service_name", None) or "registry-replicator"
    console = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "console"

    span_exporters: list[tuple[SpanExporter, bool]] = []  # (exporter, batched)
    readers: list[MetricReader] = []
    if endpoint:
        trace_exporter_cls, metric_exporter_cls = _otlp_classes()
        span_exporters.append((trace_exporter_cls(endpoint=otlp_url(endpoint, "traces")), True))
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        readers.append(
            PeriodicExportingMetricReader(
                metric_exporter_cls(endpoint=otlp_url(endpoint, "metrics"))
            )
        )
    if console:
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        span_exporters.append((ConsoleSpanExporter(), True))
    if span_exporter is not None:
        span_exporters.append((span_exporter, False))
    if metric_reader is not None:
        readers.append(metric_reader)

    if not span_exporters and not readers:
        # Nothing configured: keep what an embedding program (or a test) set up.
        if _current is None:
            _current = Telemetry()
        return _current
    if _current is not None:
        _current.shutdown()

    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    attributes: dict[str, str] = {"service.name": service_name, "service.version": __version__}
    if instance_id:
        attributes["service.instance.id"] = instance_id
    resource = Resource.create(attributes)
    handle = Telemetry()
    if span_exporters:
        provider = TracerProvider(resource=resource)
        for exporter, batched in span_exporters:
            provider.add_span_processor(
                BatchSpanProcessor(exporter) if batched else SimpleSpanProcessor(exporter)
            )
        handle.tracer_provider = provider
    if readers:
        from opentelemetry.sdk.metrics import MeterProvider

        handle.meter_provider = MeterProvider(metric_readers=readers, resource=resource)
        if metrics is None:
            from replicator.metrics import METRICS

            metrics = METRICS
        bridge_metrics(metrics, handle.meter_provider)
    _current = handle
    _tracer = (
        handle.tracer_provider.get_tracer(SCOPE, __version__)
        if handle.tracer_provider is not None
        else None
    )
    if endpoint:
        log.info("telemetry: exporting traces and metrics to %s", endpoint)
    return handle


def shutdown_telemetry() -> None:
    """Flush and turn telemetry off (helpers are no-ops again)."""
    global _tracer, _current
    if _current is not None:
        _current.shutdown()
    _tracer, _current = None, None


def current() -> Telemetry | None:
    """The handle of the last `setup_telemetry` (None before any)."""
    return _current


def otlp_url(endpoint: str, signal: str) -> str:
    """`http://collector:4318` -> `http://collector:4318/v1/traces` (a full
    `.../v1/traces` endpoint is accepted too, and its signal swapped)."""
    parts = urllib.parse.urlsplit(endpoint)
    path = parts.path.rstrip("/")
    for known in ("/v1/traces", "/v1/metrics", "/v1/logs"):
        if path.endswith(known):
            path = path[: -len(known)]
            break
    return urllib.parse.urlunsplit(parts._replace(path=f"{path}/v1/{signal}"))


def _otlp_classes() -> tuple[type, type]:
    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        raise ConfigError(
            f"telemetry.otlp_endpoint is set, but the OTLP exporter is not "
            f"installed; {OTLP_EXTRA_HINT}",
            path="telemetry.otlp_endpoint",
        ) from None
    return OTLPSpanExporter, OTLPMetricExporter


# --------------------------------------------------------------------------- spans


def enabled() -> bool:
    return _tracer is not None


def _attrs(values: Mapping[str, Any]) -> dict[str, Any]:
    """`replicator.`-prefixed attributes; None dropped (OTel refuses it)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            continue
        name = key if "." in key else f"replicator.{key}"
        out[name] = value if isinstance(value, (str, bool, int, float)) else str(value)
    return out


def span(
    name: str, parent: Mapping[str, str] | None = None, **attributes: Any
) -> AbstractContextManager[Span]:
    """A span around a block: `with telemetry.span("copy manifest", digest=d) as s:`.

    `parent` is a W3C carrier ({'traceparent': ...}) to continue a trace from
    elsewhere; by default the current span is the parent. An exception leaving the
    block is recorded and marks the span as an error. A no-op when telemetry is off.
    """
    if _tracer is None:
        return _NOOP
    context = propagate.extract(dict(parent)) if parent else None
    return _tracer.start_as_current_span(name, context=context, attributes=_attrs(attributes))


def set_attributes(**attributes: Any) -> None:
    """Add attributes to the current span (e.g. a blob's outcome once it is known)."""
    if _tracer is None:
        return
    current_span = trace.get_current_span()
    if current_span.is_recording():
        current_span.set_attributes(_attrs(attributes))


def record_failure(error: str, *, retryable: bool | None = None) -> None:
    """Mark the current span failed (a failure handled without an exception)."""
    if _tracer is None:
        return
    current_span = trace.get_current_span()
    if current_span.is_recording():
        current_span.set_status(trace.Status(trace.StatusCode.ERROR, error[:500]))
        if retryable is not None:
            current_span.set_attribute("replicator.retryable", retryable)


def replicate_span(task: Any) -> AbstractContextManager[Span]:
    """The span of one replication task (a `replicator.journal.Task`), child of the
    trace context journaled with it, so one push's journey across sites is one trace."""
    if _tracer is None:
        return _NOOP
    return span(
        "replicate",
        parent=getattr(task, "trace_context", None),
        rule=task.rule,
        action=task.action,
        source=task.source_site,
        target=task.target_site,
        repository=task.repository,
        target_repository=task.target_repository,
        tag=task.tag,
        digest=task.digest,
        task_id=task.id,
        attempt=task.attempts,
    )


def gc_span(name: str, **attributes: Any) -> AbstractContextManager[Span]:
    """A span for garbage collection, named `gc <name>`:

        with gc_span("run", dry_run=dry_run, policies=len(policies)) as s:
            with gc_span("policy", policy=p.name, site=site, mode=p.mode):
                with gc_span("mark", site=site): ...
                with gc_span("sweep", site=site, mode="storage") as sweep:
                    ...
                    sweep.set_attribute("replicator.deleted_blobs", n)

    Attribute keys without a dot get the `replicator.` prefix; None values are dropped.
    A no-op when telemetry is off.
    """
    return span(f"gc {name}", **attributes)


def trace_context() -> dict[str, str]:
    """The current span's W3C carrier ({} when there is none): what to store or send on."""
    carrier: dict[str, str] = {}
    if _tracer is not None:
        propagate.inject(carrier)
    return carrier


# -------------------------------------------------------------------------- metrics


def bridge_metrics(metrics: Metrics, meter_provider: MeterProvider) -> None:
    """Mirror the daemon's own Prometheus metrics as observable OTel instruments, read
    at export time from the same registry a scrape reads.

    Counters become observable counters (named without `_total`, which Prometheus
    back-ends add again), gauges observable gauges; histograms export their count
    and sum as two counters. Process metrics are left to OTel's own instrumentation.
    A failing read exports nothing for that metric.
    """
    from opentelemetry.metrics import CallbackOptions, Observation

    from replicator.metrics import PREFIX

    meter = meter_provider.get_meter(SCOPE, __version__)

    def observe(family_name: str, sample_name: str) -> Any:
        def callback(_options: CallbackOptions) -> Iterator[Observation]:
            try:
                samples = [
                    sample
                    for family in metrics.registry.collect()
                    if family.name == family_name
                    for sample in family.samples
                    if sample.name == sample_name
                ]
            except Exception as exc:
                log.debug("telemetry: reading %s failed: %s", sample_name, exc)
                return
            for sample in samples:
                yield Observation(sample.value, dict(sample.labels))

        return callback

    for family in metrics.registry.collect():
        name = family.name
        if not name.startswith(PREFIX):
            continue
        if family.type == "counter":
            meter.create_observable_counter(
                name, [observe(name, f"{name}_total")], description=family.documentation
            )
        elif family.type == "gauge":
            meter.create_observable_gauge(
                name, [observe(name, name)], description=family.documentation
            )
        elif family.type == "histogram":
            for part in ("count", "sum"):
                meter.create_observable_counter(
                    f"{name}_{part}",
                    [observe(name, f"{name}_{part}")],
                    description=family.documentation,
                )
