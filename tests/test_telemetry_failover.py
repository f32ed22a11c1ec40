"""Traces of a disaster recovery, run as an operator runs it (the CLI, in process so the
spans land in an in-memory exporter): `failover` and `failback` are one trace each,
whose root names the sites involved and whose copies name their source and target; the
lost site gets no request at all during the failover."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from replicator import telemetry
from replicator.cli import main
from tests.harness.images import Pusher, layer_bytes
from tests.test_failover import make_config


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    telemetry.setup_telemetry(None, span_exporter=exporter)
    yield exporter
    telemetry.shutdown_telemetry()


def root(finished: list[ReadableSpan], name: str) -> ReadableSpan:
    found = [s for s in finished if s.name == name]
    assert len(found) == 1, [s.name for s in finished]
    assert found[0].parent is None
    return found[0]


def in_trace(finished: list[ReadableSpan], top: ReadableSpan, name: str) -> list[ReadableSpan]:
    return [s for s in finished if s.name == name and s.context.trace_id == top.context.trace_id]


def test_failover_and_failback_traces_name_their_sites(registry_factory, tmp_path, spans):
    primary, a, b = registry_factory("p"), registry_factory("a"), registry_factory("b")
    _, path = make_config(
        tmp_path,
        {"p": primary, "a": a, "b": b},
        [{"name": "apps", "from": "p", "to": ["a", "b"], "repositories": ["team/**"]}],
    )
    config = str(path)
    with Pusher(primary.url) as p:
        p.push_image("team/app", "v1", [layer_bytes("trace-v1", 300)])
    assert main(["sync", "-c", config]) == 0
    with Pusher(b.url) as p:  # only b received it before the primary was lost
        p.push_image("team/app", "only-b", [layer_bytes("trace-b", 300)])
    primary.stop()
    spans.clear()

    assert main(["failover", "-c", config, "--promote", "a"]) == 0
    finished = list(spans.get_finished_spans())
    top = root(finished, "registry-replicator failover")
    assert top.attributes["replicator.promoted"] == "a"
    assert top.attributes["replicator.lost"] == "p"
    assert top.attributes["replicator.recorded"] is True
    assert top.attributes["process.exit.code"] == 0
    copies = in_trace(finished, top, "copy")
    pairs = {(c.attributes["replicator.source"], c.attributes["replicator.target"]) for c in copies}
    assert pairs == {("b", "a")}, pairs
    assert {c.attributes["replicator.tag"] for c in copies} == {"only-b"}
    requested = {s.attributes["server.port"] for s in finished if s.kind == SpanKind.CLIENT}
    assert requested, "registry requests are traced"
    assert primary.port not in requested, "the lost primary must not be contacted"

    with Pusher(a.url) as p:  # pushed to the promoted site during the incident
        p.push_image("team/app", "v2", [layer_bytes("trace-v2", 300)])
    primary.start()
    spans.clear()

    assert main(["failback", "-c", config, "--site", "p"]) == 0
    finished = list(spans.get_finished_spans())
    top = root(finished, "registry-replicator failback")
    assert top.attributes["replicator.returning"] == "p"
    assert top.attributes["replicator.promoted"] == "a"
    assert top.attributes["replicator.failovers_ended"] == 1
    copies = in_trace(finished, top, "copy")
    pairs = {(c.attributes["replicator.source"], c.attributes["replicator.target"]) for c in copies}
    assert ("a", "p") in pairs, pairs
    to_p = {
        c.attributes["replicator.tag"] for c in copies if c.attributes["replicator.target"] == "p"
    }
    assert to_p >= {"v2", "only-b"}, to_p
    assert copies == [s for s in finished if s.name == "copy"], "one trace for the whole run"
