"""Reading the YAML file, with the line of every key and item kept for error reports.

Errors name the file and a line, and only ever quote the parser's own words:
its snippet of the offending line could show a secret.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from replicator.config.report import Loc
from replicator.errors import ConfigError


@dataclass
class YamlDocument:
    data: dict[str, Any]
    lines: dict[Loc, int] = field(default_factory=dict)  # path -> 1-based line
    duplicates: list[tuple[Loc, int]] = field(default_factory=list)  # repeated mapping keys

    def line_for(self, loc: Loc) -> int | None:
        """The line of `loc`, or of its nearest ancestor in the file."""
        for n in range(len(loc), 0, -1):
            if loc[:n] in self.lines:
                return self.lines[loc[:n]]
        return None


def _map_lines(node: yaml.Node | None, path: Loc, doc: YamlDocument) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in seen:
                doc.duplicates.append(((*path, key), line))
            seen.add(key)
            doc.lines[(*path, key)] = line
            _map_lines(value_node, (*path, key), doc)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            doc.lines[(*path, i)] = item.start_mark.line + 1
            _map_lines(item, (*path, i), doc)


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"configuration file {file} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"configuration path {file} is a directory, not a file") from None
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {file}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"configuration file {file} is not UTF-8 text") from None


def read_yaml(file: Path) -> YamlDocument:
    """The file's top-level mapping and line map; ConfigError when it cannot be one."""
    text = _read_text(file)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark else str(file)
        what = "; ".join(p for p in (exc.context, exc.problem) if p)
        if exc.context_mark and exc.problem_mark and exc.context_mark.line != exc.problem_mark.line:
            what += f" (the construct opened on line {exc.context_mark.line + 1})"
        raise ConfigError(f"{where}: YAML syntax error: {what}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: YAML error: {type(exc).__name__}") from None
    if data is None:
        raise ConfigError(
            f"configuration file {file} is empty; see "
            "`registry-replicator config-schema` for the format"
        )
    if not isinstance(data, dict):
        raise ConfigError(
            f"configuration file {file} must be a YAML mapping at the top level "
            f"(found {type(data).__name__})"
        )
    doc = YamlDocument(data)
    _map_lines(node, (), doc)
    return doc
