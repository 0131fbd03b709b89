"""The device trainer's tail on CNNs and a pooled encoder this project did not write (issue 17, helper U).

Exported by torch's legacy exporter at opset 13 (Clip bounds as inputs, no LayerNormalization op) and imported with
``import_onnx(..., state_dict=...)`` as a user would:

* MobileNetV2-style: inverted residuals, BatchNorm folded into the convs, ReLU6 (``Clip``) after the last 1x1 conv,
  Dropout, a Linear classifier. The tail was the classifier alone (the walk stopped at ``Clip``); now it reaches the
  last 1x1 conv through ReLU6 and the global average pool.
* SqueezeNet-style: the classifier is a 1x1 conv over the map, then (ReLU and) global average pooling, then
  ``Softmax``. It was refused (``computed by GlobalAveragePool ..., not by a linear classifier``); now the pooling is
  part of the tail, and the loss is cross-entropy on the pooled scores: the model's Softmax is not applied twice.
* An encoder with a pooler (mean over tokens, Dense, ``Tanh``) before the classifier: the pooler dense trains.

Gradients are compared with torch autograd on the same parameters and with finite differences. About 6 s.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
from cnn_C18_zoo import assert_finite_differences  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402

from edge.convert.onnx_import import import_onnx  # noqa: E402
from edge.errors import ConfigError  # noqa: E402
from edge.learn.device_trainer import DeviceTrainer  # noqa: E402
from edge.learn.space import Arch  # noqa: E402
from edge.learn.tail_ops import Op  # noqa: E402
from edge.runtime import Runtime  # noqa: E402


def digits(size: int = 8):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy((d.images / 16.0).astype(np.float32))[:, None]
    x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).numpy()
    return x, d.target.astype(np.int64)


def cbr(i, o, k=3, s=1, g=1, act=nn.ReLU6):
    return nn.Sequential(nn.Conv2d(i, o, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(o), act())


class InvertedResidual(nn.Module):
    def __init__(self, c, e=2):
        super().__init__()
        self.b = nn.Sequential(
            cbr(c, c * e, 1), cbr(c * e, c * e, 3, g=c * e), nn.Conv2d(c * e, c, 1, bias=False), nn.BatchNorm2d(c)
        )

    def forward(self, x):
        return x + self.b(x)


class MobileNetV2(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            cbr(1, 8, s=2), InvertedResidual(8), cbr(8, 16, 3, 2), InvertedResidual(16), cbr(16, 32, 1)
        )
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, 10))

    def logits(self, x):
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))

    forward = logits


class SqueezeNet(nn.Module):
    """The classifier a 1x1 conv over the map, pooled after it; the model outputs probabilities."""

    def __init__(self, relu: bool = False):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 32, 3, 1, 1), nn.ReLU())
        head = [nn.Dropout(0.5), nn.Conv2d(32, 10, 1)] + ([nn.ReLU()] if relu else []) + [nn.AdaptiveAvgPool2d(1)]
        self.classifier = nn.Sequential(*head)

    def logits(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)

    def forward(self, x):
        return torch.softmax(self.logits(x), 1)


class Pooler(nn.Module):
    """Patches, a pre-LN transformer layer, the mean over tokens, a tanh pooler (as BERT's), the classifier."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(1, 32, 2, 2)
        self.enc = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=True)
        self.pooler, self.classifier = nn.Linear(32, 32), nn.Linear(32, 10)

    def logits(self, x):
        h = self.enc(self.patch(x).flatten(2).transpose(1, 2)).mean(1)
        return self.classifier(torch.tanh(self.pooler(h)))

    forward = logits


