"""The predicted footprint of a convolutional model counts the copy onnxruntime keeps of its Conv weights.

A prepacked session (``hybrid``, ``rebuild``) holds a second copy of every weight it is handed: MatMul/Gemm weights
prepacked, the others (Conv filters, which its optimizers rewrite) copied by ``add_external_initializers``. The
prediction counted only the MatMul/Gemm ones, so on ResNet-50 (transformers ResNetConfig, 94 MB of weights) it said
97 MB for ``rebuild`` and 105 MB for ``hybrid`` where loading measured 186 and 192 MB above the process, and a
device profile with ``memory_mb: 200`` got ``hybrid`` (239 MB resident once settled; ``bound``: 103 MB).
Now every weight the prepacked session is handed (``_consts``: all but the slots and the tables only Gather reads)
counts in ``packed_mb`` and in ``footprint_mb``.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge.convert.onnx_import import make_adapter_ready
from runtimes.onnxruntime import OrtBackend


@pytest.fixture
def conv_model(tmp_path):
    """x -> Conv(64 -> 64, 3x3) -> y: one 147,456-byte filter, nothing MatMul reads."""
    w = np.random.default_rng(0).standard_normal((64, 64, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 8, 8])],
        [numpy_helper.from_array(w, "w")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    make_adapter_ready(proto, name="conv")
    path = tmp_path / "conv.onnx"
    onnx.save_model(proto, path)
    return path, w.nbytes / 2**20


def test_prepacked_strategies_count_the_conv_weights_onnxruntime_copies(conv_model):
    path, conv_mb = conv_model
    predicted = {s: OrtBackend.footprint_mb(path, s) for s in OrtBackend.STRATEGIES}
    assert predicted["rebuild"] - predicted["bound"] == pytest.approx(conv_mb)
    import edge

    rt = edge.Runtime(path, strategy="bound")
    try:
        assert rt.backend.predicted_mb("rebuild") - rt.backend.predicted_mb("bound") == pytest.approx(conv_mb)
    finally:
        rt.close()
