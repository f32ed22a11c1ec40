"""Push-to-replica latency through the real daemon (issue: the daemon).

Three real registries a, b, c, all notifying one `registry-replicator run` process
(a subprocess, journal on disk) whose rule copies bench/** from a to b and c. The
pusher sends N small images (config + one 1 KB layer, all unique) to a at a fixed
rate; each push is timestamped when its manifest PUT returns. For every image and
target an asyncio poller HEADs the manifest by tag (raw HTTP/1.1, kept alive) until it
answers 200, every max(--poll-interval, --poll-error x time waited so far), so the
error is bounded and a backlog does not turn the pollers into the registries' main
load; latency is that first success minus the push time. The pusher is a separate
process so its GIL does not delay the pollers. A registry refuses a manifest whose blobs are
missing, so a visible manifest implies a complete image; a sample is also verified
fully (every blob fetched and digest-checked) at the end.

The daemon's journal then splits each latency into stages, for profiling:
  notify  push returned -> intake journaled the registry's manifest event
  plan    event journaled -> task row created (bus + planner + enqueue)
  run     task created -> task done (lease wait + copy + complete)
  seen    task done -> our poller saw it (negative: visible before 'done' was written)
and prints every process's CPU seconds: on a small machine the total CPU per image,
not any one stage, decides the sustainable push rate.

The defaults are issue 15's conditions: 10 pushes/s, 2 targets, the bus over MQTT
(`--no-mqtt` for the in-process bus).

    .venv/bin/python benchmarks/bench_latency.py [--images 200] [--rate 10] [--no-mqtt]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import random
import resource
import sqlite3
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.harness.daemon import DaemonProcess, notify_kwargs, site_config  # noqa: E402
from tests.harness.images import ACCEPT, Pusher, assert_image_complete  # noqa: E402
from tests.harness.registry import Registry  # noqa: E402
from tests.harness.util import cpu_seconds, free_port  # noqa: E402

TARGETS = ("b", "c")
GOAL_P50, GOAL_P99 = 0.250, 1.0  # issue 15: at 10 pushes/s over MQTT, 2 targets


class BenchRegistry(Registry):
    """A registry notifying as the README's distribution snippet says (pulls ignored:
    2.8 sends them anyway), optionally without blob events."""

    def __init__(self, *args: Any, ignore_blob_events: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ignore_blob_events = ignore_blob_events

    def config(self) -> dict:
        cfg = super().config()
        for endpoint in cfg.get("notifications", {}).get("endpoints", []):
            endpoint["ignore"] = {"actions": ["pull"]}
            if self.ignore_blob_events:
                endpoint["ignoredmediatypes"] = ["application/octet-stream"]
        return cfg


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * len(s) + 0.5) - 1))]


def summary(values: list[float]) -> str:
    if not values:
        return "n/a"
    return (
        f"p50 {pct(values, 0.5) * 1000:7.1f}  p90 {pct(values, 0.9) * 1000:7.1f}  "
        f"p99 {pct(values, 0.99) * 1000:7.1f}  max {max(values) * 1000:7.1f} ms"
    )


class RawHead:
    """HEAD requests over kept-alive raw HTTP/1.1 connections to one registry. httpx costs
    about a millisecond of CPU per request; thousands of polls with it would steal the CPU
    the daemon and registries need on a small machine and distort what is measured."""

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def status(self, path: str) -> int:
        conn = (
            self._idle.pop() if self._idle else await asyncio.open_connection(self.host, self.port)
        )
        reader, writer = conn
        writer.write(
            f"HEAD {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Accept: {ACCEPT}\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")  # a HEAD answer has no body
        status = int(head.split(b" ", 2)[1])
        if b"\r\nconnection: close" in head.lower():
            writer.close()
        else:
            self._idle.append(conn)
        return status

    def close(self) -> None:
        for _, writer in self._idle:
            writer.close()


def push_process(
    url: str, images: int, rate: float, repos: int, layer_bytes: int, out: Connection
) -> None:
    """A separate process (its own GIL): one push every 1/rate s on a fixed schedule,
    sending (index, repo, tag, time the manifest PUT returned) for each."""
    rnd = random.Random(7)
    with Pusher(url) as p:
        start = time.monotonic()
        for i in range(images):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # pacing the load generator, not synchronisation
            repo, tag = f"bench/app{i % repos:02d}", f"v{i}"
            p.push_image(repo, tag, [rnd.randbytes(layer_bytes)])
            out.send((i, repo, tag, time.time()))
    out.send(None)
    out.close()


class Bench:
    def __init__(self, args: argparse.Namespace, urls: dict[str, str]) -> None:
        self.args = args
        self.urls = urls
        self.pushed: dict[int, tuple[str, str, float]] = {}  # i -> (repo, tag, t_push)
        self.seen: dict[tuple[int, str], float] = {}  # (i, target) -> t_seen
        self.polls = 0
        self.failed: list[str] = []

    async def watch(self, client: RawHead, i: int, target: str) -> None:
        repo, tag, t_push = self.pushed[i]
        path = f"/v2/{repo}/manifests/{tag}"
        deadline = t_push + self.args.timeout
        while True:
            status = await client.status(path)
            self.polls += 1
            if status == 200:
                self.seen[(i, target)] = time.time()
                return
            if time.time() > deadline:
                self.failed.append(f"{repo}:{tag} never appeared on {target}")
                return
            # bounded relative error instead of a fixed rate: a backlog must not turn the
            # pollers into the registries' main load (HEADs cost them CPU too)
            await asyncio.sleep(
                max(self.args.poll_interval, self.args.poll_error * (time.time() - t_push))
            )

    async def run(self) -> float:
        loop = asyncio.get_running_loop()
        clients = {t: RawHead(self.urls[t]) for t in TARGETS}
        watchers: list[asyncio.Task] = []
        finished = asyncio.Event()
        receive, send = multiprocessing.Pipe(duplex=False)
        pusher = multiprocessing.get_context("spawn").Process(
            target=push_process,
            args=(
                self.urls["a"],
                self.args.images,
                self.args.rate,
                self.args.repos,
                self.args.layer_bytes,
                send,
            ),
        )

        def on_readable() -> None:
            while receive.poll():
                msg = receive.recv()
                if msg is None:
                    loop.remove_reader(receive.fileno())
                    finished.set()
                    return
                i, repo, tag, t_push = msg
                self.pushed[i] = (repo, tag, t_push)
                for target in TARGETS:
                    watchers.append(loop.create_task(self.watch(clients[target], i, target)))

        start = time.monotonic()
        loop.add_reader(receive.fileno(), on_readable)
        pusher.start()
        send.close()
        await finished.wait()
        push_wall = time.monotonic() - start
        await asyncio.gather(*watchers)
        pusher.join(10)
        for client in clients.values():
            client.close()
        return push_wall


def stages(db: Path, bench: Bench) -> dict[str, list[float]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    events = {
        (r[0], r[1]): r[2]
        for r in conn.execute(
            "SELECT repository, tag, received_at FROM events WHERE site='a' AND is_manifest=1 "
            "AND action='push' AND tag IS NOT NULL"
        )
    }
    tasks = {
        (r[0], r[1], r[2]): (r[3], r[4], r[5])
        for r in conn.execute(
            "SELECT repository, tag, target_site, created_at, updated_at, state FROM tasks"
        )
    }
    conn.close()
    out: dict[str, list[float]] = {"notify": [], "plan": [], "run": [], "seen": []}
    for i, (repo, tag, t_push) in bench.pushed.items():
        received = events.get((repo, tag))
        if received is None:
            continue
        out["notify"].append(received - t_push)
        for target in TARGETS:
            task = tasks.get((repo, tag, target))
            if task is None or task[2] != "done":
                continue
            out["plan"].append(task[0] - received)
            out["run"].append(task[1] - task[0])
            if (i, target) in bench.seen:
                out["seen"].append(bench.seen[(i, target)] - task[1])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--rate", type=float, default=10.0, help="pushes per second")
    ap.add_argument("--repos", type=int, default=10, help="images spread over N repositories")
    ap.add_argument("--layer-bytes", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=8, help="daemon --workers")
    ap.add_argument(
        "--site-concurrency",
        type=int,
        default=8,
        help="sites' limits.concurrency (requests in flight per registry)",
    )
    ap.add_argument(
        "--mqtt",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="event bus over a real Mosquitto (default; --no-mqtt: in-process)",
    )
    ap.add_argument(
        "--broker-save-every-change",
        action="store_true",
        help="keep the test harness's Mosquitto persistence (state saved after "
        "every change) instead of periodic saving",
    )
    ap.add_argument(
        "--broker-nodelay",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Mosquitto set_tcp_nodelay (default on: with Nagle a PUBACK queued "
        "behind a delivery on the same connection waits for a delayed ACK)",
    )
    ap.add_argument(
        "--quiet-targets",
        action="store_true",
        help="b and c send no webhooks (by default all three sites notify, "
        "so the daemon also filters the echo of its own copies)",
    )
    ap.add_argument(
        "--ignore-blob-events",
        action="store_true",
        help="registries send no blob events (ignoredmediatypes: application/octet-stream); "
        "replication starts from manifest pushes only",
    )
    ap.add_argument("--poll-interval", type=float, default=0.01, metavar="SECONDS")
    ap.add_argument(
        "--poll-error",
        type=float,
        default=0.05,
        metavar="FRACTION",
        help="poll no more often than this fraction of the time waited so far",
    )
    ap.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS")
    ap.add_argument("--verify", type=int, default=20, help="images fully verified per target")
    ap.add_argument(
        "--daemon-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the daemon process (experiments)",
    )
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (logs, journal)")
    args = ap.parse_args(argv)

    tmp_ctx = tempfile.TemporaryDirectory(prefix="bench-latency-")
    root = Path(args.keep) if args.keep else Path(tmp_ctx.name)
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    regs: dict[str, Registry] = {}
    broker = None
    daemon = None
    try:
        for name in ("a", *TARGETS):
            notify = name == "a" or not args.quiet_targets
            regs[name] = BenchRegistry(
                root=root / name,
                ignore_blob_events=args.ignore_blob_events,
                **(notify_kwargs(port, name) if notify else {}),
            ).start()
        config: dict = {
            "sites": {
                n: site_config(r, limits={"concurrency": args.site_concurrency})
                for n, r in regs.items()
            },
            "rules": [
                {"name": "hub", "from": "a", "to": list(TARGETS), "repositories": ["bench/**"]}
            ],
        }
        if args.mqtt:
            from tests.harness.mosquitto import Mosquitto

            class BenchMosquitto(Mosquitto):
                """The test harness saves the broker's state after every change (so a
                kill loses nothing); a production broker saves periodically."""

                def write_config(self) -> None:
                    super().write_config()
                    text = self.config_path.read_text()
                    if args.broker_nodelay:
                        text += "set_tcp_nodelay true\n"
                    if not args.broker_save_every_change:
                        text = text.replace(
                            "autosave_on_changes true", "autosave_on_changes false"
                        ).replace("autosave_interval 1\n", "autosave_interval 1800\n")
                    self.config_path.write_text(text)

            broker = BenchMosquitto(root=root / "mosquitto").start()
            config["mqtt"] = {"url": broker.url, "topic": "registry/events"}  # as shipped
        daemon = DaemonProcess(
            root / "daemon",
            config=config,
            port=port,
            name="bench",
            extra_args=["--workers", str(args.workers)],
            env=dict(e.split("=", 1) for e in args.daemon_env),
        )
        daemon.start()
        if args.mqtt:  # readiness includes the broker connection and subscription
            deadline = time.monotonic() + 20
            while httpx.get(f"{daemon.url}/readyz").status_code != 200:
                if time.monotonic() > deadline:
                    raise RuntimeError("daemon never became ready")
                time.sleep(0.05)

        bench = Bench(args, {n: r.url for n, r in regs.items()})
        load_before = Path("/proc/loadavg").read_text().split()[0]
        push_wall = asyncio.run(bench.run())
        cpu = {
            name: _cpu_seconds(proc)
            for name, proc in [("daemon", daemon.proc), *((n, r.proc) for n, r in regs.items())]
        }
        cpu["pollers"] = _own_cpu_seconds()
        hook_sum, hook_count = _webhook_seconds(daemon)

        # a sample verified fully: every blob fetched and its digest checked
        sample = random.Random(1).sample(sorted(bench.pushed), min(args.verify, args.images))
        for i in sample:
            repo, tag, _ = bench.pushed[i]
            for target in TARGETS:
                assert_image_complete(regs[target].url, repo, tag)

        print(
            f"bench_latency: {args.images} images at {args.rate:g}/s "
            f"(pushed in {push_wall:.1f} s) to a, replicated to {', '.join(TARGETS)}; "
            f"bus: {'MQTT (Mosquitto)' if args.mqtt else 'in-process'}; "
            f"workers {args.workers}; poll every max({args.poll_interval * 1000:g} ms, "
            f"{args.poll_error:.0%} of the wait) ({bench.polls} HEADs)"
        )
        ok = not bench.failed
        for target in TARGETS:
            lat = [
                bench.seen[(i, target)] - bench.pushed[i][2]
                for i in bench.pushed
                if (i, target) in bench.seen
            ]
            print(f"  push -> complete on {target}: n={len(lat)}  {summary(lat)}")
            if lat and (pct(lat, 0.5) > GOAL_P50 or pct(lat, 0.99) > GOAL_P99):
                ok = False
        print("  stages (from the daemon's journal):")
        for name, values in stages(daemon.root / "bench.db", bench).items():
            print(f"    {name:6s} {summary(values)}")
        if hook_count:
            print(
                f"  webhook POSTs answered by the daemon: {hook_count:.0f}, mean "
                f"{hook_sum / hook_count * 1000:.1f} ms each"
            )
        print(
            "  CPU seconds over the run: "
            + ", ".join(f"{name} {sec:.1f}" for name, sec in cpu.items() if sec is not None)
            + f" (wall {push_wall:.1f} s + drain; load average before: {load_before})"
        )
        print(f"  verified complete: {len(sample)} images x {len(TARGETS)} targets")
        for line in bench.failed[:10]:
            print(f"  FAILED: {line}")
        print(
            f"  goals p50 <= {GOAL_P50 * 1000:.0f} ms, p99 <= {GOAL_P99 * 1000:.0f} ms: "
            f"{'met' if ok else 'MISSED'}"
        )
        return 0 if ok else 1
    finally:
        if daemon is not None:
            daemon.stop()
        if broker is not None:
            broker.stop()
        for reg in regs.values():
            reg.stop()
        tmp_ctx.cleanup()


def _cpu_seconds(proc) -> float | None:
    """User + system CPU of a child process so far (Linux /proc)."""
    if proc is None:
        return None
    try:
        return cpu_seconds(proc.pid)
    except OSError:
        return None


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _webhook_seconds(daemon: DaemonProcess) -> tuple[float, float]:
    """Sum and count of the daemon's webhook handling times (its /metrics histogram)."""
    total = count = 0.0
    for line in daemon.metrics().splitlines():
        if line.startswith("registry_replicator_webhook_duration_seconds_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("registry_replicator_webhook_duration_seconds_count"):
            count += float(line.rsplit(" ", 1)[1])
    return total, count


if __name__ == "__main__":
    sys.exit(main())
