"""The tap cache's folder (:mod:`edge.route.tapcache`): which of its names are the cache's own, and removing them.

The cache touches only its own names: entry folders named by their key's hash (32 lowercase hex digits) and their
``<hash>.lock`` files (empty). Anything else there (``EDGE_TAP_CACHE`` pointed at a folder that holds other
things) is never removed, nor counted against the size cap. A folder the cache creates, or finds holding nothing
but its own names, gets the marker :data:`MARKER`; in a folder without it that holds other files (warned about
once), an entry folder is removed only when it holds a record of this cache (a folder without one may be someone
else's that happens to be named so).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
from pathlib import Path

from edge.cache_trust import entry_problem, make_private
from edge.errors import EdgeError, WriteError
from edge.route.tapkey import FORMAT, TAP_FORMAT
from edge.route.taplock import EntryLock

__all__ = ["MARKER", "RECORD", "clear", "is_entry", "make_room", "prepare", "prune", "read_record"]

log = logging.getLogger("edge.taps")

RECORD = "tap.json"
MARKER = "edge-tap-cache.txt"
_MAX_RECORD = 1 << 16  # a record is well under 1 KB
_ENTRY = re.compile(r"[0-9a-f]{32}")
_FOREIGN_WARNED: set[str] = set()
#: key fields of the installation that made an entry: an entry differing from a new one only in the model's bytes
#: (``sha256``, ``external``) is an earlier version of it; another installation's is left to the size cap
_MODEL_BYTES = ("sha256", "external")


def is_entry(name: str) -> bool:
    return _ENTRY.fullmatch(name) is not None


def prepare(root: Path) -> bool:
    """Create the cache folder (with its marker) when missing, mark one holding only the cache's names; whether it
    is the cache's own (marked). One that holds other files is warned about (once) and used, touching only the
    cache's names."""
    try:
        if not os.path.lexists(root):
            make_private(root)  # 0700, as edge.cache_trust.trusted_cache makes it
        elif not root.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a folder")
        if os.path.isfile(root / MARKER) and not os.path.islink(root / MARKER):
            return True
        with os.scandir(root) as it:
            foreign = next((e.name for e in it if not _own(e.name)), None)
    except OSError as e:
        raise WriteError(
            f"cannot use the tap cache folder {root}: {e.strerror or e}; set EDGE_TAP_CACHE to a writable folder"
        ) from e
    if foreign is None:
        return _mark(root)
    if str(root) not in _FOREIGN_WARNED:
        _FOREIGN_WARNED.add(str(root))
        log.warning(
            "the tap cache folder %s holds files that are not tapped copies (%r, ...); they are left alone (the "
            "cache touches only folders of 32 hex digits and their .lock files); set EDGE_TAP_CACHE to a folder of "
            "its own",
            root,
            foreign,
        )
    return False


def _own(name: str) -> bool:
    return is_entry(name) or (name.endswith(".lock") and is_entry(name[:-5])) or name == MARKER


