"""ONNX files as other tools write them (tf2onnx, old IR versions, mixed precision, control flow, external data,
onnxruntime's own quantizers), built with onnx.helper in the session, through the whole device flow.

Each is imported, inspected, loaded, switched with SHiRA adapters in the torch layout the import records (one, then
two fused), compared with onnxruntime on the original file with the deltas merged, and undone bit for bit; or it is
refused at import or load in one line naming what is unsupported and what to do.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edge.cli import main  # noqa: E402
from edge.convert.onnx_import import import_onnx  # noqa: E402
from edge.errors import ConfigError, FormatError  # noqa: E402
from edge.format.adapter import Adapter, SparseDelta  # noqa: E402
from edge.runtime import Runtime  # noqa: E402

P = "StatefulPartitionedCall/sequential/"  # tf2onnx names every tensor after its TF op path
CONV, DENSE = P + "conv2d/Conv2D/ReadVariableOp:0", P + "dense/MatMul/ReadVariableOp:0"


def tf2onnx_cnn(ir: int = 8, opset: int = 13, as_inputs: bool = False) -> onnx.ModelProto:
    """A Keras CNN as tf2onnx writes it: NHWC input transposed to NCHW, a strided Conv with a ``pads`` attribute,
    the BatchNorm left unfused, Relu6 as Clip with min/max inputs, back to NHWC, flattened by Reshape, a MatMul.
    ``as_inputs``: every initializer also listed in ``graph.input`` (IR 3 style: a caller could override it)."""
    rng = np.random.default_rng(0)
    w = {
        CONV: rng.standard_normal((4, 3, 3, 3)) * 0.5,
        P + "conv2d/BiasAdd/ReadVariableOp:0": rng.standard_normal(4) * 0.1,
        P + "bn/scale:0": rng.uniform(0.5, 1.5, 4),
        P + "bn/bias:0": rng.standard_normal(4) * 0.1,
        P + "bn/mean:0": rng.standard_normal(4) * 0.1,
        P + "bn/var:0": rng.uniform(0.5, 1.5, 4),
        DENSE: rng.standard_normal((16, 5)) * 0.3,
        P + "dense/BiasAdd/ReadVariableOp:0": rng.standard_normal(5) * 0.1,
    }
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in w.items()]
    inits += [
        numpy_helper.from_array(np.float32(0), "clip_min__5"),
        numpy_helper.from_array(np.float32(6), "clip_max__6"),
        numpy_helper.from_array(np.array([-1, 16], np.int64), "const_fold_opt__12"),
    ]
    k = list(w)
    nodes = [
        helper.make_node("Transpose", ["input_1"], ["t0"], perm=[0, 3, 1, 2], name=P + "conv2d/Conv2D__6"),
        helper.make_node("Conv", ["t0", k[0], k[1]], ["c0"], pads=[1, 1, 1, 1], strides=[2, 2], kernel_shape=[3, 3]),
        helper.make_node("BatchNormalization", ["c0", *k[2:6]], ["b0"], epsilon=1e-3),
        helper.make_node("Clip", ["b0", "clip_min__5", "clip_max__6"], ["r0"], name=P + "re_lu/Relu6"),
        helper.make_node("Transpose", ["r0"], ["t1"], perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["t1", "const_fold_opt__12"], ["f0"]),
        helper.make_node("MatMul", ["f0", k[6]], ["m0"]),
        helper.make_node("Add", ["m0", k[7]], ["dense"]),
    ]
    inputs = [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["unk__20", 4, 4, 3])]
    if as_inputs:
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    out = [helper.make_tensor_value_info("dense", TensorProto.FLOAT, ["unk__21", 5])]
    graph = helper.make_graph(nodes, "tf2onnx", inputs, out, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tf2onnx")
    model.ir_version = ir
    onnx.checker.check_model(model)
    return model


def _model(nodes, inits, inputs, outputs, opset: int = 17) -> onnx.ModelProto:
    model = helper.make_model(
        helper.make_graph(nodes, "g", inputs, outputs, inits), opset_imports=[helper.make_opsetid("", opset)]
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _x(shape, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _adapter(info, name: str, seed: int, n: int = 4) -> tuple[Adapter, dict]:
    """A SHiRA adapter on every target, indices in the torch layout the import recorded; and its deltas."""
    rng = np.random.default_rng(seed)
    deltas = {}
    for key, t in info.tensors.items():
        flat = rng.choice(int(np.prod(t.shape)), size=min(n, int(np.prod(t.shape))), replace=False)
        idx = np.stack(np.unravel_index(flat, t.shape)).astype(np.int32)
        deltas[key] = (idx, rng.standard_normal(len(flat)).astype(np.float32))
    shapes = {k: tuple(t.shape) for k, t in info.tensors.items()}
    return Adapter(name, info.fingerprint, {k: SparseDelta(*d) for k, d in deltas.items()}, shapes), deltas


def _reference(model: onnx.ModelProto, info, feeds, *weighted) -> list[np.ndarray]:
    """onnxruntime on the original file with ``alpha * delta`` (torch layout) merged into each stored weight."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}
    for key, t in info.tensors.items():
        stored = numpy_helper.to_array(inits[t.initializer]).copy()
        view = stored.T if t.transposed else stored.reshape(t.shape)
        for alpha, deltas in weighted:
            idx, values = deltas[key]
            view[tuple(idx)] += np.float32(alpha) * values
        inits[t.initializer].CopyFrom(numpy_helper.from_array(stored, t.initializer))
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _flow(src, tmp_path, feeds, model, strategy: str = "rebuild"):
    """Import, inspect, load, switch one adapter then two fused, undo: each checked against onnxruntime."""
    report = import_onnx(src, tmp_path / "m.edge.onnx")
    info = report.info
    assert main(["inspect", str(tmp_path / "m.edge.onnx")]) == 0
    a, da = _adapter(info, "a", 1)
    b, db = _adapter(info, "b", 2)
    a.save(tmp_path / "a.safetensors")
    with Runtime(tmp_path / "m.edge.onnx", strategy=strategy) as rt:
        out = rt.info.outputs[0]
        base = rt.run(feeds)[out]
        np.testing.assert_allclose(base, _reference(model, info, feeds)[0], atol=1e-5)
        before = {k: np.array(rt.weights(k)) for k in info.tensors}
        rt.load_adapter(tmp_path / "a.safetensors")
        rt.load_adapter(b)
        rt.switch("a")
        rt.wait_settled()
        np.testing.assert_allclose(rt.run(feeds)[out], _reference(model, info, feeds, (1.0, da))[0], atol=1e-4)
        rt.switch({"a": 1.0, "b": 0.5})
        rt.wait_settled()
        fused = _reference(model, info, feeds, (1.0, da), (0.5, db))[0]
        np.testing.assert_allclose(rt.run(feeds)[out], fused, atol=1e-4)
        rt.switch(None)
        rt.wait_settled()
        assert all(np.array_equal(before[k].view(np.uint32), np.array(rt.weights(k)).view(np.uint32)) for k in before)
        np.testing.assert_array_equal(rt.run(feeds)[out], base)
    return report


