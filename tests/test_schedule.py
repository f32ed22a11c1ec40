"""Schedule timing (pure) and the Periodic runner: cron and interval, no overlap, stop."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from replicator.daemon.schedule import Periodic, next_run


def test_next_run_interval_and_cron():
    assert next_run(1000.0, interval=30) == 1030.0
    at = datetime(2026, 11, 28, 2, 59, 30, tzinfo=UTC).timestamp()
    nxt = datetime.fromtimestamp(next_run(at, cron="0 3 * * *"), tz=UTC)
    assert (nxt.hour, nxt.minute, nxt.day) == (3, 0, 28)
    after = datetime.fromtimestamp(next_run(nxt.timestamp(), cron="0 3 * * *"), tz=UTC)
    assert after.day == 29
    with pytest.raises(ValueError):
        next_run(0.0)


async def test_periodic_never_overlaps_and_stop_lets_the_run_finish():
    started = asyncio.Event()
    release = asyncio.Event()
    runs = []

    async def job():
        runs.append("start")
        started.set()
        await release.wait()
        runs.append("end")

    periodic = Periodic("job", job, interval=0.01, run_at_start=True)
    loop = asyncio.create_task(periodic.loop())
    await asyncio.wait_for(started.wait(), 5)
    assert await periodic.run_once() is False  # a run is in progress: skipped
    successor = Periodic("job", job, interval=0.01, lock=periodic.running)
    assert await successor.run_once() is False  # the lock is shared across reloads
    periodic.stop()
    release.set()
    await asyncio.wait_for(loop, 5)  # the loop ends after its run
    assert runs == ["start", "end"]
    assert periodic.runs == 1 and periodic.last_error is None


async def test_periodic_records_failures_and_keeps_going():
    calls = 0

    async def flaky():
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("registry down")

    periodic = Periodic("flaky", flaky, interval=0.01)
    assert await periodic.run_once() is True
    assert "registry down" in periodic.last_error
    assert await periodic.run_once() is True
    assert periodic.last_error is None and periodic.runs == 2
