"""One RegistryClient per configured site, opened on first use and closed together.

Sharing clients means sharing each site's concurrency and rate limits across
every rule, sync and task that talks to it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from replicator.registry.client import RegistryClient
from replicator.registry.site import SiteEndpoint

if TYPE_CHECKING:
    from replicator.config import Config

# (site, method, HTTP status or None when no answer came, seconds)
RequestObserver = Callable[[str, str, int | None, float], None]


class ClientPool:
    def __init__(
        self,
        config: Config,
        *,
        retries: int = 5,
        backoff_base: float | None = None,
        observer: RequestObserver | None = None,
    ) -> None:
        self.config = config
        self._retries = retries
        self._backoff_base = backoff_base
        self._observer = observer
        self._clients: dict[str, RegistryClient] = {}

    def get(self, site: str) -> RegistryClient:
        client = self._clients.get(site)
        if client is None:
            kwargs: dict = {"retries": self._retries}
            if self._backoff_base is not None:
                kwargs["backoff_base"] = self._backoff_base
            client = RegistryClient(SiteEndpoint.from_config(self.config, site), **kwargs)
            if self._observer is not None:
                client.observe_requests(self._observer)
            self._clients[site] = client
        return client

    def __getitem__(self, site: str) -> RegistryClient:
        return self.get(site)

    def budgets(self) -> dict[str, dict[str, Any]]:
        """The pull budget of every open client whose registry reports one."""
        found = {site: client.pull_budget() for site, client in self._clients.items()}
        return {site: budget for site, budget in found.items() if budget is not None}

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()

    async def __aenter__(self) -> ClientPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