def _one_line(argv, capsys) -> str:
    code = main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("edge: error: "), lines
    return lines[0]


IR_OPSETS = [(3, 11, True), (4, 11, True), (5, 12, False), (6, 12, False), (7, 13, False), (8, 15, False)]
IR_OPSETS += [(9, 19, False), (10, 21, False), (10, 21, True)]


@pytest.mark.parametrize(
    "ir,opset,as_inputs", IR_OPSETS, ids=[f"ir{i}-opset{o}{'-inputs' * a}" for i, o, a in IR_OPSETS]
)
def test_a_tf2onnx_cnn_imports_switches_fuses_and_undoes_at_every_ir_and_opset(tmp_path, ir, opset, as_inputs):
    """tf2onnx names hold '/', which no adapter target may: the import gives valid names (the ONNX ones recorded) so
    adapters apply (before, every adapter for such a model was refused); initializers listed as inputs stay weights
    no caller can feed."""
    model = tf2onnx_cnn(ir, opset, as_inputs)
    onnx.save(model, tmp_path / "m.onnx")
    feeds = {"input_1": _x((2, 4, 4, 3))}
    report = _flow(tmp_path / "m.onnx", tmp_path, feeds, model, strategy="hybrid" if ir == 10 else "rebuild")
    names = report.info.extra["imported"]["names"]
    assert names == {k.replace("/", "."): k for k in (CONV, DENSE)}
    assert {k: t.initializer for k, t in report.info.tensors.items()} == names
    with Runtime(tmp_path / "m.edge.onnx") as rt:
        with pytest.raises(ConfigError, match="refused feed"):
            rt.run({**feeds, CONV: np.zeros((4, 3, 3, 3), np.float32)})
    dense = import_onnx(tmp_path / "m.onnx", tmp_path / "d.onnx", targets=[P + "dense/*"]).info  # ONNX names too
    assert list(dense.tensors) == [DENSE.replace("/", ".")]


