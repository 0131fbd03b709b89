"""On-device updates and the device trainer on models this project did not write (issue 17).

Each model is built in torch, exported with ``torch.onnx.export`` directly (not with this project's exporter) and
brought in as a user would (``edge import-onnx --state-dict``): torchvision-style CNNs (BatchNorm folded into the
convolutions by the exporter, a depthwise conv, global average pooling, Flatten) with a Linear, a MatMul+Add or a
1x1-conv classifier, Dropout, a final Softmax or LogSoftmax, two outputs; MLPs whose activation is outside the
trainer's set, and GELU as the exporter writes it out; Hugging Face BERT, RoBERTa, DistilBERT, ELECTRA and ViT
classifiers from their config classes. The device trainer's tail gradients are compared with torch autograd on the
same parameters, its adapters with what the runtime computes, undo bit for bit; the shallow updates run over the
model's taps, and hostile samples files are refused in one line. Seeded; about 20 s.
"""

from __future__ import annotations

import io
import json
import re
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402

from edge.cli import main  # noqa: E402
from edge.convert.onnx_import import import_onnx  # noqa: E402
from edge.errors import ConfigError  # noqa: E402
from edge.learn.device_trainer import DeviceTrainer  # noqa: E402
from edge.learn.space import Arch  # noqa: E402
from edge.learn.update import Updater  # noqa: E402
from edge.route.taps import tap_model  # noqa: E402
from edge.runtime import Runtime  # noqa: E402

LAST = "features.6.weight"  # the CNNs' last 1x1 conv, BatchNorm folded into it by the exporter


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32)[:, None], d.target.astype(np.int64)


class CNN(nn.Module):
    """torchvision-style: conv-BN-ReLU, depthwise conv-BN-ReLU6, 1x1 conv-BN-ReLU, average pool, classifier."""

    def __init__(self, head: str = "linear", dropout: bool = False, final: str | None = None, two: bool = False):
        super().__init__()
        self.features = nn.Sequential(
            *(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()),
            *(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU6()),
            *(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU()),
        )
        self.pool, self.drop = nn.AdaptiveAvgPool2d(1), nn.Dropout(0.2) if dropout else nn.Identity()
        self.head, self.final, self.two = head, final, two
        if head == "matmul":
            self.w, self.b = nn.Parameter(torch.randn(32, 10) * 0.1), nn.Parameter(torch.zeros(10))
        else:
            self.classifier = nn.Conv2d(32, 10, 1) if head == "conv1x1" else nn.Linear(32, 10)

    def logits(self, x):
        f = self.pool(self.features(x))
        if self.head == "conv1x1":
            return torch.flatten(self.classifier(self.drop(f)), 1), torch.flatten(f, 1)
        h = self.drop(torch.flatten(f, 1))
        return (h @ self.w + self.b if self.head == "matmul" else self.classifier(h)), torch.flatten(f, 1)

    def forward(self, x):
        z, f = self.logits(x)
        z = {"softmax": torch.softmax, "logsoftmax": torch.log_softmax}.get(self.final, lambda z, _: z)(z, -1)
        return (z, f) if self.two else z


VARIANTS = {
    "linear": {},
    "dropout": {"dropout": True},
    "matmul-add": {"head": "matmul"},
    "conv1x1-classifier": {"head": "conv1x1"},
    "softmax": {"final": "softmax"},
    "logsoftmax": {"final": "logsoftmax"},
    "two-outputs": {"two": True},
}


def _bring_in(model: nn.Module, example, path: Path, inputs=("x",), outputs=("logits",)) -> Path:
    """Export with torch.onnx.export (legacy exporter, opset 17) and import with the state dict, as a user would."""
    axes = {n: {0: "batch"} for n in (*inputs, *outputs)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(), example, str(path), input_names=list(inputs), output_names=list(outputs),
            dynamic_axes=axes, opset_version=17, dynamo=False,
        )  # fmt: skip
    sd = path.with_suffix(".safetensors")
    weights = getattr(model, "m", model).state_dict()  # a wrapped Hugging Face model: its own parameter names
    save_file({k: v.contiguous() for k, v in weights.items() if v.dtype.is_floating_point}, str(sd))
    out = path.with_name(path.stem + "-edge.onnx")
    import_onnx(path, out, state_dict=sd)
    return out


