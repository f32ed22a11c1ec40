"""What MqttBus needs from paho-mqtt that aiomqtt 2.x does not expose.

aiomqtt wraps a paho-mqtt (>= 2.0) client and keeps it in the private attribute
`_client`. Three things are only reachable there:

* manual acknowledgement (`manual_ack_set`, `ack`), so a PUBACK goes to the broker
  only after the handler made the work durable;
* the PUBACK reason code of our own publishes (aiomqtt's `on_publish` drops it), so a
  publish the broker refused (ACL, quota) is not mistaken for a durable one;
* the socket, to switch Nagle off;
* socket errors paho only logs: a TLS alert from a broker that refused our client
  certificate ends the connection before CONNACK, and aiomqtt then reports nothing
  but a timeout.

This module is the only place that touches `_client`; pyproject pins aiomqtt and
paho-mqtt below their next major versions so it cannot change under us unnoticed.
Every feature degrades when the attribute is missing: `manual_ack` and
`checks_publish_acks` then say False and MqttBus falls back to aiomqtt's public API.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

from replicator.daemon.bus.errors import BusError


class PahoAdapter:
    """The paho client under one aiomqtt.Client, for the features listed above."""

    def __init__(self, client: Any) -> None:  # aiomqtt.Client
        self._paho = getattr(client, "_client", None)
        # mid -> future of the PUBACK reason code, for publishes sent through `publish`
        self._acks: dict[int, asyncio.Future[Any]] = {}
        self.manual_ack = self._enable_manual_ack()
        self.checks_publish_acks = self._hook_publish_acks()
        self.last_error: str | None = None  # the last error paho logged on this client
        self._capture_errors()

    def _capture_errors(self) -> None:
        paho = self._paho
        if paho is None or not hasattr(paho, "on_log"):
            return
        from paho.mqtt.client import MQTT_LOG_ERR

        def on_log(client: Any, userdata: Any, level: int, buf: str) -> None:
            if level == MQTT_LOG_ERR:
                self.last_error = buf

        paho.on_log = on_log

    def _enable_manual_ack(self) -> bool:
        paho = self._paho
        if not (
            paho is not None
            and callable(getattr(paho, "manual_ack_set", None))
            and callable(getattr(paho, "ack", None))
        ):
            return False
        paho.manual_ack_set(True)
        return True

    def _hook_publish_acks(self) -> bool:
        """Chain our PUBACK callback before aiomqtt's (which still needs its call)."""
        paho = self._paho
        aiomqtt_on_publish = getattr(paho, "on_publish", None)
        if not (
            paho is not None
            and callable(getattr(paho, "publish", None))
            and callable(aiomqtt_on_publish)
        ):
            return False
        acks = self._acks

        def on_publish(client: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
            future = acks.pop(mid, None)
            if future is not None and not future.done():
                future.set_result(reason)
            aiomqtt_on_publish(client, userdata, mid, reason, properties)

        paho.on_publish = on_publish
        return True

    def ack(self, mid: int, qos: int) -> None:
        """Send the PUBACK/PUBREC for a received message (manual ack mode only)."""
        if self.manual_ack and self._paho is not None:
            with contextlib.suppress(Exception):  # a lost connection: redelivered anyway
                self._paho.ack(mid, qos)

    async def publish(
        self, topic: str, payload: bytes, qos: int, properties: Any, *, retain: bool = False
    ) -> Any:
        """Publish through paho and return the broker's reason code (a paho ReasonCode,
        `is_failure` when refused). Only when `checks_publish_acks`."""
        assert self._paho is not None and self.checks_publish_acks
        info = self._paho.publish(topic, payload, qos, retain, properties)
        if info.rc != 0:
            raise BusError(f"publish not accepted by the MQTT client (rc={info.rc})")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._acks[info.mid] = future  # no await since publish(): the ack cannot be missed
        try:
            return await future
        finally:
            self._acks.pop(info.mid, None)

    def set_no_delay(self) -> None:
        """Disable Nagle on the broker connection: paho leaves it on, so every QoS 1
        publish waited for a delayed ACK (about 40 ms per webhook, capping intake near
        23/s)."""
        if self._paho is None:
            return
        with contextlib.suppress(Exception):
            sock = self._paho.socket()
            if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
