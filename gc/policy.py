"""Retention policies: which tags and manifests of one repository survive, and why.

Pure logic. A tag is kept when ANY keep clause keeps it (tag patterns, the N
most recently pushed, pushed within, pulled within) or when it is younger than
the grace period. Manifests are then kept by marking (see `mark`) from:

* the targets of kept tags,
* every manifest younger than the grace (a push in progress uploads children
  and referrers before the index or tag that makes them reachable), and every
  standalone manifest whose age is unknown (we cannot prove it is old; a child,
  referrer or attached-tag target of unknown age follows its parent/subject),
* with ``untagged: keep``, every *standalone* untagged manifest — one that is
  neither listed by an index nor a referrer. Children of an expired index and
  referrers of an expired image go with it; they were never independent images.

A tag's age is the registry's push time (see `ages`); an unknown age is never
"old": such a tag is kept ("push time unknown"), and ``most_recent: N`` ranks only
tags of known age that ``keep.tags`` does not already name, newest first, ties by
name, so it keeps exactly N of them ("latest plus the 2 most recent others").

``follow_source`` (a replica's policy, `SourceHolds`): a tag the rule's source
still holds and the rule covers is kept (deleting it here would only bring it back
at the next reconcile); a tag the rule covers that the source no longer holds is
deleted whatever the other keep clauses say — but never within grace or of
unknown age.

Tags of the form ``sha256-<hex>[.suffix]`` (the referrers fallback tag and
cosign's ``.sig``/``.att``/``.sbom`` tags) belong to the subject they name:
kept exactly when that subject is kept, never counted by ``most_recent``.
Everything the graph holds that marking does not reach is deleted.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from wcmatch import fnmatch as wfn
from wcmatch import glob as wglob

from replicator.gc.mark import Graph, MarkSet, mark, parents_index, referrers_index

UNTAGGED_CHOICES = ("delete", "keep")
MODES = ("auto", "api", "storage", "both")
_GLOB_FLAGS = wglob.GLOBSTAR | wglob.BRACE | wglob.EXTGLOB
_TAG_FLAGS = wfn.BRACE | wfn.EXTMATCH
ATTACHED_TAG_RE = re.compile(r"^(sha256|sha512)-([a-f0-9]{64}|[a-f0-9]{128})(\.[A-Za-z0-9_.-]+)?$")


@dataclass(frozen=True)
class KeepRules:
    tags: tuple[str, ...] = ()  # glob patterns on tag names
    most_recent: int | None = None  # the N most recently pushed tags
    pushed_within: float | None = None  # seconds
    pulled_within: float | None = None  # seconds; applies only where pull times are known

    def __post_init__(self) -> None:
        if self.most_recent is not None and self.most_recent < 0:
            raise ValueError("keep.most_recent must be >= 0")
        for name in ("pushed_within", "pulled_within"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"keep.{name} must not be negative")


@dataclass(frozen=True)
class RetentionPolicy:
    """A `gc.policies[]` entry with durations in seconds."""

    name: str
    sites: tuple[str, ...] = ()  # empty: every site
    repositories: tuple[str, ...] = ("**",)
    exclude_repositories: tuple[str, ...] = ()
    keep: KeepRules = field(default_factory=KeepRules)
    untagged: str = "delete"
    grace: float = 3600.0
    mode: str = "auto"  # see `mode_for`
    referrers: str = "follow-subject"  # or "keep": referrers are never deleted
    follow_source: bool = False  # a replica: follow what the rule's source holds

    def __post_init__(self) -> None:
        if self.untagged not in UNTAGGED_CHOICES:
            raise ValueError(
                f"policy {self.name}: untagged must be delete or keep, got {self.untagged!r}"
            )
        if self.mode not in MODES:
            raise ValueError(
                f"policy {self.name}: mode must be auto, api, storage or both, got {self.mode!r}"
            )
        if self.grace < 0:
            raise ValueError(f"policy {self.name}: grace must not be negative")
        if self.referrers not in ("follow-subject", "keep"):
            raise ValueError(
                f"policy {self.name}: referrers must be follow-subject or keep, "
                f"got {self.referrers!r}"
            )

    def mode_for(self, site_has_storage: bool) -> str:
        """The passes this policy runs on a site: `auto` reclaims storage where the site
        says where it is (both), and works through the API elsewhere."""
        if self.mode != "auto":
            return self.mode
        return "both" if site_has_storage else "api"

    def applies_to_site(self, site: str) -> bool:
        return not self.sites or any(wfn.fnmatch(site, p, flags=_TAG_FLAGS) for p in self.sites)

    def applies_to(self, repository: str) -> bool:
        """Repository globs: `*` stays within one path segment, `**` crosses them."""
        if not any(wglob.globmatch(repository, p, flags=_GLOB_FLAGS) for p in self.repositories):
            return False
        return not any(
            wglob.globmatch(repository, p, flags=_GLOB_FLAGS) for p in self.exclude_repositories
        )

    @classmethod
    def from_config(cls, obj: Any) -> RetentionPolicy:
        """Build from a config object (attributes) or a plain dict; durations may be
        seconds or strings such as '30d'."""
        get = _getter(obj)
        keep_obj = get("keep")
        kget = _getter(keep_obj or {})
        return cls(
            name=str(get("name") or "default"),
            sites=tuple(get("sites") or ()),
            repositories=tuple(get("repositories") or ("**",)),
            exclude_repositories=tuple(get("exclude_repositories") or ()),
            keep=KeepRules(
                tags=tuple(kget("tags") or ()),
                most_recent=kget("most_recent"),
                pushed_within=_seconds(kget("pushed_within")),
                pulled_within=_seconds(kget("pulled_within")),
            ),
            untagged=str(getattr(get("untagged"), "value", get("untagged")) or "delete"),
            grace=_seconds(get("grace")) or 0.0 if get("grace") is not None else 3600.0,
            mode=str(getattr(get("mode"), "value", get("mode")) or "auto"),
            referrers=str(get("referrers") or "follow-subject"),
            follow_source=bool(get("follow_source")),
        )


@dataclass(frozen=True)
class TagInfo:
    name: str
    digest: str
    pushed_at: float | None = None  # when the tag was (last) pushed or first seen
    pulled_at: float | None = None  # last pull, when known


@dataclass(frozen=True)
class SourceHolds:
    """For a `follow_source` policy: what the replicating rule's source holds of the
    repository this replica's repository is copied from."""

    source: str  # "site/repository", for reasons
    held: frozenset[str]  # tags the source holds now that the rule covers
    covers: Callable[[str], bool]  # whether the rule covers a tag name at all


