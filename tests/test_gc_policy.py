"""Retention decisions: every keep clause, grace, untagged, referrers, index children."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replicator.gc.mark import Node, mark
from replicator.gc.policy import (
    KeepRules,
    RetentionPolicy,
    TagInfo,
    attached_subject,
    decide,
    policies_for,
)

NOW = 1_000_000.0
DAY = 86400.0


def d(name: str) -> str:
    return f"sha256:{name:0>64}"


def img(name: str, age: float) -> tuple[str, Node]:
    return d(name), Node(blobs=(d(f"c{name}"), d(f"l{name}")), pushed_at=NOW - age)


def policy(**kw) -> RetentionPolicy:
    keep = KeepRules(**kw.pop("keep", {}))
    return RetentionPolicy(name="p", keep=keep, grace=kw.pop("grace", 3600), **kw)


def repo(*images: tuple[str, float]) -> tuple[list[TagInfo], dict[str, Node]]:
    tags, graph = [], {}
    for name, age in images:
        dg, node = img(name, age)
        graph[dg] = node
        tags.append(TagInfo(name, dg, pushed_at=NOW - age))
    return tags, graph


def test_no_keep_clause_deletes_old_tags_and_their_manifests() -> None:
    tags, graph = repo(("v1", 10 * DAY), ("v2", 5 * DAY))
    dec = decide(policy(), tags, graph, NOW)
    assert set(dec.deleted_tags) == {"v1", "v2"}
    assert set(dec.deleted_manifests) == {d("v1"), d("v2")}
    assert dec.deleted_manifests[d("v1")] == "all its tags expired: v1"
    assert not dec.marked.blobs


def test_keep_tags_glob_patterns() -> None:
    tags, graph = repo(
        ("v1.0", 10 * DAY), ("v1.1", 9 * DAY), ("dev-1", 8 * DAY), ("latest", 7 * DAY)
    )
    dec = decide(policy(keep={"tags": ("v1.*", "lat{e,o}st")}), tags, graph, NOW)
    assert set(dec.kept_tags) == {"v1.0", "v1.1", "latest"}
    assert dec.kept_tags["v1.0"] == ["matches keep.tags"]
    assert set(dec.deleted_tags) == {"dev-1"}
    assert set(dec.deleted_manifests) == {d("dev-1")}
    assert d("cv1.0") in dec.marked.blobs and d("cdev-1") not in dec.marked.blobs


def test_most_recent_counts_by_push_time_not_name() -> None:
    tags, graph = repo(("a", 2 * DAY), ("b", 9 * DAY), ("c", 3 * DAY), ("d", 1.5 * DAY))
    dec = decide(policy(keep={"most_recent": 2}), tags, graph, NOW)
    assert set(dec.kept_tags) == {"d", "a"}
    assert set(dec.deleted_tags) == {"b", "c"}


def test_most_recent_zero_keeps_nothing() -> None:
    tags, graph = repo(("a", 2 * DAY))
    assert set(decide(policy(keep={"most_recent": 0}), tags, graph, NOW).deleted_tags) == {"a"}


def test_pushed_within() -> None:
    tags, graph = repo(("new", 2 * DAY), ("old", 40 * DAY))
    dec = decide(policy(keep={"pushed_within": 7 * DAY}), tags, graph, NOW)
    assert set(dec.kept_tags) == {"new"} and set(dec.deleted_tags) == {"old"}


def test_pulled_within_applies_only_where_pull_time_known() -> None:
    _, graph = repo(("a", 40 * DAY), ("b", 40 * DAY), ("c", 40 * DAY))
    tags = [
        TagInfo("a", d("a"), NOW - 40 * DAY, pulled_at=NOW - DAY),
        TagInfo("b", d("b"), NOW - 40 * DAY, pulled_at=NOW - 30 * DAY),
        TagInfo("c", d("c"), NOW - 40 * DAY, pulled_at=None),
    ]
    dec = decide(policy(keep={"pulled_within": 7 * DAY}), tags, graph, NOW)
    assert set(dec.kept_tags) == {"a"}
    assert set(dec.deleted_tags) == {"b", "c"}


def test_any_clause_keeps() -> None:
    tags, graph = repo(("release-1", 90 * DAY), ("x", 1 * DAY), ("y", 50 * DAY))
    dec = decide(policy(keep={"tags": ("release-*",), "pushed_within": 7 * DAY}), tags, graph, NOW)
    assert set(dec.kept_tags) == {"release-1", "x"}


def test_grace_protects_young_tags_and_untagged_manifests() -> None:
    tags, graph = repo(("young", 60))
    dg, node = img("loose", 120)
    graph[dg] = node
    dec = decide(policy(grace=600), tags, graph, NOW)
    assert dec.kept_tags == {"young": ["within grace"]}
    assert {d("young"), d("loose")} <= dec.kept_manifests
    assert not dec.deleted_manifests


def test_grace_zero_and_unknown_push_time_is_kept() -> None:
    graph = {d("a"): Node(blobs=(d("x"),), pushed_at=None)}
    tags = [TagInfo("t", d("a"), pushed_at=None)]
    dec = decide(policy(grace=0), tags, graph, NOW)
    assert dec.kept_tags == {"t": ["push time unknown"]}
    assert d("a") in dec.kept_manifests


def test_untagged_delete_vs_keep() -> None:
    tags, graph = repo(("t", DAY))
    dg, node = img("loose", 5 * DAY)
    graph[dg] = node
    keep_all = {"tags": ("*",)}
    dec = decide(policy(keep=keep_all, untagged="delete"), tags, graph, NOW)
    assert dec.deleted_manifests == {d("loose"): "untagged"}
    dec = decide(policy(keep=keep_all, untagged="keep"), tags, graph, NOW)
    assert not dec.deleted_manifests


def test_index_keeps_untagged_children_even_with_untagged_delete() -> None:
    a, na = img("amd64", 5 * DAY)
    b, nb = img("arm64", 5 * DAY)
    graph = {a: na, b: nb, d("idx"): Node(children=(a, b), pushed_at=NOW - 5 * DAY)}
    tags = [TagInfo("multi", d("idx"), NOW - 5 * DAY)]
    dec = decide(policy(keep={"tags": ("multi",)}, untagged="delete"), tags, graph, NOW)
    assert dec.kept_manifests == {d("idx"), a, b}
    assert not dec.deleted_manifests


def test_children_of_expired_index_go_with_it_even_with_untagged_keep() -> None:
    a, na = img("amd64", 5 * DAY)
    graph = {a: na, d("idx"): Node(children=(a,), pushed_at=NOW - 5 * DAY)}
    tags = [TagInfo("old", d("idx"), NOW - 5 * DAY)]
    dec = decide(policy(untagged="keep"), tags, graph, NOW)
    assert dec.deleted_manifests == {
        d("idx"): "all its tags expired: old",
        a: "only listed by indexes that are not kept",
    }


def test_child_shared_with_kept_index_survives() -> None:
    a, na = img("amd64", 5 * DAY)
    graph = {
        a: na,
        d("i1"): Node(children=(a,), pushed_at=NOW - 5 * DAY),
        d("i2"): Node(children=(a,), pushed_at=NOW - 5 * DAY),
    }
    tags = [TagInfo("keep", d("i1"), NOW - 5 * DAY), TagInfo("drop", d("i2"), NOW - 5 * DAY)]
    dec = decide(policy(keep={"tags": ("keep",)}), tags, graph, NOW)
    assert set(dec.deleted_manifests) == {d("i2")}
    assert a in dec.kept_manifests


def test_expired_tag_on_kept_digest_deletes_tag_not_manifest() -> None:
    dg, node = img("x", 9 * DAY)
    tags = [TagInfo("stable", dg, NOW - 9 * DAY), TagInfo("nightly-3", dg, NOW - 9 * DAY)]
    dec = decide(policy(keep={"tags": ("stable",)}), tags, {dg: node}, NOW)
    assert set(dec.deleted_tags) == {"nightly-3"}
    assert not dec.deleted_manifests


def test_referrers_live_and_die_with_their_subject() -> None:
    tags, graph = repo(("keep", 5 * DAY), ("drop", 5 * DAY))
    graph[d("sbom")] = Node(blobs=(d("s1"),), subject=d("keep"), pushed_at=NOW - 5 * DAY)
    graph[d("sig")] = Node(blobs=(d("s2"),), subject=d("sbom"), pushed_at=NOW - 5 * DAY)
    graph[d("dsig")] = Node(blobs=(d("s3"),), subject=d("drop"), pushed_at=NOW - 5 * DAY)
    dec = decide(policy(keep={"tags": ("keep",)}, untagged="keep"), tags, graph, NOW)
    assert {d("sbom"), d("sig")} <= dec.kept_manifests
    assert dec.deleted_manifests[d("dsig")] == f"referrer of {d('drop')}, which is not kept"
    assert d("s2") in dec.marked.blobs and d("s3") not in dec.marked.blobs


def test_referrers_keep_overrides_follow_subject() -> None:
    tags, graph = repo(("drop", 5 * DAY))
    graph[d("dsig")] = Node(blobs=(d("s3"),), subject=d("drop"), pushed_at=NOW - 5 * DAY)
    dec = decide(policy(referrers="keep"), tags, graph, NOW)
    assert set(dec.deleted_manifests) == {d("drop")}
    assert d("dsig") in dec.kept_manifests


def test_fallback_and_cosign_tags_follow_their_subject() -> None:
    tags, graph = [], {}
    for subj, tag in (("aa", "keep"), ("bb", "drop")):
        graph[d(subj)] = Node(blobs=(d(f"c{subj}"),), pushed_at=NOW - 5 * DAY)
        tags.append(TagInfo(tag, d(subj), NOW - 5 * DAY))
        sig = d(f"5{subj}")
        graph[sig] = Node(blobs=(d(f"b{subj}"),), pushed_at=NOW - 5 * DAY)
        hexd = d(subj).split(":")[1]
        tags.append(TagInfo(f"sha256-{hexd}.sig", sig, NOW - 5 * DAY))
        fb = d(f"fb{subj}")
        graph[fb] = Node(children=(sig,), pushed_at=NOW - 5 * DAY)
        tags.append(TagInfo(f"sha256-{hexd}", fb, NOW - 5 * DAY))
    dec = decide(policy(keep={"tags": ("keep",)}), tags, graph, NOW)
    hk, hd = d("aa").split(":")[1], d("bb").split(":")[1]
    assert {f"sha256-{hk}", f"sha256-{hk}.sig", "keep"} == set(dec.kept_tags)
    assert dec.kept_tags[f"sha256-{hk}.sig"] == ["subject is kept"]
    assert {f"sha256-{hd}", f"sha256-{hd}.sig", "drop"} == set(dec.deleted_tags)
    assert {d("5aa"), d("fbaa")} <= dec.kept_manifests
    assert {d("5bb"), d("fbbb"), d("bb")} <= set(dec.deleted_manifests)


def test_attached_subject() -> None:
    h = "a" * 64
    assert attached_subject(f"sha256-{h}") == f"sha256:{h}"
    assert attached_subject(f"sha256-{h}.att") == f"sha256:{h}"
    assert attached_subject("sha256-abc") is None
    assert attached_subject("latest") is None


def test_repository_and_site_matching() -> None:
    p = RetentionPolicy(
        name="p",
        sites=("eu-*",),
        repositories=("team/*", "ci/**"),
        exclude_repositories=("team/keep",),
    )
    assert p.applies_to("team/app") and p.applies_to("ci/a/b")
    assert not p.applies_to("team/a/b") and not p.applies_to("team/keep")
    assert p.applies_to_site("eu-west") and not p.applies_to_site("us-east")
    other = RetentionPolicy(name="q", mode="storage")
    assert policies_for([p, other], "eu-west", "team/app", "api") is p
    assert policies_for([p, other], "us-east", "team/app", "api") is None
    assert policies_for([p, other], "us-east", "x", "storage") is other


def test_bad_policy_values_are_refused_with_the_field_name() -> None:
    with pytest.raises(ValueError, match="untagged"):
        RetentionPolicy(name="p", untagged="maybe")
    with pytest.raises(ValueError, match="mode"):
        RetentionPolicy(name="p", mode="fs")
    with pytest.raises(ValueError, match="grace"):
        RetentionPolicy(name="p", grace=-1)
    with pytest.raises(ValueError, match="most_recent"):
        KeepRules(most_recent=-2)


def test_from_config_dict_with_duration_strings() -> None:
    p = RetentionPolicy.from_config(
        {
            "name": "ci",
            "repositories": ["ci/**"],
            "grace": "2h",
            "untagged": "keep",
            "keep": {
                "tags": ["v*"],
                "most_recent": 3,
                "pushed_within": "30d",
                "pulled_within": 86400,
            },
            "mode": "storage",
        }
    )
    assert p.grace == 7200 and p.keep.pushed_within == 30 * DAY
    assert p.keep.pulled_within == DAY and p.keep.most_recent == 3
    assert p.repositories == ("ci/**",) and p.mode == "storage" and p.untagged == "keep"


# --- properties --------------------------------------------------------------

names = st.sampled_from([d(f"m{i}") for i in range(10)])
ages = st.one_of(st.none(), st.floats(0, 50 * DAY))
nodes = st.builds(
    Node,
    children=st.lists(names, max_size=2).map(tuple),
    blobs=st.lists(st.sampled_from([d(f"b{i}") for i in range(8)]), max_size=3).map(tuple),
    subject=st.one_of(st.none(), st.none(), names),
    pushed_at=ages.map(lambda a: None if a is None else NOW - a),
)
graphs = st.dictionaries(names, nodes, max_size=10)
tag_lists = st.lists(
    st.builds(
        TagInfo,
        name=st.sampled_from([f"t{i}" for i in range(8)]),
        digest=names,
        pushed_at=ages.map(lambda a: None if a is None else NOW - a),
    ),
    max_size=8,
    unique_by=lambda t: t.name,
)
policies = st.builds(
    RetentionPolicy,
    name=st.just("p"),
    keep=st.builds(
        KeepRules,
        tags=st.lists(st.sampled_from(["t1", "t[2-3]", "x*"]), max_size=2).map(tuple),
        most_recent=st.one_of(st.none(), st.integers(0, 4)),
        pushed_within=st.one_of(st.none(), st.floats(0, 30 * DAY)),
    ),
    untagged=st.sampled_from(["keep", "delete"]),
    grace=st.floats(0, 10 * DAY),
)


@settings(max_examples=300, deadline=None)
@given(policies, tag_lists, graphs)
def test_decision_invariants(pol, tags, graph) -> None:
    dec = decide(pol, tags, graph, NOW)
    # tags and manifests are partitioned
    assert set(dec.kept_tags) | set(dec.deleted_tags) == {t.name for t in tags}
    assert not set(dec.kept_tags) & set(dec.deleted_tags)
    assert dec.kept_manifests | set(dec.deleted_manifests) == set(graph)
    # nothing reachable from a kept tag is deleted
    reach = mark(graph, [t.digest for t in tags if t.name in dec.kept_tags])
    assert not reach.manifests & set(dec.deleted_manifests)
    # nothing young is deleted; of unknown age only what follows a parent or subject
    parents = {c for n in graph.values() for c in n.children}
    for dg in dec.deleted_manifests:
        pushed = graph[dg].pushed_at
        if pushed is None:
            assert graph[dg].subject is not None or dg in parents
        else:
            assert NOW - pushed >= pol.grace
    for t in tags:
        if t.name in dec.deleted_tags:
            assert t.pushed_at is not None and NOW - t.pushed_at >= pol.grace


def test_most_recent_keeps_exactly_n_ties_by_name_unknown_ages_not_ranked() -> None:
    tags, graph = repo(("b", 2 * DAY), ("a", 2 * DAY), ("c", 2 * DAY), ("d", 9 * DAY))
    graph[d("u")] = Node(pushed_at=None)
    tags.append(TagInfo("u", d("u"), pushed_at=None))
    dec = decide(policy(keep={"most_recent": 2}), tags, graph, NOW)
    ranked = [t for t, why in dec.kept_tags.items() if any("most recently" in w for w in why)]
    assert sorted(ranked) == ["a", "b"]  # the tie at 2 days broken by name
    assert dec.kept_tags["u"] == ["push time unknown"]  # kept, but not one of the N
    assert set(dec.deleted_tags) == {"c", "d"}


def test_follow_source_keeps_what_the_source_holds_and_drops_what_it_removed() -> None:
    from replicator.gc.policy import SourceHolds, summary

    tags, graph = repo(("v1", 30 * DAY), ("v2", 30 * DAY), ("v3", 60), ("local", 30 * DAY))
    follow = SourceHolds("a/app", frozenset({"v1"}), lambda t: t.startswith("v") and t != "v1")
    pol = policy(keep={"tags": ("v*", "local")}, follow_source=True)
    dec = decide(pol, tags, graph, NOW, follow)
    assert dec.kept_tags["v1"] == ["held by the source a/app", "matches keep.tags"]
    assert dec.deleted_tags == {"v2": "gone from the source a/app"}  # keep.tags overruled
    assert dec.kept_tags["v3"] == ["within grace"]  # gone at the source, but too young
    assert dec.kept_tags["local"] == ["matches keep.tags"]  # no rule covers it
    assert summary(dec.kept_tags) == {
        "held by the source (follow_source)": 1,
        "younger than grace": 1,
        "kept by keep.tags": 1,
    }


def test_most_recent_counts_the_tags_keep_tags_does_not_name() -> None:
    """Issue 11 item 6: keep {tags: [latest], most_recent: 2} keeps latest and two others,
    even when latest is the newest."""
    tags, graph = repo(("latest", 1 * DAY), ("a", 2 * DAY), ("b", 3 * DAY), ("c", 4 * DAY))
    dec = decide(policy(keep={"tags": ("latest",), "most_recent": 2}), tags, graph, NOW)
    assert set(dec.kept_tags) == {"latest", "a", "b"}
    assert set(dec.deleted_tags) == {"c"}
