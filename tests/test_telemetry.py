"""OpenTelemetry: span tree of a real copy, trace context carried through tasks and MQTT,
the metrics bridge, and OTLP export from real daemon processes to an OTLP/HTTP receiver."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from replicator import telemetry
from replicator.blob_index import BlobIndex
from replicator.copy import CopyEngine
from replicator.errors import ConfigError
from replicator.journal import Task
from replicator.metrics import Metrics
from replicator.registry.client import RegistryClient
from replicator.registry.site import SiteEndpoint
from tests.harness.daemon import DaemonProcess, notify_kwargs, site_config
from tests.harness.images import Pusher, assert_image_complete, digest_of, layer_bytes
from tests.harness.util import free_port, wait_until

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    telemetry.setup_telemetry(None, span_exporter=exporter)
    yield exporter
    telemetry.shutdown_telemetry()


def make_task(**overrides) -> Task:
    fields = dict(
        id=7,
        key="k",
        rule="apps",
        action="copy",
        source_site="src",
        target_site="dst",
        repository="team/b",
        target_repository="team/b",
        tag="v1",
        digest=None,
        state="leased",
        attempts=1,
        next_try=0.0,
        lease_owner="me",
        lease_until=None,
        last_error=None,
        event_id="e1",
        trace_context=None,
    )
    fields.update(overrides)
    return Task(**fields)


def client(reg, name: str) -> RegistryClient:
    return RegistryClient(SiteEndpoint(name=name, url=reg.url, insecure=True))


def children(all_spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    """Our own (INTERNAL) child spans; registry requests are CLIENT spans, see `requests`."""
    return [
        s
        for s in all_spans
        if s.parent is not None
        and s.parent.span_id == parent.context.span_id
        and s.kind == SpanKind.INTERNAL
    ]


def requests(all_spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    """The CLIENT spans (one per registry request) directly under `parent`."""
    return [
        s
        for s in all_spans
        if s.parent is not None
        and s.parent.span_id == parent.context.span_id
        and s.kind == SpanKind.CLIENT
    ]


def one(all_spans: list[ReadableSpan], name: str) -> ReadableSpan:
    found = [s for s in all_spans if s.name == name]
    assert len(found) == 1, f"expected one {name!r} span, got {[s.name for s in all_spans]}"
    return found[0]


# ------------------------------------------------------------------ in process


async def test_copy_span_tree_with_blob_outcomes(two_registries, spans):
    src, dst = two_registries
    base, own, preplaced = (
        layer_bytes("base", 20_000),
        layer_bytes("own-b", 3000),
        layer_bytes("pre", 2000),
    )
    with Pusher(src.url) as p:
        p.push_image("team/a", "v1", [base])
        image = p.push_image("team/b", "v1", [base, own, preplaced])
    with Pusher(dst.url) as p:
        p.push_blob("team/b", preplaced)  # already at the target: "existing"
    engine = CopyEngine(BlobIndex())
    async with client(src, "src") as s, client(dst, "dst") as d:
        first = await engine.copy(s, "team/a", "v1", d, "team/a")  # base lands in team/a
        assert first.status == "copied"
        spans.clear()
        with telemetry.replicate_span(make_task()):
            result = await engine.copy(s, "team/b", "v1", d, "team/b")
    assert result.status == "copied"
    assert_image_complete(dst.url, "team/b", "v1")

    finished = list(spans.get_finished_spans())
    replicate = one(finished, "replicate")
    assert replicate.parent is None
    assert replicate.attributes["replicator.rule"] == "apps"
    assert replicate.attributes["replicator.source"] == "src"
    assert replicate.attributes["replicator.target"] == "dst"
    assert replicate.attributes["replicator.repository"] == "team/b"
    assert replicate.attributes["replicator.tag"] == "v1"
    copy = one(finished, "copy")
    assert children(finished, replicate) == [copy]
    assert copy.attributes["replicator.status"] == "copied"
    manifest = one(finished, "copy manifest")
    assert children(finished, copy) == [manifest]
    assert manifest.attributes["replicator.digest"] == image.digest
    assert manifest.attributes["replicator.target"] == "dst"
    assert manifest.attributes["replicator.tag"] == "v1"

    blobs = children(finished, manifest)
    assert sorted(s.name for s in blobs) == ["blob"] * 4  # config + 3 layers
    assert all(s.kind == SpanKind.INTERNAL for s in (replicate, copy, manifest, *blobs))
    by_digest = {s.attributes["replicator.digest"]: s.attributes for s in blobs}
    config_digest = image.blobs[0]
    assert set(by_digest) == {config_digest, digest_of(base), digest_of(own), digest_of(preplaced)}
    assert by_digest[digest_of(base)]["replicator.outcome"] == "mounted"
    assert by_digest[digest_of(base)]["replicator.mounted_from"] == "team/a"
    assert by_digest[digest_of(own)]["replicator.outcome"] == "uploaded"
    assert by_digest[digest_of(own)]["replicator.bytes"] == 3000
    assert by_digest[config_digest]["replicator.outcome"] == "uploaded"
    assert by_digest[digest_of(preplaced)]["replicator.outcome"] == "existing"
    for attrs in by_digest.values():
        assert attrs["replicator.target"] == "dst"
        assert attrs["replicator.target_repository"] == "team/b"
    # one attribute name per meaning: sites are source/target, repositories
    # repository (source) and target_repository (written)
    assert copy.attributes["replicator.source"] == "src"
    assert copy.attributes["replicator.target"] == "dst"
    assert copy.attributes["replicator.repository"] == "team/b"
    assert copy.attributes["replicator.target_repository"] == "team/b"
    assert copy.attributes["replicator.reference"] == "v1"
    assert manifest.attributes["replicator.target_repository"] == "team/b"
    # every registry request is a CLIENT span with the HTTP semantic conventions
    put = [r for r in requests(finished, manifest) if r.attributes["http.request.method"] == "PUT"]
    assert len(put) == 1
    assert put[0].name == "PUT"
    assert put[0].attributes["url.full"] == f"{dst.url}/v2/team/b/manifests/v1"
    assert put[0].attributes["server.address"] == "127.0.0.1"
    assert put[0].attributes["server.port"] == int(dst.url.rsplit(":", 1)[1])
    assert put[0].attributes["http.response.status_code"] == 201
    uploads = [r for b in blobs for r in requests(finished, b)]
    assert uploads and all("?" not in r.attributes["url.full"] for r in uploads)
    assert all(r.status.status_code.name == "UNSET" for r in uploads)
    # one trace for the whole task
    assert {s.context.trace_id for s in finished} == {replicate.context.trace_id}


async def test_failed_copy_marks_its_span(two_registries, spans):
    src, dst = two_registries
    async with client(src, "src") as s, client(dst, "dst") as d:
        result = await CopyEngine().copy(s, "team/none", "v1", d, "team/none")
    assert result.status == "failed"
    copy = one(list(spans.get_finished_spans()), "copy")
    assert copy.status.status_code.name == "ERROR"
    assert any(e.name == "exception" for e in copy.events)


def test_replicate_span_is_child_of_the_task_trace_context(spans):
    task = make_task(trace_context={"traceparent": TRACEPARENT})
    with telemetry.replicate_span(task):
        with telemetry.span("copy manifest"):
            carried = telemetry.trace_context()
        telemetry.record_failure("dst: 503 Service Unavailable", retryable=True)
    finished = list(spans.get_finished_spans())
    replicate = one(finished, "replicate")
    assert format(replicate.context.trace_id, "032x") == TRACE_ID
    assert replicate.parent is not None and replicate.parent.is_remote
    assert format(replicate.parent.span_id, "016x") == PARENT_SPAN_ID
    assert replicate.status.status_code.name == "ERROR"
    assert replicate.attributes["replicator.retryable"] is True
    assert replicate.attributes["replicator.task_id"] == 7
    inner = one(finished, "copy manifest")
    assert inner.parent.span_id == replicate.context.span_id
    # what would be sent on continues the same trace
    assert carried["traceparent"].split("-")[1] == TRACE_ID


def test_garbage_trace_context_starts_a_new_trace(spans):
    with telemetry.replicate_span(make_task(trace_context={"traceparent": "nonsense"})):
        pass
    replicate = one(list(spans.get_finished_spans()), "replicate")
    assert replicate.parent is None


def test_gc_span_names_and_attributes(spans):
    with telemetry.gc_span("run", dry_run=True, policy=None) as run:
        with telemetry.gc_span("sweep", site="eu", mode="storage") as sweep:
            sweep.set_attribute("replicator.deleted_blobs", 3)
    finished = list(spans.get_finished_spans())
    sweep_span, run_span = one(finished, "gc sweep"), one(finished, "gc run")
    assert sweep_span.parent.span_id == run_span.context.span_id
    assert dict(run_span.attributes) == {"replicator.dry_run": True}
    assert sweep_span.attributes["replicator.deleted_blobs"] == 3
    assert run is not None


def test_off_is_a_shared_noop():
    telemetry.shutdown_telemetry()
    telemetry.setup_telemetry(None)  # nothing configured: stays off
    assert not telemetry.enabled()
    first = telemetry.span("copy", target="x")
    assert first is telemetry.span("blob") is telemetry.replicate_span(make_task())
    with first as span:
        span.set_attribute("replicator.ignored", 1)
        telemetry.set_attributes(outcome="uploaded")
        telemetry.record_failure("nothing happens")
    assert telemetry.trace_context() == {}


def test_unconfigured_setup_keeps_an_embedding_programs_setup(spans):
    telemetry.setup_telemetry(None)  # what Daemon.__init__ does without config
    with telemetry.span("still traced"):
        pass
    assert [s.name for s in spans.get_finished_spans()] == ["still traced"]


def test_metrics_bridge_mirrors_prometheus_metrics():
    metrics = Metrics()
    reader = InMemoryMetricReader()
    handle = telemetry.setup_telemetry(None, metric_reader=reader, metrics=metrics)
    try:
        metrics.blobs.inc(3, target="eu", outcome="mounted")
        metrics.bytes_uploaded.inc(4096, target="eu")
        metrics.tasks.set_function(lambda: {("pending",): 5, ("dead",): 1})
        metrics.webhook_seconds.observe(0.25)
        metrics.webhook_seconds.observe(0.5)
        metrics.replication_lag.set_function(lambda: 1 / 0)  # a failing read: skipped
        points = _points(reader)
        p = "registry_replicator_"
        assert points[p + "blobs"] == {(("outcome", "mounted"), ("target", "eu")): 3}
        assert points[p + "uploaded_bytes"] == {(("target", "eu"),): 4096}
        assert points[p + "tasks"] == {(("state", "pending"),): 5, (("state", "dead"),): 1}
        assert points[p + "webhook_duration_seconds_count"] == {(): 2}
        assert points[p + "webhook_duration_seconds_sum"] == {(): 0.75}
        assert p + "replication_lag_seconds" not in points
        metrics.blobs.inc(2, target="eu", outcome="mounted")
        assert _points(reader)[p + "blobs"] == {(("outcome", "mounted"), ("target", "eu")): 5}
    finally:
        handle.shutdown()


def _points(reader: InMemoryMetricReader) -> dict[str, dict[tuple, float]]:
    out: dict[str, dict[tuple, float]] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for point in metric.data.data_points:
                    if not metric.data.data_points:
                        continue
                    key = tuple(sorted(point.attributes.items()))
                    out.setdefault(metric.name, {})[key] = point.value
    return out


def test_otlp_without_the_extra_is_a_clear_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    with pytest.raises(ConfigError) as err:
        telemetry.setup_telemetry(_TelemetryConfig("http://127.0.0.1:4318"))
    assert err.value.path == "telemetry.otlp_endpoint"
    assert "registry-replicator[otlp]" in str(err.value)
    assert not telemetry.enabled()


def test_otlp_url():
    assert telemetry.otlp_url("http://c:4318", "traces") == "http://c:4318/v1/traces"
    assert telemetry.otlp_url("https://c/otel/", "metrics") == "https://c/otel/v1/metrics"
    assert telemetry.otlp_url("http://c:4318/v1/traces", "metrics") == "http://c:4318/v1/metrics"


class _TelemetryConfig:
    def __init__(self, endpoint: str) -> None:
        self.otlp_endpoint = endpoint
        self.service_name = "test"


# ------------------------------------------------- real daemons, real OTLP export


# OTLP's SpanKind enum (opentelemetry/proto/trace/v1/trace.proto)
SPAN_KINDS = {
    0: "UNSPECIFIED",
    1: "INTERNAL",
    2: "SERVER",
    3: "CLIENT",
    4: "PRODUCER",
    5: "CONSUMER",
}


class OtlpReceiver:
    """A minimal OTLP/HTTP (protobuf) receiver: keeps every span and metric name posted."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
            ExportMetricsServiceRequest,
        )
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        self.spans: list[dict] = []
        self.metric_names: set[str] = set()
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path == "/v1/traces":
                    request = ExportTraceServiceRequest.FromString(body)
                    receiver._add_spans(request)
                elif self.path == "/v1/metrics":
                    request = ExportMetricsServiceRequest.FromString(body)
                    with receiver.lock:
                        receiver.metric_names |= {
                            m.name
                            for rm in request.resource_metrics
                            for sm in rm.scope_metrics
                            for m in sm.metrics
                        }
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def _add_spans(self, request) -> None:
        for rs in request.resource_spans:
            resource = {a.key: a.value.string_value for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    attrs = {}
                    for a in s.attributes:
                        v = a.value
                        attrs[a.key] = json.loads(json.dumps(getattr(v, v.WhichOneof("value"))))
                    with self.lock:
                        self.spans.append(
                            {
                                "name": s.name,
                                "trace_id": s.trace_id.hex(),
                                "span_id": s.span_id.hex(),
                                "parent": s.parent_span_id.hex(),
                                "instance": resource.get("service.instance.id"),
                                "service": resource.get("service.name"),
                                "kind": SPAN_KINDS[s.kind],
                                "attributes": attrs,
                            }
                        )

    def snapshot(self) -> list[dict]:
        with self.lock:
            return list(self.spans)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def otlp():
    receiver = OtlpReceiver()
    yield receiver
    receiver.close()


def test_one_push_is_one_trace_across_two_daemons(registry_factory, mosquitto, otlp, tmp_path):
    """Registry A notifies daemon 'intake', which publishes on MQTT; daemon 'worker'
    (another process) copies to B. Both export OTLP: the worker's spans continue the
    intake's trace, carried in the MQTT message and the task row."""
    intake_port = free_port()
    a = registry_factory("a", **notify_kwargs(intake_port, "a"))
    b = registry_factory("b")
    sites = {"a": site_config(a), "b": site_config(b)}
    env = {"OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_METRIC_EXPORT_INTERVAL": "300"}
    telemetry_cfg = {"otlp_endpoint": otlp.url}
    intake = DaemonProcess(
        tmp_path / "intake",
        port=intake_port,
        name="intake",
        env=env,
        config={
            "sites": sites,
            "rules": [],
            "telemetry": telemetry_cfg,
            "mqtt": {"url": mosquitto.url},
        },
    )
    worker = DaemonProcess(
        tmp_path / "worker",
        name="worker",
        env=env,
        config={
            "sites": sites,
            "telemetry": telemetry_cfg,
            "rules": [{"name": "ab", "from": "a", "to": ["b"], "repositories": ["team/**"]}],
            "mqtt": {"url": mosquitto.url},
        },
    )
    try:
        worker.start()
        intake.start()
        with Pusher(a.url) as p:
            image = p.push_image("team/app", "v1", [layer_bytes("journey", 5000)])
        wait_until(lambda: _complete(b, "team/app", "v1"), timeout=30, what="copy to b")

        def journey():
            """The push's trace, once every span of it has been exported (spans end, and
            are exported in batches, innermost first)."""
            got = otlp.snapshot()
            for event in (
                s
                for s in got
                if s["name"] == "event" and s["attributes"].get("replicator.tag") == "v1"
            ):
                trace = [s for s in got if s["trace_id"] == event["trace_id"]]
                names = sorted(s["name"] for s in trace if s["kind"] == "INTERNAL")
                kinds = {s["kind"] for s in trace}
                if (
                    names == ["blob", "blob", "copy", "copy manifest", "event", "replicate"]
                    and {
                        "SERVER",
                        "PRODUCER",
                        "CONSUMER",
                        "CLIENT",
                    }
                    <= kinds
                ):
                    return event, trace
            return None

        event, trace = wait_until(journey, timeout=20, what="the push's trace over OTLP")
        assert event["instance"] == intake.instance_id
        by_id = {s["span_id"]: s for s in trace}
        replicate = next(s for s in trace if s["name"] == "replicate")
        assert replicate["instance"] == worker.instance_id
        # webhook (SERVER) -> event -> MQTT publish (PRODUCER) -> receive (CONSUMER)
        # in the other process -> replicate
        consumer = by_id[replicate["parent"]]
        assert consumer["kind"] == "CONSUMER" and consumer["instance"] == worker.instance_id
        assert consumer["attributes"]["messaging.system"] == "mqtt"
        assert consumer["attributes"]["messaging.destination.name"].endswith("/a/team/app")
        producer = by_id[consumer["parent"]]
        assert producer["kind"] == "PRODUCER" and producer["instance"] == intake.instance_id
        assert (
            producer["attributes"]["messaging.message.id"]
            == event["attributes"]["replicator.event_id"]
        )
        assert producer["parent"] == event["span_id"]
        server = by_id[event["parent"]]
        assert server["kind"] == "SERVER" and server["name"] == "POST /events/{site}"
        assert server["attributes"]["http.route"] == "/events/{site}"
        assert server["attributes"]["http.response.status_code"] == 202
        assert server["parent"] == ""
        assert replicate["attributes"]["replicator.rule"] == "ab"
        assert replicate["attributes"]["replicator.target"] == "b"
        assert event["attributes"]["replicator.digest"] == image.digest
        blob_spans = [s for s in trace if s["name"] == "blob"]
        assert {s["attributes"]["replicator.digest"] for s in blob_spans} == set(image.blobs)
        assert {s["attributes"]["replicator.outcome"] for s in blob_spans} == {"uploaded"}
        for blob in blob_spans:  # blob -> copy manifest -> copy -> replicate
            chain = [by_id[blob["parent"]]]
            while chain[-1]["name"] != "replicate":
                chain.append(by_id[chain[-1]["parent"]])
            assert [s["name"] for s in chain] == ["copy manifest", "copy", "replicate"]
        # and the counters reach the collector through the metrics bridge
        wait_until(
            lambda: "registry_replicator_blobs" in otlp.metric_names,
            timeout=10,
            what="metrics exported over OTLP",
        )
    finally:
        intake.stop()
        worker.stop()


def _complete(reg, repo: str, ref: str) -> bool:
    try:
        assert_image_complete(reg.url, repo, ref)
    except AssertionError:
        return False
    return True


# ---------------------------------------------- the standard OTEL_* environment


def _otel_env(**values: str) -> dict[str, str]:
    """The test process's environment without OTEL_* variables, plus `values`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return env | {"OTEL_BSP_SCHEDULE_DELAY": "50"} | values


def test_cli_copy_is_traced_from_the_otel_environment(two_registries, otlp):
    """`copy` as an operator runs it, with only the standard variables a collector
    set-up provides: one root span, the copy under it, every request a CLIENT span,
    all exported before the process exits."""
    src, dst = two_registries
    with Pusher(src.url) as p:
        p.push_image("team/app", "v1", [layer_bytes("otel-env", 3000)])
    env = _otel_env(OTEL_EXPORTER_OTLP_ENDPOINT=otlp.url, OTEL_SERVICE_NAME="mirror-job")
    out = subprocess.run(
        [
            *(sys.executable, "-m", "replicator", "copy", "--insecure"),
            *(f"{src.host}/team/app:v1", f"{dst.host}/mirror/app"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    got = otlp.snapshot()  # flushed at exit: no waiting
    root = [s for s in got if s["name"] == "registry-replicator copy"]
    assert len(root) == 1 and root[0]["parent"] == ""
    assert root[0]["attributes"]["process.exit.code"] == 0
    trace = [s for s in got if s["trace_id"] == root[0]["trace_id"]]
    assert len(trace) == len(got)  # one trace
    assert {s["service"] for s in trace} == {"mirror-job"}
    copy = next(s for s in trace if s["name"] == "copy")
    assert copy["parent"] == root[0]["span_id"]
    assert copy["attributes"]["replicator.target_repository"] == "mirror/app"
    client_spans = [s for s in trace if s["kind"] == "CLIENT"]
    assert {s["attributes"]["server.port"] for s in client_spans} == {
        int(src.url.rsplit(":", 1)[1]),
        int(dst.url.rsplit(":", 1)[1]),
    }
    assert {"GET", "PUT"} <= {s["attributes"]["http.request.method"] for s in client_spans}


def test_cli_sync_and_gc_are_traced_with_exit_codes(two_registries, spans, tmp_path):
    """In process (an embedding program's exporter is used and left running): sync and
    gc each get their root span; a failing run's root is an error with its exit code."""
    from replicator.cli import main

    src, dst = two_registries
    with Pusher(src.url) as p:
        p.push_image("team/app", "v1", [layer_bytes("otel-sync", 2000)])
    config = tmp_path / "config.yaml"
    config.write_text(
        f"journal: {tmp_path / 'j.db'}\n"
        "sites:\n"
        f"  a: {{url: '{src.url}', insecure: true}}\n"
        f"  b: {{url: '{dst.url}', insecure: true}}\n"
        "rules:\n"
        "  - {name: ab, from: a, to: [b], repositories: ['team/**']}\n"
        "gc:\n"
        "  policies:\n"
        "    - {name: tidy, sites: [b], repositories: ['team/**'], keep: {tags: ['*']}}\n"
    )
    assert main(["sync", "-c", str(config)]) == 0
    assert main(["gc", "-c", str(config), "--dry-run"]) == 0
    finished = list(spans.get_finished_spans())
    sync = one(finished, "registry-replicator sync")
    assert sync.parent is None and sync.attributes["process.exit.code"] == 0
    assert any(s.name == "copy" and s.context.trace_id == sync.context.trace_id for s in finished)
    gc = one(finished, "registry-replicator gc")
    assert gc.attributes["replicator.dry_run"] is True
    assert telemetry.enabled()  # the embedding program's setup is still there

    spans.clear()
    # a target that speaks plain HTTP where https is configured fails at once
    config.write_text(config.read_text().replace(dst.url, dst.url.replace("http:", "https:")))
    assert main(["sync", "-c", str(config)]) == 1
    failed = one(list(spans.get_finished_spans()), "registry-replicator sync")
    assert failed.status.status_code.name == "ERROR"
    assert failed.attributes["process.exit.code"] == 1


def test_otel_sdk_disabled_wins(monkeypatch):
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    handle = telemetry.setup_telemetry(_TelemetryConfig("http://127.0.0.1:4318"))
    assert not handle.enabled and not telemetry.enabled()


def test_otel_traces_sampler_is_honoured(monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    exporter = InMemorySpanExporter()
    telemetry.setup_telemetry(None, span_exporter=exporter)
    try:
        with telemetry.span("copy"):
            pass
        assert exporter.get_finished_spans() == ()
    finally:
        telemetry.shutdown_telemetry()


def test_unknown_otel_exporter_names_the_variable(monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(ConfigError) as err:
        telemetry.setup_telemetry(None)
    assert "OTEL_TRACES_EXPORTER" in str(err.value) and "zipkin" in str(err.value)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert not telemetry.setup_telemetry(None).enabled


def test_configured_service_name_wins_over_the_environment(monkeypatch):
    from replicator.config.models import TelemetryConfig

    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    exporter = InMemorySpanExporter()
    telemetry.setup_telemetry(TelemetryConfig(service_name="from-config"), span_exporter=exporter)
    try:
        with telemetry.span("x"):
            pass
        (only,) = exporter.get_finished_spans()
        assert only.resource.attributes["service.name"] == "from-config"
    finally:
        telemetry.shutdown_telemetry()
    exporter = InMemorySpanExporter()  # a provider's shutdown shuts its exporters
    telemetry.setup_telemetry(TelemetryConfig(), span_exporter=exporter)
    try:
        with telemetry.span("x"):
            pass
        (only,) = exporter.get_finished_spans()
        assert only.resource.attributes["service.name"] == "from-env"
    finally:
        telemetry.shutdown_telemetry()
