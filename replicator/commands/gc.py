"""`registry-replicator gc`: apply the configured retention policies and reclaim storage."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from replicator.config import add_config_argument, load_config
from replicator.errors import ConfigError, UsageError

DESCRIPTION = """\
Run garbage collection for the sites the `gc.policies` cover (or one --site).

mode api      delete expired tags/manifests through the registry API;
mode storage  mark-and-sweep the registry's storage directory (sites.<name>.storage)
              while the registry stays online: unreferenced blobs, dangling layer
              links and stale uploads are quarantined, re-checked after a window and
              only then deleted; refused when the registry's config
              (sites.<name>.registry_config) enables the blob-descriptor cache, unless
              --assume-no-cache;
mode both     the API pass, then the storage pass.

--dry-run reports exactly what would be deleted and changes nothing.
Exit status: 0 done, 1 some deletions failed, 2 configuration or usage error.
"""

JSON_FIELDS = ("dry_run", "manifests_deleted", "blobs_deleted", "bytes_reclaimed",
               "quarantined", "restored", "errors")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gc", help="apply retention policies and reclaim storage",
                       description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_argument(p)
    p.add_argument("--site", metavar="S", help="only this site")
    p.add_argument("--policy", metavar="P", action="append", default=[],
                   help="only this policy (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="report, change nothing")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: " + ", ".join(JSON_FIELDS))
    p.add_argument("--assume-no-cache", action="store_true",
                   help="vouch that the registry has no blob-descriptor cache (or is "
                        "read-only/stopped) when its config cannot be checked")
    p.add_argument("--quarantine-window", metavar="DURATION", default="10m",
                   help="how long removed storage items wait before deletion (default 10m)")
    p.add_argument("--workers", type=int, default=8, metavar="N",
                   help="filesystem threads for the storage pass (default 8)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from replicator.durations import parse_duration

    try:
        window = parse_duration(args.quarantine_window)
    except ValueError as exc:
        raise UsageError(f"--quarantine-window: {exc}") from None
    if args.workers < 1:
        raise UsageError("--workers must be at least 1")
    config = load_config(args.config)
    totals = asyncio.run(_gc(config, args, window))
    if args.json:
        print(json.dumps({k: totals[k] for k in JSON_FIELDS} | {"sites": totals["sites"]},
                         sort_keys=True))
    else:
        verb = "would delete" if args.dry_run else "deleted"
        print(f"gc: {verb} {totals['manifests_deleted']} manifests, "
              f"{totals['blobs_deleted']} blobs, {totals['bytes_reclaimed']} bytes; "
              f"quarantined {totals['quarantined']}, restored {totals['restored']}")
        for w in totals["warnings"]:
            print(f"warning: {w}", file=sys.stderr)
        for e in totals["errors"]:
            print(f"error: {e}", file=sys.stderr)
    return 1 if totals["errors"] else 0


async def _gc(config: Any, args: argparse.Namespace, window: float) -> dict[str, Any]:
    from replicator.gc.api import ApiGCOptions, collect_api
    from replicator.gc.policy import RetentionPolicy
    from replicator.gc.storage import StorageGCOptions, collect_storage
    from replicator.journal import Journal
    from replicator.registry.client import RegistryClient

    chosen = [config.policy(name) for name in args.policy] if args.policy \
        else list(config.gc.policies)
    if not chosen:
        raise ConfigError("no GC policies configured", "gc.policies")
    policies = [RetentionPolicy.from_config(p) for p in chosen]
    if args.site:
        config.site(args.site)                     # unknown site -> ConfigError
        sites = [args.site]
    else:
        sites = [s for s in config.sites if any(p.applies_to_site(s) for p in policies)]
    totals: dict[str, Any] = {"dry_run": bool(args.dry_run), "manifests_deleted": 0,
                              "blobs_deleted": 0, "bytes_reclaimed": 0, "quarantined": 0,
                              "restored": 0, "errors": [], "warnings": [], "sites": {}}
    journal = Journal(config.journal)
    try:
        for site in sites:
            mine = [p for p in policies if p.applies_to_site(site)]
            api = [p for p in mine if p.mode in ("api", "both")]
            storage = [p for p in mine if p.mode in ("storage", "both")]
            if not mine:
                continue
            per_site: dict[str, Any] = {}
            seen: dict[str, set[str]] = {"manifests": set(), "blobs": set()}
            storage_bytes: int | None = None
            api_bytes = 0
            if api:
                async with RegistryClient(config.site_endpoint(site)) as client:
                    res = await collect_api(client, journal, ApiGCOptions(
                        site=site, policies=api, dry_run=args.dry_run))
                per_site["api"] = res.to_json()
                _add(totals, res, site, seen)
                api_bytes = res.bytes_reclaimed
            if storage:
                sc = config.site(site)
                if sc.storage is None:
                    names = ", ".join(p.name for p in storage)
                    raise ConfigError(f"policy {names} has mode storage, which needs the "
                                      "registry's storage directory", f"sites.{site}.storage")
                res = await collect_storage(sc.storage, journal, StorageGCOptions(
                    site=site, grace=max(p.grace for p in storage), quarantine_window=window,
                    dry_run=args.dry_run, registry_config=sc.registry_config,
                    assume_no_cache=args.assume_no_cache, policies=storage,
                    workers=args.workers))
                per_site["storage"] = res.to_json()
                _add(totals, res, site, seen)
                storage_bytes = res.bytes_reclaimed
            # both passes may name the same manifest or blob (a dry run cannot let the API
            # pass delete first): count each once; bytes are what left the disk if we saw it
            totals["manifests_deleted"] += len(seen["manifests"])
            totals["blobs_deleted"] += len(seen["blobs"])
            totals["bytes_reclaimed"] += storage_bytes if storage_bytes is not None \
                else api_bytes
            totals["sites"][site] = per_site
    finally:
        journal.close()
    return totals


def _add(totals: dict[str, Any], res: Any, site: str, seen: dict[str, set[str]]) -> None:
    seen["manifests"] |= res.deleted_manifests
    seen["blobs"] |= res.deleted_blobs
    for k in ("quarantined", "restored"):
        totals[k] += getattr(res, k)
    totals["errors"] += [f"{site}: {e}" for e in res.errors]
    totals["warnings"] += [f"{site}: {w}" for w in res.warnings]
