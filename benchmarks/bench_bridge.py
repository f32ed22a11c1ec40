"""The regional MQTT topology under a bridge outage (issue 15, item 6).

Region A: registry a (the source) notifies the intake daemon, on broker A. Region B:
1 or 2 worker daemons on broker B share a group and copy a -> b. Broker A bridges the
event topic tree to B (tests/harness/mqtt_bridge.py: MQTT v3.1.1, persistent bridge
session, QoS 1) through a link that is cut for --outage seconds in the middle of the
pushes. Every daemon runs as the systemd unit runs it, in its own process.

N images (one unique 1 KB layer each) are pushed to a at a steady --rate. Printed per
worker count:
  lost        images not at b at the end (must be 0)
  duplicates  manifest PUTs at b beyond one per image (a proxy counts them), and copy
              tasks done in more than one worker's journal
  throughput  intake-to-done, events/s (an event here is an image's manifest push; its
              blob events ride along): all N over the span from the first received at
              the intake to the last task done; and the drain rate of the backlog the
              outage built (events received while the link was down, over the time from
              the link's return to the last of them done)
  latency     intake -> done for events received before the cut, p50/p99
  CPU         seconds each process used from the first push to the last copy done:
              daemons, brokers, registries, and this script (pusher, link proxy,
              counting proxy); their sum per image bounds the drain rate this machine
              can reach whatever the number of workers

    .venv/bin/python benchmarks/bench_bridge.py [--pushes 100] [--rate 5] [--outage 10]
        [--workers 1,2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.harness.daemon import DaemonProcess, notify_kwargs, site_config  # noqa: E402
from tests.harness.fault_proxy import FaultProxy  # noqa: E402
from tests.harness.images import ACCEPT, Pusher, layer_bytes  # noqa: E402
from tests.harness.mqtt_bridge import BridgedBrokers, regional_daemons  # noqa: E402
from tests.harness.registry import Registry  # noqa: E402
from tests.harness.util import cpu_seconds, free_port, wait_until  # noqa: E402

TOPIC = "registry/events"
GROUP = "replicators"
REPAIR_BOUND = (
    "work queued in a lost machine's journal is lost with it; the periodic reconcile of "
    "the surviving instances copies it within one rule `interval` + its jitter "
    "(min(5 s, interval/10)) + two reconcile runs (the one in progress, then the one "
    "that finds it); `interval` has no default: a rule without interval or schedule is "
    "only repaired by `registry-replicator sync`"
)


class QuietPullsRegistry(Registry):
    """Notifies as the README's distribution snippet says: pull events ignored."""

    def config(self) -> dict:
        cfg = super().config()
        for endpoint in cfg.get("notifications", {}).get("endpoints", []):
            endpoint["ignore"] = {"actions": ["pull"]}
        return cfg


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * len(s) + 0.5) - 1))] if s else float("nan")


