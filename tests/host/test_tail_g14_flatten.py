"""The device trainer's tail past a flatten whose shape is computed at run time (1-D and 2-D CNNs).

torch's exporters write ``flatten(1)`` / ``view(x.size(0), -1)`` of a dynamic batch as a ``Reshape`` to
``Concat(<dimension 0 read by Shape>, [k])``: dynamo from ``Shape(x, start=0, end=1)`` of the model input,
TorchScript from ``Gather(Shape(h), 0)`` of the flattened tensor. The walk goes past it when the graph proves the
batch axis is kept (the same tensor, or the same dimension symbol), and still stops at any other computed shape.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from edge.convert.onnx_import import make_adapter_ready  # noqa: E402
from edge.errors import ConfigError  # noqa: E402
from edge.format.modelinfo import onnx_info  # noqa: E402
from edge.learn.device_trainer import DeviceTrainer  # noqa: E402
from edge.learn.space import Arch  # noqa: E402
from edge.learn.tail import find_tail  # noqa: E402

CLASSES = 3


class CNN(nn.Module):
    """A 3-tap conv (+ BatchNorm), ReLU, a 1x1 conv ``proj``, ReLU, average pooling, a flatten, ``head``."""

    def __init__(self, dims: int, flatten: str, bn: bool):
        super().__init__()
        conv, norm = (nn.Conv1d, nn.BatchNorm1d) if dims == 1 else (nn.Conv2d, nn.BatchNorm2d)
        self.c, self.bn = conv(4, 12, 3, padding=1), norm(12) if bn else nn.Identity()
        self.proj = conv(12, 16, 1)
        self.pool = nn.AdaptiveAvgPool1d(1) if dims == 1 else nn.AdaptiveAvgPool2d(1)
        self.head, self.flatten = nn.Linear(16, CLASSES), flatten

    def forward(self, x):
        h = self.pool(torch.relu(self.proj(torch.relu(self.bn(self.c(x))))))
        if self.flatten == "view":
            return self.head(h.view(x.size(0), -1))
        if self.flatten == "view-self":
            return self.head(h.view(h.size(0), -1))
        return self.head(h.flatten(1))


def _export(tmp_path, dims: int, flatten: str, exporter: str):
    torch.manual_seed(dims)
    m = CNN(dims, flatten, bn=exporter == "dynamo").eval()  # TorchScript folds a BatchNorm into the conv's weight
    if exporter == "dynamo":
        with torch.no_grad():  # statistics of its own, so the BatchNorm is not an identity
            m.bn.running_mean.uniform_(-0.5, 0.5)
            m.bn.running_var.uniform_(0.5, 2.0)
    x = np.random.default_rng(dims).standard_normal((6, 4, *(10,) * dims)).astype(np.float32)
    path = tmp_path / f"cnn{dims}-{flatten}-{exporter}.onnx"
    if exporter == "dynamo":
        from exporters.onnx import export_onnx

        export_onnx(m, (torch.from_numpy(x[:2]),), path, input_names=["x"], output_names=["logits"], name="cnn",
                    progress=False)  # fmt: skip
    else:
        f = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript's deprecation notice
            torch.onnx.export(m, (torch.from_numpy(x[:2]),), f, dynamo=False, input_names=["x"],
                              output_names=["logits"], dynamic_axes={"x": {0: "batch"}}, opset_version=17)  # fmt: skip
        proto = onnx.load_from_string(f.getvalue())
        state = {k: v.numpy() for k, v in m.state_dict().items()}
        make_adapter_ready(proto, params=state, name="cnn")  # the metadata `edge import-onnx` writes
        path.write_bytes(proto.SerializeToString())
    return path, x


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """``(dims, flatten, exporter) -> (path, x)``, each made once for the module (read, never written, by the tests)."""
    made = {}

    def get(dims: int, flatten: str, exporter: str):
        if (dims, flatten, exporter) not in made:
            made[dims, flatten, exporter] = _export(tmp_path_factory.mktemp("tail"), dims, flatten, exporter)
        return made[dims, flatten, exporter]

    return get


def _flatten_node(path) -> onnx.NodeProto:
    g = onnx.load(str(path)).graph
    producer = {o: n for n in g.node for o in n.output}
    gemm = producer["logits"]
    return producer[gemm.input[0]]


CASES = [
    (1, "flatten", "dynamo"),
    (1, "view", "dynamo"),
    (2, "flatten", "dynamo"),
    (1, "view", "torchscript"),
    (1, "view-self", "torchscript"),
    (2, "view-self", "torchscript"),
]


@pytest.mark.parametrize(("dims", "flatten", "exporter"), CASES)
def test_the_tail_reaches_the_1x1_conv_past_a_flatten_to_a_computed_shape(exported, dims, flatten, exporter):
    path, x = exported(dims, flatten, exporter)
    node = _flatten_node(path)
    assert node.op_type == "Reshape"  # the exporter's flatten: its shape is computed, not a constant
    assert node.input[1] not in {i.name for i in onnx.load(str(path)).graph.initializer}
    tr = DeviceTrainer(path)  # checks that the numpy tail reproduces the model's logits
    assert tr.params == ("proj.weight", "head.weight")
    assert Arch("shira", 0.5, "tail").targets(tr.info) == ["proj.weight", "head.weight"]
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], {"x": x})[0]
    np.testing.assert_allclose(tr.logits(x), want, rtol=1e-4, atol=1e-5)  # the numpy tail is the model's
    y = np.arange(len(x)) % CLASSES
    rng = np.random.default_rng(1)
    at = {p: w + 0.05 * rng.standard_normal(w.shape) for p, w in tr.base_weights().items()}
    assert at["proj.weight"].shape == (16, 12, *(1,) * dims)
    _, grads = tr.loss_and_grads(x, y, at)
    eps = 1e-6
    for p, w in at.items():
        assert grads[p].shape == w.shape
        for flat in rng.choice(w.size, 6, replace=False):
            i = np.unravel_index(flat, w.shape)
            plus, minus = {**at, p: w.copy()}, {**at, p: w.copy()}
            plus[p][i] += eps
            minus[p][i] -= eps
            fd = (tr.loss_and_grads(x, y, plus)[0] - tr.loss_and_grads(x, y, minus)[0]) / (2 * eps)
            assert grads[p][i] == pytest.approx(fd, rel=1e-4, abs=1e-8), (p, i)


def test_an_adapter_of_the_1d_tail_runs_in_the_runtime_as_the_trainer_computes_it(exported):
    from edge.runtime import Runtime

    path, x = exported(1, "flatten", "dynamo")  # the export the first case above checks
    tr = DeviceTrainer(path, epochs=20)
    y = np.arange(len(x)) % CLASSES
    a = tr.train(Arch("shira", 0.5, "tail"), x, y, "grown")
    assert sorted(a.tensors) == ["head.weight", "proj.weight"]
    assert a.tensors["proj.weight"].indices.shape[0] == 3 and not a.tensors["proj.weight"].indices[2].any()
    with Runtime(path) as rt:
        rt.load_adapter(a)
        rt.switch("grown")
        got = rt.run({"x": x})["logits"]
        rt.wait_settled(30)
    np.testing.assert_allclose(got, tr.logits(x, a), atol=1e-4)
    assert not np.allclose(got, tr.logits(x), atol=1e-4)  # the adapter changed the logits


# -- graphs built with onnx.helper: which computed shapes are a flatten -------------------------------------
def _graph(shape_nodes, batch="batch", other="batch") -> onnx.ModelProto:
    """x [batch, 8, 5] -> 1x1 Conv 'proj' (1-D) -> GlobalAveragePool -> Reshape(shape) -> Gemm 'head' -> logits;
    ``shape_nodes`` compute ``shape`` (from ``x``, the pooled ``p`` or a second input ``z`` [other, 2])."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((6, 8, 1)).astype(np.float32), "proj.weight"),
        numpy_helper.from_array(rng.standard_normal((CLASSES, 6)).astype(np.float32), "head.weight"),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
        numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "proj.weight"], ["c"]),
        helper.make_node("GlobalAveragePool", ["c"], ["p"]),
        *shape_nodes,
        helper.make_node("Reshape", ["p", "shape"], ["f"]),
        helper.make_node("Gemm", ["f", "head.weight"], ["logits"], transB=1),
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 8, 5]),
        helper.make_tensor_value_info("z", TensorProto.FLOAT, [other, 2]),
    ]
    out = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, CLASSES])]
    proto = helper.make_model(helper.make_graph(nodes, "g", inputs, out, inits),
                              opset_imports=[helper.make_opsetid("", 17)])  # fmt: skip
    make_adapter_ready(proto, name="g")
    return proto


