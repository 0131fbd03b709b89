"""Structured SHiRA masks (exporters.masks): runs contiguous in the stored layout, exact counts, any weight shape."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edge.errors import ConfigError
from exporters.masks import BLOCK, STRUCTURED, random_structured, stored_layout, stored_offsets, stored_runs, unit_ranks
from exporters.shira import MASKS, make_masks

torch.set_num_threads(1)


class Net(nn.Module):
    """Linears (stored transposed or as-is), a conv (as-is: runs along its flattened kernel), an embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 40)
        self.out = nn.Linear(40, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).flatten(1)
        return self.out(torch.relu(self.fc(h))) + self.emb.weight.sum() * 0


TARGETS = ["emb.weight", "conv.weight", "fc.weight", "out.weight"]
STRUCTURED_CASES = {
    f"{u}-{s}": dict(unit=u, needs_calib=s in ("grad", "snip"))
    for u in ("block4", "block16", "rows")
    for s in ("random", "wm", "grad", "snip")
}


def _data(n: int = 32):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 2, 4, 4)).astype(np.float32), rng.integers(0, 3, n)


def _net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def _unit_length(shape, transposed, unit) -> int:
    stored = (shape[1], shape[0]) if transposed else shape
    return {"block4": 4, "block16": BLOCK}.get(unit) or int(np.prod(stored[1:]))


def test_every_structured_mask_has_a_case():
    assert set(STRUCTURED) == set(STRUCTURED_CASES) and set(STRUCTURED) <= set(MASKS)
    for kind, case in STRUCTURED_CASES.items():
        assert MASKS[kind].needs_calib == case["needs_calib"]


