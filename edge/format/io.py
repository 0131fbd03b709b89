"""File I/O shared by host and device.

Writes are crash-safe (temp file in the same folder, fsync, atomic rename). Reads of
files a user hands us go through :func:`read_bounded` (regular files only, size checked
on the open descriptor before reading), JSON through :func:`load_json` and YAML through
:func:`load_yaml` (depth, alias and duplicate-key limits); every refusal is a
:class:`~edge.errors.FormatError`.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
import struct
from pathlib import Path

from edge.errors import ConfigError, FormatError, WriteError
from edge.format.yaml_io import MAX_YAML_ALIASES, MAX_YAML_DEPTH, MAX_YAML_NODES, load_yaml  # noqa: F401  (re-exported)

__all__ = [
    "atomic_write_bytes",
    "check_regular",
    "check_writable",
    "folder_files",
    "open_regular",
    "load_json",
    "load_yaml",
    "pid_alive",
    "read_bounded",
    "read_edge_metadata",
    "read_safetensors",
    "sweep_stale_temps",
    "write_json",
]


def atomic_write_bytes(path: str | os.PathLike, data, *, mode: int | None = None, parents: bool = True) -> Path:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one.

    ``mode``: the file's permissions from its first byte (e.g. ``0o600`` for a private key); by default those of
    the file it replaces, else ``0o644``. A path that is a FIFO, device or socket is refused, not replaced.
    Missing folders above it are made (default mode) unless ``parents`` is False (a cache made its own ``0700``:
    a folder missing there is a :class:`~edge.errors.WriteError`, not made anew).

    Temp files are named ``.NAME.PID.*.tmp``; ones left by writers that no longer run
    (killed mid-write) are removed first. A write the system refuses (``path`` is a folder, its folder is a file
    or not writable, the disk is full) raises :class:`~edge.errors.WriteError` naming the path and leaves
    whatever was there before. ``data`` may also be a callable taking the open binary file, which writes the
    content in pieces (``edge import-onnx`` streams a model's weights so: no whole copy of the file in memory).
    """
    path = Path(path)
    try:
        if path.is_dir():
            raise IsADirectoryError(21, "is a folder", str(path))
        if path.exists() and not path.is_file():  # a rename would replace the FIFO or device (/dev/null as root)
            raise OSError(errno.EINVAL, "is not a regular file (a FIFO, device or socket)", str(path))
        if parents:
            path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(path)
        import tempfile  # here: with shutil, random, bz2 and lzma it is ~5 ms a load never needs

        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise WriteError(f"cannot write {path}: {e.strerror or e}; give a file path in a writable folder") from e
    try:
        if mode is None:
            mode = path.stat().st_mode & 0o777 if path.exists() else 0o644  # mkstemp makes 0600
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            data(f) if callable(data) else f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise WriteError(f"cannot write {path}: {e.strerror or e} (the file is unchanged)") from e
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def check_writable(path: str | os.PathLike) -> Path:
    """Refuse now, before any work, an output path :func:`atomic_write_bytes` would refuse at the end.

    A folder, FIFO, device or socket at ``path``, a file where a folder should be, or a folder a file cannot be
    created in (read-only, ``/proc``) is a :class:`~edge.errors.WriteError`. Probed by creating and removing a
    temp file in the nearest existing folder; folders still missing are left for the write to create.
    """
    path = Path(path)
    try:
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "is a folder", str(path))
        if path.exists() and not path.is_file():
            raise OSError(errno.EINVAL, "is not a regular file (a FIFO, device or socket)", str(path))
        folder = path.parent
        while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "its folder is a file", str(folder))
        import tempfile  # as in atomic_write_bytes: only a write needs it

        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise WriteError(f"cannot write {path}: {e.strerror or e}; give a file path in a writable folder") from e
    return path


def write_json(path: str | os.PathLike, data: object) -> Path:
    """Write ``data`` as indented JSON, atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, (json.dumps(data, indent=1) + "\n").encode())


def _remove_stale_temps(path: Path) -> None:
    """Delete temp files of earlier writes to ``path`` whose writer process no longer exists."""
    pat = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)\..*\.tmp$")
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        m = pat.match(name)
        if m and not pid_alive(int(m.group(1))):
            try:
                os.unlink(path.parent / name)
            except OSError:
                pass


# what mkstemp makes of atomic_write_bytes' prefix and suffix: ".NAME.PID." + 8 of [a-z0-9_] + ".tmp"
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[a-z0-9_]{8}\.tmp$")


def sweep_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files :func:`atomic_write_bytes` left in ``folder`` (``.NAME.PID.XXXXXXXX.tmp``, regular
    files only) whose writer process no longer runs, and nothing else; returns what was removed.

    A write killed mid-way leaves its temp file until the same name is written again, which may be never (an
    adapter withdrawn since); call this where no other writer of this project can be at work (under its lock).
    """
    folder = Path(folder)
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    gone = []
    for name in names:
        m = _TEMP_NAME.match(name)
        if not m or pid_alive(int(m.group("pid"))):
            continue
        path = folder / name
        try:
            if stat.S_ISREG(os.lstat(path).st_mode):
                os.unlink(path)
                gone.append(path)
        except OSError:
            pass
    return gone


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (its temp files are its own while it does)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- bounded reads of files a user hands us -------------------------------------------------------------------------

