"""The daemon's event path for deletes and `latest: N`, end to end (issue 11, cases 1, 2, 4).

Real registries notify a real daemon process. A distribution v3-style tag delete
(one webhook naming only the tag) is produced by deleting the tag through the
tag-DELETE front (tests/harness/tag_delete_front.py) and posting the webhook v3 would
send; distribution 2.8 itself cannot delete a tag by name.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from tests.harness.daemon import DaemonProcess, image_complete, notify_kwargs, site_config
from tests.harness.images import Pusher, layer_bytes
from tests.harness.tag_delete_front import tag_delete_front
from tests.harness.util import free_port, wait_until


def tag_delete_webhook(
    daemon: DaemonProcess, site: str, repo: str, tag: str, when: datetime | None = None
) -> str:
    event_id = str(uuid.uuid4())
    body = {
        "events": [
            {
                "id": event_id,
                "timestamp": (when or datetime.now(UTC)).isoformat(),
                "action": "delete",
                "target": {"repository": repo, "tag": tag},
            }
        ]
    }
    resp = httpx.post(
        f"{daemon.url}/events/{site}",
        headers={
            "Authorization": "Bearer hook-token-for-tests",
            "Content-Type": "application/vnd.docker.distribution.events.v1+json",
        },
        content=json.dumps(body).encode(),
    )
    assert resp.status_code in (200, 202), resp.text
    return event_id


def tags(url: str, repo: str = "team/app") -> list[str]:
    with Pusher(url) as p:
        return sorted(p.tags(repo))


@pytest.fixture
def pair(registry_factory, tmp_path):
    port = free_port()
    a = registry_factory("a", **notify_kwargs(port, "a"))
    b = registry_factory("b", **notify_kwargs(port, "b"))

    def make(rule: dict) -> DaemonProcess:
        return DaemonProcess(
            tmp_path / "d",
            port=port,
            config={
                "sites": {"a": site_config(a), "b": site_config(b)},
                "rules": [{"name": "r", "from": "a", "to": ["b"], **rule}],
            },
        )

    made: list[DaemonProcess] = []

    def start(rule: dict) -> DaemonProcess:
        daemon = make(rule)
        made.append(daemon)
        return daemon.start()

    yield a, b, start
    for daemon in made:
        daemon.stop()


def done_deletes(daemon: DaemonProcess, tag: str) -> int:
    rows = daemon.journal_rows(
        "SELECT COUNT(*) FROM tasks WHERE action = 'delete' AND tag = ? AND state = 'done'",
        (tag,),
    )
    return int(rows[0][0])


def test_a_tag_delete_event_removes_that_tag_only_and_only_once_the_source_lost_it(pair):
    a, b, start = pair
    daemon = start({"deletes": True})
    with Pusher(a.url) as p:
        img = p.push_image("team/app", "latest", [layer_bytes("sib", 500)])
        p.push_manifest("team/app", "v1", img.raw, img.media_type)
    wait_until(
        lambda: tags(b.url) == ["latest", "v1"], timeout=30, what="both tags replicated to b"
    )
    # case 2: a forged/stale delete while the source still holds v1
    tag_delete_webhook(daemon, "a", "team/app", "v1")
    wait_until(lambda: done_deletes(daemon, "v1") == 1, timeout=30, what="delete task handled")
    assert tags(b.url) == ["latest", "v1"]
    # case 1: v1 really deleted at the source, by tag; latest stays everywhere
    front = tag_delete_front(a)
    try:
        assert httpx.delete(f"{front.url}/v2/team/app/manifests/v1").status_code == 202
    finally:
        front.stop()
    tag_delete_webhook(daemon, "a", "team/app", "v1")
    wait_until(lambda: tags(b.url) == ["latest"], timeout=30, what="v1 deleted at b")
    assert image_complete(b, "team/app", "latest", img.digest)
    stones = daemon.journal_rows(
        "SELECT site, tag, origin FROM tombstones WHERE repository = 'team/app' ORDER BY id"
    )
    assert ("a", "v1", "observed") in stones and ("b", "v1", "performed") in stones


def test_event_path_honours_latest_n(pair):
    """Case 4: a backport v1.0.5 under {semver: '>=1.0.0', latest: 3} is not replicated."""
    a, b, start = pair
    daemon = start({"tags": {"semver": ">=1.0.0", "latest": 3}})
    with Pusher(a.url) as p:
        for tag in ("v1.1.0", "v1.2.0", "v2.0.0"):
            p.push_image("team/app", tag, [layer_bytes(tag, 200)])
    wait_until(
        lambda: tags(b.url) == ["v1.1.0", "v1.2.0", "v2.0.0"], timeout=30, what="three tags at b"
    )
    with Pusher(a.url) as p:
        p.push_image("team/app", "v1.0.5", [layer_bytes("backport", 200)])
        newest = p.push_image("team/app", "v2.1.0", [layer_bytes("newest", 200)])
    # events are planned in arrival order: once v2.1.0 is at b, v1.0.5 was decided
    wait_until(
        lambda: image_complete(b, "team/app", "v2.1.0", newest.digest), timeout=30, what="v2.1.0"
    )
    assert "v1.0.5" not in tags(b.url)
    assert daemon.journal_rows("SELECT id FROM tasks WHERE tag = 'v1.0.5'") == []


def test_a_delete_webhook_from_a_clock_ahead_is_tombstoned_at_our_time(pair):
    """Red-team finding 1: the webhook's timestamp is the registry's clock. A tombstone
    stamped 10 minutes ahead would look like a delete during an incident that began
    since; the daemon records it no later than it receives it."""
    _a, _b, start = pair
    daemon = start({"deletes": True})
    tag_delete_webhook(daemon, "a", "team/app", "v1", datetime.now(UTC) + timedelta(minutes=10))
    query = "SELECT at FROM tombstones WHERE site = 'a' AND tag = 'v1'"
    wait_until(lambda: daemon.journal_rows(query), timeout=30, what="the delete tombstoned")
    [(at,)] = daemon.journal_rows(query)
    assert at <= time.time()


def test_an_observed_delete_is_stamped_with_our_clock_not_the_registrys(pair):
    """Red team 2's clock note: a registry clock 10 minutes behind stamped the observed
    tombstone before the ledger's copy of the tag (our clock), so the delete looked
    older than the copy it undid. It is stamped when we handle the webhook."""
    a, b, start = pair
    daemon = start({"deletes": True})
    with Pusher(a.url) as p:
        img = p.push_image("team/app", "v1", [layer_bytes("clock", 500)])
    wait_until(lambda: tags(b.url) == ["v1"], timeout=30, what="v1 replicated to b")
    front = tag_delete_front(a)
    try:
        assert httpx.delete(f"{front.url}/v2/team/app/manifests/v1").status_code == 202
    finally:
        front.stop()
    posted = time.time()
    tag_delete_webhook(
        daemon, "a", "team/app", "v1", when=datetime.now(UTC) - timedelta(minutes=10)
    )

    def observed() -> list:
        return daemon.journal_rows(
            "SELECT at FROM tombstones WHERE site = 'a' AND tag = 'v1' AND origin = 'observed'"
        )

    wait_until(lambda: bool(observed()), timeout=30, what="observed tombstone recorded")
    copied = daemon.journal_rows(
        "SELECT at FROM replicated WHERE target_site = 'b' AND digest = ?", (img.digest,)
    )
    (at,) = observed()[0]
    assert at >= posted - 1  # our clock (a second of slack for float rounding only)
    assert at > copied[0][0]  # later than the copy it undoes, as it really was
