"""Webhook intake throughput: single-event POSTs from concurrent clients to real uvicorn.

The server runs in its own process (as the daemon would) with the journal on disk;
the clients share the machine, so the number is a floor for a dedicated host.
Every event is unique, so every request is a journal write plus a hand-over.

    /work/.venv/bin/python benchmarks/bench_intake.py [--events 4000] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

TOKEN = "bench-token"
SAMPLE = Path(__file__).resolve().parent.parent / "tests/data/distribution-2.8-push.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(journal_path: str, port: int, group_commit: bool, sync_full: bool) -> None:
    import logging

    import uvicorn

    from replicator.daemon.intake import GroupCommit, SiteIntake, create_app
    from replicator.journal import Journal
    from replicator.metrics import Metrics

    if not group_commit:  # for comparison: one transaction per request

        async def record(self, events):
            self.commits += 1
            return await self.journal.events.record(events)

        GroupCommit.record = record

    logging.basicConfig(level=logging.WARNING)
    # synchronous=FULL: fsync every commit, what power-loss durability would cost
    journal = Journal(journal_path, synchronous="FULL" if sync_full else "NORMAL")
    handed = 0

    async def on_events(events):  # stands in for the event bus hand-over
        nonlocal handed
        handed += len(events)

    app = create_app(
        sites={"eu": SiteIntake("eu", TOKEN)},
        journal=journal,
        on_events=on_events,
        metrics=Metrics(),
    )

    async def with_stats(scope, receive, send):  # GET /bench-commits: transactions so far
        if scope["type"] == "http" and scope["path"] == "/bench-commits":
            body = str(app.state.group_commit.commits).encode()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": body})
            return
        await app(scope, receive, send)

    uvicorn.run(
        with_stats,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="off",
    )


async def _run(url: str, events: int, concurrency: int) -> tuple[float, list[float]]:
    template = json.loads(SAMPLE.read_bytes())
    bodies = []
    for i in range(events):
        template["events"][0]["id"] = f"bench-{i}"
        bodies.append(json.dumps(template).encode())
    headers = {
        "authorization": f"Bearer {TOKEN}",
        "content-type": "application/vnd.docker.distribution.events.v1+json",
    }
    latencies: list[float] = []
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            body = queue.get_nowait()
            t0 = time.perf_counter()
            r = await client.post("/events/eu", content=body, headers=headers)
            latencies.append(time.perf_counter() - t0)
            if r.status_code != 202:
                raise RuntimeError(f"unexpected {r.status_code}: {r.text}")

    # One client (one keep-alive connection) per sender, like separate registries; a
    # single shared httpx pool spends more CPU on its own bookkeeping than the server.
    clients = [
        httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=1))
        for _ in range(concurrency)
    ]
    try:
        for client in clients:  # warm-up: connections open, server code paths hot
            await client.get("/healthz")
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for client in clients))
        elapsed = time.perf_counter() - start
    finally:
        for client in clients:
            await client.aclose()
    return elapsed, latencies


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=4000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument(
        "--no-group-commit",
        action="store_true",
        help="one journal transaction per request, for comparison",
    )
    ap.add_argument(
        "--sync-full",
        action="store_true",
        help="PRAGMA synchronous=FULL (fsync per commit) instead of the journal's NORMAL",
    )
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-intake-") as tmp:
        journal_path = str(Path(tmp) / "journal.db")
        port = _free_port()
        ctx = multiprocessing.get_context("spawn")
        server = ctx.Process(
            target=_serve,
            args=(journal_path, port, not args.no_group_commit, args.sync_full),
            daemon=True,
        )
        server.start()
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or not server.is_alive():
                print("server did not start", file=sys.stderr)
                return 1
            time.sleep(0.05)
        try:
            elapsed, lat = asyncio.run(_run(url, args.events, args.concurrency))
            commits = int(httpx.get(f"{url}/bench-commits").text)
        finally:
            server.terminate()
            server.join(10)

        from replicator.journal import Journal

        j = Journal(journal_path)
        stored = sum(asyncio.run(j.events.counts()).values())
        j.close()

    rate = args.events / elapsed
    lat.sort()
    p99 = lat[int(len(lat) * 0.99) - 1] * 1000
    print(
        f"intake: {args.events} single-event POSTs, concurrency {args.concurrency}, "
        f"journal on disk: {rate:.0f} events/s "
        f"(p50 {statistics.median(lat) * 1000:.1f} ms, p99 {p99:.1f} ms, "
        f"journaled {stored} in {commits} commits)"
    )
    return 0 if stored == args.events else 1


if __name__ == "__main__":
    sys.exit(main())