@pytest.fixture(scope="module")
def digits():
    x, y = _digits()
    return x, y, (1.0 - x).astype(np.float32)  # the inverted digits: a domain the base model gets wrong


@pytest.fixture(scope="module")
def cnns(tmp_path_factory, digits):
    """Each variant trained briefly on clean digits (so its BatchNorm statistics are its own), exported, imported."""
    x, y, _ = digits
    d, out = tmp_path_factory.mktemp("cnns"), {}
    for name, kw in VARIANTS.items():
        torch.manual_seed(0)
        m = CNN(**kw)
        opt = torch.optim.Adam(m.parameters(), 3e-3)
        for i in range(0, 384, 32):
            loss = nn.functional.cross_entropy(
                m.logits(torch.from_numpy(x[i : i + 32]))[0], torch.from_numpy(y[i : i + 32])
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
        m.eval()
        outputs = ("logits", "features") if kw.get("two") else ("logits",)
        out[name] = (m, _bring_in(m, (torch.from_numpy(x[:2]),), d / f"{name}.onnx", outputs=outputs))
    return out


def _torch_grads(m: nn.Module, x, y, params, **inputs) -> tuple[float, dict]:
    """Mean cross-entropy on the classifier's scores (before any final Softmax) and its gradients, by autograd."""
    m.zero_grad()
    z = m.logits(torch.from_numpy(x))[0] if isinstance(m, CNN) else m(torch.from_numpy(x), **inputs)
    z = getattr(z, "logits", z)
    loss = nn.functional.cross_entropy(z, torch.from_numpy(y))
    loss.backward()
    named = dict(getattr(m, "m", m).named_parameters())
    return float(loss.detach()), {p: named[p].grad.numpy().astype(np.float64) for p in params}


def _assert_grads(dt: DeviceTrainer, m, x, y, feeds=None, **inputs):
    loss, grads = dt.loss_and_grads(feeds if feeds is not None else x, y)
    t_loss, t_grads = _torch_grads(m, x, y, dt.params, **inputs)
    assert loss == pytest.approx(t_loss, rel=1e-5)
    for p in dt.params:
        scale = np.abs(t_grads[p]).max()
        assert scale > 0 and np.abs(grads[p] - t_grads[p]).max() <= 1e-4 * scale, p


# -- the device trainer on CNNs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tail_gradients_equal_torch_autograd(cnns, digits, variant):
    """Through a BatchNorm folded into the last conv (its factor recorded by import-onnx) and a final (Log)Softmax."""
    m, path = cnns[variant]
    _, y, xs = digits
    dt = DeviceTrainer(path)
    classifier = "w" if variant == "matmul-add" else "classifier.weight"
    assert dt.params == (LAST, classifier)
    _assert_grads(dt, m, xs[700:764], y[700:764])


@pytest.mark.parametrize("variant", ["conv1x1-classifier", "softmax"])
def test_grown_adapter_serves_as_trained_and_undoes_bit_exactly(cnns, digits, variant):
    m, path = cnns[variant]
    _, y, xs = digits
    dt = DeviceTrainer(path, epochs=25)
    adapter = dt.train(Arch("shira", 0.5, "tail"), xs[700:900], y[700:900], "inverted")
    xt, yt = xs[900:1300], y[900:1300]
    want = dt.logits(xt, adapter)
    with Runtime(path, strategy="bound") as rt:
        base_w = {p: rt.weights(p).copy() for p in adapter.tensors}
        base = rt.run({"x": xt})["logits"]
        rt.load_adapter(adapter)
        rt.switch("inverted")
        got = rt.run({"x": xt})["logits"]
        rt.switch(None)
        assert all(rt.weights(p).tobytes() == w.tobytes() for p, w in base_w.items())
        assert rt.run({"x": xt})["logits"].tobytes() == base.tobytes()
    if variant == "softmax":  # the runtime serves probabilities; the trainer's tail ends at the scores before them
        want = np.exp(want - want.max(1, keepdims=True))
        want /= want.sum(1, keepdims=True)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert (got.argmax(1) == yt).mean() > (base.argmax(1) == yt).mean() + 0.2


def test_an_out_of_range_softmax_axis_is_refused(tmp_path, digits):
    class Cols(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 6)

        def forward(self, x):
            return torch.softmax(self.fc(x).reshape(-1, 2, 3), 1)  # over a middle axis: not a class axis

    path = _bring_in(Cols(), (torch.zeros(2, 4),), tmp_path / "cols.onnx")
    with pytest.raises(ConfigError, match=r"Softmax over axis 1 of a rank-3 tensor"):
        DeviceTrainer(path)


# -- ops outside the set, and Hugging Face classifiers --------------------------------------------------------------
def _blobs(n: int, seed: int, shift: float = 0.0):
    centres = np.random.default_rng(42).standard_normal((4, 16)) * 1.5
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 4
    return (centres[y] + 0.8 * rng.standard_normal((n, 16)) + shift).astype(np.float32), y.astype(np.int64)


@pytest.mark.parametrize(
    "act,op",
    [(nn.ELU(), "Elu"), (nn.Sigmoid(), "Sigmoid"), (nn.LeakyReLU(0.1), "LeakyRelu")],  # Tanh, SiLU, HardSwish: in it
)
def test_an_activation_outside_the_set_is_named_and_the_head_still_trains(tmp_path, act, op):
    torch.manual_seed(0)
    m = nn.Sequential()
    m.add_module("fc1", nn.Linear(16, 32))
    m.add_module("act", act)
    m.add_module("fc2", nn.Linear(32, 4))
    path = _bring_in(m, (torch.zeros(2, 16),), tmp_path / "mlp.onnx")
    dt = DeviceTrainer(path, epochs=60)
    assert dt.params == ("fc2.weight",)
    x, y = _blobs(96, 1, shift=1.0)
    with pytest.raises(ConfigError, match=rf"selects no tensor.*stopped at {op} node"):
        dt.train(Arch("shira", 0.5, "tail"), x, y, "a")
    with pytest.raises(ConfigError, match=rf"adapts only \['fc2.weight'\].*stopped at {op} node"):
        dt.saliency(x, y, ["fc1.weight"])
    loss, grads = dt.loss_and_grads(x, y)
    m.zero_grad()
    t_loss = nn.functional.cross_entropy(m(torch.from_numpy(x)), torch.from_numpy(y))
    t_loss.backward()
    assert loss == pytest.approx(t_loss.item(), rel=1e-5)
    np.testing.assert_allclose(grads["fc2.weight"], m.fc2.weight.grad.numpy(), rtol=1e-4, atol=1e-7)
    xt, yt = _blobs(400, 2, shift=1.0)
    adapter = dt.train(Arch("shira", 0.5, "tail-head"), x, y, "a")
    assert (dt.logits(xt, adapter).argmax(1) == yt).mean() > (dt.logits(xt).argmax(1) == yt).mean()


def test_gelu_written_out_by_the_exporter_is_in_the_tail(tmp_path):
    """Below opset 20 torch exports GELU as Div, Erf, Add, Mul, Mul: the walk reads it as one Gelu."""
    torch.manual_seed(0)
    m = nn.Sequential()
    m.add_module("fc1", nn.Linear(16, 32))
    m.add_module("act", nn.GELU())
    m.add_module("fc2", nn.Linear(32, 4))
    path = _bring_in(m, (torch.zeros(2, 16),), tmp_path / "mlp.onnx")
    import onnx

    assert "Erf" in {n.op_type for n in onnx.load(str(path)).graph.node}
    dt = DeviceTrainer(path)
    assert dt.params == ("fc1.weight", "fc2.weight")
    x, y = _blobs(96, 1, shift=1.0)
    loss, grads = dt.loss_and_grads(x, y)
    m.zero_grad()
    t_loss = nn.functional.cross_entropy(m(torch.from_numpy(x)), torch.from_numpy(y))
    t_loss.backward()
    assert loss == pytest.approx(t_loss.item(), rel=1e-5)
    for p in dt.params:
        np.testing.assert_allclose(grads[p], dict(m.named_parameters())[p].grad.numpy(), rtol=1e-4, atol=1e-7)


def _hf(kind: str):
    import transformers as tf

    common = dict(num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, hidden_size=32)
    if kind == "bert":
        return tf.BertForSequenceClassification(tf.BertConfig(vocab_size=64, max_position_embeddings=32, **common))
    if kind == "roberta":
        return tf.RobertaForSequenceClassification(
            tf.RobertaConfig(vocab_size=64, max_position_embeddings=40, **common)
        )
    if kind == "electra":  # its classification head: dense, GELU, out_proj
        cfg = tf.ElectraConfig(vocab_size=64, embedding_size=32, max_position_embeddings=32, **common)
        return tf.ElectraForSequenceClassification(cfg)
    if kind == "distilbert":
        cfg = tf.DistilBertConfig(
            vocab_size=64, dim=32, n_layers=1, n_heads=2, hidden_dim=64, max_position_embeddings=32
        )
        return tf.DistilBertForSequenceClassification(cfg)
    cfg = tf.ViTConfig(image_size=8, patch_size=4, num_channels=1, num_labels=10, **common)
    return tf.ViTForImageClassification(cfg)


class _Logits(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, *a, **k):
        return self.m(*a, **k).logits


def _tokens(n: int, seed: int):
    """Two classes told apart by which half of the vocabulary their tokens come from; padded at the end."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(np.int64)
    ids = (4 + 30 * y[:, None] + rng.integers(0, 30, (n, 10))).astype(np.int64)
    mask = np.ones_like(ids)
    mask[:, 8:] = 0
    return ids, mask, y


@pytest.mark.parametrize(
    "kind,params,stop",
    [
        ("bert", ("bert.pooler.dense.weight", "classifier.weight"), None),  # through the pooler's Tanh
        ("roberta", ("classifier.dense.weight", "classifier.out_proj.weight"), None),
        ("distilbert", ("pre_classifier.weight", "classifier.weight"), None),
        ("electra", ("classifier.dense.weight", "classifier.out_proj.weight"), None),
    ],
)
def test_text_classifiers_take_token_ids_and_a_mask(tmp_path, kind, params, stop):
    torch.manual_seed(0)
    m = _hf(kind).eval()
    ids, mask, y = _tokens(128, 0)
    example = (torch.from_numpy(ids[:2]), torch.from_numpy(mask[:2]))
    path = _bring_in(_Logits(m), example, tmp_path / f"{kind}.onnx", inputs=("input_ids", "attention_mask"))
    dt = DeviceTrainer(path, epochs=60)
    assert dt.params == params
    feeds = {"input_ids": ids, "attention_mask": mask}
    _assert_grads(dt, _Logits(m), ids, y, feeds, attention_mask=torch.from_numpy(mask))
    if stop:
        with pytest.raises(ConfigError, match=rf"stopped at {stop} node"):
            dt.train(Arch("shira", 0.5, "tail"), feeds, y, "a")
    with pytest.raises(ConfigError, match="rejected inputs"):  # one array for a two-input model
        dt.loss_and_grads(ids, y)
    adapter = dt.train(Arch("shira", 0.5, "tail" if stop is None else "tail-head"), feeds, y, "a")
    t_ids, t_mask, t_y = _tokens(200, 1)
    test = {"input_ids": t_ids, "attention_mask": t_mask}
    with Runtime(path, strategy="bound") as rt:
        base = rt.run(test)["logits"]
        rt.load_adapter(adapter)
        rt.switch("a")
        got = rt.run(test)["logits"]
    np.testing.assert_allclose(got, dt.logits(test, adapter), atol=1e-4)
    # random encoders: the pooler's Tanh features separate the halves of the vocabulary less well than DistilBERT's
    assert (got.argmax(1) == t_y).mean() > ((base.argmax(1) == t_y).mean() + 0.08 if stop else 0.8)


def test_vit_classifier_trains_on_its_cls_token(tmp_path, digits):
    torch.manual_seed(0)
    x, y, _ = digits
    m = _hf("vit").eval()
    path = _bring_in(_Logits(m), (torch.from_numpy(x[:2]),), tmp_path / "vit.onnx", inputs=("pixel_values",))
    dt = DeviceTrainer(path, epochs=60)
    assert dt.params == ("classifier.weight",)
    _assert_grads(dt, _Logits(m), x[:64], y[:64])
    with pytest.raises(ConfigError, match="stopped at Gather node"):  # the CLS token is picked by a Gather
        dt.train(Arch("shira", 0.5, "tail"), x[:64], y[:64], "a")
    adapter = dt.train(Arch("shira", 0.5, "tail-head"), x[:300], y[:300], "a")
    xt, yt = x[300:700], y[300:700]
    assert (dt.logits(xt, adapter).argmax(1) == yt).mean() > (dt.logits(xt).argmax(1) == yt).mean() + 0.2


# -- shallow updates over the taps of a foreign CNN, from the API and the command line ------------------------------
def test_every_update_method_learns_over_the_taps(cnns, digits, tmp_path):
    _, y, xs = digits
    _, path = cnns["linear"]
    tapped = tap_model(path, tmp_path / "tapped.onnx")  # taps 'auto': the last stage, pooled (the classifier input)
    xt, yt = xs[900:1300], y[900:1300]
    with Runtime(tapped.path) as rt:
        base = (rt.run({"x": xt})["logits"].argmax(1) == yt).mean()
        for method in ("ncm", "slda", "ranpac", "shira-head"):
            extra = {"head": "classifier.weight"} if method == "shira-head" else {}
            up = Updater(rt, method, feature_output="edge.features", **extra)
            up.partial_fit(xs[700:900], y[700:900])
            assert (up.predict(xt) == yt).mean() > base + 0.2, method


@pytest.mark.parametrize(
    "variant,head", [("linear", "classifier.weight"), ("matmul-add", "w"), ("conv1x1-classifier", "classifier.weight")]
)
def test_shira_head_on_a_linear_a_matmul_and_a_1x1_conv_head(cnns, digits, tmp_path, variant, head):
    """Whatever the head's layout ([C, d], the [d, C] of x @ W, [C, d, 1, 1]), its adapter serves as it was trained."""
    _, y, xs = digits
    _, path = cnns[variant]
    tapped = tap_model(path, tmp_path / "tapped.onnx").path  # 'auto' taps: the pooled last stage, the head's input
    xt, yt = xs[900:1300], y[900:1300]
    with Runtime(tapped, strategy="bound") as rt:
        with pytest.raises(ConfigError, match=rf"head 'head.weight'.*read 32-wide features: \[.*'{head}'"):
            Updater(rt, "shira-head", feature_output="edge.features")
        up = Updater(rt, "shira-head", feature_output="edge.features", head=head)
        up.partial_fit(xs[700:900], y[700:900])
        adapter = up.to_adapter("inverted")
        assert adapter.tensors[head].indices.shape[0] == len(rt.weights(head).shape)
        base_w, base = rt.weights(head), rt.run({"x": xt})["logits"]
        rt.load_adapter(adapter)
        rt.switch("inverted")
        got = rt.run({"x": xt})["logits"]
        rt.switch(None)
        assert rt.weights(head).tobytes() == base_w.tobytes()
        want = up.scores(xt)  # over the features, which the head does not change
    np.testing.assert_allclose(got, want, atol=1e-4)  # the runtime's logits are the updater's scores
    assert (got.argmax(1) == yt).mean() > (base.argmax(1) == yt).mean() + 0.15


def _update(capsys, *args: str) -> tuple[int, list[str], str]:
    code = main(["update", *args])
    cap = capsys.readouterr()
    return code, [line for line in cap.err.splitlines() if line.strip()], cap.out


def test_cli_updates_a_foreign_model_over_its_taps(cnns, digits, tmp_path, capsys):
    """A model exported with logits only: refused in one line naming --taps; with --taps, learned, and the
    shira-head adapter (made on the tapped copy) applies to the file given."""
    _, y, xs = digits
    _, path = cnns["linear"]
    np.savez(tmp_path / "train.npz", x=xs[700:900], y=y[700:900])
    np.savez(tmp_path / "eval.npz", x=xs[900:1300], y=y[900:1300])
    data = ("--model", str(path), "--data", str(tmp_path / "train.npz"), "--eval", str(tmp_path / "eval.npz"))
    code, err, _ = _update(capsys, *data)
    assert code == 2 and len(err) == 1 and "has no output 'features'" in err[0] and "--taps auto" in err[0]
    code, err, out = _update(capsys, *data, "--taps", "auto")
    assert code == 0 and json.loads(out)["eval_acc"] > 0.6
    code, err, _ = _update(capsys, *data, "--taps", "no.such.tensor")
    assert code == 2 and len(err) == 1 and "'no.such.tensor' names no tensor" in err[0] and "pass a tap set" in err[0]
    adapter = tmp_path / "head.safetensors"
    shira = ("--method", "shira-head", "-o", "head=classifier.weight", "--adapter-out", str(adapter))
    code, err, out = _update(capsys, *data, "--taps", "stages:1", *shira)
    assert code == 0, err
    with Runtime(path) as rt:
        rt.load_adapter(adapter, name="head")
        rt.switch("head")
        acc = (rt.run({"x": xs[900:1300]})["logits"].argmax(1) == y[900:1300]).mean()
    assert acc == pytest.approx(json.loads(out)["eval_acc"])


def test_cli_updates_a_text_classifier_over_its_taps(tmp_path, capsys):
    """BERT exported with token ids and a mask, logits only: samples files hold both inputs."""
    torch.manual_seed(0)
    m = _hf("bert").eval()
    ids, mask, y = _tokens(128, 0)
    example = (torch.from_numpy(ids[:2]), torch.from_numpy(mask[:2]))
    path = _bring_in(_Logits(m), example, tmp_path / "bert.onnx", inputs=("input_ids", "attention_mask"))
    np.savez(tmp_path / "train.npz", input_ids=ids, attention_mask=mask, y=y)
    t_ids, t_mask, t_y = _tokens(200, 1)
    np.savez(tmp_path / "eval.npz", input_ids=t_ids, attention_mask=t_mask, y=t_y)
    data = ("--model", str(path), "--data", str(tmp_path / "train.npz"), "--eval", str(tmp_path / "eval.npz"))
    for method in ("ncm", "slda", "ranpac"):
        code, err, out = _update(capsys, *data, "--taps", "auto", "--method", method)
        assert code == 0 and json.loads(out)["eval_acc"] > 0.9, (method, err)
    np.savez(tmp_path / "short.npz", input_ids=ids, attention_mask=mask[:, :5], y=y)  # refused from its headers
    code, err, _ = _update(capsys, *data[:2], "--data", str(tmp_path / "short.npz"), "--taps", "auto")
    assert code == 2 and len(err) == 1 and "'attention_mask' has shape (128, 5); input 'attention_mask' takes" in err[0]


def test_headers_must_agree_on_a_shared_sequence_length():
    from edge.format.feeds import InputSpec
    from edge.format.samples import check_headers

    i64 = np.dtype(np.int64)
    specs = {n: InputSpec(n, i64, ("batch", "sequence")) for n in ("input_ids", "attention_mask")}
    headers = {"input_ids": ((4, 10), i64), "attention_mask": ((4, 5), i64), "y": ((4,), i64)}
    with pytest.raises(ConfigError, match="'sequence' is 10 in 'input_ids' but 5 in 'attention_mask'"):
        check_headers("s.npz", headers, tuple(specs), specs)
    check_headers("s.npz", {**headers, "attention_mask": ((4, 10), i64)}, tuple(specs), specs)


# -- hostile samples files for `edge update` -------------------------------------------------------------------
def _huge(path: Path, shape: tuple) -> Path:
    """An .npz whose x header declares ``shape`` over a few bytes of data."""
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape!r}, }}"
    header += " " * (63 - (len(header) + 10) % 64) + "\n"
    labels = io.BytesIO()
    np.save(labels, np.arange(4))
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + bytes(64))
        z.writestr("y.npy", labels.getvalue())
    return path


