"""Recognise a convolution weight that an exporter scaled per output channel (BatchNorm folded in).

torch.onnx (both exporters) and litert-torch fold an inference-mode BatchNorm into the
convolution before it: ``stored[o] = weight[o] * gamma[o] / sqrt(var[o] + eps)``. The folded
tensor then equals no torch parameter, yet a delta trained on ``weight`` lands on it exactly
scaled by the same per-channel factor (:attr:`edge.format.modelinfo.TensorInfo.channel_scale`).
The factor is recovered from the two tensors alone (or checked against the BatchNorm's own,
when the caller has it) and believed only on evidence: zeros stay exactly the zeros, each
channel has two or more non-zero entries, and every entry agrees with the factor to a few
float32 ulps, so an unrelated tensor of the same shape is never taken for it. Used by
``edge import-onnx`` and by the TFLite exporter (:mod:`exporters.layout_match`).
"""

from __future__ import annotations

import numpy as np

__all__ = ["channel_scale", "folded_scale"]

_ULPS = 8 * float(np.finfo(np.float32).eps)  # per-entry relative tolerance of a two-multiply fold
_SCALE_RTOL = 1e-5  # recovered scale vs the BatchNorm's own


def folded_scale(stored: np.ndarray, source: np.ndarray) -> np.ndarray | None:
    """The per-channel factor ``s`` (axis 0) with ``stored == source * s[o]`` to float32 rounding, or None.

    Both arrays in the same (torch) layout; None when they are not such a pair, or when every
    factor is 1 (then the tensors are equal and no scale is needed).
    """
    if stored.shape != source.shape or stored.ndim < 2 or stored.shape[0] < 1:
        return None
    found = channel_scale(np.asarray(source, np.float32), np.asarray(stored, np.float32))
    return None if found is None else found[0]


def channel_scale(
    source: np.ndarray, folded: np.ndarray, expected: np.ndarray | None = None
) -> tuple[np.ndarray, str] | None:
    """``(scale, how)`` with ``folded == source * scale[o]`` per output channel ``o`` (float32, same layout), or None.

    ``how`` is ``"scale"`` when ``float32(source * scale[o])`` reproduces every entry bit for bit, ``"ulps"``
    when every entry is within a few ulps (a fold that rounds twice). ``expected`` (the BatchNorm's own
    factor, if known) must agree to ``1e-5`` and stands in for channels whose source entries are all zero.
    """
    n_out = source.shape[0]
    b = source.reshape(n_out, -1)
    a = folded.reshape(n_out, -1)
    if not np.array_equal(a == 0, b == 0):  # a scale keeps zeros zero and only them (a zero scale is refused)
        return None
    rows = np.arange(n_out)
    pivot = np.abs(b).argmax(axis=1)
    den = b[rows, pivot].astype(np.float64)
    empty = den == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(empty, 1.0, a[rows, pivot] / np.where(empty, 1.0, den)).astype(np.float32)
    if expected is not None:
        expected = np.asarray(expected, np.float32).reshape(-1)
        if expected.shape != (n_out,) or np.any(expected == 0):  # a zero scale erases the weight: no adapter lands
            return None
        scale[empty] = expected[empty]
        if not np.allclose(scale, expected, rtol=_SCALE_RTOL, atol=0):
            return None
    elif np.any(empty) and np.any(scale[~empty] != 1):
        return None  # an all-zero channel of a scaled weight: its scale is not in the values
    elif np.any((b != 0).sum(axis=1)[~empty] < 2):
        return None  # one entry per channel fits any scale: no evidence without the BatchNorm
    exact = True
    for o in range(n_out):
        hit = _exact_scale(b[o], a[o], scale[o])
        if hit is not None:
            scale[o] = hit
            continue
        exact = False
        want = b[o].astype(np.float64) * np.float64(scale[o])
        if not np.all(np.abs(a[o] - want) <= _ULPS * np.abs(want)):
            return None
    if np.all(scale == 1):
        return None  # equal values were tried first: this is not a scale
    return scale, "scale" if exact else "ulps"


def _exact_scale(b: np.ndarray, a: np.ndarray, s: np.float32) -> np.float32 | None:
    """The float32 scale within two ulps of ``s`` that reproduces ``a = float32(b * scale)`` bit for bit."""
    candidates = [s]
    for direction in (np.inf, -np.inf):
        t = s
        for _ in range(2):
            t = np.nextafter(t, np.float32(direction), dtype=np.float32)
            candidates.append(t)
    for c in candidates:
        if np.array_equal((b * np.float32(c)).astype(np.float32), a):
            return np.float32(c)
    return None
