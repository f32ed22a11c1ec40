"""The HTTP layer under the registry operations: one `Request` in, one answer out.

Layered like httpx (send -> auth -> redirects -> transport) and regclient's
reghttp under its scheme/reg verbs, outermost first:

- retries: replayable requests are retried with tenacity (connection errors,
  5xx, 429 honouring Retry-After, else the shared jittered backoff); other
  4xx are answered at once. A streamed body cannot be replayed, so such a
  request fails with a `retryable` error and the caller decides;
- politeness: a pull budget (limits.PullBudget: Docker Hub's ratelimit headers)
  pauses manifest GETs while the registry's budget is spent, a token bucket
  bounds the request rate, request slots bound
  the requests being sent or awaiting their answer, and separate download
  slots bound open blob downloads (see `downloads`);
- auth: the scheme is learnt from a 401 challenge and the request sent once
  more with Basic credentials or a Bearer token for the scopes it needs;
- origin policy (origin.py): URLs the registry hands out (upload locations,
  page links, redirects) are followed, but our Authorization goes only to the
  configured registry's origin. Another host's 401 is never answered with
  our credentials nor learnt as the registry's auth scheme.

Operations (manifests.py, blobs.py, uploads.py, listing.py, referrers.py) build
a `Request` and get an `httpx.Response` whose status they accepted, or a
RegistryError naming site, repository and reference.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import httpcore
import httpx
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from replicator import telemetry
from replicator.backoff import jittered_backoff
from replicator.logs import redact
from replicator.registry import tls
from replicator.registry.auth import Authenticator, merge_scopes, scopes_for
from replicator.registry.bounds import size_text
from replicator.registry.errors import (
    DigestMismatch,
    NotFound,
    RegistryError,
    RegistryUnavailable,
    ResponseTooLarge,
    RetryableError,
    Unauthorized,
)
from replicator.registry.limits import PullBudget, TokenBucket, is_pull, parse_retry_after
from replicator.registry.origin import host_of, origin_of, where
from replicator.registry.site import SiteEndpoint

log = logging.getLogger("replicator.registry")

# httpcore reads responses 64 KiB at a time, and every read costs the same
# Python work whatever its size. Blob bodies are megabytes and asyncio hands
# over up to 256 KiB per socket read, so take that much: about 10 % less CPU
# copying the benchmark workload (benchmarks/bench_copy.py).
httpcore.AsyncHTTP11Connection.READ_NUM_BYTES = max(
    httpcore.AsyncHTTP11Connection.READ_NUM_BYTES, 256 * 1024
)
_MAX_ERROR_BODY = 64 * 1024


@dataclass(slots=True)
class Request:
    """One registry request and what its sender accepts as an answer."""

    method: str
    url: str
    repository: str | None = None  # with `reference`, named in errors and logs
    reference: str | None = None
    scopes: tuple[str, ...] | None = None  # token scopes; None: what `method` needs on the repo
    headers: Mapping[str, str] | None = None
    content: Any = None
    ok: tuple[int, ...] = (200,)  # statuses returned to the caller; others raise
    pass_client_errors: bool = False  # also return any 4xx but 401/403/429
    stream: bool = False  # return before reading the body (the caller closes it)
    follow_redirects: bool = False
    replayable: bool = True  # False for a streamed body: sent once, never retried
    attempts: int | None = None  # None: 1 + the policy's retries when replayable
    transfer: bool = False  # a blob body: the long read/write timeouts
    max_body: int | None = None  # for `fetch`: refuse a body beyond this many bytes
    what: str = "answer"  # what the body is, for that refusal: "manifest", "tags list page"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently to retry a replayable request."""

    retries: int = 5
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    max_retry_after: float = 120.0  # cap on a 429's Retry-After

    def backoff(self, attempt: int) -> float:
        """Seconds before retry number `attempt` (1-based) when the registry named none."""
        return jittered_backoff(attempt, self.backoff_base, self.backoff_max)


