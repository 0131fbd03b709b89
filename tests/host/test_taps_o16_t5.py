"""Taps on RMSNorm encoders: T5's encoder (sentence-T5, flan-T5) writes its norm out as ops, ``torch.nn.RMSNorm``
exports as ops below opset 23 and as one ``RMSNormalization`` node from it.

``auto`` taps such an encoder per block as it does BERT (the residual stream after each block's attention), pooled
over the real tokens: the same numbers as pooling torch's hidden states by the attention mask.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
T = pytest.importorskip("transformers")

from edge.route.tapnorms import norms  # noqa: E402
from edge.route.taps import FEATURES, tap_model  # noqa: E402
from edge.route.tapsets import resolve_tap_set  # noqa: E402

LAYERS, WIDTH = 2, 32


def _t5():
    """A small random T5 encoder, its norm weights moved off 1 so that a tap on the wrong side of a norm shows."""
    torch.manual_seed(0)
    config = T.T5Config(vocab_size=60, d_model=WIDTH, d_kv=16, d_ff=64, num_layers=LAYERS, num_heads=2,
                        relative_attention_num_buckets=8)  # fmt: skip
    m = T.T5EncoderModel(config).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    from exporters.hf import export_hf_encoder

    m = _t5()
    path = tmp_path_factory.mktemp("t5") / "t5.onnx"
    export_hf_encoder(m, path, pooling="mean", seq_len=12, dynamic_seq=True, attention="decomposed", progress=False)
    return m, path


def _batch():
    """Two sentences, 5 and 8 tokens, padded to 8 (T5's pad id is 0)."""
    ids = torch.randint(1, 60, (2, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[0, 5:], mask[0, 5:] = 0, 0
    return ids, mask


def _run(path, ids, mask):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run([FEATURES], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]


def _after_attention(m, ids, mask) -> np.ndarray:
    """Torch's residual stream after each block's attention, averaged over the real tokens, concatenated."""
    seen = []
    hooks = [b.layer[0].register_forward_hook(lambda _m, _i, out: seen.append(out[0])) for b in m.encoder.block]
    try:
        with torch.no_grad():
            m(input_ids=ids, attention_mask=mask)
    finally:
        for h in hooks:
            h.remove()
    w = mask.float()[:, :, None]
    return torch.cat([(h * w).sum(1) / w.sum(1) for h in seen], 1).numpy()


@pytest.mark.slow  # the dynamo export: ~17 s cold
def test_auto_taps_t5_per_block_over_real_tokens(t5, tmp_path):
    m, path = t5
    model = onnx.load(str(path))
    assert len(norms(model)) == 2 * LAYERS + 1  # two per block and the final norm
    taps, used = resolve_tap_set(model, "auto")
    assert used == "auto (attn)" and len(taps) == LAYERS
    tapped = tap_model(path, tmp_path / "t5.taps.onnx")
    assert tapped.width == LAYERS * WIDTH
    ids, mask = _batch()
    got = _run(tapped.path, ids, mask)
    np.testing.assert_allclose(got, _after_attention(m, ids, mask), rtol=1e-4, atol=1e-5)
    alone = _run(tapped.path, ids[:1, :5], mask[:1, :5])  # the short sentence unpadded: the same features
    np.testing.assert_allclose(alone[0], got[0], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_t5_other_norm_sets(t5, tmp_path):
    _, path = t5
    for name, count in (("attn-in", LAYERS), ("mlp-in", LAYERS), ("blocks", LAYERS), ("all", 2 * LAYERS)):
        assert len(resolve_tap_set(onnx.load(str(path)), name)[0]) == count, name
    tapped = tap_model(path, tmp_path / "t5.mlp.onnx", "mlp-in:1")
    ids, mask = _batch()
    assert _run(tapped.path, ids, mask).shape == (2, WIDTH)


def test_t5_torchscript_export(tmp_path):
    """The TorchScript exporter writes the inverse root as ``Div(1, Sqrt)`` and the statistics behind a Cast."""
    m = _t5()

    class Hidden(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask)[0]

    ids, mask = _batch()
    path = tmp_path / "t5.ts.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Hidden().eval(), (ids, mask), str(path), dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask"], output_names=["h"],
                          dynamic_axes={k: {0: "b", 1: "t"} for k in ("input_ids", "attention_mask", "h")})  # fmt: skip
    tapped = tap_model(path, tmp_path / "t5.ts.taps.onnx")
    assert tapped.tap_set == "auto (attn)" and len(tapped.tensors) == LAYERS
    np.testing.assert_allclose(_run(tapped.path, ids, mask), _after_attention(m, ids, mask), rtol=1e-4, atol=1e-5)


class _RMS(torch.nn.Module):
    """Two pre-norm residual blocks on ``torch.nn.RMSNorm`` and a final norm."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(60, 16)
        self.norms = torch.nn.ModuleList(torch.nn.RMSNorm(16) for _ in range(3))
        self.lins = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(2))
        with torch.no_grad():
            for n in self.norms:
                n.weight.add_(0.3 * torch.randn_like(n.weight))

    def forward(self, input_ids, attention_mask):
        x, seen = self.emb(input_ids), []
        for norm, lin in zip(self.norms, self.lins):
            x = x + lin(norm(x))
            seen.append(x)
        return self.norms[-1](x), seen


@pytest.mark.slow
@pytest.mark.parametrize("opset", [20, 23])  # 23: one RMSNormalization node; 20: written out, ReduceMean axes [2]
def test_torch_rmsnorm(tmp_path, opset):
    from exporters.onnx import export_onnx

    class Out(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids, attention_mask)[0]

    m = _RMS().eval()
    ids, mask = _batch()
    path = tmp_path / f"rms{opset}.onnx"
    export_onnx(Out(m).eval(), (ids, mask), path, input_names=["input_ids", "attention_mask"], output_names=["h"],
                name="rms", opset=opset, progress=False)  # fmt: skip
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert ("RMSNormalization" in ops) == (opset >= 23)
    tapped = tap_model(path, tmp_path / f"rms{opset}.taps.onnx", "all")
    assert len(tapped.tensors) == 2
    with torch.no_grad():
        seen = m(ids, mask)[1]
    w = mask.float()[:, :, None]
    want = torch.cat([(h * w).sum(1) / w.sum(1) for h in seen], 1).numpy()
    np.testing.assert_allclose(_run(tapped.path, ids, mask), want, rtol=1e-4, atol=1e-5)


def test_a_mean_over_other_axes_is_no_norm(tmp_path):
    """The RMS pattern over the token axis (not the channels) is some other op: no norm, no taps by guess."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4, 8])
    nodes = [
        helper.make_node("Constant", [], ["two"], value=helper.make_tensor("t", TensorProto.FLOAT, [], [2.0])),
        helper.make_node("Constant", [], ["ax"], value=helper.make_tensor("a", TensorProto.INT64, [1], [1])),
        helper.make_node("Constant", [], ["eps"], value=helper.make_tensor("e", TensorProto.FLOAT, [], [1e-6])),
        helper.make_node("Pow", ["x", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "ax"], ["mean"]),
        helper.make_node("Add", ["mean", "eps"], ["var"]),
        helper.make_node("Sqrt", ["var"], ["root"]),
        helper.make_node("Reciprocal", ["root"], ["inv"]),
        helper.make_node("Mul", ["x", "inv"], ["y"]),
    ]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4, 8])
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 20)])
    assert norms(model) == []
    nodes[1] = helper.make_node("Constant", [], ["ax"], value=helper.make_tensor("a", TensorProto.INT64, [1], [-1]))
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 20)])
    assert norms(model) == [("x", "y")]


@pytest.mark.parametrize("op", ["RMSNormalization", "SimplifiedLayerNormalization"])
def test_one_node_rms_norms(op):
    """onnx's ``RMSNormalization`` (opset 23) and onnxruntime's ``SimplifiedLayerNormalization`` are norms too."""
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4, 8])
    scale = numpy_helper.from_array(np.ones(8, np.float32), "scale")
    nodes = [helper.make_node(op, ["x", "scale"], ["y"], axis=-1)]
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=[scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    assert norms(model) == [("x", "y")]
