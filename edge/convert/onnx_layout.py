"""How an op chain (Transpose, Reshape, Flatten, Squeeze, Unsqueeze, Identity, Cast) between an ONNX initializer and
the op reading it permutes the stored values: :func:`apply_op` pushes an array of flat positions through one op of
the chain, for :mod:`edge.convert.onnx_import`'s layout detection (moved out of it, which is at the module limit)."""

from __future__ import annotations

import numpy as np

__all__ = ["NotAWeight", "apply_op"]


class NotAWeight(Exception):
    """An initializer read in a way no adapter can follow (the reason is the message)."""


def apply_op(op, idx: np.ndarray, arrays, producer) -> np.ndarray:
    kind = op.op_type
    attrs = {a.name: a for a in op.attribute}
    if kind == "Identity" or kind == "Cast" and attrs["to"].i == 1:  # a float32 weight cast to float32: as stored
        return idx
    if kind == "Cast":  # what the op reads is another type than the stored float32: an adapter could not reach it
        raise NotAWeight(
            f"cast to ONNX data type {attrs['to'].i} before its reader (only weights read as float32 are adapted)"
        )
    if kind == "Transpose":
        perm = list(attrs["perm"].ints) if "perm" in attrs else None
        return np.transpose(idx, perm)
    if kind == "Flatten":
        axis = attrs["axis"].i if "axis" in attrs else 1
        axis = axis + idx.ndim if axis < 0 else axis
        return idx.reshape(int(np.prod(idx.shape[:axis])), -1)
    if kind in ("Squeeze", "Unsqueeze"):
        axes = _const(op.input[1], arrays, producer) if len(op.input) > 1 else attrs.get("axes")
        axes = list(axes.ints) if hasattr(axes, "ints") else (None if axes is None else [int(a) for a in axes])
        if kind == "Squeeze":
            return np.squeeze(idx, axis=tuple(axes) if axes else None)
        return np.expand_dims(idx, axis=tuple(axes))
    shape = [int(s) for s in _const(op.input[1], arrays, producer)]  # Reshape
    if not (attrs["allowzero"].i if "allowzero" in attrs else 0):
        shape = [idx.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return idx.reshape(shape)


def _const(value: str, arrays, producer) -> np.ndarray:
    if value in arrays:
        return arrays[value]
    node = producer.get(value)
    if node is not None and node.op_type == "Constant":
        from onnx import numpy_helper

        for a in node.attribute:
            if a.name == "value":
                return numpy_helper.to_array(a.t)
            if a.name == "value_ints":
                return np.array(a.ints, np.int64)
    raise NotAWeight(f"its {value!r} shape operand is computed at run time")
