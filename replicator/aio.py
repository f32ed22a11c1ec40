"""Small asyncio helpers used across the engine, sync, failover and GC."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from typing import TypeVar

T = TypeVar("T")


async def bounded_gather(coros: Iterable[Awaitable[T]], limit: int) -> list[T]:
    """Await `coros` with at most `limit` running at once; results in input order.

    The first failure cancels the others and is raised alone (callers handle one
    error; the rest were only cancelled because of it).
    """
    semaphore = asyncio.Semaphore(max(1, limit))

    async def bounded(coro: Awaitable[T]) -> T:
        async with semaphore:
            return await coro

    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(bounded(coro)) for coro in coros]
    except ExceptionGroup as group_error:
        raise group_error.exceptions[0] from None
    return [task.result() for task in tasks]
