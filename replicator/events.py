"""Registry webhooks normalised into one event type.

Pure functions, no I/O. Three wire formats arrive at the daemon:

* distribution notifications: `{"events": [...]}` (2.8 sends
  `application/vnd.docker.distribution.events.v1+json`, v3 `...v2+json`, one event
  per envelope; a bare event object is accepted too);
* Harbor's "Default" webhook payload (`type`, `occur_at`, `operator`, `event_data`),
  which has no event id, so a stable one is derived from the body;
* CloudEvents 1.0 from Harbor or zot, structured (`application/cloudevents+json`,
  also batches) or binary (`ce-*` headers, the body is `data`).

Everything a sender controls is validated before it becomes a `RegistryEvent`,
because the result goes into the journal and drives copies and deletes: repository
names, tags and digests must be well formed, and text fields must be plain,
bounded, UTF-8-encodable strings. Anything else raises `WebhookError` (400 for bad
content, 415 for a content type or format we do not speak) and nothing else:
the intake turns that into an HTTP answer and never a 5xx.

Deliberately dropped: `target.url`, `request` (client address, host, user agent),
`resource_url` and any header; they can carry hostnames or credentials and the
daemon does not need them. Only one fact is read from the user agent: whether a
pull was ours (`own_read`).

Event types that exist but mean nothing for replication (Harbor scans and quotas,
zot repository creation and lint results) parse to an empty list, so the sender
gets a 2xx and does not retry them forever.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, cast

from replicator.errors import ReplicatorError
from replicator.manifest import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    DOCKER_SCHEMA1,
    DOCKER_SCHEMA1_SIGNED,
    OCI_INDEX,
    OCI_MANIFEST,
    is_digest,
)
from replicator.refs import REPOSITORY_RE, TAG_RE
from replicator.text import shorten

Action = Literal["push", "delete", "pull", "mount"]
OWN_USER_AGENT_PREFIX = "registry-replicator/"  # what replicator.registry.transport sends
SourceFormat = Literal["distribution", "harbor", "cloudevents"]

ACTIONS: frozenset[str] = frozenset({"push", "delete", "pull", "mount"})
SOURCE_FORMATS: frozenset[str] = frozenset({"distribution", "harbor", "cloudevents"})

DISTRIBUTION_EVENTS_V1 = "application/vnd.docker.distribution.events.v1+json"
DISTRIBUTION_EVENTS_V2 = "application/vnd.docker.distribution.events.v2+json"
CLOUDEVENTS_JSON = "application/cloudevents+json"
CLOUDEVENTS_BATCH_JSON = "application/cloudevents-batch+json"

# Media types whose target is a manifest (schema1 included: it is still a manifest,
# the copy engine refuses it with its own message).
MANIFEST_TYPES: frozenset[str] = frozenset(
    {
        OCI_MANIFEST,
        OCI_INDEX,
        DOCKER_MANIFEST,
        DOCKER_LIST,
        DOCKER_SCHEMA1,
        DOCKER_SCHEMA1_SIGNED,
        "application/vnd.oci.artifact.manifest.v1+json",
    }
)

_DISTRIBUTION_CT = re.compile(r"^application/vnd\.docker\.distribution\.events\.v\d+\+json$")
_JSON_CT = frozenset({"application/json", "text/json"})
# RFC 6838 type/subtype, no parameters: what descriptors carry.
_MEDIA_TYPE_RE = re.compile(
    r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}$"
)
# Event ids are primary keys and appear in logs: printable ASCII, no spaces.
_ID_RE = re.compile(r"^[\x21-\x7e]{1,200}$")
# Site names as the configuration allows them (they become an MQTT topic level too).
_SITE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_MAX_TEXT = 256
_MAX_REPOSITORY = 255

HARBOR_ACTIONS: dict[str, Action] = {
    "PUSH_ARTIFACT": "push",
    "PULL_ARTIFACT": "pull",
    "DELETE_ARTIFACT": "delete",
    "DELETE_TAG": "delete",
}
# Known Harbor types that say nothing about registry content.
HARBOR_IGNORED: frozenset[str] = frozenset(
    {
        "SCANNING_COMPLETED",
        "SCANNING_STOPPED",
        "SCANNING_FAILED",
        "QUOTA_EXCEED",
        "QUOTA_WARNING",
        "REPLICATION",
        "TAG_RETENTION",
        "UPLOAD_CHART",
        "DOWNLOAD_CHART",
        "DELETE_CHART",
    }
)
CLOUDEVENT_HARBOR_ACTIONS: dict[str, Action] = {
    "harbor.artifact.pushed": "push",
    "harbor.artifact.pulled": "pull",
    "harbor.artifact.deleted": "delete",
    "harbor.tag.deleted": "delete",
}
CLOUDEVENT_ZOT_ACTIONS: dict[str, Action] = {
    "zotregistry.image.updated": "push",
    "zotregistry.image.deleted": "delete",
}
CLOUDEVENT_IGNORED: frozenset[str] = frozenset(
    {
        "zotregistry.repository.created",
        "zotregistry.image.lint_failed",
    }
)
_CLOUDEVENT_IGNORED_PREFIXES = (
    "harbor.scan.",
    "harbor.quota.",
    "harbor.replication.",
    "harbor.tag_retention.",
    "harbor.chart.",
)


class WebhookError(ReplicatorError):
    """A webhook we refuse; `status` is the HTTP answer (400 or 415)."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(message)


