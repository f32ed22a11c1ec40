"""A TCP proxy that adds a fixed one-way delay in each direction: a WAN link in a box.

Why: production sites are 30-150 ms apart, and on loopback every round trip is free,
so a tool that makes needless round trips looks as fast as one that does not. Put
this between a client and a registry and each request/answer exchange costs one RTT.

It runs in its own process (its CPU is not billed to the tool measured, and is
printed apart). Bytes are forwarded in order, each chunk released its direction's
delay after it arrived (`--delay-ms` both ways, or `--up-ms` client -> upstream and
`--down-ms` upstream -> client apart: real paths are often asymmetric, and a
request's latency and a body's are then paid on different legs), so bandwidth is not
limited, only latency added. It also counts, per connection, the request/answer *turns*
(client bytes after server bytes): on HTTP/1.1 that is the number of requests, so the
round trips each tool makes can be compared.

Run:   python benchmarks/delay_proxy.py --upstream 127.0.0.1:5000 --delay-ms 25 \\
           [--up-ms 10 --down-ms 40] --port-file /tmp/port --stats /tmp/stats.json
Stop with SIGTERM: it writes the stats (connections, turns, bytes, CPU seconds) as
JSON to --stats and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

CHUNK = 256 * 1024


@dataclass
class Stats:
    connections: int = 0
    turns: int = 0  # client->server bursts that follow a server answer (~ requests)
    bytes_up: int = 0
    bytes_down: int = 0
    cpu_s: float = 0.0


class _Turns:
    """Which side spoke last on one connection."""

    def __init__(self) -> None:
        self.last = "server"


async def _pump(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    delay: float,
    side: str,
    turns: _Turns,
    stats: Stats,
) -> None:
    """Forward `reader` to `writer`, each chunk `delay` seconds after it arrived."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def release() -> None:
        while True:
            due, data = await queue.get()
            if not data:
                break
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    releaser = asyncio.create_task(release())
    try:
        while True:
            data = await reader.read(CHUNK)
            if side == "client" and data and turns.last == "server":
                stats.turns += 1
            if data:
                turns.last = side
                if side == "client":
                    stats.bytes_up += len(data)
                else:
                    stats.bytes_down += len(data)
            await queue.put((loop.time() + delay, data))
            if not data:
                break
        await releaser
    except (ConnectionError, OSError):
        releaser.cancel()


@dataclass(frozen=True)
class Delays:
    """One-way delays in seconds: `up` client -> upstream, `down` upstream -> client."""

    up: float
    down: float

    @classmethod
    def from_ms(cls, delay_ms: float, up_ms: float | None, down_ms: float | None) -> Delays:
        """`delay_ms` each way unless a direction is given on its own."""
        up = delay_ms if up_ms is None else up_ms
        down = delay_ms if down_ms is None else down_ms
        if up < 0 or down < 0:
            raise ValueError(f"a delay cannot be negative (up {up} ms, down {down} ms)")
        return cls(up / 1000.0, down / 1000.0)


async def serve(upstream: tuple[str, int], delays: Delays, port_file: Path, stats: Stats) -> None:
    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        stats.connections += 1
        try:
            server_r, server_w = await asyncio.open_connection(*upstream)
        except OSError:
            client_w.close()
            return
        turns = _Turns()
        try:
            await asyncio.gather(
                _pump(client_r, server_w, delays.up, "client", turns, stats),
                _pump(server_r, client_w, delays.down, "server", turns, stats),
            )
        finally:
            for w in (server_w, client_w):
                w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    tmp = port_file.with_suffix(".tmp")
    tmp.write_text(str(port))
    tmp.rename(port_file)  # readers never see a half-written file
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream", required=True, help="HOST:PORT to forward to")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay, each direction")
    ap.add_argument("--up-ms", type=float, help="client -> upstream delay (default --delay-ms)")
    ap.add_argument("--down-ms", type=float, help="upstream -> client delay (default --delay-ms)")
    ap.add_argument("--port-file", type=Path, required=True, help="where to write our port")
    ap.add_argument("--stats", type=Path, help="where to write the stats at exit (JSON)")
    args = ap.parse_args()
    try:
        delays = Delays.from_ms(args.delay_ms, args.up_ms, args.down_ms)
    except ValueError as exc:
        ap.error(str(exc))
    host, _, port = args.upstream.rpartition(":")
    stats = Stats()
    asyncio.run(serve((host, int(port)), delays, args.port_file, stats))
    times = os.times()
    stats.cpu_s = round(times.user + times.system, 3)
    if args.stats:
        args.stats.write_text(json.dumps(asdict(stats)))


class DelayProxy:
    """Start/stop a delay proxy process from a benchmark: `delay_ms` each way, unless
    `up_ms` (to the upstream) or `down_ms` (back to the client) says otherwise."""

    def __init__(
        self,
        upstream_host: str,
        delay_ms: float,
        work: Path,
        name: str,
        *,
        up_ms: float | None = None,
        down_ms: float | None = None,
    ) -> None:
        self.upstream = upstream_host
        self.delays = Delays.from_ms(delay_ms, up_ms, down_ms)
        self.port_file = work / f"{name}.port"
        self.stats_file = work / f"{name}.stats.json"
        self.proc: asyncio.subprocess.Process | None = None
        self._popen = None
        self.port = 0

    def start(self) -> DelayProxy:
        import subprocess
        import sys

        for f in (self.port_file, self.stats_file):
            f.unlink(missing_ok=True)
        self._popen = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--upstream",
                self.upstream,
                "--up-ms",
                str(self.delays.up * 1000.0),
                "--down-ms",
                str(self.delays.down * 1000.0),
                "--port-file",
                str(self.port_file),
                "--stats",
                str(self.stats_file),
            ]
        )
        deadline = time.monotonic() + 10
        while not self.port_file.exists():
            if time.monotonic() > deadline or self._popen.poll() is not None:
                raise RuntimeError("delay proxy did not start")
            time.sleep(0.01)
        self.port = int(self.port_file.read_text())
        return self

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> Stats:
        assert self._popen is not None
        self._popen.terminate()
        self._popen.wait(timeout=10)
        return Stats(**json.loads(self.stats_file.read_text()))


if __name__ == "__main__":
    main()
