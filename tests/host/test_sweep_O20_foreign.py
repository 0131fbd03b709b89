"""A user's own ONNX files, exported by plain ``torch.onnx.export``, walked the way the README tells a user to.

The fast tests are the reproductions of what the sweep found: ``edge update --method shira-head`` on an imported
model that outputs an embedding (no classifier head) told the user to "pass head=NAME", listing feed-forward
weights as candidate heads (ConvBERT, wav2vec2) or none at all (SqueezeBERT); there is no head to train there.
The slow test keeps the sweep itself: Hugging Face encoders built from config classes (random weights) exported
by both torch exporters with a pooled output, and a MobileNetV2-like CNN exported in train mode, imported with
their state dicts, run against onnxruntime on the original file, tapped, updated and switched exactly.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
from safetensors.numpy import save_file  # noqa: E402
from torch import nn  # noqa: E402

from edge.cli import main  # noqa: E402
from edge.convert.onnx_import import import_onnx  # noqa: E402
from edge.errors import ConfigError  # noqa: E402
from edge.format.adapter import Adapter, SparseDelta  # noqa: E402
from edge.runtime import Runtime  # noqa: E402


class Embedder(nn.Module):
    """An encoder block whose output is the token-mean embedding: no classifier head."""

    def __init__(self):
        super().__init__()
        self.block = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)

    def forward(self, x):
        return self.block(x).mean(1)


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    """The embedding model exported by torch's legacy exporter, imported, with labelled samples beside it."""
    d = tmp_path_factory.mktemp("embedder")
    torch.manual_seed(0)
    model = Embedder().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.randn(2, 4, 16),),
            str(d / "raw.onnx"),
            dynamo=False,
            opset_version=17,
            input_names=["x"],
            output_names=["emb"],
            dynamic_axes={"x": {0: "b"}},
        )
    import_onnx(d / "raw.onnx", d / "m.onnx")
    rng = np.random.default_rng(0)
    np.savez(d / "d.npz", x=rng.standard_normal((12, 4, 16)).astype(np.float32), y=np.arange(12) % 3)
    return d