class _TransientStatus(Exception):
    """A 5xx/429 answer, raised inside the retry loop and turned into RetryableError."""

    def __init__(self, status: int, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


class Transport:
    """Sends `Request`s to one registry (`site`) with auth, limits and retries.

    `site.concurrency` bounds requests being sent or awaiting their answer
    (an upload holds its slot while its body streams), and separately the
    open blob downloads. An open download does not hold a request slot:
    clients shared between sites that replicate both ways would otherwise
    deadlock, each side's downloads waiting on uploads that wait for the
    other side's slots. (A download takes its stream slot before any request
    slot, and an upload's source stream is open before its slot is taken, so
    the two kinds cannot wait on each other in a cycle.)
    """

    def __init__(
        self,
        site: SiteEndpoint,
        policy: RetryPolicy,
        *,
        timeout: float = 60.0,
        blob_read_timeout: float = 300.0,
    ) -> None:
        self.site = site
        self.policy = policy
        self.stats: dict[str, int] = {
            "requests": 0,
            "retries": 0,
            "bytes_uploaded": 0,
            "bytes_downloaded": 0,
            "token_requests": 0,
            "upload_resumes": 0,
            "upload_restarts": 0,
        }
        self._timeout = httpx.Timeout(timeout, connect=min(timeout, 15.0))
        self._blob_timeout = httpx.Timeout(
            timeout,
            connect=min(timeout, 15.0),
            read=max(timeout, blob_read_timeout),
            write=max(timeout, blob_read_timeout),
        )
        self._http = httpx.AsyncClient(
            http1=True,
            http2=False,
            verify=_tls_verify(site),
            timeout=self._timeout,
            follow_redirects=False,
            # Room for every request slot and every open download, so requests
            # do not queue inside httpcore's pool (which rescans every connection,
            # a system call each, whenever its queue moves), and all of them kept
            # alive (fewer keep-alive slots churned ~160 TCP connections per
            # 60-image copy).
            limits=httpx.Limits(
                max_connections=2 * site.concurrency + 2,
                max_keepalive_connections=2 * site.concurrency + 2,
            ),
            headers={"User-Agent": "registry-replicator/0.1"},
        )
        self._slots = asyncio.Semaphore(site.concurrency)
        # Open blob downloads; an operation holds one for as long as its stream is open.
        self.downloads = asyncio.Semaphore(site.concurrency)
        self._bucket = TokenBucket(site.requests_per_second) if site.requests_per_second else None
        self.budget = PullBudget(site.name)
        self.auth = Authenticator(
            site.name, self._http, site.resolve_credentials(), self.stats, registry_url=site.url
        )
        # (site, method, status or None when no answer came, seconds): metrics
        self.observer: Callable[[str, str, int | None, float], None] | None = None
        self._own_prefix = site.url + "/"  # the fast answer to "is this our origin?"
        self._own_origin = origin_of(site.url)

    async def aclose(self) -> None:
        await self._http.aclose()

    def url(self, path: str) -> str:
        """The absolute URL of an API path (`/v2/...`) on this registry."""
        return self.site.url + path

    def is_own(self, url: str) -> bool:
        """Whether `url` is on the registry's own origin, the only one given credentials."""
        return url.startswith(self._own_prefix) or origin_of(url) == self._own_origin

    async def prime_auth(self) -> None:
        """Learn the auth scheme before a request whose body cannot be sent twice."""
        if not self.auth.known:
            await self.send(Request("GET", self.url("/v2/"), scopes=()))

    # ------------------------------------------------------------------ retries
    async def send(self, req: Request) -> httpx.Response:
        """Send with auth, limits and retries; return answers in `req.ok` (any 4xx but
        401/403/429 too with `pass_client_errors`), raise RegistryError otherwise."""
        return (await self._send(req))[0]

    async def send_retried(self, req: Request) -> tuple[httpx.Response, bool]:
        """`send`, and whether an earlier attempt failed (a 5xx, a timeout, a cut): the
        answer then may not describe what the request did. A DELETE carried out but
        answered 500 meets its own work on the retry (404), "gone" not "never there"."""
        resp, _body, attempt = await self._send_counted(req)
        return resp, attempt > 1

    async def fetch(self, req: Request) -> tuple[httpx.Response, bytes]:
        """`send`, and read the body here, incrementally: ResponseTooLarge as soon as it
        passes `req.max_body` bytes, so a hostile size costs at most that much memory.
        The response is closed; its body is the bytes returned."""
        assert req.max_body is not None and not req.stream
        resp, body = await self._send(req)
        assert body is not None
        return resp, body

    async def _send(self, req: Request) -> tuple[httpx.Response, bytes | None]:
        resp, body, _attempt = await self._send_counted(req)
        return resp, body

    async def _send_counted(self, req: Request) -> tuple[httpx.Response, bytes | None, int]:
        attempts = req.attempts or (self.policy.retries + 1 if req.replayable else 1)
        try:
            if attempts == 1:
                return (*await self._attempt(req), 1)
            retrying = AsyncRetrying(
                stop=stop_after_attempt(attempts),
                wait=self._wait,
                retry=retry_if_exception(_is_transient),
                reraise=True,
                before_sleep=lambda state: self._before_sleep(req, state),
                sleep=asyncio.sleep,
            )
            async for attempt in retrying:
                with attempt:
                    return (*await self._attempt(req), attempt.retry_state.attempt_number)
        except _TransientStatus as exc:
            raise RetryableError(
                exc.message,
                site=self.site.name,
                repository=req.repository,
                reference=req.reference,
                status=exc.status,
            ) from None
        except (httpx.TransportError, ssl.SSLError) as exc:
            raise self._transport_error(exc, req) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _TransientStatus) and exc.retry_after is not None:
            return min(exc.retry_after, self.policy.max_retry_after)
        return self.policy.backoff(state.attempt_number)

    def _before_sleep(self, req: Request, state: RetryCallState) -> None:
        self.stats["retries"] += 1
        exc = state.outcome.exception() if state.outcome else None
        reason = f"HTTP {exc.status}" if isinstance(exc, _TransientStatus) else exc_text(exc)
        delay = state.next_action.sleep if state.next_action else 0.0
        log.warning(
            "%s: %s %s failed (%s); retry %d/%d in %.2fs",
            self.site.name,
            req.method,
            where(req.url),
            reason,
            state.attempt_number,
            self.policy.retries,
            delay,
        )

    # ------------------------------------------------------------------ auth
    async def _attempt(self, req: Request) -> tuple[httpx.Response, bytes | None]:
        own = self.is_own(req.url)
        scopes = req.scopes if req.scopes is not None else scopes_for(req.method, req.repository)
        key = self.auth.effective_scopes(scopes)
        timeout = self._blob_timeout if req.transfer else self._timeout
        refreshed = False  # refused credentials were renewed once (a helper ran again)
        for auth_round in (0, 1, 2):
            auth = await self.auth.headers_for(key) if own else {}
            request = self._http.build_request(
                req.method,
                req.url,
                headers={**req.headers, **auth} if req.headers else auth,
                content=req.content,
                timeout=timeout,
            )
            resp, body = await self._exchange(request, req)
            if resp.status_code != 401 or self._foreign(own, resp):
                break  # another host's challenge: never answered with our credentials
            challenge = self.auth.learn(resp)
            if challenge is None or auth_round == 2:
                break
            if challenge.scheme == "bearer":
                if auth_round:
                    break
                new_key = merge_scopes((*key, *challenge.scopes))
                if auth and new_key == key:
                    self.auth.invalidate(key)  # our cached token went stale
                self.auth.remember_scopes(scopes, new_key)
                key = new_key
            elif auth:  # basic credentials refused: renewable once (an expired helper token)
                if refreshed or not self.auth.refresh_credentials(key):
                    break
                refreshed = True
            elif auth_round or not await self.auth.has_basic_credentials(key):
                break  # basic credentials missing
            if not req.replayable:
                await resp.aclose()
                raise Unauthorized(
                    "authorization expired during a streamed upload",
                    site=self.site.name,
                    repository=req.repository,
                    reference=req.reference,
                    status=401,
                    retryable=True,
                )
            await resp.aclose()
        status = resp.status_code
        if status in req.ok or (
            req.pass_client_errors and 400 <= status < 500 and status not in (401, 403, 429)
        ):
            if not auth and own:
                self.auth.note_success_without_auth()
            return resp, body
        if body is None:
            body = await _read_error_body(resp)
        else:
            body = body[:_MAX_ERROR_BODY]
        message = registry_message(body, status)
        if status == 429 or status >= 500:
            raise _TransientStatus(
                status, message, parse_retry_after(resp.headers.get("retry-after"))
            )
        if status in (401, 403) and self._foreign(own, resp):
            raise Unauthorized(
                f"{message} from {host_of(str(resp.url))}, another host than the registry's; "
                f"credentials are sent only to {self.site.url}",
                site=self.site.name,
                repository=req.repository,
                reference=req.reference,
                status=status,
            )
        raise self._status_error(status, message, body, req)

    def _foreign(self, own: bool, resp: httpx.Response) -> bool:
        """Whether `resp` came from another origin than the registry's (the request went
        elsewhere, or a redirect took it there)."""
        return not own or bool(resp.history and not self.is_own(str(resp.url)))

    # ------------------------------------------------------------------ the wire
    async def _exchange(
        self, request: httpx.Request, req: Request
    ) -> tuple[httpx.Response, bytes | None]:
        """`_wire`, within the registry's pull budget when the request spends a pull."""
        if not (is_pull(req.method, req.url) and self.is_own(req.url)):
            return await self._wire(request, req)
        await self.budget.acquire(lambda: self._probe_budget(req))
        resp: httpx.Response | None = None
        try:
            resp, body = await self._wire(request, req)
            return resp, body
        finally:
            self.budget.release(
                resp.headers if resp is not None else None,
                resp.status_code if resp is not None else None,
                (req.url, req.repository),
            )

    async def _probe_budget(self, req: Request) -> Mapping[str, str] | None:
        """The budget headers of a manifest HEAD, which Docker Hub answers without
        spending a pull (of a manifest a pull found, else `req`'s); None when the HEAD
        fails or its answer carries no budget."""
        url, repository = self.budget.probe_target or (req.url, req.repository)
        head = Request(
            "HEAD", url, repository, headers=req.headers, pass_client_errors=True, attempts=1
        )
        try:
            resp = await self.send(head)
        except RegistryError:
            return None
        if resp.status_code >= 300 and "ratelimit-remaining" not in resp.headers:
            return None
        return resp.headers

    async def _wire(
        self, request: httpx.Request, req: Request
    ) -> tuple[httpx.Response, bytes | None]:
        body = None
        if self._bucket:
            await self._bucket.acquire()
        self.stats["requests"] += 1
        async with self._slots:
            with telemetry.client_span(req.method, req.url) as span:
                started = time.perf_counter()
                try:
                    resp = await self._http.send(
                        request,
                        stream=req.stream or req.max_body is not None,
                        follow_redirects=req.follow_redirects,
                    )
                except BaseException as exc:
                    if self.observer is not None:
                        self.observer(
                            self.site.name, req.method, None, time.perf_counter() - started
                        )
                    span.set_attribute("error.type", type(exc).__qualname__)
                    raise
                if self.observer is not None:
                    self.observer(
                        self.site.name, req.method, resp.status_code, time.perf_counter() - started
                    )
                telemetry.end_http(span, resp.status_code)
                if req.max_body is not None:
                    body = await self._read_capped(resp, req, req.max_body)
        if log.isEnabledFor(logging.DEBUG):
            for hop in (*resp.history, resp):  # a followed redirect shows every host
                log.debug(
                    "%s: %s %s -> %d",
                    self.site.name,
                    hop.request.method,
                    where(str(hop.request.url)),
                    hop.status_code,
                )
        return resp, body

    async def _read_capped(self, resp: httpx.Response, req: Request, limit: int) -> bytes:
        """The (decoded) body of `resp`, refused as soon as it passes `limit` bytes."""
        try:
            length = resp.headers.get("content-length")
            if length and length.isdigit() and int(length) > limit:
                raise self._too_large(f"announces {int(length)} bytes", limit, req)
            chunks: list[bytes] = []
            size = 0
            async for chunk in resp.aiter_bytes():
                size += len(chunk)
                if size > limit:
                    raise self._too_large(f"went past {size} bytes", limit, req)
                chunks.append(chunk)
        finally:
            await resp.aclose()
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _too_large(self, detail: str, limit: int, req: Request) -> ResponseTooLarge:
        return ResponseTooLarge(
            f"{req.what} is larger than {size_text(limit)} ({detail}); refused",
            site=self.site.name,
            repository=req.repository,
            reference=req.reference,
        )

    # ------------------------------------------------------------------ errors
    def _status_error(self, status: int, message: str, body: bytes, req: Request) -> RegistryError:
        kw: dict[str, Any] = dict(
            site=self.site.name, repository=req.repository, reference=req.reference, status=status
        )
        if status == 404:
            return NotFound(message, **kw)
        if status in (401, 403):
            return Unauthorized(message + self.auth.identity(), **kw)
        if status == 400 and b"DIGEST_INVALID" in body:
            return DigestMismatch(message, **kw)
        return RegistryError(message, **kw)

    def _transport_error(
        self, exc: httpx.TransportError | ssl.SSLError, req: Request
    ) -> RegistryError:
        kw: dict[str, Any] = dict(
            site=self.site.name, repository=req.repository, reference=req.reference
        )
        if isinstance(exc, ssl.SSLError):  # e.g. the registry refused our certificate
            return RegistryUnavailable(
                f"TLS failure talking to {self.site.url}: {exc_text(exc)}", **kw
            )
        if speaks_plain_http(exc) and self.is_own(req.url):
            return RegistryUnavailable(
                f"{self.site.url} speaks plain HTTP, not TLS: use url: http://{self.site.host} "
                "with insecure: true (copy: --insecure)",
                retryable=False,
                **kw,
            )
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            return RegistryUnavailable(f"cannot connect to {self.site.url}: {exc_text(exc)}", **kw)
        return RetryableError(f"{req.method} {where(req.url)} failed: {exc_text(exc)}", **kw)


