"""`registry-replicator status`: lag, pending work, last reconcile and failovers, per rule and
target, from the journal alone (no registry is contacted, so it works during an incident);
with `mqtt` configured, also every instance's queue and lag from their retained status
messages on the broker (`replicator.fleet`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from replicator.config import MqttConfig, add_config_argument, load_config
from replicator.durations import parse_duration
from replicator.errors import ConfigError

if TYPE_CHECKING:
    from replicator.fleet import FleetView

DESCRIPTION = """\
Per rule and target: changes not yet replicated (pending tasks) and the lag
(age of the oldest of them), dead letters, when a copy last landed, and the
last reconcile run; then the active failovers and the recovery point (the
largest lag of any target). Read from the journal only: registries are not
contacted.

With `mqtt` configured, it also reads every instance's retained status
message from the broker (for about a second, 3 s at most) and shows a table
of instances: state (online, stopped, offline when its connection was lost,
stale when an online instance has been silent for 3 status intervals), its
journal's queued, running, retry and dead tasks, its lag (age of its oldest
unfinished task), when it last handled an event and when it was last heard
from (marked * when by the instance's own clock: the broker kept no message
expiry, as across an MQTT 3.1.1 bridge). A status message that cannot be read
is skipped and named in one line. A broker that cannot be reached is named in
one line; the journal's part is still shown, and the exit status is 1.

For cron and monitoring checks, --max-lag and --max-dead turn the report into
a test: each exceeded limit is named on stderr (and under "exceeded" with
--json) and the exit status is 1.

Exit status: 0 shown (and within the limits given), 1 a limit exceeded or
the MQTT broker unreachable, 2 bad configuration, journal or usage.
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
    p.add_argument(
        "--no-instances",
        action="store_true",
        help="do not ask the MQTT broker for the instances' status (journal only)",
    )
    p.add_argument(
        "--max-lag",
        type=_duration,
        metavar="DURATION",
        help="exit 1 when any target in force lags more than this (e.g. 5m, 1h)",
    )
    p.add_argument(
        "--max-dead",
        type=_count,
        metavar="N",
        help="exit 1 when there are more than N dead letters (0: any dead letter)",
    )
    p.set_defaults(handler=run)


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"a whole number of dead letters, got {text!r}")
    return int(text)


def run(args: argparse.Namespace) -> int:
    from replicator.fleet import format_fleet
    from replicator.journal import Journal
    from replicator.status import check_thresholds, compute_status, format_status, human_age

    config = load_config(args.config)
    if not Path(config.journal).exists():  # reading must not create one at a wrong path
        raise ConfigError(
            f"no journal at {config.journal}: nothing has run with this configuration yet "
            "(or the path is wrong)",
            "journal",
        )
    journal = Journal(config.journal, read_only=True)  # never changes the daemon's journal
    try:
        report = compute_status(config, asyncio.run(journal.status.rows()))
    finally:
        journal.close()
    fleet, unreachable = _fleet(config.mqtt) if not args.no_instances else (None, None)
    limited = args.max_lag is not None or args.max_dead is not None
    exceeded = check_thresholds(report, args.max_lag, args.max_dead)
    if args.json:
        payload = report.as_dict()
        if limited:
            payload["exceeded"] = exceeded
        if fleet is not None:
            payload["fleet"] = fleet.as_dict()
        if unreachable is not None:
            payload["fleet_error"] = unreachable
        print(json.dumps(payload, sort_keys=True, allow_nan=False))
    else:
        lines = format_status(report, config.tzinfo)
        if fleet is not None:
            lines += format_fleet(fleet, human_age)
        if unreachable is not None:
            lines.append(f"instances: unknown, {unreachable}")
        print("\n".join(lines))
    for problem in exceeded:
        print(f"registry-replicator: status: {problem}", file=sys.stderr)
    if unreachable is not None:
        print(f"registry-replicator: status: {unreachable}", file=sys.stderr)
    return 1 if exceeded or unreachable is not None else 0


def _fleet(mqtt: MqttConfig | None) -> tuple[FleetView | None, str | None]:
    """The instances' retained status, or why the broker could not tell."""
    if mqtt is None:
        return None, None
    from replicator.daemon.bus import BusError
    from replicator.daemon.fleet_status import read_fleet

    try:
        return asyncio.run(read_fleet(mqtt)), None
    except BusError as exc:
        return None, str(exc)
