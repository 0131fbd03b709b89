"""``Runtime.wait_idle``: no background work in flight, hybrid's session for switches (built after the first run)
included; ``wait_settled`` keeps meaning "served at full speed" (the memory and cold-start benches rely on both)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from _tiny import make_mlp

from edge.errors import ConfigError, RuntimeClosedError
from edge.runtime import Runtime


@pytest.mark.parametrize("strategy", ["hybrid", "bound", "rebuild"])
def test_wait_idle_waits_for_the_bound_session_hybrid_builds_after_the_first_run(tmp_path, strategy):
    make_mlp(tmp_path / "m.onnx")
    x = {"x": np.ones((1, 10), np.float32)}
    with Runtime(tmp_path / "m.onnx", strategy=strategy) as rt:
        backend = rt.backend
        assert rt.wait_idle(0)  # nothing asked yet: hybrid's builder waits for the first run, it is no work
        if strategy == "hybrid":
            assert backend._bound is None and not backend._bound_ready.is_set()
        rt.run(x)
        assert rt.wait_settled(0)  # served at full speed from the first answer (the prepacked session)
        assert rt.wait_idle(60.0)
        if strategy != "rebuild":  # the session switches are served from exists once idle
            assert backend._bound is not None and backend._binding is not None
        assert rt.wait_idle(0)
    with pytest.raises(RuntimeClosedError):
        rt.wait_idle()


@pytest.mark.parametrize("wait", ["wait_idle", "wait_settled"])
def test_a_waiter_returns_closed_when_another_thread_closes_the_runtime_mid_rebuild(wait):
    golden = Path(__file__).resolve().parents[1] / "golden"
    rt = Runtime(golden / "tiny-mlp-v1.onnx", strategy="hybrid")
    rt.run({"x": np.ones((1, 10), np.float32)})
    assert rt.wait_idle(60.0)
    rt.load_adapter(golden / "adapter-v1.safetensors")
    rt.backend._rebuild_delay = 0.5  # a rebuild in flight when the close comes (a bigger model's build)
    rt.switch("golden-a")
    got: dict = {}

    def waiter():
        try:
            got["done"] = getattr(rt, wait)()
        except Exception as e:  # what the waiter sees: the close, typed
            got["error"] = e

    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    time.sleep(0.1)
    rt.close()
    t.join(10.0)
    assert not t.is_alive(), "the waiter never returned"
    assert isinstance(got.get("error"), RuntimeClosedError), got


def test_a_wait_takes_none_or_seconds():
    golden = Path(__file__).resolve().parents[1] / "golden"
    with Runtime(golden / "tiny-mlp-v1.onnx", strategy="bound") as rt:
        for ok in (None, 0, -1, 0.5, np.float32(1.0), np.int64(2), float("inf"), 1e300):
            assert rt.wait_idle(ok) and rt.wait_settled(ok), ok
        for bad in ("1", float("nan"), True, [1], object()):
            with pytest.raises(ConfigError, match="timeout is None or a number of seconds"):
                rt.wait_idle(bad)
            with pytest.raises(ConfigError, match="timeout is None or a number of seconds"):
                rt.wait_settled(bad)