def _dim(of, index="zero", how="gather"):
    n = helper.make_node
    if how == "slice":
        return [n("Shape", [of], ["s"]), n("Slice", ["s", "zero", "one"], ["b"])]
    if how == "shape-start-end":
        return [
            n("Shape", [of], ["s"], start=0, end=1),
            n("Squeeze", ["s"], ["b0"]),
            n("Unsqueeze", ["b0", "zero"], ["b"]),
        ]
    return [n("Shape", [of], ["s"]), n("Gather", ["s", index], ["b"], axis=0)]


def _cat(b="b", k="minus_one"):
    return [helper.make_node("Concat", [b, k], ["shape"], axis=0)]


FLATTENS = {
    "Gather(Shape(p), 0)": (_dim("p") + _cat(), {}),
    "Slice(Shape(x), 0, 1)": (_dim("x", how="slice") + _cat(), {}),
    "Unsqueeze(Squeeze(Shape(x, 0, 1)))": (_dim("x", how="shape-start-end") + _cat(), {}),
    "Gather(Shape(z), 0), z's batch the same symbol": (_dim("z") + _cat(), {}),
}
NOT_FLATTENS = {
    "Gather(Shape(p), 1): the channels, not the batch": (_dim("p", "one") + _cat(), {}),
    "Gather(Shape(z), 0), z's dimension 0 another symbol": (_dim("z") + _cat(), {"other": "n"}),
    "Concat([-1], batch): the batch moved last": ([*_dim("p"), *_cat("minus_one", "b")], {}),
    "Shape(p) whole": ([helper.make_node("Shape", ["p"], ["shape"])], {}),
}


