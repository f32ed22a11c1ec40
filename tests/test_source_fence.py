"""Issue 12 item 8: the source is the truth right before a tag is written.

A copy that was started before the source tag was deleted (or moved) must not write
the tag at the target once it is ready to: the delete may have been handled by another
daemon on its own journal (a shared MQTT group), or by nobody yet, so this daemon's
journal alone cannot tell. The copy is held in a real registry's blob upload by a fault
proxy in front of the target while the source tag is deleted; the daemon (run with the
systemd unit's command line) and `sync` (the command line the README shows) must then
end the copy without a single manifest PUT of the tag at the target.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests.harness.daemon import DaemonProcess, image_complete, notify_kwargs, site_config
from tests.harness.fault_proxy import FaultProxy
from tests.harness.images import Pusher, layer_bytes
from tests.harness.registry import Registry
from tests.harness.util import free_port, wait_until

RULE = {"name": "team", "from": "a", "to": ["b"], "repositories": ["team/**"]}
BLOB_PUT = r"^/v2/team/app/blobs/uploads/"  # the last write before the manifest PUT
HOLD = 3.0  # seconds the target holds the blob upload's answer


def held(proxy: FaultProxy) -> bool:
    return any(r.fault == "delay" for r in proxy.records)


def delete_at_source(reg: Registry, repo: str, digest: str) -> None:
    with Pusher(reg.url) as p:
        assert p.http.delete(f"{reg.url}/v2/{repo}/manifests/{digest}").status_code == 202
        assert p.http.head(f"{reg.url}/v2/{repo}/manifests/v1").status_code == 404


def tag_at(reg: Registry, repo: str, tag: str) -> int:
    with Pusher(reg.url) as p:
        return p.http.head(f"{reg.url}/v2/{repo}/manifests/{tag}").status_code


def test_a_daemon_copy_in_flight_when_the_source_tag_is_deleted_writes_nothing(
    registry_factory, proxy_factory, tmp_path, daemons
):
    """Without the re-check the held copy writes the deleted tag back at the target (and
    keeps it there when the delete was another instance's): its journal held no newer
    copy, so it never asked the source."""
    port = free_port()
    a = registry_factory("a", **notify_kwargs(port, "a"))
    b = registry_factory("b")
    target = proxy_factory(b)
    daemon = DaemonProcess(
        tmp_path / "d",
        port=port,
        config={
            "sites": {"a": site_config(a), "b": {**site_config(b), "url": target.url}},
            "rules": [RULE],
        },
    )
    daemons.append(daemon)
    target.delay(HOLD, count=1, method="PUT", path=BLOB_PUT)
    daemon.start()
    with Pusher(a.url) as p:
        img = p.push_image("team/app", "v1", [layer_bytes("fence-deleted", 3000)])
    wait_until(lambda: held(target), timeout=30, what="the copy held in its blob upload")
    delete_at_source(a, "team/app", img.digest)

    def copies() -> list[tuple]:
        return daemon.journal_rows(
            "SELECT state, last_error FROM tasks WHERE action='copy' AND tag='v1'"
        )

    wait_until(
        lambda: copies() and all(state not in ("pending", "leased") for state, _ in copies()),
        timeout=30,
        what="the copy task's verdict",
    )
    assert target.count("PUT", r"/manifests/v1$") == 0, "the deleted tag was written back"
    assert tag_at(b, "team/app", "v1") == 404
    [(state, error)] = copies()
    assert state == "cancelled" and "team/app:v1" in (error or ""), (state, error)


@pytest.mark.parametrize("from_store", [False, True], ids=["api", "store"])
def test_a_sync_copy_in_flight_when_the_source_tag_is_deleted_writes_nothing(
    registry_factory, proxy_factory, tmp_path, from_store
):
    """`sync` plans from what it listed; a tag deleted at the source between the plan and
    the copy's tag write is not resurrected at the target (the next pass deletes it). A
    source with `storage:` answers from its store, without a HEAD."""
    a, b = registry_factory("a"), registry_factory("b")
    source, target = proxy_factory(a), proxy_factory(b)
    store = {"storage": str(a.storage)} if from_store else {}
    with Pusher(a.url) as p:
        img = p.push_image("team/app", "v1", [layer_bytes("sync-fence", 3000)])
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "journal": str(tmp_path / "journal.db"),
                "sites": {
                    "a": {"url": source.url, "insecure": True, **store},
                    "b": {"url": target.url, "insecure": True},
                },
                "rules": [{**RULE, "deletes": True}],
            }
        )
    )
    target.delay(HOLD, count=1, method="PUT", path=BLOB_PUT)
    run = subprocess.Popen(
        [sys.executable, "-m", "replicator", "sync", "-c", str(config), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: held(target), timeout=30, what="the copy held in its blob upload")
        delete_at_source(a, "team/app", img.digest)
        out, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    report = json.loads(out)
    assert target.count("PUT", r"/manifests/v1$") == 0, "the deleted tag was written back"
    assert tag_at(b, "team/app", "v1") == 404
    assert report["copied"] == 0 and report["superseded"] == 1, (report, err)
    assert source.count("HEAD", r"/manifests/v1$") == (0 if from_store else 2)


def test_a_daemon_copy_asks_the_source_once_before_its_tag_write(
    registry_factory, proxy_factory, tmp_path, daemons
):
    """The price of the re-check: one HEAD of the tag at the source per copied tag, and
    no more (a push's event arrives after distribution wrote the tag, so the settle
    time's repeated HEADs are not spent on an ordinary push)."""
    port = free_port()
    a = registry_factory("a", **notify_kwargs(port, "a"))
    b = registry_factory("b")
    source = proxy_factory(a)
    daemon = DaemonProcess(
        tmp_path / "d",
        port=port,
        config={
            "sites": {"a": {**site_config(a), "url": source.url}, "b": site_config(b)},
            "rules": [RULE],
        },
    )
    daemons.append(daemon)
    daemon.start()
    with Pusher(a.url) as p:
        img = p.push_image("team/app", "v1", [layer_bytes("fence-price", 3000)])
    wait_until(
        lambda: (
            image_complete(b, "team/app", "v1", img.digest)
            and daemon.journal_rows("SELECT state FROM tasks") == [("done",)]
        ),
        timeout=30,
        what="the copy done",
    )
    assert source.count("HEAD", r"/manifests/v1$") == 1
    # besides the image's three cosign tags, asked as before (copy.py _copy_cosign_tags)
    assert source.count("HEAD", r"/manifests/") == 1 + 3
    assert source.count("HEAD", r"/manifests/sha256-[0-9a-f]{64}\.(sig|att|sbom)$") == 3
