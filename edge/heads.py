"""Detector-head writes: the values a caller hands :meth:`edge.runtime.Runtime.set_head`, checked.

A head (:mod:`edge.route.taps`) is the router's scoring matrix in the graph, written like weights but never by
adapters. Only tensors the model metadata marks ``head`` may be written this way, each whole, at its exact shape,
finite real numbers (never complex, bool, text or objects converted), from a float32 copy the caller cannot change
before the write, whose own shape is checked (an ndarray subclass can report another ``shape``; ``__array__`` can
answer a second call differently).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from edge.errors import ConfigError
from edge.format.modelinfo import ModelInfo

__all__ = ["head_names", "head_writes"]


def head_names(info: ModelInfo) -> list[str]:
    """Names of the model's detector-head tensors (empty unless tapped with a head)."""
    return sorted(k for k, t in info.tensors.items() if t.head)


def head_writes(info: ModelInfo, values: Mapping[str, np.ndarray]) -> list:
    """One whole-tensor write per head tensor in ``values``; ``ConfigError`` before anything is written."""
    from runtimes import WeightWrite  # imported when used, as edge.runtime does: ``import edge`` stays light

    if not isinstance(values, Mapping):
        raise ConfigError(
            f"head values must be a mapping of head tensor name -> array, got {type(values).__name__}; "
            f"heads: {head_names(info) or 'none'}"
        )
    writes = []
    for name, v in list(values.items()):  # one snapshot of the caller's mapping
        t = info.tensors.get(name) if isinstance(name, str) else None
        if t is None or not t.head:
            raise ConfigError(
                f"{str(name)[:80]!r} is not a detector-head tensor of this model; heads: {head_names(info) or 'none'}"
            )
        try:  # the shape (an array's: no copy) before a copy, which the caller cannot change before the write
            shape = v.shape if type(v) is np.ndarray else np.shape(v)
            a = np.array(v) if shape == tuple(t.shape) else None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"head tensor {name!r}: {type(v).__name__} is not an array of numbers") from e
        if a is None or a.shape != tuple(t.shape):  # the copy's own shape: a `shape` or `__array__` may lie
            raise ConfigError(f"head tensor {name!r} has shape {tuple(t.shape)}, got {shape if a is None else a.shape}")
        if a.dtype.kind not in "fiu":  # complex, bool, strings, objects: never converted silently
            raise ConfigError(
                f"head tensor {name!r} holds {a.dtype}, not an array of numbers: pass real numbers (float32)"
            )
        if a.dtype != np.float32:  # (np.errstate costs microseconds: only when converting)
            with np.errstate(over="ignore"):  # a float64 beyond float32: inf, refused below
                a = a.astype(np.float32)
        if not np.isfinite(a).all():
            raise ConfigError(f"head tensor {name!r} has non-finite values")
        writes.append(WeightWrite(t.initializer, None, a))  # the whole tensor: one slice copy
    return writes
