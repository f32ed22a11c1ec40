"""Manifests and descriptors: media types, parsing, and what a manifest references.

Pure logic, no I/O. The raw bytes are kept exactly as received: a manifest's
digest is the hash of those bytes, so re-serialising would change it.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"

INDEX_MEDIA_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
IMAGE_MEDIA_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
MANIFEST_MEDIA_TYPES = (OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST)
ACCEPT_MANIFESTS = ", ".join(MANIFEST_MEDIA_TYPES)

_DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}$|^sha512:[a-f0-9]{128}$")


class ManifestError(ValueError):
    """A manifest we cannot handle: malformed, or an obsolete format."""


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def is_digest(ref: str) -> bool:
    return bool(_DIGEST_RE.fullmatch(ref))


def hasher_for(digest: str) -> hashlib._Hash:
    """A fresh hash object matching the algorithm of `digest`."""
    algorithm = digest.split(":", 1)[0]
    if algorithm not in ("sha256", "sha512"):
        raise ManifestError(f"unsupported digest algorithm {algorithm!r} in {digest}")
    return hashlib.new(algorithm)


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        base = f"{self.os}/{self.architecture}"
        return f"{base}/{self.variant}" if self.variant else base

    @classmethod
    def parse(cls, text: str) -> Platform:
        """'linux/arm64/v8' -> Platform('linux', 'arm64', 'v8')."""
        parts = text.strip().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"platform must look like os/arch[/variant], got {text!r}")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    def matches(self, wanted: Platform) -> bool:
        """`wanted` without a variant matches every variant."""
        return (
            self.os == wanted.os
            and self.architecture == wanted.architecture
            and (wanted.variant is None or self.variant == wanted.variant)
        )


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    artifact_type: str | None = None
    annotations: dict[str, str] | None = field(default=None, hash=False, compare=False)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Descriptor:
        try:
            plat = d.get("platform")
            return cls(
                media_type=str(d.get("mediaType", "")),
                digest=str(d["digest"]),
                size=int(d.get("size", 0)),
                platform=Platform(plat["os"], plat["architecture"], plat.get("variant"))
                if isinstance(plat, dict) and "os" in plat and "architecture" in plat
                else None,
                artifact_type=d.get("artifactType"),
                annotations=d.get("annotations"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"malformed descriptor {d!r}: {exc}") from exc

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.annotations:
            out["annotations"] = self.annotations
        if self.platform:
            out["platform"] = {"os": self.platform.os, "architecture": self.platform.architecture}
            if self.platform.variant:
                out["platform"]["variant"] = self.platform.variant
        return out


@dataclass(frozen=True)
class Manifest:
    """A manifest as stored: exact bytes, media type, digest, and its parsed view."""

    raw: bytes
    media_type: str
    digest: str

    @cached_property
    def doc(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(f"manifest {self.digest} is not JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise ManifestError(f"manifest {self.digest} is not a JSON object")
        return doc

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_MEDIA_TYPES

    @property
    def children(self) -> list[Descriptor]:
        """Manifests an index references (empty for an image manifest)."""
        if not self.is_index:
            return []
        return [Descriptor.from_json(d) for d in self.doc.get("manifests") or []]

    @property
    def config(self) -> Descriptor | None:
        cfg = self.doc.get("config")
        return Descriptor.from_json(cfg) if isinstance(cfg, dict) else None

    @property
    def layers(self) -> list[Descriptor]:
        return [Descriptor.from_json(d) for d in self.doc.get("layers") or []]

    @property
    def blobs(self) -> list[Descriptor]:
        """Config then layers: every blob this manifest needs (none for an index)."""
        if self.is_index:
            return []
        cfg = self.config
        return ([cfg] if cfg else []) + self.layers

    @property
    def subject(self) -> Descriptor | None:
        sub = self.doc.get("subject")
        return Descriptor.from_json(sub) if isinstance(sub, dict) else None

    @property
    def artifact_type(self) -> str | None:
        at = self.doc.get("artifactType")
        if at:
            return str(at)
        cfg = self.config
        return cfg.media_type if cfg and not self.is_index else None

    @property
    def annotations(self) -> dict[str, str]:
        return dict(self.doc.get("annotations") or {})

    def descriptor(self) -> Descriptor:
        return Descriptor(
            self.media_type, self.digest, len(self.raw), artifact_type=self.doc.get("artifactType")
        )


def parse_manifest(raw: bytes, media_type: str | None, digest: str | None = None) -> Manifest:
    """Build a Manifest from bytes; the media type falls back to the body's mediaType.

    Raises ManifestError for schema1 (obsolete) or anything we cannot classify.
    """
    computed = digest_of(raw, digest.split(":", 1)[0] if digest else "sha256")
    if digest and computed != digest:
        raise ManifestError(f"manifest content digest {computed} does not match {digest}")
    mt = (media_type or "").split(";", 1)[0].strip()
    body_mt = None
    try:
        doc = json.loads(raw)
        if isinstance(doc, dict):
            body_mt = doc.get("mediaType")
            if doc.get("schemaVersion") == 1:
                mt = DOCKER_SCHEMA1
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"manifest {computed} is not JSON: {exc}") from exc
    if mt in ("", "application/json", "text/plain", "application/octet-stream"):
        mt = body_mt or (
            OCI_INDEX if isinstance(doc, dict) and "manifests" in doc else OCI_MANIFEST
        )
    if mt in (DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED):
        raise ManifestError(
            f"manifest {computed} is Docker schema 1, which is obsolete and not supported; "
            "re-push the image with a current client"
        )
    if mt not in MANIFEST_MEDIA_TYPES:
        raise ManifestError(f"manifest {computed} has unsupported media type {mt!r}")
    return Manifest(raw=raw, media_type=mt, digest=computed)
