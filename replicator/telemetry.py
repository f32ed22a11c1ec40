"""OpenTelemetry traces and metrics: one trace per pushed image, across sites.

Why: a push at one site becomes a webhook, an MQTT message, tasks in other
regions' journals and blob transfers; when a copy is slow or fails, the trace
shows where the time went (upload vs. mount vs. waiting) in every region at once.

Off by default and then nearly free: every helper returns a shared no-op context
until `setup_telemetry` enables it. The standard OpenTelemetry environment is
honoured, so the tool fits a collector set up for anything else:

  OTEL_SDK_DISABLED=true          everything off, whatever else is set
  OTEL_TRACES_EXPORTER            otlp, console, none (comma-separated list)
  OTEL_METRICS_EXPORTER           otlp, none
  OTEL_EXPORTER_OTLP_ENDPOINT     (and _TRACES_/_METRICS_ variants, _HEADERS, ...)
                                  read by the OTLP/HTTP exporter; setting it turns
                                  OTLP on unless the exporter variables say otherwise
  OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES   the resource
  OTEL_TRACES_SAMPLER(_ARG)       sampling (default parentbased_always_on)
  OTEL_BSP_*, OTEL_METRIC_EXPORT_INTERVAL       batching and export intervals

The configuration's `telemetry.otlp_endpoint` does the same as the endpoint variable
(OTLP needs the `otlp` extra, `pip install 'registry-replicator[otlp]'`).

Spans. Our own attributes are namespaced `replicator.*`, one name per meaning:
`source`/`target` are site names, `repository` is the source repository and
`target_repository` the one written, `reference` what was asked for, `attempt`
counts from 1. Protocol spans use the OpenTelemetry semantic conventions (HTTP,
messaging) and their span kinds:

  POST /events/{site}  SERVER    a webhook (http.*, url.*, client.address)
    event                        a registry event taken in (site, action, repository,
                                 tag, digest, event_id)
      <topic> publish  PRODUCER  the event sent over MQTT (messaging.*); its W3C
                                 traceparent travels in the message's user properties
  <topic> process      CONSUMER  the event received by any daemon; stored with every
                                 task it fans out to
    replicate                    one task (rule, action, source, target, repository,
                                 target_repository, tag, digest, task_id, attempt)
      copy                       one image copied (source, target, repository,
                                 target_repository, reference, status)
        copy manifest            one manifest written (digest, media_type, target,
                                 target_repository, tag)
          blob                   one blob made present (digest, bytes, target,
                                 target_repository, outcome, attempt)
            GET/HEAD/PUT/...  CLIENT   every registry request (http.request.method,
                                 url.full without its query, server.address,
                                 server.port, http.response.status_code, error.type)
  registry-replicator <command>  the root of a CLI run: copy, sync, failover,
                                 failback, gc (see `command`); failover adds the site
                                 names promoted and lost (and recorded), failback the
                                 site returning and the promoted one it caught up from
                                 (and failovers_ended); their copies are child spans
  gc <name>                      garbage collection, see `gc_span`

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
from opentelemetry.trace import Span, SpanKind, Tracer

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
    if _env_true("OTEL_SDK_DISABLED"):
        shutdown_telemetry()
        _current = Telemetry()
        return _current
    endpoint = getattr(section, "otlp_endpoint", None)
    endpoint = str(endpoint) if endpoint else None
    traces = _exporter_names("OTEL_TRACES_EXPORTER", {"otlp", "console", "none"})
    metric_names = _exporter_names("OTEL_METRICS_EXPORTER", {"otlp", "none"})
    env_endpoint = bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    otlp_traces = (
        "otlp" in traces
        if traces is not None
        else bool(endpoint or env_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
    )
    otlp_metrics = (
        "otlp" in metric_names
        if metric_names is not None
        else bool(endpoint or env_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"))
    )

    span_exporters: list[tuple[SpanExporter, bool]] = []  # (exporter, batched)
    readers: list[MetricReader] = []
    if otlp_traces or otlp_metrics:
        trace_exporter_cls, metric_exporter_cls = _otlp_classes(
            "telemetry.otlp_endpoint" if endpoint else "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        # The configured endpoint wins; without one the exporters read the OTEL_* variables.
        if otlp_traces:
            kwargs = {"endpoint": otlp_url(endpoint, "traces")} if endpoint else {}
            span_exporters.append((trace_exporter_cls(**kwargs), True))
        if otlp_metrics:
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

            kwargs = {"endpoint": otlp_url(endpoint, "metrics")} if endpoint else {}
            readers.append(PeriodicExportingMetricReader(metric_exporter_cls(**kwargs)))
    if traces is not None and "console" in traces:
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

    attributes: dict[str, str] = {"service.version": __version__}
    service_name = _service_name(section)
    if service_name is not None:  # else OTEL_SERVICE_NAME, read by Resource.create
        attributes["service.name"] = service_name
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
    if otlp_traces or otlp_metrics:
        log.info(
            "telemetry: exporting %s over OTLP to %s",
            " and ".join(n for n, on in (("traces", otlp_traces), ("metrics", otlp_metrics)) if on),
            endpoint or "the OTEL_EXPORTER_OTLP_* endpoint",
        )
    return handle


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() == "true"


def _exporter_names(variable: str, known: set[str]) -> set[str] | None:
    """The exporters an OTEL_*_EXPORTER variable names (None when it is unset)."""
    raw = os.environ.get(variable, "").strip()
    if not raw:
        return None
    names = {part.strip().lower() for part in raw.split(",") if part.strip()}
    unknown = sorted(names - known)
    if unknown:
        raise ConfigError(
            f"{variable}={raw!r}: unknown exporter {', '.join(unknown)}; "
            f"use {', '.join(sorted(known))}"
        )
    return names - {"none"}


def _service_name(section: Any) -> str | None:
    """A service name set in the configuration, else OTEL_SERVICE_NAME's (None: let the
    SDK read it), else ours."""
    configured = getattr(section, "service_name", None)
    fields_set = getattr(section, "model_fields_set", None)
    explicit = configured if fields_set is None or "service_name" in fields_set else None
    if explicit:
        return str(explicit)
    if os.environ.get("OTEL_SERVICE_NAME"):
        return None
    return str(configured or "registry-replicator")


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


def _otlp_classes(setting: str) -> tuple[type, type]:
    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        raise ConfigError(
            f"OTLP export is asked for, but its exporter is not installed; {OTLP_EXTRA_HINT}",
            path=setting,
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
    name: str,
    parent: Mapping[str, str] | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
    **attributes: Any,
) -> AbstractContextManager[Span]:
    """A span around a block: `with telemetry.span("copy manifest", digest=d) as s:`.

    `parent` is a W3C carrier ({'traceparent': ...}) to continue a trace from
    elsewhere; by default the current span is the parent. An exception leaving the
    block is recorded and marks the span as an error. A no-op when telemetry is off.
    """
    if _tracer is None:
        return _NOOP
    context = propagate.extract(dict(parent)) if parent else None
    return _tracer.start_as_current_span(
        name, context=context, kind=kind, attributes=_attrs(attributes)
    )


def client_span(method: str, url: str) -> AbstractContextManager[Span]:
    """The CLIENT span of one registry request (HTTP semantic conventions). The URL's
    query is left out: upload locations carry the registry's session state there."""
    if _tracer is None:
        return _NOOP
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return _tracer.start_as_current_span(
        method,
        kind=SpanKind.CLIENT,
        attributes={
            "http.request.method": method,
            "url.full": urllib.parse.urlunsplit(parts._replace(query="", fragment="")),
            "server.address": parts.hostname or "",
            "server.port": port,
        },
    )


