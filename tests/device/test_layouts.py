"""N-D stored layouts (TFLite's OHWI, depthwise [1,H,W,C]) and folded per-channel scales.

A converter may store a source (torch) weight permuted and scaled per output channel (BatchNorm
folded into a convolution); an adapter given on the source weight must land on exactly the
stored entries, scaled, and undo bit-exactly.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edge import Runtime
from edge.errors import FormatError
from edge.format.adapter import Adapter, SparseDelta
from edge.format.modelinfo import ModelInfo, TensorInfo
from tests._tiny import write_model

C_OUT, C_IN, K = 6, 3, 3  # conv out/in channels, kernel


def _conv_model(path, perm, scale):
    """x[B,3,8,8] -> Conv(W) with W stored as ``source.transpose(perm) * scale[o]``, un-permuted in the graph."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((C_OUT, C_IN, K, K)).astype(np.float32)
    s = rng.uniform(0.5, 2.0, C_OUT).astype(np.float32) if scale else None
    folded = w * s[:, None, None, None] if scale else w
    stored = {"conv.weight": np.ascontiguousarray(folded.transpose(perm))}
    back = [int(a) for a in np.argsort(perm)]
    nodes = [
        helper.make_node("Transpose", ["conv.weight"], ["w_oihw"], perm=back),
        helper.make_node("Conv", ["x", "w_oihw"], ["y"], pads=[1, 1, 1, 1]),
    ]
    folded_by = None if s is None else tuple(map(float, s))
    tensors = {"conv.weight": TensorInfo("conv.weight", (C_OUT, C_IN, K, K), perm=tuple(perm), channel_scale=folded_by)}
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", C_IN, 8, 8])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", C_OUT, 8, 8])]
    info = write_model(path, "conv-layout", nodes, inputs, outputs, stored, tensors)
    return info, w, s


def _reference(w, x):
    """The same conv with the source weight ``w``, in onnxruntime (no project code)."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(
        nodes,
        "ref",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", C_IN, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", C_OUT, 8, 8])],
        [helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.reshape(-1).tolist())],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("perm", [(0, 2, 3, 1), (1, 2, 3, 0), (0, 1, 2, 3)], ids=["ohwi", "hwio", "as-is"])
@pytest.mark.parametrize("scale", [False, True], ids=["plain", "bn-folded"])
@pytest.mark.parametrize("strategy", ["bound", "hybrid", "rebuild"])
def test_permuted_and_folded_weights_take_source_layout_adapters(tmp_path, perm, scale, strategy):
    info, w, s = _conv_model(tmp_path / "m.onnx", perm, scale)
    rng = np.random.default_rng(1)
    flat = np.sort(rng.choice(w.size, 20, replace=False))
    idx = np.stack(np.unravel_index(flat, w.shape)).astype(np.int32)
    vals = rng.standard_normal(20).astype(np.float32)
    adapter = Adapter("a", info.fingerprint, {"conv.weight": SparseDelta(idx, vals)}, {"conv.weight": w.shape})
    x = rng.standard_normal((2, C_IN, 8, 8)).astype(np.float32)
    rt = Runtime(tmp_path / "m.onnx", strategy=strategy)
    base_out = rt.run({"x": x})["y"]
    folded = w * s[:, None, None, None] if scale else w
    np.testing.assert_array_equal(rt.weights("conv.weight"), folded)
    rt.load_adapter(adapter)
    rt.switch("a")
    rt.backend.wait_settled()
    merged = w.copy()
    merged[tuple(idx)] += vals
    want = merged * s[:, None, None, None] if scale else merged
    np.testing.assert_allclose(rt.weights("conv.weight"), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(rt.run({"x": x})["y"], _reference(want, x), rtol=1e-5, atol=1e-5)
    rt.switch(None)
    rt.backend.wait_settled()
    np.testing.assert_array_equal(rt.weights("conv.weight"), folded)  # undo is bit-exact
    np.testing.assert_array_equal(rt.run({"x": x})["y"], base_out)
    rt.close()


def test_layout_metadata_round_trips_and_is_checked():
    scale = tuple(float(np.float32(v)) for v in (0.5, 1.25, 3.0))
    t = TensorInfo("w", (3, 2, 1, 1), perm=(0, 2, 3, 1), channel_scale=scale)
    info = ModelInfo("m", "sha256:0", {"w": t})
    back = ModelInfo.from_json(info.to_json()).tensors["w"]
    assert back == t and back.stored_shape == (3, 1, 1, 2)
    old = ModelInfo("m", "sha256:0", {"w": TensorInfo("w", (3, 2), transposed=True)})
    assert ModelInfo.from_json(old.to_json()).tensors["w"].layout == (1, 0)
    for bad in [
        dict(perm=(0, 0, 1, 2)),  # not a permutation
        dict(perm=(1, 0, 2, 3), transposed=True),  # both
        dict(channel_scale=(1.0, 2.0)),  # wrong count
    ]:
        with pytest.raises(FormatError):
            TensorInfo("w", (3, 2, 1, 1), **bad)
    text = info.to_json().replace(t._json()["channel_scale"], "AAAA")  # one scale for three channels
    with pytest.raises(FormatError, match="channel_scale"):
        ModelInfo.from_json(text)
    zero = ModelInfo("m", "sha256:0", {"w": TensorInfo("w", (3, 2, 1, 1), channel_scale=(1.0, 0.0, 2.0))})
    with pytest.raises(FormatError, match="zero or non-finite"):
        ModelInfo.from_json(zero.to_json())
