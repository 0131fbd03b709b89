"""A Keras-style ``.tflite`` (as the TF Lite converter writes it: TF op-path names, fused activations, a
FULLY_CONNECTED with keep_num_dims, DEPTHWISE_CONV_2D with depth_multiplier 2, a serving signature), hand-built with
the flatbuffer schema, through `edge import-tflite`, `edge inspect`, the runtime, one adapter and two fused, undo;
checked against a numpy forward pass. Its int8 per-axis twin is refused in one line at import and at load.
"""

from __future__ import annotations

import numpy as np
import pytest

s = pytest.importorskip("ai_edge_litert.schema_py_generated")

from edge.cli import main  # noqa: E402
from edge.convert.tflite_import import import_tflite  # noqa: E402
from edge.errors import FormatError  # noqa: E402
from edge.format.adapter import Adapter, SparseDelta  # noqa: E402
from edge.format.tflite import aligned_buffer, pack_model  # noqa: E402
from edge.runtime import Runtime  # noqa: E402

B = s.BuiltinOperator
CONV, DEPTHWISE, DENSE = "sequential/conv2d/Conv2D", "sequential/depthwise_conv2d/depthwise1", "sequential/dense/MatMul"


def keras_tflite(int8: bool = False) -> tuple[bytes, dict[str, np.ndarray]]:
    """x[1,6,6,3] NHWC -> CONV_2D 3x3 SAME +RELU6 -> DEPTHWISE_CONV_2D x2 +RELU -> RESHAPE [1,36,8] ->
    FULLY_CONNECTED keep_num_dims +RELU_N1_TO_1 -> y[1,36,5]; ``int8``: the conv filter int8, one scale per output
    channel (quantizedDimension 0), as the converter's dynamic-range quantization writes it."""
    rng = np.random.default_rng(0)
    w = {
        CONV: (rng.standard_normal((4, 3, 3, 3)) * 0.5).astype(np.float32),  # OHWI
        DEPTHWISE: (rng.standard_normal((1, 3, 3, 8)) * 0.5).astype(np.float32),  # [1, kh, kw, in * multiplier]
        DENSE: (rng.standard_normal((5, 8)) * 0.5).astype(np.float32),  # [out, in]
    }
    m = s.ModelT()
    m.version, m.description, m.buffers, m.operatorCodes = 3, b"MLIR Converted.", [aligned_buffer(None)], []
    sg = s.SubGraphT()
    sg.tensors, sg.operators, sg.name = [], [], b"main"
    m.subgraphs = [sg]

    def tensor(name, shape, data=None, kind=s.TensorType.FLOAT32, scales=None):
        t = s.TensorT()
        t.name, t.type, t.shape, t.buffer = name.encode(), kind, list(shape), 0
        if data is not None:
            m.buffers.append(aligned_buffer(np.ascontiguousarray(data).reshape(-1).view(np.uint8)))
            t.buffer = len(m.buffers) - 1
        if scales is not None:
            t.quantization = s.QuantizationParametersT()
            t.quantization.scale, t.quantization.zeroPoint = scales, np.zeros(len(scales), np.int64)
            t.quantization.quantizedDimension = 0
        sg.tensors.append(t)
        return len(sg.tensors) - 1

    def op(code, inputs, outputs, kind, options, act):
        codes = [c.builtinCode for c in m.operatorCodes]
        if code not in codes:
            c = s.OperatorCodeT()
            c.builtinCode, c.deprecatedBuiltinCode, c.version = code, min(code, 127), 1
            m.operatorCodes.append(c)
            codes.append(code)
        o = s.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = codes.index(code), list(inputs), list(outputs)
        o.builtinOptionsType, o.builtinOptions = kind, options
        if act is not None:
            options.fusedActivationFunction = act
        sg.operators.append(o)

    def conv_options(cls):
        o = cls()
        o.padding, o.strideW, o.strideH, o.dilationWFactor, o.dilationHFactor = s.Padding.SAME, 1, 1, 1, 1
        return o

    x = tensor("serving_default_input_1:0", (1, 6, 6, 3))
    if int8:
        scale = (np.abs(w[CONV]).reshape(4, -1).max(1) / 127).astype(np.float32)
        q = np.round(w[CONV] / scale[:, None, None, None]).astype(np.int8)
        filt = tensor(CONV, (4, 3, 3, 3), q, s.TensorType.INT8, scale)
    else:
        filt = tensor(CONV, (4, 3, 3, 3), w[CONV])
    c = tensor("sequential/conv2d/Relu6;sequential/conv2d/BiasAdd", (1, 6, 6, 4))
    bias = tensor("sequential/conv2d/BiasAdd/ReadVariableOp", (4,), np.full(4, 0.1, np.float32))
    act = s.ActivationFunctionType
    op(B.CONV_2D, [x, filt, bias], [c], s.BuiltinOptions.Conv2DOptions, conv_options(s.Conv2DOptionsT), act.RELU6)
    d = tensor("sequential/depthwise_conv2d/Relu;sequential/depthwise_conv2d/depthwise", (1, 6, 6, 8))
    dw = conv_options(s.DepthwiseConv2DOptionsT)
    dw.depthMultiplier = 2
    dbias = tensor("sequential/depthwise_conv2d/BiasAdd/ReadVariableOp", (8,), np.zeros(8, np.float32))
    op(
        B.DEPTHWISE_CONV_2D,
        [c, tensor(DEPTHWISE, (1, 3, 3, 8), w[DEPTHWISE]), dbias],
        [d],
        s.BuiltinOptions.DepthwiseConv2DOptions,
        dw,
        act.RELU,
    )
    r = tensor("sequential/reshape/Reshape", (1, 36, 8))
    shape = tensor("sequential/reshape/Reshape/shape", (3,), np.array([1, 36, 8], np.int32), s.TensorType.INT32)
    ro = s.ReshapeOptionsT()
    ro.newShape = [1, 36, 8]
    op(B.RESHAPE, [d, shape], [r], s.BuiltinOptions.ReshapeOptions, ro, None)
    y = tensor("StatefulPartitionedCall:0", (1, 36, 5))
    fc = s.FullyConnectedOptionsT()
    fc.keepNumDims = True
    fbias = tensor("sequential/dense/BiasAdd/ReadVariableOp", (5,), np.full(5, 0.05, np.float32))
    op(
        B.FULLY_CONNECTED,
        [r, tensor(DENSE, (5, 8), w[DENSE]), fbias],
        [y],
        s.BuiltinOptions.FullyConnectedOptions,
        fc,
        act.RELU_N1_TO_1,
    )
    sg.inputs, sg.outputs = [x], [y]
    sig = s.SignatureDefT()
    sig.signatureKey, sig.subgraphIndex = b"serving_default", 0
    sig.inputs = [_tensor_map("input_1", x)]
    sig.outputs = [_tensor_map("dense", y)]
    m.signatureDefs = [sig]
    return pack_model(m), w


