"""Attention exported as one ai.onnx Attention node (opset 23) keeps every adapter target writable in place.

A tiny BERT exported ``fused`` and ``decomposed``: the graph forms, what onnxruntime's own optimizer
makes of them at session load, and a SHiRA-style switch on q/k/v/output weights under every
onnxruntime strategy, against torch with the delta merged, undone bit-exactly.
"""

from __future__ import annotations

import collections
import copy

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
T = pytest.importorskip("transformers")

from edge.errors import ConfigError  # noqa: E402
from edge.format.adapter import Adapter, SparseDelta  # noqa: E402
from edge.runtime import Runtime  # noqa: E402
from runtimes import get_backend  # noqa: E402

LAYERS, SEQ = 2, 8
TARGETS = [f"encoder.layer.{i}.attention.{m}.weight" for i in range(LAYERS) for m in ("self.query", "self.key",
           "self.value", "output.dense")]  # fmt: skip


def _bert():
    torch.manual_seed(0)
    cfg = T.BertConfig(
        hidden_size=16, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=32, vocab_size=40,
        max_position_embeddings=16,
    )  # fmt: skip
    return T.BertModel(cfg).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from exporters.hf import export_hf_encoder

    tmp = tmp_path_factory.mktemp("fused")
    model = _bert()
    out = {}
    for attention in ("fused", "decomposed"):
        path = tmp / f"{attention}.onnx"
        info = export_hf_encoder(
            model, path, seq_len=SEQ, dynamic_seq=True, attention=attention, name="tiny", progress=False
        )
        out[attention] = (path, info)
    return model, out


def _feeds(seq: int = SEQ):
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 40, (2, seq)).astype(np.int64)
    mask = np.ones((2, seq), np.int64)
    mask[1, seq - 3 :] = 0  # padding in the second row
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def _torch(model, feeds, attn: str) -> np.ndarray:
    from exporters.hf import PooledEncoder

    m = copy.deepcopy(model)
    m.set_attn_implementation(attn)
    m.pooler = None
    enc = PooledEncoder.wrap(m, pooling="mean").eval()
    with torch.no_grad():
        (out,) = enc(*(torch.from_numpy(feeds[n]) for n in ("input_ids", "attention_mask", "token_type_ids")))
    return out.numpy()


def test_fused_export_has_one_attention_node_per_layer(exported):
    _, out = exported
    ops = {}
    for attention, (path, info) in out.items():
        proto = onnx.load(str(path))
        ops[attention] = collections.Counter(n.op_type for n in proto.graph.node)
        opset = {o.domain: o.version for o in proto.opset_import}[""]
        assert (info.extra["attention"], opset) == (attention, 23 if attention == "fused" else 20)
        inits = {t.name for t in proto.graph.initializer}
        readers = collections.defaultdict(set)
        for n in proto.graph.node:
            for i in n.input:
                readers[i].add(n.op_type)
        for target in TARGETS:  # each projection still reads its own initializer: an adapter target
            name = info.tensors[f"bert.{target}"].initializer
            assert name in inits and readers[name] == {"MatMul"}, (target, readers[name])
    assert ops["fused"]["Attention"] == LAYERS and ops["fused"]["Softmax"] == 0
    fused = onnx.load(str(out["fused"][0]))  # Attention takes and returns [batch, seq, hidden]: no heads-first copies
    producer = {o: n.op_type for n in fused.graph.node for o in n.output}
    reads = {i: n.op_type for n in fused.graph.node for i in n.input}
    for node in (n for n in fused.graph.node if n.op_type == "Attention"):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["q_num_heads"] == attrs["kv_num_heads"] == 2
        assert [producer[i] for i in node.input[:3]] == ["Add"] * 3 and reads[node.output[0]] == "MatMul"
    assert ops["decomposed"]["Attention"] == 0 and ops["decomposed"]["Softmax"] == LAYERS


def test_onnxruntime_fusions_at_load_leave_the_weights_alone(exported, tmp_path):
    """The session-level optimizer (level ALL) fuses around the weights, never into a copy of them."""
    import onnxruntime as ort

    _, out = exported
    path, info = out["fused"]
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    so.log_severity_level = 3  # the note that an ALL-level dump is machine-specific
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    opt = onnx.load(str(tmp_path / "opt.onnx"))
    ops = collections.Counter(n.op_type for n in opt.graph.node)
    assert ops["Attention"] == LAYERS and ops["SkipLayerNormalization"] == 2 * LAYERS
    read = {i for n in opt.graph.node for i in n.input}
    for t in info.tensors.values():
        assert t.initializer in read, f"{t.initializer} was folded into another tensor at session load"


