"""The TLS side of the broker connection: which CA to trust and which client
certificate to present (the configuration's `mqtt.tls`), and what a failed handshake
means in words an operator can act on."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Protocol

from replicator.errors import ConfigError


class TlsFiles(Protocol):
    """PEM files for a TLS client (config.TLSConfig has this shape)."""

    @property
    def ca(self) -> Path | None: ...

    @property
    def cert(self) -> Path | None: ...

    @property
    def key(self) -> Path | None: ...


def client_context(files: TlsFiles | None) -> ssl.SSLContext:
    """A verifying client context: `files.ca` alone as trust anchor when given (a private
    CA), else the system's; the client certificate and key when given. ConfigError names
    the field whose file cannot be loaded; the context is built once, at start."""
    ca = files.ca if files is not None else None
    try:
        context = ssl.create_default_context(cafile=str(ca) if ca else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load CA certificates from {ca}: {exc}", "bus.tls.ca") from None
    if files is not None and files.cert:
        try:
            context.load_cert_chain(files.cert, files.key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot load the client certificate {files.cert} with key {files.key}: {exc}",
                "bus.tls.cert",
            ) from None
    return context


def explain_tls_failure(error: str) -> str | None:
    """What to check for a TLS handshake failure described by `error` (paho/ssl text,
    as aiomqtt passes it on); None when `error` is not about TLS."""
    text = error.upper()
    if "CERTIFICATE_VERIFY_FAILED" in text or "CERTIFICATE VERIFY FAILED" in text:
        return "the broker's certificate is not trusted: check bus.tls.ca (mqtt.tls.ca)"
    if "CERTIFICATE_REQUIRED" in text or "HANDSHAKE_FAILURE" in text or "UNKNOWN_CA" in text:
        return (
            "the broker refused our certificate: check bus.tls.cert and bus.tls.key "
            "(mqtt.tls.cert, mqtt.tls.key)"
        )
    if "SSL" in text or "TLS" in text:
        return "TLS handshake failed"
    return None
