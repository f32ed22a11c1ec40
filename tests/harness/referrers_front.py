"""A front that gives a real distribution 2.8 the OCI referrers API of distribution-spec 1.1.

distribution 2.8 has no `GET /v2/<name>/referrers/<digest>` (a plain-text 404); zot,
Harbor, distribution v3 and most clouds have it. This front answers it from the
registry's own fallback tag `sha256-<hex>` (the index `Pusher.push_referrer` keeps),
as a registry with the API would: 200 with an OCI index of the referrers, an empty
one when there are none. Every other request is forwarded unchanged.
"""

from __future__ import annotations

import json

import httpx

from tests.harness.hostile_front import HostileFront, Reply, Seen
from tests.harness.images import OCI_INDEX
from tests.harness.registry import Registry

_REFERRERS = r"^/v2/(?P<name>[a-z0-9._/-]+)/referrers/sha256:(?P<hex>[a-f0-9]{64})$"


def referrers_front(registry: Registry) -> HostileFront:
    """A started front on `registry` that serves the referrers API."""
    front = HostileFront(registry.port)

    def referrers(seen: Seen) -> Reply:
        name, hex_ = seen.path.split("/v2/", 1)[1].rsplit("/referrers/sha256:", 1)
        r = httpx.get(
            f"{registry.url}/v2/{name}/manifests/sha256-{hex_}", headers={"accept": OCI_INDEX}
        )
        manifests = r.json().get("manifests", []) if r.status_code == 200 else []
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests})
        return Reply(200, {"Content-Type": OCI_INDEX}, body.encode())

    front.answer("GET", _REFERRERS, referrers)
    return front.start()