def train(m: nn.Module, x, y, steps: int = 12) -> nn.Module:
    """BatchNorm statistics from clean digits (one no-grad pass), then a short fit: the model's own weights."""
    for b in m.modules():
        if isinstance(b, nn.BatchNorm2d):
            b.momentum = None  # a cumulative average over the pass
    with torch.no_grad():
        m.train()(torch.from_numpy(x[:512]))
    torch.manual_seed(0)
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    for i in range(steps):
        j = (i * 64) % 640
        loss = nn.functional.cross_entropy(m.logits(torch.from_numpy(x[j : j + 64])), torch.from_numpy(y[j : j + 64]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


def bring_in(m: nn.Module, x, path, opset: int = 13, dynamo: bool = False, batch1: bool = False):
    """torch.onnx.export as a user would (dynamic batch unless ``batch1``), then import with the state dict."""
    kw = {"input_names": ["x"], "output_names": ["logits"], "opset_version": opset, "dynamo": dynamo}
    if not batch1:
        if dynamo:
            kw["dynamic_shapes"] = ({0: torch.export.Dim("batch", max=4096)},)
        else:
            kw["dynamic_axes"] = {"x": {0: "batch"}, "logits": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (torch.from_numpy(x[: 1 if batch1 else 2]),), str(path), **kw)
    sd = path.with_suffix(".safetensors")
    save_file({k: v.contiguous() for k, v in m.state_dict().items() if v.dtype.is_floating_point}, str(sd))
    out = path.with_name(path.stem + "-edge.onnx")
    import_onnx(path, out, state_dict=sd)
    return out


MODELS = {"mobilenetv2": MobileNetV2, "squeezenet": SqueezeNet, "squeezenet-relu": lambda: SqueezeNet(True)}
TAILS = {
    "mobilenetv2": ("features.4.0.weight", "classifier.1.weight"),  # the last 1x1 conv (BN folded), through ReLU6
    "squeezenet": ("classifier.1.weight",),  # a 3x3 conv before it
    "squeezenet-relu": ("classifier.1.weight",),
    "pooler": ("pooler.weight", "classifier.weight"),
}


@pytest.fixture(scope="module")
def data():
    x, y = digits()
    return x, y, (1.0 - x).astype(np.float32)  # the inverted digits: a domain the base models get wrong


@pytest.fixture(scope="module")
def models(tmp_path_factory, data):
    x, y, _ = data
    d, out = tmp_path_factory.mktemp("u17"), {}
    for name, make in {**MODELS, "pooler": Pooler}.items():
        torch.manual_seed(0)
        m = train(make(), x, y)
        out[name] = (m, bring_in(m, x, d / f"{name}.onnx", opset=17 if name == "pooler" else 13))
    return out


def torch_grads(m, x, y, params):
    """Cross-entropy on the scores before the model's Softmax, and its gradients, by autograd."""
    m.zero_grad()
    loss = nn.functional.cross_entropy(m.logits(torch.from_numpy(x)), torch.from_numpy(y))
    loss.backward()
    named = dict(m.named_parameters())
    return loss.item(), {p: named[p].grad.numpy().astype(np.float64) for p in params}


@pytest.mark.parametrize("name", list(TAILS))
def test_tail_found_and_its_gradients_equal_torch_autograd(models, data, name):
    m, path = models[name]
    _, y, xs = data
    dt = DeviceTrainer(path)
    assert dt.params == TAILS[name]
    loss, grads = dt.loss_and_grads(xs[700:764], y[700:764])
    t_loss, t_grads = torch_grads(m, xs[700:764], y[700:764], dt.params)
    assert loss == pytest.approx(t_loss, rel=1e-5)  # a Softmax applied twice would give another loss
    for p in dt.params:
        scale = np.abs(t_grads[p]).max()
        assert scale > 0 and np.abs(grads[p] - t_grads[p]).max() <= 1e-4 * scale, p


@pytest.mark.parametrize("name", ["mobilenetv2", "squeezenet", "pooler"])
def test_tail_gradients_equal_finite_differences(models, data, name):
    _, path = models[name]
    _, y, xs = data
    assert_finite_differences(DeviceTrainer(path), xs[700:716], y[700:716])


@pytest.mark.parametrize(
    "op",
    [Op("clip", "relu6", {"lo": 0.0, "hi": 6.0}), Op("clip", "hardtanh", {"lo": -1.0, "hi": 1.0}), Op("tanh", "t")],
)
def test_clip_and_tanh_backward_equal_finite_differences(op):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 5)) * 4
    x[np.abs(np.abs(x) - 1) < 1e-3] += 0.01  # away from the kinks
    x[(np.abs(x - 6) < 1e-3) | (np.abs(x) < 1e-3)] += 0.01
    w = rng.standard_normal((3, 5))
    y, saved = op.forward(x, {}, {})
    assert y.shape == x.shape and np.isfinite(y).all()
    dx, eps = op.backward(w, saved), 1e-6
    fd = np.array([(op.forward(x + eps * e, {}, {})[0] * w).sum() - (op.forward(x - eps * e, {}, {})[0] * w).sum()
                   for e in np.eye(x.size).reshape(x.size, *x.shape)]) / (2 * eps)  # fmt: skip
    np.testing.assert_allclose(dx.reshape(-1), fd, rtol=1e-5, atol=1e-8)
    if op.kind == "clip":
        assert y.min() >= op.c["lo"] and y.max() <= op.c["hi"]


