"""onnxruntime's U8S8 kernels on x86 without VNNI saturate 16-bit pair sums (edge.cpu_int8): the flags agree with the
kernels of this CPU, and ``edge quantize`` refuses a drift they cause naming the cause and the fix
(``--reduce-range``), not "calibrate on more data". Runs on CPUs with and without VNNI: what this one does is
asserted against what its flags say, and the other kind is simulated."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from _tiny import write_model
from onnx import TensorProto, helper, numpy_helper

import edge.cpu_int8
from edge.cli import main
from edge.cpu_int8 import u8s8_saturates
from edge.errors import ExportValidationError
from edge.format.modelinfo import TensorInfo
from exporters.quantize import quantize_onnx

HERE = u8s8_saturates()
M, K, N = 32, 128, 16


def _matmul_integer(a: np.ndarray, b: np.ndarray, zb: int, exact_option: bool) -> np.ndarray:
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["A", "B", "za", "zb"], ["Y"])],
        "g",
        [helper.make_tensor_value_info("A", TensorProto.UINT8, [M, K])],
        [helper.make_tensor_value_info("Y", TensorProto.INT32, [M, N])],
        [
            numpy_helper.from_array(b, "B"),
            numpy_helper.from_array(np.array(0, np.uint8), "za"),
            numpy_helper.from_array(np.array(zb, b.dtype), "zb"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    so = ort.SessionOptions()
    if exact_option:
        so.add_session_config_entry("session.x64quantprecision", "1")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"A": a})[
        0
    ]


@pytest.mark.skipif(HERE is None, reason="this x86 CPU's flags cannot be read: nothing to compare the kernels with")
@pytest.mark.parametrize("exact_option", [False, True], ids=["default", "x64quantprecision"])
def test_the_flags_tell_whether_this_cpus_u8s8_kernel_loses_sums(exact_option):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (M, K)).astype(np.uint8)
    weights = {  # (B, its zero point): full-range int8, 7-bit int8 (reduce_range), uint8 (U8U8)
        "full": (rng.integers(-127, 128, (K, N)).astype(np.int8), 0),
        "seven-bit": (rng.integers(-64, 65, (K, N)).astype(np.int8), 0),
        "uint8": (rng.integers(1, 256, (K, N)).astype(np.uint8), 128),
    }
    for name, (b, zb) in weights.items():
        got = _matmul_integer(a, b, zb, exact_option).astype(np.int64)
        want = a.astype(np.int64) @ (b.astype(np.int64) - zb)
        wrong = int((got != want).sum())
        if name == "full" and HERE and not exact_option:
            assert wrong > M * N // 2, wrong  # saturated pair sums: most outputs off
        else:
            assert wrong == 0, (name, wrong)


@pytest.fixture(scope="module")
def sharp(tmp_path_factory):
    """y = x @ W + b with x in [0, 1] (uint8 near 255) and same-sign weights near the top of each column's range:
    nearly every pair of products overflows 16 bits on a saturating kernel. Returns (path, calibration file, x)."""
    d = tmp_path_factory.mktemp("int8cpu")
    rng = np.random.default_rng(0)
    sign = np.where(np.arange(8) % 2, 1.0, -1.0)
    w = (rng.uniform(0.9, 1.0, (64, 8)) * sign).astype(np.float32)
    x = rng.uniform(0, 1, (32, 64)).astype(np.float32)
    b = -(x @ w).mean(0).astype(np.float32)  # centred outputs: a lost sum shows in the cosine
    nodes = [helper.make_node("MatMul", ["x", "fc.weight"], ["h"]), helper.make_node("Add", ["h", "fc.bias"], ["y"])]
    write_model(
        d / "m.onnx",
        "sharp",
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])],
        {"fc.weight": w, "fc.bias": b},
        {"fc.weight": TensorInfo("fc.weight", (8, 64), transposed=True)},
    )
    np.savez(d / "calib.npz", x=x)
    return d / "m.onnx", d / "calib.npz", x


@pytest.mark.skipif(HERE is None, reason="this x86 CPU's flags cannot be read")
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_edge_quantize_names_this_cpu_and_reduce_range_when_its_kernels_cause_the_drift(sharp, tmp_path, capsys, mode):
    path, calib, _ = sharp
    argv = ["quantize", str(path), "--mode", mode, "--calib", str(calib)]
    code = main([*argv, "--out", str(tmp_path / "full.onnx")])
    err = capsys.readouterr().err
    if HERE:  # this CPU saturates: refused in one line naming the cause and the fix, nothing written
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert "The quantized model is right, this CPU's kernels are not" in err and "no VNNI" in err
        assert "`edge quantize --reduce-range`" in err and "Calibrate on more" not in err
        assert not (tmp_path / "full.onnx").exists()
    else:  # VNNI or ARM: the full range runs exactly as quantized
        assert code == 0, err
    assert main([*argv, "--out", str(tmp_path / "seven.onnx"), "--reduce-range", "--json"]) == 0
    capsys.readouterr()
    q = onnx.load(str(tmp_path / "seven.onnx"))
    so = ort.SessionOptions()
    so.add_session_config_entry("session.x64quantprecision", "1")  # exact sums: the 7-bit model runs the same
    x = {"x": sharp[2]}
    default = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    exact = ort.InferenceSession(q.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, x)[0]
    np.testing.assert_array_equal(default, exact)


@pytest.mark.parametrize("cpu", [True, None, False], ids=["no-vnni", "unknown", "vnni-or-arm"])
@pytest.mark.parametrize("recipe", ["full", "seven-bit", "uint8"])
def test_the_drift_advice_follows_the_cpu_and_the_recipe(sharp, tmp_path, monkeypatch, cpu, recipe):
    """A drift forced on any CPU (min_cosine=1), the CPU simulated: the saturation is named only where it can be the
    cause (int8 weights over the full range, a CPU without VNNI or unknown), after an exact run of the same model."""
    path, _, x = sharp
    monkeypatch.setattr(edge.cpu_int8, "u8s8_saturates", lambda flags=None, arch=None: cpu)
    kw = {"full": {}, "seven-bit": {"reduce_range": True}, "uint8": {"weight_type": "uint8"}}[recipe]
    with pytest.raises(ExportValidationError) as e:
        quantize_onnx(path, tmp_path / "q.onnx", mode="dynamic", check={"x": x}, min_cosine=1.0, **kw)
    text = str(e.value)
    assert text.startswith("the quantized model drifts from the float one beyond cosine 1.0: 'y': cosine ")
    assert "Calibrate on more representative data" in text  # exact sums drift too at 1.0: quantization itself
    named = recipe == "full" and cpu is not False
    assert ("session.x64quantprecision=1) the same model reaches cosine" in text) is named
    assert ("no VNNI" in text) is (named and cpu is True)
    assert ("flags cannot be read" in text) is (named and cpu is None)
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("cpu", [True, False], ids=["no-vnni", "vnni-or-arm"])
def test_a_runtime_loading_a_full_range_int8_model_on_a_saturating_cpu_warns_once(sharp, tmp_path, monkeypatch, cpu):
    """The device may not be the host that quantized: ``edge.Runtime`` reads the model's quantization metadata and
    warns at load where this CPU's U8S8 kernels can lose sums (full-range int8 weights), and nowhere else."""
    import logging

    from edge.runtime import Runtime

    path, _, x = sharp
    full, seven = tmp_path / "full.onnx", tmp_path / "seven.onnx"
    quantize_onnx(path, full, mode="dynamic", check={"x": x}, min_cosine=0.0)  # written whatever this CPU does
    quantize_onnx(path, seven, mode="dynamic", check={"x": x}, min_cosine=0.0, reduce_range=True)
    roomy = tmp_path / "roomy.onnx"  # full range recorded, but headroom 4 keeps every weight within 6 bits
    quantize_onnx(path, roomy, mode="dynamic", check={"x": x}, min_cosine=0.0, headroom=4.0)
    monkeypatch.setattr(edge.cpu_int8, "u8s8_saturates", lambda flags=None, arch=None: cpu)
    for model, at_risk in ((full, cpu), (seven, False), (roomy, False), (path, False)):
        records = []
        handler = logging.Handler(logging.WARNING)
        handler.emit = records.append
        logging.getLogger("edge.cpu_int8").addHandler(handler)
        try:
            Runtime(model).close()
        finally:
            logging.getLogger("edge.cpu_int8").removeHandler(handler)
        messages = [r.getMessage() for r in records]
        assert len(messages) == int(at_risk), (model.name, messages)
        if at_risk:
            assert messages[0].startswith("full.onnx on onnxruntime: ") and "--reduce-range" in messages[0]