def _tensor_map(name: str, index: int):
    t = s.TensorMapT()
    t.name, t.tensorIndex = name.encode(), index
    return t


def reference(x: np.ndarray, w: dict[str, np.ndarray]) -> np.ndarray:
    """numpy forward of keras_tflite with stored-layout weights ``w``."""

    def windows(a):  # 3x3 SAME: [B, H, W, C, 3, 3]
        return np.lib.stride_tricks.sliding_window_view(np.pad(a, ((0, 0), (1, 1), (1, 1), (0, 0))), (3, 3), (1, 2))

    c = np.clip(np.einsum("bhwckl,oklc->bhwo", windows(x), w[CONV]) + 0.1, 0, 6)
    dw = w[DEPTHWISE][0].reshape(3, 3, 4, 2)  # output channel = input channel * 2 + m
    d = np.maximum(np.einsum("bhwckl,klcm->bhwcm", windows(c), dw).reshape(1, 6, 6, 8), 0)
    return np.clip(d.reshape(1, 36, 8) @ w[DENSE].T + 0.05, -1, 1)


def _adapter(info, name: str, seed: int) -> tuple[Adapter, dict]:
    rng = np.random.default_rng(seed)
    deltas = {}
    for key, t in info.tensors.items():
        flat = rng.choice(int(np.prod(t.shape)), size=5, replace=False)
        deltas[key] = (
            np.stack(np.unravel_index(flat, t.shape)).astype(np.int32),
            rng.standard_normal(5).astype(np.float32) * 0.5,
        )
    shapes = {k: tuple(t.shape) for k, t in info.tensors.items()}
    return Adapter(name, info.fingerprint, {k: SparseDelta(*d) for k, d in deltas.items()}, shapes), deltas


