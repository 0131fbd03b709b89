"""What a loaded adapter keeps: each array once, and the switch's own positions stay ``intp``.

Before: a loaded SHiRA adapter held int64 positions three times (``index``, its apply, its undo) and each
adapter on a shared mask its own copy of the switch positions: 52 bytes an entry on a float model (adapter
file 12), 28 for each further adapter on one mask. Now the apply and the undo of an adapter, and every
adapter on one mask, share one read-only positions array, and ``index`` (read by loads and fusing only) is
int32. The bounds below are computed from the element types, per entry, on both backends and both precisions.
"""

from __future__ import annotations

import gc
import weakref

import _tiny
import _tiny_tflite
import numpy as np
import pytest

from edge.adapters_held import HeldBuffers
from edge.format.adapter import Adapter, SparseDelta
from edge.fusion import held_bytes
from edge.runtime import Runtime

X = np.random.default_rng(0).standard_normal((5, 10)).astype(np.float32)
CASES = [("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("tflite", "fp32"), ("tflite", "int8")]


def _model(tmp_path, backend: str, precision: str):
    if backend == "tflite":
        path = tmp_path / "m.tflite"
        make = _tiny_tflite.make_int8_mlp if precision == "int8" else _tiny_tflite.make_mlp
        return path, make(path, sizes=(10, 48, 3))
    path = tmp_path / "m.onnx"
    info = _tiny.make_mlp(path, sizes=(10, 48, 3))
    if precision == "fp32":
        return path, info
    from exporters import quantize_onnx

    qpath = tmp_path / "q.onnx"
    calib = np.random.default_rng(1).standard_normal((64, 10)).astype(np.float32)
    return qpath, quantize_onnx(path, qpath, calib={"x": calib}, mode="static", per_channel=True).info


def _on_mask(info, mask_seed: int, value_seed: int, name: str, density: float = 0.3) -> Adapter:
    masks, values = np.random.default_rng(mask_seed), np.random.default_rng(value_seed)
    tensors, shapes = {}, {}
    for k, t in info.tensors.items():
        size = int(np.prod(t.shape))
        flat = np.sort(masks.choice(size, max(2, int(density * size)), replace=False))
        idx = np.stack(np.unravel_index(flat, t.shape)).astype(np.int32)
        tensors[k] = SparseDelta(idx, (values.standard_normal(flat.size) * 1e-3).astype(np.float32))
        shapes[k] = tuple(t.shape)
    return Adapter(name, info.fingerprint, tensors, shapes)


def _positions(write) -> list[np.ndarray]:
    return [pos for _, pos, _ in write.parts if isinstance(pos, np.ndarray)]


def _bound(rt, adapter: Adapter, first: bool) -> int:
    """Bytes an adapter may keep: its own arrays (int32 indices, float32 values), and per entry a float32 delta,
    and values of the stored type for the apply; the first on its mask also an int32 index, the base values (the
    undo writes them), and the intp positions apply and undo share."""
    n = 0
    for k, d in adapter.tensors.items():
        size, s = d.values.size, np.dtype(rt.info.tensors[k].dtype).itemsize
        n += size * (d.indices.shape[0] * 4 + 4 + 4 + s)
        if first:
            n += size * (4 + s + s + np.dtype(np.intp).itemsize)
    return n


@pytest.mark.parametrize("backend,precision", CASES)
def test_a_loaded_adapter_keeps_each_array_once(tmp_path, backend, precision):
    path, info = _model(tmp_path, backend, precision)
    a, b, c = _on_mask(info, 7, 1, "a"), _on_mask(info, 7, 2, "b"), _on_mask(info, 8, 3, "c")
    with Runtime(path, backend=backend) as rt:
        for ad in (a, b, c):
            rt.load_adapter(ad, clip=True)
        p = rt._adapters
        for name in "abc":  # the undo writes the entries the apply writes: one positions array for both
            apply, restore = _positions(p[name].apply), _positions(p[name].restore)
            assert apply and {id(x) for x in apply} == {id(x) for x in restore}
            assert all(x.dtype == np.intp and not x.flags.writeable for x in apply)  # no cast on a switch
            assert all(x.dtype == np.int32 for x in p[name].index.values())
        assert [id(x) for x in _positions(p["b"].apply)] == [id(x) for x in _positions(p["a"].apply)]  # one mask
        held = dict(zip("abc", held_bytes(p[n] for n in "abc"), strict=True))
        assert held["a"] <= _bound(rt, a, True) and held["c"] <= _bound(rt, c, True)
        assert held["b"] <= _bound(rt, b, False)
        y0 = rt.run(X)["logits"]
        for spec in ("a", "b", {"a": 1.0, "c": 0.5}, "c", None):
            rt.switch(spec, clip=True)
        rt.wait_settled(30)
        np.testing.assert_array_equal(rt.run(X)["logits"], y0)  # the shared arrays undo bit-exactly


def test_shared_positions_go_with_the_last_adapter_holding_them(tmp_path):
    path, info = _model(tmp_path, "onnxruntime", "fp32")
    with Runtime(path, strategy="bound") as rt:
        rt.load_adapter(_on_mask(info, 7, 1, "a"))
        rt.load_adapter(_on_mask(info, 7, 2, "b"))
        held = [weakref.ref(x) for x in _positions(rt._adapters["a"].apply)]
        rt.switch("b")
        rt.unload_adapter("a")
        gc.collect()
        assert all(r() is not None for r in held)  # b still writes them
        rt.switch(None)
        rt.unload_adapter("b")
        gc.collect()
        assert all(r() is None for r in held)


def test_the_runtime_reports_what_its_adapters_keep(tmp_path):
    path, info = _model(tmp_path, "onnxruntime", "fp32")
    with Runtime(path, strategy="bound") as rt:
        assert rt.adapter_bytes == {} and rt.footprint["adapters_mb"] == 0
        rt.load_adapter(_on_mask(info, 7, 1, "a"))
        alone = rt.adapter_bytes["a"]
        rt.load_adapter(_on_mask(info, 7, 2, "b"))
        held = rt.adapter_bytes
        assert held == dict(zip(("a", "b"), held_bytes([rt._adapters["a"], rt._adapters["b"]]), strict=True))
        assert held["a"] == alone and 0 < held["b"] < alone  # b counts none of what it shares with a
        assert rt.footprint["adapters_mb"] * 2**20 == HeldBuffers(rt._adapters).total > sum(held.values())
        rt.unload_adapter("a")
        assert rt.adapter_bytes == {"b": alone}  # alone now on its mask, b counts what it shared (same sizes as a)


def test_positions_are_shared_only_when_equal():
    """The pool finds candidates by a hash of a sample of the positions; equal arrays become one read-only array,
    and arrays that agree on the sample but not everywhere stay apart (each write keeps its own)."""
    from runtimes.lines import SHARE_SAMPLE, share_positions

    arena, vals = np.zeros(1 << 16, np.float32), np.ones(4 * SHARE_SAMPLE, np.float32)
    p1 = np.arange(0, 8 * SHARE_SAMPLE, 2, dtype=np.intp)
    p2 = p1.copy()
    p2[1] += 1  # off the sample (every 4th position), same size and last position
    ((_, a, _),) = share_positions([(arena, p1, vals)])
    ((_, b, _),) = share_positions([(arena, p1.copy(), vals)])
    ((_, c, _),) = share_positions([(arena, p2, vals)])
    assert a is p1 and b is p1 and not p1.flags.writeable
    assert c is p2
    np.testing.assert_array_equal(c[:3], [0, 3, 4])
