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
agrees with it to ``1e-5``. numpy only; :mod:`exporters.tflite` uses it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

__all__ = ["StoredMatch", "BatchNormFold", "match_stored", "candidate_perms"]

#: layouts converters use, tried first (so ties between unit-axis-equivalent permutations read naturally)
_PREFERRED = {
    2: [(0, 1), (1, 0)],
    3: [(0, 1, 2), (0, 2, 1), (2, 1, 0)],  # Conv1d: as is, OWI (as [O, 1, W, I]), WIO
    4: [(0, 1, 2, 3), (0, 2, 3, 1), (1, 2, 3, 0), (2, 3, 1, 0)],  # OIHW, OHWI, depthwise [1,H,W,C], HWIO
}
_ULPS = 8 * float(np.finfo(np.float32).eps)  # per-entry relative tolerance of a two-multiply fold
_SCALE_RTOL = 1e-5  # recovered scale vs the BatchNorm's own


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
        found = _channel_scale(source, back, None if batchnorm is None else batchnorm.scale)
        if found is not None:
            return StoredMatch(perm, *found)
    return None


def _channel_scale(source: np.ndarray, folded: np.ndarray, expected: np.ndarray | None):
    """``(scale, how)`` with ``folded == source * scale[o]`` per output channel ``o``, or None."""
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
