"""onnxruntime.quantization options beyond tests/host/test_outside_int8.py, on a CNN (BatchNorm, depthwise conv), a
2-layer transformer encoder and a MiniLM-shaped BERT (issue 18; "An ONNX file exported elsewhere").

A file quantized by onnxruntime's own tools (16-bit activations, 4-bit or 16-bit weights, ``DedicatedQDQPair``,
``QuantizeBias`` off, com.microsoft Q/DQ ops, per channel on another axis, 4-bit ``MatMulNBits``) records no grids:
``edge import-onnx`` refuses it naming its ops and ``edge quantize``, ``edge inspect`` and ``edge.Runtime`` refuse it
(or, quantized after the import, refuse it naming the tool), each in one typed line. The same options given to
``exporters.quantize_onnx`` on the imported float file give integer targets whose adapters (integer, float clipped,
fused) are written exactly, reach the kernels under every strategy (outputs equal onnxruntime on the merged file) and
undo bit-exactly; the types it does not write (int16, int4) are a ``ConfigError`` before any work.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
oq = pytest.importorskip("onnxruntime.quantization")
from torch import nn  # noqa: E402

from edge.cli import main  # noqa: E402
from edge.convert.onnx_import import import_onnx  # noqa: E402
from edge.errors import ConfigError, FormatError  # noqa: E402
from edge.runtime import Runtime  # noqa: E402
from exporters.quantize import quantize_onnx  # noqa: E402
from tests.host.test_int8_T17_shared import Encoder, switch_exactly  # noqa: E402
from tests.host.test_outside_int8 import _adapter, _q, _Reader, _stored  # noqa: E402
from tests.host.test_outside_onnx_exports import cnn  # noqa: E402

STRATEGIES = ("hybrid", "bound", "rebuild")


class MiniLM(nn.Module):  # MiniLM's shape, scaled down: BertConfig, random weights, mean pooled
    def __init__(self):
        super().__init__()
        from transformers import BertConfig, BertModel

        config = BertConfig(
            vocab_size=60,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=16,
            type_vocab_size=1,
        )
        self.m = BertModel(config, add_pooling_layer=False)

    def forward(self, ids):
        return self.m(input_ids=ids).last_hidden_state.mean(1)


MODELS = {
    "cnn": (cnn, "x", lambda r, n: r.standard_normal((n, 3, 6, 6)).astype(np.float32)),
    "encoder": (Encoder, "x", lambda r, n: r.standard_normal((n, 5, 16)).astype(np.float32)),
    "minilm": (MiniLM, "ids", lambda r, n: r.integers(0, 60, (n, 8)).astype(np.int64)),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (torch.onnx export, its import, calibration feed, check feed); built on first use."""
    root, out = tmp_path_factory.mktemp("int8-foreign"), {}

    def get(name):
        if name not in out:
            if name == "minilm":
                pytest.importorskip("transformers")
            make, inp, draw = MODELS[name]
            torch.manual_seed(0)
            rng = np.random.default_rng(0)
            calib, x = {inp: draw(rng, 32)}, {inp: draw(rng, 4)}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    make().eval(),
                    (torch.from_numpy(x[inp][:2]),),
                    str(root / f"{name}.onnx"),
                    dynamo=False,
                    opset_version=17,
                    input_names=[inp],
                    output_names=["y"],
                    dynamic_axes={inp: {0: "b"}},
                )
            import_onnx(root / f"{name}.onnx", root / f"{name}.edge.onnx")
            out[name] = (root / f"{name}.onnx", root / f"{name}.edge.onnx", calib, x)
        return out[name]

    return get


