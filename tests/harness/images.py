"""Build and push test images straight over the distribution API (sync httpx).

Independent of the code under test, so a bug in our client cannot hide itself.
Layers are deterministic bytes derived from a seed, so "shared base layer"
scenarios are just the same seed pushed to several repositories.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import httpx

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
ACCEPT = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST])


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_bytes(seed: str, size: int = 1024) -> bytes:
    """Deterministic pseudo-random bytes: the same seed gives the same layer."""
    out = bytearray()
    block = hashlib.sha256(seed.encode()).digest()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(block + counter.to_bytes(8, "big")).digest() * 64
        counter += 1
    return bytes(out[:size])


def random_bytes(size: int) -> bytes:
    return os.urandom(size)


@dataclass
class Pushed:
    digest: str
    media_type: str
    raw: bytes
    blobs: list[str]


class Pusher:
    """Pushes blobs and manifests to one registry. `auth` is any httpx auth."""

    def __init__(self, base_url: str, auth: httpx.Auth | tuple[str, str] | None = None):
        self.base = base_url.rstrip("/")
        self.http = httpx.Client(auth=auth, timeout=60)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Pusher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def push_blob(self, repo: str, data: bytes) -> str:
        digest = digest_of(data)
        r = self.http.head(f"{self.base}/v2/{repo}/blobs/{digest}")
        if r.status_code == 200:
            return digest
        r = self.http.post(f"{self.base}/v2/{repo}/blobs/uploads/")
        r.raise_for_status()
        loc = r.headers["location"]
        if loc.startswith("/"):
            loc = self.base + loc
        sep = "&" if "?" in loc else "?"
        r = self.http.put(
            f"{loc}{sep}digest={digest}",
            content=data,
            headers={"content-type": "application/octet-stream"},
        )
        r.raise_for_status()
        return digest

    def push_manifest(self, repo: str, ref: str, raw: bytes, media_type: str) -> str:
        r = self.http.put(
            f"{self.base}/v2/{repo}/manifests/{ref}",
            content=raw,
            headers={"content-type": media_type},
        )
        r.raise_for_status()
        return digest_of(raw)

    def push_image(
        self,
        repo: str,
        tag: str | None,
        layers: list[bytes],
        *,
        platform: tuple[str, str] = ("linux", "amd64"),
        docker: bool = False,
        created: str = "2024-01-01T00:00:00Z",
        labels: dict | None = None,
        annotations: dict | None = None,
        subject: dict | None = None,
        artifact_type: str | None = None,
    ) -> Pushed:
        config = json.dumps(
            {
                "architecture": platform[1],
                "os": platform[0],
                "created": created,
                "config": {"Labels": labels or {}},
                "rootfs": {"type": "layers", "diff_ids": [digest_of(layer) for layer in layers]},
            },
            sort_keys=True,
        ).encode()
        cfg_digest = self.push_blob(repo, config)
        layer_descs = []
        for layer in layers:
            d = self.push_blob(repo, layer)
            layer_descs.append(
                {
                    "mediaType": DOCKER_LAYER if docker else OCI_LAYER,
                    "digest": d,
                    "size": len(layer),
                }
            )
        media_type = DOCKER_MANIFEST if docker else OCI_MANIFEST
        manifest: dict = {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": {
                "mediaType": DOCKER_CONFIG if docker else OCI_CONFIG,
                "digest": cfg_digest,
                "size": len(config),
            },
            "layers": layer_descs,
        }
        if artifact_type:
            manifest["artifactType"] = artifact_type
        if subject:
            manifest["subject"] = subject
        if annotations:
            manifest["annotations"] = annotations
        raw = json.dumps(manifest, indent=2).encode()
        digest = self.push_manifest(repo, tag or digest_of(raw), raw, media_type)
        return Pushed(digest, media_type, raw, [cfg_digest] + [d["digest"] for d in layer_descs])

    def push_index(
        self,
        repo: str,
        tag: str | None,
        children: list[tuple[Pushed, str, str]],
        docker: bool = False,
    ) -> Pushed:
        """children: (pushed manifest, os, arch)."""
        media_type = DOCKER_LIST if docker else OCI_INDEX
        index = {
            "schemaVersion": 2,
            "mediaType": media_type,
            "manifests": [
                {
                    "mediaType": c.media_type,
                    "digest": c.digest,
                    "size": len(c.raw),
                    "platform": {"os": os_, "architecture": arch},
                }
                for c, os_, arch in children
            ],
        }
        raw = json.dumps(index, indent=2).encode()
        digest = self.push_manifest(repo, tag or digest_of(raw), raw, media_type)
        return Pushed(digest, media_type, raw, [])

    def push_multiarch(
        self,
        repo: str,
        tag: str,
        seed: str,
        docker: bool = False,
        platforms: tuple[tuple[str, str], ...] = (("linux", "amd64"), ("linux", "arm64")),
    ) -> Pushed:
        children = []
        for os_, arch in platforms:
            child = self.push_image(
                repo,
                None,
                [layer_bytes(f"{seed}-{arch}", 2048)],
                platform=(os_, arch),
                docker=docker,
            )
            children.append((child, os_, arch))
        return self.push_index(repo, tag, children, docker=docker)

    def push_referrer(
        self,
        repo: str,
        subject: Pushed,
        payload: bytes,
        artifact_type: str = "application/vnd.dev.cosign.simplesigning.v1+json",
    ) -> Pushed:
        """Push an OCI artifact with `subject` and maintain the referrers fallback tag."""
        empty = b"{}"
        empty_digest = self.push_blob(repo, empty)
        blob_digest = self.push_blob(repo, payload)
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": artifact_type,
            "config": {
                "mediaType": "application/vnd.oci.empty.v1+json",
                "digest": empty_digest,
                "size": 2,
            },
            "layers": [{"mediaType": artifact_type, "digest": blob_digest, "size": len(payload)}],
            "subject": {
                "mediaType": subject.media_type,
                "digest": subject.digest,
                "size": len(subject.raw),
            },
        }
        raw = json.dumps(manifest, indent=2).encode()
        digest = self.push_manifest(repo, digest_of(raw), raw, OCI_MANIFEST)
        pushed = Pushed(digest, OCI_MANIFEST, raw, [empty_digest, blob_digest])
        # fallback tag sha256-<hex>: an index listing every referrer of the subject
        fallback = "sha256-" + subject.digest.split(":", 1)[1]
        existing: list[dict] = []
        r = self.http.get(
            f"{self.base}/v2/{repo}/manifests/{fallback}", headers={"accept": OCI_INDEX}
        )
        if r.status_code == 200:
            existing = r.json().get("manifests", [])
        existing.append(
            {
                "mediaType": OCI_MANIFEST,
                "digest": digest,
                "size": len(raw),
                "artifactType": artifact_type,
            }
        )
        idx = json.dumps(
            {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": existing}, indent=2
        ).encode()
        self.push_manifest(repo, fallback, idx, OCI_INDEX)
        return pushed

    def get_manifest(self, repo: str, ref: str) -> httpx.Response:
        return self.http.get(f"{self.base}/v2/{repo}/manifests/{ref}", headers={"accept": ACCEPT})

    def tags(self, repo: str) -> list[str]:
        r = self.http.get(f"{self.base}/v2/{repo}/tags/list")
        if r.status_code == 404:
            return []
        r.raise_for_status()
        return r.json().get("tags") or []


def assert_image_complete(
    base_url: str, repo: str, ref: str, auth: httpx.Auth | tuple[str, str] | None = None
) -> str:
    """Fetch a manifest and everything it reaches, verifying every digest. Returns the digest."""
    with httpx.Client(auth=auth, timeout=60) as http:
        return _check(http, base_url.rstrip("/"), repo, ref)


def _check(http: httpx.Client, base: str, repo: str, ref: str) -> str:
    r = http.get(f"{base}/v2/{repo}/manifests/{ref}", headers={"accept": ACCEPT})
    assert r.status_code == 200, f"{repo}:{ref} manifest: HTTP {r.status_code}"
    digest = digest_of(r.content)
    if ref.startswith("sha256:"):
        assert digest == ref, f"{repo}@{ref}: content digest {digest}"
    doc = json.loads(r.content)
    for child in doc.get("manifests", []):
        _check(http, base, repo, child["digest"])
    blobs = ([doc["config"]] if "config" in doc else []) + doc.get("layers", [])
    for b in blobs:
        br = http.get(f"{base}/v2/{repo}/blobs/{b['digest']}")
        assert br.status_code == 200, f"{repo} blob {b['digest']}: HTTP {br.status_code}"
        assert digest_of(br.content) == b["digest"], f"{repo} blob {b['digest']} corrupt"
    return digest
