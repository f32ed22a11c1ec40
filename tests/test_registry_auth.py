"""Authentication and TLS against real registries: htpasswd basic auth, the Bearer token flow
with a real token server, docker config.json credentials, TLS verification and client certs.
Secrets must never show up in errors, reprs or logs."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from replicator.errors import ConfigError
from replicator.manifest import digest_of
from replicator.registry.auth import merge_scopes, parse_challenges, scopes_for
from replicator.registry.client import RegistryClient
from replicator.registry.errors import RegistryError, RegistryUnavailable, Unauthorized
from replicator.registry.site import Credentials, SiteEndpoint, load_docker_credentials
from tests.harness.images import Pusher, layer_bytes
from tests.harness.registry import Registry, write_htpasswd
from tests.harness.token_server import TokenServer, libtrust_key_id
from tests.test_registry_client import pieces

BOB_PW = "b0b-Secr3t-pw!"
ALICE_PW = "al1ce-T0ken-pw#"
READER_PW = "r3ader-pw%"
ID_TOKEN = "refresh-4f1d2c-identity-token"


def site(url: str, **kw) -> SiteEndpoint:
    return SiteEndpoint(name="us-east", url=url, insecure=True, **kw)


def client(url: str, retries: int = 5, **kw) -> RegistryClient:
    return RegistryClient(site(url, **kw), retries=retries, backoff_base=0.01)


# ----------------------------------------------------------------------------- pure parts
def test_parse_challenges():
    [ch] = parse_challenges(
        [
            'Bearer realm="https://auth.example/token",'
            'service="registry.example",scope="repository:a/b:pull,push"'
        ]
    )
    assert (ch.scheme, ch.realm, ch.service, ch.scopes) == (
        "bearer",
        "https://auth.example/token",
        "registry.example",
        ["repository:a/b:pull,push"],
    )
    both = parse_challenges(['Basic realm="x", Bearer realm="y",error="invalid_token"'])
    assert [(c.scheme, c.realm) for c in both] == [("basic", "x"), ("bearer", "y")]
    assert both[1].params["error"] == "invalid_token"


def test_scopes_inferred_per_request_and_merged():
    assert scopes_for("GET", "a") == ("repository:a:pull",)
    assert scopes_for("HEAD", "a") == ("repository:a:pull",)
    assert scopes_for("PUT", "a") == ("repository:a:pull,push",)
    assert scopes_for("DELETE", "a") == ("repository:a:delete",)
    assert scopes_for("POST", "dst", mount_from="src") == (
        "repository:dst:pull,push",
        "repository:src:pull",
    )
    assert scopes_for("GET", None, catalog=True) == ("registry:catalog:*",)
    assert merge_scopes(["repository:a:push", "repository:a:pull", "repository:b:pull"]) == (
        "repository:a:pull,push",
        "repository:b:pull",
    )


def test_credentials_and_site_repr_hide_secrets():
    creds = Credentials("bob", BOB_PW, identity_token=ID_TOKEN)
    s = site("http://127.0.0.1:1", credentials=creds)
    for text in (repr(creds), str(creds), repr(s), str(s)):
        assert BOB_PW not in text and ID_TOKEN not in text
    assert "bob" in repr(creds) and "***" in repr(creds)


def test_plain_http_needs_insecure():
    with pytest.raises(ConfigError, match="plain http; set insecure: true"):
        SiteEndpoint(name="x", url="http://127.0.0.1:5000")
    assert SiteEndpoint.from_url("reg.example:5000").url == "https://reg.example:5000"


def test_libtrust_key_id_shape():
    kid = libtrust_key_id(ec.generate_private_key(ec.SECP256R1()).public_key())
    groups = kid.split(":")
    assert len(groups) == 12 and all(len(g) == 4 for g in groups)


# ----------------------------------------------------------------------------- basic auth
@pytest.fixture
def basic_registry(tmp_path, registry_factory) -> Registry:
    htpasswd = write_htpasswd(tmp_path / "htpasswd", {"bob": BOB_PW})
    return registry_factory("basic", htpasswd=htpasswd)


async def test_basic_auth(basic_registry):
    data = b"basic-auth-blob" * 100
    digest = digest_of(data)
    async with client(basic_registry.url, credentials=Credentials("bob", BOB_PW)) as c:
        await c.ping()
        assert c.stats["requests"] == 2  # 401 challenge, then with basic
        await c.upload_blob("team/app", digest, len(data), pieces(data))
        assert await c.head_blob("team/app", digest) == len(data)
        assert c.stats["token_requests"] == 0


async def test_basic_auth_failures_name_user_not_password(basic_registry, caplog):
    caplog.set_level(logging.DEBUG)
    async with client(basic_registry.url, credentials=Credentials("bob", "wrong-" + BOB_PW)) as c:
        with pytest.raises(Unauthorized) as err:
            await c.head_manifest("team/app", "v1")
    text = str(err.value)
    assert text == "us-east: team/app:v1: unauthorized as user 'bob' (HTTP 401)"
    async with client(basic_registry.url) as c:
        with pytest.raises(Unauthorized, match=r"\(no credentials configured\)"):
            await c.ping()
    for blob in (text, repr(err.value), caplog.text):
        assert BOB_PW not in blob


# ----------------------------------------------------------------------------- docker config
def _docker_config(tmp_path: Path, entry: dict, key: str) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"auths": {key: entry}}))
    return str(path)


async def test_docker_config_credentials(tmp_path, basic_registry):
    auth = base64.b64encode(f"bob:{BOB_PW}".encode()).decode()
    forms = [
        ({"auth": auth}, basic_registry.host),
        ({"username": "bob", "password": BOB_PW}, f"http://{basic_registry.host}/v2/"),
    ]
    for entry, key in forms:
        cfg = _docker_config(tmp_path, entry, key)
        async with client(basic_registry.url, docker_config=cfg) as c:
            await c.ping()
    other = _docker_config(tmp_path, {"auth": auth}, "elsewhere.example")
    async with client(basic_registry.url, docker_config=other) as c:
        with pytest.raises(Unauthorized):
            await c.ping()
    # explicit credentials win over the file
    cfg = _docker_config(
        tmp_path, {"auth": base64.b64encode(b"bob:nope").decode()}, basic_registry.host
    )
    async with client(
        basic_registry.url, docker_config=cfg, credentials=Credentials("bob", BOB_PW)
    ) as c:
        await c.ping()


def test_docker_config_errors_are_clear_and_hide_content(tmp_path):
    cfg = _docker_config(tmp_path, {"auth": "!!!" + BOB_PW}, "reg.example")
    with pytest.raises(ConfigError) as err:
        load_docker_credentials(cfg, "reg.example", site="us-east")
    assert "auths['reg.example'].auth is not base64" in str(err.value)
    assert BOB_PW not in str(err.value)
    with pytest.raises(ConfigError, match="does not exist"):
        load_docker_credentials(str(tmp_path / "missing.json"), "reg.example")
    creds = load_docker_credentials(
        _docker_config(tmp_path, {"identitytoken": ID_TOKEN}, "reg.example"), "reg.example"
    )
    assert creds is not None and creds.identity_token == ID_TOKEN


# ----------------------------------------------------------------------------- token auth
@pytest.fixture
def token_setup(tmp_path, registry_factory):
    ts = TokenServer(
        tmp_path / "token",
        users={"alice": ALICE_PW, "reader": READER_PW},
        permissions={"reader": {"team/*": {"pull"}}},
        identity_tokens={ID_TOKEN: "alice"},
    ).start()
    try:
        reg = registry_factory("tok", token=ts.token_auth())
        yield ts, reg
    finally:
        ts.stop()


ALICE = Credentials("alice", ALICE_PW)


async def test_token_flow_scopes_and_cache(token_setup, proxy_factory):
    ts, reg = token_setup
    proxy = proxy_factory(reg)
    data = layer_bytes("tok", 2000)
    digest = digest_of(data)
    async with client(proxy.url, credentials=ALICE) as c:
        await c.upload_blob("team/src", digest, len(data), pieces(data))
        assert ts.scope_sets() == [[], ["repository:team/src:pull,push"]]  # ping, then push

        ts.clear()
        for _ in range(3):
            assert await c.head_blob("team/src", digest) == len(data)
        assert ts.scope_sets() == [["repository:team/src:pull"]]  # cached after one

        ts.clear()
        assert await c.mount_blob("team/dst", digest, from_repo="team/src") is None
        # both scopes in ONE token request
        assert ts.scope_sets() == [["repository:team/dst:pull,push", "repository:team/src:pull"]]
        assert ts.requests[0].user == "alice" and ts.requests[0].service == ts.service

        ts.clear()
        assert "team/dst" in await c.catalog()
        assert ts.scope_sets() == [["registry:catalog:*"]]
        assert await c.delete_blob("team/dst", digest) is True
    # the registry saw each request at most once with a valid token: no 401 after the first
    assert proxy.count("HEAD") == 3


async def test_stale_token_is_refreshed_on_401(token_setup, proxy_factory):
    ts, reg = token_setup
    proxy = proxy_factory(reg)
    with Pusher(reg.url, auth=_TokenAuthForPusher(ts)) as p:
        p.push_image("team/app", "v1", [layer_bytes("stale", 100)])
    ts.clear()
    async with client(proxy.url, credentials=ALICE) as c:
        await c.ping()  # learns the Bearer challenge
        ts.stale_next = 1  # the next token is already expired
        proxy.reset_counts()
        ts.clear()
        desc = await c.head_manifest("team/app", "v1")
        assert desc is not None
        # stale token -> 401 -> new token for the same scope set -> 200
        assert ts.scope_sets() == [["repository:team/app:pull"]] * 2
        assert [r.status for r in proxy.records] == [401, 200]
        ts.clear()
        await c.head_manifest("team/app", "v1")
        assert ts.scope_sets() == []  # the refreshed token is cached


async def test_token_scope_denied_is_unauthorized_without_looping(token_setup):
    ts, reg = token_setup
    data = b"denied"
    async with client(reg.url, credentials=Credentials("reader", READER_PW)) as c:
        assert await c.head_blob("team/app", digest_of(data)) is None  # pull is allowed
        with pytest.raises(Unauthorized) as err:
            await c.start_upload("team/app")
    assert str(err.value).startswith("us-east: team/app: authentication required")
    assert len(ts.requests) <= 3


async def test_token_server_rejects_bad_password(token_setup, caplog):
    caplog.set_level(logging.DEBUG)
    ts, reg = token_setup
    async with client(reg.url, credentials=Credentials("alice", "bad-" + ALICE_PW)) as c:
        with pytest.raises(Unauthorized) as err:
            await c.ping()
    assert str(err.value) == (f"us-east: token server {ts.realm} refused user 'alice' (HTTP 401)")
    assert ALICE_PW not in caplog.text + repr(err.value)


async def test_identity_token_uses_oauth2_refresh_grant(token_setup):
    ts, reg = token_setup
    async with client(reg.url, credentials=Credentials(identity_token=ID_TOKEN)) as c:
        await c.ping()
        assert await c.list_tags("team/none") == []
    assert [r.method for r in ts.requests] == ["POST", "POST"]
    assert all(r.user == "alice" for r in ts.requests)


async def test_secrets_and_tokens_never_logged(token_setup, caplog):
    caplog.set_level(logging.DEBUG)
    ts, reg = token_setup
    data = layer_bytes("log", 500)
    async with client(reg.url, credentials=ALICE) as c:
        await c.upload_blob("team/app", digest_of(data), len(data), pieces(data))
        await c.get_blob("team/app", digest_of(data))
        errors = []
        for call in (c.get_manifest("team/app", "missing"),):
            try:
                await call
            except RegistryError as exc:
                errors.append(f"{exc} {exc!r}")
    assert ts.issued and errors
    everything = caplog.text + "".join(errors) + repr(c) + repr(c.site)
    for secret in [ALICE_PW, *ts.issued]:
        assert secret not in everything
    assert "us-east" in caplog.text  # the logs do say what happened


class _TokenAuthForPusher(httpx.Auth):
    """Seeding helper for a token registry: asks the token server like docker would."""

    def __init__(self, ts: TokenServer) -> None:
        self.ts = ts

    def auth_flow(self, request):
        response = yield request
        if response.status_code == 401:
            [ch] = parse_challenges([response.headers["www-authenticate"]])
            params = [("service", ch.service)] + [("scope", s) for s in ch.scopes]
            tok = httpx.get(ch.realm, params=params, auth=("alice", ALICE_PW)).json()["token"]
            request.headers["Authorization"] = f"Bearer {tok}"
            yield request


# ----------------------------------------------------------------------------- TLS
@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _write_key(key, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def _cert(
    subject: str, key, issuer_name, issuer_key, *, ca: bool = False, server: bool = False
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
    elif not ca:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
    return b.sign(issuer_key, hashes.SHA256())


@pytest.fixture
def pki(tmp_path) -> Pki:
    d = tmp_path / "pki"
    d.mkdir()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test ca")])
    ca = _cert("test ca", ca_key, ca_name, ca_key, ca=True)
    out = {}
    for role in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(f"test {role}", key, ca_name, ca_key, server=role == "server")
        (d / f"{role}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[role] = (d / f"{role}.pem", _write_key(key, d / f"{role}.key"))
    (d / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return Pki(d / "ca.pem", *out["server"], *out["client"])


@dataclass
class TlsRegistry(Registry):
    """A real registry serving https and requiring client certificates from `pki`."""

    pki: Pki | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def _ready(self) -> bool:
        if self.proc and self.proc.poll() is not None:
            raise RuntimeError(f"registry exited: {self.log_text()[-2000:]}")
        assert self.pki
        ctx = ssl.create_default_context(cafile=str(self.pki.ca))
        ctx.load_cert_chain(str(self.pki.client_cert), str(self.pki.client_key))
        try:
            return httpx.get(f"{self.url}/v2/", verify=ctx, timeout=1).status_code == 200
        except httpx.TransportError:
            return False


@pytest.fixture
def tls_registry(tmp_path, pki):
    reg = TlsRegistry(
        root=tmp_path / "tls",
        pki=pki,
        extra_config={
            "http": {
                "tls": {
                    "certificate": str(pki.server_cert),
                    "key": str(pki.server_key),
                    "clientcas": [str(pki.ca)],
                }
            }
        },
    )
    reg.start()
    yield reg
    reg.stop()


async def test_tls_verification_custom_ca_and_client_cert(tls_registry, pki):
    url = tls_registry.url
    # verify by default: an unknown CA is refused at once (not retried) with a clear error
    async with RegistryClient(SiteEndpoint(name="tls", url=url), backoff_base=0.01) as c:
        with pytest.raises(RegistryUnavailable) as err:
            await c.ping()
        assert c.stats["requests"] == 1
    assert str(err.value).startswith(f"tls: cannot connect to {url}: ConnectError")
    assert "CERTIFICATE_VERIFY_FAILED" in str(err.value)

    # custom CA and client certificate
    good = SiteEndpoint(
        name="tls",
        url=url,
        ca_file=str(pki.ca),
        cert_file=str(pki.client_cert),
        key_file=str(pki.client_key),
    )
    async with RegistryClient(good) as c:
        await c.ping()
    # insecure skips verification (the client certificate is still presented)
    loose = SiteEndpoint(
        name="tls",
        url=url,
        insecure=True,
        cert_file=str(pki.client_cert),
        key_file=str(pki.client_key),
    )
    async with RegistryClient(loose) as c:
        await c.ping()
    # without the client certificate the registry refuses the connection
    nocert = SiteEndpoint(name="tls", url=url, ca_file=str(pki.ca))
    async with RegistryClient(nocert, retries=0) as c:
        with pytest.raises(RegistryError) as err:
            await c.ping()
    assert str(err.value).startswith("tls: ") and "certificate" in str(err.value).lower()


def test_unreadable_tls_files_are_config_errors(tmp_path):
    bad = SiteEndpoint(name="tls", url="https://127.0.0.1:1", ca_file=str(tmp_path / "no.pem"))
    with pytest.raises(ConfigError, match="site 'tls': cannot load TLS files"):
        RegistryClient(bad)
