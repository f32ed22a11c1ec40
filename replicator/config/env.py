"""Environment overrides: `REGISTRY_REPLICATOR_<KEY>`, `__` between nested keys.

E.g. `REGISTRY_REPLICATOR_LISTEN=0.0.0.0:8500`,
`REGISTRY_REPLICATOR_SITES__US_EAST__URL=https://...`,
`REGISTRY_REPLICATOR_GC__SCHEDULE="0 4 * * *"`. Names are case-insensitive
and, for keys already in the file, `_` also matches `-` and `.` (shells cannot
export names with '-'), so `SITES__US_EAST__...` overrides the site `us-east`;
a key not in the file is added in lower case. An existing list item is
addressed by its index (`RULES__0__INTERVAL=5m`); a whole list or section can
be replaced with JSON (`REGISTRY_REPLICATOR_RULES='[...]'`): a value starting
with `[` or `{` is parsed as JSON. The environment wins over the file.

Every override remembers its variable, so a problem with a value that came
from the environment names the variable rather than a line of the file, and
REGISTRY_REPLICATOR_* variables that name no setting become warnings.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from replicator.config.report import Loc, Problem, format_path

ENV_PREFIX = "REGISTRY_REPLICATOR_"
CONFIG_ENV = "REGISTRY_REPLICATOR_CONFIG"  # default for -c/--config; not a setting


@dataclass(frozen=True)
class Override:
    """One variable: where its value went, and the sections it had to create on the way."""

    variable: str
    loc: Loc
    created: tuple[Loc, ...] = ()


@dataclass
class Overlaid:
    """The document with the environment applied, and what each variable did."""

    data: dict[str, Any]
    overrides: list[Override] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def variable_for(self, loc: Loc) -> str | None:
        """The variable that set the value at `loc` (or a section holding it), if any."""
        best: tuple[int, str] | None = None
        for override in self.overrides:
            for owned in (override.loc, *override.created):
                if loc[: len(owned)] == owned and (best is None or len(owned) > best[0]):
                    best = (len(owned), override.variable)
        return best[1] if best else None

    def variables_below(self, loc: Loc) -> list[str]:
        """Variables that changed something inside the value at `loc`."""
        return sorted(
            {
                o.variable
                for o in self.overrides
                if len(o.loc) > len(loc) and o.loc[: len(loc)] == loc
            }
        )


def _norm(key: str) -> str:
    return key.casefold().replace("-", "_").replace(".", "_")


def _key_for(part: str, keys: Collection[Any]) -> str:
    """The existing key `part` names (same spelling, or equal up to case and -/_/.), or
    `part` in lower case for a new key."""
    if part in keys:
        return part
    by_norm = {_norm(k): k for k in keys if isinstance(k, str)}
    return by_norm.get(_norm(part), part.lower())


def _decode(value: str) -> Any:
    """JSON for a value that looks like a list or mapping, else the string itself."""
    return json.loads(value) if value.lstrip()[:1] in ("[", "{") else value


def _apply(root: dict[str, Any], variable: str, parts: list[str], value: str) -> Override:
    """Put `value` where `parts` lead in `root`; raises ValueError with the reason if not."""
    node: Any = root
    loc: list[str | int] = []
    created: list[Loc] = []
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        key: str | int
        if isinstance(node, list):
            if not part.isdigit():
                raise _Unplaceable(
                    tuple(loc), f"{format_path(loc)} is a list: address an item by its index"
                )
            key = int(part)
            if key >= len(node):
                count = f"{len(node)} item{'s' if len(node) != 1 else ''}"
                raise _Unplaceable(
                    (*loc, key),
                    f"{format_path(loc)} has no item {key} (it has {count}); to add items, "
                    f"replace the whole list with JSON in {ENV_PREFIX}"
                    + "__".join(p.upper() for p in parts[:depth]),
                )
        else:
            key = _key_for(part, node)
        loc.append(key)
        if last:
            try:
                decoded = _decode(value)
            except ValueError as exc:
                reason = getattr(exc, "msg", "bad syntax")
                raise _Unplaceable(tuple(loc), f"not valid JSON ({reason})") from None
            node[key] = decoded
            break
        child = node.get(key) if isinstance(node, dict) else node[key]
        if not isinstance(child, (dict, list)):
            child = {}
            node[key] = child
            created.append(tuple(loc))
        node = child
    return Override(variable, tuple(loc), tuple(created))


class _Unplaceable(ValueError):
    def __init__(self, loc: Loc, reason: str) -> None:
        self.loc = loc
        self.reason = reason
        super().__init__(reason)


def apply_environment(
    data: Mapping[str, Any],
    settings: Collection[str],
    environ: Mapping[str, str] | None = None,
) -> Overlaid:
    """`data` (not modified) with every REGISTRY_REPLICATOR_* override applied.

    `settings` are the top-level keys; a variable naming none of them is a
    warning. Variables apply shortest first, so `RULES='[...]'` is in place
    before `RULES__0__INTERVAL` edits it."""
    environ = os.environ if environ is None else environ
    result = Overlaid(copy.deepcopy(dict(data)))
    found = []
    for name, value in environ.items():
        if not name.upper().startswith(ENV_PREFIX) or name.upper() == CONFIG_ENV:
            continue
        parts = name[len(ENV_PREFIX) :].split("__")
        if _norm(parts[0]) not in {_norm(s) for s in settings}:
            result.warnings.append(
                f"environment variable {name} does not name a setting "
                f"(settings: {', '.join(sorted(settings))}); it is ignored"
            )
            continue
        parts[0] = _key_for(parts[0], settings)
        found.append((len(parts), name, parts, value))
    for _, name, parts, value in sorted(found):
        try:
            result.overrides.append(_apply(result.data, name, parts, value))
        except _Unplaceable as exc:
            result.overrides.append(Override(name, exc.loc))
            result.problems.append(Problem(exc.loc, exc.reason))
    return result
