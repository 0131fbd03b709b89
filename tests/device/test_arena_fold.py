"""A switch's few float entries of an int8 model written in the same call as its int8 entries (issue 18).

An int8 model keeps some adapter targets in float32 (a head the quantizer left out), so a switch wrote two
arenas with two fancy-index calls where the float32 model made one: a fixed cost the int8 switch paid on every
switch. Arenas carved from one buffer (:func:`runtimes.lines.arena_group`; LiteRT's model bytes viewed as float32
and int8) let :func:`runtimes.lines.fold_narrow` write both as bytes of one view in one call. These tests check
the folded write puts exactly the bytes per-entry assignment puts (NaN payloads and -0.0 included), that it is
one call, and where it must not fold: separate buffers, too many wide entries, whole-tensor slices.
"""

from __future__ import annotations

import numpy as np
import pytest

from runtimes import lines
from runtimes.base import ArenaBackend, BackendOptions, WeightWrite
from runtimes.lines import LINE_BYTES, arena_group, compile_write, fold_narrow

F4, I1, U1 = np.dtype(np.float32), np.dtype(np.int8), np.dtype(np.uint8)


def _floats(rng, n):
    v = rng.standard_normal(n).astype(np.float32)
    v[: min(n, 3)] = np.array([np.nan, -0.0, np.inf], np.float32)[: min(n, 3)]
    if n > 3:  # a NaN with a payload: a float copy could quieten it, a byte copy keeps it
        v[3:4].view(np.uint32)[:] = 0x7FA00001
    return v


def _values(rng, dtype, n):
    if dtype.kind == "f":
        return _floats(rng, n)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max + 1, n).astype(dtype)