X = np.random.default_rng(0).random((20, 1, 8, 8)).astype(np.float32)
Y = np.arange(20) % 10
HOSTILE = [  # (name, arrays or a writer, what the one line says, refused from the headers alone)
    ("label out of range", dict(x=X, y=np.full(20, 10**6)), r"class indices in \[0, 100000\)", False),
    ("negative label", dict(x=X, y=-(np.arange(20) % 3)), r"class indices in \[0, 100000\), got -2", False),
    ("fractional label", dict(x=X, y=Y + 0.5), "integer class indices, got dtype float64", False),
    ("huge float label", dict(x=X, y=np.full(20, 1e30)), r"got 1e\+30\.\.1e\+30", False),
    ("NaN label", dict(x=X, y=np.full(20, np.nan)), "integer class indices", False),
    ("bool labels", dict(x=X, y=Y > 4), "integer class indices, got dtype bool", True),
    ("2-D labels", dict(x=X, y=Y[:, None]), "labels must be a 1-D array", True),
    ("fewer labels", dict(x=X, y=Y[:5]), "'x' holds 20 samples for 5 labels", True),
    ("NaN features", dict(x=np.full_like(X, np.nan), y=Y), "NaN or Inf", False),
    ("inf features", dict(x=np.full_like(X, np.inf), y=Y), "NaN or Inf", False),
    ("wrong width", dict(x=X[:, :, :4], y=Y), r"'x' has shape \(20, 1, 4, 8\); input 'x' takes \[N, 1, 8, 8\]", True),
    ("wrong rank", dict(x=X.reshape(20, -1), y=Y), r"takes \[N, 1, 8, 8\]", True),
    ("float64 features", dict(x=X.astype(np.float64), y=Y), "'x' is float64; input 'x' takes float32", True),
    ("zero samples", dict(x=X[:0], y=Y[:0]), "no samples given", False),
    ("huge count", lambda p: _huge(p, (10**12, 1, 8, 8)), "arrays would take 256000000000000 bytes", True),
    ("negative count", lambda p: _huge(p, (-5, 1, 8, 8)), r"declares shape \(-5, 1, 8, 8\)", True),
]


