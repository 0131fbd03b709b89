"""LoRA pairs of a PEFT adapter as 2-D matrices, and their merged deltas (used by :mod:`edge.convert.peft`).

A convolution's LoRA (PEFT's ``lora.Conv1d/2d/3d``) stores ``A`` as a convolution ``[r, in, *kernel]`` and
``B`` as a 1x1 convolution ``[out, r, 1, ...]``; flattened to ``A [r, in * prod(kernel)]`` and
``B [out, r]`` it merges as a linear layer does, ``delta = (B @ A).reshape(out, in, *kernel) * scaling``
(PEFT's ``_ConvNd.get_delta_weight`` for ``groups == 1``). Grouped convolutions (``B [out, r / groups, 1, ...]``)
are refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from edge.errors import AdapterMismatchError, ConfigError
from edge.format.adapter import SparseDelta
from edge.format.modelinfo import ModelInfo

__all__ = ["low_rank_pair", "merged_lora"]


def low_rank_pair(a: np.ndarray, b: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray, tuple[int, ...] | None]:
    """``(A, B, kernel)``: the pair as 2-D matrices, and ``(in, *kernel)`` for a convolution's LoRA (else None).

    Raises :class:`~edge.errors.ConfigError` naming both shapes when they are no low-rank pair."""
    if a.ndim == 2 and b.ndim == 2 and a.shape[0] == b.shape[1]:
        return a, b, None
    conv = 3 <= a.ndim <= 5 and b.ndim == a.ndim and all(d == 1 for d in b.shape[2:]) and a.shape[0] > 0
    if conv and b.shape[1] == a.shape[0]:
        return a.reshape(a.shape[0], -1), b.reshape(b.shape[0], b.shape[1]), tuple(a.shape[1:])
    grouped = (
        " (a grouped convolution's LoRA is not supported)"
        if conv and b.shape[1] and a.shape[0] % b.shape[1] == 0
        else ""
    )
    raise ConfigError(
        f"{where}: lora A {a.shape} and B {b.shape} are not a low-rank pair: a linear layer's A [r, in] and "
        f"B [out, r], or a convolution's A [r, in, *kernel] and B [out, r, 1, ...]{grouped}; "
        "merge_and_unload() on the host instead"
    )


def merged_lora(path: Path, info: ModelInfo, deltas: Mapping, kernels: Mapping, fan_in_fan_out: bool):
    """Sparse deltas ``scaling * B @ A`` per target (source layout), every shape checked before any is computed.

    ``deltas``: target -> ``(A, B, scaling, embedding)`` (2-D); ``kernels``: target -> ``(in, *kernel)`` of a
    convolution's LoRA. Returns ``(tensors, shapes)``."""
    tensors, shapes = {}, {}
    for target, (a, b, _, emb) in deltas.items():
        shape = tuple(info.tensors[target].shape)
        if target in kernels:
            got = (b.shape[0], *kernels[target])
        else:
            got = (a.shape[1], b.shape[0]) if emb or fan_in_fan_out else (b.shape[0], a.shape[1])
        if got != shape:
            raise AdapterMismatchError(
                f"{path}: LoRA delta for {target!r} is {got}, model {info.name!r} has {shape}; "
                "the adapter was trained on a different base"
            )
    for target, (a, b, scaling, emb) in deltas.items():
        shape = tuple(info.tensors[target].shape)
        delta = (b @ a) * np.float32(scaling)  # PEFT: transpose(B @ A, fan_in_fan_out) * scaling
        if target in kernels:  # a convolution: [out, in * prod(kernel)] back to [out, in, *kernel]
            delta = delta.reshape(shape)
        elif emb or fan_in_fan_out:  # embeddings store [num, dim], the transpose of B @ A, whatever fan_in_fan_out says
            delta = delta.T
        nz = np.nonzero(delta)
        tensors[target] = SparseDelta(np.stack(nz).astype(np.int32), np.ascontiguousarray(delta[nz], np.float32))
        shapes[target] = shape
    return tensors, shapes
