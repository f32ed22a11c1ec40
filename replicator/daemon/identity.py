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

The journal's directory must be ours alone, as OpenSSH's StrictModes wants of `~/.ssh`:
another local user who may write there could replace the journal, or create every
`slot-N.lock` first (we could then lock no slot: a denial of service). So the daemon
refuses a directory (the journal's, or one above it: it could be renamed away) owned
by anyone but us or root, or writable by group or others without the sticky bit; in a
sticky directory (others may add names but not remove or replace ours) it refuses a
journal or lock file another user owns.
"""

from __future__ import annotations

import fcntl
import os
import pwd
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from replicator.errors import ReplicatorError

MAX_SLOTS = 64  # daemons sharing one journal; far more than one SQLite file serves well


def directory_problem(mode: int, owner: int, uid: int) -> str | None:
    """Why a directory with `mode` and `owner` is not safe for the journal of the user
    `uid`, or None (see the module)."""
    if owner not in (uid, 0):
        return f"it is owned by {_user(owner)}, not by {_user(uid)} or root"
    writers = [
        who for who, bit in (("group", stat.S_IWGRP), ("others", stat.S_IWOTH)) if mode & bit
    ]
    if writers and not mode & stat.S_ISVTX:
        return f"it is writable by {' and '.join(writers)} (mode {stat.S_IMODE(mode):04o})"
    return None


def check_journal_directory(journal: Path) -> None:
    """Refuse a journal whose directory (or one above it, which could be renamed away),
    or the journal itself, another local user controls; ReplicatorError naming the
    directory and the fix."""
    if str(journal) == ":memory:":
        return
    directory = journal.resolve().parent
    for place in (directory, *directory.parents):
        try:
            st = os.stat(place)
        except OSError as exc:
            raise ReplicatorError(f"journal directory {place}: {exc.strerror}") from exc
        problem = directory_problem(st.st_mode, st.st_uid, os.geteuid())
        if problem is None:
            continue
        who = "g" * bool(st.st_mode & stat.S_IWGRP) + "o" * bool(st.st_mode & stat.S_IWOTH)
        fix = (
            f"chmod {who}-w {place}"
            if "writable" in problem
            else f"chown {_user(os.geteuid()).split()[0]} {place}"
        )
        where = "" if place == directory else f", above the journal directory {directory}"
        raise ReplicatorError(
            f"refusing the journal directory {place}{where}: {problem}; another local "
            "user could replace the journal or take every instance slot. Fix: "
            f"`{fix}`, or move the journal to a directory only this user may write "
            "(systemd's StateDirectory)"
        )
    _refuse_foreign(journal.resolve())


def _refuse_foreign(path: Path, fd: int | None = None) -> None:
    """A file of ours that another user made first (possible in a sticky directory)."""
    try:
        st = os.fstat(fd) if fd is not None else os.lstat(path)
    except FileNotFoundError:
        return
    if st.st_uid != os.geteuid() or not stat.S_ISREG(st.st_mode):
        what = "owned by " + _user(st.st_uid) if stat.S_ISREG(st.st_mode) else "not a file"
        raise ReplicatorError(
            f"refusing {path}: it is {what}, not by {_user(os.geteuid())}: another local "
            "user may have made it to take the daemon's place; remove it, and let only "
            f"this user write to {path.parent}"
        )


def _user(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


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
    check_journal_directory(journal)
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
            _refuse_foreign(path, fd)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ReplicatorError:
            os.close(fd)
            raise
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
