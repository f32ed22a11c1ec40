"""The configuration's sections, as pydantic models: what each key means and may hold.

Parsing is strict: unknown keys are refused, and every model validates its own
consistency (a password needs a username, plain http needs `insecure: true`).
Checks that span sections (a rule naming an unknown site) are in `cross.py`;
reading the file and the environment is `load.py`'s job, so a Config built in
code reads neither.
"""

from __future__ import annotations

import urllib.parse
from datetime import tzinfo
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from replicator.config.cross import cross_problems, unknown_name
from replicator.config.report import ProblemsError
from replicator.config.secrets import InlineSecret, one_source, read_secret
from replicator.config.types import (
    AuthFile,
    ByteRate,
    ByteSize,
    CronExpr,
    DockerConfig,
    Duration,
    EnvName,
    HttpUrl,
    ListenAddress,
    Name,
    PlatformStr,
    PositiveDuration,
    RegistryUrl,
    RepoGlob,
    RepoPrefix,
    SemverRange,
    TagGlob,
    TagRegex,
    TimeZoneName,
    one_or_many,
    shown_url,
    split_host_port,
)
from replicator.errors import ConfigError
from replicator.fleet import status_topic_root
from replicator.globs import repository_selected
from replicator.manifest import Platform

# Validation context key: the loader has run the cross-section checks on the raw data.
CROSS_CHECKED = "cross_checked"


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid", validate_by_name=True, validate_by_alias=True, serialize_by_alias=True
    )


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
    """How to log in to a registry. Secrets are referenced, never written inline:
    in env/files, or in the credential files docker and podman keep (whose
    credential helpers are run, and run again when their tokens expire)."""

    username: str | None = None
    password_env: EnvName | None = None
    password_file: Path | None = None
    identity_token_env: EnvName | None = Field(
        None, description="an OAuth2 refresh token (docker login identity token)"
    )
    identity_token_file: Path | None = None
    docker_config: DockerConfig = Field(
        False,
        description="docker config.json: its credHelpers / credsStore helpers, else its auths",
    )
    auth_file: AuthFile = Field(
        False, description="containers auth.json (podman, skopeo), after docker_config"
    )
    helper_max_age: PositiveDuration = Field(
        900.0,
        description="how long a credential helper's answer is reused when its secret does "
        "not say when it expires (a JWT's exp is used when it does)",
    )

    password: InlineSecret = Field(None, exclude=True, repr=False)
    identity_token: InlineSecret = Field(None, exclude=True, repr=False)

    @model_validator(mode="after")
    def _consistent(self) -> AuthConfig:
        one_source(self, "password")
        one_source(self, "identity_token")
        has_password = bool(self.password_env or self.password_file)
        has_token = bool(self.identity_token_env or self.identity_token_file)
        for files in ("docker_config", "auth_file"):
            if getattr(self, files) and (self.username or has_password or has_token):
                raise ValueError(
                    f"{files} supplies the credentials itself; do not combine it "
                    "with username / password_* / identity_token_*"
                )
        if has_password and not self.username:
            raise ValueError("a password needs a username")
        if self.username and not (has_password or has_token):
            raise ValueError(
                f"username {self.username!r} given without password_env or password_file"
            )
        return self


_WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def _weekdays(value: Any) -> list[str]:
    """`[mon, tue]`, `mon-fri` or `[mon-wed, sat]` -> the listed day names, in week order."""
    items = one_or_many(value)
    if not isinstance(items, list) or not items:
        raise ValueError("days: give day names such as [mon, tue] or 'mon-fri'")
    days: set[str] = set()
    for item in items:
        text = str(item).strip().lower()
        first, _, last = text.partition("-")
        if first not in _WEEKDAYS or (last and last not in _WEEKDAYS):
            raise ValueError(f"{item!r} is not a day: use mon, tue, wed, thu, fri, sat, sun")
        i, j = _WEEKDAYS.index(first), _WEEKDAYS.index(last or first)
        days.update(_WEEKDAYS[k % 7] for k in range(i, j + 1 if j >= i else j + 8))
    return [d for d in _WEEKDAYS if d in days]


def _clock(value: Any) -> str:
    text = str(value).strip()
    hours, sep, minutes = text.partition(":")
    if not (sep and hours.isdigit() and minutes.isdigit() and len(minutes) == 2):
        raise ValueError(f"invalid time {value!r}: expected HH:MM, e.g. 08:00 or 24:00")
    h, m = int(hours), int(minutes)
    if h > 24 or m > 59 or (h == 24 and m):
        raise ValueError(f"invalid time {value!r}: from 00:00 to 24:00")
    return f"{h:02d}:{m:02d}"


