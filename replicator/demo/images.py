"""Sample images for the demo, pushed with our own client: apps sharing a base layer,
a multi-arch index, and a signed image (an OCI referrer under the fallback tag)."""

from __future__ import annotations

import hashlib
import json
import os

from replicator.manifest import OCI_INDEX, OCI_MANIFEST, digest_of
from replicator.registry.client import RegistryClient

LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG = "application/vnd.oci.image.config.v1+json"


async def _chunks(data: bytes):
    for i in range(0, len(data), 1 << 20):
        yield data[i : i + (1 << 20)]


async def push_blob(client: RegistryClient, repo: str, data: bytes) -> dict:
    digest = digest_of(data)
    if await client.head_blob(repo, digest) is None:
        await client.upload_blob(repo, digest, len(data), _chunks(data))
    return {"digest": digest, "size": len(data)}


def noise(seed: str, size: int) -> bytes:
    """Deterministic bytes that do not compress, so sizes mean something."""
    out = bytearray()
    block = hashlib.sha256(seed.encode()).digest()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block * 32
    return bytes(out[:size])


async def push_image(
    client: RegistryClient, repo: str, tag: str | None, layers: list[bytes], arch: str = "amd64"
) -> tuple[str, bytes]:
    config = json.dumps(
        {
            "architecture": arch,
            "os": "linux",
            "created": "2026-01-01T00:00:00Z",
            "rootfs": {"type": "layers", "diff_ids": [digest_of(x) for x in layers]},
        }
    ).encode()
    cfg = await push_blob(client, repo, config)
    descs = [{"mediaType": LAYER, **await push_blob(client, repo, x)} for x in layers]
    raw = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": CONFIG, **cfg},
            "layers": descs,
        },
        indent=2,
    ).encode()
    digest = await client.put_manifest(repo, tag or digest_of(raw), raw, OCI_MANIFEST)
    return digest, raw


async def push_samples(client: RegistryClient, scale: int = 1) -> dict[str, str]:
    """Push the demo set; returns 'repo:tag' -> digest."""
    base = noise("demo-base", 2_000_000 * scale)
    pushed: dict[str, str] = {}
    for app in ("api", "web", "worker"):
        for version in ("v1.0", "v1.1"):
            own = noise(f"{app}-{version}-{os.getpid()}", 300_000 * scale)
            digest, _ = await push_image(client, f"demo/{app}", version, [base, own])
            pushed[f"demo/{app}:{version}"] = digest
    children = []
    for arch in ("amd64", "arm64"):
        digest, raw = await push_image(
            client, "demo/multi", None, [base, noise(f"multi-{arch}", 200_000)], arch
        )
        children.append(
            {
                "mediaType": OCI_MANIFEST,
                "digest": digest,
                "size": len(raw),
                "platform": {"os": "linux", "architecture": arch},
            }
        )
    index = json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children}, indent=2
    ).encode()
    pushed["demo/multi:v1.0"] = await client.put_manifest("demo/multi", "v1.0", index, OCI_INDEX)
    # a signature for demo/api:v1.1, found through the referrers fallback tag
    subject_digest = pushed["demo/api:v1.1"]
    head = await client.head_manifest("demo/api", subject_digest)
    empty = await push_blob(client, "demo/api", b"{}")
    payload = await push_blob(client, "demo/api", b'{"critical":{"image":"demo/api:v1.1"}}')
    sig_type = "application/vnd.dev.cosign.simplesigning.v1+json"
    sig = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": sig_type,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", **empty},
            "layers": [{"mediaType": sig_type, **payload}],
            "subject": {
                "mediaType": OCI_MANIFEST,
                "digest": subject_digest,
                "size": head.size if head else 0,
            },
        },
        indent=2,
    ).encode()
    sig_digest = await client.put_manifest("demo/api", digest_of(sig), sig, OCI_MANIFEST)
    fallback = "sha256-" + subject_digest.split(":", 1)[1]
    referrers = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": sig_digest,
                    "size": len(sig),
                    "artifactType": sig_type,
                }
            ],
        },
        indent=2,
    ).encode()
    pushed[f"demo/api:{fallback}"] = await client.put_manifest(
        "demo/api", fallback, referrers, OCI_INDEX
    )
    return pushed
