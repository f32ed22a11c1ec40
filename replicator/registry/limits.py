"""Politeness towards one registry: a request-rate token bucket, a byte-rate limiter
(bandwidth, optionally by time window), a pull budget and retry delays.

Pure timing logic (plus asyncio.sleep), so it is testable without a registry.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import Any

log = logging.getLogger("replicator.registry")


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


_RATELIMIT = re.compile(r"^\s*(\d+)\s*(?:;\s*w\s*=\s*(\d+(?:\.\d+)?))?")


def parse_ratelimit(value: str | None) -> tuple[int, float | None] | None:
    """`100;w=21600` -> (100, 21600.0): a count and its window in seconds (Docker Hub's
    `ratelimit-limit` / `ratelimit-remaining`); None when absent or unreadable."""
    m = _RATELIMIT.match(value or "")
    if not m:
        return None
    return int(m.group(1)), float(m.group(2)) if m.group(2) else None


def is_pull(method: str, url: str) -> bool:
    """Whether a request spends a pull on Docker Hub: a manifest GET (a HEAD does not)."""
    return method == "GET" and "/manifests/" in url


# Answers {ratelimit headers} of a free request (a HEAD), or None when it failed.
Probe = Callable[[], Awaitable[Mapping[str, str] | None]]


class PullBudget:
    """A registry's pull budget (Docker Hub: `ratelimit-limit: 100;w=21600` and
    `ratelimit-remaining` on manifest answers), spent only as far as it allows.

    Before a pull, `acquire` pauses while the budget is spent, probing with a free
    HEAD (at once, then every window/limit seconds within [min_poll, max_poll])
    until the registry says pulls are available again: waiting is cheaper than
    collecting 429s, which Docker Hub counts against the client too. The estimate
    of what is left is the lowest of what the registry last said (minus pulls still
    in flight) and our own count since, so answers arriving out of order never let
    us overspend; only a probe, the registry's word after its window moved, raises
    it. Until an answer tells whether the registry is metered at all (a 2xx or 429
    with or without the headers), one pull goes at a time, so queued pulls cannot
    all pass before the first answer. A registry without the headers is unmetered.
    """

    def __init__(self, site: str, *, min_poll: float = 0.25, max_poll: float = 60.0) -> None:
        self.site = site
        self.min_poll = min_poll
        self.max_poll = max_poll
        self.limit: int | None = None
        self.window: float | None = None
        self.remaining: int | None = None  # our estimate of pulls left; None: unknown
        self.observed_at: float | None = None  # wall clock of the last header seen
        self.paused_seconds = 0.0
        self._metered: bool | None = None  # None: no answer has told yet
        self._in_flight = 0
        self._probing = False
        # (url, repository) of a manifest a pull found: probes HEAD it
        self.probe_target: tuple[str, str | None] | None = None
        self._changed = asyncio.Event()  # set (and replaced) whenever the state moves

    @property
    def metered(self) -> bool:
        return bool(self._metered)

    async def acquire(self, probe: Probe) -> None:
        """Wait until one more pull fits the budget, and count it as spent."""
        while True:
            if self._metered is None and self._in_flight:
                await self._changed.wait()  # the first answer tells whether to count
            elif self._spent():
                if self._probing:
                    await self._changed.wait()  # another waiter probes for all
                    continue
                self._probing = True
                try:
                    await self._wait_for_budget(probe)
                finally:
                    self._probing = False
                    self._wake()
            else:
                break
        # no await since the checks: nothing else ran in between
        if self._metered and self.remaining is not None:
            self.remaining -= 1
        self._in_flight += 1

    def release(
        self,
        headers: Mapping[str, str] | None,
        status: int | None,
        target: tuple[str, str | None] | None = None,
    ) -> None:
        """After a pull of `target` (url, repository): its answer's headers (None when
        none came) update the estimate."""
        self._in_flight -= 1
        if headers is not None and status is not None and (status < 400 or status == 429):
            self.observe(headers, in_flight=self._in_flight)
            if status < 300 and target:
                self.probe_target = target
        self._wake()

    def observe(self, headers: Mapping[str, str], *, in_flight: int, probe: bool = False) -> None:
        """Learn from an answer's ratelimit headers; none there: the registry is unmetered."""
        limit = parse_ratelimit(headers.get("ratelimit-limit"))
        left = parse_ratelimit(headers.get("ratelimit-remaining"))
        if limit is None or left is None:
            self._metered = False
            return
        self._metered = True
        self.limit, self.window = limit[0], limit[1] or left[1]
        self.observed_at = time.time()
        said = max(0, left[0] - in_flight)  # pulls in flight may not be counted yet
        if probe or self.remaining is None:
            self.remaining = said
        else:
            self.remaining = min(self.remaining, said)

    def snapshot(self) -> dict[str, Any] | None:
        """limit, remaining, window (seconds) and observed_at, or None while unmetered."""
        if not self._metered:
            return None
        return {
            "limit": self.limit,
            "remaining": self.remaining,
            "window": self.window,
            "observed_at": self.observed_at,
        }

    def poll_delay(self) -> float:
        per_pull = self.window / self.limit if self.window and self.limit else 1.0
        return min(self.max_poll, max(self.min_poll, per_pull))

    def _spent(self) -> bool:
        return bool(self._metered) and self.remaining is not None and self.remaining <= 0

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_for_budget(self, probe: Probe) -> None:
        started = time.monotonic()
        logged = False
        delay = 0.0  # the estimate errs low while pulls are in flight: ask at once first
        while self._spent():
            if delay and not logged:
                logged = True
                log.warning(
                    "%s: pull budget spent (%s pulls per %s s); pausing pulls until the "
                    "registry allows more",
                    self.site,
                    self.limit,
                    f"{self.window:g}" if self.window else "?",
                )
            await asyncio.sleep(delay)
            headers = await probe()
            if headers is not None:
                self.observe(headers, in_flight=self._in_flight, probe=True)
            delay = self.poll_delay()
        waited = time.monotonic() - started
        self.paused_seconds += waited
        if logged:
            log.info("%s: pull budget available again after %.1f s", self.site, waited)