class BandwidthWindow(_Model):
    """A weekly time window with its own bandwidth cap. `from` after `to` spans midnight
    (the window belongs to the day it opens)."""

    days: list[str] = Field(default_factory=lambda: list(_WEEKDAYS))
    start: str = Field(alias="from", description="opens at HH:MM")
    end: str = Field(alias="to", description="closes at HH:MM (24:00 for midnight)")
    limit: ByteRate

    _days = field_validator("days", mode="before")(classmethod(lambda cls, v: _weekdays(v)))
    _times = field_validator("start", "end", mode="before")(classmethod(lambda cls, v: _clock(v)))

    @model_validator(mode="after")
    def _not_empty(self) -> BandwidthWindow:
        if self.start == self.end:
            raise ValueError(f"window from {self.start} to {self.end} is empty")
        return self

    def minutes(self) -> tuple[int, int]:
        """(opens, closes) in minutes after midnight."""
        (h1, m1), (h2, m2) = (map(int, t.split(":")) for t in (self.start, self.end))
        return h1 * 60 + m1, h2 * 60 + m2


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
    chunk_size: ByteSize | None = Field(
        None,
        description="upload blobs in PATCH chunks of this size (e.g. 50MiB) instead of one PUT; "
        "for registries or proxies that cap request bodies. Without it, a 413 answer "
        "switches the site to chunks by itself",
    )
    bandwidth: ByteRate | None = Field(
        None,
        description="bytes/s to and from this registry, shared by all transfers "
        "(e.g. 20MiB/s); null for none. Windows below override it while they are open",
    )
    bandwidth_windows: list[BandwidthWindow] = Field(
        default_factory=list,
        description="weekly time windows, in the configured timezone, with their own "
        "bandwidth cap, e.g. business hours",
    )


