"""`registry-replicator status`: lag, pending work, last reconcile and failovers, per rule and
target, from the journal alone (no registry is contacted, so it works during an incident)."""

from __future__ import annotations

import argparse
import asyncio
import json

from replicator.config import add_config_argument, load_config

DESCRIPTION = """\
Per rule and target: changes not yet replicated (pending tasks) and the lag
(age of the oldest of them), dead letters, when a copy last landed, and the
last reconcile run; then the active failovers and the recovery point (the
largest lag of any target). Read from the journal only: registries are not
contacted.

Exit status: 0 shown, 2 bad configuration or journal.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "status",
        help="replication lag, pending work and failovers",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_argument(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from replicator.journal import Journal
    from replicator.status import compute_status, format_status

    config = load_config(args.config)
    journal = Journal(config.journal)
    try:
        report = compute_status(config, asyncio.run(journal.status.rows()))
    finally:
        journal.close()
    if args.json:
        print(json.dumps(report.as_dict(), sort_keys=True))
    else:
        print("\n".join(format_status(report)))
    return 0
