"""The configuration file: one YAML document, overridable from the environment.

Parsing is strict (unknown keys are refused, with a suggestion) and every
problem is reported at once, each with its YAML path and line, because an
operator fixing a config by trial and error one message at a time gives up.

Secrets are never part of the parsed model: the file names an environment
variable (`*_env`) or a file (`*_file`), read only when a connection is made
(`Config.site_endpoint`, `SiteConfig.webhook_token`, `MqttConfig.password`),
so `check --offline` works in CI without them and no error or dump can leak one.

Environment overrides: `REGISTRY_REPLICATOR_<FIELD>` with `__` between nested
keys, e.g. `REGISTRY_REPLICATOR_LISTEN=0.0.0.0:8500`,
`REGISTRY_REPLICATOR_SITES__US_EAST__URL=https://...`,
`REGISTRY_REPLICATOR_GC__SCHEDULE="0 4 * * *"`. Names are case-insensitive
and, for keys already in the file, `_` also matches `-` (shells cannot export
names with '-'), so `SITES__US_EAST__...` overrides the site `us-east`. An
existing list item is addressed by its index (`RULES__0__INTERVAL=5m`); a
whole list can be replaced with JSON (`REGISTRY_REPLICATOR_RULES='[...]'`).
A value that looks like JSON is parsed as JSON. The environment wins over the
file; REGISTRY_REPLICATOR_* variables that name no setting are reported as
warnings (`Config.warnings`).
"""

from __future__ import annotations

import argparse
import contextvars
import difflib
import json
import logging
import os
import re
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from croniter import croniter
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    PrivateAttr,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from replicator import rules as _rules
from replicator.durations import DURATION_PATTERN, format_duration, parse_duration
from replicator.errors import ConfigError
from replicator.manifest import Platform

if TYPE_CHECKING:
    from replicator.registry.site import Credentials, SiteEndpoint

log = logging.getLogger(__name__)

ENV_PREFIX = "REGISTRY_REPLICATOR_"
CONFIG_ENV = "REGISTRY_REPLICATOR_CONFIG"  # default for -c/--config; not a setting

# ---- field types ------------------------------------------------------------------------------

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_REPO_PREFIX_RE = re.compile(r"^(?:[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*/)*$")


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
    value = value.strip()
    if not croniter.is_valid(value):
        raise ValueError(
            f"invalid cron expression {value!r}: use five fields "
            "'minute hour day-of-month month day-of-week', e.g. '*/10 * * * *'"
        )
    return value


def _platform(value: str) -> str:
    return str(Platform.parse(value))


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
        raise ValueError(f"invalid registry URL {value!r}: expected http(s)://host[:port]")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValueError(f"invalid registry URL {value!r}: bad port") from None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(
            f"invalid registry URL {value!r}: give only scheme://host[:port]; "
            "the API always lives under /v2/"
        )
    return f"{parts.scheme}://{parts.netloc}"


def _http_url(value: str) -> str:
    value = value.strip()
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"invalid URL {value!r}: expected http(s)://host[:port][/path]")
    if parts.username or parts.password:
        raise ValueError("the URL contains a user name or password; not allowed here")
    return value


def _listen(value: str) -> str:
    host, port = split_host_port(value)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_host_port(value: str) -> tuple[str, int]:
    """'127.0.0.1:8500' -> ('127.0.0.1', 8500); '[::1]:8500' -> ('::1', 8500)."""
    m = re.match(r"^(?:\[([0-9A-Fa-f:.]+)\]|([^\s:\[\]]*)):(\d{1,5})$", value.strip())
    if not m:
        raise ValueError(
            f"invalid listen address {value!r}: expected host:port, "
            "e.g. 127.0.0.1:8500 or [::1]:8500"
        )
    port = int(m.group(3))
    if port > 65535:
        raise ValueError(f"invalid listen address {value!r}: port {port} is above 65535")
    return (m.group(1) or m.group(2) or "0.0.0.0"), port


def _rename_prefix(value: str) -> str:
    if value and not _REPO_PREFIX_RE.match(value):
        raise ValueError(
            f"{value!r} is not a repository path prefix: lower-case path "
            "components ending with '/', e.g. 'mirror/'"
        )
    return value


