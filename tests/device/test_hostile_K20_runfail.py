"""Runtime.run on a model with inputs that declare no shape: an onnxruntime ``Fail`` is said as a shape problem of
those inputs only when it plausibly is one (its message speaks of shapes or dimensions, or the failing node reads
such an input); otherwise onnxruntime's first line, the model and what to check. Before, every ``Fail`` (an index
computed from the values, out of range) was worded as a shape problem."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edge.convert.onnx_import import import_onnx  # noqa: E402
from edge.errors import ConfigError, EdgeError  # noqa: E402
from edge.runtime import Runtime  # noqa: E402

vi = helper.make_tensor_value_info
W = np.random.default_rng(3).standard_normal((8, 6)).astype(np.float32)


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    """y = x @ w; g = GatherElements(t, sum(x) as an index); e = GatherElements(t, idx). x and idx: no shape."""
    c = numpy_helper.from_array
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=1, name="sum"),
        helper.make_node("Cast", ["s"], ["s64"], to=TensorProto.INT64, name="cast"),
        helper.make_node("Reshape", ["s64", "one"], ["k"], name="flat"),
        helper.make_node("GatherElements", ["t", "k"], ["g"], name="gather_sum"),
        helper.make_node("GatherElements", ["t", "idx"], ["e"], name="gather_idx"),
    ]
    inits = [c(W, "w"), c(np.arange(3, dtype=np.float32), "t"), c(np.array([1], np.int64), "one")]
    inputs = [vi("x", TensorProto.FLOAT, None), vi("idx", TensorProto.INT64, None)]
    outputs = [vi(o, TensorProto.FLOAT, None) for o in ("y", "g", "e")]
    model = helper.make_model(
        helper.make_graph(nodes, "g", inputs, outputs, inits), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    d = tmp_path_factory.mktemp("k20run")
    (d / "m.onnx").write_bytes(model.SerializeToString())
    import_onnx(d / "m.onnx", d / "o.onnx")
    with Runtime(d / "o.onnx") as r:
        yield r


def feeds(x_shape=(2, 8), x_value=0.0, idx=(0,)):
    return {"x": np.full(x_shape, x_value, np.float32), "idx": np.array(idx, np.int64)}


def test_the_model_runs_what_it_was_made_for(rt):
    out = rt.run(feeds(x_value=0.125), ["y", "g", "e"])  # sum of 16 eighths: index 2
    np.testing.assert_allclose(out["y"], np.full((2, 8), 0.125, np.float32) @ W, rtol=1e-6)
    assert out["g"].tolist() == [2.0] and out["e"].tolist() == [0.0]


def test_a_shape_refused_by_a_kernel_is_a_shape_problem_of_the_shapeless_inputs(rt):
    with pytest.raises(ConfigError) as e:
        rt.run(feeds(x_shape=(2, 5)), ["y"])
    msg = str(e.value)
    assert msg.startswith("the model could not run these inputs (") and "MatMul dimension mismatch" in msg
    assert "input(s) ['x', 'idx'] declare no shape in the model file" in msg and "feed the shapes" in msg
    assert "\n" not in msg


def test_a_failure_of_a_node_that_reads_no_shapeless_input_is_onnxruntimes_own(rt):
    """An index computed from x's values (16 x 1.0 = 16, of 3 entries): no shape problem, not worded as one."""
    with pytest.raises(ConfigError) as e:
        rt.run(feeds(x_value=1.0), ["g"])
    msg = str(e.value)
    assert msg.startswith("onnxruntime failed running model 'm' in its GatherElements node 'gather_sum' (")
    assert "Out of range value in index tensor" in msg and "declare no shape" not in msg
    assert "check the values fed" in msg and "\n" not in msg and isinstance(e.value, EdgeError)


def test_an_index_fed_out_of_range_is_a_value_problem_said_with_that_input(rt):
    """(U20: worded as a shape problem before, since the node reads the shapeless input idx)"""
    with pytest.raises(ConfigError) as e:
        rt.run(feeds(idx=(7,)), ["e"])
    msg = str(e.value)
    assert "Out of range value in index tensor" in msg and "declare no shape" not in msg
    assert "a value is out of range for it" in msg and "(the node reads input(s) ['idx'] directly)" in msg


def test_the_wording_rule_alone():
    from edge.run_errors import run_failure

    class Fail(Exception):
        pass

    def said(text, path=None):
        return str(run_failure(Fail(text), ["x"], "m", path))

    head = "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Add node. Name:'add' "
    assert said(head + "Status Message: Attempting to broadcast an axis by a dimension other than 1. 2 by 5")[:34] == (
        "the model could not run these inpu"
    )
    assert said(head + "Status Message: common.h:31 IsAxisInRange(axis, tensor_rank) was false.").startswith(
        "the model could not run these inputs ([ONNXRuntimeError]"
    )  # (U20: an axis out of a rank's range is a shape problem, a 2-D feed to a model made for 3-D)
    assert said("something else entirely").startswith("onnxruntime failed running model 'm' (something")
