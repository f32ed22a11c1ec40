"""Generate a distribution filesystem store directly on disk, for GC benchmarks.

Layout as distribution 2.8 writes it (see gc/layout.py). Deterministic from a seed.
Each image: a unique config, one unique layer and 0-2 layers from a shared pool.
Image states: tagged, untagged (revision link only) or deleted (revision link and
tags gone, `_layers` links left behind - exactly what an API DELETE leaves).
Plus orphan blobs with no link at all and abandoned upload sessions.

No multi-arch indexes with untagged children and no referrers by default: on
those distribution's --delete-untagged deletes things we keep (on purpose), so
they would make the comparison apples-to-oranges. `--indexes N` adds them anyway.

Run: .venv/bin/python benchmarks/gen_store.py DIR [--manifests 6000] [--repos 100]
     [--pool 3000] [--orphans 1000] [--uploads 50] [--indexes 0]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


@dataclass
class StoreStats:
    manifests: int = 0
    tagged: int = 0
    untagged: int = 0
    deleted: int = 0
    orphans: int = 0
    uploads: int = 0
    indexes: int = 0
    blobs: set[str] = field(default_factory=set)


class Writer:
    def __init__(self, root: Path) -> None:
        self.v2 = root / "docker/registry/v2"
        self.written: set[str] = set()

    def blob(self, data: bytes) -> str:
        hexd = hashlib.sha256(data).hexdigest()
        if hexd not in self.written:
            d = self.v2 / "blobs/sha256" / hexd[:2] / hexd
            d.mkdir(parents=True, exist_ok=True)
            (d / "data").write_bytes(data)
            self.written.add(hexd)
        return f"sha256:{hexd}"

    def link(self, path: Path, digest: str) -> None:
        path.mkdir(parents=True, exist_ok=True)
        (path / "link").write_text(digest)

    def layer_link(self, repo: str, digest: str) -> None:
        self.link(self.v2 / "repositories" / repo / "_layers/sha256" / digest[7:], digest)

    def revision(self, repo: str, digest: str) -> None:
        self.link(
            self.v2 / "repositories" / repo / "_manifests/revisions/sha256" / digest[7:], digest
        )

    def tag(self, repo: str, tag: str, digest: str) -> None:
        base = self.v2 / "repositories" / repo / "_manifests/tags" / tag
        self.link(base / "current", digest)
        self.link(base / "index/sha256" / digest[7:], digest)


def generate(
    root: Path,
    manifests: int = 6000,
    repos: int = 100,
    pool: int = 3000,
    orphans: int = 1000,
    uploads: int = 50,
    indexes: int = 0,
    seed: int = 1,
    blob_size: int = 96,
    tagged: float = 0.65,  # fraction of images tagged; of the rest 4/7 untagged, 3/7 deleted
) -> StoreStats:
    rng = random.Random(seed)
    w = Writer(root)
    st = StoreStats()
    repo_names = [f"team{i % 10}/app{i}" for i in range(repos)]
    pool_layers = [rng.randbytes(blob_size) for _ in range(pool)]
    images_by_repo: dict[str, list[tuple[str, bytes]]] = {}
    for j in range(manifests):
        repo = repo_names[j % repos]
        layers = [rng.randbytes(blob_size), *rng.sample(pool_layers, rng.randint(0, 2))]
        config = json.dumps({"architecture": "amd64", "os": "linux", "n": j}).encode()
        cfg = w.blob(config)
        descs = []
        for layer in layers:
            d = w.blob(layer)
            w.layer_link(repo, d)
            descs.append({"mediaType": OCI_LAYER, "digest": d, "size": len(layer)})
        w.layer_link(repo, cfg)
        raw = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": cfg, "size": len(config)},
                "layers": descs,
            },
            indent=2,
        ).encode()
        md = w.blob(raw)
        st.manifests += 1
        r = rng.random()
        if r < tagged:
            w.revision(repo, md)
            w.tag(repo, f"t{j}", md)
            st.tagged += 1
            images_by_repo.setdefault(repo, []).append((md, raw))
        elif r < tagged + (1 - tagged) * 4 / 7:
            w.revision(repo, md)
            st.untagged += 1
        else:
            st.deleted += 1
    for i in range(indexes):
        repo = repo_names[i % repos]
        kids = images_by_repo.get(repo, [])[:2]
        children = []
        for _ in range(2):  # untagged children, only reachable through the index
            config = json.dumps(
                {"architecture": "arm64", "os": "linux", "i": i, "r": rng.random()}
            ).encode()
            cfg = w.blob(config)
            layer = rng.randbytes(blob_size)
            ld = w.blob(layer)
            w.layer_link(repo, cfg)
            w.layer_link(repo, ld)
            raw = json.dumps(
                {
                    "schemaVersion": 2,
                    "mediaType": OCI_MANIFEST,
                    "config": {"mediaType": OCI_CONFIG, "digest": cfg, "size": len(config)},
                    "layers": [{"mediaType": OCI_LAYER, "digest": ld, "size": len(layer)}],
                }
            ).encode()
            md = w.blob(raw)
            w.revision(repo, md)
            children.append({"mediaType": OCI_MANIFEST, "digest": md, "size": len(raw)})
        del kids
        raw = json.dumps(
            {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children}
        ).encode()
        idx = w.blob(raw)
        w.revision(repo, idx)
        w.tag(repo, f"multi{i}", idx)
        st.indexes += 1
    for _ in range(orphans):
        w.blob(rng.randbytes(blob_size))
        st.orphans += 1
    for u in range(uploads):
        repo = repo_names[u % repos]
        d = w.v2 / "repositories" / repo / "_uploads" / f"upload-{u:04d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "data").write_bytes(rng.randbytes(blob_size))
        (d / "startedat").write_text("2024-01-01T00:00:00Z")
        st.uploads += 1
    st.blobs = {f"sha256:{h}" for h in w.written}
    # everything was "pushed" a day ago
    old = os.path.getmtime(w.v2) - 86400
    for dirpath, _dirs, files in os.walk(w.v2):
        for name in files:
            os.utime(os.path.join(dirpath, name), (old, old))
    return st


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--manifests", type=int, default=6000)
    ap.add_argument("--repos", type=int, default=100)
    ap.add_argument("--pool", type=int, default=3000, help="shared layers (0-2 per image)")
    ap.add_argument("--orphans", type=int, default=1000, help="blobs nothing links to")
    ap.add_argument("--uploads", type=int, default=50, help="abandoned upload sessions")
    ap.add_argument("--indexes", type=int, default=0)
    args = ap.parse_args()
    st = generate(
        args.dir,
        manifests=args.manifests,
        repos=args.repos,
        pool=args.pool,
        orphans=args.orphans,
        uploads=args.uploads,
        indexes=args.indexes,
    )
    print(
        f"{st.manifests} manifests ({st.tagged} tagged, {st.untagged} untagged, "
        f"{st.deleted} deleted), {len(st.blobs)} blobs, {st.orphans} orphans, "
        f"{st.uploads} uploads, {st.indexes} indexes"
    )


if __name__ == "__main__":
    main()
