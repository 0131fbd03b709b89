"""Tiny ONNX models and adapters built with numpy and onnx only (no torch), for device-side tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge.format.adapter import Adapter, SparseDelta
from edge.format.modelinfo import META_KEY, ModelInfo, TensorInfo, fingerprint


def make_mlp(
    path: Path, seed: int = 0, sizes=(10, 20, 2), name: str = "tiny-mlp", extra: dict | None = None
) -> ModelInfo:
    """x[B,10] -> Linear -> ReLU -> Linear -> logits[B,2]; first weight stored transposed (as a folded export)."""
    rng = np.random.default_rng(seed)
    d_in, d_hid, d_out = sizes
    w1 = rng.standard_normal((d_hid, d_in)).astype(np.float32) * 0.5  # torch layout [out, in]
    b1 = rng.standard_normal(d_hid).astype(np.float32) * 0.1
    w2 = rng.standard_normal((d_out, d_hid)).astype(np.float32) * 0.5
    b2 = rng.standard_normal(d_out).astype(np.float32) * 0.1
    stored = {"fc1.weight": w1.T.copy(), "fc1.bias": b1, "fc2.weight": w2, "fc2.bias": b2}
    nodes = [
        helper.make_node("MatMul", ["x", "fc1.weight"], ["h0"]),
        helper.make_node("Add", ["h0", "fc1.bias"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("Gemm", ["h2", "fc2.weight", "fc2.bias"], ["logits"], transB=1),
    ]
    tensors = {
        "fc1.weight": TensorInfo("fc1.weight", (d_hid, d_in), transposed=True),
        "fc2.weight": TensorInfo("fc2.weight", (d_out, d_hid), transposed=False),
    }
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", d_in])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", d_out])]
    return write_model(path, name, nodes, inputs, outputs, stored, tensors, extra)


def write_model(
    path: Path, name: str, nodes, inputs, outputs, stored: dict, tensors: dict, extra: dict | None = None
) -> ModelInfo:
    """Save a graph of ``nodes`` over the initializers ``stored`` with this project's metadata.

    ``inputs``/``outputs`` are value infos; ``tensors`` maps parameter names to their
    :class:`TensorInfo` (the writable weights). Opset 17, IR 8, as the exporter writes.
    """
    graph = helper.make_graph(nodes, name, inputs, outputs, [numpy_helper.from_array(v, k) for k, v in stored.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    info = ModelInfo(
        name=name,
        fingerprint=fingerprint(stored),
        tensors=tensors,
        inputs=tuple(i.name for i in inputs),
        outputs=tuple(o.name for o in outputs),
        extra=dict(extra or {}),
    )
    helper.set_model_props(model, {META_KEY: info.to_json()})
    onnx.save(model, str(path))
    return info


def random_adapter(info: ModelInfo, seed: int, density: float = 0.2, name: str | None = None) -> Adapter:
    rng = np.random.default_rng(seed)
    tensors, shapes = {}, {}
    for tname, t in info.tensors.items():
        n = max(1, int(round(density * int(np.prod(t.shape)))))
        flat = np.sort(rng.choice(int(np.prod(t.shape)), n, replace=False))
        idx = np.stack(np.unravel_index(flat, t.shape)).astype(np.int32)
        tensors[tname] = SparseDelta(idx, rng.standard_normal(n).astype(np.float32))
        shapes[tname] = tuple(t.shape)
    return Adapter(name or f"a{seed}", info.fingerprint, tensors, shapes, info={"seed": seed})


def base_weights(path: Path, info: ModelInfo) -> dict[str, np.ndarray]:
    """Source-layout base weights of the targets, read from the file."""
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    return {k: t.from_stored(inits[t.initializer]) for k, t in info.tensors.items()}


def write_merged(path: Path, info: ModelInfo, merged: dict[str, np.ndarray], out: Path) -> None:
    """A fresh model file with ``merged`` (source layout, a folded scale left in, as base_weights reads them)
    written in, metadata kept as is."""
    model = onnx.load(str(path))
    stored = {t.initializer: t.to_stored(merged[k]).reshape(t.stored_shape) for k, t in info.tensors.items()}
    for init in model.graph.initializer:
        if init.name in stored:
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(stored[init.name]), init.name))
    onnx.save(model, str(out))


def make_branch_mlp(path: Path, seed: int = 0, d_in: int = 10, d_hid: int = 16, r: int = 4) -> ModelInfo:
    """An MLP with a bottleneck branch whose weights are slots (zero = no adapter):

    h = relu(x @ W1^T + b1) + relu(x @ down^T) @ up^T;  logits = h @ W2^T + b2
    """
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((d_hid, d_in)).astype(np.float32) * 0.5
    b1 = rng.standard_normal(d_hid).astype(np.float32) * 0.1
    w2 = rng.standard_normal((2, d_hid)).astype(np.float32) * 0.5
    stored = {
        "fc1.weight": w1.T.copy(),
        "fc1.bias": b1,
        "fc2.weight": w2.T.copy(),
        "branch.down.weight": np.zeros((d_in, r), np.float32),  # stored transposed [in, out]
        "branch.up.weight": np.zeros((r, d_hid), np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "fc1.weight"], ["h0"]),
        helper.make_node("Add", ["h0", "fc1.bias"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["x", "branch.down.weight"], ["d0"]),
        helper.make_node("Relu", ["d0"], ["d1"]),
        helper.make_node("MatMul", ["d1", "branch.up.weight"], ["u0"]),
        helper.make_node("Add", ["h2", "u0"], ["h3"]),
        helper.make_node("MatMul", ["h3", "fc2.weight"], ["logits"]),
    ]
    tensors = {
        "fc1.weight": TensorInfo("fc1.weight", (d_hid, d_in), transposed=True),
        "fc2.weight": TensorInfo("fc2.weight", (2, d_hid), transposed=True),
        "branch.down.weight": TensorInfo("branch.down.weight", (r, d_in), transposed=True, slot=True),
        "branch.up.weight": TensorInfo("branch.up.weight", (d_hid, r), transposed=True, slot=True),
    }
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", d_in])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])]
    return write_model(path, "branch-mlp", nodes, inputs, outputs, stored, tensors)


def reference_branch(path: Path, info: ModelInfo, weights: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """numpy forward of make_branch_mlp with source-layout ``weights`` overriding the stored ones."""
    w = base_weights(path, info)
    w.update(weights)
    b1 = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}["fc1.bias"]
    h = (
        np.maximum(x @ w["fc1.weight"].T + b1, 0)
        + np.maximum(x @ w["branch.down.weight"].T, 0) @ w["branch.up.weight"].T
    )
    return h @ w["fc2.weight"].T
