"""Copy-engine benchmark against skopeo and a raw curl copy, in one run.

Workload (issue: foundation): R repositories x T tags, 4 layers each: a base
layer shared by all, a layer shared per repository, two unique layers.
Prints:
  - wall time of our engine vs `skopeo sync`, each to a fresh registry configured
    identically (no notifications on either: a webhook endpoint costs the
    registry CPU). Rounds alternate which tool goes first; the ratio is of the
    medians, and each round's ratio is listed, because this 2-core VM's speed
    drifts by +-15 % between runs. CPU seconds of the client and both
    registries are printed per round, to show where the time goes;
  - bytes a target registry received in blob uploads vs the unique blob bytes,
    counted from that registry's own notifications in a separate accounting
    pass of our engine to one more fresh target;
  - a second pass with nothing changed: blobs uploaded, manifests written and
    requests per tag to the target;
  - one large blob: peak RSS of `registry-replicator copy` and its throughput vs
    `curl GET | curl PUT` of the same blob.

Run: .venv/bin/python benchmarks/bench_copy.py [--small] [--rounds 3] [--big-mib 1024]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.big_image import push_big  # noqa: E402
from replicator.blob_index import BlobIndex  # noqa: E402
from replicator.copy import CopyEngine, CopyStats  # noqa: E402
from replicator.registry.client import RegistryClient  # noqa: E402
from replicator.registry.site import SiteEndpoint  # noqa: E402
from tests.harness.images import Pusher, digest_of  # noqa: E402
from tests.harness.registry import Registry  # noqa: E402
from tests.harness.util import cpu_seconds, wait_until  # noqa: E402
from tests.harness.webhook_sink import WebhookSink  # noqa: E402

MB = 1_000_000


def seed(
    src: Registry, repos: int, tags: int, base_mb: float, repo_mb: float, unique_mb: float
) -> tuple[list[tuple[str, str]], int]:
    """Push the workload; returns (repo, tag) pairs and the unique blob bytes."""
    unique_bytes: dict[str, int] = {}
    items = []
    base = os.urandom(int(base_mb * MB))
    with Pusher(src.url) as p:
        for r in range(repos):
            shared = os.urandom(int(repo_mb * MB))
            for t in range(tags):
                layers = [
                    base,
                    shared,
                    os.urandom(int(unique_mb * MB)),
                    os.urandom(int(unique_mb * MB)),
                ]
                pushed = p.push_image(f"bench/app{r:02d}", f"v{t}", layers)
                for layer in layers:
                    unique_bytes[digest_of(layer)] = len(layer)
                raw = p.http.get(f"{src.url}/v2/bench/app{r:02d}/blobs/{pushed.blobs[0]}")
                unique_bytes[pushed.blobs[0]] = len(raw.content)
                items.append((f"bench/app{r:02d}", f"v{t}"))
    return items, sum(unique_bytes.values())


async def run_ours(
    src: Registry, dst: Registry, items: list[tuple[str, str]], parallel: int = 8
) -> tuple[float, CopyStats, int]:
    engine = CopyEngine(BlobIndex())
    total = CopyStats()
    sem = asyncio.Semaphore(parallel)
    async with (
        RegistryClient(SiteEndpoint("src", src.url, insecure=True)) as s,
        RegistryClient(SiteEndpoint("dst", dst.url, insecure=True)) as d,
    ):

        async def one(repo: str, tag: str) -> None:
            async with sem:
                result = await engine.copy(s, repo, tag, d, repo)
                total.add(result.stats)

        start = time.perf_counter()
        await asyncio.gather(*(one(r, t) for r, t in items))
        elapsed = time.perf_counter() - start
        requests = d.stats.get("requests", -1)
    return elapsed, total, requests


def run_skopeo(src: Registry, dst: Registry, items: list[tuple[str, str]], work: Path) -> float:
    images: dict[str, list[str]] = {}
    for repo, tag in items:
        images.setdefault(repo, []).append(tag)
    spec = {src.host: {"tls-verify": False, "images": images}}
    spec_path = work / "skopeo-sync.yaml"
    spec_path.write_text(json.dumps(spec))
    home = work / "skopeo-home"
    shutil.rmtree(home, ignore_errors=True)  # fresh blob-info cache every round
    env = {**os.environ, "HOME": str(home)}
    start = time.perf_counter()
    subprocess.run(
        [
            "skopeo",
            "sync",
            "--src",
            "yaml",
            "--dest",
            "docker",
            "--dest-tls-verify=false",
            str(spec_path),
            dst.host,
        ],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def timed_round(
    work: Path, src: Registry, items: list[tuple[str, str]], n: int, ours_first: bool
) -> dict[str, dict[str, float]]:
    """One timed copy by each tool to its own fresh, identically configured registry."""
    result: dict[str, dict[str, float]] = {}
    for tool in ("ours", "skopeo") if ours_first else ("skopeo", "ours"):
        dst = Registry(root=work / f"round{n}-{tool}").start()
        # Start each run with no dirty pages left by the previous one: writeback
        # throttling otherwise bills one tool's target for the other's writes.
        os.sync()
        try:
            src_cpu, dst_cpu = cpu_seconds(src.proc.pid), cpu_seconds(dst.proc.pid)
            before = os.times()
            if tool == "ours":
                wall = asyncio.run(run_ours(src, dst, items))[0]
            else:
                wall = run_skopeo(src, dst, items, work)
            after = os.times()
            client = (
                (after.user + after.system - before.user - before.system)
                if tool == "ours"
                else (
                    after.children_user
                    + after.children_system
                    - before.children_user
                    - before.children_system
                )
            )
            result[tool] = {
                "wall_s": round(wall, 3),
                "client_cpu_s": round(client, 2),
                "source_cpu_s": round(cpu_seconds(src.proc.pid) - src_cpu, 2),
                "target_cpu_s": round(cpu_seconds(dst.proc.pid) - dst_cpu, 2),
            }
        finally:
            dst.stop()
            shutil.rmtree(dst.root, ignore_errors=True)
    return result


def target_writes(sink: WebhookSink) -> list[dict]:
    """Every push (blob or manifest) and mount the target has reported."""
    return [e for e in sink.snapshot() if e["action"] in ("push", "mount")]


def uploaded_bytes(sink: WebhookSink) -> tuple[int, int]:
    pushes = sink.blob_events("push")
    return len(pushes), sum(
        int(e["target"].get("size") or e["target"].get("length") or 0) for e in pushes
    )


def big_blob(work: Path, src: Registry, mib: int) -> dict[str, float]:
    """One large blob: our CLI (subprocess, peak RSS) vs curl GET | curl PUT."""
    digest = push_big(src, mib)

    dst_ours = Registry(root=work / "big-ours").start()
    dst_curl = Registry(root=work / "big-curl").start()
    try:
        # the child reports its own peak RSS (RUSAGE_CHILDREN would include registries)
        code = (
            "import resource, sys\nfrom replicator.cli import main\nrc = main(sys.argv[1:])\n"
            "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
            "file=sys.stderr)\nsys.exit(rc)"
        )
        start = time.perf_counter()
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                code,
                "copy",
                "--insecure",
                "--json",
                f"{src.host}/big/blob:v1",
                f"{dst_ours.host}/big/blob:v1",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        ours = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"our copy failed: {proc.stderr}")
        peak_kib = int(proc.stderr.split("MAXRSS", 1)[1].split()[0])
        with httpx.Client() as http:
            loc = http.post(f"{dst_curl.url}/v2/big/blob/blobs/uploads/").headers["location"]
        loc = loc if loc.startswith("http") else dst_curl.url + loc
        start = time.perf_counter()
        subprocess.run(
            f"curl -sf {src.url}/v2/big/blob/blobs/{digest} | "
            f"curl -sf -T - -X PUT -H 'Content-Type: application/octet-stream' "
            f"'{loc}&digest={digest}'",
            shell=True,
            check=True,
        )
        curl = time.perf_counter() - start
        assert dst_curl.has_blob_data(digest) and dst_ours.has_blob_data(digest)
    finally:
        dst_ours.stop()
        dst_curl.stop()
    return {
        "mib": mib,
        "ours_s": ours,
        "curl_s": curl,
        "throughput_ratio": curl / ours,
        "peak_rss_mb": round(peak_kib / 1024, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repos", type=int, default=20)
    ap.add_argument("--tags", type=int, default=3)
    ap.add_argument("--base-mb", type=float, default=20)
    ap.add_argument("--repo-mb", type=float, default=5)
    ap.add_argument("--unique-mb", type=float, default=1)
    ap.add_argument(
        "--rounds", type=int, default=3, help="timed rounds per tool; the medians are compared"
    )
    ap.add_argument(
        "--workdir",
        help="where the registries keep their storage (default: the "
        "system temp dir; /dev/shm keeps it in memory, out of the disk's way)",
    )
    ap.add_argument("--big-mib", type=int, default=1024, help="0 skips the large-blob test")
    ap.add_argument("--small", action="store_true", help="a quick smoke-sized run")
    ap.add_argument("--only-big", action="store_true", help="run only the large-blob test")
    args = ap.parse_args()
    if args.small:
        args.repos, args.tags, args.base_mb, args.repo_mb, args.unique_mb = 3, 2, 1, 0.5, 0.1
        args.big_mib = min(args.big_mib, 32)
    with tempfile.TemporaryDirectory(prefix="bench-copy-", dir=args.workdir) as tmp:
        work = Path(tmp)
        sink = WebhookSink()
        src = Registry(root=work / "src").start()
        counted_dst = Registry(root=work / "counted", notify_url=sink.url).start()
        try:
            if args.only_big:
                print(json.dumps({"big_blob": big_blob(work, src, args.big_mib)}, indent=2))
                return 0
            print(f"seeding {args.repos} repos x {args.tags} tags ...", flush=True)
            items, unique = seed(
                src, args.repos, args.tags, args.base_mb, args.repo_mb, args.unique_mb
            )
            rounds = []
            for n in range(args.rounds):
                rounds.append(timed_round(work, src, items, n, ours_first=n % 2 == 0))
                print(
                    f"round {n + 1}: ours {rounds[-1]['ours']['wall_s']:.2f} s, "
                    f"skopeo {rounds[-1]['skopeo']['wall_s']:.2f} s",
                    flush=True,
                )
            ours_s = statistics.median(r["ours"]["wall_s"] for r in rounds)
            skopeo_s = statistics.median(r["skopeo"]["wall_s"] for r in rounds)

            # accounting pass: what the target registry itself says it received
            _, stats, _ = asyncio.run(run_ours(src, counted_dst, items))
            # every event of this pass (uploads, mounts, manifests) must be in before the
            # second pass starts, or a late one is counted as the second pass's
            writes = stats.blobs_uploaded + stats.blobs_mounted + stats.manifests_written
            wait_until(
                lambda: (
                    uploaded_bytes(sink)[0] >= stats.blobs_uploaded
                    and len(target_writes(sink)) >= writes
                ),
                timeout=30,
                what="the accounting pass's notifications",
            )
            n_up, bytes_up = uploaded_bytes(sink)
            sink.clear()
            second_s, stats2, requests2 = asyncio.run(run_ours(src, counted_dst, items))
            report = {
                "workload": f"{args.repos}x{args.tags} tags, base {args.base_mb} MB, "
                f"repo {args.repo_mb} MB, 2x{args.unique_mb} MB unique",
                "ours_s": ours_s,
                "skopeo_s": skopeo_s,
                "wall_ratio_ours_over_skopeo": round(ours_s / skopeo_s, 3),
                "round_ratios": [
                    round(r["ours"]["wall_s"] / r["skopeo"]["wall_s"], 3) for r in rounds
                ],
                "rounds": rounds,
                "unique_blob_bytes": unique,
                "target_received_bytes": bytes_up,
                "target_received_blobs": n_up,
                "bytes_ratio": round(bytes_up / unique, 4),
                "blobs_mounted": stats.blobs_mounted,
                "blobs_uploaded": stats.blobs_uploaded,
                "blobs_existing": stats.blobs_existing,
                "second_pass_s": round(second_s, 3),
                "second_pass_blobs_uploaded": stats2.blobs_uploaded,
                "second_pass_manifests_written": stats2.manifests_written,
                "second_pass_target_requests": requests2,
                "second_pass_requests_per_tag": round(requests2 / len(items), 3),
                "second_pass_target_events": len(target_writes(sink)),
            }
            if args.big_mib:
                report["big_blob"] = big_blob(work, src, args.big_mib)
            print(json.dumps(report, indent=2))
        finally:
            for reg in (src, counted_dst):
                reg.stop()
            sink.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
