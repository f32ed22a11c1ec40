"""Immutable-tag fast path: tags the journal knows are in place cost the target no request."""

from __future__ import annotations

from replicator.blob_index import BlobIndex
from replicator.clients import ClientPool
from replicator.config import config_from_dict
from replicator.copy import CopyEngine
from replicator.journal import Journal
from replicator.sync import Reconciler
from tests.harness.images import Pusher, assert_image_complete, layer_bytes


async def test_second_pass_sends_no_request_for_immutable_tags(two_registries, tmp_path):
    src, dst = two_registries
    with Pusher(src.url) as p:
        for tag in ("v1", "v2", "latest"):
            p.push_image("team/app", tag, [layer_bytes(tag, 200)])
    config = config_from_dict(
        {
            "journal": str(tmp_path / "journal.db"),
            "sites": {
                "a": {"url": src.url, "insecure": True},
                "b": {"url": dst.url, "insecure": True},
            },
            "rules": [
                {
                    "name": "releases",
                    "from": "a",
                    "to": "b",
                    "tags": {"include": "v*"},
                    "immutable_tags": ["v*"],
                },
                {
                    "name": "moving",
                    "from": "a",
                    "to": "b",
                    "tags": {"include": "latest"},
                    "immutable_tags": ["v*"],
                },
            ],
        }
    )
    journal = Journal(config.journal)
    try:
        async with ClientPool(config) as pool:
            engine = CopyEngine(BlobIndex(journal))

            async def run(*names: str):
                report = await Reconciler(config, journal, pool, engine).run(list(names))
                assert report.failures == []
                return report

            first = await run("releases", "moving")
            assert first.stats.copied == 3
            again = await run("releases")
            assert again.target_requests == {"b": 0}
            assert [a.kind for a in again.actions] == ["up-to-date", "up-to-date"]
            assert (await run("moving")).target_requests == {"b": 1}  # one HEAD for latest

            # A tag the target never reported (pushed there by someone else) is HEADed once,
            # then trusted; a source that moves an "immutable" tag anyway is still noticed.
            with Pusher(src.url) as p:
                p.push_image("team/app", "v3", [layer_bytes("v3", 200)])
                moved = p.push_image("team/app", "v1", [layer_bytes("v1-moved", 200)])
            with Pusher(dst.url) as p:
                p.push_image("team/app", "v3", [layer_bytes("v3", 200)])
            third = await run("releases")
            assert third.target_requests["b"] >= 2 and third.stats.copied == 1
            assert assert_image_complete(dst.url, "team/app", "v1") == moved.digest
            assert (await run("releases")).target_requests == {"b": 0}
    finally:
        journal.close()
