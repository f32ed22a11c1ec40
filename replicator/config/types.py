"""The value types of the configuration file: names, durations, URLs, globs, cron, platforms.

Each is an annotated type whose validator refuses a bad value with a message
that says what a good one looks like, so every model field that uses it
reports the same way. Pure: no I/O, no knowledge of the models.
"""

from __future__ import annotations

import difflib
import re
import urllib.parse
from pathlib import Path
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from pydantic import AfterValidator, Field, PlainSerializer, PlainValidator, WithJsonSchema

from replicator.durations import DURATION_PATTERN, format_duration, parse_duration
from replicator.globs import validate_repository_glob, validate_tag_glob
from replicator.manifest import Platform
from replicator.semver import parse_range

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_REPO_PREFIX_RE = re.compile(r"^(?:[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*/)*$")
_HOST_PORT_RE = re.compile(r"^(?:\[([0-9A-Fa-f:.]+)\]|([^\s:\[\]]*)):(\d{1,5})$")


def _name(value: str) -> str:
    if not _NAME_RE.match(value):
        raise ValueError(
            f"invalid name {value!r}: use letters, digits, '.', '_' or '-' "
            "(starting with a letter or digit, at most 63 characters)"
        )
    return value


def _env_name(value: str) -> str:
    if not _ENV_NAME_RE.match(value):
        raise ValueError(
            f"{value!r} is not an environment variable name "
            "(letters, digits and '_', not starting with a digit)"
        )
    return value


def _duration(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        raise ValueError(
            f"a duration needs a unit, e.g. '{int(value)}s' or '10m' "
            f"(got the bare number {value!r})"
        )
    return parse_duration(value)


def _positive(value: float) -> float:
    if value <= 0:
        raise ValueError("must be longer than 0s")
    return value


def _cron(value: str) -> str:
    # imported here: croniter (with dateutil) is 20 ms of start-up CPU, and only a
    # configuration with a schedule needs it
    from croniter import CroniterBadDateError, croniter

    value = value.strip()
    if not croniter.is_valid(value):
        raise ValueError(
            f"invalid cron expression {value!r}: use five fields "
            "'minute hour day-of-month month day-of-week', e.g. '*/10 * * * *' "
            "(a sixth field is read as seconds)"
        )
    try:
        croniter(value, 0.0).get_next(float)
    except CroniterBadDateError:
        raise ValueError(f"cron expression {value!r} never runs (no such date)") from None
    return value


def _platform(value: str) -> str:
    return str(Platform.parse(value))


def _tag_regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as exc:
        raise ValueError(f"invalid regular expression {text!r}: {exc}") from None
    return text


def _semver_range(text: str) -> str:
    parse_range(text)  # raises ValueError naming the bad part
    return text


def shown_url(value: str) -> str:
    """A refused URL as an error may show it: not when it may carry a secret, i.e. a
    user:password@ the URL parser did not recognise (no scheme) or a query string."""
    if "@" in value or "?" in value:
        return "(not shown: it contains '@' or '?', which may carry a secret)"
    return repr(value)


def _registry_url(value: str) -> str:
    value = value.strip()
    parts = urllib.parse.urlsplit(value)
    if parts.username or parts.password:
        # Do not echo the URL: it carries a credential.
        raise ValueError(
            "the URL contains a user name or password; put credentials under "
            "auth (password_env or password_file) instead"
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"invalid registry URL {shown_url(value)}: expected http(s)://host[:port]")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValueError(f"invalid registry URL {shown_url(value)}: bad port") from None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(
            f"invalid registry URL {shown_url(value)}: give only scheme://host[:port]; "
            "the API always lives under /v2/"
        )
    return f"{parts.scheme}://{parts.netloc}"


def _http_url(value: str) -> str:
    value = value.strip()
    parts = urllib.parse.urlsplit(value)
    if parts.username or parts.password:
        raise ValueError("the URL contains a user name or password; not allowed here")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"invalid URL {shown_url(value)}: expected http(s)://host[:port][/path]")
    return value


def split_host_port(value: str) -> tuple[str, int]:
    """'127.0.0.1:8500' -> ('127.0.0.1', 8500); '[::1]:8500' -> ('::1', 8500)."""
    m = _HOST_PORT_RE.match(value.strip())
    if not m:
        raise ValueError(
            f"invalid listen address {value!r}: expected host:port, "
            "e.g. 127.0.0.1:8500 or [::1]:8500"
        )
    port = int(m.group(3))
    if port > 65535:
        raise ValueError(f"invalid listen address {value!r}: port {port} is above 65535")
    return (m.group(1) or m.group(2) or "0.0.0.0"), port


def _listen(value: str) -> str:
    host, port = split_host_port(value)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _rename_prefix(value: str) -> str:
    if value and not _REPO_PREFIX_RE.match(value):
        raise ValueError(
            f"{value!r} is not a repository path prefix: lower-case path "
            "components ending with '/', e.g. 'mirror/'"
        )
    return value


def _time_zone(value: str) -> str:
    value = value.strip()
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        close = difflib.get_close_matches(value, sorted(available_timezones()), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"unknown time zone {value!r}{hint}: use an IANA name such as "
            "'Europe/Berlin', 'America/New_York' or 'UTC'"
        ) from None
    return value


def one_or_many(value: Any) -> Any:
    """A single string where a list is expected is a list of one (`to: eu-west`)."""
    return [value] if isinstance(value, str) else value


