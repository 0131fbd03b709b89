"""Which ``devices/<id>/`` of a shared ``--cache`` is an adapter folder's (device side, no torch).

The id is random hex kept in the folder's own ``.edge-sync-id`` (made on its first sync). A link in its place is
refused (never followed: two folders would share one slot). The slot records the folder it belongs to
(``folder.json``: ``st_dev``/``st_ino`` of the adapter folder and its resolved path). A folder whose inode and path
both differ from that record is a copy (``cp -a``, a cloned card): it is warned about and given an id of its
own, its floors rebuilt from its own files; the original's slot is never touched. A folder moved (same inode), or a
card mounted at another path, even as another device number (same inode), keeps its slot.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path

from edge.errors import ConfigError, FormatError
from edge.fleet.device_files import log, read_json, write_json

__all__ = ["SLOT_ID", "device_slot", "real_folder"]

SLOT_ID = ".edge-sync-id"  # in the adapter folder: which devices/<id>/ of a shared --cache is this folder's
_ID = re.compile(r"^(?:[0-9a-f]{32}|[0-9a-f]{64})$")


def device_slot(adapter_dir: Path, cache: Path, own: bool) -> Path:
    """Where one adapter folder's ``state.json`` and ``plan.json`` live: its own cache (``.edge-sync``) itself, or in
    a ``--cache`` devices may share, ``devices/<id>/`` (see the module). A slot of the earlier layout
    (``devices/<sha256 of the resolved path, 16 hex>``) moves to the id the first time it is seen."""
    if own:
        return cache
    key, real = _slot_id(adapter_dir), str(adapter_dir.resolve())
    slot = cache / "devices" / key
    try:
        real_folder(cache / "devices")
        old = cache / "devices" / hashlib.sha256(real.encode()).hexdigest()[:16]
        if not os.path.lexists(slot) and old.is_dir() and not old.is_symlink():
            old.rename(slot)
            log.warning("sync state of %s moved from %s to %s (keyed by %s)", adapter_dir, old.name, key, SLOT_ID)
        real_folder(slot)
        st = os.stat(adapter_dir)
        me = {"dev": st.st_dev, "ino": st.st_ino, "path": real}
        was = read_json(slot / "folder.json")
        if (
            isinstance(was, dict)
            and was.get("ino") != me["ino"]  # not st_dev: a card's device number may change from one mount to the next
            and was.get("path") != real
        ):
            key = _new_id(adapter_dir)
            log.warning(
                "%s holds the %s of another folder (%s): a copy of it? This folder gets an id of its own (%s); its "
                "version floors start from what its own files prove, the other folder's are kept",
                adapter_dir,
                SLOT_ID,
                str(was.get("path"))[:200],
                key,
            )
            slot = cache / "devices" / key
            real_folder(slot)
            was = None
        if was != me:
            write_json(slot / "folder.json", me)
    except OSError as e:
        raise ConfigError(f"cannot use {slot} as a sync folder: {e.strerror}; give a writable --cache") from e
    return slot


def real_folder(path: Path, make: bool = True) -> None:
    """``path`` as a real folder: a symlink (never followed), file or FIFO in its place is removed and the folder made
    again, so a cleanup or write in it can never reach another folder's files."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not make:
            return
        try:
            path.mkdir()
            return
        except FileExistsError:  # another device's sync sharing the cache made it meanwhile: checked as found
            st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode):
        return
    path.unlink()
    log.warning("removed %s from the sync cache: it was not a folder (a symlink, file or FIFO); made it again", path)
    path.mkdir()


def _new_id(adapter_dir: Path) -> str:
    import secrets

    from edge.format.io import atomic_write_bytes

    key = secrets.token_hex(16)
    atomic_write_bytes(adapter_dir / SLOT_ID, (key + "\n").encode())
    return key


def _slot_id(adapter_dir: Path) -> str:
    from edge.format.io import read_bounded

    path = adapter_dir / SLOT_ID
    try:
        link = stat.S_ISLNK(os.lstat(path).st_mode)
    except FileNotFoundError:
        return _new_id(adapter_dir)
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}; delete it (this folder's floors then start again)") from e
    if link:  # followed, it would give this folder another folder's slot (its floors, its prune)
        raise ConfigError(
            f"{path} is a symbolic link; sync keeps a plain file there, one per folder: delete the link (this "
            "folder's version floors in the shared --cache then start again from its files)"
        )
    try:
        data = read_bounded(path, 128, what="sync id")  # a regular file, bounded, never a FIFO
    except FormatError as e:
        if not isinstance(e.__cause__, FileNotFoundError):
            raise ConfigError(f"{e}; delete it (this folder's version floors then start again)") from e
        return _new_id(adapter_dir)
    text = data.decode("ascii", "replace").strip()
    if not _ID.match(text):
        raise ConfigError(
            f"{path} holds {text[:70]!r}, not the 32 or 64 lowercase hex digits sync writes there: restore it, or "
            "delete it (this folder's version floors in the shared --cache then start again)"
        )
    return text
