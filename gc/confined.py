"""Filesystem changes confined to one storage directory: never through a symbolic link.

Why: the collector may run as root over a directory another user (the registry)
can write. A link planted there (``repositories/evil -> /etc``) must never make a
rename or a delete act outside it. A path-based call resolves every component when
it runs, so "lstat, then rename the path" leaves a window in which a component can
be swapped for a link. Here every change is made relative to a directory fd opened
one component at a time from the store with ``O_NOFOLLOW | O_DIRECTORY``: a
component that is (or has just become) a link fails that open instead of being
followed. The last component is lstat'ed and refused when it is a link; rename,
unlink and rmdir act on the entry itself anyway, never on what a link names.
Removal never descends into another filesystem (a mount point inside the store).

Paths are absolute strings under the confined directory, as the collector builds
and journals them; one outside it, or with ``..``, is refused before any call.

The limit, stated: an fd stays bound to its directory, so someone who can write the
store *and* a place outside it could move a whole store directory out while we work
in it. We would then still only rename or unlink *names* inside that directory
(never what a link names, never a file's other hard links), the same as if they had
moved those entries out themselves.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
# directory fds `reuse_directories` keeps at most: the shared parents of a sweep (256
# blob prefixes, 64 shards per kind, one _layers/<alg> per repository) while staying far
# below the usual 1024 open files; beyond it parents are opened and closed per call
MAX_REUSED = 512


class UnsafeEntry(Exception):
    """An entry the collector must leave alone: a symbolic link, or outside the store.
    Not an OSError on purpose: handlers that treat OSError as "vanished" must not
    swallow it; it is reported with its path."""

    def __init__(self, path: str, why: str) -> None:
        self.path, self.why = path, why
        super().__init__(f"{path} {why}: left alone")


class ConfinedFS:
    """Renames, removals and directory creation inside `base`, never through a link.

    `base` itself is opened with ``O_NOFOLLOW`` below `anchor` (the operator's
    configured root, which may itself be reached through links); the fd is opened
    on first use and shared by all threads (``*at`` calls are thread-safe).
    """

    def __init__(self, anchor: str, base: str) -> None:
        self.anchor, self.base = anchor.rstrip("/") or "/", base.rstrip("/")
        self._prefix = self.base + "/"
        self._fd: int | None = None
        self._dev = 0
        self._lock = threading.Lock()
        self._reused: dict[str, int] | None = None  # parent path -> fd, in `reuse_directories`

    # --- the confined directory ----------------------------------------------
    def fd(self) -> int:
        if self._fd is None:
            with self._lock:
                if self._fd is None:
                    self._fd = self._open_base()
                    self._dev = os.fstat(self._fd).st_dev
        return self._fd

    def _open_base(self) -> int:
        rel = os.path.relpath(self.base, self.anchor)
        if rel.startswith(".."):
            raise UnsafeEntry(self.base, f"is not inside {self.anchor}")
        fd = os.open(self.anchor, _DIR & ~os.O_NOFOLLOW)  # the anchor: the operator's choice
        if rel == ".":
            return fd
        return self._walk(fd, rel.split("/"), self.anchor, close_start=True)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    @contextmanager
    def reuse_directories(self) -> Iterator[None]:
        """Keep the directory fds `parent` opens until the block ends (one sweep phase:
        10^5 renames into 64 shards need not walk the same 4 components 10^5 times;
        measured 26 -> 9 us per quarantined blob). Each fd was opened without following
        a link, and stays bound to that directory even if its path is later swapped for
        a link, so reuse keeps the guarantee."""
        if self._reused is not None:  # nested: the outer block owns the cache
            yield
            return
        self._reused = {}
        try:
            yield
        finally:
            reused, self._reused = self._reused, None
            for fd in reused.values():
                os.close(fd)

    # --- walking -----------------------------------------------------------------
    def parts(self, path: str) -> list[str]:
        """Components of `path` below the base; refuses anything not plainly inside."""
        if not path.startswith(self._prefix):
            raise UnsafeEntry(path, f"is outside {self.base}")
        parts = path[len(self._prefix) :].split("/")
        if "" in parts or "." in parts or ".." in parts:
            raise UnsafeEntry(path, "is not a plain path inside the store")
        return parts

    def _walk(self, start: int, names: list[str], where: str, *, close_start: bool) -> int:
        """fd of start/names..., every component opened without following a link."""
        fd = start
        try:
            for name in names:
                where = f"{where}/{name}"
                nfd = open_dir_at(fd, name, where)
                if fd != start or close_start:
                    os.close(fd)
                fd = nfd
        except BaseException:
            if fd != start or close_start:
                os.close(fd)
            raise
        return fd

    @contextmanager
    def directory(self, path: str) -> Iterator[int]:
        """An fd of the directory `path` (the base itself when `path` is the base)."""
        base = self.fd()
        if path.rstrip("/") == self.base:
            yield base
            return
        fd = self._walk(base, self.parts(path), self.base, close_start=False)
        try:
            yield fd
        finally:
            os.close(fd)

    @contextmanager
    def parent(self, path: str, *, reuse: bool = False) -> Iterator[tuple[int, str]]:
        """(fd of the directory holding `path`, its last component). `reuse`: keep that
        fd for the rest of a `reuse_directories` block (for parents many entries share,
        never for one item's own directory)."""
        reused = self._reused if reuse else None
        if reused is not None:
            cut = path.rfind("/")
            key, name = path[:cut], path[cut + 1 :]
            fd = reused.get(key)  # a key is only ever stored after its path was checked
            if fd is not None and name not in ("", ".", ".."):
                yield fd, name
                return
        parts = self.parts(path)
        base = self.fd()
        if reused is not None and len(parts) > 1 and len(reused) < MAX_REUSED:
            fd = reused.get(key)
            if fd is None:
                fd = self._walk(base, parts[:-1], self.base, close_start=False)
                with self._lock:
                    kept = reused.setdefault(key, fd)
                if kept != fd:  # another thread opened it first
                    os.close(fd)
                    fd = kept
            yield fd, parts[-1]
            return
        fd = self._walk(base, parts[:-1], self.base, close_start=False)
        try:
            yield fd, parts[-1]
        finally:
            if fd != base:
                os.close(fd)

    # --- queries (never follow the last component either) ---------------------------
    def lstat(self, path: str) -> os.stat_result:
        """FileNotFoundError when absent; UnsafeEntry when reached through a link."""
        with self.parent(path) as (fd, name):
            return os.stat(name, dir_fd=fd, follow_symlinks=False)

    def lexists(self, path: str) -> bool:
        try:
            self.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return True

    def is_dir(self, path: str) -> bool:
        """A real directory (a link to one is not)."""
        try:
            return stat.S_ISDIR(self.lstat(path).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return False

    # --- changes ---------------------------------------------------------------------
    def makedirs(self, path: str) -> None:
        fd = self.fd()
        where = self.base
        opened: int | None = None
        try:
            for name in self.parts(path):
                where = f"{where}/{name}"
                try:
                    os.mkdir(name, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
                nfd = open_dir_at(fd, name, where)
                if opened is not None:
                    os.close(opened)
                fd = opened = nfd
        finally:
            if opened is not None:
                os.close(opened)

    def rename(self, src: str, dst: str) -> None:
        """Move the entry `src` (not a link) to `dst`; both inside the store."""
        with self.parent(src, reuse=True) as (sfd, sname):
            with self.parent(dst, reuse=True) as (dfd, dname):
                if stat.S_ISLNK(os.stat(sname, dir_fd=sfd, follow_symlinks=False).st_mode):
                    raise UnsafeEntry(src, "is a symbolic link")
                os.rename(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)

    def rmdir(self, path: str) -> None:
        with self.parent(path) as (fd, name):
            os.rmdir(name, dir_fd=fd)

    def remove_tree(self, path: str, only_file: str | None = None) -> None:
        """Remove the directory `path` and everything in it. A link met inside is left
        (with what it names) and reported by raising UnsafeEntry once the rest is gone.

        `only_file`: the name of the one file such a directory usually holds (blob
        `data`, a `link`): then try unlink + rmdir before listing anything."""
        with self.parent(path, reuse=True) as (pfd, name):
            if only_file is not None and self._remove_one_file_dir(pfd, name, path, only_file):
                return
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                raise UnsafeEntry(path, "is a symbolic link")
            if not stat.S_ISDIR(st.st_mode):
                os.unlink(name, dir_fd=pfd)
                return
            left = self._empty(pfd, name, path)
            if left:
                raise UnsafeEntry(left[0][0], left[0][1] + _more(len(left)))
            os.rmdir(name, dir_fd=pfd)

    def _remove_one_file_dir(self, pfd: int, name: str, path: str, only_file: str) -> bool:
        """unlink + rmdir when the directory holds just `only_file`, a regular file; False
        (nothing removed) to send anything else down the full walk. No device check here:
        rmdir of a mount point fails, and a one-file directory has nothing below."""
        try:
            fd = open_dir_at(pfd, name, path)  # a link raises UnsafeEntry
        except NotADirectoryError:
            return False
        try:
            try:
                st = os.stat(only_file, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                pass
            else:
                if not stat.S_ISREG(st.st_mode):
                    return False
                os.unlink(only_file, dir_fd=fd)
        finally:
            os.close(fd)
        try:
            os.rmdir(name, dir_fd=pfd)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                return False  # something else in there: the full walk
            raise
        return True

    def _empty(self, pfd: int, name: str, path: str) -> list[tuple[str, str]]:
        """Remove everything inside pfd/name; return (path, why) of what was left."""
        try:
            fd = open_dir_at(pfd, name, path)
        except UnsafeEntry as exc:
            return [(exc.path, exc.why)]
        left: list[tuple[str, str]] = []
        try:
            if os.fstat(fd).st_dev != self._dev:
                return [(path, "is on another filesystem")]
            with os.scandir(fd) as it:
                entries = list(it)
            for e in entries:
                sub = f"{path}/{e.name}"
                if e.is_symlink():
                    left.append((sub, "is a symbolic link"))
                elif e.is_dir(follow_symlinks=False):
                    inner = self._empty(fd, e.name, sub)
                    if inner:
                        left += inner
                    else:
                        os.rmdir(e.name, dir_fd=fd)
                else:
                    os.unlink(e.name, dir_fd=fd)
        finally:
            os.close(fd)
        return left

    def prune_empty(self, path: str) -> None:
        """Remove the empty directories under `path` and `path` itself if it ends up
        empty; anything else (files, links) stays."""
        try:
            with self.parent(path) as (pfd, name):
                if self._prune(pfd, name, path):
                    os.rmdir(name, dir_fd=pfd)
        except (OSError, UnsafeEntry):
            pass

    def _prune(self, pfd: int, name: str, path: str) -> bool:
        try:
            fd = open_dir_at(pfd, name, path)
        except (OSError, UnsafeEntry):
            return False
        empty = True
        try:
            with os.scandir(fd) as it:
                entries = list(it)
            for e in entries:
                if e.is_dir(follow_symlinks=False) and self._prune(fd, e.name, f"{path}/{e.name}"):
                    try:
                        os.rmdir(e.name, dir_fd=fd)
                        continue
                    except OSError:
                        pass
                empty = False
        finally:
            os.close(fd)
        return empty

    @contextmanager
    def open_file(self, path: str, flags: int = 0, mode: int = 0o644) -> Iterator[int]:
        """An fd of the regular file `path` (O_NOFOLLOW: a link raises UnsafeEntry)."""
        with self.parent(path) as (pfd, name):
            try:
                fd = os.open(name, _FILE | flags, mode, dir_fd=pfd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise UnsafeEntry(path, "is a symbolic link") from None
                raise
        try:
            yield fd
        finally:
            os.close(fd)


def open_dir_at(dir_fd: int, name: str, where: str) -> int:
    try:
        return os.open(name, _DIR, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except OSError:
                raise exc from None
            if stat.S_ISLNK(st.st_mode):
                raise UnsafeEntry(where, "is a symbolic link") from None
        raise


def _more(n: int) -> str:
    return f" (and {n - 1} more)" if n > 1 else ""


__all__ = ["ConfinedFS", "UnsafeEntry", "open_dir_at"]
