"""Recognise a convolution weight that an exporter scaled per output channel (BatchNorm folded in).

torch.onnx (both exporters) and litert-torch fold an inference-mode BatchNorm into the
convolution before it: ``stored[o] = weight[o] * gamma[o] / sqrt(var[o] + eps)``. The folded
tensor then equals no torch parameter, yet a delta trained on ``weight`` lands on it exactly
scaled by the same per-channel factor (:attr:`edge.format.modelinfo.TensorInfo.channel_scale`).
The factor is recovered from the two tensors alone and accepted only when every entry agrees
with it to float32 rounding, so an unrelated tensor of the same shape is never taken for it.
"""

from __future__ import annotations

import numpy as np

__all__ = ["folded_scale"]

_RTOL = 4 * float(np.finfo(np.float32).eps)  # the fold's own rounding, with room for the factor's


def folded_scale(stored: np.ndarray, source: np.ndarray) -> np.ndarray | None:
    """The per-channel factor ``s`` (axis 0) with ``stored == source * s[o]`` to float32 rounding, or None.

    Both arrays in the same (torch) layout. None when the shapes differ, a channel of ``source``
    is all zero (its factor cannot be known), any factor is zero or not finite, or any entry
    disagrees; also when every factor is 1 (then the tensors are equal and no scale is needed).
    """
    if stored.shape != source.shape or stored.ndim < 2 or stored.shape[0] < 1:
        return None
    s = np.asarray(stored, np.float64).reshape(stored.shape[0], -1)
    w = np.asarray(source, np.float64).reshape(source.shape[0], -1)
    big = np.abs(w) >= np.abs(w).max(axis=1, keepdims=True) * 0.5  # the channel's largest entries: least rounding
    if not np.all(np.any(big & (w != 0), axis=1)):
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(big & (w != 0), s / w, np.nan)
    scale = np.nanmedian(ratio, axis=1)
    if not np.all(np.isfinite(scale)) or np.any(scale == 0) or np.all(scale == 1):
        return None
    scale = scale.astype(np.float32)
    want = w * scale.astype(np.float64)[:, None]
    tol = _RTOL * np.abs(want) + np.finfo(np.float32).tiny
    if not np.all(np.abs(s - want) <= tol):
        return None
    return scale
