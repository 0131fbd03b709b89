"""ONNX translations :func:`exporters.onnx.export_onnx` gives torch's dynamo exporter for aten ops it mistranslates.

* ``aten.rsub.Scalar`` (``1.0 - tensor``): onnxscript's torchlib has no translation, and torch's decomposition of
  a float scalar minus an integer tensor (XLNet's ``input_mask = 1.0 - attention_mask`` on the int64 mask) is
  ``aten.sub.Tensor(1.0, tensor)``, which has no overload: the export failed with "Cannot find a compatible
  OpOverload for aten.sub". Here it is ``Sub(other, alpha * self)`` in torch's result type (an integer tensor and a
  float scalar give float32, as torch's default dtype).

Host side: imports torch and onnxscript (both come with torch's exporter).
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

__all__ = ["translations"]


def _rsub_scalar(self, other, alpha=1):
    """``other - alpha * self`` for a tensor ``self`` and a Python number ``other``, typed as torch types it."""
    from onnx_ir import DataType, tensor
    from onnxscript import opset18 as op

    x, dtype = self, self.dtype.numpy()
    if not self.dtype.is_floating_point() and isinstance(other, float):
        x, dtype = op.Cast(self, to=DataType.FLOAT), np.float32  # int tensor, float scalar: torch's default float
    if alpha != 1:
        x = op.Mul(x, op.Constant(value=tensor(np.array(alpha, dtype=dtype))))
    if not isinstance(other, numbers.Number):  # a symbolic number: let onnx cast it
        return op.Sub(op.CastLike(other, x), x)
    return op.Sub(op.Constant(value=tensor(np.array(other, dtype=dtype))), x)


def translations() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export(dynamo=True)``."""
    return {torch.ops.aten.rsub.Scalar: _rsub_scalar}
