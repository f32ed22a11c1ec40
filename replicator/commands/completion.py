"""`registry-replicator completion SHELL`: print the shell completion script."""

from __future__ import annotations

import argparse

SHELLS = ("bash", "zsh", "fish")

DESCRIPTION = """\
Print a script that makes SHELL complete registry-replicator's commands, flags
and choices (argcomplete). Load it once per shell, or install it:

  bash   eval "$(registry-replicator completion bash)"      (e.g. in ~/.bashrc)
         or: registry-replicator completion bash > /etc/bash_completion.d/registry-replicator
  zsh    eval "$(registry-replicator completion zsh)"       (in ~/.zshrc, after compinit)
  fish   registry-replicator completion fish > ~/.config/fish/completions/registry-replicator.fish

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