MAX_JSON_DEPTH = 64  # metadata, configs and signatures nest a few levels; deeper is hostile


def read_bounded(path: str | os.PathLike, limit: int, *, what: str = "file") -> bytes:
    """The bytes of the regular file ``path``, refused with :class:`FormatError` unless at most ``limit`` long.

    The size is taken from ``fstat`` on the open descriptor (``stat`` on a path is racy, and is 0
    for a FIFO or ``/dev/zero``), only regular files are read (FIFOs, devices, sockets and folders
    are refused; a FIFO is opened non-blocking, so it cannot hang the caller), and exactly that
    many bytes are read: a file that changes size while being read is refused too.
    """
    fd, st = open_regular(path, what=what)
    try:
        if st.st_size > limit:
            raise FormatError(f"{what} {os.fspath(path)} is {st.st_size} bytes, over the limit of {limit} bytes for it")
        with open(fd, "rb", closefd=False) as f:  # BufferedReader.read(n): one allocation, loops until n or EOF
            data = f.read(st.st_size)
            extra = f.read(1)
        if len(data) != st.st_size or extra:
            raise FormatError(f"{what} {os.fspath(path)} changed size while being read; try again")
        return data
    except OSError as e:
        raise FormatError(f"cannot read {what} {os.fspath(path)}: {e.strerror or e}") from e
    finally:
        os.close(fd)


def open_regular(path: str | os.PathLike, *, what: str = "file") -> tuple[int, os.stat_result]:
    """An open descriptor (blocking, close it yourself) and the ``fstat`` of the regular file ``path``.

    Opened non-blocking first, so a FIFO cannot hang the caller; anything but a regular file
    (a FIFO, device, socket or folder) is a :class:`FormatError`, and so is a file that cannot be opened.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise FormatError(f"cannot read {what} {os.fspath(path)}: {e.strerror or e}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            from edge.format.paths import mode_kind

            kind = "a folder" if stat.S_ISDIR(st.st_mode) else f"{mode_kind(st.st_mode)}, not a regular file"
            raise FormatError(f"cannot read {what} {os.fspath(path)}: it is {kind}; give a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except OSError as e:
        os.close(fd)
        raise FormatError(f"cannot read {what} {os.fspath(path)}: {e.strerror or e}") from e
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def folder_files(folder: str | os.PathLike, suffix: str, limit: int, *, what: str, fix: str) -> list[Path]:
    """The entries of ``folder`` whose names end in ``suffix``, sorted; listed one entry at a time and refused
    (:class:`ConfigError`: ``"{what} {folder} holds more than {limit} {suffix} files; {fix}"``) past ``limit`` of
    them. ``Path.glob`` lists a folder whole before matching: a million entries took 240 MB and 8 s, 470 MB with
    every name matching, before a refusal could count them."""
    folder = Path(folder)
    found: list[Path] = []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.endswith(suffix):
                    found.append(folder / entry.name)
                    if len(found) > limit:
                        raise ConfigError(f"{what} {folder} holds more than {limit} {suffix} files; {fix}")
    except OSError as e:
        raise FormatError(f"cannot list {what} {folder}: {e.strerror or e}; give a readable folder") from e
    return sorted(found)


def check_regular(path: str | os.PathLike, *, what: str = "file") -> int:
    """Size of ``path`` if it is a regular file (checked on an open descriptor); :class:`FormatError` otherwise.

    For files another library opens itself (a model read by ``onnx``): a FIFO or device would
    hang or flood it, so it is refused first.
    """
    fd, st = open_regular(path, what=what)
    os.close(fd)
    return st.st_size


def load_json(data: bytes | str, *, source: str = "JSON", max_depth: int = MAX_JSON_DEPTH) -> object:
    """Parse JSON the one way this project does: nesting at most ``max_depth`` deep, no duplicated
    keys, no ``NaN``/``Infinity`` constants, UTF-8. Anything else is a :class:`FormatError`."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            raise FormatError(f"{source}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    elif isinstance(data, str):
        text = data
    else:
        raise FormatError(f"{source}: expected JSON text, got {type(data).__name__}")
    depth = _json_depth(text)
    if depth > max_depth:
        raise FormatError(f"{source}: JSON nests {depth} levels deep, over the limit of {max_depth}")
    try:
        return json.loads(text, object_pairs_hook=_unique_pairs, parse_constant=_no_constant, parse_float=_finite)
    except FormatError as e:
        raise FormatError(f"{source}: {e}") from e
    except (ValueError, RecursionError) as e:
        raise FormatError(f"{source}: not valid JSON: {e}") from e


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)


