"""A tiny Docker token server that a real `docker-registry` trusts (auth.token).

Issues ES256 JWTs signed with a throw-away key whose self-signed certificate
the registry gets as `rootcertbundle`; the JWT header's `kid` is the libtrust
key id of that key, which is how distribution 2.8 finds the verifying key.
Checks basic credentials (or an identity/refresh token) on each token request,
grants the requested scopes (optionally restricted per user) and records
every request so tests can assert the flow.
"""

from __future__ import annotations

import base64
import datetime as dt
import fnmatch
import hashlib
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.harness.credhelper import verify_secret
from tests.harness.registry import TokenAuth
from tests.harness.util import free_port


def libtrust_key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """libtrust KeyID: SHA-256 of the DER SubjectPublicKeyInfo, first 240 bits, base32,
    in 12 groups of 4 separated by ':'."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode()
    return ":".join(b32[i : i + 4] for i in range(0, 48, 4))


@dataclass
class TokenRequest:
    method: str
    user: str | None  # None = anonymous
    scopes: list[str]
    granted: list[dict]
    service: str | None


@dataclass
class TokenServer:
    directory: Path
    users: dict[str, str] = field(default_factory=dict)
    # user -> {repository glob: allowed actions}; users absent here may do anything.
    permissions: dict[str, dict[str, set[str]]] = field(default_factory=dict)
    identity_tokens: dict[str, str] = field(default_factory=dict)  # refresh token -> user
    allow_anonymous: bool = False  # anonymous users get pull only
    service: str = "test-registry"
    issuer: str = "test-token-issuer"
    expires_in: int = 300
    stale_next: int = 0  # issue this many already-expired tokens
    # Also accept, as a password or refresh token, an unexpired HS256 JWT signed with this
    # key naming the user in `sub` (what tests/harness/credhelper.py's helpers hand out).
    secret_key: bytes | None = None
    secret_leeway: float = 0.0  # accept such a secret this long past its expiry (clock skew)
    port: int = field(default_factory=free_port)
    requests: list[TokenRequest] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)  # every token handed out

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        self.kid = libtrust_key_id(self._key.public_key())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test token issuer")])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .sign(self._key, hashes.SHA256())
        )
        self.cert_path = self.directory / "token-signer.pem"
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def token_auth(self) -> TokenAuth:
        """What to pass as Registry(token=...)."""
        return TokenAuth(
            realm=self.realm,
            service=self.service,
            issuer=self.issuer,
            rootcertbundle=str(self.cert_path),
        )

    def start(self) -> TokenServer:
        server = ThreadingHTTPServer(("127.0.0.1", self.port), _handler_for(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="token-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> TokenServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- what tests look at -------------------------------------------------------
    def scope_sets(self) -> list[list[str]]:
        with self._lock:
            return [list(r.scopes) for r in self.requests]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    # --- token issuing --------------------------------------------------------------
    def _authenticate(
        self, method: str, headers, form: dict[str, list[str]]
    ) -> tuple[bool, str | None]:
        if method == "POST":
            grant = (form.get("grant_type") or [""])[0]
            if grant == "refresh_token":
                refresh = (form.get("refresh_token") or [""])[0]
                user = self.identity_tokens.get(refresh) or self._signed(refresh)
                return user is not None, user
            if grant == "password":
                user = (form.get("username") or [""])[0]
                return self.users.get(user) == (form.get("password") or [None])[0], user
            return False, None
        header = headers.get("Authorization") or ""
        if not header:
            return self.allow_anonymous, None
        if not header.lower().startswith("basic "):
            return False, None
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False, None
        return self.users.get(user) == password or self._signed(password) == user, user

    def _signed(self, secret: str) -> str | None:
        """The user an unexpired helper-issued secret names (None: not one, or expired)."""
        if self.secret_key is None:
            return None
        return verify_secret(secret, self.secret_key, now=time.time() - self.secret_leeway)

    def _grant(self, user: str | None, scopes: list[str]) -> list[dict]:
        access: list[dict] = []
        for scope in scopes:
            head, _, actions = scope.rpartition(":")
            rtype, _, name = head.partition(":")
            if not rtype or not name:
                continue
            wanted = [a for a in actions.split(",") if a]
            if user is None:
                allowed = {"pull"}
            elif user in self.permissions:
                allowed = set()
                for pattern, acts in self.permissions[user].items():
                    if fnmatch.fnmatchcase(name, pattern):
                        allowed |= acts
            else:
                allowed = {"*"}
            granted = [a for a in wanted if "*" in allowed or a in allowed]
            if granted:
                access.append({"type": rtype, "name": name, "actions": granted})
        return access

    def _issue(self, user: str | None, access: list[dict]) -> str:
        now = int(time.time())
        with self._lock:
            stale = self.stale_next > 0
            if stale:
                self.stale_next -= 1
        if stale:  # expired well beyond the registry's 60 s leeway
            now -= 3 * 3600
        claims = {
            "iss": self.issuer,
            "sub": user or "",
            "aud": self.service,
            "exp": now + self.expires_in,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        token = jwt.encode(
            claims, self._key, algorithm="ES256", headers={"kid": self.kid, "typ": "JWT"}
        )
        with self._lock:
            self.issued.append(token)
        return token


def _handler_for(ts: TokenServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def _answer(self, status: int, body: dict) -> None:
            raw = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def _handle(
            self, method: str, query: dict[str, list[str]], form: dict[str, list[str]]
        ) -> None:
            if urlsplit(self.path).path != "/token":
                self._answer(404, {"error": "not found"})
                return
            ok, user = ts._authenticate(method, self.headers, form)
            if method == "POST":
                scopes = " ".join(form.get("scope") or []).split()
                service = (form.get("service") or [None])[0]
            else:
                scopes = [s for v in query.get("scope", []) for s in v.split()]
                service = (query.get("service") or [None])[0]
            granted = ts._grant(user, scopes) if ok else []
            with ts._lock:
                ts.requests.append(
                    TokenRequest(method, user if ok else None, scopes, granted, service)
                )
            if not ok:
                self._answer(
                    401, {"errors": [{"code": "UNAUTHORIZED", "message": "invalid credentials"}]}
                )
                return
            token = ts._issue(user, granted)
            self._answer(
                200,
                {
                    "token": token,
                    "access_token": token,
                    "expires_in": ts.expires_in,
                    "issued_at": dt.datetime.now(dt.UTC).isoformat(),
                },
            )

        def do_GET(self) -> None:
            self._handle("GET", parse_qs(urlsplit(self.path).query), {})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            form = parse_qs(self.rfile.read(length).decode())
            self._handle("POST", {}, form)

    return Handler


class BearerAuth(httpx.Auth):
    """httpx auth that answers a registry's Bearer challenge as `user` (for seeding and
    checking a token-protected registry from tests)."""

    def __init__(self, user: str, password: str) -> None:
        self.user, self.password = user, password

    def auth_flow(self, request: httpx.Request):  # type: ignore[no-untyped-def]
        response = yield request
        if response.status_code != 401:
            return
        challenge = response.headers.get("www-authenticate", "")
        params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        query: list[tuple[str, str]] = [("service", params.get("service", ""))]
        query += [("scope", s) for s in params.get("scope", "").split()]
        token = httpx.get(params["realm"], params=query, auth=(self.user, self.password))
        request.headers["Authorization"] = f"Bearer {token.json()['token']}"
        yield request
