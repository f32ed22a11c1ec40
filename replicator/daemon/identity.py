"""The daemon's default identity: the same across restarts, distinct between daemons.

The identity names a daemon's task leases and, with MQTT, its persistent session. A
`hostname-pid` changes at every restart, so a crashed daemon's leases were nobody's
until they expired, and its MQTT session stayed in a shared group taking a share of
the events for no one. Instead:

* the journal names the installation (`Journal.installation_id`, made once and kept);
* each daemon on that journal claims a slot: the lowest N whose lock file beside the
  journal (`<journal>.slot-N.lock`) it can `flock`. The kernel drops the lock when the
  process dies however it dies, so a restarted daemon gets its slot back while two
  daemons running at once on one journal get distinct slots.

The identity is `<installation>-<slot>`, e.g. `eu-west-1-3f9a1c2b-0`. No other live
process holds it, so at start the daemon may return every lease that identity holds:
they belong to its own dead predecessor. `--instance-id` and `mqtt.client_id` override
it (the operator then owns uniqueness).
"""

from __future__ import annotations

import fcntl
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from replicator.errors import ReplicatorError

MAX_SLOTS = 64  # daemons sharing one journal; far more than one SQLite file serves well


def instance_name(installation_id: str, slot: int) -> str:
    return f"{installation_id}-{slot}"


def slot_lock_path(journal: Path, slot: int) -> Path:
    return journal.with_name(f"{journal.name}.slot-{slot}.lock")


@dataclass
class InstanceIdentity:
    """An identity this process holds; `slot` None when it was not claimed (given
    explicitly, or a journal without a file)."""

    id: str
    slot: int | None = None
    _fd: int | None = None

    def release(self) -> None:
        """Give the slot back (at exit; the kernel does it anyway if the process dies)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the only descriptor drops the flock


def claim_identity(journal: Path, installation_id: str) -> InstanceIdentity:
    """Claim the lowest free slot of the installation whose journal is `journal`."""
    if str(journal) == ":memory:":  # no file to share, so nobody to be distinct from
        return InstanceIdentity(f"{socket.gethostname()}-{os.getpid()}")
    journal = journal.resolve()  # one journal reached by two paths (a link) has one set of slots
    for slot in range(MAX_SLOTS):
        path = slot_lock_path(journal, slot)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o640)
        except OSError as exc:
            raise ReplicatorError(
                f"cannot claim an instance slot: {path}: {exc.strerror} (the directory of "
                "the journal must be writable; or pass --instance-id)"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        except OSError as exc:
            os.close(fd)
            raise ReplicatorError(
                f"cannot lock {path}: {exc.strerror} (a file system without flock?); "
                "pass --instance-id"
            ) from exc
        return InstanceIdentity(instance_name(installation_id, slot), slot, fd)
    raise ReplicatorError(
        f"{MAX_SLOTS} daemons already run on journal {journal}; give each its own journal"
    )
