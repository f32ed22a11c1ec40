"""`registry-replicator copy SRC DST`: copy one image, index or artifact between registries."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys

from replicator.errors import UsageError
from replicator.manifest import Platform
from replicator.refs import ImageRef, parse_ref
from replicator.text import human_bytes

DESCRIPTION = """\
Copy one artifact (image, multi-arch index, or OCI artifact, with its referrers)
from SRC to DST. References look like 127.0.0.1:5001/team/app:v1 or
127.0.0.1:5001/team/app@sha256:<hex>, optionally with skopeo's docker:// prefix.
Without a registry host they are on Docker Hub, as with docker and skopeo:
nginx is docker.io/library/nginx:latest, user/app is docker.io/user/app
(docker.io, index.docker.io and registry-1.docker.io are one registry). When
DST has no tag, the source tag is used.

Blobs already at the target are skipped, blobs present in another repository of
the target registry are mounted, and everything else is streamed with its digest
verified. Credentials come from the docker config.json (--docker-config, or
$DOCKER_CONFIG/config.json, or ~/.docker/config.json when present), running its
credential helpers (credHelpers, credsStore), else from the containers auth.json
podman and skopeo use ($REGISTRY_AUTH_FILE, $XDG_RUNTIME_DIR/containers/auth.json
or ~/.config/containers/auth.json, when present).

Exit status: 0 copied or already up to date, 1 failed (or a conflict with
--no-overwrite), 2 usage error.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "copy",
        help="copy one image between registries",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", metavar="SRC", help="source reference, [docker://]host:port/repo:tag")
    p.add_argument(
        "target", metavar="DST", help="target reference, [docker://]host:port/repo[:tag]"
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="use plain http / skip TLS verification for both registries",
    )
    p.add_argument(
        "--platform",
        action="append",
        default=[],
        metavar="OS/ARCH[/VARIANT]",
        help="copy only these platforms of a multi-arch index (repeatable)",
    )
    p.add_argument(
        "--no-referrers",
        action="store_true",
        help="do not copy signatures, SBOMs and other referrers",
    )
    p.add_argument(
        "--no-overwrite",
        action="store_true",
        help="leave a target tag that points at different content alone (exit 1)",
    )
    p.add_argument(
        "--docker-config", metavar="FILE", help="docker config.json with credentials (auths)"
    )
    p.add_argument(
        "--journal",
        metavar="FILE",
        help="SQLite journal whose blob index enables mounts across runs",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=5,
        metavar="N",
        help="retries of a failed request (connection errors, 5xx, 429; default 5)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object with the counts")
    p.set_defaults(handler=run)


def _endpoint(ref: ImageRef, insecure: bool, docker_config: str | None):
    from replicator.registry.site import SiteEndpoint

    site = SiteEndpoint.from_url(ref.registry, insecure=insecure, name=ref.registry)
    site.docker_config = docker_config
    site.auth_file = _auth_file_path()
    return site


def _auth_file_path() -> str | None:
    """The containers auth.json skopeo would read here, if there is one."""
    from replicator.registry.credfiles import default_auth_file

    path = default_auth_file()
    return str(path) if path.is_file() else None


def _docker_config_path(explicit: str | None) -> str | None:
    import os
    from pathlib import Path

    if explicit:
        if not Path(explicit).is_file():
            raise UsageError(f"--docker-config {explicit}: no such file")
        return explicit
    base = os.environ.get("DOCKER_CONFIG")
    candidate = Path(base) / "config.json" if base else Path.home() / ".docker/config.json"
    return str(candidate) if candidate.is_file() else None


def run(args: argparse.Namespace) -> int:
    src = parse_ref(args.source)
    dst = parse_ref(args.target, default_tag=None)
    try:
        platforms = [Platform.parse(p) for p in args.platform]
    except ValueError as exc:
        raise UsageError(f"--platform: {exc}") from exc
    if args.retries < 0:
        raise UsageError("--retries must be 0 or more")
    docker_config = _docker_config_path(args.docker_config)
    result = asyncio.run(_copy(src, dst, platforms, args, docker_config))
    stats = result.stats
    if args.json:
        payload = {"status": result.status, "digest": result.digest, **stats.as_dict()}
        print(json.dumps(payload, sort_keys=True))
    elif result.status != "failed":
        print(
            f"{result.status}: {result.source} -> {result.target} ({result.digest}); "
            f"blobs uploaded {stats.blobs_uploaded}, mounted {stats.blobs_mounted}, "
            f"existing {stats.blobs_existing}, {human_bytes(stats.bytes_uploaded)} uploaded, "
            f"{human_bytes(stats.bytes_downloaded)} downloaded"
        )
    if result.status == "failed":
        print(f"registry-replicator: copy failed: {result.error}", file=sys.stderr)
        return 1
    if result.status == "conflict":
        print(
            f"registry-replicator: {result.target} points at {result.digest}, which differs "
            "from the source; left alone (--no-overwrite)",
            file=sys.stderr,
        )
        return 1
    return 0


async def _copy(
    src: ImageRef,
    dst: ImageRef,
    platforms: list[Platform],
    args: argparse.Namespace,
    docker_config: str | None,
):
    from replicator.blob_index import BlobIndex
    from replicator.copy import CopyEngine, CopyOptions
    from replicator.journal import Journal
    from replicator.progress import terminal_progress
    from replicator.registry.client import RegistryClient

    journal = Journal(args.journal) if args.journal else None
    progress = None if args.json else terminal_progress()
    engine = CopyEngine(BlobIndex(journal), progress=progress)
    options = CopyOptions(
        platforms=platforms or None,
        referrers=not args.no_referrers,
        overwrite=not args.no_overwrite,
    )
    src_site = _endpoint(src, args.insecure, docker_config)
    dst_site = _endpoint(dst, args.insecure, docker_config)
    tag = dst.tag or src.tag
    if dst.digest and src.digest and dst.digest != src.digest:
        raise UsageError("DST names a different digest than SRC")
    try:
        async with (
            RegistryClient(src_site, retries=args.retries) as src_client,
            RegistryClient(dst_site, retries=args.retries) as dst_client,
        ):
            cm = progress if progress is not None else contextlib.nullcontext()
            with cm:
                return await engine.copy(
                    src_client,
                    src.repository,
                    src.reference,
                    dst_client,
                    dst.repository,
                    tag=tag,
                    options=options,
                )
    finally:
        if journal is not None:
            journal.close()
