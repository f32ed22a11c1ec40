"""Disaster-recovery failover and failback on real registries, with the primary really stopped."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from replicator.blob_index import BlobIndex
from replicator.clients import ClientPool
from replicator.config import config_from_dict
from replicator.copy import CopyEngine
from replicator.errors import UsageError
from replicator.failover import (
    CatchUp,
    Conflict,
    FailoverRequest,
    _decide,
    choose_digest,
    failback,
    failover,
    lost_site_for,
    refusals,
)
from replicator.journal import Journal
from replicator.sync import Reconciler, rules_in_force
from tests.harness.images import Pusher, assert_image_complete, layer_bytes
from tests.harness.journal import sql


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "replicator", *args], capture_output=True, text=True, timeout=120
    )


def make_config(tmp_path: Path, sites: dict, rules: list[dict]) -> tuple[dict, Path]:
    data = {
        "journal": str(tmp_path / "journal.db"),
        "sites": {
            name: {"url": reg.url if hasattr(reg, "url") else reg, "insecure": True}
            for name, reg in sites.items()
        },
        "rules": rules,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return data, path


def tags_of(reg, repo: str) -> list[str]:
    with Pusher(reg.url) as p:
        return sorted(p.tags(repo))


# ---------------------------------------------------------------------------- pure decisions

SITES = {n: f"http://127.0.0.1:{5000 + i}" for i, n in enumerate(("p", "a", "b", "c"))}


def _config(rules: list[dict]):
    return config_from_dict(
        {"sites": {n: {"url": u, "insecure": True} for n, u in SITES.items()}, "rules": rules}
    )


def test_lost_site_is_inferred_or_must_be_named():
    cfg = _config(
        [
            {"name": "r1", "from": "p", "to": ["a", "b"]},
            {"name": "r2", "from": "c", "to": ["a"]},
            {"name": "r3", "from": "p", "to": ["b"]},
        ]
    )
    assert lost_site_for(cfg.rules, "b") == "p"
    with pytest.raises(UsageError, match=r"several sites .*--lost"):
        lost_site_for(cfg.rules, "a")
    assert lost_site_for(cfg.rules, "a", "c") == "c"
    with pytest.raises(UsageError, match="no rule in force replicates to 'p'"):
        lost_site_for(cfg.rules, "p")
    with pytest.raises(UsageError, match="no rule in force replicates from 'b'"):
        lost_site_for(cfg.rules, "a", "b")
    with pytest.raises(UsageError, match="same site"):
        lost_site_for(cfg.rules, "a", "a")


def test_only_ambiguous_renames_are_refused_with_the_rule_named():
    """Issue 11, case 10: a prefix rename inverts (strip it again); a strip_prefix
    inverts only when every selected repository carries it."""
    cfg = _config(
        [
            {"name": "plain", "from": "p", "to": ["a"]},
            {
                "name": "mirror",
                "from": "p",
                "to": ["a"],
                "rename": {"strip_prefix": "team/", "prefix": "m/"},
            },
            {"name": "prefixed", "from": "p", "to": ["a"], "rename": {"prefix": "m/"}},
            {
                "name": "stripped",
                "from": "p",
                "to": ["c"],
                "repositories": ["team/**"],
                "rename": {"strip_prefix": "team/"},
            },
            {"name": "other", "from": "c", "to": ["a"], "rename": {"strip_prefix": "x/"}},
        ]
    )
    problems = refusals(cfg.rules, "p", "a")
    assert len(problems) == 1 and "'mirror'" in problems[0] and "rename" in problems[0]


def test_choose_digest_prefers_the_most_recent_knowledge_among_candidates():
    assert choose_digest({"d1", "d2"}, [(10, "d1"), (20, "d2")]) == "d2"
    assert choose_digest({"d1", "d2"}, [(10, "d1"), (30, "d9")]) == "d1"  # d9 not held
    assert choose_digest({"d1"}, []) is None


def test_decide_covers_missing_newer_kept_and_conflict():
    cfg = _config([{"name": "r", "from": "p", "to": ["a", "b", "c"]}])
    rule, reps = cfg.rules[0], ["b", "c"]
    assert _decide(rule, "x", "t", "d1", {"b": "d1"}, reps, "a", []) is None
    missing = _decide(rule, "x", "t", None, {"c": "d2"}, reps, "a", [])
    assert isinstance(missing, CatchUp) and missing.from_site == "c" and missing.replaces is None
    newer = _decide(rule, "x", "t", "d1", {"b": "d2"}, reps, "a", [(5, "d1"), (9, "d2")])
    assert isinstance(newer, CatchUp) and newer.digest == "d2" and newer.replaces == "d1"
    assert _decide(rule, "x", "t", "d1", {"b": "d2"}, reps, "a", [(9, "d1"), (5, "d2")]) is None
    unknown = _decide(rule, "x", "t", "d1", {"b": "d2"}, reps, "a", [])
    assert isinstance(unknown, Conflict) and unknown.kept == "d1"
    conflict, copy = _decide(rule, "x", "t", None, {"b": "d2", "c": "d3"}, reps, "a", [])
    assert isinstance(conflict, Conflict) and conflict.kept == "d2"
    assert isinstance(copy, CatchUp) and (copy.from_site, copy.digest) == ("b", "d2")
    known = _decide(rule, "x", "t", None, {"b": "d2", "c": "d3"}, reps, "a", [(1, "d3")])
    assert isinstance(known, CatchUp) and (known.from_site, known.digest) == ("c", "d3")


# ---------------------------------------------------------------------------- real registries


async def test_failover_from_stopped_primary_catches_up_then_failback(registry_factory, tmp_path):
    primary, a, b = registry_factory("p"), registry_factory("a"), registry_factory("b")
    data, _ = make_config(
        tmp_path,
        {"p": primary, "a": a, "b": b},
        [{"name": "apps", "from": "p", "to": ["a", "b"], "repositories": ["team/**"]}],
    )
    config = config_from_dict(data)
    journal = Journal(config.journal)
    pool = ClientPool(config, retries=1, backoff_base=0.01)
    engine = CopyEngine(BlobIndex(journal))
    rule = config.rules[0]
    try:
        with Pusher(primary.url) as p:
            p.push_image("team/app", "v1", [layer_bytes("v1", 300)])
            p.push_image("team/app", "latest", [layer_bytes("old", 300)])
        first = await Reconciler(config, journal, pool, engine).run()
        assert first.failures == [] and first.stats.copied == 4
        # More work lands on the primary; only replica b receives it before the outage.
        with Pusher(primary.url) as p:
            v2 = p.push_image("team/app", "v2", [layer_bytes("v2", 300)])
            new_latest = p.push_image("team/app", "latest", [layer_bytes("new", 300)])
        only_b = rule.model_copy(update={"to": ["b"]})
        second = await Reconciler(config, journal, pool, engine).run(rules=[only_b])
        assert second.failures == [] and second.stats.copied == 2
        # Someone pushed the same tag straight to both replicas: nobody knows which is right.
        with Pusher(a.url) as p:
            mine = p.push_image("team/app", "hotfix", [layer_bytes("a-hotfix", 100)])
        with Pusher(b.url) as p:
            p.push_image("team/app", "hotfix", [layer_bytes("b-hotfix", 100)])
        primary.stop()
        await pool.aclose()
        pool = ClientPool(config, retries=1, backoff_base=0.01)  # as after a restart

        a_before = tags_of(a, "team/app")
        plan = await failover(config, journal, pool, engine, FailoverRequest("a", dry_run=True))
        assert {(c.tag, c.from_site) for c in plan.copies} == {("v2", "b"), ("latest", "b")}
        assert [c.tag for c in plan.conflicts] == ["hotfix"]
        assert plan.rules == [
            {
                "name": "apps",
                "from": "p",
                "to": ["a", "b"],
                "new_from": "a",
                "new_to": ["b"],
                "dropped": False,
            }
        ]
        assert tags_of(a, "team/app") == a_before and not plan.recorded
        assert sql(journal, "SELECT * FROM failovers") == []

        done = await failover(config, journal, pool, engine, FailoverRequest("a"))
        assert done.failures == [] and done.recorded
        assert "p" not in pool._clients, "the lost primary must never be contacted"
        assert assert_image_complete(a.url, "team/app", "v2") == v2.digest
        assert assert_image_complete(a.url, "team/app", "latest") == new_latest.digest
        assert assert_image_complete(a.url, "team/app", "hotfix") == mine.digest  # kept
        row = sql(journal, "SELECT * FROM failovers")[0]
        assert (row["lost_site"], row["promoted_site"], row["active"]) == ("p", "a", 1)
        detail = json.loads(row["detail"])
        assert detail["rules"][0]["new_from"] == "a" and len(detail["catch_up"]["copied"]) == 2
        with pytest.raises(UsageError, match="already failed over"):
            await failover(config, journal, pool, engine, FailoverRequest("a", "p"))

        # A fresh process (new journal handle) follows the failover: a -> b.
        journal2 = Journal(config.journal)
        in_force = await rules_in_force(config, journal2)
        journal2.close()
        assert [(r.from_, r.to) for r in in_force] == [("a", ["b"])]
        with Pusher(a.url) as p:
            v3 = p.push_image("team/app", "v3", [layer_bytes("v3", 300)])
        during = await Reconciler(config, journal, pool, engine).run()
        assert during.failures == [], "sync during the incident must not touch the primary"
        assert "p" not in pool._clients
        assert assert_image_complete(b.url, "team/app", "v3") == v3.digest
        assert during.stats.copied == 2  # v3, and a's hotfix over b's (a is the source now)

        # Failback while the primary is still down: fails, failover stays active.
        down = await failback(config, journal, pool, engine, "p")
        assert down.failures and down.ended == []
        assert sql(journal, "SELECT active FROM failovers")[0]["active"] == 1

        primary.start()
        dry = await failback(config, journal, pool, engine, "p", dry_run=True)
        assert dry.failures == [] and dry.sync.counts()["planned_copies"] == 2  # v3, hotfix
        assert tags_of(primary, "team/app") == ["latest", "v1", "v2"]
        back = await failback(config, journal, pool, engine, "p")
        assert back.failures == [] and back.sources == {"apps": "a"}
        assert assert_image_complete(primary.url, "team/app", "v3") == v3.digest
        row = sql(journal, "SELECT active, ended_at FROM failovers")[0]
        assert row["active"] == 0 and row["ended_at"] is not None
        assert [(r.from_, r.to) for r in await rules_in_force(config, journal)] == [
            ("p", ["a", "b"])
        ]
        after = await Reconciler(config, journal, pool, engine).run()
        assert after.failures == [] and after.stats.copied == 0
    finally:
        await pool.aclose()
        journal.close()


def test_cli_failover_and_failback_json_and_exit_codes(registry_factory, tmp_path):
    primary, a, b = registry_factory("p"), registry_factory("a"), registry_factory("b")
    _, path = make_config(
        tmp_path,
        {"p": primary, "a": a, "b": b, "c": b},
        [
            {"name": "apps", "from": "p", "to": ["a", "b"]},
            {"name": "more", "from": "c", "to": ["a"], "repositories": ["none/*"]},
        ],
    )
    with Pusher(primary.url) as p:
        img = p.push_image("team/app", "v1", [layer_bytes("cli", 200)])
    assert cli("sync", "-c", str(path), "--json").returncode == 0
    with Pusher(b.url) as p:
        p.push_image("team/app", "only-b", [layer_bytes("ob", 200)])
    primary.stop()

    ambiguous = cli("failover", "-c", str(path), "--promote", "a")
    assert ambiguous.returncode == 2 and "--lost" in ambiguous.stderr
    unknown = cli("failover", "-c", str(path), "--promote", "nowhere")
    assert unknown.returncode == 2 and "nowhere" in unknown.stderr

    dry = cli("failover", "-c", str(path), "--promote", "a", "--lost", "p", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert plan["dry_run"] and not plan["recorded"]
    assert [(c["tag"], c["from_site"]) for c in plan["copies"]] == [("only-b", "b")]
    assert tags_of(a, "team/app") == ["v1"]

    real = cli("failover", "-c", str(path), "--promote", "a", "--lost", "p")
    assert real.returncode == 0, real.stderr
    assert "failover recorded" in real.stdout and "becomes  a -> b" in real.stdout
    assert tags_of(a, "team/app") == ["only-b", "v1"]
    status = json.loads(cli("status", "-c", str(path), "--json").stdout)
    assert [(f["lost"], f["promoted"]) for f in status["failovers"]] == [("p", "a")]

    not_failed = cli("failback", "-c", str(path), "--site", "a")
    assert not_failed.returncode == 2 and "no active failover of 'a'" in not_failed.stderr
    primary.start()
    back = cli("failback", "-c", str(path), "--site", "p", "--json")
    assert back.returncode == 0, back.stderr
    result = json.loads(back.stdout)
    assert result["counts"]["copied"] == 1 and result["ended_failovers"] == [1]
    assert tags_of(primary, "team/app") == ["only-b", "v1"]
    assert assert_image_complete(primary.url, "team/app", "v1") == img.digest


def test_cli_refuses_failover_of_ambiguously_renaming_rules(registry_factory, tmp_path):
    primary, a = registry_factory("p"), registry_factory("a")
    _, path = make_config(
        tmp_path,
        {"p": primary, "a": a},
        [
            {
                "name": "mirror",
                "from": "p",
                "to": ["a"],
                "rename": {"strip_prefix": "team/", "prefix": "mirror/"},
            }
        ],
    )
    primary.stop()
    out = cli("failover", "-c", str(path), "--promote", "a")
    assert out.returncode == 2 and "'mirror'" in out.stderr and "rename" in out.stderr
    journal = Journal(tmp_path / "journal.db")
    assert sql(journal, "SELECT * FROM failovers") == []
    journal.close()


async def test_catch_up_under_latest_n_copies_only_the_newest_tags(registry_factory, tmp_path):
    """A replica still holds v1 (replication adds, it does not remove), but under
    `latest: 2` v1 is no longer the rule's: only v4 is caught up."""
    primary, a, b = registry_factory("p"), registry_factory("a"), registry_factory("b")
    data, _ = make_config(
        tmp_path,
        {"p": primary, "a": a, "b": b},
        [{"name": "apps", "from": "p", "to": ["a", "b"], "tags": {"latest": 2}}],
    )
    config = config_from_dict(data)
    journal = Journal(config.journal)
    pool = ClientPool(config, retries=1, backoff_base=0.01)
    engine = CopyEngine(BlobIndex(journal))
    rule = config.rules[0]
    only_b = rule.model_copy(update={"to": ["b"]})
    try:
        with Pusher(primary.url) as p:
            p.push_image("team/app", "v1", [layer_bytes("l1", 200)])
        assert (await Reconciler(config, journal, pool, engine).run(rules=[only_b])).failures == []
        with Pusher(primary.url) as p:
            for tag in ("v2", "v3"):
                p.push_image("team/app", tag, [layer_bytes(f"l-{tag}", 200)])
        assert (await Reconciler(config, journal, pool, engine).run()).failures == []
        with Pusher(primary.url) as p:
            v4 = p.push_image("team/app", "v4", [layer_bytes("l4", 200)])
        assert (await Reconciler(config, journal, pool, engine).run(rules=[only_b])).failures == []
        assert tags_of(a, "team/app") == ["v2", "v3"]
        assert tags_of(b, "team/app") == ["v1", "v2", "v3", "v4"]
        primary.stop()

        plan = await failover(config, journal, pool, engine, FailoverRequest("a", dry_run=True))
        assert [(c.tag, c.from_site) for c in plan.copies] == [("v4", "b")]
        done = await failover(config, journal, pool, engine, FailoverRequest("a"))
        assert done.failures == [] and done.recorded
        assert tags_of(a, "team/app") == ["v2", "v3", "v4"]
        assert assert_image_complete(a.url, "team/app", "v4") == v4.digest
    finally:
        await pool.aclose()
        journal.close()


