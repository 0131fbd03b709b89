"""ONNX translations :func:`exporters.onnx.export_onnx` gives torch's dynamo exporter for aten ops it mistranslates.

* ``aten.rsub.Scalar`` (``1.0 - tensor``): onnxscript's torchlib has no translation, and torch's decomposition of
  a float scalar minus an integer tensor (XLNet's ``input_mask = 1.0 - attention_mask`` on the int64 mask) is
  ``aten.sub.Tensor(1.0, tensor)``, which has no overload: the export failed with "Cannot find a compatible
  OpOverload for aten.sub". Here it is ``Sub(other, alpha * self)``.

  The exporter dispatches an op to its first registered translation whatever the arguments (torch 2.13's
  ``_dispatching.dispatch``), and an op in the table is no longer decomposed, so this one takes every ``rsub``
  with a scalar: integer, float or symbolic (``x.shape[1] * 0.5``), on any real tensor type. It computes as torch
  does: the result type is torch's own (:func:`torch.result_type` of the tensor and the scalar: an integer tensor
  and a float give the default float type), and an integer constant is wrapped into the tensor's type as torch
  wraps it (``300 - uint8`` subtracts 44 modulo 256), never an overflow.

Host side: imports torch and onnxscript (both come with torch's exporter).
"""

from __future__ import annotations

import numbers

import torch

__all__ = ["result_dtype", "translations", "wrap_int"]

#: ONNX element type names (``onnx_ir.DataType``) and torch's real types an ``rsub`` can hold.
_TORCH_TYPES = {
    "FLOAT": torch.float32,
    "DOUBLE": torch.float64,
    "FLOAT16": torch.float16,
    "BFLOAT16": torch.bfloat16,
    "INT8": torch.int8,
    "INT16": torch.int16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "UINT8": torch.uint8,
}


def result_dtype(tensor_type: str, scalar) -> torch.dtype:
    """torch's result type of a ``tensor_type`` tensor (an ONNX type name) with the Python number ``scalar``."""
    if tensor_type not in _TORCH_TYPES:
        raise TypeError(
            f"scalar minus a {tensor_type} tensor has no translation in exporters.onnx_ops (it takes "
            f"{', '.join(_TORCH_TYPES)}); cast the tensor to float32 or int64 in the model before subtracting"
        )
    return torch.result_type(torch.empty(1, dtype=_TORCH_TYPES[tensor_type]), scalar)


def wrap_int(value: int, dtype: torch.dtype) -> int:
    """``value`` wrapped into the integer ``dtype`` modulo 2**bits, as torch converts a Python int scalar."""
    info = torch.iinfo(dtype)
    span = info.max - info.min + 1
    return (int(value) - info.min) % span + info.min


def _constant(value, dtype: torch.dtype):
    from onnx_ir import tensor
    from onnxscript import opset18 as op

    if not dtype.is_floating_point:
        value = wrap_int(value, dtype)
    return op.Constant(value=tensor(torch.tensor(value, dtype=dtype)))


def _rsub_scalar(self, other, alpha=1):
    """``other - alpha * self`` for a tensor ``self`` and a Python or symbolic number ``other``, as torch types it."""
    from onnx_ir import DataType
    from onnxscript import opset18 as op

    symbolic = not isinstance(other, numbers.Number)  # torch.export's SymInt/SymFloat: a 0-d INT64/FLOAT value
    sample = (0.5 if other.dtype.is_floating_point() else 1) if symbolic else other
    dtype = result_dtype(self.dtype.name, sample)
    x = self
    if dtype != _TORCH_TYPES[self.dtype.name]:  # an integer tensor and a float: torch's default float type
        x = op.Cast(self, to=DataType[{v: k for k, v in _TORCH_TYPES.items()}[dtype]])
    if isinstance(alpha, numbers.Number) and alpha != 1:
        x = op.Mul(x, _constant(alpha, dtype))
    elif not isinstance(alpha, numbers.Number):
        x = op.Mul(x, op.CastLike(alpha, x))
    return op.Sub(op.CastLike(other, x) if symbolic else _constant(other, dtype), x)


def translations() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export(dynamo=True)``."""
    return {torch.ops.aten.rsub.Scalar: _rsub_scalar}
