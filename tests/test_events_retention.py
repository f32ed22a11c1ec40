"""The events table stays the size of the registry's content, not of its traffic: pulls are
counted, not stored one by one unless a policy reads pull times; handled events past the
retention are pruned without changing any answer a reader (GC) gets from them."""

from __future__ import annotations

import pytest

from replicator.config import config_from_dict
from replicator.errors import ConfigError
from replicator.events import RegistryEvent
from replicator.journal import Journal
from replicator.journal import events as events_module
from tests.harness.journal import sql

OCI = "application/vnd.oci.image.manifest.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
A = "sha256:" + "a" * 64
B = "sha256:" + "b" * 64
C = "sha256:" + "c" * 64
DAY = 86400.0
NOW = 1_700_000_000.0


def ev(id_: str, action: str, t: float, **kw: object) -> RegistryEvent:
    manifest = kw.pop("manifest", True)
    return RegistryEvent(
        id=id_,
        site="a",
        action=action,  # type: ignore[arg-type]
        repository="team/app",
        occurred_at=t,
        media_type=OCI if manifest else LAYER,
        is_manifest=bool(manifest),
        **kw,  # type: ignore[arg-type]
    )


def answers(journal: Journal) -> list[dict]:
    """What any reader can learn: the earliest and latest time of each object's events."""
    return sql(
        journal,
        "SELECT action, tag, digest, min(coalesce(occurred_at, received_at)) AS first, "
        "max(coalesce(occurred_at, received_at)) AS last FROM events "
        "WHERE is_manifest = 1 OR action = 'delete' GROUP BY action, tag, digest "
        "ORDER BY action, tag, digest",
    )


@pytest.fixture
def journal(tmp_path):
    j = Journal(tmp_path / "j.db")
    yield j
    j.close()


@pytest.mark.parametrize("window", [events_module.PRUNE_WINDOW, 1, 3])
async def test_prune_removes_what_no_reader_needs_and_keeps_every_answer(
    journal, monkeypatch, window
):
    monkeypatch.setattr(events_module, "PRUNE_WINDOW", window)
    old = NOW - 10 * DAY
    handled = [
        ev("p1", "push", old + 1, tag="v1", digest=A),
        ev("p2", "push", old + 2, tag="v1", digest=A),
        ev("p3", "push", old + 3, tag="v1", digest=A),
        ev("b1", "push", old + 1, digest=B, manifest=False),  # a layer upload
        ev("m1", "mount", old + 1, digest=B, manifest=False),
        ev("u1", "pull", old + 1, digest=A),
        ev("u2", "pull", old + 2, digest=A),
        ev("u3", "pull", old + 3, digest=A),
        ev("d1", "delete", old + 1, tag="v0"),
        ev("d2", "delete", old + 2, digest=C, manifest=False),  # by digest: no media type
    ]
    await journal.events.record(handled, received_at=old + 5)
    await journal.events.record(
        [ev("p4", "push", NOW - 3600, tag="v1", digest=A)], received_at=NOW - 3600
    )
    await journal.events.mark([("a", e.id) for e in handled] + [("a", "p4")], "dispatched")
    await journal.events.record([ev("n1", "push", old, tag="v2", digest=C)], received_at=old)
    before = answers(journal)
    first_pushes = await journal.events.first_pushes("a", "team/app")
    last_pulls = await journal.events.last_pulls("a", "team/app")

    assert await journal.events.prune(7 * DAY, now=NOW) == 5
    left = {r["id"] for r in sql(journal, "SELECT id FROM events")}
    # p2, p3 (between p1 and the recent p4), u2, and the layer upload and mount go;
    # the still-new n1 stays whatever its age
    assert left == {"p1", "p4", "u1", "u3", "d1", "d2", "n1"}
    assert answers(journal) == before
    # GC looks these up by manifest digest (a layer's push time is nobody's question)
    pushes_after = await journal.events.first_pushes("a", "team/app")
    assert {d: pushes_after[d] for d in (A, C)} == {d: first_pushes[d] for d in (A, C)}
    assert await journal.events.last_pulls("a", "team/app") == last_pulls
    assert await journal.events.prune(7 * DAY, now=NOW) == 0


