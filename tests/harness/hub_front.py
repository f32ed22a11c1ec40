"""A Docker Hub stand-in: a real distribution behind a front that behaves like Hub.

No public registry is reachable from the test machines, so this reproduces what
of Docker Hub a replicator meets (see README, "Registries in the wild"):

- token auth with scopes from a token endpoint on another port (like
  auth.docker.io for registry-1.docker.io): the registry itself trusts the
  test token server (token_server.py); anonymous users may pull;
- no catalog: `GET /v2/_catalog` is answered 401 UNAUTHORIZED with a bearer
  challenge for `registry:catalog:*`, a scope the token endpoint never grants;
- a pull budget: every manifest GET spends one pull of `limit` per `window`
  seconds (a fixed window from the first pull); manifest GET and HEAD answers
  carry `ratelimit-limit: <limit>;w=<window>` and `ratelimit-remaining:
  <left>;w=<window>`; a HEAD spends nothing; once spent, manifest GETs are
  answered 429 TOOMANYREQUESTS until the window resets (`throttled` counts them);
- blob GETs redirected (307) to a "CDN" on another port, which serves the blob
  from the registry's storage without asking for credentials and records any
  Authorization it receives (a client must not send it one). The front first
  lets the registry check the request's token, as Hub does before redirecting.

Usage: `with HubStandIn(tmp_path / "hub", limit=100, window=5) as hub:`, then
`hub.push(...)` to seed images and `hub.url` as a site's URL.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.harness.hostile_front import HostileFront, Reply, Seen
from tests.harness.images import Pusher
from tests.harness.registry import Registry
from tests.harness.token_server import TokenServer

_MANIFEST = r"^/v2/[a-z0-9._/-]+/manifests/[^/?]+$"
_BLOB = r"^/v2/(?P<name>[a-z0-9._/-]+)/blobs/(?P<digest>sha256:[0-9a-f]{64})$"
_CDN_BLOB = r"^/cdn/(?P<digest>sha256:[0-9a-f]{64})"
SEED_USER, SEED_PASSWORD = "seed", "seed-password"


@dataclass
class PullBudgetState:
    """Docker Hub's pull limit as the stand-in keeps it: a fixed window per `window`."""

    limit: int
    window: float
    left: int = 0
    window_started: float | None = None
    pulls: int = 0  # manifest GETs answered 200
    throttled: int = 0  # manifest GETs answered 429
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.left = self.limit

    def _roll(self, now: float) -> None:
        if self.window_started is None or now - self.window_started >= self.window:
            self.window_started, self.left = now, self.limit

    def spend(self) -> bool:
        """One pull if the budget allows (True), else a throttled request (False)."""
        with self._lock:
            self._roll(time.monotonic())
            if self.left <= 0:
                self.throttled += 1
                return False
            self.left -= 1
            self.pulls += 1
            return True

    def headers(self) -> dict[str, str]:
        with self._lock:
            if self.window_started is not None:
                self._roll(time.monotonic())
            w = f"{self.window:g}"
            return {
                "ratelimit-limit": f"{self.limit};w={w}",
                "ratelimit-remaining": f"{self.left};w={w}",
                "docker-ratelimit-source": "127.0.0.1",
            }

    def retry_after(self) -> int:
        with self._lock:
            started = self.window_started or time.monotonic()
            return max(1, int(started + self.window - time.monotonic()) + 1)