def _update(d, capsys, *extra) -> str:
    argv = ["update", "--model", str(d / "m.onnx"), "--data", str(d / "d.npz"), "--method", "shira-head"]
    assert main([*argv, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err  # one line, no traceback
    return err


def test_shira_head_on_an_embedding_model_says_there_is_no_head_to_train(embedder, capsys):
    err = _update(embedder, capsys, "--taps", "auto")
    assert "trains the head 'head.weight', a classifier's, and model 'raw' has no such tensor and no logits" in err
    assert "(its outputs: ['emb', 'edge.features']" in err, err
    assert "a model that outputs embeddings has no head to train, use ncm, slda or ranpac" in err, err
    assert "-o head=NAME -o logit_output=NAME" in err, err  # for a model that does have a head
    # the same over the model's own embedding as features: no tensor reads 16-wide features save the block's own
    err = _update(embedder, capsys, "-o", "feature_output=emb")
    assert "no head to train" in err and "16-wide features: [" in err, err
    assert (
        main(
            [
                "update",
                "--model",
                str(embedder / "m.onnx"),
                "--data",
                str(embedder / "d.npz"),
                "--method",
                "ncm",
                "-o",
                "feature_output=emb",
                "-q",
            ]
        )
        == 0
    )  # what the refusal says to use works


def test_a_missing_head_is_named_only_when_some_tensor_could_be_one(embedder):
    from edge.learn.shira_head import head_context
    from edge.learn.update import Updater

    with Runtime(embedder / "m.onnx") as rt:
        with pytest.raises(ConfigError) as e:  # a logits output named: the block's Linears read its 16-wide features
            Updater(rt, method="shira-head", feature_output="emb", logit_output="emb", head="fc.weight")
        msg = str(e.value)
        assert "cannot rewrite" in msg and "'fc.weight'" in msg and "16-wide features: [" in msg, msg
        assert "pass head=NAME" in msg, msg
        with pytest.raises(ConfigError) as e:  # no tensor reads 7-wide features: no name would do
            head_context(rt, "fc.weight", 7, "emb")
    msg = str(e.value)
    assert "none of its tensors reads the 7-wide features given" in msg and "ncm, slda or ranpac" in msg, msg
    assert "pass head=NAME (edge update" not in msg, msg


class Pools(nn.Module):
    """Funnel's shape in small: a norm over 8 tokens, the sequence pooled to 4, a norm over those, masked mean."""

    def __init__(self):
        super().__init__()
        self.a, self.ln1, self.ln2 = nn.Linear(8, 8), nn.LayerNorm(8), nn.LayerNorm(8)

    def forward(self, x, attention_mask):
        h = self.ln2(self.ln1(self.a(x)).reshape(-1, 4, 2, 8).mean(2))
        w = attention_mask[:, ::2].unsqueeze(-1).float()
        return (h * w).sum(1) / w.sum(1)


def test_a_pooled_tap_refused_under_the_mask_names_the_taps_the_cli_can_take(tmp_path, capsys):
    """`edge update --taps auto` on Funnel said only "pass mask=None", which the command line cannot pass."""
    import onnx

    from edge.route.taps import tap_model

    torch.manual_seed(0)
    feeds = (torch.randn(2, 8, 8), torch.ones(2, 8, dtype=torch.long))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Pools().eval(),
            feeds,
            str(tmp_path / "raw.onnx"),
            dynamo=False,
            opset_version=17,
            input_names=["x", "attention_mask"],
            output_names=["emb"],
            dynamic_axes={"x": {0: "b"}, "attention_mask": {0: "b"}},
        )
    import_onnx(tmp_path / "raw.onnx", tmp_path / "m.onnx")
    g = onnx.load(str(tmp_path / "m.onnx")).graph
    eight, four = (n.output[0] for n in g.node if n.op_type == "LayerNormalization")
    with pytest.raises(ConfigError) as e:
        tap_model(tmp_path / "m.onnx", tmp_path / "t.onnx", [four, eight])
    msg = str(e.value)
    assert f"tap {four!r}" in msg and "has 4 positions where the mask 'attention_mask' has 8" in msg, msg
    assert msg.endswith(f"(of those given: {eight}; edge update: --taps {eight})"), msg
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, attention_mask=np.ones((12, 8), np.int64), y=np.arange(12) % 3)
    argv = ["update", "--model", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz"), "--method", "ncm"]
    assert main([*argv, "--taps", f"{four},{eight}"]) == 2
    assert f"edge update: --taps {eight})" in capsys.readouterr().err
    assert main([*argv, "--taps", eight, "-q"]) == 0  # what it names works


# -- the sweep (slow: Hugging Face models and both exporters) ---------------------------------------------------
def _hf(family: str):
    import transformers as T

    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    if family == "convbert":
        return T.ConvBertModel(T.ConvBertConfig(vocab_size=100, embedding_size=32, **small)), "text"
    if family == "squeezebert":
        return T.SqueezeBertModel(T.SqueezeBertConfig(vocab_size=100, embedding_size=32, **small)), "text"
    if family == "convnextv2":
        cfg = T.ConvNextV2Config(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], image_size=32)
        return T.ConvNextV2Model(cfg), "vision"
    cfg = T.Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16, 16),
        conv_stride=(5, 2),
        conv_kernel=(10, 3),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
    )
    return T.Wav2Vec2Model(cfg), "audio"


class Pooled(nn.Module):
    def __init__(self, model, kind):
        super().__init__()
        self.m, self.kind = model, kind

    def forward(self, *args):
        if self.kind == "text":
            h, w = self.m(input_ids=args[0], attention_mask=args[1]).last_hidden_state, args[1].unsqueeze(-1).float()
            return (h * w).sum(1) / w.sum(1)
        if self.kind == "vision":
            return self.m(pixel_values=args[0]).pooler_output
        return self.m(input_values=args[0]).last_hidden_state.mean(1)


class Inverted(nn.Module):
    def __init__(self, c, stride=1):
        super().__init__()
        h, self.res = 2 * c, stride == 1
        self.b = nn.Sequential(
            nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
            nn.Conv2d(h, h, 3, stride, 1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
            nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c),
        )  # fmt: skip

    def forward(self, x):
        return x + self.b(x) if self.res else self.b(x)


