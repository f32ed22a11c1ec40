"""`registry-replicator verify`: prove the replicas match their sources, or list the drift."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from replicator.config import add_config_argument, load_config

DESCRIPTION = """\
For every tag a rule covers (the tags `sync` would copy), compare the digest
at the source with the digest at every target and report drift:

  missing     the target lacks the tag
  different   the target's tag points at another manifest
  extra       the target still has a tag the source dropped (only for rules
              with `deletes: true`)
  incomplete  (--deep) a manifest or blob of an in-sync tag is absent at the
              target

Cost: per repository one tag listing at the source and at each target, and at
most one HEAD per tag per site, paced by each site's limits. --deep also reads
each in-sync target manifest and HEADs every blob it needs.

Exit status: 0 every replica in sync, 1 drift (each drifting tag is listed),
2 something could not be verified (an unreachable site is named) or bad
configuration.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify",
        help="compare every covered tag at the sources and targets; exit 1 on drift",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_argument(p)
    p.add_argument(
        "--rule",
        action="append",
        default=[],
        metavar="NAME",
        help="only this rule (repeatable); default all rules",
    )
    p.add_argument(
        "--deep",
        action="store_true",
        help="also HEAD every blob (and index child) of every in-sync manifest at the target",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object: per rule and target the counts, then every drifting tag",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=2,
        metavar="N",
        help="retries of a failed request (connection errors, 5xx, 429; default 2)",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    report = asyncio.run(_verify(config, args))
    if args.json:
        print(json.dumps(report.as_dict(), sort_keys=True))
    else:
        for line in report.lines():
            print(line)
    for error in report.errors:
        print(f"registry-replicator: {error}", file=sys.stderr)
    return report.exit_code


async def _verify(config, args: argparse.Namespace):
    from replicator.clients import ClientPool
    from replicator.errors import UsageError
    from replicator.journal import Journal
    from replicator.sync import rules_in_force
    from replicator.verifier import verify

    # the journal knows failovers and push times (latest: N); a fresh setup has none.
    # Read-only: verify may run as a user who can only read the daemon's journal
    journal = Journal(config.journal, read_only=True) if config.journal.exists() else None
    try:
        rules = await rules_in_force(config, journal)
        if args.rule:
            unknown = set(args.rule) - {r.name for r in rules}
            if unknown:
                raise UsageError(
                    f"unknown rule(s): {', '.join(sorted(unknown))}; known: "
                    f"{', '.join(r.name for r in rules)}"
                )
            rules = [r for r in rules if r.name in args.rule]
        async with ClientPool(config, retries=max(0, args.retries)) as pool:
            return await verify(config, pool, rules, journal=journal, deep=args.deep)
    finally:
        if journal is not None:
            journal.close()
