"""The switch's fixed cost: the one-name fast path and the hybrid rebuild thread that needs no wake in a burst.

``Runtime.switch("name")`` does one lookup and one write of what ``load_adapter`` prepared; every
other spec, an unloaded name and a closed runtime take the general path and its errors. After a
build the hybrid rebuild thread polls the write generation for ``WATCH_S`` (a switch in a burst
wakes nobody), then sleeps on its condition (the next write notifies it). Either way each write's
rebuild lands, the weights are bit-exact, and inference after settling runs the fast session.
"""

from __future__ import annotations

import time

import _tiny
import _tiny_tflite
import numpy as np
import pytest

from edge.errors import ConfigError, RuntimeClosedError
from edge.format.adapter import Adapter, SparseDelta
from edge.runtime import Runtime, merge_weights
from runtimes import backend_names, get_backend
from runtimes.base import ArenaBackend

TINY = {"onnxruntime": _tiny, "tflite": _tiny_tflite}
HYBRID = [b for b in backend_names() if "hybrid" in get_backend(b).STRATEGIES]
X = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)


def _adapter(info, seed, name):
    rng = np.random.default_rng(seed)
    tensors, shapes = {}, {}
    for k, t in info.tensors.items():
        n = int(np.prod(t.shape))
        flat = np.sort(rng.choice(n, n // 10, replace=False))
        idx = np.stack(np.unravel_index(flat, t.shape)).astype(np.int32)
        tensors[k] = SparseDelta(idx, (rng.standard_normal(flat.size) * 0.1).astype(np.float32))
        shapes[k] = tuple(t.shape)
    return Adapter(name, info.fingerprint, tensors, shapes)


def _model(tmp_path, backend):
    tiny = TINY[backend]
    path = tmp_path / f"m{getattr(tiny, 'SUFFIX', '.onnx')}"
    info = tiny.make_mlp(path, sizes=(64, 128, 32))
    return path, info, tiny.base_weights(path, info)


class _Counting:
    """Stands in for the backend's condition: counts notify() calls, passes everything through."""

    def __init__(self, cond):
        self.cond, self.notified = cond, 0

    def notify(self, n: int = 1) -> None:
        self.notified += 1
        self.cond.notify(n)

    def wait(self, timeout=None):
        return self.cond.wait(timeout)


def _wait_for(pred, timeout=30.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.002)
    return False


@pytest.mark.parametrize("backend", HYBRID)
@pytest.mark.parametrize("watch_s", [60.0, 0.0])
def test_hybrid_rebuild_lands_after_every_switch_with_or_without_a_wake(monkeypatch, tmp_path, backend, watch_s):
    monkeypatch.setattr(ArenaBackend, "WATCH_S", watch_s)
    path, info, base = _model(tmp_path, backend)
    a, b = _adapter(info, 1, "a"), _adapter(info, 2, "b")
    with Runtime(path, backend=backend, strategy="hybrid") as rt:
        rt.load_adapter(a)
        rt.load_adapter(b)
        rt.switch("a")  # the first write after load: the thread sleeps on its condition, so this one notifies
        assert rt.wait_settled(30)
        be = rt.backend
        counting = _Counting(be._wake)
        monkeypatch.setattr(be, "_wake", counting)
        # watching (the window just opened) or asleep on the condition (no window): wait until it is there
        assert _wait_for(lambda: be._watching is (watch_s > 0))
        for spec, pairs in (("b", [(b, 1.0)]), ("a", [(a, 1.0)]), (None, []), ("b", [(b, 1.0)])):
            rt.switch(spec)
            y_now = rt.run(X)["logits"]  # served at once by the immediately consistent session
            assert rt.wait_settled(30)
            assert be._static_gen == be._generation, "the rebuild of the last write landed"
            ref = merge_weights(base, pairs)
            for k in ref:
                np.testing.assert_array_equal(rt.weights(k), ref[k])
            np.testing.assert_allclose(rt.run(X)["logits"], y_now, rtol=1e-5, atol=1e-5)
            if watch_s == 0:
                assert _wait_for(lambda: be._watching is False)  # asleep again before the next switch
        if watch_s > 0:
            assert counting.notified == 0, "a switch in a burst wakes nobody: the rebuild thread polls"
        else:
            assert counting.notified == 4, "with no watch window every switch wakes the sleeping rebuild thread"


@pytest.mark.parametrize("backend", HYBRID)
def test_a_burst_of_switches_coalesces_and_close_stops_a_watching_thread(monkeypatch, tmp_path, backend):
    monkeypatch.setattr(ArenaBackend, "WATCH_S", 60.0)
    path, info, base = _model(tmp_path, backend)
    a, b = _adapter(info, 1, "a"), _adapter(info, 2, "b")
    rt = Runtime(path, backend=backend, strategy="hybrid")
    rt.load_adapter(a)
    rt.load_adapter(b)
    rt.switch("a")
    assert rt.wait_settled(30)
    for _ in range(20):
        rt.switch("b")
        rt.switch("a")
    assert rt.wait_settled(30) and rt.backend._static_gen == rt.backend._generation
    for k, w in merge_weights(base, [(a, 1.0)]).items():
        np.testing.assert_array_equal(rt.weights(k), w)
    thread = rt.backend._rebuilder
    assert thread.is_alive() and rt.backend._watching
    t0 = time.monotonic()
    rt.close()  # the watching thread sees the flag within one poll step, not after the 60 s window
    assert not thread.is_alive() and time.monotonic() - t0 < 10


@pytest.mark.parametrize("strategy", ["hybrid", "bound"])
def test_switch_by_name_matches_the_general_path_and_keeps_its_errors(tmp_path, strategy):
    path, info, base = _model(tmp_path, "onnxruntime")
    a, b = _adapter(info, 1, "a"), _adapter(info, 2, "b")
    rt = Runtime(path, strategy=strategy)
    rt.load_adapter(a)
    rt.load_adapter(b)
    rt.switch({"a": 1.0})  # the general path with the prepared writes
    want = {k: rt.weights(k).copy() for k in info.tensors}
    rt.switch("b")
    rt.switch("a")  # the fast path
    assert rt.active == {"a": 1.0} and rt.clipped == 0
    for k, w in want.items():
        np.testing.assert_array_equal(rt.weights(k), w)
    rt.switch(["b"])
    rt.switch("a")
    rt.switch(None)
    rt.wait_settled(30)
    for k, w in base.items():
        np.testing.assert_array_equal(rt.weights(k), w)
    with pytest.raises(ConfigError, match=r"\['nope'\] are not loaded; loaded: \['a', 'b'\]"):
        rt.switch("nope")
    rt.unload_adapter("b")
    with pytest.raises(ConfigError, match=r"\['b'\] are not loaded"):
        rt.switch("b")
    with pytest.raises(ConfigError, match="not a detector-head tensor"):
        rt.switch("a", head={"fc1.weight": np.zeros(1, np.float32)})  # a head: the general path checks it
    assert rt.active == {}  # nothing changed
    rt.close()
    with pytest.raises(RuntimeClosedError):
        rt.switch("a")
