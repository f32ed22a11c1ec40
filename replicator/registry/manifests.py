"""Manifest verbs: HEAD (not a pull), GET (digest-verified), PUT, DELETE, and tag deletion.

Deleting a manifest by digest takes every tag pointing at it along. Removing one
tag only (`delete_tag`) is `DELETE /v2/<name>/manifests/<tag>` where the registry
supports it (OCI distribution-spec 1.1 allows it: distribution v3, zot, Harbor).
distribution 2.8 answers that with 400 DIGEST_INVALID (405 UNSUPPORTED when deletes
are disabled); there we do what regbot does: PUT a tiny placeholder manifest of our
own to the tag, then DELETE the placeholder by its digest, which removes that one
tag and nothing else. The placeholder is unique to each deletion (a random nonce in
its annotations), so its digest never names anything another tag points at.

Deletes in one repository are serialized (per client). distribution 2.8 removes a
manifest's revision first and then looks up the tags pointing at it; a tag another
delete removes during that lookup fails it with a 500 after the revision is gone,
and the tag is left dangling: listed by `tags/list`, 404 on HEAD, never removed
again. Seen when a sync deleted an image's three cosign tags at once. A placeholder
whose DELETE answers 404 on a retry (that first attempt's lookup may have failed)
is pushed and deleted once more while the tag is still unresolvable.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import httpx

from replicator.manifest import (
    ACCEPT_MANIFESTS,
    OCI_EMPTY,
    OCI_MANIFEST,
    Descriptor,
    Manifest,
    ManifestError,
    digest_of,
    is_digest,
    parse_manifest,
)
from replicator.registry.bounds import ReadBounds
from replicator.registry.errors import (
    DigestMismatch,
    InvalidManifest,
    RegistryError,
    ResponseTooLarge,
)
from replicator.registry.transport import Request, Transport, media_type, registry_message

_ACCEPT = {"Accept": ACCEPT_MANIFESTS}

EMPTY_BLOB = b"{}"  # the OCI empty descriptor's content
PLACEHOLDER_ARTIFACT_TYPE = "application/vnd.registry-replicator.tag-deletion.v1"
PLACEHOLDER_ANNOTATION = "io.github.registry-replicator.tag-deletion"

TagDeletionMethod = Literal["tag-delete", "placeholder"]
# a manifest DELETE: "maybe" is a 404 after a failed attempt, which may have deleted it
Removal = Literal["deleted", "absent", "maybe"]
# called with (repository, placeholder digest) right before the placeholder is PUT, so
# the daemon can record it as its own push before the registry's webhook about it
BeforePlaceholder = Callable[[str, str], Awaitable[None]]
# makes sure a small blob is in a repository: (repository, content)
EnsureBlob = Callable[[str, bytes], Awaitable[None]]


@dataclass(frozen=True)
class TagDeletion:
    """What `delete_tag` did to one tag."""

    site: str
    repository: str
    tag: str
    previous: str | None  # the digest the tag pointed at, when it was looked up
    method: TagDeletionMethod | None  # None: the tag was absent when we looked
    # absent, but only after an attempt that failed (5xx, timeout, cut): that attempt
    # may have deleted it, so "already absent" would be a guess
    after_failure: bool = False

    @property
    def deleted(self) -> bool:
        return self.method is not None

    @property
    def maybe_deleted(self) -> bool:
        """Deleted, or possibly by us: what a tombstone written before the delete needs
        to stay (only a definite "it was not there" withdraws it)."""
        return self.deleted or self.after_failure

    def __bool__(self) -> bool:
        """True when a tag was removed, False when it was already absent, so callers
        may write `if await client.delete_tag(repo, tag):`."""
        return self.deleted

    def describe(self) -> str:
        where = f"{self.site}: {self.repository}:{self.tag}"
        if self.method is None and self.after_failure:
            return (
                f"{where} is gone: the DELETE failed, and its retry found the tag absent "
                "(the failed attempt may have deleted it)"
            )
        if self.method is None:
            return f"{where} was already absent"
        kept = f"; manifest {self.previous} kept" if self.previous else ""
        if self.method == "tag-delete":
            return f"{where}: tag deleted (DELETE by tag){kept}"
        return (
            f"{where}: tag deleted (the registry cannot delete a tag by name: a placeholder "
            f"was pushed to the tag and deleted by digest){kept}"
        )


def placeholder_manifest(tag: str, nonce: str) -> bytes:
    """The manifest pushed over a tag to delete it on registries without tag DELETE:
    the OCI empty config, no content, and a nonce so its digest is unique."""
    empty = {"mediaType": OCI_EMPTY, "digest": digest_of(EMPTY_BLOB), "size": len(EMPTY_BLOB)}
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": PLACEHOLDER_ARTIFACT_TYPE,
        "config": empty,
        "layers": [empty],
        "annotations": {
            PLACEHOLDER_ANNOTATION: f"deleting tag {tag}",
            f"{PLACEHOLDER_ANNOTATION}.nonce": nonce,
        },
    }
    return json.dumps(doc, sort_keys=True).encode()


def _error_codes(resp: httpx.Response) -> set[str]:
    try:
        doc = json.loads(resp.content)
        return {str(e.get("code", "")) for e in doc.get("errors") or [] if isinstance(e, dict)}
    except (ValueError, AttributeError, TypeError, httpx.ResponseNotRead):
        return set()


def _tag_delete_unsupported(resp: httpx.Response) -> bool:
    """A registry without tag DELETE: distribution 2.8 answers 400 DIGEST_INVALID, others
    405 or UNSUPPORTED."""
    return resp.status_code in (400, 405) or "UNSUPPORTED" in _error_codes(resp)


class Manifests:
    """The manifest verbs of one registry."""

    def __init__(self, transport: Transport, bounds: ReadBounds) -> None:
        self._t = transport
        self._bounds = bounds
        self._delete_locks: dict[str, asyncio.Lock] = {}

    def _delete_lock(self, repo: str) -> asyncio.Lock:
        return self._delete_locks.setdefault(repo, asyncio.Lock())

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
        """False only when the manifest was certainly absent: a 404 after a failed
        attempt counts as deleted (that attempt may have done it)."""
        async with self._delete_lock(repo):
            return await self._delete(repo, digest) != "absent"

    async def _delete(self, repo: str, digest: str) -> Removal:
        resp, retried = await self._t.send_retried(
            Request("DELETE", self.url(repo, digest), repo, digest, ok=(200, 202, 204, 404))
        )
        if resp.status_code != 404:
            return "deleted"
        return "maybe" if retried else "absent"

    async def delete_tag(
        self,
        repo: str,
        tag: str,
        ensure_blob: EnsureBlob,
        before_placeholder: BeforePlaceholder | None = None,
    ) -> TagDeletion:
        """Remove `repo:tag` and nothing else: every other tag and the manifest stay.

        Tries the spec's DELETE by tag; on 400/405/UNSUPPORTED falls back to the
        placeholder. Before pushing anything it proves the registry deletes manifests
        at all (a DELETE of the not-yet-pushed placeholder's digest must answer 404,
        not 405): a placeholder left on the tag would replace the image with nothing.
        """
        site = self._t.site.name
        if is_digest(tag):
            raise ValueError(f"delete_tag takes a tag, not the digest {tag}")
        resp, retried = await self._t.send_retried(
            Request(
                "DELETE",
                self.url(repo, tag),
                repo,
                tag,
                ok=(200, 202, 204),
                pass_client_errors=True,
            )
        )
        if resp.status_code in (200, 202, 204):
            return TagDeletion(site, repo, tag, None, "tag-delete")
        if resp.status_code != 404 and not _tag_delete_unsupported(resp):
            raise RegistryError(
                f"deleting the tag failed: {registry_message(resp.content, resp.status_code)}",
                site=site,
                repository=repo,
                reference=tag,
                status=resp.status_code,
            )
        current = await self.head(repo, tag)
        if current is None:
            return TagDeletion(site, repo, tag, None, None, after_failure=retried)
        raw = placeholder_manifest(tag, secrets.token_hex(16))
        placeholder = digest_of(raw)
        probe = await self._t.send(
            Request(
                "DELETE",
                self.url(repo, placeholder),
                repo,
                tag,
                ok=(200, 202, 204, 404),
                pass_client_errors=True,
            )
        )
        if probe.status_code not in (200, 202, 204, 404):
            raise RegistryError(
                "the registry deletes neither tags nor manifests "
                f"({registry_message(probe.content, probe.status_code)}; on distribution set "
                "storage.delete.enabled: true); the tag was left in place",
                site=site,
                repository=repo,
                reference=tag,
                status=probe.status_code,
            )
        if before_placeholder is not None:
            await before_placeholder(repo, placeholder)
        async with self._delete_lock(repo):
            # under the lock too: concurrent uploads of one blob rewrite its link file,
            # and a placeholder PUT validating it meanwhile fails with "blob unknown"
            await ensure_blob(repo, EMPTY_BLOB)
            for _ in range(3):
                await self.put(repo, tag, raw, OCI_MANIFEST)
                if await self._delete(repo, placeholder) == "deleted":
                    break
                # gone already: a retry after a lost or failed first DELETE, whose tag
                # lookup may have failed and left the tag dangling; again, unless the
                # tag resolves (pushed meanwhile: checked below)
                if await self.head(repo, tag) is not None:
                    break
            after = await self.head(repo, tag)
        if after is not None:
            raise RegistryError(
                f"the tag still points at {after.digest} after its placeholder was deleted "
                "(pushed again meanwhile?); left as it is",
                site=site,
                repository=repo,
                reference=tag,
            )
        return TagDeletion(site, repo, tag, current.digest, "placeholder")


def count_children(manifest: Manifest) -> int:
    """How many manifests an index lists (0 for an image), without parsing them."""
    if not manifest.is_index:
        return 0
    listed = manifest.doc.get("manifests")
    return len(listed) if isinstance(listed, list) else 0
