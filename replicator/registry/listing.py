"""Listings: a repository's tags and the registry's catalog, following Link pagination."""

from __future__ import annotations

import re

import httpx

from replicator.registry.auth import scopes_for
from replicator.registry.errors import RegistryError
from replicator.registry.transport import Request, Transport

_LINK_NEXT = re.compile(r'<([^>]+)>\s*;\s*(?:[^,]*;\s*)?rel="?next"?', re.I)
_CATALOG_SCOPES = scopes_for("GET", None, catalog=True)


class Listing:
    """The tags/list and _catalog verbs of one registry."""

    def __init__(self, transport: Transport) -> None:
        self._t = transport

    async def tags(self, repo: str, page_size: int) -> list[str]:
        url: str | None = self._t.url(f"/v2/{repo}/tags/list?n={page_size}")
        tags: list[str] = []
        while url:
            resp = await self._t.send(Request("GET", url, repo, ok=(200, 404)))
            if resp.status_code == 404:
                return tags
            tags += self._names(resp, "tags", repo)
            url = next_link(resp)
        return tags

    async def catalog(self, page_size: int) -> list[str]:
        url: str | None = self._t.url(f"/v2/_catalog?n={page_size}")
        repos: list[str] = []
        while url:
            resp = await self._t.send(Request("GET", url, scopes=_CATALOG_SCOPES))
            repos += self._names(resp, "repositories", None)
            url = next_link(resp)
        return repos

    def _names(self, resp: httpx.Response, key: str, repo: str | None) -> list[str]:
        try:
            body = resp.json()
            items = body.get(key) or []
            if not isinstance(items, list):
                raise TypeError(key)
            return [str(x) for x in items]
        except (ValueError, TypeError, AttributeError) as exc:
            raise RegistryError(
                f"unreadable {key} list",
                site=self._t.site.name,
                repository=repo,
                status=resp.status_code,
            ) from exc


def next_link(resp: httpx.Response) -> str | None:
    """The absolute URL of the `rel="next"` page, if the answer names one."""
    for value in resp.headers.get_list("link"):
        m = _LINK_NEXT.search(value)
        if m:
            return str(resp.url.join(m.group(1)))
    return None
