"""The footprint prediction on graph shapes the calibration models lacked (runtimes.ort_footprint), from the graph.

Measured on models exported from torch by ``exporters.onnx`` (fresh child processes, ``lab.bench_memory``; median of
2 rounds), each prediction had one wrong term:

- a MobileNetV2-shaped CNN (13 MB of weights): ``bound`` predicted 102 MB, measured 39. torch.onnx writes
  ``CastLike(scalar, x)`` before every Conv (its zero bias) and Clip (ReLU6's bounds), and ``CastLike`` was taken as
  elementwise: each counted at the activation's size. Now its first input's shape: 61 MB; and a convolutional graph
  (every activation a graph tensor) holds 1.8-2.25x its activation peak, not ``ARENA_FACTOR`` (4.5, fitted on
  transformers whose Attention nodes keep their scores out of the graph): ``CONV_ARENA_FACTOR``, 41 MB.
- a dynamic int8 ResNet-18 (``edge quantize``, which drops the value infos): ``bound`` predicted 126 MB, measured 28;
  a propagated Conv was taken at stride 1 (the stem: 4x its output). Now divided by its strides: 30 MB.
- a BERT-base-shaped encoder with 2 layers and a dynamic sequence: ``bound`` predicted 694 MB, measured 170 at 128
  tokens: an activation's ``Shape`` was taken as elementwise, and the ``Reshape`` reading it took its size, 3x a
  layer. Now ``Shape`` is a few int64s and ``Reshape`` its first input: 208 MB (at 512 tokens, the position table's).
- a model indexing a 24 MB parameter (``table[ids]``: torch.onnx writes ``GatherND(Transpose(table))``): ``bound``
  predicted 25 MB, measured 55.5, so a budget of 40 admitted it: the bound session, whose weights are graph inputs,
  transposes the table on every run. Now counted (``per_run``): 49 MB.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from runtimes.ort_footprint import ARENA_FACTOR, CONV_ARENA_FACTOR, SESSION_MB, OrtParts, ort_parts

MB = 2**20


def _model(nodes, inputs, outputs, inits, value_info=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits, value_info=list(value_info))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _shapes(weights: dict) -> dict:
    return {k: (v.shape, v.dtype) for k, v in weights.items()}


def test_castlike_of_a_scalar_is_a_scalar_not_the_activation():
    """x [1, 16, 64, 64] -> Conv(w, bias = Expand(CastLike(0, x), [16])) -> Clip(CastLike(0, c), CastLike(6, c)) ->
    y: the graph's input and output are live throughout, and the Conv's output: 3 x 256 KiB. Before, the CastLike
    outputs and the bias counted 256 KiB each (peak 1.5 MiB)."""
    w = np.zeros((16, 16, 3, 3), np.float32)
    act = 16 * 64 * 64 * 4
    nodes = [
        helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0.0, np.float32))),
        helper.make_node("Constant", [], ["six"], value=numpy_helper.from_array(np.array(6.0, np.float32))),
        helper.make_node("CastLike", ["zero", "x"], ["z"]),
        helper.make_node("Expand", ["z", "n"], ["bias"]),
        helper.make_node("Conv", ["x", "w", "bias"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("CastLike", ["zero", "c"], ["lo"]),
        helper.make_node("CastLike", ["six", "c"], ["hi"]),
        helper.make_node("Clip", ["c", "lo", "hi"], ["y"]),
    ]
    proto = _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16, 64, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16, 64, 64])],
        [numpy_helper.from_array(np.array([16], np.int64), "n")],
    )
    parts = ort_parts(proto, _shapes({"w": w}), fed=set())
    assert parts.activations == 3 * act + 2 * 4  # and the two bounds: scalars


def test_a_propagated_conv_or_pool_divides_the_positions_by_its_strides():
    """x [1, 3, 224, 224] (declared) -> Conv(64, 7x7, stride 2) -> MaxPool(stride 2) -> y: no value info, as
    ``edge quantize`` leaves it; the Conv's output is 64 x 112 x 112, the pool's 64 x 56 x 56."""
    w = np.zeros((64, 3, 7, 7), np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], strides=[2, 2], pads=[3, 3, 3, 3]),
        helper.make_node("MaxPool", ["c"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    ]
    proto = _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64, "h", "w"])],
        [],
    )
    x, c, y = 3 * 224 * 224 * 4, 64 * 112 * 112 * 4, 64 * 56 * 56 * 4
    assert ort_parts(proto, _shapes({"w": w}), fed=set()).activations == x + c + y
    assert ort_parts(proto, _shapes({"w": w}), fed=set(), batch=4).activations == 4 * (x + c + y)


def test_an_activations_shape_is_a_few_int64s_and_a_reshape_keeps_its_input():
    """x [batch, 512, 768] (declared) -> MatMul(w [768, 768]) -> q; Shape(q) -> Slice -> Concat -> Reshape(q) ->
    Transpose -> y, nothing else declared: the live activations are x, q and the reshaped and transposed q, never
    a shape tensor the size of q (before: the Reshape took the Concat of three q-sized shapes: 3x q)."""
    w = np.zeros((768, 768), np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["q"]),
        helper.make_node("Shape", ["q"], ["s"]),
        helper.make_node("Slice", ["s", "start", "end"], ["s2"]),
        helper.make_node("Concat", ["s2", "heads"], ["shape"], axis=0),
        helper.make_node("Reshape", ["q", "shape"], ["r"]),
        helper.make_node("Transpose", ["r"], ["y"], perm=[0, 2, 1, 3]),
    ]
    inits = [
        numpy_helper.from_array(np.array([0], np.int64), "start"),
        numpy_helper.from_array(np.array([2], np.int64), "end"),
        numpy_helper.from_array(np.array([12, 64], np.int64), "heads"),
    ]
    proto = _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 512, 768])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 12, "seq", 64])],
        inits,
    )
    q = 512 * 768 * 4
    parts = ort_parts(proto, _shapes({"w": w}), fed=set())
    assert 3 * q <= parts.activations <= 3 * q + 1024  # x, q, r at the Reshape (then x gone: q, r, y); shapes small


def test_the_bound_session_counts_what_it_computes_from_the_weights_every_run():
    """ids [batch, 32] -> Gather(Transpose(table [50000, 128]), axis=1) -> ReduceMean -> Gemm(w [10, 128]) -> y:
    the table is read by a Transpose, as torch.onnx writes ``table[ids]``; the bound session, whose weights are graph
    inputs, transposes it on every run (the prepacked one folds it at build: its copy is ``packed``)."""
    table = np.zeros((50000, 128), np.float32)
    w = np.zeros((10, 128), np.float32)
    nodes = [
        helper.make_node("Shape", ["table"], ["rows"]),  # a weight's shape: folded in both sessions
        helper.make_node("Transpose", ["table"], ["tt"], perm=[1, 0]),
        helper.make_node("Gather", ["tt", "ids"], ["h"], axis=1),
        helper.make_node("ReduceMean", ["h", "axes"], ["m"], keepdims=0),
        helper.make_node("Gemm", ["m", "w"], ["y"], transB=1),
    ]
    proto = _model(
        nodes,
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(np.array([0], np.int64), "axes")],
    )
    parts = ort_parts(proto, _shapes({"table": table, "w": w}), fed=set())
    assert parts.per_run == table.nbytes
    assert parts.packed >= table.nbytes
    assert parts.mb("bound") - parts.weights / MB == pytest.approx(parts.session_mb() + table.nbytes / MB)
    assert parts.mb("rebuild") - parts.mb("bound") == pytest.approx((parts.packed - table.nbytes) / MB)


def test_per_run_adds_to_the_bound_session_only():
    parts = OrtParts(weights=10 * MB, packed=4 * MB, activations=MB, nodes=0, constants=0, per_run=3 * MB)
    plain = OrtParts(weights=10 * MB, packed=4 * MB, activations=MB, nodes=0, constants=0)
    assert parts.mb("bound") - plain.mb("bound") == pytest.approx(3)
    assert parts.mb("rebuild") == pytest.approx(plain.mb("rebuild"))
    assert parts.mb("hybrid") - plain.mb("hybrid") == pytest.approx(3)
    assert plain.mb("bound") == pytest.approx(10 + plain.session_mb())
    assert plain.session_mb() - plain.session_mb(bound=True) == 0
    assert plain.session_mb() > ARENA_FACTOR  # ARENA_FACTOR x 1 MB of activations


def _conv_graph(*extra_nodes, extra_inits=()):
    w = numpy_helper.from_array(np.zeros((8, 3, 3, 3), np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), *extra_nodes]
    out = extra_nodes[-1].output[0] if extra_nodes else "c"
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
        [w, *extra_inits],
    )


def test_a_convolutional_graph_holds_less_per_byte_of_its_peak_than_one_with_hidden_scratch():
    shapes = {"w": ((8, 3, 3, 3), np.dtype(np.float32))}
    conv = ort_parts(_conv_graph(), shapes, fed=set())
    assert conv.arena_factor == CONV_ARENA_FACTOR < ARENA_FACTOR
    # a product of two activations (attention scores: sized short by the walk) keeps the transformer factor
    square = ort_parts(_conv_graph(helper.make_node("MatMul", ["c", "c"], ["s"])), shapes, fed=set())
    assert square.arena_factor == ARENA_FACTOR
    # a product with a constant right-hand side does not
    shapes_v = {**shapes, "v": ((16, 4), np.dtype(np.float32))}
    v = numpy_helper.from_array(np.zeros((16, 4), np.float32), "v")
    head = ort_parts(_conv_graph(helper.make_node("MatMul", ["c", "v"], ["h"]), extra_inits=[v]), shapes_v, fed=set())
    assert head.arena_factor == CONV_ARENA_FACTOR
    recurrent = _conv_graph(helper.make_node("GRU", ["c", "w", "w"], ["r"], hidden_size=8))
    assert ort_parts(recurrent, shapes, fed=set()).arena_factor == ARENA_FACTOR
    # no convolution (a dense or transformer graph): the factor its fit was made on
    dense = _model(
        [helper.make_node("MatMul", ["x", "v"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [v],
    )
    assert ort_parts(dense, {"v": shapes_v["v"]}, fed=set()).arena_factor == ARENA_FACTOR
    parts = OrtParts(weights=0, packed=0, activations=MB, nodes=0, constants=0, arena_factor=CONV_ARENA_FACTOR)
    assert parts.session_mb() == pytest.approx(SESSION_MB + CONV_ARENA_FACTOR)
