"""Which repositories, tags and platforms a rule covers, and where they go. Pure logic.

Nothing here does I/O, so the webhook path, the periodic reconcile and the
`plan` output all decide the same way and can be unit tested alone. Glob
syntax and matching live in `replicator.globs` (the configuration validates
with it too); `glob_match` is imported here for the callers of this module.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import NamedTuple

from replicator.config import Config, RenameConfig, Rule, TagFilter
from replicator.errors import ConfigError
from replicator.globs import glob_match
from replicator.manifest import Platform
from replicator.refs import REPOSITORY_RE
from replicator.semver import parse_range, parse_version

__all__ = [
    "COSIGN_TAG_RE",
    "REFERRERS_TAG_RE",
    "RenameError",
    "RuleTarget",
    "attached_cosign_tags",
    "cosign_subject",
    "cosign_tags_of",
    "covered_tags",
    "covers",
    "effective_rules",
    "glob_match",
    "inverse_rename",
    "is_cosign_tag",
    "is_referrers_tag",
    "map_repository",
    "needs_tag_list",
    "platform_selected",
    "rename_ambiguity",
    "rules_for",
    "select_tags",
    "tag_passes",
    "target_view",
]


# ---- tags -------------------------------------------------------------------------------------


def tag_passes(tag_filter: TagFilter | None, tag: str) -> bool:
    """Include/exclude globs, regular expressions and the semver range, for one tag
    (everything but `latest`).

    The webhook path uses this for a single pushed tag; `latest: N` needs the
    whole tag list, so callers with a `latest` filter must use `select_tags`.
    """
    if tag_filter is None:
        return True
    if tag_filter.include and not glob_match(tag_filter.include, tag):
        return False
    if tag_filter.exclude and glob_match(tag_filter.exclude, tag):
        return False
    if tag_filter.regex and not any(_regex(r).search(tag) for r in tag_filter.regex):
        return False
    if tag_filter.exclude_regex and any(_regex(r).search(tag) for r in tag_filter.exclude_regex):
        return False
    if tag_filter.semver is not None and not _range(tag_filter.semver).matches(tag):
        return False
    return True


@lru_cache(maxsize=256)
def _regex(text: str) -> re.Pattern[str]:
    return re.compile(text)


@lru_cache(maxsize=256)
def _range(text: str):
    return parse_range(text)


def select_tags(
    tags: Iterable[str], tag_filter: TagFilter | None, pushed_at: dict[str, float] | None = None
) -> list[str]:
    """The tags a filter selects, in input order (duplicates dropped).

    `latest: N` keeps the N highest versions when every remaining tag is a
    version (always the case with a semver filter); otherwise the N most
    recently pushed per `pushed_at` (tags missing from it count as oldest).
    Without `pushed_at` and with non-version tags, versions rank above other
    tags and other tags rank by name, so the answer is at least deterministic.
    """
    seen: set[str] = set()
    passed: list[str] = []
    for tag in tags:
        if tag not in seen:
            seen.add(tag)
            if tag_passes(tag_filter, tag):
                passed.append(tag)
    if tag_filter is None or tag_filter.latest is None or len(passed) <= tag_filter.latest:
        return passed
    versions = {t: parse_version(t) for t in passed}
    if all(v is not None for v in versions.values()):
        ranked = sorted(passed, key=lambda t: (versions[t], t), reverse=True)
    elif pushed_at is not None:
        ranked = sorted(passed, key=lambda t: (pushed_at.get(t, float("-inf")), t), reverse=True)
    else:
        ranked = sorted(
            passed,
            key=lambda t: (1, versions[t], t) if versions[t] is not None else (0, t),
            reverse=True,
        )
    keep = set(ranked[: tag_filter.latest])
    return [t for t in passed if t in keep]


# ---- the one decision: does a rule cover a tag now -------------------------------------------

# distribution has no referrers API; referrers live under this tag of their subject
REFERRERS_TAG_RE = re.compile(r"sha256-[a-f0-9]{64}")


def is_referrers_tag(tag: str | None) -> bool:
    return bool(tag and REFERRERS_TAG_RE.fullmatch(tag))


# cosign's legacy scheme: signature, attestation and SBOM of image sha256:<hex> under these tags
COSIGN_TAG_RE = re.compile(r"sha256-([a-f0-9]{64})\.(?:sig|att|sbom)")
COSIGN_SUFFIXES = ("sig", "att", "sbom")


def is_cosign_tag(tag: str | None) -> bool:
    return bool(tag and COSIGN_TAG_RE.fullmatch(tag))


def cosign_subject(tag: str) -> str | None:
    """The digest of the image a cosign tag belongs to (None: not a cosign tag)."""
    match = COSIGN_TAG_RE.fullmatch(tag)
    return f"sha256:{match.group(1)}" if match else None


def cosign_tags_of(digest: str) -> list[str]:
    """The cosign tags an image with `digest` may have (only sha256 images get them)."""
    algorithm, _, hex_ = digest.partition(":")
    if algorithm != "sha256":
        return []
    return [f"sha256-{hex_}.{suffix}" for suffix in COSIGN_SUFFIXES]


def attached_cosign_tags(
    rule: Rule, source_tags: Iterable[str], subjects: Iterable[str]
) -> list[str]:
    """The cosign tags in `source_tags` that travel with images the rule copies (`subjects`,
    their digests), in input order. They are attachments, not tags of their own: tag filters
    and `latest` never apply to them, and `referrers: false` keeps them home too."""
    if not rule.referrers:
        return []
    wanted = set(subjects)
    return [t for t in dict.fromkeys(source_tags) if cosign_subject(t) in wanted]


def covered_tags(
    rule: Rule, source_tags: Iterable[str], pushed_at: Mapping[str, float] | None = None
) -> list[str]:
    """The tags of a source repository that `rule` replicates now, in input order.

    The one decision used by `sync`'s planner, the daemon's event path, failover
    catch-up and failback, so that none of them copies what another would not:
    a referrers fallback tag (`sha256-<hex>`) is covered when the rule copies
    referrers (it travels with its subject; tag filters do not apply to it and
    it never counts towards `latest`); a cosign tag (`sha256-<hex>.sig/.att/.sbom`)
    is never among them: it travels with its image once that image's digest is known
    (`attached_cosign_tags`); every other tag passes the include/exclude
    globs and the semver range, and under `latest: N` is among the N newest of
    those (by version, else by `pushed_at`, the source's push times).
    """
    unique = list(dict.fromkeys(source_tags))
    referrers = [t for t in unique if is_referrers_tag(t)]
    plain = [t for t in unique if not is_referrers_tag(t) and not is_cosign_tag(t)]
    chosen = set(select_tags(plain, rule.tags, dict(pushed_at) if pushed_at else None))
    if rule.referrers:
        chosen.update(referrers)
    return [t for t in unique if t in chosen]


def covers(
    rule: Rule,
    tag: str,
    source_tags: Iterable[str] | None = None,
    pushed_at: Mapping[str, float] | None = None,
) -> bool:
    """Whether `rule` covers `tag` of a source repository now.

    `source_tags` is the source's current tag list; it is needed only under
    `latest: N` (see `needs_tag_list`), and `tag` counts as one of them (a push
    event arrives before distribution writes the tag). Pass None for a tag the
    source no longer holds (a delete): it is judged by the filters alone, since
    its deletion is the rule's business whatever `latest` ranked it. A cosign tag
    is covered under `referrers: true` (the daemon copies one only where the target
    holds its image).
    """
    if is_referrers_tag(tag) or is_cosign_tag(tag):
        return rule.referrers  # attachments: the tag filters do not apply
    if not tag_passes(rule.tags, tag):
        return False
    if not needs_tag_list(rule) or source_tags is None:
        return True
    return tag in covered_tags(rule, [*source_tags, tag], pushed_at)


def needs_tag_list(rule: Rule) -> bool:
    """Whether `covers` needs the source's tag list for this rule (`latest: N`)."""
    return rule.tags is not None and rule.tags.latest is not None


# ---- platforms --------------------------------------------------------------------------------


def platform_selected(rule: Rule, platform: Platform | None) -> bool:
    """Whether an index child with `platform` is copied under `rule`.

    No platform list selects everything. Children without a platform, and
    BuildKit attestation manifests (`unknown/unknown`), are always kept: they
    are not images for some other platform, and dropping them would break
    provenance for the platforms we do copy.
    """
    wanted = rule.platform_list
    if not wanted or platform is None:
        return True
    if platform.os == "unknown" and platform.architecture == "unknown":
        return True
    return any(platform.matches(w) for w in wanted)


# ---- repositories and rules -------------------------------------------------------------------


class RenameError(ConfigError):
    """A rule's rename produced something that is not a repository name."""

    def __init__(self, rule: str, repository: str, result: str) -> None:
        self.rule = rule
        self.repository = repository
        self.result = result
        super().__init__(
            f"rule {rule!r} renames repository {repository!r} to {result!r}, which is not a "
            "valid repository name; fix rename.strip_prefix / rename.prefix"
        )


def map_repository(rule: Rule, repo: str) -> str:
    """The repository name at the target: strip `rename.strip_prefix` (when present), then
    prepend `rename.prefix`. Raises RenameError when the result is not a valid name."""
    rename = rule.rename
    if rename is None:
        return repo
    result = repo
    if rename.strip_prefix and result.startswith(rename.strip_prefix):
        result = result[len(rename.strip_prefix) :]
    result = rename.prefix + result
    if not REPOSITORY_RE.fullmatch(result) or len(result) > 255:
        raise RenameError(rule.name, repo, result)
    return result


class RuleTarget(NamedTuple):
    rule: Rule
    target_site: str
    target_repo: str


def rules_for(
    config: Config, site: str, repo: str, rules: Sequence[Rule] | None = None
) -> list[RuleTarget]:
    """Every (rule, target site, target repository) that an event on `site`/`repo` fans out to.

    Pass `rules=effective_rules(config, failovers)` while a failover is active;
    the default is the configured rules. Raises RenameError if a matching
    rule's rename yields an invalid name.
    """
    out: list[RuleTarget] = []
    for rule in config.rules if rules is None else rules:
        if rule.from_ != site or not rule.matches_repository(repo):
            continue
        target_repo = map_repository(rule, repo)
        out.extend(RuleTarget(rule, target, target_repo) for target in rule.to)
    return out


def rename_ambiguity(rule: Rule) -> str | None:
    """Why the rule's rename cannot be inverted (None: it can, or it has none).

    `prefix` alone is always invertible (strip it again). `strip_prefix` is
    invertible only when every repository the rule selects starts with it: else
    `s/x` and `x` would both land on `<prefix>x`, and nothing says which to
    restore. Which repositories are selected is known from the globs only, so
    every include glob must start with `strip_prefix`."""
    rename = rule.rename
    if rename is None or not rename.strip_prefix:
        return None
    loose = [g for g in rule.repositories if not g.startswith(rename.strip_prefix)]
    if not loose:
        return None
    return (
        f"rule {rule.name!r}: its rename strips {rename.strip_prefix!r} but its repositories "
        f"{', '.join(repr(g) for g in loose)} need not start with it, so a renamed "
        "repository cannot be traced back to one source name"
    )


def _rename_glob(rule: Rule, glob: str) -> str:
    rename = rule.rename
    assert rename is not None
    if rename.strip_prefix and glob.startswith(rename.strip_prefix):
        glob = glob[len(rename.strip_prefix) :]
    return rename.prefix + glob


def target_view(rule: Rule) -> Rule:
    """The rule as seen from one of its targets: repositories under their target names,
    no rename (every target holds the same names). Failover promotes a target, so the
    rewritten rule speaks these names. Callers check `rename_ambiguity` first."""
    if rule.rename is None:
        return rule
    return rule.model_copy(
        update={
            "repositories": [_rename_glob(rule, g) for g in rule.repositories],
            "exclude_repositories": [_rename_glob(rule, g) for g in rule.exclude_repositories],
            "rename": None,
        }
    )


def inverse_rename(rule: Rule) -> RenameConfig | None:
    """The rename that takes a target name back to the source name (for failback):
    strip the rule's `prefix`, prepend its `strip_prefix`."""
    if rule.rename is None:
        return None
    return RenameConfig(strip_prefix=rule.rename.prefix, prefix=rule.rename.strip_prefix)


def effective_rules(config: Config, failovers: Sequence[tuple[str, str]] = ()) -> list[Rule]:
    """The rules in force while sites are failed over; `failovers` is [(lost, promoted), ...].

    A rule from a lost site is rewritten to come from its promoted site, with
    the promoted site removed from `to`. A lost site is removed from every
    rule's `to` (it cannot take writes; failback reconciles it later). Rules
    left with no target are dropped. A renaming rule from a lost site that
    targeted the promoted site speaks the target names afterwards
    (`target_view`); one that did not keeps its source names and rename (the
    failover's catch-up brought them to the promoted site). Failovers apply in order, so a chain
    (A lost -> B, later B lost -> C) ends at C. The configured rules are
    never modified; rewritten rules are copies with the same name.
    """
    result: list[Rule] = []
    for rule in config.rules:
        current = rule
        for lost, promoted in failovers:
            source = promoted if current.from_ == lost else current.from_
            to = [t for t in current.to if t not in (lost, source)]
            if source != current.from_ and source in current.to:
                current = target_view(current)  # the promoted target holds the target names
            if source != current.from_ or to != current.to:
                current = current.model_copy(update={"from_": source, "to": to})
        if current.to:
            result.append(current)
    return result
