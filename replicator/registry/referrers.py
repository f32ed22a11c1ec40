"""Referrers of a manifest: the OCI referrers API where the registry has it, else the
`sha256-<hex>` fallback tag's index (distribution 2.8 has no referrers API)."""

from __future__ import annotations

import asyncio

from replicator.manifest import OCI_INDEX, Descriptor, Manifest, ManifestError, parse_manifest
from replicator.registry.bounds import ReadBounds
from replicator.registry.errors import InvalidManifest, NotFound, ResponseTooLarge
from replicator.registry.manifests import Manifests, count_children
from replicator.registry.transport import Request, Transport, media_type

_ACCEPT_INDEX = {"Accept": OCI_INDEX}

# referrers found, and the fallback tag's index when that is where they came from
Found = tuple[list[Descriptor], Manifest | None]


def fallback_tag(digest: str) -> str:
    """The tag under which registries without a referrers API keep `digest`'s referrers."""
    return digest.replace(":", "-", 1)


class Referrers:
    """Referrer lookups on one registry; remembers whether it has the referrers API."""

    def __init__(self, transport: Transport, manifests: Manifests, bounds: ReadBounds) -> None:
        self._t = transport
        self._manifests = manifests
        self._bounds = bounds
        self._api: bool | None = None  # None: not known yet
        # the first lookup asks alone: copies starting together would each probe a
        # registry that has no referrers API (distribution 2.8), one request per image
        self._probing = asyncio.Lock()
        self._probed = False

    async def list(
        self, repo: str, digest: str, artifact_type: str | None, *, fallback_tagged: bool = True
    ) -> tuple[list[Descriptor], Manifest | None]:
        """The referrers of `digest`, plus the fallback tag's index when that is where
        they came from (a copier needs the index itself).

        `fallback_tagged=False`: the caller has just listed the repository's tags and
        the fallback tag is not among them, so it is not fetched (a round trip per
        image across a WAN)."""
        if self._api is None and not self._probed:
            async with self._probing:
                if not self._probed:
                    try:
                        return await self._list(repo, digest, artifact_type, fallback_tagged)
                    finally:
                        self._probed = True
        return await self._list(repo, digest, artifact_type, fallback_tagged)

    async def _list(
        self, repo: str, digest: str, artifact_type: str | None, fallback_tagged: bool
    ) -> Found:
        fallback: Manifest | None = None
        index: Manifest | None = None
        resp, body = None, b""
        if self._api is not False:
            request = Request(
                "GET",
                self._t.url(f"/v2/{repo}/referrers/{digest}"),
                repo,
                digest,
                headers=_ACCEPT_INDEX,
                ok=(200, 404),
                pass_client_errors=True,
                max_body=self._bounds.manifest_bytes,
                what="referrers answer",
            )
            try:
                resp, body = await self._t.fetch(request)
            except ResponseTooLarge as exc:
                raise InvalidManifest(
                    exc.detail, site=self._t.site.name, repository=repo, reference=digest
                ) from exc
            if resp.status_code == 200:
                self._api = True
            elif resp.status_code in (404, 405) and "json" not in resp.headers.get(
                "content-type", ""
            ):
                # no such route (distribution 2.8 answers a plain-text 404): do not ask again
                self._api = False
        if (
            resp is not None
            and resp.status_code == 200
            and media_type(resp.headers.get("content-type")) in (OCI_INDEX, "application/json")
        ):
            try:
                index = parse_manifest(body, OCI_INDEX)
            except ManifestError as exc:
                raise InvalidManifest(
                    f"referrers answer: {exc}",
                    site=self._t.site.name,
                    repository=repo,
                    reference=digest,
                ) from exc
        elif fallback_tagged:
            index = fallback = await self.fallback_index(repo, digest)
        if index is None or not index.is_index:
            return [], None
        listed = count_children(index)
        if listed > self._bounds.referrers:
            raise InvalidManifest(
                f"{listed} referrers listed; the limit is {self._bounds.referrers}",
                site=self._t.site.name,
                repository=repo,
                reference=digest,
            )
        found = index.children
        if artifact_type:
            found = [d for d in found if d.artifact_type == artifact_type]
        return found, fallback

    async def fallback_index(self, repo: str, digest: str) -> Manifest | None:
        """One GET: a 404 costs what a HEAD would, and a hit needs the body anyway."""
        try:
            return await self._manifests.get(repo, fallback_tag(digest))
        except NotFound:
            return None
