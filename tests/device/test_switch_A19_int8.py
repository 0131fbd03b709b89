"""The single-adapter switch on an int8 base (issue 18's switch-time goal, helper A19): whatever a switch skips to
be fast (its checks inlined, no head copy without a head) must keep every guarantee: the checks still refuse, undo
is bit-exact in every byte, saturation is refused or clipped and reported, and a write cut short half-way puts back
every byte it found.

The models are ``_tiny``'s numpy MLP and its int8 twins from onnxruntime's own tools (no torch), built once.
"""

from __future__ import annotations

import logging

import _tiny
import numpy as np
import pytest

from edge.errors import ConfigError, RuntimeClosedError
from edge.format.adapter import Adapter, SparseDelta
from edge.fusion import SaturationError
from edge.runtime import Runtime
from exporters.quantize import quantize_onnx
from runtimes.base import ArenaBackend

CALIB = np.random.default_rng(1).standard_normal((64, 10)).astype(np.float32)


@pytest.fixture(scope="module", params=["dynamic", "static"])
def twin(request, tmp_path_factory):
    """(float info, int8 path, int8 info) for one quantization mode."""
    d = tmp_path_factory.mktemp(f"a19-{request.param}")
    finfo = _tiny.make_mlp(d / "m.onnx", sizes=(10, 24, 3))
    report = quantize_onnx(d / "m.onnx", d / "q.onnx", calib={"x": CALIB}, mode=request.param, per_channel=True)
    assert sorted(report.quantized) == ["fc1.weight", "fc2.weight"]
    return finfo, d / "q.onnx", report.info


def _int_adapter(info, rt, seed, name, density=0.3, step=5):
    """An integer adapter moving random entries of every target by up to ``step`` grid steps (kept in range)."""
    rng = np.random.default_rng(seed)
    tensors, shapes = {}, {}
    for k, t in info.tensors.items():
        base, size = rt.weights(k), int(np.prod(t.shape))
        flat = np.sort(rng.choice(size, max(2, int(density * size)), replace=False))
        idx = np.stack(np.unravel_index(flat, t.shape)).astype(np.int32)
        lo, hi = t.quant.bounds
        q = np.clip(base[tuple(idx)].astype(np.int64) + rng.integers(-step, step + 1, flat.size), lo, hi)
        tensors[k] = SparseDelta(idx, np.ones(flat.size, np.float32), q.astype(t.quant.dtype))
        shapes[k] = tuple(t.shape)
    return Adapter(name, info.fingerprint, tensors, shapes)


def _bytes(rt) -> dict[str, bytes]:
    """Every byte of every writable stored tensor, as the backend holds it."""
    return {t.initializer: rt.backend.read(t.initializer).tobytes() for t in rt.info.tensors.values()}


def _expected(rt, adapter) -> dict[str, np.ndarray]:
    """The integers a switch to ``adapter`` alone must leave, from the base integers now in ``rt``."""
    out = {}
    for k, d in adapter.tensors.items():
        w = rt.weights(k)
        w[tuple(d.indices)] = d.qvalues
        out[k] = w
    return out


@pytest.fixture
def loaded(twin):
    """A hybrid runtime on the int8 twin with integer adapters "a" and "b" (overlapping entries) loaded."""
    finfo, qpath, info = twin
    rt = Runtime(qpath, strategy="hybrid")
    rt.wait_settled(60)
    base = _bytes(rt)
    a, b = _int_adapter(info, rt, 1, "a"), _int_adapter(info, rt, 2, "b")
    want = {"a": _expected(rt, a), "b": _expected(rt, b)}
    rt.load_adapter(a)
    rt.load_adapter(b)
    yield rt, base, want
    rt.close()


def test_fast_switches_are_bit_exact_and_undo_restores_every_byte(loaded):
    rt, base, want = loaded
    for name in ("a", "b", "b", None, "a", None, "b", "a", None):
        rt.switch(name, clip=True)
        if name is None:
            assert _bytes(rt) == base and rt.active == {}
        else:
            assert rt.active == {name: 1.0}
            for k, w in want[name].items():
                np.testing.assert_array_equal(rt.weights(k), w)
        assert rt.wait_settled(60)
    assert _bytes(rt) == base


