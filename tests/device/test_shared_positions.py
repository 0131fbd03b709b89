"""Adapters on one mask share their undo, and a switch between two of them writes only the new values.

SHiRA-WM masks (weight magnitude: a function of the base weights alone) are the same for every adapter
of a model, so a switch A -> B between two of them need not restore A's entries first: B's values
overwrite every one of them. These tests check that such a switch writes no undo, that every sequence
of switches (alike, unlike, fused, back to the base) stays bit-exact on every backend and strategy and
on an integer arena, and that adapters only partly alike still get their undo.
"""

from __future__ import annotations

import _tiny
import _tiny_tflite
import numpy as np
import pytest

from edge.format.adapter import Adapter, SparseDelta
from edge.fusion import same_positions
from edge.runtime import Runtime, merge_weights
from runtimes import backend_names, get_backend

CASES = [(b, s) for b in backend_names() for s in get_backend(b).STRATEGIES]
TINY = {"onnxruntime": _tiny, "tflite": _tiny_tflite}
X = np.random.default_rng(0).standard_normal((5, 10)).astype(np.float32)


def _on_mask(info, mask_seed, value_seed, name, density=0.3, integer_base=None):
    """An adapter whose positions depend on ``mask_seed`` only (one mask, many adapters) and values on
    ``value_seed``; with ``integer_base`` (source-layout integers per target) an integer adapter."""
    masks, values = np.random.default_rng(mask_seed), np.random.default_rng(value_seed)
    tensors, shapes = {}, {}
    for k, t in info.tensors.items():
        size = int(np.prod(t.shape))
        flat = np.sort(masks.choice(size, max(2, int(density * size)), replace=False))
        idx = np.stack(np.unravel_index(flat, t.shape)).astype(np.int32)
        delta = values.standard_normal(flat.size).astype(np.float32)
        q = None
        if integer_base is not None:
            lo, hi = t.quant.bounds
            moved = integer_base[k][tuple(idx)].astype(np.int64) + values.integers(-5, 6, flat.size)
            q = np.clip(moved, lo, hi).astype(t.quant.dtype)
        tensors[k] = SparseDelta(idx, delta, q)
        shapes[k] = tuple(t.shape)
    return Adapter(name, info.fingerprint, tensors, shapes)


def _undo_entries(rt, monkeypatch) -> list[int]:
    """Record, per backend write, how many parts its first prepared write (the undo) has."""
    seen, write = [], rt.backend.write

    def spy(*prepared):
        seen.append(len(prepared[0].parts))
        return write(*prepared)

    monkeypatch.setattr(rt.backend, "write", spy)
    return seen


@pytest.mark.parametrize("backend,strategy", CASES)
def test_alike_adapters_share_their_undo_and_every_sequence_stays_bit_exact(monkeypatch, tmp_path, backend, strategy):
    tiny = TINY[backend]
    path = tmp_path / f"m{getattr(tiny, 'SUFFIX', '.onnx')}"
    info = tiny.make_mlp(path, sizes=(10, 24, 3))
    base = tiny.base_weights(path, info)
    ads = {
        "a": _on_mask(info, 7, 1, "a"),
        "b": _on_mask(info, 7, 2, "b"),
        "c": _on_mask(info, 7, 3, "c"),
        "d": _on_mask(info, 8, 4, "d"),  # another mask
    }
    with Runtime(path, backend=backend, strategy=strategy) as rt:
        y0 = rt.run(X)["logits"]
        for a in ads.values():
            rt.load_adapter(a)
        p = rt._adapters
        assert p["b"].restore is p["a"].restore and p["c"].layout is p["a"].layout
        assert p["d"].layout is not p["a"].layout and p["d"].restore is not p["a"].restore
        undo = _undo_entries(rt, monkeypatch)
        steps = ["a", "b", "c", "b", "d", "a", {"a": 1.0, "b": -0.5}, "b", "c", None, "c", "a"]
        for spec in steps:
            rt.switch(spec)
            rt.wait_settled(30)
            pairs = [(ads[n], w) for n, w in ({spec: 1.0} if isinstance(spec, str) else spec or {}).items()]
            ref = merge_weights(base, pairs)
            for k in ref:
                np.testing.assert_array_equal(rt.weights(k).view(np.uint32), ref[k].view(np.uint32))
        # no undo: base -> a, a -> b, b -> c, c -> b, b -> c, base -> c, c -> a; one to and from d or the fusion
        alike = [i for i, n in enumerate(undo) if n == 0]
        assert alike == [0, 1, 2, 3, 8, 10, 11], undo
        rt.switch(None)
        rt.wait_settled(30)
        for k, w in base.items():
            np.testing.assert_array_equal(rt.weights(k).view(np.uint32), w.view(np.uint32))
        np.testing.assert_array_equal(rt.run(X)["logits"], y0)


def test_integer_adapters_on_one_mask_switch_bit_exact(monkeypatch, tmp_path):
    from exporters.quantize import quantize_onnx

    fpath, qpath = tmp_path / "m.onnx", tmp_path / "q.onnx"
    _tiny.make_mlp(fpath, sizes=(10, 24, 3))
    calib = np.random.default_rng(1).standard_normal((64, 10)).astype(np.float32)
    info = quantize_onnx(fpath, qpath, calib={"x": calib}, mode="static", per_channel=True).info
    with Runtime(qpath, strategy="hybrid") as rt:
        base = {
            k: t.from_stored(rt.weights(k).copy()) if False else rt.weights(k).copy() for k, t in info.tensors.items()
        }
        a = _on_mask(info, 7, 1, "a", integer_base=base)
        b = _on_mask(info, 7, 2, "b", integer_base=base)
        rt.load_adapter(a)
        rt.load_adapter(b)
        assert rt._adapters["b"].restore is rt._adapters["a"].restore
        undo = _undo_entries(rt, monkeypatch)
        for name, ad in (("a", a), ("b", b), ("a", a)):
            rt.switch(name)
            rt.wait_settled(30)
            for k, t in ad.tensors.items():
                np.testing.assert_array_equal(rt.weights(k)[tuple(t.indices)], t.qvalues)
        assert undo == [0, 0, 0]
        rt.switch(None)
        rt.wait_settled(30)
        for k, w in base.items():
            np.testing.assert_array_equal(rt.weights(k), w)


def test_partly_alike_adapters_are_not_twins(tmp_path):
    path = tmp_path / "m.onnx"
    info = _tiny.make_mlp(path, sizes=(10, 24, 3))
    a = _on_mask(info, 7, 1, "a")
    shifted = dict(a.tensors)
    k = next(iter(shifted))
    idx = shifted[k].indices.copy()
    idx[-1, 0] = (idx[-1, 0] + 1) % info.tensors[k].shape[-1]  # one entry moved (or duplicated)
    b = Adapter("b", info.fingerprint, {**shifted, k: SparseDelta(idx, shifted[k].values)}, a.shapes)
    with Runtime(path, strategy="bound") as rt:
        rt.load_adapter(a)
        rt.load_adapter(_on_mask(info, 8, 2, "c", density=0.1))
        if len({tuple(c) for c in idx.T}) == idx.shape[1]:  # still distinct positions: a valid adapter
            rt.load_adapter(b)
            assert rt._adapters["b"].layout is not rt._adapters["a"].layout
        assert same_positions(rt._adapters["a"].index, [rt._adapters["c"]]) is None
        assert same_positions(rt._adapters["a"].index, list(rt._adapters.values())) is rt._adapters["a"]
