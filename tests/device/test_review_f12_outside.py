"""Outside review F12: ONNX files as users really hold them, through `edge import-onnx`, `edge.Runtime` and updates.

Each case failed on the code before it: a file onnxruntime saved optimized (``optimized_model_filepath``) lost its fused
weights without a word; a graph repeating a node name imported fine and then no engine loaded it (a raw onnxruntime
``Fail``, a traceback on the command line); bfloat16 weights were refused without saying why; a model whose file
fixes its batch (torch.onnx.export without dynamic axes) could not be updated from more samples than that batch.
"""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edge.cli import main  # noqa: E402
from edge.convert.onnx_import import import_onnx  # noqa: E402
from edge.errors import ConfigError, FormatError  # noqa: E402
from edge.format.adapter import Adapter, SparseDelta  # noqa: E402
from edge.learn.update import Updater  # noqa: E402
from edge.route.fit import run_features  # noqa: E402
from edge.runtime import Runtime  # noqa: E402

STRATEGIES = ("hybrid", "bound", "rebuild")


def _init(name: str, *shape: int, seed: int = 0) -> onnx.TensorProto:
    rng = np.random.default_rng(abs(hash((name, seed))) % 2**32)
    return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)


def _model(nodes, inits, inputs, outputs, opsets=(("", 13),)) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    model.ir_version = 8
    return model


def _cnn(batch="b") -> onnx.ModelProto:
    """Conv+Relu, Reshape, Gemm+Relu, a scaled MatMul (features) and a MatMul head (logits): what onnxruntime fuses."""
    inits = [_init("conv.w", 4, 3, 3, 3), _init("conv.b", 4), _init("fc.w", 6, 16), _init("fc.b", 6)]
    inits += [_init("proj.w", 6, 5), _init("head.w", 6, 3)]
    inits += [numpy_helper.from_array(np.array([-1, 16], np.int64), "shape")]
    inits += [numpy_helper.from_array(np.float32(0.5), "half")]
    nodes = [
        helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Reshape", ["r", "shape"], ["f"]),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["g"], transB=1),
        helper.make_node("Relu", ["g"], ["h"]),
        helper.make_node("MatMul", ["h", "proj.w"], ["m"]),
        helper.make_node("Mul", ["m", "half"], ["features"]),
        helper.make_node("MatMul", ["h", "head.w"], ["logits"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 4, 4])
    outs = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, [batch, w]) for n, w in (("features", 5), ("logits", 3))
    ]
    return _model(nodes, inits, [x], outs)


def _x(n: int = 3, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 4, 4)).astype(np.float32)


def _adapter(info, seed: int = 1):
    rng = np.random.default_rng(seed)
    deltas = {}
    for key, t in info.tensors.items():
        flat = rng.choice(int(np.prod(t.shape)), size=3, replace=False)
        idx = np.stack(np.unravel_index(flat, t.shape)).astype(np.int32)
        deltas[key] = (idx, rng.standard_normal(3).astype(np.float32))
    shapes = {k: tuple(t.shape) for k, t in info.tensors.items()}
    return Adapter("a", info.fingerprint, {k: SparseDelta(*d) for k, d in deltas.items()}, shapes), deltas


def _merged(path, info, feeds, deltas) -> list[np.ndarray]:
    """onnxruntime on the imported file with each torch-layout delta added to its stored weight."""
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    for key, (idx, values) in deltas.items():
        t = info.tensors[key]
        stored = numpy_helper.to_array(inits[t.initializer]).copy()
        view = stored.T if t.transposed else stored.reshape(t.shape)
        np.add.at(view, tuple(idx), values)
        inits[t.initializer].CopyFrom(numpy_helper.from_array(stored, t.initializer))
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _switch_and_undo(path, info, feeds) -> None:
    """Under every strategy: the adapter answers as the merged reference, and undo restores every weight bit for bit."""
    adapter, deltas = _adapter(info)
    want = _merged(path, info, feeds, deltas)
    for strategy in STRATEGIES:
        with Runtime(path, strategy=strategy) as rt:
            base = rt.run(feeds)
            before = {k: np.array(rt.weights(k)) for k in info.tensors}
            rt.load_adapter(adapter)
            rt.switch("a")
            rt.wait_settled()
            got = rt.run(feeds)
            for name, w in zip(rt.info.outputs, want):
                np.testing.assert_allclose(got[name], w, atol=1e-5, err_msg=f"{strategy} {name}")
            rt.switch(None)
            rt.wait_settled()
            for k, v in before.items():
                assert np.array_equal(v.view(np.uint32), np.array(rt.weights(k)).view(np.uint32)), (strategy, k)
            for name, v in base.items():
                np.testing.assert_array_equal(rt.run(feeds)[name], v)