def _mark(root: Path) -> bool:
    """Write the marker in the (empty or just made) cache folder; False when it cannot be written."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(root / MARKER, flags, 0o644)
    except FileExistsError:
        return os.path.isfile(root / MARKER) and not os.path.islink(root / MARKER)
    except OSError:
        return False
    try:
        with open(fd, "w") as f:
            f.write("edge tap cache (edge update --taps): folders named by 32 hex digits, and their .lock files, are\n")
            f.write("tapped model copies, removed when stale or over EDGE_TAP_CACHE_MB; nothing else here is touched\n")
        return True
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(root / MARKER)
        return False


def read_record(entry: Path) -> dict:
    """The entry's record (bounded read); OSError, ValueError or EdgeError saying why not. An entry folder or record
    that is a link, another user's (not root's) or writable by others is not read
    (:func:`edge.cache_trust.entry_problem`)."""
    from edge.format.io import load_json, read_bounded

    path = entry / RECORD
    for what, why in (("entry", entry_problem(entry)), ("record", entry_problem(path))):
        if why:
            raise ValueError(f"its {what} is not used: {why}")
    rec = load_json(read_bounded(path, _MAX_RECORD, what="tap cache record"), source=str(path))
    if not (isinstance(rec, dict) and rec.get("format") == FORMAT and rec.get("version") == TAP_FORMAT):
        raise ValueError("another format or version")
    if not isinstance(rec.get("key"), dict):
        raise ValueError("its record holds no key")
    return rec


def _scan(root: Path, digest: str) -> tuple[set[str], set[str]]:
    """(entry folders, lock files' entry names) in ``root``: the whole folder listed, only the cache's names kept."""
    folders, locks = set(), set()
    with os.scandir(root) as it:
        for e in it:
            if is_entry(e.name) and e.name != digest and e.is_dir(follow_symlinks=False):
                folders.add(e.name)
            elif e.name.endswith(".lock") and is_entry(e.name[:-5]) and e.is_file(follow_symlinks=False):
                locks.add(e.name[:-5])
    return folders, locks


def prune(root: Path, digest: str, record: dict, limit: int, size: int, *, owned: bool) -> None:
    """Before entry ``digest`` (``size`` bytes) is written: remove, when no run holds them, entries of earlier
    versions of the same model (same path as given or resolved, same installation and tap arguments: only the
    model's bytes differ), entries without a readable record (``owned`` only), lock files without an entry, and
    the least recently used entries while the rest and the new one are over ``limit`` bytes."""
    try:
        folders, locks = _scan(root, digest)
    except OSError:
        return
    same = {k: v for k, v in record["key"].items() if k not in _MODEL_BYTES}
    kept = []  # (last use, bytes, name)
    for name in sorted(folders):
        try:
            rec = read_record(root / name)
        except (OSError, ValueError, EdgeError):
            rec = None
        if rec is None:
            if owned:
                _remove(root, name, "no record")
            continue
        path = rec.get("source") == record["source"] or rec.get("given") == record["given"]
        if path and all(rec["key"].get(k) == v for k, v in same.items()):
            _remove(root, name, "an earlier version of " + record["key"]["name"])
        else:
            kept.append(_usage(root / name) + (name,))
    for name in locks - {digest}:  # an orphan only when its folder is not there; never a file with content
        with contextlib.suppress(OSError):
            if not os.path.lexists(root / name) and not os.stat(root / f"{name}.lock", follow_symlinks=False).st_size:
                _remove(root, name, "")
    total = sum(b for _, b, _ in kept) + size
    for _, bytes_, name in sorted(kept):
        if total <= limit:
            break
        if _remove(root, name, f"the cache is over EDGE_TAP_CACHE_MB ({limit / 2**20:.4g} MB)"):
            total -= bytes_


def make_room(root: Path, digest: str, need: int) -> bool:
    """After a write failed for want of space: remove the least recently used entries no run holds until ``need``
    bytes are free; False (nothing removed) when removing all of them would not free that much."""
    try:
        folders, _ = _scan(root, digest)
        free = shutil.disk_usage(root).free
    except OSError:
        return False
    kept = []
    for name in folders:
        with contextlib.suppress(OSError, ValueError, EdgeError):
            read_record(root / name)
            kept.append(_usage(root / name) + (name,))
    if free + sum(b for _, b, _ in kept) < need:
        return False
    for _, bytes_, name in sorted(kept):
        if free >= need:
            break
        if _remove(root, name, "the disk holding the cache is full"):
            free += bytes_
    return free >= need


def _usage(entry: Path) -> tuple[float, int]:
    """(last use: the record's mtime, bytes) of an entry."""
    try:
        with os.scandir(entry) as it:
            files = [e.stat(follow_symlinks=False) for e in it]
        return os.stat(entry / RECORD).st_mtime, sum(s.st_size for s in files)
    except OSError:
        return 0.0, 0


def _remove(root: Path, name: str, why: str) -> bool:
    """Remove entry ``name`` and its lock file when no run holds the lock; whether it was removed."""
    try:
        with EntryLock(root / f"{name}.lock") as lock:
            if not lock.try_exclusive():
                return False
            clear(root / name)
            if os.path.lexists(root / name):  # another user's (root's, an old sudo run's): not removable by us
                return False
            os.unlink(root / f"{name}.lock")
    except OSError:
        return False
    if why:
        log.info("removed the tapped copy %s (%s)", root / name, why)
    return True


def clear(entry: Path) -> None:
    """Remove the entry folder (a link or file in its place too); a failure shows when it is written."""
    with contextlib.suppress(OSError):
        if entry.is_symlink() or (entry.exists() and not entry.is_dir()):
            entry.unlink()
        elif entry.is_dir():
            shutil.rmtree(entry)
