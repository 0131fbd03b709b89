"""Leftovers of the device-side audits: each test failed before its fix."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
from _tiny import make_mlp

from edge.errors import ConfigError
from edge.runtime import Runtime


def test_a_load_that_shrank_the_process_reports_no_measured_footprint(tmp_path, monkeypatch):
    """A second load in one process reuses freed pages: RSS can fall while it loads (-1.43 MB was seen)."""
    import runtimes.base

    make_mlp(tmp_path / "m.onnx")
    readings = iter([500.0, 498.57])  # before the load, after it
    monkeypatch.setattr(runtimes.base, "rss_mb", lambda: next(readings, 498.57))
    with Runtime(tmp_path / "m.onnx", strategy="bound") as rt:
        assert rt.footprint["measured_mb"] is None
    readings = iter([500.0, 503.25])
    with Runtime(tmp_path / "m.onnx", strategy="bound") as rt:
        assert rt.footprint["measured_mb"] == pytest.approx(3.25)


def test_more_threads_than_cores_is_logged_once_at_info(tmp_path, caplog):
    make_mlp(tmp_path / "m.onnx")
    many = (os.cpu_count() or 1) + 61  # a count no other test asks for: logged once per count per process
    with caplog.at_level(logging.INFO, logger="edge.machine"):
        for _ in range(2):
            Runtime(tmp_path / "m.onnx", threads=many).close()
    said = [r for r in caplog.records if r.name == "edge.machine" and f"threads={many}" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO
    assert f"{os.cpu_count()} cores" in said[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="edge.machine"):
        Runtime(tmp_path / "m.onnx", threads=1).close()
    assert not [r for r in caplog.records if r.name == "edge.machine"]


def test_litert_blames_the_input_for_ids_outside_the_embedding_table(embedding_tflite):
    """An id past a text encoder's table (MiniLM's: 30522 rows) is the caller's input, not a damaged model."""
    pytest.importorskip("ai_edge_litert")
    with Runtime(embedding_tflite, backend="tflite") as rt:
        feeds = {k: np.ones(8, np.int32) for k in rt.backend.input_specs}
        feeds["input_ids"][3] = 40_000
        with pytest.raises(ConfigError) as e:
            rt.run(feeds)
    msg = str(e.value)
    assert "input 'input_ids'" in msg and "1000 rows" in msg and "damaged" not in msg


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_float16_and_float64_taps_are_cast_to_float32_and_pooled(tmp_path, dtype):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from edge.route.taps import FEATURES, tap_model

    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes = [
        helper.make_node("Cast", ["x"], ["h"], to=elem),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Cast", ["r"], ["y"], to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes,
        "low",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 5, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 5, 8])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    tapped = tap_model(tmp_path / "m.onnx", tmp_path / "t.onnx", ["r"], mask=None, layout={"r": "channels-last"})
    assert tapped.width == 8
    x = np.random.default_rng(0).normal(size=(3, 5, 8)).astype(np.float32)
    out = ort.InferenceSession(str(tmp_path / "t.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    want = np.maximum(x.astype(dtype), 0).astype(np.float32).mean(1)
    tol = 1e-3 if dtype == np.float16 else 1e-6  # onnxruntime may run a float16 Relu in float32 (its CPU kernels)
    np.testing.assert_allclose(out[1], want, rtol=0, atol=tol)
    assert out[1].dtype == np.float32 and onnx.load(tmp_path / "t.onnx").graph.output[1].name == FEATURES


def test_a_float32_tap_gets_no_cast(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from edge.route.taps import tap_model

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "f32",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 5, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 5, 8])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    tap_model(tmp_path / "m.onnx", tmp_path / "t.onnx", ["y"], mask=None, layout={"y": "channels-last"})
    assert [n.op_type for n in onnx.load(tmp_path / "t.onnx").graph.node] == ["Relu", "ReduceMean"]
