"""The tensors an adapter carries, and what each must satisfy (see :mod:`edge.format.adapter`).

A :class:`SparseDelta` (fused into base weights) holds int32 ``[ndim, N]`` indices and float32 ``[N]`` values, and
maybe the int8/uint8 ``[N]`` integers a quantized base takes; a :class:`DenseDelta` (written into a slot) holds a
float32 tensor of its target's shape. :func:`check_target` checks one target's name, declared shape and delta;
a problem is an :class:`~edge.errors.AdapterMismatchError` saying what was given and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge.errors import AdapterMismatchError

__all__ = ["MAX_NAME_LEN", "DenseDelta", "SparseDelta", "check_target"]

MAX_NAME_LEN = 512
_INTS = (np.int8, np.uint8)  # the integer types of a quantized base (edge.format.modelinfo.QUANT_DTYPES)


@dataclass(frozen=True)
class SparseDelta:
    """Deltas at given entries of one tensor, in the tensor's source layout."""

    indices: np.ndarray  # int32 [ndim, N]
    values: np.ndarray  # float32 [N]
    qvalues: np.ndarray | None = None  # int8/uint8 [N]: the integers to write into a quantized base (exact)

    @property
    def nnz(self) -> int:
        return int(self.values.shape[0])


@dataclass(frozen=True)
class DenseDelta:
    """A whole adapter-branch tensor (source layout), written into a model slot."""

    values: np.ndarray  # float32, the full source shape

    @property
    def nnz(self) -> int:
        return int(self.values.size)


def _given(v) -> str:
    """What a caller handed where an array was expected: its type, dtype and shape (a scalar says so)."""
    if isinstance(v, np.ndarray):
        return f"{_a(v.dtype)} array of shape {v.shape}" + (" (0-d: a scalar)" if v.ndim == 0 else "")
    if isinstance(v, np.generic):
        return f"{_a(v.dtype)} scalar ({type(v).__name__}), not an array"
    return f"{type(v).__name__}, not an array"


def _a(dtype) -> str:
    return f"{'an' if str(dtype)[:1] in 'aeiou' else 'a'} {dtype}"


def check_target(tname: str, shape: tuple[int, ...], d, fusable: bool, method: str) -> None:
    """Raise :class:`AdapterMismatchError` unless ``d`` is a valid delta of a ``method`` adapter for a target called
    ``tname`` of ``shape`` (sparse when ``fusable``, else dense)."""
    if not 1 <= len(shape) <= 8 or any(int(n) <= 0 for n in shape) or int(np.prod(shape, dtype=object)) > 1 << 40:
        raise AdapterMismatchError(f"{tname}: shape {shape} is not a plausible tensor shape")
    if not tname or len(tname) > MAX_NAME_LEN or any(c in tname for c in "\0/\\") or ".." in tname:
        raise AdapterMismatchError(f"target name {tname[:80]!r} is not a parameter name")
    if isinstance(d, DenseDelta) == fusable:
        kind = "sparse (SparseDelta)" if fusable else "dense (DenseDelta)"
        raise AdapterMismatchError(f"{tname}: method {method!r} takes {kind} tensors")
    if isinstance(d, DenseDelta):
        v = d.values
        if not isinstance(v, np.ndarray) or v.dtype != np.float32 or tuple(v.shape) != shape:
            raise AdapterMismatchError(
                f"{tname}: dense values must be a float32 array of shape {shape}, got {_given(v)}"
            )
        if not np.all(np.isfinite(v)):
            raise AdapterMismatchError(f"{tname}: values contain NaN or Inf")
        return
    idx, val = d.indices, d.values
    if not isinstance(idx, np.ndarray) or idx.dtype != np.int32 or idx.ndim != 2:
        raise AdapterMismatchError(f"{tname}: indices must be an int32 array [ndim, N], got {_given(idx)}")
    if not isinstance(val, np.ndarray) or val.dtype != np.float32 or val.ndim != 1:
        raise AdapterMismatchError(f"{tname}: values must be a float32 array [N], got {_given(val)}")
    if idx.shape[0] != len(shape):
        raise AdapterMismatchError(f"{tname}: indices shape {idx.shape} does not fit a tensor of shape {shape}")
    if val.shape[0] != idx.shape[1]:
        raise AdapterMismatchError(f"{tname}: {val.shape} values for {idx.shape[1]} indices")
    if idx.size and (idx.min() < 0 or np.any(idx.max(axis=1) >= np.asarray(shape))):
        raise AdapterMismatchError(f"{tname}: indices out of range for shape {shape}")
    if not np.all(np.isfinite(val)):
        raise AdapterMismatchError(f"{tname}: values contain NaN or Inf")
    q = d.qvalues
    if q is not None and not (isinstance(q, np.ndarray) and q.dtype in _INTS and q.shape == val.shape):
        raise AdapterMismatchError(f"{tname}: integer values must be int8 or uint8 [{val.size}], got {_given(q)}")
    if idx.size and _has_duplicates(np.ravel_multi_index(tuple(idx.astype(np.int64)), shape), shape):
        raise AdapterMismatchError(f"{tname}: duplicated indices")


def _has_duplicates(flat: np.ndarray, shape: tuple[int, ...]) -> bool:
    """Whether flat positions repeat: linear time when sorted (as exporters write them) or the tensor is small."""
    if flat.size < 2 or bool(np.all(flat[1:] > flat[:-1])):
        return False
    size = int(np.prod(shape, dtype=np.int64))
    if size <= max(1 << 20, 4 * flat.size):
        return int(np.bincount(flat, minlength=size).max()) > 1
    return np.unique(flat).size != flat.size
