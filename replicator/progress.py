"""Byte progress for blob uploads: a rich bar on a terminal, nothing otherwise."""

from __future__ import annotations

import sys

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

# Small blobs finish before a bar would be readable; only show the large ones.
MIN_BAR_BYTES = 8 * 2**20


class TerminalProgress:
    """Implements replicator.copy.Progress with rich; use as a context manager."""

    def __init__(self) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            transient=True,
        )
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> TerminalProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def start(self, digest: str, size: int) -> None:
        if size >= MIN_BAR_BYTES:
            self._tasks[digest] = self._progress.add_task(digest[:19], total=size)

    def advance(self, digest: str, n: int) -> None:
        task = self._tasks.get(digest)
        if task is not None:
            self._progress.advance(task, n)

    def finish(self, digest: str) -> None:
        task = self._tasks.pop(digest, None)
        if task is not None:
            self._progress.remove_task(task)


def terminal_progress() -> TerminalProgress | None:
    """A progress display when stderr is a terminal, else None (silent)."""
    return TerminalProgress() if sys.stderr.isatty() else None
