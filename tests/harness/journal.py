"""Look at (or tamper with) a journal file the way an operator with `sqlite3` would.

The product reaches SQLite only through the async stores of `replicator.journal`;
tests that need to see raw rows, or to break the file on purpose, open their own
connection here. WAL mode lets it read while the journal is open, and
`busy_timeout` waits out the journal's own write transactions.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from replicator.journal import JournalConnection


def sql(journal: JournalConnection | str | Path, statement: str, params: Any = ()) -> list[dict]:
    """Run one statement on its own connection (committed at once); rows as dicts."""
    path = journal.path if isinstance(journal, JournalConnection) else Path(journal)
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(statement, params).fetchall()]
    finally:
        conn.close()
