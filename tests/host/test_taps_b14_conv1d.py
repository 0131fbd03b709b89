"""Taps on 1-D CNNs (keyword spotting, vibration, ECG: any ``Conv1d`` model) and the layout of a tap.

A ``[B, C, L]`` map is pooled over ``L`` (its channels are the features), a ``[B, T, C]`` token tensor over ``T``:
the graph tells which (the op producing the tensor), never its rank alone. Features are checked against a numpy
mean of the raw tensor fetched from onnxruntime.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from edge.errors import ConfigError  # noqa: E402
from edge.route.taps import FEATURES, VOTE, Head, tap_model  # noqa: E402

CHANNELS, LENGTH, CLASSES = 6, 40, 3


class KWS(nn.Module):
    """Conv1d+BatchNorm1d+ReLU stages, a strided depthwise Conv1d, a 1x1 Conv1d, AdaptiveAvgPool1d and a Linear."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv1d(CHANNELS, 16, 5, padding=2), nn.BatchNorm1d(16)
        self.dw, self.b2 = nn.Conv1d(16, 16, 3, stride=2, padding=1, groups=16), nn.BatchNorm1d(16)
        self.pw, self.b3 = nn.Conv1d(16, 24, 1), nn.BatchNorm1d(24)
        self.c4, self.b4 = nn.Conv1d(24, 32, 3, stride=2, padding=1), nn.BatchNorm1d(32)
        self.pool, self.fc = nn.AdaptiveAvgPool1d(1), nn.Linear(32, CLASSES)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.dw(x)))
        x = torch.relu(self.b3(self.pw(x)))
        x = torch.relu(self.b4(self.c4(x)))
        return self.fc(self.pool(x).flatten(1))