def test_taps_skip_the_transposed_input_and_the_head_votes_as_the_detector(tmp_path, capsys):
    """`auto` (CNN stages) took tf2onnx's NHWC -> NCHW Transpose of the input as the first stage: pixels, not
    features (`first` then tapped the input's mean colour). Now the stages are the network's own maps; a tap by name
    works, the in-graph OOD head votes as the numpy detector, and `edge update --taps auto` learns."""
    from edge.route.ood import HDC
    from edge.route.taps import FEATURES, VOTE, Head, tap_model

    onnx.save(tf2onnx_cnn(), tmp_path / "m.onnx")
    import_onnx(tmp_path / "m.onnx", tmp_path / "m.edge.onnx")
    assert tap_model(tmp_path / "m.edge.onnx", tmp_path / "a.onnx", "auto").tensors == ("r0",)
    assert tap_model(tmp_path / "m.edge.onnx", tmp_path / "f.onnx", "first").tensors == ("r0",)
    tapped = tap_model(tmp_path / "m.edge.onnx", tmp_path / "t.onnx", ["b0"], head=Head(domains=2, classes=5))
    rng = np.random.default_rng(0)
    x = {d: rng.standard_normal((120, 4, 4, 3)).astype(np.float32) * (1 + 2 * d) + 2 * d for d in (0, 1)}
    with Runtime(tapped.path) as rt:
        outs = {d: rt.run({"input_1": x[d]}) for d in x}
        feats = np.concatenate([outs[d][FEATURES] for d in x])
        logits = np.concatenate([outs[d]["dense"] for d in x])
        det = HDC().fit(feats, logits, logits.argmax(1), np.repeat([0, 1], 120))
        det.calibrate(feats, logits)
        rt.set_head(det.head_values(tapped.head))
        for d in x:
            out = rt.run({"input_1": x[d]})
            score, dom = det.route(out[FEATURES])
            clear = np.abs(score - det.threshold) > 1e-5
            assert clear.mean() > 0.9
            np.testing.assert_array_equal(out[VOTE][clear], np.where(score < det.threshold, -1, dom)[clear])
    np.savez(tmp_path / "s.npz", input_1=x[0][:40], y=rng.integers(0, 5, 40))
    argv = ["update", "--model", str(tmp_path / "m.edge.onnx"), "--data", str(tmp_path / "s.npz"), "--taps", "auto"]
    assert main([*argv, "--method", "ncm", "--state", str(tmp_path / "st")]) == 0
    assert json.loads(capsys.readouterr().out)["samples_seen"] == 40


