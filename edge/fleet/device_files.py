"""The files one device's sync keeps: its JSON state and plan, stamps and hashes of installed adapters, free space.

Shared by :mod:`edge.fleet.device`; nothing here touches the network.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path

from edge.fleet.oci import FleetError

__all__ = ["sig_path", "stamp", "free_bytes", "disk_reason", "sha256_file", "read_json", "write_json", "locked"]

log = logging.getLogger("edge.fleet")


def sig_path(path: Path) -> Path:
    return path.with_name(path.name + ".sig")  # as edge.format.signing.signature_path


def stamp(st: os.stat_result) -> list[int]:
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def free_bytes(path: Path) -> int | None:
    st = os.statvfs(path) if hasattr(os, "statvfs") else None  # Windows: the write itself reports a full disk
    return st.f_bavail * st.f_frsize if st else None


def disk_reason(where: Path, e: OSError) -> str:
    cause = e if e.errno is not None else e.__cause__  # a WriteError carries the system's error as its cause
    full = isinstance(cause, OSError) and cause.errno == 28
    fix = f"the disk is full ({cause.strerror}); free space there" if full else f"{e}; check that folder"
    return f"cannot write in {where}: {fix} and sync again (nothing was half-installed)"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


MAX_STATE_BYTES = 64 << 20  # state.json and plan.json: a few hundred bytes per adapter


def read_json(path: Path) -> dict | None:
    """The JSON in ``path``, or None if there is none. Bytes that are not JSON at all (torn by a power cut on storage
    that ignored fsync, flash wear), or JSON this project never writes (nested past its depth limit, duplicated keys,
    NaN), are moved aside to ``NAME.unreadable`` (replacing an earlier one), with a warning, and read as none: the
    next sync rebuilds what they recorded, with no one at the device. Read bounded, as a regular file only: a FIFO,
    device or folder in its place, or a file over the limit, is a :class:`FleetError` (nothing is moved)."""
    from edge.errors import FormatError
    from edge.format.io import load_json, read_bounded

    try:
        data = read_bounded(path, MAX_STATE_BYTES, what="sync state")
    except FormatError as e:
        if isinstance(e.__cause__, FileNotFoundError):
            return None
        raise FleetError(f"{e}; delete it to start over") from e
    try:
        return load_json(data, source=f"sync state {path}")
    except FormatError as e:  # not UTF-8, not JSON, or JSON no sync wrote
        aside = path.with_name(path.name + ".unreadable")
        try:
            os.replace(path, aside)
        except OSError as e2:
            raise FleetError(f"sync state {path} is unreadable ({e}) and cannot be moved aside ({e2})") from e
        log.warning("sync state %s was unreadable (%s): moved to %s, rebuilt by this sync", path, e, aside.name)
        return None


def write_json(path: Path, data: dict) -> None:
    from edge.format.io import atomic_write_bytes

    atomic_write_bytes(path, json.dumps(data, sort_keys=True, indent=1).encode())


@contextmanager
def locked(path: Path, seconds: float):
    """Hold the file lock ``path`` (filelock), waiting at most ``seconds`` (``filelock.Timeout`` then). A lock file
    that cannot be opened (a read-only or failing mount, no permission) is a :class:`~edge.errors.WriteError`."""
    from filelock import FileLock, Timeout

    from edge.errors import WriteError

    lock = FileLock(str(path), timeout=seconds)
    try:
        lock.acquire()
    except Timeout:
        raise
    except OSError as e:
        raise WriteError(disk_reason(path.parent, e)) from e
    try:
        yield lock
    finally:
        lock.release()
