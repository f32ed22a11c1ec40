"""`status` reads retained messages anyone with write access to the status topic can
forge, and a bridge may hand them on without a message expiry: a bad message is skipped
and named on one line, never fatal, never printed raw (red-team findings 5-7).

The end-to-end test publishes the red team's forged messages on a real Mosquitto and
runs `registry-replicator status` as a subprocess; the rest checks `replicator.fleet`'s
pure parts.
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from replicator.config import MqttConfig, config_from_dict
from replicator.daemon.bus.retained import read_retained, reader_id
from replicator.daemon.fleet_status import mqtt_settings, read_fleet
from replicator.fleet import (
    AGE_FROM_BROKER,
    AGE_FROM_INSTANCE,
    InstanceStatus,
    fleet_view,
    format_fleet,
    status_to_json,
)
from replicator.status import human_age
from tests.harness.mosquitto import Mosquitto
from tests.harness.mqtt_bridge import BridgedBrokers
from tests.harness.util import wait_until
from tests.test_fleet_status import one_pending_task

NOW = 1_700_000_000.0
WEEK = 604800


def doc(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "v": 1,
        "instance": "worker-1",
        "host": "h1",
        "version": "1.0",
        "state": "online",
        "started_at": NOW - 100,
        "interval": 15,
        "expiry": WEEK,
        "published_at": NOW,
        "queue": {"queued": 0, "running": 0, "retry": 0, "dead": 0},
    }
    return {**base, **changes}


def view_of(*messages: tuple[str, dict[str, Any] | bytes, int | None], now: float = NOW):
    return fleet_view(
        "registry/status",
        [
            (topic, body if isinstance(body, bytes) else json.dumps(body).encode(), remaining)
            for topic, body, remaining in messages
        ],
        now,
    )


def publish_retained(broker: Mosquitto, messages: list[tuple[str, bytes, int | None]]) -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        for topic, payload, expiry in messages:
            props = None
            if expiry is not None:
                props = Properties(PacketTypes.PUBLISH)
                props.MessageExpiryInterval = expiry
            client.publish(topic, payload, qos=1, retain=True, properties=props).wait_for_publish(
                timeout=10
            )
    finally:
        client.loop_stop()
        client.disconnect()


def strict_json(text: str) -> Any:
    def refuse(constant: str) -> Any:
        raise AssertionError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_forged_status_messages_are_skipped_and_named_and_the_journal_part_stays(
    mosquitto: Mosquitto, tmp_path: Path
):
    config = one_pending_task(tmp_path, {"url": mosquitto.url, "topic": "registry/events"})
    now = time.time()
    real = doc(instance="worker-1", published_at=now, started_at=now - 100)
    forged = {
        # finding 5: timestamps that overflow into inf/NaN
        "registry/status/huge": doc(
            instance="huge", published_at=1.7e308, oldest_unfinished_at=-1.7e308
        ),
        # finding 6: another topic claiming worker-1, terminal escapes, a forged row
        "registry/status/evil": doc(
            published_at=now,
            host="h1\x1b[2J\x1b[H\x1b]0;pwned\x07",
            reason="ok\n  worker-9  h9  online  0 0 0 0  0 s  -  1 s ago",
        ),
    }
    messages: list[tuple[str, bytes, int | None]] = [
        ("registry/status/worker-1", json.dumps(real).encode(), WEEK)
    ]
    messages += [(t, json.dumps(d).encode(), WEEK) for t, d in forged.items()]
    publish_retained(mosquitto, messages)

    def status(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "replicator", "status", "-c", str(config), *extra],
            capture_output=True,
            text=True,
            timeout=60,
        )

    text = status()
    assert text.returncode == 0, text.stderr
    out = text.stdout
    assert "a -> b: lag" in out and "1 pending" in out  # the journal part is all there
    assert "\x1b" not in out and "\x07" not in out
    assert "instances (retained status on registry/status/+): 1" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("  worker-")]
    assert [r[0] for r in rows] == ["worker-1"] and rows[0][1] == "h1"
    skipped = [line for line in out.splitlines() if "unreadable status message on" in line]
    assert len(skipped) == 2, out
    named = {line.split("unreadable status message on ")[1].split(":")[0] for line in skipped}
    assert named == {"registry/status/huge", "registry/status/evil"}
    as_json = status("--json")
    assert as_json.returncode == 0, as_json.stderr
    payload = strict_json(as_json.stdout)
    assert payload["pending"] == 1
    assert [i["instance"] for i in payload["fleet"]["instances"]] == ["worker-1"]
    assert len(payload["fleet"]["unreadable"]) == 2


@pytest.mark.parametrize(
    "changes",
    [
        {"published_at": 1.7e308, "oldest_unfinished_at": -1.7e308},
        {"published_at": NOW + 2 * 86400},  # more than a day ahead: no clock is that wrong
        {"started_at": -1.0},
        {"last_event_at": 1e300},
        {"interval": 0},
        {"interval": -15},
        {"expiry": 2**40},
        {"queue": {"queued": -1}},
        {"queue": {"queued": 1.5}},
        {"queue": {"queued": 1e300}},
    ],
)
def test_implausible_numbers_make_a_message_unreadable(changes):
    view = view_of(("registry/status/worker-1", doc(**changes), WEEK))
    assert view.members == []
    assert len(view.unreadable) == 1
    assert view.unreadable[0].startswith("registry/status/worker-1: bad field")
    lines = format_fleet(view, human_age)  # and it prints
    assert lines[-1].startswith("  unreadable status message on registry/status/worker-1")


@pytest.mark.parametrize(
    "changes",
    [
        {"host": "h1\x1b[2J"},
        {"reason": "ok\n  worker-9  h9  online"},
        {"version": "1.0\r"},
        {"group": "g\u202eevil"},  # a bidi override reorders what the terminal shows
        {"instance": "worker-1\x9b31m"},  # a C1 control sequence introducer
    ],
)
def test_texts_with_control_characters_make_a_message_unreadable(changes):
    topic = f"registry/status/{changes.get('instance', 'worker-1')}"
    view = view_of((topic, doc(**changes), WEEK))
    assert view.members == []
    (why,) = view.unreadable
    assert why.isprintable(), why
    assert "control characters" in why


def test_a_topic_with_control_characters_is_named_escaped():
    """Mosquitto refuses such a topic; another broker may not."""
    view = view_of(("registry/status/\x1b[31mred", doc(instance="\x1b[31mred"), WEEK))
    (why,) = view.unreadable
    assert why.startswith("registry/status/\\x1b[31mred: bad field: control characters")


def test_a_message_about_another_instance_than_its_topic_names_is_unreadable():
    view = view_of(
        ("registry/status/worker-1", doc(state="offline", published_at=None, queue=None), WEEK),
        ("registry/status/evil", doc(), WEEK),
    )
    assert [(m.status.instance, m.status.state) for m in view.members] == [("worker-1", "offline")]
    (why,) = view.unreadable
    assert why.startswith("registry/status/evil: instance 'worker-1' is not its topic's 'evil'")


def test_human_age_of_what_is_no_duration():
    assert human_age(math.inf) == "?"
    assert human_age(-math.inf) == "?"
    assert human_age(math.nan) == "?"
    assert human_age(1e300) == f"{int(1e300 // 86400)} d"
    assert human_age(-5) == "0 s"


def test_without_a_broker_expiry_the_age_is_the_instance_clock_s_and_says_so():
    """What a broker behind an MQTT 3.1.1 bridge hands on: no message expiry."""
    view = view_of(
        ("registry/status/w1", doc(instance="w1", published_at=NOW - 7200), None),
        ("registry/status/w2", doc(instance="w2", published_at=NOW - 5), WEEK - 5),
    )
    by_id = {m.status.instance: m for m in view.members}
    assert by_id["w1"].age_seconds == 7200 and by_id["w1"].age_from == AGE_FROM_INSTANCE
    assert by_id["w1"].stale
    assert by_id["w2"].age_seconds == 5 and by_id["w2"].age_from == AGE_FROM_BROKER
    lines = format_fleet(view, human_age)
    w1 = next(line for line in lines if line.startswith("  w1 "))
    w2 = next(line for line in lines if line.startswith("  w2 "))
    assert w1.endswith("2 h ago*") and w2.endswith("5 s ago")
    assert any(line.startswith("  * by the instance's own clock") for line in lines)
    assert view.as_dict()["instances"][0]["age_from"] == AGE_FROM_INSTANCE


def test_without_a_broker_expiry_the_expiry_is_applied_by_the_instance_clock():
    view = view_of(
        ("registry/status/gone", doc(instance="gone", published_at=NOW - WEEK - 1), None),
        ("registry/status/kept", doc(instance="kept", published_at=NOW - WEEK + 60), None),
    )
    assert [m.status.instance for m in view.members] == ["kept"]
    assert view.unreadable == []


def test_a_published_at_in_the_future_gives_no_age_and_an_online_instance_is_stale():
    view = view_of(
        ("registry/status/ahead", doc(instance="ahead", published_at=NOW + 3600), None),
        ("registry/status/skew", doc(instance="skew", published_at=NOW + 30), None),
        ("registry/status/will", doc(instance="will", state="offline", published_at=None), None),
    )
    by_id = {m.status.instance: m for m in view.members}
    assert by_id["ahead"].age_seconds is None and by_id["ahead"].age_from is None
    assert by_id["ahead"].stale  # nothing shows it is alive: never "online 0 s ago"
    assert by_id["skew"].age_seconds == 0 and not by_id["skew"].stale  # NTP-sized skew
    assert by_id["will"].age_seconds is None and not by_id["will"].stale
    rows = {line.split()[0]: line.split() for line in format_fleet(view, human_age)[2:5]}
    assert rows["ahead"][2] == "stale" and rows["ahead"][-1] == "-"


def test_a_message_the_broker_holds_with_an_expiry_keeps_the_broker_s_age():
    status = InstanceStatus(
        instance="w1",
        host="h",
        version="1",
        state="online",
        started_at=NOW - 10,
        interval=15,
        expiry=WEEK,
        published_at=NOW + 3600,  # its clock is an hour ahead: the broker's age wins
        queue={"queued": 0, "running": 0, "retry": 0, "dead": 0},
    )
    view = fleet_view(
        "registry/status", [("registry/status/w1", status_to_json(status), WEEK - 4)], NOW
    )
    (m,) = view.members
    assert m.age_seconds == 4 and m.age_from == AGE_FROM_BROKER and not m.stale


def test_across_a_v311_bridge_the_age_is_the_instance_clock_s_flagged(tmp_path: Path):
    """Red-team finding 7 on real brokers: broker A receives region B's status over the
    MQTT 3.1.1 bridge without a message expiry. At B the age is the broker's (an
    instance clock 2 h behind does not matter); at A it is that clock's, and says so; a
    message older than its expiry by that clock is left out at A, where no broker would
    ever drop it."""
    brokers = BridgedBrokers(tmp_path / "brokers", topic="registry/events").start()
    try:
        now = time.time()
        behind = doc(instance="w1", published_at=now - 7200, started_at=now - 7300)
        expired = doc(instance="w2", published_at=now - WEEK - 60, started_at=now - WEEK - 99)
        publish_retained(
            brokers.b,
            [
                # w2 first: the bridge keeps the order, so w1 at A means w2 is there too
                ("registry/status/w2", json.dumps(expired).encode(), WEEK),
                ("registry/status/w1", json.dumps(behind).encode(), WEEK),
            ],
        )

        def config(broker: Mosquitto) -> MqttConfig:
            cfg = config_from_dict(
                {
                    "sites": {"a": {"url": "http://127.0.0.1:1", "insecure": True}},
                    "rules": [],
                    "mqtt": {"url": broker.url, "topic": "registry/events"},
                }
            )
            assert cfg.mqtt is not None
            return cfg.mqtt

        def seen(broker: Mosquitto) -> dict[str, Any]:
            view = asyncio.run(read_fleet(config(broker)))
            return {m.status.instance: m for m in view.members}

        def w1_at_a() -> dict[str, Any] | None:
            got = seen(brokers.a)
            return got if "w1" in got else None

        at_a = wait_until(
            w1_at_a,
            timeout=15,
            what="region B's status at broker A",
        )
        assert at_a is not None
        assert at_a["w1"].age_from == AGE_FROM_INSTANCE
        assert 7200 <= (at_a["w1"].age_seconds or 0) < 7260 and at_a["w1"].stale
        assert "w2" not in at_a  # expired by the instance clock
        held = asyncio.run(
            read_retained(
                mqtt_settings(config(brokers.a), reader_id()), "registry/status/+", limit=3
            )
        )  # ... although broker A holds it, with no expiry: it would never drop it
        assert {c.topic: c.remaining_expiry for c in held} == {
            "registry/status/w1": None,
            "registry/status/w2": None,
        }
        at_b = seen(brokers.b)
        assert at_b["w1"].age_from == AGE_FROM_BROKER and (at_b["w1"].age_seconds or 0) < 60
        assert not at_b["w1"].stale
    finally:
        brokers.stop()