def test_weights_through_cast_identity_transpose_and_a_constant_node(tmp_path):
    """A float32 weight behind a Cast to float32 is a target (it was left out without a word); a float16 weight cast
    to float32 is reported as skipped with why (the runtime runs it as stored, not adaptable); a weight in a
    Constant node reached through Identity and Transpose is hoisted and adapted."""
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((4, 6)).astype(np.float32), rng.standard_normal((6, 5)).astype(np.float32)
    w3 = rng.standard_normal((3, 5)).astype(np.float32)  # stored [out, in]: read through Transpose
    w16 = rng.standard_normal((3, 3)).astype(np.float16)
    nodes = [
        helper.make_node("Cast", ["w1"], ["w1c"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["x", "w1c"], ["h1"]),
        helper.make_node("Identity", ["w2"], ["w2i"]),
        helper.make_node("MatMul", ["h1", "w2i"], ["h2"]),
        helper.make_node("Constant", [], ["c3"], value=numpy_helper.from_array(w3, "c3")),
        helper.make_node("Identity", ["c3"], ["c3i"]),
        helper.make_node("Transpose", ["c3i"], ["c3t"], perm=[1, 0]),
        helper.make_node("MatMul", ["h2", "c3t"], ["h3"]),
        helper.make_node("Cast", ["w16"], ["w16f"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["h3", "w16f"], ["y"]),
    ]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(w16, "w16")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    model = _model(nodes, inits, [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])])
    onnx.save(model, tmp_path / "m.onnx")
    reference = onnx.ModelProto()  # the Constant as an initializer, so the reference merges deltas the same way
    reference.CopyFrom(model)
    report = _flow(tmp_path / "m.onnx", tmp_path, {"x": _x((3, 4))}, _hoisted(reference))
    assert {k: (t.shape, t.transposed) for k, t in report.info.tensors.items()} == {
        "w1": ((6, 4), True),
        "w2": ((5, 6), True),
        "c3": ((3, 5), False),
    }
    assert "float16" in report.skipped["w16"] and report.info.extra["imported"]["constants_hoisted"] == ["c3"]
    imported = onnx.load(tmp_path / "m.edge.onnx")  # the float16 weight runs as stored, in the fingerprint
    w = next(t for t in imported.graph.initializer if t.name == "w16")
    w.CopyFrom(numpy_helper.from_array(np.zeros((3, 3), np.float16), "w16"))
    onnx.save(imported, tmp_path / "changed.onnx")
    with pytest.raises(FormatError, match="modified after export"):
        Runtime(tmp_path / "changed.onnx")


def _hoisted(model: onnx.ModelProto) -> onnx.ModelProto:
    for node in [n for n in model.graph.node if n.op_type == "Constant"]:
        model.graph.initializer.append(node.attribute[0].t)
        model.graph.node.remove(node)
    return model


def test_a_tied_embedding_and_lm_head_is_one_target_written_for_both_readers(tmp_path):
    emb = np.random.default_rng(0).standard_normal((7, 4)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["h"]),
        helper.make_node("Transpose", ["emb"], ["embT"], perm=[1, 0]),
        helper.make_node("MatMul", ["h", "embT"], ["logits"]),
    ]
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])
    model = _model(
        nodes,
        [numpy_helper.from_array(emb, "emb")],
        [ids],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 7])],
    )
    onnx.save(model, tmp_path / "m.onnx")
    report = _flow(tmp_path / "m.onnx", tmp_path, {"ids": np.array([1, 3, 6, 3])}, model)
    assert {k: (t.shape, t.transposed) for k, t in report.info.tensors.items()} == {"emb": ((7, 4), False)}


def _branch(name: str, weight: str, local: np.ndarray | None = None) -> onnx.GraphProto:
    inits = [] if local is None else [numpy_helper.from_array(local, weight)]
    out = helper.make_tensor_value_info(f"o_{name}", TensorProto.FLOAT, ["n", 3])
    return helper.make_graph([helper.make_node("MatMul", ["h", weight], [f"o_{name}"])], name, [], [out], inits)


