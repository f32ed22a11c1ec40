"""One decision for "does this rule cover this tag now" (`rules.covers`), shared by the
planner and the event path (issue 11, case 4). Pure: no registry."""

from __future__ import annotations

import pytest

from replicator.config import Config
from replicator.daemon.dispatch import SourceTags, needs_source_tags, tasks_for_event
from replicator.events import RegistryEvent
from replicator.planner import selected_tags
from replicator.rules import covered_tags, covers

SITES = {name: {"url": f"https://{name}.example"} for name in ("a", "b")}
REFERRER_TAG = "sha256-" + "a" * 64


def make_config(**rule) -> Config:
    return Config(sites=SITES, rules=[{"name": "r", "from": "a", "to": ["b"], **rule}])


def push(tag: str) -> RegistryEvent:
    return RegistryEvent(
        id=f"e-{tag}",
        site="a",
        action="push",
        repository="team/app",
        tag=tag,
        digest="sha256:" + "1" * 64,
        is_manifest=True,
    )


def test_a_backport_outside_latest_n_is_not_replicated_by_the_event_path():
    config = make_config(tags={"semver": ">=1.0.0", "latest": 3})
    rule = config.rules[0]
    on_source = ["v1.0.0", "v1.1.0", "v1.2.0", "v2.0.0", "v1.0.5"]
    # sync's answer
    assert selected_tags(rule, dict.fromkeys(on_source, "")) == ["v1.1.0", "v1.2.0", "v2.0.0"]
    event = push("v1.0.5")
    assert needs_source_tags(config, config.rules, event)
    listing = SourceTags(on_source, {})
    assert tasks_for_event(config, config.rules, event, None, listing) == []
    # a new highest version is in
    newest = push("v2.1.0")
    specs = tasks_for_event(config, config.rules, newest, None, SourceTags(on_source, {}))
    assert [s.tag for s in specs] == ["v2.1.0"]
    with pytest.raises(ValueError, match="tag list"):
        tasks_for_event(config, config.rules, event)


def test_event_path_and_planner_agree_for_every_filter():
    """For each filter kind, every tag: covers() == membership in the planner's selection."""
    on_source = ["v1.0.0", "v1.2.0", "v2.0.0-rc1", "latest", "dev", REFERRER_TAG, "v3.0.0"]
    pushed_at = {t: float(i) for i, t in enumerate(on_source)}
    rules = [
        {},
        {"tags": {"include": ["v*"], "exclude": ["*-rc*"]}},
        {"tags": {"semver": ">=1.1"}},
        {"tags": {"latest": 2}},
        {"tags": {"include": ["v*"], "latest": 1}},
        {"referrers": False},
        {"platforms": ["linux/amd64"]},
    ]
    for extra in rules:
        config = make_config(**extra)
        rule = config.rules[0]
        planned = set(selected_tags(rule, dict.fromkeys(on_source, ""), pushed_at))
        for tag in on_source:
            listing = SourceTags(on_source, pushed_at)
            by_event = bool(tasks_for_event(config, config.rules, push(tag), None, listing))
            assert by_event == (tag in planned) == covers(rule, tag, on_source, pushed_at), (
                extra,
                tag,
            )


def test_referrers_fallback_tags_follow_the_referrers_switch_not_the_tag_filters():
    rule = make_config(tags={"include": ["v*"], "latest": 1}).rules[0]
    assert covered_tags(rule, ["v1", "v2", REFERRER_TAG]) == ["v2", REFERRER_TAG]
    off = make_config(referrers=False).rules[0]
    assert not covers(off, REFERRER_TAG)


def test_a_deleted_tag_is_judged_by_the_filters_alone():
    rule = make_config(tags={"semver": ">=1.0.0", "latest": 1}).rules[0]
    assert covers(rule, "v1.0.0")  # the source no longer holds it: no rank to compare
    assert not covers(rule, "dev")