def _one_or_many(value: Any) -> Any:
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
RepoGlob = Annotated[str, AfterValidator(_rules.validate_repository_glob)]
TagGlob = Annotated[str, AfterValidator(_rules.validate_tag_glob)]
SemverRange = Annotated[str, AfterValidator(_rules.validate_semver_range)]
PlatformStr = Annotated[
    str, AfterValidator(_platform), Field(description="os/arch[/variant], e.g. linux/arm64/v8")
]
RegistryUrl = Annotated[str, AfterValidator(_registry_url)]
HttpUrl = Annotated[str, AfterValidator(_http_url)]
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


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid", validate_by_name=True, validate_by_alias=True, serialize_by_alias=True
    )


def _refused_inline(stem: str) -> Any:
    """A field that exists only to refuse an inline secret with a helpful message.

    The error names the field, never its value; the field is hidden from the
    JSON schema and from dumps.
    """

    def refuse(_value: Any) -> Any:
        raise ValueError(
            f"inline secrets are not allowed here: use {stem}_env or {stem}_file instead "
            "(the name of an environment variable, or the path of a file holding the secret)"
        )

    return SkipJsonSchema[Annotated[Any, PlainValidator(refuse)]]


def _one_source(model: Any, stem: str) -> None:
    if getattr(model, f"{stem}_env") and getattr(model, f"{stem}_file"):
        raise ValueError(f"give {stem}_env or {stem}_file, not both")


def read_secret(env: str | None, file: Path | None, where: str) -> str | None:
    """Read a secret from an environment variable or a file, at call time.

    Errors name the variable or file and the config path, never the value.
    A trailing newline in a file is dropped (editors add one).
    """
    if env:
        value = os.environ.get(env)
        if value is None:
            raise ConfigError(f"environment variable {env} is not set", path=where)
        if not value:
            raise ConfigError(f"environment variable {env} is empty", path=where)
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
        return value
    return None


# ---- models -----------------------------------------------------------------------------------


class TLSConfig(_Model):
    """Client TLS for a registry or broker: a private CA, and an optional client certificate."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    @model_validator(mode="after")
    def _pair(self) -> TLSConfig:
        if bool(self.cert) != bool(self.key):
            raise ValueError("cert and key go together: give both or neither")
        return self


class AuthConfig(_Model):
    """How to log in to a registry. Secrets are referenced, never written inline."""

    username: str | None = None
    password_env: EnvName | None = None
    password_file: Path | None = None
    identity_token_env: EnvName | None = Field(
        None, description="an OAuth2 refresh token (docker login identity token)"
    )
    identity_token_file: Path | None = None
    docker_config: DockerConfig = False

    password: _refused_inline("password") = Field(None, exclude=True, repr=False)
    identity_token: _refused_inline("identity_token") = Field(None, exclude=True, repr=False)

    @model_validator(mode="after")
    def _consistent(self) -> AuthConfig:
        _one_source(self, "password")
        _one_source(self, "identity_token")
        has_password = bool(self.password_env or self.password_file)
        has_token = bool(self.identity_token_env or self.identity_token_file)
        if self.docker_config and (self.username or has_password or has_token):
            raise ValueError(
                "docker_config supplies the credentials itself; do not combine it "
                "with username / password_* / identity_token_*"
            )
        if has_password and not self.username:
            raise ValueError("a password needs a username")
        if self.username and not (has_password or has_token):
            raise ValueError(
                f"username {self.username!r} given without password_env or password_file"
            )
        return self


class LimitsConfig(_Model):
    concurrency: int = Field(
        8,
        ge=1,
        le=1024,
        description="requests in flight to this registry at once; "
        "as many blob downloads may stream besides, so "
        "up to 2 x concurrency + 2 connections",
    )
    requests_per_second: float | None = Field(None, gt=0, description="rate cap; null for none")


class SiteConfig(_Model):
    """One registry ("site"): where it is, how to reach it, and what it lets us do."""

    url: RegistryUrl
    insecure: bool = Field(False, description="allow plain http / skip TLS verification")
    tls: TLSConfig | None = None
    auth: AuthConfig | None = None
    webhook_token_env: EnvName | None = None
    webhook_token_file: Path | None = None
    storage: Path | None = Field(
        None, description="the registry's storage rootdirectory (for storage-mode GC)"
    )
    registry_config: Path | None = Field(None, description="the registry's own config.yml")
    limits: LimitsConfig = Field(default_factory=LimitsConfig)

    _name: str = PrivateAttr(default="")

    inline_webhook_token: _refused_inline("webhook_token") = Field(
        None, alias="webhook_token", exclude=True, repr=False
    )

    @model_validator(mode="after")
    def _consistent(self) -> SiteConfig:
        _one_source(self, "webhook_token")
        if self.url.startswith("http://") and not self.insecure:
            raise ValueError(
                "plain http sends credentials and images unencrypted: set "
                "insecure: true to allow it, or use https"
            )
        if self.insecure and self.tls and self.tls.ca:
            raise ValueError(
                "insecure: true skips verification, so tls.ca would be ignored; choose one"
            )
        return self

    @property
    def name(self) -> str:
        return self._name

    def webhook_token(self) -> str | None:
        """The bearer token the site's webhooks must present (None: no token configured)."""
        where = f"sites.{self._name}.webhook_token_" + ("env" if self.webhook_token_env else "file")
        return read_secret(self.webhook_token_env, self.webhook_token_file, where)


