"""Where each blob already lives on each target registry: the copy engine's mount index.

Cross-repository mount only works inside one registry, so to avoid uploading a
shared layer again we need to know which repository on *that* registry holds
it. Entries are written on every upload, mount and positive HEAD, and removed
when a mount attempt proves them stale (202 instead of 201). The journal
(`replicator.journal.blobs`) persists them across restarts; this in-memory copy
answers the hot path, loaded once per registry.
"""

from __future__ import annotations

from collections import defaultdict

from replicator.journal import Journal

MAX_MOUNT_CANDIDATES = 3


class BlobIndex:
    def __init__(self, journal: Journal | None = None) -> None:
        self._journal = journal
        # registry -> digest -> repositories (most recently verified last)
        self._mem: dict[str, dict[str, list[str]]] = defaultdict(dict)
        self._loaded: set[str] = set()

    async def _ensure_loaded(self, registry: str) -> None:
        if registry in self._loaded or self._journal is None:
            self._loaded.add(registry)
            return
        table = self._mem[registry]
        for digest, repository in await self._journal.blobs.on_registry(registry):
            table.setdefault(digest, []).append(repository)
        self._loaded.add(registry)

    async def candidates(self, registry: str, digest: str, exclude: str) -> list[str]:
        """Repositories on `registry` believed to hold `digest`, best first."""
        await self._ensure_loaded(registry)
        repos = self._mem[registry].get(digest, [])
        return [r for r in reversed(repos) if r != exclude][:MAX_MOUNT_CANDIDATES]

    async def holders(self, registry: str, digest: str) -> list[str]:
        """Every repository on `registry` believed to hold `digest` (most recent last)."""
        await self._ensure_loaded(registry)
        return list(self._mem[registry].get(digest, []))

    async def record(self, registry: str, digest: str, repository: str) -> None:
        await self._ensure_loaded(registry)
        repos = self._mem[registry].setdefault(digest, [])
        if repository in repos:
            repos.remove(repository)
        repos.append(repository)
        if self._journal is not None:
            await self._journal.blobs.record(registry, digest, repository)

    async def forget(self, registry: str, digest: str, repository: str) -> None:
        repos = self._mem[registry].get(digest, [])
        if repository in repos:
            repos.remove(repository)
        if self._journal is not None:
            await self._journal.blobs.forget(registry, digest, repository)
