"""What a path a user gave is, in words, for refusals that say what was given and what was expected.

``edge devices --devices-dir PIPE`` must not say the folder "does not exist": it exists, and is a FIFO. Every check
of a folder or file given on the command line words its refusal through :func:`not_a` (or :func:`require_folder`),
so a missing path and an existing one of the wrong kind read differently.
"""

from __future__ import annotations

import errno
import os
import stat

from edge.errors import ConfigError

__all__ = ["kind", "mode_kind", "not_a", "require_folder"]

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISREG, "a regular file"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def mode_kind(mode: int) -> str:
    """``st_mode`` in words: ``"a folder"``, ``"a regular file"``, ``"a FIFO (named pipe)"``, ``"a socket"``..."""
    for test, words in _KINDS:
        if test(mode):
            return words
    return "a special file"


def kind(path: str | os.PathLike) -> str | None:
    """What ``path`` is (links followed), in words; None when nothing is there (or a folder on the way is a file)."""
    try:
        return mode_kind(os.stat(path).st_mode)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return "a broken symbolic link" if os.path.islink(path) else None
        return f"not examinable ({e.strerror or e})"


def not_a(path: str | os.PathLike, expected: str) -> str:
    """The words after the path in a refusal: ``"does not exist"``, or ``"is a FIFO (named pipe), not a folder"``."""
    found = kind(path)
    if found is None:
        return "does not exist"
    if found.startswith("not "):
        return f"is {found}"
    return f"is {found}, not {expected}"


def require_folder(path: str | os.PathLike, what: str, fix: str) -> None:
    """:class:`ConfigError` unless ``path`` is a folder (links followed): ``"{what} {path} {not_a(...)}; {fix}"``."""
    if not os.path.isdir(path):
        raise ConfigError(f"{what} {os.fspath(path)} {not_a(path, 'a folder')}; {fix}")
