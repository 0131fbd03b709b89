"""Sparse writes compiled into aligned units (:mod:`runtimes.lines`): bit-exact, and actually used.

A structured adapter's entries (blocks of 4 or 16, whole stored rows) are written as copies of
16-byte units of the arena; the rest one entry at a time; a whole tensor as a slice. These
tests check the compiled parts write exactly what per-entry assignment writes (every bit,
NaN payloads and -0.0 included), on float and integer arenas, aligned and misaligned
tensor offsets, and that a runtime switching structured adapters stays bit-exact while its
prepared writes really are unit copies.
"""

from __future__ import annotations

import _tiny
import _tiny_tflite
import numpy as np
import pytest

from edge.errors import ConfigError
from edge.format.adapter import Adapter, SparseDelta
from edge.runtime import Runtime, merge_weights
from exporters.masks import random_structured
from runtimes import backend_names, get_backend, lines
from runtimes.lines import aligned_empty, aligned_offsets, compile_write, merge_positions

DTYPES = (np.float32, np.int8, np.uint8)
KINDS = ("random", "block4", "block16", "rows", "partial", "whole", "run", "mixed")
ROW = 48  # entries per stored row in these synthetic tensors


def _values(rng, dtype, n):
    if np.dtype(dtype).kind == "f":
        v = rng.standard_normal(n).astype(dtype)
        special = np.array([np.nan, -0.0, np.inf, -np.inf], dtype)
        v[: min(n, 4)] = special[: min(n, 4)]
        if n > 4:  # a NaN with a payload: a float copy could quieten it, a byte copy keeps it
            v[4:5].view(np.uint32)[:] = 0x7FA00001
        return v
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max + 1, n).astype(dtype)


