"""The onnxruntime backend's footprint prediction (runtimes.ort_footprint), part by part, from a model's graph.

The parts are counts and bytes read from the graph, so they are asserted exactly; the per-session constants are
fitted on measurements (figures in the module doc), so only how the strategies compose them is asserted here. No
resident memory is measured in these tests.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge.convert.onnx_import import make_adapter_ready
from edge.errors import ConfigError
from runtimes.base import BackendOptions
from runtimes.onnxruntime import OrtBackend
from runtimes.ort_footprint import ARENA_FACTOR, CONSTANT_BYTES, NODE_BYTES, SESSION_MB, OrtParts, ort_parts

MB = 2**20
F4 = np.dtype(np.float32)


def _mixed_graph() -> tuple[onnx.ModelProto, dict]:
    """ids -> Gather(emb) -> ReduceMean (declared [batch, 8]) -> + x -> MatMul(w1 [8, 20]) -> Relu -> Mul(s [20])
    -> Gemm(w2 [3, 20], transB) -> y; no other value info, so the other sizes are propagated."""
    rng = np.random.default_rng(0)
    weights = {
        "emb": rng.standard_normal((50, 8)).astype(np.float32),
        "w1": rng.standard_normal((8, 20)).astype(np.float32),
        "s": rng.standard_normal(20).astype(np.float32),
        "w2": rng.standard_normal((3, 20)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["e"]),
        helper.make_node("ReduceMean", ["e", "axis"], ["e2"], keepdims=0),
        helper.make_node("Add", ["x", "e2"], ["a"]),
        helper.make_node("MatMul", ["a", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Mul", ["r", "s"], ["m"]),
        helper.make_node("Gemm", ["m", "w2"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "mixed",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(np.array([1], np.int64), "axis")],
        value_info=[helper.make_tensor_value_info("e2", TensorProto.FLOAT, ["batch", 8])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), weights


def _shapes(weights: dict) -> dict:
    return {k: (v.shape, v.dtype) for k, v in weights.items()}


def test_parts_of_a_float_graph():
    proto, weights = _mixed_graph()
    parts = ort_parts(proto, _shapes(weights), fed={"emb"}, batch=2)
    assert parts.weights == sum(v.nbytes for v in weights.values()) == (50 * 8 + 8 * 20 + 20 + 3 * 20) * 4
    # MLAS packs w1 [K=8, N=20] and w2 (transB: N=3, K=20) with N padded to 16; s is copied; emb is fed
    assert parts.packed == 32 * 8 * 4 + 16 * 20 * 4 + 20 * 4
    assert parts.nodes == 7
    assert parts.constants == 5  # the four weights and the ReduceMean axis
    # batch 2: inputs x (64 B) and ids (64 B) throughout; the peak is while ReduceMean runs: e (2 x 4 rows of 8
    # floats, Gather from the table) and e2 (declared [batch, 8]) alive together
    assert parts.activations == 64 + 64 + 2 * 4 * 8 * 4 + 2 * 8 * 4
    assert ort_parts(proto, _shapes(weights), fed={"emb"}, batch=8).activations == 4 * parts.activations


def test_parts_of_quantized_graphs():
    """A MatMulInteger weight and a QDQ weight (DequantizeLinear -> MatMul) pack as int8: N padded to 16, K to 4,
    plus an int32 column sum; the dequantized weight is folded at build, no activation; DynamicQuantizeLinear
    makes one byte an element."""
    w = np.ones((6, 20), np.int8)
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
        helper.make_node("MatMulInteger", ["xq", "wq", "xz"], ["acc"]),
        helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
        helper.make_node("DequantizeLinear", ["wd", "scale", "zp"], ["wdf"]),
        helper.make_node("MatMul", ["x", "wdf"], ["p"]),
        helper.make_node("Add", ["accf", "p"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "int8",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 20])],
        [numpy_helper.from_array(np.float32(0.1), "scale"), numpy_helper.from_array(np.int8(0), "zp")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    shapes = {"wq": (w.shape, w.dtype), "wd": (w.shape, w.dtype)}
    parts = ort_parts(proto, shapes, fed=set(), batch=1)
    assert parts.weights == 2 * w.nbytes
    assert parts.packed == 2 * (32 * 8 + 4 * 32)
    assert parts.nodes == 6
    assert parts.constants == 4  # two weights, a scale, a zero point
    # x (24 B) throughout; xq (6 B), xs (4), xz (1) until MatMulInteger has read them; acc (20 int32), then accf
    # and p (20 float32 each): the peak while the Add writes y (80 B), accf and p still alive
    assert parts.activations == 24 + 3 * 80


def test_strategies_compose_the_parts():
    parts = OrtParts(weights=10 * MB, packed=4 * MB, activations=MB, nodes=100, constants=30)
    session = SESSION_MB + (NODE_BYTES * 100 + CONSTANT_BYTES * 30 + ARENA_FACTOR * MB) / MB
    assert parts.session_mb() == pytest.approx(session)
    assert parts.mb("bound") == pytest.approx(10 + session)
    assert parts.mb("rebuild") == pytest.approx(14 + session)
    assert parts.mb("hybrid") == pytest.approx(14 + 2 * session)
    assert parts.mb("hybrid") == pytest.approx(parts.mb("bound") + parts.mb("rebuild") - 10)
    with pytest.raises(ConfigError, match="unknown onnxruntime strategy 'turbo'; allowed: hybrid, bound, rebuild"):
        parts.mb("turbo")


@pytest.fixture
def mixed_model(tmp_path):
    proto, weights = _mixed_graph()
    proto.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in weights.items())
    make_adapter_ready(proto, name="mixed")
    path = tmp_path / "mixed.onnx"
    onnx.save_model(proto, path)
    return path


@pytest.mark.parametrize("strategy", ["bound", "hybrid", "rebuild"])
def test_backend_predicts_from_the_graph(mixed_model, monkeypatch, strategy):
    """The loaded backend (bound: from the graph at load; the others: from the graph kept for rebuilds, at the first
    call), the file and the file's bytes give the same prediction, at batch 1, without onnx's shape inference (its
    schema registry stays resident once built)."""

    def refuse(*a, **k):
        raise AssertionError("the prediction must not run onnx shape inference")

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", refuse)
    with OrtBackendCtx(mixed_model, BackendOptions(strategy=strategy)) as b:
        fed = b._fed
        for s in OrtBackend.STRATEGIES:
            assert b.predicted_mb(s) == pytest.approx(OrtBackend.footprint_mb(mixed_model, s))
            assert b.predicted_mb(s) == pytest.approx(OrtBackend.footprint_mb(mixed_model.read_bytes(), s))
        assert b._parts.weights == sum(v.nbytes for v in b._live.values()) == (50 * 8 + 8 * 20 + 3 * 20) * 4
        assert b._parts.packed == 32 * 8 * 4 + 16 * 20 * 4  # the embedding table is fed, not packed
        assert "emb" in fed and "s" not in b._live  # a 1-D constant stays in the graph (not writable)


@pytest.mark.parametrize("which", ["hybrid", "bound"])
def test_auto_picks_by_the_graph_prediction(mixed_model, which):
    with OrtBackendCtx(mixed_model, BackendOptions(strategy="bound")) as b:
        pred = {s: b.predicted_mb(s) for s in OrtBackend.STRATEGIES}
    assert pred["bound"] < pred["hybrid"]
    budget = pred[which] + 1e-6  # just what ``which`` needs: bound's leaves hybrid out
    with OrtBackendCtx(mixed_model, BackendOptions(strategy="auto", memory_mb=budget)) as b:
        assert b.strategy == which
        assert b.predicted_mb() == pytest.approx(pred[which])


def test_auto_refuses_a_budget_under_every_prediction(mixed_model):
    bound = OrtBackend.footprint_mb(mixed_model, "bound")
    with pytest.raises(ConfigError, match="no onnxruntime strategy fits the memory budget"):
        OrtBackend(mixed_model, BackendOptions(strategy="auto", memory_mb=bound * 0.99))


class OrtBackendCtx:
    def __init__(self, path, options):
        self.b = OrtBackend(path, options)

    def __enter__(self):
        return self.b

    def __exit__(self, *exc):
        self.b.close()
