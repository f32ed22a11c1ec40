"""Manifest verbs: HEAD (not a pull), GET (digest-verified), PUT, DELETE."""

from __future__ import annotations

from replicator.manifest import (
    ACCEPT_MANIFESTS,
    Descriptor,
    Manifest,
    ManifestError,
    digest_of,
    is_digest,
    parse_manifest,
)
from replicator.registry.bounds import ReadBounds
from replicator.registry.errors import DigestMismatch, InvalidManifest, ResponseTooLarge
from replicator.registry.transport import Request, Transport, media_type

_ACCEPT = {"Accept": ACCEPT_MANIFESTS}


class Manifests:
    """The manifest verbs of one registry."""

    def __init__(self, transport: Transport, bounds: ReadBounds) -> None:
        self._t = transport
        self._bounds = bounds

    def url(self, repo: str, ref: str) -> str:
        return self._t.url(f"/v2/{repo}/manifests/{ref}")

    async def head(self, repo: str, ref: str) -> Descriptor | None:
        resp = await self._t.send(
            Request("HEAD", self.url(repo, ref), repo, ref, headers=_ACCEPT, ok=(200, 404))
        )
        if resp.status_code == 404:
            return None
        digest = resp.headers.get("docker-content-digest")
        mtype = media_type(resp.headers.get("content-type"))
        size = resp.headers.get("content-length")
        if not digest or not mtype or size is None or not size.isdigit():
            return (await self.get(repo, ref)).descriptor()
        if is_digest(ref) and digest != ref:
            raise DigestMismatch(
                f"registry announces digest {digest}",
                site=self._t.site.name,
                repository=repo,
                reference=ref,
            )
        return Descriptor(mtype, digest, int(size))

    async def get(self, repo: str, ref: str) -> Manifest:
        request = Request(
            "GET",
            self.url(repo, ref),
            repo,
            ref,
            headers=_ACCEPT,
            max_body=self._bounds.manifest_bytes,
            what="manifest",
        )
        try:
            resp, raw = await self._t.fetch(request)
        except ResponseTooLarge as exc:  # a manifest we cannot use: not worth retrying
            raise InvalidManifest(
                exc.detail, site=self._t.site.name, repository=repo, reference=ref
            ) from exc
        announced = resp.headers.get("docker-content-digest")
        expected = (
            ref if is_digest(ref) else (announced if announced and is_digest(announced) else None)
        )
        if expected:
            actual = digest_of(raw, expected.split(":", 1)[0])
            if actual != expected:
                raise DigestMismatch(
                    f"manifest content hashes to {actual}, expected {expected}",
                    site=self._t.site.name,
                    repository=repo,
                    reference=ref,
                )
        try:
            manifest = parse_manifest(raw, resp.headers.get("content-type"), expected)
            listed = count_children(manifest)
        except ManifestError as exc:
            raise InvalidManifest(
                str(exc), site=self._t.site.name, repository=repo, reference=ref
            ) from exc
        if listed > self._bounds.index_children:
            raise InvalidManifest(
                f"index lists {listed} manifests; the limit is {self._bounds.index_children}",
                site=self._t.site.name,
                repository=repo,
                reference=ref,
            )
        return manifest

    async def put(self, repo: str, ref: str, raw: bytes, mtype: str) -> str:
        digest = digest_of(raw)
        if is_digest(ref) and digest_of(raw, ref.split(":", 1)[0]) != ref:
            raise DigestMismatch(
                f"manifest content hashes to {digest}",
                site=self._t.site.name,
                repository=repo,
                reference=ref,
            )
        resp = await self._t.send(
            Request(
                "PUT",
                self.url(repo, ref),
                repo,
                ref,
                content=raw,
                headers={"Content-Type": mtype},
                ok=(200, 201, 202, 204),
            )
        )
        announced = resp.headers.get("docker-content-digest")
        if announced and announced.startswith("sha256:") and announced != digest:
            raise DigestMismatch(
                f"registry stored digest {announced}, we sent {digest}",
                site=self._t.site.name,
                repository=repo,
                reference=ref,
            )
        return digest

    async def delete(self, repo: str, digest: str) -> bool:
        resp = await self._t.send(
            Request("DELETE", self.url(repo, digest), repo, digest, ok=(200, 202, 204, 404))
        )
        return resp.status_code != 404


def count_children(manifest: Manifest) -> int:
    """How many manifests an index lists (0 for an image), without parsing them."""
    if not manifest.is_index:
        return 0
    listed = manifest.doc.get("manifests")
    return len(listed) if isinstance(listed, list) else 0