def ready(daemon: DaemonProcess) -> bool:
    daemon.healthy()
    try:
        return httpx.get(f"{daemon.url}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def done_tasks(workers: list[DaemonProcess]) -> list[tuple[str, str, float]]:
    """(repository, tag, done at) of every copy task done in region B."""
    return [
        row
        for w in workers
        for row in w.journal_rows(
            "SELECT repository, tag, updated_at FROM tasks WHERE state='done' AND action='copy'"
        )
    ]


def run_topology(args: argparse.Namespace, workers: int, root: Path) -> dict[str, Any]:
    started: list[Any] = []
    try:
        brokers = BridgedBrokers(root / "brokers", topic=TOPIC, save_every_change=False)
        started.append(brokers.start())
        intake_port = free_port()
        a = QuietPullsRegistry(root=root / "a", **notify_kwargs(intake_port, "a")).start()
        b = Registry(root=root / "b").start()
        started += [a, b]
        b_wire = FaultProxy("127.0.0.1", b.port).start()
        started.append(b_wire)
        sites = {"a": site_config(a), "b": site_config(b, url=b_wire.url)}
        rule = {"name": "a-to-b", "from": "a", "to": ["b"], "repositories": ["bench/**"]}
        intake, region_b = regional_daemons(
            root, brokers, sites, rule, intake_port=intake_port, workers=workers, group=GROUP
        )
        for daemon in [*region_b, intake]:
            started.append(daemon.start())
        for daemon in [*region_b, intake]:
            wait_until(lambda d=daemon: ready(d), timeout=30, what=f"{daemon.name} ready")

        pids = {
            "intake": intake.pid,
            **{w.name: w.pid for w in region_b},
            **brokers.pids,
            "registry-a": a.proc.pid,  # type: ignore[union-attr]
            "registry-b": b.proc.pid,  # type: ignore[union-attr]
        }
        cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        own0 = _own_cpu()
        pushed, outage = _push_with_outage(args, a.url, brokers)
        wait_until(
            lambda: len({(r, t) for r, t, _ in done_tasks(region_b)}) >= args.pushes,
            timeout=args.timeout,
            interval=0.2,
            what=f"{args.pushes} copies done in region B",
        )
        cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
        cpu["bench (pusher, proxies)"] = _own_cpu() - own0

        with httpx.Client(timeout=10) as http:
            lost = [
                ref
                for ref in pushed
                if http.head(
                    f"{b.url}/v2/{ref[0]}/manifests/{ref[1]}", headers={"Accept": ACCEPT}
                ).status_code
                != 200
            ]
        puts = Counter(
            r.path for r in b_wire.records if r.method == "PUT" and "/manifests/" in r.path
        )
        done = done_tasks(region_b)
        done_count = Counter((r, t) for r, t, _ in done)
        done_at = {(r, t): at for r, t, at in done}
        received = {
            (r, t): at
            for r, t, at in intake.journal_rows(
                "SELECT repository, tag, received_at FROM events "
                "WHERE action='push' AND tag IS NOT NULL"
            )
        }
        cut, restored = outage
        backlog = [k for k, at in received.items() if cut <= at < restored]
        steady = [done_at[k] - at for k, at in received.items() if at < cut and k in done_at]
        last_done = max(done_at.values())
        drain = [done_at[k] for k in backlog if k in done_at]
        return {
            "workers": workers,
            "pushes": len(pushed),
            "lost": len(lost),
            "duplicate_manifest_puts": sum(n - 1 for n in puts.values() if n > 1),
            "duplicate_tasks_done": sum(n - 1 for n in done_count.values() if n > 1),
            "events_per_s": len(done_at) / (last_done - min(received.values())),
            "backlog_events": len(backlog),
            "backlog_drain_events_per_s": (
                len(drain) / (max(drain) - restored) if drain and max(drain) > restored else None
            ),
            "link_down_s": args.outage,
            "bridge_back_after_s": restored - cut,
            "latency_before_cut_p50_s": pct(steady, 0.5),
            "latency_before_cut_p99_s": pct(steady, 0.99),
            "bridge_connections": brokers.link.connections,
            "cpu_s": cpu,
        }
    finally:
        for part in reversed(started):
            part.stop()


def _push_with_outage(
    args: argparse.Namespace, a_url: str, brokers: BridgedBrokers
) -> tuple[list[tuple[str, str]], tuple[float, float]]:
    """Push at a steady rate; cut the link for --outage seconds in the middle of it.
    Returns the references pushed and (cut, restored) as epoch seconds."""
    span = args.pushes / args.rate
    cut_at = max(0.0, span / 2 - args.outage / 2)
    times: dict[str, float] = {}

    def outage(t0: float) -> None:
        time.sleep(max(0.0, t0 + cut_at - time.monotonic()))  # a schedule, not a sync
        brokers.link.cut()
        times["cut"] = time.time()
        time.sleep(max(0.0, t0 + cut_at + args.outage - time.monotonic()))
        brokers.link.restore()
        brokers.wait_bridge(up=True, timeout=60)
        times["restored"] = time.time()

    pushed: list[tuple[str, str]] = []
    t0 = time.monotonic()
    cutter = threading.Thread(target=outage, args=(t0,), name="outage")
    cutter.start()
    with Pusher(a_url) as p:
        for i in range(args.pushes):
            time.sleep(max(0.0, t0 + i / args.rate - time.monotonic()))
            repo, tag = f"bench/r{i % args.repos}", f"t{i}"
            p.push_image(repo, tag, [layer_bytes(f"bridge-bench-{i}", 1024)])
            pushed.append((repo, tag))
    cutter.join()
    return pushed, (times["cut"], times["restored"])


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _print(result: dict[str, Any]) -> None:
    drain = result["backlog_drain_events_per_s"]
    print(
        f"workers in region B: {result['workers']}\n"
        f"  lost {result['lost']} of {result['pushes']}; duplicates: "
        f"{result['duplicate_manifest_puts']} manifest PUTs, "
        f"{result['duplicate_tasks_done']} tasks done twice\n"
        f"  intake-to-done throughput {result['events_per_s']:.2f} events/s overall; "
        f"the link down {result['link_down_s']:g} s "
        f"(bridge back {result['bridge_back_after_s']:.1f} s after the cut) built a backlog of "
        f"{result['backlog_events']} events, drained at "
        + (f"{drain:.2f} events/s" if drain else "n/a")
        + f"\n  intake -> done before the cut: p50 "
        f"{result['latency_before_cut_p50_s'] * 1000:.0f} ms, p99 "
        f"{result['latency_before_cut_p99_s'] * 1000:.0f} ms\n"
        "  CPU seconds: " + ", ".join(f"{name} {sec:.2f}" for name, sec in result["cpu_s"].items())
    )
    per_image = sum(result["cpu_s"].values()) / result["pushes"]
    print(
        f"  all processes: {per_image * 1000:.0f} ms CPU per image, so {os.cpu_count()} "
        f"cores saturate at about {(os.cpu_count() or 1) / per_image:.0f} images/s"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pushes", type=int, default=100)
    ap.add_argument("--rate", type=float, default=5.0, help="pushes per second")
    ap.add_argument("--outage", type=float, default=10.0, help="seconds the link is cut")
    ap.add_argument("--repos", type=int, default=10, help="images spread over N repositories")
    ap.add_argument("--workers", default="1,2", help="worker daemons in region B, per run")
    ap.add_argument("--timeout", type=float, default=120.0, help="for the copies to finish")
    ap.add_argument("--json", action="store_true", help="also print the results as JSON")
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (logs, journals)")
    args = ap.parse_args(argv)

    tmp = tempfile.TemporaryDirectory(prefix="bench-bridge-")
    root = Path(args.keep) if args.keep else Path(tmp.name)
    print(
        f"bench_bridge: {args.pushes} pushes at {args.rate:g}/s to a, intake on broker A, "
        f"the link A-B cut for {args.outage:g} s in the middle; load average before: "
        f"{Path('/proc/loadavg').read_text().split()[0]}"
    )
    results = []
    try:
        for n in (int(w) for w in args.workers.split(",")):
            results.append(run_topology(args, n, root / f"workers-{n}"))
            _print(results[-1])
    finally:
        tmp.cleanup()
    print(f"a machine lost for good: {REPAIR_BOUND}")
    if args.json:
        print(json.dumps(results, indent=1))
    ok = all(r["lost"] == 0 for r in results)
    print("nothing lost" if ok else "LOST EVENTS")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
