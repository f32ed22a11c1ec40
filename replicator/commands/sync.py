"""`registry-replicator sync`: reconcile every rule once, or show what that would do."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from replicator.config import add_config_argument, load_config
from replicator.text import human_bytes

DESCRIPTION = """\
For each rule: list the source repositories (literal names as they are, globs
matched against the catalog; sources without one, like Docker Hub, need literal
names) and tags (include/exclude globs, regex/exclude_regex patterns searched as
skopeo sync does, e.g. '^v\\d+\\.\\d+\\.\\d+$', semver, latest), compare with every
target by one HEAD per tag, then copy what is missing or different and, with
`deletes: true`, delete what the source no longer has. With `overwrite: false`
a target tag that differs is reported as a conflict and left alone.

--dry-run prints the plan and changes nothing. Interrupting a run is safe: the
next run finishes the work without uploading again what already landed.

Counts are in tags per target; `failed_listings` counts listings that failed,
whose tags are unknown. Exit status: 0 everything in place, 1 something failed
(each failure is listed), 2 bad configuration or usage.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sync",
        help="reconcile the rules once (or --dry-run to see the plan)",
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
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object with the counts (and the plan with --dry-run)",
    )
    p.add_argument(
        "--parallel",
        type=int,
        default=16,
        metavar="N",
        help="concurrent lookups and copies (default 16)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=5,
        metavar="N",
        help="retries of a failed request (connection errors, 5xx, 429; default 5)",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    report = asyncio.run(_sync(config, args))
    counts = report.counts()
    if args.json:
        payload = dict(counts)
        payload["failures"] = report.failures
        if args.dry_run:
            payload["plan"] = [a.describe() for a in report.actions if a.kind != "up-to-date"]
        print(json.dumps(payload, sort_keys=True))
    else:
        if args.dry_run:
            for action in report.actions:
                if action.kind != "up-to-date":
                    print(action.describe())
        print(_summary(counts))
    for failure in report.failures:
        print(f"registry-replicator: failed: {failure}", file=sys.stderr)
    return 1 if report.failures else 0


def _summary(c: dict) -> str:
    """Counts in tags (per target); listings that failed, whose tags are unknown, apart."""
    listings = f" ({c['failed_listings']} listings failed)" if c["failed_listings"] else ""
    if c.get("superseded"):
        listings += f" ({c['superseded']} moved or deleted at the source since the plan)"
    if c["dry_run"]:
        return (
            f"dry run: would copy {c['planned_copies']}, delete {c['planned_deletes']}; "
            f"{c['skipped']} up to date, {c['conflicts']} conflicts, {c['failed']} failed"
            + listings
        )
    return (
        f"copied {c['copied']}, deleted {c['deleted']}, {c['skipped']} up to date, "
        f"{c['conflicts']} conflicts, {c['failed']} failed{listings}; blobs uploaded "
        f"{c['blobs_uploaded']}, mounted {c['blobs_mounted']}, "
        f"{human_bytes(c['bytes_uploaded'])} uploaded, "
        f"{human_bytes(c['bytes_downloaded'])} downloaded"
    )


def _count_on(progress):
    """Feed the overall bar: every planned copy or delete, then its outcome."""

    def on_action(action, status: str) -> None:
        if action.kind in ("copy", "delete"):
            if status == "planned":
                progress.planned()
            else:
                progress.done()

    return on_action


async def _sync(config, args: argparse.Namespace):
    from replicator.blob_index import BlobIndex
    from replicator.clients import ClientPool
    from replicator.copy import CopyEngine
    from replicator.journal import Journal
    from replicator.progress import terminal_progress
    from replicator.sync import Reconciler

    journal = Journal(config.journal)
    progress = None if args.json else terminal_progress()
    try:
        async with ClientPool(config, retries=max(0, args.retries)) as pool:
            engine = CopyEngine(BlobIndex(journal), progress=progress)
            reconciler = Reconciler(
                config,
                journal,
                pool,
                engine,
                parallel=args.parallel,
                on_action=_count_on(progress) if progress else None,
            )
            if progress is None:
                return await reconciler.run(args.rule or None, dry_run=args.dry_run)
            with progress:
                return await reconciler.run(args.rule or None, dry_run=args.dry_run)
    finally:
        journal.close()
