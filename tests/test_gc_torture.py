"""THE online torture test: pushes, re-pushes of just-unreferenced layers and deletes run
against a live registry while storage GC runs over and over. Afterwards every tag and
every manifest revision that exists must be complete: zero broken images."""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from replicator.gc.layout import StoreLayout
from replicator.gc.storage import (
    GCResult,
    StorageGCOptions,
    collect_storage,
    collect_storage_sync,
)
from replicator.journal import Journal
from replicator.registry.client import RegistryClient
from replicator.registry.site import SiteEndpoint
from tests.harness.images import ACCEPT, Pusher, assert_image_complete, layer_bytes
from tests.harness.journal import sql

DURATION = float(os.environ.get("GC_TORTURE_SECONDS", "10"))
REPOS = ("t/a", "t/b", "c")
TAGS = ("v1", "v2", "v3", "latest", "dev")
SEEDS = [f"pool-{i}" for i in range(10)]


@pytest.mark.slow
@pytest.mark.parametrize(
    "settle",
    [True, False],
    ids=["settle-in-one-run", "quarantine-then-a-later-run-settles"],
)
def test_online_gc_torture(registry, tmp_path, settle: bool) -> None:
    """`settle=False` is the CLI's two-run form: each run either quarantines and exits,
    waits (its predecessor's items not yet due) or settles its predecessor."""
    reg = registry
    stop = threading.Event()
    stats: Counter[str] = Counter()
    lock = threading.Lock()
    deleted: list[tuple[float, str, list[str]]] = []  # (when, repo, layer seeds)
    failures: list[BaseException] = []

    pushed: dict[str, list[str]] = {}  # manifest digest -> layer seeds
    counter = iter(range(10**9))

    def push(p: Pusher, repo: str, tag: str, seeds: list[str]) -> None:
        img = p.push_image(repo, tag, [layer_bytes(s, 600) for s in seeds])
        with lock:
            pushed[img.digest] = seeds

    def worker(n: int) -> None:
        rng = random.Random(n)
        with Pusher(reg.url) as p:
            while not stop.is_set():
                op = rng.random()
                repo = rng.choice(REPOS)
                try:
                    if op < 0.35:
                        # one layer only this image has (so nothing else heals it if it
                        # broke) plus shared ones
                        seeds = [f"u-{n}-{next(counter)}", *rng.sample(SEEDS, rng.randint(0, 2))]
                        push(p, repo, rng.choice(TAGS), seeds)
                        stats["push"] += 1
                    elif op < 0.6:
                        r = p.http.head(
                            f"{reg.url}/v2/{repo}/manifests/{rng.choice(TAGS)}",
                            headers={"accept": ACCEPT},
                        )
                        if r.status_code == 200:
                            digest = r.headers["docker-content-digest"]
                            d = p.http.delete(f"{reg.url}/v2/{repo}/manifests/{digest}")
                            stats[f"delete-{d.status_code}"] += 1
                            with lock:
                                if d.status_code == 202 and digest in pushed:
                                    deleted.append((time.monotonic(), repo, pushed[digest]))
                    elif op < 0.9:
                        # re-push an image deleted a moment ago, once: HEAD says its layers
                        # exist (stale links), the client skips them -> the HEAD race
                        with lock:
                            ripe = [x for x in deleted if time.monotonic() - x[0] > 0.6]
                            pick = rng.choice(ripe) if ripe else None
                            if pick:
                                deleted.remove(pick)
                        if pick:
                            push(p, pick[1], rng.choice(TAGS), pick[2])
                            stats["repush"] += 1
                    else:
                        p.push_multiarch(repo, rng.choice(TAGS), f"ma-{n}-{next(counter)}")
                        stats["multiarch"] += 1
                except httpx.HTTPStatusError as exc:
                    # a push whose blob vanished between HEAD and manifest PUT is refused
                    # by the registry (blob unknown): a client error, never a broken image
                    stats[f"push-refused-{exc.response.status_code}"] += 1
                except Exception as exc:
                    failures.append(exc)
                    return

    journal = Journal(tmp_path / "journal.db")
    gc_totals: Counter[str] = Counter()

    gc_rng = random.Random(99)

    def widen_the_race(phase: str) -> None:
        # adversarial scheduling, not synchronisation: stretch the gap between our last
        # re-check and the quarantine so pushes land inside it
        if phase == "planned":
            time.sleep(gc_rng.uniform(0, 0.15))

    async def one_run() -> GCResult:
        # with the site's API: the live cache probe runs amid the pushes, and a push
        # landing between quarantine and probe must not look like a cache
        async with RegistryClient(SiteEndpoint("t", reg.url, insecure=True)) as api:
            return await collect_storage(
                reg.storage,
                journal,
                StorageGCOptions(
                    grace=0.5,
                    quarantine_window=0.3,
                    upload_grace=5,
                    registry_config=reg.config_path,
                    registry_api=api,
                    workers=4,
                    on_phase=widen_the_race,
                    settle=settle,
                ),
            )

    def collector() -> None:
        try:
            while not stop.is_set():
                res = asyncio.run(one_run())
                gc_totals["runs"] += 1
                gc_totals["blobs_deleted"] += res.blobs_deleted
                gc_totals["restored"] += res.restored
                gc_totals["kept_by_recheck"] += res.kept_by_recheck
                gc_totals["errors"] += len(res.errors)
                gc_totals["cache_probes"] += "cache_probe" in res.timings
                gc_totals["left_waiting"] += bool(res.waiting)
                if res.waiting and not res.quarantined:
                    stop.wait(0.05)  # nothing to do until the window passes: don't spin
        except Exception as exc:
            failures.append(exc)

    with Pusher(reg.url) as p:  # a store to start from
        for repo in REPOS:
            p.push_image(repo, "v1", [layer_bytes(SEEDS[0], 600)])
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    threads.append(threading.Thread(target=collector))
    for t in threads:
        t.start()
    deadline = time.monotonic() + DURATION
    while time.monotonic() < deadline and not failures:
        stop.wait(0.2)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert not failures, failures
    print(f"\ntorture: workers {dict(stats)}; gc {dict(gc_totals)}")
    print(
        "torture: restore reasons",
        sql(
            journal,
            "SELECT kind, error, count(*) AS n FROM gc_candidates WHERE state='restored' "
            "GROUP BY kind, error",
        ),
    )

    # quiescent final run, then the verdict from the registry itself
    collect_storage_sync(
        reg.storage,
        journal,
        StorageGCOptions(grace=0.5, quarantine_window=0.1, registry_config=reg.config_path),
    )
    layout = StoreLayout(reg.storage)
    refs = []
    for repo in layout.list_repositories():
        snap = layout.scan_repository(repo)
        refs += [(repo, ref) for ref in [*snap.tags, *snap.revisions]]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda rr: assert_image_complete(reg.url, *rr), refs))
    checked = len(refs)
    print(f"torture: verified {checked} tags and revisions complete")
    assert checked > 10
    assert gc_totals["runs"] >= 3 and gc_totals["blobs_deleted"] > 0, gc_totals
    assert gc_totals["cache_probes"] > 0, gc_totals
    if not settle:  # the two-run path was taken, not just the one-run one
        assert gc_totals["left_waiting"] > 0, gc_totals
    assert stats["repush"] > 0 and stats["delete-202"] > 0
    journal.close()
