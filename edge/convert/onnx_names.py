"""Naming the targets :mod:`edge.convert.onnx_import` finds: after torch parameters of equal value, or as valid
adapter target names.

:func:`name_by_value` names each found weight after the state-dict parameter of equal value (its torch layout, or
the transpose for 2-D; a convolution with a BatchNorm folded in up to a per-channel scale); :func:`adapter_names`
turns the ONNX names left (tf2onnx writes ``model/dense/MatMul/ReadVariableOp:0``) into names an adapter may carry
(no ``/``, ``\\``, NUL or ``..``); :func:`select` keeps the targets ``--targets`` patterns match.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np

from edge.convert.bn_fold import folded_scale
from edge.errors import ConfigError, FormatError
from edge.format.adapter import MAX_NAME_LEN
from edge.format.modelinfo import TensorInfo

__all__ = ["adapter_names", "name_by_value", "select"]


def adapter_names(tensors: Mapping[str, TensorInfo]) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """``tensors`` keyed by valid adapter target names, and ``{new name: ONNX name}`` for those renamed.

    A name an adapter cannot carry (``/`` and ``\\`` are path separators in an adapter file's checks, ``..`` and NUL
    too) has each run of them replaced by ``.`` (``model/dense/MatMul:0`` -> ``model.dense.MatMul:0``); a clash
    gets ``_1``, ``_2``. The stored initializer keeps its name (``TensorInfo.initializer``).
    """
    out: dict[str, TensorInfo] = {}
    renamed: dict[str, str] = {}
    for k in [k for k in tensors if _valid(k)]:
        out[k] = tensors[k]
    for k in [k for k in tensors if not _valid(k)]:
        base = re.sub(r"[/\\\0.]*[/\\\0][/\\\0.]*|\.{2,}", ".", k).strip(".")[: MAX_NAME_LEN - 8] or "weight"
        key, n = base, 0
        while key in out or key in tensors:
            n += 1
            key = f"{base}_{n}"
        out[key] = tensors[k]
        renamed[key] = k
    return out, renamed


def _valid(name: str) -> bool:
    return bool(name) and len(name) <= MAX_NAME_LEN and not any(c in name for c in "\0/\\") and ".." not in name


def _digest(a: np.ndarray) -> tuple:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return tuple(a.shape), hashlib.sha256(memoryview(a).cast("B") if a.size else b"").hexdigest()


def name_by_value(found, arrays, params: Mapping[str, np.ndarray]):
    """Name each target after the parameter of equal value (torch layout, or its transpose for 2-D)."""
    by_value: dict[tuple, list[str]] = defaultdict(list)
    for pname, p in params.items():
        p = np.asarray(p)
        if p.ndim >= 2 and p.dtype.kind == "f":
            by_value[_digest(p)].append(pname)
    hits: dict[str, list[tuple[str, TensorInfo]]] = {}
    for init, view in found.items():
        stored = arrays[init]
        torch_layout = stored.T if view.transposed else stored.reshape(view.shape)
        options = [(torch_layout, view.transposed)]
        if stored.ndim == 2 and (view.transposed or stored.shape == view.shape):  # HF's Conv1D keeps [in, out]
            options.append((torch_layout.T, not view.transposed))
        hits[init] = []
        for value, transposed in options:
            for pname in by_value.get(_digest(value), []):
                if all(p != pname for p, _ in hits[init]):  # symmetric: the op's own layout comes first
                    hits[init].append((pname, TensorInfo(init, tuple(value.shape), transposed)))
    exact = {p for cands in hits.values() for p, _ in cands}
    for init, view in found.items():  # a convolution with a BatchNorm folded in: equal up to a per-channel scale
        if not hits[init] and view.ops[-1] == "Conv":
            for pname, p in params.items():
                scale = None if pname in exact else folded_scale(arrays[init].reshape(view.shape), np.asarray(p))
                if scale is not None:
                    hits[init].append((pname, TensorInfo(init, view.shape, channel_scale=tuple(map(float, scale)))))
    owners: dict[str, list[str]] = defaultdict(list)
    for init, cands in hits.items():
        for pname, _ in cands:
            owners[pname].append(init)

    tensors: dict[str, TensorInfo] = {}
    renamed, unmatched, ambiguous = {}, [], {}
    for init, view in found.items():
        cands = hits[init]
        if len(cands) > 1:  # equal values: the initializer's own name decides, if it is one of them
            cands = [c for c in cands if c[0] == init] or cands
        if len(cands) == 1 and len(owners[cands[0][0]]) == 1:
            key, info = cands[0]
            renamed[init] = key
        else:
            key, info = init, TensorInfo(init, view.shape, view.transposed)
            if not cands:
                unmatched.append(init)
            elif len(cands) > 1:
                ambiguous[init] = tuple(sorted(p for p, _ in cands))
            else:  # one parameter stored in several initializers: an adapter would change only one copy
                ambiguous[cands[0][0]] = tuple(sorted(owners[cands[0][0]]))
        if key in tensors:
            raise FormatError(f"{key!r} names two weights (a parameter and another weight's initializer)")
        tensors[key] = info
    missing = sorted(p for p, v in params.items() if np.ndim(v) >= 2 and p not in owners)
    return tensors, renamed, unmatched, ambiguous, missing


def select(tensors: Mapping[str, TensorInfo], patterns: Sequence[str]) -> dict[str, TensorInfo]:
    def hit(key: str, pat: str) -> bool:  # the target name, or the ONNX name it was given for (adapter_names)
        for name in {key, tensors[key].initializer}:
            module = name.removesuffix(".weight")
            if fnmatch.fnmatchcase(name, pat) or module == pat or module.endswith("." + pat):
                return True
        return False

    dead = [p for p in patterns if not any(hit(n, p) for n in tensors)]
    if dead:
        raise ConfigError(
            f"targets {dead} match no weight of the model; its weights include {sorted(tensors)[:8]} "
            "(give globs such as '*.weight' or module names or suffixes)"
        )
    return {k: t for k, t in tensors.items() if any(hit(k, p) for p in patterns)}
