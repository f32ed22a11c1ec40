"""Stand-ins for the credential helpers of ECR, GCR and ACR, and an ECR-like front.

`CredentialHelper` writes an executable `docker-credential-NAME` that speaks
the docker-credential-helpers protocol (`get`, the registry host on stdin,
`{"ServerURL", "Username", "Secret"}` on stdout, "credentials not found" and
exit 1 for a host it does not know). Its secrets are HS256 JWTs that expire
`ttl` seconds after the helper ran, like ECR's 12 h and GCR's 1 h tokens,
shortened to seconds; `identity_token=True` answers Username `<token>` like
ACR's helper (the Secret is then a refresh token for the token server).
Every run is logged to a file, so tests count runs.

`TokenServer(secret_key=...)` and `EcrLikeFront` accept such a JWT while it is
unexpired and refuse it after: the token server as a password or refresh token,
the front as the password of Basic auth in front of a real registry (ECR's
`docker login -u AWS -p <token>` scheme).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness.hostile_front import HostileFront, Reply, Seen

_SCRIPT = """#!{python}
import base64, hashlib, hmac, json, sys, time
conf = json.load(open({conf!r}))
if sys.argv[1:] != ["get"]:
    print("only get is supported"); sys.exit(2)
host = sys.stdin.read().strip()
with open(conf["log"], "a") as log:
    log.write(host + "\\n")
if conf.get("fail"):
    print(conf["fail"]); sys.exit(3)
entry = conf["hosts"].get(host)
if entry is None:
    print("credentials not found in native keychain"); sys.exit(1)
def b64(raw):
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
now = int(time.time())
# an opaque secret (ECR's) does not say when it expires: the expiry goes under another name
expiry = "expiry" if conf["opaque"] else "exp"
claims = {{"sub": entry["user"], "iat": now, expiry: now + conf["ttl"]}}
head = b64(json.dumps({{"alg": "HS256", "typ": "JWT"}}).encode())
body = b64(json.dumps(claims).encode())
mac = hmac.new(bytes.fromhex(conf["key"]), (head + "." + body).encode(), hashlib.sha256)
sig = b64(mac.digest())
secret = head + "." + body + "." + sig
user = "<token>" if entry.get("identity_token") else entry["user"]
with open(conf["issued"], "a") as issued:
    issued.write(secret + "\\n")
print(json.dumps({{"ServerURL": host, "Username": user, "Secret": secret}}))
"""


def mint_secret(key: bytes, user: str, ttl: float) -> str:
    """A secret like the helper script's: an HS256 JWT naming `user`, expiring in `ttl` s
    (what `docker login` would have written to a config file)."""

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps({"sub": user, "exp": time.time() + ttl}).encode())
    sig = b64(hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest())
    return f"{head}.{body}.{sig}"


def verify_secret(token: str, key: bytes, now: float | None = None) -> str | None:
    """The `sub` of an unexpired HS256 JWT signed with `key`, else None."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    head, body, sig = parts
    want = base64.urlsafe_b64encode(
        hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    ).rstrip(b"=")
    if not hmac.compare_digest(want, sig.encode()):
        return None
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    if claims.get("exp", claims.get("expiry", 0)) <= (time.time() if now is None else now):
        return None
    return str(claims.get("sub") or "")


@dataclass
class CredentialHelper:
    """An executable `docker-credential-<name>` in `directory` (put it on PATH)."""

    directory: Path
    name: str = "test"
    ttl: int = 3600
    opaque: bool = False  # hide the expiry from clients, like ECR's non-JWT tokens
    key: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    hosts: dict[str, dict[str, object]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log = self.directory / f"{self.name}.log"
        self.log.touch()
        self.issued_file = self.directory / f"{self.name}.issued"
        self.issued_file.touch()
        self._conf = self.directory / f"{self.name}.json"
        self.save()
        self.path = self.directory / f"docker-credential-{self.name}"
        self.path.write_text(_SCRIPT.format(python=sys.executable, conf=str(self._conf)))
        self.path.chmod(self.path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)

    def serve(self, host: str, user: str, *, identity_token: bool = False) -> CredentialHelper:
        self.hosts[host] = {"user": user, "identity_token": identity_token}
        self.save()
        return self

    def fail_with(self, message: str | None) -> None:
        """Make every run exit 3 printing `message` (None: work again)."""
        self.save(fail=message)

    def save(self, fail: str | None = None) -> None:
        conf = {
            "hosts": self.hosts,
            "ttl": self.ttl,
            "key": self.key.hex(),
            "log": str(self.log),
            "issued": str(self.issued_file),
            "opaque": self.opaque,
            "fail": fail,
        }
        self._conf.write_text(json.dumps(conf))

    @property
    def runs(self) -> int:
        return len(self.log.read_text().splitlines())

    @property
    def issued(self) -> list[str]:
        """Every secret this helper handed out."""
        return self.issued_file.read_text().split()

    def path_env(self) -> str:
        """A PATH with this helper's directory first."""
        return f"{self.directory}{os.pathsep}{os.environ.get('PATH', '')}"


class EcrLikeFront(HostileFront):
    """A front that demands Basic auth whose password is an unexpired helper JWT (ECR's
    scheme: user AWS, a 12 h token as password), forwarding accepted requests to a real
    registry. Requests are checked after forwarding (the front cannot stream a refusal
    first), so use it for reads and small writes."""

    def __init__(self, upstream_port: int, key: bytes, *, user: str = "AWS") -> None:
        super().__init__(upstream_port)
        self.key = key
        self.user = user
        self.refused = 0
        self.rewrite(None, ".*", self._check)

    def _check(self, seen: Seen, reply: Reply) -> Reply:
        header = seen.headers.get("authorization", "")
        ok = False
        if header.lower().startswith("basic "):
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
            ok = user == self.user and verify_secret(password, self.key) == self.user
        if ok:
            return reply
        with self._lock:
            self.refused += 1
        body = b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}'
        return Reply(
            401,
            {"WWW-Authenticate": 'Basic realm="ecr-like"', "Content-Type": "application/json"},
            body,
        )
