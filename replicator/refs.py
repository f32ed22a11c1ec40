"""Image references on the command line: `host:port/repo/name:tag` or `…@sha256:…`.

Pure parsing, with Docker's conventions as docker, skopeo and crane read them: a
reference without a registry host (no '.' or ':' in its first component, and not
`localhost`) is on Docker Hub, a one-component Hub name is an official image
(`nginx` -> `docker.io/library/nginx`), Hub's host aliases become `docker.io`,
and skopeo's `docker://` transport prefix is accepted (its other transports,
which name local storage, are refused). The result says whether the reference
pins a digest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from replicator.errors import UsageError
from replicator.manifest import is_digest
from replicator.registry.dockerhub import DOCKER_HUB, canonical_registry, expand_repository

# distribution/reference grammar, simplified to what registries accept.
_REPO_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
REPOSITORY_RE = re.compile(rf"^{_REPO_COMPONENT}(?:/{_REPO_COMPONENT})*$")
TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
# skopeo's transports other than docker://: local storage, nothing a registry serves.
_OTHER_TRANSPORTS = re.compile(
    r"^(oci|oci-archive|docker-archive|docker-daemon|containers-storage|dir|sif|tarball|ostree):"
)


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


def strip_transport(text: str) -> str:
    """`docker://ref` -> `ref`; UsageError for any other transport or URL scheme."""
    if text.startswith("docker://"):
        return text.removeprefix("docker://")
    other = _OTHER_TRANSPORTS.match(text)
    if other or "://" in text:
        name = other.group(1) + ":" if other else text.split("://", 1)[0] + "://"
        raise UsageError(
            f"invalid reference {text!r}: the {name} transport is not a registry; give "
            "[docker://]REGISTRY/REPOSITORY[:TAG], e.g. docker://127.0.0.1:5000/team/app:v1"
        )
    return text


def parse_ref(text: str, default_tag: str | None = "latest") -> ImageRef:
    """Parse `[docker://][registry/]repo[:tag][@digest]`; a first component with '.' or
    ':', or `localhost`, is the registry host, else the reference is on Docker Hub."""
    original = text
    text = strip_transport(text)
    digest = None
    if "@" in text:
        text, digest = text.split("@", 1)
        if not is_digest(digest):
            raise UsageError(
                f"invalid reference {original!r}: {digest!r} is not a sha256:<64 hex> digest"
            )
    if not text:
        raise UsageError(f"invalid reference {original!r}: expected REGISTRY/REPOSITORY[:TAG]")
    first, _, after = text.partition("/")
    if after and ("." in first or ":" in first or first == "localhost"):
        registry, rest = canonical_registry(first), after
    else:
        registry, rest = DOCKER_HUB, text
    tag = None
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        rest, tag = rest.rsplit(":", 1)
        validate_tag(tag)
    rest = expand_repository(registry, rest)
    validate_repository(rest)
    if tag is None and digest is None:
        tag = default_tag
    return ImageRef(registry=registry, repository=rest, tag=tag, digest=digest)
