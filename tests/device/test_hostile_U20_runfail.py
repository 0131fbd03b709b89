"""Runtime.run on a model whose inputs declare no shape (edge.run_errors): a wrong rank that fails one node
downstream, at an axis, is a shape problem; an index fed out of range is a value problem, even at the node reading
that input; a message matching neither names both. Before (K20), the first was worded as a value problem and the
second as a shape problem."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edge.convert.onnx_import import import_onnx  # noqa: E402
from edge.errors import ConfigError  # noqa: E402
from edge.run_errors import run_failure  # noqa: E402
from edge.runtime import Runtime  # noqa: E402

vi = helper.make_tensor_value_info
W = np.random.default_rng(1).standard_normal((8, 4)).astype(np.float32)


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    """y = Softmax(Relu(x @ w), axis=2) (made for x of [b, t, 8]); e = GatherElements(t, idx). x, idx: no shape."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Softmax", ["r"], ["y"], axis=2, name="softmax"),
        helper.make_node("GatherElements", ["t", "idx"], ["e"], name="gather_idx"),
    ]
    inits = [numpy_helper.from_array(W, "w"), numpy_helper.from_array(np.arange(3, dtype=np.float32), "t")]
    g = helper.make_graph(
        nodes,
        "g",
        [vi("x", TensorProto.FLOAT, None), vi("idx", TensorProto.INT64, None)],
        [vi("y", TensorProto.FLOAT, None), vi("e", TensorProto.FLOAT, None)],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    d = tmp_path_factory.mktemp("u20run")
    (d / "m.onnx").write_bytes(m.SerializeToString())
    import_onnx(d / "m.onnx", d / "o.onnx")
    with Runtime(d / "o.onnx") as r:
        yield r


def test_the_shapes_it_was_made_for_run(rt):
    out = rt.run({"x": np.zeros((1, 2, 8), np.float32), "idx": np.array([2])}, ["y", "e"])
    np.testing.assert_allclose(out["y"], np.full((1, 2, 4), 0.25, np.float32))
    assert out["e"].tolist() == [2.0]


def test_a_wrong_rank_failing_downstream_at_an_axis_is_a_shape_problem(rt):
    with pytest.raises(ConfigError) as e:
        rt.run({"x": np.zeros((2, 8), np.float32), "idx": np.array([0])}, ["y"])
    msg = str(e.value)
    assert msg.startswith("the model could not run these inputs (") and "IsAxisInRange" in msg
    assert "input(s) ['x', 'idx'] declare no shape in the model file" in msg and "feed the shapes" in msg
    assert "out of range for it" not in msg and "\n" not in msg


def test_an_index_fed_out_of_range_is_a_value_problem(rt):
    with pytest.raises(ConfigError) as e:
        rt.run({"x": np.zeros((1, 2, 8), np.float32), "idx": np.array([7])}, ["e"])
    msg = str(e.value)
    assert msg.startswith("onnxruntime failed running model 'm' in its GatherElements node 'gather_idx' (")
    assert "Out of range value in index tensor" in msg and "a value is out of range for it" in msg
    assert "(the node reads input(s) ['idx'] directly)" in msg and "feed the shapes" not in msg and "\n" not in msg


class Fail(Exception):
    pass


HEAD = (
    "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running {op} node. Name:'n' Status Message: "
)


@pytest.mark.parametrize(
    ("op", "status", "kind"),
    [
        ("Gather", "indices element out of data bounds, idx=7 must be within the inclusive range [-3,2]", "value"),
        ("GatherND", "invalid indice found, indice = 9", "value"),
        ("Softmax", "axis 2 is not in valid range [-2,1]", "shape"),
        ("Concat", "Ranks of input data are different, cannot concatenate them. expected rank: 3 got: 2", "shape"),
        ("Reshape", "The input tensor cannot be reshaped to the requested shape. Input shape:{2,8}", "shape"),
        ("Range", "delta in Range operator can not be zero!", "both"),
    ],
)
def test_the_wording_rule(op, status, kind):
    msg = str(run_failure(Fail(HEAD.format(op=op) + status), ["x"], "m", None))
    starts = {
        "value": f"onnxruntime failed running model 'm' in its {op} node 'n' (",
        "shape": "the model could not run these inputs (",
        "both": f"onnxruntime failed running model 'm' in its {op} node 'n' (",
    }
    assert msg.startswith(starts[kind]) and status[:30] in msg and "\n" not in msg
    assert ("a value is out of range for it" in msg) == (kind == "value")
    assert ("feed the shapes the model was made for" in msg) == (kind in ("shape", "both"))
    assert ("either a shape the model was not made for" in msg) == (kind == "both")
    assert ("or a value out of range for it" in msg) == (kind == "both")