class SiteConfig(_Model):
    """One registry ("site"): where it is, how to reach it, and what it lets us do."""

    url: RegistryUrl
    insecure: bool = Field(False, description="allow plain http / skip TLS verification")
    tls: TLSConfig | None = None
    auth: AuthConfig | None = None
    webhook_token_env: EnvName | None = None
    webhook_token_file: Path | None = None
    storage: Path | None = Field(
        None,
        description="the registry's storage rootdirectory (for storage-mode GC; as a "
        "rule's source, its tags are read from it instead of one HEAD per tag)",
    )
    registry_config: Path | None = Field(None, description="the registry's own config.yml")
    limits: LimitsConfig = Field(default_factory=LimitsConfig)

    _name: str = PrivateAttr(default="")

    inline_webhook_token: InlineSecret = Field(
        None, alias="webhook_token", exclude=True, repr=False
    )

    @model_validator(mode="after")
    def _consistent(self) -> SiteConfig:
        one_source(self, "webhook_token")
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
    """Optional MQTT bus: registry events shared between replicator instances.

    Refuses here whatever the bus would refuse when the daemon starts, so
    `check --offline`, `check` and `run` agree on what is valid."""

    url: str = Field(description="mqtt://host[:1883] or mqtts://host[:8883]")
    topic: str = Field("registry/events", description="events go to <topic>/<site>/<repository>")
    client_id: str | None = Field(
        None,
        description="names this instance's persistent session and task leases; unique per "
        "instance, stable across restarts (default: the identity the journal gives it)",
    )
    group: str | None = Field(
        None, description="shared-subscription group, so one member of the group handles each event"
    )
    username: str | None = None
    password_env: EnvName | None = None
    password_file: Path | None = None
    qos: Literal[1, 2] = Field(1, description="1 or 2; QoS 0 could lose events")
    tls: TLSConfig | None = None
    status_topic: str | None = Field(
        None,
        description="each instance publishes its queue and lag, retained, on "
        "<status_topic>/<instance>; a sibling of topic, never under it (default: topic "
        "with its last level replaced by 'status', e.g. registry/status)",
    )
    status_interval: PositiveDuration = Field(
        15.0,
        description="how often each instance publishes its status; `status` calls an "
        "instance stale after 3 intervals without one",
    )

    inline_password: InlineSecret = Field(None, alias="password", exclude=True, repr=False)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urllib.parse.urlsplit(value.strip())
        if parts.username or parts.password:
            raise ValueError(
                "the URL contains a user name or password; use username and "
                "password_env / password_file"
            )
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(
                f"invalid MQTT URL {shown_url(value)}: expected mqtt://host[:port] or "
                "mqtts://host[:port] (the bus speaks MQTT over TCP; WebSocket is not supported)"
            )
        try:
            parts.port  # noqa: B018
        except ValueError:
            raise ValueError(f"invalid MQTT URL {shown_url(value)}: bad port") from None
        return value.strip()

    @field_validator("topic")
    @classmethod
    def _topic(cls, value: str) -> str:
        if not value.strip("/") or any(c in value for c in "+#\x00"):
            raise ValueError(
                "the topic must be a non-empty MQTT topic without '+', '#' or NUL "
                "(wildcards belong in subscriptions)"
            )
        if value.strip("/").startswith("$"):
            raise ValueError(
                "the topic must not start with '$' (reserved for the broker, e.g. $SYS)"
            )
        return value

    @field_validator("client_id")
    @classmethod
    def _client_id(cls, value: str | None) -> str | None:
        if value is not None and not 1 <= len(value) <= 128:
            raise ValueError(
                "the client id must be 1 to 128 characters (it names the broker-side session); "
                "leave it out to use the instance's identity from the journal"
            )
        return value

    @field_validator("group")
    @classmethod
    def _group(cls, value: str | None) -> str | None:
        if value is not None and (not value or any(c in value for c in "/+#\x00")):
            raise ValueError(f"invalid group {value!r}: no '/', '+', '#' or NUL")
        return value

    @field_validator("qos", mode="before")
    @classmethod
    def _qos(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip() in ("1", "2"):
            return int(value)  # from an environment override
        if value not in (1, 2) or isinstance(value, bool):
            raise ValueError(
                f"qos must be 1 or 2, not {value!r}: QoS 0 cannot make events durable "
                "(the broker may drop a message no instance has received)"
            )
        return value

    @field_validator("status_topic")
    @classmethod
    def _status_topic(cls, value: str | None) -> str | None:
        if value is not None:
            cls._topic(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> MqttConfig:
        one_source(self, "password")
        status_topic_root(self.topic, self.status_topic)  # ValueError: under the events topic
        if (self.password_env or self.password_file) and not self.username:
            raise ValueError("a password needs a username")
        return self

    @property
    def host(self) -> str:
        return urllib.parse.urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        parts = urllib.parse.urlsplit(self.url)
        return parts.port or (8883 if parts.scheme == "mqtts" else 1883)

    @property
    def use_tls(self) -> bool:
        return self.url.startswith("mqtts://")

    @property
    def status_root(self) -> str:
        """Where instances publish their status (`replicator.fleet`)."""
        return status_topic_root(self.topic, self.status_topic)

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
    regex: list[TagRegex] = Field(
        default_factory=list,
        description="copy only tags one of these regular expressions finds (re.search; "
        "anchor with ^...$ for a whole-tag match), as regsync and skopeo sync filter",
    )
    exclude_regex: list[TagRegex] = Field(
        default_factory=list, description="leave tags one of these regular expressions finds"
    )

    _coerce = field_validator("include", "exclude", "regex", "exclude_regex", mode="before")(
        classmethod(lambda cls, v: one_or_many(v))
    )


class RenameConfig(_Model):
    strip_prefix: RepoPrefix = ""
    prefix: RepoPrefix = ""


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
    )(classmethod(lambda cls, v: one_or_many(v)))

    @model_validator(mode="after")
    def _consistent(self) -> Rule:
        if self.interval is not None and self.schedule is not None:
            raise ValueError("interval and schedule are mutually exclusive: give one")
        return self

    @property
    def platform_list(self) -> list[Platform]:
        return [Platform.parse(p) for p in self.platforms or ()]

    def matches_repository(self, repo: str) -> bool:
        return repository_selected(self.repositories, self.exclude_repositories, repo)


class KeepConfig(_Model):
    """What a GC policy keeps. A tag is kept if ANY of these holds."""

    tags: list[TagGlob] = Field(default_factory=list)
    most_recent: int | None = Field(None, ge=0, description="the N most recently pushed tags")
    pushed_within: Duration | None = None
    pulled_within: Duration | None = None

    _coerce = field_validator("tags", mode="before")(classmethod(lambda cls, v: one_or_many(v)))


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
    mode: Literal["auto", "api", "storage", "both"] = Field(
        "auto",
        description="auto: both passes on a site with `storage:` configured, else api; "
        "api: tags and manifests through the registry API; storage: mark-and-sweep of "
        "the storage directory; both: api, then storage",
    )
    follow_source: bool = Field(
        False,
        description="on a replica: never delete what the replicating rule's source still "
        "holds and the rule covers; delete what the rule covers and the source no longer "
        "holds (still never within grace or of unknown age)",
    )

    _coerce = field_validator("sites", "repositories", "exclude_repositories", mode="before")(
        classmethod(lambda cls, v: one_or_many(v))
    )

    def matches_repository(self, repo: str) -> bool:
        return repository_selected(self.repositories, self.exclude_repositories, repo)


class GcConfig(_Model):
    schedule: CronExpr | None = None
    policies: list[GcPolicy] = Field(default_factory=list)


class VerifyConfig(_Model):
    """The daemon's scheduled `verify` (drift between sources and targets as a metric)."""

    schedule: CronExpr = Field(description="when to verify, as cron (also once at start)")
    deep: bool = Field(False, description="also HEAD every blob of every in-sync manifest")


class TelemetryConfig(_Model):
    otlp_endpoint: HttpUrl | None = None
    service_name: str = "registry-replicator"


class Config(_Model):
    """The whole configuration. Build it with `load_config(path)`."""

    # (The docstring is the JSON schema's description. Built in code, a Config reads
    # no environment; `load_config` and `config_from_dict` apply the overrides.)

    journal: Path = Field(Path("replicator.db"), description="SQLite state journal")
    listen: ListenAddress = Field(
        "127.0.0.1:8500", description="host:port for webhooks, health and metrics"
    )
    mqtt: MqttConfig | None = None
    sites: dict[Name, SiteConfig] = Field(min_length=1)
    rules: list[Rule] = Field(default_factory=list)
    gc: GcConfig = Field(default_factory=GcConfig)
    verify: VerifyConfig | None = Field(None, description="scheduled verify of the replicas")
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    timezone: TimeZoneName = Field(
        "UTC",
        description="the time zone cron schedules (rules' schedule, gc.schedule) are read "
        "in; daylight-saving changes run a skipped time once after the gap and a repeated "
        "fixed time once",
    )
    events_retention: Duration = Field(
        7 * 86400.0,
        description="how long handled webhook events are kept whole in the journal; older "
        "ones are pruned unless they are the latest about their tag or digest (GC ranks by "
        "those); at least 1h, since a redelivered event is recognised only while kept",
    )

    @field_validator("events_retention")
    @classmethod
    def _events_retention(cls, value: float) -> float:
        if value < 3600:
            raise ValueError(
                "must be at least 1h: registries redeliver events for a while, and an event "
                "pruned before its redelivery would be taken as new"
            )
        return value

    _source_path: Path | None = PrivateAttr(default=None)
    _warnings: list[str] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _cross_check(self, info: ValidationInfo) -> Config:
        for name, site in self.sites.items():
            site._name = name
        if not (info.context or {}).get(CROSS_CHECKED):
            problems = cross_problems(self.model_dump(by_alias=True))
            if problems:
                raise ProblemsError(problems)
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
    def tzinfo(self) -> tzinfo:
        """`timezone` as a tzinfo, for cron schedules and times shown to operators."""
        return ZoneInfo(self.timezone)

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
            raise ConfigError(unknown_name("site", name, list(self.sites)), path="sites") from None

    def rule(self, name: str) -> Rule:
        for rule in self.rules:
            if rule.name == name:
                return rule
        raise ConfigError(unknown_name("rule", name, [r.name for r in self.rules]), path="rules")

    def policy(self, name: str) -> GcPolicy:
        for policy in self.gc.policies:
            if policy.name == name:
                return policy
        raise ConfigError(
            unknown_name("GC policy", name, [p.name for p in self.gc.policies]),
            path="gc.policies",
        )

    def to_dict(self) -> dict[str, Any]:
        """A plain, YAML-ready dict that `load_config` reads back to an equal Config."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


MODELS: tuple[type[BaseModel], ...] = (
    Config,
    TLSConfig,
    AuthConfig,
    LimitsConfig,
    BandwidthWindow,
    SiteConfig,
    MqttConfig,
    TagFilter,
    RenameConfig,
    Rule,
    KeepConfig,
    GcPolicy,
    GcConfig,
    VerifyConfig,
    TelemetryConfig,
)


def known_keys() -> set[str]:
    """Every key any section accepts (what a misspelt key is compared with)."""
    return {info.alias or name for model in MODELS for name, info in model.model_fields.items()}
