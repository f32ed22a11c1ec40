"""Listings: a repository's tags and the registry's catalog, following Link pagination.

A listing ends when a page names no next page. One that does not advance (a
link back to a page already read, or a page with no names not seen before
that still links on) stops with an error rather than looping: a Link to the
same page once made `sync` send 16,897 requests in 20 s. The page count is
bounded too (bounds.py), against links that advance forever.

Public registries do not serve `_catalog` to their users (Docker Hub answers
401, GHCR and Quay 404 or an empty list with an error): `catalog` raises
`CatalogUnavailable` for those answers, so a caller can tell "this registry has
no catalog" from "the registry is down" and say that literal repository names
(listed by their tags alone) work where globs cannot.
"""

from __future__ import annotations

import json
import re

import httpx

from replicator.registry.auth import scopes_for
from replicator.registry.bounds import ReadBounds
from replicator.registry.errors import RegistryError, ResponseTooLarge
from replicator.registry.origin import where
from replicator.registry.transport import Request, Transport

# Answers to GET /v2/_catalog that mean "no catalog here", not "try again".
_NO_CATALOG_STATUS = (401, 403, 404)

_LINK_NEXT = re.compile(r'<([^>]+)>\s*;\s*(?:[^,]*;\s*)?rel="?next"?', re.I)
_CATALOG_SCOPES = scopes_for("GET", None, catalog=True)


class CatalogUnavailable(RegistryError):
    """The registry does not list its repositories (to us): 401/403/404 on `_catalog`,
    or a page with an `errors` member and no repositories."""


class Listing:
    """The tags/list and _catalog verbs of one registry."""

    def __init__(self, transport: Transport, bounds: ReadBounds) -> None:
        self._t = transport
        self._bounds = bounds

    async def tags(self, repo: str, page_size: int) -> list[str]:
        return await self.tags_if_exists(repo, page_size) or []

    async def tags_if_exists(self, repo: str, page_size: int) -> list[str] | None:
        """Every tag of `repo`, or None when the registry does not know the repository."""
        first = self._t.url(f"/v2/{repo}/tags/list?n={page_size}")
        return await self._list(first, "tags", repo)

    async def catalog(self, page_size: int) -> list[str]:
        url = self._t.url(f"/v2/_catalog?n={page_size}")
        try:
            return await self._list(url, "repositories", None) or []
        except CatalogUnavailable:
            raise
        except RegistryError as exc:
            if exc.status not in _NO_CATALOG_STATUS:
                raise
            raise CatalogUnavailable(
                f"serves no catalog: {exc.detail}", site=self._t.site.name, status=exc.status
            ) from exc

    async def _list(self, url: str | None, key: str, repo: str | None) -> list[str] | None:
        """Every name under `key` of every page from `url` on; None when the repository
        (tags) does not exist."""
        what = "tags list" if repo else "catalog"
        names: list[str] = []
        seen_names: set[str] = set()
        read: set[str] = set()  # pages' URLs
        pages = 0
        while url:
            if url in read:
                raise self._stuck(
                    f"{what} pagination loops: the next-page link points back at a page "
                    f"already read ({where(url)})",
                    repo,
                )
            read.add(url)
            if pages == self._bounds.list_pages:
                raise ResponseTooLarge(
                    f"{what} goes on for more than {pages} pages; stopped there",
                    site=self._t.site.name,
                    repository=repo,
                )
            request = Request(
                "GET",
                url,
                repo,
                scopes=None if repo else _CATALOG_SCOPES,
                ok=(200, 404) if repo else (200,),
                max_body=self._bounds.list_page_bytes,
                what=f"{what} page",
            )
            resp, body = await self._t.fetch(request)
            pages += 1
            if resp.status_code == 404:
                return names if pages > 1 else None
            page = self._names(body, key, repo, resp.status_code)
            fresh = len(seen_names)
            seen_names.update(page)
            names += page
            url = next_link(resp)
            if url and len(seen_names) == fresh:
                raise self._stuck(
                    f"{what} pagination does not advance: page {pages} lists no new names "
                    "but links to another",
                    repo,
                )
        return names

    def _stuck(self, message: str, repo: str | None) -> RegistryError:
        return RegistryError(message, site=self._t.site.name, repository=repo)

    def _names(self, body: bytes, key: str, repo: str | None, status: int) -> list[str]:
        try:
            doc = json.loads(body)
            items = doc.get(key) or []
            if not isinstance(items, list):
                raise TypeError(key)
        except (ValueError, TypeError, AttributeError) as exc:
            raise RegistryError(
                f"unreadable {key} list",
                site=self._t.site.name,
                repository=repo,
                status=status,
            ) from exc
        if repo is None and not items and doc.get("errors"):
            raise CatalogUnavailable(
                f"serves no catalog: an empty list with errors ({_error_codes(doc)})",
                site=self._t.site.name,
                status=status,
            )
        return [str(x) for x in items]


def _error_codes(doc: dict) -> str:
    errors = doc.get("errors")
    if not isinstance(errors, list):
        return "unreadable"
    codes = [str(e.get("code") or e.get("message")) for e in errors if isinstance(e, dict)]
    return ", ".join(codes) or "unreadable"


def next_link(resp: httpx.Response) -> str | None:
    """The absolute URL of the `rel="next"` page, if the answer names one."""
    for value in resp.headers.get_list("link"):
        m = _LINK_NEXT.search(value)
        if m:
            return str(resp.url.join(m.group(1)))
    return None
