"""Docker Hub's identity: three host names for one registry, and its short names.

`docker.io` (what users write), `index.docker.io` (the key `docker login`
stores credentials under) and `registry-1.docker.io` (where the API answers)
are one registry; a reference without a registry host means Docker Hub, and a
one-component name there means an official image under `library/`. Pure.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

DOCKER_HUB = "docker.io"  # the canonical name in references
DOCKER_HUB_API = "registry-1.docker.io"  # where the registry API answers
DOCKER_HUB_HOSTS = frozenset({DOCKER_HUB, "index.docker.io", DOCKER_HUB_API})


def is_docker_hub(host: str) -> bool:
    """Whether `host` (host[:port], any case) names Docker Hub."""
    return host.lower().removesuffix(":443") in DOCKER_HUB_HOSTS


def canonical_registry(host: str) -> str:
    """`index.docker.io` -> `docker.io`; every other host unchanged."""
    return DOCKER_HUB if is_docker_hub(host) else host


def api_url(url: str) -> str:
    """A registry URL with Docker Hub's names pointed at its API host (https)."""
    parts = urlsplit(url)
    if not is_docker_hub(parts.netloc):
        return url
    return urlunsplit(("https", DOCKER_HUB_API, parts.path, parts.query, parts.fragment))


def expand_repository(registry: str, repository: str) -> str:
    """`nginx` on Docker Hub -> `library/nginx`; other names and registries unchanged."""
    if is_docker_hub(registry) and "/" not in repository:
        return f"library/{repository}"
    return repository
