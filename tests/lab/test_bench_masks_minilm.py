"""edge bench masks on MiniLM: per unit a random kind (A and B on their own masks) and the wm-family kind (A and B on
the one mask scored on the model's stored weights), on a small synthetic model instead of MiniLM."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from edge.format.adapter import Adapter, SparseDelta
from edge.format.modelinfo import TensorInfo
from lab.bench_masks_minilm import kind_name, minilm_pairs, same_positions, weights_module

pytest.importorskip("torch")

_SHAPES = {"enc.layer.0.q.weight": ((8, 32), True), "enc.layer.0.fc.weight": ((16, 32), False)}


def _model():
    info = SimpleNamespace(
        fingerprint="f" * 16, tensors={k: TensorInfo(k, shape, t) for k, (shape, t) in _SHAPES.items()}
    )
    rng = np.random.default_rng(0)
    base = {k: rng.standard_normal(shape).astype(np.float32) for k, (shape, _) in _SHAPES.items()}
    return info, base


def _offsets(idx: np.ndarray, shape: tuple, transposed: bool) -> np.ndarray:
    return np.sort(TensorInfo("", shape, transposed).stored_offsets(idx))


def test_pairs_per_unit_random_on_different_positions_wm_on_the_same_ones():
    info, base = _model()
    adapters, per_kind = minilm_pairs(info, base, 0.125)
    units = ("unstructured", "block4", "block16", "rows")
    assert list(per_kind) == [kind_name(u if u != "unstructured" else None, s) for u in units for s in ("random", "wm")]
    for kind, v in per_kind.items():
        a, b = adapters[kind]
        assert v["same_positions"] is kind.endswith("wm") and v["same_positions"] == same_positions(a, b)
        assert v["entries"] == 32 + 64 and v["structured"] is (v["unit"] != "unstructured")
        for t in base:  # different values on either kind: two adapters of one model
            assert not np.array_equal(a.tensors[t].values, b.tensors[t].values)
    # unstructured wm: the largest |w| of each tensor (no ties in random normal weights)
    a, _ = adapters["wm"]
    for t, (shape, _) in _SHAPES.items():
        flat = np.ravel_multi_index(a.tensors[t].indices, shape)
        top = np.argsort(-np.abs(base[t]).reshape(-1))[: round(0.125 * np.prod(shape))]
        assert set(flat) == set(top)
    # block4-wm: aligned runs of 4 in the *stored* layout (q is stored transposed); fewer blocks than stored rows
    # here, so each is the best block (mean |w|) of its own stored row
    a, _ = adapters["block4-wm"]
    for t, (shape, transposed) in _SHAPES.items():
        off = _offsets(a.tensors[t].indices, shape, transposed)
        blocks, counts = np.unique(off // 4, return_counts=True)
        assert (counts == 4).all()
        stored = np.abs(base[t].T if transposed else base[t])
        per_row = stored.shape[1] // 4
        mean = stored.reshape(stored.shape[0], per_row, 4).mean(2)  # mean |w| per block, one row per stored row
        rows = blocks // per_row
        assert len(set(rows)) == len(rows) and (blocks % per_row == mean[rows].argmax(1)).all()
    assert per_kind["block4-wm"]["runs_per_entry"] <= 0.25 and per_kind["rows-wm"]["runs_per_entry"] < 0.25


def test_same_positions_compares_entries_not_their_order():
    idx = np.array([[0, 1, 3], [2, 0, 3]], np.int32)

    def adapter(indices, tensors=("w",)):
        return Adapter(
            "a",
            "f" * 16,
            {t: SparseDelta(indices, np.ones(indices.shape[1], np.float32)) for t in tensors},
            {t: (4, 4) for t in tensors},
        )

    assert same_positions(adapter(idx), adapter(np.ascontiguousarray(idx[:, ::-1])))
    assert not same_positions(adapter(idx), adapter(np.array([[0, 1, 3], [2, 0, 2]], np.int32)))
    assert not same_positions(adapter(idx), adapter(idx[:, :2]))
    assert not same_positions(adapter(idx), adapter(idx, ("w", "v")))


def test_weights_module_exposes_the_weights_under_their_dotted_names_without_a_copy():
    _, base = _model()
    m = weights_module(base)
    params = dict(m.named_parameters())
    assert list(params) == list(base)
    for k, w in base.items():
        assert not params[k].requires_grad and np.shares_memory(params[k].detach().numpy(), w)
