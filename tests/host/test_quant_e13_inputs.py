"""``edge quantize`` on a model quantized already, and on calibration data the histogram calibrators choked on.

Each quantized form is made with onnxruntime.quantization itself from a float model this project exported:
``quantize_dynamic`` per tensor and per channel, ``quantize_static`` QDQ and QOperator per tensor and per channel,
``MatMulNBitsQuantizer`` (4-bit ``MatMulNBits``; on an embedding ``GatherBlockQuantized``) and
``MatMulBnb4Quantizer``. GatherBlockQuantized and MatMulBnb4 were let through: onnxruntime's quantizer then failed
inside ("shape_inference failed ... if you quantize a model already quantized", "cannot include dtype 'a'"). Each is
now refused in one line naming what was found and what to pass, from the graph alone: before the weights are read,
copied or quantized. Entropy and percentile calibration failed inside onnxruntime whenever the samples were not a
multiple of the batch (onnxruntime#18792: its histograms stack every batch's outputs).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from _tiny import write_model

onnx = pytest.importorskip("onnx")
oq = pytest.importorskip("onnxruntime.quantization")
from onnx import TensorProto, helper  # noqa: E402

from edge import cli  # noqa: E402
from edge.cpu_int8 import u8s8_saturates  # noqa: E402
from edge.errors import ConfigError  # noqa: E402
from edge.format.modelinfo import TensorInfo  # noqa: E402
from exporters.quantize import quantize_onnx  # noqa: E402

RNG = np.random.default_rng(0)
X = RNG.standard_normal((20, 3, 4, 4)).astype(np.float32)  # 20 rows: not a multiple of the default batch of 16
IDS = RNG.integers(0, 64, (20, 4))


def edge(monkeypatch, *argv) -> int:
    if "exporters.commands.quantize" not in cli.COMMAND_MODULES:
        monkeypatch.setattr(cli, "COMMAND_MODULES", (*cli.COMMAND_MODULES, "exporters.commands.quantize"))
    return cli.main([str(a) for a in argv])


def _cnn(path):
    """x[B,3,4,4] -> Conv -> Relu -> Reshape -> MatMul(+bias) -> y[B,32]: Conv and MatMul for every quantizer."""
    stored = {
        "conv.weight": RNG.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "fc.weight": RNG.standard_normal((64, 32)).astype(np.float32) * 0.2,
        "fc.bias": RNG.standard_normal(32).astype(np.float32),
        "flat": np.array([-1, 64], np.int64),
    }
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Reshape", ["r", "flat"], ["f"]),
        helper.make_node("MatMul", ["f", "fc.weight"], ["m"]),
        helper.make_node("Add", ["m", "fc.bias"], ["y"]),
    ]
    tensors = {
        "conv.weight": TensorInfo("conv.weight", (4, 3, 3, 3)),
        "fc.weight": TensorInfo("fc.weight", (32, 64), transposed=True),
    }
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])
    write_model(path, "cnn", nodes, [x], [y], stored, tensors)


def _embedder(path):
    """ids[B,4] -> Gather(table) -> MatMul -> y[B,4,8]."""
    stored = {
        "emb.weight": RNG.standard_normal((64, 32)).astype(np.float32),
        "fc.weight": RNG.standard_normal((32, 8)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Gather", ["emb.weight", "ids"], ["h"]),
        helper.make_node("MatMul", ["h", "fc.weight"], ["y"]),
    ]
    tensors = {"emb.weight": TensorInfo("emb.weight", (64, 32)), "fc.weight": TensorInfo("fc.weight", (8, 32), True)}
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 8])
    write_model(path, "emb", nodes, [ids], [y], stored, tensors)


class _Reader:
    def __init__(self, feeds):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)


def _static(fmt, **kw):
    return lambda a, b: oq.quantize_static(a, b, _Reader([{"x": X[:10]}, {"x": X[10:20]}]), quant_format=fmt, **kw)


def _nbits(ops=("MatMul",), **kw):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    def make(a, b):
        q = MatMulNBitsQuantizer(onnx.load(a), block_size=16, is_symmetric=True, op_types_to_quantize=ops, **kw)
        q.process()
        q.model.save_model_to_file(b)

    return make


def _bnb4(a, b):
    from onnxruntime.quantization.matmul_bnb4_quantizer import MatMulBnb4Quantizer

    q = MatMulBnb4Quantizer(onnx.load(a), 1, 16)  # quant type 1: nf4, blocks of 16
    q.process()
    q.model.save_model_to_file(b)


QDQ, QOP = oq.QuantFormat.QDQ, oq.QuantFormat.QOperator
#: form -> (float model, onnxruntime's quantizer, an op type the refusal must name)
FORMS = {
    "dynamic": ("cnn", lambda a, b: oq.quantize_dynamic(a, b), "MatMulInteger"),
    "dynamic-per-channel": ("cnn", lambda a, b: oq.quantize_dynamic(a, b, per_channel=True), "ConvInteger"),
    "qdq": ("cnn", _static(QDQ), "DequantizeLinear"),
    "qdq-per-channel": ("cnn", _static(QDQ, per_channel=True), "QuantizeLinear"),
    "qoperator": ("cnn", _static(QOP), "QLinearConv"),
    "qoperator-per-channel": ("cnn", _static(QOP, per_channel=True), "QLinearMatMul"),
    "matmul-nbits": ("cnn", _nbits(), "MatMulNBits"),
    "gather-block-quantized": ("emb", _nbits(("Gather",), quant_axes=(("Gather", 1),)), "GatherBlockQuantized"),
    "matmul-bnb4": ("cnn", _bnb4, "MatMulBnb4"),
}


@pytest.fixture(scope="module")
def floats(tmp_path_factory):
    d = tmp_path_factory.mktemp("floats")
    _cnn(d / "cnn.onnx")
    _embedder(d / "emb.onnx")
    np.savez(d / "cnn.npz", x=X)
    np.savez(d / "emb.npz", ids=IDS)
    return d


def _made(floats, tmp_path, form):
    kind, make, op = FORMS[form]
    out = tmp_path / f"{form}.onnx"
    root = logging.getLogger()
    root.disabled, was = True, root.disabled  # onnxruntime's quantizers log through the root logger
    try:
        make(str(floats / f"{kind}.onnx"), str(out))
    finally:
        root.disabled = was
    assert op in {n.op_type for n in onnx.load(str(out)).graph.node}
    return out, kind, op


def _watch(monkeypatch) -> list:
    """Record whole-file reads and calls of onnxruntime's quantizers: a refusal must come before either."""
    import edge.format.io as io

    calls = []
    real = io.read_bounded
    monkeypatch.setattr(io, "read_bounded", lambda path, *a, **k: calls.append(("read", path)) or real(path, *a, **k))
    for name in ("quantize_dynamic", "quantize_static"):
        monkeypatch.setattr(oq, name, lambda *a, _n=name, **k: calls.append((_n,)))
    return calls


