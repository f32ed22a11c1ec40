"""`registry-replicator tasks`: see the replication work that is waiting, failing or dead,
and retry or drop it.

Reads and writes the journal only (no registry is contacted, so it works during an
incident). Retry and drop are journaled with who, when and why (`task_audit`); a
dropped task stays listed as `dropped`.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import socket
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from replicator.config import add_config_argument, load_config
from replicator.errors import UsageError
from replicator.text import short_digest

if TYPE_CHECKING:
    from replicator.journal import Journal
    from replicator.journal.task_admin import TaskView

STATES = ("pending", "failed", "leased", "dead", "dropped")

DESCRIPTION = """\
tasks [list]          list pending, failed (pending, waiting to retry after an
                      error), leased (being copied now) and dead tasks; add
                      --state dropped to see what was given up on
tasks retry ID...     run tasks again now with a fresh set of attempts (dead,
                      dropped, or failed tasks waiting out a backoff)
tasks retry --dead    retry every dead task (narrow with --rule/--site)
tasks drop ID...      give up on pending or dead tasks: they are never run again
tasks drop --dead     drop every dead task (narrow with --rule/--site)

Retry and drop record who, when and why (--reason) in the journal; a leased
task (a worker is running it) is left alone. A running daemon picks retried
tasks up within a second or two.

Exit status: 0 done, 1 a task was not found or refused, 2 bad configuration,
journal or usage.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tasks",
        help="list, retry or drop replication tasks (pending, failed, dead)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_argument(p)
    p.add_argument(
        "verb",
        nargs="?",
        choices=("list", "retry", "drop"),
        default="list",
        help="list (the default), retry or drop",
    )
    p.add_argument("ids", nargs="*", type=_task_id, metavar="ID", help="task ids to retry or drop")
    p.add_argument(
        "--dead", action="store_true", help="retry or drop every dead task (with the filters)"
    )
    p.add_argument(
        "--state",
        action="append",
        choices=STATES,
        default=[],
        help="list only tasks in this state (repeatable; default: all but dropped)",
    )
    p.add_argument("--rule", metavar="R", help="only tasks of this rule")
    p.add_argument("--site", metavar="S", help="only tasks whose target is this site")
    p.add_argument(
        "--limit", type=int, default=200, metavar="N", help="list at most N tasks (default 200)"
    )
    p.add_argument(
        "--reason",
        metavar="TEXT",
        default="",
        help="why you retry or drop: recorded in the journal with your user and host",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=run)


def _task_id(text: str) -> int:
    """A task id as `tasks` lists it: a positive whole number SQLite can hold."""
    if not text.isdecimal() or not 0 < int(text) < 2**63:
        raise argparse.ArgumentTypeError(f"not a task id: {text!r} (ids are shown by `tasks`)")
    return int(text)


def actor() -> str:
    """Who acts, as the audit records it: user@host."""
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry (a container): still say where
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def run(args: argparse.Namespace) -> int:
    from replicator.journal import Journal

    config = load_config(args.config)
    for name, value in (("--rule", args.rule), ("--site", args.site)):
        known = config.sites if name == "--site" else {r.name: r for r in config.rules}
        if value is not None and value not in known:
            raise UsageError(f"{name} {value}: not in {config.source_path}")
    if args.verb == "list":
        if args.ids or args.dead:
            raise UsageError("task ids and --dead go with `retry` or `drop`")
    elif bool(args.ids) == bool(args.dead):
        raise UsageError(f"tasks {args.verb}: give task ids or --dead (one of them)")
    journal = Journal(config.journal)
    try:
        if args.verb == "list":
            return asyncio.run(_list(journal, args))
        return asyncio.run(_act(journal, args))
    finally:
        journal.close()


async def _list(journal: Journal, args: argparse.Namespace) -> int:
    from replicator.journal.task_admin import DEFAULT_VIEW

    views = await journal.task_admin.list_tasks(
        args.state or DEFAULT_VIEW, rule=args.rule, target=args.site, limit=args.limit
    )
    counts = await journal.task_admin.counts()
    if args.json:
        print(
            json.dumps(
                {"counts": counts, "tasks": [v.as_dict() for v in views]},
                sort_keys=True,
            )
        )
        return 0
    for line in format_tasks(views, time.time()):
        print(line)
    shown = ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "nothing unfinished"
    print(f"journal: {shown}" + (f" (listed {len(views)})" if len(views) >= args.limit else ""))
    return 0


async def _act(journal: Journal, args: argparse.Namespace) -> int:
    from replicator.journal.task_admin import DROPPABLE_FROM

    admin = journal.task_admin
    ids: Sequence[int] = args.ids or await admin.dead_ids(rule=args.rule, target=args.site)
    reason = args.reason or f"tasks {args.verb} from the command line"
    if args.verb == "retry":
        results = await admin.retry(ids, actor=actor(), reason=reason)
    else:  # --dead drops only what is still dead: a task retried since the listing stays
        only_from = ("dead",) if args.dead else DROPPABLE_FROM
        results = await admin.drop(ids, actor=actor(), reason=reason, only_from=only_from)
    bad = [r for r in results if r.outcome in ("not found", "refused")]
    if args.json:
        print(json.dumps({"results": [r.__dict__ for r in results]}, sort_keys=True))
    else:
        for r in results:
            print(f"task {r.task_id}: {r.outcome}{': ' + r.detail if r.detail else ''}")
        if not results:
            print("no dead tasks" + (" matching the filters" if args.rule or args.site else ""))
    return 1 if bad else 0


def format_tasks(views: Sequence[TaskView], now: float) -> list[str]:
    """One line per task, then its error or its audit on an indented line."""
    from replicator.status import human_age

    if not views:
        return ["no tasks in these states"]
    header = ("ID", "STATE", "RULE", "ACTION", "TARGET", "IMAGE", "TRIES", "AGE")
    table = [header]
    for v in views:
        t = v.task
        ref = f"@{t.digest}" if t.digest and not t.tag else f":{t.tag}"
        image = f"{t.target_repository}{ref}"
        if t.digest and t.tag:
            image += f"@{short_digest(t.digest)}"
        table.append(
            (
                str(t.id),
                v.state,
                t.rule,
                t.action,
                t.target_site,
                image,
                str(t.attempts),
                human_age(now - t.created_at),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    lines: list[str] = []
    for i, row in enumerate(table):
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]))
        if i == 0:
            continue
        v = views[i - 1]
        if v.audit is not None:
            a = v.audit
            done = {"drop": "dropped", "retry": "retried"}.get(a.action, a.action)
            lines.append(
                f"    {done} by {a.actor} {human_age(now - a.at)} ago "
                f"(was {a.state_before}): {a.reason}"
            )
        if v.state == "leased" and v.task.lease_owner:
            lines.append(f"    running on {v.task.lease_owner}")
        if v.task.last_error:
            wait = ""
            if v.state == "failed" and v.task.next_try > now:
                wait = f" (next try in {human_age(v.task.next_try - now)})"
            lines.append(f"    error{wait}: {v.task.last_error}")
    return lines
