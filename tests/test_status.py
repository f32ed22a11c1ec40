"""`status`: lag, pending, dead letters, last reconcile and failovers, from the journal only."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import yaml

from replicator.config import config_from_dict
from replicator.journal import Journal
from replicator.status import check_thresholds, compute_status, format_status, human_age
from tests.harness.journal import sql
from tests.harness.util import free_port

NOW = 1_700_000_000.0


def write_config(tmp_path: Path) -> tuple[dict, Path]:
    # Nothing listens on these ports: status must not need any registry.
    data = {
        "journal": str(tmp_path / "journal.db"),
        "sites": {
            n: {"url": f"http://127.0.0.1:{free_port()}", "insecure": True}
            for n in ("us-east", "eu-west", "ap-south")
        },
        "rules": [
            {"name": "apps", "from": "us-east", "to": ["eu-west", "ap-south"]},
            {"name": "db", "from": "eu-west", "to": ["ap-south"]},
        ],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return data, path


def seed(journal: Journal, now: float) -> None:
    def task(rule, target, state, created, source="us-east"):
        sql(
            journal,
            "INSERT INTO tasks(key, rule, action, source_site, target_site, repository, "
            "target_repository, tag, state, next_try, created_at, updated_at) "
            "VALUES (?, ?, 'copy', ?, ?, 'team/app', 'team/app', 'v1', ?, ?, ?, ?)",
            (f"{rule}|{target}|{created}", rule, source, target, state, created, created, created),
        )

    task("apps", "eu-west", "pending", now - 30)
    task("apps", "eu-west", "leased", now - 95)  # the oldest unreplicated change
    task("apps", "eu-west", "done", now - 4000)  # replicated: does not count
    task("apps", "eu-west", "dead", now - 5000)
    task("apps", "ap-south", "dead", now - 100)
    for rule, started, state, dry in (
        ("apps", now - 600, "done", 0),
        (None, now - 300, "failed", 0),
        ("apps", now - 10, "done", 1),
    ):  # dry runs don't count
        sql(
            journal,
            "INSERT INTO sync_runs(rule, started_at, finished_at, dry_run, state, result) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (rule, started, started + 5, dry, state, json.dumps({"copied": 3, "failed": 0})),
        )
    sql(
        journal,
        "INSERT INTO replicated(target_site, repository, digest, source_site, at) "
        "VALUES ('eu-west', 'team/app', 'sha256:aa', 'us-east', ?)",
        (now - 130,),
    )


def test_lag_pending_dead_and_last_run_per_rule_and_target(tmp_path):
    data, _ = write_config(tmp_path)
    config = config_from_dict(data)
    journal = Journal(config.journal)
    seed(journal, NOW)
    report = compute_status(config, asyncio.run(journal.status.rows()), now=NOW)
    journal.close()
    apps = report.rules[0]
    eu, ap = apps.targets
    assert (eu.target, eu.pending, eu.dead, eu.lag_seconds) == ("eu-west", 2, 1, 95)
    assert (ap.target, ap.pending, ap.dead, ap.lag_seconds) == ("ap-south", 0, 1, 0)
    assert eu.last_replicated_at == NOW - 130 and ap.last_replicated_at is None
    assert apps.last_run.state == "failed" and apps.last_run.rules is None
    assert apps.last_ok_run.started_at == NOW - 600
    db = report.rules[1]
    assert db.targets[0].pending == 0 and db.last_run.state == "failed"
    assert report.recovery_point_seconds == 95 and report.pending == 2 and report.dead == 2
    lines = format_status(report)
    assert (
        "  us-east -> eu-west: lag 1 min, 2 pending, 1 dead, last copy 2 min ago, "
        "last reconcile 4 min ago failed (last ok 9 min ago)"
    ) in lines
    assert lines[-1] == "recovery point: 1 min (2 changes pending, 2 dead letters)"


def test_active_failover_rewrites_what_is_shown(tmp_path):
    data, _ = write_config(tmp_path)
    config = config_from_dict(data)
    journal = Journal(config.journal)
    sql(
        journal,
        "INSERT INTO failovers(lost_site, promoted_site, started_at, active, detail)"
        " VALUES ('us-east', 'eu-west', ?, 1, ?)",
        (NOW - 120, json.dumps({"rules": [{"name": "apps"}]})),
    )
    sql(
        journal,
        "INSERT INTO failovers(lost_site, promoted_site, started_at, ended_at, "
        "active) VALUES ('eu-west', 'ap-south', 1, 2, 0)",
    )  # ended: ignored
    report = compute_status(config, asyncio.run(journal.status.rows()), now=NOW)
    journal.close()
    assert [(f.lost, f.promoted, f.rules) for f in report.failovers] == [
        ("us-east", "eu-west", ["apps"])
    ]
    apps = report.rules[0]
    assert (apps.source, apps.configured_source) == ("eu-west", "us-east")
    assert [(t.target, t.in_force) for t in apps.targets] == [
        ("ap-south", True),
        ("eu-west", False),
    ]
    lines = format_status(report)
    assert lines[0].startswith("FAILOVER active: eu-west replaces lost us-east since 2 min ago")
    assert "rule apps (configured from us-east):" in lines
    assert "  eu-west -> ap-south: lag 0 s, 0 pending, never reconciled" in lines


def test_human_age():
    assert [human_age(s) for s in (0, 59, 89, 90, 3599, 5400, 7200, 200000)] == [
        "0 s",
        "59 s",
        "89 s",
        "1 min",
        "59 min",
        "1 h",
        "2 h",
        "2 d",
    ]


def test_cli_status_json_and_text_without_any_registry(tmp_path):
    data, path = write_config(tmp_path)
    journal = Journal(data["journal"])
    import time

    seed(journal, time.time())
    journal.close()
    out = subprocess.run(
        [sys.executable, "-m", "replicator", "status", "-c", str(path), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    payload = json.loads(out.stdout)
    assert set(payload) == {
        "generated_at",
        "recovery_point_seconds",
        "pending",
        "dead",
        "failovers",
        "rules",
    }
    assert 90 <= payload["recovery_point_seconds"] < 120
    eu = payload["rules"][0]["targets"][0]
    assert eu["target"] == "eu-west" and eu["pending"] == 2 and eu["dead"] == 1
    text = subprocess.run(
        [sys.executable, "-m", "replicator", "status", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert text.returncode == 0 and "us-east -> eu-west: lag 1 min, 2 pending" in text.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "replicator", "status", "-c", str(tmp_path / "missing.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "missing.yaml" in bad.stderr


def test_thresholds_name_each_target_and_limit_exceeded(tmp_path):
    data, _ = write_config(tmp_path)
    config = config_from_dict(data)
    journal = Journal(config.journal)
    seed(journal, NOW)
    report = compute_status(config, asyncio.run(journal.status.rows()), now=NOW)
    journal.close()
    assert check_thresholds(report) == []
    assert check_thresholds(report, max_lag=120, max_dead=2) == []
    assert check_thresholds(report, max_lag=60, max_dead=1) == [
        "lag of rule apps us-east -> eu-west is 1 min (2 pending), above --max-lag 1m",
        "2 dead letters (apps -> eu-west: 1, apps -> ap-south: 1), above --max-dead 1",
    ]
    assert check_thresholds(report, max_dead=0)[0].startswith("2 dead letters")


def test_lag_of_a_lost_site_is_not_lag_while_failed_over(tmp_path):
    data, _ = write_config(tmp_path)
    config = config_from_dict(data)
    journal = Journal(config.journal)
    seed(journal, NOW)  # eu-west lags 95 s ...
    sql(
        journal,
        "INSERT INTO failovers(lost_site, promoted_site, started_at, active, detail)"
        " VALUES ('eu-west', 'ap-south', ?, 1, '{}')",
        (NOW - 60,),
    )  # ... but is lost: its backlog waits for failback
    report = compute_status(config, asyncio.run(journal.status.rows()), now=NOW)
    journal.close()
    assert check_thresholds(report, max_lag=60) == []


def test_after_a_failover_the_promoted_source_is_named_plainly(tmp_path):
    data, _ = write_config(tmp_path)
    data["sites"]["sa-east"] = {"url": data["sites"]["us-east"]["url"], "insecure": True}
    data["rules"] = [
        {"name": "apps", "from": "us-east", "to": ["eu-west", "ap-south", "sa-east"]},
        {"name": "db", "from": "eu-west", "to": ["ap-south", "sa-east"]},
    ]
    config = config_from_dict({**data, "timezone": "Europe/Berlin"})
    journal = Journal(config.journal)
    for lost, promoted, at in (("us-east", "eu-west", NOW - 120), ("eu-west", "ap-south", NOW)):
        sql(
            journal,
            "INSERT INTO failovers(lost_site, promoted_site, started_at, active, detail)"
            " VALUES (?, ?, ?, 1, '{}')",
            (lost, promoted, at),
        )
    report = compute_status(config, asyncio.run(journal.status.rows()), now=NOW)
    journal.close()
    apps, db = report.rules
    assert apps.source == db.source == "ap-south"  # a chain: us-east -> eu-west -> ap-south
    assert apps.promoted_by is not None and apps.promoted_by.lost == "eu-west"
    utc = format_status(report)
    assert (
        "  source of rule apps is ap-south (promoted after eu-west was lost at "
        "2023-11-14 22:13 UTC)" in utc
    )
    assert (
        "  source of rule db is ap-south (promoted after eu-west was lost at "
        "2023-11-14 22:13 UTC)" in utc
    )
    berlin = format_status(report, config.tzinfo)
    assert "(promoted after eu-west was lost at 2023-11-14 23:13 CET)" in berlin[3]


def test_one_failover_names_its_time_and_a_rule_not_moved_gets_no_line(tmp_path):
    data, _ = write_config(tmp_path)
    config = config_from_dict(data)
    journal = Journal(config.journal)
    sql(
        journal,
        "INSERT INTO failovers(lost_site, promoted_site, started_at, active, detail)"
        " VALUES ('us-east', 'eu-west', ?, 1, '{}')",
        (NOW - 120,),
    )
    lines = format_status(compute_status(config, asyncio.run(journal.status.rows()), now=NOW))
    journal.close()
    assert (
        "  source of rule apps is eu-west (promoted after us-east was lost at "
        "2023-11-14 22:11 UTC)" in lines
    )
    assert not any("source of rule db" in x for x in lines)


def test_cli_status_exits_1_naming_what_exceeded_for_cron_checks(tmp_path):
    import time

    data, path = write_config(tmp_path)
    journal = Journal(data["journal"])
    seed(journal, time.time())
    journal.close()

    def status(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "replicator", "status", "-c", str(path), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    ok = status("--max-lag", "10m", "--max-dead", "2")
    assert ok.returncode == 0 and ok.stderr == "", ok.stderr
    lagging = status("--max-lag", "1m")
    assert lagging.returncode == 1
    assert "us-east -> eu-west: lag 1 min" in lagging.stdout  # the report is still shown
    assert lagging.stderr.startswith(
        "registry-replicator: status: lag of rule apps us-east -> eu-west is 1 min"
    )
    dead = status("--max-dead", "0", "--json")
    assert dead.returncode == 1
    assert json.loads(dead.stdout)["exceeded"] == [
        "2 dead letters (apps -> eu-west: 1, apps -> ap-south: 1), above --max-dead 0"
    ]
    for bad in (("--max-lag", "10"), ("--max-dead", "-1")):
        out = status(*bad)
        assert out.returncode == 2 and bad[0] in out.stderr, out.stderr


def test_status_with_no_journal_says_so_and_creates_none(tmp_path, capsys):
    from replicator.cli import main

    journal = tmp_path / "nowhere" / "journal.db"
    (tmp_path / "nowhere").mkdir()
    config = tmp_path / "c.yaml"
    config.write_text(
        f"journal: {journal}\nsites:\n  a: {{url: 'http://127.0.0.1:9', insecure: true}}\n"
    )
    assert main(["status", "-c", str(config)]) == 2
    assert "no journal at" in capsys.readouterr().err
    assert not journal.exists()
