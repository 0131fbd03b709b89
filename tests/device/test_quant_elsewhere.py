"""int8 bases quantized elsewhere (issue 18, "their own models"): what each quantizer users run gives the runtime.

A file onnxruntime's quantizers made (``quantize_dynamic``: int8/uint8 weights, per channel, reduce_range,
``MatMulConstBOnly``, op types; ``quantize_static`` QDQ: int8/uint8/int16/uint16/int4/uint4 weights, asymmetric,
``DedicatedQDQPair``, ``QDQKeepRemovableActivations``, ``AddQDQPairToWeight``, opset-21 blocks; QOperator; a file
onnxruntime optimized and saved; a file quantized twice) records no grids, so ``edge.Runtime`` refuses it in one typed
line naming ``edge quantize`` (it said "use edge import-onnx", which then refused it too), and so does
``edge import-onnx``, also when the quantized ops sit inside an If body only (that imported the float rest silently).
An imported file quantized afterwards keeping its weights' names (``AddQDQPairToWeight``) was refused as "modified
after export (re-export it)": now named. An ``edge quantize`` file onnxruntime optimized and saved, or whose graph reads
its integers on another grid than the metadata's (a blocked DequantizeLinear, another axis, a computed scale, a scale
a caller could feed), is refused before any write: the fingerprint covers initializers, not nodes. What ``edge
quantize`` writes with the users' options (asymmetric, dedicated activation pairs, per channel, a weight two
DequantizeLinear read, the file onnxruntime's dynamic quantizer leaves as it is when run again) loads, switches an
integer and a requantized float adapter and undoes bit-exactly, and runs as a plain onnxruntime session of the same
file before and after.
"""

from __future__ import annotations

import logging

import _tiny
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
oq = pytest.importorskip("onnxruntime.quantization")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edge.cli import main  # noqa: E402
from edge.convert.onnx_import import import_onnx  # noqa: E402
from edge.errors import ConfigError, FormatError  # noqa: E402
from edge.format.adapter import Adapter, SparseDelta  # noqa: E402
from edge.runtime import Runtime  # noqa: E402
from exporters.quantize import quantize_onnx  # noqa: E402

X = np.random.default_rng(7).standard_normal((5, 3, 4, 4)).astype(np.float32)


