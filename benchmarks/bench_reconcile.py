"""Reconcile benchmark: 2,000 tags where nothing changed.

Workload (issue: rules/journal/sync, performance item): R repositories x T tags
(default 40 x 50 = 2,000), every tag of a repository pointing at the same tiny
image so seeding is fast. One sync seeds the target; then:

  1. a second sync with nothing changed: wall time (goal < 10 s on 2 cores)
     and requests to the target (goal: at most one per tag, plus list calls);
  2. the same through the CLI (`registry-replicator sync`, a fresh process);
  3. with `immutable_tags: ["*"]`: one pass that records the target inventory,
     then a pass that must send the target zero requests.

Run: .venv/bin/python benchmarks/bench_reconcile.py [--repos 40] [--tags 50]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from replicator.blob_index import BlobIndex  # noqa: E402
from replicator.clients import ClientPool  # noqa: E402
from replicator.config import config_from_dict  # noqa: E402
from replicator.copy import CopyEngine  # noqa: E402
from replicator.journal import Journal  # noqa: E402
from replicator.sync import Reconciler  # noqa: E402
from tests.harness.images import Pusher, layer_bytes  # noqa: E402
from tests.harness.registry import Registry  # noqa: E402


def seed(src: Registry, repos: int, tags: int) -> None:
    def one_repo(r: int) -> None:
        with Pusher(src.url) as p:
            repo = f"bench/app{r:02d}"
            img = p.push_image(repo, "t0", [layer_bytes(f"layer{r}", 64)])
            for t in range(1, tags):
                p.push_manifest(repo, f"t{t}", img.raw, img.media_type)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(one_repo, range(repos)))


async def sync_pass(data: dict, label: str) -> dict:
    config = config_from_dict(data)
    journal = Journal(config.journal)
    try:
        async with ClientPool(config) as pool:
            reconciler = Reconciler(config, journal, pool, CopyEngine(BlobIndex(journal)))
            started = time.perf_counter()
            report = await reconciler.run()
            wall = time.perf_counter() - started
            source_requests = pool["src"].stats["requests"]
    finally:
        journal.close()
    counts = report.counts()
    figures = {
        "pass": label,
        "wall_s": round(wall, 2),
        "target_requests": report.target_requests.get("dst", 0),
        "source_requests": source_requests,
        "copied": counts["copied"],
        "up_to_date": counts["skipped"],
        "failed": counts["failed"],
    }
    print(json.dumps(figures))
    if report.failures:
        print("  failures:", report.failures[:3])
    return figures


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repos", type=int, default=40)
    ap.add_argument("--tags", type=int, default=50)
    args = ap.parse_args()
    n = args.repos * args.tags
    with tempfile.TemporaryDirectory(prefix="bench-reconcile-") as tmp:
        work = Path(tmp)
        src = Registry(root=work / "src").start()
        dst = Registry(root=work / "dst").start()
        try:
            t0 = time.perf_counter()
            seed(src, args.repos, args.tags)
            print(
                f"seeded {args.repos} repos x {args.tags} tags = {n} tags in "
                f"{time.perf_counter() - t0:.1f} s"
            )
            rule = {"name": "all", "from": "src", "to": ["dst"]}
            data = {
                "journal": str(work / "journal.db"),
                "sites": {
                    "src": {"url": src.url, "insecure": True},
                    "dst": {"url": dst.url, "insecure": True},
                },
                "rules": [rule],
            }
            first = asyncio.run(sync_pass(data, "seed (first sync)"))
            second = asyncio.run(sync_pass(data, "nothing changed"))

            config_path = work / "config.yaml"
            config_path.write_text(yaml.safe_dump(data, sort_keys=False))
            started = time.perf_counter()
            out = subprocess.run(
                [sys.executable, "-m", "replicator", "sync", "-c", str(config_path), "--json"],
                capture_output=True,
                text=True,
            )
            cli_wall = time.perf_counter() - started
            cli = json.loads(out.stdout) if out.stdout else {}
            print(
                json.dumps(
                    {
                        "pass": "nothing changed, CLI process",
                        "wall_s": round(cli_wall, 2),
                        "exit": out.returncode,
                        "copied": cli.get("copied"),
                        "up_to_date": cli.get("skipped"),
                    }
                )
            )

            immutable = {**data, "rules": [{**rule, "immutable_tags": ["*"]}]}
            asyncio.run(sync_pass(immutable, "immutable: recording pass"))
            fast = asyncio.run(sync_pass(immutable, "immutable: nothing changed"))
        finally:
            src.stop()
            dst.stop()
    print()
    print(f"tags: {n}; first sync copied {first['copied']} in {first['wall_s']} s")
    print(
        f"no-change reconcile: {second['wall_s']} s (goal < 10 s), target requests "
        f"{second['target_requests']} = {second['target_requests'] / n:.3f}/tag "
        f"(goal <= 1/tag + lists), source requests {second['source_requests']}"
    )
    print(f"no-change reconcile via CLI: {cli_wall:.2f} s")
    print(
        f"immutable fast path: {fast['wall_s']} s, target requests "
        f"{fast['target_requests']} (goal 0)"
    )
    ok = (
        second["wall_s"] < 10
        and second["target_requests"] <= n + args.repos
        and fast["target_requests"] == 0
        and second["failed"] == 0
    )
    print("goals met" if ok else "GOALS NOT MET")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
