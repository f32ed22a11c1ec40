"""The command line explains itself: every flag of every command has help, and shells
complete commands, flags and choices."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from replicator.cli import build_parser


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_flag_of_every_command_has_help():
    missing = []
    for name, parser in {"(top)": build_parser(), **_subcommands()}.items():
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []


@pytest.mark.parametrize("name", sorted(_subcommands()))
def test_every_command_help_runs(name):
    out = subprocess.run(
        [sys.executable, "-m", "replicator", name, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "usage: registry-replicator " + name in out.stdout


def _complete(line: str, tmp_path: Path) -> list[str]:
    out = tmp_path / "candidates"
    env = {
        **os.environ,
        "_ARGCOMPLETE": "1",
        "_ARGCOMPLETE_IFS": "\n",
        "COMP_LINE": line,
        "COMP_POINT": str(len(line)),
        "_ARGCOMPLETE_STDOUT_FILENAME": str(out),
    }
    subprocess.run([sys.executable, "-m", "replicator"], env=env, capture_output=True, timeout=60)
    return [c.strip() for c in out.read_text().split("\n") if c.strip()]


def test_completion_offers_commands_flags_and_choices(tmp_path):
    assert "sync" in _complete("registry-replicator sy", tmp_path)
    assert "--dry-run" in _complete("registry-replicator sync --dr", tmp_path)
    assert set(_complete("registry-replicator --log-format ", tmp_path)) >= {"json", "text"}


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_command_prints_a_script_for_the_shell(shell):
    out = subprocess.run(
        [sys.executable, "-m", "replicator", "completion", shell],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "registry-replicator" in out.stdout and "_ARGCOMPLETE" in out.stdout


def test_bash_completion_script_loads_in_bash(tmp_path):
    script = subprocess.run(
        [sys.executable, "-m", "replicator", "completion", "bash"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    (tmp_path / "c.sh").write_text(script)
    out = subprocess.run(
        ["bash", "-c", f"source {tmp_path / 'c.sh'} && complete -p registry-replicator"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "registry-replicator" in out.stdout


def test_a_command_loads_only_its_own_module():
    """Start-up cost: `sync` does not import every other command (and what they pull in);
    global options before the command are skipped over to find it."""
    code = (
        "import sys; from replicator.cli import main\n"
        "try:\n"
        "    main(['--log-level', 'info', 'failback', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted(m for m in sys.modules if m.startswith('replicator.commands.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "['replicator.commands.failover']"
    assert "--site" in out.stdout


def test_sync_help_and_readme_concepts_name_every_tag_filter():
    """A tag filter the config accepts but `sync --help` and the README's Concepts list do
    not mention is one users do not find (regex filters were missed once)."""
    import re

    from replicator.config.models import TagFilter

    out = subprocess.run(
        [sys.executable, "-m", "replicator", "sync", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    concepts = readme.split("\n## Concepts\n", 1)[1].split("\n## ", 1)[0]
    for name in TagFilter.model_fields:
        word = re.compile(rf"(?<![\w]){name}(?![\w])")
        assert word.search(out.stdout), f"sync --help does not mention tags.{name}"
        assert word.search(concepts), f"README's Concepts do not mention tags.{name}"
