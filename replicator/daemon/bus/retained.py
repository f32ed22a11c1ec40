"""A one-shot reader of the retained messages under a topic filter (what `status` sees
of the fleet).

It connects with a clean start and no session (nothing is left on the broker), subscribes,
and takes what arrives until the broker has been quiet for `quiet` seconds after the
subscription was acknowledged, or `limit` seconds have passed. The broker sends the
retained messages right after the subscription, so on any link the quiet period ends
the read soon after the last of them; MQTT has no "that was all" marker to wait for.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from dataclasses import dataclass

from replicator.daemon.bus.errors import BusUnavailable
from replicator.daemon.bus.mqtt import MqttSettings
from replicator.daemon.bus.tls import client_context, explain_tls_failure
from replicator.logs import redact


@dataclass(frozen=True)
class Copy:
    """One message as read: the broker's remaining message expiry (seconds) when the
    message had one."""

    topic: str
    payload: bytes
    remaining_expiry: int | None


def reader_id(prefix: str = "registry-replicator-status") -> str:
    """A client id no instance uses (an instance's id names its persistent session)."""
    return f"{prefix}-{os.getpid()}-{secrets.token_hex(4)}"


async def read_retained(
    settings: MqttSettings, topic_filter: str, *, quiet: float = 0.5, limit: float = 3.0
) -> list[Copy]:
    """The messages under `topic_filter` that arrive within the read (see the module);
    BusUnavailable naming the broker when it cannot be reached or refuses us."""
    import aiomqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    broker = settings.broker
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 0
    client = aiomqtt.Client(
        broker.host,
        broker.port,
        username=broker.username,
        password=broker.password,
        identifier=settings.client_id,
        protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=True,
        properties=props,
        keepalive=settings.keepalive,
        timeout=min(settings.connect_timeout, limit + 2.0),
        tls_context=client_context(settings.tls) if broker.tls else None,
        logger=logging.getLogger("replicator.bus.mqtt"),
    )
    found: list[Copy] = []
    loop = asyncio.get_running_loop()
    try:
        async with client:
            await client.subscribe(topic_filter, qos=settings.qos)
            deadline = loop.time() + limit
            messages = aiter(client.messages)
            while (remaining := deadline - loop.time()) > 0:
                try:
                    async with asyncio.timeout(min(quiet, remaining)):
                        message = await anext(messages)
                except TimeoutError:
                    break
                expiry = getattr(message.properties, "MessageExpiryInterval", None)
                payload = message.payload
                found.append(
                    Copy(
                        str(message.topic),
                        payload if isinstance(payload, bytes) else str(payload).encode(),
                        int(expiry) if isinstance(expiry, int) else None,
                    )
                )
    except aiomqtt.MqttError as exc:
        error = redact(str(exc))[:300]
        hint = explain_tls_failure(error) if broker.tls else None
        raise BusUnavailable(
            f"MQTT broker {broker.host}:{broker.port} unreachable: "
            + (f"TLS: {hint}: {error}" if hint else error)
        ) from None
    return found
