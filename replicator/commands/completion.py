"""`registry-replicator completion SHELL`: print the shell completion script."""

from __future__ import annotations

import argparse

SHELLS = ("bash", "zsh", "fish")

DESCRIPTION = """\
Print a script that makes SHELL complete registry-replicator's commands, flags
and choices (argcomplete). Install it where the shell loads it on demand
(`registry-replicator completion SHELL > FILE`), or load it in the shell's rc file:

  bash   > /usr/share/bash-completion/completions/registry-replicator
         (bash-completion loads it on demand), or in ~/.bashrc:
         eval "$(registry-replicator completion bash)"
  zsh    > /usr/local/share/zsh/site-functions/_registry-replicator
         or in ~/.zshrc, after compinit: eval "$(registry-replicator completion zsh)"
  fish   > /usr/share/fish/vendor_completions.d/registry-replicator.fish
         or > ~/.config/fish/completions/registry-replicator.fish

The script asks registry-replicator itself for candidates, so it stays right
when the tool is upgraded.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "completion",
        help="print the bash, zsh or fish completion script",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("shell", choices=SHELLS, help="the shell to complete in")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import argcomplete

    print(argcomplete.shellcode(["registry-replicator"], shell=args.shell), end="")
    return 0