def _signals(n: int, seed: int, domain: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class k: a sine of frequency 2 + 3k on every channel, plus noise; domain 1: the frequencies doubled (the base
    model confuses them), three times as loud, off zero."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    t = np.arange(LENGTH) / LENGTH
    phase = rng.uniform(0, 2 * np.pi, (n, CHANNELS, 1))
    f = (2 + 3 * y)[:, None, None] * (1 + domain)
    x = np.sin(2 * np.pi * f * t + phase) + 0.3 * rng.standard_normal((n, CHANNELS, LENGTH))
    if domain == 1:
        x = 3.0 * x + 1.0
    return x.astype(np.float32), y


@pytest.fixture(scope="module")
def kws(tmp_path_factory):
    """The 1-D CNN trained briefly (its BatchNorm statistics its own), exported by the project's exporter."""
    from exporters.onnx import export_onnx

    torch.manual_seed(0)
    m = KWS()
    x, y = _signals(256, 0)
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    for i in range(0, 256 * 6, 32):
        j = i % 256
        loss = nn.functional.cross_entropy(m(torch.from_numpy(x[j : j + 32])), torch.from_numpy(y[j : j + 32]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    path = tmp_path_factory.mktemp("kws") / "kws.onnx"
    export_onnx(m, (torch.from_numpy(x[:2]),), path, input_names=["x"], output_names=["logits"], name="kws",
                progress=False)  # fmt: skip
    return m, path


def _raw(path, tensors, feeds) -> list[np.ndarray]:
    """The tensors themselves, fetched from onnxruntime (each made a graph output of a copy)."""
    m = onnx.load(str(path))
    m.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in tensors)
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(list(tensors), feeds)


def _features(path, feeds) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run([FEATURES], feeds)[0]


@pytest.mark.parametrize("tap_set", ["stages", "auto", "first", "stages:2"])
def test_a_1d_cnn_is_tapped_at_each_stage_pooled_over_its_length(kws, tmp_path, tap_set):
    _, path = kws
    x, _ = _signals(5, 1)
    tapped = tap_model(path, tmp_path / "t.onnx", tap_set)
    raw = _raw(path, tapped.tensors, {"x": x})
    want_all = [r.shape[1] for r in _raw(path, tap_model(path, tmp_path / "s.onnx", "stages").tensors, {"x": x})]
    assert want_all == [16, 24, 32]  # one tap per resolution (L = 40, 20, 10), each its channels wide
    assert all(r.ndim == 3 and r.shape[0] == 5 for r in raw)
    want = np.concatenate([r.mean(axis=2) for r in raw], axis=1)  # [B, C, L] averaged over L
    assert tapped.width == want.shape[1] == sum(r.shape[1] for r in raw)
    np.testing.assert_allclose(_features(tapped.path, {"x": x}), want, rtol=1e-5, atol=1e-5)


def test_the_features_of_a_1d_cnn_do_not_depend_on_the_signal_length(kws, tmp_path):
    """A longer input gives features as wide as the channels (the length is pooled, not a feature axis)."""
    from exporters.onnx import export_onnx

    m, _ = kws
    path = tmp_path / "dyn.onnx"
    x, _ = _signals(3, 2)
    export_onnx(m, (torch.from_numpy(x),), path, input_names=["x"], output_names=["logits"], name="kws",
                dynamic_axes={"x": {2: "length"}}, progress=False)  # fmt: skip
    tapped = tap_model(path, tmp_path / "t.onnx", "stages")
    assert tapped.width == 16 + 24 + 32
    longer = np.concatenate([x, x], axis=2)
    raw = _raw(path, tapped.tensors, {"x": longer})
    want = np.concatenate([r.mean(axis=2) for r in raw], axis=1)
    np.testing.assert_allclose(_features(tapped.path, {"x": longer}), want, rtol=1e-5, atol=1e-5)


def _plain(nodes, inputs, extra_inits=()) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 4, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b"),
        numpy_helper.from_array(rng.standard_normal((4, 8)).astype(np.float32), "m"),
        *extra_inits,
    ]
    graph = helper.make_graph(
        nodes, "plain", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_plain_onnx_conv1d_map_is_pooled_over_its_length_and_a_token_tensor_over_its_tokens(tmp_path):
    """Built with onnx.helper: a Conv (1-D) then Relu and an Add ([B, 8, L]: over L), and a MatMul then Sigmoid
    ([B, T, 8]: over T). Both are rank 3; only the ops that make them differ."""
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["conv"], pads=[1, 1]),
        helper.make_node("Relu", ["conv"], ["act"]),
        helper.make_node("Add", ["act", "conv"], ["sum"]),
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["xt", "m"], ["tok"]),
        helper.make_node("Sigmoid", ["tok"], ["y"]),
    ]
    model = _plain(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 10])])
    onnx.save(model, tmp_path / "m.onnx")
    x = np.random.default_rng(3).standard_normal((2, 4, 10)).astype(np.float32)
    tapped = tap_model(tmp_path / "m.onnx", tmp_path / "t.onnx", ["sum", "y"])
    s, y = _raw(tmp_path / "m.onnx", ["sum", "y"], {"x": x})
    assert s.shape == (2, 8, 10) and y.shape == (2, 10, 8)
    want = np.concatenate([s.mean(axis=2), y.mean(axis=1)], axis=1)
    assert tapped.width == 16
    np.testing.assert_allclose(_features(tapped.path, {"x": x}), want, rtol=1e-5, atol=1e-6)


def test_a_tap_whose_layout_the_graph_cannot_tell_is_refused_naming_it_and_a_layout_is_taken(tmp_path):
    """A rank-3 tensor that comes out of a Reshape: channels first or last is not in the graph; ``layout`` says."""
    shape = numpy_helper.from_array(np.array([0, 8, -1], np.int64), "shape")
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["r"]),
        helper.make_node("Relu", ["r"], ["y"]),
    ]
    model = _plain(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 10])], [shape])
    onnx.save(model, tmp_path / "m.onnx")
    with pytest.raises(ConfigError, match=r"tap 'y' .*layout=\{'y': 'channels-first'\}.*'channels-last'"):
        tap_model(tmp_path / "m.onnx", tmp_path / "t.onnx", ["y"])
    x = np.random.default_rng(4).standard_normal((2, 4, 10)).astype(np.float32)
    (y,) = _raw(tmp_path / "m.onnx", ["y"], {"x": x})
    assert y.shape == (2, 8, 5)
    for layout, axis in (("channels-first", 2), ("channels-last", 1)):
        tapped = tap_model(tmp_path / "m.onnx", tmp_path / f"{layout}.onnx", ["y"], layout={"y": layout})
        assert tapped.width == y.shape[3 - axis]
        np.testing.assert_allclose(_features(tapped.path, {"x": x}), y.mean(axis=axis), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match=r"layout of 'nope'.*not a tap.*\['y'\]"):
        tap_model(tmp_path / "m.onnx", tmp_path / "t.onnx", ["y"], layout={"nope": "channels-first"})
    with pytest.raises(ConfigError, match=r"layout 'NCL' .*channels-first, channels-last"):
        tap_model(tmp_path / "m.onnx", tmp_path / "t.onnx", ["y"], layout={"y": "NCL"})


