"""Bandwidth limits: `limits.bandwidth` and `bandwidth_windows`, a byte-rate limiter shared
by every transfer to or from a site, measured on real registries."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from replicator.config import config_from_dict
from replicator.copy import CopyEngine
from replicator.errors import ConfigError
from replicator.registry.client import RegistryClient
from replicator.registry.limits import (
    BandwidthSchedule,
    ByteRateLimiter,
    RateWindow,
    bandwidth_for,
)
from replicator.registry.site import SiteEndpoint
from tests.harness.images import Pusher, assert_image_complete, layer_bytes

MIB = 1024 * 1024
RATE = 2 * MIB
WEEKDAYS = frozenset(range(5))


# ---- pure schedule and bucket logic ------------------------------------------------------------


def test_window_contains_its_days_and_hours():
    business = RateWindow(WEEKDAYS, 8 * 60, 18 * 60, 100)
    monday = datetime(2026, 12, 7, tzinfo=UTC)  # a Monday
    assert business.contains(monday.replace(hour=8))
    assert business.contains(monday.replace(hour=17, minute=59))
    assert not business.contains(monday.replace(hour=18))
    assert not business.contains(monday.replace(hour=7, minute=59))
    assert not business.contains((monday + timedelta(days=5)).replace(hour=12))  # Saturday


def test_window_over_midnight_belongs_to_the_day_it_opens():
    friday_night = RateWindow(frozenset({4}), 22 * 60, 6 * 60, 100)
    friday = datetime(2026, 12, 11, tzinfo=UTC)
    assert friday_night.contains(friday.replace(hour=23))
    assert friday_night.contains((friday + timedelta(days=1)).replace(hour=5))  # Saturday 05:00
    assert not friday_night.contains(friday.replace(hour=5))  # Friday 05:00: Thursday's night
    assert not friday_night.contains((friday + timedelta(days=1)).replace(hour=23))


def test_schedule_uses_the_window_inside_it_and_the_default_outside():
    schedule = BandwidthSchedule(50 * MIB, (RateWindow(WEEKDAYS, 8 * 60, 18 * 60, 20 * MIB),))
    monday = datetime(2026, 12, 7, tzinfo=UTC)
    assert schedule.rate_at(monday.replace(hour=9)) == 20 * MIB
    assert schedule.rate_at(monday.replace(hour=20)) == 50 * MIB
    only_window = BandwidthSchedule(None, schedule.windows)
    assert only_window.rate_at(monday.replace(hour=20)) is None


def test_windows_are_read_in_the_configured_time_zone():
    """08:00-18:00 in Berlin is 07:00-17:00 UTC in winter: at 17:30 UTC the window is
    closed in Berlin although it would be open in UTC."""
    config = config_from_dict(
        {
            "timezone": "Europe/Berlin",
            "sites": {
                "eu": {
                    "url": "https://eu.example",
                    "limits": {
                        "bandwidth_windows": [
                            {"days": "mon-fri", "from": "08:00", "to": "18:00", "limit": 1000}
                        ]
                    },
                }
            },
        }
    )
    schedule = SiteEndpoint.from_config(config, "eu").bandwidth
    assert schedule is not None and schedule.tz == ZoneInfo("Europe/Berlin")
    monday = datetime(2026, 12, 7, tzinfo=UTC)
    assert schedule.rate_at(monday.replace(hour=7, minute=30)) == 1000  # 08:30 in Berlin
    assert schedule.rate_at(monday.replace(hour=17, minute=30)) is None  # 18:30 in Berlin


def test_limiter_reserves_the_link_in_call_order():
    limiter = ByteRateLimiter(BandwidthSchedule(1000), burst=0.0)
    assert limiter.reserve(500, at=10.0) == pytest.approx(0.5)
    assert limiter.reserve(500, at=10.0) == pytest.approx(1.0)  # queued behind the first
    assert limiter.reserve(1000, at=20.0) == pytest.approx(1.0)  # idle link: no debt kept


def test_limiter_credits_at_most_its_burst_after_a_pause():
    limiter = ByteRateLimiter(BandwidthSchedule(1000), burst=0.1)
    assert limiter.reserve(100, at=50.0) == 0.0
    assert limiter.reserve(1000, at=50.0) == pytest.approx(1.0)


def test_limiter_is_free_outside_every_window():
    closed = RateWindow(frozenset(), 0, 24 * 60, 10)  # no day at all
    limiter = ByteRateLimiter(BandwidthSchedule(None, (closed,)))
    assert limiter.reserve(10**9, at=1.0) == 0.0


def test_sites_share_one_limiter_per_process():
    schedule = BandwidthSchedule(RATE)
    a = bandwidth_for("share", "http://127.0.0.1:1", schedule)
    assert a is bandwidth_for("share", "http://127.0.0.1:1", BandwidthSchedule(RATE))
    b = bandwidth_for("share", "http://127.0.0.1:1", BandwidthSchedule(RATE * 2))
    assert b is not a and b is not None and b.schedule.default == RATE * 2
    assert bandwidth_for("share", "http://127.0.0.1:1", None) is None


# ---- configuration -----------------------------------------------------------------------------


def config_with(limits: dict):
    return config_from_dict({"sites": {"eu": {"url": "https://eu.example", "limits": limits}}})


def test_limits_accept_sizes_and_rates_with_units():
    config = config_with(
        {
            "chunk_size": "100MiB",
            "bandwidth": "20MiB/s",
            "bandwidth_windows": [
                {"days": "mon-fri", "from": "08:00", "to": "18:00", "limit": "5MB/s"},
                {"days": ["sat", "sun"], "from": "22:00", "to": "06:00", "limit": 1000},
            ],
        }
    )
    limits = config.sites["eu"].limits
    assert (limits.chunk_size, limits.bandwidth) == (100 * MIB, 20 * MIB)
    assert limits.bandwidth_windows[0].days == ["mon", "tue", "wed", "thu", "fri"]
    assert limits.bandwidth_windows[0].limit == 5_000_000
    endpoint = SiteEndpoint.from_config(config, "eu")
    assert endpoint.chunk_size == 100 * MIB
    assert endpoint.bandwidth == BandwidthSchedule(
        20 * MIB,
        (
            RateWindow(WEEKDAYS, 8 * 60, 18 * 60, 5_000_000),
            RateWindow(frozenset({5, 6}), 22 * 60, 6 * 60, 1000),
        ),
        ZoneInfo("UTC"),  # the default `timezone`
    )
    again = config_from_dict(config.to_dict())
    assert again.sites["eu"].limits == limits


@pytest.mark.parametrize(
    "limits,path,words",
    [
        ({"chunk_size": "100Mb"}, "sites.eu.limits.chunk_size", "MiB"),
        ({"chunk_size": 0}, "sites.eu.limits.chunk_size", "more than 0"),
        ({"bandwidth": "fast"}, "sites.eu.limits.bandwidth", "20MiB/s"),
        (
            {
                "bandwidth_windows": [
                    {"days": ["mon", "funday"], "from": "8:00", "to": "9:00", "limit": 1}
                ]
            },
            "sites.eu.limits.bandwidth_windows[0].days",
            "'funday' is not a day",
        ),
        (
            {"bandwidth_windows": [{"from": "25:00", "to": "09:00", "limit": 1}]},
            "sites.eu.limits.bandwidth_windows[0].from",
            "from 00:00 to 24:00",
        ),
        (
            {"bandwidth_windows": [{"from": "08:00", "to": "09:00"}]},
            "sites.eu.limits.bandwidth_windows[0].limit",
            "required",
        ),
    ],
)
def test_bad_limits_name_their_yaml_path(limits, path, words):
    with pytest.raises(ConfigError) as err:
        config_with(limits)
    lines = [line for line in str(err.value).splitlines() if line.strip().startswith(path)]
    assert lines and any(words in line for line in lines), str(err.value)


# ---- measured on real registries ---------------------------------------------------------------


def limited(url: str, name: str, schedule: BandwidthSchedule | None) -> RegistryClient:
    return RegistryClient(SiteEndpoint(name=name, url=url, insecure=True, bandwidth=schedule))


async def test_download_rate_stays_within_the_cap(registry):
    """4 MiB from a site capped at 2 MiB/s, read by two concurrent downloads sharing the
    cap: about 2 s, within 15 %."""
    blobs = [layer_bytes(f"bw-{i}", 2 * MIB) for i in range(2)]
    with Pusher(registry.url) as p:
        digests = [p.push_blob("team/app", b) for b in blobs]
    async with limited(registry.url, "bw-down", BandwidthSchedule(RATE)) as c:
        start = time.monotonic()
        got = await asyncio.gather(*[c.get_blob("team/app", d) for d in digests])
        elapsed = time.monotonic() - start
    assert got == blobs
    rate = 4 * MIB / elapsed
    assert RATE * 0.85 <= rate <= RATE * 1.15, f"{rate / MIB:.2f} MiB/s"


async def test_upload_rate_stays_within_the_cap(two_registries):
    """A copy into a site capped at 2 MiB/s: the target side's uploads hold the rate."""
    src, dst = two_registries
    layer = layer_bytes("bw-up", 4 * MIB)
    with Pusher(src.url) as p:
        p.push_image("team/app", "v1", [layer])
    async with (
        limited(src.url, "bw-src", None) as s,
        limited(dst.url, "bw-up", BandwidthSchedule(RATE)) as d,
    ):
        start = time.monotonic()
        result = await CopyEngine().copy(s, "team/app", "v1", d, "team/app")
        elapsed = time.monotonic() - start
        sent = d.stats["bytes_uploaded"]
    assert result.status == "copied", result.error
    rate = sent / elapsed
    assert RATE * 0.85 <= rate <= RATE * 1.15, f"{rate / MIB:.2f} MiB/s"
    assert_image_complete(dst.url, "team/app", "v1")


async def test_cap_applies_only_inside_an_open_window(registry):
    today = datetime.now(UTC).weekday()
    data = layer_bytes("bw-window", 2 * MIB)
    with Pusher(registry.url) as p:
        digest = p.push_blob("team/app", data)

    async def seconds(window_days: frozenset[int]) -> float:
        window = RateWindow(window_days, 0, 24 * 60, MIB)
        async with limited(registry.url, "bw-win", BandwidthSchedule(None, (window,))) as c:
            start = time.monotonic()
            assert await c.get_blob("team/app", digest) == data
            return time.monotonic() - start

    assert await seconds(frozenset(range(7)) - {today}) < 0.5  # closed today: full speed
    assert 1.7 <= await seconds(frozenset({today})) <= 2.4  # open: 2 MiB at 1 MiB/s
