"""Work is never stuck and never stale: task leases across crashes, stalls and slow copies.

Real daemon processes run the systemd unit's command line (no `--instance-id`), real
registries notify them, and a fault proxy in front of the source holds one blob read
for longer than a lease. Several daemons share one journal where a test says so: they
are then distinct instances of one installation (slots of its identity).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tests.harness.daemon import DaemonProcess, image_complete, notify_kwargs, site_config
from tests.harness.fault_proxy import FaultProxy
from tests.harness.images import Pusher, layer_bytes
from tests.harness.registry import Registry
from tests.harness.util import free_port, wait_until

RULE = {"name": "team", "from": "a", "to": ["b"], "repositories": ["team/**"]}
BLOB_GET = r"^/v2/team/app/blobs/sha256:"
LEASE = 3.0  # --lease-time in the tests about renewal: short, so they run in seconds


def daemon_for(
    root: Path, sites: dict[str, Any], *, port: int | None = None, **config: Any
) -> DaemonProcess:
    return DaemonProcess(
        root,
        port=port or free_port(),
        config={"sites": sites, "rules": [RULE], **config},
    )


def tasks(daemon: DaemonProcess) -> list[tuple]:
    return daemon.journal_rows(
        "SELECT id, state, digest, lease_owner, lease_until, last_error FROM tasks ORDER BY id"
    )


def holding(daemon: DaemonProcess, proxy: FaultProxy) -> tuple | None:
    """The leased task, once the copy is inside the source read the proxy holds."""
    leased = [t for t in tasks(daemon) if t[1] == "leased"]
    held = any(r.fault == "delay" for r in proxy.records)
    return leased[0] if leased and held else None


def target_digest(reg: Registry, repo: str, tag: str) -> str | None:
    with Pusher(reg.url) as p:
        response = p.http.head(
            f"{reg.url}/v2/{repo}/manifests/{tag}",
            headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
        )
    return response.headers.get("Docker-Content-Digest") if response.status_code == 200 else None


def test_sigkill_mid_copy_then_restart_returns_the_lease_at_once(
    registry_factory, proxy_factory, tmp_path, daemons
):
    """Killed mid-copy and restarted as the unit restarts it: the new process is the same
    instance, so the dead one's lease comes back at start instead of after its 60 s, and
    a push made after the restart reaches the target within seconds."""
    port = free_port()
    a = registry_factory("a", **notify_kwargs(port, "a"))
    b = registry_factory("b")
    source = proxy_factory(a)
    daemon = daemon_for(
        tmp_path / "d", {"a": {**site_config(a), "url": source.url}, "b": site_config(b)}, port=port
    )
    daemons.append(daemon)
    source.delay(30, count=1, method="GET", path=BLOB_GET)
    daemon.start()
    with Pusher(a.url) as p:
        p.push_image("team/app", "v1", [layer_bytes("killed-old", 3000)])
    task = wait_until(lambda: holding(daemon, source), timeout=30, what="the copy in the held read")
    owner = task[3]
    assert owner == daemon.instance_id
    daemon.kill()
    daemon.start()
    assert daemon.instance_id == owner, "a restart of the same installation is a new identity"
    with Pusher(a.url) as p:
        newest = p.push_image("team/app", "v1", [layer_bytes("killed-new", 3000)]).digest
    wait_until(
        lambda: image_complete(b, "team/app", "v1", newest),
        timeout=20,  # the killed process's lease alone would hold the tag for 60 s
        what="the newest push on b, well before the killed process's lease ran out",
    )
    # returned at start, not expired later by the requeue loop
    assert f"1 leases of {owner}'s previous run" in daemon.log()


def test_a_stalled_daemon_loses_its_lease_to_a_live_one_and_never_writes_after(
    registry_factory, proxy_factory, tmp_path, daemons
):
    """Two daemons on one journal. The one holding the task stalls (SIGSTOP, as in a long
    GC pause or a frozen VM) past its lease: the other returns the lease without anyone
    restarting and copies. When the stalled one resumes, it must not write the tag."""
    port = free_port()
    a = registry_factory("a", **notify_kwargs(port, "a"))
    b = registry_factory("b")
    source, target = proxy_factory(a), proxy_factory(b)  # what the stalled daemon sees
    journal = str(tmp_path / "shared.db")
    stalled = daemon_for(
        tmp_path / "stalled",
        {"a": {**site_config(a), "url": source.url}, "b": {**site_config(b), "url": target.url}},
        port=port,
        journal=journal,
    )
    live = daemon_for(
        tmp_path / "live", {"a": site_config(a), "b": site_config(b)}, journal=journal
    )
    for d in (stalled, live):
        d.extra_args = ["--lease-time", str(LEASE)]
        daemons.append(d)
    source.delay(4 * LEASE, count=1, method="GET", path=BLOB_GET)
    stalled.start()
    with Pusher(a.url) as p:
        img = p.push_image("team/app", "v1", [layer_bytes("stalled", 3000)])
    task = wait_until(
        lambda: holding(stalled, source), timeout=30, what="the copy in the held read"
    )
    live.start()
    assert live.instance_id != stalled.instance_id, "two live daemons share an identity"
    assert task[3] == stalled.instance_id
    stalled.signal(19)  # SIGSTOP
    try:
        wait_until(
            lambda: image_complete(b, "team/app", "v1", img.digest) and tasks(live)[0][1] == "done",
            timeout=30,
            what="the live daemon to take the stalled one's expired lease and copy",
        )
    finally:
        stalled.signal(18)  # SIGCONT
    wait_until(
        lambda: f"task {task[0]} lost its lease" in stalled.log(),
        timeout=30,
        what="the resumed daemon to notice its lease is gone",
    )
    assert target.count("PUT", r"/manifests/") == 0, "a worker without its lease wrote a tag"


def test_a_copy_slower_than_its_lease_keeps_it_and_never_writes_an_older_digest_last(
    registry_factory, proxy_factory, tmp_path, daemons
):
    """Issue 12 item 8: the source read takes over three leases. The worker renews its
    lease meanwhile, so the second daemon on the journal does not copy the same task;
    a newer push during the copy queues behind it; and when the slow copy is ready to
    tag, the source tag has moved on, so it writes nothing and the newer task writes
    the newer digest. Without renewal, the slow copy ends last and leaves the older
    digest on the target."""
    port = free_port()
    a = registry_factory("a", **notify_kwargs(port, "a"))
    b = registry_factory("b")
    source = proxy_factory(a)
    journal = str(tmp_path / "shared.db")
    slow = daemon_for(
        tmp_path / "slow",
        {"a": {**site_config(a), "url": source.url}, "b": site_config(b)},
        port=port,
        journal=journal,
    )
    other = daemon_for(
        tmp_path / "other", {"a": site_config(a), "b": site_config(b)}, journal=journal
    )
    for d in (slow, other):
        d.extra_args = ["--lease-time", str(LEASE)]
        daemons.append(d)
    source.delay(4 * LEASE, count=1, method="GET", path=BLOB_GET)
    slow.start()
    with Pusher(a.url) as p:
        older = p.push_image("team/app", "v1", [layer_bytes("slow-old", 3000)]).digest
    first = wait_until(lambda: holding(slow, source), timeout=30, what="the copy in the held read")
    # the first lease's term passes: from here on only renewal keeps the task
    wait_until(lambda: time.time() > first[4] + 0.5, timeout=2 * LEASE, what="the first term")
    other.start()
    with Pusher(a.url) as p:
        newer = p.push_image("team/app", "v1", [layer_bytes("slow-new", 3000)]).digest

    try:
        # the slow worker's own verdict on its copy: the source moved on, nothing written
        wait_until(lambda: tasks(slow)[0][1] == "cancelled", timeout=40, what="the verdict")
    except TimeoutError:
        wait_until(lambda: all(t[1] == "done" for t in tasks(slow)), timeout=30)
        raise AssertionError(
            f"the slow copy was not stopped; b has {target_digest(b, 'team/app', 'v1')} "
            f"(older {older}, newer {newer}); tasks {tasks(slow)}"
        ) from None
    wait_until(
        lambda: (
            image_complete(b, "team/app", "v1", newer)
            and all(t[1] not in ("pending", "leased") for t in tasks(slow))
        ),
        timeout=30,
        what="the newer digest on b and the queue drained",
    )
    current = target_digest(b, "team/app", "v1")
    assert current == newer, f"b has {current}: older {older} was written last"
    state, error = tasks(slow)[0][1], tasks(slow)[0][5] or ""
    assert state == "cancelled" and newer in error, (state, error)
    # renewal kept the task with its first worker: leased once, never lost
    assert slow.journal_rows("SELECT attempts FROM tasks WHERE id=?", (first[0],)) == [(1,)]
    assert "lost its lease" not in slow.log() + other.log()