def _cnn():
    stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
    m = nn.Sequential(stem, Inverted(8), Inverted(8, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2)
    return m


def _inputs(kind, n, seed):
    rng = np.random.default_rng(seed)
    if kind == "text":
        return {"input_ids": rng.integers(0, 100, (n, 8)), "attention_mask": np.ones((n, 8), np.int64)}
    shape = {"vision": (3, 32, 32), "audio": (1600,), "cnn": (3, 16, 16)}[kind]
    name = {"vision": "pixel_values", "audio": "input_values", "cnn": "x"}[kind]
    return {name: rng.standard_normal((n, *shape)).astype(np.float32)}


SWEEP = [
    *((f, e) for f in ("convbert", "squeezebert", "convnextv2", "wav2vec2") for e in ("legacy", "dynamo")),
    ("cnn-train", "legacy"),  # training=TrainingMode.TRAINING: BatchNormalization in training mode, batch statistics
    ("cnn-train", "dynamo"),  # a module in train mode: torch exports it in eval mode, the BatchNorms folded
]


@pytest.mark.slow
@pytest.mark.parametrize("family,exporter", SWEEP, ids=[f"{f}-{e}" for f, e in SWEEP])
def test_a_plain_torch_export_imports_runs_taps_updates_and_switches(family, exporter, tmp_path, capsys):
    from edge.route.taps import tap_model

    torch.manual_seed(0)
    if family == "cnn-train":
        model, kind = _cnn().train(), "cnn"
    else:
        encoder, kind = _hf(family)
        model = Pooled(encoder.eval(), kind).eval()
    feeds = _inputs(kind, 2, 1)
    args, names = tuple(torch.from_numpy(v) for v in feeds.values()), list(feeds)
    save_file({k: v.detach().numpy().copy() for k, v in model.state_dict().items() if v.is_floating_point()},
              str(tmp_path / "sd.safetensors"))  # fmt: skip
    raw = tmp_path / "raw.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            torch.onnx.export(model, args, None, dynamo=True, opset_version=18, input_names=names,
                              output_names=["out"]).save(str(raw))  # fmt: skip
        else:
            mode = torch.onnx.TrainingMode.TRAINING if kind == "cnn" else torch.onnx.TrainingMode.EVAL
            torch.onnx.export(model, args, str(raw), dynamo=False, opset_version=17, input_names=names,
                              output_names=["out"], training=mode, do_constant_folding=kind != "cnn")  # fmt: skip
    assert main(["import-onnx", str(raw), "--out", str(tmp_path / "m.onnx"), "--state-dict",
                 str(tmp_path / "sd.safetensors")]) == 0  # fmt: skip
    assert main(["inspect", str(tmp_path / "m.onnx")]) == 0
    capsys.readouterr()
    want = ort.InferenceSession(str(raw), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    with Runtime(tmp_path / "m.onnx", strategy="rebuild") as rt:
        info, base = rt.info, rt.run(feeds)["out"]
        np.testing.assert_allclose(base, want, rtol=0, atol=1e-5 * max(1.0, float(np.abs(want).max())))
        rng = np.random.default_rng(0)
        deltas = {}
        for k, t in info.tensors.items():
            flat = rng.choice(int(np.prod(t.shape)), size=2, replace=False)
            deltas[k] = SparseDelta(np.stack(np.unravel_index(flat, t.shape)).astype(np.int32), np.float32([0.3, -0.2]))
        before = {k: np.ascontiguousarray(rt.weights(k)).copy() for k in info.tensors}
        rt.load_adapter(Adapter("a", info.fingerprint, deltas, {k: tuple(t.shape) for k, t in info.tensors.items()}))
        rt.switch("a")
        assert np.abs(rt.run(feeds)["out"] - base).max() > 1e-4
        rt.switch(None)
        for k in before:
            assert np.array_equal(before[k].view(np.uint32), np.ascontiguousarray(rt.weights(k)).view(np.uint32)), k
        np.testing.assert_array_equal(rt.run(feeds)["out"], base)
    tapped = tap_model(tmp_path / "m.onnx", tmp_path / "t.onnx", "auto")
    with Runtime(tapped.path) as rt:
        assert np.isfinite(rt.run(feeds)["edge.features"]).all()
    np.savez(tmp_path / "d.npz", **_inputs(kind, 12, 2), y=np.arange(12) % 3)
    assert main(["update", "--model", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz"), "--method", "ncm",
                 "--taps", "auto", "-q"]) == 0  # fmt: skip
    assert main(["profile", str(tmp_path / "m.onnx"), "--device", "x86-dev", "--runs", "2", "--warmup", "1"]) == 0
