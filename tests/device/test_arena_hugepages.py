"""The arena on transparent huge pages, and the cache warming after a background rebuild.

:func:`runtimes.lines.huge_empty` maps 2 MiB-aligned memory advised ``MADV_HUGEPAGE``: checked to be
aligned, really backed by huge pages where the kernel allows (``AnonHugePages`` in smaps), never more
resident than asked, unmapped with its last view, and to fall back to 4 KiB pages only where the system
refuses, saying so in the log. :func:`runtimes.lines.touch` only reads. A runtime on a huge-page arena
(the threshold lowered so a tiny model gets one) switches bit-exactly, and the hybrid strategy warms its
recent writes after each rebuild, holding them weakly.
"""

from __future__ import annotations

import gc
import logging
import mmap
import os
import weakref
from pathlib import Path

import _tiny
import numpy as np
import pytest

from edge.format.adapter import Adapter, SparseDelta
from edge.runtime import Runtime, merge_weights
from exporters.masks import random_structured
from runtimes import lines, rebuilds
from runtimes.lines import HUGE_BYTES, advise_huge, aligned_empty, compile_write, huge_empty, huge_resident, touch

MiB = 1 << 20
PAGE = mmap.PAGESIZE


def _thp_setting() -> str:
    try:
        return Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return ""


THP = _thp_setting()
needs_thp = pytest.mark.skipif(
    not hasattr(mmap, "MADV_HUGEPAGE") or not ("[madvise]" in THP or "[always]" in THP),
    reason=f"transparent huge pages are not available here ({THP.strip() or 'no sysfs setting'})",
)


@pytest.fixture
def fresh_log(monkeypatch):
    monkeypatch.setattr(lines, "_said", set())  # each refusal is logged once per process: forget the earlier ones


