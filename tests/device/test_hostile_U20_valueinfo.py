"""The light copy edge.convert.onnx_valueinfo runs shape inference on holds no large tensor of If/Loop bodies or local
functions either (before, a node holding a body was copied whole and inference copied it again: a 797-byte file
with a 256 MB sparse Constant in an If body peaked at 1.6 GB), and the main graph's inferred types are the same as
the whole model's."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import edge.convert.onnx_valueinfo as valueinfo  # noqa: E402

vi = helper.make_tensor_value_info
rng = np.random.default_rng(20)
BIG = (6, 2000)  # 12,000 elements: over _SMALL, 48 KB


def big(name):
    return numpy_helper.from_array(rng.standard_normal(BIG).astype(np.float32), name)


def model():
    """x[n,8] @ w -> h[n,6]; If: then h @ Constant[6,2000], else a nested If (then h @ a body initializer, else
    h @ a small Constant broadcast); a Loop whose body returns its own big initializer; an unused local function
    holding a big Constant."""
    inner_then = helper.make_graph(
        [helper.make_node("MatMul", ["h", "bw"], ["o_it"])],
        "it",
        [],
        [vi("o_it", TensorProto.FLOAT, None)],
        [big("bw")],
    )
    small = numpy_helper.from_array(np.ones((6, 1), np.float32), "")
    inner_else = helper.make_graph(
        [helper.make_node("Constant", [], ["c_ie"], value=small), helper.make_node("MatMul", ["h", "c_ie"], ["o_ie"])],
        "ie",
        [],
        [vi("o_ie", TensorProto.FLOAT, None)],
    )
    then = helper.make_graph(
        [helper.make_node("Constant", [], ["c_t"], value=big("")), helper.make_node("MatMul", ["h", "c_t"], ["o_t"])],
        "t",
        [],
        [vi("o_t", TensorProto.FLOAT, None)],
    )
    other = helper.make_graph(
        [helper.make_node("If", ["cond"], ["o_e"], then_branch=inner_then, else_branch=inner_else)],
        "e",
        [],
        [vi("o_e", TensorProto.FLOAT, None)],
    )
    body = helper.make_graph(
        [helper.make_node("Identity", ["c_in"], ["c_out"]), helper.make_node("Identity", ["lw"], ["scan"])],
        "body",
        [vi("i", TensorProto.INT64, []), vi("c_in", TensorProto.BOOL, [])],
        [vi("c_out", TensorProto.BOOL, []), vi("scan", TensorProto.FLOAT, None)],
        [big("lw")],
    )
    c = numpy_helper.from_array
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Constant", [], ["cond"], value=c(np.array(True), "")),
        helper.make_node("Constant", [], ["trips"], value=c(np.array(2, np.int64), "")),
        helper.make_node("If", ["cond"], ["b"], then_branch=then, else_branch=other),
        helper.make_node("Relu", ["b"], ["y"]),
        helper.make_node("Loop", ["trips", "cond"], ["loop"], body=body),
        helper.make_node("Relu", ["loop"], ["z"]),
    ]
    w = c(rng.standard_normal((8, 6)).astype(np.float32), "w")
    graph = helper.make_graph(
        nodes, "g", [vi("x", TensorProto.FLOAT, ["n", 8])], [vi(o, TensorProto.FLOAT, None) for o in ("y", "z")], [w]
    )
    unused = helper.make_function(
        "local",
        "F",
        ["a"],
        ["f"],
        [helper.make_node("Constant", [], ["fc"], value=big("")), helper.make_node("Add", ["a", "fc"], ["f"])],
        [helper.make_opsetid("", 17)],
    )
    m = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)], functions=[unused]
    )
    m.ir_version = 8
    return m


def _types(values) -> dict:
    return {v.name: v.type.SerializeToString() for v in values}


def test_bodies_hold_no_large_tensor_and_the_types_are_the_whole_models(monkeypatch):
    proto = model()
    want = _types(onnx.shape_inference.infer_shapes(proto).graph.value_info)
    seen = []
    infer = onnx.shape_inference.infer_shapes

    def spy(m, *a, **k):
        seen.append(m)
        return infer(m, *a, **k)

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", spy)
    got = valueinfo._inferred_types(proto)
    assert {k: v.SerializeToString() for k, v in got.items()} == want
    assert {"h", "b", "loop"} <= set(got)
    b = got["b"].tensor_type
    assert b.elem_type == TensorProto.FLOAT and len(b.shape.dim) == 2 and b.shape.dim[0].dim_param == "n"
    assert [d.dim_value for d in got["loop"].tensor_type.shape.dim][1:] == list(BIG)
    assert proto.ByteSize() > 4 * 48_000 and seen[0].ByteSize() < 6_000  # four 48 KB tensors left out
    light = seen[0]
    if_node = next(n for n in light.graph.node if n.op_type == "If")
    c_t = next(a.g for a in if_node.attribute if a.name == "then_branch").node[0].attribute[0].t
    assert list(c_t.dims) == list(BIG) and c_t.data_type == TensorProto.FLOAT and not c_t.raw_data
    inner = next(a.g for a in if_node.attribute if a.name == "else_branch").node[0]
    bw = next(a.g for a in inner.attribute if a.name == "then_branch").initializer[0]
    assert (bw.name, list(bw.dims), bw.raw_data) == ("bw", list(BIG), b"")
    assert list(light.functions[0].node[0].attribute[0].t.dims) == list(BIG)


def test_stale_value_info_is_dropped_and_right_entries_kept_with_big_bodies():
    proto = model()
    proto.graph.value_info.extend(
        [
            vi("h", TensorProto.FLOAT, ["n", 999]),
            vi("b", TensorProto.FLOAT16, None),
            vi("loop", TensorProto.FLOAT, None),
        ]
    )
    assert valueinfo.drop_stale_value_info(proto) == 2
    assert [v.name for v in proto.graph.value_info] == ["loop"]
    if_node = next(n for n in proto.graph.node if n.op_type == "If")
    then = next(a.g for a in if_node.attribute if a.name == "then_branch")
    assert len(then.node[0].attribute[0].t.raw_data) == 48_000  # the model itself untouched


def test_small_tensors_are_copied_as_they_are():
    t = numpy_helper.from_array(np.arange(6, dtype=np.int64), "s")
    out = TensorProto()
    valueinfo._light_tensor(t, out)
    assert out == t
    s = helper.make_tensor("txt", TensorProto.STRING, [1], [b"x" * 100_000])  # one element, 100 KB: left out
    out = TensorProto()
    valueinfo._light_tensor(s, out)
    assert (out.name, list(out.dims), len(out.string_data)) == ("txt", [1], 0)
