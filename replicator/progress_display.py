"""The progress display on a terminal (rich): one overall bar of the tags a run works on,
and a byte bar per large blob upload. Made by replicator.progress.terminal_progress."""

from __future__ import annotations

from rich.console import RenderableType
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from replicator.text import short_digest

# Small blobs finish before a bar would be readable; only show the large ones.
MIN_BAR_BYTES = 8 * 2**20


class _RateColumn(ProgressColumn):
    """Transfer speed for blob uploads; nothing for the count of tags (not bytes)."""

    def __init__(self) -> None:
        super().__init__()
        self._speed = TransferSpeedColumn()

    def render(self, task: Task) -> RenderableType:
        return "" if task.fields.get("count") else self._speed.render(task)


class _AmountColumn(ProgressColumn):
    """`3/10` for the overall count of tags, a byte size for blob uploads."""

    def __init__(self) -> None:
        super().__init__()
        self._bytes = DownloadColumn()
        self._count = MofNCompleteColumn()

    def render(self, task: Task) -> RenderableType:
        column = self._count if task.fields.get("count") else self._bytes
        return column.render(task)


class TerminalProgress:
    """Implements replicator.copy.Progress with rich; use as a context manager."""

    def __init__(self) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            _AmountColumn(),
            _RateColumn(),
            TimeRemainingColumn(),
            transient=True,
        )
        self._tasks: dict[str, TaskID] = {}
        self._overall: TaskID | None = None

    def __enter__(self) -> TerminalProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def planned(self, n: int = 1) -> None:
        """`n` more items (tags to copy or delete) will be worked on: the overall bar."""
        if self._overall is None:
            self._overall = self._progress.add_task("tags", total=0, count=True)
        self._progress.update(self._overall, total=(self._total() or 0) + n)

    def done(self, n: int = 1) -> None:
        if self._overall is not None:
            self._progress.advance(self._overall, n)

    def _total(self) -> float | None:
        assert self._overall is not None
        return next(t.total for t in self._progress.tasks if t.id == self._overall)

    def start(self, digest: str, size: int) -> None:
        if size >= MIN_BAR_BYTES:
            self._tasks[digest] = self._progress.add_task(short_digest(digest), total=size)

    def advance(self, digest: str, n: int) -> None:
        task = self._tasks.get(digest)
        if task is not None:
            self._progress.advance(task, n)

    def finish(self, digest: str) -> None:
        task = self._tasks.pop(digest, None)
        if task is not None:
            self._progress.remove_task(task)
