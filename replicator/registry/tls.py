"""The TLS context each registry site connects with.

Loading a CA bundle costs about 20 ms of CPU, and httpx loads one per client unless
given a context, so a start-up with several sites paid it once per site. Here every
site without TLS settings of its own shares one verifying context per process, and
plain-http sites, which meet TLS only when a registry redirects them to https (blob
storage), share one that loads its CAs at its first TLS connection: most runs never do.
Sites with their own CA, client certificate or `insecure` get a context of their own.
"""

from __future__ import annotations

import functools
import os
import ssl
import threading
from typing import Any

import httpx

from replicator.errors import ConfigError
from replicator.registry.site import SiteEndpoint


def site_tls(site: SiteEndpoint) -> ssl.SSLContext:
    """The context `site`'s client verifies (and authenticates) with."""
    if not site.url.startswith("https://"):
        return plain_http_tls()
    if not (site.insecure or site.ca_file or site.cert_file):
        return default_tls()
    try:
        if site.ca_file:
            ctx = ssl.create_default_context(cafile=site.ca_file)
        else:
            import certifi

            ctx = ssl.create_default_context(cafile=certifi.where())
        if site.insecure and not site.ca_file:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if site.cert_file:
            ctx.load_cert_chain(site.cert_file, site.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"site {site.name!r}: cannot load TLS files: {exc}") from exc
    return ctx


@functools.cache
def default_tls() -> ssl.SSLContext:
    """httpx's default verifying context (its CA bundle, or SSL_CERT_FILE/SSL_CERT_DIR),
    made once per process."""
    return httpx.create_ssl_context()


@functools.cache
def plain_http_tls() -> ssl.SSLContext:
    """The verifying context of plain-http sites, loading its CAs only when first used."""
    return CAsOnFirstUse(ssl.PROTOCOL_TLS_CLIENT)


class CAsOnFirstUse(ssl.SSLContext):
    """A verifying client context (hostname checked, certificate required) that loads
    the CAs httpx would (SSL_CERT_FILE, SSL_CERT_DIR, else certifi's bundle) when it is
    first used for a connection, instead of when it is made."""

    _lock = threading.Lock()
    _loaded = False

    def _load_cas(self) -> None:
        with self._lock:
            if self._loaded:
                return
            if os.environ.get("SSL_CERT_FILE"):
                self.load_verify_locations(cafile=os.environ["SSL_CERT_FILE"])
            elif os.environ.get("SSL_CERT_DIR"):
                self.load_verify_locations(capath=os.environ["SSL_CERT_DIR"])
            else:
                import certifi

                self.load_verify_locations(cafile=certifi.where())
            self._loaded = True

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        self._load_cas()
        return super().wrap_bio(*args, **kwargs)

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        self._load_cas()
        return super().wrap_socket(*args, **kwargs)