# -- the whole loop on a 1-D CNN: tap, detector fit, route in the graph, update on the device ------------------
def test_a_1d_cnn_through_detection_routing_and_updates(kws, tmp_path, capsys):
    from edge.cli import main
    from edge.learn.device_trainer import DeviceTrainer
    from edge.learn.space import Arch
    from edge.route.ood import HDC
    from edge.runtime import Runtime

    _, path = kws
    tapped = tap_model(path, tmp_path / "t.onnx", "auto", head=Head(domains=2, classes=CLASSES))
    assert tapped.tap_set == "auto (stages)" and tapped.width == 72
    fit = {d: _signals(300, 10 + d, d) for d in (0, 1)}
    test = {d: _signals(100, 20 + d, d) for d in (0, 1)}
    with Runtime(tapped.path) as rt:
        outs = {d: rt.run({"x": fit[d][0]}) for d in (0, 1)}
        det = HDC().fit(np.concatenate([outs[d][FEATURES] for d in (0, 1)]),
                        np.concatenate([outs[d]["logits"] for d in (0, 1)]),
                        np.concatenate([fit[d][1] for d in (0, 1)]), np.repeat([0, 1], 300))  # fmt: skip
        cal = [rt.run({"x": _signals(200, 30 + d, d)[0]})[FEATURES] for d in (0, 1)]  # held out from the fit
        det.calibrate(np.concatenate(cal), tpr=0.95)
        rt.set_head(det.head_values(tapped.head))
        for d in (0, 1):
            out = rt.run({"x": test[d][0]})
            score, dom = det.route(out[FEATURES])
            clear = np.abs(score - det.threshold) > 1e-5
            want = np.where(det.is_ood(out[FEATURES], out["logits"]), -1, dom)
            np.testing.assert_array_equal(out[VOTE][clear], want[clear])  # the graph votes as numpy does
            assert (out[VOTE] == d).mean() > 0.8, d  # each known domain routed to itself
    # edge update over the stage taps: a shallow method, and SHiRA on the classifier as an adapter of the file given
    np.savez(tmp_path / "train.npz", x=fit[1][0], y=fit[1][1])
    np.savez(tmp_path / "eval.npz", x=test[1][0], y=test[1][1])
    data = ("--model", str(path), "--data", str(tmp_path / "train.npz"), "--eval", str(tmp_path / "eval.npz"))
    last = tapped.tensors[-1]  # the last stage, [B, 32, 10]: pooled, the classifier's input (what shira-head needs)
    shira = ("--method", "shira-head", "-o", "head=fc.weight", "--adapter-out", str(tmp_path / "a.safetensors"))
    for taps, extra in (("stages", ()), (last, shira)):
        code = main(["update", *data, "--taps", taps, *extra])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert json.loads(out)["eval_acc"] > 0.8, extra
    # the device trainer on the graph's tail: the classifier, trained in numpy, fused as an adapter of the file
    dt = DeviceTrainer(path, epochs=10)
    adapter = dt.train(Arch("shira", 0.5, "tail-head"), fit[1][0], fit[1][1], "shifted")
    with Runtime(path, strategy="bound") as rt:
        base = (rt.run({"x": test[1][0]})["logits"].argmax(1) == test[1][1]).mean()
        rt.load_adapter(adapter)
        rt.switch("shifted")
        got = (rt.run({"x": test[1][0]})["logits"].argmax(1) == test[1][1]).mean()
    assert got > base + 0.3, (base, got)


def test_the_device_trainers_tail_passes_the_flatten_of_a_1d_cnn_and_names_its_3_tap_conv(kws):
    """Past the exporter's flatten (a Reshape to a shape computed from Shape) the walk meets the last stage's
    3-tap Conv1d, which the tail does not train (only 1x1 convolutions): the error names it, not the flatten."""
    from edge.learn.device_trainer import DeviceTrainer
    from edge.learn.space import Arch

    _, path = kws
    x, y = _signals(64, 40, 1)
    with pytest.raises(ConfigError, match=r"stopped at Conv node .*kernel \[3\].*not a 1x1 convolution"):
        DeviceTrainer(path, epochs=1).train(Arch("shira", 0.5, "tail"), x, y, "shifted")