def _cnn(opset: int = 17, shared: bool = False) -> onnx.ModelProto:
    """Conv -> MatMul -> Gemm(transB); ``shared``: the MatMul weight read by a second MatMul too."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("MatMul", ["f", "fc.w"], ["h"]),
        helper.make_node("Relu", ["h"], ["h2"]),
        helper.make_node("Gemm", ["h2", "g.w", "g.b"], ["y"], transB=1),
    ]
    w = {"conv.w": (4, 3, 3, 3), "conv.b": (4,), "fc.w": (64, 32), "g.w": (16, 32), "g.b": (16,)}
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), k) for k, s in w.items()]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16])]
    if shared:
        nodes.append(helper.make_node("MatMul", ["f", "fc.w"], ["y2"]))
        outs.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["n", 32]))
    x = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 4, 4])]
    model = helper.make_model(
        helper.make_graph(nodes, "g", x, outs, inits), opset_imports=[helper.make_opsetid("", opset)]
    )
    model.ir_version = 10 if opset >= 21 else 8
    onnx.checker.check_model(model)
    return model


class _Reader(oq.CalibrationDataReader):
    def __init__(self):
        self.it = iter({"x": X[i : i + 2]} for i in range(0, 4, 2))

    def get_next(self):
        return next(self.it, None)


Q, F = oq.QuantType, oq.QuantFormat
QDQ = {"quant_format": F.QDQ}
#: case -> (quantizer, opset, its keyword arguments, what it is saved as afterwards)
FOREIGN = {
    "dynamic-int8": ("dynamic", 17, {"weight_type": Q.QInt8}, None),
    "dynamic-uint8-channel-reduce": (
        "dynamic",
        17,
        {"weight_type": Q.QUInt8, "per_channel": True, "reduce_range": True},
        None,
    ),
    "dynamic-constb-only": ("dynamic", 17, {"extra_options": {"MatMulConstBOnly": True}}, None),
    "dynamic-matmul-only": ("dynamic", 17, {"op_types_to_quantize": ["MatMul"]}, None),  # Conv and Gemm stay float
    "dynamic-subgraphs": ("dynamic", 17, {"extra_options": {"EnableSubgraph": True}}, None),
    "dynamic-twice": ("dynamic", 17, {}, "twice"),
    "dynamic-optimized": ("dynamic", 17, {}, "optimized"),  # DynamicQuantizeMatMul
    "qdq-u8s8": ("static", 17, QDQ | {"activation_type": Q.QUInt8, "weight_type": Q.QInt8}, None),
    "qdq-s8s8-channel": (
        "static",
        17,
        QDQ | {"activation_type": Q.QInt8, "weight_type": Q.QInt8, "per_channel": True},
        None,
    ),
    "qdq-asymmetric": ("static", 17, QDQ | {"extra_options": {"WeightSymmetric": False}}, None),
    "qdq-dedicated": ("static", 17, QDQ | {"extra_options": {"DedicatedQDQPair": True}}, None),
    "qdq-keep-removable": ("static", 17, QDQ | {"extra_options": {"QDQKeepRemovableActivations": True}}, None),
    "qdq-weight-pairs": ("static", 17, QDQ | {"extra_options": {"AddQDQPairToWeight": True}}, None),
    "qdq-int16": ("static", 17, QDQ | {"activation_type": Q.QUInt16, "weight_type": Q.QInt16}, None),
    "qdq-uint16": ("static", 17, QDQ | {"activation_type": Q.QUInt16, "weight_type": Q.QUInt16}, None),
    "qdq-int4": ("static", 21, QDQ | {"weight_type": Q.QInt4}, None),
    "qdq-uint4": ("static", 21, QDQ | {"weight_type": Q.QUInt4}, None),
    "qdq-blocked": (
        "static",
        21,
        QDQ | {"weight_type": Q.QInt4, "op_types_to_quantize": ["MatMul"]} | {"extra_options": {"BlockSize": 16}},
        None,
    ),
    "qoperator": ("static", 17, {"quant_format": F.QOperator}, None),  # QLinearConv, QLinearMatMul, QGemm
    "qdq-optimized": ("static", 17, QDQ, "optimized"),  # QLinearConv, QLinearMatMul, QGemm
}


def _quantize(src, out, case):
    kind, _, kwargs, then = FOREIGN[case]
    logging.getLogger().disabled, was = True, logging.getLogger().disabled  # onnxruntime's pre-processing banner
    try:
        if kind == "dynamic":
            oq.quantize_dynamic(src, out, **kwargs)
        else:
            oq.quantize_static(src, out, _Reader(), **kwargs)
        if then == "twice":
            oq.quantize_dynamic(out, out.with_suffix(".2.onnx"), **kwargs)
            return out.with_suffix(".2.onnx")
    finally:
        logging.getLogger().disabled = was
    if then == "optimized":
        return _optimized(out, "EXTENDED")
    return out


def _optimized(path, level):
    """The graph onnxruntime runs, as a user keeps it: SessionOptions.optimized_model_filepath."""
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_ENABLE_{level}")
    options.optimized_model_filepath = str(path.with_suffix(f".{level}.onnx"))
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return path.with_suffix(f".{level}.onnx")


def _one_line(argv, capsys) -> str:
    capsys.readouterr()
    code = main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("edge: error: "), lines
    return lines[0]


@pytest.mark.parametrize("case", list(FOREIGN))
def test_a_file_quantized_elsewhere_is_refused_in_one_line_naming_edge_quantize(tmp_path, case, capsys):
    onnx.save(_cnn(FOREIGN[case][1]), tmp_path / "f.onnx")
    q = _quantize(tmp_path / "f.onnx", tmp_path / "q.onnx", case)
    with pytest.raises(
        FormatError, match=r"quantized by another tool \(.*(Dequantize|Integer|QLinear|Quantize).*\).*`edge quantize`"
    ):
        Runtime(q)  # was: "use `edge import-onnx`", which refused it next
    with pytest.raises(ConfigError, match=r"already quantized \(.+\): import the float model.*`edge quantize`"):
        import_onnx(q, tmp_path / "out.onnx")
    line = _one_line(["import-onnx", str(q), "--out", str(tmp_path / "cli.onnx")], capsys)
    assert "already quantized" in line and "edge quantize" in line
    assert not (tmp_path / "out.onnx").exists() and not (tmp_path / "cli.onnx").exists()


def test_quantized_ops_inside_an_if_body_only_are_refused_at_import(tmp_path):
    """A float main graph whose If branches dequantize their own int8 weights was imported as a float model, the
    quantized layers left without adapters and unsaid (their integer weights are not even listed as skipped)."""
    rng = np.random.default_rng(0)

    def branch(tag):
        nodes = [
            helper.make_node("DequantizeLinear", [f"{tag}.wq", f"{tag}.s", f"{tag}.z"], [f"{tag}.w"]),
            helper.make_node("MatMul", ["h", f"{tag}.w"], [f"{tag}.o"]),
        ]
        inits = [
            numpy_helper.from_array(rng.integers(-100, 100, (16, 8)).astype(np.int8), f"{tag}.wq"),
            numpy_helper.from_array(np.float32(0.01), f"{tag}.s"),
            numpy_helper.from_array(np.int8(0), f"{tag}.z"),
        ]
        out = [helper.make_tensor_value_info(f"{tag}.o", TensorProto.FLOAT, None)]
        return helper.make_graph(nodes, tag, [], out, inits)

    nodes = [
        helper.make_node("MatMul", ["x", "fc.w"], ["h"]),
        helper.make_node("If", ["c"], ["y"], then_branch=branch("t"), else_branch=branch("e")),
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16]),
        helper.make_tensor_value_info("c", TensorProto.BOOL, []),
    ]
    fc = numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "fc.w")
    graph = helper.make_graph(
        nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])], [fc]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, tmp_path / "m.onnx")
    with pytest.raises(ConfigError, match=r"already quantized \(DequantizeLinear\)"):
        import_onnx(tmp_path / "m.onnx", tmp_path / "o.onnx")
    assert not (tmp_path / "o.onnx").exists()


def test_an_imported_file_quantized_keeping_its_weight_names_is_named_at_load(tmp_path):
    """AddQDQPairToWeight keeps each float weight under its name (Q and DQ follow it): the load said only 'modified
    after export (re-export it)'; re-exporting does not help, quantizing the float model with edge quantize does."""
    onnx.save(_cnn(), tmp_path / "f.onnx")
    import_onnx(tmp_path / "f.onnx", tmp_path / "fe.onnx")
    q = _quantize(tmp_path / "fe.onnx", tmp_path / "q.onnx", "qdq-weight-pairs")
    with pytest.raises(FormatError, match=r"quantized after export by another tool.*`edge quantize`"):
        Runtime(q)


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """Imported float files and their int8 twins by `edge quantize` with the options users give onnxruntime."""
    d = tmp_path_factory.mktemp("quant-elsewhere")
    onnx.save(_cnn(shared=True), d / "f.onnx")
    import_onnx(d / "f.onnx", d / "fe.onnx")
    calib = {"x": X}
    out = {}
    for name, opts in {
        "dynamic-channel": {"mode": "dynamic", "per_channel": True},
        "static-asymmetric": {"mode": "static", "extra_options": {"WeightSymmetric": False}},
        "static-dedicated": {"mode": "static", "extra_options": {"DedicatedQDQPair": True}},
    }.items():
        quantize_onnx(d / "fe.onnx", d / f"{name}.onnx", calib=calib, **opts)
        out[name] = d / f"{name}.onnx"
    logging.getLogger().disabled, was = True, logging.getLogger().disabled
    try:  # onnxruntime's dynamic quantizer run again on its own output: it leaves the file as it was
        oq.quantize_dynamic(out["dynamic-channel"], d / "twice.onnx")
    finally:
        logging.getLogger().disabled = was
    out["dynamic-quantized-twice"] = d / "twice.onnx"
    out["static-two-dequantize"] = _tamper(out["static-dedicated"], d / "two-dq.onnx", _second_dequantize)
    return out