@pytest.mark.parametrize("case", FLATTENS)
def test_a_computed_shape_the_graph_proves_a_flatten_is_walked_past(case):
    nodes, kw = FLATTENS[case]
    proto = _graph(nodes, **kw)
    onnx.checker.check_model(proto)
    tail = find_tail(proto, onnx_info(proto))
    assert tail.params == ("proj.weight", "head.weight") and tail.why_short is None
    assert [getattr(s, "kind", None) for s in tail.steps] == [None, "mean", "flatten", None]


@pytest.mark.parametrize("case", NOT_FLATTENS)
def test_any_other_computed_shape_still_stops_the_walk_naming_it(case):
    nodes, kw = NOT_FLATTENS[case]
    proto = _graph(nodes, **kw)
    tail = find_tail(proto, onnx_info(proto))
    assert tail.params == ("head.weight",)
    with pytest.raises(ConfigError, match=r"stopped at Reshape node .*nor a flatten to \[batch, k\]"):
        tail.check(["proj.weight"], "the model")


def test_a_3_tap_conv_before_the_pooling_is_named_once_the_flatten_is_passed(tmp_path):
    """Past the flatten, a k>1 convolution is where the walk stops (the tail trains 1x1 convolutions only)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv1d(4, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(1), nn.Linear(8, CLASSES))
    from exporters.onnx import export_onnx

    x = np.random.default_rng(0).standard_normal((2, 4, 10)).astype(np.float32)
    path = tmp_path / "k3.onnx"
    export_onnx(m.eval(), (torch.from_numpy(x),), path, input_names=["x"], output_names=["logits"], name="k3",
                progress=False)  # fmt: skip
    tr = DeviceTrainer(path)
    assert tr.params == ("4.weight",)
    with pytest.raises(ConfigError, match=r"stopped at Conv node .*kernel \[3\].*not a 1x1 convolution"):
        tr.saliency(x, np.zeros(2, np.int64), ["0.weight"])
