"""A model-based test of retention on a real registry (hypothesis RuleBasedStateMachine).

Random sequences of push, re-tag, tag delete, digest delete and GC (a dry run, then
the real run, under a random policy and pass: API without storage, API with
storage, storage) against one real distribution registry. The model is small on
purpose: it knows each tag's digest and when it was pushed, and whether the
registry's push time is knowable (a webhook in the journal, or the storage link
files when the pass reads them). After every GC it checks:

* no tag a policy keeps was deleted (every keep clause, recomputed here simply);
* nothing inside grace or of unknown age was deleted (tags and manifests);
* every image still tagged is complete (manifest and every blob GET-able), and so
  is every untagged manifest `untagged: keep` kept;
* the dry run listed exactly the items the real run deleted.

A push "happened" some hours ago: its webhook carries that time and its link files
and blob data are given that mtime, so both sources agree, as on a real registry.
Kept in its own module (no test here) so it can later be combined with the
replication model; `tests/test_gc_model.py` runs it bounded, and
`benchmarks/model_retention.py` runs it long.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from wcmatch import fnmatch as wfn

from replicator.events import RegistryEvent
from replicator.gc.api import ApiGCOptions, collect_api
from replicator.gc.policy import KeepRules, RetentionPolicy
from replicator.gc.storage import GCResult, StorageGCOptions, collect_storage
from replicator.journal import Journal
from replicator.registry.client import RegistryClient
from replicator.registry.site import SiteEndpoint
from tests.harness.images import ACCEPT, Pusher, assert_image_complete, layer_bytes

HOUR = 3600.0
TAGS = ("v1", "v2", "v10", "t1", "t2", "latest")
AGES = (0.0, 2.0, 5.0, 30.0)  # hours before now
PASSES = ("api", "api+storage", "storage")
_repos = itertools.count()


@dataclass
class Manifest:
    digest: str
    blobs: list[str]
    pushed: float  # latest push of this manifest (registry time)
    known_by_webhook: bool


@dataclass
class TagState:
    digest: str
    pushed: float
    known_by_webhook: bool


@dataclass
class Policy:
    tags: tuple[str, ...]
    most_recent: int | None
    pushed_within: float | None
    untagged: str
    grace: float

    def retention(self, repo: str, mode: str) -> RetentionPolicy:
        return RetentionPolicy(
            name="model",
            repositories=(repo,),
            keep=KeepRules(
                tags=self.tags, most_recent=self.most_recent, pushed_within=self.pushed_within
            ),
            untagged=self.untagged,
            grace=self.grace,
            mode=mode,
        )


policies = st.builds(
    Policy,
    tags=st.sampled_from([(), ("v1*",), ("t*", "latest")]),
    most_recent=st.sampled_from([None, 0, 1, 2, 3]),
    pushed_within=st.sampled_from([None, 3 * HOUR]),
    untagged=st.sampled_from(["keep", "delete"]),
    grace=st.sampled_from([0.0, HOUR]),
)


@dataclass
class Outcome:
    dry: GCResult
    real: GCResult
    policy: Policy
    gc_pass: str
    started: float
    before_tags: dict[str, TagState] = field(default_factory=dict)


class RetentionMachine(RuleBasedStateMachine):
    """Set `registry` (tests.harness.registry.Registry, running) and `workdir` on the
    class before running it."""

    registry: Any = None
    workdir: Path | None = None
    # what the GC runs did, over every example (so a run can show it was not vacuous)
    stats: dict[str, Any] = {"gc_runs": {}, "items_deleted": {}, "kept": {}}

    def __init__(self) -> None:
        super().__init__()
        assert self.registry is not None and self.workdir is not None
        self.reg = self.registry
        self.repo = f"model{os.getpid()}x{next(_repos)}"
        self.journal = Journal(self.workdir / f"{self.repo}.db")
        self.pusher = Pusher(self.reg.url)
        self.tags: dict[str, TagState] = {}
        self.manifests: dict[str, Manifest] = {}
        self.events = itertools.count()
        # webhooks reach the journal from the first hooked push on (the daemon started
        # then); what was pushed before has no history, as on a real upgrade
        self.daemon_running = False

    def teardown(self) -> None:
        self.pusher.close()
        self.journal.close()

    # --- registry side effects ---------------------------------------------------
    def _v2(self) -> Path:
        return Path(self.reg.storage) / "docker/registry/v2"

    def _set_time(self, path: Path, t: float) -> None:
        try:
            os.utime(path, (t, t))
        except FileNotFoundError:
            pass

    def _blob(self, digest: str) -> Path:
        h = digest.split(":", 1)[1]
        return self._v2() / "blobs/sha256" / h[:2] / h / "data"

    def _age_push(self, tag: str | None, m: Manifest, t: float) -> None:
        """Make the registry's files say what a push at `t` would have left."""
        repo_dir = self._v2() / "repositories" / self.repo
        h = m.digest.split(":", 1)[1]
        self._set_time(repo_dir / "_manifests/revisions/sha256" / h / "link", m.pushed)
        self._set_time(self._blob(m.digest), m.pushed)
        for b in m.blobs:
            self._set_time(repo_dir / "_layers/sha256" / b.split(":", 1)[1] / "link", m.pushed)
            self._set_time(self._blob(b), m.pushed)
        if tag is not None:
            tag_dir = repo_dir / "_manifests/tags" / tag
            self._set_time(tag_dir / "current/link", t)
            self._set_time(tag_dir / "index/sha256" / h / "link", t)

    def _webhook(self, tag: str | None, digest: str, t: float) -> None:
        ev = RegistryEvent(
            id=f"{self.repo}-{next(self.events)}",
            site="a",
            action="push",
            repository=self.repo,
            tag=tag,
            digest=digest,
            media_type="application/vnd.oci.image.manifest.v1+json",
            occurred_at=t,
            is_manifest=True,
        )
        asyncio.run(self.journal.events.record([ev]))

    def _record_push(self, tag: str | None, digest: str, blobs: list[str], age: float, hook: bool):
        hook = self.daemon_running = hook or self.daemon_running
        t = time.time() - age * HOUR
        m = self.manifests.get(digest)
        if m is None:
            m = self.manifests[digest] = Manifest(digest, blobs, t, hook)
        else:
            m.pushed = max(m.pushed, t)
            m.known_by_webhook = m.known_by_webhook or hook
        if hook:
            self._webhook(tag, digest, t)
        if tag is not None:
            self.tags[tag] = TagState(digest, t, hook)
        self._age_push(tag, m, t)

    # --- rules ---------------------------------------------------------------------
    @initialize()
    def start(self) -> None:
        self.pusher.push_blob(self.repo, b"{}")  # the repository exists from the start

    @rule(
        tag=st.sampled_from(TAGS) | st.none(),
        content=st.integers(0, 5),
        base=st.integers(0, 1),
        age=st.sampled_from(AGES),
        hook=st.booleans(),
    )
    def push(self, tag: str | None, content: int, base: int, age: float, hook: bool) -> None:
        layers = [layer_bytes(f"base{base}", 300), layer_bytes(f"{self.repo}-{content}", 200)]
        img = self.pusher.push_image(self.repo, tag, layers, created="2099-01-01T00:00:00Z")
        self._record_push(tag, img.digest, list(img.blobs), age, hook)

    @precondition(lambda self: bool(self.live_manifests()))
    @rule(data=st.data(), tag=st.sampled_from(TAGS), age=st.sampled_from(AGES), hook=st.booleans())
    def retag(self, data: st.DataObject, tag: str, age: float, hook: bool) -> None:
        digest = data.draw(st.sampled_from(self.live_manifests()))
        r = self.pusher.get_manifest(self.repo, digest)
        assert r.status_code == 200, f"{self.repo}@{digest}: {r.status_code}"
        self.pusher.push_manifest(self.repo, tag, r.content, r.headers["content-type"])
        self._record_push(tag, digest, self.manifests[digest].blobs, age, hook)

    @precondition(lambda self: bool(self.tags))
    @rule(data=st.data())
    def delete_tag(self, data: st.DataObject) -> None:
        tag = data.draw(st.sampled_from(sorted(self.tags)))

        async def go() -> None:
            async with RegistryClient(SiteEndpoint(name="a", url=self.reg.url, insecure=True)) as c:
                await c.delete_tag(self.repo, tag)

        asyncio.run(go())
        del self.tags[tag]

    @precondition(lambda self: bool(self.live_manifests()))
    @rule(data=st.data())
    def delete_digest(self, data: st.DataObject) -> None:
        digest = data.draw(st.sampled_from(self.live_manifests()))
        r = httpx.delete(f"{self.reg.url}/v2/{self.repo}/manifests/{digest}")
        assert r.status_code in (202, 404), r.text
        self.manifests.pop(digest)
        self.tags = {t: s for t, s in self.tags.items() if s.digest != digest}

    @rule(policy=policies, gc_pass=st.sampled_from(PASSES))
    def gc(self, policy: Policy, gc_pass: str) -> None:
        started = time.time()
        before = dict(self.tags)
        dry = self._run_gc(policy, gc_pass, dry_run=True)
        real = self._run_gc(policy, gc_pass, dry_run=False)
        assert real.errors == [], real.errors
        assert item_keys(dry) == item_keys(real), (item_keys(dry), item_keys(real))
        out = Outcome(dry, real, policy, gc_pass, started, before)
        _count(self.stats["gc_runs"], gc_pass)
        for i in real.items:
            _count(self.stats["items_deleted"], i["kind"])
        for reason, n in real.kept.items():
            _count(self.stats["kept"], reason, n)
        self._check_kept(out)
        self._sync_model()

    # --- GC and the checks ----------------------------------------------------------
    def _run_gc(self, policy: Policy, gc_pass: str, *, dry_run: bool) -> GCResult:
        if gc_pass == "storage":
            opts = StorageGCOptions(
                site="a",
                grace=policy.grace,
                quarantine_window=0,
                registry_config=self.reg.config_path,
                workers=2,
                dry_run=dry_run,
                policies=[policy.retention(self.repo, "storage")],
            )
            return asyncio.run(collect_storage(self.reg.storage, self.journal, opts))

        async def go() -> GCResult:
            async with RegistryClient(SiteEndpoint(name="a", url=self.reg.url, insecure=True)) as c:
                return await collect_api(
                    c,
                    self.journal,
                    ApiGCOptions(
                        site="a",
                        policies=[policy.retention(self.repo, "api")],
                        dry_run=dry_run,
                        repositories=[self.repo],
                        storage=self.reg.storage if gc_pass == "api+storage" else None,
                    ),
                )

        return asyncio.run(go())

    def _age_known(self, known_by_webhook: bool, gc_pass: str) -> bool:
        return known_by_webhook or gc_pass != "api"

    def _kept_tags(self, out: Outcome) -> set[str]:
        """The tags the policy must keep, recomputed from the model."""
        p, now = out.policy, out.started
        kept: set[str] = set()
        ranked = []
        for tag, s in out.before_tags.items():
            if not self._age_known(s.known_by_webhook, out.gc_pass):
                kept.add(tag)  # unknown age: too young to delete
                continue
            named = bool(p.tags) and any(wfn.fnmatch(tag, g, flags=wfn.BRACE) for g in p.tags)
            if not named:  # most_recent counts the tags keep.tags does not name
                ranked.append((-s.pushed, tag))
            if now - s.pushed < p.grace or named:
                kept.add(tag)
            if p.pushed_within is not None and now - s.pushed <= p.pushed_within:
                kept.add(tag)
        if p.most_recent:
            kept |= {tag for _, tag in sorted(ranked)[: p.most_recent]}
        return kept

    def _check_kept(self, out: Outcome) -> None:
        held = self.registry_tags()
        for tag in self._kept_tags(out):
            assert held.get(tag) == out.before_tags[tag].digest, (
                f"{tag} was kept by the policy but is {held.get(tag)} after {out.gc_pass} gc"
            )
        now = out.started
        for d, m in self.manifests.items():
            young = now - m.pushed < out.policy.grace
            unknown = not self._age_known(m.known_by_webhook, out.gc_pass)
            if young or unknown:
                assert self.head(d) == 200, f"{d} within grace or of unknown age was deleted"
        for tag in held:
            assert_image_complete(self.reg.url, self.repo, tag)
        if out.policy.untagged == "keep":
            tagged = set(held.values())
            for d in self.manifests:
                if d not in tagged and self.head(d) == 200:
                    assert_image_complete(self.reg.url, self.repo, d)

    def _sync_model(self) -> None:
        """The model follows what the registry now holds (the checks above passed)."""
        held = self.registry_tags()
        self.tags = {t: s for t, s in self.tags.items() if held.get(t) == s.digest}
        self.manifests = {d: m for d, m in self.manifests.items() if self.head(d) == 200}

    # --- reading the registry ------------------------------------------------------
    def head(self, ref: str) -> int:
        return httpx.head(
            f"{self.reg.url}/v2/{self.repo}/manifests/{ref}", headers={"accept": ACCEPT}
        ).status_code

    def registry_tags(self) -> dict[str, str]:
        out = {}
        for t in self.pusher.tags(self.repo):
            r = httpx.head(
                f"{self.reg.url}/v2/{self.repo}/manifests/{t}", headers={"accept": ACCEPT}
            )
            if r.status_code == 200:
                out[t] = r.headers["docker-content-digest"]
        return out

    def live_manifests(self) -> list[str]:
        """In push order: digests differ between examples (each has its own repository
        name in its layers), and hypothesis must see the same choices give the same
        state."""
        return list(self.manifests)

    @invariant()
    def model_matches_registry_tags(self) -> None:
        held = self.registry_tags()
        assert held == {t: s.digest for t, s in self.tags.items()}, (held, self.tags)


def item_keys(res: GCResult) -> list[tuple[str, str, str]]:
    return sorted(
        (i["kind"], str(i.get("repository") or ""), str(i.get("tag") or i.get("digest") or ""))
        for i in res.items
    )


def _count(into: dict[str, int], key: str, n: int = 1) -> None:
    into[key] = into.get(key, 0) + n
