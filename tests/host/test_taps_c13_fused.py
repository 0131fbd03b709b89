"""Tap sets on files as users hold them: saved by onnxruntime's optimizer, and MobileViT's folded tokens.

A model tapped before and after ``optimized_model_filepath`` (level EXTENDED: ``FusedConv``, ``BiasGelu``,
``FusedMatMul``, ``SkipLayerNormalization`` in the saved graph) gets the same pooled features from every tap set that
finds taps in the unoptimised file. ``auto`` passes over a set whose rows are not the inputs for the next one.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

from edge.route.taps import FEATURES, tap_model  # noqa: E402
from edge.route.tapsets import SUM_PREFIX  # noqa: E402
from edge.route.tapshapes import tensor_shapes  # noqa: E402

D = 16


class CNN(torch.nn.Module):
    """Conv+BN+ReLU, a strided conv, a residual block, a strided conv with GELU: three resolutions."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.c2 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.c3 = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.c4 = torch.nn.Conv2d(16, 24, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(24, 4)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.c2(x))
        x = x + torch.relu(self.c3(x))
        return self.fc(torch.nn.functional.gelu(self.c4(x)).mean((2, 3)))


class Block(torch.nn.Module):
    def __init__(self, pre: bool):
        super().__init__()
        self.pre, self.n1, self.n2 = pre, torch.nn.LayerNorm(D), torch.nn.LayerNorm(D)
        self.qkv, self.o = torch.nn.Linear(D, 3 * D), torch.nn.Linear(D, D)
        self.f1, self.f2 = torch.nn.Linear(D, 2 * D), torch.nn.Linear(2 * D, D)

    def attn(self, h):
        q, k, v = self.qkv(h).chunk(3, -1)
        return self.o(torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1) @ v)

    def mlp(self, h):
        return self.f2(torch.nn.functional.gelu(self.f1(h)))

    def forward(self, x):
        if self.pre:  # ViT: x + f(norm(x))
            x = x + self.attn(self.n1(x))
            return x + self.mlp(self.n2(x))
        x = self.n1(x + self.attn(x))  # BERT: norm(x + f(x)), which onnxruntime fuses into SkipLayerNormalization
        return self.n2(x + self.mlp(x))


class Transformer(torch.nn.Module):
    def __init__(self, pre: bool):
        super().__init__()
        self.emb, self.n = torch.nn.Linear(12, D), torch.nn.LayerNorm(D)
        self.blocks = torch.nn.ModuleList([Block(pre), Block(pre)])
        self.head = torch.nn.Linear(D, 3)

    def forward(self, x):
        x = self.n(self.emb(x))
        for b in self.blocks:
            x = b(x)
        return self.head(x.mean(1))