def _second_dequantize(model):
    """The weight both MatMuls read, dequantized by a DequantizeLinear of its own for the second (its grid)."""
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "fc.w_quantized")
    second = [n for n in model.graph.node if n.op_type == "MatMul" and dq.output[0] in n.input][1]
    model.graph.node.insert(0, helper.make_node("DequantizeLinear", list(dq.input), ["fc.w_dq2"], name="dq2"))
    second.input[1] = "fc.w_dq2"


def _plain(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": X})


@pytest.mark.parametrize(
    "name",
    ["dynamic-channel", "static-asymmetric", "static-dedicated", "static-two-dequantize", "dynamic-quantized-twice"],
)
def test_edge_quantize_twins_switch_integer_and_float_adapters_exactly(twins, tmp_path, name):
    path = twins[name]
    want = _plain(path)
    with Runtime(path, strategy="bound") as rt:
        info = rt.info
        assert sorted(info.tensors) == ["conv.w", "fc.w", "g.w"] and all(t.quant for t in info.tensors.values())
        if name == "static-two-dequantize":  # the weight two MatMuls read: one DequantizeLinear each, one target
            dqs = [n for n in onnx.load(str(path)).graph.node if n.op_type == "DequantizeLinear"]
            assert sum(n.input[0] == info.tensors["fc.w"].initializer for n in dqs) == 2
        if name == "static-asymmetric":
            assert any(np.any(rt.backend.constant(t.quant.zero_point)) for t in info.tensors.values())
        base = {k: rt.weights(k).copy() for k in info.tensors}
        for got, w in zip(rt.run(X).values(), want):
            np.testing.assert_array_equal(got, w)
        rng = np.random.default_rng(1)
        ints, floats, expect = {}, {}, {}
        for k, t in info.tensors.items():
            flat = np.sort(rng.choice(int(np.prod(t.shape)), 6, replace=False))
            idx = np.stack(np.unravel_index(flat, t.shape)).astype(np.int32)
            lo, hi = t.quant.weight_bounds(rt.backend.constant(t.quant.zero_point))  # asymmetric: -128 too
            q = np.clip(base[k][tuple(idx)].astype(np.int64) + rng.integers(-3, 4, flat.size), lo, hi)
            ints[k] = SparseDelta(idx, np.zeros(flat.size, np.float32), q.astype(t.quant.dtype))
            expect[k] = base[k].copy()
            expect[k][tuple(idx)] = q
            scale = rt.backend.constant(t.quant.scale).reshape(-1)
            step = scale[idx[t.quant.axis]] if t.quant.axis is not None else scale[0]
            two = np.broadcast_to(2 * step, flat.shape).astype(np.float32)  # two grid steps, requantized at load
            floats[k] = SparseDelta(idx, two)
        shapes = {k: tuple(t.shape) for k, t in info.tensors.items()}
        rt.load_adapter(Adapter("int", info.fingerprint, ints, shapes))
        rt.load_adapter(Adapter("float", info.fingerprint, floats, shapes), clip=True)
        rt.switch("int")
        for k in info.tensors:
            np.testing.assert_array_equal(rt.weights(k), expect[k])
        _tiny.write_merged(path, info, expect, tmp_path / "int.onnx")
        for got, w in zip(rt.run(X).values(), _plain(tmp_path / "int.onnx")):
            np.testing.assert_array_equal(got, w)
        rt.switch("float", clip=True)
        for k, t in info.tensors.items():
            lo, hi = t.quant.weight_bounds(rt.backend.constant(t.quant.zero_point))
            moved = base[k].astype(np.int64)
            moved[tuple(floats[k].indices)] += 2
            np.testing.assert_array_equal(rt.weights(k), np.clip(moved, lo, hi).astype(base[k].dtype))
        rt.switch(None)
        for k in info.tensors:
            np.testing.assert_array_equal(rt.weights(k), base[k])
        for got, w in zip(rt.run(X).values(), want):
            np.testing.assert_array_equal(got, w)


def _tamper(src, dst, edit):
    model = onnx.load(str(src))
    edit(model)
    onnx.save(model, str(dst))
    return dst


def _dq_of(model, weight):
    return next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == weight)


