"""Finding a torch weight among stored tensors by value: permutations, unit axes and folded channel scales (numpy)."""

from __future__ import annotations

import numpy as np
import pytest

from edge.format.modelinfo import TensorInfo
from exporters.layout_match import BatchNormFold, candidate_perms, match_stored

RNG = np.random.default_rng(0)
W = RNG.standard_normal((6, 3, 3, 3)).astype(np.float32)  # a Conv2d weight [O, I, H, W]


@pytest.mark.parametrize(
    "source, stored, perm",
    [
        (W, W.transpose(0, 2, 3, 1), (0, 2, 3, 1)),  # TFLite CONV_2D: OHWI
        (W, W.transpose(2, 3, 1, 0), (2, 3, 1, 0)),  # HWIO
        (W[:, :1], W[:, :1].transpose(1, 2, 3, 0), (1, 2, 3, 0)),  # depthwise [C,1,H,W] -> [1,H,W,C]
        (W[:, :, 0], W[:, :, 0].transpose(0, 2, 1)[:, None], (0, 2, 1)),  # Conv1d [O,I,K] as [O,1,K,I]
        (W, W, (0, 1, 2, 3)),
    ],
    ids=["ohwi", "hwio", "depthwise", "conv1d", "as-is"],
)
def test_permuted_weights_are_found_and_map_adapter_indices(source, stored, perm):
    match = match_stored(source, np.ascontiguousarray(stored))
    assert match is not None and match.scale is None and match.how == "equal"
    t = TensorInfo("w", source.shape, perm=match.perm)
    assert np.array_equal(t.to_stored(source), np.ascontiguousarray(stored).reshape(-1))
    np.testing.assert_array_equal(t.from_stored(stored), source)


def test_unit_axis_permutations_are_listed_once():
    assert candidate_perms((4, 1, 3, 2), (1, 3, 2, 4)) == [(1, 2, 3, 0)]  # not also (0, 2, 3, 1) etc.
    assert len(candidate_perms((4, 1, 3, 3), (1, 3, 3, 4))) == 2  # H and W swapped is another layout
    assert candidate_perms((4, 3), (5, 3)) == []


def _fold(seed: int = 1) -> BatchNormFold:
    rng = np.random.default_rng(seed)
    return BatchNormFold.of(rng.uniform(0.5, 1.5, 6), rng.uniform(0.5, 2.0, 6), 1e-5)


def test_a_single_multiply_fold_is_recovered_bit_exactly():
    scale = _fold().scale
    folded = (W * scale[:, None, None, None]).transpose(0, 2, 3, 1).astype(np.float32)
    match = match_stored(W, folded, scaled=True)
    assert match is not None and match.perm == (0, 2, 3, 1) and match.how == "scale"
    np.testing.assert_array_equal(match.scale, scale)
    t = TensorInfo("w", W.shape, perm=match.perm, channel_scale=tuple(map(float, match.scale)))
    np.testing.assert_array_equal(t.to_stored(t.fold(W)), folded.reshape(-1))
    assert match_stored(W, folded) is None  # not without scaled=True


def test_the_batchnorm_fold_is_reproduced_bit_for_bit_and_checked_against_the_batchnorm():
    fold = _fold()
    stored = np.ascontiguousarray(fold.apply(W).transpose(1, 2, 3, 0))
    match = match_stored(W, stored, scaled=True, batchnorm=fold)
    assert match.how == "batchnorm" and match.perm == (1, 2, 3, 0)
    np.testing.assert_array_equal(match.scale, fold.scale)
    alone = match_stored(W, stored, scaled=True)  # without the BatchNorm: the same scale, within ulps
    assert alone.how in ("scale", "ulps") and alone.perm == (1, 2, 3, 0)
    np.testing.assert_allclose(alone.scale, fold.scale, rtol=1e-6)
    other = BatchNormFold(fold.rsqrt * np.float32(1.001), fold.gamma)  # another BatchNorm's statistics
    assert match_stored(W, stored, scaled=True, batchnorm=other) is None


def test_a_two_multiply_fold_is_matched_within_ulps():
    r = (1 / np.sqrt(RNG.uniform(0.5, 2.0, 6) + 1e-5)).astype(np.float32)
    g = RNG.uniform(0.5, 1.5, 6).astype(np.float32)
    folded = ((W * r[:, None, None, None]).astype(np.float32) * g[:, None, None, None]).astype(np.float32)
    match = match_stored(W, folded, scaled=True)
    assert match is not None and match.how in ("scale", "ulps")
    np.testing.assert_allclose(match.scale, (r.astype(np.float64) * g).astype(np.float32), rtol=1e-6)
    want = W.astype(np.float64) * match.scale[:, None, None, None]
    np.testing.assert_allclose(folded, want, rtol=1e-6)


def test_what_is_not_evidence_is_refused():
    other = RNG.standard_normal(W.shape).astype(np.float32)
    assert match_stored(W, other, scaled=True) is None
    col = W[:, :1, :1, :1]  # one entry a channel: any scale fits it
    s = np.linspace(0.5, 2.0, 6).astype(np.float32)
    folded = (col * s[:, None, None, None]).astype(np.float32)
    assert match_stored(col, folded, scaled=True) is None
    bn = BatchNormFold(s, np.ones(6, np.float32))
    match = match_stored(col, bn.apply(col), scaled=True, batchnorm=bn)
    np.testing.assert_array_equal(match.scale, s)
    zero = W.copy()
    zero[2] = 0  # a channel of zeros: its scale is not in the values
    folded = (zero * s[:, None, None, None]).astype(np.float32)
    assert match_stored(zero, folded, scaled=True) is None
    assert match_stored(zero, bn.apply(zero), scaled=True, batchnorm=bn).scale[2] == s[2]
    flipped = bn.apply(zero)
    flipped[0, 0, 0, 0] = 0  # a zero where the source has none: not a scale
    assert match_stored(zero, flipped, scaled=True, batchnorm=bn) is None