def _export(model, example, path, opset: int):
    """``model`` exported by torch.onnx.export, and the same file saved by onnxruntime at EXTENDED."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # away from the default init: norms' scales and biases not 1 and 0
            p.add_(0.1 * torch.randn_like(p))
    model.eval()
    if opset >= 18:  # the dynamo exporter: onnxruntime fuses its post-LN residual Adds into SkipLayerNormalization
        batch = {0: torch.export.Dim("batch")}
        torch.onnx.export(
            model, (example,), str(path), input_names=["x"], output_names=["logits"], dynamic_shapes=(batch,),
            opset_version=opset, dynamo=True, verbose=False,
        )  # fmt: skip
    else:
        torch.onnx.export(
            model, (example,), str(path), input_names=["x"], output_names=["logits"],
            dynamic_axes={"x": {0: "batch"}}, opset_version=opset, dynamo=False,
        )  # fmt: skip
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(path.with_suffix(".opt.onnx"))
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return path, path.with_suffix(".opt.onnx")


def _features(path, out, taps, x) -> tuple[tuple, np.ndarray]:
    tapped = tap_model(path, out, taps)
    session = ort.InferenceSession(str(tapped.path), providers=["CPUExecutionProvider"])
    return tapped.tensors, session.run([FEATURES], {"x": x})[0]


def _contrib_ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node if n.domain == "com.microsoft"}


def _same_features(plain, optimised, tmp_path, tap_set, x) -> tuple:
    (a_taps, a), (b_taps, b) = (
        _features(p, tmp_path / f"{k}.onnx", tap_set, x) for k, p in enumerate((plain, optimised))
    )
    assert a.shape == b.shape == (len(x), a.shape[1]) and a.shape[1] > 0
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    return a_taps, b_taps


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    torch.manual_seed(0)
    return _export(CNN(), torch.randn(1, 3, 16, 16), tmp_path_factory.mktemp("cnn") / "m.onnx", 17)


@pytest.mark.parametrize("tap_set", ["auto", "first", "stages", "residual", "stages:2"])
def test_a_cnn_saved_by_onnxruntimes_optimizer_gets_the_same_stage_taps(cnn, tmp_path, tap_set):
    plain, optimised = cnn
    assert "FusedConv" in _contrib_ops(optimised)  # its convs fused with their activations (no stage before)
    x = np.random.default_rng(1).standard_normal((3, 3, 16, 16)).astype(np.float32)
    a, b = _same_features(plain, optimised, tmp_path, tap_set, x)
    assert a == b  # the fused node writes the activation's tensor: the same names


@pytest.fixture(scope="module", params=[("pre", 17), ("pre", 14), ("post", 18)], ids=lambda p: f"{p[0]}-ln-opset{p[1]}")
def transformer(request, tmp_path_factory):
    kind, opset = request.param
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp(f"{kind}{opset}")
    return kind, *_export(Transformer(kind == "pre"), torch.randn(1, 5, 12), d / "m.onnx", opset)


@pytest.mark.parametrize("tap_set", ["auto", "first", "attn", "attn-in", "mlp-in", "blocks", "all", "attn-in:1"])
def test_a_transformer_saved_by_onnxruntimes_optimizer_gets_the_same_taps(transformer, tmp_path, tap_set):
    kind, plain, optimised = transformer
    fused = _contrib_ops(optimised)  # shapes behind these were unknown to onnx's inference
    want = {"FusedMatMul", "SkipLayerNormalization"} if kind == "post" else {"FusedMatMul", "BiasGelu"}
    assert want <= fused, fused  # post-LN: the residual Add inside the fused norm, its sum not kept
    x = np.random.default_rng(2).standard_normal((4, 5, 12)).astype(np.float32)
    a, b = _same_features(plain, optimised, tmp_path, tap_set, x)
    assert len(a) == len(b)
    if kind == "post" and tap_set in ("attn", "blocks", "all"):  # the sums the fused norms took in
        assert any(t.startswith(SUM_PREFIX) for t in b), b


def test_shape_inference_leaves_no_files_in_the_working_folder(tmp_path, monkeypatch):
    """onnxruntime's ``SymbolicShapeInference.infer_shapes`` saves ``sym_shape_infer_temp.onnx`` and its data files
    into the working folder when it cannot size every tensor (here: an op of an unknown domain)."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Mystery", ["r"], ["m"], domain="my.ops"),
        helper.make_node("Relu", ["m"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.ops", 1)])
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    shapes = tensor_shapes(model)
    assert shapes["r"] == ("batch", 4) and "m" not in shapes
    assert sorted(p.name for p in work.iterdir()) == []


@pytest.mark.slow  # 18-45 s for one MobileViT export; test_hf_matrix's MobileViT taps (slow too) check the same pass
def test_auto_on_mobilevit_passes_over_its_folded_tokens_and_says_which_set_it_took(tmp_path, caplog):
    from test_hf_families import FAMILIES, build

    from exporters.hf import export_hf_encoder

    model, side = build("mobilevit"), FAMILIES["mobilevit"][1]
    export_hf_encoder(model, tmp_path / "m.onnx", image_size=side, progress=False)
    with caplog.at_level(logging.WARNING, logger="edge.route.tapsets"):
        tapped = tap_model(tmp_path / "m.onnx", tmp_path / "t.onnx", "auto")
    assert tapped.tap_set == "auto (stages)"
    assert "'attn' taps" in caplog.text and "'4*batch', not the batch; tapping 'stages' instead" in caplog.text
    props = {p.key: p.value for p in onnx.load(str(tapped.path)).metadata_props}
    assert props["edge.route.tapset"] == "auto (stages)" and props["edge.route.taps"] == ",".join(tapped.tensors)
    x = np.random.default_rng(0).standard_normal((5, 3, side, side)).astype(np.float32)
    f = ort.InferenceSession(str(tapped.path), providers=["CPUExecutionProvider"]).run([FEATURES], {"pixel_values": x})
    assert f[0].shape == (5, tapped.width) and np.isfinite(f[0]).all()  # one row per input


def test_a_file_saved_at_level_all_is_refused_saying_what_to_tap_instead(cnn, tmp_path):
    from edge.errors import ConfigError

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp_path / "all.onnx")
    ort.InferenceSession(str(cnn[0]), so, providers=["CPUExecutionProvider"])
    with pytest.raises(
        ConfigError, match="NCHWc layout .*tap the file before optimisation, or one saved at ORT_ENABLE_"
    ):
        tap_model(tmp_path / "all.onnx", tmp_path / "t.onnx", "auto")
