"""Secret references: the file names where a secret is (`*_env`, `*_file`), never the secret.

Secrets are read only when a connection is made, so `check --offline` works in
CI without them, and no parsed model, dump or error can leak one. A secret
written inline (`password: hunter2`) is refused with a message that names the
field and never echoes the value.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import PlainValidator, ValidationInfo
from pydantic.json_schema import SkipJsonSchema

from replicator.errors import ConfigError


def _refuse(_value: Any, info: ValidationInfo) -> Any:
    stem = (info.field_name or "secret").removeprefix("inline_")
    raise ValueError(
        f"inline secrets are not allowed here: use {stem}_env or {stem}_file instead "
        "(the name of an environment variable, or the path of a file holding the secret)"
    )


# The type of a field that exists only to refuse an inline secret with a helpful message.
# The error names the field, never its value. Name the field after the secret (`password`),
# or `inline_<secret>` with an alias where a method has the secret's name; give it
# `exclude=True, repr=False` so it stays out of dumps. The JSON schema does not show it.
InlineSecret = Annotated[Any, PlainValidator(_refuse), SkipJsonSchema()]


def one_source(model: Any, stem: str) -> None:
    """Refuse `<stem>_env` and `<stem>_file` together: which one wins would be a guess."""
    if getattr(model, f"{stem}_env") and getattr(model, f"{stem}_file"):
        raise ValueError(f"give {stem}_env or {stem}_file, not both")


def read_secret(env: str | None, file: Path | None, where: str) -> str | None:
    """Read a secret from an environment variable or a file, at call time.

    Errors name the variable or file and the config path, never the value.
    A trailing newline in a file is dropped (editors add one). A blank secret
    (only whitespace) is refused like an empty one: it is always a mistake, and
    the webhook intake would refuse such a token when the daemon starts.
    """
    if env:
        value = os.environ.get(env)
        if value is None:
            raise ConfigError(f"environment variable {env} is not set", path=where)
        if not value:
            raise ConfigError(f"environment variable {env} is empty", path=where)
        if not value.strip():
            raise ConfigError(f"environment variable {env} is blank (only whitespace)", path=where)
        return value
    if file:
        try:
            value = file.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(
                f"cannot read secret file {file}: {exc.strerror or exc}", path=where
            ) from None
        except UnicodeDecodeError:
            raise ConfigError(f"secret file {file} is not UTF-8 text", path=where) from None
        if not value:
            raise ConfigError(f"secret file {file} is empty", path=where)
        if not value.strip():
            raise ConfigError(f"secret file {file} is blank (only whitespace)", path=where)
        return value
    return None
