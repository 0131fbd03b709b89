"""Tap sets on transformers exported below opset 17, whose layer norms are written out in primitive ops."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edge.route.tapsets import resolve_taps  # noqa: E402


def _norm(i: int, x: str, decomposed: bool) -> tuple[list, str]:
    p = f"ln{i}"
    if not decomposed:
        return [helper.make_node("LayerNormalization", [x, f"{p}.g", f"{p}.b"], [f"{p}.y"], axis=-1)], f"{p}.y"
    names = [f"{p}.{k}" for k in ("mean", "d", "sq", "var", "ve", "sd", "n", "s", "y")]
    mean, d, sq, var, ve, sd, n, s, y = names
    return [
        helper.make_node("ReduceMean", [x], [mean], axes=[-1]),
        helper.make_node("Sub", [x, mean], [d]),
        helper.make_node("Pow", [d, "two"], [sq]),
        helper.make_node("ReduceMean", [sq], [var], axes=[-1]),
        helper.make_node("Add", [var, "eps"], [ve]),
        helper.make_node("Sqrt", [ve], [sd]),
        helper.make_node("Div", [d, sd], [n]),
        helper.make_node("Mul", [n, f"{p}.g"], [s]),
        helper.make_node("Add", [s, f"{p}.b"], [y]),
    ], y


def block(decomposed: bool) -> onnx.ModelProto:
    """x -> LN1 -> MatMul -> +x -> LN2 -> MatMul -> +, pooled: a pre-LN block, norms as an op or written out."""
    rng = np.random.default_rng(0)
    inits = {"w1": rng.standard_normal((8, 8)), "w2": rng.standard_normal((8, 8)), "two": np.array(2.0),
             "eps": np.array(1e-5)}  # fmt: skip
    for i in (1, 2):
        inits[f"ln{i}.g"], inits[f"ln{i}.b"] = rng.standard_normal(8) + 1, rng.standard_normal(8)
    n1, y1 = _norm(1, "x", decomposed)
    n2, y2 = _norm(2, "r1", decomposed)
    nodes = [
        *n1,
        helper.make_node("MatMul", [y1, "w1"], ["a"]),
        helper.make_node("Add", ["a", "x"], ["r1"]),
        *n2,
        helper.make_node("MatMul", [y2, "w2"], ["m"]),
        helper.make_node("Add", ["m", "r1"], ["r2"]),
        helper.make_node("ReduceMean", ["r2"], ["y"], axes=[1], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17 if not decomposed else 13)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("taps", ["attn", "mlp-in", "attn-in", "all", "auto"])
def test_written_out_layer_norms_give_the_taps_of_the_op(taps):
    names = {"attn": ["r1"], "mlp-in": ["ln2.y"], "attn-in": ["ln1.y"], "all": ["r1"], "auto": ["r1"]}
    assert resolve_taps(block(decomposed=False), taps) == names[taps]
    assert resolve_taps(block(decomposed=True), taps) == names[taps]
