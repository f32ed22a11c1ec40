"""Run the configured GC policies, site by site: the one entry point the CLI `gc`
command, the daemon's schedule and the demo share.

Per site: the API pass (api/both policies) first, so the registry itself deletes
manifests and tells its listeners; then the storage pass (storage/both), which
reclaims the bytes online-safely (see `storage`). The storage pass's blob grace
is the longest grace of the site's storage policies: the most careful wins.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from replicator.errors import ConfigError
from replicator.gc.api import ApiGCOptions, SourceLookup, collect_api
from replicator.gc.follow import source_holds
from replicator.gc.policy import RetentionPolicy
from replicator.gc.storage import DEFAULT_WORKERS, GCResult, StorageGCOptions, collect_storage
from replicator.journal import Journal


@dataclass(frozen=True)
class StorageTuning:
    """Operator overrides for the storage pass (see StorageGCOptions)."""

    assume_no_cache: bool = False  # vouch that no blob-descriptor cache can go stale
    workers: int = DEFAULT_WORKERS  # threads for renames and deletions
    # wait the quarantine window and delete in this run (the daemon: in the background);
    # False: leave quarantined items journaled for a later run (the CLI's default)
    settle: bool = True


@dataclass
class SiteGCResult:
    """Both passes on one site. A manifest or blob both passes name counts once (a dry
    run cannot let the API pass delete first); bytes are what left the disk when the
    storage pass ran, else what the API pass unlinked."""

    site: str
    dry_run: bool
    api: GCResult | None = None
    storage: GCResult | None = None
    deleted_manifests: set[str] = field(default_factory=set, repr=False)  # see GCResult
    deleted_blobs: set[str] = field(default_factory=set, repr=False)

    @property
    def manifests_deleted(self) -> int:
        return len(self.deleted_manifests)

    @property
    def blobs_deleted(self) -> int:
        return len(self.deleted_blobs)

    @property
    def bytes_reclaimed(self) -> int:
        if self.storage is not None:
            return self.storage.bytes_reclaimed
        return self.api.bytes_reclaimed if self.api else 0

    @property
    def quarantined(self) -> int:
        return self.storage.quarantined if self.storage else 0

    @property
    def restored(self) -> int:
        return self.storage.restored if self.storage else 0

    @property
    def waiting(self) -> int:
        """Items left in quarantine for a later run to settle."""
        return self.storage.waiting if self.storage else 0

    @property
    def waiting_bytes(self) -> int:
        return self.storage.waiting_bytes if self.storage else 0

    @property
    def deletable_after(self) -> float | None:
        return self.storage.deletable_after if self.storage else None

    @property
    def errors(self) -> list[str]:
        return [e for r in (self.api, self.storage) if r for e in r.errors]

    @property
    def warnings(self) -> list[str]:
        return [w for r in (self.api, self.storage) if r for w in r.warnings]

    @property
    def notes(self) -> list[str]:
        return [n for r in (self.api, self.storage) if r for n in r.notes]

    @property
    def items(self) -> list[dict[str, Any]]:
        """Every deletion (or, dry, every planned one), API pass first, with its site.
        What both passes name is listed once, by the API pass: in a dry run the storage
        pass plans what the API pass would already have deleted in the real one."""
        api = self.api.items if self.api else []
        done = {_item_key(i) for i in api}
        done |= {("tag", i["repository"], t) for i in api for t in i.get("tags", ())}
        done |= {("link", i["repository"], i["digest"]) for i in api if i["kind"] == "blob"}
        storage = (
            [i for i in self.storage.items if _item_key(i) not in done] if self.storage else []
        )
        return [{"site": self.site, **i} for i in api + storage]

    @property
    def kept(self) -> dict[str, int]:
        """Tags kept, by reason; the storage pass's count when it ran (it sees the tags the
        API pass left), else the API pass's."""
        r = self.storage or self.api
        return dict(r.kept) if r else {}

    def to_json(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "dry_run": self.dry_run,
            "manifests_deleted": self.manifests_deleted,
            "blobs_deleted": self.blobs_deleted,
            "bytes_reclaimed": self.bytes_reclaimed,
            "quarantined": self.quarantined,
            "restored": self.restored,
            "waiting": self.waiting,
            "waiting_bytes": self.waiting_bytes,
            "deletable_after": self.deletable_after,
            "errors": self.errors,
            "warnings": self.warnings,
            "notes": self.notes,
            "kept": self.kept,
            "api": self.api.to_json() if self.api else None,
            "storage": self.storage.to_json() if self.storage else None,
        }


async def run_policies(
    config: Any,
    journal: Journal,
    pool: Any,
    *,
    dry_run: bool = False,
    sites: Sequence[str] | None = None,
    policy_names: Sequence[str] | None = None,
    quarantine_window: float = 600.0,
    tuning: StorageTuning = StorageTuning(),
) -> list[SiteGCResult]:
    """`pool[site]` gives that site's RegistryClient (replicator.clients.ClientPool)."""
    chosen = [config.policy(n) for n in policy_names] if policy_names else list(config.gc.policies)
    if not chosen:
        raise ConfigError("no GC policies configured", "gc.policies")
    policies = [RetentionPolicy.from_config(p) for p in chosen]
    if sites:
        for s in sites:
            config.site(s)  # unknown site -> ConfigError naming it
        names = list(sites)
    else:
        names = [s for s in config.sites if any(p.applies_to_site(s) for p in policies)]
    out: list[SiteGCResult] = []
    for site in names:
        has_storage = config.site(site).storage is not None
        mine = [
            dataclasses.replace(p, mode=p.mode_for(has_storage))
            for p in policies
            if p.applies_to_site(site)
        ]
        api = [p for p in mine if p.mode in ("api", "both")]
        storage = [p for p in mine if p.mode in ("storage", "both")]
        if not mine:
            continue
        result = SiteGCResult(site=site, dry_run=dry_run)
        if storage and config.site(site).storage is None:
            raise ConfigError(
                f"policy {', '.join(p.name for p in storage)} has mode storage, "
                "which needs the registry's storage directory",
                f"sites.{site}.storage",
            )
        sc = config.site(site)
        sources = _source_lookup(config, pool, journal, site)
        if api:
            result.api = await collect_api(
                pool[site],
                journal,
                ApiGCOptions(
                    site=site, policies=api, dry_run=dry_run, storage=sc.storage, sources=sources
                ),
            )
        if storage:
            result.storage = await collect_storage(
                sc.storage,
                journal,
                StorageGCOptions(
                    site=site,
                    registry_api=pool[site],  # for the live blob-descriptor cache probe
                    grace=max(p.grace for p in storage),
                    quarantine_window=quarantine_window,
                    dry_run=dry_run,
                    registry_config=sc.registry_config,
                    assume_no_cache=tuning.assume_no_cache,
                    policies=storage,
                    workers=tuning.workers,
                    settle=tuning.settle,
                    sources=sources,
                ),
            )
        for r in (result.api, result.storage):
            if r is not None:
                result.deleted_manifests |= r.deleted_manifests
                result.deleted_blobs |= r.deleted_blobs
        out.append(result)
    return out


def _item_key(i: dict[str, Any]) -> tuple[str, str, str]:
    return (i["kind"], str(i.get("repository")), str(i.get("tag") or i.get("digest")))


def _source_lookup(config: Any, pool: Any, journal: Journal, site: str) -> SourceLookup:
    rules: list[Any] = []

    async def lookup(repo: str):
        if not rules:
            from replicator.sync import rules_in_force

            rules.extend(await rules_in_force(config, journal))
        return await source_holds(rules, pool, journal, site, repo)

    return lookup
