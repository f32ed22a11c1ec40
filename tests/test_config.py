"""Configuration: parsing, every kind of bad input, env overrides, secrets, and `check`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from replicator.cli import main
from replicator.config import Config, config_from_dict, load_config
from replicator.errors import ConfigError
from replicator.registry.site import SiteEndpoint
from tests.harness.registry import Registry, write_htpasswd
from tests.harness.util import free_port

GOOD = """\
journal: ./state/replicator.db
listen: 127.0.0.1:8500
mqtt: {url: mqtt://127.0.0.1:1883, topic: registry/events, client_id: eu-1, group: replicators}
sites:
  us-east:
    url: http://127.0.0.1:5001
    insecure: true
    auth: {username: ci, password_env: US_PASS}
    webhook_token_env: US_HOOK_TOKEN
    storage: /var/lib/registry
    registry_config: /etc/docker/registry/config.yml
    limits: {concurrency: 8, requests_per_second: 50}
  eu-west:
    url: https://eu.example.com/
    tls: {ca: certs/ca.pem, cert: certs/client.pem, key: certs/client.key}
    auth: {docker_config: true}
  ap-south:
    url: https://ap.example.com:8443
    auth: {username: robot, password_file: secrets/ap.pass}
    webhook_token_file: secrets/ap.hook
rules:
  - name: apps
    from: us-east
    to: [eu-west, ap-south]
    repositories: ["team/**"]
    exclude_repositories: ["team/tmp-*"]
    tags: {include: ["v*", "latest"], exclude: ["*-rc*"], semver: ">=1.2", latest: 5}
    platforms: [linux/amd64, linux/arm64]
    referrers: true
    deletes: false
    overwrite: true
    rename: {strip_prefix: "team/", prefix: "mirror/"}
    interval: 10m
  - name: back
    from: eu-west
    to: us-east
    schedule: "*/10 * * * *"
gc:
  schedule: "0 3 * * *"
  policies:
    - name: ci-cleanup
      sites: [us-east]
      repositories: ["ci/**"]
      exclude_repositories: []
      keep: {tags: ["v*", "latest"], most_recent: 10, pushed_within: 30d, pulled_within: null}
      untagged: delete
      referrers: follow-subject
      grace: 1h
      mode: api
telemetry: {otlp_endpoint: null, service_name: registry-replicator}
"""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for key in list(os.environ):
        if key.upper().startswith("REGISTRY_REPLICATOR_"):
            monkeypatch.delenv(key)


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def edited(change) -> str:
    """GOOD with `change(data)` applied, as YAML."""
    data = yaml.safe_load(GOOD)
    change(data)
    return yaml.safe_dump(data, sort_keys=False)


def problems_of(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert info.value.exit_code == 2
    return info.value


# ---- the good config --------------------------------------------------------------------------


def test_good_config_loads(tmp_path):
    config = load_config(write(tmp_path, GOOD))
    assert config.source_path == (tmp_path / "config.yaml").resolve()
    assert config.journal == tmp_path.resolve() / "state/replicator.db"
    assert (config.listen_host, config.listen_port) == ("127.0.0.1", 8500)
    assert config.mqtt.port == 1883 and config.mqtt.qos == 1 and config.mqtt.group == "replicators"
    us = config.sites["us-east"]
    assert us.name == "us-east" and us.limits.requests_per_second == 50
    eu = config.sites["eu-west"]
    assert eu.url == "https://eu.example.com"  # trailing slash dropped
    assert eu.tls.ca == tmp_path.resolve() / "certs/ca.pem"  # relative to the file, not cwd
    apps = config.rule("apps")
    assert apps.from_ == "us-east" and apps.to == ["eu-west", "ap-south"]
    assert apps.interval == 600 and apps.tags.latest == 5
    assert config.rule("back").to == ["us-east"]  # a single string becomes a list
    policy = config.policy("ci-cleanup")
    assert policy.keep.pushed_within == 30 * 86400 and policy.grace == 3600
    assert policy.keep.pulled_within is None
    assert config.warnings == []


def test_defaults_for_a_minimal_config(tmp_path):
    config = load_config(write(tmp_path, "sites: {a: {url: 'https://a.example'}}\n"))
    assert config.journal == tmp_path.resolve() / "replicator.db"
    assert config.listen == "127.0.0.1:8500"
    assert config.mqtt is None and config.rules == [] and config.gc.policies == []
    assert config.sites["a"].limits.concurrency == 8
    assert config.telemetry.service_name == "registry-replicator"


def test_round_trip(tmp_path):
    first = load_config(write(tmp_path, GOOD))
    dumped = yaml.safe_dump(first.to_dict())
    assert "10m" in dumped and "30d" in dumped  # durations keep their human form
    again = load_config(write(tmp_path, dumped, "again.yaml"))
    assert again.to_dict() == first.to_dict()


def test_config_from_dict(tmp_path):
    config = config_from_dict(yaml.safe_load(GOOD), base_dir=tmp_path)
    assert config.source_path is None
    assert config.journal == tmp_path.resolve() / "state/replicator.db"
    data = yaml.safe_load(GOOD)
    data["rules"][0]["to"] = ["eu-west", "mars"]
    with pytest.raises(ConfigError, match=r"rules\[0\]\.to\[1\]: unknown site 'mars'") as info:
        config_from_dict(data)
    assert info.value.path == "rules[0].to[1]"


def test_json_schema_describes_the_file():
    schema = Config.model_json_schema()
    assert {"journal", "listen", "mqtt", "sites", "rules", "gc", "telemetry"} <= set(
        schema["properties"]
    )
    rule = schema["$defs"]["Rule"]["properties"]
    assert "from" in rule and "from_" not in rule
    assert rule["interval"]["anyOf"][0]["pattern"]
    # refused inline secrets are not advertised
    assert "password" not in schema["$defs"]["AuthConfig"]["properties"]
    assert "webhook_token" not in schema["$defs"]["SiteConfig"]["properties"]


def test_config_schema_command_prints_json():
    out = subprocess.run(
        [sys.executable, "-m", "replicator", "config-schema"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    schema = json.loads(out)
    assert schema["title"] == "registry-replicator configuration"
    assert "sites" in schema["properties"]


# ---- bad configs: each names the YAML path -------------------------------------------------------


def _set(path: str, value):
    def change(data):
        node = data
        parts = path.split(".")
        for part in parts[:-1]:
            node = node[int(part)] if part.isdigit() else node[part]
        last = parts[-1]
        if last.isdigit():
            node[int(last)] = value
        else:
            node[last] = value

    return change


BAD_CASES = [
    # (change, expected path, expected words)
    (_set("rules.0.from", "us-est"), "rules[0].from", "unknown site 'us-est'"),
    (_set("rules.0.to", ["eu-west", "mars"]), "rules[0].to[1]", "unknown site 'mars'"),
    (_set("gc.policies.0.sites", ["venus"]), "gc.policies[0].sites[0]", "unknown site"),
    (_set("rules.0.repositories", ["Team/**"]), "rules[0].repositories[0]", "lower-case"),
    (
        _set("rules.0.exclude_repositories", ["team**"]),
        "rules[0].exclude_repositories[0]",
        "whole path segment",
    ),
    (_set("rules.0.tags.exclude", ["v[1"]), "rules[0].tags.exclude[0]", "']'"),
    (_set("rules.0.tags.semver", ">=1.2 <<2"), "rules[0].tags.semver", "invalid version"),
    (_set("rules.0.tags.semver", "banana"), "rules[0].tags.semver", "banana"),
    (_set("gc.schedule", "61 * * * *"), "gc.schedule", "cron"),
    (_set("rules.1.schedule", "every day"), "rules[1].schedule", "cron"),
    (_set("rules.0.interval", "10 minutes"), "rules[0].interval", "duration"),
    (_set("rules.0.interval", 10), "rules[0].interval", "needs a unit"),
    (_set("rules.0.interval", "0s"), "rules[0].interval", "longer than 0s"),
    (_set("gc.policies.0.grace", "1y"), "gc.policies[0].grace", "duration"),
    (
        _set("gc.policies.0.keep.pushed_within", "soon"),
        "gc.policies[0].keep.pushed_within",
        "duration",
    ),
    (_set("rules.1.interval", "5m"), "rules[1]", "mutually exclusive"),
    (_set("rules.0.to", ["eu-west", "us-east"]), "rules[0].to[1]", "onto itself"),
    (_set("rules.0.to", ["eu-west", "eu-west"]), "rules[0].to[1]", "listed twice"),
    (_set("rules.1.name", "apps"), "rules[1].name", "duplicate rule name 'apps'"),
    (
        lambda d: d["gc"]["policies"].append(dict(d["gc"]["policies"][0])),
        "gc.policies[1].name",
        "duplicate policy name",
    ),
    (
        _set("sites.us-east.auth", {"username": "ci", "password": "hunter2"}),
        "sites.us-east.auth.password",
        "password_env or password_file",
    ),
    (
        _set("sites.us-east.webhook_token", "hunter2"),
        "sites.us-east.webhook_token",
        "webhook_token_env",
    ),
    (_set("mqtt.password", "hunter2"), "mqtt.password", "password_env"),
    (
        _set("sites.us-east.auth", {"username": "ci", "password_env": "P", "password_file": "f"}),
        "sites.us-east.auth",
        "not both",
    ),
    (_set("sites.ap-south.webhook_token_env", "HOOK"), "sites.ap-south", "not both"),
    (_set("sites.us-east.auth", {"password_env": "P"}), "sites.us-east.auth", "needs a username"),
    (_set("sites.us-east.auth", {"username": "ci"}), "sites.us-east.auth", "without password"),
    (
        _set("sites.us-east.auth.password_env", "US-PASS"),
        "sites.us-east.auth.password_env",
        "environment variable name",
    ),
    (_set("sites.us-east.url", "ftp://x"), "sites.us-east.url", "http(s)://host"),
    (_set("sites.us-east.url", "127.0.0.1:5000"), "sites.us-east.url", "registry URL"),
    (_set("sites.us-east.url", "https://r.example/v2/"), "sites.us-east.url", "/v2/"),
    (_set("sites.us-east.url", "https://r.example:99999"), "sites.us-east.url", "bad port"),
    (_set("sites.us-east.insecure", False), "sites.us-east", "insecure: true"),
    (_set("mqtt.url", "http://broker"), "mqtt.url", "MQTT URL"),
    (_set("telemetry.otlp_endpoint", "collector:4318"), "telemetry.otlp_endpoint", "URL"),
    (_set("listen", "8500"), "listen", "host:port"),
    (
        _set("rules.0.platforms", ["linux/amd64", "linux"]),
        "rules[0].platforms[1]",
        "os/arch[/variant]",
    ),
    (_set("rules.0.intreval", "10m"), "rules[0].intreval", "did you mean 'interval'"),
    (
        _set("sites.us-east.limits.concurrency", 0),
        "sites.us-east.limits.concurrency",
        "greater than or equal to 1",
    ),
    (
        lambda d: d["gc"]["policies"][0].update(mode="storage", sites=["eu-west"]),
        "gc.policies[0].mode",
        "sites.eu-west.storage",
    ),
    (_set("gc.policies.0.untagged", "purge"), "gc.policies[0].untagged", "'delete' or 'keep'"),
    (_set("rules.0.rename", {"prefix": "Mirror"}), "rules[0].rename.prefix", "prefix"),
    (_set("sites.bad name", {"url": "https://x.example"}), "sites.bad name", "invalid name"),
    (_set("sites", {}), "sites", "at least 1"),
    (lambda d: d.pop("sites"), "sites", "required"),
    (_set("rules.0.to", []), "rules[0].to", "at least 1"),
]


@pytest.mark.parametrize("change,path,words", BAD_CASES, ids=[c[1] + ":" + c[2] for c in BAD_CASES])
def test_bad_config_names_the_field(tmp_path, change, path, words):
    err = problems_of(tmp_path, edited(change))
    text = str(err)
    matching = [line for line in text.splitlines() if line.strip().startswith(path)]
    assert matching, f"no line for {path}:\n{text}"
    assert any(words in line for line in matching), text
    assert any(p == path for p, _ in err.problems), err.problems
    assert "hunter2" not in text
    if path != "sites":  # a missing top-level key has no line
        assert "(line " in matching[0]


def test_all_problems_reported_at_once(tmp_path):
    def change(d):
        d["rules"][0]["from"] = "nowhere"
        d["rules"][0]["tags"]["semver"] = "nope"
        d["rules"][0]["intreval"] = "10m"
        d["gc"]["policies"][0]["grace"] = "1y"
        d["sites"]["us-east"]["auth"]["password"] = "hunter2"

    err = problems_of(tmp_path, edited(change))
    paths = {p for p, _ in err.problems}
    assert paths == {
        "rules[0].from",
        "rules[0].tags.semver",
        "rules[0].intreval",
        "gc.policies[0].grace",
        "sites.us-east.auth.password",
    }
    assert "5 problems" in str(err)
    assert len(str(err).splitlines()) == 6
    assert err.path in paths


def test_yaml_line_numbers_point_at_the_field(tmp_path):
    err = problems_of(tmp_path, GOOD.replace("interval: 10m", "interval: 10q"))
    line = GOOD.splitlines().index("    interval: 10m") + 1
    assert f"rules[0].interval (line {line})" in str(err)


def test_yaml_syntax_error_gives_line_without_echoing_content(tmp_path):
    text = (
        "sites:\n  a:\n    url: https://a.example\n    auth: {username: x, password_env: [hunter2\n"
    )
    err = problems_of(tmp_path, text)
    assert "YAML syntax error" in str(err)
    assert "config.yaml:5:1:" in str(err)  # where the parser noticed (end of the open list)
    assert "hunter2" not in str(err)
    err = problems_of(tmp_path, "sites:\n  a: {url: https://a.example}\n\tbad: 1\n")
    assert "config.yaml:3:1: YAML syntax error" in str(err)


def test_duplicate_yaml_keys_are_refused(tmp_path):
    text = "sites:\n  a: {url: 'https://a.example'}\n  a: {url: 'https://b.example'}\n"
    err = problems_of(tmp_path, text)
    assert "sites.a (line 3): duplicate key" in str(err)


@pytest.mark.parametrize(
    "text,words",
    [
        ("", "is empty"),
        ("# only a comment\n", "is empty"),
        ("- a\n- b\n", "mapping at the top level"),
        ("just text\n", "mapping at the top level"),
    ],
)
def test_empty_or_wrong_shape(tmp_path, text, words):
    assert words in str(problems_of(tmp_path, text))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="directory"):
        load_config(tmp_path)


def test_url_with_credentials_is_refused_without_echoing_them(tmp_path):
    err = problems_of(tmp_path, edited(_set("sites.eu-west.url", "https://u:hunter2@r.example")))
    assert "sites.eu-west.url" in str(err) and "hunter2" not in str(err)


# ---- through the CLI (subprocess): exit 2, message on stderr ---------------------------------


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "replicator", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


@pytest.mark.parametrize(
    "change,path",
    [
        (_set("rules.0.to", ["eu-west", "mars"]), "rules[0].to[1]"),
        (
            _set("sites.us-east.auth", {"username": "ci", "password": "hunter2"}),
            "sites.us-east.auth.password",
        ),
        (_set("rules.0.tags.semver", "=>1"), "rules[0].tags.semver"),
    ],
)
def test_check_offline_bad_config_exits_2(tmp_path, change, path):
    cfg = write(tmp_path, edited(change))
    proc = run_cli("check", "-c", str(cfg), "--offline")
    assert proc.returncode == 2, proc.stderr
    assert path in proc.stderr and "hunter2" not in proc.stderr + proc.stdout
    assert proc.stdout == ""


def test_check_offline_good_config(tmp_path):
    cfg = write(tmp_path, GOOD)
    proc = run_cli("check", "-c", str(cfg), "--offline")
    assert proc.returncode == 0, proc.stderr
    assert "valid (3 sites, 2 rules, 1 GC policy)" in proc.stdout
    proc = run_cli("check", "-c", str(tmp_path / "missing.yaml"), "--offline")
    assert proc.returncode == 2 and "not found" in proc.stderr


def test_check_offline_json(tmp_path, capsys):
    cfg = write(tmp_path, edited(_set("rules.0.from", "mars")))
    assert main(["check", "-c", str(cfg), "--offline", "--json"]) == 2
    out = json.loads(capsys.readouterr().out)
    assert out["valid"] is False and out["errors"][0]["path"] == "rules[0].from"


def test_check_help_explains():
    out = run_cli("check", "--help").stdout
    assert "--offline" in out and "Exit codes" in out and "GET /v2/" in out


# ---- check --offline refuses what `run` refuses ------------------------------------------------


def mqtt_config(tmp_path: Path, **mqtt) -> Path:
    data = {
        "journal": "journal.db",
        "listen": f"127.0.0.1:{free_port()}",
        "mqtt": {"url": "mqtt://127.0.0.1:1883", "client_id": "eu-1", **mqtt},
        "sites": {"a": {"url": "https://a.example"}},
    }
    return write(tmp_path, yaml.safe_dump(data))


RUN_REFUSES = [
    ({"url": "ws://127.0.0.1:9001"}, "mqtt.url", "mqtt://"),
    ({"url": "wss://broker.example"}, "mqtt.url", "mqtt://"),
    ({"qos": 0}, "mqtt.qos", "QoS 0"),
    ({"topic": "events/+"}, "mqtt.topic", "'+'"),
    ({"topic": "events/#"}, "mqtt.topic", "'#'"),
    ({"topic": "$SYS/events"}, "mqtt.topic", "'$'"),
    ({"topic": "/"}, "mqtt.topic", "non-empty"),
    ({"client_id": "x" * 129}, "mqtt.client_id", "128"),
    ({"client_id": ""}, "mqtt.client_id", "128"),
    ({"group": "a\0b"}, "mqtt.group", "invalid group"),
]


@pytest.mark.parametrize(
    "mqtt,path,words", RUN_REFUSES, ids=[f"{p}:{w}" for _, p, w in RUN_REFUSES]
)
def test_check_offline_and_run_refuse_the_same_mqtt_settings(tmp_path, mqtt, path, words):
    cfg = mqtt_config(tmp_path, **mqtt)
    for argv in (["check", "--offline"], ["run"]):
        proc = run_cli(*argv, "-c", str(cfg))
        assert proc.returncode == 2, (argv, proc.stderr)
        line = next((ln for ln in proc.stderr.splitlines() if ln.strip().startswith(path)), "")
        assert "(line " in line and words in line, (argv, proc.stderr)
    assert not (tmp_path / "journal.db").exists()  # refused before anything started


def test_qos_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("REGISTRY_REPLICATOR_MQTT__QOS", "2")
    assert load_config(mqtt_config(tmp_path)).mqtt.qos == 2
    monkeypatch.setenv("REGISTRY_REPLICATOR_MQTT__QOS", "0")
    line = problem_line(problems_of(tmp_path, mqtt_config(tmp_path).read_text()), "mqtt.qos")
    assert "REGISTRY_REPLICATOR_MQTT__QOS" in line and "QoS 0" in line


def test_good_mqtt_settings_pass_offline_check(tmp_path):
    for mqtt in ({"qos": 2, "topic": "/registry/events/", "group": "g"}, {"url": "mqtts://b:8883"}):
        proc = run_cli("check", "--offline", "-c", str(mqtt_config(tmp_path, **mqtt)))
        assert proc.returncode == 0, proc.stderr


# ---- environment overrides ---------------------------------------------------------------------


def test_env_overrides_win_over_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("REGISTRY_REPLICATOR_LISTEN", "0.0.0.0:9000")
    monkeypatch.setenv("REGISTRY_REPLICATOR_SITES__US_EAST__URL", "http://10.0.0.1:5000")
    monkeypatch.setenv("registry_replicator_sites__eu_west__limits__concurrency", "3")
    monkeypatch.setenv("REGISTRY_REPLICATOR_GC__SCHEDULE", "0 4 * * *")
    monkeypatch.setenv("REGISTRY_REPLICATOR_JOURNAL", "other.db")
    config = load_config(write(tmp_path, GOOD))
    assert config.listen_port == 9000
    assert config.sites["us-east"].url == "http://10.0.0.1:5000"
    assert config.sites["us-east"].auth.username == "ci"  # rest of the site kept
    assert config.sites["eu-west"].limits.concurrency == 3
    assert config.gc.schedule == "0 4 * * *"
    assert config.journal == tmp_path.resolve() / "other.db"
    assert list(config.sites) == ["us-east", "eu-west", "ap-south"]  # no phantom "us_east"


def test_env_can_replace_a_whole_list_as_json(tmp_path, monkeypatch):
    monkeypatch.setenv(
        "REGISTRY_REPLICATOR_RULES",
        json.dumps([{"name": "only", "from": "eu-west", "to": ["ap-south"]}]),
    )
    config = load_config(write(tmp_path, GOOD))
    assert [r.name for r in config.rules] == ["only"]


def test_env_can_edit_one_list_item(tmp_path, monkeypatch):
    monkeypatch.setenv("REGISTRY_REPLICATOR_RULES__0__INTERVAL", "5m")
    monkeypatch.setenv("REGISTRY_REPLICATOR_RULES__0__TO", '["eu-west"]')
    monkeypatch.setenv("REGISTRY_REPLICATOR_GC__POLICIES__0__KEEP__MOST_RECENT", "3")
    config = load_config(write(tmp_path, GOOD))
    apps = config.rules[0]
    assert (apps.name, apps.interval, apps.to) == ("apps", 300, ["eu-west"])
    assert apps.tags.latest == 5  # the rest of the item is kept
    assert config.rules[1].name == "back"
    keep = config.gc.policies[0].keep
    assert keep.most_recent == 3 and keep.tags == ["v*", "latest"]


def test_env_can_add_a_site(tmp_path, monkeypatch):
    monkeypatch.setenv("REGISTRY_REPLICATOR_SITES__NEW__URL", "https://new.example")
    config = load_config(write(tmp_path, GOOD))
    assert config.sites["new"].url == "https://new.example"


def test_bad_env_value_is_reported_at_its_path(tmp_path, monkeypatch):
    monkeypatch.setenv("REGISTRY_REPLICATOR_SITES__US_EAST__LIMITS__CONCURRENCY", "many")
    err = problems_of(tmp_path, GOOD)
    assert "sites.us-east.limits.concurrency" in str(err)


def test_env_override_through_cli(tmp_path):
    cfg = write(tmp_path, GOOD)
    proc = run_cli(
        "check", "-c", str(cfg), "--offline", env={"REGISTRY_REPLICATOR_LISTEN": "nonsense"}
    )
    assert proc.returncode == 2 and "listen" in proc.stderr


def test_unknown_env_variable_is_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("REGISTRY_REPLICATOR_LISTN", "0.0.0.0:1")
    config = load_config(write(tmp_path, GOOD))
    assert any("REGISTRY_REPLICATOR_LISTN" in w for w in config.warnings)
    assert config.listen == "127.0.0.1:8500"


def problem_line(err: ConfigError, path: str) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip().startswith(path)]
    assert lines, f"no line for {path}:\n{err}"
    return lines[0]


def test_a_bad_env_value_names_the_variable_not_a_line(tmp_path, monkeypatch):
    monkeypatch.setenv("REGISTRY_REPLICATOR_LISTEN", "bad")
    monkeypatch.setenv("REGISTRY_REPLICATOR_RULES__0__FROM", "mars")
    monkeypatch.setenv("REGISTRY_REPLICATOR_SITES__US_EAST__AUTH__PASSWORD", "hunter2")
    err = problems_of(tmp_path, GOOD)
    assert problem_line(err, "listen").startswith(
        "listen (environment variable REGISTRY_REPLICATOR_LISTEN): invalid listen address"
    )
    assert problem_line(err, "rules[0].from").startswith(
        "rules[0].from (environment variable REGISTRY_REPLICATOR_RULES__0__FROM): unknown site"
    )
    line = problem_line(err, "sites.us-east.auth.password")
    assert "REGISTRY_REPLICATOR_SITES__US_EAST__AUTH__PASSWORD" in line and "(line " not in line
    assert "hunter2" not in str(err)
    assert "(line " not in str(err)  # every value at fault came from the environment


def test_a_problem_mixing_file_and_env_names_both(tmp_path, monkeypatch):
    monkeypatch.setenv("REGISTRY_REPLICATOR_RULES__1__INTERVAL", "5m")  # rules[1] has a schedule
    err = problems_of(tmp_path, GOOD)
    line = GOOD.splitlines().index("  - name: back") + 1
    assert problem_line(err, "rules[1]") == (
        f"rules[1] (line {line}, environment variable REGISTRY_REPLICATOR_RULES__1__INTERVAL): "
        "interval and schedule are mutually exclusive: give one"
    )


def test_a_site_added_from_env_is_blamed_on_its_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("REGISTRY_REPLICATOR_SITES__NEW__INSECURE", "true")
    err = problems_of(tmp_path, GOOD)
    assert problem_line(err, "sites.new.url") == (
        "sites.new.url (environment variable REGISTRY_REPLICATOR_SITES__NEW__INSECURE): "
        "required, but missing"
    )


@pytest.mark.parametrize(
    "name,value,path,words",
    [
        ("REGISTRY_REPLICATOR_RULES", "[{bad", "rules", "not valid JSON"),
        ("REGISTRY_REPLICATOR_SITES__US_EAST__LIMITS", "{x", "sites.us-east.limits", "JSON"),
        ("REGISTRY_REPLICATOR_RULES__5__INTERVAL", "5m", "rules[5]", "no item 5 (it has 2"),
        ("REGISTRY_REPLICATOR_RULES__APPS__INTERVAL", "5m", "rules", "address an item by"),
    ],
)
def test_an_env_override_that_cannot_apply_is_a_problem(
    tmp_path, monkeypatch, name, value, path, words
):
    monkeypatch.setenv(name, value)
    err = problems_of(tmp_path, GOOD)  # a ConfigError, not a crash
    line = problem_line(err, path)
    assert line.startswith(f"{path} (environment variable {name}): ") and words in line, line
    assert err.path == path


def test_env_problems_through_cli(tmp_path):
    cfg = write(tmp_path, GOOD)
    for env, words in [
        ({"REGISTRY_REPLICATOR_LISTEN": "nonsense"}, "REGISTRY_REPLICATOR_LISTEN"),
        ({"REGISTRY_REPLICATOR_RULES": "[oops"}, "not valid JSON"),
    ]:
        proc = run_cli("check", "-c", str(cfg), "--offline", env=env)
        assert proc.returncode == 2, proc.stderr
        assert words in proc.stderr and "internal error" not in proc.stderr, proc.stderr


def test_a_config_built_in_code_reads_no_environment(monkeypatch):
    monkeypatch.setenv("REGISTRY_REPLICATOR_LISTEN", "0.0.0.0:9000")
    config = Config(sites={"a": {"url": "https://a.example"}})
    assert config.listen == "127.0.0.1:8500"
    assert config_from_dict({"sites": {"a": {"url": "https://a.example"}}}).listen_port == 9000
    with pytest.raises(ValueError, match="unknown site 'b'"):  # still checked across sections
        Config(
            sites={"a": {"url": "https://a.example"}}, rules=[{"name": "r", "from": "a", "to": "b"}]
        )


def test_config_path_from_env(tmp_path):
    cfg = write(tmp_path, GOOD)
    proc = run_cli("check", "--offline", env={"REGISTRY_REPLICATOR_CONFIG": str(cfg)})
    assert proc.returncode == 0, proc.stderr


# ---- secrets: read at call time, never echoed ---------------------------------------------------


def test_site_endpoint_reads_secrets_now(tmp_path, monkeypatch):
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets/ap.pass").write_text("file-secret\n")
    (tmp_path / "secrets/ap.hook").write_text("hook-secret")
    config = load_config(write(tmp_path, GOOD))
    monkeypatch.setenv("US_PASS", "env-secret")
    monkeypatch.setenv("US_HOOK_TOKEN", "hook-env")
    us = SiteEndpoint.from_config(config, "us-east")
    assert (us.name, us.url, us.insecure) == ("us-east", "http://127.0.0.1:5001", True)
    assert (us.credentials.username, us.credentials.password) == ("ci", "env-secret")
    assert (us.concurrency, us.requests_per_second) == (8, 50)
    assert "env-secret" not in repr(us)
    ap = SiteEndpoint.from_config(config, "ap-south")
    assert ap.credentials.password == "file-secret"  # trailing newline dropped
    assert config.sites["ap-south"].webhook_token() == "hook-secret"
    assert config.sites["us-east"].webhook_token() == "hook-env"
    assert config.sites["eu-west"].webhook_token() is None


def test_tls_and_docker_config_reach_the_endpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "dockercfg"))
    config = load_config(write(tmp_path, GOOD))
    eu = SiteEndpoint.from_config(config, "eu-west")
    base = tmp_path.resolve()
    assert eu.ca_file == str(base / "certs/ca.pem")
    assert (eu.cert_file, eu.key_file) == (
        str(base / "certs/client.pem"),
        str(base / "certs/client.key"),
    )
    assert eu.credentials is None
    assert eu.docker_config == str(tmp_path / "dockercfg/config.json")


def test_missing_secrets_name_the_source_not_the_value(tmp_path, monkeypatch):
    config = load_config(write(tmp_path, GOOD))
    monkeypatch.delenv("US_PASS", raising=False)
    with pytest.raises(ConfigError, match="US_PASS is not set") as info:
        SiteEndpoint.from_config(config, "us-east")
    assert info.value.path == "sites.us-east.auth.password_env"
    monkeypatch.setenv("US_PASS", "")
    with pytest.raises(ConfigError, match="US_PASS is empty"):
        SiteEndpoint.from_config(config, "us-east")
    with pytest.raises(ConfigError, match=r"ap\.pass") as info:
        SiteEndpoint.from_config(config, "ap-south")
    assert info.value.path == "sites.ap-south.auth.password_file"
    with pytest.raises(ConfigError, match="unknown site 'nope'"):
        SiteEndpoint.from_config(config, "nope")


def test_blank_secrets_are_refused_naming_the_source(tmp_path, monkeypatch):
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets/ap.pass").write_text("  \n")
    config = load_config(write(tmp_path, GOOD))
    monkeypatch.setenv("US_PASS", " \t ")
    with pytest.raises(ConfigError, match="US_PASS is blank") as info:
        SiteEndpoint.from_config(config, "us-east")
    assert info.value.path == "sites.us-east.auth.password_env"
    with pytest.raises(ConfigError, match=r"ap\.pass is blank"):
        SiteEndpoint.from_config(config, "ap-south")


def webhook_config(tmp_path: Path) -> Path:
    data = {
        "journal": "journal.db",
        "listen": f"127.0.0.1:{free_port()}",
        "sites": {"a": {"url": "https://a.example", "webhook_token_env": "A_HOOK"}},
    }
    return write(tmp_path, yaml.safe_dump(data))


@pytest.mark.parametrize("token,words", [(None, "A_HOOK is not set"), ("  ", "A_HOOK is blank")])
def test_check_and_run_refuse_the_same_missing_webhook_token(tmp_path, token, words):
    cfg = webhook_config(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "A_HOOK"}
    if token is not None:
        env["A_HOOK"] = token
    offline = subprocess.run(
        [sys.executable, "-m", "replicator", "check", "--offline", "-c", str(cfg)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert offline.returncode == 0, offline.stderr  # secrets are not read offline
    for argv in (["check"], ["run"]):
        proc = subprocess.run(
            [sys.executable, "-m", "replicator", *argv, "-c", str(cfg)],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert proc.returncode == 2, (argv, proc.stderr)
        assert "sites.a.webhook_token_env" in proc.stderr and words in proc.stderr, proc.stderr
        assert "internal error" not in proc.stderr


def test_mqtt_password_from_file(tmp_path):
    (tmp_path / "mqtt.pass").write_text("mq-secret\n")
    text = edited(lambda d: d["mqtt"].update(username="bus", password_file="mqtt.pass"))
    config = load_config(write(tmp_path, text))
    assert config.mqtt.password() == "mq-secret"
    assert "mq-secret" not in repr(config) + json.dumps(config.to_dict())


# ---- check against real registries --------------------------------------------------------------


def site_yaml(sites: dict[str, str], auth: dict | None = None) -> str:
    data = {"sites": {name: {"url": url, "insecure": True} for name, url in sites.items()}}
    if auth:
        for name, a in auth.items():
            data["sites"][name]["auth"] = a
    return yaml.safe_dump(data)


def test_check_reports_ok_and_failed(tmp_path, registry, capsys):
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = write(tmp_path, site_yaml({"live": registry.url, "dead": dead}))
    assert main(["check", "-c", str(cfg), "--timeout", "5"]) == 1
    lines = capsys.readouterr().out.splitlines()
    live = next(line for line in lines if line.startswith("live"))
    assert live.split() == ["live", "ok", registry.url]
    failed = next(line for line in lines if line.startswith("dead"))
    assert failed.split()[1] == "FAILED" and dead in failed


def test_check_all_ok_exits_0_and_json(tmp_path, registry, capsys):
    cfg = write(tmp_path, site_yaml({"live": registry.url}))
    assert main(["check", "-c", str(cfg), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sites"] == [{"name": "live", "url": registry.url, "ok": True, "error": None}]


def test_check_uses_credentials(tmp_path, registry_factory, capsys, monkeypatch):
    htpasswd = write_htpasswd(tmp_path / "htpasswd", {"ci": "right-pass"})
    reg: Registry = registry_factory("auth", htpasswd=htpasswd)
    (tmp_path / "good.pass").write_text("right-pass\n")
    monkeypatch.setenv("WRONG_PASS", "wrong-pass")
    cfg = write(
        tmp_path,
        site_yaml(
            {"good": reg.url, "bad": reg.url, "anon": reg.url},
            {
                "good": {"username": "ci", "password_file": "good.pass"},
                "bad": {"username": "ci", "password_env": "WRONG_PASS"},
            },
        ),
    )
    assert main(["check", "-c", str(cfg)]) == 1
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert lines["good"].split()[1] == "ok"
    assert lines["bad"].split()[1] == "FAILED" and lines["anon"].split()[1] == "FAILED"
    assert "wrong-pass" not in out and "right-pass" not in out


@pytest.mark.parametrize(
    ("section", "path"),
    [
        ({"sites": {"a": {"url": "u:hunter2@a.example"}}}, "sites.a.url"),
        ({"sites": {"a": {"url": "https://a.example/v2?token=hunter2"}}}, "sites.a.url"),
        ({"mqtt": {"url": "u:hunter2@broker", "topic": "t"}}, "mqtt.url"),
        ({"telemetry": {"otlp_endpoint": "grpc://u:hunter2@collector:4317"}}, "otlp_endpoint"),
        ({"telemetry": {"otlp_endpoint": "u:hunter2@collector"}}, "otlp_endpoint"),
    ],
)
def test_a_refused_url_never_echoes_a_password_it_may_carry(section, path):
    """`check` and `run` print these errors (and a unit's journal keeps them): a URL
    with the scheme forgotten or a token in its query must not be shown whole."""
    from replicator.config import config_from_dict

    base = {"sites": {"b": {"url": "https://b.example"}}}
    with pytest.raises(ConfigError) as err:
        config_from_dict(
            {**base, **section, "sites": {**base["sites"], **section.get("sites", {})}}
        )
    assert path in str(err.value) and "hunter2" not in str(err.value)


def test_a_bad_tag_regex_is_refused_with_its_path_and_line(tmp_path):
    err = problems_of(
        tmp_path,
        """
        sites:
          a: {url: "https://a.example"}
          b: {url: "https://b.example"}
        rules:
          - name: r
            from: a
            to: [b]
            tags:
              regex: ['^v(\\d+']
        """,
    )
    assert "rules[0].tags.regex[0] (line 10)" in str(err)
    assert "invalid regular expression" in str(err) and "missing )" in str(err)
