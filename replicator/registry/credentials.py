"""Registry credentials: what we present to a registry or its token server.

A user name with a password (Basic, or the token server's GET), or an identity
token: an OAuth2 refresh token that the token server exchanges for access
tokens (`grant_type=refresh_token`, what ACR hands out and what docker stores
as `identitytoken`). Secrets never appear in a repr.

Some secrets say how long they live: a JWT carries `exp`. `secret_expiry`
reads it (without verifying: we only want to know when to ask again, never to
trust the claims) so a credential helper's answer is reused exactly as long
as it is valid. Pure, no I/O.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from dataclasses import dataclass


@dataclass
class Credentials:
    username: str | None = None
    password: str | None = None
    identity_token: str | None = None

    def __repr__(self) -> str:
        hidden = "'***'"
        return (
            f"Credentials(username={self.username!r}, "
            f"password={hidden if self.password else None}, "
            f"identity_token={hidden if self.identity_token else None})"
        )

    __str__ = __repr__

    @property
    def has_basic(self) -> bool:
        return self.username is not None and self.password is not None

    @property
    def usable(self) -> bool:
        """Whether these can log in at all (a user with a password, or an identity token)."""
        return self.has_basic or bool(self.identity_token)


def jwt_expiry(token: str) -> float | None:
    """The `exp` claim (Unix seconds) of a JWT-shaped string, None for anything else."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload.encode("ascii")))
    except (binascii.Error, ValueError, UnicodeError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    return float(exp)


def secret_expiry(creds: Credentials) -> float | None:
    """When `creds` stop working (Unix seconds), if their secret says; else None."""
    secret = creds.identity_token or creds.password
    return jwt_expiry(secret) if secret else None


def seconds_left(expiry: float, now: float | None = None) -> float:
    """Seconds until Unix time `expiry` (negative once past)."""
    return expiry - (time.time() if now is None else now)
