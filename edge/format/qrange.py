"""The integer range a quantized weight may hold: the storage type's, narrowed for symmetric int8.

An int8 weight quantized symmetrically (zero point 0 for every channel: all of LiteRT's int8 weights, TFLite's
int8 spec, and onnxruntime's symmetric weights) lives in ``[-127, 127]``: kernels may assume it, and LiteRT's
built-in dynamic-range ``FULLY_CONNECTED`` misreads ``-128`` (one entry moved from -127 to -128 moved the demo
ViT's logits by 0.70, XNNPACK's by 0.02). Every range the project computes for a weight (fusion's saturation
check and clip, the float adapter requantized at load, the integer trainer, an integer adapter's values) comes
from :func:`weight_bounds`; asymmetric int8 and uint8 keep the whole range of their type.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from edge.errors import AdapterMismatchError

__all__ = ["QUANT_DTYPES", "SAFE_BOUNDS", "SYMMETRIC_INT8", "check_qvalues", "weight_bounds"]

#: integer dtypes a quantized weight may be stored in, with their range (a zero point's)
QUANT_DTYPES = {"int8": (-128, 127), "uint8": (0, 255)}

#: the range of a symmetric int8 weight (zero point 0)
SYMMETRIC_INT8 = (-127, 127)

#: the range no kernel misreads, known without the zero points (``QuantInfo.bounds``)
SAFE_BOUNDS = {"int8": SYMMETRIC_INT8, "uint8": QUANT_DTYPES["uint8"]}


def weight_bounds(dtype: str, zero_point: np.ndarray | int) -> tuple[int, int]:
    """``(lo, hi)`` a weight of ``dtype`` with these zero points (one, or one per channel) may hold."""
    zp = np.asarray(zero_point)
    if str(dtype) == "int8" and zp.size and not zp.any():
        return SYMMETRIC_INT8
    return QUANT_DTYPES[str(dtype)]


def check_qvalues(adapter: str, given: Mapping[str, tuple[np.ndarray, tuple[int, int]]]) -> None:
    """Refuse an integer adapter whose ``qvalues`` (``given``: target -> (qvalues, its weight's bounds)) leave a
    target's range: a typed error with the entries in all, each such target (the first 5) and how to remake it."""
    bad, total, sym = [], 0, False
    for tname, (q, (lo, hi)) in given.items():
        if n := int(np.count_nonzero((q < lo) | (q > hi))):
            bad.append(f"{tname!r} {n} of {q.size} ({int(q.min())}..{int(q.max())}, allowed [{lo}, {hi}])")
            total, sym = total + n, sym or lo == -127
    if bad:
        why = " (symmetric int8 weights, zero point 0, hold [-127, 127]: -128 is off their grid)" if sym else ""
        raise AdapterMismatchError(
            f"integer adapter {adapter!r} writes {total} entries outside their weight's range{why}, in "
            f"{len(bad)} tensor(s): {', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}; nothing was loaded. "
            "Re-train it with this version (exporters.train_shira_int, then int_shira_adapter), or re-make the cached "
            "ones with `edge bench quantized`; a float adapter of the same model loads and is requantized onto the grid"
        )
