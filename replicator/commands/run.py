"""`registry-replicator run`: the daemon."""

from __future__ import annotations

import argparse
import asyncio

from replicator.config import add_config_argument

DESCRIPTION = """\
Run the replication daemon in the foreground (systemd runs it as a Type=notify
service). One process serves, on `listen`:

  POST /events/{site}   registry webhooks (distribution, Harbor, CloudEvents),
                        answered 2xx only once the event is durable
  GET  /healthz         alive
  GET  /readyz          journal writable, broker connected (when configured)
  GET  /metrics         Prometheus text

and runs the event bus (MQTT when `mqtt` is configured, else in-process), a
pool of replication workers, each rule's periodic reconcile (`interval` or
`schedule`) and the GC schedule (`gc.schedule`).

Signals: SIGTERM/SIGINT drain in-flight copies (bounded by --drain-timeout)
and exit 0; SIGHUP reloads the configuration without dropping queued work (an
invalid file is refused and the running configuration kept). Logs are JSON
lines when stderr is not a terminal (--log-format), at level info unless
--log-level says otherwise; under systemd each line carries its syslog
priority, so `journalctl -p warning` filters them.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run the daemon (webhooks, MQTT, workers, schedules)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_argument(p)
    p.add_argument(
        "--workers",
        type=int,
        default=8,
        metavar="N",
        help="replication tasks run at once (default 8; each site's "
        "limits.concurrency still applies)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=8.0,
        metavar="SECONDS",
        help="on SIGTERM, wait this long for in-flight copies (default 8); what still "
        "runs then is cancelled and gets 5 s more before the process exits without it",
    )
    p.add_argument(
        "--retry-base",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="first retry delay of a failed task; doubles per attempt up to 10 "
        "minutes, with jitter (default 2)",
    )
    p.add_argument(
        "--lease-time",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="term of a task lease; a running task renews it every third of the term, "
        "and a lease not renewed for a whole term (a crashed or frozen daemon) returns "
        "to the queue for any daemon on the journal (default 60)",
    )
    p.add_argument(
        "--instance-id",
        metavar="ID",
        help="this instance's name for task leases and the MQTT session (default: "
        "mqtt.client_id, else a stable id from the journal: <installation>-<slot>, "
        "the same after every restart; daemons sharing a journal get distinct slots)",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import logging
    import os

    from replicator.daemon.service import Daemon
    from replicator.logs import LOG_LEVEL_ENV

    explicit = args.log_level or os.environ.get(LOG_LEVEL_ENV)
    if not explicit and logging.getLogger().level > logging.INFO:
        logging.getLogger().setLevel(logging.INFO)  # a daemon reports what it does

    async def main() -> int:
        daemon = Daemon(
            args.config,
            instance_id=args.instance_id,
            workers=args.workers,
            drain_timeout=args.drain_timeout,
            retry_base=args.retry_base,
            lease_seconds=args.lease_time,
        )
        code = await daemon.run()
        if daemon.abandoned:
            # asyncio.run would wait for them (and their threads) at exit: go without
            logging.shutdown()
            os._exit(code)
        return code

    return asyncio.run(main())
