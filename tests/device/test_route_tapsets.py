"""Tap sets (edge.route.tapsets): ``mlp-in`` and ``attn-in``, each pre-LN block's normalised MLP and attention input,
and ``NAME:K``, a set's first K taps; one normalised tap with the detector head votes as the numpy detector does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_taps import check_votes

from edge.errors import ConfigError
from edge.format.modelinfo import META_KEY, ModelInfo, TensorInfo, fingerprint
from edge.route.ood import HDC
from edge.route.taps import FEATURES, Head, tap_model
from edge.route.tapsets import TAP_SETS, resolve_taps

T, C, CLASSES = 4, 8, 3


def make_vit(path: Path, seed: int = 0) -> None:
    """x[B,T,C] -> two pre-LN blocks (LN -> MatMul -> residual Add, twice each) -> final LN -> mean -> head.

    Norm nodes in order: a0 (attention 0), m0 (MLP 0), a1, m1, final; the residual sums are r_a0, r_m0, ...
    """
    rng = np.random.default_rng(seed)
    subs = ["a0", "m0", "a1", "m1"]
    stored = {f"{s}.weight": (rng.standard_normal((C, C)) * 0.5).astype(np.float32) for s in subs}
    stored["head.weight"] = (rng.standard_normal((C, CLASSES)) * 0.5).astype(np.float32)
    stored.update({f"ln.{s}": np.ones(C, np.float32) for s in [*subs, "final"]})
    nodes, h = [], "x"
    for s in subs:
        nodes += [
            helper.make_node("LayerNormalization", [h, f"ln.{s}"], [f"n_{s}"], axis=-1),
            helper.make_node("MatMul", [f"n_{s}", f"{s}.weight"], [f"p_{s}"]),
            helper.make_node("Add", [h, f"p_{s}"], [f"r_{s}"]),
        ]
        h = f"r_{s}"
    axes = helper.make_tensor("axes_value", TensorProto.INT64, [1], [1])
    nodes += [
        helper.make_node("LayerNormalization", [h, "ln.final"], ["n_final"], axis=-1),
        helper.make_node("Constant", [], ["axes"], value=axes),
        helper.make_node("ReduceMean", ["n_final", "axes"], ["features"], keepdims=0),
        helper.make_node("MatMul", ["features", "head.weight"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny-vit",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", T, C])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        [numpy_helper.from_array(v, k) for k, v in stored.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    weights = {k: v for k, v in stored.items() if k.endswith(".weight")}
    info = ModelInfo(
        name="tiny-vit",
        fingerprint=fingerprint(stored),
        tensors={k: TensorInfo(k, v.shape) for k, v in weights.items()},
        inputs=("x",),
        outputs=("logits",),
    )
    helper.set_model_props(model, {META_KEY: info.to_json()})
    onnx.save(model, str(path))


def tokens(domain: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs of ``domain`` (a fixed per-domain offset pattern) and ``CLASSES`` classes (per-class offsets)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    pattern = np.random.default_rng(100 + domain).standard_normal((T, C)) * 1.5
    per_class = np.random.default_rng(200).standard_normal((CLASSES, T, C))
    x = pattern + per_class[y] + 0.3 * rng.standard_normal((n, T, C))
    return x.astype(np.float32), y


def test_mlp_in_taps_each_blocks_normalised_mlp_input(tmp_path):
    make_vit(tmp_path / "m.onnx")
    m = onnx.load(str(tmp_path / "m.onnx"))
    assert resolve_taps(m, "attn") == ["r_a0", "r_a1"]  # what mlp-in normalises
    assert resolve_taps(m, "mlp-in") == ["n_m0", "n_m1"]
    assert resolve_taps(m, "mlp-in:1") == ["n_m0"]
    assert resolve_taps(m, "attn:1") == ["r_a0"]
    assert resolve_taps(m, "mlp-in:5") == ["n_m0", "n_m1"]  # K beyond the set: the whole set
    assert "mlp-in" in TAP_SETS


@pytest.mark.parametrize("bad", ["mlp-in:0", "mlp-in:x", "mlp-in:-1", "mlp-in:"])
def test_a_bad_tap_count_is_refused_with_an_example(tmp_path, bad):
    make_vit(tmp_path / "m.onnx")
    m = onnx.load(str(tmp_path / "m.onnx"))
    if bad == "mlp-in:":  # no count after the colon: the whole set
        assert resolve_taps(m, bad) == ["n_m0", "n_m1"]
        return
    with pytest.raises(ConfigError, match="mlp-in:1"):
        resolve_taps(m, bad)


def test_an_unknown_tap_set_names_the_known_ones(tmp_path):
    make_vit(tmp_path / "m.onnx")
    with pytest.raises(ConfigError, match="unknown tap set 'nope'; known: .*mlp-in"):
        resolve_taps(onnx.load(str(tmp_path / "m.onnx")), "nope:1")


def test_attn_in_taps_each_blocks_first_norm_output_and_not_the_final_norm(tmp_path):
    make_vit(tmp_path / "m.onnx")
    m = onnx.load(str(tmp_path / "m.onnx"))
    assert resolve_taps(m, "attn-in") == ["n_a0", "n_a1"]  # n_final is no block's
    assert resolve_taps(m, "attn-in:1") == ["n_a0"]
    final = next(n for n in m.graph.node if n.output[0] == "n_final")  # a model without a final norm
    final.op_type = "Identity"
    del final.input[1:]
    del final.attribute[:]
    assert resolve_taps(m, "attn-in") == ["n_a0", "n_a1"]


@pytest.mark.parametrize("tap_set", ["mlp-in", "attn-in"])
def test_a_normalised_tap_set_finds_nothing_on_a_model_without_layer_norms(tmp_path, tap_set):
    make_vit(tmp_path / "m.onnx")
    m = onnx.load(str(tmp_path / "m.onnx"))
    for n in m.graph.node:
        if n.op_type == "LayerNormalization":
            n.op_type = "Identity"
            del n.input[1:]
            del n.attribute[:]
    with pytest.raises(ConfigError, match="finds nothing"):
        resolve_taps(m, f"{tap_set}:1")


@pytest.mark.parametrize("tap_set, tensor", [("mlp-in", "n_m0"), ("attn-in", "n_a0")])
def test_one_normalised_tap_with_the_head_votes_as_numpy_does(tmp_path, tap_set, tensor):
    """One tap: a single ReduceMean feeds the head (no Concat), and the graph's vote is the numpy detector's."""
    import onnxruntime as ort

    from edge.runtime import Runtime

    make_vit(tmp_path / "m.onnx")
    head = Head(domains=3, classes=CLASSES)
    tapped = tap_model(tmp_path / "m.onnx", tmp_path / "t.onnx", f"{tap_set}:1", head=head)
    assert tapped.tensors == (tensor,) and tapped.width == C
    ops = [n.op_type for n in onnx.load(str(tapped.path)).graph.node if n.op_type != "Constant"]
    assert ops.count("Concat") == 0 and ops.count("ReduceMean") == 2  # the model's own mean and the tap's
    x = tokens(0, 16, seed=1)[0]
    m = onnx.load(str(tmp_path / "m.onnx"))
    m.graph.output.append(helper.make_tensor_value_info(tensor, TensorProto.FLOAT, None))
    plain = ort.InferenceSession(m.SerializeToString())
    logits, tapped_value = plain.run(["logits", tensor], {"x": x})
    with Runtime(tapped.path) as rt:
        np.testing.assert_allclose(rt.run({"x": x})[FEATURES], tapped_value.mean(1), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(rt.run({"x": x})["logits"], logits)
        fit = [tokens(d, 300, seed=d) for d in (0, 1)]
        feats = [rt.run({"x": xs})[FEATURES] for xs, _ in fit]
        det = HDC().fit(
            np.concatenate(feats),
            np.zeros((600, CLASSES), np.float32),
            np.concatenate([y for _, y in fit]),
            np.repeat([0, 1], 300),
        )
        det.calibrate(np.concatenate([rt.run({"x": tokens(d, 200, seed=10 + d)[0]})[FEATURES] for d in (0, 1)]))
        rt.set_head(det.head_values(tapped.head))
        test = {d: rt.run({"x": tokens(d, 200, seed=30 + d)[0]}) for d in (0, 1, 2)}
    check_votes(det, test)
