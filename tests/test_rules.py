"""Pure rule logic: globs, tag selection, semver ranges, durations, renames, platforms, failover."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replicator.config import Config, TagFilter
from replicator.durations import format_duration, parse_duration
from replicator.globs import validate_repository_glob, validate_tag_glob
from replicator.manifest import Platform
from replicator.rules import (
    RenameError,
    effective_rules,
    glob_match,
    map_repository,
    platform_selected,
    rules_for,
    select_tags,
    tag_passes,
)
from replicator.semver import Version, parse_range, parse_version

SITES = {name: {"url": f"https://{name}.example"} for name in ("a", "b", "c", "d")}


def make_config(*rules: dict) -> Config:
    return Config(sites=SITES, rules=list(rules))


def rule(**kw):
    base = {"name": "r", "from": "a", "to": ["b"]}
    base.update(kw)
    return make_config(base).rules[0]


# ---- globs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern,name,expected",
    [
        ("team/**", "team/a", True),
        ("team/**", "team/a/b/c", True),
        ("team/**", "team", False),
        ("team/**", "teams/a", False),
        ("team/*", "team/a", True),
        ("team/*", "team/a/b", False),
        ("*", "app", True),
        ("*", "team/app", False),
        ("**", "team/app/x", True),
        ("**/app", "app", True),
        ("**/app", "x/y/app", True),
        ("**/app", "x/y/app2", False),
        ("team/app-?", "team/app-1", True),
        ("team/app-?", "team/app-12", False),
        ("team/{api,web}", "team/web", True),
        ("team/{api,web}", "team/db", False),
        ("team/[ab]*", "team/bee", True),
        ("team/[ab]*", "team/cat", False),
    ],
)
def test_doublestar_globs(pattern, name, expected):
    assert validate_repository_glob(pattern) == pattern
    assert glob_match([pattern], name) is expected


@pytest.mark.parametrize(
    "pattern,why",
    [
        ("", "non-empty"),
        ("Team/*", "lower-case"),
        ("team**", "whole path segment"),
        ("team/**x/y", "whole path segment"),
        ("/team/*", "leading"),
        ("team/", "trailing"),
        ("team//x", "doubled"),
        ("!team/*", "exclude_repositories"),
        ("team/[ab", "closing ']'"),
        ("team/{a,b", "closing '}'"),
        ("team/a}", "without a matching"),
        ("team /x", "whitespace"),
        ("team/a:b", "characters"),
    ],
)
def test_bad_repository_globs_are_refused(pattern, why):
    with pytest.raises(ValueError, match=None) as info:
        validate_repository_glob(pattern)
    assert why in str(info.value)


@pytest.mark.parametrize("pattern", ["v*/x", "!v1", "v[1", "a b", "v1:2"])
def test_bad_tag_globs_are_refused(pattern):
    with pytest.raises(ValueError):
        validate_tag_glob(pattern)


def test_tag_globs_allow_upper_case():
    assert validate_tag_glob("Release-*") == "Release-*"
    assert glob_match(["Release-*"], "Release-1") and not glob_match(["Release-*"], "release-1")


def test_matches_repository_with_excludes():
    r = rule(repositories=["team/**", "infra/base"], exclude_repositories=["team/tmp-*"])
    assert r.matches_repository("team/app")
    assert r.matches_repository("team/tmp-x/nested")  # '*' does not cross '/'
    assert not r.matches_repository("team/tmp-x")
    assert r.matches_repository("infra/base")
    assert not r.matches_repository("infra/other")


def test_default_repositories_match_everything():
    assert rule().matches_repository("a/b/c")


@given(st.from_regex(r"[a-z0-9]{1,8}(/[a-z0-9]{1,8}){0,4}", fullmatch=True))
def test_property_star_never_crosses_slash(repo):
    assert glob_match(["*"], repo) == ("/" not in repo)
    assert glob_match(["**"], repo)
    first = repo.split("/", 1)[0]
    assert glob_match([f"{first}/**"], repo) == ("/" in repo)


# ---- tag selection ----------------------------------------------------------------------------

TAGS = [
    "latest",
    "v1.0.0",
    "v1.2.0",
    "v1.2.1-rc1",
    "v1.3.0",
    "1.10.0",
    "v2.0.0",
    "2.1.0-rc.1",
    "main",
    "sha-abc",
]


def tf(**kw) -> TagFilter:
    return TagFilter(**kw)


def test_no_filter_selects_all_in_order_without_duplicates():
    assert select_tags(["b", "a", "b"], None) == ["b", "a"]


def test_include_and_exclude():
    f = tf(include=["v*", "latest"], exclude=["*-rc*"])
    assert select_tags(TAGS, f) == ["latest", "v1.0.0", "v1.2.0", "v1.3.0", "v2.0.0"]


def test_regex_filters_search_and_combine_with_globs_and_latest():
    strict = tf(regex=[r"^v\d+\.\d+\.\d+$"])
    assert select_tags(TAGS, strict) == ["v1.0.0", "v1.2.0", "v1.3.0", "v2.0.0"]
    assert tag_passes(tf(regex=["rc"]), "v2.0.0-rc1")  # searched, not matched whole
    assert not tag_passes(tf(exclude_regex=["-rc\\d*$"]), "v2.0.0-rc1")
    either = tf(regex=["^latest$", "^1\\."], exclude_regex=["^1\\.1"])
    assert select_tags(TAGS, either) == ["latest"]
    # every filter applies: a glob and a regex must both let the tag through
    assert select_tags(TAGS, tf(include=["v1*"], regex=["0$"])) == ["v1.0.0", "v1.2.0", "v1.3.0"]
    assert select_tags(TAGS, tf(regex=[r"^v\d"], latest=2)) == ["v1.3.0", "v2.0.0"]


def test_semver_range_excludes_non_versions_and_prereleases():
    assert select_tags(TAGS, tf(semver=">=1.2")) == ["v1.2.0", "v1.3.0", "1.10.0", "v2.0.0"]
    assert select_tags(TAGS, tf(semver="<2.0.0")) == ["v1.0.0", "v1.2.0", "v1.3.0", "1.10.0"]


def test_semver_range_naming_a_prerelease_admits_that_prerelease_line():
    tags = ["1.3.0-rc.1", "1.3.0-rc.2", "1.4.0-rc.1", "1.3.0"]
    assert select_tags(tags, tf(semver=">=1.3.0-rc.2")) == ["1.3.0-rc.2", "1.3.0"]


def test_latest_n_by_version():
    f = tf(semver=">=1", latest=2)
    assert select_tags(TAGS, f) == ["1.10.0", "v2.0.0"]  # input order, not rank order


def test_latest_n_by_push_time_when_tags_are_not_versions():
    tags = ["main", "sha-1", "sha-2", "v1.0.0"]
    pushed = {"main": 50.0, "sha-1": 10.0, "sha-2": 40.0, "v1.0.0": 30.0}
    assert select_tags(tags, tf(latest=2), pushed) == ["main", "sha-2"]
    # tags missing from pushed_at count as oldest
    assert select_tags([*tags, "new"], tf(latest=1), {"new": 99.0}) == ["new"]


def test_latest_n_without_push_times_is_deterministic():
    tags = ["main", "v1.0.0", "v2.0.0", "dev"]
    assert select_tags(tags, tf(latest=2)) == ["v1.0.0", "v2.0.0"]
    assert select_tags(list(reversed(tags)), tf(latest=2)) == ["v2.0.0", "v1.0.0"]


def test_latest_combines_with_include():
    f = tf(include=["v*"], latest=1)
    assert select_tags(TAGS, f) == ["v2.0.0"]


def test_tag_passes_ignores_latest():
    f = tf(include=["v*"], semver="^1.2", latest=1)
    assert tag_passes(f, "v1.3.0")
    assert not tag_passes(f, "v2.0.0")
    assert not tag_passes(f, "1.3.0")  # include requires the v
    assert tag_passes(None, "anything")


@given(
    st.lists(
        st.from_regex(r"v?[0-9]{1,2}\.[0-9]{1,2}\.[0-9]{1,2}|[a-z]{1,5}", fullmatch=True),
        max_size=20,
    ),
    st.integers(min_value=1, max_value=5),
)
def test_property_latest_n_is_a_bounded_subset(tags, n):
    chosen = select_tags(tags, tf(latest=n))
    assert len(chosen) == min(n, len(set(tags)))
    assert set(chosen) <= set(tags)
    assert chosen == [t for t in dict.fromkeys(tags) if t in set(chosen)]


# ---- semver -----------------------------------------------------------------------------------


def test_version_parsing():
    assert parse_version("v1.2.3") == Version(1, 2, 3)
    assert parse_version("1.2") == Version(1, 2, 0)
    assert parse_version("3") == Version(3, 0, 0)
    assert parse_version("1.2.3-rc.1+build.5") == Version(1, 2, 3, ("rc", 1))
    for not_version in ("latest", "main", "1.2.3.4", "v", "1..2", "sha-abc", "1.2.3-"):
        assert parse_version(not_version) is None, not_version


def test_precedence_follows_semver_spec():
    ordered = [
        "1.0.0-alpha",
        "1.0.0-alpha.1",
        "1.0.0-alpha.beta",
        "1.0.0-beta",
        "1.0.0-beta.2",
        "1.0.0-beta.11",
        "1.0.0-rc.1",
        "1.0.0",
        "1.0.1",
        "1.1.0",
        "2.0.0",
    ]
    versions = [parse_version(t) for t in ordered]
    assert sorted(reversed(versions)) == versions


@pytest.mark.parametrize(
    "rng,inside,outside",
    [
        (">=1.2", ["1.2.0", "1.2", "v1.9.9", "2.0.0"], ["1.1.9", "1.3.0-rc.1", "latest"]),
        ("<2.0.0", ["0.1.0", "1.9.9"], ["2.0.0", "2.0.0-rc.1", "1.5.0-beta"]),
        ("^1.2", ["1.2.0", "1.9.0"], ["1.1.0", "2.0.0", "2.0.0-alpha"]),
        ("^1.2.3", ["1.2.3", "1.99.0"], ["1.2.2", "2.0.0"]),
        ("^0.2.3", ["0.2.3", "0.2.9"], ["0.3.0", "0.2.2"]),
        ("^0.0.3", ["0.0.3"], ["0.0.4"]),
        ("~1.2", ["1.2.0", "1.2.9"], ["1.3.0", "1.1.0"]),
        ("~1.2.3", ["1.2.3", "1.2.8"], ["1.3.0", "1.2.2"]),
        ("~> 1.2", ["1.2.5"], ["1.3.0"]),
        ("~1", ["1.0.0", "1.9.0"], ["2.0.0"]),
        ("1.x", ["1.0.0", "1.99.0"], ["2.0.0", "0.9.0"]),
        ("1.2.x", ["1.2.0", "1.2.99"], ["1.3.0"]),
        ("1.2", ["1.2.0", "1.2.5"], ["1.3.0"]),
        ("*", ["0.0.1", "99.0.0"], ["1.0.0-rc.1", "main"]),
        (">=1.2 <1.4", ["1.2.0", "1.3.9"], ["1.4.0", "1.1.0"]),
        (">= 1.2, < 1.4", ["1.2.0", "1.3.9"], ["1.4.0", "1.1.0"]),
        (">=1.2,<1.4", ["1.3.0"], ["1.4.0"]),
        ("^1.2 || ^3", ["1.5.0", "3.0.1"], ["2.0.0", "4.0.0"]),
        ("<1.0.0 || >=2.0.0", ["0.9.0", "2.1.0"], ["1.5.0"]),
        ("1.2 - 1.4", ["1.2.0", "1.4.9"], ["1.5.0", "1.1.9"]),
        (">1.2", ["1.3.0"], ["1.2.9"]),
        (">1.2.3", ["1.2.4"], ["1.2.3"]),
        ("<=1.2", ["1.2.9"], ["1.3.0"]),
        ("=1.2.3", ["1.2.3", "v1.2.3"], ["1.2.4"]),
        (
            ">=1.3.0-rc.1 <2",
            ["1.3.0-rc.1", "1.3.0-rc.2", "1.3.0", "1.9.0"],
            ["1.3.0-beta", "1.4.0-rc.1", "1.3.0-rc.0"],
        ),
    ],
)
def test_ranges(rng, inside, outside):
    r = parse_range(rng)
    for tag in inside:
        assert r.matches(tag), f"{tag} should satisfy {rng}"
    for tag in outside:
        assert not r.matches(tag), f"{tag} should not satisfy {rng}"


@pytest.mark.parametrize(
    "bad", ["", "   ", ">=", ">=1.2 <<2", "abc", "1.2.3.4", "^1 ||", ">=1.2 || ", "v1.x.2.3"]
)
def test_bad_ranges_are_refused(bad):
    with pytest.raises(ValueError):
        parse_range(bad)


@given(st.integers(0, 50), st.integers(0, 50), st.integers(0, 50))
def test_property_version_round_trip_and_caret(major, minor, patch):
    v = Version(major, minor, patch)
    assert parse_version(str(v)) == v
    assert parse_version("v" + str(v)) == v
    caret = parse_range(f"^{v}")
    assert caret.contains(v)
    if major > 0:
        assert caret.contains(Version(major, minor + 1, 0))
        assert not caret.contains(Version(major + 1, 0, 0))
    assert not caret.contains(Version(major, minor, patch, ("rc", 1)))


# ---- durations --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,seconds",
    [
        ("10m", 600),
        ("30d", 30 * 86400),
        ("1h", 3600),
        ("90s", 90),
        ("1h30m", 5400),
        ("2w", 14 * 86400),
        ("250ms", 0.25),
        ("0s", 0),
        ("1.5h", 5400),
        (" 10M ", 600),
    ],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "10", "10x", "m", "-5m", "1h 30m", "1e3s", "1h-"])
def test_bad_durations(bad):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


@given(st.integers(min_value=0, max_value=10**9))
def test_property_duration_round_trip(ms):
    seconds = ms / 1000
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


# ---- renames, rules_for, platforms --------------------------------------------------------------


def test_map_repository():
    r = rule(rename={"strip_prefix": "team/", "prefix": "mirror/"})
    assert map_repository(r, "team/app") == "mirror/app"
    assert map_repository(r, "team/a/b") == "mirror/a/b"
    assert map_repository(r, "other/app") == "mirror/other/app"  # nothing to strip
    assert map_repository(rule(), "team/app") == "team/app"
    assert map_repository(rule(rename={"strip_prefix": "team/"}), "team/x/y") == "x/y"


def test_map_repository_refuses_an_invalid_result():
    r = rule(rename={"prefix": "m" * 200 + "/"})
    with pytest.raises(RenameError, match="rule 'r' renames repository") as info:
        map_repository(r, "team/" + "a" * 100)
    assert info.value.exit_code == 2


def test_rules_for_fans_out_to_every_target():
    config = make_config(
        {
            "name": "apps",
            "from": "a",
            "to": ["b", "c"],
            "repositories": ["team/**"],
            "exclude_repositories": ["team/tmp-*"],
            "rename": {"prefix": "mirror/"},
        },
        {"name": "all", "from": "a", "to": "d"},
        {"name": "back", "from": "b", "to": ["a"]},
    )
    got = [(t.rule.name, t.target_site, t.target_repo) for t in rules_for(config, "a", "team/x")]
    assert got == [
        ("apps", "b", "mirror/team/x"),
        ("apps", "c", "mirror/team/x"),
        ("all", "d", "team/x"),
    ]
    assert [t.rule.name for t in rules_for(config, "a", "team/tmp-1")] == ["all"]
    assert [(t.target_site, t.target_repo) for t in rules_for(config, "b", "x")] == [("a", "x")]
    assert rules_for(config, "c", "team/x") == []
    rule_, site, repo = rules_for(config, "b", "x")[0]  # plain tuple unpacking works
    assert (rule_.name, site, repo) == ("back", "a", "x")


def test_platform_selected():
    r = rule(platforms=["linux/amd64", "linux/arm64"])
    assert platform_selected(r, Platform("linux", "amd64"))
    assert platform_selected(r, Platform("linux", "arm64", "v8"))  # no variant wanted: any
    assert not platform_selected(r, Platform("linux", "arm", "v7"))
    assert not platform_selected(r, Platform("windows", "amd64"))
    assert platform_selected(r, None)
    assert platform_selected(r, Platform("unknown", "unknown"))  # attestations travel along
    assert platform_selected(rule(), Platform("windows", "amd64"))  # no list: everything
    v7 = rule(platforms=["linux/arm/v7"])
    assert platform_selected(v7, Platform("linux", "arm", "v7"))
    assert not platform_selected(v7, Platform("linux", "arm", "v6"))


# ---- failover -----------------------------------------------------------------------------------


def test_effective_rules_reroute_from_the_promoted_site():
    config = make_config(
        {"name": "fanout", "from": "a", "to": ["b", "c"]},
        {"name": "into-a", "from": "c", "to": ["a", "d"]},
        {"name": "only-a", "from": "d", "to": ["a"]},
        {"name": "other", "from": "c", "to": ["d"]},
    )
    eff = {r.name: (r.from_, r.to) for r in effective_rules(config, [("a", "b")])}
    assert eff == {
        "fanout": ("b", ["c"]),  # promoted site now the source, no longer a target
        "into-a": ("c", ["d"]),  # the lost site takes no writes
        "other": ("c", ["d"]),
    }  # "only-a" had no target left
    # the configured rules are untouched
    assert (config.rules[0].from_, config.rules[0].to) == ("a", ["b", "c"])
    assert effective_rules(config, []) == config.rules


def test_effective_rules_chain_of_failovers():
    config = make_config({"name": "fanout", "from": "a", "to": ["b", "c", "d"]})
    [r] = effective_rules(config, [("a", "b"), ("b", "c")])
    assert (r.from_, r.to) == ("c", ["d"])


def test_effective_rules_feed_rules_for():
    config = make_config({"name": "fanout", "from": "a", "to": ["b", "c"]})
    eff = effective_rules(config, [("a", "b")])
    assert rules_for(config, "a", "x", rules=eff) == []
    assert [(t.target_site, t.target_repo) for t in rules_for(config, "b", "x", rules=eff)] == [
        ("c", "x")
    ]
