"""`sync` from sources without a catalog, and how failures are counted.

Public registries serve no `_catalog` to their users (Docker Hub 401, GHCR/Quay
404): a front in front of a real registry answers `_catalog` like them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.harness.hostile_front import HostileFront, Reply
from tests.harness.images import Pusher, assert_image_complete, layer_bytes
from tests.test_sync import cli

_UNAUTHORIZED = json.dumps(
    {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]}
).encode()


def _config(tmp_path: Path, sites: dict[str, str], rules: list[dict]) -> Path:
    cfg = {
        "journal": str(tmp_path / "journal.db"),
        "sites": {name: {"url": url, "insecure": True} for name, url in sites.items()},
        "rules": rules,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _no_catalog(front: HostileFront, status: int = 401, body: bytes = _UNAUTHORIZED) -> None:
    front.answer("GET", r"^/v2/_catalog", Reply(status, {"Content-Type": "application/json"}, body))


@pytest.fixture
def catalogless(registry_factory):
    """A source registry with team/a, team/b (tags v1, v2) behind a front without a catalog."""
    src = registry_factory("src")
    with Pusher(src.url) as p:
        for repo in ("team/a", "team/b"):
            for tag in ("v1", "v2"):
                p.push_image(repo, tag, [layer_bytes(f"{repo}:{tag}", 500)])
    front = HostileFront(src.port)
    _no_catalog(front)
    with front:
        yield front


def test_literal_repositories_replicate_from_a_source_without_catalog(
    catalogless, registry_factory, tmp_path
):
    dst = registry_factory("dst")
    config = _config(
        tmp_path,
        {"hub": catalogless.url, "dst": dst.url},
        [{"name": "mirror", "from": "hub", "to": ["dst"], "repositories": ["team/a", "team/b"]}],
    )
    out = cli("sync", "-c", str(config), "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert (result["copied"], result["failed"], result["failed_listings"]) == (4, 0, 0)
    assert catalogless.requests(path=r"_catalog") == []  # tag listing alone
    for repo in ("team/a", "team/b"):
        for tag in ("v1", "v2"):
            assert_image_complete(dst.url, repo, tag)


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (401, _UNAUTHORIZED),
        (404, b'{"errors":[{"code":"NOT_FOUND","message":"not found"}]}'),
        (200, b'{"repositories":[],"errors":[{"code":"DENIED","message":"no catalog"}]}'),
    ],
    ids=["401", "404", "empty-with-error"],
)
def test_globs_on_a_source_without_catalog_say_so_and_literal_names_still_work(
    registry_factory, tmp_path, status, body
):
    src, dst = registry_factory("src"), registry_factory("dst")
    with Pusher(src.url) as p:
        p.push_image("team/a", "v1", [layer_bytes("a", 300)])
    with HostileFront(src.port) as front:
        _no_catalog(front, status, body)
        config = _config(
            tmp_path,
            {"hub": front.url, "dst": dst.url},
            [{"name": "mixed", "from": "hub", "to": ["dst"], "repositories": ["team/a", "x/*"]}],
        )
        out = cli("sync", "-c", str(config), "--json")
    assert out.returncode == 1
    message = out.stderr
    assert "rule mixed" in message and "site hub" in message
    assert "x/*" in message and "need" in message and "literally" in message
    assert "Traceback" not in message
    result = json.loads(out.stdout)
    assert (result["copied"], result["failed"], result["failed_listings"]) == (1, 0, 1)
    assert_image_complete(dst.url, "team/a", "v1")


def test_one_target_down_and_one_repository_failing_keep_going_counted_in_tags(
    catalogless, registry_factory, tmp_path
):
    """Failures count in the unit of successes: tags per target."""
    good = registry_factory("good")
    # team/b's manifests cannot be read at the source: 2 tags fail at both targets.
    catalogless.answer("HEAD", r"^/v2/team/b/manifests/", Reply(500))
    config = _config(
        tmp_path,
        {"hub": catalogless.url, "good": good.url, "down": "http://127.0.0.1:1"},
        [
            {
                "name": "mirror",
                "from": "hub",
                "to": ["good", "down"],
                "repositories": ["team/a", "team/b"],
            }
        ],
    )
    out = cli("sync", "-c", str(config), "--json", "--retries", "0")
    assert out.returncode == 1
    result = json.loads(out.stdout)
    # team/a: 2 tags copied to good, 2 failed at down; team/b: 2 tags x 2 targets failed
    assert result["copied"] == 2
    assert result["failed"] == 2 + 4
    assert result["failed_listings"] == 0
    assert len(result["failures"]) == 2  # one message per failed step
    assert_image_complete(good.url, "team/a", "v1")
    assert_image_complete(good.url, "team/a", "v2")

    text = cli("sync", "-c", str(config), "--retries", "0")
    assert text.returncode == 1
    assert "copied 0, deleted 0, 2 up to date, 0 conflicts, 6 failed;" in text.stdout


def test_a_repository_whose_tags_cannot_be_listed_is_a_failed_listing(
    catalogless, registry_factory, tmp_path
):
    dst = registry_factory("dst")
    catalogless.answer("GET", r"^/v2/team/b/tags/list", Reply(500))
    config = _config(
        tmp_path,
        {"hub": catalogless.url, "dst": dst.url},
        [
            {
                "name": "mirror",
                "from": "hub",
                "to": ["dst"],
                "repositories": ["team/a", "team/b", "team/missing"],
            }
        ],
    )
    out = cli("sync", "-c", str(config), "--retries", "0")
    assert out.returncode == 1
    assert "copied 2, deleted 0, 0 up to date, 0 conflicts, 0 failed (1 listings failed);" in (
        out.stdout
    )
    failed = [line for line in out.stderr.splitlines() if "failed:" in line]
    assert len(failed) == 1 and "team/b" in failed[0]  # a missing literal name is no failure