@pytest.mark.parametrize("strategy", get_backend("onnxruntime").STRATEGIES)
def test_switch_and_undo_on_fused_attention_under_every_strategy(exported, strategy):
    model, out = exported
    path, info = out["fused"]
    feeds = _feeds()
    rng = np.random.default_rng(5)
    params = dict(model.named_parameters())
    tensors, shapes, merged = {}, {}, copy.deepcopy(model)
    merged_params = dict(merged.named_parameters())
    for target in TARGETS:
        shape = tuple(params[target].shape)
        flat = rng.choice(int(np.prod(shape)), 12, replace=False)
        idx = np.stack(np.unravel_index(flat, shape)).astype(np.int32)
        values = (rng.standard_normal(12) * 0.5).astype(np.float32)
        tensors[f"bert.{target}"], shapes[f"bert.{target}"] = SparseDelta(idx, values), shape
        with torch.no_grad():
            merged_params[target][tuple(idx)] += torch.from_numpy(values)
    adapter = Adapter("qkv", info.fingerprint, tensors, shapes)

    with Runtime(path, strategy=strategy) as rt:
        assert rt.strategy == strategy
        base = rt.run(feeds)["embeddings"]
        rt.load_adapter(adapter)
        rt.switch("qkv")
        rt.wait_settled(30)
        adapted = rt.run(feeds)["embeddings"]
        rt.switch(None)
        rt.wait_settled(30)
        np.testing.assert_array_equal(rt.run(feeds)["embeddings"], base)
        for target in TARGETS:
            np.testing.assert_array_equal(rt.weights(f"bert.{target}"), params[target].detach().numpy())
    np.testing.assert_allclose(base, _torch(model, feeds, "sdpa"), atol=1e-5)
    np.testing.assert_allclose(adapted, _torch(merged, feeds, "sdpa"), atol=1e-5)
    assert np.abs(adapted - base).max() > 1e-4


def test_fused_and_decomposed_agree_on_a_longer_sequence(exported):
    _, out = exported
    feeds = _feeds(12)
    got = {}
    for attention, (path, _) in out.items():
        with Runtime(path) as rt:
            got[attention] = rt.run(feeds)["embeddings"]
    np.testing.assert_allclose(got["fused"], got["decomposed"], atol=1e-5)


def test_attention_choice_is_checked(tmp_path):
    from exporters.hf import export_hf_encoder

    with pytest.raises(ConfigError, match="attention 'flash' is not supported for onnx; allowed: fused, decomposed"):
        export_hf_encoder(_bert(), tmp_path / "x.onnx", seq_len=SEQ, attention="flash", progress=False)
    with pytest.raises(ConfigError, match="attention 'fused' is not supported for tflite; allowed: decomposed"):
        export_hf_encoder(_bert(), tmp_path / "x.tflite", seq_len=SEQ, attention="fused", file_format="tflite")
    mpnet = T.MPNetModel(T.MPNetConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32, vocab_size=40)).eval()  # fmt: skip
    with pytest.raises(ConfigError, match=r"MPNetModel cannot run 'sdpa' attention.*pass attention='decomposed'"):
        export_hf_encoder(mpnet, tmp_path / "m.onnx", seq_len=SEQ, attention="fused", progress=False)
    info = export_hf_encoder(mpnet, tmp_path / "m.onnx", seq_len=SEQ, progress=False)  # default: what it can run
    assert info.extra["attention"] == "decomposed"
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_a_fused_attention_export_quantizes_with_the_attention_kept_float(exported, tmp_path, mode):
    """onnxruntime's quantizer takes any node named Attention for com.microsoft's; ours stays float, Q/K/V go int8."""
    from exporters.quantize import quantize_onnx

    _, out = exported
    path, info = out["fused"]
    feeds = _feeds()
    report = quantize_onnx(path, tmp_path / "q.onnx", mode=mode, calib={k: v for k, v in feeds.items()}, min_cosine=0.9)
    q = onnx.load(str(tmp_path / "q.onnx"))
    kinds = collections.Counter(n.op_type for n in q.graph.node)
    assert kinds["Attention"] == LAYERS and not kinds["QAttention"]
    quantized = {k for k, t in report.info.tensors.items() if t.quant is not None}
    assert {f"bert.{t}" for t in TARGETS} <= quantized, sorted(quantized)[:6]
    with Runtime(tmp_path / "q.onnx") as rt:
        got = rt.run(feeds)[info.outputs[0]]
    with Runtime(path) as ref:
        want = ref.run(feeds)[info.outputs[0]]
    cos = np.sum(got * want, axis=-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
    assert np.all(cos > 0.9)