def test_the_inlined_checks_still_refuse_and_accept_what_they_did(loaded):
    rt, base, want = loaded
    for bad in ("no", 2, None, 1.0):
        with pytest.raises(ConfigError, match="clip must be True or False"):
            rt.switch("a", clip=bad)
    assert _bytes(rt) == base and rt.active == {}
    for ok in (np.bool_(True), 1, 0, False):
        rt.switch("a", clip=ok)
        assert rt.active == {"a": 1.0}
        rt.switch(None)
    with pytest.raises(ConfigError, match=r"\['zz'\] are not loaded; loaded: \['a', 'b'\]"):
        rt.switch("zz")
    with pytest.raises(ConfigError, match="adapter name must be a string"):
        rt.switch({3: 1.0})

    class Name(str):  # a str subclass goes through normalise: its plain copy is what is active
        pass

    rt.switch(Name("b"))
    assert rt.active == {"b": 1.0} and type(next(iter(rt.active))) is str
    for k, w in want["b"].items():
        np.testing.assert_array_equal(rt.weights(k), w)
    rt.switch(None)
    assert _bytes(rt) == base
    rt.close()
    with pytest.raises(RuntimeClosedError, match="is closed"):
        rt.switch("a")


def test_saturation_is_still_refused_or_clipped_and_reported(loaded, caplog):
    rt, base, want = loaded
    rt.switch("a")
    before = _bytes(rt)
    with pytest.raises(SaturationError, match="outside the int8 range|outside the uint8 range"):
        rt.switch({"a": 40.0, "b": 40.0})  # tens of grid steps on hundreds of entries: some leave the range
    assert _bytes(rt) == before and rt.active == {"a": 1.0}  # nothing was written
    with caplog.at_level(logging.WARNING, logger="edge.runtime"):
        rt.switch({"a": 40.0, "b": 40.0}, clip=True)
    assert rt.clipped > 0
    assert any(f"clipped {rt.clipped} entries" in r.getMessage() for r in caplog.records)
    for k, t in rt.info.tensors.items():
        lo, hi = t.quant.bounds
        w = rt.weights(k).astype(np.int64)
        assert w.min() >= lo and w.max() <= hi
    rt.switch(None)
    assert _bytes(rt) == base and rt.clipped == 0


@pytest.mark.parametrize("cut", ["between-writes", "half-way"])
def test_a_switch_cut_short_puts_back_every_byte_it_found(loaded, monkeypatch, cut):
    """A write interrupted after the undo (``between-writes``) or after half the new adapter's entries
    (``half-way``): the runtime is back in the state it found, byte for byte, and switches on normally."""
    rt, base, want = loaded
    rt.switch("a")
    assert rt.wait_settled(60)
    found = _bytes(rt)
    be, calls = rt.backend, []

    def failing(*prepared):
        calls.append(len(prepared))
        if len(calls) > 1:  # the rollback: written whole
            return ArenaBackend.write(be, *prepared)
        undo, apply = prepared[:2]
        ArenaBackend.write(be, undo)  # "a" undone: its entries hold the base values
        if cut == "half-way":
            for arena, pos, val in apply.parts:  # entry-by-entry parts here (a few scattered entries)
                assert isinstance(pos, np.ndarray)
                half = max(1, len(val) // 2)
                arena[pos[:half]] = val[:half]
            assert any(_bytes(rt)[t] not in (found[t], base[t]) for t in base)  # "b" half in: a mixed state
        raise KeyboardInterrupt

    monkeypatch.setattr(be, "write", failing)
    with pytest.raises(KeyboardInterrupt):
        rt.switch("b")
    assert len(calls) == 2
    assert _bytes(rt) == found and rt.active == {"a": 1.0}
    monkeypatch.undo()
    rt.switch("b")
    for k, w in want["b"].items():
        np.testing.assert_array_equal(rt.weights(k), w)
    rt.switch(None)
    assert _bytes(rt) == base
