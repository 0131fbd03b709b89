"""LiteRT: a hybrid without XNNPACK is one built-in interpreter, said in ``strategy_reason``; the session's outputs."""

from __future__ import annotations

import _tiny_tflite
import numpy as np
from _tiny import random_adapter

from edge.runtime import Runtime, merge_weights

X = np.random.default_rng(3).standard_normal((1, 10)).astype(np.float32)


def _switch_is_exact(rt: Runtime, path, info) -> None:
    base = _tiny_tflite.base_weights(path, info)
    a = random_adapter(info, seed=1, name="a")
    rt.load_adapter(a)
    before = rt.run(X)["logits"]
    rt.switch("a")
    merged = merge_weights(base, [(a, 1.0)])
    np.testing.assert_allclose(rt.run(X)["logits"], _reference(path, info, merged), rtol=1e-5, atol=1e-5)
    rt.switch(None)
    np.testing.assert_array_equal(rt.run(X)["logits"], before)  # undo is bit-exact


def _reference(path, info, merged):
    out = path.with_name("merged.tflite")
    _tiny_tflite.write_merged(path, info, merged, out)
    with Runtime(out, backend="tflite", strategy="builtin", verify=False) as ref:
        return ref.run(X)["logits"]


def test_hybrid_without_xnnpack_is_one_built_in_interpreter(tmp_path):
    path = tmp_path / "m.tflite"
    info = _tiny_tflite.make_mlp(path)
    with Runtime(path, backend="tflite", strategy="hybrid", providers=["CPU"]) as rt:
        assert rt.strategy == "builtin" and rt.providers == ["CPU"]
        assert "providers=['CPU']" in rt.backend.strategy_reason
        assert list(rt.backend.interpreter_threads) == ["builtin"] and rt.backend._rebuilder is None
        _switch_is_exact(rt, path, info)


def test_other_strategies_run_as_asked(tmp_path):
    path = tmp_path / "m.tflite"
    _tiny_tflite.make_mlp(path)
    for strategy in ("rebuild", "builtin"):
        with Runtime(path, backend="tflite", strategy=strategy) as rt:
            assert rt.strategy == strategy and rt.backend.strategy_reason is None


def test_session_returns_every_output_asked_in_order(tmp_path):
    path = tmp_path / "m.tflite"
    _tiny_tflite.make_mlp(path)
    with Runtime(path, backend="tflite", strategy="hybrid") as rt:
        out = rt.run({"x": X})
        assert list(out) == ["logits"] and out["logits"].shape == (1, 2)
        # the per-call loop hands back a fresh array each call, not a view of the interpreter's buffer
        again = rt.run({"x": 2 * X})["logits"]
        assert not np.array_equal(out["logits"], again)