# Answers that are part of the protocol's normal flow, not failures: an existence
# probe's 404 and the 401 challenge that starts authentication.
_EXPECTED_CLIENT_STATUS = frozenset({401, 404})


def end_http(current_span: Span, status: int, *, server: bool = False) -> None:
    """Record an HTTP answer on a client or server span; marks failures as errors
    (5xx always, 4xx on client spans except the expected 401/404)."""
    if not current_span.is_recording():
        return
    current_span.set_attribute("http.response.status_code", status)
    failed = status >= 500 or (
        not server and status >= 400 and status not in _EXPECTED_CLIENT_STATUS
    )
    if failed:
        current_span.set_attribute("error.type", str(status))
        current_span.set_status(trace.Status(trace.StatusCode.ERROR))


def server_span(
    method: str, route: str, url: str, headers: Mapping[str, str], client: str | None
) -> AbstractContextManager[Span]:
    """The SERVER span of one webhook request, continuing a caller's trace if it sent one."""
    if _tracer is None:
        return _NOOP
    parts = urllib.parse.urlsplit(url)
    attributes: dict[str, Any] = {
        "http.request.method": method,
        "http.route": route,
        "url.path": parts.path,
        "url.scheme": parts.scheme,
        "server.address": parts.hostname or "",
        "server.port": parts.port or (443 if parts.scheme == "https" else 80),
    }
    if client:
        attributes["client.address"] = client
    agent = headers.get("user-agent")
    if agent:
        attributes["user_agent.original"] = agent[:256]
    carrier = {k: v for k in ("traceparent", "tracestate") if (v := headers.get(k))}
    return _tracer.start_as_current_span(
        f"{method} {route}",
        context=propagate.extract(carrier) if carrier else None,
        kind=SpanKind.SERVER,
        attributes=attributes,
    )


def messaging_span(
    operation: str,
    topic: str,
    template: str,
    *,
    message_id: str,
    broker: tuple[str, int],
    parent: Mapping[str, str] | None = None,
) -> AbstractContextManager[Span]:
    """A PRODUCER (`publish`) or CONSUMER (`process`) span of one MQTT message
    (messaging semantic conventions); named after the topic's template so span names
    stay few however many repositories there are."""
    if _tracer is None:
        return _NOOP
    producer = operation == "publish"
    context = propagate.extract(dict(parent)) if parent else None
    return _tracer.start_as_current_span(
        f"{operation} {template}",
        context=context,
        kind=SpanKind.PRODUCER if producer else SpanKind.CONSUMER,
        attributes={
            "messaging.system": "mqtt",
            "messaging.operation.name": operation,
            "messaging.operation.type": "send" if producer else "process",
            "messaging.destination.name": topic,
            "messaging.destination.template": template,
            "messaging.message.id": message_id,
            "server.address": broker[0],
            "server.port": broker[1],
        },
    )


@contextlib.contextmanager
def command(name: str, config: Any = None, **attributes: Any) -> Iterator[Span]:
    """Trace one CLI run as a root span `registry-replicator <name>`, set up from the
    configuration and the OTEL_* environment, and flushed before the process exits
    (a short command would otherwise lose its batch). Telemetry an embedding program
    set up is used as it is and left running."""
    before = _current
    handle = setup_telemetry(config)
    try:
        with span(f"registry-replicator {name}", **attributes) as root:
            yield root
    finally:
        if handle is not before and (handle.enabled or handle.meter_provider is not None):
            shutdown_telemetry()


def end_command(root: Span, exit_code: int) -> None:
    """Record a CLI run's exit code on its root span; non-zero is an error."""
    if root.is_recording():
        root.set_attribute("process.exit.code", exit_code)
        if exit_code:
            root.set_status(trace.Status(trace.StatusCode.ERROR, f"exit code {exit_code}"))


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
        attempt=max(1, task.attempts),
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
