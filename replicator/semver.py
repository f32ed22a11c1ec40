"""Semantic versions of image tags and npm-style version ranges. Pure logic.

Why our own: image tags are looser than semver ("v1.2", "1.25", "3") and
users write ranges the way npm and regsync taught them (">=1.2 <2", "^1.2",
"~1.2", "1.x", "a || b", commas as AND). `packaging` speaks PEP 440 and
python-semver has no range grammar, so neither matches this exactly.

Rules, following node-semver:
- a tag is a version when it is `[v]MAJOR[.MINOR[.PATCH]][-PRERELEASE][+BUILD]`;
  missing parts are 0 (so "1.2" is 1.2.0). Anything else is not a version and
  never satisfies a range.
- a prerelease (anything after '-', including Docker-style "1.2.3-alpine")
  satisfies a range only if the range itself names a prerelease of the same
  MAJOR.MINOR.PATCH, e.g. ">=1.3.0-rc.1". Otherwise "latest stable" filters
  would silently pick release candidates and variant tags.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import total_ordering

_ID = r"[0-9A-Za-z-]+"
_VERSION_RE = re.compile(
    rf"^[vV]?(\d+)(?:\.(\d+)(?:\.(\d+))?)?(?:-({_ID}(?:\.{_ID})*))?(?:\+({_ID}(?:\.{_ID})*))?$"
)
_WILD = r"\d+|[xX*]"
_PARTIAL_RE = re.compile(
    rf"^[vV]?({_WILD})(?:\.({_WILD})(?:\.({_WILD})(?:-({_ID}(?:\.{_ID})*))?)?)?"
    rf"(?:\+{_ID}(?:\.{_ID})*)?$"
)
_OP_RE = re.compile(r"^(<=|>=|<|>|=|\^|~>|~)?(.*)$")
_HYPHEN_RE = re.compile(r"^(\S+)\s+-\s+(\S+)$")


@total_ordering
@dataclass(frozen=True)
class Version:
    major: int
    minor: int
    patch: int
    prerelease: tuple[int | str, ...] = ()
    build: str = field(default="", compare=False)

    @property
    def core(self) -> tuple[int, int, int]:
        return (self.major, self.minor, self.patch)

    def _key(self) -> tuple:
        if not self.prerelease:
            pre: tuple = (1,)
        else:
            pre = (
                0,
                tuple((0, p, "") if isinstance(p, int) else (1, 0, p) for p in self.prerelease),
            )
        return (*self.core, pre)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key() < other._key()

    def __str__(self) -> str:
        s = f"{self.major}.{self.minor}.{self.patch}"
        if self.prerelease:
            s += "-" + ".".join(str(p) for p in self.prerelease)
        if self.build:
            s += "+" + self.build
        return s


def _prerelease(text: str | None) -> tuple[int | str, ...]:
    if not text:
        return ()
    return tuple(int(p) if p.isdigit() else p for p in text.split("."))


def parse_version(tag: str) -> Version | None:
    """The version a tag names, or None when the tag is not a version ("latest", "main")."""
    m = _VERSION_RE.match(tag.strip())
    if not m:
        return None
    major, minor, patch, pre, build = m.groups()
    return Version(int(major), int(minor or 0), int(patch or 0), _prerelease(pre), build or "")


@dataclass(frozen=True)
class Comparator:
    op: str  # one of < <= > >= =
    version: Version
    # Bounds we invent while desugaring (the "-0" in "<2.0.0-0") do not count as
    # the user naming a prerelease.
    synthetic: bool = False

    def test(self, v: Version) -> bool:
        if self.op == "<":
            return v < self.version
        if self.op == "<=":
            return v <= self.version
        if self.op == ">":
            return v > self.version
        if self.op == ">=":
            return v >= self.version
        return v == self.version

    def __str__(self) -> str:
        return f"{self.op}{self.version}"


@dataclass(frozen=True)
class Range:
    """OR of AND-sets of comparators; an empty AND-set matches every stable version."""

    text: str
    alternatives: tuple[tuple[Comparator, ...], ...]

    def contains(self, v: Version) -> bool:
        return any(_satisfies(alt, v) for alt in self.alternatives)

    def matches(self, tag: str) -> bool:
        """True when `tag` is a version inside the range; non-version tags never match."""
        v = parse_version(tag)
        return v is not None and self.contains(v)

    def __str__(self) -> str:
        return self.text


def _satisfies(comparators: tuple[Comparator, ...], v: Version) -> bool:
    if not all(c.test(v) for c in comparators):
        return False
    if not v.prerelease:
        return True
    return any(
        c.version.prerelease and not c.synthetic and c.version.core == v.core for c in comparators
    )


def _v(major: int, minor: int = 0, patch: int = 0, pre: tuple = ()) -> Version:
    return Version(major, minor, patch, pre)


_FLOOR = (0,)  # the lowest prerelease: "<2.0.0-0" excludes every 2.0.0 prerelease


def _lt(major: int, minor: int = 0, patch: int = 0) -> Comparator:
    return Comparator("<", _v(major, minor, patch, _FLOOR), synthetic=True)


def _parse_partial(text: str, whole: str) -> tuple[int | None, int | None, int | None, tuple]:
    m = _PARTIAL_RE.match(text)
    if not m:
        raise ValueError(f"invalid version {text!r} in range {whole!r}")
    parts: list[int | None] = []
    wild = False
    for g in m.groups()[:3]:
        if g is None or g in ("x", "X", "*") or wild:
            wild = True
            parts.append(None)
        else:
            parts.append(int(g))
    pre = _prerelease(m.group(4)) if parts[2] is not None else ()
    return parts[0], parts[1], parts[2], pre


def _desugar(op: str, text: str, whole: str) -> list[Comparator]:
    major, minor, patch, pre = _parse_partial(text, whole)
    if major is None:  # "*", "x", ">=*" ...
        if op in ("<", ">"):
            return [_lt(0)]  # nothing is below 0.0.0 or above "anything"
        return []
    # a wildcard part makes every later part one too, so a patch means a full version
    exact = _v(major, minor, patch, pre) if minor is not None and patch is not None else None
    if op in ("", "="):
        if exact is not None:
            return [Comparator("=", exact)]
        if minor is None:
            return [Comparator(">=", _v(major)), _lt(major + 1)]
        return [Comparator(">=", _v(major, minor)), _lt(major, minor + 1)]
    if op == ">=":
        return [Comparator(">=", _v(major, minor or 0, patch or 0, pre))]
    if op == ">":
        if exact is not None:
            return [Comparator(">", exact)]
        if minor is None:
            return [Comparator(">=", _v(major + 1))]
        return [Comparator(">=", _v(major, minor + 1))]
    if op == "<":
        if exact is not None:
            return [Comparator("<", exact)]
        return [_lt(major, minor or 0)]
    if op == "<=":
        if exact is not None:
            return [Comparator("<=", exact)]
        if minor is None:
            return [_lt(major + 1)]
        return [_lt(major, minor + 1)]
    low = Comparator(">=", _v(major, minor or 0, patch or 0, pre))
    if op in ("~", "~>"):
        if minor is None:
            return [low, _lt(major + 1)]
        return [low, _lt(major, minor + 1)]
    # caret: the left-most non-zero part may not change
    if major > 0 or minor is None:
        return [low, _lt(major + 1)]
    if minor > 0 or patch is None:
        return [low, _lt(0, minor + 1)]
    return [low, _lt(0, 0, patch + 1)]


def parse_range(text: str) -> Range:
    """Parse a range such as ">=1.2 <2", "^1.2 || ~0.9", "1.x", "1.2 - 1.4".

    Raises ValueError naming the part that could not be read.
    """
    if not isinstance(text, str):
        raise ValueError(f"a version range must be a string, got {text!r}")
    if not text.strip():
        raise ValueError("empty version range; use '*' for any stable version")
    alternatives: list[tuple[Comparator, ...]] = []
    for alt in text.split("||"):
        alt = alt.replace(",", " ").strip()
        comparators: list[Comparator] = []
        hyphen = _HYPHEN_RE.match(alt)
        if hyphen:
            comparators += _desugar(">=", hyphen.group(1), text)
            comparators += _desugar("<=", hyphen.group(2), text)
        else:
            if not alt:
                raise ValueError(f"empty alternative in version range {text!r}")
            alt = re.sub(r"(<=|>=|<|>|=|\^|~>|~)\s+", r"\1", alt)
            for token in alt.split():
                m = _OP_RE.match(token)
                assert m is not None
                op, rest = m.group(1) or "", m.group(2)
                if not rest:
                    raise ValueError(f"operator {op!r} without a version in range {text!r}")
                comparators += _desugar(op, rest, text)
        alternatives.append(tuple(comparators))
    return Range(text=text, alternatives=tuple(alternatives))
