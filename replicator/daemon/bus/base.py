"""The interface the daemon codes against, and the handler retry loop both buses share."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping

from replicator.backoff import jittered_backoff
from replicator.events import RegistryEvent
from replicator.logs import redact

log = logging.getLogger("replicator.bus")

Handler = Callable[[RegistryEvent, dict[str, str]], Awaitable[None]]


class EventBus(abc.ABC):
    """Where normalized registry events travel from intake to the planner."""

    def __init__(
        self, *, handler_backoff_base: float = 0.2, handler_backoff_max: float = 30.0
    ) -> None:
        self._handler: Handler | None = None
        self._stopping = asyncio.Event()
        self._handler_backoff_base = handler_backoff_base
        self._handler_backoff_max = handler_backoff_max

    @property
    @abc.abstractmethod
    def connected(self) -> bool:
        """True while the bus can accept and deliver events."""

    @abc.abstractmethod
    async def publish(
        self, event: RegistryEvent, trace_context: Mapping[str, str] | None = None
    ) -> None:
        """Return once `event` is durable in the bus; raise BusError otherwise."""

    @abc.abstractmethod
    async def start(self, handler: Handler) -> None:
        """Begin delivering events to `handler`; returns without waiting for a broker."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop delivering; unfinished deliveries stay with the bus for next time."""

    @abc.abstractmethod
    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until `connected` (readiness); TimeoutError after `timeout` seconds."""

    async def _deliver(
        self, handler: Handler, event: RegistryEvent, context: dict[str, str]
    ) -> bool:
        """Call the handler until it succeeds (True) or the bus stops (False)."""
        attempt = 0
        while True:
            try:
                await handler(event, context)
                return True
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                attempt += 1
                delay = jittered_backoff(
                    attempt, self._handler_backoff_base, self._handler_backoff_max
                )
                log.warning(
                    "event handler failed for event %s (%s %s at %s), attempt %d; "
                    "retrying in %.1fs: %s",
                    event.id,
                    event.action,
                    event.repository,
                    event.site,
                    attempt,
                    delay,
                    redact(str(exc))[:300],
                )
            if await wait_set(self._stopping, delay):
                return False


async def wait_set(event: asyncio.Event, timeout: float) -> bool:
    """Wait at most `timeout` seconds for `event`; True if it is set.

    Not asyncio.wait_for: under Python 3.11 it returns normally when cancelled just as
    its inner wait finishes, which is exactly what stop() does (set the event, then
    cancel), so the cancellation was lost and the task carried on."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()
    return event.is_set()


async def await_cancelled(tasks: Iterable[asyncio.Task[None] | None], timeout: float) -> None:
    """Wait at most `timeout` for cancelled `tasks` to end. Unlike awaiting them inside
    suppress(CancelledError), the caller's own cancellation propagates; a task that
    outlives the timeout is reported, not waited for, so shutdown stays bounded."""
    pending = {task for task in tasks if task is not None}
    if not pending:
        return
    done, late = await asyncio.wait(pending, timeout=timeout)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed: %s", task.get_name(), redact(str(task.exception()))[:300])
    for task in late:
        log.warning("%s still running %.1fs after it was cancelled", task.get_name(), timeout)
