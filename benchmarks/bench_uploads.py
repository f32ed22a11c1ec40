"""Big blobs through a body limit, and bandwidth caps: figures for issue 13 items 4 and 5.

Body limit: one blob (default 2 GiB) copied by the copy engine in a child process (its
own peak RSS reported) to a target behind a proxy in its own process:
  - monolithic: a proxy without limit (FaultProxy), one PUT;
  - chunked:    AcrFront with a 100 MB limit, `limits.chunk_size: 50MiB` configured
                (at most half the limit);
  - auto:       AcrFront with a 100 MB limit, nothing configured: the first PUT draws a
                413 (the proxy reads and drops the refused body, as nginx's lingering
                close does), then chunks.
Rounds rotate which mode goes first (this 2-core machine drifts); throughput ratio =
median monolithic seconds / median chunked seconds (goal >= 0.7), peak RSS goal <= 150 MB.

Bandwidth: a blob of rate x seconds copied to a target with `limits.bandwidth`; the
measured rate is bytes uploaded / wall time (goal within 10 % of the cap).

Run: .venv/bin/python benchmarks/bench_uploads.py [--mib 2048] [--rounds 3] [--rate-mib 20]
     [--seconds 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.big_image import push_big  # noqa: E402
from tests.harness.registry import Registry  # noqa: E402
from tests.harness.util import free_port  # noqa: E402

MIB = 2**20
LIMIT = 100 * 1000 * 1000  # "100 MB", as a CDN or proxy states it

PROXY = """
import sys, threading
sys.path.insert(0, {root!r})
from tests.harness.acr_front import AcrFront
from tests.harness.fault_proxy import FaultProxy
limit = {limit}
p = (AcrFront("127.0.0.1", {up}, limit, port={port}) if limit else
     FaultProxy("127.0.0.1", {up}, port={port}))
p.start()
print("ready", flush=True)
sys.stdin.read()
p.stop()
"""

COPY = """
import asyncio, json, resource, sys, time
sys.path.insert(0, {root!r})
from replicator.copy import CopyEngine
from replicator.registry.client import RegistryClient
from replicator.registry.limits import BandwidthSchedule
from replicator.registry.site import SiteEndpoint

async def main():
    src = SiteEndpoint(name="src", url={src!r}, insecure=True)
    dst = SiteEndpoint(name="dst", url={dst!r}, insecure=True, chunk_size={chunk},
                       bandwidth=BandwidthSchedule({rate}) if {rate} else None)
    async with RegistryClient(src) as s, RegistryClient(dst) as d:
        start = time.perf_counter()
        result = await CopyEngine().copy(s, "big/blob", "v1", d, "big/blob")
        seconds = time.perf_counter() - start
        print(json.dumps({{"status": result.status, "error": result.error, "seconds": seconds,
                          "uploaded": d.stats["bytes_uploaded"],
                          "chunk": d.upload_chunk_size,
                          "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}}))

asyncio.run(main())
"""


def start_proxy(upstream: Registry, limit: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            PROXY.format(root=str(ROOT), limit=limit, up=upstream.port, port=port),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc, f"http://127.0.0.1:{port}"


def copy_child(src_url: str, dst_url: str, chunk: int | None, rate: int | None) -> dict:
    code = COPY.format(root=str(ROOT), src=src_url, dst=dst_url, chunk=chunk, rate=rate)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if out["status"] != "copied":
        raise RuntimeError(out)
    return out


def through(work: Path, name: str, src: Registry, limit: int, chunk: int | None) -> dict:
    dst = Registry(root=work / name).start()
    proxy, url = start_proxy(dst, limit)
    try:
        out = copy_child(src.url, url, chunk, None)
    finally:
        assert proxy.stdin is not None
        proxy.stdin.close()
        proxy.wait(30)
        dst.stop()
    return {
        "seconds": round(out["seconds"], 2),
        "wire_mib_per_s": round(out["uploaded"] / MIB / out["seconds"], 1),  # with any refused body
        "peak_rss_mb": round(out["maxrss_kib"] / 1024, 1),
        "chunk_size": out["chunk"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--mib", type=int, default=2048, help="body-limit blob size; 0 skips")
    ap.add_argument("--rate-mib", type=float, default=20.0, help="bandwidth cap; 0 skips")
    ap.add_argument("--seconds", type=float, default=30.0, help="bandwidth copy length")
    ap.add_argument("--limit", type=int, default=LIMIT, help="proxy body limit in bytes")
    ap.add_argument("--rounds", type=int, default=3, help="body-limit rounds (medians)")
    args = ap.parse_args()
    report: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-uploads-") as tmp:
        work = Path(tmp)
        if args.mib:
            src = Registry(root=work / "src").start()
            chunk = min(50 * MIB, args.limit // 2)
            modes = {
                "monolithic": (0, None),
                "chunked_configured": (args.limit, chunk),
                "chunked_after_413": (args.limit, None),
            }
            runs: dict[str, list[dict]] = {m: [] for m in modes}
            try:
                push_big(src, args.mib)
                for r in range(args.rounds):
                    order = list(modes)[r % 3 :] + list(modes)[: r % 3]  # rotate who goes first
                    for m in order:
                        limit, size = modes[m]
                        runs[m].append(through(work, f"{m}-{r}", src, limit, size))
            finally:
                src.stop()
            median = {m: statistics.median(x["seconds"] for x in runs[m]) for m in modes}
            report["body_limit"] = {
                "mib": args.mib,
                "limit_bytes": args.limit,
                "runs": runs,
                "median_seconds": median,
                "peak_rss_mb_max": max(x["peak_rss_mb"] for m in modes for x in runs[m]),
                "throughput_ratio_configured": round(
                    median["monolithic"] / median["chunked_configured"], 2
                ),
                "throughput_ratio_after_413": round(
                    median["monolithic"] / median["chunked_after_413"], 2
                ),
                "round_ratios_configured": [
                    round(a["seconds"] / b["seconds"], 2)
                    for a, b in zip(runs["monolithic"], runs["chunked_configured"], strict=True)
                ],
            }
        if args.rate_mib:
            rate = int(args.rate_mib * MIB)
            mib = max(1, round(args.rate_mib * args.seconds))
            src = Registry(root=work / "bw-src").start()
            dst = Registry(root=work / "bw-dst").start()
            try:
                push_big(src, mib)
                out = copy_child(src.url, dst.url, None, rate)
            finally:
                src.stop()
                dst.stop()
            measured = out["uploaded"] / out["seconds"]
            report["bandwidth"] = {
                "cap_mib_per_s": args.rate_mib,
                "mib": mib,
                "seconds": round(out["seconds"], 2),
                "measured_mib_per_s": round(measured / MIB, 2),
                "deviation_pct": round(100 * (measured - rate) / rate, 1),
            }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    started = time.perf_counter()
    rc = main()
    print(f"total {time.perf_counter() - started:.0f}s", file=sys.stderr)
    sys.exit(rc)
