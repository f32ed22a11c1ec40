"""The I/O side of fleet status (`replicator.fleet`): a daemon publishing its own, and
`status` reading everyone's, over the configured MQTT broker.

An instance publishes at every (re)connection -- which also replaces the `offline` will
the broker may have published while the connection was down -- every
`mqtt.status_interval`, and once more as `stopped` on a clean stop. A publish that fails
is logged and tried again at the next interval: status is advisory and never holds up
events. The messages expire after the session expiry (7 days): an instance that is gone
keeps its session, and with it a share of its group's events, for exactly that long, so
`status` shows it as long as that matters and then forgets it.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import time
from collections.abc import Awaitable, Callable

from replicator import __version__
from replicator.config import MqttConfig
from replicator.daemon.bus import MqttBus, MqttSettings
from replicator.daemon.bus.mqtt import RetainedMessage
from replicator.daemon.bus.retained import read_retained, reader_id
from replicator.fleet import FleetView, InstanceStatus, fleet_view, status_to_json
from replicator.journal.status import QueueSummary

log = logging.getLogger("replicator.fleet")

SESSION_EXPIRY = 7 * 24 * 3600  # MqttSettings' default; status messages live as long
STOP_PUBLISH_TIMEOUT = 2.0  # a clean stop waits this long at most to say "stopped"


def mqtt_settings(
    mqtt: MqttConfig, client_id: str, *, will: RetainedMessage | None = None
) -> MqttSettings:
    """The bus settings the configuration's `mqtt` section describes."""
    return MqttSettings(
        mqtt.url,
        mqtt.topic,
        client_id,
        group=mqtt.group,
        username=mqtt.username,
        password=mqtt.password(),
        qos=mqtt.qos,
        tls=mqtt.tls,
        session_expiry=SESSION_EXPIRY,
        will=will,
    )


class StatusPublisher:
    """Publishes one instance's status on `<status root>/<instance>` (see the module)."""

    def __init__(
        self,
        mqtt: MqttConfig,
        instance: str,
        queue: Callable[[], Awaitable[QueueSummary]],
        last_event_at: Callable[[], float | None],
    ) -> None:
        self.topic = f"{mqtt.status_root}/{instance}"
        self.interval = mqtt.status_interval
        self._queue = queue
        self._last_event_at = last_event_at
        self._identity = InstanceStatus(
            instance=instance,
            host=socket.gethostname(),
            version=__version__,
            state="online",
            started_at=time.time(),
            interval=self.interval,
            expiry=SESSION_EXPIRY,
            group=mqtt.group,
        )
        self._failing = False

    @property
    def will(self) -> RetainedMessage:
        """What the broker publishes for us if the connection ends without a DISCONNECT."""
        offline = self._identity.offline("connection lost")
        return RetainedMessage(self.topic, status_to_json(offline), SESSION_EXPIRY)

    async def current(self, state: str = "online", reason: str | None = None) -> InstanceStatus:
        summary = await self._queue()
        return dataclasses.replace(
            self._identity,
            state=state,
            reason=reason,
            published_at=time.time(),
            queue=dict(summary.counts),
            oldest_unfinished_at=summary.oldest_unfinished_at,
            last_event_at=self._last_event_at(),
        )

    async def publish(
        self, bus: MqttBus, state: str = "online", reason: str | None = None, timeout: float = 10.0
    ) -> bool:
        """One status message; False (logged, once per failing streak) when it failed."""
        try:
            status = await self.current(state, reason)
            message = RetainedMessage(self.topic, status_to_json(status), SESSION_EXPIRY)
            await bus.publish_retained(message, timeout=timeout)
        except Exception as exc:  # the journal or the broker; the next interval retries
            level = logging.DEBUG if self._failing else logging.WARNING
            log.log(level, "publishing the status on %s failed: %s", self.topic, exc)
            self._failing = True
            return False
        if self._failing:
            log.info("status on %s published again", self.topic)
        self._failing = False
        return True

    async def loop(self, bus: MqttBus) -> None:
        """At every new connection and every interval, until cancelled."""
        seen = 0
        while True:
            seen = await bus.wait_new_connection(seen, self.interval)
            if bus.connected:
                await self.publish(bus, timeout=self.interval)

    async def stopped(self, bus: MqttBus) -> None:
        """The last word of a clean stop (the will is not sent on a clean disconnect)."""
        await self.publish(bus, "stopped", timeout=STOP_PUBLISH_TIMEOUT)


async def read_fleet(
    mqtt: MqttConfig, *, now: float | None = None, limit: float = 3.0
) -> FleetView:
    """Every instance's retained status under the configured status topic;
    BusUnavailable when the broker cannot be reached."""
    settings = mqtt_settings(mqtt, reader_id())
    root = mqtt.status_root
    copies = await read_retained(settings, f"{root}/+", limit=limit)
    return fleet_view(
        root,
        [(c.topic, c.payload, c.remaining_expiry) for c in copies],
        time.time() if now is None else now,
    )
