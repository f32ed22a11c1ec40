"""Error types shared by every part of the tool.

Each carries the exit code the CLI should use, so commands never guess:
2 for anything the operator must fix in what they typed or configured,
1 for a run that was attempted and failed.
"""

from __future__ import annotations


class ReplicatorError(Exception):
    """Base class; `exit_code` is what the CLI exits with."""

    exit_code = 1


class UsageError(ReplicatorError):
    """Bad command-line input (a malformed reference, a conflicting flag)."""

    exit_code = 2


class ConfigError(ReplicatorError):
    """A configuration file that cannot be used; `path` names the YAML field."""

    exit_code = 2

    def __init__(self, message: str, path: str | None = None) -> None:
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class JournalError(ReplicatorError):
    """The state journal cannot be opened or is from an incompatible version."""

    exit_code = 2