def _positions(rng, kind, size):
    """Strictly increasing positions in a tensor of ``size`` entries (``None``: the whole tensor)."""
    if kind == "whole":
        return None
    if kind == "run":
        start = int(rng.integers(0, size // 2))
        return np.arange(start, start + size // 3, dtype=np.int64)
    if kind == "random":
        return np.sort(rng.choice(size, size // 5, replace=False)).astype(np.int64)
    if kind == "rows":
        rows = np.sort(rng.choice(size // ROW, max(1, size // ROW // 4), replace=False))
        return (rows[:, None] * ROW + np.arange(ROW)).reshape(-1).astype(np.int64)
    u = {"block4": 4, "block16": 16, "partial": 16, "mixed": 4}[kind]
    blocks = np.sort(rng.choice(size // u, max(1, size // u // 4), replace=False))
    pos = (blocks[:, None] * u + np.arange(u)).reshape(-1)
    if kind == "partial":  # whole units and a contiguous prefix of one more, as the masks keep their count
        pos = pos[: pos.size - 5]
    if kind == "mixed":  # units plus scattered entries
        pos = np.union1d(pos, rng.choice(size, size // 10, replace=False))
    return pos.astype(np.int64)


def _arena_and_pieces(rng, dtype, kinds, aligned):
    sizes = [ROW * int(rng.integers(8, 40)) + (0 if aligned else int(rng.integers(1, 7))) for _ in kinds]
    if aligned:
        offsets, total = aligned_offsets(sizes, np.dtype(dtype).itemsize)
    else:  # packed end to end: each tensor's units sit at another phase of the arena
        offsets, total = list(np.cumsum([3, *sizes[:-1]])), 3 + sum(sizes)
    arena = _values(rng, dtype, total)
    pieces = []
    for off, size, kind in zip(offsets, sizes, kinds):
        pos = _positions(rng, kind, size)
        pieces.append((int(off), pos, _values(rng, dtype, size if pos is None else pos.size)))
    return arena, pieces


def _apply(arena, parts):
    for view, where, values in parts:
        view[where] = values


def _reference(arena, pieces):
    out = arena.copy()
    for off, pos, val in pieces:
        if pos is None:
            out[off : off + val.size] = val
        else:
            out[off + pos] = val
    return out


def _ops(parts):
    """Index operations the parts cost: one per index entry, one per slice."""
    return sum(1 if isinstance(w, slice) else len(w) for _, w, _ in parts)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "packed"])
@pytest.mark.parametrize("forced", [True, False], ids=["units-forced", "default-threshold"])
@pytest.mark.parametrize("seed", range(4))
def test_compiled_parts_write_exactly_what_per_entry_assignment_writes(monkeypatch, dtype, aligned, forced, seed):
    if forced:
        monkeypatch.setattr(lines, "MIN_SAVED", 0)
    rng = np.random.default_rng(seed)
    kinds = [KINDS[i] for i in rng.permutation(len(KINDS))] + list(rng.choice(KINDS, 4))
    arena, pieces = _arena_and_pieces(rng, dtype, kinds, aligned)
    want = _reference(arena, pieces)
    parts = compile_write(arena, pieces)
    _apply(arena, parts)
    np.testing.assert_array_equal(arena.view(np.uint8), want.view(np.uint8))  # every bit, every entry


@pytest.mark.parametrize(
    "dtype,kind,per_op",
    [(np.float32, "block16", 4), (np.float32, "block4", 4), (np.float32, "rows", 4), (np.int8, "block16", 16)],
    ids=lambda v: v if isinstance(v, str) else None,
)
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "packed"])
def test_structured_writes_become_16_byte_unit_copies(dtype, kind, per_op, aligned):
    rng = np.random.default_rng(7)
    arena, pieces = _arena_and_pieces(rng, dtype, [kind] * 40, aligned)
    entries = sum(p.size for _, p, _ in pieces)
    parts = compile_write(arena, pieces)
    assert entries >= 4 * lines.MIN_SAVED, "the test needs writes large enough to pass the default threshold"
    assert _ops(parts) <= entries // per_op  # a unit per index (a tensor's one run: a single slice)
    assert all(v.dtype == np.dtype((np.void, 16)) for v, w, _ in parts if not isinstance(w, slice))
    assert all(np.shares_memory(v, arena) for v, _, _ in parts)  # views of the arena, never copies


def test_scattered_writes_stay_per_entry_and_small_structure_is_not_worth_a_call():
    rng = np.random.default_rng(3)
    arena, pieces = _arena_and_pieces(rng, np.float32, ["random"] * 12, True)
    parts = compile_write(arena, pieces)
    assert len(parts) == 1 and parts[0][0] is arena  # one fancy-index write, as before
    arena, pieces = _arena_and_pieces(rng, np.float32, ["block16"] * 2, True)
    assert sum(p.size for _, p, _ in pieces) * 3 // 4 < lines.MIN_SAVED
    assert [v is arena for v, _, _ in compile_write(arena, pieces)] == [True]


def test_a_run_or_a_whole_tensor_is_one_slice_copy():
    arena = np.zeros(1000, np.float32)
    parts = compile_write(arena, [(100, None, np.ones(50, np.float32)), (300, np.arange(7, 207), np.ones(200, "f4"))])
    assert [w for _, w, _ in parts] == [slice(100, 150), slice(307, 507)]
    ones = [(10 * i, np.array([3]), np.ones(1, "f4")) for i in range(36)]  # short runs: one fancy index, not 36 calls
    assert [np.asarray(w).size for _, w, _ in compile_write(arena, ones)] == [36]


def test_merge_positions_sorts_and_a_later_write_of_an_entry_wins():
    pos, val = merge_positions([(np.array([5, 1, 3]), np.array([50, 10, 30], "f4"))])
    np.testing.assert_array_equal(pos, [1, 3, 5])
    np.testing.assert_array_equal(val, [10, 30, 50])
    pos, val = merge_positions(
        [(np.array([5, 1, 3]), np.array([50, 10, 30], "f4")), (np.array([3, 7]), np.array([33, 70], "f4"))]
    )
    np.testing.assert_array_equal(pos, [1, 3, 5, 7])
    np.testing.assert_array_equal(val, [10, 33, 50, 70])
    pos, val = merge_positions([(None, np.arange(4, dtype="f4")), (np.array([2]), np.array([-1], "f4"))])
    np.testing.assert_array_equal(pos, [0, 1, 2, 3])
    np.testing.assert_array_equal(val, [0, 1, -1, 3])
    pos, val = merge_positions([(None, np.arange(4, dtype="f4"))])
    assert pos is None and val.size == 4
    inc = np.array([1, 4, 9])
    assert merge_positions([(inc, np.zeros(3, "f4"))])[0] is inc  # already increasing: no copy


def test_aligned_offsets_start_every_tensor_on_a_cache_line():
    offsets, total = aligned_offsets([5, 16, 17, 1], 4)
    assert offsets == [0, 16, 32, 64] and total == 80
    offsets, total = aligned_offsets([5, 64, 65], 1)
    assert offsets == [0, 64, 128] and total == 256
    with pytest.raises(ConfigError, match="not a multiple"):
        aligned_offsets([4], 4, align=6)
    for n, dtype in ((1000, np.float32), (33, np.int8), (1, np.uint8)):
        a = aligned_empty(n, dtype)
        assert a.shape == (n,) and a.dtype == dtype and a.ctypes.data % 64 == 0 and a.flags.writeable


# -- a runtime switching structured adapters ----------------------------------------------------------------------
CASES = [(b, s) for b in backend_names() for s in get_backend(b).STRATEGIES]
TINY = {"onnxruntime": _tiny, "tflite": _tiny_tflite}  # tiny-model builders with the same API, per backend
X = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)


def _structured(info, unit, seed, name, density=0.25):
    rng = np.random.default_rng(seed)
    tensors, shapes = {}, {}
    for k, t in info.tensors.items():
        idx = random_structured(t.shape, t.transposed, density, unit, rng)
        tensors[k] = SparseDelta(idx.astype(np.int32), (rng.standard_normal(idx.shape[1]) * 0.1).astype(np.float32))
        shapes[k] = tuple(t.shape)
    return Adapter(name, info.fingerprint, tensors, shapes)


@pytest.mark.parametrize("backend,strategy", CASES)
@pytest.mark.parametrize("unit", ["block4", "block16", "rows"])
def test_runtime_switches_structured_adapters_bit_exact_through_unit_copies(
    monkeypatch, tmp_path, backend, strategy, unit
):
    monkeypatch.setattr(lines, "MIN_SAVED", 0)  # a tiny model: use units however few
    tiny = TINY[backend]
    path = tmp_path / f"m{getattr(tiny, 'SUFFIX', '.onnx')}"
    info = tiny.make_mlp(path, sizes=(64, 128, 32))
    base = tiny.base_weights(path, info)
    a, b = _structured(info, unit, 1, "a"), _structured(info, unit, 2, "b")
    with Runtime(path, backend=backend, strategy=strategy) as rt:
        y0 = rt.run(X)["logits"]
        rt.load_adapter(a)
        rt.load_adapter(b)
        apply = rt._adapters["a"].apply
        assert any(v.dtype.kind == "V" for v, _, _ in apply.parts), "the structured adapter is written in units"
        for spec in ("a", "b", {"a": 1.0, "b": -0.5}, "a", None, "b"):
            rt.switch(spec)
            rt.wait_settled(30)
            pairs = {"a": [(a, 1.0)], "b": [(b, 1.0)], None: []}.get(spec) if not isinstance(spec, dict) else None
            ref = merge_weights(base, pairs if pairs is not None else [(a, 1.0), (b, -0.5)])
            for k in ref:
                np.testing.assert_array_equal(rt.weights(k), ref[k])
        rt.switch(None)
        rt.wait_settled(30)
        for k, w in base.items():
            np.testing.assert_array_equal(rt.weights(k), w)
        np.testing.assert_array_equal(rt.run(X)["logits"], y0)


def test_integer_arena_switches_block_adapters_bit_exact(monkeypatch, tmp_path):
    from exporters.quantize import quantize_onnx

    monkeypatch.setattr(lines, "MIN_SAVED", 0)
    fpath, qpath = tmp_path / "m.onnx", tmp_path / "q.onnx"
    _tiny.make_mlp(fpath, sizes=(64, 128, 32))
    calib = np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32)
    info = quantize_onnx(fpath, qpath, calib={"x": calib}, mode="dynamic", per_channel=False).info
    with Runtime(qpath, strategy="bound") as rt:
        base = {k: rt.weights(k).copy() for k in info.tensors}
        ads = {}
        for seed, name in ((1, "a"), (2, "b")):
            rng = np.random.default_rng(seed)
            tensors, shapes = {}, {}
            for k, t in info.tensors.items():
                idx = random_structured(t.shape, t.transposed, 0.25, "block16", rng)
                lo, hi = t.quant.bounds
                q = np.clip(base[k][tuple(idx)].astype(np.int64) + rng.integers(-5, 6, idx.shape[1]), lo, hi)
                tensors[k] = SparseDelta(idx.astype(np.int32), np.zeros(idx.shape[1], "f4"), q.astype(t.quant.dtype))
                shapes[k] = tuple(t.shape)
            ads[name] = Adapter(name, info.fingerprint, tensors, shapes)
            rt.load_adapter(ads[name])
        parts = rt._adapters["a"].apply.parts
        assert any(v.dtype == np.dtype((np.void, 16)) and v.base is not None for v, _, _ in parts)
        for name in ("a", "b", "a"):
            rt.switch(name)
            for k, d in ads[name].tensors.items():
                want = base[k].copy()
                want[tuple(d.indices)] = d.qvalues
                np.testing.assert_array_equal(rt.weights(k), want)
        rt.switch(None)
        for k, w in base.items():
            np.testing.assert_array_equal(rt.weights(k), w)
