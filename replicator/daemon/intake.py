"""Durable webhook intake: the daemon's HTTP face (Starlette, served by uvicorn).

Registries deliver notifications at most once from an in-memory queue and retry a
non-2xx forever, so the contract here is strict both ways:

* bad input (unknown site, wrong token, oversize, malformed, unsupported) gets a
  clear 4xx with a JSON `error`, is never journaled, and never causes a 5xx; an
  unknown site is answered exactly like a wrong token, so site names cannot be
  enumerated;
* an event is answered 2xx only once it is durable: committed to the journal and
  handed to `on_events` (the event bus). Redeliveries (same id) are answered 200 and
  not passed on again. If the journal or the hand-over fails the answer is 503, so
  the sender retries; events already committed stay `new` in the journal and are
  dispatched from there on the next start.

Durability is the journal's: SQLite WAL with synchronous=NORMAL survives a crash of
this process; a power loss can drop the last commits, which the periodic reconcile
covers (the registry's own queue is lost on its restart anyway).

Concurrent requests share transactions (group commit): while one commit runs on the
journal thread, the next requests queue up and go into the following single commit.
That keeps latency at one commit when idle and throughput high under bursts.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from replicator import telemetry
from replicator.events import RegistryEvent, WebhookError, parse_webhook
from replicator.journal import Journal
from replicator.metrics import METRICS, Metrics
from replicator.text import shorten

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 1024 * 1024
READY_TIMEOUT = 5.0
METRICS_REFRESH_TIMEOUT = 1.0  # past this a scrape renders the previous gauge values

OnEvents = Callable[[list[RegistryEvent]], Awaitable[None]]
ReadyCheck = Callable[[], Awaitable[Mapping[str, Any]]]
BeforeMetrics = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class SiteIntake:
    """A site that may post events; `token` None means no Authorization is required."""

    name: str
    token: str | None = None

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"invalid intake site name {self.name!r}")
        if self.token is not None and not self.token.strip():
            # an empty token would let a bare "Authorization: Bearer" through
            raise ValueError(f"site {self.name}: empty webhook token; use None for no auth")

    def __repr__(self) -> str:  # never print the token
        return f"SiteIntake(name={self.name!r}, token={'***' if self.token else None})"


class GroupCommit:
    """Funnels concurrent `record` calls into as few journal transactions as possible."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self._pending: list[tuple[Sequence[RegistryEvent], asyncio.Future]] = []
        self._drainer: asyncio.Task | None = None
        self.commits = 0  # transactions made, for tests and the benchmark

    async def record(self, events: Sequence[RegistryEvent]) -> list[RegistryEvent]:
        """Commit `events`; return the ones never seen before."""
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending.append((events, future))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await self._commit(batch)
            except BaseException:  # cancelled: nobody may wait forever
                for _, future in batch + self._pending:
                    future.cancel()
                self._pending = []
                raise

    async def _commit(self, batch: list[tuple[Sequence[RegistryEvent], asyncio.Future]]) -> None:
        try:
            results = await self.journal.events.record_batches([events for events, _ in batch])
        except Exception as exc:
            if len(batch) == 1:
                if not batch[0][1].done():
                    batch[0][1].set_exception(exc)
                return
            # one request's events must not fail the others: retry them one by one
            for item in batch:
                await self._commit([item])
            return
        self.commits += 1
        for (_, future), fresh in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(fresh)