def _docker_config(value: Any) -> bool | Path:
    if isinstance(value, bool):
        return value
    if isinstance(value, (str, Path)) and str(value).strip():
        return Path(str(value).strip())
    raise ValueError(
        "docker_config must be true (use ~/.docker/config.json or "
        "$DOCKER_CONFIG/config.json) or the path of a Docker config.json"
    )


def _auth_file(value: Any) -> bool | Path:
    if isinstance(value, bool):
        return value
    if isinstance(value, (str, Path)) and str(value).strip():
        return Path(str(value).strip())
    raise ValueError(
        "auth_file must be true ($REGISTRY_AUTH_FILE, else "
        "$XDG_RUNTIME_DIR/containers/auth.json, else ~/.config/containers/auth.json) "
        "or the path of a containers auth.json"
    )


Name = Annotated[str, AfterValidator(_name)]
EnvName = Annotated[str, AfterValidator(_env_name)]
Duration = Annotated[
    float,
    PlainValidator(_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": DURATION_PATTERN,
            "description": "a duration with a unit: ms, s, m, h, d, w (e.g. 10m, 1h30m)",
            "examples": ["90s", "10m", "1h", "30d"],
        }
    ),
]
PositiveDuration = Annotated[Duration, AfterValidator(_positive)]
CronExpr = Annotated[
    str, AfterValidator(_cron), Field(description="cron expression, e.g. '*/10 * * * *'")
]
TimeZoneName = Annotated[
    str,
    AfterValidator(_time_zone),
    Field(description="an IANA time zone name, e.g. Europe/Berlin or UTC"),
]
RepoGlob = Annotated[str, AfterValidator(validate_repository_glob)]
TagGlob = Annotated[str, AfterValidator(validate_tag_glob)]
SemverRange = Annotated[str, AfterValidator(_semver_range)]
TagRegex = Annotated[
    str,
    AfterValidator(_tag_regex),
    Field(description="Python regular expression, searched: anchor with ^...$"),
]
PlatformStr = Annotated[
    str, AfterValidator(_platform), Field(description="os/arch[/variant], e.g. linux/arm64/v8")
]
RegistryUrl = Annotated[str, AfterValidator(_registry_url)]
HttpUrl = Annotated[str, AfterValidator(_http_url)]
ListenAddress = Annotated[str, AfterValidator(_listen)]
RepoPrefix = Annotated[str, AfterValidator(_rename_prefix)]
DockerConfig = Annotated[
    bool | Path,
    PlainValidator(_docker_config),
    PlainSerializer(lambda v: v if isinstance(v, bool) else str(v)),
    WithJsonSchema(
        {
            "anyOf": [{"type": "boolean"}, {"type": "string"}],
            "description": "true for the default Docker config.json, or its path",
        }
    ),
]
AuthFile = Annotated[
    bool | Path,
    PlainValidator(_auth_file),
    PlainSerializer(lambda v: v if isinstance(v, bool) else str(v)),
    WithJsonSchema(
        {
            "anyOf": [{"type": "boolean"}, {"type": "string"}],
            "description": "true for the containers auth.json podman and skopeo use, or its path",
        }
    ),
]


_BYTES_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*(?:([kKmMgGtT])(i?)B|(B))?$")
_POWERS = {"k": 1, "m": 2, "g": 3, "t": 4}


def parse_bytes(value: Any, *, rate: bool = False) -> int:
    """`100MiB` -> 104857600, `2GB` -> 2000000000, `512` -> 512 (bytes). With `rate`, a
    trailing `/s` is allowed (`20MiB/s`). Lower-case `b` (bits) is refused."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as '100MiB', got {value!r}")
    if isinstance(value, int):
        number = value
    else:
        text = str(value).strip()
        if rate and text.endswith("/s"):
            text = text[:-2].rstrip()
        m = _BYTES_RE.match(text)
        if not m:
            example = "'20MiB/s' or '500kB/s'" if rate else "'100MiB', '1GB' or '524288'"
            raise ValueError(
                f"invalid {'rate' if rate else 'size'} {value!r}: expected bytes with an "
                f"optional unit (kB, MB, GB, TB or KiB, MiB, GiB, TiB), e.g. {example}"
            )
        prefix, binary = m.group(2), m.group(3)
        scale = (1024 if binary else 1000) ** _POWERS[prefix.lower()] if prefix else 1
        number = int(float(m.group(1)) * scale)
    if number <= 0:
        raise ValueError(f"{value!r} must be more than 0 bytes")
    return number


def format_bytes(n: int) -> str:
    """The shortest exact binary-unit spelling: 104857600 -> `100MiB`."""
    for unit, power in (("TiB", 4), ("GiB", 3), ("MiB", 2), ("KiB", 1)):
        if n % 1024**power == 0:
            return f"{n // 1024**power}{unit}"
    return str(n)


ByteSize = Annotated[
    int,
    PlainValidator(parse_bytes),
    PlainSerializer(format_bytes, return_type=str),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer", "minimum": 1}, {"type": "string"}],
            "description": "bytes, with an optional unit: kB, MB, GB or KiB, MiB, GiB",
            "examples": ["50MiB", "1GB"],
        }
    ),
]
ByteRate = Annotated[
    int,
    PlainValidator(lambda v: parse_bytes(v, rate=True)),
    PlainSerializer(lambda n: f"{format_bytes(n)}/s", return_type=str),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer", "minimum": 1}, {"type": "string"}],
            "description": "bytes per second, with an optional unit and /s: e.g. 20MiB/s",
            "examples": ["20MiB/s", "500kB/s"],
        }
    ),
]
