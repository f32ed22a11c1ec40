"""The README's first command, in its short non-interactive form, as CI runs it."""

import subprocess
import sys


def test_demo_quick_replicates_and_collects():
    out = subprocess.run(
        [sys.executable, "-m", "replicator", "demo", "--quick"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "complete in both replicas" in out.stdout
    assert "mounted" in out.stdout and "reclaimed" in out.stdout
    assert "done: replication and GC did what they printed" in out.stdout
    assert "Traceback" not in out.stderr
