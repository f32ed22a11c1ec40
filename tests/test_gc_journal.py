"""What an API-mode GC leaves in the journal, on real registries (issue 11 follow-ups).

A GC that deletes a tag with the placeholder trick pushes a manifest the daemon must
know for its own (the ledger, before the push), or it would copy the placeholder to
replicas; every delete a GC makes is tombstoned, so failback and failover catch-up
do not bring back what retention removed.
"""

from __future__ import annotations

import asyncio

from replicator.gc.api import ApiGCOptions, collect_api
from replicator.gc.policy import KeepRules, RetentionPolicy
from replicator.journal import Journal
from replicator.registry.client import RegistryClient
from replicator.registry.site import SiteEndpoint
from tests.harness.daemon import DaemonProcess, notify_kwargs, site_config
from tests.harness.images import Pusher, assert_image_complete, layer_bytes
from tests.harness.util import free_port, wait_until

KEEP_V = RetentionPolicy(
    name="keep-v", keep=KeepRules(tags=("v*",)), untagged="keep", grace=0, mode="api"
)


def api_gc(reg, journal: Journal, site: str = "a", **kw):
    async def go():
        async with RegistryClient(SiteEndpoint(name=site, url=reg.url, insecure=True)) as client:
            return await collect_api(
                client, journal, ApiGCOptions(site=site, policies=[KEEP_V], **kw)
            )

    return asyncio.run(go())


def test_a_daemon_does_not_replicate_the_placeholder_of_a_gc_tag_delete(
    registry_factory, tmp_path, daemons
):
    """`nightly` shares v9's digest, so API GC deletes the tag alone: a placeholder pushed
    to it and deleted by digest. The daemon watching the registry sees that push; the
    GC's ledger record makes it our own, so no task copies the placeholder anywhere."""
    port = free_port()
    a = registry_factory("a", **notify_kwargs(port, "a"))
    b = registry_factory("b")
    daemon = DaemonProcess(
        tmp_path / "d",
        port=port,
        config={
            "sites": {"a": site_config(a), "b": site_config(b)},
            "rules": [{"name": "r", "from": "a", "to": ["b"]}],
        },
    )
    daemons.append(daemon)
    daemon.start()
    with Pusher(a.url) as p:
        v9 = p.push_image("app", "v9", [layer_bytes("gcj-v9", 300)])
        p.push_manifest("app", "nightly", v9.raw, v9.media_type)

    def settled() -> bool:
        events = daemon.journal_rows("SELECT COUNT(*) FROM events WHERE state = 'new'")
        open_tasks = daemon.journal_rows(
            "SELECT COUNT(*) FROM tasks WHERE state IN ('pending', 'leased')"
        )
        return events == [(0,)] and open_tasks == [(0,)]

    wait_until(
        lambda: settled() and len(daemon.journal_rows("SELECT id FROM tasks")) >= 2,
        timeout=30,
        what="v9 and nightly replicated",
    )
    assert assert_image_complete(b.url, "app", "nightly") == v9.digest
    journal = Journal(daemon.journal_path)
    try:
        result = api_gc(a, journal)
    finally:
        journal.close()
    assert result.errors == [] and result.deleted_tags == {"app:nightly"}
    # the registry notifies the placeholder's push and its delete; wait until handled
    wait_until(
        lambda: (
            daemon.journal_rows(
                "SELECT COUNT(*) FROM events WHERE site = 'a' AND action = 'delete'"
            )
            >= [(1,)]
            and settled()
        ),
        timeout=30,
        what="the GC's events handled",
    )
    copied = daemon.journal_rows("SELECT DISTINCT digest, state FROM tasks WHERE action = 'copy'")
    assert copied == [(v9.digest, "done")], "only v9's digest was ever copied"
    assert daemon.journal_rows("SELECT COUNT(*) FROM tasks WHERE state = 'dead'") == [(0,)]
    assert assert_image_complete(b.url, "app", "nightly") == v9.digest