def test_control_flow_weights_are_said_and_an_outer_weight_an_if_reads_is_written_for_it(tmp_path, capsys):
    """A weight stored in an If branch, or read only inside a Loop body, is reported (it was left out silently; a
    model with only such weights was refused without saying why) and covered by the fingerprint; a main-graph weight
    a branch also reads is one target whose adapter the branch sees."""
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((4, 6)).astype(np.float32), rng.standard_normal((6, 3)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("MatMul", ["h", "w2"], ["main"]),
        helper.make_node(
            "If",
            ["cond"],
            ["y"],
            then_branch=_branch("then", "w_then", rng.standard_normal((6, 3)).astype(np.float32)),
            else_branch=_branch("else", "w2"),
        ),
    ]
    ins = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4]),
        helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
    ]
    outs = [helper.make_tensor_value_info(k, TensorProto.FLOAT, ["n", 3]) for k in ("y", "main")]
    model = _model(nodes, [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")], ins, outs)
    onnx.save(model, tmp_path / "if.onnx")
    for cond, strategy in ((False, "bound"), (True, "hybrid")):  # False: the else branch reads w2, which it writes
        feeds = {"x": _x((2, 4)), "cond": np.array(cond)}
        report = _flow(tmp_path / "if.onnx", tmp_path, feeds, model, strategy=strategy)
        assert sorted(report.info.tensors) == ["w1", "w2"]
        assert "then_branch of If" in report.skipped["w_then"] and "not adapted" in report.skipped["w_then"]
    # the branch's own weight moved to the main graph (the branch reads it from there): covered by the fingerprint,
    # so a file whose branch weight changed after import is refused (it loaded, and ran the changed weight)
    imported = onnx.load(tmp_path / "m.edge.onnx")
    assert [t.name for t in imported.graph.initializer if t.name == "w_then"] == ["w_then"]
    w_then = next(t for t in imported.graph.initializer if t.name == "w_then")
    w_then.CopyFrom(numpy_helper.from_array(np.zeros((6, 3), np.float32), "w_then"))
    onnx.save(imported, tmp_path / "changed.onnx")
    with pytest.raises(FormatError, match="modified after export"):
        Runtime(tmp_path / "changed.onnx")

    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("MatMul", ["v_in", "wsq"], ["v_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, ["n", 4]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, ["n", 4]),
        ],
    )
    loop = _model(
        [helper.make_node("Loop", ["trip", "", "x"], ["y"], body=body)],
        [
            numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "wsq"),
            numpy_helper.from_array(np.array(3, np.int64), "trip"),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
    )
    onnx.save(loop, tmp_path / "loop.onnx")
    with pytest.raises(ConfigError, match=r"no float32 .* to adapt .*'wsq'.*body of Loop.*not adapted"):
        import_onnx(tmp_path / "loop.onnx", tmp_path / "o.onnx")
    assert "body of Loop" in _one_line(
        ["import-onnx", str(tmp_path / "loop.onnx"), "--out", str(tmp_path / "o")], capsys
    )


def _mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((8, 16)).astype(np.float32), rng.standard_normal((16, 4)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    return _model(
        nodes,
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
    )


def test_external_data_in_a_subfolder_is_read_and_a_location_outside_the_folder_is_refused(tmp_path, capsys):
    (tmp_path / "a" / "weights").mkdir(parents=True)
    model = _mlp()  # onnx.save moves the weights of the proto it is given out: it gets a copy
    onnx.save(_mlp(), tmp_path / "a" / "m.onnx", save_as_external_data=True, location="weights/w.bin", size_threshold=0)
    _flow(tmp_path / "a" / "m.onnx", tmp_path / "a", {"x": _x((2, 8))}, model)

    (tmp_path / "b" / "model").mkdir(parents=True)
    onnx.save(
        model, tmp_path / "b" / "model" / "m.onnx", save_as_external_data=True, location="w.bin", size_threshold=0
    )
    (tmp_path / "b" / "model" / "w.bin").rename(tmp_path / "b" / "w.bin")
    for location in ("../w.bin", str(tmp_path / "b" / "w.bin")):
        m = onnx.load(tmp_path / "b" / "model" / "m.onnx", load_external_data=False)
        for t in m.graph.initializer:
            next(e for e in t.external_data if e.key == "location").value = location
        (tmp_path / "b" / "model" / "m.onnx").write_bytes(m.SerializeToString())
        with pytest.raises(FormatError, match="cannot read its external data"):
            import_onnx(tmp_path / "b" / "model" / "m.onnx", tmp_path / "b" / "o.onnx")
        line = _one_line(
            ["import-onnx", str(tmp_path / "b" / "model" / "m.onnx"), "--out", str(tmp_path / "o")], capsys
        )
        assert "outside the directory" in line or "should be a relative path" in line
        assert not (tmp_path / "b" / "o.onnx").exists() and not (tmp_path / "o").exists()


def _cnn(opset: int = 17) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("MatMul", ["f", "fc.w"], ["h"]),
        helper.make_node("MatMul", ["h", "fc2.w"], ["y"]),
    ]
    inits = {
        "conv.w": rng.standard_normal((4, 3, 3, 3)) * 0.5,
        "conv.b": np.zeros(4),
        "fc.w": rng.standard_normal((64, 32)) * 0.2,
        "fc2.w": rng.standard_normal((32, 16)) * 0.2,
    }
    model = _model(
        nodes,
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16])],
        opset,
    )
    if opset >= 21:
        model.ir_version = 10
    return model


