"""Periodic reconcile as the daemon's safety net: real registries that send no webhooks
at all, a real daemon process, and the journal's `sync_runs` as the record of what ran
when. Completion and run counts are polled with deadlines, never slept for.
"""

from __future__ import annotations

import itertools
import signal

import pytest

from tests.harness.daemon import DaemonProcess, image_complete, site_config
from tests.harness.images import Pusher, layer_bytes
from tests.harness.util import wait_until


def runs(daemon: DaemonProcess, rule: str) -> list[tuple[float, float | None, str]]:
    return daemon.journal_rows(
        "SELECT started_at, finished_at, state FROM sync_runs "
        "WHERE rule = ? ORDER BY started_at, id",
        (rule,),
    )


def test_a_push_nobody_announced_arrives_through_reconcile_alone(
    registry_factory, tmp_path, daemons
):
    a = registry_factory("a")  # no notifications configured: the daemon hears nothing
    b = registry_factory("b")
    daemon = DaemonProcess(
        tmp_path / "d",
        config={
            "sites": {"a": site_config(a), "b": site_config(b)},
            "rules": [
                {
                    "name": "team",
                    "from": "a",
                    "to": ["b"],
                    "repositories": ["team/**"],
                    "interval": "1s",
                }
            ],
        },
    )
    daemons.append(daemon)
    daemon.start()
    with Pusher(a.url) as p:
        img = p.push_image("team/quiet", "v1", [layer_bytes("quiet", 3000)])
        p.push_image("other/ignored", "v1", [layer_bytes("ignored", 100)])
    wait_until(
        lambda: image_complete(b, "team/quiet", "v1", img.digest),
        timeout=20,
        what="team/quiet:v1 replicated by the periodic reconcile",
    )
    with Pusher(b.url) as p:
        assert p.tags("other/ignored") == []
    # nothing came through the event path: no webhook, no task
    assert daemon.journal_rows("SELECT COUNT(*) FROM events") == [(0,)]
    assert daemon.journal_rows("SELECT COUNT(*) FROM tasks") == [(0,)]
    done = [r for r in runs(daemon, "team") if r[2] == "done"]
    assert done, "no finished reconcile run journaled"
    # a later re-tag at the source is picked up by a later pass as well
    with Pusher(a.url) as p:
        raw = p.get_manifest("team/quiet", "v1").content
        p.push_manifest("team/quiet", "v2", raw, "application/vnd.oci.image.manifest.v1+json")
    wait_until(
        lambda: image_complete(b, "team/quiet", "v2", img.digest),
        timeout=20,
        what="team/quiet:v2 replicated by a later reconcile",
    )


@pytest.mark.slow
def test_reconcile_of_a_rule_never_runs_twice_at_once(
    registry_factory, proxy_factory, tmp_path, daemons
):
    """Runs slower than the interval (the source's catalog answers after 2.5 s, against an
    interval of 1 s), and a SIGHUP reload in the middle of one: the journaled runs of the
    rule must still form a sequence of disjoint [started_at, finished_at] intervals."""
    a = registry_factory("a")
    b = registry_factory("b")
    proxy = proxy_factory(a)
    with Pusher(a.url) as p:
        img = p.push_image("team/slow", "v1", [layer_bytes("slow", 1000)])
    slow = 2.5
    proxy.delay(slow, count=3, method="GET", path=r"^/v2/_catalog")
    daemon = DaemonProcess(
        tmp_path / "d",
        config={
            "sites": {"a": {**site_config(a), "url": proxy.url}, "b": site_config(b)},
            "rules": [
                {
                    "name": "team",
                    "from": "a",
                    "to": ["b"],
                    "repositories": ["team/**"],
                    "interval": "1s",
                }
            ],
        },
    )
    daemons.append(daemon)
    daemon.start()

    # reload while the second (slow) run is in progress
    wait_until(
        lambda: len(runs(daemon, "team")) >= 2 and runs(daemon, "team")[-1][2] == "running",
        timeout=20,
        what="a second reconcile run in progress",
    )
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: "configuration reloaded" in daemon.log(), timeout=10)
    # then let several more runs (slow and fast) go by
    wait_until(
        lambda: sum(1 for r in runs(daemon, "team") if r[1] is not None) >= 6,
        timeout=40,
        what="six finished reconcile runs",
    )
    assert image_complete(b, "team/slow", "v1", img.digest)

    history = runs(daemon, "team")
    finished = [r for r in history if r[1] is not None]
    assert any(end - start >= slow * 0.9 for start, end, _ in finished), (
        f"no run was slower than the interval: {history}"
    )
    for (s1, e1, st1), (s2, _e2, _st2) in itertools.pairwise(history):
        assert e1 is not None, f"a run never finished ({st1}) yet another started: {history}"
        assert e1 <= s2, f"runs overlap: [{s1}, {e1}] and one started at {s2}"
    # at most the newest run may still be going, and the reload interrupted none
    assert all(state != "running" for _, _, state in history[:-1])
    assert all(state == "done" for _, end, state in history if end is not None), history
