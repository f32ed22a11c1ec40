"""Loading: file, then environment overrides, then validation, with every problem at once.

Each problem is reported with its YAML path and where its value came from: the
file's line, or the environment variable that set it (a line of the file would
point at a value that is not the one in force).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from replicator.config.cross import cross_problems
from replicator.config.env import CONFIG_ENV, ENV_PREFIX, Overlaid, apply_environment
from replicator.config.models import CROSS_CHECKED, Config, known_keys
from replicator.config.report import Loc, Problem, config_error, from_validation_error
from replicator.config.yamlfile import YamlDocument, read_yaml

log = logging.getLogger("replicator.config")


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, validate and return the configuration at `path` (environment overrides applied).

    Raises ConfigError listing every problem, one per line, each with its YAML
    path (`rules[0].tags.semver`) and line number (or environment variable);
    `.path` is the first path and `.problems` all (path, message) pairs.
    """
    file = Path(path)
    config = _build(read_yaml(file), label=str(file))
    _resolve_paths(config, file.resolve().parent)
    config._source_path = file.resolve()
    return config


def config_from_dict(
    data: Mapping[str, Any],
    base_dir: str | os.PathLike[str] | None = None,
) -> Config:
    """Validate an in-memory configuration exactly like `load_config` (ConfigError on
    problems, environment overrides applied); relative paths resolve against `base_dir`."""
    config = _build(YamlDocument(dict(data)), label="(in memory)")
    if base_dir is not None:
        _resolve_paths(config, Path(base_dir).resolve())
    return config


def _where(doc: YamlDocument, overlay: Overlaid, loc: Loc) -> str:
    variable = overlay.variable_for(loc)
    if variable:
        return f"environment variable {variable}"
    line = doc.line_for(loc)
    sources = [f"line {line}"] if line else []
    sources += [f"environment variable {v}" for v in overlay.variables_below(loc)]
    return ", ".join(sources)


def _build(doc: YamlDocument, *, label: str) -> Config:
    settings = {info.alias or name for name, info in Config.model_fields.items()}
    overlay = apply_environment(doc.data, settings)
    problems = [
        Problem(loc, "duplicate key; the earlier value would be lost") for loc, _ in doc.duplicates
    ]
    problems += overlay.problems
    data: dict[str, Any] = {}
    for key, value in overlay.data.items():
        if isinstance(key, str) and not key.startswith("_"):
            data[key] = value
        else:
            problems.append(Problem((str(key),), "unknown key"))
    config: Config | None = None
    try:
        config = Config.model_validate(data, context={CROSS_CHECKED: True})
    except ValidationError as exc:
        problems += from_validation_error(exc, known_keys())
    problems += cross_problems(data)
    if problems or config is None:
        raise config_error(label, problems, lambda loc: _where(doc, overlay, loc))
    config._warnings = overlay.warnings
    for warning in overlay.warnings:
        log.warning("%s", warning)
    return config


def _resolve_paths(model: Any, base: Path) -> None:
    """Relative paths in the file are relative to the file's directory, not the cwd."""
    if isinstance(model, BaseModel):
        for fname in type(model).model_fields:
            value = getattr(model, fname)
            if isinstance(value, Path):
                value = value.expanduser()
                setattr(model, fname, value if value.is_absolute() else base / value)
            else:
                _resolve_paths(value, base)
    elif isinstance(model, dict):
        for value in model.values():
            _resolve_paths(value, base)
    elif isinstance(model, list):
        for value in model:
            _resolve_paths(value, base)


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """-c/--config for every sub-command that reads the configuration."""
    default = os.environ.get(CONFIG_ENV)
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        default=default,
        required=default is None,
        help=f"the YAML configuration file (default: ${CONFIG_ENV}"
        + (f", now {default}" if default else "")
        + "); settings can be overridden with "
        f"{ENV_PREFIX}<KEY> environment variables, '__' between nested keys",
    )