def _pieces(rng, arena, tensors: int, per: int):
    """``tensors`` disjoint tensors of 200 entries in ``arena`` (line-aligned offsets), ``per`` random entries each."""
    step = -(-200 * arena.dtype.itemsize // LINE_BYTES) * LINE_BYTES // arena.dtype.itemsize
    assert tensors * step <= arena.size
    out = []
    for k in range(tensors):
        pos = np.sort(rng.choice(200, per, replace=False)).astype(np.int64)
        out.append((k * step, pos, _values(rng, arena.dtype, per)))
    return out


def _reference(writes):
    """Copies of every arena's bytes after per-entry assignment of ``writes``."""
    want = {}
    for arena, pieces in writes:
        a = want.setdefault(id(arena), arena.copy())
        for off, pos, val in pieces:
            for p, v in zip(range(val.size) if pos is None else pos.tolist(), val):
                a[off + p] = v
    return want


def _apply(parts):
    for view, pos, val in parts:
        view[pos] = val


def _compiled(writes):
    return [p for arena, ps in fold_narrow(writes) for p in compile_write(arena, ps)]


def test_arena_group_carves_line_aligned_arenas_of_one_buffer_widest_first():
    g = arena_group({I1: 100, F4: 10, U1: 3})
    assert [d for d in g] == [F4, I1, U1] and [a.size for a in g.values()] == [10, 100, 3]
    starts = [a.ctypes.data for a in g.values()]
    assert all(s % LINE_BYTES == 0 for s in starts) and starts == sorted(starts)
    assert starts[1] - starts[0] == LINE_BYTES and starts[2] - starts[1] == 2 * LINE_BYTES  # no overlap, no waste
    assert len({id(lines._buffer(a)) for a in g.values()}) == 1
    assert all(a.flags.writeable for a in g.values())


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("narrow", [I1, U1, "both"], ids=["int8", "uint8", "int8+uint8"])
def test_float_entries_fold_into_the_int8_call_and_write_the_same_bytes(seed, narrow):
    rng = np.random.default_rng(seed)
    kinds = [I1, U1] if narrow == "both" else [narrow]
    g = arena_group({F4: 2000, **{d: 4000 for d in kinds}})
    for a in g.values():
        a.view(np.uint8)[:] = rng.integers(0, 256, a.nbytes, dtype=np.uint8)
    writes = [(g[F4], _pieces(rng, g[F4], 3, 4))] + [(g[d], _pieces(rng, g[d], 5, 60)) for d in kinds]
    want = _reference(writes)
    parts = _compiled(writes)
    assert len(parts) == 1, "one fancy-index call for the whole switch"
    view, pos, val = parts[0]
    assert view.dtype == np.uint8 and np.shares_memory(view, g[F4]) and np.all(pos[1:] > pos[:-1])
    _apply(parts)
    for arena, _ in writes:
        np.testing.assert_array_equal(arena.view(np.uint8), want[id(arena)].view(np.uint8))  # every bit


def test_litert_bytes_viewed_as_float32_and_int8_fold_too():
    from runtimes.litert_arena import writable_view

    rng = np.random.default_rng(5)
    data = bytes(8192)  # private to this test, as the backend's model bytes are private to it
    raw = writable_view(data)
    f32, i8 = raw[:4096].view(np.float32), raw.view(np.int8)
    writes = [(f32, [(0, np.array([1, 7, 30]), _floats(rng, 3))]), (i8, _pieces(rng, i8[4096:], 4, 50))]
    writes[1] = (i8, [(off + 4096, pos, val) for off, pos, val in writes[1][1]])  # the int8 tensors after the floats
    want = _reference(writes)
    parts = _compiled(writes)
    assert len(parts) == 1
    _apply(parts)
    np.testing.assert_array_equal(f32.view(np.uint8), want[id(f32)].view(np.uint8))
    np.testing.assert_array_equal(i8[4096:], want[id(i8)][4096:])


def test_no_fold_across_buffers_past_the_threshold_or_for_whole_tensors(monkeypatch):
    rng = np.random.default_rng(2)
    f32, i8 = np.zeros(4096, np.float32), np.zeros(8192, np.int8)  # two buffers: two calls, as before
    writes = [(f32, _pieces(rng, f32, 2, 5)), (i8, _pieces(rng, i8, 2, 50))]
    assert [v.dtype for v, _, _ in _compiled(writes)] == [F4, I1]
    g = arena_group({F4: 4096, I1: 8192})
    monkeypatch.setattr(lines, "MIN_SAVED", 3 * 10 - 1)  # 10 float entries cost 30 extra byte positions
    writes = [(g[F4], _pieces(rng, g[F4], 2, 5)), (g[I1], _pieces(rng, g[I1], 2, 50))]
    want = _reference(writes)
    parts = _compiled(writes)
    assert [v.dtype for v, _, _ in parts] == [F4, I1]
    _apply(parts)
    np.testing.assert_array_equal(g[F4], want[id(g[F4])])
    monkeypatch.setattr(lines, "MIN_SAVED", 3 * 10)
    assert [a.dtype for a, _ in fold_narrow(writes)] == [U1]  # at the threshold: folded
    whole = [(g[F4], [(0, None, _floats(rng, 300))]), (g[I1], _pieces(rng, g[I1], 2, 50))]
    want = _reference(whole)
    parts = _compiled(whole)
    assert [type(w).__name__ for _, w, _ in parts] == ["slice", "ndarray"] and parts[0][0] is g[F4]
    _apply(parts)
    np.testing.assert_array_equal(g[F4].view(np.uint8), want[id(g[F4])].view(np.uint8))
    np.testing.assert_array_equal(g[I1], want[id(g[I1])])


class _Arenas(ArenaBackend):
    """The arena part of a backend alone: a float32 and an int8 arena of one buffer, strategy ``bound``."""

    name = "arenas"

    def __init__(self, model=None, options=None):
        g = arena_group({F4: 1024, I1: 4096})
        self._arena, self._strategy, self._slots = g[F4], "bound", set()
        self._offset = {"head": 0, "w1": 0, "w2": 1024}
        self._arena_of = {"w1": g[I1], "w2": g[I1]}
        self._init_rebuilds(options or BackendOptions(strategy="bound"))

    def run(self, feeds, outputs=None):
        raise NotImplementedError

    def read(self, tensor):
        return self._arena_for(tensor)

    strategy = property(lambda self: self._strategy)
    providers = property(lambda self: ["CPU"])


def test_a_backend_switch_and_undo_with_a_float_head_is_one_call_and_bit_exact():
    be = _Arenas()
    rng = np.random.default_rng(9)
    be._arena[:] = _floats(rng, be._arena.size)
    be._arena_of["w1"][:] = rng.integers(-128, 128, 4096).astype(np.int8)
    before = [be._arena.copy(), be._arena_of["w1"].copy()]
    writes = [
        WeightWrite("head", np.array([3, 9, 500]), _floats(rng, 3)),
        WeightWrite("w1", np.sort(rng.choice(1024, 40, replace=False)), rng.integers(-128, 128, 40).astype(np.int8)),
        WeightWrite("w2", np.sort(rng.choice(2048, 40, replace=False)), rng.integers(-128, 128, 40).astype(np.int8)),
    ]
    undo = [WeightWrite(w.tensor, w.index, be.read(w.tensor)[be._offset[w.tensor] + w.index].copy()) for w in writes]
    apply, restore = be.prepare(writes), be.prepare(undo)
    assert len(apply.parts) == 1 and len(restore.parts) == 1
    be.write(apply)
    for w in writes:
        got = be.read(w.tensor)[be._offset[w.tensor] + w.index]
        np.testing.assert_array_equal(got.view(np.uint8), w.values.view(np.uint8))
    be.write(restore)
    np.testing.assert_array_equal(be._arena.view(np.uint8), before[0].view(np.uint8))
    np.testing.assert_array_equal(be._arena_of["w1"], before[1])
