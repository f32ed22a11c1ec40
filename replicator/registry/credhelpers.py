"""docker-credential helpers: run `docker-credential-NAME get`, cache the answer.

The protocol (github.com/docker/docker-credential-helpers): write the registry
host to the helper's stdin, read `{"ServerURL", "Username", "Secret"}` from its
stdout; a helper without credentials for the host exits non-zero and prints
"credentials not found". Username `<token>` means Secret is an identity
(OAuth2 refresh) token, as ACR's helper answers.

Helpers hand out short-lived secrets (ECR's 12 h, GCR's 1 h), so an answer is
cached per (helper, host) only as long as it lives: until the `exp` of a JWT
secret, else for a configured maximum age, and forgotten at once when the
registry refuses it (the caller then asks again). Helpers run as asyncio
subprocesses with a timeout, never blocking the event loop. Their output is
never logged nor put into an error: a failure says which helper and why.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass

from replicator.logs import redact
from replicator.registry.credentials import Credentials, secret_expiry
from replicator.registry.errors import Unauthorized

log = logging.getLogger("replicator.registry.credhelpers")

HELPER_PREFIX = "docker-credential-"
NOT_FOUND = "credentials not found"
_MAX_OUTPUT = 64 * 1024


class HelperError(Unauthorized):
    """A credential helper could not be run or gave no usable answer."""


@dataclass(frozen=True)
class HelperAnswer:
    credentials: Credentials | None  # None: the helper has none for this host
    expires_at: float | None  # Unix seconds, when the secret says
    reason: str = ""  # why there are none ("exited 1: credentials not found")


def helper_program(name: str) -> str:
    return name if name.startswith(HELPER_PREFIX) else HELPER_PREFIX + name


def parse_helper_output(program: str, host: str, out: bytes, *, site: str) -> Credentials:
    """The credentials in a helper's `get` answer. Pure; errors never quote the output."""
    try:
        doc = json.loads(out)
    except (ValueError, UnicodeDecodeError):
        doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("Secret"), str):
        raise HelperError(
            f"{program}: answered for {host} with something other than "
            '{"ServerURL", "Username", "Secret"} JSON',
            site=site,
        )
    user = doc.get("Username")
    secret = doc["Secret"]
    if not secret:
        raise HelperError(f"{program}: answered for {host} with an empty Secret", site=site)
    if user == "<token>":
        return Credentials(identity_token=secret)
    return Credentials(username=str(user or ""), password=secret)


async def run_helper(
    name: str, host: str, *, site: str, timeout: float = 30.0, env: dict[str, str] | None = None
) -> HelperAnswer:
    """Ask helper `name` for `host`'s credentials (`docker-credential-NAME get`)."""
    program = helper_program(name)
    path = shutil.which(program, path=(env or os.environ).get("PATH"))
    if path is None:
        raise HelperError(
            f"{program}: not found on PATH (a docker config names credential helper {name!r})",
            site=site,
        )
    started = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            path,
            "get",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
    except OSError as exc:
        raise HelperError(f"{program}: cannot run: {exc.strerror or exc}", site=site) from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(host.encode()), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise HelperError(
            f"{program}: gave no answer for {host} within {timeout:g}s", site=site, retryable=True
        ) from None
    log.debug(
        "%s: %s get %s -> exit %s in %.2fs",
        site,
        program,
        host,
        proc.returncode,
        time.monotonic() - started,
    )
    if proc.returncode != 0:
        said = _first_line(out) or _first_line(err)
        reason = f"exited {proc.returncode}" + (f": {said}" if said else "")
        if NOT_FOUND in (out + err).decode("utf-8", "replace").lower():
            return HelperAnswer(None, None, reason=f"{program} {reason}")
        raise HelperError(f"{program}: {reason}", site=site)
    creds = parse_helper_output(program, host, out[:_MAX_OUTPUT], site=site)
    return HelperAnswer(creds, secret_expiry(creds))


def _first_line(raw: bytes) -> str:
    """A helper's message, kept short; a line that looks like JSON could hold a secret."""
    line = raw.decode("utf-8", "replace").strip().splitlines()[0:1]
    text = line[0].strip() if line else ""
    if text.startswith("{") or len(text) > 200:
        return "(output withheld)"
    return redact(text)


class HelperCache:
    """Helper answers per (helper program, host), each kept while its secret lives.

    Shared by every client in the process (a daemon copying to ECR runs the
    helper once per token lifetime, not once per connection). Holds no
    asyncio objects, so it outlives event loops; concurrent first uses may
    run a helper twice, which is harmless.
    """

    def __init__(self, *, margin: float = 30.0) -> None:
        self.margin = margin  # renew this long before the secret expires
        self._entries: dict[tuple[str, str], tuple[HelperAnswer, float]] = {}
        self.runs = 0  # helper invocations, for tests and stats

    def get(self, name: str, host: str, now: float | None = None) -> HelperAnswer | None:
        entry = self._entries.get((helper_program(name), host))
        if entry is None:
            return None
        answer, valid_until = entry
        if (time.time() if now is None else now) >= valid_until:
            del self._entries[(helper_program(name), host)]
            return None
        return answer

    def put(self, name: str, host: str, answer: HelperAnswer, max_age: float) -> None:
        """Keep `answer` until its secret expires (less a margin), at most `max_age` s."""
        now = time.time()
        until = now + max_age
        if answer.expires_at is not None:
            lifetime = answer.expires_at - now
            until = min(until, now + lifetime - min(self.margin, max(lifetime, 0) / 10))
        self._entries[(helper_program(name), host)] = (answer, until)

    def forget(self, name: str, host: str) -> None:
        self._entries.pop((helper_program(name), host), None)

    def clear(self) -> None:
        self._entries.clear()


SHARED_CACHE = HelperCache()
