"""Serialised graphs an onnxruntime runtime keeps after load (issue 18's memory on tiny models).

Only the prepacked session's weight-less graph is kept (``hybrid`` and ``rebuild`` build it again after every
switch); the bound session's graph is not kept once the session is built, by the runtime or by onnxruntime's
Python wrapper (which holds its model bytes to re-create the session on a provider fallback). On the digits ViT
int8 that graph is 139 KB of the hybrid's resident memory. What an exporter writes on each node for debugging
(torch: stack traces, module scopes) is dropped before any session sees it (0.14 MB per session there), and the
runtime computes the same. No timing is asserted.
"""

from __future__ import annotations

import gc
import types

import numpy as np
import onnx
import onnxruntime
import pytest
from _tiny import make_mlp

from runtimes.base import BackendOptions, WeightWrite
from runtimes.onnxruntime import OrtBackend

X = {"x": np.linspace(-1, 1, 30, dtype=np.float32).reshape(3, 10)}
_OPAQUE = (types.ModuleType, type, types.FunctionType, types.BuiltinFunctionType, np.ndarray, str)


def graph_copies(root: object, marker: bytes) -> int:
    """How many bytes objects reachable from ``root`` hold a serialised graph (they contain ``marker``, its name)."""
    seen, todo, found = {id(root)}, [root], 0
    while todo:
        obj = todo.pop()
        if isinstance(obj, (bytes, bytearray)):
            found += marker in obj
            continue
        for ref in gc.get_referents(obj):
            if id(ref) not in seen and not isinstance(ref, _OPAQUE):
                seen.add(id(ref))
                todo.append(ref)
    return found


@pytest.mark.parametrize(("strategy", "kept"), [("hybrid", 1), ("rebuild", 1), ("bound", 0)])
def test_only_the_graph_rebuilds_need_is_kept(tmp_path, strategy, kept):
    path = tmp_path / "graph-marker-mlp.onnx"
    make_mlp(path, name="graph-marker-mlp")
    b = OrtBackend(path, BackendOptions(strategy=strategy))
    try:
        before = b.run(X)["logits"]
        w = np.array(b.read("fc2.weight")) * -1.0
        b.write(b.prepare([WeightWrite("fc2.weight", None, w)]))  # a hybrid serves bound, then rebuilds
        switched = b.run(X)["logits"]
        assert b.wait_settled(30)
        np.testing.assert_array_equal(b.run(X)["logits"], switched)  # the rebuilt session agrees with the bound one
        assert not np.allclose(switched, before)
        assert graph_copies(b, b"graph-marker-mlp") == kept
    finally:
        b.close()


@pytest.mark.parametrize("strategy", ["hybrid", "rebuild", "bound"])
def test_node_debug_metadata_is_not_kept(tmp_path, strategy):
    path = tmp_path / "annotated-mlp.onnx"
    make_mlp(path, name="annotated-mlp")
    model = onnx.load(str(path))
    for node in model.graph.node:  # as torch's exporter annotates every node
        node.metadata_props.add(key="pkg.torch.onnx.stack_trace", value="File model.py, line 1 NODE-TRACE-MARKER")
        node.doc_string = "NODE-DOC-MARKER"
    onnx.save(model, str(path))
    want = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, X)[0]
    b = OrtBackend(path, BackendOptions(strategy=strategy))
    try:
        np.testing.assert_allclose(b.run(X)["logits"], want, rtol=1e-6, atol=1e-6)
        assert b.info.name == "annotated-mlp"  # the model's own metadata was read
        assert graph_copies(b, b"NODE-TRACE-MARKER") == graph_copies(b, b"NODE-DOC-MARKER") == 0
        assert graph_copies(b, b"annotated-mlp") == (0 if strategy == "bound" else 1)  # the graph itself is kept
    finally:
        b.close()
