"""onnxruntime ``hybrid`` at load: one background thread, the bound session built once asked, clean failure paths.

The constructing thread builds the prepacked session and serves from it; one thread (``edge-ort-hybrid``),
started before that build, builds the bound session once the first inference or write asks for it and then
runs the rebuilds. A switch right after load is served by the bound session and settles on a rebuilt one,
bit-exact against the ``bound`` strategy; a runtime closed before its first inference, or whose prepacked
build fails, leaves no thread behind.
"""

from __future__ import annotations

import threading
import time

import _tiny
import numpy as np
import pytest

from edge.runtime import Runtime
from runtimes.onnxruntime import OrtBackend

X = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)


def _ours() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("edge-ort")]


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "m.onnx"
    info = _tiny.make_mlp(path, sizes=(64, 128, 32))
    return path, info


def test_hybrid_runs_one_background_thread_and_builds_bound_once_asked(model):
    path, _ = model
    before = set(_ours())
    rt = Runtime(path, backend="onnxruntime", strategy="hybrid")
    try:
        mine = [t for t in _ours() if t not in before]
        assert [t.name for t in mine] == ["edge-ort-hybrid"]
        assert rt.backend._bound is None  # not before the first inference asks for it
        rt.run({"x": X})
        deadline = time.monotonic() + 30
        while rt.backend._bound is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert rt.backend._bound is not None
        assert mine[0].is_alive()  # the same thread now waits for writes to rebuild after
    finally:
        rt.close()
    assert not mine[0].is_alive()


def test_switch_right_after_load_is_served_then_settles_bit_exact(model):
    path, info = model
    adapter = _tiny.random_adapter(info, seed=3, name="A")
    ref = Runtime(path, backend="onnxruntime", strategy="bound")
    ref.load_adapter(adapter)
    ref.switch("A")
    want = ref.run({"x": X})
    ref.close()
    rt = Runtime(path, backend="onnxruntime", strategy="hybrid")
    try:
        rt.load_adapter(adapter)
        base = rt.run({"x": X})
        rt.switch("A")  # the bound session may still be on its way: the next run waits for it
        for k, v in rt.run({"x": X}).items():
            np.testing.assert_array_equal(v, want[k])
        assert rt.wait_settled(30)
        for k, v in rt.run({"x": X}).items():
            np.testing.assert_allclose(v, want[k], rtol=1e-5, atol=1e-6)
        rt.switch(None)
        assert rt.wait_settled(30)
        for k, v in rt.run({"x": X}).items():
            np.testing.assert_allclose(v, base[k], rtol=1e-5, atol=1e-6)
        assert rt.backend.shares_weights  # the prepacked session took the arena in place (the stub was found)
    finally:
        rt.close()


def test_close_before_the_first_inference_returns_at_once(model):
    path, _ = model
    before = set(_ours())
    rt = Runtime(path, backend="onnxruntime", strategy="hybrid")
    mine = [t for t in _ours() if t not in before]
    t0 = time.monotonic()
    rt.close()
    assert time.monotonic() - t0 < 10
    assert mine and not any(t.is_alive() for t in mine)


def test_a_failed_prepacked_build_leaves_no_thread(model, monkeypatch):
    path, _ = model

    class Boom(RuntimeError):
        pass

    def fail(self):
        raise Boom("no session for you")

    monkeypatch.setattr(OrtBackend, "_build_fresh", fail)
    before = set(_ours())
    with pytest.raises(Boom):
        Runtime(path, backend="onnxruntime", strategy="hybrid")
    assert not [t for t in _ours() if t not in before and t.is_alive()]