@pytest.mark.parametrize("arrays,match,early", [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_samples_exit_2_with_one_line(cnns, tmp_path, capsys, monkeypatch, arrays, match, early):
    _, path = cnns["two-outputs"]  # 'features' is the classifier's input: every method applies
    data = tmp_path / "d.npz"
    arrays(data) if callable(arrays) else np.savez(data, **arrays)
    loaded = []
    read = np.lib.format.read_array
    monkeypatch.setattr(np.lib.format, "read_array", lambda *a, **k: loaded.append(1) or read(*a, **k))
    for method in ("slda", "shira-head"):
        extra = ("-o", "head=classifier.weight") if method == "shira-head" else ()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a cast that wraps or overflows warns: none may happen
            code, err, _ = _update(capsys, "--model", str(path), "--data", str(data), "--method", method, *extra)
        assert code == 2 and len(err) == 1 and any(re.search(match, line) for line in err), err
        assert not (early and loaded), "refused only after its arrays were loaded"


def test_one_class_is_learned_not_refused(cnns, tmp_path, capsys):
    """A single class is a valid update (classes are added over updates); it must not break the state."""
    _, path = cnns["two-outputs"]
    np.savez(tmp_path / "one.npz", x=X, y=np.zeros(20, np.int64))
    code, _, out = _update(capsys, "--model", str(path), "--data", str(tmp_path / "one.npz"), "--method", "ncm")
    assert code == 0 and json.loads(out)["classes"] == [0]
