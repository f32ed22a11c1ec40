"""The embedded bus: an asyncio.Queue in this process.

"Durable in the bus" here only means queued in memory; across crashes the journal
(the intake commits events before publishing, and marks them dispatched only once
handled) is the backstop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping

from replicator.daemon.bus.base import EventBus, Handler
from replicator.daemon.bus.errors import BusClosed, BusError
from replicator.daemon.bus.wire import trace_dict
from replicator.events import RegistryEvent


class InProcessBus(EventBus):
    """The embedded bus: an asyncio.Queue consumed by one task in this process."""

    def __init__(
        self,
        maxsize: int = 0,
        *,
        stop_timeout: float = 10.0,
        handler_backoff_base: float = 0.2,
        handler_backoff_max: float = 30.0,
    ) -> None:
        super().__init__(
            handler_backoff_base=handler_backoff_base, handler_backoff_max=handler_backoff_max
        )
        self._queue: asyncio.Queue[tuple[RegistryEvent, dict[str, str]]] = asyncio.Queue(maxsize)
        self._worker: asyncio.Task[None] | None = None
        self._stop_timeout = stop_timeout

    @property
    def connected(self) -> bool:
        return not self._stopping.is_set()

    async def wait_connected(self, timeout: float | None = None) -> None:
        if self._stopping.is_set():
            raise BusClosed("event bus is stopped")

    async def publish(
        self, event: RegistryEvent, trace_context: Mapping[str, str] | None = None
    ) -> None:
        if self._stopping.is_set():
            raise BusClosed("event bus is stopped")
        await self._queue.put((event, trace_dict(trace_context)))

    async def start(self, handler: Handler) -> None:
        if self._worker is not None:
            raise BusError("event bus already started")
        self._handler = handler
        self._worker = asyncio.create_task(self._consume(handler), name="bus-inprocess")

    async def _consume(self, handler: Handler) -> None:
        while True:
            event, context = await self._queue.get()
            try:
                await self._deliver(handler, event, context)
            finally:
                self._queue.task_done()

    async def stop(self) -> None:
        """Let queued events drain (up to `stop_timeout`), then stop the consumer."""
        if self._worker is not None and not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), self._stop_timeout)
        self._stopping.set()
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