def _one_line(argv, capsys) -> str:
    code = main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("edge: error: "), (code, lines)
    return lines[0]


def test_a_file_onnxruntime_saved_optimized_keeps_its_fused_weights_as_targets(tmp_path, capsys):
    """optimized_model_filepath at ORT_ENABLE_EXTENDED writes FusedConv, FusedGemm and FusedMatMul (com.microsoft):
    before, their weights were left out without a word (one target of four; `skipped` empty)."""
    onnx.save(_cnn(), tmp_path / "m.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(tmp_path / "m.onnx"), options, providers=["CPUExecutionProvider"])
    fused = {n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node if n.domain == "com.microsoft"}
    if not fused:
        pytest.skip("this onnxruntime fuses nothing at ORT_ENABLE_EXTENDED")
    assert main(["import-onnx", str(tmp_path / "opt.onnx"), "--out", str(tmp_path / "e.onnx")]) == 0
    capsys.readouterr()
    report = import_onnx(tmp_path / "opt.onnx", tmp_path / "e.onnx")
    assert {t.initializer for t in report.info.tensors.values()} >= {"conv.w", "fc.w", "head.w"}, report.info.tensors
    assert len(report.info.tensors) == 4 and not report.skipped, (report.info.tensors, report.skipped)
    assert report.info.tensors["conv.w"].shape == (4, 3, 3, 3) and report.info.tensors["fc.w"].shape == (6, 16)
    _switch_and_undo(tmp_path / "e.onnx", report.info, {"x": _x()})


def test_a_fused_matmul_reading_its_weight_transposed_is_in_the_torch_layout(tmp_path):
    """FusedMatMul with transB=1 reads [out, in] as Gemm's transB does; with alpha the delta is still the weight's."""
    nodes = [
        helper.make_node("FusedMatMul", ["x", "w"], ["y0"], domain="com.microsoft", transB=1, alpha=0.5),
        helper.make_node("FusedMatMul", ["y0", "v"], ["y"], domain="com.microsoft", alpha=2.0),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3])
    model = _model(nodes, [_init("w", 6, 4), _init("v", 6, 3)], [x], [y], (("", 13), ("com.microsoft", 1)))
    onnx.save(model, tmp_path / "m.onnx")
    info = import_onnx(tmp_path / "m.onnx", tmp_path / "e.onnx").info
    assert (info.tensors["w"].shape, info.tensors["w"].transposed) == ((6, 4), False)
    assert (info.tensors["v"].shape, info.tensors["v"].transposed) == ((3, 6), True)
    _switch_and_undo(tmp_path / "e.onnx", info, {"x": np.ones((2, 4), np.float32)})


def test_a_weight_only_an_unknown_fused_op_reads_is_said_not_silently_left_out(tmp_path):
    """onnxruntime's NCHWc Conv (ORT_ENABLE_ALL) reads its filter in a blocked layout: named in `skipped`, not taken."""
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], domain="com.microsoft.nchwc", kernel_shape=[1, 1]),
        helper.make_node("ReduceMean", ["c"], ["p"], axes=[2, 3], keepdims=0),
        helper.make_node("Gemm", ["p", "head"], ["y"], transB=1),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8, 2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3])
    model = _model(
        nodes, [_init("w", 8, 8, 1, 1), _init("head", 3, 8)], [x], [y], (("", 13), ("com.microsoft.nchwc", 1))
    )
    onnx.save(model, tmp_path / "m.onnx")
    report = import_onnx(tmp_path / "m.onnx", tmp_path / "e.onnx")
    assert set(report.info.tensors) == {"head"}
    assert (
        "com.microsoft.nchwc Conv" in report.skipped["w"]
        and "before onnxruntime's optimizations" in report.skipped["w"]
    )