class HubStandIn:
    """A token server, a registry trusting it, the Hub-like front and its CDN."""

    def __init__(self, root: Path, *, limit: int = 100, window: float = 21600) -> None:
        self.tokens = TokenServer(
            root / "token", users={SEED_USER: SEED_PASSWORD}, allow_anonymous=True
        )
        self.registry = Registry(root=root / "registry", token=self.tokens.token_auth())
        self.budget = PullBudgetState(limit, window)
        self.front = HostileFront()
        self.cdn = HostileFront()

    @property
    def url(self) -> str:
        return self.front.url

    @property
    def host(self) -> str:
        return self.front.host

    def start(self) -> HubStandIn:
        self.tokens.start()
        self.registry.start()
        self.front.upstream_port = self.registry.port
        self._rules()
        self.cdn.start()
        self.front.start()
        return self

    def stop(self) -> None:
        self.front.stop()
        self.cdn.stop()
        self.registry.stop()
        self.tokens.stop()

    def __enter__(self) -> HubStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def pusher(self) -> Pusher:
        """A Pusher straight to the registry (not the front), with a seeding user's token."""
        return Pusher(self.registry.url, auth=_TokenAuth(SEED_USER, SEED_PASSWORD))

    # --- what tests look at -------------------------------------------------------
    @property
    def throttled(self) -> int:
        """Manifest GETs answered 429 because the budget was spent."""
        return self.budget.throttled

    def cdn_requests_with_authorization(self) -> list[Seen]:
        return self.cdn.with_authorization()

    # --- the behaviour --------------------------------------------------------------
    def _rules(self) -> None:
        budget, front, cdn = self.budget, self.front, self.cdn
        challenge = (
            f'Bearer realm="{self.tokens.realm}",service="{self.tokens.service}",'
            'scope="registry:catalog:*"'
        )
        no_catalog = json.dumps(
            {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]}
        ).encode()
        front.answer(
            "GET",
            r"^/v2/_catalog",
            Reply(
                401,
                {"Content-Type": "application/json", "Www-Authenticate": challenge},
                no_catalog,
            ),
        )

        def pull(seen: Seen) -> Reply | None:
            if seen.headers.get("authorization") and not budget.spend():
                body = {
                    "errors": [
                        {
                            "code": "TOOMANYREQUESTS",
                            "message": "You have reached your pull rate limit.",
                        }
                    ]
                }
                return Reply(
                    429,
                    {
                        "Content-Type": "application/json",
                        "Retry-After": str(budget.retry_after()),
                        **budget.headers(),
                    },
                    json.dumps(body).encode(),
                )
            return None

        def with_budget(_seen: Seen, reply: Reply) -> Reply:
            if reply.status == 401:
                return reply  # Hub counts only authorized pulls; no headers on a challenge
            return Reply(
                reply.status, {**reply.headers, **budget.headers()}, reply.body, reply.length
            )

        front.intercept("GET", _MANIFEST, pull, with_budget)
        front.rewrite("HEAD", _MANIFEST, with_budget)

        blob = re.compile(_BLOB)

        def to_cdn(seen: Seen, reply: Reply) -> Reply:
            if reply.status != 200:
                return reply
            m = blob.match(seen.path)
            assert m is not None
            location = f"{cdn.url}/cdn/{m['digest']}?expires={int(time.time()) + 600}"
            return Reply(307, {"Location": location, "Content-Length": "0"}, b"")

        front.rewrite("GET", _BLOB, to_cdn)

        served = re.compile(_CDN_BLOB)
        registry = self.registry

        def serve(seen: Seen) -> Reply:
            m = served.match(seen.target)
            assert m is not None
            path = registry.blob_path(m["digest"])
            if not path.is_file():
                return Reply(404, {"Content-Type": "text/plain"}, b"no such object")
            return Reply(200, {"Content-Type": "application/octet-stream"}, path.read_bytes())

        cdn.answer("GET", _CDN_BLOB, serve)


class _TokenAuth(httpx.Auth):
    """Seeding: a pull,push token per repository from the token server, asked for once
    (on the first challenge) and then sent up front."""

    def __init__(self, user: str, password: str) -> None:
        self.user, self.password = user, password
        self._tokens: dict[str, str] = {}
        self._realm: tuple[str, str] | None = None  # realm, service

    def auth_flow(self, request: httpx.Request):
        m = re.match(r"^/v2/(.+?)/(?:blobs|manifests|tags)/", request.url.path)
        repo = m.group(1) if m else None
        if repo and repo in self._tokens:
            request.headers["Authorization"] = f"Bearer {self._tokens[repo]}"
        response = yield request
        if response.status_code != 401:
            return
        params = dict(re.findall(r'(\w+)="([^"]*)"', response.headers["www-authenticate"]))
        scope = f"repository:{repo}:pull,push" if repo else params.get("scope", "")
        query = [("service", params["service"]), ("scope", scope)]
        token = httpx.get(params["realm"], params=query, auth=(self.user, self.password)).json()[
            "token"
        ]
        if repo:
            self._tokens[repo] = token
        request.headers["Authorization"] = f"Bearer {token}"
        yield request
