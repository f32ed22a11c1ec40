"""Repository and tag globs: what they may look like, and what they match. Pure logic.

"Doublestar" globs (wcmatch GLOBSTAR + BRACE): `*` and `?` stay inside one path
segment, `**` as a whole segment crosses `/` (so `team/**` matches `team/a` and
`team/a/b` but not `team` itself), `[abc]` and `{a,b}` work as in a shell.
Matching is case-sensitive; `!` negation is not supported (rules and policies
have exclude lists instead). A leaf module: the configuration validates globs
with it and the rules match with it, so neither has to import the other.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

from wcmatch import glob as _glob

GLOB_FLAGS = _glob.GLOBSTAR | _glob.BRACE
_REPO_GLOB_CHARS = re.compile(r"^[a-z0-9._\-/*?\[\]{},^]+$")
_TAG_GLOB_CHARS = re.compile(r"^[A-Za-z0-9_.\-*?\[\]{},^]+$")


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


@lru_cache(maxsize=1024)
def _matcher(patterns: tuple[str, ...]):
    return _glob.compile(list(patterns), flags=GLOB_FLAGS)


def glob_match(patterns: Sequence[str], name: str) -> bool:
    """True when `name` matches any of `patterns` (an empty list matches nothing)."""
    if not patterns:
        return False
    return bool(_matcher(tuple(patterns)).match(name))


def is_literal(pattern: str) -> bool:
    """A pattern without glob characters names exactly one repository or tag."""
    return not any(c in pattern for c in "*?[]{}")


def repository_selected(include: Sequence[str], exclude: Sequence[str], repo: str) -> bool:
    return glob_match(include, repo) and not glob_match(exclude, repo)
