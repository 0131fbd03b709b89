"""torch dynamo's constant scaffolding (zero biases of bias-less convs, ``CastLike`` constants) rewritten at export
and at import (:mod:`edge.format.onnx_scaffold`): the graph onnxruntime runs folds BatchNorm into the convs, outputs
equal torch's, adapters switch and undo exactly, and the fingerprint is the weights' own."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge.format.onnx_scaffold import element_types, simplify

torch = pytest.importorskip("torch")
nn = torch.nn


def _block(ci: int, co: int, stride: int, groups: int = 1) -> nn.Module:
    return nn.Sequential(nn.Conv2d(ci, co, 3, stride, 1, groups=groups, bias=False), nn.BatchNorm2d(co), nn.ReLU6())


class _Net(nn.Module):
    """Bias-less convs each before a BatchNorm, depthwise ones among them, ReLU6 and Hardtanh (Clip), a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Sequential(
            _block(3, 8, 2), _block(8, 8, 1, 8), nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.Hardtanh(0, 6)
        )
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.f(x).mean((2, 3)))


def _net() -> nn.Module:
    torch.manual_seed(0)
    m = _Net().eval()
    for b in m.modules():
        if isinstance(b, nn.BatchNorm2d):  # statistics far from 0 and 1: a BatchNorm left out would show
            b.running_mean.uniform_(-1, 1)
            b.running_var.uniform_(0.5, 2)
            b.weight.data.uniform_(0.5, 2)
    return m


X = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from exporters.onnx import export_onnx

    m = _net()
    path = tmp_path_factory.mktemp("scaffold") / "cnn.onnx"
    export_onnx(m, (torch.from_numpy(X[:1]),), path, input_names=["x"], output_names=["logits"], name="cnn")
    return m, path


def test_export_leaves_no_scaffolding_and_onnxruntime_folds_every_batchnorm(exported, tmp_path):
    import onnxruntime as ort

    m, path = exported
    g = onnx.load(str(path)).graph
    ops = [n.op_type for n in g.node]
    assert not {"CastLike", "Expand", "Shape"} & set(ops)
    assert ops.count("Conv") == 3 and all(len(n.input) == 2 for n in g.node if n.op_type == "Conv")  # no bias
    assert {t.name for t in g.initializer} == {k for k, v in m.state_dict().items() if v.dtype.is_floating_point}
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    optimized = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert "BatchNormalization" not in optimized and "Expand" not in optimized  # was: 3 BatchNorms, 2 Expands


def test_exported_cnn_runs_as_torch_and_switches_exactly(exported):
    from edge import Runtime
    from lab.benchmarks import default_targets, random_shira

    m, path = exported
    with Runtime(path) as rt:
        np.testing.assert_allclose(rt.run({"x": X})["logits"], m(torch.from_numpy(X)).detach().numpy(), atol=1e-5)
        a = random_shira(rt.info, default_targets(rt.info), 0.05, seed=1, name="a", scale=0.5)
        before = {k: rt.weights(k) for k in a.tensors}
        rt.wait_settled()  # hybrid: the prepacked session (BatchNorm folded into the convs) from here on
        base_out = rt.run({"x": X})["logits"]
        rt.load_adapter(a)
        rt.switch("a")
        assert any(not np.array_equal(rt.weights(k), before[k]) for k in a.tensors)
        assert not np.array_equal(rt.run({"x": X})["logits"], base_out)
        rt.switch(None)
        rt.wait_settled()  # the bound session between switches runs BatchNorm unfolded: other rounding
        assert all(np.array_equal(rt.weights(k), before[k]) for k in a.tensors)
        assert np.array_equal(rt.run({"x": X})["logits"], base_out)


def test_import_of_a_raw_dynamo_export_drops_the_scaffolding(tmp_path):
    import onnxruntime as ort

    from edge.convert.onnx_import import import_onnx

    m, raw, out = _net(), tmp_path / "raw.onnx", tmp_path / "edge.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (torch.from_numpy(X[:1]),), str(raw), input_names=["x"], dynamo=True, optimize=False)
    assert "CastLike" in {n.op_type for n in onnx.load(str(raw)).graph.node}  # what the exporter writes
    report = import_onnx(raw, out)
    done = report.info.extra["imported"]["scaffolding"]
    assert done["zero_bias_dropped"] == 3 and done["castlike_folded"] >= 3
    assert "CastLike" not in {n.op_type for n in onnx.load(str(out)).graph.node}
    run = {p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (raw, out)}
    y_raw, y_out = (run[p].run(None, {"x": X[:1]})[0] for p in (raw, out))
    np.testing.assert_allclose(y_out, y_raw, atol=1e-6)


# -- the rewrite itself, on hand-built graphs ---------------------------------------------------------------------