def test_a_graph_repeating_a_node_name_imports_into_a_file_every_strategy_loads(tmp_path):
    """onnxruntime refuses "two nodes with same node name" (merged or hand-edited graphs write them): the import
    renames the repeats (a label only) and says so; before, the file it wrote loaded under no strategy."""
    model = _cnn()
    for node in model.graph.node:
        node.name = "/layers.0/Linear"
    onnx.save(model, tmp_path / "m.onnx")
    report = import_onnx(tmp_path / "m.onnx", tmp_path / "e.onnx")
    assert report.info.extra["imported"]["nodes_renamed"] == len(model.graph.node) - 1
    names = [n.name for n in onnx.load(tmp_path / "e.onnx").graph.node]
    assert len(set(names)) == len(names)
    feeds = {"x": _x()}
    want = ort.InferenceSession(_cnn().SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    with Runtime(tmp_path / "e.onnx", strategy="bound") as rt:
        np.testing.assert_allclose(rt.run(feeds)["logits"], want[1], atol=1e-6)
    _switch_and_undo(tmp_path / "e.onnx", report.info, feeds)


def test_a_model_onnxruntime_cannot_load_is_a_format_error_under_every_strategy(tmp_path, capsys):
    """A file carrying this project's metadata that onnxruntime refuses (here: node names repeated after import):
    a typed FormatError naming onnxruntime's reason, and one line from the command line; before, onnxruntime's own
    Fail escaped (a traceback), after a warning that blamed the in-place weights."""
    onnx.save(_cnn(), tmp_path / "m.onnx")
    import_onnx(tmp_path / "m.onnx", tmp_path / "e.onnx")
    model = onnx.load(tmp_path / "e.onnx")
    for node in model.graph.node:
        node.name = "same"
    onnx.save(model, tmp_path / "bad.onnx")
    for strategy in STRATEGIES:
        with pytest.raises(FormatError, match="onnxruntime cannot load model .*same node name"):
            Runtime(tmp_path / "bad.onnx", strategy=strategy)
    np.savez(tmp_path / "s.npz", x=_x(4), y=np.array([0, 1, 0, 1]))
    argv = ["update", "--model", str(tmp_path / "bad.onnx"), "--data", str(tmp_path / "s.npz"), "-q"]
    assert "onnxruntime cannot load model" in _one_line([*argv, "-o", "feature_output=features"], capsys)


def test_bfloat16_weights_are_refused_saying_so(tmp_path, capsys):
    """Weights stored as bfloat16 and cast to float (mixed-precision tools): before, the refusal named no reason."""
    model = _cnn()
    graph = model.graph
    casts = []
    for t in graph.initializer:
        if (name := t.name).endswith(".w"):
            a = numpy_helper.to_array(t)
            bits = (a.view(np.uint32) >> 16).astype(np.uint16)
            t.CopyFrom(helper.make_tensor(name + "_bf16", TensorProto.BFLOAT16, a.shape, bits.tobytes(), raw=True))
            casts.append(helper.make_node("Cast", [name + "_bf16"], [name], to=TensorProto.FLOAT))
    graph.node.extend(casts)
    nodes = sorted(graph.node, key=lambda n: n.op_type != "Cast")
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, tmp_path / "m.onnx")
    with pytest.raises(ConfigError, match="stored as bfloat16.*export the model in float32"):
        import_onnx(tmp_path / "m.onnx", tmp_path / "e.onnx")
    line = _one_line(["import-onnx", str(tmp_path / "m.onnx"), "--out", str(tmp_path / "e.onnx")], capsys)
    assert "bfloat16" in line and "float32" in line


@pytest.mark.parametrize("batch", [1, 2])
def test_a_model_that_fixes_its_batch_is_updated_from_any_number_of_samples(tmp_path, batch, capsys):
    """torch.onnx.export without dynamic axes fixes the example's batch (often 1): an update (and the router's fitting)
    runs the samples in batches of it, the last one padded and its padding dropped; before, both refused the
    samples' shape."""
    onnx.save(_cnn(batch=batch), tmp_path / "m.onnx")
    import_onnx(tmp_path / "m.onnx", tmp_path / "e.onnx")
    x, y = _x(5), np.array([0, 1, 2, 0, 1])
    with Runtime(tmp_path / "e.onnx") as rt:
        one = [rt.run({"x": np.repeat(x[i : i + 1], batch, 0)})["features"][0] for i in range(len(x))]
        up = Updater(rt, "ncm")
        features, logits = up.features(x)
        np.testing.assert_allclose(features, np.stack(one), atol=1e-6)
        assert logits.shape == (5, 3)
        up.partial_fit(x, y)
        assert up.predict(x).shape == (5,)
        feats, logits = run_features(rt, "x", "features", "logits", x, 256)  # the router's fitting: the same
        np.testing.assert_allclose(feats, np.stack(one), atol=1e-6)
        assert logits.shape == (5, 3)
    np.savez(tmp_path / "s.npz", x=x, y=y)
    argv = ["update", "--model", str(tmp_path / "e.onnx"), "--data", str(tmp_path / "s.npz"), "--eval"]
    assert main([*argv, str(tmp_path / "s.npz"), "-q"]) == 0