QT, QDQ, QOP = oq.QuantType, oq.QuantFormat.QDQ, oq.QuantFormat.QOperator
#: onnxruntime's quantizer as users call it, with the options tests/host/test_outside_int8.py does not cover
FOREIGN = {
    "dynamic-int8-per-tensor": ("dynamic", {"weight_type": QT.QInt8}),
    "dynamic-uint8-channel-reduce": ("dynamic", {"weight_type": QT.QUInt8, "per_channel": True, "reduce_range": True}),
    "qdq-u16-activations": ("static", {"quant_format": QDQ, "activation_type": QT.QUInt16, "weight_type": QT.QInt8}),
    "qdq-s16-s16": ("static", {"quant_format": QDQ, "activation_type": QT.QInt16, "weight_type": QT.QInt16}),
    "qdq-int4-weights": ("static", {"quant_format": QDQ, "activation_type": QT.QUInt16, "weight_type": QT.QInt4}),
    "qdq-channel-axis": (
        "static",
        {"quant_format": QDQ, "per_channel": True}
        | {"extra_options": {"QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}}},
    ),
    "qdq-dedicated-pairs": ("static", {"quant_format": QDQ, "extra_options": {"DedicatedQDQPair": True}}),
    "qdq-no-bias": ("static", {"quant_format": QDQ, "extra_options": {"QuantizeBias": False}}),
    "qdq-contrib-ops": ("static", {"quant_format": QDQ, "extra_options": {"UseQDQContribOps": True}}),
    "qoperator-s8s8": ("static", {"quant_format": QOP, "activation_type": QT.QInt8, "weight_type": QT.QInt8}),
    "matmul-4bits": ("nbits", {}),
}
#: what each refusal names (QOperator: QLinearConv on the CNN, QLinearMatMul on the transformers)
CASES = [(m, c) for m in MODELS for c in FOREIGN if not (m == "cnn" and c == "matmul-4bits")]  # the CNN: no MatMul


def _foreign(src, out, case, calib):
    mode, kwargs = FOREIGN[case]
    logging.getLogger().disabled, was = True, logging.getLogger().disabled  # onnxruntime's pre-processing banner
    try:
        if mode == "dynamic":
            oq.quantize_dynamic(src, out, **kwargs)
        elif mode == "static":
            oq.quantize_static(src, out, _Reader(calib), **kwargs)
        else:
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=16, is_symmetric=True)
            quantizer.process()
            quantizer.model.save_model_to_file(str(out))
    finally:
        logging.getLogger().disabled = was
    return out


def _one_line(argv, capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.slow
@pytest.mark.parametrize("name,case", CASES, ids=[f"{m}-{c}" for m, c in CASES])
def test_a_file_onnxruntime_quantized_is_refused_in_one_line_everywhere(exported, tmp_path, capsys, name, case):
    raw, imported, calib, _ = exported(name)
    q = _foreign(raw, tmp_path / "q.onnx", case, calib)
    ops = {n.op_type for n in onnx.load(str(q)).graph.node}
    if case == "qoperator-s8s8":
        assert {"QLinearConv" if name == "cnn" else "QLinearMatMul"} <= ops
    if case == "matmul-4bits":
        assert "MatMulNBits" in ops
    with pytest.raises(ConfigError, match=r"already quantized \(.+\): import the float model.*`edge quantize`"):
        import_onnx(q, tmp_path / "out.onnx")
    said = _one_line(["import-onnx", str(q), "--out", str(tmp_path / "cli.onnx")], capsys)
    assert "already quantized" in said and "edge quantize" in said
    assert "quantized by another tool" in _one_line(["inspect", str(q)], capsys)
    said = _one_line(["quantize", str(q), "--out", str(tmp_path / "again.onnx")], capsys)
    assert "quantized by another tool" in said and "edge import-onnx" in said
    for strategy in STRATEGIES:
        with pytest.raises(FormatError, match=r"quantized by another tool.*`edge quantize`"):
            Runtime(q, strategy=strategy)
    # quantized after the import (onnxruntime keeps the metadata): refused by inspect and at load, naming the tool
    after = _foreign(imported, tmp_path / "after.onnx", case, calib)
    assert "edge quantize" in _one_line(["inspect", str(after)], capsys)
    for strategy in STRATEGIES:
        with pytest.raises(FormatError, match=r"quantized after export by another tool.*`edge quantize`"):
            Runtime(after, strategy=strategy)
    assert not any((tmp_path / n).exists() for n in ("out.onnx", "cli.onnx", "again.onnx"))


#: the same options through the README's path: exporters.quantize_onnx on the imported float file
OURS = {
    "dynamic-int8-per-tensor": {"mode": "dynamic"},
    "dynamic-uint8-channel-reduce": {"mode": "dynamic", "weight_type": "uint8", "per_channel": True},
    "static-weights-asymmetric": {"mode": "static", "extra_options": {"WeightSymmetric": False}},
    "static-symmetric-int8": {
        "mode": "static",
        "activation_type": "int8",
        "extra_options": {"ActivationSymmetric": True, "WeightSymmetric": True},
    },
    "static-channel-axis": {
        "mode": "static",
        "per_channel": True,
        "extra_options": {"QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}},
    },
    "static-dedicated-pairs": {"mode": "static", "extra_options": {"DedicatedQDQPair": True}},
    "static-no-bias": {"mode": "static", "extra_options": {"QuantizeBias": False}},
    "static-contrib-ops": {"mode": "static", "extra_options": {"UseQDQContribOps": True}},
}
OUR_CASES = [(m, c) for m in MODELS for c in OURS]


@pytest.mark.slow
@pytest.mark.parametrize("name,case", OUR_CASES, ids=[f"{m}-{c}" for m, c in OUR_CASES])
def test_the_same_options_through_edge_quantize_give_exact_switchable_int8(exported, tmp_path, name, case):
    _, imported, calib, x = exported(name)
    options = {"reduce_range": True, **OURS[case]}  # 7-bit weights: exact on CPUs whose U8S8 kernels saturate
    report = quantize_onnx(imported, tmp_path / "q.onnx", calib=calib, **options)
    info, qpath = report.info, tmp_path / "q.onnx"
    assert report.dropped == {} and not report.float_targets and sorted(report.quantized) == sorted(info.tensors)
    if case == "static-channel-axis":  # the axis onnxruntime dequantizes along is the one recorded, whichever it is
        model = onnx.load(str(tmp_path / "q.onnx"))
        dq = {n.input[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
        for t in _q(info):
            if t.quant.axis is not None:
                axis = next((a.i for a in dq[t.initializer].attribute if a.name == "axis"), 1)
                assert t.stored_quant_axis == axis % len(t.stored_shape)
        assert any(t.quant.axis is not None for t in _q(info))
    base, inits = _stored(qpath, info)
    rng = np.random.default_rng(1)
    a, b = _adapter(info, base, "a", rng), _adapter(info, base, "b", rng)
    f = _adapter(info, base, "f", rng, scale=float(max(inits[t.quant.scale].max() for t in _q(info))) * 80)
    specs = ["a", "f", {"a": 1.0, "b": -1.0}, {"a": 1.0, "b": 1.0}, None]
    pairs = [[(a, 1.0)], [(f, 1.0)], [(a, 1.0), (b, -1.0)], [(a, 1.0), (b, 1.0)], []]
    for strategy in STRATEGIES:
        with Runtime(qpath, strategy=strategy) as rt:
            rt.load_adapter(a)
            rt.load_adapter(b)
            rt.load_adapter(f, clip=True)
            switch_exactly(rt, strategy, qpath, info, (base, inits), x, specs, pairs)


@pytest.mark.parametrize(
    "option,value", [("activation_type", "int16"), ("activation_type", "uint16"), ("weight_type", "int4")]
)
def test_integer_types_adapters_do_not_write_are_refused_before_any_work(tmp_path, option, value):
    src = tmp_path / "absent.onnx"  # refused on the arguments alone: the file is never opened
    with pytest.raises(ConfigError, match=rf"{option} '{value}'.*types \['int8', 'uint8'\]"):
        quantize_onnx(
            src, tmp_path / "q.onnx", mode="static", calib={"x": np.zeros((1, 2), np.float32)}, **{option: value}
        )
    assert not (tmp_path / "q.onnx").exists()
