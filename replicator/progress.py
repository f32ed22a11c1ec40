"""Progress on a terminal, nothing otherwise.

The display (rich, in replicator.progress_display) is imported only when there is a
terminal to show it on: rich costs a run without one about 20 ms of start-up.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from replicator.progress_display import TerminalProgress


def terminal_progress() -> TerminalProgress | None:
    """A progress display when stderr is a terminal, else None (silent)."""
    if not sys.stderr.isatty():
        return None
    from replicator.progress_display import TerminalProgress  # rich: only with a terminal

    return TerminalProgress()
