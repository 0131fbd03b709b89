"""Taps a user may name that are not a block's features: each is pooled correctly or refused in one line.

A graph input, a tensor of rank 2 or 5, the model's own output: pooled (the mean over every axis but the batch and
the features, nothing for rank 2). A name that matches nothing, a stored weight, an integer tensor: refused naming
what to pass, and on the CLI (``edge update --taps``) exit 2 with one line. No torch needed.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge import cli
from edge.errors import ConfigError
from edge.route.taps import FEATURES, tap_model


@pytest.fixture
def model(tmp_path):
    """x [B, 3, 4, 4] -> Conv c [B, 8, 4, 4] -> Unsqueeze c5 [B, 8, 1, 4, 4] -> Relu r5; Flatten(c) [B, 128] -> MatMul
    logits [B, 2] -> ArgMax pred (int64); ids [B, 5] (int64) -> Cast idsf."""
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal((128, 2)).astype(np.float32), "g"),
        numpy_helper.from_array(np.array([2], np.int64), "ax"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Unsqueeze", ["c", "ax"], ["c5"]),
        helper.make_node("Relu", ["c5"], ["r5"]),
        helper.make_node("Flatten", ["c"], ["flat"]),
        helper.make_node("MatMul", ["flat", "g"], ["logits"]),
        helper.make_node("ArgMax", ["logits"], ["pred"], axis=1, keepdims=0),
        helper.make_node("Cast", ["ids"], ["idsf"], to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes,
        "edges",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 4, 4]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 5]),
        ],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2]),
            helper.make_tensor_value_info("pred", TensorProto.INT64, ["batch"]),
            helper.make_tensor_value_info("r5", TensorProto.FLOAT, ["batch", 8, 1, 4, 4]),
            helper.make_tensor_value_info("idsf", TensorProto.FLOAT, ["batch", 5]),
        ],
        weights,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(tmp_path / "m.onnx"))
    return tmp_path / "m.onnx"


def _values(path, tensor: str, feeds) -> np.ndarray:
    """``tensor``'s values, from the model with it as one more output."""
    m = onnx.load(str(path))
    if tensor not in {o.name for o in m.graph.output} | {i.name for i in m.graph.input}:
        m.graph.output.append(helper.make_tensor_value_info(tensor, TensorProto.FLOAT, None))
    if tensor in feeds:
        return feeds[tensor]
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run([tensor], feeds)[0]


FEEDS = {
    "x": np.random.default_rng(1).standard_normal((3, 3, 4, 4)).astype(np.float32),
    "ids": np.arange(15, dtype=np.int64).reshape(3, 5),
}


@pytest.mark.parametrize(
    "tensor, axes",
    [
        ("x", (2, 3)),  # the graph input: pixels pooled over H, W
        ("c", (2, 3)),
        ("flat", ()),  # rank 2: already [B, C]
        ("c5", (2, 3, 4)),  # rank 5 [B, C, D, H, W]: over every axis after the channels
        ("r5", (2, 3, 4)),  # the model's own output, rank 5
        ("logits", ()),  # the model's own output
        ("idsf", ()),
    ],
)
def test_a_tap_of_any_rank_is_pooled_over_every_axis_but_batch_and_features(model, tmp_path, tensor, axes):
    tapped = tap_model(model, tmp_path / "t.onnx", [tensor])
    got = ort.InferenceSession(str(tapped.path), providers=["CPUExecutionProvider"]).run(None, FEEDS)
    outputs = [o.name for o in onnx.load(str(tapped.path)).graph.output]
    value = _values(model, tensor, FEEDS)
    want = value.mean(axes) if axes else value
    np.testing.assert_allclose(got[outputs.index(FEATURES)], want, rtol=1e-6, atol=1e-6)
    assert tapped.width == want.shape[1] and tapped.tap_set == "names"


@pytest.mark.parametrize(
    "tensor, says",
    [
        ("nope", "tap 'nope' names no tensor of model 'edges'; pass a tap set (all, attn"),
        ("flt", "tap 'flt' names no tensor of model 'edges' (close: flat"),
        ("w", "tap 'w' is a stored weight of model 'edges', not an activation; pass a tap set"),
        ("ids", "tap 'ids' of model 'edges' holds int64; tap float tensors only"),
        ("pred", "tap 'pred' of model 'edges' holds int64; tap float tensors only"),
    ],
)
def test_a_tap_that_is_no_activation_is_refused_naming_what_to_pass(model, tmp_path, tensor, says):
    with pytest.raises(ConfigError) as e:
        tap_model(model, tmp_path / "t.onnx", ["c", tensor])
    assert says in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "t.onnx").exists()


@pytest.mark.parametrize(
    "taps, says",
    [
        ("nope", "names no tensor"),
        ("c,nope", "names no tensor"),
        ("w", "is a stored weight"),
        ("ids", "holds int64"),
        ("attn", "tap set 'attn' finds nothing in model 'edges'"),
        ("auto:0", "must be a whole number >= 1"),
        (",", "no taps given"),
    ],
)
def test_edge_update_taps_refuses_in_one_line(model, tmp_path, capsys, taps, says):
    np.savez(tmp_path / "d.npz", **FEEDS, y=np.arange(3) % 2)
    code = cli.main(["update", "--model", str(model), "--data", str(tmp_path / "d.npz"), "--taps", taps])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and says in err and "Traceback" not in err, err