@dataclass(frozen=True)
class RegistryEvent:
    """One thing that happened in one repository of one site."""

    id: str
    site: str
    action: Action
    repository: str
    tag: str | None = None
    digest: str | None = None
    media_type: str | None = None
    size: int | None = None
    from_repository: str | None = None
    occurred_at: float | None = None  # epoch seconds, from the sender's clock
    source_format: SourceFormat = "distribution"
    # True when the target is a manifest: a manifest media type, a tag, or a Harbor/zot
    # artifact. A distribution delete by digest carries no media type, so it is False
    # there even when a manifest was deleted (the registry does not say which).
    is_manifest: bool = False
    actor: str | None = None
    source_instance: str | None = None
    # A pull made by registry-replicator itself (copy, verify, housekeeping): counted,
    # but never a pull time, or our own reads would keep images from pulled_within GC
    own_read: bool = False

    @property
    def reference(self) -> str | None:
        """Digest when known, else the tag: what to fetch at the source."""
        return self.digest or self.tag


# --- entry point -----------------------------------------------------------------


def parse_webhook(
    body: bytes, content_type: str | None, headers: Mapping[str, str], site: str
) -> list[RegistryEvent]:
    """Parse one webhook request body into events, or raise WebhookError (400/415)."""
    hdrs = {str(k).lower(): str(v) for k, v in headers.items()}
    media = _media_type(content_type if content_type is not None else hdrs.get("content-type"))

    if "ce-specversion" in hdrs:
        if media is not None and not _is_json_media(media):
            raise WebhookError(
                415, f"unsupported CloudEvents data content type {media!r}; expected JSON"
            )
        attrs = {k[3:]: v for k, v in hdrs.items() if k.startswith("ce-")}
        data = _load_json(body) if body.strip() else None
        return _cloudevent(attrs, data, site, body)

    if media is not None and not (
        _is_json_media(media) or media in (CLOUDEVENTS_JSON, CLOUDEVENTS_BATCH_JSON)
    ):
        raise WebhookError(
            415,
            f"unsupported content type {media!r}; expected "
            f"{DISTRIBUTION_EVENTS_V1}, {DISTRIBUTION_EVENTS_V2}, "
            f"{CLOUDEVENTS_JSON} or application/json",
        )
    doc = _load_json(body)

    if media == CLOUDEVENTS_BATCH_JSON:
        if not isinstance(doc, list) or not doc:
            raise WebhookError(400, "a CloudEvents batch must be a non-empty JSON array")
        events: list[RegistryEvent] = []
        for i, item in enumerate(doc):
            events += _structured_cloudevent(item, site, body, where=f"[{i}]")
        return events
    if media == CLOUDEVENTS_JSON:
        return _structured_cloudevent(doc, site, body, where="")
    if not isinstance(doc, dict):
        raise WebhookError(400, "webhook body must be a JSON object")
    if "events" in doc:
        return _distribution_envelope(doc, site)
    if "specversion" in doc:
        return _structured_cloudevent(doc, site, body, where="")
    if "event_data" in doc and "type" in doc:
        return _harbor(doc, site, body)
    if "action" in doc and "target" in doc:
        return [_distribution_event(doc, site, "event")]
    raise WebhookError(
        415,
        "unrecognised webhook format: expected a distribution envelope "
        '{"events": [...]}, a Harbor payload or a CloudEvent',
    )