@pytest.mark.parametrize("mode", ["dynamic", "static"])
@pytest.mark.parametrize("form", list(FORMS))
def test_a_model_quantized_elsewhere_is_refused_in_one_line_before_any_work(
    floats, tmp_path, monkeypatch, capsys, form, mode
):
    q, kind, op = _made(floats, tmp_path, form)
    calls = _watch(monkeypatch)
    with pytest.raises(ConfigError, match=rf"already quantized \(.*{op}.*\): import the float model"):
        quantize_onnx(q, tmp_path / "api.onnx", mode=mode, calib={"x": X} if kind == "cnn" else {"ids": IDS})
    capsys.readouterr()
    out = tmp_path / "again.onnx"
    code = edge(monkeypatch, "quantize", q, "--out", out, "--mode", mode, "--calib", floats / f"{kind}.npz")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("edge: error: ") and "Traceback" not in err, err
    assert "already quantized (" in err and op in err and "`edge import-onnx`" in err and "export_onnx" in err, err
    assert calls == []  # from the graph alone: neither the whole file nor onnxruntime's quantizers were reached
    assert not out.exists() and not (tmp_path / "api.onnx").exists()
    assert not list(tmp_path.glob(".again.onnx.*"))  # no staging copy was made


def test_an_edge_quantize_twin_is_named_as_one(floats, tmp_path, monkeypatch, capsys):
    twin = tmp_path / "twin.onnx"
    seven = ["--reduce-range"] if u8s8_saturates() is not False else []
    assert edge(monkeypatch, "quantize", floats / "cnn.onnx", "--out", twin, "--calib", floats / "cnn.npz", *seven) == 0
    capsys.readouterr()
    code = edge(monkeypatch, "quantize", twin, "--out", tmp_path / "again.onnx")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    for needle in ("quantized already", "int8 twin `edge quantize` wrote", "loads on edge.Runtime", "pass the float"):
        assert needle in err, err
    with pytest.raises(ConfigError, match="int8 twin `edge quantize` wrote"):
        quantize_onnx(twin, tmp_path / "api.onnx", check={"x": X[:4]})


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_calibration_takes_samples_that_are_not_a_multiple_of_the_batch(
    floats, tmp_path, monkeypatch, capsys, method
):
    out = tmp_path / "q.onnx"
    seven = ["--reduce-range"] if u8s8_saturates() is not False else []
    argv = ["quantize", floats / "cnn.onnx", "--out", out, "--mode", "static", "--calib", floats / "cnn.npz"]
    code = edge(monkeypatch, *argv, "--calibrate-method", method, *seven)  # 20 samples, batches of 16
    err = capsys.readouterr().err
    assert code == 0, err  # was: the quantizer failed on cnn.onnx: ValueError: ... inhomogeneous shape
    assert out.exists()
    feeds = [{"x": X[:16]}, {"x": X[16:]}]  # given as batches of two sizes: refused, saying what to pass
    with pytest.raises(ConfigError, match=rf"{method} calibration needs feeds of one shape.*minmax"):
        quantize_onnx(floats / "cnn.onnx", tmp_path / "api.onnx", mode="static", calib=feeds, calibrate_method=method)
