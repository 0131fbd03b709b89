"""The check after :func:`edge.convert.onnx_import.make_adapter_ready` folded weight layouts into the stored tensors:
the graph before and after, run on onnxruntime with the same random inputs, must agree (else nothing is written)."""

from __future__ import annotations

import logging

import numpy as np

from edge.errors import ExportValidationError

__all__ = ["check_same_outputs"]

log = logging.getLogger("edge.convert.onnx_import")  # said as the import's own


def check_same_outputs(before: bytes, proto) -> None:
    """Run the graph before and after folding on onnxruntime with the same random inputs: they must agree."""
    try:
        import onnxruntime as ort
        from onnx import helper
    except ImportError:
        log.warning("onnxruntime is not installed: the folded graph was not checked against the original")
        return
    rng, feeds = np.random.default_rng(0), {}
    for v in proto.graph.input:
        dtype = helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
        shape = [d.dim_value if d.dim_value > 0 else 2 for d in v.type.tensor_type.shape.dim]
        feeds[v.name] = rng.standard_normal(shape).astype(dtype) if dtype.kind == "f" else np.zeros(shape, dtype)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        want = ort.InferenceSession(before, options, providers=["CPUExecutionProvider"]).run(None, feeds)
    except Exception as e:  # onnxruntime's own errors: inputs of guessed shape may not fit the original
        log.warning("the folded graph was not checked: the original does not run on guessed inputs (%s)", e)
        return
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    got = session.run(None, feeds)
    bad = [
        o.name
        for o, w, g in zip(proto.graph.output, want, got)
        if g.shape != w.shape or not np.allclose(g, w, 1e-4, 1e-5)
    ]
    if bad:
        raise ExportValidationError(f"folding weight layouts changed the model's outputs {bad}; nothing was written")
