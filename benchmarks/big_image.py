"""One big image pushed straight to a registry: the shared set-up of the big-blob benchmarks.

Why here: bench_copy.py (engine vs curl) and bench_uploads.py (chunked vs monolithic)
both need an image with one multi-GiB layer; pushing it streams the bytes (never held
in memory, never written to a file first).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator

import httpx

from tests.harness.images import digest_of
from tests.harness.registry import Registry

MIB = 2**20


def push_big(src: Registry, mib: int) -> str:
    """Push an image with one `mib` MiB layer of incompressible bytes, 1 MiB at a time."""
    block = os.urandom(MIB)

    def chunks() -> Iterator[bytes]:
        for i in range(mib):
            yield i.to_bytes(8, "big") + block[8:]

    h = hashlib.sha256()
    for c in chunks():
        h.update(c)
    digest = "sha256:" + h.hexdigest()
    with httpx.Client(timeout=900) as http:
        loc = http.post(f"{src.url}/v2/big/blob/blobs/uploads/").headers["location"]
        loc = loc if loc.startswith("http") else src.url + loc
        http.put(
            f"{loc}&digest={digest}",
            content=chunks(),
            headers={"content-length": str(mib * MIB)},
        ).raise_for_status()
        config = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
        cfg_loc = http.post(f"{src.url}/v2/big/blob/blobs/uploads/").headers["location"]
        cfg_loc = cfg_loc if cfg_loc.startswith("http") else src.url + cfg_loc
        http.put(f"{cfg_loc}&digest={digest_of(config)}", content=config).raise_for_status()
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": digest_of(config),
                    "size": len(config),
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": digest,
                        "size": mib * MIB,
                    }
                ],
            }
        ).encode()
        http.put(
            f"{src.url}/v2/big/blob/manifests/v1",
            content=manifest,
            headers={"content-type": "application/vnd.oci.image.manifest.v1+json"},
        ).raise_for_status()
    return digest
