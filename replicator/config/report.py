"""Problems with a configuration, and the one error that lists them all.

A problem is a path in the document (`('rules', 0, 'tags', 'semver')`) and a
message. Every problem is reported at once, each with its path and where its
value came from (a YAML line, an environment variable), because an operator
fixing a config by trial and error one message at a time gives up. Messages
never include the offending input of a field that may hold a secret.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Collection, Sequence
from typing import NamedTuple

from pydantic import ValidationError

from replicator.errors import ConfigError

Loc = tuple[str | int, ...]


class Problem(NamedTuple):
    loc: Loc
    message: str


def format_path(loc: Sequence[str | int]) -> str:
    """('rules', 0, 'tags', 'semver') -> 'rules[0].tags.semver'."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + str(part)
    return text


def parse_path(text: str) -> Loc:
    """'rules[0].tags.semver' -> ('rules', 0, 'tags', 'semver'); inverse of format_path."""
    return tuple(
        int(index) if index else name for name, index in re.findall(r"([^.\[\]]+)|\[(\d+)\]", text)
    )


class ProblemsError(ValueError):
    """Several problems found by one validator (checks that span fields), each at its path."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(f"{format_path(p.loc)}: {p.message}" for p in problems))


def from_validation_error(exc: ValidationError, known_keys: Collection[str]) -> list[Problem]:
    """One problem per pydantic error, with a suggestion for a misspelt key.

    Never includes the offending input; `known_keys` are the names a typo is
    compared with."""
    out: list[Problem] = []
    for err in exc.errors(include_url=False, include_input=False):
        loc: Loc = tuple(err["loc"])
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, ProblemsError):
            out.extend(Problem((*loc, *p.loc), p.message) for p in cause.problems)
            continue
        prefix = ""
        if loc and loc[-1] == "[key]":
            loc, prefix = loc[:-1], "in the name: "
        kind = err["type"]
        if kind == "extra_forbidden":
            close = difflib.get_close_matches(str(loc[-1]), sorted(known_keys), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            message = f"unknown key {loc[-1]!r}{hint}"
        elif kind == "missing":
            message = "required, but missing"
        elif kind == "value_error" and cause is not None:
            message = str(cause)
        else:
            message = err["msg"]
        out.append(Problem(loc, prefix + message))
    return out


class InvalidConfig(ConfigError):
    """A configuration with problems; `.path` is the first one's path, `.problems`
    every (path, message) pair, in the order reported."""

    def __init__(self, message: str, problems: list[tuple[str, str]]) -> None:
        super().__init__(message)
        self.path = problems[0][0] if problems else None
        self.problems = problems


def config_error(
    label: str, problems: Sequence[Problem], where: Callable[[Loc], str]
) -> InvalidConfig:
    """The error listing every problem, one per line: `  path (where): message`.

    `where(loc)` says where the value came from ('line 12', 'environment variable
    X'), or '' when nothing can be said."""
    lines = []
    for loc, message in problems:
        source = where(loc)
        lines.append(f"  {format_path(loc)}{f' ({source})' if source else ''}: {message}")
    count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
    return InvalidConfig(
        f"invalid configuration {label} ({count}):\n" + "\n".join(lines),
        [(format_path(p.loc), p.message) for p in problems],
    )
