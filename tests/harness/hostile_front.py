"""A hostile (or merely unusual) HTTP front for a real registry, for what a real
registry will not do on demand: send uploads or pages to another host, redirect
blob GETs to a "CDN", loop its pagination, serve a manifest of any size, ask for
a token at an http:// realm.

Each request is forwarded to the upstream registry (keeping the client's Host,
so the registry builds its Location and Link URLs on the front's address)
unless a rule answers it instead; a rule may also rewrite the upstream's
answer. Every request is recorded with its headers, so tests can assert which
host received credentials. `inject_authorization` makes the front add its own
Authorization when forwarding: a storage host or CDN that needs nothing from
the client. `tls=True` serves https with a throw-away self-signed certificate.
"""

from __future__ import annotations

import datetime as dt
import http.client
import ipaddress
import re
import ssl
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.harness.util import free_port

Body = bytes | Callable[[], Iterable[bytes]]
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}


@dataclass
class Reply:
    """An answer: from the upstream registry (rules may edit it) or made up by a rule."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: Body = b""
    length: int | None = None  # Content-Length to announce for a callable body; None: chunked


@dataclass
class Seen:
    method: str
    target: str  # path and query as sent
    headers: dict[str, str]  # lower-case names
    status: int = 0
    sent: int = 0  # response body bytes written before the exchange ended

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


@dataclass
class _Rule:
    method: str | None
    target: re.Pattern[str]
    answer: Callable[[Seen], Reply | None] | None = None  # instead of forwarding (None: do)
    rewrite: Callable[[Seen, Reply], Reply] | None = None  # after forwarding
    remaining: int | None = None  # None: every matching request


class HostileFront:
    def __init__(
        self,
        upstream_port: int | None = None,
        *,
        tls: bool = False,
        inject_authorization: str | None = None,
    ) -> None:
        self.upstream_port = upstream_port
        self.tls = tls
        self.inject_authorization = inject_authorization
        self.port = free_port()
        self.seen: list[Seen] = []
        self._rules: list[_Rule] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._certdir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    # --- rules ------------------------------------------------------------------------
    def answer(
        self,
        method: str | None,
        target: str,
        reply: Reply | Callable[[Seen], Reply],
        count: int | None = None,
    ) -> None:
        """Answer requests whose path?query matches `target` (a regex) with `reply`."""
        make = reply if callable(reply) else (lambda _seen: reply)
        self._add(_Rule(method, re.compile(target), answer=make, remaining=count))

    def rewrite(
        self,
        method: str | None,
        target: str,
        edit: Callable[[Seen, Reply], Reply],
        count: int | None = None,
    ) -> None:
        """Forward matching requests, then pass the upstream's reply through `edit`."""
        self._add(_Rule(method, re.compile(target), rewrite=edit, remaining=count))

    def intercept(
        self,
        method: str | None,
        target: str,
        answer: Callable[[Seen], Reply | None],
        edit: Callable[[Seen, Reply], Reply],
    ) -> None:
        """`answer` matching requests itself, or (when it returns None) forward them and
        pass the upstream's reply through `edit`."""
        self._add(_Rule(method, re.compile(target), answer=answer, rewrite=edit))

    def _add(self, rule: _Rule) -> None:
        with self._lock:
            self._rules.append(rule)

    def _rule_for(self, method: str, target: str) -> _Rule | None:
        with self._lock:
            for rule in self._rules:
                if rule.remaining == 0 or (rule.method and rule.method != method):
                    continue
                if rule.target.search(target):
                    if rule.remaining is not None:
                        rule.remaining -= 1
                    return rule
        return None

    # --- observation ------------------------------------------------------------------
    def requests(self, method: str | None = None, path: str | None = None) -> list[Seen]:
        rx = re.compile(path) if path else None
        with self._lock:
            seen = list(self.seen)
        return [
            s
            for s in seen
            if (method is None or s.method == method) and (rx is None or rx.search(s.target))
        ]

    def with_authorization(self) -> list[Seen]:
        """Requests that reached this front carrying an Authorization header."""
        return [s for s in self.requests() if "authorization" in s.headers]

    # --- lifecycle --------------------------------------------------------------------
    def start(self) -> HostileFront:
        front = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                front._handle(self)

            do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        if self.tls:
            server.socket = self._tls_context().wrap_socket(server.socket, server_side=True)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._certdir:
            self._certdir.cleanup()
            self._certdir = None

    def __enter__(self) -> HostileFront:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the exchange -----------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        headers = {k.lower(): v for k, v in h.headers.items()}
        body = _read_request_body(h)
        seen = Seen(h.command, h.path, headers)
        with self._lock:
            self.seen.append(seen)
        rule = self._rule_for(h.command, h.path)
        reply = rule.answer(seen) if rule and rule.answer else None
        if reply is None:
            reply = self._forward(h, body)
            if rule and rule.rewrite:
                reply = rule.rewrite(seen, reply)
        seen.status = reply.status
        try:
            self._write(h, reply, seen)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            h.close_connection = True

    def _forward(self, h: BaseHTTPRequestHandler, body: bytes) -> Reply:
        assert self.upstream_port, "this front has no upstream: answer every request"
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=30)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP_BY_HOP}
            if self.inject_authorization:
                headers["Authorization"] = self.inject_authorization
            headers["Content-Length"] = str(len(body))
            conn.request(h.command, h.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            out = {k: v for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP}
            if h.command == "HEAD":
                return Reply(resp.status, out, b"", length=int(resp.getheader("content-length", 0)))
            return Reply(resp.status, out, data)
        finally:
            conn.close()

    def _write(self, h: BaseHTTPRequestHandler, reply: Reply, seen: Seen) -> None:
        h.send_response_only(reply.status)
        for key, value in reply.headers.items():
            h.send_header(key, value)
        if isinstance(reply.body, bytes):
            length: int | None = reply.length if h.command == "HEAD" else len(reply.body)
            pieces: Iterable[bytes] = [reply.body] if reply.body else []
        else:
            length, pieces = reply.length, reply.body()
        if length is None:
            h.send_header("Transfer-Encoding", "chunked")
        else:
            h.send_header("Content-Length", str(length))
        h.end_headers()
        if h.command == "HEAD":
            return
        for piece in pieces:
            if length is None:
                h.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            else:
                h.wfile.write(piece)
            seen.sent += len(piece)
        if length is None:
            h.wfile.write(b"0\r\n\r\n")
        h.wfile.flush()

    def _tls_context(self) -> ssl.SSLContext:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hostile front")])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        self._certdir = tempfile.TemporaryDirectory(prefix="hostile-front-")
        cert_path, key_path = (
            Path(self._certdir.name, "cert.pem"),
            Path(self._certdir.name, "key.pem"),
        )
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert_path, key_path)
        return ctx


def _read_request_body(h: BaseHTTPRequestHandler) -> bytes:
    if "chunked" in (h.headers.get("transfer-encoding") or "").lower():
        out = b""
        while True:
            size = int(h.rfile.readline().split(b";", 1)[0].strip(), 16)
            if size == 0:
                while h.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return out
            out += h.rfile.read(size)
            h.rfile.readline()
    return h.rfile.read(int(h.headers.get("content-length") or 0))


def moved_to(other: HostileFront | str) -> Callable[[Seen, Reply], Reply]:
    """A rewrite that points the reply's Location (and Link) at another host, same path."""
    base = other.url if isinstance(other, HostileFront) else other

    def edit(_seen: Seen, reply: Reply) -> Reply:
        headers = dict(reply.headers)
        for key, value in reply.headers.items():
            if key.lower() == "location":
                headers[key] = base + re.sub(r"^https?://[^/]+", "", value)
            elif key.lower() == "link":
                headers[key] = re.sub(r"<(?:https?://[^/]+)?(/[^>]*)>", rf"<{base}\1>", value)
        return Reply(reply.status, headers, reply.body, reply.length)

    return edit