@needs_thp
def test_huge_empty_is_aligned_backed_by_huge_pages_and_never_more_resident_than_asked():
    nbytes = 8 * MiB + 12_345  # four whole huge pages and a partial one
    a = huge_empty(nbytes)
    assert a is not None and a.dtype == np.uint8 and a.shape == (nbytes,) and a.flags.writeable
    assert a.ctypes.data % HUGE_BYTES == 0
    before = huge_resident(a)
    a[:] = 7
    huge, rss = huge_resident(a)
    assert huge > before[0] and (huge - before[0]) % HUGE_BYTES == 0 and huge - before[0] <= 4 * HUGE_BYTES  # whole
    # madvise mode: not a page more (a delta: the kernel may merge the map with a neighbouring one smaps counts too)
    assert rss - before[1] <= -(-nbytes // PAGE) * PAGE + ("[always]" in THP) * HUGE_BYTES
    assert (a == 7).all()


@needs_thp
def test_a_large_arena_goes_on_huge_pages_and_a_small_one_does_not():
    big = aligned_empty((lines.HUGE_MIN + 3 * MiB) // 4, np.float32)
    big[:] = 1.0
    assert big.ctypes.data % HUGE_BYTES == 0 and _on_map(big) and huge_resident(big)[0] >= 2 * HUGE_BYTES
    small = aligned_empty(1000, np.float32)
    assert small.ctypes.data % 64 == 0 and not _on_map(small)  # numpy's allocator: no huge page for 4 KB
    asked = aligned_empty((lines.HUGE_MIN + 3 * MiB) // 4, np.float32, huge=False)
    assert asked.ctypes.data % 64 == 0 and not _on_map(asked)


def _on_map(a: np.ndarray) -> bool:
    """Whether ``a`` views a map of :func:`huge_empty` (an mmap object at the end of its base chain)."""
    while isinstance(a, np.ndarray) and a.base is not None:
        a = a.base
    return isinstance(getattr(a, "obj", a), mmap.mmap)  # numpy 2 holds the buffer through a memoryview


@needs_thp
def test_advise_huge_puts_a_foreign_buffer_on_huge_pages_before_it_is_written():
    m = mmap.mmap(-1, 8 * MiB + HUGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # nobody advised it
    raw = np.frombuffer(m, np.uint8)
    assert advise_huge(raw[:100]) == 0  # no whole huge page inside: nothing to advise
    advised = advise_huge(raw)
    assert advised >= 8 * MiB and advised % HUGE_BYTES == 0
    raw[:] = 3
    assert huge_resident(raw)[0] >= 2 * HUGE_BYTES
    del raw


def test_no_madvise_falls_back_to_small_pages_and_says_so(monkeypatch, caplog, fresh_log):
    monkeypatch.delattr(mmap, "MADV_HUGEPAGE", raising=False)
    with caplog.at_level(logging.WARNING, logger="edge.runtimes.lines"):
        assert huge_empty(8 * MiB) is None
        a = aligned_empty(lines.HUGE_MIN // 4, np.float32)
    assert a.shape == (lines.HUGE_MIN // 4,) and a.ctypes.data % 64 == 0
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "no MADV_HUGEPAGE" in said[0] and "4 KiB pages" in said[0]  # once, not per arena


def test_a_kernel_refusing_the_advice_falls_back_and_says_so(monkeypatch, caplog, fresh_log):
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        monkeypatch.setattr(mmap, "MADV_HUGEPAGE", 14, raising=False)
    real = mmap.mmap

    class Refusing(real):
        def madvise(self, *args):
            raise OSError(22, "Invalid argument")

    monkeypatch.setattr(mmap, "mmap", Refusing)
    with caplog.at_level(logging.WARNING, logger="edge.runtimes.lines"):
        assert huge_empty(8 * MiB) is None
        a = aligned_empty(lines.HUGE_MIN // 4, np.float32)  # still an arena, on 4 KiB pages
        assert a.ctypes.data % 64 == 0 and a.flags.writeable
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "refused MADV_HUGEPAGE" in said[0] and "Invalid argument" in said[0]


def test_thp_switched_off_is_logged(monkeypatch, tmp_path, caplog, fresh_log):
    setting = tmp_path / "enabled"
    setting.write_text("always madvise [never]\n")
    monkeypatch.setattr(lines, "_THP_ENABLED", str(setting))
    with caplog.at_level(logging.WARNING, logger="edge.runtimes.lines"):
        huge_empty(4 * MiB)
    assert any("transparent huge pages are off" in r.getMessage() for r in caplog.records)


def _parts(arena, rng, units=("block4", "block16", "rows", None)):
    """Compiled writes over three tensors of ``arena`` with unit, row and scattered entries."""
    pieces, at = [], 0
    for i, unit in enumerate(units):
        size = 96 * 64
        idx = random_structured((96, 64), i % 2 == 1, 0.2, unit, rng)
        pos = np.sort(idx[0] * 64 + idx[1] if i % 2 == 0 else idx[1] * 96 + idx[0])
        pieces.append((at, pos.astype(np.int64), rng.standard_normal(pos.size).astype(np.float32)))
        at += size
    pieces.append((at, None, rng.standard_normal(100).astype(np.float32)))  # a whole tensor: a slice
    return compile_write(arena, pieces)


def test_huge_empty_is_unmapped_with_its_last_view():
    a = huge_empty(4 * MiB)
    if a is None:
        pytest.skip("the system refused huge pages (logged)")
    owner = weakref.ref(a.base)  # the array over the whole map: the map (an mmap object) goes with it
    view = a[100:200]
    del a
    gc.collect()
    assert owner() is not None
    del view
    gc.collect()
    assert owner() is None


def test_touch_reads_and_writes_nothing(monkeypatch):
    monkeypatch.setattr(lines, "MIN_SAVED", 0)
    arena = np.random.default_rng(3).standard_normal(5 * 96 * 64).astype(np.float32)
    before = arena.copy()
    parts = _parts(arena, np.random.default_rng(4))
    values = [x.copy() for _, _, x in parts]
    touch(parts)
    assert arena.tobytes() == before.tobytes()
    assert all(x.tobytes() == y.tobytes() for (_, _, x), y in zip(parts, values))


def _adapter(info, unit, seed, name):
    rng = np.random.default_rng(seed)
    tensors, shapes = {}, {}
    for k, t in info.tensors.items():
        idx = random_structured(t.shape, t.transposed, 0.25, unit, rng)
        tensors[k] = SparseDelta(idx.astype(np.int32), (rng.standard_normal(idx.shape[1]) * 0.1).astype(np.float32))
        shapes[k] = tuple(t.shape)
    return Adapter(name, info.fingerprint, tensors, shapes)


@pytest.mark.parametrize("strategy", ["hybrid", "bound", "rebuild"])
def test_runtime_on_huge_pages_switches_bit_exact_and_warms_after_rebuilds(monkeypatch, tmp_path, strategy):
    monkeypatch.setattr(lines, "MIN_SAVED", 0)
    monkeypatch.setattr(lines, "HUGE_MIN", 0)  # a tiny model: arena and sources on huge pages all the same
    path = tmp_path / "m.onnx"
    info = _tiny.make_mlp(path, sizes=(64, 128, 32))
    ref = _tiny.base_weights(path, info)
    a, b = _adapter(info, "block16", 1, "a"), _adapter(info, "rows", 2, "b")
    x = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    with Runtime(path, strategy=strategy) as rt:
        be = rt.backend
        y0 = rt.run(x)["logits"]
        rt.load_adapter(a)
        rt.load_adapter(b)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            assert be._arena.ctypes.data % HUGE_BYTES == 0  # from huge_empty
        for spec, pairs in (("a", [(a, 1.0)]), ("b", [(b, 1.0)]), ({"a": 1.0, "b": -0.5}, [(a, 1.0), (b, -0.5)])):
            rt.switch(spec)
            assert rt.wait_settled(30)
            want = merge_weights(ref, pairs)
            for k in want:
                np.testing.assert_array_equal(rt.weights(k), want[k])
        rt.switch(None)
        assert rt.wait_settled(30)
        for k, w in ref.items():
            np.testing.assert_array_equal(rt.weights(k), w)
        np.testing.assert_array_equal(rt.run(x)["logits"], y0)
        recent = [r() for refs in be._recent for r in refs]
        if strategy == "hybrid":  # the last writes are kept (weakly) and were read back after the last build
            live = [w for w in recent if w is not None]  # a fused mix's writes die with the next switch
            assert len(be._recent) == be.WARM_RECENT and live and all(w.parts for w in live)
            assert be.last_warm_ms is not None and be.last_warm_ms >= 0
        else:  # no background build: nothing to warm after
            assert recent == [] and be.last_warm_ms is None


def test_warm_keeps_only_live_recent_writes(monkeypatch, tmp_path):
    path = tmp_path / "m.onnx"
    info = _tiny.make_mlp(path, sizes=(64, 128, 32))
    with Runtime(path, strategy="hybrid") as rt:
        for i in range(6):
            rt.load_adapter(_adapter(info, "block4", i, f"a{i}"))
            rt.switch(f"a{i}")
            rt.wait_settled(30)
        assert len(rt.backend._recent) == rt.backend.WARM_RECENT
        rt.switch(None)
        for i in range(6):
            rt.unload_adapter(f"a{i}")
        gc.collect()
        refs = [r for refs in rt.backend._recent for r in refs]
        assert refs and [r() for r in refs if r() is not None] == []  # the unloaded adapters' writes went
        rt.backend._warm()  # dead references are skipped
        assert rt.backend.last_warm_ms is not None


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs and affinity"
)
@pytest.mark.parametrize("beside", [True, False])
def test_warm_runs_on_the_writers_cpu_and_restores_the_affinity(monkeypatch, tmp_path, beside):
    path = tmp_path / "m.onnx"
    info = _tiny.make_mlp(path, sizes=(64, 128, 32))
    seen = []
    monkeypatch.setattr(rebuilds, "touch", lambda parts: seen.append(os.sched_getaffinity(0)))
    with Runtime(path, strategy="hybrid") as rt:
        be = rt.backend
        monkeypatch.setattr(be, "WARM_BESIDE_WRITER", beside)
        rt.load_adapter(_adapter(info, "block16", 1, "a"))
        rt.switch("a")
        assert rt.wait_settled(30)
        thread = be._rebuilder
        assert seen and os.sched_getaffinity(thread.native_id) == os.sched_getaffinity(0)  # restored after warming
        seen.clear()
        mask = os.sched_getaffinity(0)
        be._warm()  # here, from the writing thread itself: pinned to the CPU it last ran on, then restored
        assert seen
        if beside:
            assert all(len(s) == 1 and s <= mask for s in seen)
        else:
            assert all(s == mask for s in seen)
        assert os.sched_getaffinity(0) == mask