def event_from_fields(doc: Mapping[str, Any], where: str = "event") -> RegistryEvent:
    """A RegistryEvent from its fields by name (the form the event bus carries), checked
    with the same rules as a webhook's, so an event is valid whichever way it arrived.
    Raises WebhookError(400) naming `<where>.<field>`; unknown keys are ignored (a newer
    sender must not break an older reader). Cross-field rules (a push needs a digest)
    belong to each webhook format and are checked by its parser, not here."""
    action = _action(doc.get("action"), f"{where}.action")
    source_format = doc.get("source_format", "distribution")
    if source_format not in SOURCE_FORMATS:
        raise WebhookError(400, f"{where}.source_format: unknown format {_show(source_format)}")
    is_manifest = doc.get("is_manifest", False)
    if not isinstance(is_manifest, bool):
        raise WebhookError(400, f"{where}.is_manifest: must be a boolean")
    from_repository = doc.get("from_repository")
    return RegistryEvent(
        id=_event_id(doc.get("id"), f"{where}.id"),
        site=_site(doc.get("site"), f"{where}.site"),
        action=action,
        repository=_repository(doc.get("repository"), f"{where}.repository"),
        tag=_opt_tag(doc.get("tag"), f"{where}.tag"),
        digest=_opt_digest(doc.get("digest"), f"{where}.digest"),
        media_type=_opt_media_type(doc.get("media_type"), f"{where}.media_type"),
        size=_opt_size(doc.get("size"), f"{where}.size"),
        from_repository=(
            None
            if from_repository in (None, "")
            else _repository(from_repository, f"{where}.from_repository")
        ),
        occurred_at=_opt_epoch(doc.get("occurred_at"), f"{where}.occurred_at"),
        source_format=source_format,
        is_manifest=is_manifest,
        actor=_opt_text(doc.get("actor"), f"{where}.actor"),
        source_instance=_opt_text(doc.get("source_instance"), f"{where}.source_instance"),
    )


# --- distribution ----------------------------------------------------------------


def _distribution_envelope(doc: dict[str, Any], site: str) -> list[RegistryEvent]:
    items = doc["events"]
    if not isinstance(items, list) or not items:
        raise WebhookError(400, "'events' must be a non-empty array")
    return [_distribution_event(item, site, f"events[{i}]") for i, item in enumerate(items)]


def _distribution_event(item: Any, site: str, where: str) -> RegistryEvent:
    if not isinstance(item, dict):
        raise WebhookError(400, f"{where}: each event must be an object")
    event_id = _event_id(item.get("id"), f"{where}.id")
    action = _action(item.get("action"), f"{where}.action")
    target = item.get("target")
    if not isinstance(target, dict):
        raise WebhookError(400, f"{where}.target: required object")
    repository = _repository(target.get("repository"), f"{where}.target.repository")
    tag = _opt_tag(target.get("tag"), f"{where}.target.tag")
    digest = _opt_digest(target.get("digest"), f"{where}.target.digest")
    media_type = _opt_media_type(target.get("mediaType"), f"{where}.target.mediaType")
    size = _opt_size(target.get("size"), f"{where}.target.size")
    if size is None:
        size = _opt_size(target.get("length"), f"{where}.target.length")
    from_repository = None
    if target.get("fromRepository") not in (None, ""):
        from_repository = _repository(target["fromRepository"], f"{where}.target.fromRepository")
    if action in ("push", "mount") and digest is None:
        raise WebhookError(400, f"{where}.target.digest: required for {action} events")
    if digest is None and tag is None:
        raise WebhookError(400, f"{where}.target: {action} event needs a digest or a tag")
    actor = item.get("actor")
    source = item.get("source")
    request = item.get("request")
    agent = request.get("useragent") if isinstance(request, dict) else None
    return RegistryEvent(
        id=event_id,
        site=site,
        action=action,
        repository=repository,
        tag=tag,
        digest=digest,
        media_type=media_type,
        size=size,
        from_repository=from_repository,
        occurred_at=_opt_time(item.get("timestamp"), f"{where}.timestamp"),
        source_format="distribution",
        is_manifest=(media_type in MANIFEST_TYPES) or tag is not None,
        actor=_opt_text(
            actor.get("name") if isinstance(actor, dict) else None, f"{where}.actor.name"
        ),
        source_instance=_opt_text(
            source.get("instanceID") if isinstance(source, dict) else None,
            f"{where}.source.instanceID",
        ),
        own_read=action == "pull"
        and isinstance(agent, str)
        and agent.startswith(OWN_USER_AGENT_PREFIX),
    )


