"""ONNX files other tools write, built with onnx.helper, through the whole device flow: import, inspect, load, switch
SHiRA adapters (one, then two fused) against onnxruntime on the original with the deltas merged, undo bit for bit;
taps and `edge update --method ncm`, `edge quantize` where the finding was there.

- sparse weights (``sparse_initializer``, a ``Constant``'s ``sparse_value``): left out of the targets and of the
  fingerprint without a word (so they could be changed after import unnoticed), and `edge quantize` failed on
  "unknown initializers"; now stored dense at import, targets, covered by the fingerprint;
- skl2onnx's classifier (string class labels in an initializer read by ArrayFeatureExtractor, a ZipMap sequence of
  maps output): imported, then refused at every load as "modified after export" (its string initializer hashed by
  pointer); `edge quantize` raised AttributeError with a traceback on the ZipMap output;
- an opset 7 CNN with IR 3 weights listed as inputs (BatchNormalization's spatial attribute, Upsample's scales
  attribute, Dropout, Gemm transB) and Keras names (`dense/kernel:0`, unicode, spaces, 1000+ characters): work.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edge.cli import main  # noqa: E402
from edge.convert.onnx_import import import_onnx  # noqa: E402
from edge.errors import FormatError  # noqa: E402
from edge.runtime import Runtime  # noqa: E402
from tests.device.test_elsewhere_onnx import _adapter, _flow, _x  # noqa: E402

RNG = np.random.default_rng(0)
W1, W2 = RNG.standard_normal((8, 6)).astype(np.float32), RNG.standard_normal((6, 3)).astype(np.float32)
CLASSES = ["cat", "dog", "emu", "fox", "gnu", "hen"]


def _vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _model(nodes, inits, inputs, outputs, opsets=(("", 17),), ir: int = 8) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    model.ir_version = ir
    return model


def _sparse(name: str, dense: np.ndarray, idx, coords: bool = False):
    values = numpy_helper.from_array(dense.reshape(-1)[idx], name)
    at = np.stack(np.unravel_index(idx, dense.shape), 1) if coords else np.asarray(idx, np.int64)
    return helper.make_sparse_tensor(values, numpy_helper.from_array(at.astype(np.int64), ""), list(dense.shape))


def sparse_mlp(dense: bool = False) -> onnx.ModelProto:
    """w2 a sparse_initializer (linear indices), w3 a Constant's sparse_value ([NNZ, rank] coordinates); ``dense``:
    the same model with both stored dense (the reference)."""
    w2 = np.zeros_like(W2)
    w3 = np.zeros((3, 4), np.float32)
    i2, i3, rng = [0, 5, 7, 16], [1, 4, 11], np.random.default_rng(7)
    w2.reshape(-1)[i2] = rng.standard_normal(4)
    w3.reshape(-1)[i3] = rng.standard_normal(3)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["h2"]),
        helper.make_node("Constant", [], ["w3"], **({"value": numpy_helper.from_array(w3)} if dense else {})),
        helper.make_node("MatMul", ["h2", "w3"], ["y"]),
    ]
    if not dense:
        nodes[3].attribute.append(helper.make_attribute("sparse_value", _sparse("w3", w3, i3, coords=True)))
    inits = [numpy_helper.from_array(W1, "w1")] + ([numpy_helper.from_array(w2, "w2")] if dense else [])
    model = _model(nodes, inits, [_vi("x", ["n", 8])], [_vi("y", ["n", 4])])
    if not dense:
        model.graph.sparse_initializer.append(_sparse("w2", w2, i2))
    return model


@pytest.fixture(scope="module")
def sparse_import(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sparse")
    onnx.save(sparse_mlp(), tmp / "m.onnx")
    reference = sparse_mlp(dense=True)  # the Constant hoisted as the import does, so deltas merge the same way
    node = next(n for n in reference.graph.node if n.op_type == "Constant")
    reference.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(node.attribute[0].t), "w3"))
    reference.graph.node.remove(node)
    return tmp, _flow(tmp / "m.onnx", tmp, {"x": _x((3, 8))}, reference)


def test_sparse_weights_are_stored_dense_targets_and_in_the_fingerprint(sparse_import):
    tmp, report = sparse_import
    assert {k: (t.shape, t.transposed) for k, t in report.info.tensors.items()} == {
        "w1": ((6, 8), True),
        "w2": ((3, 6), True),
        "w3": ((4, 3), True),
    }
    assert report.info.extra["imported"]["sparse_densified"] == ["w2"]
    assert report.info.extra["imported"]["constants_hoisted"] == ["w3"]
    imported = onnx.load(tmp / "m.edge.onnx")
    assert not imported.graph.sparse_initializer
    w2 = next(t for t in imported.graph.initializer if t.name == "w2")  # changed after import: caught at load
    w2.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w2) + 1, "w2"))
    onnx.save(imported, tmp / "changed.onnx")
    with pytest.raises(FormatError, match="modified after export"):
        Runtime(tmp / "changed.onnx")


def test_a_model_with_sparse_weights_quantizes(sparse_import, capsys):
    tmp, _ = sparse_import
    assert main(["quantize", str(tmp / "m.edge.onnx"), "--out", str(tmp / "q.onnx"), "--json"]) == 0, (
        capsys.readouterr()
    )
    with Runtime(tmp / "q.onnx") as rt:
        x = _x((3, 8))
        assert rt.run({"x": x})["y"].shape == (3, 4)


def skl2onnx_classifier(labels: str) -> onnx.ModelProto:
    """A linear classifier as skl2onnx writes it: an int64 or string label output (ArgMax, or ArrayFeatureExtractor
    over a string initializer of classes) and a ZipMap ``seq(map)`` of probabilities."""
    ml = "ai.onnx.ml"
    nodes = [
        helper.make_node("MatMul", ["x", "coef"], ["h"]),
        helper.make_node("Softmax", ["h"], ["probabilities"], axis=1),
        helper.make_node("ArgMax", ["probabilities"], ["am"], axis=1, keepdims=0),
    ]
    inits = [numpy_helper.from_array(W1, "coef")]
    if labels == "strings":
        inits.append(numpy_helper.from_array(np.array(CLASSES, dtype=object), "classes"))
        nodes.append(helper.make_node("ArrayFeatureExtractor", ["classes", "am"], ["label"], domain=ml))
        zipmap = {"classlabels_strings": CLASSES}
        key, label = TensorProto.STRING, _vi("label", ["N"], TensorProto.STRING)
    else:
        nodes.append(helper.make_node("Identity", ["am"], ["label"]))
        zipmap = {"classlabels_int64s": list(range(6))}
        key, label = TensorProto.INT64, _vi("label", ["N"], TensorProto.INT64)
    nodes.append(helper.make_node("ZipMap", ["probabilities"], ["output_probability"], domain=ml, **zipmap))
    seq = helper.make_sequence_type_proto(helper.make_map_type_proto(key, helper.make_tensor_type_proto(1, [])))
    outputs = [label, helper.make_value_info("output_probability", seq)]
    model = _model(nodes, inits, [_vi("x", ["N", 8])], outputs, opsets=(("", 13), (ml, 1)))
    model.producer_name = "skl2onnx"
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("labels", ["strings", "int64"])
def test_an_skl2onnx_classifier_loads_switches_undoes_and_quantizes(tmp_path, labels, capsys):
    model = skl2onnx_classifier(labels)
    onnx.save(model, tmp_path / "m.onnx")
    info = import_onnx(tmp_path / "m.onnx", tmp_path / "m.edge.onnx").info
    assert list(info.tensors) == ["coef"]
    x = _x((4, 8))
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    a, (idx, values) = _adapter(info, "a", 1, n=48)[0], _adapter(info, "a", 1, n=48)[1]["coef"]
    merged = W1.T.copy()
    merged[tuple(idx)] += values
    with Runtime(tmp_path / "m.edge.onnx") as rt:  # refused as "modified after export" at every load before
        base = rt.run({"x": x})
        assert np.array_equal(base["label"], want[0]) and base["output_probability"] == want[1]
        rt.load_adapter(a)
        rt.switch("a")
        rt.wait_settled()
        probs = rt.run({"x": x})["output_probability"]
        expect = np.exp(x @ merged.T) / np.exp(x @ merged.T).sum(1, keepdims=True)
        keys = CLASSES if labels == "strings" else list(range(6))
        np.testing.assert_allclose([[p[k] for k in keys] for p in probs], expect, rtol=1e-4, atol=1e-6)
        rt.switch(None)
        rt.wait_settled()
        again = rt.run({"x": x})
        assert again["output_probability"] == base["output_probability"]
    argv = ["quantize", str(tmp_path / "m.edge.onnx"), "--out", str(tmp_path / "q.onnx"), "--json"]
    assert main(argv) == 0, capsys.readouterr().err  # an AttributeError traceback on the ZipMap output before
    summary = json.loads(capsys.readouterr().out)
    assert summary["cosine"]["label"] == pytest.approx(1.0) and summary["cosine"]["output_probability"] > 0.99


def old_cnn() -> onnx.ModelProto:
    """An opset 7 CNN as old exporters wrote it (IR 3: every weight listed as an input; BatchNormalization's
    spatial, Upsample's scales attribute, Dropout's ratio), with Keras-style names: ':', '/', unicode, spaces,
    1000+ characters."""
    conv, fc = "conv2d/kernel:0", "dense Ä/kernel:0 " + "k" * 1100
    bn = {f"bn/{k}:0": v for k, v in zip(("gamma", "beta", "mean", "var"), (1.5, 0.1, 0.05, 0.9))}
    nodes = [
        helper.make_node("Conv", ["input 1:0", conv], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", *bn], ["b"], epsilon=1e-3, spatial=1),
        helper.make_node("Upsample", ["b"], ["u"], mode="nearest", scales=[1.0, 1.0, 2.0, 2.0]),
        helper.make_node("Dropout", ["u"], ["d"], ratio=0.5),
        helper.make_node("Flatten", ["d"], ["f"]),
        helper.make_node("Gemm", ["f", fc, "dense/bias:0"], ["logits ✓"], transB=1),
    ]
    inits = [numpy_helper.from_array(RNG.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.5, conv)]
    inits += [numpy_helper.from_array(np.full(4, v, np.float32), k) for k, v in bn.items()]
    inits += [numpy_helper.from_array(RNG.standard_normal((5, 256)).astype(np.float32) * 0.1, fc)]
    inits += [numpy_helper.from_array(np.zeros(5, np.float32), "dense/bias:0")]
    inputs = [_vi("input 1:0", [1, 3, 4, 4])] + [_vi(t.name, list(t.dims)) for t in inits]
    model = _model(nodes, inits, inputs, [_vi("logits ✓", [1, 5])], opsets=(("", 7),), ir=3)
    onnx.checker.check_model(model)
    return model


def test_an_opset_7_cnn_with_keras_names_flows_taps_and_updates(tmp_path, capsys):
    model = old_cnn()
    onnx.save(model, tmp_path / "m.onnx")
    report = _flow(tmp_path / "m.onnx", tmp_path, {"input 1:0": _x((1, 3, 4, 4))}, model)
    names = report.info.extra["imported"]["names"]
    assert names["conv2d.kernel:0"] == "conv2d/kernel:0" and len(names) == 2
    long = next(k for k in names if k.startswith("dense Ä.kernel:0 "))
    assert report.info.tensors[long].shape == (5, 256) and not report.info.tensors[long].transposed
    x = _x((6, 3, 4, 4), seed=3)
    np.savez(tmp_path / "s.npz", **{"input 1:0": x}, y=np.arange(6) % 2)
    argv = ["update", "--model", str(tmp_path / "m.edge.onnx"), "--data", str(tmp_path / "s.npz")]
    capsys.readouterr()
    assert main([*argv, "--taps", "b", "--method", "ncm", "--state", str(tmp_path / "st")]) == 0
    assert json.loads(capsys.readouterr().out)["samples_seen"] == 6
