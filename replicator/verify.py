"""Drift between a rule's source and its targets: what `verify` reports. Pure: no I/O.

Given what was observed of one source repository (its tag list, the digest of
every tag the rule covers) and of one target repository (its tag list, the
digest of the covered tags it holds), `compare` says which tags are missing,
point elsewhere, or (where the rule propagates deletes) linger at the target
after the source dropped them. Keeping this pure lets every case be tested
without a registry, and keeps the listing and HEADs (replicator/verifier.py)
free of decisions.

Which tags a rule covers is `sync`'s decision, reached here through
`covered_tags` and `covered_after_delete` only, so the two cannot disagree.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from replicator.config import Rule
from replicator.planner import selected_tags
from replicator.rules import tag_passes
from replicator.text import short_digest

DriftKind = Literal["missing", "different", "extra", "incomplete"]
DRIFT_KINDS: tuple[DriftKind, ...] = ("missing", "different", "extra", "incomplete")


# ---- the rule's decision (the same as sync's planner) ------------------------------------------


def covered_tags(
    rule: Rule, source_tags: Iterable[str], pushed_at: Mapping[str, float] | None = None
) -> list[str]:
    """The source tags `rule` replicates now: exactly what `sync` plans to copy."""
    return selected_tags(rule, dict.fromkeys(source_tags, ""), pushed_at)


def covered_after_delete(rule: Rule, tag: str) -> bool:
    """Whether a tag the source no longer has is the rule's to delete (its filters alone,
    as `sync`'s planner judges deletes)."""
    return tag_passes(rule.tags, tag)


# ---- observations and drift ---------------------------------------------------------------------


@dataclass(frozen=True)
class SourceRepository:
    """One source repository as observed for one rule."""

    repository: str
    tags: Collection[str]  # every tag the source lists
    digests: Mapping[str, str]  # covered tag -> digest at the source (absent: vanished meanwhile)
    # covered tag -> digest a copy writes, where that differs (a platform-filtered index)
    written: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TargetRepository:
    """One target repository as observed: its tag list and the covered tags' digests."""

    site: str
    repository: str
    listed: Collection[str]  # every tag the target lists
    digests: Mapping[str, str | None]  # covered tag -> digest at the target (None: absent)


@dataclass(frozen=True)
class Drift:
    rule: str
    target: str
    repository: str  # at the source
    target_repository: str
    tag: str
    kind: DriftKind
    source_digest: str | None
    target_digest: str | None
    blob: str | None = None  # incomplete: the manifest or blob absent at the target

    def as_dict(self) -> dict[str, str | None]:
        return {
            "rule": self.rule,
            "target": self.target,
            "repository": self.repository,
            "target_repository": self.target_repository,
            "tag": self.tag,
            "kind": self.kind,
            "source_digest": self.source_digest,
            "target_digest": self.target_digest,
            "blob": self.blob,
        }

    def describe(self) -> str:
        where = f"{self.target}/{self.target_repository}:{self.tag}"
        if self.kind == "missing":
            return f"missing    {where} (source has {short_digest(self.source_digest)})"
        if self.kind == "different":
            return (
                f"different  {where} is {short_digest(self.target_digest)}, source has "
                f"{short_digest(self.source_digest)}"
            )
        if self.kind == "extra":
            return f"extra      {where} (gone from {self.repository} at the source)"
        return f"incomplete {where} ({short_digest(self.target_digest)}): {self.blob} absent"


def compare(rule: Rule, source: SourceRepository, target: TargetRepository) -> list[Drift]:
    """The drift of one (rule, repository, target), ordered by tag.

    A covered tag is in sync when the target holds the source's digest or the
    digest the copy writes (`written`); "extra" is a target tag the source no
    longer lists, reported only where the rule propagates deletes.
    """
    found: list[Drift] = []

    def drift(kind: DriftKind, tag: str, src: str | None, dst: str | None) -> None:
        found.append(
            Drift(rule.name, target.site, source.repository, target.repository, tag, kind, src, dst)
        )

    for tag in sorted(source.digests):
        want = source.digests[tag]
        have = target.digests.get(tag)
        if have is None:
            drift("missing", tag, want, None)
        elif have not in (want, source.written.get(tag)):
            drift("different", tag, want, have)
    if rule.deletes:
        for tag in sorted(set(target.listed) - set(source.tags)):
            if covered_after_delete(rule, tag):
                drift("extra", tag, None, target.digests.get(tag))
    return found


def in_sync(source: SourceRepository, target: TargetRepository) -> list[str]:
    """Covered tags the target holds as replicated: what `--deep` checks blob by blob."""
    held = {t: d for t, d in target.digests.items() if d is not None}
    return [
        tag
        for tag, want in sorted(source.digests.items())
        if tag in held and held[tag] in (want, source.written.get(tag))
    ]


# ---- the report ---------------------------------------------------------------------------------


@dataclass
class TargetSummary:
    """One (rule, target): tags compared and drifting tags by kind."""

    rule: str
    target: str
    checked: int = 0
    drift: Counter[str] = field(default_factory=Counter)

    def line(self) -> str:
        counts = ", ".join(f"{self.drift[k]} {k}" for k in DRIFT_KINDS if self.drift[k])
        state = f"drift: {counts}" if counts else "in sync"
        return f"{self.rule} -> {self.target}: {self.checked} tags checked, {state}"


@dataclass
class VerifyReport:
    deep: bool = False
    summaries: dict[tuple[str, str], TargetSummary] = field(default_factory=dict)
    drift: list[Drift] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # what could not be verified, and why

    def summary(self, rule: str, target: str) -> TargetSummary:
        key = (rule, target)
        if key not in self.summaries:
            self.summaries[key] = TargetSummary(rule, target)
        return self.summaries[key]

    def add(self, rule: str, target: str, checked: int, drift: Iterable[Drift]) -> None:
        """Record `checked` covered tags of one repository at one target and their drift;
        a tag counts once per kind however many blobs it lacks."""
        summary = self.summary(rule, target)
        summary.checked += checked
        items = list(drift)
        self.drift.extend(items)
        tags = {(d.kind, d.target_repository, d.tag) for d in items}
        summary.drift.update(kind for kind, _, _ in tags)

    def drift_counts(self) -> dict[tuple[str, str, str], int]:
        """(rule, target, kind) -> drifting tags, 0 included, for every verified pair."""
        return {
            (s.rule, s.target, kind): s.drift[kind]
            for s in self.summaries.values()
            for kind in DRIFT_KINDS
        }

    @property
    def exit_code(self) -> int:
        """0 in sync, 1 drift, 2 something could not be verified (the answer is partial)."""
        if self.errors:
            return 2
        return 1 if self.drift else 0

    def as_dict(self) -> dict[str, object]:
        return {
            "deep": self.deep,
            "in_sync": not self.drift and not self.errors,
            "targets": [
                {
                    "rule": s.rule,
                    "target": s.target,
                    "checked": s.checked,
                    "drift": {k: s.drift[k] for k in DRIFT_KINDS},
                }
                for s in sorted(self.summaries.values(), key=lambda s: (s.rule, s.target))
            ],
            "drift": [d.as_dict() for d in self.drift],
            "errors": list(self.errors),
        }

    def lines(self) -> list[str]:
        """Human output: a summary line per rule and target, then each drifting tag."""
        out = [s.line() for s in sorted(self.summaries.values(), key=lambda s: (s.rule, s.target))]
        out += [d.describe() for d in self.drift]
        return out