def _nbits(model: onnx.ModelProto, qdq: bool) -> onnx.ModelProto:
    nbits = pytest.importorskip("onnxruntime.quantization.matmul_nbits_quantizer")
    from onnxruntime.quantization import QuantFormat

    fmt = QuantFormat.QDQ if qdq else QuantFormat.QOperator
    q = nbits.MatMulNBitsQuantizer(model, block_size=16, is_symmetric=True, quant_format=fmt)
    q.process()
    return q.model.model


@pytest.mark.parametrize("kind", ["qoperator-int8", "matmulnbits-4bit", "dequantizelinear-blocked"])
def test_models_quantized_by_onnxruntime_are_refused_in_one_line_at_import_and_at_load(tmp_path, kind, capsys):
    """QLinearConv/QLinearMatMul (quantize_static, QOperator), MatMulNBits and opset-21 blocked DequantizeLinear
    (the 4-bit weight-only quantizer): refused at import naming edge quantize; an imported file quantized afterwards
    to 4 bits was refused at load only as 'no initializer named in its metadata': now it says what to do."""
    quantization = pytest.importorskip("onnxruntime.quantization")
    onnx.save(_cnn(), tmp_path / "f.onnx")
    if kind == "qoperator-int8":

        class Reader(quantization.CalibrationDataReader):
            def __init__(self):
                self.it = iter({"x": _x((1, 3, 4, 4), s)} for s in range(4))

            def get_next(self):
                return next(self.it, None)

        quantization.quantize_static(
            tmp_path / "f.onnx", tmp_path / "q.onnx", Reader(), quant_format=quantization.QuantFormat.QOperator
        )
        ops = {n.op_type for n in onnx.load(tmp_path / "q.onnx").graph.node}
        assert {"QLinearConv", "QLinearMatMul"} <= ops
    else:
        qdq = kind == "dequantizelinear-blocked"
        q = _nbits(_cnn(21), qdq)
        want = "DequantizeLinear" if qdq else "MatMulNBits"
        assert want in {n.op_type for n in q.graph.node}
        if qdq:  # blocked: a block_size attribute, opset 21
            assert any(a.name == "block_size" for n in q.graph.node for a in n.attribute)
        onnx.save(q, tmp_path / "q.onnx")
        import_onnx(tmp_path / "f.onnx", tmp_path / "f.edge.onnx")
        onnx.save(_nbits(onnx.load(tmp_path / "f.edge.onnx"), qdq), tmp_path / "later.onnx")
        with pytest.raises(FormatError, match=r"quantized after export by another tool.*MatMulNBits.*edge quantize"):
            Runtime(tmp_path / "later.onnx")
    line = _one_line(["import-onnx", str(tmp_path / "q.onnx"), "--out", str(tmp_path / "o.onnx")], capsys)
    assert re.search(r"already quantized \(.*\): import the float model .*edge quantize", line), line
    assert not (tmp_path / "o.onnx").exists()


def test_a_table_gathered_other_than_by_row_is_reported_not_adapted(tmp_path):
    """A float32 table read by Gather on axis 1 (columns picked by an index input) is not an embedding table: it was
    left out of the targets without a word; it is listed as skipped with why. A 2-D table gathered by row (axis 0)
    stays a target."""
    rng = np.random.default_rng(0)
    emb, cols = rng.standard_normal((7, 4)).astype(np.float32), rng.standard_normal((4, 6)).astype(np.float32)
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])
    pick = helper.make_tensor_value_info("pick", TensorProto.INT64, [2])
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["e"], axis=0),  # [n, 4]
        helper.make_node("Gather", ["cols", "pick"], ["c"], axis=1),  # [4, 2]
        helper.make_node("MatMul", ["e", "c"], ["y"]),
    ]
    inits = [numpy_helper.from_array(emb, "emb"), numpy_helper.from_array(cols, "cols")]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])
    onnx.save(_model(nodes, inits, [ids, pick], [y]), tmp_path / "m.onnx")
    report = import_onnx(tmp_path / "m.onnx", tmp_path / "m.edge.onnx")
    assert set(report.info.tensors) == {"emb"}
    assert "gathered on axis 1" in report.skipped["cols"]
