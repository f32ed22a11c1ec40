"""The daemon's periodic tidying of its journal, so it stays the size of what matters.

* Webhook events older than `events_retention` that no reader needs are pruned
  (`Events.prune`: superseded ones and blob traffic; never one still `new`).
* A dead letter (a copy out of attempts) whose source image no longer exists can
  never succeed and would be shown as a dead letter forever: each pass HEADs the
  source tag or digest of a few of them and drops those the source answers 404 for,
  journaled (actor `daemon <instance>`) and logged. Any other answer -- present,
  401/403, 5xx, no answer -- keeps the dead letter: only a definite "gone" drops.
  A 404 is definite only from a registry that knows the repository: the site's
  `/v2/` must answer as a registry and the repository must list tags there. A
  misconfigured source URL (a web server answering 404 to everything) or another
  registry behind the name after a failover (without the repository) would
  otherwise answer 404 for every image and drop every dead letter. A repository
  deleted whole keeps its dead letters for an operator (`tasks drop --dead`).
  Dead deletes are kept: their source image being gone is the normal case.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

from replicator.clients import ClientPool
from replicator.config import Config
from replicator.journal import Journal, Task

log = logging.getLogger("replicator.daemon.housekeeping")

INTERVAL = 600.0  # seconds between passes (tests shorten it)
DEAD_LETTERS_PER_PASS = 50  # source HEADs per pass, at most: paced, never a burst
HEAD_TIMEOUT = 30.0

Verdict = Literal["gone", "present", "unknown"]


@dataclass
class HousekeepingReport:
    events_pruned: int = 0
    dropped: list[int] = field(default_factory=list)  # dead letters whose source is gone
    kept: int = 0  # dead letters checked and kept (present or unknown)
    next_id: int = 0  # where the next pass starts checking (task id), so all get a turn


def uses_pull_times(config: Config) -> bool:
    """Whether any GC policy reads per-manifest pull times (`pulled_within`), so the
    journal must keep manifest pulls as rows rather than only count them."""
    return any(policy.keep.pulled_within is not None for policy in config.gc.policies)


async def source_verdict(probe: Callable[[], Awaitable[object | None]]) -> Verdict:
    """What one HEAD of the source says: `gone` only for a definite 404 (the probe
    returns None); `present` for an answer; `unknown` for anything else."""
    try:
        found = await asyncio.wait_for(probe(), HEAD_TIMEOUT)
    except asyncio.CancelledError:
        raise
    except Exception:
        return "unknown"
    return "gone" if found is None else "present"


async def housekeep(
    config: Config, journal: Journal, pool: ClientPool, *, actor: str, start_id: int = 0
) -> HousekeepingReport:
    """One pass: prune events, then drop the dead letters whose source is gone, checking
    from task id `start_id` on (wrapping around): kept ones do not change, so a pass that
    always began at the oldest would check the same few forever."""
    report = HousekeepingReport()
    report.events_pruned = await journal.events.prune(config.events_retention)
    if report.events_pruned:
        log.info(
            "pruned %d handled webhook events older than %s",
            report.events_pruned,
            config.events_retention,
        )
    dead = await journal.task_admin.list_tasks(["dead"], action="copy", limit=-1)
    known: dict[tuple[str, str | None], bool] = {}  # (site, repo): a registry that has it
    checked = 0
    ordered = sorted(dead, key=lambda v: (v.task.id < start_id, v.task.id))
    for view in ordered:
        if checked >= DEAD_LETTERS_PER_PASS:
            break
        task = view.task
        report.next_id = task.id + 1
        if task.source_site not in config.sites or not task.reference:
            continue
        checked += 1
        verdict = await _probe(pool, task)
        if verdict == "gone" and not await _knows_repository(pool, task, known):
            verdict = "unknown"
        if verdict != "gone":
            report.kept += 1
            continue
        where = f"{task.source_site} {task.repository}@{task.reference}"
        [result] = await journal.task_admin.drop(
            [task.id],
            actor=actor,
            reason=f"source image gone: HEAD {where} answered 404",
            only_from=("dead",),
        )
        if result.outcome == "dropped":
            report.dropped.append(task.id)
            log.info(
                "dropped dead letter %d (%s %s -> %s): its source image %s no longer exists",
                task.id,
                task.rule,
                task.action,
                task.target_site,
                where,
            )
    return report


async def _probe(pool: ClientPool, task: Task) -> Verdict:
    try:
        client = pool.get(task.source_site)
    except Exception:  # a site whose credentials cannot be read now: not a verdict
        return "unknown"
    return await source_verdict(lambda: client.head_manifest(task.repository, task.reference))


async def _knows_repository(
    pool: ClientPool, task: Task, known: dict[tuple[str, str | None], bool]
) -> bool:
    """Whether the source is a registry (`/v2/` answers) holding `task.repository`
    (its tag list is not empty): only such a registry's 404 means "gone". Cached per
    pass."""
    for repo in (None, task.repository):
        key = (task.source_site, repo)
        if key not in known:
            probe = functools.partial(_registry_has, pool, task.source_site, repo)
            known[key] = await source_verdict(probe) == "present"
        if not known[key]:
            return False
    return True


async def _registry_has(pool: ClientPool, site: str, repo: str | None) -> object | None:
    """True when `/v2/` answers (repo None) or `repo` lists a tag; None otherwise."""
    client = pool.get(site)
    if repo is None:
        await client.ping()
        return True
    return True if await client.list_tags(repo) else None