def _tls_verify(site: SiteEndpoint) -> ssl.SSLContext:
    return tls.site_tls(site)  # contexts shared between clients: replicator.registry.tls


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, _TransientStatus):
        return True
    if isinstance(exc, httpx.TransportError):
        # a configuration mistake does not heal by waiting
        return "CERTIFICATE_VERIFY_FAILED" not in str(exc) and not speaks_plain_http(exc)
    return False


# What OpenSSL reports when the "TLS record" it reads is an HTTP answer
# (`HTTP/1.1 400 ...`): the server does not speak TLS on that port.
_NOT_TLS = frozenset({"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE"})


def speaks_plain_http(exc: BaseException) -> bool:
    """Whether a failed TLS handshake means the server answered in plain HTTP."""
    seen: BaseException | None = exc
    for _ in range(8):  # httpx -> httpcore -> ssl
        if seen is None:
            break
        if isinstance(seen, ssl.SSLError) and getattr(seen, "reason", None) in _NOT_TLS:
            return True
        seen = seen.__cause__ or seen.__context__
    return "wrong version number" in str(exc).lower()


def exc_text(exc: BaseException | None) -> str:
    """`Type: message` of an exception, with anything secret-looking redacted."""
    if exc is None:
        return "unknown error"
    text = str(exc).strip()
    return redact(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


def media_type(content_type: str | None) -> str:
    """`application/json` of `application/json; charset=utf-8`."""
    return (content_type or "").split(";", 1)[0].strip()


def registry_message(body: bytes, status: int) -> str:
    """The registry's `errors[].message` texts, else the HTTP reason phrase."""
    try:
        doc = json.loads(body)
        msgs = [
            str(e.get("message") or e.get("code") or "").strip()
            for e in doc.get("errors") or []
            if isinstance(e, dict)
        ]
        msgs = [m for m in msgs if m]
        if msgs:
            return redact("; ".join(dict.fromkeys(msgs)))
    except (ValueError, AttributeError, TypeError):
        pass
    try:
        return HTTPStatus(status).phrase.lower()
    except ValueError:
        return "unexpected answer"


async def _read_error_body(resp: httpx.Response) -> bytes:
    """At most 64 KiB of an error answer's body (enough for its message); closes it."""
    try:
        if resp.is_stream_consumed:
            return resp.content[:_MAX_ERROR_BODY]
        out = b""
        async for chunk in resp.aiter_bytes():
            out += chunk
            if len(out) >= _MAX_ERROR_BODY:
                break
        return out[:_MAX_ERROR_BODY]
    except httpx.HTTPError:
        return b""
    finally:
        await resp.aclose()
