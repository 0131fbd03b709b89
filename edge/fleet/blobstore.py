"""The blob store of a sync cache (device side, no torch): verified blobs in ``<cache>/blobs``, resumable downloads in
``<cache>/partial``, and which of them a cleanup may delete.

Every file here is the cache's, which anyone able to write the folder can replace: a blob or partial file is opened
without following a symlink (``O_NOFOLLOW``) and non-blocking (a FIFO cannot hang sync past ``--deadline``), and
used only if ``fstat`` says it is a regular file. Anything else in its place (a FIFO, a symlink, a folder, a device)
is deleted and the blob downloaded again, as is a partial file with a second name (a hard link): the registry's
bytes are never written through a planted link. Cleanup lists ``blobs/`` and ``partial/`` through a descriptor
opened without following a symlink and deletes only names of the cache's own pattern (:data:`CACHE_NAME`), one by
one, never a folder tree.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import stat
from pathlib import Path

from edge.fleet.device_files import free_bytes, log, read_plan
from edge.fleet.oci import FleetError, FleetSecurityError, OciClient, RegistryUnreachableError

__all__ = ["SHA256", "fetch", "cached", "clean", "plans_wanting", "drop"]

SHA256 = re.compile(r"^[0-9a-f]{64}$")  # a target's sha256 as TUF signs it: the name of its blob
CACHE_NAME = re.compile(r"^([0-9a-f]{64})(\.sig|\.part)?$")  # what sync writes in blobs/ and partial/
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


def drop(path: Path, quiet: bool = False) -> None:
    """Delete ``path`` whatever it is (file, symlink, FIFO, folder), without following a symlink."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    if not quiet:
        log.warning("removed %s from the sync cache: it was not a regular file", path)


def _open(path: Path, flags: int, mode: int = 0o600) -> int | None:
    """A descriptor on the regular file ``path`` (symlinks not followed), or None if there is none; anything
    else in its place is deleted (:func:`drop`) and None returned."""
    try:
        fd = os.open(path, flags | _NOFOLLOW, mode)
    except FileNotFoundError:
        if flags & os.O_CREAT:  # its folder is gone (the card pulled, the folder deleted)
            raise
        return None
    except OSError as e:  # ELOOP (EMLINK on FreeBSD): a symlink; ENXIO: a FIFO opened for writing; EISDIR: a folder
        if e.errno not in (errno.ELOOP, errno.EMLINK, errno.ENXIO, errno.EISDIR) or not os.path.lexists(path):
            raise
        drop(path)
        return None
    st = os.fstat(fd)
    # a hard link (a second name) would let the registry's bytes be appended to a file outside the cache
    if not stat.S_ISREG(st.st_mode) or (flags & os.O_WRONLY and st.st_nlink != 1):
        os.close(fd)
        drop(path)
        return None
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return fd