# --- Harbor default payload ------------------------------------------------------


def _harbor(doc: dict[str, Any], site: str, body: bytes) -> list[RegistryEvent]:
    kind = doc.get("type")
    if not isinstance(kind, str):
        raise WebhookError(400, "type: must be a string")
    if kind in HARBOR_IGNORED:
        return []
    action = HARBOR_ACTIONS.get(kind)
    if action is None:
        raise WebhookError(400, f"type: unknown Harbor event type {_show(kind)}")
    occurred = _opt_epoch(doc.get("occur_at"), "occur_at")
    actor = _opt_text(doc.get("operator"), "operator")
    body_hash = hashlib.sha256(body).hexdigest()[:32]
    ids = [f"harbor-{body_hash}-{i}" for i in range(_harbor_resource_count(doc, "event_data"))]
    origin = _ArtifactOrigin(site, action, occurred, actor, None, "harbor")
    return _harbor_resources(doc.get("event_data"), "event_data", origin, ids)


def _harbor_resource_count(doc: dict[str, Any], where: str) -> int:
    data = doc.get(where)
    resources = data.get("resources") if isinstance(data, dict) else None
    return len(resources) if isinstance(resources, list) else 0


@dataclass(frozen=True)
class _ArtifactOrigin:
    """What every resource of one Harbor-style payload shares."""

    site: str
    action: Action
    occurred_at: float | None
    actor: str | None
    source_instance: str | None
    source_format: SourceFormat


def _harbor_resources(
    data: Any, where: str, origin: _ArtifactOrigin, ids: list[str]
) -> list[RegistryEvent]:
    if not isinstance(data, dict):
        raise WebhookError(400, f"{where}: required object")
    repo_doc = data.get("repository")
    if not isinstance(repo_doc, dict):
        raise WebhookError(400, f"{where}.repository: required object")
    full = repo_doc.get("repo_full_name")
    if (
        full in (None, "")
        and isinstance(repo_doc.get("namespace"), str)
        and isinstance(repo_doc.get("name"), str)
    ):
        full = f"{repo_doc['namespace']}/{repo_doc['name']}"
    repository = _repository(full, f"{where}.repository.repo_full_name")
    resources = data.get("resources")
    if not isinstance(resources, list) or not resources:
        raise WebhookError(400, f"{where}.resources: must be a non-empty array")
    events = []
    for i, res in enumerate(resources):
        rw = f"{where}.resources[{i}]"
        if not isinstance(res, dict):
            raise WebhookError(400, f"{rw}: must be an object")
        digest = _opt_digest(res.get("digest"), f"{rw}.digest")
        tag = _opt_tag(res.get("tag"), f"{rw}.tag")
        if origin.action == "push" and digest is None:
            raise WebhookError(400, f"{rw}.digest: required for push events")
        if digest is None and tag is None:
            raise WebhookError(400, f"{rw}: needs a digest or a tag")
        events.append(
            RegistryEvent(
                id=ids[i],
                site=origin.site,
                action=origin.action,
                repository=repository,
                tag=tag,
                digest=digest,
                occurred_at=origin.occurred_at,
                source_format=origin.source_format,
                is_manifest=True,
                actor=origin.actor,
                source_instance=origin.source_instance,
            )
        )
    return events


# --- CloudEvents -----------------------------------------------------------------


