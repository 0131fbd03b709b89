"""The tapped copy ``edge update --taps`` runs, kept between runs: a device that updates every few minutes taps each
model once, and later runs neither tap it again nor import onnx (about 1 s here, several on a Raspberry Pi).

An entry is the folder ``<cache>/<key>/`` holding the tapped file (under the model's own name) and ``tap.json``:
the key, the tapped file's size and sha256, the feature output's name and the model's path (resolved, and as
given). The key (:mod:`edge.route.tapkey`) hashes everything the tapped bytes depend on: the model's bytes and the
external data ranges it reads, the tap arguments, the ``edge`` package's sources and the onnx/onnxruntime versions.
The cache is ``$EDGE_TAP_CACHE``, else ``$EDGE_CACHE/taps``, else ``~/.cache/edge/taps``; it keeps at most
``$EDGE_TAP_CACHE_MB`` megabytes (default 2048; ``0`` keeps nothing: every run taps into a temporary folder).

Each run hashes the model, then checks the entry before use: its record (bounded read) must be for this key, and
the tapped file must have the recorded size and sha256. An entry that fails (truncated, rewritten, another
model's, another format) is tapped again, with a warning naming why; one that is just not there is tapped without
one. A run using an entry holds its lock (``<key>.lock``, :mod:`edge.route.taplock`) shared until it ends; making
or removing an entry takes it exclusive, so two runs tap a model once and no run removes a copy another is using.
A run taps into its temporary folder, then copies (or hard-links) the checked copy into the cache and uses its
own: a copy that cannot be kept (full disk, a model changed while it was tapped) costs no second tap and leaves
no entry behind. Before a write, entries of earlier versions of the same model (same path as given or resolved,
same installation and tap arguments: only the model's bytes differ), entries without a record and, past the size
cap with the new copy, the least recently used are removed (never one in use; :mod:`edge.route.tapprune`: only
the cache's own names are touched); a write that finds the disk full removes least recently used entries and is
tried once more. A copy bigger than the cap alone is not kept (said once). A run that waits for another run
making the same entry says so.
A cache whose lock or folder cannot be written is warned about and the run taps into a temporary folder, as
before. So is, warned once per process, a folder others could write (another owner, group- or world-writable,
or such a parent: :mod:`edge.cache_trust`): a record beside the copy proves nothing to whoever can write both;
nothing in it is read, written or pruned. The folder is resolved once (links, ``..``) and only the resolved path
is used. An entry whose folder, record or tapped file is a link, another user's (root's is used) or writable by
others is tapped again. The cache's folders are made 0700; it is one user's, not shared between users.
A model whose bytes cannot be hashed or parsed is tapped uncached, so :func:`edge.route.taps.tap_model`
reports what is wrong with it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from edge.cache_trust import entry_problem, trusted_cache
from edge.errors import ConfigError, EdgeError, FormatError, WriteError
from edge.route.tapkey import FORMAT, TAP_FORMAT, file_sha256, source_key
from edge.route.taplock import EntryLock
from edge.route.tapprune import RECORD, clear, make_room, prepare, prune, read_record

__all__ = ["FORMAT", "TAP_FORMAT", "cache_folder", "cache_limit", "source_key", "tapped_copy"]

log = logging.getLogger("edge.taps")

LOCK_SECONDS = 600.0
DEFAULT_MB, MAX_MB = 2048.0, float(1 << 30)  # at most 1 PiB: a bound before int(), no float overflow
_SLACK = 1 << 16  # the record and file system blocks beside a tapped file: room asked for after a full disk
_OVER_CAP: set[str] = set()  # entries said once to be over the cap
_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))  # no room on the disk, or over the user's quota


class _Busy(Exception):
    """The entry needs tapping again but other runs are using it."""


class _Untrusted(Exception):
    """Others can write the cache folder (:mod:`edge.cache_trust`): not used."""


def cache_folder() -> Path:
    """``$EDGE_TAP_CACHE``, else ``$EDGE_CACHE/taps``, else ``~/.cache/edge/taps``."""
    if os.environ.get("EDGE_TAP_CACHE"):
        return Path(os.environ["EDGE_TAP_CACHE"])
    return Path(os.environ.get("EDGE_CACHE") or Path.home() / ".cache" / "edge") / "taps"


def cache_limit() -> int:
    """Bytes the cache keeps: ``$EDGE_TAP_CACHE_MB`` (default 2048); 0 keeps nothing."""
    text = os.environ.get("EDGE_TAP_CACHE_MB", "").strip()
    try:
        mb = float(text) if text else DEFAULT_MB
    except ValueError:
        mb = -1.0
    if not 0 <= mb <= MAX_MB:  # NaN, inf and 1e303 too (int(1e303 * 2**20) overflows)
        raise ConfigError(
            f"EDGE_TAP_CACHE_MB={text[:40]!r} is not a size in megabytes; set it to a number from 0 to {MAX_MB:.0f} "
            f"(default {DEFAULT_MB:g}; 0 keeps no tapped copies) or unset it"
        )
    return math.ceil(mb * 2**20)


def tapped_copy(
    model: Path,
    taps: str,
    layout: Mapping[str, str],
    tap: Callable[[Path, Path], str],
    stack: contextlib.ExitStack,
    folder: str | os.PathLike | None = None,
) -> tuple[Path, str]:
    """The tapped copy of ``model`` and its feature output: kept from an earlier run, else made by ``tap(src, dst)``
    (which writes the copy at ``dst`` and returns the feature output's name) and kept. ``stack`` holds the entry's
    lock while the run uses a kept copy, and the temporary folder of one it made."""
    limit = cache_limit()
    if not limit:
        log.info("tapping %s uncached (EDGE_TAP_CACHE_MB=0)", model)
        return _scratch(model, tap, stack)
    try:
        key = source_key(model, taps, layout)
    except FormatError as e:  # not a regular file, not ONNX, external data unreadable: tap_model says it best
        log.info("tapping %s uncached: %s", model, e)
        return _scratch(model, tap, stack)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    given = Path(folder) if folder is not None else cache_folder()
    try:  # the resolved folder, each level checked: only it is used from here on (warned once when not trusted)
        root = trusted_cache(given, what="tap cache", env="EDGE_TAP_CACHE", log=log)
        if root is None:
            raise _Untrusted
        entry, dst = root / digest, root / digest / model.name
        owned = prepare(root)  # made with its marker; else only the cache's own names there are touched
        lock = stack.enter_context(EntryLock(root / f"{digest}.lock"))
        features = _wait(lock, entry, key)
    except _Untrusted:  # nothing in it is read, written or pruned
        return _scratch(model, tap, stack)
    except (OSError, _Busy) as e:  # a WriteError too: a symlink planted, a read-only cache, no flock there
        why = "it is in use by another run" if isinstance(e, _Busy) else e
        log.warning("tapped copy of %s not kept (%s); this run taps into a temporary folder", model.name, why)
        return _scratch(model, tap, stack)
    if features is not None:  # the shared lock stays held until the run ends (stack): no run removes it meanwhile
        with contextlib.suppress(OSError):
            os.utime(entry / RECORD)  # its last use: the size cap removes the least recently used first
        log.info("tapped copy of %s read from %s", model, entry)
        return dst, features
    try:  # the exclusive lock is held
        path, features = _scratch(model, tap, stack)
        try:
            again = source_key(model, taps, layout)
        except (FormatError, ConfigError) as e:  # replaced by an unreadable or oversized file meanwhile
            again = {"error": str(e)}
        if again != key:  # the model was replaced while it was tapped: the copy is of one of its versions
            log.warning("%s changed while it was tapped; its tapped copy is not kept (the next run taps again)", model)
            return path, features
        record = {"format": FORMAT, "version": TAP_FORMAT, "key": key, "features": features}
        record.update({"source": str(model.resolve()), "given": os.path.abspath(model)})
        size = path.stat().st_size  # the entry's bytes: the tapped file and its record (as _publish writes it)
        size += len(json.dumps({**record, "size": size, "sha256": "0" * 64}, indent=1)) + 1
        if size > limit:  # kept, it would evict every other entry and still be over the cap: not kept
            level = logging.INFO if digest in _OVER_CAP else logging.WARNING
            _OVER_CAP.add(digest)
            log.log(
                level,
                "tapped copy of %s not kept: %.4g MB, over EDGE_TAP_CACHE_MB (%.4g MB); raise it to keep the copy "
                "(each run taps again meanwhile)",
                model.name,
                size / 2**20,
                limit / 2**20,
            )
            return path, features
        prune(root, digest, record, limit, size, owned=owned)  # before the write: room for it on a small disk
        try:
            try:
                _publish(path, entry, record)
            except OSError as e:
                clear(entry)
                if e.errno not in _FULL or not make_room(root, digest, size + _SLACK):
                    raise
                _publish(path, entry, record)  # once more, with the least recently used entries removed
        except (OSError, FormatError) as e:  # a full disk: this run uses its own copy, the next one taps again
            clear(entry)
            why = e if isinstance(e, EdgeError) else f"cannot write {entry}: {e.strerror or e}"
            log.warning("tapped copy of %s not kept (%s); the next run taps again", model.name, why)
            return path, features
    finally:
        lock.unlock()
    log.info("tapped %s into %s", model, entry)
    return path, features


def _wait(lock: EntryLock, entry: Path, key: dict) -> str | None:
    """The entry's feature output with its lock held shared, or None with it held exclusive (tap it). Waits while
    another run makes it; :class:`_Busy` when it must be made again while other runs use it."""
    deadline, warn, busy, said = time.monotonic() + LOCK_SECONDS, True, 0, False
    while True:
        if lock.try_shared():
            features = _kept(entry, key, warn=warn)
            if features is not None:
                return features
            warn = False
            lock.unlock()
            if lock.try_exclusive():
                if _kept(entry, key, warn=False) is None:
                    return None
                lock.unlock()  # made by another run meanwhile: use it (shared, on the next turn)
                continue
            busy += 1
            if busy >= 3:  # still unusable, still held: other runs use it (another making it holds it exclusive)
                raise _Busy
        elif not said:  # held exclusive: another run is making it (a pruning one lets go at once)
            said = True
            log.warning(
                "waiting for another run to finish tapping %s (it holds %s; this run waits at most %g s)",
                key["name"],
                lock.path,
                LOCK_SECONDS,
            )
        if time.monotonic() > deadline:
            raise ConfigError(
                f"the tapped copy {entry} is being made by another process for over {LOCK_SECONDS:g} s; try "
                "again, or set EDGE_TAP_CACHE to another folder"
            )
        time.sleep(0.05)


def _kept(entry: Path, key: dict, *, warn: bool) -> str | None:
    """The feature output of the entry when it holds a checked tapped copy for ``key``; None otherwise (warned
    why when ``warn`` and the entry exists)."""
    if not os.path.lexists(entry):
        return None
    try:
        rec = read_record(entry)
        if rec.get("key") != key:
            raise ValueError("it was made for another model or other tap arguments")
        size, sha, features = rec.get("size"), rec.get("sha256"), rec.get("features")
        if not (isinstance(size, int) and isinstance(sha, str) and isinstance(features, str) and features):
            raise ValueError("its record lacks the tapped file's size, sha256 or feature output")
        why = entry_problem(entry / key["name"])  # never a link followed out, nor a file others can rewrite
        if why:
            raise ValueError(f"the tapped file {key['name']}: {why}")
        if file_sha256(entry / key["name"], what="tapped model", size=size)[1] != sha:
            raise ValueError("the tapped file's sha256 is not the one recorded (it was modified)")
        return features
    except (OSError, ValueError, KeyError, TypeError, EdgeError) as e:
        if warn:
            log.warning("tapped copy in %s not used (%s); tapping %s again", entry, e, key["name"])
        return None


def _publish(path: Path, entry: Path, record: dict) -> None:
    """Put the tapped file ``path`` in the (new) entry folder, checked, then its record (under the exclusive lock)."""
    from edge.format.io import write_json

    clear(entry)
    if os.path.lexists(entry):  # another user's (an old `sudo -E` run's) left in the user's cache: say how to fix
        raise WriteError(f"{entry} cannot be replaced (not yours); remove it: sudo rm -r {entry}")
    entry.mkdir(0o700)  # in the cache folder, made (0700 too) by trusted_cache
    dst = entry / path.name
    try:
        os.link(path, dst)  # the same file system: no copy
        size, sha = file_sha256(dst, what="tapped model")
    except OSError:
        _copy(path, dst)
        size, sha = file_sha256(dst, what="tapped model")
        if (size, sha) != file_sha256(path, what="tapped model"):
            raise WriteError(f"the copy {dst} differs from the tapped file") from None
    write_json(entry / RECORD, {**record, "size": size, "sha256": sha})


def _copy(src: Path, dst: Path) -> None:
    """Copy ``src`` to the new file ``dst`` (never through a link), synced; OSError (ENOSPC) as it comes."""
    import shutil

    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(dst, flags, 0o644)
    with open(fd, "wb") as out, open(src, "rb") as f:
        shutil.copyfileobj(f, out, 1 << 20)
        out.flush()
        os.fsync(out.fileno())


def _scratch(model: Path, tap: Callable[[Path, Path], str], stack: contextlib.ExitStack) -> tuple[Path, str]:
    """Tap into a temporary folder, removed when ``stack`` closes."""
    import tempfile

    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edge-update-")))
    return folder / model.name, tap(model, folder / model.name)