@pytest.mark.parametrize("kind", sorted(STRUCTURED_CASES))
@pytest.mark.parametrize("layout", ["transposed", "as-is"])
@pytest.mark.parametrize("density", [0.01, 0.05, 0.3])
def test_structured_runs_contiguous_exact_sorted(kind, layout, density):
    model, calib = _net(), _data()
    lay = {"fc.weight": layout, "out.weight": layout}  # only 2-D weights can be transposed
    masks = make_masks(model, TARGETS, density=density, kind=kind, calib=calib, layout=lay)
    params = dict(model.named_parameters())
    unit = STRUCTURED_CASES[kind]["unit"]
    for name, idx in masks.items():
        shape = tuple(params[name].shape)
        size = int(np.prod(shape))
        n = max(1, round(density * size))
        assert idx.dtype == np.int64 and idx.shape == (len(shape), n), "exact count, one row per torch axis"
        flat = np.ravel_multi_index(tuple(idx), shape)
        assert np.all(np.diff(flat) > 0), "torch row-major sorted, unique"
        transposed = lay.get(name) == "transposed"
        offsets = stored_offsets(idx, shape, transposed)
        length = _unit_length(shape, transposed, unit)
        units = np.unique(offsets // length)
        count = np.bincount(offsets // length)[units]
        full = np.minimum(length, size - units * length)  # the last block of a tensor may be short
        assert np.sum(count < full) <= 1, "whole aligned units and at most one partial unit"
        partial = units[count < full]
        for u in partial:  # a partial unit is a prefix of the unit: contiguous from its start
            got = offsets[offsets // length == u]
            np.testing.assert_array_equal(got, u * length + np.arange(got.size))
        assert stored_runs(idx, shape, transposed) <= units.size


def test_transposed_block_is_torch_rows_of_one_column():
    torch.manual_seed(0)
    lin = nn.Linear(96, 64)  # stored [96, 64]: a block of 16 = torch rows 16g..16g+15 of one torch column
    masks = make_masks(lin, ["weight"], density=0.02, kind="block16-wm", layout={"weight": "transposed"})
    rows, cols = masks["weight"]
    assert rows.size == round(0.02 * 64 * 96)  # 123 = 7 whole blocks + 11
    groups = {(int(c), int(r) // 16) for r, c in zip(rows, cols)}
    assert len(groups) == 8
    for c, g in groups:
        r = np.sort(rows[(cols == c) & (rows // 16 == g)])
        np.testing.assert_array_equal(r, 16 * g + np.arange(r.size))  # consecutive torch rows from the block start


def test_structured_mask_ranks_units_by_mean_saliency():
    model = _net()
    w = dict(model.named_parameters())["out.weight"].detach().abs().numpy()  # [3, 40], as-is: rows of 40
    masks = make_masks(model, ["out.weight"], density=1 / 3, kind="rows-wm")
    assert set(masks["out.weight"][0]) == {int(np.argmax(w.mean(axis=1)))}
    wt = w.T.reshape(-1)  # transposed: stored [40, 3], blocks of 16 over that
    masks = make_masks(model, ["out.weight"], density=16 / 120, kind="block16-wm", layout=stored_layout(_Info()))
    best = int(np.argmax([wt[i : i + 16].mean() for i in range(0, 120, 16)]))
    np.testing.assert_array_equal(stored_offsets(masks["out.weight"], (3, 40), True), best * 16 + np.arange(16))


class _Info:  # just enough of a ModelInfo for stored_layout
    class _T:
        def __init__(self, transposed):
            self.transposed = transposed

    tensors = {"out.weight": _T(True), "fc.weight": _T(False)}


def test_structured_masks_are_deterministic_and_seeded():
    model, calib = _net(), _data()
    a = make_masks(model, TARGETS, density=0.05, kind="block16-random", seed=1)
    b = make_masks(model, TARGETS, density=0.05, kind="block16-random", seed=1)
    c = make_masks(model, TARGETS, density=0.05, kind="block16-random", seed=2)
    assert all(np.array_equal(a[k], b[k]) for k in TARGETS)
    assert not all(np.array_equal(a[k], c[k]) for k in TARGETS)
    with pytest.raises(ConfigError, match="calib"):
        make_masks(model, TARGETS, kind="block16-snip")
    assert make_masks(model, TARGETS, kind="rows-snip", calib=calib)


@pytest.mark.parametrize(
    "layout, match", [({"fc.weight": "sideways"}, "layout values"), ({"conv.weight": "transposed"}, "2-D")]
)
def test_bad_layout_rejected(layout, match):
    with pytest.raises(ConfigError, match=match):
        make_masks(_net(), TARGETS, kind="wm", layout=layout)


def test_unit_ranks_and_unknown_unit():
    scores = np.arange(40, dtype=float).reshape(4, 10)  # blocks of 16: [0..15], [16..31], [32..39] (short)
    ranks = unit_ranks(scores, "block16").reshape(-1)
    np.testing.assert_array_equal(np.argsort(ranks), np.r_[32:40, 16:32, 0:16])
    with pytest.raises(ConfigError, match="unit"):
        unit_ranks(scores, "diagonal")


@pytest.mark.parametrize("unit", [None, "block4", "block16", "rows"])
@pytest.mark.parametrize("transposed", [True, False])
def test_random_structured_numpy(unit, transposed):
    shape = (48, 80)
    idx = random_structured(shape, transposed, 0.02, unit, np.random.default_rng(0))
    assert idx.shape == (2, round(0.02 * 48 * 80))
    assert np.all(np.diff(np.ravel_multi_index(tuple(idx), shape)) > 0)
    runs = stored_runs(idx, shape, transposed)
    if unit is not None:
        length = _unit_length(shape, transposed, unit)
        assert runs <= -(-idx.shape[1] // length)


@pytest.mark.parametrize("unit, length", [("block4", 4), ("block16", 16)])
def test_blocks_spread_over_stored_rows_before_a_second_in_any_row(unit, length):
    """Every stored row's best block comes before any row's second best, so the rank is as high as the count allows."""
    scores = np.random.default_rng(0).random((12, 64))
    scores[3] += 10.0  # one row far ahead: ranking by mean alone would take all its blocks first
    ranks = unit_ranks(scores, unit)
    first = np.argsort(ranks.reshape(-1), kind="stable")[: 12 * length]  # as many entries as rows have one block
    rows = first // 64
    assert sorted(np.bincount(rows, minlength=12)) == [length] * 12, "one whole block in each row"
    assert set(first[:length] // 64) == {3}, "rows in the order of their best block"
    blocks = scores.reshape(12, -1, length).mean(-1)
    for r in range(12):  # within a row: its best block
        got = first[rows == r]
        assert got[0] % 64 // length == int(np.argmax(blocks[r])) and np.all(np.diff(got) == 1)


def test_block_mask_delta_rank_reaches_its_run_count():
    """A transposed Linear's block mask: each run is one torch column (one input), and runs sit in distinct columns."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 64)
    with torch.no_grad():
        lin.weight[:, 5] *= 20  # an outlier input feature, as in transformers
    for kind, runs in (("block16-wm", 3), ("block4-wm", 11)):
        masks = make_masks(lin, ["weight"], density=0.01, kind=kind, layout={"weight": "transposed"})
        rows, cols = masks["weight"]
        delta = np.zeros((64, 64))
        delta[rows, cols] = np.random.default_rng(1).normal(size=rows.size)
        assert len(set(cols.tolist())) == runs == np.linalg.matrix_rank(delta)
