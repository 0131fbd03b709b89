"""Stale ``graph.value_info`` in an imported ONNX file: entries that no longer describe the graph are dropped.

Measured before (onnxruntime 1.32, onnx 1.20): an entry giving a node output another element type failed the
session's load of the imported file; one giving it another shape loaded (onnxruntime warned "Falling back to
lenient merge") but :func:`edge.route.tapshapes.tensor_shapes` returned the stale shape (``h`` as ``[n, 99]``: a
tap sized wrong); one repeating an initializer with another shape made the tap shape inference fail; one naming a
value the graph does not make was kept. The import now drops all of those (said in ``extra['imported']``) and
keeps the entries that agree with onnx's inference, or that it cannot check.
"""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edge.convert.onnx_import import import_onnx  # noqa: E402
from edge.errors import FormatError  # noqa: E402
from edge.route.tapshapes import tensor_shapes  # noqa: E402
from edge.runtime import Runtime  # noqa: E402

RNG = np.random.default_rng(19)
W1 = RNG.standard_normal((8, 6)).astype(np.float32)
W2 = RNG.standard_normal((6, 3)).astype(np.float32)
vi = helper.make_tensor_value_info


def mlp(*entries) -> onnx.ModelProto:
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    inits = [numpy_helper.from_array(W1, "w1"), numpy_helper.from_array(W2, "w2")]
    graph = helper.make_graph(nodes, "g", [vi("x", 1, ["n", 8])], [vi("y", 1, ["n", 3])], inits, value_info=entries)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


STALE = {
    "ghost": vi("ghost", TensorProto.FLOAT, [5]),
    "wrong shape": vi("h", TensorProto.FLOAT, ["n", 99]),
    "wrong rank": vi("h", TensorProto.FLOAT, [1, 2, 3]),
    "wrong element type": vi("h", TensorProto.INT64, ["n", 6]),
    "initializer of another shape": vi("w2", TensorProto.FLOAT, [7, 7]),
    "graph output repeated": vi("y", TensorProto.FLOAT, ["n", 4]),
}


@pytest.mark.parametrize("case", STALE, ids=list(STALE))
def test_a_stale_entry_is_dropped_and_the_file_loads_with_true_shapes(tmp_path, case):
    good = vi("r", TensorProto.FLOAT, ["n", 6])  # agrees with inference: kept
    onnx.save(mlp(STALE[case], good), tmp_path / "m.onnx")
    report = import_onnx(tmp_path / "m.onnx", tmp_path / "o.onnx")
    assert report.info.extra["imported"]["value_info_dropped"] == 1
    written = onnx.load(tmp_path / "o.onnx")
    assert [v.name for v in written.graph.value_info] == ["r"]
    assert tensor_shapes(written)["h"] == ("n", 6) and tensor_shapes(written)["r"] == ("n", 6)
    x = RNG.standard_normal((2, 8)).astype(np.float32)
    with Runtime(tmp_path / "o.onnx") as rt:
        np.testing.assert_allclose(rt.run({"x": x})["y"], np.maximum(x @ W1, 0) @ W2, rtol=1e-5, atol=1e-5)


def test_what_the_stale_entries_did_before():
    """The effects the import now removes, on the files as given."""
    x = {"x": np.ones((2, 8), np.float32)}
    with pytest.raises(Exception, match="does not match expected type"):  # noqa: B017 (onnxruntime's own class)
        ort.InferenceSession(mlp(STALE["wrong element type"]).SerializeToString(), providers=["CPUExecutionProvider"])
    options = ort.SessionOptions()
    options.log_severity_level = 3
    wrong = mlp(STALE["wrong shape"])
    assert ort.InferenceSession(wrong.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, x)
    assert tensor_shapes(wrong)["h"] == ("n", 99)
    with pytest.raises(FormatError, match="shape inference failed"):
        tensor_shapes(mlp(STALE["initializer of another shape"]))


def test_entries_inference_cannot_check_are_kept(tmp_path):
    """After an onnxruntime fused op (FusedMatMul, domain com.microsoft) onnx's inference knows no shape: the file's
    entries there are all the router's tap shapes have, and are kept."""
    model = mlp(vi("h", TensorProto.FLOAT, ["n", 6]), vi("r", TensorProto.FLOAT, ["n", 6]))
    model.graph.node[0].CopyFrom(helper.make_node("FusedMatMul", ["x", "w1"], ["h"], domain="com.microsoft"))
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, tmp_path / "m.onnx")
    report = import_onnx(tmp_path / "m.onnx", tmp_path / "o.onnx")
    assert "value_info_dropped" not in report.info.extra["imported"] and sorted(report.info.tensors) == ["w1", "w2"]
    assert [v.name for v in onnx.load(tmp_path / "o.onnx").graph.value_info] == ["h", "r"]
