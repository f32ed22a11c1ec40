"""Webhook normalisation: real distribution 2.8 payloads, Harbor, CloudEvents, and refusals."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replicator.events import (
    DISTRIBUTION_EVENTS_V1,
    DISTRIBUTION_EVENTS_V2,
    RegistryEvent,
    WebhookError,
    parse_webhook,
)

DATA = Path(__file__).parent / "data"
D1 = "sha256:" + "a" * 64
D2 = "sha256:" + "b" * 64
OCI = "application/vnd.oci.image.manifest.v1+json"


def parse(
    doc: Any,
    content_type: str | None = DISTRIBUTION_EVENTS_V1,
    headers: dict[str, str] | None = None,
    site: str = "eu",
) -> list[RegistryEvent]:
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return parse_webhook(body, content_type, headers or {}, site)


def refused(doc: Any, status: int = 400, **kw: Any) -> str:
    with pytest.raises(WebhookError) as exc:
        parse(doc, **kw)
    assert exc.value.status == status, exc.value.message
    return exc.value.message


def dist_event(**target: Any) -> dict[str, Any]:
    base = {"repository": "team/app", "digest": D1, "mediaType": OCI, "size": 10}
    base.update(target)
    return {
        "id": "e1",
        "timestamp": "2024-05-01T10:00:00.123456789Z",
        "action": "push",
        "target": {k: v for k, v in base.items() if v is not None},
        "request": {
            "id": "r",
            "addr": "10.0.0.1:5555",
            "host": "reg",
            "method": "PUT",
            "useragent": "docker",
        },
        "actor": {"name": "ci"},
        "source": {"addr": "reg:5000", "instanceID": "inst-1"},
    }


# --- distribution: what 2.8 really sends (recorded from docker-registry 2.8.2) ---------


def test_recorded_manifest_push_from_distribution_2_8():
    body = (DATA / "distribution-2.8-push.json").read_bytes()
    [ev] = parse_webhook(body, DISTRIBUTION_EVENTS_V1, {"Authorization": "Bearer tok"}, "eu")
    raw = json.loads(body)["events"][0]
    assert ev == RegistryEvent(
        id=raw["id"],
        site="eu",
        action="push",
        repository="team/app",
        tag="v1",
        digest=raw["target"]["digest"],
        media_type=OCI,
        size=raw["target"]["size"],
        occurred_at=ev.occurred_at,
        source_format="distribution",
        is_manifest=True,
        actor=None,
        source_instance=raw["source"]["instanceID"],
    )
    assert ev.occurred_at is not None and ev.occurred_at > 1.7e9
    assert ev.reference == ev.digest


def test_recorded_sequence_from_distribution_2_8():
    seq = json.loads((DATA / "distribution-2.8-sequence.json").read_text())["requests"]
    events = [
        e for r in seq for e in parse_webhook(r["body"].encode(), r["content_type"], {}, "eu")
    ]
    summary = [(e.action, e.repository, e.tag, e.is_manifest, e.from_repository) for e in events]
    assert summary == [
        ("push", "team/app", None, False, None),  # config blob
        ("push", "team/app", None, False, None),  # layer blob
        ("push", "team/app", "v1", True, None),  # manifest by tag
        ("pull", "team/app", "v1", True, None),
        ("mount", "other/app", None, False, "team/app"),
        ("push", "team/app", "v2", True, None),
        ("delete", "team/app", None, False, None),  # manifest by digest: no media type
        ("delete", "team/app", "v1", True, None),  # one delete per tag that pointed at it
        ("delete", "team/app", "v2", True, None),
    ]
    assert events[0].media_type == "application/octet-stream"
    assert events[6].digest == events[2].digest and events[7].digest is None
    assert len({e.id for e in events}) == len(events)


def test_nothing_secret_or_incidental_is_kept():
    doc = {"events": [dist_event(url="http://user:pw@reg/v2/team/app/manifests/x")]}
    [ev] = parse(doc, headers={"Authorization": "Bearer s3cret"})
    text = repr(ev)
    for leaked in ("pw@", "s3cret", "10.0.0.1", "docker", "http"):
        assert leaked not in text


def test_v2_content_type_and_bare_event_and_plain_json():
    one = dist_event()
    assert parse({"events": [one]}, content_type=DISTRIBUTION_EVENTS_V2)[0].id == "e1"
    assert parse(one, content_type="application/json")[0].id == "e1"
    assert parse({"events": [one]}, content_type="application/json; charset=utf-8")[0].id == "e1"
    assert parse({"events": [one]}, content_type=None)[0].id == "e1"


def test_batched_envelope_keeps_order_and_duplicates():
    a, b = dist_event(), dist_event(digest=D2)
    b["id"] = "e2"
    evs = parse({"events": [a, b, a]})
    assert [e.id for e in evs] == ["e1", "e2", "e1"]


def test_mount_and_delete_by_tag():
    mount = dist_event(
        repository="b/app", fromRepository="a/app", mediaType="application/octet-stream"
    )
    mount["action"] = "mount"
    [ev] = parse({"events": [mount]})
    assert (ev.action, ev.repository, ev.from_repository, ev.is_manifest) == (
        "mount",
        "b/app",
        "a/app",
        False,
    )
    delete = {"id": "d", "action": "delete", "target": {"repository": "a/app", "tag": "v1"}}
    [ev] = parse({"events": [delete]})
    assert (ev.digest, ev.tag, ev.reference, ev.is_manifest) == (None, "v1", "v1", True)


def test_timestamps_nanoseconds_offsets_and_zero_time():
    ev = dist_event()
    ev["timestamp"] = "2024-05-01T12:00:00.999999999+02:00"
    assert parse({"events": [ev]})[0].occurred_at == pytest.approx(1714557600.999999)
    ev["timestamp"] = "0001-01-01T00:00:00Z"
    assert parse({"events": [ev]})[0].occurred_at is None
    del ev["timestamp"]
    assert parse({"events": [ev]})[0].occurred_at is None


def test_size_falls_back_to_length():
    assert parse({"events": [dist_event(size=None, length=42)]})[0].size == 42


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"repository": None}, "target.repository: required"),
        ({"repository": "Team/App"}, "invalid repository"),
        ({"repository": "team/app\n"}, "invalid repository"),
        ({"repository": "a" * 256}, "invalid repository"),
        ({"digest": None}, "digest: required for push"),
        ({"digest": "sha256:abc"}, "invalid digest"),
        ({"digest": D1 + "\n"}, "invalid digest"),
        ({"digest": "md5:" + "a" * 32}, "invalid digest"),
        ({"tag": "-bad"}, "invalid tag"),
        ({"tag": "v1\n"}, "invalid tag"),
        ({"tag": "ünïcode"}, "invalid tag"),
        ({"tag": 5}, "invalid tag"),
        ({"mediaType": "not a type"}, "invalid media type"),
        ({"size": -1}, "size"),
        ({"size": True}, "size"),
        ({"size": "10"}, "size"),
        ({"fromRepository": "../x"}, "fromRepository"),
    ],
)
def test_bad_target_fields_are_named(change, field):
    assert field in refused({"events": [dist_event(**change)]})  # None drops the field


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda e: e.pop("id"), "id: required"),
        (lambda e: e.update(id="has space"), "id: must be"),
        (lambda e: e.update(id="x" * 201), "id: must be"),
        (lambda e: e.pop("action"), "action: required"),
        (lambda e: e.update(action="pwn"), "unknown action 'pwn'"),
        (lambda e: e.update(target="team/app"), "target: required object"),
        (lambda e: e.update(timestamp="yesterday"), "timestamp"),
        (lambda e: e.update(timestamp="2024-13-01T00:00:00Z"), "timestamp"),
        (lambda e: e.update(actor={"name": "a\x00b"}), "actor.name"),
        (lambda e: e.update(actor={"name": "\ud800"}), "actor.name"),
        (lambda e: e.update(action="delete", target={"repository": "a/b"}), "digest or a tag"),
    ],
)
def test_bad_event_fields_are_named(mutate, needle):
    ev = dist_event()
    mutate(ev)
    assert needle in refused({"events": [ev]})


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b"not json",
        b"\xff\xfe\x00",
        b"NaN",
        b'{"events": [NaN]}',
        b"[" * 100_000 + b"]" * 100_000,
        json.dumps({"events": []}).encode(),
        json.dumps({"events": {}}).encode(),
        json.dumps({"events": ["x"]}).encode(),
        b"[]",
        b"3",
    ],
)
def test_malformed_bodies_are_400(body):
    refused(body)


@pytest.mark.parametrize(
    "ct",
    ["text/plain", "application/xml", "multipart/form-data", "application/x-www-form-urlencoded"],
)
def test_unsupported_content_type_is_415(ct):
    assert "unsupported content type" in refused({"events": [dist_event()]}, 415, content_type=ct)


def test_unknown_json_shape_is_415():
    refused({"hello": "world"}, 415, content_type="application/json")


# --- Harbor default payload ------------------------------------------------------


def harbor(kind: str = "PUSH_ARTIFACT", resources: list[dict] | None = None) -> dict[str, Any]:
    return {
        "type": kind,
        "occur_at": 1586922308,
        "operator": "admin",
        "event_data": {
            "resources": resources
            if resources is not None
            else [
                {
                    "digest": D1,
                    "tag": "latest",
                    "resource_url": "harbor.example.com/library/nginx:latest",
                }
            ],
            "repository": {
                "date_created": 1586922308,
                "name": "nginx",
                "namespace": "library",
                "repo_full_name": "library/nginx",
                "repo_type": "public",
            },
        },
    }


def test_harbor_push_one_event_per_resource_with_stable_ids():
    doc = harbor(resources=[{"digest": D1, "tag": "v1"}, {"digest": D2, "tag": ""}])
    evs = parse(doc, content_type="application/json")
    assert [(e.action, e.repository, e.tag, e.digest) for e in evs] == [
        ("push", "library/nginx", "v1", D1),
        ("push", "library/nginx", None, D2),
    ]
    assert all(
        e.source_format == "harbor"
        and e.is_manifest
        and e.actor == "admin"
        and e.occurred_at == 1586922308.0
        for e in evs
    )
    again = parse(doc, content_type="application/json")
    assert [e.id for e in again] == [e.id for e in evs] and evs[0].id != evs[1].id
    other = parse(harbor(resources=[{"digest": D1, "tag": "v2"}]), content_type="application/json")
    assert other[0].id not in {e.id for e in evs}
    assert "harbor.example.com" not in repr(evs)


def test_harbor_delete_and_repo_name_fallback():
    doc = harbor("DELETE_ARTIFACT")
    del doc["event_data"]["repository"]["repo_full_name"]
    [ev] = parse(doc, content_type="application/json")
    assert (ev.action, ev.repository, ev.tag, ev.digest) == (
        "delete",
        "library/nginx",
        "latest",
        D1,
    )


def test_harbor_irrelevant_types_are_ignored_not_refused():
    assert parse(harbor("SCANNING_COMPLETED"), content_type="application/json") == []


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        (harbor("PUSH_SOMETHING"), "unknown Harbor event type"),
        (harbor(resources=[]), "resources: must be a non-empty array"),
        (harbor(resources=[{"tag": "v1"}]), "digest: required for push"),
        (harbor(resources=[{"digest": "sha256:zz"}]), "invalid digest"),
        ({**harbor(), "occur_at": "noon"}, "occur_at"),
        ({**harbor(), "event_data": {"resources": [{"digest": D1}]}}, "repository: required"),
    ],
)
def test_harbor_refusals(doc, needle):
    assert needle in refused(doc, content_type="application/json")


# --- CloudEvents -----------------------------------------------------------------


def harbor_ce(kind: str = "harbor.artifact.pushed", **extra: Any) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": "66e18103-09c1-41f6-982f-37df223f3eeb",
        "source": "/projects/2/webhook/policies/15",
        "type": kind,
        "datacontenttype": "application/json",
        "time": "2023-04-03T06:04:46Z",
        "operator": "robot$ci",
        "data": {
            "resources": [
                {
                    "digest": D1,
                    "tag": "stable",
                    "resource_url": "reg.example/team/application:stable",
                }
            ],
            "repository": {
                "name": "application",
                "namespace": "team",
                "repo_full_name": "team/application",
            },
        },
        **extra,
    }


def zot_data(**kw: Any) -> dict[str, Any]:
    data = {
        "name": "golang",
        "reference": "latest",
        "digest": D1,
        "mediaType": OCI,
        "manifest": '{"schemaVersion":2}',
    }
    data.update(kw)
    return {k: v for k, v in data.items() if v is not None}


def test_cloudevents_structured_harbor():
    [ev] = parse(harbor_ce(), content_type="application/cloudevents+json")
    assert ev == RegistryEvent(
        id="66e18103-09c1-41f6-982f-37df223f3eeb",
        site="eu",
        action="push",
        repository="team/application",
        tag="stable",
        digest=D1,
        occurred_at=1680501886.0,
        source_format="cloudevents",
        is_manifest=True,
        actor="robot$ci",
        source_instance="/projects/2/webhook/policies/15",
    )


def test_cloudevents_detected_from_body_and_multi_resource_ids():
    doc = harbor_ce("harbor.artifact.deleted")
    doc["data"]["resources"].append({"digest": D2, "tag": "old"})
    evs = parse(doc, content_type="application/json")
    assert [(e.id, e.action) for e in evs] == [
        (doc["id"] + "#0", "delete"),
        (doc["id"] + "#1", "delete"),
    ]


def test_cloudevents_binary_zot():
    headers = {
        "Ce-Specversion": "1.0",
        "Ce-Id": "z-1",
        "Ce-Type": "zotregistry.image.updated",
        "Ce-Source": "zotregistry.dev",
        "Ce-Time": "2024-01-01T00:00:00Z",
    }
    [ev] = parse(zot_data(), content_type="application/json", headers=headers)
    assert (
        ev.id,
        ev.action,
        ev.repository,
        ev.tag,
        ev.digest,
        ev.media_type,
        ev.size,
        ev.source_format,
        ev.is_manifest,
    ) == ("z-1", "push", "golang", "latest", D1, OCI, 19, "cloudevents", True)


def test_cloudevents_zot_delete_by_digest_reference_and_lowercase_mediatype():
    data = zot_data(reference=D2, digest=None, mediaType=None, manifest=None)
    data["mediatype"] = OCI
    doc = {
        "specversion": "1.0",
        "id": "z-2",
        "source": "zot",
        "type": "zotregistry.image.deleted",
        "data": data,
    }
    [ev] = parse(doc, content_type="application/cloudevents+json")
    assert (ev.action, ev.tag, ev.digest, ev.media_type) == ("delete", None, D2, OCI)


def test_cloudevents_batch_and_base64_data():
    zot = {
        "specversion": "1.0",
        "id": "z-3",
        "source": "zot",
        "type": "zotregistry.image.updated",
        "data_base64": base64.b64encode(json.dumps(zot_data()).encode()).decode(),
    }
    evs = parse([harbor_ce(), zot], content_type="application/cloudevents-batch+json")
    assert [e.repository for e in evs] == ["team/application", "golang"]


def test_cloudevents_ignored_types():
    doc = {
        "specversion": "1.0",
        "id": "z-4",
        "source": "zot",
        "type": "zotregistry.repository.created",
        "data": {"name": "golang"},
    }
    assert parse(doc, content_type="application/cloudevents+json") == []
    assert (
        parse(harbor_ce("harbor.scan.completed"), content_type="application/cloudevents+json") == []
    )


@pytest.mark.parametrize(
    ("mutate", "status", "needle"),
    [
        (lambda d: d.update(specversion="0.3"), 400, "specversion"),
        (lambda d: d.pop("id"), 400, "id: required"),
        (lambda d: d.pop("source"), 400, "source: required"),
        (lambda d: d.update(type="com.example.thing"), 400, "unsupported event type"),
        (lambda d: d.update(datacontenttype="text/xml"), 415, "datacontenttype"),
        (lambda d: d.update(time="soon"), 400, "time"),
        (lambda d: d.update(data="x"), 400, "data: required object"),
        (lambda d: d.update(data_base64="!!!"), 400, "data_base64"),
    ],
)
def test_cloudevents_refusals(mutate, status, needle):
    doc = harbor_ce()
    mutate(doc)
    assert needle in refused(doc, status, content_type="application/cloudevents+json")


def test_cloudevents_binary_refusals():
    headers = {
        "ce-specversion": "1.0",
        "ce-id": "x",
        "ce-type": "zotregistry.image.updated",
        "ce-source": "zot",
    }
    assert "not match" in refused(
        zot_data(reference=D2), content_type="application/json", headers=headers
    )
    refused(zot_data(), 415, content_type="text/plain", headers=headers)
    refused(b"", content_type="application/json", headers=headers)
    refused(zot_data(name="UPPER"), content_type="application/json", headers=headers)
    refused(zot_data(digest=None, reference="v1"), content_type="application/json", headers=headers)


# --- fuzz: anything either parses or is refused with WebhookError -----------------

SAMPLES: list[tuple[bytes, str | None, dict[str, str]]] = [
    ((DATA / "distribution-2.8-push.json").read_bytes(), DISTRIBUTION_EVENTS_V1, {}),
    (json.dumps(harbor()).encode(), "application/json", {}),
    (json.dumps(harbor_ce()).encode(), "application/cloudevents+json", {}),
    (
        json.dumps(zot_data()).encode(),
        "application/json",
        {
            "ce-specversion": "1.0",
            "ce-id": "i",
            "ce-type": "zotregistry.image.updated",
            "ce-source": "zot",
        },
    ),
]

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.sampled_from([D1, "push", "team/app", "v1", "1.0", OCI, "", "\ud800"]),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=20,
)


def _mutate(doc: Any, path: list[int], value: Any) -> Any:
    """Replace one node of `doc` (chosen by `path`) with `value`, or drop a key."""
    if not path or not isinstance(doc, dict | list) or not doc:
        return value
    if isinstance(doc, list):
        i = path[0] % len(doc)
        doc[i] = _mutate(doc[i], path[1:], value)
        return doc
    keys = sorted(doc)
    key = keys[path[0] % len(keys)]
    if path[0] % 7 == 3:
        del doc[key]
    else:
        doc[key] = _mutate(doc[key], path[1:], value)
    return doc


def _check(body: bytes, ct: str | None, headers: dict[str, str]) -> None:
    try:
        events = parse_webhook(body, ct, headers, "eu")
    except WebhookError as exc:
        assert exc.status in (400, 415)
        return
    for ev in events:
        assert ev.action in ("push", "pull", "mount", "delete")
        assert ev.id and "\n" not in ev.id and ev.repository
        (ev.actor or "").encode()  # would raise on a lone surrogate
        (ev.source_instance or "").encode()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sample=st.sampled_from(SAMPLES),
    path=st.lists(st.integers(0, 50), max_size=5),
    value=json_values,
)
def test_fuzz_mutated_real_bodies(sample, path, value):
    body, ct, headers = sample
    doc = _mutate(json.loads(body), path, value)
    _check(json.dumps(doc).encode(), ct, headers)


@settings(max_examples=300, deadline=None)
@given(
    body=st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode())),
    ct=st.one_of(
        st.none(),
        st.sampled_from(
            [
                DISTRIBUTION_EVENTS_V1,
                "application/json",
                "application/cloudevents+json",
                "application/cloudevents-batch+json",
                "text/plain",
                "",
            ]
        ),
        st.text(max_size=30),
    ),
    headers=st.dictionaries(
        st.sampled_from(["ce-specversion", "ce-id", "ce-type", "ce-source", "content-type", "x"]),
        st.text(max_size=20),
        max_size=4,
    ),
)
def test_fuzz_random_bodies(body, ct, headers):
    _check(body, ct, headers)


@settings(max_examples=200, deadline=None)
@given(cut=st.integers(0, 2000), byte=st.integers(0, 255), sample=st.sampled_from(SAMPLES))
def test_fuzz_byte_flips_and_truncation(cut, byte, sample):
    body, ct, headers = sample
    cut %= len(body)
    _check(body[:cut], ct, headers)
    _check(body[:cut] + bytes([byte]) + body[cut + 1 :], ct, headers)
