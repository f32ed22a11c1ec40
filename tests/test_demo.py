"""The README's first command, in its short non-interactive form, as CI runs it."""

import subprocess
import sys

import pytest


@pytest.mark.slow
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


@pytest.mark.slow
def test_demo_keep_leaves_everything_running_and_every_printed_command_works():
    """`demo --keep` is where an operator's first hour starts: the commands it prints
    must work as printed, against registries and a daemon that are still running, and
    Ctrl-C must stop them all."""
    import os
    import shlex
    import signal
    import time

    import httpx

    from replicator.commands import COMMAND_MODULES

    proc = subprocess.Popen(
        [sys.executable, "-m", "replicator", "demo", "--quick", "--keep"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "demo exited early:\n" + "".join(lines)
            lines.append(line)
            if line.strip() == "" and any("Try, in another terminal" in x for x in lines):
                break
        text = "".join(lines)
        commands = [
            shlex.split(x.strip())
            for x in lines
            if x.startswith("  registry-replicator ") or x.startswith("  skopeo ")
        ]
        assert len(commands) >= 6, text
        for argv in commands:
            if argv[0] == "registry-replicator":
                if argv[1].replace("-", "_") not in COMMAND_MODULES:
                    continue  # printed for a command this checkout does not have yet
                argv = [sys.executable, "-m", "replicator", *argv[1:]]
            out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
            assert out.returncode == 0, f"{argv}: {out.stdout}{out.stderr}"
        # the skopeo push reaches the replicas through the still-running daemon
        eu = next(x.split()[-1] for x in lines if x.strip().startswith("eu-west"))
        url = f"{eu}/v2/demo/yours/manifests/v1"
        accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
        deadline = time.monotonic() + 60
        while httpx.head(url, headers=accept).status_code != 200:
            assert time.monotonic() < deadline, f"demo/yours:v1 never reached eu-west\n{text}"
            time.sleep(0.1)
        metrics = next(x for x in lines if "curl -s" in x).split()[2]
        assert httpx.get(metrics).status_code == 200
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, rest
    assert "stopped the registries and the daemon" in rest
    with __import__("pytest").raises(httpx.TransportError):
        httpx.get(f"{eu}/v2/", timeout=2)