async def test_catch_up_keeps_every_tag_it_pushed_in_the_ledger(registry_factory, tmp_path):
    """Catch-up pushes one digest by two tags: the ledger must name both (as every other
    writer's merge does), or the promoted site's webhook for the first tag looks like a
    genuine push and is bounced back to the replicas."""
    primary, a, b = registry_factory("p"), registry_factory("a"), registry_factory("b")
    data, _ = make_config(
        tmp_path, {"p": primary, "a": a, "b": b}, [{"name": "apps", "from": "p", "to": ["a", "b"]}]
    )
    config = config_from_dict(data)
    journal = Journal(config.journal)
    pool = ClientPool(config, retries=1, backoff_base=0.01)
    engine = CopyEngine(BlobIndex(journal))
    only_b = config.rules[0].model_copy(update={"to": ["b"]})
    try:
        with Pusher(primary.url) as p:
            img = p.push_image("team/app", "v1", [layer_bytes("same", 200)])
            assert (
                p.push_image("team/app", "stable", [layer_bytes("same", 200)]).digest == img.digest
            )
        assert (await Reconciler(config, journal, pool, engine).run(rules=[only_b])).failures == []
        primary.stop()
        done = await failover(config, journal, pool, engine, FailoverRequest("a"))
        assert done.failures == [] and {c.tag for c in done.copies} == {"v1", "stable"}
        [row] = sql(journal, "SELECT * FROM replicated WHERE target_site = 'a'")
        assert (row["digest"], row["source_site"]) == (img.digest, "b")
        assert sorted(json.loads(row["tags"])) == ["stable", "v1"]
    finally:
        await pool.aclose()
        journal.close()