def test_the_tail_through_relu6_learns_more_than_the_head_alone(models, data):
    _, path = models["mobilenetv2"]
    _, y, xs = data
    dt = DeviceTrainer(path, epochs=60)
    xt, yt = xs[900:1300], y[900:1300]
    base = (dt.logits(xt).argmax(1) == yt).mean()
    accs = {}
    for layers in ("tail-head", "tail"):
        a = dt.train(Arch("shira", 0.5, layers), xs[700:900], y[700:900], layers)
        accs[layers] = (dt.logits(xt, a).argmax(1) == yt).mean()
    assert set(a.tensors) == set(TAILS["mobilenetv2"])
    assert accs["tail-head"] > base + 0.3 and accs["tail"] > accs["tail-head"] + 0.05, (base, accs)


def test_squeezenet_adapter_serves_the_probabilities_it_trained(models, data):
    """The runtime serves Softmax(pooled conv scores); the trainer's tail ends at those scores."""
    _, path = models["squeezenet"]
    _, y, xs = data
    dt = DeviceTrainer(path, epochs=60)
    adapter = dt.train(Arch("shira", 0.5, "tail-head"), xs[700:900], y[700:900], "inverted")
    xt, yt = xs[900:1300], y[900:1300]
    z = dt.logits(xt, adapter)
    want = np.exp(z - z.max(1, keepdims=True))
    want /= want.sum(1, keepdims=True)
    with Runtime(path, strategy="bound") as rt:
        base = rt.run({"x": xt})["logits"]
        rt.load_adapter(adapter)
        rt.switch("inverted")
        got = rt.run({"x": xt})["logits"]
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)  # probabilities, as the model serves them
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert (got.argmax(1) == yt).mean() > (base.argmax(1) == yt).mean() + 0.15


def _batch1_graph(path, shape2):
    """x[1, 4, 1, 1] -> Reshape [1, 4] -> MatMul w1 -> Relu -> Reshape ``shape2`` -> MatMul w2 -> logits (batch 1)."""
    from onnx import TensorProto, helper, numpy_helper, save

    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((4, 6)).astype(np.float32), rng.standard_normal((6 // (shape2[0]), 3))
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2.astype(np.float32), "w2")]
    inits += [numpy_helper.from_array(np.array(s, np.int64), f"s{i}") for i, s in enumerate(([1, 4], shape2))]
    nodes = [
        helper.make_node("Reshape", ["x", "s0"], ["f"]),
        helper.make_node("MatMul", ["f", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Reshape", ["r", "s1"], ["r2"]),
        helper.make_node("MatMul", ["r2", "w2"], ["logits"]),
    ]
    g = helper.make_graph(
        nodes,
        "b1",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 1, 1])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [shape2[0], 3])],
        inits,
    )
    save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    out = path.with_name("b1-edge.onnx")
    import_onnx(path, out)
    return out, w1.astype(np.float64), w2


