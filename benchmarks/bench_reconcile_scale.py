"""Reconcile at production scale: 10,000 repositories, 100,000 tags, nothing changed.

Why: a reconcile that is cheap at 2,000 tags can still hold every manifest in
memory, fetch what it does not need, or grow the journal without bound at 100,000.
The source store is generated directly in distribution's storage layout
(benchmarks/gen_store.py: every image tagged, one tag each) and copied as the
target, so the target is "replicated already" without pushing 100,000 images.

Passes, each `registry-replicator sync` as a user runs it (a fresh process, measured
with wait4: wall time, CPU, peak RSS), the target behind a pass-through proxy that
counts requests (benchmarks/delay_proxy.py with no delay):
  1. nothing changed (goals: <= 120 s, RSS <= 300 MB, <= 1 request per tag at the
     target);
  2. with `immutable_tags: ["**"]` once to record, then nothing changed (goals:
     <= 30 s, 0 requests per tag at the target beyond the tag lists).
The journal's size after the passes is printed. With `--source storage` the source
site has `storage:` configured, so the reconcile reads its catalog, tags and tag
-> digest from the store (replicator/store_tags.py) instead of one HEAD per tag;
`--source both` runs the passes both ways (a fresh journal each). The CPU seconds
each registry spent during a pass are printed next to ours: on this 2-core machine
a manifest HEAD costs distribution about 1 ms of CPU, which bounds the API-only
wall time from below.

Run: .venv/bin/python benchmarks/bench_reconcile_scale.py [--repos 10000] [--tags 100000]
     [--source api|storage|both]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_gc_storage import measured  # noqa: E402
from delay_proxy import DelayProxy  # noqa: E402
from gen_store import generate  # noqa: E402

from tests.harness.registry import Registry  # noqa: E402


def sync_pass(work: Path, config: dict, label: str) -> dict:
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    wall, cpu, rss, out = measured(
        [
            sys.executable,
            "-m",
            "replicator",
            "sync",
            "-c",
            str(path),
            "--json",
            "--log-level",
            "warning",
        ]
    )
    report = json.loads(out) if out.strip() else {}
    figures = {
        "pass": label,
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "peak_rss_mb": round(rss),
        "copied": report.get("copied"),
        "failed": report.get("failed"),
    }
    return figures


def registry_cpu(*registries: Registry) -> list[float]:
    """CPU seconds (user + system) each registry process has used so far."""
    tick = os.sysconf("SC_CLK_TCK")
    out = []
    for r in registries:
        assert r.proc is not None
        fields = Path(f"/proc/{r.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        out.append((int(fields[11]) + int(fields[12])) / tick)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repos", type=int, default=10_000)
    ap.add_argument("--tags", type=int, default=100_000)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--source", choices=("api", "storage", "both"), default="both")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-reconcile-scale-", dir=args.workdir))
    src = Registry(root=work / "src")
    dst = Registry(root=work / "dst")
    try:
        t = time.monotonic()
        st = generate(
            src.storage,
            manifests=args.tags,
            repos=args.repos,
            pool=1000,
            orphans=0,
            uploads=0,
            tagged=1.0,
        )
        dst.root.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-a", str(src.storage), str(dst.storage)], check=True)
        print(
            f"store: {args.repos} repositories, {st.tagged} tags, {len(st.blobs)} blobs; "
            f"generated and copied in {time.monotonic() - t:.0f} s"
        )
        src.start()
        dst.start()
        results: dict[str, list[dict]] = {}
        rule = {"name": "all", "from": "src", "to": ["dst"], "repositories": ["**"]}
        modes = ("api", "storage") if args.source == "both" else (args.source,)
        for mode in modes:
            journal = work / f"journal-{mode}.db"
            results[mode] = []
            for label, rules in (
                ("nothing changed", [rule]),
                ("immutable: recording pass", [{**rule, "immutable_tags": ["**"]}]),
                ("immutable: nothing changed", [{**rule, "immutable_tags": ["**"]}]),
            ):
                proxy = DelayProxy(dst.host, 0, work, "dst").start()
                source: dict = {"url": src.url, "insecure": True}
                if mode == "storage":
                    source["storage"] = str(src.storage)
                config = {
                    "journal": str(journal),
                    "sites": {
                        "src": source,
                        "dst": {"url": f"http://{proxy.host}", "insecure": True},
                    },
                    "rules": rules,
                }
                cpu_before = registry_cpu(src, dst)
                figures = {"source": mode, **sync_pass(work, config, label)}
                src_cpu, dst_cpu = (
                    b - a for a, b in zip(cpu_before, registry_cpu(src, dst), strict=True)
                )
                stats = proxy.stop()
                figures["source_registry_cpu_s"] = round(src_cpu, 1)
                figures["target_registry_cpu_s"] = round(dst_cpu, 1)
                figures["target_requests"] = stats.turns
                figures["target_requests_per_tag"] = round(stats.turns / st.tagged, 3)
                figures["journal_mb"] = round(
                    sum(p.stat().st_size for p in work.glob(f"{journal.name}*")) / 1e6,
                    1,
                )
                figures["load_average"] = round(os.getloadavg()[0], 1)
                print(json.dumps(figures), flush=True)
                results[mode].append(figures)
        ok = True
        for mode, (plain, _record, fast) in results.items():
            met = (
                plain["wall_s"] <= 120
                and plain["peak_rss_mb"] <= 300
                and plain["target_requests_per_tag"] <= 1
                and fast["wall_s"] <= 30
                and fast["target_requests_per_tag"] == 0
                and plain["failed"] == 0
            )
            ok = ok and met
            print(
                f"[source via {mode}] no-op reconcile of {st.tagged} tags: {plain['wall_s']} s "
                f"(goal 120; {plain['cpu_s']} s CPU ours, {plain['source_registry_cpu_s']} + "
                f"{plain['target_registry_cpu_s']} s the registries'), peak RSS "
                f"{plain['peak_rss_mb']} MB (goal 300), {plain['target_requests_per_tag']} "
                f"target requests per tag (goal 1); immutable: {fast['wall_s']} s (goal 30; "
                f"{fast['cpu_s']} s CPU), {fast['target_requests_per_tag']} per tag; journal "
                f"{fast['journal_mb']} MB; load average {plain['load_average']}"
                + ("" if met else "  GOALS NOT MET")
            )
        print("goals met" if ok else "GOALS NOT MET")
        return 0 if ok else 1
    finally:
        for r in (src, dst):
            if r.proc is not None:
                r.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
