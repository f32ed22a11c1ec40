"""Replication status from the journal alone: what an operator asks during an incident.

Per rule and target: changes not yet replicated (pending and leased tasks),
the replication lag (age of the oldest of them), dead letters, when a copy
last landed, and the last reconcile run; plus the active failovers and the
recovery point (the most lag any target has, i.e. how much recent work a
target would be missing if its source were lost now). And each site's pull
budget (Docker Hub's rate limit) as the latest sync run that saw one recorded it.

No registry is contacted, so this works when sites are down. `compute_status`
is pure (rows in, report out); the rows come from `journal.status.rows()`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, tzinfo
from typing import Any

from replicator.config import Config
from replicator.durations import format_duration
from replicator.journal.status import StatusRows
from replicator.rules import effective_rules

UNREPLICATED = ("pending", "leased")


@dataclass(frozen=True)
class FailoverInfo:
    id: int
    lost: str
    promoted: str
    started_at: float
    rules: list[str]


@dataclass(frozen=True)
class RunInfo:
    id: int
    rules: str | None  # comma-separated rule names; None: every rule
    started_at: float
    finished_at: float | None
    state: str  # running | done | failed
    counts: dict[str, Any]


@dataclass(frozen=True)
class TargetStatus:
    rule: str
    source: str
    target: str
    pending: int  # pending + leased tasks
    dead: int
    oldest_unreplicated_at: float | None
    lag_seconds: float  # 0 when nothing is waiting
    last_replicated_at: float | None
    in_force: bool  # False: not a target while a failover is active
    note: str = ""


@dataclass(frozen=True)
class RuleStatus:
    name: str
    source: str  # in force (after failovers)
    configured_source: str
    targets: list[TargetStatus]
    last_run: RunInfo | None
    last_ok_run: RunInfo | None
    promoted_by: FailoverInfo | None = None  # the failover that made `source` the source


@dataclass
class StatusReport:
    generated_at: float
    rules: list[RuleStatus] = field(default_factory=list)
    failovers: list[FailoverInfo] = field(default_factory=list)
    # site -> limit, remaining, window (s), observed_at: the newest a sync run recorded
    ratelimits: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def recovery_point_seconds(self) -> float:
        """The largest lag of any target in force: the recent work a loss would cost."""
        return max(
            (t.lag_seconds for r in self.rules for t in r.targets if t.in_force), default=0.0
        )

    @property
    def pending(self) -> int:
        return sum(t.pending for r in self.rules for t in r.targets)

    @property
    def dead(self) -> int:
        return sum(t.dead for r in self.rules for t in r.targets)

    def as_dict(self) -> dict[str, Any]:
        return {
            "generated_at": self.generated_at,
            "recovery_point_seconds": self.recovery_point_seconds,
            "pending": self.pending,
            "dead": self.dead,
            "failovers": [asdict(f) for f in self.failovers],
            "rules": [asdict(r) for r in self.rules],
            **({"ratelimits": self.ratelimits} if self.ratelimits else {}),
        }


def compute_status(config: Config, rows: StatusRows, now: float | None = None) -> StatusReport:
    now = time.time() if now is None else now
    chain = [(r["lost_site"], r["promoted_site"]) for r in rows.failovers]
    in_force = {r.name: r for r in effective_rules(config, chain)}
    tasks = _task_index(rows.tasks)
    runs = [_run(r) for r in rows.runs]
    last_copy = {(r["source_site"], r["target_site"]): r["last_at"] for r in rows.replicated}
    lost = {lo for lo, _ in chain}

    report = StatusReport(generated_at=now, failovers=[_failover(r) for r in rows.failovers])
    for rule in config.rules:
        current = in_force.get(rule.name)
        source = current.from_ if current else rule.from_
        promoted_by = _promotion(rule.from_, report.failovers)
        targets: list[TargetStatus] = []
        listed: list[str] = list(current.to) if current else []
        extra = [t for t in rule.to if t not in listed]  # dropped by a failover
        extra += [t for (name, t) in tasks if name == rule.name and t not in listed + extra]
        for target in listed + extra:
            counts = tasks.get((rule.name, target), {})
            pending = counts.get("pending", (0, None))[0] + counts.get("leased", (0, None))[0]
            oldest = _min(counts.get(s, (0, None))[1] for s in UNREPLICATED)
            note = ""
            if target not in listed:
                note = (
                    "lost site, failed over"
                    if target in lost
                    else "now the source (promoted)"
                    if target == source
                    else "not in force"
                )
            targets.append(
                TargetStatus(
                    rule=rule.name,
                    source=source,
                    target=target,
                    pending=pending,
                    dead=counts.get("dead", (0, None))[0],
                    oldest_unreplicated_at=oldest,
                    lag_seconds=max(0.0, now - oldest) if oldest is not None else 0.0,
                    last_replicated_at=last_copy.get((source, target)),
                    in_force=target in listed,
                    note=note,
                )
            )
        covering = [r for r in runs if r.rules is None or rule.name in r.rules.split(",")]
        report.rules.append(
            RuleStatus(
                name=rule.name,
                source=source,
                configured_source=rule.from_,
                targets=targets,
                last_run=covering[0] if covering else None,
                last_ok_run=next((r for r in covering if r.state == "done"), None),
                promoted_by=promoted_by if promoted_by and promoted_by.promoted == source else None,
            )
        )
    report.ratelimits = latest_ratelimits(runs)
    return report


def _promotion(configured: str, failovers: Iterable[FailoverInfo]) -> FailoverInfo | None:
    """The failover (applied in order, as `effective_rules` does) that last moved a rule
    whose configured source is `configured`; None when it still has its own source."""
    current, last = configured, None
    for f in failovers:
        if f.lost == current:
            current, last = f.promoted, f
    return last


def check_thresholds(
    report: StatusReport, max_lag: float | None = None, max_dead: int | None = None
) -> list[str]:
    """What exceeds the operator's limits, one sentence each naming the rule and target;
    empty when all is within them. Lag counts targets in force only (a lost site's
    backlog waits for failback, it is not lag)."""
    exceeded: list[str] = []
    for rule in report.rules:
        for t in rule.targets:
            if max_lag is not None and t.in_force and t.lag_seconds > max_lag:
                exceeded.append(
                    f"lag of rule {rule.name} {t.source} -> {t.target} is "
                    f"{human_age(t.lag_seconds)} ({t.pending} pending), above --max-lag "
                    f"{format_duration(max_lag)}"
                )
    if max_dead is not None and report.dead > max_dead:
        where = ", ".join(
            f"{r.name} -> {t.target}: {t.dead}" for r in report.rules for t in r.targets if t.dead
        )
        exceeded.append(f"{report.dead} dead letters ({where}), above --max-dead {max_dead}")
    return exceeded


def latest_ratelimits(runs: Iterable[RunInfo]) -> dict[str, dict[str, Any]]:
    """Per site, the newest pull budget recorded by any run (runs' `ratelimits` counts)."""
    newest: dict[str, dict[str, Any]] = {}
    for run in runs:
        recorded = run.counts.get("ratelimits")
        if not isinstance(recorded, dict):
            continue
        for site, budget in recorded.items():
            seen = newest.get(site)
            if isinstance(budget, dict) and (
                seen is None or (budget.get("observed_at") or 0) > (seen.get("observed_at") or 0)
            ):
                newest[site] = budget
    return newest


def describe_ratelimit(site: str, budget: Mapping[str, Any], now: float) -> str:
    window = budget.get("window")
    per = f" per {human_age(window)}" if window else ""
    seen = budget.get("observed_at")
    when = f" (as of {human_age(now - seen)} ago)" if seen else ""
    return f"pull budget {site}: {budget.get('remaining')} of {budget.get('limit')}{per} left{when}"


def _task_index(
    rows: Iterable[Mapping[str, Any]],
) -> dict[tuple[str, str], dict[str, tuple[int, float | None]]]:
    index: dict[tuple[str, str], dict[str, tuple[int, float | None]]] = {}
    for row in rows:
        index.setdefault((row["rule"], row["target_site"]), {})[row["state"]] = (
            int(row["n"]),
            row["oldest"],
        )
    return index


def _min(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


def _run(row: Mapping[str, Any]) -> RunInfo:
    try:
        counts = json.loads(row["result"]) if row["result"] else {}
    except ValueError:
        counts = {}
    return RunInfo(
        id=row["id"],
        rules=row["rule"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        state=row["state"],
        counts=counts,
    )


def _failover(row: Mapping[str, Any]) -> FailoverInfo:
    try:
        detail = json.loads(row["detail"]) if row["detail"] else {}
    except ValueError:
        detail = {}
    return FailoverInfo(
        id=row["id"],
        lost=row["lost_site"],
        promoted=row["promoted_site"],
        started_at=row["started_at"],
        rules=[r.get("name", "?") for r in detail.get("rules", [])],
    )


# ---------------------------------------------------------------------------- text


def human_age(seconds: float) -> str:
    """'0 s', '45 s', '2 min', '3 h', '2 d': precise enough to read at a glance; '?' for
    what is no duration (NaN, infinite), which a hostile or corrupt input can produce."""
    if not math.isfinite(seconds):
        return "?"
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{int(seconds)} s"
    if seconds < 90 * 60:
        return f"{int(seconds // 60)} min"
    if seconds < 36 * 3600:
        return f"{int(seconds // 3600)} h"
    return f"{int(seconds // 86400)} d"


def clock_time(t: float, tz: tzinfo = UTC) -> str:
    """'2026-12-05 14:03 UTC': a time of day an operator can compare with other logs."""
    return datetime.fromtimestamp(t, tz).strftime("%Y-%m-%d %H:%M %Z")


def describe_target(t: TargetStatus, rule: RuleStatus, now: float) -> str:
    line = f"{t.source} -> {t.target}: "
    if not t.in_force:
        line = f"{rule.configured_source} -> {t.target}: {t.note}; "
    line += f"lag {human_age(t.lag_seconds)}, {t.pending} pending"
    if t.dead:
        line += f", {t.dead} dead"
    if t.last_replicated_at is not None:
        line += f", last copy {human_age(now - t.last_replicated_at)} ago"
    line += f", {describe_run(rule.last_run, now)}"
    if rule.last_run and rule.last_ok_run and rule.last_run.state != "done":
        line += f" (last ok {human_age(now - _end(rule.last_ok_run))} ago)"
    return line


def describe_run(run: RunInfo | None, now: float) -> str:
    if run is None:
        return "never reconciled"
    if run.state == "running":
        return f"reconcile running since {human_age(now - run.started_at)} ago"
    state = "ok" if run.state == "done" else run.state
    return f"last reconcile {human_age(now - _end(run))} ago {state}"


def _end(run: RunInfo) -> float:
    return run.finished_at if run.finished_at is not None else run.started_at


def format_status(report: StatusReport, tz: tzinfo = UTC) -> list[str]:
    """The report as lines for a terminal; times of day in `tz` (the configured
    `timezone`)."""
    now = report.generated_at
    lines: list[str] = []
    for f in report.failovers:
        lines.append(
            f"FAILOVER active: {f.promoted} replaces lost {f.lost} since "
            f"{human_age(now - f.started_at)} ago (rules: {', '.join(f.rules) or '-'})"
        )
    for rule in report.rules:
        moved = (
            f" (configured from {rule.configured_source})"
            if rule.source != rule.configured_source
            else ""
        )
        lines.append(f"rule {rule.name}{moved}:")
        if rule.promoted_by is not None:
            f = rule.promoted_by
            lines.append(
                f"  source of rule {rule.name} is {f.promoted} (promoted after {f.lost} "
                f"was lost at {clock_time(f.started_at, tz)})"
            )
        if not rule.targets:
            lines.append("  no targets")
        for t in rule.targets:
            lines.append(f"  {describe_target(t, rule, now)}")
    lines.append(
        f"recovery point: {human_age(report.recovery_point_seconds)} "
        f"({report.pending} changes pending, {report.dead} dead letters)"
    )
    lines += [describe_ratelimit(s, b, now) for s, b in sorted(report.ratelimits.items())]
    return lines


__all__: Sequence[str] = [
    "FailoverInfo",
    "RuleStatus",
    "RunInfo",
    "StatusReport",
    "StatusRows",
    "TargetStatus",
    "check_thresholds",
    "clock_time",
    "compute_status",
    "describe_ratelimit",
    "describe_run",
    "describe_target",
    "format_status",
    "human_age",
    "latest_ratelimits",
]