def _structured_cloudevent(doc: Any, site: str, body: bytes, where: str) -> list[RegistryEvent]:
    if not isinstance(doc, dict):
        raise WebhookError(400, f"CloudEvent{where}: must be a JSON object")
    attrs = {k: v for k, v in doc.items() if k not in ("data", "data_base64")}
    if "data_base64" in doc:
        raw = doc["data_base64"]
        if not isinstance(raw, str):
            raise WebhookError(400, f"CloudEvent{where}.data_base64: must be a string")
        try:
            data = _load_json(base64.b64decode(raw, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise WebhookError(400, f"CloudEvent{where}.data_base64: not base64 JSON") from exc
    else:
        data = doc.get("data")
    return _cloudevent(attrs, data, site, body, where)


def _cloudevent(
    attrs: Mapping[str, Any], data: Any, site: str, body: bytes, where: str = ""
) -> list[RegistryEvent]:
    spec = attrs.get("specversion")
    if spec != "1.0":
        raise WebhookError(400, f'CloudEvent{where}.specversion: expected "1.0", got {_show(spec)}')
    event_id = _event_id(attrs.get("id"), f"CloudEvent{where}.id")
    kind = attrs.get("type")
    if not isinstance(kind, str) or not kind:
        raise WebhookError(400, f"CloudEvent{where}.type: required")
    source = _opt_text(attrs.get("source"), f"CloudEvent{where}.source")
    if source is None:
        raise WebhookError(400, f"CloudEvent{where}.source: required")
    dct = attrs.get("datacontenttype")
    if dct is not None:
        media = _media_type(dct if isinstance(dct, str) else None)
        if media is None or not _is_json_media(media):
            raise WebhookError(
                415, f"CloudEvent{where}.datacontenttype: unsupported {_show(dct)}; expected JSON"
            )
    occurred = _opt_time(attrs.get("time"), f"CloudEvent{where}.time")
    if kind in CLOUDEVENT_IGNORED or kind.startswith(_CLOUDEVENT_IGNORED_PREFIXES):
        return []
    if kind in CLOUDEVENT_HARBOR_ACTIONS:
        actor = _opt_text(attrs.get("operator"), f"CloudEvent{where}.operator")
        if isinstance(data, dict) and "event_data" in data:  # Default payload wrapped in data
            actor = actor or _opt_text(data.get("operator"), f"CloudEvent{where}.data.operator")
            data = data["event_data"]
        count = (
            len(data["resources"])
            if isinstance(data, dict) and isinstance(data.get("resources"), list)
            else 0
        )
        ids = [event_id] if count == 1 else [f"{event_id}#{i}" for i in range(count)]
        origin = _ArtifactOrigin(
            site, CLOUDEVENT_HARBOR_ACTIONS[kind], occurred, actor, source, "cloudevents"
        )
        return _harbor_resources(data, f"CloudEvent{where}.data", origin, ids)
    if kind in CLOUDEVENT_ZOT_ACTIONS:
        return [
            _zot(
                data,
                f"CloudEvent{where}.data",
                site,
                CLOUDEVENT_ZOT_ACTIONS[kind],
                event_id,
                occurred,
                source,
            )
        ]
    raise WebhookError(400, f"CloudEvent{where}.type: unsupported event type {_show(kind)}")


def _zot(
    data: Any,
    where: str,
    site: str,
    action: Action,
    event_id: str,
    occurred: float | None,
    source: str | None,
) -> RegistryEvent:
    if not isinstance(data, dict):
        raise WebhookError(400, f"{where}: required object")
    repository = _repository(data.get("name"), f"{where}.name")
    reference = data.get("reference")
    tag = None
    digest = _opt_digest(data.get("digest"), f"{where}.digest")
    if reference not in (None, ""):
        if isinstance(reference, str) and ":" in reference:
            ref_digest = _opt_digest(reference, f"{where}.reference")
            if digest is not None and ref_digest != digest:
                raise WebhookError(
                    400, f"{where}: reference {reference} does not match digest {digest}"
                )
            digest = ref_digest
        else:
            tag = _opt_tag(reference, f"{where}.reference")
    media_key = "mediaType" if "mediaType" in data else "mediatype"
    media_type = _opt_media_type(data.get(media_key), f"{where}.{media_key}")
    if action == "push" and digest is None:
        raise WebhookError(400, f"{where}.digest: required for push events")
    if digest is None and tag is None:
        raise WebhookError(400, f"{where}: needs a digest or a reference")
    size = None
    manifest = data.get("manifest")
    if isinstance(manifest, str) and manifest:
        size = len(manifest.encode("utf-8", "surrogatepass"))
    return RegistryEvent(
        id=event_id,
        site=site,
        action=action,
        repository=repository,
        tag=tag,
        digest=digest,
        media_type=media_type,
        size=size,
        occurred_at=occurred,
        source_format="cloudevents",
        is_manifest=True,
        source_instance=source,
    )


# --- field validation ------------------------------------------------------------


def _load_json(body: bytes) -> Any:
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise WebhookError(400, f"malformed JSON body: {shorten(str(exc))}") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _media_type(value: str | None) -> str | None:
    if value is None:
        return None
    media = value.split(";", 1)[0].strip().lower()
    return media or None


def _is_json_media(media: str) -> bool:
    return (
        media in _JSON_CT
        or bool(_DISTRIBUTION_CT.fullmatch(media))
        or (
            media.startswith("application/")
            and media.endswith("+json")
            and media not in (CLOUDEVENTS_JSON, CLOUDEVENTS_BATCH_JSON)
        )
    )


def _event_id(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise WebhookError(400, f"{where}: required")
    if not _ID_RE.fullmatch(value):
        raise WebhookError(400, f"{where}: must be 1-200 printable ASCII characters without spaces")
    return value


def _action(value: Any, where: str) -> Action:
    if not isinstance(value, str) or not value:
        raise WebhookError(400, f"{where}: required")
    if value not in ACTIONS:
        raise WebhookError(
            400, f"{where}: unknown action {_show(value)}; expected push, pull, mount or delete"
        )
    return cast(Action, value)


def _site(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise WebhookError(400, f"{where}: required")
    if not _SITE_RE.fullmatch(value):
        raise WebhookError(400, f"{where}: invalid site name {_show(value)}")
    return value


def _repository(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise WebhookError(400, f"{where}: required")
    if len(value) > _MAX_REPOSITORY or not REPOSITORY_RE.fullmatch(value):
        raise WebhookError(400, f"{where}: invalid repository name {_show(value)}")
    return value


def _opt_tag(value: Any, where: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not TAG_RE.fullmatch(value) or not value.isascii():
        raise WebhookError(400, f"{where}: invalid tag {_show(value)}")
    return value


def _opt_digest(value: Any, where: str) -> str | None:
    if value is None or value == "":
        return None
    # is_digest's `$` would let a trailing newline through
    if not isinstance(value, str) or not is_digest(value) or "\n" in value:
        raise WebhookError(
            400,
            f"{where}: invalid digest {_show(value)}; expected sha256:<64 hex> or sha512:<128 hex>",
        )
    return value


def _opt_media_type(value: Any, where: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not _MEDIA_TYPE_RE.fullmatch(value):
        raise WebhookError(400, f"{where}: invalid media type {_show(value)}")
    return value


def _opt_size(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise WebhookError(400, f"{where}: must be a non-negative integer")
    return value


def _opt_text(value: Any, where: str) -> str | None:
    """A short free-text field (actor, source): plain printable text, else refused."""
    if value is None or value == "":
        return None
    if isinstance(value, str) and len(value) <= _MAX_TEXT and value.isprintable():
        try:
            value.encode("utf-8")  # a lone surrogate (valid in JSON) cannot be stored
        except UnicodeEncodeError:
            pass
        else:
            return value
    raise WebhookError(400, f"{where}: must be printable text of at most {_MAX_TEXT} characters")


def _opt_time(value: Any, where: str) -> float | None:
    """RFC 3339 (Go writes nanoseconds, Python keeps microseconds) to epoch seconds."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > 64:
        raise WebhookError(400, f"{where}: must be an RFC 3339 timestamp")
    text = value.strip()
    m = re.fullmatch(r"(\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d:\d\d)(\.\d+)?([Zz]|[+-]\d\d:\d\d)", text)
    if not m:
        raise WebhookError(400, f"{where}: must be an RFC 3339 timestamp, got {_show(value)}")
    frac = (m.group(2) or "")[:7].ljust(7, "0") if m.group(2) else ""
    zone = "+00:00" if m.group(3) in ("Z", "z") else m.group(3)
    try:
        parsed = datetime.fromisoformat(
            m.group(1).replace("t", "T").replace(" ", "T") + frac + zone
        )
    except ValueError:
        raise WebhookError(400, f"{where}: invalid timestamp {_show(value)}") from None
    if parsed.year < 1970:  # Go's zero time means "not set"
        return None
    return parsed.timestamp()


def _opt_epoch(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 2**40:
        raise WebhookError(400, f"{where}: must be epoch seconds")
    return float(value)


def _show(value: Any) -> str:
    """A value quoted for an error message, bounded so a hostile body cannot flood logs."""
    return shorten(repr(value))
