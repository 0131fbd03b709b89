"""A weight read by Shape (torch's dynamo export of a bias-less Conv: every HF CNN, before the exporter dropped those
zero biases) is quantized once, not kept twice: the int8 file holds no float copy of a conv weight and is smaller
than the float file."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")
T = pytest.importorskip("transformers")

from edge.runtime import Runtime  # noqa: E402
from exporters.hf import export_hf_encoder  # noqa: E402
from exporters.quantize import _fold_shape_reads, quantize_onnx  # noqa: E402


def _float_weights(path) -> set[str]:
    m = onnx.load(str(path))
    return {t.name for t in m.graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) == 4}


def test_an_hf_resnet_int8_twin_keeps_no_float_copy_of_its_convs(tmp_path):
    torch.manual_seed(0)
    model = T.ResNetModel(
        T.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic")
    ).eval()
    src, out = tmp_path / "resnet.onnx", tmp_path / "resnet.int8.onnx"
    export_hf_encoder(model, src, image_size=32, name="resnet", progress=False)
    shape_reads = [
        n for n in onnx.load(str(src)).graph.node if n.op_type == "Shape" and n.input[0] in _float_weights(src)
    ]
    assert not shape_reads  # the zero biases built from them are dropped at export (edge.format.onnx_scaffold);
    # files exported before that, or elsewhere and not imported, still read them: _fold_shape_reads, tested below
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    rep = quantize_onnx(src, out, mode="dynamic", check={"pixel_values": x}, min_cosine=0.9)
    assert not _float_weights(out)  # every conv weight stored once, as int8
    assert rep.bytes_after < rep.bytes_before
    with Runtime(out) as rt:  # its targets are the integers and it runs
        assert rt.info.tensors and any(t.quant is not None for t in rt.info.tensors.values())
        rt.run({"pixel_values": x[:1]})


def _shape_graph(attrs: dict, size: bool = False, as_input: bool = False):
    w = numpy_helper.from_array(np.zeros((4, 3, 2, 5), np.float32), "w")
    node = helper.make_node("Size" if size else "Shape", ["w"], ["s"], name="read", **attrs)
    inputs = [helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3, 2, 5])] if as_input else []
    g = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("s", TensorProto.INT64, None)], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize(
    "attrs, size, want",
    [
        ({}, False, [4, 3, 2, 5]),
        ({"start": 1}, False, [3, 2, 5]),
        ({"start": -3, "end": -1}, False, [3, 2]),
        ({"start": 9}, False, []),
        ({"end": -9}, False, []),
        ({}, True, 120),
    ],
)
def test_the_folded_constant_is_what_onnxruntime_computes(attrs, size, want):
    import onnxruntime as ort

    m = _shape_graph(attrs, size)
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]
    _fold_shape_reads(m)
    assert [n.op_type for n in m.graph.node] == ["Constant"] and m.graph.node[0].output[0] == "s"
    got = numpy_helper.to_array(m.graph.node[0].attribute[0].t)
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(got, want)


def test_a_weight_a_graph_input_can_replace_is_not_folded():
    m = _shape_graph({}, as_input=True)
    _fold_shape_reads(m)
    assert [n.op_type for n in m.graph.node] == ["Shape"]
