"""The example configurations: each passes `registry-replicator check --offline`, keeps
its secrets out of the file, means what its comments say, and every command its
comments tell an operator to run is one the CLI accepts."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from itertools import permutations
from pathlib import Path

import pytest
import yaml

from replicator.cli import build_parser
from replicator.commands import COMMAND_MODULES
from replicator.config import ENV_PREFIX, load_config

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
OURS = [
    "hub-and-spoke.yaml",
    "dr-pair.yaml",
    "mesh.yaml",
    "ci-cleanup.yaml",
    "mqtt-fanout.yaml",
    "mqtt-fanout-2.yaml",
]
ALL = sorted(p.name for p in EXAMPLES.glob("*.yaml"))
SECRET_WORDS = re.compile(r"password|token|secret|credential", re.IGNORECASE)


def clean_env() -> dict[str, str]:
    """No REGISTRY_REPLICATOR_* overrides and none of the examples' secrets."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.upper().startswith(ENV_PREFIX) and not SECRET_WORDS.search(k)
    }


def test_every_promised_example_exists():
    assert set(OURS) <= set(ALL), sorted(set(OURS) - set(ALL))


@pytest.mark.parametrize("name", ALL)
def test_example_passes_offline_check(name):
    result = subprocess.run(
        [sys.executable, "-m", "replicator", "check", "-c", str(EXAMPLES / name), "--offline"],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert ": valid (" in result.stdout
    assert "warning" not in result.stderr


def walk(node, path=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield (*path, key), key, value
            yield from walk(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, (*path, i))


@pytest.mark.parametrize("name", OURS)
def test_secrets_only_by_reference_and_realistic_urls(name):
    data = yaml.safe_load((EXAMPLES / name).read_text())
    for path, key, value in walk(data):
        if SECRET_WORDS.search(str(key)):
            assert str(key).endswith(("_env", "_file")), f"{name}: {path} holds a secret"
            if str(key).endswith("_env"):
                assert re.fullmatch(r"[A-Z][A-Z0-9_]*", value), f"{name}: {path}={value}"
    for name_, site in data["sites"].items():
        assert site["url"].startswith("https://"), f"{name}: site {name_} is not https"
        assert not site.get("insecure"), name_
    config = load_config(EXAMPLES / name)
    # the systemd unit lets the daemon write only below /var/lib
    assert config.journal.is_absolute() and str(config.journal).startswith("/var/lib/")


def documented_commands(text: str) -> list[list[str]]:
    """`registry-replicator ...` command lines in the comments (with \\ continuations)."""
    lines = [
        re.sub(r"^\s*#\s?", "", line) for line in text.splitlines() if line.lstrip().startswith("#")
    ]
    commands, pending = [], ""
    for line in lines:
        line = re.sub(r"\s+#.*$", "", line).strip()  # a trailing comment
        if pending:
            pending += " " + line
        elif re.match(r"^(\d+\.\s+)?registry-replicator\s", line):
            pending = re.sub(r"^\d+\.\s+", "", line)
        else:
            continue
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        commands.append(shlex.split(pending.replace("`", ""))[1:])
        pending = ""
    return commands


@pytest.mark.parametrize("name", OURS)
def test_commands_in_the_comments_are_real(name):
    commands = documented_commands((EXAMPLES / name).read_text())
    assert commands, f"{name} shows no command to run"
    parser = build_parser()
    for argv in commands:
        if argv[0] == "gc" and "gc" not in COMMAND_MODULES:
            continue  # the gc sub-command is not registered yet
        # "..." stands for the configuration path in running text
        argv = [EXAMPLES / name if a == "..." else a for a in argv]
        args = parser.parse_args([str(a) for a in argv])  # exits 2 on a wrong flag
        assert args.command == argv[0]


def test_dr_pair_runbook_covers_the_incident():
    text = (EXAMPLES / "dr-pair.yaml").read_text()
    commands = [" ".join(c) for c in documented_commands(text)]
    for needed in (
        "status -c",
        "failover -c",
        "--promote us-west --dry-run",
        "failback -c",
        "--site us-east --dry-run",
    ):
        assert any(needed in c for c in commands), needed
    config = load_config(EXAMPLES / "dr-pair.yaml")
    [rule] = config.rules
    assert (rule.from_, rule.to, rule.deletes) == ("us-east", ["us-west"], True)
    assert rule.repositories == ["**"]
    # the standby is never collected on its own
    assert all(policy.sites == ["us-east"] for policy in config.gc.policies)


def test_hub_and_spoke_has_one_source_and_two_replicas():
    config = load_config(EXAMPLES / "hub-and-spoke.yaml")
    assert {r.from_ for r in config.rules} == {"us-east"}
    assert {t for r in config.rules for t in r.to} == {"eu-west", "ap-south"}


def test_mesh_replicates_every_site_to_every_other():
    config = load_config(EXAMPLES / "mesh.yaml")
    pairs = {(r.from_, t) for r in config.rules for t in r.to}
    assert pairs == set(permutations(config.sites, 2))


def test_ci_cleanup_is_retention_with_policies_per_repository_kind():
    config = load_config(EXAMPLES / "ci-cleanup.yaml")
    assert len(config.gc.policies) >= 3
    assert all(p.untagged == "delete" and p.grace >= 3600 for p in config.gc.policies)
    assert config.site("ci").storage is not None


def test_mqtt_fanout_instances_share_a_group_and_nothing_else_that_must_differ():
    one = load_config(EXAMPLES / "mqtt-fanout.yaml")
    two = load_config(EXAMPLES / "mqtt-fanout-2.yaml")
    assert one.mqtt and two.mqtt
    assert one.mqtt.group == two.mqtt.group is not None
    assert one.mqtt.topic == two.mqtt.topic and one.mqtt.url == two.mqtt.url
    assert one.mqtt.client_id != two.mqtt.client_id
    assert one.journal != two.journal
    assert one.listen != two.listen
    assert one.to_dict()["sites"] == two.to_dict()["sites"]
    assert one.to_dict()["rules"] == two.to_dict()["rules"]
