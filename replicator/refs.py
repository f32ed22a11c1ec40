"""Image references on the command line: `host:port/repo/name:tag` or `…@sha256:…`.

Pure parsing. The registry part is required (we never guess Docker Hub), and
the result says whether the reference pins a digest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from replicator.errors import UsageError
from replicator.manifest import is_digest

# distribution/reference grammar, simplified to what registries accept.
_REPO_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
REPOSITORY_RE = re.compile(rf"^{_REPO_COMPONENT}(?:/{_REPO_COMPONENT})*$")
TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")


@dataclass(frozen=True)
class ImageRef:
    registry: str  # host[:port]
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def reference(self) -> str:
        """What goes after /manifests/: the digest when pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        s = f"{self.registry}/{self.repository}"
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s


def validate_repository(name: str) -> str:
    if not REPOSITORY_RE.fullmatch(name) or len(name) > 255:
        raise UsageError(
            f"invalid repository name {name!r}: lowercase letters, digits and separators "
            "(., _, __, -) in path components separated by /"
        )
    return name


def validate_tag(tag: str) -> str:
    if not TAG_RE.fullmatch(tag):
        raise UsageError(
            f"invalid tag {tag!r}: up to 128 of [A-Za-z0-9_.-], not starting with . or -"
        )
    return tag


def parse_ref(text: str, default_tag: str | None = "latest") -> ImageRef:
    """Parse `registry/repo[:tag][@digest]`; the registry host needs '.' or ':' or localhost."""
    original = text
    if "://" in text:
        raise UsageError(
            f"invalid reference {original!r}: give host:port/repo:tag, without a scheme"
        )
    digest = None
    if "@" in text:
        text, digest = text.split("@", 1)
        if not is_digest(digest):
            raise UsageError(
                f"invalid reference {original!r}: {digest!r} is not a sha256:<64 hex> digest"
            )
    if "/" not in text:
        raise UsageError(
            f"invalid reference {original!r}: expected REGISTRY/REPOSITORY[:TAG], "
            "e.g. 127.0.0.1:5000/team/app:v1"
        )
    registry, rest = text.split("/", 1)
    if not ("." in registry or ":" in registry or registry == "localhost"):
        raise UsageError(
            f"invalid reference {original!r}: {registry!r} does not look like a "
            "registry host (host:port or a domain name)"
        )
    tag = None
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        rest, tag = rest.rsplit(":", 1)
        validate_tag(tag)
    validate_repository(rest)
    if tag is None and digest is None:
        tag = default_tag
    return ImageRef(registry=registry, repository=rest, tag=tag, digest=digest)