class MqttConfig(_Model):
    """Optional MQTT bus: registry events shared between replicator instances."""

    url: str
    topic: str = "registry/events"
    client_id: str | None = None
    group: str | None = Field(
        None, description="shared-subscription group, so one member of the group handles each event"
    )
    username: str | None = None
    password_env: EnvName | None = None
    password_file: Path | None = None
    qos: Literal[0, 1, 2] = 1
    tls: TLSConfig | None = None

    inline_password: _refused_inline("password") = Field(
        None, alias="password", exclude=True, repr=False
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urllib.parse.urlsplit(value.strip())
        if parts.username or parts.password:
            raise ValueError(
                "the URL contains a user name or password; use username and "
                "password_env / password_file"
            )
        if parts.scheme not in ("mqtt", "mqtts", "ws", "wss") or not parts.hostname:
            raise ValueError(
                f"invalid MQTT URL {value!r}: expected mqtt://host[:port] "
                "(or mqtts://, ws://, wss://)"
            )
        try:
            parts.port  # noqa: B018
        except ValueError:
            raise ValueError(f"invalid MQTT URL {value!r}: bad port") from None
        return value.strip()

    @field_validator("topic")
    @classmethod
    def _topic(cls, value: str) -> str:
        if not value or "\x00" in value:
            raise ValueError("the topic must be a non-empty string")
        return value

    @field_validator("group")
    @classmethod
    def _group(cls, value: str | None) -> str | None:
        if value is not None and (not value or any(c in value for c in "/+#")):
            raise ValueError(f"invalid group {value!r}: no '/', '+' or '#'")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> MqttConfig:
        _one_source(self, "password")
        if (self.password_env or self.password_file) and not self.username:
            raise ValueError("a password needs a username")
        return self

    @property
    def host(self) -> str:
        return urllib.parse.urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        parts = urllib.parse.urlsplit(self.url)
        default = {"mqtt": 1883, "mqtts": 8883, "ws": 80, "wss": 443}[parts.scheme]
        return parts.port or default

    @property
    def use_tls(self) -> bool:
        return self.url.startswith(("mqtts://", "wss://"))

    @property
    def transport(self) -> Literal["tcp", "websockets"]:
        return "websockets" if self.url.startswith(("ws://", "wss://")) else "tcp"

    def password(self) -> str | None:
        where = "mqtt.password_" + ("env" if self.password_env else "file")
        return read_secret(self.password_env, self.password_file, where)


class TagFilter(_Model):
    """Which tags of a repository a rule copies. Empty include means every tag."""

    include: list[TagGlob] = Field(default_factory=list)
    exclude: list[TagGlob] = Field(default_factory=list)
    semver: SemverRange | None = Field(
        None, description="npm-style range, e.g. '>=1.2 <2', '^1.2', '1.x', 'a || b'"
    )
    latest: int | None = Field(
        None, ge=1, description="keep only the N highest versions (or N most recently pushed)"
    )

    _coerce = field_validator("include", "exclude", mode="before")(
        classmethod(lambda cls, v: _one_or_many(v))
    )


class RenameConfig(_Model):
    strip_prefix: Annotated[str, AfterValidator(_rename_prefix)] = ""
    prefix: Annotated[str, AfterValidator(_rename_prefix)] = ""


class Rule(_Model):
    """Replicate matching repositories from one site to others."""

    name: Name
    from_: str = Field(alias="from")
    to: list[str] = Field(min_length=1)
    repositories: list[RepoGlob] = Field(default_factory=lambda: ["**"], min_length=1)
    exclude_repositories: list[RepoGlob] = Field(default_factory=list)
    tags: TagFilter | None = None
    platforms: list[PlatformStr] | None = Field(
        None, description="copy only these platforms of multi-arch images"
    )
    referrers: bool = Field(True, description="copy signatures, SBOMs and other referrers")
    deletes: bool = Field(False, description="propagate deletions to the targets")
    overwrite: bool = Field(
        True, description="false: never replace a tag that differs at the target"
    )
    rename: RenameConfig | None = None
    immutable_tags: list[TagGlob] = Field(
        default_factory=list,
        description="tags that never move once pushed (e.g. 'v*'): when the journal already "
        "records the target holding the source digest, reconcile trusts it and "
        "sends the target no request for them",
    )
    interval: PositiveDuration | None = Field(None, description="periodic reconcile interval")
    schedule: CronExpr | None = Field(None, description="periodic reconcile as cron")

    _coerce = field_validator(
        "to", "repositories", "exclude_repositories", "immutable_tags", mode="before"
    )(classmethod(lambda cls, v: _one_or_many(v)))

    @model_validator(mode="after")
    def _consistent(self) -> Rule:
        if self.interval is not None and self.schedule is not None:
            raise ValueError("interval and schedule are mutually exclusive: give one")
        return self

    @property
    def platform_list(self) -> list[Platform]:
        return [Platform.parse(p) for p in self.platforms or ()]

    def matches_repository(self, repo: str) -> bool:
        return _rules.repository_selected(self.repositories, self.exclude_repositories, repo)

    def map_repository(self, repo: str) -> str:
        return _rules.map_repository(self, repo)


class KeepConfig(_Model):
    """What a GC policy keeps. A tag is kept if ANY of these holds."""

    tags: list[TagGlob] = Field(default_factory=list)
    most_recent: int | None = Field(None, ge=0, description="the N most recently pushed tags")
    pushed_within: Duration | None = None
    pulled_within: Duration | None = None

    _coerce = field_validator("tags", mode="before")(classmethod(lambda cls, v: _one_or_many(v)))


class GcPolicy(_Model):
    name: Name
    sites: list[str] = Field(min_length=1)
    repositories: list[RepoGlob] = Field(default_factory=lambda: ["**"], min_length=1)
    exclude_repositories: list[RepoGlob] = Field(default_factory=list)
    keep: KeepConfig = Field(default_factory=KeepConfig)
    untagged: Literal["delete", "keep"] = Field(
        "keep", description="what happens to manifests no kept tag or index references"
    )
    referrers: Literal["follow-subject", "keep"] = Field(
        "follow-subject", description="follow-subject: a referrer lives as long as its subject"
    )
    grace: Duration = Field(3600.0, description="nothing younger than this is ever deleted")
    mode: Literal["api", "storage", "both"] = "api"

    _coerce = field_validator("sites", "repositories", "exclude_repositories", mode="before")(
        classmethod(lambda cls, v: _one_or_many(v))
    )

    def matches_repository(self, repo: str) -> bool:
        return _rules.repository_selected(self.repositories, self.exclude_repositories, repo)


class GcConfig(_Model):
    schedule: CronExpr | None = None
    policies: list[GcPolicy] = Field(default_factory=list)


class TelemetryConfig(_Model):
    otlp_endpoint: HttpUrl | None = None
    service_name: str = "registry-replicator"


class _CrossFieldProblems(ValueError):
    """Problems that involve several fields; each carries its own YAML path."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("\n".join(f"{p}: {m}" for p, m in problems))


def _unknown(kind: str, name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {kind} {name!r}{hint}; known: {', '.join(sorted(known)) or 'none'}"


_PENDING_CROSS: contextvars.ContextVar[list[tuple[str, str]] | None] = contextvars.ContextVar(
    "config_cross_problems", default=None
)


def _as_list(value: Any) -> list:
    if isinstance(value, str):
        return [value]
    return list(value) if isinstance(value, (list, tuple)) else []


def _check_unique(
    name: Any,
    index: int,
    seen: dict[Any, int],
    list_path: str,
    kind: str,
    problems: list[tuple[str, str]],
) -> None:
    """Record a problem when `name` was already used earlier in the same list."""
    if not isinstance(name, str):
        return
    if name in seen:
        problems.append(
            (
                f"{list_path}[{index}].name",
                f"duplicate {kind} name {name!r} (also {list_path}[{seen[name]}])",
            )
        )
    seen.setdefault(name, index)


def _cross_problems(data: Mapping) -> list[tuple[str, str]]:
    """Checks that span fields (site references, unique names), on possibly invalid raw data."""
    sites = data.get("sites")
    sites = sites if isinstance(sites, Mapping) else {}
    known = [str(k) for k in sites]
    problems: list[tuple[str, str]] = []
    seen: dict[Any, int] = {}
    rules = data.get("rules")
    for i, rule in enumerate(rules if isinstance(rules, list) else []):
        if not isinstance(rule, Mapping):
            continue
        where = f"rules[{i}]"
        name = rule.get("name")
        _check_unique(name, i, seen, "rules", "rule", problems)
        source = rule.get("from", rule.get("from_"))
        if isinstance(source, str) and source not in sites:
            problems.append((f"{where}.from", _unknown("site", source, known)))
        targets: set[str] = set()
        for j, target in enumerate(_as_list(rule.get("to"))):
            if not isinstance(target, str):
                continue
            path = f"{where}.to[{j}]" if isinstance(rule.get("to"), list) else f"{where}.to"
            if target == source:
                problems.append(
                    (path, f"rule {name!r} would replicate site {target!r} onto itself")
                )
            elif target not in sites:
                problems.append((path, _unknown("site", target, known)))
            elif target in targets:
                problems.append((path, f"site {target!r} listed twice"))
            targets.add(target)
    gc = data.get("gc")
    policies = gc.get("policies") if isinstance(gc, Mapping) else None
    seen = {}
    for i, policy in enumerate(policies if isinstance(policies, list) else []):
        if not isinstance(policy, Mapping):
            continue
        where = f"gc.policies[{i}]"
        name = policy.get("name")
        _check_unique(name, i, seen, "gc.policies", "policy", problems)
        mode = policy.get("mode", "api")
        for j, site in enumerate(_as_list(policy.get("sites"))):
            if not isinstance(site, str):
                continue
            path = (
                f"{where}.sites[{j}]" if isinstance(policy.get("sites"), list) else f"{where}.sites"
            )
            if site not in sites:
                problems.append((path, _unknown("site", site, known)))
            elif mode in ("storage", "both"):
                site_data = sites[site]
                if not (isinstance(site_data, Mapping) and site_data.get("storage")):
                    problems.append(
                        (
                            f"{where}.mode",
                            f"mode {mode!r} needs "
                            f"sites.{site}.storage (the registry's rootdirectory)",
                        )
                    )
    return problems


class _EnvOverrides(PydanticBaseSettingsSource):
    """The environment source, with its dict keys matched to the file's (`US_EAST` ~ `us-east`)."""

    def __init__(
        self,
        settings_cls: type[BaseSettings],
        env: PydanticBaseSettingsSource,
        init: PydanticBaseSettingsSource,
    ) -> None:
        super().__init__(settings_cls)
        self._env = env
        self._init = init

    def get_field_value(self, field, field_name):  # pragma: no cover - unused by __call__
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return _align_keys(self._env(), self._init())


def _merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            out[key] = _merge(base.get(key), value)
        return out
    return override


def _norm(key: str) -> str:
    return key.casefold().replace("-", "_").replace(".", "_")


def _align_keys(env: Any, base: Any) -> Any:
    """Rename env keys to the file's spelling; turn `RULES__0__X` into an edit of list item 0."""
    if (
        isinstance(env, dict)
        and isinstance(base, list)
        and env
        and all(isinstance(k, str) and k.isdigit() and int(k) < len(base) for k in env)
    ):
        items = list(base)
        for key, value in env.items():
            items[int(key)] = _merge(base[int(key)], _align_keys(value, base[int(key)]))
        return items
    if isinstance(env, str) and isinstance(base, (list, dict)) and env[:1] in ("[", "{"):
        try:
            return json.loads(env)  # pydantic-settings leaves values inside lists undecoded
        except ValueError:
            return env
    if not isinstance(env, dict) or not isinstance(base, dict):
        return env
    out: dict[str, Any] = {}
    by_norm = {_norm(k): k for k in base if isinstance(k, str)}
    for key, value in env.items():
        target = key if key in base else by_norm.get(_norm(key), key)
        out[target] = _align_keys(value, base.get(target))
    return out


class Config(BaseSettings):
    """The whole configuration. Build it with `load_config(path)`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        case_sensitive=False,
        extra="forbid",
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
    )

    journal: Path = Field(Path("replicator.db"), description="SQLite state journal")
    listen: Annotated[str, AfterValidator(_listen)] = Field(
        "127.0.0.1:8500", description="host:port for webhooks, health and metrics"
    )
    mqtt: MqttConfig | None = None
    sites: dict[Annotated[str, AfterValidator(_name)], SiteConfig] = Field(min_length=1)
    rules: list[Rule] = Field(default_factory=list)
    gc: GcConfig = Field(default_factory=GcConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)

    _source_path: Path | None = PrivateAttr(default=None)
    _warnings: list[str] = PrivateAttr(default_factory=list)

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        # Earlier sources win: the environment overrides the file.
        return (_EnvOverrides(settings_cls, env_settings, init_settings), init_settings)

    @model_validator(mode="before")
    @classmethod
    def _cross_check_raw(cls, data: Any) -> Any:
        # Runs on the merged file+environment data even when some fields are invalid,
        # so one run reports cross-field problems alongside field problems.
        _PENDING_CROSS.set(_cross_problems(data) if isinstance(data, Mapping) else [])
        return data

    @model_validator(mode="after")
    def _cross_check(self) -> Config:
        for name, site in self.sites.items():
            site._name = name
        problems = _PENDING_CROSS.get()
        _PENDING_CROSS.set(None)
        if problems:
            raise _CrossFieldProblems(problems)
        return self

    # ---- accessors ----

    @property
    def source_path(self) -> Path | None:
        """The YAML file this came from (None when built in code)."""
        return self._source_path

    @property
    def warnings(self) -> list[str]:
        """Non-fatal findings, e.g. REGISTRY_REPLICATOR_* variables that name no setting."""
        return list(self._warnings)

    @property
    def listen_host(self) -> str:
        return split_host_port(self.listen)[0]

    @property
    def listen_port(self) -> int:
        return split_host_port(self.listen)[1]

    def site(self, name: str) -> SiteConfig:
        try:
            return self.sites[name]
        except KeyError:
            raise ConfigError(_unknown("site", name, list(self.sites)), path="sites") from None

    def rule(self, name: str) -> Rule:
        for rule in self.rules:
            if rule.name == name:
                return rule
        raise ConfigError(_unknown("rule", name, [r.name for r in self.rules]), path="rules")

    def policy(self, name: str) -> GcPolicy:
        for policy in self.gc.policies:
            if policy.name == name:
                return policy
        raise ConfigError(
            _unknown("GC policy", name, [p.name for p in self.gc.policies]), path="gc.policies"
        )

    def credentials(self, name: str) -> Credentials | None:
        """The site's explicit credentials, secrets read now; None when the site has no
        `auth` or uses `docker_config` (the client then reads config.json itself).
        Raises ConfigError naming the missing variable or file, never a secret."""
        from replicator.registry.site import Credentials

        auth = self.site(name).auth
        if auth is None or auth.docker_config:
            return None
        base = f"sites.{name}.auth"
        password = read_secret(
            auth.password_env,
            auth.password_file,
            base + (".password_env" if auth.password_env else ".password_file"),
        )
        token = read_secret(
            auth.identity_token_env,
            auth.identity_token_file,
            base + (".identity_token_env" if auth.identity_token_env else ".identity_token_file"),
        )
        return Credentials(username=auth.username, password=password, identity_token=token)

    def site_endpoint(self, name: str) -> SiteEndpoint:
        """Everything the registry client needs to talk to site `name`, secrets resolved now."""
        from replicator.registry.site import SiteEndpoint

        site = self.site(name)
        tls = site.tls or TLSConfig()
        docker_config: str | None = None
        if site.auth and site.auth.docker_config is True:
            docker_config = str(default_docker_config())
        elif site.auth and isinstance(site.auth.docker_config, Path):
            docker_config = str(site.auth.docker_config)
        return SiteEndpoint(
            name=name,
            url=site.url,
            insecure=site.insecure,
            ca_file=str(tls.ca) if tls.ca else None,
            cert_file=str(tls.cert) if tls.cert else None,
            key_file=str(tls.key) if tls.key else None,
            credentials=self.credentials(name),
            docker_config=docker_config,
            concurrency=site.limits.concurrency,
            requests_per_second=site.limits.requests_per_second,
        )

    def to_dict(self) -> dict[str, Any]:
        """A plain, YAML-ready dict that `load_config` reads back to an equal Config."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def default_docker_config() -> Path:
    """Where `docker login` keeps credentials: $DOCKER_CONFIG/config.json or ~/.docker."""
    base = os.environ.get("DOCKER_CONFIG")
    return (Path(base) if base else Path.home() / ".docker").expanduser() / "config.json"


# ---- loading ----------------------------------------------------------------------------------


def _yaml_lines(
    node: yaml.Node | None, path: tuple = (), out: dict | None = None, dupes: list | None = None
) -> dict[tuple, int]:
    """Map each YAML path to its 1-based line, noting duplicate mapping keys on the way."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        seen: set = set()
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is None:
                continue
            if key in seen and dupes is not None:
                dupes.append(((*path, key), key_node.start_mark.line + 1))
            seen.add(key)
            out[(*path, key)] = key_node.start_mark.line + 1
            _yaml_lines(value_node, (*path, key), out, dupes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[(*path, i)] = item.start_mark.line + 1
            _yaml_lines(item, (*path, i), out, dupes)
    return out


def format_path(loc: tuple) -> str:
    """('rules', 0, 'tags', 'semver') -> 'rules[0].tags.semver'."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + str(part)
    return text


def _all_field_names() -> list[str]:
    names: set[str] = set()
    for model in (
        Config,
        TLSConfig,
        AuthConfig,
        LimitsConfig,
        SiteConfig,
        MqttConfig,
        TagFilter,
        RenameConfig,
        Rule,
        KeepConfig,
        GcPolicy,
        GcConfig,
        TelemetryConfig,
    ):
        for fname, info in model.model_fields.items():
            names.add(info.alias or fname)
    return sorted(names)


def _problems(exc: ValidationError) -> list[tuple[tuple, str]]:
    """(loc, message) for each pydantic error; never includes the offending input."""
    out: list[tuple[tuple, str]] = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = tuple(err["loc"])
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, _CrossFieldProblems):
            out.extend((("@", p), m) for p, m in cause.problems)
            continue
        if loc and loc[-1] == "[key]":
            loc = loc[:-1]
            prefix = "in the name: "
        else:
            prefix = ""
        kind = err["type"]
        if kind == "extra_forbidden":
            close = difflib.get_close_matches(str(loc[-1]), _all_field_names(), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            msg = f"unknown key {loc[-1]!r}{hint}"
        elif kind == "missing":
            msg = "required, but missing"
        elif kind == "value_error" and cause is not None:
            msg = str(cause)
        else:
            msg = err["msg"]
        out.append((loc, prefix + msg))
    return out


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


def _env_warnings() -> list[str]:
    fields = {f.lower() for f in Config.model_fields}
    out = []
    for key in os.environ:
        if not key.upper().startswith(ENV_PREFIX) or key.upper() == CONFIG_ENV:
            continue
        first = key[len(ENV_PREFIX) :].split("__", 1)[0].lower()
        if first not in fields:
            out.append(
                f"environment variable {key} does not name a setting "
                f"(settings: {', '.join(sorted(fields))}); it is ignored"
            )
    return out


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, validate and return the configuration at `path` (environment overrides applied).

    Raises ConfigError listing every problem, one per line, each with its YAML
    path (`rules[0].tags.semver`) and line number; `.path` is the first path
    and `.problems` all (path, message) pairs.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"configuration file {file} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"configuration path {file} is a directory, not a file") from None
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {file}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"configuration file {file} is not UTF-8 text") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark else str(file)
        # Only the parser's own words: its snippet of the line could show a secret.
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
    dupes: list[tuple[tuple, int]] = []
    lines = _yaml_lines(node, dupes=dupes)
    early = [
        (format_path(p), n, "duplicate key; the earlier value would be lost") for p, n in dupes
    ]
    config = _build(data, label=str(file), lines=lines, early=early)
    _resolve_paths(config, file.resolve().parent)
    config._source_path = file.resolve()
    return config


