"""Politeness towards one registry: a request-rate token bucket, a byte-rate limiter
(bandwidth, optionally by time window) and retry delays.

Pure timing logic (plus asyncio.sleep), so it is testable without a registry.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo


class TokenBucket:
    """At most `rate` requests per second on average, bursts up to `burst`.

    The default burst of one spaces requests evenly, which is what a
    registry's rate limiter (and its operators) expect from a replicator.
    """

    def __init__(self, rate: float, burst: float = 1.0) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = max(1.0, burst)
        self._tokens = self.burst
        self._last = time.monotonic()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:  # FIFO: waiters are served in arrival order
            while True:
                now = time.monotonic()
                self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
                self._last = now
                if self._tokens >= 1.0:
                    self._tokens -= 1.0
                    return
                await asyncio.sleep((1.0 - self._tokens) / self.rate)


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    now = now or datetime.now(UTC)
    return max(0.0, (when - now).total_seconds())


@dataclass(frozen=True, slots=True)
class RateWindow:
    """A weekly window with its own byte rate. `opens` > `closes` spans midnight and
    belongs to the day it opens (fri 22:00-06:00 covers Saturday morning)."""

    days: frozenset[int]  # 0 = Monday, as datetime.weekday()
    opens: int  # minutes after midnight
    closes: int  # minutes after midnight, up to 1440
    limit: int  # bytes per second

    def contains(self, when: datetime) -> bool:
        minute, day = when.hour * 60 + when.minute, when.weekday()
        if self.opens < self.closes:
            return day in self.days and self.opens <= minute < self.closes
        return (day in self.days and minute >= self.opens) or (
            (day - 1) % 7 in self.days and minute < self.closes
        )


@dataclass(frozen=True, slots=True)
class BandwidthSchedule:
    """A site's byte-rate cap: `default` (None: unlimited) except inside a window.
    Windows are read in `tz`, the configuration's `timezone` (DST included)."""

    default: int | None = None
    windows: tuple[RateWindow, ...] = ()
    tz: tzinfo = UTC

    def rate_at(self, when: datetime) -> int | None:
        local = when.astimezone(self.tz)
        for window in self.windows:
            if window.contains(local):
                return window.limit
        return self.default

    @property
    def limited(self) -> bool:
        return self.default is not None or bool(self.windows)


class ByteRateLimiter:
    """Bytes per second through one site, shared by every transfer to or from it.

    A virtual-clock bucket (GCRA): each `take(n)` reserves the next `n / rate`
    seconds of the link and sleeps until its reservation ends, so callers pay
    before they send (or hand on what they received) and are served in call
    order, with no lock and no polling. Up to `burst` seconds of unused link
    are credited after a pause. Bound to no event loop, so one limiter per site
    serves the whole process. The rate is read from the schedule at each call.
    """

    def __init__(
        self,
        schedule: BandwidthSchedule,
        *,
        burst: float = 0.05,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        self.schedule = schedule
        self.burst = burst
        self._now = now or (lambda: datetime.now(UTC))
        self._free_at = 0.0  # monotonic time at which every reservation so far ends
        self.waited = 0.0  # seconds callers slept here (for stats and tests)

    def reserve(self, n: int, at: float) -> float:
        """Reserve `n` bytes at monotonic time `at`; returns the seconds to wait."""
        rate = self.schedule.rate_at(self._now())
        if rate is None or n <= 0:
            return 0.0
        self._free_at = max(self._free_at, at - self.burst) + n / rate
        return max(0.0, self._free_at - at)

    async def take(self, n: int) -> None:
        delay = self.reserve(n, time.monotonic())
        if delay > 0:
            self.waited += delay
            await asyncio.sleep(delay)


_shared: dict[tuple[str, str], ByteRateLimiter] = {}


def bandwidth_for(
    site: str, url: str, schedule: BandwidthSchedule | None
) -> ByteRateLimiter | None:
    """The process-wide limiter of site `site` at `url` (None when it has no cap), so every
    client, copy and download of the site shares one budget. A changed schedule (a
    reloaded config) replaces the limiter."""
    key = (site, url)
    if schedule is None or not schedule.limited:
        _shared.pop(key, None)
        return None
    limiter = _shared.get(key)
    if limiter is None or limiter.schedule != schedule:
        limiter = _shared[key] = ByteRateLimiter(schedule)
    return limiter