def create_app(
    *,
    sites: Mapping[str, SiteIntake],
    journal: Journal,
    on_events: OnEvents | None = None,
    max_body: int = DEFAULT_MAX_BODY,
    ready_check: ReadyCheck | None = None,
    metrics: Metrics | None = None,
    before_metrics: BeforeMetrics | None = None,
) -> Starlette:
    """The intake ASGI app: POST /events/{site}, GET /healthz, /readyz, /metrics.

    `before_metrics` refreshes gauges whose values live in the journal; a scrape waits
    for it at most METRICS_REFRESH_TIMEOUT seconds, then renders what it has."""
    metrics = metrics if metrics is not None else METRICS
    recorder = GroupCommit(journal)
    by_name = dict(sites)

    def reject(
        status: int, message: str, site: str | None = None, headers: Mapping[str, str] | None = None
    ) -> Response:
        metrics.webhook_rejections.inc(status=str(status))
        log.info("webhook refused: status=%s site=%s %s", status, shorten(site or "-"), message)
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    async def post_events(request: Request) -> Response:
        with telemetry.server_span(
            request.method,
            "/events/{site}",
            str(request.url),
            request.headers,
            request.client.host if request.client else None,
        ) as span:
            response = await take_events(request)
            telemetry.end_http(span, response.status_code, server=True)
            return response

    async def take_events(request: Request) -> Response:
        started = time.perf_counter()
        site_name = request.path_params["site"]
        site = by_name.get(site_name)
        if site is None or (
            site.token is not None
            and not _bearer_matches(request.headers.get("authorization"), site.token)
        ):
            log.debug("webhook for %s site %s", "unknown" if site is None else "known", site_name)
            return reject(
                401,
                "missing or wrong bearer token",
                site_name,
                {"WWW-Authenticate": 'Bearer realm="registry-replicator"'},
            )

        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                return reject(400, "invalid Content-Length", site.name)
            if int(declared) > max_body:
                return reject(
                    413, f"body of {declared} bytes exceeds the {max_body} byte limit", site.name
                )
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_body:
                    return reject(413, f"body exceeds the {max_body} byte limit", site.name)
        except ClientDisconnect:
            return reject(400, "client disconnected before the body was complete", site.name)

        try:
            events = parse_webhook(
                bytes(body), request.headers.get("content-type"), request.headers, site.name
            )
        except WebhookError as exc:
            return reject(exc.status, exc.message, site.name)
        except Exception:  # a parser bug must still not turn bad input into a 5xx
            log.exception("webhook parser failed on input from site %s", site.name)
            return reject(400, "could not parse the webhook body", site.name)
        if not events:
            return JSONResponse({"accepted": 0, "duplicates": 0, "ignored": True})

        try:
            fresh = await recorder.record(events)
        except Exception as exc:
            log.error("journal write failed for events from site %s: %s", site.name, exc)
            metrics.webhook_rejections.inc(status="503")
            return JSONResponse({"error": "journal unavailable; retry later"}, status_code=503)
        metrics.events_duplicate.labels(site=site.name).inc(len(events) - len(fresh))
        if fresh and on_events is not None:
            try:
                await on_events(fresh)
            except Exception:
                log.exception(
                    "event hand-over failed for site %s; %d event(s) stay 'new' in the journal",
                    site.name,
                    len(fresh),
                )
                metrics.webhook_rejections.inc(status="503")
                return JSONResponse(
                    {"error": "events journaled but not dispatched; retry later"}, status_code=503
                )
        for ev in fresh:
            metrics.events_received.inc(site=ev.site, action=ev.action)
        metrics.webhook_seconds.observe(time.perf_counter() - started)
        # no access log (a busy registry posts per pull); a debug line per journaled webhook
        log.debug(
            "webhook journaled: %d new events, %d duplicates",
            len(fresh),
            len(events) - len(fresh),
            extra={"fields": {"site": site.name}},
        )
        return JSONResponse(
            {"accepted": len(fresh), "duplicates": len(events) - len(fresh)},
            status_code=202 if fresh else 200,
        )

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        checks: dict[str, dict[str, Any]] = {}
        try:
            problem = await asyncio.wait_for(journal.check_writable(), READY_TIMEOUT)
        except Exception as exc:
            problem = f"{type(exc).__name__}: {exc}"
        checks["journal"] = (
            {"ok": True} if problem is None else {"ok": False, "detail": shorten(problem)}
        )
        if ready_check is not None:
            try:
                extra = await asyncio.wait_for(ready_check(), READY_TIMEOUT)
                for name, value in extra.items():
                    checks[str(name)] = _normalise_check(value)
            except Exception as exc:  # type only: messages may carry URLs or hostnames
                checks["ready_check"] = {"ok": False, "detail": type(exc).__name__}
        ready = all(c["ok"] for c in checks.values())
        return JSONResponse(
            {"status": "ready" if ready else "not ready", "checks": checks},
            status_code=200 if ready else 503,
        )

    async def metrics_endpoint(request: Request) -> Response:
        if before_metrics is not None:
            try:
                await asyncio.wait_for(before_metrics(), METRICS_REFRESH_TIMEOUT)
            except Exception as exc:
                log.debug("metrics refresh skipped: %s", type(exc).__name__)
        return Response(metrics.render(), media_type=Metrics.CONTENT_TYPE)

    app = Starlette(
        routes=[
            Route("/events/{site}", post_events, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
        ]
    )
    app.state.group_commit = recorder
    return app


def _bearer_matches(header: str | None, token: str) -> bool:
    if not header:
        return False
    scheme, _, provided = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    # Headers arrive latin-1 decoded; compare bytes so any content is comparable.
    return hmac.compare_digest(provided.strip().encode("latin-1", "replace"), token.encode("utf-8"))


def _normalise_check(value: Any) -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {"ok": bool(value.get("ok"))}
        if value.get("detail") is not None:
            out["detail"] = shorten(str(value["detail"]))
        return out
    return {"ok": bool(value)}
