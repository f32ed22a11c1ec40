"""A delete task is fenced by its lease like a copy's manifest write: a worker whose
lease expired and went to another worker (it stalled: GC pause, SIGSTOP, a slow HEAD)
deletes nothing at the target."""

from __future__ import annotations

import asyncio
import time

import yaml

from replicator.journal import TaskSpec, WorkQueue
from tests.harness.images import Pusher, layer_bytes
from tests.harness.util import free_port


async def test_a_delete_whose_lease_went_to_another_worker_deletes_nothing(tmp_path, registry):
    from replicator.daemon.service import Daemon

    with Pusher(registry.url) as p:
        p.push_image("team/app", "v1", [layer_bytes("fence", 300)])
    config = {
        "journal": str(tmp_path / "journal.db"),
        "sites": {
            "src": {"url": f"http://127.0.0.1:{free_port()}", "insecure": True},
            "dst": {"url": registry.url, "insecure": True},
        },
        "rules": [{"name": "r", "from": "src", "to": "dst"}],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    daemon = Daemon(path, instance_id="stalled")
    try:
        await daemon.queue.enqueue([TaskSpec("r", "delete", "src", "dst", "team/app", tag="v1")])
        [task] = await daemon.queue.lease(1, lease_seconds=0.05)
        other = WorkQueue(daemon.journal, "live")
        deadline = time.monotonic() + 10
        while not await other.requeue_expired():
            assert time.monotonic() < deadline, "the stalled lease never expired"
            await asyncio.sleep(0.02)
        assert [t.id for t in await other.lease(1)] == [task.id]

        rule = daemon._rule("r")
        assert rule is not None
        # the stalled worker wakes up
        await daemon._delete(task, rule, daemon.pool["src"], daemon.pool["dst"])

        assert await daemon.pool["dst"].head_manifest("team/app", "v1") is not None
        row = await other.get(task.id)
        assert row is not None and (row.state, row.lease_owner) == ("leased", "live")
    finally:
        await daemon.pool.aclose()
        daemon.journal.close()