def _size(path: Path, missing_ok: bool = True) -> int:
    """The size of the regular file ``path`` of one name (0 when absent; anything else there, a hard link included,
    is deleted)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not missing_ok:
            raise
        return 0
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        drop(path)
        return 0
    return st.st_size


def _hash(path: Path) -> tuple[str, int] | None:
    """``(sha256 hex, size)`` of the regular file ``path``, None if there is none."""
    fd = _open(path, os.O_RDONLY)
    if fd is None:
        return None
    h, n = hashlib.sha256(), 0
    with open(fd, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            n += len(block)
    return h.hexdigest(), n


def cached(done: Path, sha: str, length: int) -> bool:
    """Whether ``done`` is the verified blob (a regular file of that sha256 and length); if not, it is deleted."""
    got = _hash(done)
    if got == (sha, length):
        return True
    if got is not None:
        done.unlink(missing_ok=True)
    return False


def fetch(cache: Path, name: str, t: dict, client: OciClient | None, report, hook) -> Path:
    """The verified blob ``<cache>/blobs/<sha256>``: from the cache, else downloaded (resumed if partial)."""
    sha, length = t["sha256"], int(t["length"])
    if not SHA256.match(sha):  # "" would name the blobs folder itself
        raise FleetSecurityError(f"{name}: its TUF target has no sha256 (got {sha[:80]!r}); the publisher must add one")
    done = cache / "blobs" / sha
    if cached(done, sha, length):
        return done
    if client is None:
        raise RegistryUnreachableError(f"{name}: not in the cache and the registry is unreachable")
    part = cache / "partial" / f"{sha}.part"
    free = free_bytes(cache)  # a signed length the disk cannot hold fails before any byte moves
    need = 2 * length - _size(part)  # the blob, then its installed copy
    if free is not None and need > free:
        raise OSError(28, f"{name} needs {need} bytes, {free} are free")
    for _attempt in (0, 1):  # a resumed file that fails the hash is retried once from byte 0
        start = _size(part)
        if start > length:
            part.unlink()
            start = 0
        if start:
            report.resumed += 1
            report.bytes_resumed_from += start
        if start < length:
            _download(part, name, sha, length, start, client, hook)
        size = _size(part, missing_ok=False)  # gone with its folder: a disk error, "sync again"
        if size < length:  # the connection ended early without an error: resume next time
            if start and size == start:  # nothing past `start` (HTTP 416): the blob is short
                raise FleetSecurityError(f"{name}: the registry's blob ends at byte {start}, {length} were signed")
            raise RegistryUnreachableError(f"{name}: download ended at byte {size} of {length}")
        if _hash(part) == (sha, length):
            os.replace(part, done)
            return done
        part.unlink(missing_ok=True)
        if not start:  # a fresh download that does not match the signed hash: tampered
            break
    raise FleetSecurityError(f"{name}: downloaded bytes do not match the sha256 signed in the TUF targets")


def _download(part: Path, name: str, sha: str, length: int, start: int, client: OciClient, hook) -> None:
    """Append the blob's bytes from ``start`` to ``part``; what arrived is on disk even when the download is cut."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
    fd = _open(part, flags)
    if fd is None:  # something else was there, now deleted: a fresh file
        fd = _open(part, flags)
        if fd is None:
            raise OSError(errno.EEXIST, f"{part} keeps being replaced by something other than a file")
    with open(fd, "ab") as f:
        if f.tell() != start:  # replaced since it was measured: start again next time
            f.truncate(0)
            raise RegistryUnreachableError(f"{name}: {part} changed during the sync; it is downloaded again")
        got = start
        try:
            for data in client.blob_chunks(f"sha256:{sha}", start, on_chunk=hook, length=length):
                got += len(data)
                if got > length:
                    f.truncate(0)
                    raise FleetSecurityError(f"{name}: the registry sent more than the {length} bytes signed")
                f.write(data)  # each piece as it arrives: a cut loses nothing that was received
        finally:
            f.flush()
            os.fsync(f.fileno())


def plans_wanting(cache: Path, plan: dict, others: list[Path]) -> set[str]:
    """The sha256 of every blob this plan or another device's plan (``others``: their plan.json) still wants."""
    wanted: set[str] = set()
    for p in [plan, *(_plan_or_none(path) for path in others)]:
        for t in (p or {}).get("targets", {}).values():
            wanted.add(t["sha256"])
            if "sig" in t:
                wanted.add(t["sig"]["sha256"])
    return wanted


def _plan_or_none(path: Path) -> dict | None:
    try:
        return read_plan(path, aside=False)  # another folder's file: read, never moved or changed
    except FleetError as e:  # a FIFO or a giant file in another folder's place: that folder's next sync says so
        log.warning("%s", e)
        return None


def clean(cache: Path, wanted: set[str]) -> None:
    """Delete blobs and partial downloads no plan in the cache wants (left by an older release): only names of the
    cache's pattern, unlinked through a descriptor on the folder itself (a symlink in its place is not followed)."""
    for sub in ("partial", "blobs"):
        try:
            fd = os.open(cache / sub, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW)
        except OSError as e:  # gone, or a symlink (ELOOP) put there during this sync: nothing is deleted through it
            if e.errno != errno.ENOENT:
                log.warning("%s not cleaned: %s", cache / sub, e.strerror)
            continue
        try:
            for n in os.listdir(fd):
                m = CACHE_NAME.match(n)
                if m is None or m[1] in wanted:
                    continue
                try:
                    os.unlink(n, dir_fd=fd)  # a symlink is removed, never followed
                except IsADirectoryError:  # a folder of that name: left alone
                    log.warning("%s is a folder, not a file sync wrote: left in place", cache / sub / n)
                except (FileNotFoundError, PermissionError):
                    pass
                except OSError as e:  # EBUSY (a mount on it), EROFS: the installs done stand, cleaned next time
                    log.warning("%s not removed: %s", cache / sub / n, e.strerror)
        finally:
            os.close(fd)
