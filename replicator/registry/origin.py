"""Origins (scheme, host, port) of URLs: credentials go only to the configured one.

A registry may point us elsewhere: an upload `Location`, a `Link` to the next
page, a redirect to a CDN, a token realm. The transport follows such URLs but
sends our Authorization (Basic credentials or a Bearer token) only to the
origin the credentials were configured for, the way browsers and httpx treat
redirects. Pure string work, no I/O.
"""

from __future__ import annotations

from urllib.parse import urlsplit

_DEFAULT_PORTS = {"http": 80, "https": 443}

Origin = tuple[str, str, int | None]


def origin_of(url: str) -> Origin | None:
    """(scheme, host, port) with the scheme's default port filled in; None if unparsable."""
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        return scheme, (parts.hostname or "").lower(), parts.port or _DEFAULT_PORTS.get(scheme)
    except ValueError:  # a malformed port
        return None


def where(url: str) -> str:
    """`scheme://host:port/path` for logs and errors: no user info, no query (upload
    locations carry signed state there)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def host_of(url: str) -> str:
    """`scheme://host:port` of `url` (as `where`, without the path)."""
    parts = urlsplit(url)
    return where(f"{parts.scheme}://{parts.netloc}")
