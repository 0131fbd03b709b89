"""``edge update --taps NAME --tap-layout NAME=LAYOUT``: the command-line twin of ``tap_model(..., layout=)`` for a
tap whose layout the graph does not tell (a ``[B, 4, 6]`` tensor nothing but a Relu makes and a Flatten reads).
Without the flag the refusal names the flag; with it the features are pooled over the axis it says."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge.cli import main
from edge.convert.onnx_import import import_onnx
from edge.route.taps import FEATURES, tap_model
from edge.runtime import Runtime


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """x [B, 4, 6] -> Relu -> h -> Flatten -> MatMul W [24, 3] + b -> logits: h's layout is nobody's word."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((24, 3)).astype(np.float32), "fc.weight")
    b = numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "fc.bias")
    nodes = [
        helper.make_node("Relu", ["x"], ["h"], name="relu"),
        helper.make_node("Flatten", ["h"], ["flat"], name="flatten", axis=1),
        helper.make_node("MatMul", ["flat", "fc.weight"], ["mm"], name="fc"),
        helper.make_node("Add", ["mm", "fc.bias"], ["logits"], name="fc_bias"),
    ]
    graph = helper.make_graph(
        nodes,
        "seq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        [w, b],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    folder = tmp_path_factory.mktemp("taplayout")
    onnx.save(proto, folder / "foreign.onnx")
    import_onnx(folder / "foreign.onnx", folder / "seq.onnx")
    x = rng.standard_normal((12, 4, 6)).astype(np.float32)
    np.savez(folder / "d.npz", x=x, y=np.arange(12) % 3)
    return folder


def _update(folder, *extra):
    args = ["update", "--model", str(folder / "seq.onnx"), "--data", str(folder / "d.npz"), "--method", "ncm"]
    return main([*args, *extra])


def test_a_tap_whose_layout_the_graph_does_not_tell_is_refused_naming_the_flag(model, capsys):
    assert _update(model, "--taps", "h") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'h'" in err, err
    assert "--tap-layout TENSOR=channels-first|channels-last" in err, err


@pytest.mark.parametrize(("layout", "axis"), [("channels-last", 1), ("channels-first", 2)])
def test_the_flag_says_which_axis_is_pooled(model, layout, axis, capsys, tmp_path):
    assert _update(model, "--taps", "h", "--tap-layout", f"h={layout}", "--json", str(tmp_path / "r.json")) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["samples_seen"] == 12 and sorted(report["classes"]) == [0, 1, 2], report
    # the same pooling as the Python API's layout=, checked against numpy on the features the runtime returns
    tapped = tap_model(model / "seq.onnx", tmp_path / "t.onnx", ["h"], layout={"h": layout})
    x = np.load(model / "d.npz")["x"]
    with Runtime(tapped.path) as rt:
        feats = rt.run({"x": x}, [FEATURES])[FEATURES]
    assert feats.shape == (12, 6 if axis == 1 else 4)
    np.testing.assert_allclose(feats, np.maximum(x, 0).mean(axis=axis), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (["--tap-layout", "h=channels-last"], "needs --taps"),
        (["--taps", "h", "--tap-layout", "h"], "must look like TENSOR=channels-first"),
        (["--taps", "h", "--tap-layout", "h=sideways"], "expected one of"),
        (["--taps", "h", "--tap-layout", "nothere=channels-last"], "not a tap"),
    ],
)
def test_a_wrong_tap_layout_exits_2_in_one_line(model, extra, said, capsys):
    assert _update(model, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and said in err, err
