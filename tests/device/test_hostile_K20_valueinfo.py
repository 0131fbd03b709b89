"""The light copy edge.convert.onnx_valueinfo runs shape inference on: big Constant nodes are typed inputs there, as big
initializers are (before, a model whose weights sit in Constant nodes was copied whole: twice its memory), and the
types inferred are the same as on the whole model."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import edge.convert.onnx_valueinfo as valueinfo  # noqa: E402

vi = helper.make_tensor_value_info


def model(big: int = 256):
    """x[n,64] @ W (a Constant of [64, big]) + b (a small Constant) -> Relu; W16 a big float16 Constant, cast."""
    rng = np.random.default_rng(7)
    w = numpy_helper.from_array(rng.standard_normal((64, big)).astype(np.float32), "W")
    w16 = numpy_helper.from_array(rng.standard_normal((big, 8)).astype(np.float16), "W16")
    nodes = [
        helper.make_node("Constant", [], ["w"], value=w),
        helper.make_node("Constant", [], ["b"], value=numpy_helper.from_array(np.ones(big, np.float32), "b")),
        helper.make_node("Constant", [], ["w16"], value=w16),
        helper.make_node("Constant", [], ["shape"], value_ints=[-1, big]),
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Add", ["h", "b"], ["hb"]),
        helper.make_node("Reshape", ["hb", "shape"], ["r"]),
        helper.make_node("Cast", ["w16"], ["w32"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["r", "w32"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [vi("x", TensorProto.FLOAT, ["n", 64])], [vi("y", TensorProto.FLOAT, None)])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_big_constants_are_typed_inputs_of_the_light_copy_and_the_types_are_the_same(monkeypatch):
    proto = model()
    whole = onnx.shape_inference.infer_shapes(proto)
    want = {v.name: v.type.SerializeToString() for v in whole.graph.value_info}
    seen = []
    infer = onnx.shape_inference.infer_shapes

    def spy(m, *a, **k):
        seen.append(m)
        return infer(m, *a, **k)

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", spy)
    got = valueinfo._inferred_types(proto)
    assert {k: v.SerializeToString() for k, v in got.items()} == want
    assert {"h", "hb", "r", "w32", "w", "w16"} <= set(got)
    light = seen[0]
    assert proto.ByteSize() > 70_000 and light.ByteSize() < 3_000  # W (64 KB) and W16 (4 KB) left out
    assert {n.output[0] for n in light.graph.node if n.op_type == "Constant"} == {"b", "shape"}  # 256 elements: kept
    typed = {
        v.name: (v.type.tensor_type.elem_type, [d.dim_value for d in v.type.tensor_type.shape.dim])
        for v in light.graph.input
    }
    assert typed["w"] == (TensorProto.FLOAT, [64, 256]) and typed["w16"] == (TensorProto.FLOAT16, [256, 8])


def test_stale_value_info_is_still_dropped_with_constant_weights():
    proto = model()
    wrong = [vi("h", TensorProto.FLOAT, ["n", 999]), vi("w", TensorProto.FLOAT16, [64, 256])]  # (a big Constant's)
    proto.graph.value_info.extend(
        [*wrong, vi("w32", TensorProto.FLOAT, [256, 8]), vi("w16", TensorProto.FLOAT16, None)]
    )
    assert valueinfo.drop_stale_value_info(proto) == 2
    assert [v.name for v in proto.graph.value_info] == ["w32", "w16"]