async def test_nothing_inside_the_retention_is_pruned(journal):
    recent = [ev(f"p{i}", "push", NOW - 3600 + i, tag="v1", digest=A) for i in range(5)]
    await journal.events.record(recent, received_at=NOW - 3600)
    await journal.events.mark([("a", e.id) for e in recent], "dispatched")
    assert await journal.events.prune(7 * DAY, now=NOW) == 0
    assert len(sql(journal, "SELECT id FROM events")) == 5


async def test_pulls_are_counted_and_kept_as_rows_only_when_asked(journal):
    events = journal.events
    events.keep_pull_rows = False
    pulls = [ev("u1", "pull", NOW, digest=A), ev("l1", "pull", NOW, digest=B, manifest=False)]
    assert await events.record(pulls, received_at=NOW) == pulls
    assert sql(journal, "SELECT id FROM events") == []  # not stored one by one
    assert await events.pull_counts() == [
        {"site": "a", "repository": "team/app", "manifests": 1, "blobs": 1, "last_pulled_at": NOW}
    ]

    events.keep_pull_rows = True  # a GC policy uses pulled_within
    later = [
        ev("u2", "pull", NOW + 5, digest=A),
        ev("l2", "pull", NOW + 5, digest=B, manifest=False),
    ]
    assert await events.record(later, received_at=NOW + 5) == later
    assert await events.record([later[0]], received_at=NOW + 6) == []  # redelivered: not news
    assert [r["id"] for r in sql(journal, "SELECT id FROM events")] == ["u2"]  # no layer rows
    assert await events.last_pulls("a", "team/app") == {A: NOW + 5}
    [counts] = await events.pull_counts("a")
    assert (counts["manifests"], counts["blobs"], counts["last_pulled_at"]) == (2, 2, NOW + 5)
    assert await events.pull_counts("elsewhere") == []


def test_events_retention_is_validated_with_its_path():
    base = {"sites": {"a": {"url": "http://127.0.0.1:1", "insecure": True}}}
    assert config_from_dict(base).events_retention == 7 * DAY
    assert config_from_dict({**base, "events_retention": "30d"}).events_retention == 30 * DAY
    for bad, words in (("10m", "at least 1h"), (3600, "needs a unit"), ("soon", "invalid")):
        with pytest.raises(ConfigError) as err:
            config_from_dict({**base, "events_retention": bad})
        assert "events_retention" in str(err.value) and words in str(err.value), err.value


def test_the_readme_distribution_snippet_runs_as_the_readme_says(tmp_path, registry_factory):
    """The README's `notifications` block on real distribution 2.8.2: accepted, pushes are
    sent, and -- as the README warns -- 2.8 still sends pulls despite `ignore.actions`
    (ordered: the pull is delivered before a later push). A distribution that honours it
    fails this test: then the README's warning must go."""
    import re
    import time
    from pathlib import Path

    import httpx
    import yaml

    from tests.harness.images import Pusher, layer_bytes
    from tests.harness.webhook_sink import WebhookSink

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if "ignore:" in b)
    [endpoint] = yaml.safe_load(block)["notifications"]["endpoints"]
    assert endpoint["ignore"] == {"actions": ["pull"]}
    assert "2.8 accepts the\nsetting but still sends pulls" in readme
    sink = WebhookSink()
    try:
        endpoint = {**endpoint, "url": sink.url, "headers": {}, "backoff": "200ms"}
        reg = registry_factory(
            "quiet",
            notify_url=sink.url,
            extra_config={"notifications": {"endpoints": [endpoint]}},
        )
        with Pusher(reg.url) as p:
            first = p.push_image("team/app", "v1", [layer_bytes("readme", 300)])
            accept = {"Accept": first.media_type}
            httpx.get(f"{reg.url}/v2/team/app/manifests/v1", headers=accept).raise_for_status()
            p.push_image("team/app", "v2", [layer_bytes("after", 300)])
        deadline = time.monotonic() + 30
        while not any(e.get("target", {}).get("tag") == "v2" for e in sink.snapshot()):
            assert time.monotonic() < deadline, sink.snapshot()
            time.sleep(0.05)
        actions = [e["action"] for e in sink.snapshot()]
        assert "push" in actions and "pull" in actions, actions
    finally:
        sink.close()
