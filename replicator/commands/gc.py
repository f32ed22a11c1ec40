"""`registry-replicator gc`: apply the configured retention policies and reclaim storage."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from replicator.config import add_config_argument, load_config
from replicator.errors import UsageError
from replicator.gc.storage import DEFAULT_WORKERS

if TYPE_CHECKING:
    from replicator.metrics_textfile import GcOutcome

DESCRIPTION = """\
Run garbage collection for the sites the `gc.policies` cover (or one --site).

mode api      delete expired tags/manifests through the registry API;
mode storage  mark-and-sweep the registry's storage directory (sites.<name>.storage)
              while the registry stays online: unreferenced blobs, dangling layer
              links and stale uploads are quarantined (moved aside, invisible to
              the registry), re-checked after --quarantine-window and only then
              deleted. A run quarantines and exits ("deletable after TIME; safe to
              interrupt"); the next run, once that time has passed, re-checks and
              deletes or restores them (and plans nothing new while they wait).
              --settle waits for that in the foreground instead. Refused when the
              registry's config
              (sites.<name>.registry_config) enables the blob-descriptor cache, or
              when the registry, asked after the quarantine, still answers for moved
              blobs (everything is put back), unless --assume-no-cache;
mode both     the API pass, then the storage pass.

Tags are ranked by when the registry received them (its webhooks in the journal,
else the storage link files' times); a tag or manifest whose age nobody can tell is
kept ("age unknown"), never treated as old, and nothing younger than the policy's
grace is deleted. Without the site's storage directory the API pass deletes
manifests and tags only: it cannot list untagged manifests, so it cannot prove a
blob unused and leaves blobs to the storage pass.

--dry-run reports exactly what would be deleted (and why the rest is kept) and
changes nothing; the real run lists what it deleted (or quarantined) the same way,
item by item (the first 50); --json lists every item (site, repository, tag or
digest, bytes, the clause that decided), the same for a dry run and the real run.
Exit status: 0 done, 1 some deletions failed, 2 configuration or usage error.
"""

ITEM_LINES = 50  # items a human-readable run lists; --json lists them all
JSON_FIELDS = (
    "dry_run",
    "manifests_deleted",
    "blobs_deleted",
    "bytes_reclaimed",
    "quarantined",
    "restored",
    "waiting",
    "waiting_bytes",
    "deletable_after",
    "errors",
    "notes",
    "kept",
    "items",
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "gc",
        help="apply retention policies and reclaim storage",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_argument(p)
    p.add_argument("--site", metavar="S", help="only this site")
    p.add_argument(
        "--policy", metavar="P", action="append", default=[], help="only this policy (repeatable)"
    )
    p.add_argument("--dry-run", action="store_true", help="report, change nothing")
    p.add_argument(
        "--json", action="store_true", help="print one JSON object: " + ", ".join(JSON_FIELDS)
    )
    p.add_argument(
        "--assume-no-cache",
        action="store_true",
        help="vouch that the registry has no blob-descriptor cache (or is "
        "read-only/stopped) when its config cannot be checked",
    )
    p.add_argument(
        "--quarantine-window",
        metavar="DURATION",
        default="10m",
        help="how long removed storage items wait before deletion (default 10m)",
    )
    p.add_argument(
        "--settle",
        action="store_true",
        help="wait out the quarantine window in the foreground and delete in this run "
        "(default: exit once items are quarantined; a later run deletes them)",
    )
    p.add_argument(
        "--metrics-textfile",
        metavar="PATH",
        help="after a real run, add its outcome to this *.prom file for node_exporter's "
        "textfile collector (the daemon's registry_replicator_gc_* series; for the timer)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=DEFAULT_WORKERS,
        metavar="N",
        help=f"threads that rename and delete in the storage pass (default {DEFAULT_WORKERS})",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from replicator.durations import parse_duration
    from replicator.metrics_textfile import GcOutcome

    try:
        window = parse_duration(args.quarantine_window)
    except ValueError as exc:
        raise UsageError(f"--quarantine-window: {exc}") from None
    if args.workers < 1:
        raise UsageError("--workers must be at least 1")
    textfile = _textfile(args.metrics_textfile) if not args.dry_run else None
    config = load_config(args.config)
    try:
        totals = asyncio.run(_gc(config, args, window))
    except Exception:
        if textfile is not None:  # a run that could not even start failed on every site
            sites = [args.site] if args.site else list(config.sites)
            _record(textfile, config, [GcOutcome(site, ok=False) for site in sites])
        raise
    recorded = True
    if textfile is not None:
        recorded = _record(
            textfile,
            config,
            [
                GcOutcome(site, ok=not info["errors"], bytes_reclaimed=info["bytes_reclaimed"])
                for site, info in totals["sites"].items()
            ],
        )
    if args.json:
        print(
            json.dumps(
                {k: totals[k] for k in JSON_FIELDS} | {"sites": totals["sites"]}, sort_keys=True
            )
        )
    else:
        verb = "would delete" if args.dry_run else "deleted"
        print(
            f"gc: {verb} {totals['manifests_deleted']} manifests, "
            f"{totals['blobs_deleted']} blobs, {totals['bytes_reclaimed']} bytes; "
            f"quarantined {totals['quarantined']}, restored {totals['restored']}"
        )
        items = totals["items"]
        for i in items[:ITEM_LINES]:
            print(f"  {_done(i, args.dry_run)} {_describe(i)}")
        if len(items) > ITEM_LINES:
            print(f"  ... and {len(items) - ITEM_LINES} more (--json lists every item)")
        print(_kept_line(totals))
        for note in totals["notes"]:
            print(f"gc: {note}")
        for line in _quarantine_lines(totals):
            print(line)
        for w in totals["warnings"]:
            print(f"warning: {w}", file=sys.stderr)
        for e in totals["errors"]:
            print(f"error: {e}", file=sys.stderr)
    return 1 if totals["errors"] or not recorded else 0


def _textfile(value: str | None) -> Path | None:
    """--metrics-textfile, checked before anything runs."""
    if value is None:
        return None
    path = Path(value)
    if path.suffix != ".prom":
        raise UsageError(
            f"--metrics-textfile {value}: node_exporter's textfile collector reads only "
            "*.prom files"
        )
    if not path.parent.is_dir():
        raise UsageError(f"--metrics-textfile {value}: no directory {path.parent}")
    return path


def _record(path: Path, config: Any, outcomes: list[GcOutcome]) -> bool:
    """Add the run to the textfile; False (and the reason on stderr) if it cannot be."""
    from replicator import metrics_textfile  # prometheus-client only when asked for

    try:
        metrics_textfile.update(path, config.sites, outcomes, time.time())
    except OSError as exc:
        print(f"error: --metrics-textfile {path}: {exc.strerror or exc}", file=sys.stderr)
        return False
    return True


def _done(i: dict[str, Any], dry_run: bool) -> str:
    """What happened to a listed item: the same items, dry or real, say so differently."""
    if dry_run:
        return "would delete"
    return "quarantined" if i.get("state") == "quarantined" else "deleted"


def _describe(i: dict[str, Any]) -> str:
    """'a: app:dev (tag; no keep clause matched)' for one listed item."""
    ref = f":{i['tag']}" if "tag" in i else f"@{i['digest']}" if "digest" in i else ""
    what = f"{i['repository']}{ref}" if i.get("repository") else str(i.get("digest"))
    return f"{i['site']}: {what} ({i['kind']}, {i['bytes']} bytes; {i['clause']})"


def _kept_line(totals: dict[str, Any]) -> str:
    """Why the tags that stay stay: 'kept 15 tags: 12 kept by most_recent, 3 younger
    than grace' (or why nothing is deleted at all)."""
    kept = totals["kept"]
    why = ", ".join(f"{n} {reason}" for reason, n in sorted(kept.items(), key=lambda x: -x[1]))
    n = sum(kept.values())
    if not totals["items"]:
        lead = "nothing would be deleted" if totals["dry_run"] else "nothing deleted"
        return f"gc: {lead}: {n} tags kept" + (f" ({why})" if why else "")
    return f"gc: kept {n} tags" + (f" ({why})" if why else "")


def _quarantine_lines(totals: dict[str, Any]) -> list[str]:
    """What waits in quarantine, and when a later run may delete it."""
    waiting, after = totals["waiting"], totals["deletable_after"]
    if not waiting or after is None:
        return []
    from datetime import datetime

    from replicator.text import human_bytes

    when = datetime.fromtimestamp(after).astimezone().isoformat(timespec="seconds")
    size = human_bytes(totals["waiting_bytes"])
    if totals["dry_run"]:
        return [
            f"gc: {waiting} items ({size}) from an earlier run wait in quarantine until "
            f"{when}; a run before then deletes nothing and plans nothing new"
        ]
    if totals["quarantined"]:
        return [
            f"gc: quarantined {waiting} items ({size}); deletable after {when}; safe to "
            "interrupt: the first gc run after that re-checks and deletes them "
            "(gc --settle waits in the foreground)"
        ]
    return [
        f"gc: {waiting} items ({size}) from an earlier run wait in quarantine until {when}; "
        "nothing new planned until they are settled"
    ]


async def _gc(config: Any, args: argparse.Namespace, window: float) -> dict[str, Any]:
    from replicator.clients import ClientPool
    from replicator.gc.scheduled import StorageTuning, run_policies
    from replicator.journal import Journal

    journal = Journal(config.journal)
    try:
        async with ClientPool(config) as pool:
            results = await run_policies(
                config,
                journal,
                pool,
                dry_run=args.dry_run,
                sites=[args.site] if args.site else None,
                policy_names=args.policy or None,
                quarantine_window=window,
                tuning=StorageTuning(
                    assume_no_cache=args.assume_no_cache,
                    workers=args.workers,
                    settle=args.settle,
                ),
            )
    finally:
        journal.close()
    totals: dict[str, Any] = {
        "dry_run": bool(args.dry_run),
        "manifests_deleted": sum(r.manifests_deleted for r in results),
        "blobs_deleted": sum(r.blobs_deleted for r in results),
        "bytes_reclaimed": sum(r.bytes_reclaimed for r in results),
        "quarantined": sum(r.quarantined for r in results),
        "restored": sum(r.restored for r in results),
        "waiting": sum(r.waiting for r in results),
        "waiting_bytes": sum(r.waiting_bytes for r in results),
        "deletable_after": max(
            (r.deletable_after for r in results if r.deletable_after), default=None
        ),
        "errors": [f"{r.site}: {e}" for r in results for e in r.errors],
        "warnings": [f"{r.site}: {w}" for r in results for w in r.warnings],
        "notes": [f"{r.site}: {n}" for r in results for n in r.notes],
        "kept": _sum_counts(r.kept for r in results),
        "items": [i for r in results for i in r.items],
        "sites": {r.site: r.to_json() for r in results},
    }
    return totals


def _sum_counts(counts: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return out
