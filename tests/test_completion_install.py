"""Shell completion as the install steps put it in place: the block in systemd/README.md
runs (with /usr/share and /usr/local/share moved under a temporary directory), writes each
file where its shell looks for it on demand, and the bash file, loaded as
bash-completion loads it, completes commands and flags by asking the installed command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def install_block() -> str:
    text = (ROOT / "systemd" / "README.md").read_text()
    start = text.index("```sh\n# shell completion\n") + len("```sh\n")
    return text[start : text.index("\n```", start)]


def complete_in_bash(script: Path, words: list[str]) -> list[str]:
    """What bash offers for `words` (the last one being typed), with `script` loaded."""
    line = " ".join(words)
    code = (
        f"source {script}\n"
        "spec=$(complete -p registry-replicator) || exit 3\n"
        "fn=${spec##*-F }; fn=${fn%% *}\n"
        f"COMP_LINE={line!r}; COMP_POINT=${{#COMP_LINE}}\n"
        f"COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}\n"
        f"$fn registry-replicator {words[-1]!r} {words[-2]!r}\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    out = subprocess.run(["bash", "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    return [c.strip() for c in out.stdout.splitlines() if c.strip()]


def test_install_steps_put_completion_where_shells_load_it(tmp_path):
    usr, local = tmp_path / "usr-share", tmp_path / "usr-local-share"
    block = install_block().replace("/usr/local/share", str(local)).replace("/usr/share", str(usr))
    # zsh and fish are not installed here: their directories are theirs to create
    (local / "zsh" / "site-functions").mkdir(parents=True)
    (usr / "fish" / "vendor_completions.d").mkdir(parents=True)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    run = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, run.stdout + run.stderr

    # bash-completion loads completions/<command name> the first time it is completed
    bash = usr / "bash-completion" / "completions" / "registry-replicator"
    assert "sync" in complete_in_bash(bash, ["registry-replicator", "sy"])
    assert "--dry-run" in complete_in_bash(bash, ["registry-replicator", "sync", "--dr"])
    # zsh autoloads _<command> files from fpath by their #compdef line
    zsh = (local / "zsh" / "site-functions" / "_registry-replicator").read_text()
    assert zsh.startswith("#compdef registry-replicator")
    fish = (usr / "fish" / "vendor_completions.d" / "registry-replicator.fish").read_text()
    assert "complete" in fish and "registry-replicator" in fish