def _json_depth(text: str) -> int:
    """Deepest bracket nesting outside strings (linear time; strings removed first)."""
    import numpy as np

    bare = _JSON_STRING.sub("", text)
    if not bare:
        return 0
    codes = np.frombuffer(bare.encode("utf-8", "replace"), np.uint8)
    step = np.zeros(codes.shape, np.int64)
    step[(codes == ord("[")) | (codes == ord("{"))] = 1
    step[(codes == ord("]")) | (codes == ord("}"))] = -1
    return int(np.cumsum(step).max(initial=0))


def _unique_pairs(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise FormatError(f"duplicated key {k[:80]!r} in a JSON object")
        out[k] = v
    return out


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise FormatError(f"JSON number {text[:40]} overflows a float (numbers must be finite)")
    return value


def _no_constant(name: str):
    raise FormatError(f"JSON constant {name} is not allowed (numbers must be finite)")


# -- safetensors through the library only ------------------------------------------------------------------
_DTYPES = {  # safetensors dtype -> numpy (little-endian); BF16 is widened to float32 exactly
    "BF16": "<u2",
    "F16": "<f2",
    "F32": "<f4",
    "F64": "<f8",
    "I8": "i1",
    "I16": "<i2",
    "I32": "<i4",
    "I64": "<i8",
    "U8": "u1",
    "BOOL": "?",
}


def read_safetensors(path: str | os.PathLike, limit: int, *, what: str = "safetensors file") -> dict:
    """All tensors of a safetensors file as numpy arrays, parsed by the ``safetensors`` library (bounded read).

    ``safetensors.deserialize`` validates the header (offsets in range, non-overlapping, sizes
    matching dtype and shape) and hands back each tensor's bytes; numpy has no bfloat16, so
    BF16 bytes are widened to float32 (exact) here.
    """
    import numpy as np
    import safetensors

    data = read_bounded(path, limit, what=what)
    try:
        items = safetensors.deserialize(data)
    except Exception as e:  # safetensors' SafetensorError on any malformed header or payload
        raise FormatError(f"{os.fspath(path)}: corrupt safetensors file: {e}") from e
    del data
    out = {}
    for key, spec in items:
        kind = spec["dtype"]
        if kind not in _DTYPES:
            raise FormatError(f"{path}: {key}: dtype {kind} is not supported; allowed: {', '.join(_DTYPES)}")
        shape = [int(d) for d in spec["shape"]]
        arr = np.frombuffer(spec["data"], dtype=np.dtype(_DTYPES[kind]))
        if arr.size != int(np.prod(shape, dtype=np.int64)):
            raise FormatError(f"{path}: {key}: {arr.size} values for shape {shape}")
        if kind == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        out[key] = arr.astype(arr.dtype.newbyteorder("="), copy=False).reshape(shape)
    return out


def read_edge_metadata(data: bytes, source: str, *, fmt: str, version: int, max_header: int, upgrade: str) -> dict:
    """The ``__metadata__["edge"]`` JSON of a safetensors file of this project, checked for ``fmt`` and ``version``.

    Shared by every safetensors format of ours (adapters, update states): the header length is
    bounded before the header is read, both JSON documents go through :func:`load_json`, and a
    wrong format or version is a :class:`FormatError` saying what to do (``upgrade``).
    """
    if len(data) < 8:
        raise FormatError(f"{source}: {len(data)} bytes is too short for a safetensors file (truncated?)")
    (hlen,) = struct.unpack("<Q", data[:8])
    if hlen > max_header or hlen > len(data) - 8:
        raise FormatError(f"{source}: header length {hlen} is larger than allowed or than the file (truncated?)")
    header = load_json(data[8 : 8 + hlen], source=f"{source}: safetensors header")
    try:
        text = header["__metadata__"]["edge"]
        if not isinstance(text, str):
            raise TypeError("the 'edge' metadata entry is not a string")
    except (KeyError, TypeError) as e:
        raise FormatError(f"{source}: no readable edge metadata in the safetensors header: {e!r}") from e
    meta = load_json(text, source=f"{source}: edge metadata")
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise FormatError(f"{source}: format is {got!r}, expected {fmt!r}")
    got = meta.get("version")
    if type(got) is not int or got != version:
        raise FormatError(
            f"{source}: {fmt} version {got!r} is not supported (this runtime reads version {version}); {upgrade}"
        )
    return meta
