"""A front that gives a real distribution 2.8 the tag DELETE of distribution v3.

distribution 2.8 cannot delete a tag by name (`DELETE /v2/<name>/manifests/<tag>`
answers 400 DIGEST_INVALID); distribution v3, zot and Harbor can (OCI
distribution-spec 1.1). This front answers that one request itself, the way
distribution v3's `tagStore.Untag` does: it removes the tag's directory
(`repositories/<name>/_manifests/tags/<tag>`) from the registry's filesystem
storage, leaving the manifest and every other tag alone; 404 MANIFEST_UNKNOWN when
the tag does not exist. distribution reads tags from storage on every request (no
tag cache), so the registry behind sees the change at once. Every other request is
forwarded unchanged.
"""

from __future__ import annotations

import json
import re
import shutil

from tests.harness.hostile_front import HostileFront, Reply, Seen
from tests.harness.registry import Registry

_TAG_DELETE = r"^/v2/(?P<name>[a-z0-9._/-]+)/manifests/(?P<tag>[A-Za-z0-9_][A-Za-z0-9._-]{0,127})$"


def tag_delete_front(registry: Registry) -> HostileFront:
    """A started front on `registry` that supports DELETE by tag."""
    front = HostileFront(registry.port)
    pattern = re.compile(_TAG_DELETE)
    root = registry.storage / "docker" / "registry" / "v2" / "repositories"

    def untag(seen: Seen) -> Reply:
        m = pattern.match(seen.path)
        assert m is not None
        tag_dir = root / m["name"] / "_manifests" / "tags" / m["tag"]
        if not tag_dir.is_dir():
            body = {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]}
            return Reply(404, {"Content-Type": "application/json"}, json.dumps(body).encode())
        shutil.rmtree(tag_dir)
        return Reply(202)

    front.answer("DELETE", _TAG_DELETE, untag)
    return front.start()
