"""Pure verify logic: which tags drift and how, summaries, exit codes, the config section."""

from __future__ import annotations

import pytest

from replicator.config import Config, InvalidConfig, config_from_dict
from replicator.metrics import DRIFT_KINDS as METRIC_KINDS
from replicator.metrics import Metrics
from replicator.verify import (
    DRIFT_KINDS,
    Drift,
    SourceRepository,
    TargetRepository,
    VerifyReport,
    compare,
    covered_tags,
    in_sync,
)

SITES = {name: {"url": f"https://{name}.example"} for name in ("a", "b")}
A, B, C = "sha256:" + "a" * 64, "sha256:" + "b" * 64, "sha256:" + "c" * 64


def rule(**kw):
    base = {"name": "r", "from": "a", "to": ["b"]}
    base.update(kw)
    return Config(sites=SITES, rules=[base]).rules[0]


def source(digests: dict[str, str], tags=None, written=None) -> SourceRepository:
    return SourceRepository("team/app", tags or list(digests), digests, written or {})


def target(digests: dict[str, str | None], listed=None, repo="team/app") -> TargetRepository:
    return TargetRepository("b", repo, listed or [t for t, d in digests.items() if d], digests)


def found(drift: list[Drift]) -> list[tuple[str, str, str | None, str | None]]:
    return [(d.kind, d.tag, d.source_digest, d.target_digest) for d in drift]


def test_in_sync_is_no_drift():
    src = source({"v1": A, "v2": B})
    assert compare(rule(), src, target({"v1": A, "v2": B})) == []
    assert in_sync(src, target({"v1": A, "v2": B})) == ["v1", "v2"]


def test_missing_and_different():
    drift = compare(rule(), source({"v1": A, "v2": B}), target({"v1": None, "v2": C}))
    assert found(drift) == [("missing", "v1", A, None), ("different", "v2", B, C)]
    assert in_sync(source({"v1": A, "v2": B}), target({"v1": None, "v2": C})) == []


def test_extra_only_where_deletes_propagate_and_the_filter_covers_the_tag():
    src = source({"v1": A}, tags=["v1", "dev"])
    dst = target({"v1": A}, listed=["v1", "v9", "dev", "tmp"])
    assert compare(rule(), src, dst) == []
    with_deletes = rule(deletes=True, tags={"include": ["v*"]})
    assert found(compare(with_deletes, src, dst)) == [("extra", "v9", None, None)]


def test_a_tag_the_source_still_lists_is_never_extra():
    """Under `latest: 1` v1 is not covered any more, but the source has it: sync keeps it."""
    r = rule(deletes=True, tags={"latest": 1})
    covered = covered_tags(r, ["v1.0.0", "v2.0.0"])
    assert covered == ["v2.0.0"]
    src = SourceRepository("team/app", ["v1.0.0", "v2.0.0"], {"v2.0.0": A})
    assert compare(r, src, target({"v2.0.0": A}, listed=["v1.0.0", "v2.0.0"])) == []


def test_covered_tags_is_the_planners_selection():
    r = rule(tags={"include": ["v*"], "exclude": ["*-rc*"], "semver": ">=1.2"})
    assert covered_tags(r, ["v1.0.0", "v1.3.0", "v2.0.0-rc1", "latest", "v2.0.0"]) == [
        "v1.3.0",
        "v2.0.0",
    ]


def test_a_renamed_target_repository_is_named_in_the_drift():
    r = rule(rename={"prefix": "mirror/"})
    drift = compare(r, source({"v1": A}), target({"v1": None}, repo="mirror/team/app"))
    assert [(d.repository, d.target_repository) for d in drift] == [("team/app", "mirror/team/app")]
    assert drift[0].describe().startswith("missing    b/mirror/team/app:v1")


def test_the_digest_a_platform_filtered_copy_writes_is_in_sync():
    r = rule(platforms=["linux/amd64"])
    src = source({"multi": A}, written={"multi": B})
    assert compare(r, src, target({"multi": B})) == []
    assert in_sync(src, target({"multi": B})) == ["multi"]
    assert found(compare(r, src, target({"multi": C}))) == [("different", "multi", A, C)]


def test_report_counts_tags_once_per_kind_and_sets_the_exit_code():
    report = VerifyReport()
    report.summary("r", "c")
    assert report.exit_code == 0 and report.lines() == ["r -> c: 0 tags checked, in sync"]
    incomplete = [
        Drift("r", "b", "x", "x", "v1", "incomplete", A, A, blob)
        for blob in ("sha256:" + "1" * 64, "sha256:" + "2" * 64)
    ]
    report.add("r", "b", 5, [*incomplete, Drift("r", "b", "x", "x", "v2", "missing", B, None)])
    assert report.exit_code == 1
    counts = report.drift_counts()
    assert counts[("r", "b", "incomplete")] == 1 and counts[("r", "b", "missing")] == 1
    assert counts[("r", "c", "missing")] == 0 and counts[("r", "b", "extra")] == 0
    assert report.lines()[0] == "r -> b: 5 tags checked, drift: 1 missing, 1 incomplete"
    assert report.as_dict()["in_sync"] is False
    report.errors.append("cannot verify site c: refused")
    assert report.exit_code == 2


def test_the_metric_knows_every_kind_and_starts_at_zero():
    assert METRIC_KINDS == DRIFT_KINDS
    metrics = Metrics()
    metrics.know(Config(sites=SITES, rules=[{"name": "r", "from": "a", "to": ["b"]}]))
    text = metrics.render()
    for kind in DRIFT_KINDS:
        assert f'registry_replicator_drift_tags{{kind="{kind}",rule="r",target="b"}} 0.0' in text
    assert "registry_replicator_verify_last_success_timestamp_seconds 0.0" in text


def test_the_verify_section_is_validated_with_its_path():
    config = config_from_dict({"sites": SITES, "verify": {"schedule": "0 3 * * *"}})
    assert config.verify is not None and config.verify.deep is False
    assert config_from_dict({"sites": SITES}).verify is None
    with pytest.raises(InvalidConfig) as err:
        config_from_dict({"sites": SITES, "verify": {"schedule": "daily", "deep": "maybe"}})
    text = str(err.value)
    assert "verify.schedule" in text and "invalid cron expression" in text
    assert "verify.deep" in text
    with pytest.raises(InvalidConfig, match=r"verify\.schedule"):
        config_from_dict({"sites": SITES, "verify": {"deep": True}})
