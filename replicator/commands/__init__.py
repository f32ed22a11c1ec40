"""One module per CLI sub-command; each exposes `register(subparsers)`.

`register` adds its parser and sets `handler`, a callable taking the parsed
arguments and returning the process exit code.
"""

# Order is the order shown by --help.
COMMAND_MODULES = [
    "check",
    "config_schema",
    "demo",
    "copy",
    "sync",
    "verify",
    "run",
    "failover",
    "status",
    "tasks",
    "gc",
    "completion",
]