KEPT_BY_SOURCE = "held by the source"
GONE_FROM_SOURCE = "gone from the source"
# how `summary` words each reason a tag was kept (the first one listed counts)
_SUMMARY_WORDS = (
    ("within grace", "younger than grace"),
    ("push time unknown", "age unknown"),
    (KEPT_BY_SOURCE, "held by the source (follow_source)"),
    ("matches keep.tags", "kept by keep.tags"),
    ("among", "kept by most_recent"),
    ("pushed within", "kept by pushed_within"),
    ("pulled within", "kept by pulled_within"),
    ("subject is kept", "kept with their subject"),
)


@dataclass
class Decision:
    """What one policy does to one repository, with a reason for every item."""

    kept_tags: dict[str, list[str]] = field(default_factory=dict)
    deleted_tags: dict[str, str] = field(default_factory=dict)
    kept_manifests: set[str] = field(default_factory=set)
    deleted_manifests: dict[str, str] = field(default_factory=dict)
    marked: MarkSet = field(default_factory=MarkSet)


def attached_subject(tag: str) -> str | None:
    """'sha256-<hex>.sig' -> 'sha256:<hex>' (the subject the tag belongs to)."""
    m = ATTACHED_TAG_RE.match(tag)
    return f"{m.group(1)}:{m.group(2)}" if m else None