def _blocked(model):
    model.opset_import[0].version = 21
    model.ir_version = 10
    _dq_of(model, "fc.w_quantized").attribute.append(helper.make_attribute("block_size", 16))


def _other_axis(model):
    dq = _dq_of(model, "conv.w_quantized")
    del dq.attribute[:]
    dq.attribute.append(helper.make_attribute("axis", 1))


def _computed_scale(model):
    dq = _dq_of(model, "fc.w_quantized")
    two = helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.float32(2.0)))
    model.graph.node.insert(0, helper.make_node("Mul", [dq.input[1], "two"], ["fc.w_scale_x2"]))
    model.graph.node.insert(0, two)  # a node, not an initializer: the fingerprint is the file's as written
    dq.input[1] = "fc.w_scale_x2"


def _scale_as_input(model):
    dq = _dq_of(model, "fc.w_quantized")
    scale = next(t for t in model.graph.initializer if t.name == dq.input[1])
    model.graph.input.append(helper.make_tensor_value_info(scale.name, scale.data_type, list(scale.dims)))


TAMPERED = {
    "blocked": (_blocked, r"in blocks of 16"),
    "other-axis": (_other_axis, r"along axis 1, not the metadata's stored axis"),
    "computed-scale": (_computed_scale, r"scale/zero point \['fc.w_scale_x2'"),
    "scale-a-graph-input": (_scale_as_input, r"is a graph input: a caller could change the grid"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_a_graph_reading_the_integers_on_another_grid_is_refused_before_any_write(tmp_path, case):
    """The fingerprint covers the initializers, not the nodes: an edge quantize file whose graph was edited so its
    DequantizeLinear applies another grid loaded, and adapters were written on the metadata's grid."""
    onnx.save(_cnn(), tmp_path / "f.onnx")
    import_onnx(tmp_path / "f.onnx", tmp_path / "fe.onnx")
    per_channel = case == "other-axis"
    quantize_onnx(tmp_path / "fe.onnx", tmp_path / "q.onnx", mode="static", calib={"x": X}, per_channel=per_channel)
    Runtime(tmp_path / "q.onnx").close()  # as written, it loads
    edit, message = TAMPERED[case]
    bad = _tamper(tmp_path / "q.onnx", tmp_path / "bad.onnx", edit)
    for strategy in ("hybrid", "bound", "rebuild"):
        with pytest.raises(FormatError, match=message):
            Runtime(bad, strategy=strategy)


@pytest.mark.parametrize(
    "mode,level,message",
    [
        ("dynamic", "EXTENDED", r"read by DynamicQuantizeMatMul .*optimized_model_filepath"),
        ("static", "EXTENDED", r"read by QLinear\w+ .*optimized_model_filepath"),
        ("static", "BASIC", r"fingerprint .* differs.*optimized_model_filepath.*`edge quantize` wrote"),
    ],
)
def test_an_edge_quantize_file_onnxruntime_optimized_and_saved_is_named(tmp_path, mode, level, message):
    onnx.save(_cnn(), tmp_path / "f.onnx")
    import_onnx(tmp_path / "f.onnx", tmp_path / "fe.onnx")
    quantize_onnx(tmp_path / "fe.onnx", tmp_path / "q.onnx", mode=mode, calib={"x": X})
    with pytest.raises(FormatError, match=message):
        Runtime(_optimized(tmp_path / "q.onnx", level))


@pytest.mark.parametrize("onnx_type", [TensorProto.INT16, TensorProto.UINT16, TensorProto.INT4, TensorProto.UINT4])
def test_a_target_stored_in_another_integer_type_than_the_metadata_says_is_refused(tmp_path, onnx_type):
    """int16/uint16 and packed int4/uint4 initializers (what onnxruntime's QDQ quantizer writes for those weight types)
    never reach the integer arena: only int8/uint8 are grids adapters write, checked before the weights are read."""
    onnx.save(_cnn(), tmp_path / "f.onnx")
    import_onnx(tmp_path / "f.onnx", tmp_path / "fe.onnx")
    quantize_onnx(tmp_path / "fe.onnx", tmp_path / "q.onnx", mode="static", calib={"x": X})

    def retype(model):
        t = next(t for t in model.graph.initializer if t.name == "fc.w_quantized")
        values = numpy_helper.to_array(t).astype(np.int64).clip(0 if onnx_type in (4, 21) else -8, 7)
        t.CopyFrom(helper.make_tensor(t.name, onnx_type, list(t.dims), values.reshape(-1).tolist()))

    bad = _tamper(tmp_path / "q.onnx", tmp_path / "bad.onnx", retype)
    with pytest.raises(
        FormatError, match=rf"int8/uint8 \(3/2\) where the metadata says.*'fc.w_quantized': {onnx_type}"
    ):
        Runtime(bad)


def test_an_imported_file_quantized_by_onnxruntime_is_refused_at_import_as_quantized(tmp_path):
    """onnxruntime's quantizers keep the metadata they find: `edge import-onnx` said "load it with edge.Runtime as
    it is", and the Runtime then refused it. Import now says it is quantized and what to do; an `edge quantize`
    twin still gets "load it as it is"."""
    onnx.save(_cnn(), tmp_path / "f.onnx")
    import_onnx(tmp_path / "f.onnx", tmp_path / "fe.onnx")
    q = _quantize(tmp_path / "fe.onnx", tmp_path / "q.onnx", "dynamic-int8")
    with pytest.raises(ConfigError, match=r"already quantized \(.*`edge quantize`"):
        import_onnx(q, tmp_path / "again.onnx")
    quantize_onnx(tmp_path / "fe.onnx", tmp_path / "twin.onnx", mode="dynamic", calib={"x": X})
    with pytest.raises(ConfigError, match="load it with edge.Runtime as it is"):
        import_onnx(tmp_path / "twin.onnx", tmp_path / "again.onnx")
