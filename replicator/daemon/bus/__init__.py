"""The event fabric between webhook intake and the replication planner.

`EventBus` (base) is what the daemon codes against:

* `await bus.publish(event, trace_context)` returns only once the event is durable
  in the bus (for MQTT: the broker's QoS 1 PUBACK), so the intake may answer 2xx;
* `await bus.start(handler)` delivers every event to `handler(event, trace_context)`,
  one at a time, in arrival order; a handler that raises is retried with capped
  backoff until it succeeds or `stop()` is called (delivery is at-least-once, so the
  handler must be idempotent -- dedupe on `event.id`);
* `await bus.stop()`; `bus.connected`.

Modules: `wire` (the JSON form of an event and its trace context), `inprocess`
(`InProcessBus`, the embedded default), `mqtt` (`MqttBus` and its `MqttSettings`),
`paho_adapter` (the one place that reaches under aiomqtt's public API), `retained` (a
one-shot reader of retained messages, for `status`), `errors`.
"""

from replicator.daemon.bus.base import EventBus, Handler
from replicator.daemon.bus.errors import BusClosed, BusError, BusRefused, BusUnavailable
from replicator.daemon.bus.inprocess import InProcessBus
from replicator.daemon.bus.mqtt import (
    BrokerAddress,
    MqttBus,
    MqttSettings,
    RetainedMessage,
    parse_broker_url,
)
from replicator.daemon.bus.wire import (
    EVENT_JSON_VERSION,
    current_trace_context,
    event_from_json,
    event_to_json,
)

__all__ = [
    "EVENT_JSON_VERSION",
    "BrokerAddress",
    "BusClosed",
    "BusError",
    "BusRefused",
    "BusUnavailable",
    "EventBus",
    "Handler",
    "InProcessBus",
    "MqttBus",
    "MqttSettings",
    "RetainedMessage",
    "current_trace_context",
    "event_from_json",
    "event_to_json",
    "parse_broker_url",
]