def _merged(w, info, *weighted) -> dict[str, np.ndarray]:
    out = {k: v.copy() for k, v in w.items()}
    for key, t in info.tensors.items():
        for alpha, deltas in weighted:
            idx, values = deltas[key]
            out[t.initializer][tuple(idx)] += np.float32(alpha) * values
    return out


@pytest.mark.parametrize("strategy", ["hybrid", "builtin"])
def test_a_keras_tflite_imports_switches_fuses_and_undoes_against_numpy(tmp_path, strategy, capsys):
    """TF op paths are kept as target names ('/' written '.'): the litert-torch rule made them 'weight0' for the
    conv and 'conv2d' for the depthwise filter."""
    data, w = keras_tflite()
    (tmp_path / "k.tflite").write_bytes(data)
    report = import_tflite(tmp_path / "k.tflite", tmp_path / "k.edge.tflite")
    info = report.info
    assert report.targets == {k.replace("/", "."): k for k in (CONV, DEPTHWISE, DENSE)}
    assert {t.initializer: t.shape for t in info.tensors.values()} == {k: v.shape for k, v in w.items()}
    assert (
        main(["inspect", str(tmp_path / "k.edge.tflite")]) == 0
        and '"sequential.dense.MatMul"' in capsys.readouterr().out
    )
    x = np.random.default_rng(1).standard_normal((1, 6, 6, 3)).astype(np.float32)
    a, da = _adapter(info, "a", 1)
    b, db = _adapter(info, "b", 2)
    with Runtime(tmp_path / "k.edge.tflite", strategy=strategy) as rt:
        (inp,), (out,) = rt.info.inputs, rt.info.outputs
        base = rt.run({inp: x})[out]
        np.testing.assert_allclose(base, reference(x, w), atol=1e-5)
        before = {k: np.array(rt.weights(k)) for k in info.tensors}
        rt.load_adapter(a)
        rt.load_adapter(b)
        rt.switch("a")
        rt.wait_settled()
        np.testing.assert_allclose(rt.run({inp: x})[out], reference(x, _merged(w, info, (1.0, da))), atol=1e-5)
        rt.switch({"a": 1.0, "b": -0.5})
        rt.wait_settled()
        fused = reference(x, _merged(w, info, (1.0, da), (-0.5, db)))
        np.testing.assert_allclose(rt.run({inp: x})[out], fused, atol=1e-5)
        assert not np.allclose(fused, base, atol=1e-3)
        rt.switch(None)
        rt.wait_settled()
        assert all(np.array_equal(before[k].view(np.uint32), np.array(rt.weights(k)).view(np.uint32)) for k in before)
        np.testing.assert_array_equal(rt.run({inp: x})[out], base)


def test_its_int8_per_axis_twin_is_refused_in_one_line_at_import_and_at_load(tmp_path, capsys):
    data, _ = keras_tflite(int8=True)
    (tmp_path / "k8.tflite").write_bytes(data)
    assert main(["import-tflite", str(tmp_path / "k8.tflite"), "--out", str(tmp_path / "o.tflite")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and f"stores tensor '{CONV}' as int8 on a quantization grid" in lines[0]
    assert "convert the model in float32" in lines[0] and "edge quantize" in lines[0]
    assert not (tmp_path / "o.tflite").exists()
    with pytest.raises(FormatError, match="not adapter-ready.*a file quantized elsewhere records no grids"):
        Runtime(tmp_path / "k8.tflite")


def test_update_with_taps_on_a_tflite_says_taps_need_the_onnx_file(tmp_path, capsys):
    """`edge update --taps` edits an ONNX graph: on a .tflite it said 'cannot read ONNX model ...: Wire format was
    corrupt'; now it names what to pass."""
    (tmp_path / "k.tflite").write_bytes(keras_tflite()[0])
    import_tflite(tmp_path / "k.tflite", tmp_path / "k.edge.tflite")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 6, 6, 3)).astype(np.float32)
    np.savez(tmp_path / "s.npz", **{"serving_default_input_1:0": x}, y=rng.integers(0, 3, 10))
    argv = ["update", "--model", str(tmp_path / "k.edge.tflite"), "--data", str(tmp_path / "s.npz"), "--taps", "auto"]
    assert main([*argv, "--state", str(tmp_path / "st")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "--taps adds feature outputs to an ONNX graph" in lines[0] and "twin" in lines[0]
    assert not (tmp_path / "st").exists()
