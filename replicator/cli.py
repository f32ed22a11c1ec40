"""The `registry-replicator` command line: parses arguments, dispatches to a sub-command.

Exit codes are uniform across sub-commands: 0 success, 1 something failed,
2 usage or configuration error (nothing was changed).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from replicator import __version__
from replicator.commands import COMMAND_MODULES
from replicator.errors import ReplicatorError
from replicator.logs import LOG_FORMAT_ENV, LOG_LEVEL_ENV, LOG_LEVELS, setup_logging

# httpx imports its own command-line client (rich, pygments: about 30 ms) whenever
# those happen to be installed, as they are with us; this command never uses it. A None
# in sys.modules makes that import fail, and httpx then defines a stub instead.
if "httpx" not in sys.modules:
    sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]


# The cyclic garbage collector's young-generation threshold (CPython's default is 700
# allocations). Requests, tasks and their futures allocate container objects at such a
# rate that the default collects about 200 times in the 60-image `sync` benchmark, and
# the older generation, holding everything imported, 20 times: about 120 ms of a 2 s
# run, against about 45 ms at this threshold. Cycles are still collected, later.
GC_YOUNG_THRESHOLD = 20_000


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on usage errors already; keep its message on stderr."""


# Sub-commands registered by a module of another name.
COMMAND_ALIASES = {"failback": "failover"}


def build_parser(modules: Sequence[str] = COMMAND_MODULES) -> argparse.ArgumentParser:
    """The parser with the sub-commands of `modules` (all by default)."""
    parser = _Parser(
        prog="registry-replicator",
        description=(
            "Keep container registries in several regions in sync and clean: "
            "replicate by rules, react to webhooks, fail over, and reclaim storage."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_global_options(parser, defaults=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in modules:
        module = importlib.import_module(f"replicator.commands.{name}")
        module.register(sub)
    for command in sub.choices.values():
        # accepted after the sub-command too (`registry-replicator sync -v ...`)
        _add_global_options(command, defaults=False)
    return parser


def _add_global_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """Options every command takes, before or after its name. Only the top-level parser
    sets defaults, so a sub-command's parser never overwrites what was given before it."""

    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    group = parser.add_argument_group("logging")
    group.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=default(0),
        help="more log output (-v info, -vv debug)",
    )
    group.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=default(None),
        help=f"log level; overrides -v (environment: {LOG_LEVEL_ENV})",
    )
    group.add_argument(
        "--log-format",
        choices=("auto", "text", "json"),
        default=default(None),
        help="text lines or JSON lines; auto: text on a terminal, JSON otherwise "
        f"(environment: {LOG_FORMAT_ENV})",
    )


# One-shot commands traced as one root span each (`run` traces per event and task).
TRACED_COMMANDS = frozenset({"copy", "sync", "failover", "failback", "gc", "verify"})


def _run(args: argparse.Namespace) -> int:
    """Run the sub-command; the traced ones inside a root span, exported before exit."""
    if args.command not in TRACED_COMMANDS:
        return int(args.handler(args) or 0)
    from replicator import telemetry
    from replicator.config import load_config

    config = load_config(args.config) if getattr(args, "config", None) else None
    with telemetry.command(args.command, config, dry_run=getattr(args, "dry_run", None)) as root:
        code = int(args.handler(args) or 0)
        telemetry.end_command(root, code)
        return code


def _needed_modules(argv: Sequence[str]) -> list[str] | None:
    """The command modules the parser needs for `argv`, found without importing every
    command (each pulls in its own dependencies: a third of a short run's start-up):
    the one the sub-command names, none for `--version`; None when it cannot be told,
    and then every command is loaded."""
    args = iter(argv)
    for arg in args:
        if arg in ("--log-level", "--log-format"):
            next(args, None)
        elif arg == "--version":
            return []
        elif arg in ("-h", "--help"):
            return None
        elif not arg.startswith("-"):
            module = COMMAND_ALIASES.get(arg, arg.replace("-", "_"))
            return [module] if module in COMMAND_MODULES else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    if argv is None:
        argv = sys.argv[1:]
    needed = None if "_ARGCOMPLETE" in os.environ else _needed_modules(argv)
    parser = build_parser(COMMAND_MODULES if needed is None else needed)
    if "_ARGCOMPLETE" in os.environ:  # a shell asking for completions (see `completion`)
        import argcomplete

        argcomplete.autocomplete(parser)  # exits after writing the candidates
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        setup_logging(args.verbose, level=args.log_level, fmt=args.log_format)
    except ValueError as exc:  # a bad value in the environment
        print(f"registry-replicator: error: {exc}", file=sys.stderr)
        return 2
    try:
        return _run(args)
    except ReplicatorError as exc:
        print(f"registry-replicator: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        # `registry-replicator config-schema | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("registry-replicator: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: say so plainly, keep the traceback for -v
        logging.getLogger("replicator").debug("unexpected error", exc_info=True)
        print(f"registry-replicator: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
