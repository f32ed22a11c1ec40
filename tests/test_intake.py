"""Webhook intake end to end: real Journal on disk, the ASGI app, real uvicorn, real registry."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from replicator.daemon.intake import GroupCommit, SiteIntake, create_app
from replicator.events import DISTRIBUTION_EVENTS_V1, RegistryEvent, parse_webhook
from replicator.journal import Journal
from replicator.metrics import METRICS, Metrics
from replicator.refs import REPOSITORY_RE
from tests.harness.images import Pusher, layer_bytes
from tests.harness.journal import sql
from tests.harness.util import async_wait_until, free_port, wait_until

DATA = Path(__file__).parent / "data"
PUSH_BODY = (DATA / "distribution-2.8-push.json").read_bytes()
SEQUENCE = json.loads((DATA / "distribution-2.8-sequence.json").read_text())["requests"]
V1 = {"content-type": DISTRIBUTION_EVENTS_V1}
TOKEN = "s3cret-Tq9"
AUTH = {"authorization": f"Bearer {TOKEN}", **V1}
SITES = {"eu": SiteIntake("eu", TOKEN), "open": SiteIntake("open", None)}
D1 = "sha256:" + "a" * 64


def journaled(journal: Journal) -> int:
    return sql(journal, "SELECT COUNT(*) AS n FROM events")[0]["n"]


def body_with_id(event_id: str) -> bytes:
    doc = json.loads(PUSH_BODY)
    doc["events"][0]["id"] = event_id
    return json.dumps(doc).encode()


class Intake:
    """One app over one real journal, with the events handed on recorded."""

    def __init__(self, journal: Journal, **kw: Any) -> None:
        self.journal = journal
        self.handed: list[RegistryEvent] = []
        self.metrics = Metrics()
        self.fail_hand_over = False

        async def on_events(events: list[RegistryEvent]) -> None:
            if self.fail_hand_over:
                raise RuntimeError("bus down")
            self.handed.extend(events)

        kw.setdefault("on_events", on_events)
        self.app = create_app(
            sites=kw.pop("sites", SITES), journal=journal, metrics=self.metrics, **kw
        )

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://intake"
        )


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal(tmp_path / "journal.db")
    yield j
    j.close()


@pytest.fixture
def intake(journal: Journal) -> Intake:
    return Intake(journal, max_body=4096)


@pytest.fixture
async def client(intake: Intake) -> AsyncIterator[httpx.AsyncClient]:
    async with intake.client() as c:
        yield c


class UvicornThread:
    """The app served by real uvicorn on a free loopback port, in a background thread."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(
                app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> UvicornThread:
        self.thread.start()
        wait_until(lambda: self.server.started, timeout=10, what="uvicorn start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


# --- eventstore --------------------------------------------------------------------


async def test_record_dedupes_and_roundtrips_every_field(journal):
    full = parse_webhook(PUSH_BODY, DISTRIBUTION_EVENTS_V1, {}, "eu")[0]
    mount = RegistryEvent(
        id="m",
        site="eu",
        action="mount",
        repository="b/app",
        digest=D1,
        from_repository="a/app",
        size=5,
        occurred_at=1.5,
        actor="ci",
    )
    events = journal.events
    assert await events.record([full, mount, full]) == [full, mount]
    assert await events.record([mount]) == []
    assert await events.by_state("new") == [full, mount]
    assert await events.mark([("eu", "m"), ("eu", "missing"), ("us", "m")], "dispatched") == 1
    assert await events.by_state("new") == [full]
    assert await events.by_state("dispatched", site="eu") == [mount]
    assert await events.by_state("new", site="other") == []
    # the re-publisher's question: which new events have waited since before a time
    assert await events.by_state("new", received_before=time.time() + 60) == [full]
    assert await events.by_state("new", received_before=time.time() - 60) == []
    assert await events.counts() == {"dispatched": 1, "ignored": 0, "new": 1}
    with pytest.raises(ValueError, match="unknown event state"):
        await events.mark([("eu", "m")], "done")


async def test_record_is_one_transaction(journal):
    good = RegistryEvent(id="g", site="eu", action="push", repository="a/b", digest=D1)
    broken = RegistryEvent(id="b", site=None, action="push", repository="a/b")  # type: ignore[arg-type]
    with pytest.raises(Exception, match="NOT NULL"):
        await journal.events.record([good, broken])
    assert journaled(journal) == 0


async def test_mark_many_ids_at_once(journal):
    evs = [
        RegistryEvent(id=f"e{i}", site="eu", action="delete", repository="a/b", tag="t")
        for i in range(1200)
    ]
    await journal.events.record(evs)
    assert await journal.events.mark(((e.site, e.id) for e in evs), "ignored") == 1200
    assert (await journal.events.counts())["ignored"] == 1200


# --- accepted, durable, deduplicated -----------------------------------------------


async def test_push_is_journaled_then_handed_on(intake, client, journal):
    r = await client.post("/events/eu", content=PUSH_BODY, headers=AUTH)
    assert r.status_code == 202 and r.json() == {"accepted": 1, "duplicates": 0}
    [ev] = await journal.events.by_state("new")
    assert intake.handed == [ev]
    assert (ev.site, ev.action, ev.repository, ev.tag) == ("eu", "push", "team/app", "v1")
    assert intake.metrics.events_received.value(site="eu", action="push") == 1


async def test_redelivery_is_200_and_not_handed_on_again(intake, client, journal):
    assert (await client.post("/events/eu", content=PUSH_BODY, headers=AUTH)).status_code == 202
    r = await client.post("/events/eu", content=PUSH_BODY, headers=AUTH)
    assert r.status_code == 200 and r.json() == {"accepted": 0, "duplicates": 1}
    assert len(intake.handed) == 1 and journaled(journal) == 1
    assert intake.metrics.events_duplicate.value(site="eu") == 1


async def test_whole_recorded_sequence_and_open_site(intake, client, journal):
    for req in SEQUENCE:
        r = await client.post(
            "/events/open",
            content=req["body"].encode(),
            headers={"content-type": req["content_type"]},
        )
        assert r.status_code == 202
    assert journaled(journal) == len(SEQUENCE) == len(intake.handed)


async def test_the_same_event_id_from_two_sites_is_two_events(journal):
    """Ids are per registry (Harbor's are predictable): site b's token must not be able
    to suppress site a's event by posting its id first."""
    intake = Intake(journal, sites={"eu": SiteIntake("eu", TOKEN), "us": SiteIntake("us", "t-us")})
    async with intake.client() as c:
        us = await c.post(
            "/events/us", content=PUSH_BODY, headers={**V1, "authorization": "Bearer t-us"}
        )
        eu = await c.post("/events/eu", content=PUSH_BODY, headers=AUTH)
        again = await c.post("/events/eu", content=PUSH_BODY, headers=AUTH)
    assert (us.status_code, eu.status_code, again.status_code) == (202, 202, 200)
    assert sorted(e.site for e in intake.handed) == ["eu", "us"]
    assert sorted(e.site for e in await journal.events.by_state("new")) == ["eu", "us"]
    [eu_event] = await journal.events.by_state("new", site="eu")
    assert await journal.events.mark([("eu", eu_event.id)], "dispatched") == 1
    assert [e.site for e in await journal.events.by_state("new")] == ["us"]


async def test_unknown_sites_and_bad_tokens_get_the_same_answer(client):
    """No way to enumerate site names: an unknown site looks like a wrong token."""
    unknown = await client.post("/events/mars", content=PUSH_BODY, headers=AUTH)
    wrong = await client.post(
        "/events/eu", content=PUSH_BODY, headers={**V1, "authorization": "Bearer nope"}
    )
    assert unknown.status_code == wrong.status_code == 401
    assert unknown.json() == wrong.json()
    assert unknown.headers["www-authenticate"] == wrong.headers["www-authenticate"]
    assert "mars" not in unknown.text


async def test_concurrent_posts_share_commits(intake, client, journal):
    n = 60
    rs = await asyncio.gather(
        *(client.post("/events/eu", content=body_with_id(f"c{i}"), headers=AUTH) for i in range(n))
    )
    assert all(r.status_code == 202 for r in rs)
    assert journaled(journal) == n == len(intake.handed)
    assert intake.app.state.group_commit.commits < n


async def test_group_commit_isolates_a_failing_request(journal):
    gc = GroupCommit(journal)
    good = [
        RegistryEvent(id=f"g{i}", site="eu", action="push", repository="a/b", digest=D1)
        for i in range(2)
    ]
    broken = RegistryEvent(id="b", site=None, action="push", repository="a/b")  # type: ignore[arg-type]
    results = await asyncio.gather(
        gc.record([good[0]]), gc.record([broken]), gc.record([good[1]]), return_exceptions=True
    )
    assert results[0] == [good[0]] and results[2] == [good[1]]
    assert isinstance(results[1], Exception) and "NOT NULL" in str(results[1])
    assert journaled(journal) == 2 and gc.commits == 2  # batch failed, then one by one


def test_site_intake_refuses_empty_token_and_hides_it():
    with pytest.raises(ValueError, match="empty webhook token"):
        SiteIntake("eu", " ")
    with pytest.raises(ValueError, match="invalid intake site"):
        SiteIntake("a/b")
    assert TOKEN not in repr(SiteIntake("eu", TOKEN))


async def test_concurrent_duplicates_hand_on_exactly_once(intake, client, journal):
    rs = await asyncio.gather(
        *(client.post("/events/eu", content=PUSH_BODY, headers=AUTH) for _ in range(20))
    )
    assert sorted(r.status_code for r in rs) == [200] * 19 + [202]
    assert len(intake.handed) == 1


async def test_ignored_event_types_answer_200_and_journal_nothing(client, journal):
    doc = {
        "specversion": "1.0",
        "id": "z",
        "source": "zot",
        "type": "zotregistry.repository.created",
        "data": {"name": "app"},
    }
    r = await client.post(
        "/events/eu",
        json=doc,
        headers={
            "authorization": f"Bearer {TOKEN}",
            "content-type": "application/cloudevents+json",
        },
    )
    assert r.status_code == 200 and r.json()["ignored"] is True
    assert journaled(journal) == 0


async def test_failed_hand_over_is_503_and_event_stays_new(intake, client, journal):
    intake.fail_hand_over = True
    r = await client.post("/events/eu", content=PUSH_BODY, headers=AUTH)
    assert r.status_code == 503 and "journaled" in r.json()["error"]
    assert [e.id for e in await journal.events.by_state("new")] == [
        json.loads(PUSH_BODY)["events"][0]["id"]
    ]
    intake.fail_hand_over = False
    # the sender retries: already durable, so 200; dispatch happens from the journal
    assert (await client.post("/events/eu", content=PUSH_BODY, headers=AUTH)).status_code == 200


async def test_journal_failure_is_503_never_2xx(intake, client, journal):
    sql(journal, "DROP TABLE events")
    r = await client.post("/events/eu", content=PUSH_BODY, headers=AUTH)
    assert r.status_code == 503 and intake.handed == []
    assert "events" not in r.text.replace("events journaled", "")  # no SQL detail leaks


# --- bad input: clear 4xx, nothing journaled, service still healthy -----------------


async def _chunks(data: bytes, size: int = 512) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


BAD = [
    ("missing token", "/events/eu", PUSH_BODY, V1, 401),
    ("wrong token", "/events/eu", PUSH_BODY, {**V1, "authorization": "Bearer nope"}, 401),
    ("token prefix", "/events/eu", PUSH_BODY, {**V1, "authorization": "Bearer s3cret-Tq"}, 401),
    ("basic scheme", "/events/eu", PUSH_BODY, {**V1, "authorization": "Basic dG9rOg=="}, 401),
    (
        "non-ascii token",
        "/events/eu",
        PUSH_BODY,
        {**V1, "authorization": "Bearer tök".encode()},
        401,
    ),
    ("unknown site", "/events/mars", PUSH_BODY, AUTH, 401),
    ("malformed json", "/events/eu", b'{"events": [', AUTH, 400),
    ("bad repository", "/events/eu", PUSH_BODY.replace(b'"team/app"', b'"Team/App"'), AUTH, 400),
    ("unknown action", "/events/eu", PUSH_BODY.replace(b'"push"', b'"explode"'), AUTH, 400),
    ("unsupported type", "/events/eu", PUSH_BODY, {**AUTH, "content-type": "text/plain"}, 415),
    (
        "unknown format",
        "/events/eu",
        b'{"hello": 1}',
        {**AUTH, "content-type": "application/json"},
        415,
    ),
    ("oversize", "/events/eu", b" " * 5000 + PUSH_BODY, AUTH, 413),
]


@pytest.mark.parametrize(
    ("path", "body", "headers", "status"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
async def test_bad_input_is_refused_and_changes_nothing(
    intake, client, journal, path, body, headers, status
):
    r = await client.post(path, content=body, headers=headers)
    assert r.status_code == status
    assert r.json()["error"]
    if status == 401:
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert TOKEN not in r.text and "s3cret" not in r.text
    assert journaled(journal) == 0 and intake.handed == []
    assert intake.metrics.webhook_rejections.value(status=str(status)) == 1
    assert (await client.get("/healthz")).json() == {"status": "ok"}


async def test_oversize_without_content_length_stops_reading_at_the_limit(intake, client, journal):
    pulled = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal pulled
        while True:
            pulled += 1
            yield b"x" * 1024

    r = await client.post("/events/eu", content=endless(), headers=AUTH)
    assert r.status_code == 413 and "content-length" not in r.request.headers
    assert pulled <= 5 + 1  # 4096-byte limit, 1 KiB chunks
    assert journaled(journal) == 0


async def test_chunked_body_under_the_limit_is_accepted(client, journal):
    r = await client.post("/events/eu", content=_chunks(PUSH_BODY), headers=AUTH)
    assert r.status_code == 202 and journaled(journal) == 1


def test_oversize_content_length_is_refused_before_any_body_is_sent(journal):
    """Real uvicorn, raw socket: a 1 GB declared body is refused without reading it."""
    app = Intake(journal).app
    with UvicornThread(app) as srv, socket.create_connection(("127.0.0.1", srv.port), 5) as s:
        s.sendall(
            f"POST /events/eu HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n".encode()
        )
        s.settimeout(5)
        reply = s.recv(4096)
        assert reply.startswith(b"HTTP/1.1 413"), reply
        assert httpx.get(f"{srv.url}/healthz").status_code == 200
    assert journaled(journal) == 0


# --- health, readiness, metrics ---------------------------------------------------


async def test_readyz_checks_journal_and_extra_checks(journal):
    state: dict[str, Any] = {"broker": True}

    async def ready_check() -> dict[str, Any]:
        if state.get("raise"):
            raise ConnectionError("mqtt://user:secret@broker")
        return {"broker": state["broker"], "lag": {"ok": True, "detail": "3s"}}

    app = Intake(journal, ready_check=ready_check)
    async with app.client() as c:
        r = await c.get("/readyz")
        assert r.status_code == 200
        assert r.json() == {
            "status": "ready",
            "checks": {
                "journal": {"ok": True},
                "broker": {"ok": True},
                "lag": {"ok": True, "detail": "3s"},
            },
        }
        state["broker"] = False
        r = await c.get("/readyz")
        assert r.status_code == 503 and r.json()["checks"]["broker"] == {"ok": False}
        state["raise"] = True
        r = await c.get("/readyz")
        assert r.status_code == 503 and "secret" not in r.text
        assert r.json()["checks"]["ready_check"] == {"ok": False, "detail": "ConnectionError"}


async def test_readyz_fails_when_the_journal_cannot_be_written(journal):
    app = Intake(journal)
    async with app.client() as c:
        sql(journal, "DROP TABLE meta")
        r = await c.get("/readyz")
        assert r.status_code == 503 and r.json()["checks"]["journal"]["ok"] is False
        assert (await c.get("/healthz")).status_code == 200


async def test_a_readyz_flood_costs_at_most_one_journal_write_a_second(journal):
    """/readyz proves the journal writable; a flood of it must not become a flood of
    writes competing with webhooks for the journal (p99 5 ms -> 124 ms before)."""
    app = Intake(journal)
    async with app.client() as c:
        before, started = journal.commits, time.monotonic()
        for _ in range(50):
            assert (await c.get("/readyz")).status_code == 200
        flood = await asyncio.gather(*(c.get("/readyz") for _ in range(50)))
        assert all(r.status_code == 200 for r in flood)
        elapsed = time.monotonic() - started
    assert 1 <= journal.commits - before <= elapsed + 1


async def test_readyz_reports_a_failed_journal_write_at_once(intake, client, journal):
    assert (await client.get("/readyz")).status_code == 200
    sql(journal, "DROP TABLE events")
    assert (await client.post("/events/eu", content=PUSH_BODY, headers=AUTH)).status_code == 503
    r = await client.get("/readyz")  # the webhook's failed write says it: no need to probe
    assert r.status_code == 503 and r.json()["checks"]["journal"]["ok"] is False
    assert "no such table" in r.json()["checks"]["journal"]["detail"]


async def test_metrics_endpoint(intake, client):
    await client.post("/events/eu", content=PUSH_BODY, headers=AUTH)
    await client.post("/events/eu", content=PUSH_BODY, headers=V1)
    r = await client.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert 'registry_replicator_events_received_total{action="push",site="eu"} 1.0' in r.text
    assert 'registry_replicator_webhook_rejections_total{status="401"} 1.0' in r.text
    assert "registry_replicator_webhook_duration_seconds_count 1.0" in r.text
    assert "# TYPE registry_replicator_tasks gauge" in r.text


def test_metrics_text_format_and_escaping():
    m = Metrics()
    m.events_received.inc(site='a"b\\c\nd', action="push")
    m.blobs.labels(target="eu", outcome="mounted").inc(3)
    m.bytes_uploaded.inc(2.5, target="eu")
    m.replication_lag.set_function(lambda: {("all", "us"): 1.25})
    m.tasks.set_function(lambda: {("pending",): 4, ("dead",): 1})
    m.webhook_seconds.observe(0.003)
    m.webhook_seconds.observe(20)
    text = m.render()
    assert (
        'registry_replicator_events_received_total{action="push",site="a\\"b\\\\c\\nd"} 1.0' in text
    )
    assert 'registry_replicator_blobs_total{outcome="mounted",target="eu"} 3.0' in text
    assert 'registry_replicator_uploaded_bytes_total{target="eu"} 2.5' in text
    assert 'registry_replicator_replication_lag_seconds{rule="all",target="us"} 1.25' in text
    tasks = 'registry_replicator_tasks{state="dead"} 1.0\nregistry_replicator_tasks{state='
    assert tasks + '"pending"} 4.0' in text
    assert 'registry_replicator_webhook_duration_seconds_bucket{le="0.001"} 0.0' in text
    assert 'registry_replicator_webhook_duration_seconds_bucket{le="0.005"} 1.0' in text
    assert 'registry_replicator_webhook_duration_seconds_bucket{le="+Inf"} 2.0' in text
    assert "registry_replicator_webhook_duration_seconds_sum 20.003" in text
    assert "registry_replicator_build_info{" in text and "process_cpu_seconds_total" in text
    for line in text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        assert line.startswith("# ") or name.startswith(
            ("registry_replicator_", "process_", "python_")
        ), line
    assert METRICS.events_received.value(site='a"b\\c\nd', action="push") == 0  # isolated


def test_known_series_exist_at_zero_before_anything_happens():
    """Alerts need their series before the first event: every configured site, rule and
    target has its counters at 0, lag reads 0 when caught up, every task state is shown."""
    from replicator.config import config_from_dict

    config = config_from_dict(
        {
            "sites": {n: {"url": f"https://{n}.example"} for n in ("a", "b", "c")},
            "rules": [{"name": "r", "from": "a", "to": ["b", "c"], "repositories": ["**"]}],
        }
    )
    m = Metrics()
    m.know(config)
    text = m.render()
    for series in (
        'registry_replicator_events_received_total{action="push",site="a"} 0.0',
        'registry_replicator_dead_letters_total{rule="r",target="c"} 0.0',
        'registry_replicator_replication_lag_seconds{rule="r",target="b"} 0.0',
        'registry_replicator_blobs_total{outcome="mounted",target="b"} 0.0',
        'registry_replicator_tasks{state="dead"} 0.0',
        'registry_replicator_gc_runs_total{outcome="failed",site="b"} 0.0',
        'registry_replicator_reconcile_runs_total{outcome="failed",rule="r"} 0.0',
    ):
        assert series in text, series
    m.replication_lag.set_function(lambda: {("r", "b"): 7.0})
    assert 'registry_replicator_replication_lag_seconds{rule="r",target="b"} 7.0' in m.render()
    assert 'registry_replicator_replication_lag_seconds{rule="r",target="c"} 0.0' in m.render()


def test_metric_misuse_is_refused():
    m = Metrics()
    with pytest.raises(ValueError, match="takes labels"):
        m.events_received.inc(site="eu")
    with pytest.raises(ValueError, match="cannot decrease"):
        m.retries.inc(-1, target="eu")
    with pytest.raises(ValueError, match="registered twice"):
        m.counter("registry_replicator_blobs_total", "dup")
    m.tasks.set_function(lambda: 1 / 0)
    assert 'registry_replicator_tasks{state="pending"}' not in m.render()  # broken, no crash
    h = m.histogram("h_seconds", "h", buckets=[1, 0.5])
    h.observe(0.7)
    text = m.render()
    assert 'registry_replicator_h_seconds_bucket{le="0.5"} 0.0' in text
    assert 'registry_replicator_h_seconds_bucket{le="1.0"} 1.0' in text


# --- fuzz: any body/headers from anyone: never a 5xx, bad input never journaled -------


@pytest.fixture(scope="module")
def fuzz_intake(tmp_path_factory) -> Iterator[Intake]:
    j = Journal(tmp_path_factory.mktemp("fuzz") / "journal.db")
    yield Intake(j, max_body=2048)
    j.close()


header_text = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40)
fuzz_bodies = st.one_of(
    st.binary(max_size=300),
    st.sampled_from(
        [
            PUSH_BODY,
            PUSH_BODY[:-10],
            PUSH_BODY.replace(b"push", b"pull"),
            PUSH_BODY * 2,
            b"{}",
            b'{"events":[]}',
        ]
    ),
    st.builds(
        lambda i, v: body_with_id(i if i else "x").replace(b'"v1"', json.dumps(v).encode()),
        header_text,
        st.one_of(st.text(max_size=10), st.integers(), st.none()),
    ),
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    site=st.sampled_from(["open", "eu", "open", "eu", "open", "nope", "e%20u"]),
    body=fuzz_bodies,
    auth=st.sampled_from([f"Bearer {TOKEN}", None, "x"]) | header_text,
    ct=st.one_of(
        st.none(),
        st.sampled_from(
            [
                DISTRIBUTION_EVENTS_V1,
                "application/json",
                "application/cloudevents+json",
                "text/plain",
            ]
        ),
        header_text,
    ),
    extra=st.dictionaries(
        st.sampled_from(["ce-specversion", "ce-id", "ce-type", "ce-source", "x-anything"]),
        header_text,
        max_size=3,
    ),
)
def test_fuzz_never_5xx_and_bad_input_never_journaled(fuzz_intake, site, body, auth, ct, extra):
    headers = dict(extra)
    if auth is not None:
        headers["authorization"] = auth
    if ct is not None:
        headers["content-type"] = ct

    async def one() -> int:
        before = journaled(fuzz_intake.journal)
        async with fuzz_intake.client() as c:
            r = await c.post(f"/events/{site}", content=body, headers=headers)
            assert (await c.get("/healthz")).status_code == 200
        if r.status_code not in (200, 202):
            assert journaled(fuzz_intake.journal) == before
        return r.status_code

    status = asyncio.run(one())
    event(f"status {status}")
    assert status in {200, 202, 400, 401, 404, 413, 415}
    for ev in asyncio.run(fuzz_intake.journal.events.by_state("new")):
        assert REPOSITORY_RE.fullmatch(ev.repository) and ev.site in ("eu", "open")


# --- the real thing: distribution 2.8 notifying real uvicorn -----------------------


def test_real_registry_events_land_in_the_journal(journal, registry_factory):
    captured: list[tuple[str, bytes]] = []
    app = Intake(journal).app

    async def recording_app(scope, receive, send):  # keeps raw bodies for the sample file
        chunks: list[bytes] = []

        async def tap():
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    ct = dict(scope["headers"]).get(b"content-type", b"").decode()
                    captured.append((ct, b"".join(chunks)))
            return message

        await app(scope, tap if scope["type"] == "http" else receive, send)

    with UvicornThread(recording_app) as srv:
        reg = registry_factory(
            "notifying",
            notify_url=f"{srv.url}/events/eu",
            notify_headers={"Authorization": [f"Bearer {TOKEN}"]},
        )
        with Pusher(reg.url) as p:
            img = p.push_image("team/app", "v1", [layer_bytes("intake", 100)])

        def manifest_event() -> list[dict[str, Any]]:
            return sql(journal, "SELECT * FROM events WHERE tag = 'v1'")

        [row] = wait_until(manifest_event, timeout=15, what="manifest push event journaled")
        assert (
            row["site"],
            row["action"],
            row["repository"],
            row["digest"],
            row["media_type"],
            row["is_manifest"],
            row["state"],
        ) == ("eu", "push", "team/app", img.digest, img.media_type, 1, "new")

        def blob_digests() -> set[str] | None:
            rows = sql(
                journal, "SELECT digest FROM events WHERE action = 'push' AND is_manifest = 0"
            )
            return {r["digest"] for r in rows} if len(rows) >= len(img.blobs) else None

        assert wait_until(blob_digests, timeout=15, what="blob push events") == set(img.blobs)
    assert all(ct == DISTRIBUTION_EVENTS_V1 for ct, _ in captured)
    if os.environ.get("REPLICATOR_RECORD_SAMPLES") == "1":
        for _, raw in captured:
            if json.loads(raw)["events"][0]["target"].get("tag") == "v1":
                (DATA / "distribution-2.8-push.json").write_bytes(raw)


async def test_real_uvicorn_serves_every_route(journal):
    app = Intake(journal).app
    with UvicornThread(app) as srv:
        async with httpx.AsyncClient(base_url=srv.url) as c:
            assert (await c.post("/events/eu", content=PUSH_BODY, headers=AUTH)).status_code == 202
            assert (await c.get("/readyz")).status_code == 200
            assert "replicator_events_received_total" in (await c.get("/metrics")).text
            assert (await c.get("/events/eu")).status_code == 405
    await async_wait_until(lambda: _done(srv), timeout=10, what="uvicorn thread exit")


async def _done(srv: UvicornThread) -> bool:
    return not srv.thread.is_alive()
