"""`sync` against real registries: rules, filters, deletes, overwrite, dry run, crash-resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from replicator.config import config_from_dict
from replicator.planner import plan_target
from tests.harness.images import Pusher, assert_image_complete, layer_bytes
from tests.harness.util import wait_until
from tests.harness.webhook_sink import WebhookSink


def write_config(tmp_path: Path, sites: dict, rules: list[dict]) -> Path:
    cfg = {
        "journal": str(tmp_path / "journal.db"),
        "sites": {name: {"url": reg.url, "insecure": True} for name, reg in sites.items()},
        "rules": rules,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def cli(*args: str, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "replicator", *args],
        capture_output=True,
        text=True,
        timeout=120,
        **kw,
    )


def sync_json(config: Path, *extra: str) -> dict:
    out = cli("sync", "-c", str(config), "--json", *extra)
    assert out.returncode in (0, 1), out.stderr
    result = json.loads(out.stdout)
    result["_rc"] = out.returncode
    return result


def test_multi_rule_config_syncs_one_source_to_two_targets_with_filters(registry_factory, tmp_path):
    src, eu, ap = registry_factory("src"), registry_factory("eu"), registry_factory("ap")
    with Pusher(src.url) as p:
        base = layer_bytes("base", 3000)
        for repo in ("team/api", "team/web", "team/tmp-x", "other/db"):
            for tag in ("v1.0.0", "v1.3.0", "v2.0.0-rc1", "latest", "dev"):
                p.push_image(repo, tag, [base, layer_bytes(f"{repo}{tag}", 200)])
    config = write_config(
        tmp_path,
        {"us": src, "eu": eu, "ap": ap},
        [
            {
                "name": "apps",
                "from": "us",
                "to": ["eu", "ap"],
                "repositories": ["team/**"],
                "exclude_repositories": ["team/tmp-*"],
                "tags": {"include": ["v*", "latest"], "exclude": ["*-rc*"]},
            },
            {
                "name": "db",
                "from": "us",
                "to": ["eu"],
                "repositories": ["other/*"],
                "tags": {"semver": ">=1.2"},
                "rename": {"prefix": "mirror/"},
            },
        ],
    )
    first = sync_json(config)
    assert first["_rc"] == 0 and first["failed"] == 0
    # apps: 2 repos x 3 tags x 2 targets = 12; db: 1 repo x 1 tag (v1.3.0; rc excluded) = 1
    assert first["copied"] == 13
    for reg in (eu, ap):
        with Pusher(reg.url) as p:
            assert sorted(p.tags("team/api")) == ["latest", "v1.0.0", "v1.3.0"]
            assert p.tags("team/tmp-x") == []
        assert assert_image_complete(reg.url, "team/web", "v1.3.0") == assert_image_complete(
            src.url, "team/web", "v1.3.0"
        )
    with Pusher(eu.url) as p:
        assert p.tags("mirror/other/db") == ["v1.3.0"]
    with Pusher(ap.url) as p:
        assert p.tags("mirror/other/db") == []
    second = sync_json(config)
    assert second["copied"] == 0 and second["skipped"] == 13 and second["blobs_uploaded"] == 0


def test_dry_run_changes_nothing_and_predicts_the_run(two_registries, tmp_path):
    src, dst = two_registries
    with Pusher(src.url) as p:
        for tag in ("v1", "v2"):
            p.push_image("team/app", tag, [layer_bytes(tag, 100)])
    with Pusher(dst.url) as p:
        p.push_image("team/app", "old", [layer_bytes("old", 100)])
    config = write_config(
        tmp_path, {"a": src, "b": dst}, [{"name": "r", "from": "a", "to": ["b"], "deletes": True}]
    )
    before = sorted(p.name for p in dst.storage.rglob("*"))
    plan = sync_json(config, "--dry-run")
    assert plan["dry_run"] and plan["planned_copies"] == 2 and plan["planned_deletes"] == 1
    assert sorted(p.name for p in dst.storage.rglob("*")) == before
    real = sync_json(config)
    assert real["copied"] == plan["planned_copies"] and real["deleted"] == plan["planned_deletes"]
    with Pusher(dst.url) as p:
        assert sorted(p.tags("team/app")) == ["v1", "v2"]


def test_a_regex_tag_filter_copies_what_it_finds_and_deletes_only_what_it_covers(
    two_registries, tmp_path
):
    src, dst = two_registries
    with Pusher(src.url) as p:
        for tag in ("v1.0.0", "v1.0.0-debug", "latest", "build-123"):
            p.push_image("team/app", tag, [layer_bytes(tag, 100)])
    with Pusher(dst.url) as p:  # the target's own tags: one the regex covers, one not
        for tag in ("v0.9.0", "local"):
            p.push_image("team/app", tag, [layer_bytes(tag, 100)])
    config = write_config(
        tmp_path,
        {"a": src, "b": dst},
        [
            {
                "name": "r",
                "from": "a",
                "to": ["b"],
                "deletes": True,
                "tags": {"regex": [r"^v\d+\.\d+\.\d+", "^latest$"], "exclude_regex": ["-debug$"]},
            }
        ],
    )
    plan = sync_json(config, "--dry-run")
    assert sorted(line.split()[1] for line in plan["plan"]) == [
        "a/team/app:latest",
        "a/team/app:v1.0.0",
        "b/team/app:v0.9.0",
    ]
    real = sync_json(config)
    assert real["copied"] == plan["planned_copies"] == 2 and real["deleted"] == 1
    with Pusher(dst.url) as p:
        assert sorted(p.tags("team/app")) == ["latest", "local", "v1.0.0"]


def test_delete_propagation_and_overwrite_protection(two_registries, tmp_path):
    src, dst = two_registries
    with Pusher(src.url) as p:
        p.push_image("team/app", "v1", [layer_bytes("one", 100)])
        v2 = p.push_image("team/app", "v2", [layer_bytes("two", 100)])
    config = write_config(
        tmp_path,
        {"a": src, "b": dst},
        [{"name": "r", "from": "a", "to": ["b"], "deletes": True, "overwrite": False}],
    )
    assert sync_json(config)["copied"] == 2
    # v1 deleted at the source; v2 changed at the target by someone else
    with Pusher(src.url) as p:
        digest = p.get_manifest("team/app", "v1").headers["docker-content-digest"]
        assert p.http.delete(f"{src.url}/v2/team/app/manifests/{digest}").status_code == 202
    with Pusher(dst.url) as p:
        theirs = p.push_image("team/app", "v2", [layer_bytes("theirs", 100)])
    result = sync_json(config)
    assert result["deleted"] == 1 and result["conflicts"] == 1 and result["copied"] == 0
    with Pusher(dst.url) as p:
        assert p.tags("team/app") == ["v2"]
    assert assert_image_complete(dst.url, "team/app", "v2") == theirs.digest != v2.digest


def test_deletes_false_leaves_target_tags(two_registries, tmp_path):
    src, dst = two_registries
    with Pusher(src.url) as p:
        p.push_image("team/app", "v1", [layer_bytes("one", 100)])
    with Pusher(dst.url) as p:
        p.push_image("team/app", "extra", [layer_bytes("x", 100)])
    config = write_config(tmp_path, {"a": src, "b": dst}, [{"name": "r", "from": "a", "to": ["b"]}])
    assert sync_json(config)["deleted"] == 0
    with Pusher(dst.url) as p:
        assert sorted(p.tags("team/app")) == ["extra", "v1"]


def test_killed_sync_resumes_without_reuploading(registry_factory, tmp_path):
    src = registry_factory("src")
    sink = WebhookSink()
    try:
        dst = registry_factory("dst", notify_url=sink.url)
        with Pusher(src.url) as p:
            for r in range(6):
                p.push_image(
                    f"team/app{r}",
                    "v1",
                    [layer_bytes(f"big{r}", 3 * 2**20), layer_bytes(f"small{r}", 100)],
                )
        config = write_config(
            tmp_path, {"a": src, "b": dst}, [{"name": "r", "from": "a", "to": ["b"]}]
        )
        proc = subprocess.Popen(
            [sys.executable, "-m", "replicator", "sync", "-c", str(config), "--parallel", "1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        # kill it once some blobs have landed but not all
        wait_until(lambda: len(sink.blob_events("push")) >= 3, timeout=60, what="first uploads")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        landed = {e["target"]["digest"] for e in sink.blob_events("push")}
        assert len(landed) < 12, "the sync finished before it could be killed"
        sink.clear()
        result = sync_json(config)
        assert result["_rc"] == 0 and result["failed"] == 0
        for r in range(6):
            assert_image_complete(dst.url, f"team/app{r}", "v1")
        again = {e["target"]["digest"] for e in sink.blob_events("push")}
        assert not (again & landed), "a blob that had landed was uploaded again"
    finally:
        sink.close()


def test_unreachable_site_is_named_and_exit_1(registry, tmp_path):
    config = write_config(tmp_path, {"a": registry}, [])
    cfg = yaml.safe_load(config.read_text())
    cfg["sites"]["down"] = {"url": "http://127.0.0.1:1", "insecure": True}
    cfg["rules"] = [{"name": "r", "from": "down", "to": ["a"]}]
    config.write_text(yaml.safe_dump(cfg))
    out = cli("sync", "-c", str(config), "--retries", "1")
    assert out.returncode == 1
    assert "down" in out.stderr and "Traceback" not in out.stderr


def test_planner_is_pure():
    rule = config_from_dict(
        {
            "sites": {
                "a": {"url": "http://x:1", "insecure": True},
                "b": {"url": "http://y:1", "insecure": True},
            },
            "rules": [{"name": "r", "from": "a", "to": ["b"], "deletes": True, "overwrite": False}],
        }
    ).rules[0]
    src = {"v1": "sha256:" + "1" * 64, "v2": "sha256:" + "2" * 64}
    target = {"v1": "sha256:" + "1" * 64, "v2": "sha256:" + "9" * 64}
    every = dict(target) | {
        "gone": "sha256:" + "3" * 64,
        "alias": "sha256:" + "1" * 64,
        "old": "sha256:" + "1" * 64,
    }
    every.pop("alias")
    actions = plan_target(rule, "b", "repo", src, ["v1", "v2"], target, every)
    kinds = {(a.tag, a.kind) for a in actions}
    assert ("v1", "up-to-date") in kinds and ("v2", "conflict") in kinds
    assert ("gone", "delete") in kinds
    # 'old' shares v1's digest: it goes by tag alone, and the manifest v1 needs stays
    assert ("old", "delete") in kinds
    by_tag = {a.tag: a for a in actions}
    assert not by_tag["old"].prune_manifest and by_tag["gone"].prune_manifest


def test_sync_on_a_terminal_shows_an_overall_bar_and_human_sizes(registry_factory, tmp_path):
    """Run as an operator does, on a terminal: a bar counts the tags, the summary reads
    in KiB/MiB instead of a raw byte count."""
    import pty
    import select

    src, dst = registry_factory("src"), registry_factory("dst")
    with Pusher(src.url) as p:
        for tag in ("v1", "v2", "v3"):
            p.push_image("team/app", tag, [layer_bytes(f"app-{tag}", 300_000)])
    config = write_config(
        tmp_path,
        {"a": src, "b": dst},
        [{"name": "r", "from": "a", "to": ["b"], "repositories": ["team/**"]}],
    )
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "replicator", "sync", "-c", str(config)],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={**os.environ, "COLUMNS": "120", "TERM": "xterm"},
    )
    os.close(slave)
    out = b""
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    assert proc.wait(timeout=60) == 0
    os.close(master)
    text = out.decode(errors="replace")
    assert "tags" in text and "3/3" in text, text
    summary = next(line for line in text.splitlines() if "copied 3," in line)
    assert "KiB" in summary and "bytes" not in summary, text
    assert "bytes/s" not in text, text  # the tags bar counts tags, not bytes


def test_dry_run_of_a_platform_filtered_index_predicts_up_to_date(two_registries, tmp_path):
    """Issue 11, case 5: the target holds the filtered index (its own digest), so a dry run
    must say up to date, as the real run finds, not plan a copy it will not make."""
    src, dst = two_registries
    with Pusher(src.url) as p:
        p.push_multiarch("team/multi", "1.0.0", "pf")
    config = write_config(
        tmp_path,
        {"a": src, "b": dst},
        [{"name": "r", "from": "a", "to": ["b"], "platforms": ["linux/amd64"]}],
    )
    first = sync_json(config)
    assert first["_rc"] == 0 and first["copied"] == 1
    plan = sync_json(config, "--dry-run")
    real = sync_json(config)
    assert plan["planned_copies"] == 0 == real["copied"] == real["planned_copies"]
    assert plan["skipped"] == real["skipped"] == 1
