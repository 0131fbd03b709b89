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

__all__ = [
    "sig_path",
    "stamp",
    "free_bytes",
    "disk_reason",
    "sha256_file",
    "read_json",
    "read_plan",
    "write_json",
    "locked",
]

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
    """The sha256 of the regular file ``path`` (anything else, a FIFO included, is a FormatError: never a hang)."""
    from edge.format.io import open_regular

    fd, _ = open_regular(path, what="file to hash")
    h = hashlib.sha256()
    with open(fd, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


MAX_STATE_BYTES = 64 << 20  # state.json and plan.json: a few hundred bytes per adapter


def read_json(path: Path, aside: bool = True) -> dict | None:
    """The JSON in ``path``, or None if there is none. Bytes that are not JSON at all (torn by a power cut on storage
    that ignored fsync, flash wear), or JSON this project never writes (nested past its depth limit, duplicated keys,
    NaN), are moved aside to ``NAME.unreadable`` (replacing an earlier one), with a warning, and read as none: the
    next sync rebuilds what they recorded, with no one at the device. Read bounded, as a regular file only: a FIFO,
    device or folder in its place, or a file over the limit, is a :class:`FleetError` (nothing is moved). With
    ``aside=False`` (another folder's file) nothing is ever moved: unreadable JSON is read as none, with a warning."""
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
        return _aside(path, e) if aside else log.warning("%s ignored: %s", path, e)


def _aside(path: Path, e: Exception) -> None:
    """Move the unreadable sync file ``path`` to ``NAME.unreadable`` (replacing an earlier one), with a warning."""
    aside = path.with_name(path.name + ".unreadable")
    try:
        os.replace(path, aside)
    except OSError as e2:
        raise FleetError(f"sync state {path} is unreadable ({e}) and cannot be moved aside ({e2})") from e
    log.warning("sync state %s was unreadable (%s): moved to %s, rebuilt by this sync", path, e, aside.name)
    return None


def read_plan(path: Path, aside: bool = True) -> dict | None:
    """The last verified plan (``plan.json``, as ``_Sync._verified_plan`` writes it: ``release``, a timezone-aware
    ISO ``expires``, ``targets`` of ``{sha256, length, version, path, [sig]}``), or None if there is none. JSON of
    another shape is moved aside as :func:`read_json` moves unreadable bytes (an offline sync then has no verified
    release to complete, and says so), never a bare TypeError or KeyError in the middle of a sync. ``aside=False``:
    as :func:`read_json`, nothing moved (another folder's plan, maybe written by a newer edge)."""
    plan = read_json(path, aside)
    if plan is None:
        return None
    if (problem := _plan_problem(plan)) is None:
        return plan
    if not aside:
        return log.warning("%s ignored: not a sync plan: %s", path, problem)
    return _aside(path, FleetError(f"not a sync plan: {problem}"))


def sane_state(state: dict, path: Path) -> bool:
    """Whether every adapter entry of a loaded sync state has the fields sync writes (``sha256``, ``length``,
    ``version``; ``sig``, ``fingerprint`` and ``stamp`` of their types if there). If not, ``path`` is moved aside as
    torn bytes are (warned) and False is returned: the caller loads again, rebuilt from what the disk proves, never
    a bare TypeError or KeyError in the middle of a sync."""
    types = {"sig": str, "fingerprint": str, "stamp": list}
    for name, e in state.get("adapters", {}).items():
        if not _target(e) or any(k in e and not isinstance(e[k], t) for k, t in types.items()):
            _aside(path, FleetError(f"adapter {str(name)[:80]!r} has no sha256, length or version of their types"))
            return False
    return True


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _target(t) -> bool:
    """A plan target's or state entry's own fields, typed as sync writes them."""
    return (
        isinstance(t, dict)
        and isinstance(t.get("sha256"), str)
        and _integer(t.get("length"))
        and _integer(t.get("version"))
    )


def _plan_problem(plan) -> str | None:
    from datetime import datetime

    if not isinstance(plan, dict):
        return f"a JSON {type(plan).__name__}, not an object"
    if not _integer(plan.get("release")) or not isinstance(plan.get("expires"), str):
        return "no integer release or no expires date"
    try:
        if datetime.fromisoformat(plan["expires"]).tzinfo is None:
            return f"expires {plan['expires'][:40]!r} has no time zone"
    except ValueError:
        return f"expires {plan['expires'][:40]!r} is no ISO date"
    source = plan.get("source", {})  # absent in plans written before sync recorded it
    if not isinstance(source, dict) or not all(isinstance(v, str) for v in source.values()):
        return "a source that is not an object of strings"
    targets = plan.get("targets")
    if not isinstance(targets, dict):
        return "no targets object"
    for name, t in targets.items():
        if not _target(t) or not isinstance(t.get("path"), str) or ("sig" in t and not _target(t["sig"])):
            return f"target {name[:80]!r} lacks sha256, length, version or path"
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
