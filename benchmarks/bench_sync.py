"""`registry-replicator sync` as a user runs it, against `skopeo sync` per repository.

Why: the engine benchmark (bench_copy.py) times the copy engine in process; a user
runs the CLI, which also starts Python, loads the configuration, opens the journal,
lists the catalog and tags, plans, and journals what it did. This measures all of it.

Workload: the bulk workload of bench_copy.py (R repositories x T tags: a base layer
shared by all, one per repository, two unique). Each round copies it with each tool
to its own fresh, identically configured registry; rounds alternate which tool goes
first; the ratio is of the medians. Per run: wall time, CPU of the tool's process
(and its children), CPU of the source and target registries.

`--rtt-ms 50` puts a delay proxy (benchmarks/delay_proxy.py, its own process) between
each tool and both registries, adding half the RTT in each direction, as across a
WAN. The proxies also count request/answer turns, so the round trips per image of
each tool are printed; their own CPU is printed apart.

Run: .venv/bin/python benchmarks/bench_sync.py [--small] [--rounds 5] [--rtt-ms 50]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_copy import seed  # noqa: E402
from delay_proxy import DelayProxy  # noqa: E402

from tests.harness.registry import Registry  # noqa: E402
from tests.harness.util import cpu_seconds  # noqa: E402


def _children_cpu() -> float:
    t = os.times()
    return t.children_user + t.children_system


def compile_bytecode() -> None:
    """Compile the tool's bytecode once, as installing it does (pip compiles a wheel's
    modules): a source checkout run with PYTHONDONTWRITEBYTECODE set, as on this machine,
    would compile about 70 modules again on every run (about 60 ms of CPU each run)."""
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(ROOT / "replicator"), str(ROOT / "gc")],
        check=True,
    )


def run_ours(src_host: str, dst_host: str, work: Path) -> float:
    journal = work / "journal.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{journal}{suffix}").unlink(missing_ok=True)
    config = work / "sync.yaml"
    config.write_text(
        f"journal: {journal}\n"
        "sites:\n"
        f"  src: {{url: 'http://{src_host}', insecure: true}}\n"
        f"  dst: {{url: 'http://{dst_host}', insecure: true}}\n"
        "rules:\n"
        "  - {name: bench, from: src, to: [dst], repositories: ['bench/**']}\n"
    )
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "replicator", "sync", "-c", str(config), "--log-level", "warning"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def run_skopeo(src_host: str, dst_host: str, repos: list[str], work: Path) -> float:
    """`skopeo sync` once per repository (it has no rule with globs; this is how a user
    scripts it), each repository's tags to the same name at the target."""
    home = work / "skopeo-home"
    shutil.rmtree(home, ignore_errors=True)  # fresh blob-info cache every round
    env = {**os.environ, "HOME": str(home)}
    start = time.perf_counter()
    for repo in repos:
        namespace = repo.rsplit("/", 1)[0]
        subprocess.run(
            [
                "skopeo",
                "sync",
                "--src",
                "docker",
                "--dest",
                "docker",
                "--src-tls-verify=false",
                "--dest-tls-verify=false",
                f"{src_host}/{repo}",
                f"{dst_host}/{namespace}",
            ],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    return time.perf_counter() - start


def one_run(tool: str, src: Registry, repos: list[str], work: Path, n: int, rtt_ms: float) -> dict:
    dst = Registry(root=work / f"round{n}-{tool}").start()
    proxies: list[DelayProxy] = []
    os.sync()  # no dirty pages from the previous run billed to this one
    try:
        src_host, dst_host = src.host, dst.host
        if rtt_ms:
            proxies = [
                DelayProxy(src.host, rtt_ms / 2, work, f"{tool}-src").start(),
                DelayProxy(dst.host, rtt_ms / 2, work, f"{tool}-dst").start(),
            ]
            src_host, dst_host = proxies[0].host, proxies[1].host
        src_cpu, dst_cpu, child_cpu = cpu_seconds(src.proc.pid), cpu_seconds(dst.proc.pid), 0.0
        child_cpu = _children_cpu()
        if tool == "ours":
            wall = run_ours(src_host, dst_host, work)
        else:
            wall = run_skopeo(src_host, dst_host, repos, work)
        result = {
            "wall_s": round(wall, 3),
            "tool_cpu_s": round(_children_cpu() - child_cpu, 2),
            "source_cpu_s": round(cpu_seconds(src.proc.pid) - src_cpu, 2),
            "target_cpu_s": round(cpu_seconds(dst.proc.pid) - dst_cpu, 2),
        }
        for proxy, name in zip(proxies, ("src", "dst")[: len(proxies)], strict=True):
            stats = proxy.stop()
            result[f"{name}_turns"] = stats.turns
            result[f"{name}_connections"] = stats.connections
            result[f"{name}_proxy_cpu_s"] = stats.cpu_s
        proxies = []
        return result
    finally:
        for proxy in proxies:
            proxy.stop()
        dst.stop()
        shutil.rmtree(dst.root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="4 repos x 2 tags, tiny layers")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rtt-ms", type=float, default=0.0, help="WAN round-trip time to add")
    ap.add_argument("--workdir", type=Path, default=None, help="where registries keep data")
    args = ap.parse_args()
    if shutil.which("skopeo") is None:
        sys.exit("skopeo is not installed")
    compile_bytecode()
    repos_n, tags, base, per_repo, unique = (
        (4, 2, 1, 0.2, 0.05) if args.small else (20, 3, 20, 5, 1)
    )
    work = Path(tempfile.mkdtemp(prefix="bench-sync-", dir=args.workdir))
    src = Registry(root=work / "src").start()
    try:
        items, unique_bytes = seed(src, repos_n, tags, base, per_repo, unique)
        repos = sorted({r for r, _ in items})
        images = len(items)
        print(
            f"workload: {repos_n} repos x {tags} tags = {images} images, "
            f"{unique_bytes / 1e6:.1f} MB unique; RTT {args.rtt_ms:g} ms"
        )
        runs: dict[str, list[dict]] = {"ours": [], "skopeo": []}
        for n in range(args.rounds):
            order = ("ours", "skopeo") if n % 2 == 0 else ("skopeo", "ours")
            for tool in order:
                runs[tool].append(one_run(tool, src, repos, work, n, args.rtt_ms))
            ratio = runs["ours"][-1]["wall_s"] / runs["skopeo"][-1]["wall_s"]
            load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
            print(
                f"round {n + 1}: ratio {ratio:.2f} (load average {load})  ours {runs['ours'][-1]}"
            )
            print(f"{'':>9}             skopeo {runs['skopeo'][-1]}")
        med = {t: statistics.median(r["wall_s"] for r in runs[t]) for t in runs}
        cpu = {t: statistics.median(r["tool_cpu_s"] for r in runs[t]) for t in runs}
        print(
            f"median wall: ours {med['ours']:.2f} s, skopeo {med['skopeo']:.2f} s, "
            f"ratio {med['ours'] / med['skopeo']:.2f}; median tool CPU: ours {cpu['ours']:.2f} s, "
            f"skopeo {cpu['skopeo']:.2f} s"
        )
        for t in runs:
            source = statistics.median(r["source_cpu_s"] for r in runs[t])
            target = statistics.median(r["target_cpu_s"] for r in runs[t])
            print(f"{t}: median registry CPU: source {source:.2f} s, target {target:.2f} s")
        if args.rtt_ms:
            for t in runs:
                turns = statistics.median(r["src_turns"] + r["dst_turns"] for r in runs[t])
                print(
                    f"{t}: {turns / images:.1f} round trips per image "
                    f"(source {statistics.median(r['src_turns'] for r in runs[t]) / images:.1f}, "
                    f"target {statistics.median(r['dst_turns'] for r in runs[t]) / images:.1f})"
                )
    finally:
        src.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