def _graph(nodes, inputs, outputs, inits=(), value_info=()):
    return helper.make_graph(nodes, "g", inputs, outputs, list(inits), value_info=list(value_info))


def _vi(name: str, elem: int, shape=(1, 2, 4, 4)):
    return helper.make_tensor_value_info(name, elem, list(shape))


def _const(name: str, value: np.ndarray):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name))


def test_castlike_takes_the_activations_type_and_unknown_types_are_left():
    nodes = [
        _const("c", np.array(6.0, np.float32)),
        helper.make_node("CastLike", ["c", "x"], ["c16"]),  # x is float16: the constant becomes float16
        helper.make_node("CastLike", ["c", "u"], ["cu"]),  # u's type is unknown: left as it is
        helper.make_node("Clip", ["x", "", "c16"], ["y"]),
        helper.make_node("Add", ["u", "cu"], ["z"]),
    ]
    g = _graph(nodes, [_vi("x", TensorProto.FLOAT16), helper.make_tensor_value_info("u", 0, None)], [])
    g.output.extend([_vi("y", TensorProto.FLOAT16), helper.make_tensor_value_info("z", 0, None)])
    assert element_types(g)["y"] == TensorProto.FLOAT16
    assert simplify(g)["castlike_folded"] == 1
    by_out = {n.output[0]: n for n in g.node}
    assert by_out["c16"].op_type == "Constant" and by_out["cu"].op_type == "CastLike"
    v = numpy_helper.to_array(by_out["c16"].attribute[0].t)
    assert v.dtype == np.float16 and v == 6.0


def test_only_torchs_zero_bias_is_dropped():
    w = numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w")
    zero_param = numpy_helper.from_array(np.zeros(2, np.float32), "b0")  # a parameter (maybe a target): kept
    nodes = [
        _const("zero", np.array(0.0, np.float32)),
        _const("half", np.array(0.5, np.float32)),
        _const("one", np.array([1], np.int64)),
        _const("eight", np.array([8], np.int64)),
        helper.make_node("Shape", ["w"], ["wd"], start=0, end=1),
        helper.make_node("Expand", ["wd", "one"], ["wd1"]),
        helper.make_node("CastLike", ["zero", "x"], ["zx"]),
        helper.make_node("Expand", ["zx", "wd1"], ["zb"]),  # torch dynamo's zero bias: dropped
        helper.make_node("Expand", ["half", "wd1"], ["hb"]),  # not zero: kept
        helper.make_node("Expand", ["zero", "eight"], ["wrong"]),  # zero, but 8 wide for 2 channels: kept (refused)
        helper.make_node("Conv", ["x", "w", "zb"], ["y1"]),
        helper.make_node("Conv", ["x", "w", "hb"], ["y2"]),
        helper.make_node("Conv", ["x", "w", "b0"], ["y3"]),
        helper.make_node("Conv", ["x", "w", "wrong"], ["y4"]),
    ]
    outs = [_vi(o, TensorProto.FLOAT) for o in ("y1", "y2", "y3", "y4")]
    g = _graph(nodes, [_vi("x", TensorProto.FLOAT)], outs, [w, zero_param])
    g.value_info.append(_vi("zb", TensorProto.FLOAT, (2,)))
    done = simplify(g)
    assert done == {"castlike_folded": 1, "zero_bias_dropped": 1, "nodes_removed": 2}  # zb's Expand and its zero
    convs = {n.output[0]: list(n.input) for n in g.node if n.op_type == "Conv"}
    assert convs == {"y1": ["x", "w"], "y2": ["x", "w", "hb"], "y3": ["x", "w", "b0"], "y4": ["x", "w", "wrong"]}
    assert "zb" not in {v.name for v in g.value_info}  # no stale shape of a value nothing makes


def test_a_value_a_subgraph_reads_is_kept():
    then = helper.make_graph([helper.make_node("Identity", ["k"], ["t"])], "then", [], [_vi("t", TensorProto.FLOAT)])
    nodes = [
        _const("zero", np.array(0.0, np.float32)),
        _const("two", np.array([2], np.int64)),
        helper.make_node("Expand", ["zero", "two"], ["zb"]),
        helper.make_node("Conv", ["x", "w", "zb"], ["y"]),
        _const("k", np.array([1.0, 2.0], np.float32)),  # read only inside the If's branch
        helper.make_node("If", ["cond"], ["r"], then_branch=then, else_branch=then),
    ]
    g = _graph(
        nodes,
        [_vi("x", TensorProto.FLOAT), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [_vi("y", TensorProto.FLOAT), _vi("r", TensorProto.FLOAT, (2,))],
        [numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w")],
    )
    simplify(g)
    assert "k" in {n.output[0] for n in g.node}
