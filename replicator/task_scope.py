"""Whether a queued task still belongs to the rules in force.

A task keeps the source and target it was queued with. After a failover (or a
failback, or a reload that changed a rule) the rule of the same name may come from
another site or go elsewhere: a copy queued from the lost primary would overwrite
the promoted site's incident write, a delete queued from it would delete one. Such a
task must not run; `out_of_scope` says why (naming the failover that moved the rule),
for the daemon to end it `cancelled` and for `failover` to cancel the queue's share
of it when it records the failover. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

from replicator.config import Rule
from replicator.journal import Failover, Task


def _failover_names(task: Task, failovers: Sequence[Failover]) -> str:
    """The active failovers that touch the task's sites, for the reason text (one not
    recorded yet, as in a dry run, has id 0 and no number)."""
    sites = {task.source_site, task.target_site}
    named = [
        f"failover{f' #{f.id}' if f.id > 0 else ''} "
        f"({f.lost_site} lost, {f.promoted_site} promoted)"
        for f in failovers
        if f.lost_site in sites or f.promoted_site in sites
    ]
    return "; ".join(named)


def out_of_scope(task: Task, rules: Sequence[Rule], failovers: Sequence[Failover]) -> str | None:
    """Why `task` must not run under `rules` (the rules in force), or None when it may:
    its rule is gone or has no target left, its source is not the rule's `from`, or its
    target is not in the rule's `to`."""
    rule = next((r for r in rules if r.name == task.rule), None)
    what = (
        f"task {task.id} ({task.action} {task.source_site}/{task.repository}:"
        f"{task.reference} -> {task.target_site}/{task.target_repository})"
    )
    if rule is None:
        problem = f"rule {task.rule!r} is not in force (no target left)"
    elif task.source_site != rule.from_:
        problem = f"rule {rule.name!r} now replicates from {rule.from_!r}, not {task.source_site!r}"
    elif task.target_site not in rule.to:
        problem = (
            f"rule {rule.name!r} no longer replicates to {task.target_site!r} "
            f"(to: {', '.join(rule.to)})"
        )
    else:
        return None
    cause = _failover_names(task, failovers)
    return f"{what}: {problem}" + (f" since {cause}" if cause else "")
