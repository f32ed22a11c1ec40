"""Storage GC benchmark: our online-safe mark-and-sweep vs distribution's offline
`docker-registry garbage-collect --delete-untagged`, on identical copies of one store.

Workload: benchmarks/gen_store.py (default 6,000 manifests in 100 repositories,
~21,600 blobs; 65 % tagged, 20 % untagged, 15 % deleted via the API; 1,000
orphan blobs; 50 abandoned uploads). No untagged index children or referrers:
there --delete-untagged deletes what we keep on purpose (see gc/mark.py).

Ours runs with the policy equivalent of --delete-untagged (keep every tag,
untagged: delete), grace 0 and quarantine window 0, so both reclaim the same
set; ours still goes through re-check, quarantine and post-window re-mark.
Each side runs --repeat times on fresh copies (alternating); medians are shown.

Checks: after every run the set of blobs kept is the same for ours as for
distribution's (both counts printed); after our run every revision and tag in
the store is complete on disk (manifest data, its blobs' data, its repository's
layer links, index children).

Each manifest brings three unique blobs (config, layer, manifest) whatever its
state, plus the shared layer pool (once used) and the orphans, so issue 15's
100,000 manifests / 400,000 blobs is `--manifests 100000 --repos 1000 --orphans
97000` (3 x 100,000 + 3,000 pool + 97,000 orphans; gen_store prints the count).

Run: .venv/bin/python benchmarks/bench_gc_storage.py [--manifests 6000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gen_store import generate  # noqa: E402
from replicator.gc.layout import StoreLayout, manifest_node  # noqa: E402
from replicator.gc.policy import KeepRules, RetentionPolicy  # noqa: E402
from replicator.gc.storage import (  # noqa: E402
    DEFAULT_WORKERS,
    StorageGCOptions,
    collect_storage_sync,
)


def blob_sizes(root: Path) -> dict[str, int]:
    layout = StoreLayout(root)
    out = {}
    for alg, prefix in layout.blob_prefix_dirs():
        for e in StoreLayout.scan_blob_prefix(alg, prefix):
            out[e.digest] = e.size
    return out


def cpu_self() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def measured(cmd: list[str]) -> tuple[float, float, float, str]:
    """Run `cmd`; its wall time, CPU seconds, peak RSS (MB) and stdout."""
    t = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd, out)
    cpu = usage.ru_utime + usage.ru_stime
    return time.monotonic() - t, cpu, usage.ru_maxrss / 1024, out


def run_theirs(store: Path, work: Path) -> tuple[float, float, float]:
    cfg = work / "registry.yml"
    cfg.write_text(
        json.dumps(
            {
                "version": 0.1,
                "log": {"level": "error"},
                "storage": {
                    "filesystem": {"rootdirectory": str(store)},
                    "delete": {"enabled": True},
                },
                "http": {"addr": "127.0.0.1:0"},
            }
        )
    )
    wall, cpu, rss, _ = measured(
        ["docker-registry", "garbage-collect", "--delete-untagged", str(cfg)]
    )
    return wall, cpu, rss


def run_ours_measured(store: Path, workers: int) -> tuple[float, float, float, dict]:
    """`run_ours` in a process of its own, so its peak RSS is its own."""
    wall, cpu, rss, out = measured(
        [sys.executable, __file__, "--run-ours", str(store), "--workers", str(workers)]
    )
    return wall, cpu, rss, json.loads(out)


def run_ours(store: Path, workers: int) -> tuple[float, float, dict]:
    pol = RetentionPolicy(
        name="bench", keep=KeepRules(tags=("*",)), untagged="delete", grace=0, mode="storage"
    )
    t, c = time.monotonic(), cpu_self()
    res = collect_storage_sync(
        store,
        None,
        StorageGCOptions(
            grace=0,
            quarantine_window=0,
            upload_grace=0,
            assume_no_cache=True,
            policies=[pol],
            workers=workers,
        ),
    )
    elapsed, cpu = time.monotonic() - t, cpu_self() - c
    assert not res.errors, res.errors
    return (
        elapsed,
        cpu,
        {
            "timings": {k: round(v, 3) for k, v in res.timings.items()},
            "manifests_deleted": res.manifests_deleted,
            "links_deleted": res.links_deleted,
            "uploads": res.uploads_deleted,
        },
    )


def verify_complete(root: Path) -> int:
    """Every revision and tag resolvable on disk: the registry could serve it."""
    layout = StoreLayout(root)
    checked = 0
    for repo in layout.list_repositories():
        snap = layout.scan_repository(repo)
        for tag, (digest, _m) in snap.tags.items():
            assert digest in snap.revisions, f"{repo}:{tag} -> {digest} has no revision"
        for digest in snap.revisions:
            raw = layout.read_blob(digest, 4 << 20)
            assert raw is not None, f"{repo}@{digest}: manifest data missing"
            node = manifest_node(raw)
            assert node is not None
            for child in node.children:
                assert child in snap.revisions, f"{repo}@{digest}: child {child} missing"
            for b in node.blobs:
                assert layout.blob_stat(b) is not None, f"{repo}@{digest}: blob {b} missing"
                assert b in snap.layers, f"{repo}@{digest}: no layer link for {b}"
            checked += 1
    return checked


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifests", type=int, default=6000)
    ap.add_argument("--repos", type=int, default=100)
    ap.add_argument("--pool", type=int, default=3000, help="shared layers (0-2 per image)")
    ap.add_argument("--orphans", type=int, default=1000, help="blobs nothing links to")
    ap.add_argument("--uploads", type=int, default=50, help="abandoned upload sessions")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    ap.add_argument("--keep", action="store_true", help="keep the temp directory")
    ap.add_argument("--run-ours", type=Path, help=argparse.SUPPRESS)  # the measured child
    args = ap.parse_args()
    if args.run_ours:
        print(json.dumps(run_ours(args.run_ours, args.workers)[2]))
        return

    work = Path(tempfile.mkdtemp(prefix="bench-gc-"))
    try:
        base = work / "store"
        t = time.monotonic()
        st = generate(
            base,
            manifests=args.manifests,
            repos=args.repos,
            pool=args.pool,
            orphans=args.orphans,
            uploads=args.uploads,
        )
        print(
            f"store: {st.manifests} manifests ({st.tagged} tagged, {st.untagged} untagged, "
            f"{st.deleted} deleted via API), {len(st.blobs)} blobs, {st.orphans} orphan "
            f"blobs, {st.uploads} stale uploads; generated in {time.monotonic() - t:.1f}s"
        )
        before = blob_sizes(base)
        ours_t, theirs_t, ours_c, theirs_c = [], [], [], []
        ours_rss, theirs_rss = [], []
        verified = 0
        ours_left = theirs_left = None
        kept: dict[str, list[frozenset[str]]] = {"ours": [], "theirs": []}
        detail: dict = {}
        for n in range(args.repeat):
            for side in ("ours", "theirs") if n % 2 == 0 else ("theirs", "ours"):
                copy = work / f"{side}-{n}"
                subprocess.run(["cp", "-a", str(base), str(copy)], check=True)
                if side == "ours":
                    elapsed, cpu, rss, detail = run_ours_measured(copy, args.workers)
                    ours_rss.append(rss)
                    ours_t.append(elapsed)
                    ours_c.append(cpu)
                    ours_left = blob_sizes(copy)
                    kept["ours"].append(frozenset(ours_left))
                    if n == 0:
                        verified = verify_complete(copy)
                else:
                    elapsed, cpu, rss = run_theirs(copy, work)
                    theirs_rss.append(rss)
                    theirs_t.append(elapsed)
                    theirs_c.append(cpu)
                    theirs_left = blob_sizes(copy)
                    kept["theirs"].append(frozenset(theirs_left))
                shutil.rmtree(copy)
        assert ours_left is not None and theirs_left is not None
        ours_del = before.keys() - ours_left.keys()
        theirs_del = before.keys() - theirs_left.keys()
        mo, mt = statistics.median(ours_t), statistics.median(theirs_t)
        print(f"load average at end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
        print(f"{'':24}{'ours':>12}{'distribution':>14}")
        print(
            f"{'wall time (median)':24}{mo:>11.2f}s{mt:>13.2f}s   ratio ours/theirs = {mo / mt:.2f}"
        )
        co, ct = statistics.median(ours_c), statistics.median(theirs_c)
        print(
            f"{'cpu time user+sys (med)':24}{co:>11.2f}s{ct:>13.2f}s   ratio ours/theirs "
            f"= {co / ct:.2f}"
        )
        print(f"{'peak RSS (max)':24}{max(ours_rss):>10.0f}MB{max(theirs_rss):>12.0f}MB")
        print(
            f"all wall times: ours {[round(x, 2) for x in ours_t]}, "
            f"distribution {[round(x, 2) for x in theirs_t]}"
        )
        print(f"{'blobs kept':24}{len(ours_left):>12}{len(theirs_left):>14}")
        print(f"{'blobs reclaimed':24}{len(ours_del):>12}{len(theirs_del):>14}")
        print(
            f"{'bytes reclaimed (blobs)':24}{sum(before[d] for d in ours_del):>12}"
            f"{sum(before[d] for d in theirs_del):>14}"
        )
        print(
            f"ours also removed {detail['links_deleted']} dangling layer links, "
            f"{detail['uploads']} stale uploads; deleted {detail['manifests_deleted']} "
            f"untagged manifests; phases {detail['timings']}"
        )
        missed = theirs_del - ours_del
        extra = ours_del - theirs_del
        print(f"reclaimed by distribution but not by us: {len(missed)}; by us only: {len(extra)}")
        print(f"after our run: {verified} revisions verified complete on disk")
        runs_differ = len(set(kept["ours"]) | set(kept["theirs"])) != 1
        print(f"kept sets identical across all {2 * args.repeat} runs: {not runs_differ}")
        assert not missed, "we must reclaim at least what distribution reclaims"
        assert not extra, "we must keep everything distribution keeps"
        assert not runs_differ, "every run, ours and distribution's, must keep the same blobs"
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
