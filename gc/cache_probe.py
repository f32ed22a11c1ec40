"""Ask the registry itself whether it answers blob checks from a descriptor cache.

Why (storage F4): with ``storage.cache.blobdescriptor`` set, distribution answers
a blob HEAD, a mount and manifest validation from memory or redis, so a blob the
sweep removed still "exists" for it: clients skip the upload and push images that
cannot be pulled (distribution #2966). The setting may come from config.yml or
from the environment (``REGISTRY_STORAGE_CACHE_BLOBDESCRIPTOR=inmemory`` overrides
the file), so reading the YAML proves nothing; the registry can. Right after the
quarantine, each sampled blob's layer link is gone from disk, so a registry
without a cache answers 404. A 200 for a blob whose link or data is *still* gone
from disk once the answer is in can only come from a cache. (A 200 for one whose
link and data are back was a push in the meantime, which is fine: checking the
disk after the answer, not before, is what keeps that from looking like a cache.)

A sample, not every blob: `SAMPLE_SIZE` HEADs bound the cost on a large sweep.
An in-memory cache holds every blob pushed or looked up since the registry
started, a redis cache every blob, so a cache shows on the first sampled blob a
client touched; a registry that restarted since and then saw none of the sampled
blobs slips through this check (the YAML check still stands before it).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

SAMPLE_SIZE = 16  # HEADs per run, at most


class BlobHeadClient(Protocol):
    """What the probe needs of a registry API client (RegistryClient has it)."""

    async def head_blob(self, repo: str, digest: str) -> int | None:
        """Size of the blob in `repo`; None when the registry answers 404."""
        ...


@dataclass
class ProbeOutcome:
    probed: int = 0
    cached: list[tuple[str, str]] = field(default_factory=list)  # (repo, digest) answered 200
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # (repo, digest, error)

    @property
    def clean(self) -> bool:
        """Every sampled blob was answered 404 (or was really back on disk)."""
        return not self.cached and not self.failed


def choose_sample(
    links: Iterable[tuple[str, str]], size: int = SAMPLE_SIZE, rng: random.Random | None = None
) -> list[tuple[str, str]]:
    """At most `size` distinct digests at random, each with one repository whose layer
    link named it: a cache answers "exists" in the repositories it saw the blob in."""
    rng = rng or random.Random()
    repos: dict[str, set[str]] = {}
    for repo, digest in links:
        repos.setdefault(digest, set()).add(repo)
    digests = rng.sample(sorted(repos), min(size, len(repos)))
    return [(rng.choice(sorted(repos[d])), d) for d in digests]


async def probe(
    client: BlobHeadClient,
    sample: Iterable[tuple[str, str]],
    gone_from_disk: Callable[[str, str], bool],
) -> ProbeOutcome:
    """HEAD each sampled (repository, digest); `gone_from_disk(repo, digest)` (run on a
    thread, after the answer) says whether its link or data is still missing."""

    async def one(repo: str, digest: str) -> tuple[str, str, str | None, bool]:
        try:
            size = await client.head_blob(repo, digest)
        except Exception as exc:  # any failure: we could not verify
            return repo, digest, f"{type(exc).__name__}: {exc}", False
        if size is None:
            return repo, digest, None, False
        return repo, digest, None, await asyncio.to_thread(gone_from_disk, repo, digest)

    pairs = list(sample)
    outcome = ProbeOutcome(probed=len(pairs))
    for repo, digest, error, cached in await asyncio.gather(*(one(r, d) for r, d in pairs)):
        if error is not None:
            outcome.failed.append((repo, digest, error))
        elif cached:
            outcome.cached.append((repo, digest))
    return outcome


def refusal(site: str, url: str | None, outcome: ProbeOutcome, restored: int, left: int) -> str:
    """The message a refused run ends with: what the registry did, what we undid, what
    the operator can change."""
    where = f"the registry of site {site}" + (f" ({url})" if url else "")
    if outcome.cached:
        repo, digest = outcome.cached[0]
        what = (
            f"{where} answered 200 to HEAD /v2/{repo}/blobs/{digest} "
            f"({len(outcome.cached)} of {outcome.probed} sampled blobs) although the blob's "
            "link or data had just been moved out of its storage: it answers from a "
            "blob-descriptor cache"
        )
    else:
        repo, digest, error = outcome.failed[0]
        what = (
            f"could not verify through the API of {where} that it does not answer from a "
            f"blob-descriptor cache: HEAD /v2/{repo}/blobs/{digest}: {error}"
        )
    undone = f"restored all {restored} quarantined items; nothing was deleted"
    if left:
        undone = (
            f"restored {restored} quarantined items; {left} could not be moved back and "
            "stay in quarantine (see the run's errors); nothing was deleted"
        )
    return (
        f"{what} (storage.cache.blobdescriptor, in config.yml or set by the environment "
        "variable REGISTRY_STORAGE_CACHE_BLOBDESCRIPTOR, which overrides the file). Clients "
        "would skip uploading blobs this collector deletes and push broken images "
        f"(distribution #2966). Refused: {undone}. Disable the cache in the registry's "
        "config and environment and restart it, or make the registry read-only/stop it and "
        "run with assume_no_cache (--assume-no-cache)"
    )


__all__ = ["SAMPLE_SIZE", "BlobHeadClient", "ProbeOutcome", "choose_sample", "probe", "refusal"]