def test_a_file_that_fixes_its_batch_trains_all_rows_at_once(tmp_path):
    """dynamo at batch 1 writes flatten as Reshape to the constant [1, k]: the tail reshapes each row so (a bare
    ValueError from numpy before, cannot reshape array of size N*k into shape (1, k))."""
    path, w1, w2 = _batch1_graph(tmp_path / "b1.onnx", [1, 6])
    dt = DeviceTrainer(path)
    assert dt.params == ("w1", "w2")
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((5, 4, 1, 1)).astype(np.float32), np.array([0, 1, 2, 0, 1])
    loss, grads = dt.loss_and_grads(x, y)
    r = np.maximum(x.reshape(5, 4).astype(np.float64) @ w1, 0.0)
    z = r @ w2
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert loss == pytest.approx(-np.log(p[np.arange(5), y]).mean(), rel=1e-6)
    dz = (p - np.eye(3)[y]) / 5
    np.testing.assert_allclose(grads["w2"], (r.T @ dz).T, rtol=1e-5, atol=1e-9)  # source view [out, in]
    np.testing.assert_allclose(grads["w1"], (x.reshape(5, 4).T @ ((dz @ w2.T) * (r > 0))).T, rtol=1e-5, atol=1e-9)


def test_a_reshape_the_rows_cannot_take_is_a_config_error(tmp_path):
    path, _, _ = _batch1_graph(tmp_path / "b1.onnx", [2, 3])  # the batch-1 row split in two: not per row
    dt = DeviceTrainer(path)
    x = np.zeros((5, 4, 1, 1), np.float32)
    with pytest.raises(ConfigError, match=r"cannot run reshape node .* on a tensor of shape \[5, 6\]"):
        dt.loss_and_grads(x, np.zeros(5, np.int64))


def test_shira_head_on_a_model_that_serves_probabilities(models, data, tmp_path):
    """SqueezeNet's output is Softmax(mean(conv1x1(map)) + b): the head's bias is read off the log-probabilities (it
    was refused: "logits are not that"), and the adapter serves what the updater scored."""
    from edge.learn.update import Updater
    from edge.route.taps import tap_model

    _, path = models["squeezenet"]
    _, y, xs = data
    tapped = tap_model(path, tmp_path / "tapped.onnx", ["/features/features.3/Relu_output_0"])  # the head's input
    xt, yt = xs[900:1300], y[900:1300]
    with Runtime(tapped.path, strategy="bound") as rt:
        base = rt.run({"x": xt})["logits"]
        up = Updater(rt, "shira-head", feature_output="edge.features", head="classifier.1.weight")
        up.partial_fit(xs[700:900], y[700:900])
        want = up.scores(xt)
        rt.load_adapter(up.to_adapter("inverted"))
        rt.switch("inverted")
        got = rt.run({"x": xt})["logits"]
    want = np.exp(want - want.max(1, keepdims=True))
    np.testing.assert_allclose(got, want / want.sum(1, keepdims=True), atol=1e-4)  # one Softmax, the model's
    assert (got.argmax(1) == yt).mean() > (base.argmax(1) == yt).mean() + 0.15


@pytest.mark.parametrize("final", ["none", "softmax", "logsoftmax", "relu"])
def test_shira_head_bias_through_a_final_softmax_or_logsoftmax(final):
    from edge.learn.shira_head import _head_bias

    rng = np.random.default_rng(0)
    scores, b = rng.standard_normal((20, 5)) * 3, rng.standard_normal(5)
    z = scores + b
    lse = np.log(np.exp(z).sum(1, keepdims=True))
    out = {"none": z, "softmax": np.exp(z - lse), "logsoftmax": z - lse, "relu": np.maximum(z, 0)}[final]
    if final == "relu":
        with pytest.raises(ConfigError, match=r"logits = features @ h\^T \+ bias \(or their Softmax or LogSoftmax\)"):
            _head_bias(out, scores, "h")
        return
    got = _head_bias(out, scores, "h")
    shift = 0.0 if final == "none" else b.mean()  # a constant the probabilities do not see
    np.testing.assert_allclose(got, b - shift, atol=1e-6)