def config_from_dict(
    data: Mapping[str, Any],
    base_dir: str | os.PathLike[str] | None = None,
) -> Config:
    """Validate an in-memory configuration exactly like `load_config` (ConfigError on
    problems, environment overrides applied); relative paths resolve against `base_dir`."""
    config = _build(dict(data), label="(in memory)", lines={}, early=[])
    if base_dir is not None:
        _resolve_paths(config, Path(base_dir).resolve())
    return config


def _build(
    data: dict, *, label: str, lines: dict[tuple, int], early: list[tuple[str, int | None, str]]
) -> Config:
    problems = list(early)  # (path, line, message)
    problems += [
        (str(k), lines.get((k,)), "unknown key")
        for k in data
        if not isinstance(k, str) or k.startswith("_")
    ]
    config: Config | None = None
    if not problems:
        _PENDING_CROSS.set(None)
        try:
            config = Config(**data)
        except ValidationError as exc:
            found = _problems(exc)
            if not any(loc and loc[0] == "@" for loc, _ in found):
                # Field errors stopped validation before the cross-field check could
                # raise; report its findings (from the raw data) in the same run.
                found += [(("@", p), m) for p, m in _PENDING_CROSS.get() or []]
            for loc, msg in found:
                if loc and loc[0] == "@":
                    problems.append((loc[1], _line_for_text_path(loc[1], lines), msg))
                else:
                    problems.append((format_path(loc), _line_for(loc, lines), msg))
        finally:
            _PENDING_CROSS.set(None)
    if problems or config is None:
        err = ConfigError(
            f"invalid configuration {label} ({len(problems)} problem"
            f"{'s' if len(problems) != 1 else ''}):\n"
            + "\n".join(f"  {p}{f' (line {n})' if n else ''}: {m}" for p, n, m in problems)
        )
        err.path = problems[0][0] if problems else None
        err.problems = [(p, m) for p, _, m in problems]
        raise err
    config._warnings = _env_warnings()
    for warning in config._warnings:
        log.warning("%s", warning)
    return config


def _line_for(loc: tuple, lines: dict[tuple, int]) -> int | None:
    for n in range(len(loc), 0, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


def _line_for_text_path(text_path: str, lines: dict[tuple, int]) -> int | None:
    loc: list = []
    for name, index in re.findall(r"([^.\[\]]+)|\[(\d+)\]", text_path):
        loc.append(int(index) if index else name)
    return _line_for(tuple(loc), lines)


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
