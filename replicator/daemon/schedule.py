"""When periodic jobs run: a fixed interval or a cron expression. Pure timing logic,
plus a small async loop that never runs the same job twice at once.

Cron expressions are read in the configuration's `timezone` (UTC by default), and a
daylight-saving change behaves as cron(8) does: a wall-clock time the spring change
skips runs once, at the first instant after the gap; a time the autumn change repeats
runs once, at its first occurrence, for a fixed-time schedule (minute and hour fields
without `*`, e.g. `30 2 * * *`), while a wildcard schedule (`*/15 * * * *`,
`0 * * * *`) keeps running by the clock through the repeated hour. A nightly GC at
02:30 thus runs exactly once every night of the year.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, tzinfo

from croniter import croniter

log = logging.getLogger(__name__)


def next_run(
    after: float,
    *,
    interval: float | None = None,
    cron: str | None = None,
    tz: tzinfo = UTC,
) -> float:
    """Epoch seconds of the next run strictly after `after`; `cron` is read as wall-clock
    time in `tz` (see the module docstring for daylight-saving changes)."""
    if interval is not None:
        return after + interval
    if cron is not None:
        runs = croniter(cron, datetime.fromtimestamp(after, tz=tz))
        fixed = is_fixed_time(cron)
        while True:
            due = float(runs.get_next(float))
            # fromtimestamp sets fold=1 on the second occurrence of a repeated time
            if not (fixed and datetime.fromtimestamp(due, tz=tz).fold):
                return due
    raise ValueError("a schedule needs an interval or a cron expression")


def is_fixed_time(cron: str) -> bool:
    """A cron schedule at fixed wall-clock times: neither its minute nor its hour field
    is a wildcard (cron(8)'s distinction for the repeated hour of a DST change)."""
    fields = cron.split()
    return len(fields) >= 2 and not any(f.startswith("*") for f in fields[:2])


class Periodic:
    """Runs `job` on a schedule until stopped; a run still going when the next is due
    is not started twice (the next run waits for the schedule after it ends)."""

    def __init__(
        self,
        name: str,
        job: Callable[[], Awaitable[object]],
        *,
        interval: float | None = None,
        cron: str | None = None,
        tz: tzinfo = UTC,
        run_at_start: bool = False,
        jitter: float = 0.0,
        lock: asyncio.Lock | None = None,
    ) -> None:
        self.name = name
        self.job = job
        self.interval = interval
        self.cron = cron
        self.tz = tz
        self.run_at_start = run_at_start
        self.jitter = jitter
        # shared with the Periodic this one replaces on reload: never two runs at once
        self.running = lock or asyncio.Lock()
        self._stopped = False
        self.last_started: float | None = None
        self.last_finished: float | None = None
        self.last_error: str | None = None
        self.runs = 0
        self._kick = asyncio.Event()

    def stop(self) -> None:
        """End the loop without interrupting a run in progress (it finishes first)."""
        self._stopped = True
        self._kick.set()

    def trigger(self) -> None:
        """Run as soon as possible (e.g. after a failover or a reload)."""
        self._kick.set()

    async def run_once(self) -> bool:
        """Run now unless a run is in progress; False if it was skipped."""
        if self.running.locked():
            return False
        async with self.running:
            self.last_started = time.time()
            try:
                await self.job()
                self.last_error = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("%s failed: %s", self.name, self.last_error)
            finally:
                self.runs += 1
                self.last_finished = time.time()
        return True

    async def loop(self) -> None:
        if self.run_at_start:
            await self.run_once()
        while not self._stopped:
            due = next_run(time.time(), interval=self.interval, cron=self.cron, tz=self.tz)
            due += random.uniform(0, self.jitter) if self.jitter else 0.0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), max(0.0, due - time.time()))
            self._kick.clear()
            if not self._stopped:
                await self.run_once()
