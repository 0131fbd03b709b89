"""``edge bench memory``: every contestant in a fresh child, above a baseline child that did the same bench work."""

from __future__ import annotations

import _tiny
import numpy as np

from lab.bench_memory import GOALS, bench_memory, markdown

X = {"x": np.random.default_rng(0).standard_normal((1, 10)).astype(np.float32)}


def test_each_strategy_and_the_plain_session_measured_in_fresh_children(tmp_path):
    _tiny.make_mlp(tmp_path / "m.onnx", seed=3)
    r = bench_memory(tmp_path / "m.onnx", X, repeat=1, progress=False)
    assert set(r["strategies"]) == {"hybrid", "bound", "rebuild"} and r["model"] == "tiny-mlp"
    assert r["baseline_rss_mb"] > 0 and r["params"] == 10 * 20 + 20 + 20 * 2 + 2  # weights and biases
    for name, f in [("plain", r["plain"]), *r["strategies"].items()]:
        assert f["peak_mb"] >= f["rss_mb"] and f["settled_ms"] >= f["ready_ms"] > 0, name
    for name, f in r["strategies"].items():
        assert f["strategy"] == name and f["predicted_mb"] > 0
    assert r["goals"]["bound_rss_x"]["limit"] == GOALS["bound_rss_x"]
    assert r["goals"]["bound_rss_x"]["value"] == round(r["strategies"]["bound"]["rss_mb"] / r["plain"]["rss_mb"], 3)
    md = markdown(r)
    assert "| plain session |" in md and "| hybrid |" in md and "| bound_rss_x |" in md
