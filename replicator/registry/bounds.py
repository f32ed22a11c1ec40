"""How much of a registry's answer the client accepts (the README lists these).

A source registry can serve anything: a 400 MB "manifest" once took `copy`
to 1.69 GB RSS and was then PUT to the target. Answers we hold in memory are
read incrementally and refused as soon as they pass their bound, before the
rest is read; a listing stops after a bounded number of pages. Blobs are
streamed, never held, so they have no bound here.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024 * 1024

# distribution refuses to store a manifest larger than this (v3's maxManifestBodySize);
# a bigger one cannot be copied anywhere, so do not read it.
MANIFEST_BYTES = 4 * MIB


@dataclass(frozen=True, slots=True)
class ReadBounds:
    manifest_bytes: int = MANIFEST_BYTES  # a manifest or a referrers API answer
    index_children: int = 4096  # manifests one index may list (multi-arch: a dozen)
    referrers: int = 1024  # referrers (signatures, SBOMs, ...) of one manifest
    list_page_bytes: int = 8 * MIB  # one tags/catalog page (~200k tag names)
    list_pages: int = 10_000  # pages of one tags/catalog listing


def size_text(n: int) -> str:
    """`4 MiB` for whole mebibytes, else the byte count."""
    return f"{n // MIB} MiB" if n % MIB == 0 else f"{n} bytes"
