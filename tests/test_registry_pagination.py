"""Pagination that does not advance stops with an error instead of looping: a `Link`
pointing at the same page once made `sync` send 16,897 requests in 20 s."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator

import pytest

from replicator.registry.client import RegistryClient
from replicator.registry.errors import RegistryError
from replicator.registry.site import SiteEndpoint
from tests.harness.hostile_front import HostileFront, Reply, Seen
from tests.harness.images import Pusher, layer_bytes


@pytest.fixture
def front(registry) -> Iterator[HostileFront]:
    with Pusher(registry.url) as p:
        img = p.push_image("team/app", "a", [layer_bytes("p", 100)])
        p.push_manifest("team/app", "b", img.raw, img.media_type)
        p.push_image("team/other", "v1", [layer_bytes("q", 100)])
    with HostileFront(registry.port) as f:
        yield f


def client(url: str) -> RegistryClient:
    return RegistryClient(SiteEndpoint(name="us-east", url=url, insecure=True), retries=1)


def link_to(target: str):
    def edit(_seen: Seen, reply: Reply) -> Reply:
        return Reply(reply.status, {**reply.headers, "Link": f'<{target}>; rel="next"'}, reply.body)

    return edit


async def test_link_to_the_same_page_stops(front):
    front.rewrite("GET", r"/tags/list", lambda seen, reply: link_to(seen.target)(seen, reply))
    async with client(front.url) as c:
        with pytest.raises(RegistryError) as err:
            await asyncio.wait_for(c.list_tags("team/app"), timeout=10)
    assert str(err.value).startswith(
        "us-east: team/app: tags list pagination loops: the next-page link points back at "
        f"a page already read ({front.url}/v2/team/app/tags/list)"
    )
    assert not err.value.retryable
    assert len(front.requests("GET", r"/tags/list")) == 1


async def test_catalog_link_that_does_not_move_on_stops(front):
    """distribution-style `last=` links that stop moving: the second page links to itself."""
    front.rewrite("GET", r"/_catalog", link_to("/v2/_catalog?last=team%2Fapp&n=1"))
    async with client(front.url) as c:
        with pytest.raises(RegistryError, match="catalog pagination loops"):
            await asyncio.wait_for(c.catalog(page_size=1), timeout=10)
    assert len(front.requests("GET", r"/_catalog")) == 2


async def test_new_links_to_the_same_names_stop(front):
    """Every link is new (a counter), but the pages list nothing new: not advancing."""

    def numbered(seen: Seen, reply: Reply) -> Reply:
        m = re.search(r"page=(\d+)", seen.target)
        page = int(m.group(1)) + 1 if m else 1
        return link_to(f"/v2/team/app/tags/list?n=10&page={page}")(seen, reply)

    front.rewrite("GET", r"/tags/list", numbered)
    async with client(front.url) as c:
        with pytest.raises(RegistryError) as err:
            await asyncio.wait_for(c.list_tags("team/app"), timeout=10)
    assert "tags list pagination does not advance: page 2 lists no new names" in str(err.value)
    assert len(front.requests("GET", r"/tags/list")) == 2


async def test_empty_last_page_without_link_is_fine(front):
    """A full page with a link, then an empty page without one (what distribution v3
    answers when the names fill the last page exactly): the listing simply ends."""
    json_type = {"Content-Type": "application/json"}
    front.answer(
        "GET",
        r"/_catalog\?n=1$",
        Reply(
            200,
            {**json_type, "Link": '</v2/_catalog?last=team%2Fapp&n=1>; rel="next"'},
            json.dumps({"repositories": ["team/app"]}).encode(),
        ),
    )
    front.answer("GET", r"/_catalog\?last=", Reply(200, json_type, b'{"repositories":[]}'))
    async with client(front.url) as c:
        assert await c.catalog(page_size=1) == ["team/app"]
    assert len(front.requests("GET", r"/_catalog")) == 2
