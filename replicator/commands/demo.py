"""`registry-replicator demo`: a narrated local demo on real registries."""

from __future__ import annotations

import argparse
import asyncio

DESCRIPTION = """\
Start three local docker-registry processes as three regions (us-east,
eu-west, ap-south), run the daemon with the packaged demo.yaml (see
examples/demo.yaml), push sample images to us-east (apps sharing a base layer,
a multi-arch index, a signature), show them arriving in the two replicas with
what was mounted versus uploaded, delete a tag and watch the deletion
propagate, then garbage-collect the replicas' storage and show what was
reclaimed. Everything started is stopped at the end; with --keep it keeps
running, with the commands to try next printed, until Ctrl-C.

Needs Debian's docker-registry package (`bash .ci/setup` installs it).
Exit status 0 only if replication and GC did what was printed.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run a local demo on three real registries",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="smaller images, for CI and a first look")
    p.add_argument(
        "--keep",
        action="store_true",
        help="afterwards, keep the registries and the daemon running and print commands "
        "to try on them (Ctrl-C stops them); the working directory is kept",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from replicator.demo.run import run_demo

    return asyncio.run(run_demo(quick=args.quick, keep=args.keep))
