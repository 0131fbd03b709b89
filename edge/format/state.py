"""Crash-safe persistence of on-device update state (``edge.learn.update-state``, version 1).

A state file is one safetensors file: the method's arrays as tensors, and in the
header's ``__metadata__["edge"]`` a JSON object with ``format``, ``version``,
``method``, ``base_fingerprint`` (the model the state belongs to), free-form
``meta`` and ``checksum``: ``sha256:`` over the canonical JSON of everything else
in the metadata and every tensor's name, dtype, shape and bytes.

Writes go to a temporary file in the same folder (``.NAME.PID.XXXX.tmp``), which is
flushed, fsynced and atomically renamed over the target; the folder is fsynced so
the rename survives a power cut. A writer killed at any moment leaves either the
previous file or the new one at the path, never a mix, plus at most a stray temp
file, which the next save removes once its writer process is gone. A file whose
checksum does not match (truncated, bit-flipped, hand-edited) raises
:class:`~edge.errors.FormatError` on load. Read with safetensors and json only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge.errors import ConfigError, FormatError, WriteError
from edge.format.io import atomic_write_bytes, read_bounded, read_edge_metadata

__all__ = ["STATE_FORMAT", "STATE_VERSION", "State", "load_state", "save_state", "state_lock"]

STATE_FORMAT = "edge.learn.update-state"
STATE_VERSION = 1
MAX_HEADER_BYTES = 16 * 1024 * 1024
_HEAD_KEYS = frozenset(
    {"format", "version", "method", "base_fingerprint", "meta", "checksum"}
)  # what save_state writes
_DTYPES = {np.dtype(t) for t in ("float32", "float64", "int32", "int64", "uint8", "bool")}


@dataclass(frozen=True)
class State:
    """What a state file holds: tensors plus the method, the model fingerprint and free-form metadata."""

    method: str
    base_fingerprint: str
    tensors: Mapping[str, np.ndarray]
    meta: Mapping[str, object] = field(default_factory=dict)


def save_state(path: str | os.PathLike, state: State) -> Path:
    """Write ``state`` to ``path`` atomically (temp, flush, fsync, rename, fsync folder). Returns the path."""
    from safetensors.numpy import save

    path = Path(path)
    tensors = {k: np.asarray(v, order="C") for k, v in state.tensors.items()}
    bad = {k: str(v.dtype) for k, v in tensors.items() if v.dtype not in _DTYPES}
    if bad:
        raise FormatError(f"state tensors {bad} have unsupported dtypes; allowed: {sorted(map(str, _DTYPES))}")
    head = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "method": state.method,
        "base_fingerprint": state.base_fingerprint,
        "meta": dict(state.meta),
    }
    try:
        head["checksum"] = _checksum(head, tensors)
        blob = save(tensors, metadata={"edge": json.dumps(head, sort_keys=True)})
    except (TypeError, ValueError) as e:
        raise FormatError(f"state metadata must be JSON-serialisable: {e}") from e
    return atomic_write_bytes(path, blob)


def load_state(path: str | os.PathLike, *, max_bytes: int = 1 << 31) -> State:
    """Read and verify a state file. Raises :class:`FormatError` if it is missing, corrupt or tampered with."""
    path = Path(path)
    data = read_bounded(path, max_bytes, what="update state")
    head = _read_header(data, path)
    from safetensors.numpy import load

    try:
        tensors = load(data)
    except Exception as e:  # safetensors raises its own SafetensorError and others on corrupt data
        raise FormatError(f"{path}: corrupt safetensors payload: {e}") from e
    stored = head.pop("checksum", None)
    actual = _checksum(head, tensors)
    if stored != actual:
        raise FormatError(
            f"{path}: checksum mismatch (stored {stored}, computed {actual}); the file is damaged or was edited. "
            "Restore a backup or start a new state"
        )
    if not isinstance(head.get("meta", {}), dict):
        raise FormatError(f"{path}: metadata field 'meta' must be an object")
    if not isinstance(head["method"], str) or not isinstance(head["base_fingerprint"], str):
        raise FormatError(f"{path}: metadata fields 'method' and 'base_fingerprint' must be strings")
    odd = {k: str(v.dtype) for k, v in tensors.items() if v.dtype not in _DTYPES}
    if odd:
        raise FormatError(f"{path}: state tensors {odd} have unsupported dtypes")
    return State(head["method"], head["base_fingerprint"], tensors, head.get("meta", {}))


def _checksum(head: Mapping[str, object], tensors: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256(json.dumps(head, sort_keys=True).encode())
    for name in sorted(tensors):
        arr = np.asarray(tensors[name], order="C")
        h.update(b"\0" + name.encode() + b"\0" + arr.dtype.str.encode() + repr(arr.shape).encode() + b"\0")
        h.update(memoryview(arr).cast("B") if arr.size else b"")
    return "sha256:" + h.hexdigest()


def _read_header(data: bytes, path: Path) -> dict:
    head = read_edge_metadata(
        data,
        str(path),
        fmt=STATE_FORMAT,
        version=STATE_VERSION,
        max_header=MAX_HEADER_BYTES,
        upgrade="upgrade the runtime or start a new state",
    )
    missing = [k for k in ("method", "base_fingerprint", "checksum") if k not in head]
    if missing:
        raise FormatError(f"{path}: metadata lacks the field(s) {missing}")
    unknown = sorted(set(head) - _HEAD_KEYS)
    if unknown:  # the checksum is no signature: a key added with a recomputed one is refused here
        raise FormatError(
            f"{path}: update-state metadata has unknown key(s) {[k[:40] for k in unknown[:5]]}; version "
            f"{STATE_VERSION} knows {sorted(_HEAD_KEYS)}; restore a backup or start a new state"
        )
    return head


@contextlib.contextmanager
def state_lock(path: str | os.PathLike | None, timeout: float = 600.0) -> Iterator[None]:
    """Hold ``PATH.lock`` (``filelock``) for a read-modify-write of the state at ``path`` (no-op for None).

    Two processes updating one state take turns, so neither's samples are lost.
    """
    if path is None:
        yield
        return
    try:
        from filelock import FileLock, Timeout
    except ImportError as e:
        raise ConfigError("concurrent state updates need the 'filelock' package: pip install filelock") from e
    lock_path = Path(f"{os.fspath(path)}.lock")
    try:  # filelock retries a lock file it cannot create until the timeout: fail now, naming it
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644))
    except OSError as e:
        raise WriteError(
            f"cannot write the lock {lock_path} of state {path}: {e.strerror or e}; give --state a path in a "
            "writable folder"
        ) from e
    lock = FileLock(str(lock_path), timeout=timeout)
    try:
        lock.acquire()
    except Timeout as e:
        raise ConfigError(f"state {path} is locked by another update for over {timeout:g} s; try again") from e
    try:
        yield
    finally:
        lock.release()
