"""Feature taps on any exported model (edge.route.taps): by name, by op pattern (transformer blocks, CNN stages),
by the model's own declaration; the detector head folds and votes on a CNN as on a transformer."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge.errors import ConfigError, FormatError
from edge.format.modelinfo import META_KEY, ModelInfo, TensorInfo, fingerprint
from edge.route.ood import HDC
from edge.route.taps import FEATURES, TAP_SETS, VOTE, Head, resolve_taps, tap_model
from edge.runtime import Runtime

CLASSES, SIDE = 3, 8


def make_cnn(
    path: Path,
    seed: int = 0,
    *,
    pointwise: bool = False,
    residual: bool = False,
    taps: list[str] | None = None,
    features: bool = True,
) -> ModelInfo:
    """x[B,1,8,8] -> Conv 3x3 (4) -> Relu -> Conv 3x3 stride 2 (8) -> Relu -> GlobalAveragePool -> Flatten -> Gemm.

    ``pointwise`` adds a 1x1 Conv (8 -> 8) with bias and a Relu after the strided stage,
    ``residual`` makes that a residual block (``Relu(x + Conv1x1(x))``); ``taps`` is
    recorded as the model's declared taps; ``features`` adds the pooled features as an output.
    """
    rng = np.random.default_rng(seed)
    w = {
        "conv1.weight": rng.standard_normal((4, 1, 3, 3)) * 0.6,
        "conv1.bias": rng.standard_normal(4) * 0.1,
        "conv2.weight": rng.standard_normal((8, 4, 3, 3)) * 0.4,
        "conv2.bias": rng.standard_normal(8) * 0.1,
        "head.weight": rng.standard_normal((CLASSES, 8)) * 0.8,  # Gemm transB=1: torch layout [out, in]
        "head.bias": rng.standard_normal(CLASSES) * 0.1,
    }
    nodes = [
        helper.make_node("Conv", ["x", "conv1.weight", "conv1.bias"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "conv2.weight", "conv2.bias"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
    ]
    last = "r2"
    if pointwise or residual:
        w["proj.weight"] = rng.standard_normal((8, 8, 1, 1)) * 0.5
        w["proj.bias"] = rng.standard_normal(8) * 0.1
        nodes.append(helper.make_node("Conv", ["r2", "proj.weight", "proj.bias"], ["c3"]))
        if residual:
            nodes.append(helper.make_node("Add", ["r2", "c3"], ["s3"]))
        nodes.append(helper.make_node("Relu", ["s3" if residual else "c3"], ["r3"]))
        last = "r3"
    nodes += [
        helper.make_node("GlobalAveragePool", [last], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["features"], axis=1),
        helper.make_node("Gemm", ["features", "head.weight", "head.bias"], ["logits"], transB=1),
    ]
    stored = {k: v.astype(np.float32) for k, v in w.items()}
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])]
    if features:
        outputs.append(helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 8]))
    graph = helper.make_graph(
        nodes,
        "tiny-cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, SIDE, SIDE])],
        outputs,
        [numpy_helper.from_array(v, k) for k, v in stored.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    tensors = {k: TensorInfo(k, v.shape) for k, v in stored.items() if k.endswith(".weight")}
    info = ModelInfo(
        name="tiny-cnn",
        fingerprint=fingerprint(stored),
        tensors=tensors,
        inputs=("x",),
        outputs=tuple(o.name for o in outputs),
        extra={} if taps is None else {"taps": taps},
    )
    helper.set_model_props(model, {META_KEY: info.to_json()})
    onnx.save(model, str(path))
    return info


TEMPLATES = np.random.default_rng(42).uniform(0, 1, (CLASSES, 1, SIDE, SIDE)).astype(np.float32)


def images(domain: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class templates plus noise; domain 1 is inverted, domain 2 flipped and brighter."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x = TEMPLATES[y] + rng.normal(0, 0.1, (n, 1, SIDE, SIDE)).astype(np.float32)
    if domain == 1:
        x = 1.0 - x
    elif domain == 2:
        x = x[..., ::-1] * 2.0 + 0.5
    return np.ascontiguousarray(x, np.float32), y


# -- tap sets ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, taps, want",
    [
        ({}, "stages", ["r1", "r2"]),  # the last map at full resolution, then after the strided conv
        ({}, "auto", ["r1", "r2"]),  # no declaration, no LayerNormalization: CNN stages
        ({"pointwise": True}, "stages", ["r1", "r3"]),
        ({"residual": True}, "residual", ["r3"]),  # the activation that alone reads the residual sum
        ({}, "residual", None),  # no residual block
        ({"taps": ["c2", "r1"]}, "declared", ["c2", "r1"]),
        ({"taps": ["c2", "r1"]}, "auto", ["c2", "r1"]),  # the model's own declaration wins
        ({}, ["c1"], ["c1"]),
        ({}, "first", ["r1"]),  # auto's first tap alone
        ({"taps": ["c2", "r1"]}, "first", ["c2"]),
        ({}, "mlp-in", None),  # no LayerNormalization: nothing to normalise
        ({}, "attn-in", None),
    ],
    ids=[
        "stages",
        "auto",
        "pointwise",
        "residual",
        "no-residual",
        "declared",
        "auto-declared",
        "by-name",
        "first",
        "first-declared",
        "no-mlp-in",
        "no-attn-in",
    ],
)
def test_tap_sets_on_a_cnn(tmp_path, kw, taps, want):
    make_cnn(tmp_path / "m.onnx", **kw)
    m = onnx.load(str(tmp_path / "m.onnx"))
    if want is None:
        with pytest.raises(ConfigError, match=r"pass taps=\[tensor names\]"):
            resolve_taps(m, taps)
    else:
        assert resolve_taps(m, taps) == want


def test_every_tap_set_has_a_case():
    assert set(TAP_SETS.names()) == {
        "attn",
        "mlp-in",
        "attn-in",
        "blocks",
        "all",
        "stages",
        "residual",
        "declared",
        "auto",
        "first",
    }


def test_stage_levels_need_no_shapes(tmp_path):
    """Symbolic height and width: resolution levels come from the strides, not from shapes."""
    make_cnn(tmp_path / "m.onnx")
    m = onnx.load(str(tmp_path / "m.onnx"))
    dims = m.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "h", "w"
    assert resolve_taps(m, "stages") == ["r1", "r2"]


def test_a_model_with_no_usable_tap_says_what_to_pass(tmp_path):
    from _tiny import make_mlp

    make_mlp(tmp_path / "mlp.onnx")
    with pytest.raises(ConfigError, match=r"no taps declared.*pass taps=\[tensor names\]"):
        tap_model(tmp_path / "mlp.onnx", tmp_path / "t.onnx")


def test_malformed_declaration_is_a_format_error(tmp_path):
    make_cnn(tmp_path / "m.onnx", taps=["r1"])
    m = onnx.load(str(tmp_path / "m.onnx"))
    info = ModelInfo.from_json(next(p.value for p in m.metadata_props if p.key == META_KEY))
    helper.set_model_props(m, {META_KEY: replace(info, extra={"taps": "r1"}).to_json()})
    with pytest.raises(FormatError, match="list of tensor names"):
        resolve_taps(m, "declared")


# -- pooling and the head ---------------------------------------------------------------------------
def test_feature_maps_are_pooled_over_height_and_width(tmp_path):
    make_cnn(tmp_path / "m.onnx")
    tapped = tap_model(tmp_path / "m.onnx", tmp_path / "t.onnx", ["r1", "r2", "features"])
    assert tapped.width == 4 + 8 + 8
    x, _ = images(0, 5, seed=0)
    m = onnx.load(str(tmp_path / "m.onnx"))
    m.graph.output.extend([helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in ("r1", "r2")])
    with Runtime(tapped.path) as rt:
        got = rt.run({"x": x})[FEATURES]
    import onnxruntime as ort

    r1, r2, feats = ort.InferenceSession(m.SerializeToString()).run(["r1", "r2", "features"], {"x": x})
    want = np.concatenate([r1.mean((2, 3)), r2.mean((2, 3)), feats], axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("taps", [["r2", "c3"], ["c2", "r3"]])
def test_small_taps_of_one_shape_are_concatenated_then_pooled_once(tmp_path, taps):
    make_cnn(tmp_path / "m.onnx", pointwise=True)
    tapped = tap_model(tmp_path / "m.onnx", tmp_path / "t.onnx", taps)
    assert tapped.width == 16
    ops = [n.op_type for n in onnx.load(str(tapped.path)).graph.node if n.name.startswith("edge.")]
    assert ops == ["Concat", "ReduceMean"]  # one node per tap fewer than pooling each tap
    x, _ = images(0, 5, seed=0)
    m = onnx.load(str(tmp_path / "m.onnx"))
    m.graph.output.extend([helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in taps])
    with Runtime(tapped.path) as rt:
        got = rt.run({"x": x})[FEATURES]
    import onnxruntime as ort

    maps = ort.InferenceSession(m.SerializeToString()).run(taps, {"x": x})
    np.testing.assert_allclose(got, np.concatenate([a.mean((2, 3)) for a in maps], axis=1), rtol=1e-5, atol=1e-6)


def test_one_tap_is_pooled_straight_into_the_output(tmp_path):
    """One node for one tap: no one-input Concat, which onnxruntime keeps (a node costs ~4 % of a 12 us CNN run)."""
    make_cnn(tmp_path / "m.onnx")
    tapped = tap_model(tmp_path / "m.onnx", tmp_path / "t.onnx", ["r2"])
    edge_nodes = [n for n in onnx.load(str(tapped.path)).graph.node if n.op_type != "Constant" and FEATURES in n.output]
    assert [n.op_type for n in edge_nodes] == ["ReduceMean"] and edge_nodes[0].input[0] == "r2"
    x, _ = images(0, 5, seed=0)
    m = onnx.load(str(tmp_path / "m.onnx"))
    m.graph.output.append(helper.make_tensor_value_info("r2", TensorProto.FLOAT, None))
    with Runtime(tapped.path) as rt:
        got = rt.run({"x": x})[FEATURES]
    import onnxruntime as ort

    (r2,) = ort.InferenceSession(m.SerializeToString()).run(["r2"], {"x": x})
    np.testing.assert_allclose(got, r2.mean((2, 3)), rtol=1e-5, atol=1e-6)
    ops = [n.op_type for n in onnx.load(str(tapped.path)).graph.node if n.op_type != "Constant"]
    assert ops.count("Concat") == 0


def test_detector_head_folds_and_votes_on_a_cnn(tmp_path):
    make_cnn(tmp_path / "m.onnx")
    tapped = tap_model(tmp_path / "m.onnx", tmp_path / "t.onnx", "stages", head=Head(domains=4, classes=CLASSES))
    with Runtime(tapped.path) as rt:
        fit = [images(d, 300, seed=d) for d in (0, 1)]
        outs = [rt.run({"x": x}) for x, _ in fit]
        det = HDC().fit(
            np.concatenate([o[FEATURES] for o in outs]),
            np.concatenate([o["logits"] for o in outs]),
            np.concatenate([y for _, y in fit]),
            np.repeat([0, 1], 300),
        )
        cal = [rt.run({"x": images(d, 200, seed=10 + d)[0]}) for d in (0, 1)]
        det.calibrate(np.concatenate([o[FEATURES] for o in cal]), np.concatenate([o["logits"] for o in cal]))
        assert (rt.run({"x": images(0, 8, seed=20)[0]})[VOTE] == -1).all()  # until the head is written
        rt.set_head(det.head_values(tapped.head))
        test = {d: rt.run({"x": images(d, 200, seed=30 + d)[0]}) for d in (0, 1, 2)}
    check_votes(det, test)


def check_votes(det, test: dict) -> None:
    """The graph's votes on domains 0, 1 (known) and 2 (unseen) are the numpy detector's, away from ties."""
    for out in test.values():
        score, dom = det.route(out[FEATURES])
        clear = np.abs(score - det.threshold) > 1e-5
        np.testing.assert_array_equal(out[VOTE][clear], np.where(score < det.threshold, -1, dom)[clear])
        assert clear.mean() > 0.9
    assert (test[0][VOTE] == 0).mean() > 0.8 and (test[1][VOTE] == 1).mean() > 0.8  # routed to their domain
    assert (test[2][VOTE] == -1).mean() > 0.8  # an unseen domain is voted out of distribution


def test_detector_head_is_five_nodes_after_the_features(tmp_path):
    """Whitening Gemm, row norm, prototype Gemm (threshold in column 0), one ArgMax, a Gather from the route table."""
    make_cnn(tmp_path / "m.onnx")
    head = Head(domains=2, classes=CLASSES)
    tapped = tap_model(tmp_path / "m.onnx", tmp_path / "t.onnx", "stages", head=head)
    nodes = list(onnx.load(str(tapped.path)).graph.node)
    outs = [n.output[0] for n in nodes]
    head_nodes = nodes[outs.index(FEATURES) + 1 : outs.index(VOTE) + 1]
    assert [n.op_type for n in head_nodes if n.op_type != "Constant"] == [
        "Gemm",
        "LpNormalization",
        "Gemm",
        "ArgMax",
        "Gather",
    ]
    # placed right after the last tapped tensor is written (onnxruntime runs nodes in the stored order)
    last = max(i for i, n in enumerate(nodes) if set(n.output) & set(tapped.tensors))
    ours = nodes[last + 1 : outs.index(VOTE) + 1]
    assert all(n.name.startswith("edge.") or n.op_type == "Constant" for n in ours)
    assert not any(n.name.startswith("edge.") for n in nodes[outs.index(VOTE) + 1 :])
    assert head.route_table() == [-1, 0, 0, 0, 1, 1, 1]  # column 0 is the bar; then (domain, class) columns
    assert head.columns(tapped.width) == (tapped.width + 1, 1 + 2 * CLASSES)


@pytest.mark.parametrize("method", ["ncm", "slda", "ranpac"])
def test_on_device_updates_learn_on_a_tapped_cnn(tmp_path, method):
    """The tapped features are a model output: edge.learn.update learns a new head on them."""
    from edge.learn.update import Updater

    make_cnn(tmp_path / "m.onnx", features=False)
    tapped = tap_model(tmp_path / "m.onnx", tmp_path / "t.onnx", head=Head(domains=2, classes=CLASSES))
    x, y = images(1, 200, seed=0)
    xt, yt = images(1, 200, seed=1)
    with Runtime(tapped.path) as rt:
        assert rt.info.outputs == ("logits", FEATURES, VOTE)
        base = (rt.run({"x": xt})["logits"].argmax(1) == yt).mean()
        up = Updater(rt, method, feature_output=FEATURES)
        up.partial_fit(x, y)
        assert (up.predict(xt) == yt).mean() > max(0.9, base + 0.2)
