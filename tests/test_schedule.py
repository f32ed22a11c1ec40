"""Schedule timing (pure) and the Periodic runner: cron and interval, no overlap, stop."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

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


# ---- cron in the configured time zone, across daylight-saving changes ------------------

BERLIN = ZoneInfo("Europe/Berlin")  # CET/CEST: +1 h on 2024-03-31 02:00, -1 h on 2024-10-27 03:00
NEW_YORK = ZoneInfo("America/New_York")  # 2024-03-10 02:00 -> 03:00, 2024-11-03 02:00 -> 01:00


def runs(cron: str, start: datetime, n: int, tz) -> list[str]:
    """The next `n` runs after `start`, as local ISO times with their UTC offset."""
    out, at = [], start.timestamp()
    for _ in range(n):
        at = next_run(at, cron=cron, tz=tz)
        out.append(datetime.fromtimestamp(at, tz=tz).isoformat())
    return out


def test_cron_is_read_in_the_time_zone_given():
    winter = datetime(2024, 1, 10, 12, tzinfo=UTC)
    summer = datetime(2024, 7, 10, 12, tzinfo=UTC)
    assert (
        datetime.fromtimestamp(next_run(winter.timestamp(), cron="0 3 * * *", tz=BERLIN), UTC).hour
        == 2
    )
    assert (
        datetime.fromtimestamp(next_run(summer.timestamp(), cron="0 3 * * *", tz=BERLIN), UTC).hour
        == 1
    )
    # the default stays UTC
    assert datetime.fromtimestamp(next_run(winter.timestamp(), cron="0 3 * * *"), UTC).hour == 3


@pytest.mark.parametrize(
    "tz,day_before,expected",
    [
        (
            BERLIN,
            datetime(2024, 3, 30, 12, tzinfo=BERLIN),
            ["2024-03-31T03:00:00+02:00", "2024-04-01T02:30:00+02:00"],
        ),
        (
            NEW_YORK,
            datetime(2024, 3, 9, 12, tzinfo=NEW_YORK),
            ["2024-03-10T03:00:00-04:00", "2024-03-11T02:30:00-04:00"],
        ),
    ],
)
def test_a_time_the_spring_change_skips_runs_once_right_after_the_gap(tz, day_before, expected):
    assert runs("30 2 * * *", day_before, 2, tz) == expected


@pytest.mark.parametrize(
    "tz,cron,day_before,expected",
    [
        (
            BERLIN,
            "30 2 * * *",
            datetime(2024, 10, 26, 12, tzinfo=BERLIN),
            ["2024-10-27T02:30:00+02:00", "2024-10-28T02:30:00+01:00"],
        ),
        (
            NEW_YORK,
            "30 1 * * *",
            datetime(2024, 11, 2, 12, tzinfo=NEW_YORK),
            ["2024-11-03T01:30:00-04:00", "2024-11-04T01:30:00-05:00"],
        ),
    ],
)
def test_a_fixed_time_the_autumn_change_repeats_runs_once(tz, cron, day_before, expected):
    assert runs(cron, day_before, 2, tz) == expected


def test_inside_the_repeated_hour_a_fixed_time_that_ran_is_not_run_again():
    # 01:45 EDT, after the 01:30 EDT run: the next is tomorrow, not 01:30 EST today
    start = datetime(2024, 11, 3, 1, 45, tzinfo=NEW_YORK)
    assert runs("30 1 * * *", start, 1, NEW_YORK) == ["2024-11-04T01:30:00-05:00"]


def test_a_wildcard_schedule_keeps_the_clock_through_the_repeated_hour():
    start = datetime(2024, 10, 27, 0, 30, tzinfo=BERLIN)
    assert runs("0 * * * *", start, 4, BERLIN) == [
        "2024-10-27T01:00:00+02:00",
        "2024-10-27T02:00:00+02:00",
        "2024-10-27T02:00:00+01:00",
        "2024-10-27T03:00:00+01:00",
    ]
    # and through the skipped hour it simply goes on after the gap, nothing twice
    start = datetime(2024, 3, 31, 1, 0, tzinfo=BERLIN)
    assert runs("*/30 * * * *", start, 3, BERLIN) == [
        "2024-03-31T01:30:00+01:00",
        "2024-03-31T03:00:00+02:00",
        "2024-03-31T03:30:00+02:00",
    ]


def test_every_run_of_a_year_is_once_a_day_in_local_time():
    """A nightly 02:30 job in Berlin over all of 2024: 366 runs, one per local date, each
    at 02:30 local except the spring-change night (03:00, right after the gap)."""
    at = datetime(2023, 12, 31, 12, tzinfo=BERLIN).timestamp()
    days = []
    for _ in range(366):
        at = next_run(at, cron="30 2 * * *", tz=BERLIN)
        days.append(datetime.fromtimestamp(at, tz=BERLIN))
    assert len({d.date() for d in days}) == 366 and days[-1].date().isoformat() == "2024-12-31"
    odd = [d.isoformat() for d in days if (d.hour, d.minute) != (2, 30)]
    assert odd == ["2024-03-31T03:00:00+02:00"]


def test_timezone_setting_is_validated_with_its_path():
    from replicator.config import config_from_dict
    from replicator.errors import ConfigError

    base = {"sites": {"a": {"url": "https://a.example"}}}
    assert config_from_dict(base).tzinfo == ZoneInfo("UTC")
    assert config_from_dict({**base, "timezone": "Europe/Berlin"}).tzinfo == BERLIN
    with pytest.raises(ConfigError) as err:
        config_from_dict({**base, "timezone": "Europe/Berln"})
    text = str(err.value)
    assert "timezone" in text and "Europe/Berlin" in text and "IANA" in text


async def test_the_daemon_reads_rule_and_gc_schedules_in_the_configured_zone(tmp_path):
    import yaml

    from replicator.daemon.service import Daemon

    config = {
        "journal": str(tmp_path / "j.db"),
        "timezone": "America/New_York",
        "sites": {"a": {"url": "https://a.example"}, "b": {"url": "https://b.example"}},
        "rules": [{"name": "r", "from": "a", "to": "b", "schedule": "30 1 * * *"}],
        "gc": {"schedule": "30 2 * * *", "policies": [{"name": "p", "sites": "b"}]},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    daemon = Daemon(path)
    try:
        daemon._schedule_reconciles()
        daemon._schedule_gc()
        assert {name: p.tz for name, p in daemon._periodic.items()} == {
            "reconcile:r": NEW_YORK,
            "gc": NEW_YORK,
        }
    finally:
        for periodic in daemon._periodic.values():
            periodic.stop()
            periodic.task.cancel()
        daemon.journal.close()


@pytest.mark.parametrize(
    ("cron", "words"),
    [
        ("0 0 31 2 *", "never"),  # 31 February: no run would ever be due
        ("0 0 30 2 *", "never"),
    ],
)
def test_a_cron_that_never_runs_is_refused_with_its_path(cron, words):
    """A schedule with no next run passed `check` and stopped its loop at start with an
    exception."""
    from replicator.config import config_from_dict
    from replicator.errors import ConfigError

    base = {"sites": {"a": {"url": "https://a.example"}}}
    with pytest.raises(ConfigError) as err:
        config_from_dict({**base, "verify": {"schedule": cron}})
    assert "verify.schedule" in str(err.value) and words in str(err.value)
