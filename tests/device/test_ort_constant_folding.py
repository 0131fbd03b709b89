"""A weight that onnxruntime's constant folding computes with at session build (a MatMul of a constant table and
the weight, as Swin v2's continuous position bias MLP) is copied into the prepacked session, not handed over in
place: constant folding reads the graph's entry, which in place is a data-less stub (before: onnxruntime printed
an error, the runtime warned and copied every weight of the model from then on)."""

from __future__ import annotations

import logging

import _tiny
import numpy as np
from onnx import TensorProto, helper

from edge.format.modelinfo import TensorInfo
from edge.runtime import Runtime, merge_weights


def _model(path):
    rng = np.random.default_rng(0)
    table = rng.standard_normal((4, 6)).astype(np.float32)  # a constant input, as Swin v2's coordinate table
    stored = {
        "fc.weight": rng.standard_normal((6, 5)).astype(np.float32),
        "bias_mlp.weight": rng.standard_normal((6, 5)).astype(np.float32),
        "table": table,
    }
    nodes = [
        helper.make_node("MatMul", ["x", "fc.weight"], ["h"]),
        helper.make_node("MatMul", ["table", "bias_mlp.weight"], ["b4"]),  # all constant: folded at build
        helper.make_node("Constant", [], ["axes"], value=helper.make_tensor("axes.value", TensorProto.INT64, [1], [0])),
        helper.make_node("ReduceSum", ["b4", "axes"], ["b"], keepdims=0),
        helper.make_node("Add", ["h", "b"], ["y"]),
    ]
    tensors = {k: TensorInfo(k, (6, 5), transposed=False) for k in ("fc.weight", "bias_mlp.weight")}
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])]
    return _tiny.write_model(path, "folded", nodes, inputs, outputs, stored, tensors, None), stored


def test_a_weight_constant_folding_reads_is_copied_and_the_rest_still_shared(tmp_path, caplog):
    info, stored = _model(tmp_path / "m.onnx")
    x = np.random.default_rng(1).standard_normal((3, 6)).astype(np.float32)

    def expect(w):
        return x @ w["fc.weight"] + (stored["table"] @ w["bias_mlp.weight"]).sum(0)

    adapter = _tiny.random_adapter(info, seed=2, density=0.5, name="a")
    with caplog.at_level(logging.WARNING), Runtime(tmp_path / "m.onnx", strategy="hybrid") as rt:
        rt.wait_settled(30)
        assert rt.backend.shares_weights  # no failed in-place build, no fallback to copying everything
        assert "fc.weight" in rt.backend._shared and "bias_mlp.weight" not in rt.backend._shared
        np.testing.assert_allclose(rt.run({"x": x})["y"], expect(stored), rtol=1e-5, atol=1e-5)
        rt.load_adapter(adapter)
        rt.switch("a")
        rt.wait_settled(30)
        merged = merge_weights({k: stored[k] for k in info.tensors}, [(adapter, 1.0)])
        np.testing.assert_allclose(rt.run({"x": x})["y"], expect(merged), rtol=1e-5, atol=1e-5)
        rt.switch(None)
        rt.wait_settled(30)
        np.testing.assert_allclose(rt.run({"x": x})["y"], expect(stored), rtol=1e-5, atol=1e-5)
    assert not [r for r in caplog.records if "would not prepack" in r.getMessage()]
