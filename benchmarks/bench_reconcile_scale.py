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
The journal's size after the passes is printed.

Run: .venv/bin/python benchmarks/bench_reconcile_scale.py [--repos 10000] [--tags 100000]
"""

from __future__ import annotations

import argparse
import json
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repos", type=int, default=10_000)
    ap.add_argument("--tags", type=int, default=100_000)
    ap.add_argument("--workdir", type=Path, default=None)
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
        results = []
        rule = {"name": "all", "from": "src", "to": ["dst"], "repositories": ["**"]}
        for label, rules in (
            ("nothing changed", [rule]),
            ("immutable: recording pass", [{**rule, "immutable_tags": ["**"]}]),
            ("immutable: nothing changed", [{**rule, "immutable_tags": ["**"]}]),
        ):
            proxy = DelayProxy(dst.host, 0, work, "dst").start()
            config = {
                "journal": str(work / "journal.db"),
                "sites": {
                    "src": {"url": src.url, "insecure": True},
                    "dst": {"url": f"http://{proxy.host}", "insecure": True},
                },
                "rules": rules,
            }
            figures = sync_pass(work, config, label)
            stats = proxy.stop()
            figures["target_requests"] = stats.turns
            figures["target_requests_per_tag"] = round(stats.turns / st.tagged, 3)
            figures["journal_mb"] = round(
                sum(p.stat().st_size for p in work.glob("journal.db*")) / 1e6,
                1,
            )
            print(json.dumps(figures), flush=True)
            results.append(figures)
        plain, _record, fast = results
        ok = (
            plain["wall_s"] <= 120
            and plain["peak_rss_mb"] <= 300
            and plain["target_requests_per_tag"] <= 1
            and fast["wall_s"] <= 30
            and plain["failed"] == 0
        )
        print(
            f"no-op reconcile of {st.tagged} tags: {plain['wall_s']} s (goal 120), peak RSS "
            f"{plain['peak_rss_mb']} MB (goal 300), {plain['target_requests_per_tag']} "
            f"target requests per tag (goal 1); immutable: {fast['wall_s']} s (goal 30), "
            f"{fast['target_requests_per_tag']} per tag; journal {fast['journal_mb']} MB"
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
