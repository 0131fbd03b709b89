"""``stages`` through a GroupNorm whose affine weights are unsqueezed over computed axes (dynamo's export of
wav2vec2's feature encoder: ``Unsqueeze(weight, Range(1, rank - 1, 1))``).

onnx's shape inference does not evaluate that ``Range``: the ``Unsqueeze`` and every tensor after it lost their rank,
and ``stages`` found the first conv only. The axes are folded from the constants for the inference
(:mod:`edge.route.tapfold`), so the chain runs on; axes that depend on an input stay unknown.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge.route.taps import FEATURES, tap_model
from edge.route.tapsets import resolve_tap_set
from edge.route.tapshapes import tensor_shapes

RNG = np.random.default_rng(0)
W0, W1 = RNG.normal(size=(4, 1, 3)).astype(np.float32), RNG.normal(size=(4, 4, 3)).astype(np.float32)
GW, GB = RNG.normal(size=4).astype(np.float32), RNG.normal(size=4).astype(np.float32)


def _graph(axes_from_input: bool = False, limit: int = 3):
    """A 1-D CNN: Conv (stride 2), GroupNorm as dynamo writes it (2 groups), Relu, Conv (stride 2), Relu, mean."""

    def const(name, value):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name))

    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], strides=[2], pads=[1, 1]),
        const("g.shape", np.array([0, 2, -1], np.int64)),
        helper.make_node("Reshape", ["c0", "g.shape"], ["g.r"]),
        const("one.f", np.ones(2, np.float32)),
        const("zero.f", np.zeros(2, np.float32)),
        helper.make_node("InstanceNormalization", ["g.r", "one.f", "zero.f"], ["g.n"]),
        helper.make_node("Shape", ["c0"], ["c0.shape"]),
        helper.make_node("Reshape", ["g.n", "c0.shape"], ["g.back"]),
        helper.make_node("Constant", [], ["one"], value_int=1),
        const("three", np.array(limit, np.int64)),
        helper.make_node("Sub", ["three", "one"], ["limit"]),
        helper.make_node("Range", ["one", "limit", "one"], ["axes"]),
        helper.make_node("Unsqueeze", ["gw", "axes"], ["gw.u"]),
        helper.make_node("Unsqueeze", ["gb", "axes"], ["gb.u"]),
        helper.make_node("Mul", ["g.back", "gw.u"], ["g.scaled"]),
        helper.make_node("Add", ["g.scaled", "gb.u"], ["g.out"]),
        helper.make_node("Relu", ["g.out"], ["r0"]),
        helper.make_node("Conv", ["r0", "w1"], ["c1"], strides=[2], pads=[1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        const("mean.axes", np.array([2], np.int64)),
        helper.make_node("ReduceMean", ["r1", "mean.axes"], ["y"], keepdims=0),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 32])]
    if axes_from_input:  # the Range's limit read from an input: nothing to fold
        inputs.append(helper.make_tensor_value_info("n", TensorProto.INT64, []))
        nodes[10] = helper.make_node("Sub", ["n", "one"], ["limit"])
    inits = [numpy_helper.from_array(a, k) for k, a in (("w0", W0), ("w1", W1), ("gw", GW), ("gb", GB))]
    out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])]
    graph = helper.make_graph(nodes, "gn1d", inputs, out, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _reference(x: np.ndarray) -> np.ndarray:
    """The pooled stages computed in numpy: after the GroupNorm's Relu, after the second conv's."""

    def conv(a, w):
        a = np.pad(a, ((0, 0), (0, 0), (1, 1)))
        n = (a.shape[2] - 3) // 2 + 1
        cols = np.stack([a[:, :, 2 * i : 2 * i + 3] for i in range(n)], 2)  # [B, C, n, 3]
        return np.einsum("bcnk,ock->bon", cols, w)

    c0 = conv(x, W0)
    g = c0.reshape(len(x), 2, -1)
    g = (g - g.mean(2, keepdims=True)) / np.sqrt(g.var(2, keepdims=True) + 1e-5)
    r0 = np.maximum(g.reshape(c0.shape) * GW[:, None] + GB[:, None], 0)
    r1 = np.maximum(conv(r0, W1), 0)
    return np.concatenate([r0.mean(2), r1.mean(2)], 1)


def test_stages_run_through_computed_axes(tmp_path):
    model = _graph()
    onnx.checker.check_model(model)
    assert tensor_shapes(model)["gw.u"] == (4, 1)
    assert resolve_tap_set(model, "stages") == (["r0", "r1"], "stages")
    src = tmp_path / "gn.onnx"
    onnx.save(model, src)
    tapped = tap_model(src, tmp_path / "gn.taps.onnx", "stages")
    x = RNG.normal(size=(3, 1, 32)).astype(np.float32)
    got = ort.InferenceSession(str(tapped.path), providers=["CPUExecutionProvider"]).run([FEATURES], {"x": x})[0]
    np.testing.assert_allclose(got, _reference(x), rtol=1e-4, atol=1e-5)
    # the file's own nodes are untouched: the folding is for the inference only
    assert [n.op_type for n in onnx.load(str(tapped.path)).graph.node].count("Range") == 1


def test_axes_from_an_input_are_not_folded(caplog):
    shapes = tensor_shapes(_graph(axes_from_input=True))
    assert "gw.u" not in shapes or len(shapes["gw.u"]) != 2 or not all(isinstance(d, int) for d in shapes["gw.u"])
    # no rank after the Unsqueeze: the chain stops at the first conv, and the warning names where
    with caplog.at_level("WARNING", logger="edge.route.tapsets"):
        assert resolve_tap_set(_graph(axes_from_input=True), "stages")[0] == ["c0"]
    assert "the feature maps end at Mul node 'g.scaled'" in caplog.text and "later stages are missing" in caplog.text


def test_no_warning_when_the_maps_run_through(caplog):
    with caplog.at_level("WARNING", logger="edge.route.tapsets"):
        resolve_tap_set(_graph(), "stages")
    assert "feature maps end" not in caplog.text


@pytest.mark.slow  # a dynamo export of wav2vec2
def test_wav2vec2_group_norm_stages(tmp_path):
    torch = pytest.importorskip("torch")
    T = pytest.importorskip("transformers")
    from exporters.hf import export_hf_encoder

    torch.manual_seed(0)
    config = T.Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                              conv_dim=(8, 8, 8), conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2),
                              num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)  # fmt: skip
    m = T.Wav2Vec2Model(config).eval()
    path = tmp_path / "w2v.onnx"
    export_hf_encoder(m, path, pooling="mean", audio_length=800, progress=False)
    taps = resolve_tap_set(onnx.load(str(path)), "stages")[0]
    assert len(taps) == 3  # one per conv resolution (the last: the positional conv on the last frames)
    tapped = tap_model(path, tmp_path / "w2v.taps.onnx", taps[:2])
    x = torch.randn(2, 800, generator=torch.Generator().manual_seed(1))
    seen = []
    hooks = [layer.register_forward_hook(lambda _m, _i, out: seen.append(out)) for layer in
             m.feature_extractor.conv_layers[:2]]  # fmt: skip
    with torch.no_grad():
        m(input_values=x)
    for h in hooks:
        h.remove()
    want = torch.cat([s.mean(2) for s in seen], 1).numpy()
    sess = ort.InferenceSession(str(tapped.path), providers=["CPUExecutionProvider"])
    got = sess.run([FEATURES], {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_a_huge_constant_range_is_not_evaluated():
    """Range(1, 10**12, 1) from constants: refused before it runs (nothing allocated), the axes stay unknown."""
    from edge.route.tapfold import fold_axes

    model = _graph(limit=10**12)
    assert fold_axes(model) is model
    assert resolve_tap_set(model, "stages")[0] == ["c0"]
