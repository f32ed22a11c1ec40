"""Transport behaviour that needs no hostile front: a plain-HTTP registry reached over
https is a configuration mistake, reported at once rather than after retries."""

from __future__ import annotations

import time

import pytest

from replicator.registry.client import RegistryClient
from replicator.registry.errors import RegistryUnavailable
from replicator.registry.site import SiteEndpoint


@pytest.mark.parametrize("insecure", [True, False], ids=["insecure", "verified"])
async def test_plain_http_registry_over_https_fails_at_once(registry, insecure):
    site = SiteEndpoint(name="us-east", url=f"https://{registry.host}", insecure=insecure)
    async with RegistryClient(site) as c:  # default retries and backoff: 5, from 0.5 s
        start = time.monotonic()
        with pytest.raises(RegistryUnavailable) as err:
            await c.ping()
        elapsed = time.monotonic() - start
        assert c.stats["requests"] == 1 and c.stats["retries"] == 0
    assert str(err.value) == (
        f"us-east: https://{registry.host} speaks plain HTTP, not TLS: use "
        f"url: http://{registry.host} with insecure: true (copy: --insecure)"
    )
    assert not err.value.retryable
    assert elapsed < 3
