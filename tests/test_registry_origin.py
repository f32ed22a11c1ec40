"""Credentials go only to the origin they were configured for.

A registry (here a hostile front before a real one) may send an upload, a
listing page or a blob GET to another host, or name a token realm anywhere.
Those URLs are followed without our Authorization; a challenge from another
host is never answered with our credentials; an http:// token realm of an
https registry is refused; and the debug log names the host of every request.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterator

import pytest

from replicator.manifest import digest_of
from replicator.registry.client import RegistryClient
from replicator.registry.errors import Unauthorized
from replicator.registry.origin import host_of, origin_of, where
from replicator.registry.site import Credentials, SiteEndpoint
from tests.harness.hostile_front import HostileFront, Reply, moved_to
from tests.harness.images import Pusher, layer_bytes
from tests.harness.registry import Registry, write_htpasswd
from tests.test_registry_client import pieces, source_of

PASSWORD = "s3cret-Origin-pw"
BOB = Credentials("bob", PASSWORD)
BASIC = "Basic " + base64.b64encode(f"bob:{PASSWORD}".encode()).decode()


@pytest.fixture
def basic_registry(tmp_path, registry_factory) -> Registry:
    return registry_factory(
        "basic", htpasswd=write_htpasswd(tmp_path / "htpasswd", {"bob": PASSWORD})
    )


@pytest.fixture
def fronts() -> Iterator[list[HostileFront]]:
    started: list[HostileFront] = []
    yield started
    for front in started:
        front.stop()


def front(fronts: list[HostileFront], upstream: Registry | None = None, **kw) -> HostileFront:
    f = HostileFront(upstream.port if upstream else None, **kw).start()
    fronts.append(f)
    return f


def client(url: str, **kw) -> RegistryClient:
    site = SiteEndpoint(name="us-east", url=url, insecure=True, credentials=BOB)
    return RegistryClient(site, retries=2, backoff_base=0.01, **kw)


def test_origins_compare_scheme_host_and_port():
    assert origin_of("https://Reg.Example/v2/") == origin_of("https://reg.example:443/x")
    assert origin_of("http://reg.example/") == ("http", "reg.example", 80)
    assert origin_of("http://reg.example/") != origin_of("https://reg.example/")
    assert origin_of("https://reg.example:5000/") != origin_of("https://reg.example/")
    assert origin_of("https://reg.example.evil.test/") != origin_of("https://reg.example/")
    assert origin_of("http://h:99999999/") is None  # a malformed port matches nothing


def test_where_drops_user_info_and_query():
    url = "https://user:pw@Store.Example:8443/v2/a/blobs/uploads/u?_state=secret&digest=x"
    assert where(url) == "https://store.example:8443/v2/a/blobs/uploads/u"
    assert host_of(url) == "https://store.example:8443"
    assert where("http://[::1]:5000/v2/") == "http://[::1]:5000/v2/"


async def test_upload_location_on_another_host_gets_no_credentials(basic_registry, fronts, caplog):
    """The registry hands out upload sessions on a storage host that needs nothing from us
    (it authenticates to the registry itself): the upload succeeds, the storage host never
    sees our credentials, and the debug log names the host each request went to."""
    caplog.set_level(logging.DEBUG, logger="replicator.registry")
    storage = front(fronts, basic_registry, inject_authorization=BASIC)
    registry = front(fronts, basic_registry)
    registry.rewrite("POST", r"/blobs/uploads/$", moved_to(storage))
    data = layer_bytes("cross-origin", 300_000)
    digest = digest_of(data)
    async with client(registry.url) as c:
        await c.upload_blob("team/app", digest, len(data), pieces(data))
        assert await c.head_blob("team/app", digest) == len(data)
    assert storage.requests("PUT", r"/blobs/uploads/") and not storage.with_authorization()
    assert registry.requests("POST") and all(
        s.headers.get("authorization") == BASIC for s in registry.requests("POST")
    )
    puts = [r.getMessage() for r in caplog.records if " PUT " in r.getMessage()]
    assert puts and all(storage.host in line for line in puts), puts


async def test_chunked_upload_on_another_host_gets_no_credentials(basic_registry, fronts):
    storage = front(fronts, basic_registry, inject_authorization=BASIC)
    registry = front(fronts, basic_registry)
    registry.rewrite("POST", r"/blobs/uploads/$", moved_to(storage))
    data = layer_bytes("cross-origin-chunks", 2 * 1024 * 1024 + 5)
    digest = digest_of(data)
    async with client(registry.url) as c:
        await c.upload_blob_chunked(
            "team/app", digest, len(data), source_of(data), chunk_size=1024 * 1024
        )
        assert await c.head_blob("team/app", digest) == len(data)
    assert len(storage.requests("PATCH")) == 3 and len(storage.requests("PUT")) == 1
    assert not storage.with_authorization()


async def test_another_hosts_challenge_is_not_answered(basic_registry, fronts):
    """A foreign upload host that asks for credentials does not get them: the upload fails
    at once with an error naming that host, and the client still works for the registry."""
    storage = front(fronts, basic_registry)  # forwards without credentials: the registry says 401
    registry = front(fronts, basic_registry)
    registry.rewrite("POST", r"/blobs/uploads/$", moved_to(storage), count=1)
    data = b"not for strangers" * 100
    digest = digest_of(data)
    async with client(registry.url) as c:
        with pytest.raises(Unauthorized) as err:
            await c.upload_blob("team/app", digest, len(data), pieces(data))
        assert storage.host in str(err.value) and "us-east: team/app@" in str(err.value)
        await c.upload_blob("team/app", digest, len(data), pieces(data))  # the registry itself
        assert await c.head_blob("team/app", digest) == len(data)
    assert storage.requests() and not storage.with_authorization()


async def test_page_link_to_another_host_gets_no_credentials(basic_registry, fronts):
    names = [f"proj/r{i}" for i in range(6)]
    with Pusher(basic_registry.url, auth=("bob", PASSWORD)) as p:
        for name in names:
            p.push_image(name, "v1", [layer_bytes("c", 64)])
    other = front(fronts, basic_registry, inject_authorization=BASIC)
    registry = front(fronts, basic_registry)
    registry.rewrite("GET", r"/_catalog", moved_to(other))
    async with client(registry.url) as c:
        await c.ping()  # learns Basic: every request to the registry carries it from now on
        assert await c.catalog(page_size=2) == names
    assert len(other.requests("GET", r"/_catalog")) == 2 and not other.with_authorization()
    assert [s.headers.get("authorization") for s in registry.requests("GET", "/_catalog")] == [
        BASIC
    ]


async def test_blob_redirect_to_a_cdn_gets_no_credentials(basic_registry, fronts):
    data = layer_bytes("cdn", 200_000)
    digest = digest_of(data)
    with Pusher(basic_registry.url, auth=("bob", PASSWORD)) as p:
        p.push_blob("team/app", data)
    cdn = front(fronts, basic_registry, inject_authorization=BASIC)
    registry = front(fronts, basic_registry)
    registry.answer(
        "GET",
        r"/blobs/sha256:",
        lambda seen: Reply(307, {"Location": cdn.url + seen.target}),
    )
    async with client(registry.url) as c:
        await c.ping()
        assert await c.get_blob("team/app", digest) == data
    assert cdn.requests("GET", r"/blobs/sha256:") and not cdn.with_authorization()
    assert registry.requests("GET", "/blobs/")[0].headers.get("authorization") == BASIC


async def test_a_cdns_token_challenge_is_not_learnt(basic_registry, fronts):
    """A redirect target answering 401 with its own Bearer realm must not make us send our
    credentials to that realm (nor change how we authenticate to the registry)."""
    data = layer_bytes("cdn-401", 1000)
    digest = digest_of(data)
    with Pusher(basic_registry.url, auth=("bob", PASSWORD)) as p:
        p.push_blob("team/app", data)
    realm = front(fronts)
    realm.answer(None, r".", Reply(200, {"Content-Type": "application/json"}, b'{"token":"x"}'))
    cdn = front(fronts)
    cdn.answer(
        None,
        r".",
        Reply(401, {"WWW-Authenticate": f'Bearer realm="{realm.url}/token",service="cdn"'}),
    )
    registry = front(fronts, basic_registry)
    registry.answer(
        "GET", r"/blobs/sha256:", lambda seen: Reply(307, {"Location": cdn.url + seen.target}), 1
    )
    async with client(registry.url) as c:
        with pytest.raises(Unauthorized) as err:
            await c.get_blob("team/app", digest)
        assert cdn.host in str(err.value)
        assert await c.get_blob("team/app", digest) == data  # still Basic to the registry
    assert not realm.requests() and not cdn.with_authorization()


async def test_http_token_realm_of_an_https_registry_is_refused(fronts):
    token = front(fronts)
    token.answer(None, r".", Reply(200, {"Content-Type": "application/json"}, b'{"token":"t"}'))
    registry = front(fronts, tls=True)
    registry.answer(
        None,
        r"^/v2/",
        Reply(401, {"WWW-Authenticate": f'Bearer realm="{token.url}/token",service="reg"'}),
    )
    async with client(registry.url) as c:
        with pytest.raises(Unauthorized) as err:
            await c.ping()
    assert f"token realm {token.url}/token" in str(err.value) and "https" in str(err.value)
    assert not token.requests()
    assert PASSWORD not in str(err.value)
