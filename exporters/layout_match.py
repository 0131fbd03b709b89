"""Find a torch weight among a converter's stored tensors by value: axis layout and folded per-channel scale.

A converter may store a parameter permuted (TFLite: ``CONV_2D`` filters OHWI, depthwise
filters ``[1, H, W, C]``, Conv1d as a 2-D conv with a unit axis) and, where it folds a
BatchNorm into the convolution, multiplied per output channel. :func:`match_stored` finds the
permutation under which the stored values are the source values (unit axes aside), and when
they are not equal, the per-output-channel float32 scale that maps one onto the other. How the
match was made (``StoredMatch.how``):

- ``"equal"``: the values, permuted;
- ``"batchnorm"``: bit for bit what the BatchNorm after the conv folds, the way litert-torch
  (0.10, TFLite converter passes) does it: ``float32(float32(w * r) * gamma)`` with
  ``r = float32(1 / sqrt(float32(running_var + eps)))`` (two roundings: no single float32
  scale reproduces every entry; the recorded scale is ``r * gamma`` rounded once);
- ``"scale"``: ``float32(source * s) == stored`` for every entry (a one-multiply fold; ``s`` is
  the channel's ratio at its largest entry, nudged by an ulp when the division rounded);
- ``"ulps"``: within a few ulps per entry of one scale (another two-multiply fold).

A scale is only believed when it is evidence: each channel has two or more non-zero entries
whose ratios agree, or the caller gives the BatchNorm after the conv and the recovered scale
agrees with it to ``1e-5`` (:func:`edge.convert.bn_fold.channel_scale`, which ``edge import-onnx``
shares). numpy only; :mod:`exporters.tflite` uses it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from edge.convert.bn_fold import channel_scale

__all__ = ["StoredMatch", "BatchNormFold", "match_stored", "candidate_perms"]

#: layouts converters use, tried first (so ties between unit-axis-equivalent permutations read naturally)
_PREFERRED = {
    2: [(0, 1), (1, 0)],
    3: [(0, 1, 2), (0, 2, 1), (2, 1, 0)],  # Conv1d: as is, OWI (as [O, 1, W, I]), WIO
    4: [(0, 1, 2, 3), (0, 2, 3, 1), (1, 2, 3, 0), (2, 3, 1, 0)],  # OIHW, OHWI, depthwise [1,H,W,C], HWIO
}


@dataclass(frozen=True)
class StoredMatch:
    """``stored == source.transpose(perm) * scale[o]`` (``scale`` None: no scale), unit axes aside."""

    perm: tuple[int, ...]
    scale: np.ndarray | None = None  # float32, one per source axis-0 channel
    how: str = "equal"  # equal, batchnorm, scale or ulps (see the module docstring)


@dataclass(frozen=True)
class BatchNormFold:
    """What a BatchNorm (eval mode) folds into the conv before it, per output channel."""

    rsqrt: np.ndarray  # float32(1 / sqrt(float32(running_var + eps)))
    gamma: np.ndarray  # the BatchNorm weight (ones when it has none), float32

    @classmethod
    def of(cls, weight: np.ndarray | None, running_var: np.ndarray, eps: float) -> BatchNormFold:
        var = np.asarray(running_var, np.float32)
        rsqrt = (np.float32(1) / np.sqrt((var + np.float32(eps)).astype(np.float32))).astype(np.float32)
        gamma = np.ones_like(var) if weight is None else np.asarray(weight, np.float32)
        return cls(rsqrt, gamma)

    @property
    def scale(self) -> np.ndarray:
        """``weight / sqrt(running_var + eps)`` as one float32 per channel (``r * gamma`` rounded once)."""
        return (self.rsqrt.astype(np.float64) * self.gamma.astype(np.float64)).astype(np.float32)

    def apply(self, source: np.ndarray) -> np.ndarray:
        """The folded weight, computed as litert-torch computes it (two float32 multiplies)."""
        shape = (-1,) + (1,) * (source.ndim - 1)
        once = (source * self.rsqrt.reshape(shape)).astype(np.float32)
        return (once * self.gamma.reshape(shape)).astype(np.float32)


def _squeeze(shape) -> tuple[int, ...]:
    return tuple(int(d) for d in shape if d != 1)


def candidate_perms(source_shape: tuple[int, ...], stored_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Permutations of ``source_shape`` whose result is ``stored_shape`` up to unit axes, one per distinct layout."""
    n = len(source_shape)
    if int(np.prod(source_shape)) != int(np.prod(stored_shape)) or n > 6:
        return []
    want = _squeeze(stored_shape)
    out, seen = [], set()
    for perm in [*_PREFERRED.get(n, []), *itertools.permutations(range(n))]:
        perm = tuple(perm)
        if _squeeze(source_shape[a] for a in perm) != want:
            continue
        key = tuple(a for a in perm if source_shape[a] != 1)  # the flat order: unit axes do not move entries
        if key not in seen:
            seen.add(key)
            out.append(perm)
    return out


def match_stored(
    source: np.ndarray,
    stored: np.ndarray,
    *,
    scaled: bool = False,
    batchnorm: BatchNormFold | None = None,
) -> StoredMatch | None:
    """How ``stored`` holds ``source``, or None. With ``scaled``, a per-output-channel scale may be recovered.

    ``batchnorm`` (the BatchNorm that follows the conv) must then agree with the recovered scale;
    it also stands in for channels whose source entries are all zero (their scale cannot be read
    from the values).
    """
    source = np.asarray(source, np.float32)
    stored = np.asarray(stored, np.float32)
    perms = candidate_perms(source.shape, stored.shape)
    for perm in perms:
        if np.array_equal(source.transpose(perm).reshape(-1), stored.reshape(-1)):
            return StoredMatch(perm)
    if not scaled or source.ndim < 2:
        return None
    for perm in perms:
        back = stored.reshape(tuple(source.shape[a] for a in perm)).transpose(np.argsort(perm))
        if batchnorm is not None and np.array_equal(batchnorm.apply(source), back):
            return StoredMatch(perm, batchnorm.scale, "batchnorm")
        found = channel_scale(source, back, None if batchnorm is None else batchnorm.scale)
        if found is not None:
            return StoredMatch(perm, *found)
    return None
