"""`registry-replicator failover` and `failback`: promote a replica when the primary is lost,
and hand its rules back once it has recovered."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from replicator.config import add_config_argument, load_config

FAILOVER_DESCRIPTION = """\
The primary site is lost: make SITE the source of every rule that came from
it. First SITE is brought up to date from the other surviving replicas of
those rules (a tag another replica holds and SITE lacks is copied; when both
hold it with different digests, the one the journal knows as the primary's
most recent wins, otherwise SITE's is kept and a conflict reported). Then the
failover is recorded in the journal, so `sync` and the daemon follow the
rewritten rules from then on, across restarts. The lost site is never
contacted.

The lost site defaults to the source of the rules that replicate to SITE;
give --lost when that is ambiguous. Rules that rename repositories are
refused. --dry-run prints the catch-up copies and rewritten rules and changes
nothing.

Exit status: 0 failover recorded (or dry run done), 1 a catch-up copy failed
(nothing recorded unless --force), 2 bad configuration or usage.
"""

FAILBACK_DESCRIPTION = """\
The old primary SITE is back: copy to it everything its replacement received
during the incident (every tag of its rules, the replacement's version wins),
then end the failover so its rules run from SITE again.

Exit status: 0 failover ended (or dry run done), 1 a copy failed (the
failover stays active; run again), 2 bad configuration or usage.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "failover",
        help="promote a replica in place of a lost primary",
        description=FAILOVER_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_argument(p)
    p.add_argument("--promote", required=True, metavar="SITE", help="the site to promote")
    p.add_argument(
        "--lost",
        metavar="SITE",
        help="the lost primary (default: the source of the rules into SITE)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    p.add_argument(
        "--force",
        action="store_true",
        help="record the failover even if some catch-up copies failed",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--parallel",
        type=int,
        default=16,
        metavar="N",
        help="concurrent lookups and copies (default 16)",
    )
    p.set_defaults(handler=run_failover)

    b = sub.add_parser(
        "failback",
        help="return the rules to a recovered primary",
        description=FAILBACK_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_argument(b)
    b.add_argument("--site", required=True, metavar="SITE", help="the recovered primary")
    b.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument(
        "--parallel",
        type=int,
        default=16,
        metavar="N",
        help="concurrent lookups and copies (default 16)",
    )
    b.set_defaults(handler=run_failback)


async def _with_parts(config, fn):
    from replicator.blob_index import BlobIndex
    from replicator.clients import ClientPool
    from replicator.copy import CopyEngine
    from replicator.journal import Journal

    journal = Journal(config.journal)
    try:
        async with ClientPool(config) as pool:
            return await fn(journal, pool, CopyEngine(BlobIndex(journal)))
    finally:
        journal.close()


def run_failover(args: argparse.Namespace) -> int:
    from replicator import telemetry
    from replicator.failover import FailoverRequest, failover

    config = load_config(args.config)
    telemetry.set_attributes(promoted=args.promote, lost=args.lost)  # on the command's root
    report = asyncio.run(
        _with_parts(
            config,
            lambda journal, pool, engine: failover(
                config,
                journal,
                pool,
                engine,
                FailoverRequest(
                    args.promote,
                    args.lost,
                    dry_run=args.dry_run,
                    force=args.force,
                    parallel=args.parallel,
                ),
            ),
        )
    )
    telemetry.set_attributes(lost=report.lost, recorded=report.recorded)
    if args.json:
        print(json.dumps(report.as_dict(), sort_keys=True))
    else:
        verb = "would copy" if report.dry_run else "copied"
        for rule in report.rules:
            after = (
                f"{rule['new_from']} -> {', '.join(rule['new_to'])}"
                if not rule["dropped"]
                else "dropped (no target left)"
            )
            print(
                f"rule {rule['name']}: {rule['from']} -> {', '.join(rule['to'])}  becomes  {after}"
            )
        for copy in report.copies:
            print(copy.describe(report.promoted))
        for conflict in report.conflicts:
            print(conflict.describe())
        for why in report.cancelled:
            print(f"{'would cancel' if report.dry_run else 'cancelled'} {why}")
        state = (
            "dry run: nothing changed"
            if report.dry_run
            else "failover recorded"
            if report.recorded
            else "failover NOT recorded"
        )
        print(
            f"{state}: {report.promoted} replaces {report.lost}; {verb} "
            f"{len(report.copies)}, {len(report.conflicts)} conflicts, "
            f"{len(report.failures)} failed"
        )
    for failure in report.failures:
        print(f"registry-replicator: failed: {failure}", file=sys.stderr)
    if report.failures and not report.dry_run and not report.recorded:
        print(
            "registry-replicator: catch-up incomplete, failover not recorded; run again, or "
            "use --force to fail over anyway",
            file=sys.stderr,
        )
    return 1 if report.failures else 0


def run_failback(args: argparse.Namespace) -> int:
    from replicator import telemetry
    from replicator.failover import failback

    config = load_config(args.config)
    telemetry.set_attributes(returning=args.site)  # on the command's root span
    report = asyncio.run(
        _with_parts(
            config,
            lambda journal, pool, engine: failback(
                config,
                journal,
                pool,
                engine,
                args.site,
                dry_run=args.dry_run,
                parallel=args.parallel,
            ),
        )
    )
    telemetry.set_attributes(
        promoted=", ".join(sorted(set(report.sources.values()))) or None,
        failovers_ended=len(report.ended),
    )
    if args.json:
        print(json.dumps(report.as_dict(), sort_keys=True))
    else:
        data = report.as_dict()
        for line in data["plan"]:
            print(line)
        counts = data["counts"]
        for rule, source in report.sources.items():
            print(f"rule {rule}: {args.site} <- {source}")
        extra = (
            f"; {counts.get('planned_deletes', 0)} deleted during the incident, "
            f"{counts.get('planned_spread', 0)} unreplicated copied on, "
            f"{counts.get('failback_conflicts', 0)} conflicts"
        )
        if report.dry_run:
            print(
                f"dry run: would copy {counts.get('planned_copies', 0)} to {args.site}{extra}; "
                "nothing changed"
            )
        elif report.ended:
            print(
                f"failback done: copied {counts.get('copied', 0)} to {args.site}{extra}; "
                f"rules run from {args.site} again"
            )
        else:
            print(f"failback incomplete: the failover of {args.site} stays active")
    for failure in report.failures:
        print(f"registry-replicator: failed: {failure}", file=sys.stderr)
    return 1 if report.failures else 0
