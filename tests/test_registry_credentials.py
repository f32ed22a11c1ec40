"""Credentials like the ecosystem keeps them: docker config.json credential helpers
(credHelpers, credsStore), containers auth.json, identity tokens, and short-lived helper
tokens renewed without a restart. Helpers are real executables speaking the
docker-credential-helpers protocol (tests/harness/credhelper.py); the registries are
real distribution behind a real token server, or behind an ECR-like Basic front."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from pathlib import Path

import pytest

from replicator.errors import ConfigError
from replicator.manifest import digest_of
from replicator.registry.auth import scope_repository
from replicator.registry.client import RegistryClient
from replicator.registry.credentials import Credentials, jwt_expiry, secret_expiry
from replicator.registry.credfiles import (
    auth_file_candidates,
    auths_source,
    docker_config_source,
    matching_auths_key,
)
from replicator.registry.credhelpers import (
    SHARED_CACHE,
    HelperAnswer,
    HelperCache,
    HelperError,
    parse_helper_output,
    run_helper,
)
from replicator.registry.credprovider import CredentialFiles, CredentialProvider
from replicator.registry.errors import Unauthorized
from replicator.registry.site import SiteEndpoint
from tests.harness.credhelper import CredentialHelper, EcrLikeFront, mint_secret, verify_secret
from tests.harness.images import layer_bytes
from tests.harness.token_server import TokenServer
from tests.harness.util import async_wait_until
from tests.test_registry_client import pieces

ALICE_PW = "al1ce-T0ken-pw#"
READER_PW = "r3ader-pw%"


@pytest.fixture(autouse=True)
def _fresh_helper_cache():
    SHARED_CACHE.clear()
    yield
    SHARED_CACHE.clear()


def _jwt(claims: dict) -> str:
    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    return f"{b64(b'{}')}.{b64(json.dumps(claims).encode())}.c2ln"


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# ----------------------------------------------------------------------------- pure parts
def test_helper_per_host_wins_over_store_and_store_over_auths():
    doc = {
        "auths": {"reg.example": {"auth": _b64("bob:pw")}, "other.example": {}},
        "credsStore": "desktop",
        "credHelpers": {"123.dkr.ecr.example": "ecr-login", "https://gcr.example": "gcloud"},
    }
    assert docker_config_source(doc, "123.dkr.ecr.example").helper == "ecr-login"
    assert docker_config_source(doc, "reg.example").helper == "desktop"
    no_store = {k: v for k, v in doc.items() if k != "credsStore"}
    found = docker_config_source(no_store, "reg.example", path="/p/config.json")
    assert found is not None and found.helper is None
    assert found.credentials == Credentials("bob", "pw")
    assert found.origin == "docker config /p/config.json: auths['reg.example']"
    assert "pw" not in repr(found)
    assert docker_config_source(no_store, "other.example") is None  # a marker, no secret
    assert docker_config_source(no_store, "gcr.example").helper == "gcloud"  # URL key


def test_docker_hub_names_are_one_registry():
    doc = {"auths": {"https://index.docker.io/v1/": {"auth": _b64("hubuser:pw")}}}
    for host in ("docker.io", "registry-1.docker.io", "index.docker.io"):
        found = docker_config_source(doc, host)
        assert found is not None and found.credentials.username == "hubuser"


async def test_docker_hub_helper_is_asked_for_the_index_url(tmp_path, monkeypatch):
    """docker keeps Docker Hub credentials in a helper under https://index.docker.io/v1/,
    so that is what the helper is asked for, whichever Hub host name the site uses."""
    helper = CredentialHelper(tmp_path / "bin", name="hub").serve(
        "https://index.docker.io/v1/", "hubuser"
    )
    monkeypatch.setenv("PATH", helper.path_env())
    cfg = _config(tmp_path, {"credsStore": "hub"})
    provider = CredentialProvider(
        "hub", "registry-1.docker.io", files=CredentialFiles(docker_config=Path(cfg))
    )
    creds = await provider.get("library/nginx")
    assert creds is not None and creds.username == "hubuser"
    assert helper.log.read_text().split() == ["https://index.docker.io/v1/"]


def test_auth_json_most_specific_namespace_wins():
    auths = {
        "quay.example": {"auth": _b64("wide:1")},
        "quay.example/team": {"auth": _b64("team:2")},
        "quay.example/team/app": {"auth": _b64("app:3")},
        "quay.example/teamster": {"auth": _b64("nope:4")},
    }
    assert matching_auths_key(auths, "quay.example", "team/app") == "quay.example/team/app"
    assert matching_auths_key(auths, "quay.example", "team/app/sub") == "quay.example/team/app"
    assert matching_auths_key(auths, "quay.example", "team/db") == "quay.example/team"
    assert matching_auths_key(auths, "quay.example", "teamwork/x") == "quay.example"
    assert matching_auths_key(auths, "quay.example", None) == "quay.example"
    assert matching_auths_key(auths, "elsewhere.example", "team/app") is None
    found = auths_source({"auths": auths}, "quay.example", "team/db", what="auth file x")
    assert found is not None and found.credentials.username == "team"


def test_token_username_means_identity_token():
    found = docker_config_source(
        {"auths": {"acr.example": {"username": "<token>", "password": "refresh-1"}}},
        "acr.example",
    )
    assert found is not None
    assert found.credentials == Credentials(identity_token="refresh-1")
    creds = parse_helper_output(
        "docker-credential-acr-env",
        "acr.example",
        b'{"ServerURL":"acr.example","Username":"<token>","Secret":"refresh-2"}',
        site="s",
    )
    assert creds == Credentials(identity_token="refresh-2")


def test_credentials_follow_the_repository_pushed_to():
    assert scope_repository(("repository:a/src:pull", "repository:z/dst:pull,push")) == "z/dst"
    assert scope_repository(("repository:team/app:pull",)) == "team/app"
    assert scope_repository(("registry:catalog:*",)) is None
    assert scope_repository(()) is None


def test_unreadable_helper_answer_is_named_not_quoted():
    with pytest.raises(HelperError) as err:
        parse_helper_output("docker-credential-x", "reg.example", b"Secret=s3cr3t-value", site="s")
    assert "docker-credential-x: answered for reg.example with something other" in str(err.value)
    assert "s3cr3t" not in str(err.value)


def test_auth_file_lookup_order_follows_the_man_page(tmp_path):
    home = tmp_path / "home"
    assert auth_file_candidates(
        {"REGISTRY_AUTH_FILE": "/a.json", "XDG_RUNTIME_DIR": "/r"}, home
    ) == [Path("/a.json")]
    assert auth_file_candidates({"XDG_RUNTIME_DIR": "/run/user/7"}, home) == [
        Path("/run/user/7/containers/auth.json"),
        home / ".config/containers/auth.json",
    ]
    assert auth_file_candidates({}, home) == [home / ".config/containers/auth.json"]


def test_jwt_expiry_is_read_without_trusting_it():
    assert jwt_expiry(_jwt({"exp": 1700000000})) == 1700000000.0
    assert jwt_expiry(_jwt({"sub": "x"})) is None
    assert jwt_expiry("not-a-jwt") is None
    assert jwt_expiry("a.!!!.c") is None
    assert secret_expiry(Credentials("AWS", _jwt({"exp": 5}))) == 5.0
    assert secret_expiry(Credentials(identity_token=_jwt({"exp": 7}))) == 7.0


def test_cache_keeps_an_answer_as_long_as_its_secret_lives():
    cache = HelperCache(margin=30)
    now = time.time()
    creds = Credentials("u", "p")
    cache.put("ecr-login", "h", HelperAnswer(creds, now + 3600), max_age=7200)
    assert cache.get("ecr-login", "h", now=now + 3500) is not None
    assert cache.get("ecr-login", "h", now=now + 3575) is None  # renewed 30 s early
    cache.put("ecr-login", "h", HelperAnswer(creds, None), max_age=600)  # lifetime unknown
    assert cache.get("docker-credential-ecr-login", "h", now=now + 500) is not None
    assert cache.get("ecr-login", "h", now=now + 601) is None
    cache.put("ecr-login", "h", HelperAnswer(creds, now + 5), max_age=600)  # short-lived
    assert cache.get("ecr-login", "h", now=now + 4) is not None  # margin is a tenth of 5 s
    assert cache.get("ecr-login", "h", now=now + 4.6) is None
    cache.put("ecr-login", "h", HelperAnswer(creds, None), max_age=600)
    cache.forget("ecr-login", "h")
    assert cache.get("ecr-login", "h") is None


# ----------------------------------------------------------------------------- running helpers
async def test_helper_protocol_answers_and_failures(tmp_path, monkeypatch):
    helper = CredentialHelper(tmp_path / "bin", name="ecrlike").serve("reg.example", "AWS")
    monkeypatch.setenv("PATH", helper.path_env())
    answer = await run_helper("ecrlike", "reg.example", site="us-east")
    assert answer.credentials is not None and answer.credentials.username == "AWS"
    assert answer.credentials.password == helper.issued[-1]
    assert answer.expires_at is not None and answer.expires_at > time.time() + 3000

    none = await run_helper("ecrlike", "unknown.example", site="us-east")
    assert none.credentials is None
    assert none.reason == (
        "docker-credential-ecrlike exited 1: credentials not found in native keychain"
    )

    helper.fail_with("no AWS credentials in the environment")
    with pytest.raises(HelperError) as err:
        await run_helper("ecrlike", "reg.example", site="us-east")
    assert str(err.value) == (
        "us-east: docker-credential-ecrlike: exited 3: no AWS credentials in the environment"
    )
    with pytest.raises(HelperError) as err:
        await run_helper("ecr-login", "reg.example", site="us-east")
    assert str(err.value).startswith("us-east: docker-credential-ecr-login: not found on PATH")
    assert not err.value.retryable


async def test_concurrent_first_uses_share_one_helper_run(tmp_path, monkeypatch):
    helper = CredentialHelper(tmp_path / "bin", name="once").serve("reg.example", "AWS")
    monkeypatch.setenv("PATH", helper.path_env())
    cfg = _config(tmp_path, {"credsStore": "once"})
    provider = CredentialProvider(
        "us-east", "reg.example", files=CredentialFiles(docker_config=Path(cfg))
    )
    got = await asyncio.gather(*(provider.get(f"team/app{i}") for i in range(8)))
    assert helper.runs == 1
    assert {c.password for c in got if c} == {helper.issued[0]}
    assert provider.describe() == " as user 'AWS' (from docker-credential-once)"
    assert provider.refresh("team/app0") is True  # a helper answer can be renewed
    await provider.get("team/app0")
    assert helper.runs == 2


async def test_slow_helper_times_out_without_blocking_the_loop(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    slow = bin_dir / "docker-credential-slow"
    slow.write_text("#!/bin/sh\nexec sleep 30\n")
    slow.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.02)

    task = asyncio.create_task(ticker())
    started = time.monotonic()
    with pytest.raises(HelperError) as err:
        await run_helper("slow", "reg.example", site="us-east", timeout=0.5)
    task.cancel()
    assert time.monotonic() - started < 5
    assert "docker-credential-slow: gave no answer for reg.example within 0.5s" in str(err.value)
    assert err.value.retryable
    assert ticks >= 10  # the event loop kept running while the helper hung


# ----------------------------------------------------------------------------- real registries
@pytest.fixture
def helper(tmp_path, monkeypatch) -> CredentialHelper:
    h = CredentialHelper(tmp_path / "bin", name="regtest", ttl=3600)
    monkeypatch.setenv("PATH", h.path_env())
    return h


@pytest.fixture
def token_registry(tmp_path, registry_factory, helper):
    ts = TokenServer(
        tmp_path / "token",
        users={"alice": ALICE_PW, "reader": READER_PW},
        permissions={"reader": {"team/*": {"pull"}}},
        secret_key=helper.key,
        expires_in=60,
    ).start()
    try:
        yield ts, registry_factory("tok", token=ts.token_auth())
    finally:
        ts.stop()


def _config(tmp_path: Path, doc: dict, name: str = "config.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return str(path)


def _client(url: str, **kw) -> RegistryClient:
    site = SiteEndpoint(name="us-east", url=url, insecure=True, **kw)
    return RegistryClient(site, retries=2, backoff_base=0.01)


async def _keep_working(c: RegistryClient, repo: str, digest: str, seconds: float) -> int:
    """Read a blob over and over for `seconds`; every read must succeed."""
    reads = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert await c.head_blob(repo, digest) is not None
        reads += 1
        await asyncio.sleep(0.1)
    return reads


async def _seed(c: RegistryClient, repo: str) -> str:
    data = layer_bytes(repo, 300)
    await c.upload_blob(repo, digest_of(data), len(data), pieces(data))
    return digest_of(data)


async def test_cred_helper_with_expiring_tokens_keeps_a_client_working(
    tmp_path, token_registry, helper, caplog
):
    """credHelpers names the helper; its JWT says it lives 2 s, so the answer is renewed
    before the token server would refuse it, without a single refused request."""
    caplog.set_level(logging.DEBUG)
    ts, reg = token_registry
    helper.ttl = 2
    helper.serve(reg.host, "alice").save()
    ts.expires_in = 1  # access tokens last 1 s too, so token requests keep coming
    ts.secret_leeway = 1.0  # clock-skew allowance, so a loaded machine is not "late"
    cfg = _config(tmp_path, {"credsStore": "elsewhere", "credHelpers": {reg.host: "regtest"}})
    async with _client(reg.url, docker_config=cfg) as c:
        digest = await _seed(c, "team/app")
        reads = await _keep_working(c, "team/app", digest, 4.5)
        first_expiry = jwt_expiry(helper.issued[0])
        assert first_expiry is not None and first_expiry < time.time()  # worked past it
    assert reads >= 5
    assert helper.runs >= 2  # renewed while the client ran
    assert all(r.user == "alice" for r in ts.requests)  # the token server never refused
    everything = caplog.text
    for secret in [*helper.issued, *ts.issued]:
        assert secret not in everything
    assert "docker-credential-regtest get" in everything  # the logs do say what ran


async def test_opaque_helper_token_is_renewed_on_refusal(tmp_path, token_registry, helper):
    """An ECR-style secret does not say when it expires: it is kept for helper_max_age,
    and when the token server refuses it the helper runs again, once, and the request
    succeeds."""
    ts, reg = token_registry
    helper.ttl, helper.opaque = 2, True
    helper.serve(reg.host, "alice").save()
    ts.expires_in = 1
    cfg = _config(tmp_path, {"credsStore": "regtest"})
    async with _client(reg.url, docker_config=cfg, helper_max_age=3600) as c:
        digest = await _seed(c, "team/app")
        assert helper.runs == 1
        await _keep_working(c, "team/app", digest, 4.5)
    refused = [r for r in ts.requests if r.user is None]
    assert refused, "the token server should have refused an expired helper secret"
    assert helper.runs == 1 + len(refused)  # one helper run per refusal, no more


async def test_acr_identity_token_from_helper_is_exchanged_and_renewed(
    tmp_path, token_registry, helper
):
    """ACR's helper answers Username <token>: the Secret is a refresh token, exchanged at
    the token endpoint with grant_type=refresh_token; it expires and is renewed."""
    ts, reg = token_registry
    helper.ttl = 2
    helper.serve(reg.host, "alice", identity_token=True).save()
    ts.expires_in = 1
    ts.secret_leeway = 1.0
    cfg = _config(tmp_path, {"credHelpers": {reg.host: "regtest"}})
    async with _client(reg.url, docker_config=cfg) as c:
        digest = await _seed(c, "team/app")
        await _keep_working(c, "team/app", digest, 3)
    assert {r.method for r in ts.requests} == {"POST"}
    assert all(r.user == "alice" for r in ts.requests)
    assert helper.runs >= 2


async def test_ecr_like_basic_auth_renews_the_helper_password(tmp_path, registry, helper):
    """ECR's scheme: Basic auth as AWS with the helper's 12 h token (here 3 s, opaque).
    When the registry answers 401 to the cached password, the helper runs again."""
    helper.ttl, helper.opaque = 3, True
    with EcrLikeFront(registry.port, helper.key) as front:
        helper.serve(front.host, "AWS").save()
        cfg = _config(tmp_path, {"credHelpers": {front.host: "regtest"}})
        async with _client(front.url, docker_config=cfg) as c:
            digest = await _seed(c, "team/app")
            await _keep_working(c, "team/app", digest, 4.5)
        refused_with_auth = [
            s for s in front.requests() if s.status == 401 and "authorization" in s.headers
        ]
    assert refused_with_auth  # the expired password was refused...
    assert helper.runs == 1 + len(refused_with_auth)  # ...and renewed once each time


async def test_refused_file_credentials_are_read_again(tmp_path, token_registry, helper):
    """An identity token in config.json expires; whoever renews it (`docker login`, a
    sidecar) rewrites the file. The refusal makes the client read the file again."""
    ts, reg = token_registry
    ts.expires_in = 1
    path = tmp_path / "config.json"

    def write_token(ttl: float) -> str:
        token = mint_secret(helper.key, "alice", ttl)
        path.write_text(json.dumps({"auths": {reg.host: {"identitytoken": token}}}))
        return token

    first = write_token(ttl=2)
    async with _client(reg.url, docker_config=str(path)) as c:
        digest = await _seed(c, "team/app")
        write_token(ttl=3600)  # renewed on disk; the client still holds the first

        async def first_expired() -> bool:
            return verify_secret(first, helper.key) is None

        await async_wait_until(first_expired, timeout=10, what="the first token's expiry")
        ts.clear()
        assert await c.head_blob("team/app", digest) is not None
    assert [r.user for r in ts.requests] == [None, "alice"]  # refused, then the new one


async def test_missing_helper_is_named_in_the_error(tmp_path, token_registry):
    _ts, reg = token_registry
    cfg = _config(tmp_path, {"credHelpers": {reg.host: "ecr-login"}})
    async with _client(reg.url, docker_config=cfg) as c:
        with pytest.raises(Unauthorized) as err:
            await c.list_tags("team/app")
    assert "docker-credential-ecr-login: not found on PATH" in str(err.value)
    assert "no credentials configured" not in str(err.value)


async def test_helper_without_credentials_for_the_host_says_so(tmp_path, token_registry, helper):
    _ts, reg = token_registry
    cfg = _config(tmp_path, {"credsStore": "regtest"})
    async with _client(reg.url, docker_config=cfg) as c:
        with pytest.raises(Unauthorized) as err:
            await c.start_upload("team/app")  # anonymous access is refused
    assert "docker-credential-regtest exited 1: credentials not found" in str(err.value)


async def test_auth_json_namespace_scoped_entries(tmp_path, token_registry, monkeypatch):
    """containers auth.json: `host/team` holds a pull-only robot, `host` an admin; each
    repository gets the most specific entry (found through REGISTRY_AUTH_FILE)."""
    ts, reg = token_registry
    path = _config(
        tmp_path,
        {
            "auths": {
                reg.host: {"auth": _b64(f"alice:{ALICE_PW}")},
                f"{reg.host}/team": {"auth": _b64(f"reader:{READER_PW}")},
            }
        },
        name="auth.json",
    )
    monkeypatch.setenv("REGISTRY_AUTH_FILE", path)
    from replicator.registry.credfiles import default_auth_file

    async with _client(reg.url, auth_file=str(default_auth_file())) as c:
        await _seed(c, "other/app")  # alice may push
        with pytest.raises(Unauthorized) as err:
            await c.start_upload("team/app")  # the reader robot may not
        assert await c.list_tags("team/app") == []  # but may pull
    assert "as user 'reader' (from auth file" in str(err.value)
    users = {(r.user, tuple(r.scopes)) for r in ts.requests if r.scopes}
    assert ("alice", ("repository:other/app:pull,push",)) in users
    assert ("reader", ("repository:team/app:pull,push",)) in users


def test_missing_credential_file_is_a_config_error(tmp_path):
    site = SiteEndpoint(
        name="us-east", url="http://127.0.0.1:1", insecure=True, auth_file=str(tmp_path / "no")
    )
    with pytest.raises(ConfigError, match=r"site 'us-east': auth file .*/no does not exist"):
        site.resolve_credentials()


def test_copy_command_uses_helpers_and_the_containers_auth_file(tmp_path, registry_factory):
    """`copy` finds credentials where docker and skopeo would: the docker config.json's
    helper for one registry, the containers auth.json (REGISTRY_AUTH_FILE) for the other."""
    import os
    import subprocess
    import sys

    from tests.harness.images import Pusher, assert_image_complete
    from tests.harness.registry import write_htpasswd

    helper = CredentialHelper(tmp_path / "bin", name="copytest")
    src = registry_factory("src")
    dst = registry_factory("dst", htpasswd=write_htpasswd(tmp_path / "htpasswd", {"ci": "pw-1"}))
    with Pusher(src.url) as p:
        img = p.push_image("team/app", "v1", [layer_bytes("copy-cli", 500)])
    with EcrLikeFront(src.port, helper.key) as front:
        helper.serve(front.host, "AWS")
        (tmp_path / "docker").mkdir()
        (tmp_path / "docker/config.json").write_text(
            json.dumps({"credHelpers": {front.host: "copytest"}})
        )
        auth_file = _config(
            tmp_path, {"auths": {dst.host: {"auth": _b64("ci:pw-1")}}}, name="auth.json"
        )
        env = {
            **os.environ,
            "PATH": helper.path_env(),
            "DOCKER_CONFIG": str(tmp_path / "docker"),
            "REGISTRY_AUTH_FILE": auth_file,
        }
        refs = [f"{front.host}/team/app:v1", f"{dst.host}/mirror/app"]
        out = subprocess.run(
            [sys.executable, "-m", "replicator", "copy", "--insecure", "--json", *refs],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["copied"] == 1
    assert helper.runs == 1
    assert assert_image_complete(dst.url, "mirror/app", "v1", auth=("ci", "pw-1")) == img.digest
    for secret in helper.issued:
        assert secret not in out.stdout + out.stderr
