"""The benchmark scripts still run, at toy sizes, and their functional figures hold.

Timings are not asserted here (they belong in the scripts' output and the
issue notes); what is checked is what must be true at any size: the target
received exactly the unique blob bytes, a second pass changes nothing, the
reconcile goals and the intake count.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=180
    )


def test_bench_copy_small():
    proc = run("bench_copy.py", "--small", "--rounds", "1", "--big-mib", "4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert report["bytes_ratio"] == 1.0
    assert report["second_pass_blobs_uploaded"] == 0
    assert report["second_pass_manifests_written"] == 0
    assert report["second_pass_requests_per_tag"] <= 1.0
    assert report["second_pass_target_events"] == 0
    assert len(report["rounds"]) == 1 and report["ours_s"] > 0 and report["skopeo_s"] > 0
    assert report["big_blob"]["peak_rss_mb"] < 150


def test_bench_reconcile_small():
    proc = run("bench_reconcile.py", "--repos", "2", "--tags", "5")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "goals met" in proc.stdout


def test_bench_intake_small():
    proc = run("bench_intake.py", "--events", "60", "--concurrency", "4")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "60 single-event POSTs" in proc.stdout


def test_bench_sync_small_over_a_wan():
    """The user-facing sync benchmark, both tools through delay proxies."""
    proc = run("bench_sync.py", "--small", "--rounds", "1", "--rtt-ms", "10")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "median wall: ours" in proc.stdout
    assert "ours: " in proc.stdout and "round trips per image" in proc.stdout


def test_delay_proxy_adds_its_delay_each_way(registry, tmp_path):
    """A lower bound, which is the proxy's function: one request and its answer cross
    the link once each way; the turn counter sees both requests."""
    import time

    import httpx

    sys.path.insert(0, str(BENCH))
    from delay_proxy import DelayProxy

    proxy = DelayProxy(registry.host, 40, tmp_path, "p").start()
    try:
        with httpx.Client() as http:
            http.get(f"http://{proxy.host}/v2/")  # connection up
            start = time.perf_counter()
            assert http.get(f"http://{proxy.host}/v2/").status_code == 200
            assert time.perf_counter() - start >= 0.08
    finally:
        stats = proxy.stop()
    assert stats.connections == 1 and stats.turns == 2


def test_delay_proxy_delays_each_direction_on_its_own(tmp_path):
    """20 ms to the upstream, 200 ms back: each leg, timed from one process's clock at
    both ends of a plain TCP exchange, pays its own delay and not the other's."""
    import socket
    import threading
    import time

    sys.path.insert(0, str(BENCH))
    from delay_proxy import DelayProxy

    server = socket.create_server(("127.0.0.1", 0))
    upstream_host = f"127.0.0.1:{server.getsockname()[1]}"
    seen: dict[str, float] = {}

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(16)
            seen["received"] = time.monotonic()
            seen["answered"] = time.monotonic()
            conn.sendall(b"pong")

    threading.Thread(target=answer, daemon=True).start()
    proxy = DelayProxy(upstream_host, 0, tmp_path, "p", up_ms=20, down_ms=200).start()
    try:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as client:
            sent = time.monotonic()
            client.sendall(b"ping")
            assert client.recv(16) == b"pong"
            back = time.monotonic()
    finally:
        proxy.stop()
        server.close()
    up, down = seen["received"] - sent, back - seen["answered"]
    assert 0.02 <= up < 0.2, f"up {up:.3f}s"
    assert down >= 0.2, f"down {down:.3f}s"


def test_bench_uploads_small():
    proc = run(
        "bench_uploads.py",
        *("--mib", "6", "--limit", "2000000", "--rounds", "1", "--rate-mib", "4", "--seconds", "1"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout[proc.stdout.index("{") :])
    runs = report["body_limit"]["runs"]
    assert runs["monolithic"][0]["chunk_size"] is None
    assert runs["chunked_configured"][0]["chunk_size"] == 1_000_000  # half the limit
    assert runs["chunked_after_413"][0]["chunk_size"] <= 2_000_000  # learnt from the 413s
    assert report["bandwidth"]["mib"] == 4 and report["bandwidth"]["measured_mib_per_s"] > 0


def test_bench_gc_storage_small_keeps_what_distribution_keeps():
    proc = run(
        "bench_gc_storage.py",
        *("--manifests", "200", "--repos", "5", "--pool", "50", "--orphans", "20"),
        *("--uploads", "3", "--repeat", "1"),
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    kept = re.search(r"^blobs kept\s+(\d+)\s+(\d+)$", proc.stdout, re.M)
    assert kept and kept.group(1) == kept.group(2) and int(kept.group(1)) > 0, proc.stdout
    assert "kept sets identical across all 2 runs: True" in proc.stdout
    assert "20 orphan blobs, 3 stale uploads" in proc.stdout  # the knobs reach gen_store


def test_bench_reconcile_scale_small():
    """Both source modes at 20 tags: nothing copied or failed, at most one target request
    per tag, none once immutable tags are recorded."""
    proc = run("bench_reconcile_scale.py", "--repos", "5", "--tags", "20", "--source", "both")
    assert proc.returncode in (0, 1), proc.stdout[-2000:] + proc.stderr[-2000:]
    passes = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [(p["source"], p["pass"]) for p in passes] == [
        (source, name)
        for source in ("api", "storage")
        for name in (
            "nothing changed",
            "immutable: recording pass",
            "immutable: nothing changed",
        )
    ]
    assert all(p["copied"] == 0 and p["failed"] == 0 for p in passes)
    assert all(p["target_requests_per_tag"] <= 1 for p in passes)
    assert [p["target_requests"] for p in passes if p["pass"] == "immutable: nothing changed"] == [
        0,
        0,
    ]


def test_bench_latency_small_runs_with_the_goal_conditions_by_default():
    """The defaults are issue 15's: MQTT and two targets (the rate is the default 10/s)."""
    proc = run("bench_latency.py", "--images", "10", "--verify", "2")
    assert proc.returncode in (0, 1), proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "10 images at 10/s" in proc.stdout and "bus: MQTT (Mosquitto)" in proc.stdout
    for target in ("b", "c"):
        assert f"push -> complete on {target}: n=10 " in proc.stdout, proc.stdout
    assert "FAILED" not in proc.stdout and "verified complete: 2 images x 2 targets" in proc.stdout


def test_bench_bridge_small():
    """The regional topology benchmark at toy size: a bridge outage loses nothing."""
    proc = run("bench_bridge.py", "--pushes", "6", "--rate", "6", "--outage", "1", "--workers", "1")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "lost 0 of 6; duplicates: 0 manifest PUTs, 0 tasks done twice" in proc.stdout
    assert "nothing lost" in proc.stdout
