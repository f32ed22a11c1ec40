"""The embedded bus: an asyncio.Queue in this process.

"Durable in the bus" here only means queued in memory; across crashes the journal
(the intake commits events before publishing, and marks them dispatched only once
handled) is the backstop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping

from replicator.daemon.bus.base import EventBus, Handler, await_cancelled, log
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
        while not self._stopping.is_set():
            event, context = await self._queue.get()
            try:
                await self._deliver(handler, event, context)
            finally:
                self._queue.task_done()

    async def stop(self) -> None:
        """Let queued events drain for at most `stop_timeout`, even while the handler
        keeps failing, then stop the consumer and wait (again at most `stop_timeout`)
        for it to end. Events not handled are not lost: the daemon marks in-process
        events dispatched only once handled, so the journal re-publishes them at the
        next start. A caller that cancels stop() (or bounds it with a timeout) gets its
        cancellation back, and the consumer is cancelled all the same."""
        worker, self._worker = self._worker, None
        drained = False
        try:
            if worker is not None and not self._stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._stop_timeout):
                        await self._queue.join()
                        drained = True
        finally:
            self._stopping.set()
            if worker is not None:
                worker.cancel()
                if not drained:
                    log.warning(
                        "event bus stopped before its queue drained (%d more queued): "
                        "events not handled stay in the journal for the next start",
                        self._queue.qsize(),
                    )
        await await_cancelled([worker], self._stop_timeout)
