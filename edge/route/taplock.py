"""The lock of one tap cache entry (:mod:`edge.route.tapcache`): ``<cache>/<key>.lock``, locked with ``flock``.

A run that uses an entry's tapped copy holds it shared until it ends (so no other run removes the copy under it);
a run that makes, replaces or removes an entry holds it exclusive. The file is opened with ``O_NOFOLLOW`` (a
symbolic link planted there is refused, never followed out of the cache). A lock file removed by another run (a
pruned entry) is noticed after locking (its inode is no longer at the path) and opened anew. Any failure is an
:class:`OSError` (:class:`~edge.errors.WriteError` when the file cannot be opened): the cache then falls back to a
temporary folder, with a warning. Systems without ``fcntl`` (Windows) have no entry locks: the same fallback.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from edge.errors import WriteError

__all__ = ["EntryLock"]


class EntryLock:
    """``flock`` on ``path`` (created empty if missing); closed (and so released) by :meth:`close` or ``with``."""

    def __init__(self, path: Path):
        try:
            import fcntl
        except ImportError as e:  # pragma: no cover - Windows
            raise WriteError(f"cannot lock {path}: this system has no fcntl (file locks)") from e
        self._fcntl, self.path, self.fd = fcntl, path, -1
        self._open()

    def _open(self) -> None:
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.fd = os.open(self.path, flags, 0o644)
            except PermissionError:  # root's (an old sudo run's) in the user's cache: flock works on a read-only fd
                self.fd = os.open(self.path, os.O_RDONLY | (flags & ~(os.O_RDWR | os.O_CREAT)))
        except OSError as e:
            link = " (a symbolic link: remove it)" if os.path.islink(self.path) else ""
            raise WriteError(f"cannot write the lock {self.path}{link}: {e.strerror or e}") from e

    def try_shared(self) -> bool:
        return self._try(self._fcntl.LOCK_SH)

    def try_exclusive(self) -> bool:
        return self._try(self._fcntl.LOCK_EX)

    def _try(self, how: int) -> bool:
        """Lock now or answer False (held by another run); reopened when the file was removed meanwhile."""
        for _ in range(8):
            try:
                self._fcntl.flock(self.fd, how | self._fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    return False
                raise
            try:
                same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(self.fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return True
            os.close(self.fd)  # removed (its entry pruned) while this run waited: lock the file now there
            self.fd = -1
            self._open()
        raise OSError(errno.EAGAIN, "the lock file keeps being replaced", str(self.path))

    def unlock(self) -> None:
        if self.fd >= 0:
            self._fcntl.flock(self.fd, self._fcntl.LOCK_UN)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> EntryLock:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