def decide(
    policy: RetentionPolicy,
    tags: Sequence[TagInfo],
    manifests: Graph,
    now: float,
    follow: SourceHolds | None = None,
) -> Decision:
    """Apply `policy` to one repository: its tags and its manifest graph (and, for a
    `follow_source` policy, what the source holds)."""
    keep = policy.keep
    decision = Decision()

    def young(t: float | None) -> bool:
        """Known to be within the grace period. Unknown ages are handled per kind below."""
        return t is not None and now - t < policy.grace

    def named_by_keep_tags(name: str) -> bool:
        return any(wfn.fnmatch(name, p, flags=_TAG_FLAGS) for p in keep.tags)

    regular = [t for t in tags if attached_subject(t.name) is None]
    attached = [t for t in tags if attached_subject(t.name) is not None]
    reasons: dict[str, list[str]] = {t.name: [] for t in regular}
    gone_from_source: set[str] = set()
    for t in regular:
        r = reasons[t.name]
        if t.pushed_at is None:
            r.append("push time unknown")
        elif now - t.pushed_at < policy.grace:
            r.append("within grace")
        if follow is not None and t.name in follow.held:
            r.append(f"{KEPT_BY_SOURCE} {follow.source}")
        elif follow is not None and follow.covers(t.name):
            gone_from_source.add(t.name)  # only grace or an unknown age keeps it
            continue
        if named_by_keep_tags(t.name):
            r.append("matches keep.tags")
        if (
            keep.pushed_within is not None
            and t.pushed_at is not None
            and now - t.pushed_at <= keep.pushed_within
        ):
            r.append("pushed within keep.pushed_within")
        if (
            keep.pulled_within is not None
            and t.pulled_at is not None
            and now - t.pulled_at <= keep.pulled_within
        ):
            r.append("pulled within keep.pulled_within")
    if keep.most_recent:
        ranked = [
            t
            for t in regular
            if t.pushed_at is not None
            and t.name not in gone_from_source
            and not named_by_keep_tags(t.name)
        ]
        by_push = sorted(ranked, key=lambda t: (-(t.pushed_at or 0.0), t.name))
        for t in by_push[: keep.most_recent]:
            reasons[t.name].append(f"among {keep.most_recent} most recently pushed")

    roots: set[str] = set()
    for t in regular:
        if reasons[t.name]:
            decision.kept_tags[t.name] = reasons[t.name]
            roots.add(t.digest)
        elif t.name in gone_from_source and follow is not None:
            decision.deleted_tags[t.name] = f"{GONE_FROM_SOURCE} {follow.source}"
        else:
            decision.deleted_tags[t.name] = "no keep clause matched"

    tagged = {t.digest for t in tags}
    attached_targets = {t.digest for t in attached}
    parents = parents_index(manifests)
    for digest, node in manifests.items():
        standalone = (
            node.subject is None and digest not in parents and digest not in attached_targets
        )
        if young(node.pushed_at):
            roots.add(digest)
        elif node.pushed_at is None and standalone:
            roots.add(digest)  # age unknown: cannot prove it is old
        elif policy.untagged == "keep" and digest not in tagged and standalone:
            roots.add(digest)
        elif policy.referrers == "keep" and node.subject is not None:
            roots.add(digest)

    refs = referrers_index(manifests)
    attached_pending = list(attached)
    marked = mark(manifests, roots, referrers=refs)
    # Attached tags keep their target only while their subject is kept; a kept
    # target may itself be a subject, so repeat until nothing changes.
    changed = True
    while changed:
        changed = False
        for t in list(attached_pending):
            subject = attached_subject(t.name)
            if subject in marked.manifests or young(t.pushed_at):
                why = "subject is kept" if subject in marked.manifests else "within grace"
                decision.kept_tags[t.name] = [why]
                attached_pending.remove(t)
                if t.digest not in marked.manifests:
                    marked.update(mark(manifests, [t.digest], referrers=refs))
                    changed = True
    for t in attached_pending:
        decision.deleted_tags[t.name] = f"its subject {attached_subject(t.name)} is not kept"

    decision.marked = marked
    decision.kept_manifests = {d for d in manifests if d in marked.manifests}
    deleted_tag_targets: dict[str, list[str]] = {}
    for name in decision.deleted_tags:
        for t in tags:
            if t.name == name:
                deleted_tag_targets.setdefault(t.digest, []).append(name)
    for digest, node in manifests.items():
        if digest in marked.manifests:
            continue
        if digest in deleted_tag_targets:
            why = "all its tags expired: " + ", ".join(
                name + _unless_plain(decision.deleted_tags[name])
                for name in sorted(deleted_tag_targets[digest])
            )
        elif node.subject is not None:
            why = f"referrer of {node.subject}, which is not kept"
        elif digest in parents:
            why = "only listed by indexes that are not kept"
        else:
            why = "untagged"
        decision.deleted_manifests[digest] = why
    return decision


def _unless_plain(reason: str) -> str:
    return "" if reason == "no keep clause matched" else f" ({reason})"


def summary(kept_tags: Mapping[str, Sequence[str]]) -> Counter[str]:
    """Why tags were kept, each tag counted once under its first reason:
    {"kept by most_recent": 12, "younger than grace": 3}."""
    out: Counter[str] = Counter()
    for reasons in kept_tags.values():
        first = reasons[0] if reasons else ""
        word = next((w for key, w in _SUMMARY_WORDS if first.startswith(key)), first)
        out[word] += 1
    return out


def policies_for(
    policies: Iterable[RetentionPolicy], site: str, repository: str, mode: str
) -> RetentionPolicy | None:
    """The first policy (config order) that covers this site, repository and mode."""
    for p in policies:
        # "auto" was resolved by whoever chose to run this pass (run_policies)
        if (
            p.applies_to_site(site)
            and p.applies_to(repository)
            and p.mode in (mode, "both", "auto")
        ):
            return p
    return None


def _getter(obj: Any):
    if isinstance(obj, Mapping):
        return obj.get
    return lambda name: getattr(obj, name, None)


def _seconds(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hasattr(value, "total_seconds"):
        return float(value.total_seconds())
    from replicator.durations import parse_duration

    return parse_duration(str(value))