def test_weights_read_inside_local_functions_are_targets(tmp_path, capsys):
    """torch.onnx's export_modules_as_functions wraps each Linear in a model-local function whose weight is a call
    argument: the import inlines them (onnx's inliner) and says so; before, it found no weight to adapt."""
    linear = helper.make_function(
        "torch.nn.modules.linear",
        "Linear",
        ["input", "weight", "bias"],
        ["out"],
        [helper.make_node("Gemm", ["input", "weight", "bias"], ["out"], transB=1)],
        [helper.make_opsetid("", 13)],
    )
    nodes = [
        helper.make_node("Linear", ["x", "fc.w", "fc.b"], ["h0"], domain="torch.nn.modules.linear", name="/fc/Linear"),
        helper.make_node("Relu", ["h0"], ["h"]),
        helper.make_node("Linear", ["h", "head.w", "head.b"], ["y"], domain="torch.nn.modules.linear"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3])
    inits = [_init("fc.w", 6, 4), _init("fc.b", 6), _init("head.w", 3, 6), _init("head.b", 3)]
    model = _model(nodes, inits, [x], [y], (("", 13), ("torch.nn.modules.linear", 1)))
    model.functions.append(linear)
    onnx.checker.check_model(model)
    onnx.save(model, tmp_path / "m.onnx")
    assert main(["import-onnx", str(tmp_path / "m.onnx"), "--out", str(tmp_path / "e.onnx")]) == 0
    capsys.readouterr()
    report = import_onnx(tmp_path / "m.onnx", tmp_path / "e.onnx")
    assert {k: (t.shape, t.transposed) for k, t in report.info.tensors.items()} == {
        "fc.w": ((6, 4), False),
        "head.w": ((3, 6), False),
    }
    assert report.info.extra["imported"]["functions_inlined"] == ["torch.nn.modules.linear.Linear"]
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)}
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    with Runtime(tmp_path / "e.onnx", strategy="rebuild") as rt:
        np.testing.assert_allclose(rt.run(feeds)["y"], want, atol=1e-6)
    _switch_and_undo(tmp_path / "e.onnx", report.info, feeds)


@pytest.mark.parametrize("head", ["10", "logits"])
def test_a_tail_with_two_outputs_none_named_logits_is_refused_not_guessed(tmp_path, head):
    """torch.onnx.export without output_names writes '9', '10': the tail took the first output, here a Linear
    projection, and would have trained it as the classifier; it now names the outputs and what to do. Named
    'logits', the classifier's output is found as before."""
    from edge.learn.tail import find_tail

    nodes = [
        helper.make_node("Gemm", ["x", "enc.w"], ["h0"], transB=1),
        helper.make_node("Relu", ["h0"], ["h"]),
        helper.make_node("Gemm", ["h", "proj.w"], ["9"], transB=1),
        helper.make_node("Gemm", ["h", "head.w"], [head], transB=1),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", w]) for n, w in (("9", 6), (head, 3))]
    inits = [_init("enc.w", 8, 4), _init("proj.w", 6, 8), _init("head.w", 3, 8)]
    onnx.save(_model(nodes, inits, [x], outs), tmp_path / "m.onnx")
    info = import_onnx(tmp_path / "m.onnx", tmp_path / "e.onnx").info
    if head == "logits":
        tail = find_tail(onnx.load(tmp_path / "e.onnx"), info)
        assert tail.logits == "logits" and tail.steps[tail.ci].param == "head.w"
        return
    with pytest.raises(ConfigError, match=r"outputs \['9', '10'\], none named 'logits'.*output_names"):
        find_tail(onnx.load(tmp_path / "e.onnx"), info)
