"""The monitoring examples work against what the daemon really exports: the alert rules
pass promtool's checks and unit tests, every dashboard query parses, and every metric
they name is in a running daemon's /metrics (with the series there from the start)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from tests.harness.daemon import DaemonProcess, site_config

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "examples" / "monitoring" / "prometheus-alerts.yaml"
DASHBOARD = ROOT / "examples" / "monitoring" / "grafana-dashboard.json"
ALERT_TESTS = ROOT / "tests" / "data" / "prometheus-alerts-test.yaml"
METRIC = re.compile(r"\b(registry_replicator_[a-z_]+|process_[a-z_]+)\b")

promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed"
)


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)


def _dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in doc["panels"] for t in p["targets"]]


def _alert_exprs() -> list[str]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r["expr"] for g in doc["groups"] for r in g["rules"]]


@promtool
def test_alert_rules_pass_promtool_check_and_unit_tests(tmp_path):
    out = _promtool("check", "rules", str(ALERTS))
    assert out.returncode == 0, out.stdout + out.stderr
    tests = tmp_path / "alerts-test.yaml"
    tests.write_text(ALERT_TESTS.read_text().replace("ALERTS_FILE", str(ALERTS)))
    out = _promtool("test", "rules", str(tests))
    assert out.returncode == 0, out.stdout + out.stderr


@promtool
def test_every_dashboard_query_parses(tmp_path):
    """promtool parses PromQL when checking rules: each panel query becomes a recording
    rule (Grafana's $variables replaced by what they select at 'All')."""
    exprs = _dashboard_exprs()
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:panel_{i}", "expr": e.replace("$instance", ".*")}
                    for i, e in enumerate(exprs)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    out = _promtool("check", "rules", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"{len(exprs)} rules found" in out.stdout


def test_dashboard_is_importable_json():
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] and doc["title"] and doc["schemaVersion"] >= 30
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids)) and all(p["targets"] for p in doc["panels"])
    assert {v["name"] for v in doc["templating"]["list"]} == {"datasource", "instance"}


def test_every_metric_they_name_is_exported_from_the_start(tmp_path, registry_factory, daemons):
    """A daemon that has done nothing yet already exports every series the alerts and
    the dashboard read (counters at 0 for each configured site, rule and target)."""
    a, b = registry_factory("a"), registry_factory("b")
    daemon = DaemonProcess(
        tmp_path,
        {
            "sites": {"a": site_config(a), "b": site_config(b)},
            "rules": [{"name": "apps", "from": "a", "to": ["b"], "repositories": ["**"]}],
        },
    )
    daemons.append(daemon.start())
    text = httpx.get(f"{daemon.url}/metrics", timeout=5).text
    exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}
    named = {name for expr in _alert_exprs() + _dashboard_exprs() for name in METRIC.findall(expr)}
    assert named, "no metric names found in the examples"
    # histograms are referenced by their _bucket series
    missing = sorted(n for n in named if n not in exported)
    assert missing == [], missing
    for series in (
        'registry_replicator_replication_lag_seconds{rule="apps",target="b"} 0.0',
        'registry_replicator_dead_letters_total{rule="apps",target="b"} 0.0',
        'registry_replicator_gc_runs_total{outcome="failed",site="b"} 0.0',
        "registry_replicator_bus_connected 1.0",
    ):
        assert series in text, series
    assert 'registry_replicator_build_info{python_version="' in text


@promtool
def test_exposition_passes_promtool_lint(tmp_path, registry_factory, daemons):
    a, b = registry_factory("a"), registry_factory("b")
    daemon = DaemonProcess(
        tmp_path,
        {
            "sites": {"a": site_config(a), "b": site_config(b)},
            "rules": [{"name": "apps", "from": "a", "to": ["b"], "repositories": ["**"]}],
        },
    )
    daemons.append(daemon.start())
    text = httpx.get(f"{daemon.url}/metrics", timeout=5).text
    out = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    problems = [
        line
        for line in (out.stdout + out.stderr).splitlines()
        if line.startswith("registry_replicator_")
    ]
    assert problems == [], problems
