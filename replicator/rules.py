"""Which repositories, tags and platforms a rule covers, and where they go. Pure logic.

Nothing here does I/O, so the webhook path, the periodic reconcile and the
`plan` output all decide the same way and can be unit tested alone.

Globs are "doublestar" globs (wcmatch GLOBSTAR + BRACE): `*` and `?` stay
inside one path segment, `**` as a whole segment crosses `/` (so `team/**`
matches `team/a` and `team/a/b` but not `team` itself), `[abc]` and `{a,b}`
work as in a shell. Matching is case-sensitive; `!` negation is not
supported (use the exclude lists instead).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, NamedTuple

from wcmatch import glob as _glob

from replicator.errors import ConfigError
from replicator.manifest import Platform
from replicator.refs import REPOSITORY_RE
from replicator.semver import parse_range, parse_version

if TYPE_CHECKING:
    from replicator.config import Config, Rule, TagFilter

GLOB_FLAGS = _glob.GLOBSTAR | _glob.BRACE
_REPO_GLOB_CHARS = re.compile(r"^[a-z0-9._\-/*?\[\]{},^]+$")
_TAG_GLOB_CHARS = re.compile(r"^[A-Za-z0-9_.\-*?\[\]{},^]+$")


# ---- glob validation and matching -------------------------------------------------------------


def _check_balanced(pattern: str) -> None:
    depth_brace = 0
    in_bracket = False
    for ch in pattern:
        if in_bracket:
            if ch == "]":
                in_bracket = False
            continue
        if ch == "[":
            in_bracket = True
        elif ch == "{":
            depth_brace += 1
        elif ch == "}":
            depth_brace -= 1
            if depth_brace < 0:
                raise ValueError(f"glob {pattern!r} has a '}}' without a matching '{{'")
    if in_bracket:
        raise ValueError(f"glob {pattern!r} has a '[' without a closing ']'")
    if depth_brace:
        raise ValueError(f"glob {pattern!r} has a '{{' without a closing '}}'")


def _check_compiles(pattern: str) -> None:
    try:
        _glob.compile([pattern], flags=GLOB_FLAGS)
    except Exception as exc:  # wcmatch raises several kinds (pattern limit, bad syntax)
        raise ValueError(f"glob {pattern!r} cannot be used: {exc}") from None


def validate_repository_glob(pattern: str) -> str:
    """Refuse repository globs that could never match or that mean something unexpected."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError("a repository glob must be a non-empty string")
    if pattern.startswith("!"):
        raise ValueError(
            f"glob {pattern!r}: '!' negation is not supported; use exclude_repositories"
        )
    if pattern != pattern.strip() or any(c.isspace() for c in pattern):
        raise ValueError(f"glob {pattern!r} contains whitespace")
    if any(c.isupper() for c in pattern):
        raise ValueError(
            f"glob {pattern!r} has upper-case letters, but repository names are "
            "always lower-case, so it could never match"
        )
    if not _REPO_GLOB_CHARS.match(pattern):
        raise ValueError(
            f"glob {pattern!r} has characters that cannot appear in repository "
            "names (allowed: a-z 0-9 . _ - / and the glob characters * ? [] {})"
        )
    if pattern.startswith("/") or pattern.endswith("/") or "//" in pattern:
        raise ValueError(
            f"glob {pattern!r}: repository names have no leading, trailing or doubled '/'"
        )
    for segment in pattern.split("/"):
        if "**" in segment and segment != "**":
            raise ValueError(
                f"glob {pattern!r}: '**' must be a whole path segment "
                "(like 'team/**'); use '*' inside a segment"
            )
    _check_balanced(pattern)
    _check_compiles(pattern)
    return pattern


def validate_tag_glob(pattern: str) -> str:
    if not isinstance(pattern, str) or not pattern:
        raise ValueError("a tag glob must be a non-empty string")
    if pattern.startswith("!"):
        raise ValueError(f"glob {pattern!r}: '!' negation is not supported; use tags.exclude")
    if "/" in pattern:
        raise ValueError(f"tag glob {pattern!r} contains '/', which tags never do")
    if not _TAG_GLOB_CHARS.match(pattern):
        raise ValueError(
            f"tag glob {pattern!r} has characters that cannot appear in tags "
            "(allowed: A-Z a-z 0-9 _ . - and the glob characters * ? [] {})"
        )
    _check_balanced(pattern)
    _check_compiles(pattern)
    return pattern


def validate_semver_range(text: str) -> str:
    parse_range(text)  # raises ValueError naming the bad part
    return text


@lru_cache(maxsize=1024)
def _matcher(patterns: tuple[str, ...]):
    return _glob.compile(list(patterns), flags=GLOB_FLAGS)


def glob_match(patterns: Sequence[str], name: str) -> bool:
    """True when `name` matches any of `patterns` (an empty list matches nothing)."""
    if not patterns:
        return False
    return bool(_matcher(tuple(patterns)).match(name))


def repository_selected(include: Sequence[str], exclude: Sequence[str], repo: str) -> bool:
    return glob_match(include, repo) and not glob_match(exclude, repo)


# ---- tags -------------------------------------------------------------------------------------


def tag_passes(tag_filter: TagFilter | None, tag: str) -> bool:
    """Include/exclude globs and the semver range, for one tag (everything but `latest`).

    The webhook path uses this for a single pushed tag; `latest: N` needs the
    whole tag list, so callers with a `latest` filter must use `select_tags`.
    """
    if tag_filter is None:
        return True
    if tag_filter.include and not glob_match(tag_filter.include, tag):
        return False
    if tag_filter.exclude and glob_match(tag_filter.exclude, tag):
        return False
    if tag_filter.semver is not None and not _range(tag_filter.semver).matches(tag):
        return False
    return True


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


def effective_rules(config: Config, failovers: Sequence[tuple[str, str]] = ()) -> list[Rule]:
    """The rules in force while sites are failed over; `failovers` is [(lost, promoted), ...].

    A rule from a lost site is rewritten to come from its promoted site, with
    the promoted site removed from `to`. A lost site is removed from every
    rule's `to` (it cannot take writes; failback reconciles it later). Rules
    left with no target are dropped. Failovers apply in order, so a chain
    (A lost -> B, later B lost -> C) ends at C. The configured rules are
    never modified; rewritten rules are copies with the same name.
    """
    result: list[Rule] = []
    for rule in config.rules:
        current = rule
        for lost, promoted in failovers:
            source = promoted if current.from_ == lost else current.from_
            to = [t for t in current.to if t not in (lost, source)]
            if source != current.from_ or to != current.to:
                current = current.model_copy(update={"from_": source, "to": to})
        if current.to:
            result.append(current)
    return result
