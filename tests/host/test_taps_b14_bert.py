"""Taps on a BERT file fused by onnxruntime's transformer optimizer (``optimize_model(model_type="bert")``).

The optimizer writes ``EmbedLayerNormalization`` (the embeddings' sum and norm, and a mask index),
``SkipLayerNormalization`` (a residual sum and its norm), ``Attention`` and ``BiasGelu``. Every tap set that finds
taps in the file before it gives the same pooled features after it, averaged over the real tokens only (the
``attention_mask`` input still marks them), or is refused naming the fused op.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
T = pytest.importorskip("transformers")

from edge.route.taps import FEATURES, tap_model  # noqa: E402
from edge.route.tapsets import SUM_PREFIX  # noqa: E402

HIDDEN, HEADS = 32, 2
SETS = ["auto", "first", "attn", "attn-in", "mlp-in", "blocks", "all", "attn-in:1"]
NAMES = ("input_ids", "attention_mask", "token_type_ids")


def _bert():
    """A small random BERT (eager attention: the form onnxruntime's fusions match), scales and biases moved off
    their initial 1 and 0 so that a wrongly placed norm would show."""
    torch.manual_seed(0)
    config = T.BertConfig(vocab_size=60, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS,
                          intermediate_size=64, max_position_embeddings=32, attn_implementation="eager")  # fmt: skip
    m = T.BertModel(config).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


class _Hidden(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.m(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)[0]


def _optimised(path):
    from onnxruntime.transformers.optimizer import optimize_model

    out = path.with_suffix(".opt.onnx")
    optimize_model(str(path), model_type="bert", num_heads=HEADS, hidden_size=HIDDEN).save_model_to_file(str(out))
    return out


@pytest.fixture(scope="module")
def legacy(tmp_path_factory):
    """Exported as most BERT files are (torch.onnx.export, TorchScript, opset 17), and that file optimised."""
    path = tmp_path_factory.mktemp("bert") / "bert.onnx"
    ids = torch.randint(5, 60, (2, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Hidden(_bert()), (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(path),
                          dynamo=False, opset_version=17, input_names=list(NAMES), output_names=["h"],
                          dynamic_axes={k: {0: "b", 1: "t"} for k in (*NAMES, "h")})  # fmt: skip
    return path, _optimised(path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The project's HF exporter's file (dynamo, opset 20), and that file optimised."""
    from exporters.hf import export_hf_encoder

    path = tmp_path_factory.mktemp("bert-hf") / "bert.onnx"
    export_hf_encoder(_bert(), path, pooling="mean", seq_len=12, dynamic_seq=True, attention="decomposed",
                      progress=False)  # fmt: skip
    return path, _optimised(path)


def _ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node if n.domain == "com.microsoft"}


def _padded(rows: list[np.ndarray], length: int) -> dict[str, np.ndarray]:
    ids = np.zeros((len(rows), length), np.int64)
    mask = np.zeros_like(ids)
    for i, s in enumerate(rows):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def _run(path, feeds) -> np.ndarray:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in s.get_inputs()}
    return s.run([FEATURES], {k: v for k, v in feeds.items() if k in names})[0]


def _same(plain, optimised, tmp_path, tap_set):
    rng = np.random.default_rng(0)
    a, b = rng.integers(5, 60, 5), rng.integers(5, 60, 9)
    feeds = _padded([a, b], 11)  # padded rows: masked mean pooling must see the attention mask
    p, o = (tap_model(f, tmp_path / f"{k}.onnx", tap_set) for k, f in enumerate((plain, optimised)))
    want, got = _run(p.path, feeds), _run(o.path, feeds)
    assert got.shape == want.shape == (2, p.width) and len(p.tensors) == len(o.tensors)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    alone = _run(o.path, _padded([a], 5))  # the row alone, unpadded: its padding changed nothing
    np.testing.assert_allclose(got[0], alone[0], rtol=1e-5, atol=1e-5)
    return o


@pytest.mark.parametrize("tap_set", SETS)
def test_a_bert_fused_into_embed_and_skip_layer_norms_gets_the_same_masked_features(legacy, tmp_path, tap_set):
    plain, optimised = legacy
    assert {"EmbedLayerNormalization", "SkipLayerNormalization", "Attention"} <= _ops(optimised)
    tapped = _same(plain, optimised, tmp_path, tap_set)
    if tap_set in ("attn-in", "attn-in:1"):  # block 0's normalised input: EmbedLayerNormalization's output
        node = next(n for n in onnx.load(str(optimised)).graph.node if n.op_type == "EmbedLayerNormalization")
        assert tapped.tensors[0] == node.output[0]
    if tap_set in ("attn", "all"):  # the sums the fused norms took in, restored as outputs
        assert any(t.startswith(SUM_PREFIX) for t in tapped.tensors), tapped.tensors


@pytest.mark.parametrize("tap_set", SETS)
def test_the_hf_exporters_bert_optimised_gets_the_same_masked_features(exported, tmp_path, tap_set):
    plain, optimised = exported
    assert "SkipLayerNormalization" in _ops(optimised)
    _same(plain, optimised, tmp_path, tap_set)


def test_a_tap_behind_a_fused_op_of_unknown_shape_is_refused_naming_it(legacy, tmp_path):
    """An ``Attention`` whose values are not as wide as its input (``qkv_hidden_sizes``): no shape rule, so the
    norms after it have no known width, and the refusal names the fused op."""
    from onnx import helper

    from edge.errors import ConfigError

    m = onnx.load(str(legacy[1]))
    for n in m.graph.node:
        if n.op_type == "Attention":
            n.attribute.append(helper.make_attribute("qkv_hidden_sizes", [HIDDEN, HIDDEN, HIDDEN // 2]))
    onnx.save(m, tmp_path / "m.onnx")
    with pytest.raises(ConfigError, match="fused Attention leave the shapes after them unknown: tap the file before"):
        tap_model(tmp_path / "m.onnx", tmp_path / "t.onnx", "attn")
