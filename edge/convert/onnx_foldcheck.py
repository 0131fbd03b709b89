"""The check after :func:`edge.convert.onnx_import.make_adapter_ready` folded weight layouts into the stored tensors:
the graph before and after, run on onnxruntime with the same random inputs, must agree (else nothing is written)."""

from __future__ import annotations

import logging
from math import prod

import numpy as np

from edge.errors import ExportValidationError

__all__ = ["as_array", "check_same_outputs"]

log = logging.getLogger("edge.convert.onnx_import")  # said as the import's own
MAX_CHECK_BYTES = 1 << 28  # all generated inputs together: declared shapes past it are not made up (check skipped)


def check_same_outputs(before: bytes, proto) -> None:
    """Run the graph before and after folding on onnxruntime with the same random inputs: they must agree."""
    try:
        import onnxruntime as ort
        from onnx import helper
    except ImportError:
        log.warning("onnxruntime is not installed: the folded graph was not checked against the original")
        return
    rng, feeds, total = np.random.default_rng(0), {}, 0
    for v in proto.graph.input:
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type))
        except (KeyError, TypeError, ValueError):
            log.warning("the folded graph was not checked: input %r has element type %s", v.name[:80], v.type)
            return
        if not v.type.tensor_type.HasField("shape"):  # not even a rank to make an input of: said, not guessed
            log.warning(
                "the folded graph was not checked against the original: input %r declares no shape (not even its "
                "rank); run both on your data to compare, or give the input a shape before importing "
                "(model.graph.input[i].CopyFrom(onnx.helper.make_tensor_value_info(name, elem_type, dims)))",
                v.name[:80],
            )
            return
        shape = [d.dim_value if d.dim_value > 0 else 2 for d in v.type.tensor_type.shape.dim]
        total += prod(shape) * max(dtype.itemsize, 4)  # Python ints: a hostile shape is not allocated
        if total > MAX_CHECK_BYTES:  # the inputs together: forty of 255 MB each are 10 GB
            log.warning("the folded graph was not checked: input %r declares shape %s", v.name[:80], shape[:8])
            return
        feeds[v.name] = (
            rng.standard_normal(shape, np.float32).astype(dtype) if dtype.kind == "f" else np.zeros(shape, dtype)
        )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        want = ort.InferenceSession(before, options, providers=["CPUExecutionProvider"]).run(None, feeds)
    except Exception as e:  # onnxruntime's own errors: inputs of guessed shape may not fit the original
        log.warning("the folded graph was not checked: the original does not run on guessed inputs (%s)", e)
        return
    try:
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        got = session.run(None, feeds)
    except Exception as e:  # the original ran on these inputs: the folded graph must too
        raise ExportValidationError(
            f"the graph with folded weight layouts does not run on onnxruntime where the original did ({e}); "
            "nothing was written"
        ) from e
    bad = [o.name for o, w, g in zip(proto.graph.output, want, got) if not _same(o.name, w, g)]
    if bad:
        raise ExportValidationError(f"folding weight layouts changed the model's outputs {bad}; nothing was written")


def _same(name: str, want, got) -> bool:
    a, b = as_array(name, want), as_array(name, got)
    if a.shape != b.shape:
        return False
    return bool(np.array_equal(a, b)) if a.dtype.kind == "U" else bool(np.allclose(b, a, 1e-4, 1e-5))


def as_array(name: str, value) -> np.ndarray:
    """An output as numbers to compare (float64): a tensor; a sequence of maps (skl2onnx's ZipMap probabilities: each
    map's values in key order) or of tensors; string labels as strings (compared as equal or not). Else refused."""
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        value = [[m[k] for k in sorted(m)] for m in value]
    elif isinstance(value, list) and all(isinstance(t, np.ndarray) for t in value):
        value = np.concatenate([t.reshape(-1) for t in value]) if value else np.zeros(0)
    try:
        a = np.asarray(value)
        return a.astype(str) if a.dtype.kind in "OSU" else a.astype(np.float64)
    except (TypeError, ValueError) as e:
        raise ExportValidationError(
            f"output {name!r} is a {type(value).__name__} this check cannot compare ({e}); use a model whose outputs "
            "are tensors (cut the graph before its post-processing)"
        ) from e
