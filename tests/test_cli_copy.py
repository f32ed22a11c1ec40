"""`registry-replicator copy` as an operator runs it: exit codes, --json, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.harness.images import Pusher, assert_image_complete, layer_bytes
from tests.harness.util import free_port


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "replicator", *args], capture_output=True, text=True, timeout=120
    )


def test_copy_json_then_second_run_skips(two_registries):
    src, dst = two_registries
    with Pusher(src.url) as p:
        img = p.push_image("team/app", "v1", [layer_bytes("a", 5000), layer_bytes("b", 10)])
    out = cli("copy", "--insecure", "--json", f"{src.host}/team/app:v1", f"{dst.host}/mirror/app")
    assert out.returncode == 0, out.stderr
    first = json.loads(out.stdout)
    for key in (
        "copied",
        "skipped",
        "failed",
        "blobs_uploaded",
        "blobs_mounted",
        "blobs_existing",
        "bytes_uploaded",
    ):
        assert key in first
    assert first["copied"] == 1 and first["blobs_uploaded"] == 3
    assert assert_image_complete(dst.url, "mirror/app", "v1") == img.digest
    again = json.loads(
        cli(
            "copy", "--insecure", "--json", f"{src.host}/team/app:v1", f"{dst.host}/mirror/app"
        ).stdout
    )
    assert again["skipped"] == 1 and again["blobs_uploaded"] == 0 and again["bytes_uploaded"] == 0
    by_digest = cli(
        "copy", "--insecure", f"{src.host}/team/app@{img.digest}", f"{dst.host}/other/app"
    )
    assert by_digest.returncode == 0, by_digest.stderr
    assert assert_image_complete(dst.url, "other/app", img.digest) == img.digest


def test_bad_reference_is_a_usage_error():
    for bad in (
        "not a ref",
        "127.0.0.1:5000/UPPER/case:v1",
        "127.0.0.1:5000/app@sha256:xyz",
        "http://127.0.0.1:5000/app:v1",
        "oci:/tmp/layout:v1",
        # "app:v1" is no longer refused: it is Docker Hub's docker.io/library/app:v1
        # (issue 13), asserted in test_refs_dockerhub.py.
    ):
        out = cli("copy", "--insecure", bad, "127.0.0.1:5000/x/y")
        assert out.returncode == 2, (bad, out.stderr)
        assert "invalid reference" in out.stderr or "invalid repository" in out.stderr, out.stderr


def test_unknown_registry_fails_naming_it(registry):
    port = free_port()
    out = cli(
        "copy",
        "--insecure",
        "--retries",
        "1",
        f"127.0.0.1:{port}/team/app:v1",
        f"{registry.host}/team/app",
    )
    assert out.returncode == 1
    assert f"127.0.0.1:{port}" in out.stderr
    assert "Traceback" not in out.stderr


def test_missing_tag_fails_with_exit_1(two_registries):
    src, dst = two_registries
    out = cli("copy", "--insecure", f"{src.host}/team/none:v1", f"{dst.host}/team/none")
    assert out.returncode == 1
    assert "team/none" in out.stderr and "v1" in out.stderr


def test_help_explains():
    out = cli("copy", "--help")
    assert out.returncode == 0
    assert "Exit status" in out.stdout and "--platform" in out.stdout


def test_reference_grammar_rejects_trailing_newlines():
    import pytest

    from replicator.errors import UsageError
    from replicator.manifest import is_digest
    from replicator.refs import parse_ref

    assert not is_digest("sha256:" + "a" * 64 + "\n")
    for bad in ("127.0.0.1:5000/app\n:v1", "127.0.0.1:5000/app:v1\n"):
        with pytest.raises(UsageError):
            parse_ref(bad)
