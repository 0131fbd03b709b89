"""The check :func:`exporters.quantize.quantize_onnx` runs on a quantized model before it is written.

onnxruntime runs the quantized model beside the float one (cosine and max difference per output, refused below
``min_cosine``), :class:`edge.Runtime` must reproduce onnxruntime's outputs on it, and the graph onnxruntime really
runs is read for weight ops left in float (:func:`float_compute`). A drift is explained when the host's CPU is the
cause: on x86 without VNNI onnxruntime's U8S8 kernels saturate 16-bit pair sums (:mod:`edge.cpu_int8`), so a
model with full-range int8 weights that drifts is run once more with ``session.x64quantprecision=1`` (onnxruntime's
exact U8U8 kernels): if that run is within ``min_cosine``, the model is right and this CPU's kernels are not, and
the error says so and names the fix (7-bit weights, ``reduce_range``) instead of asking for more calibration data.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx

from edge.convert.onnx_foldcheck import as_array
from edge.errors import ExportValidationError

__all__ = ["COMPUTE", "check_quantized", "float_compute"]

COMPUTE = {"MatMul", "Gemm", "Conv", "ConvTranspose"}
#: onnxruntime's session option (kOrtSessionOptionsAvx2PrecisionMode): U8U8 instead of U8S8 on x86 without VNNI
EXACT_U8S8 = ("session.x64quantprecision", "1")


def check_quantized(
    src: Path,
    data: bytes,
    feeds: Mapping[str, np.ndarray],
    min_cosine: float,
    *,
    u8s8: bool = False,
    cpu=None,
    name: str = "q.onnx",
):
    """Quantized vs float outputs on onnxruntime, and edge.Runtime vs onnxruntime on the quantized file.

    ``u8s8``: the model's weights are full-range int8 (U8S8 kernels); ``cpu``: whether they saturate here
    (:func:`edge.cpu_int8.u8s8_saturates`, the default); ``name``: the file's, as edge.Runtime's log names it.
    Returns (cosine, max difference, :func:`float_compute`)."""
    import onnxruntime as ort

    from edge.runtime import Runtime

    so = ort.SessionOptions()
    so.log_severity_level = 3
    ref = ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    with tempfile.TemporaryDirectory(prefix="edge-quant-") as tmp:
        so.optimized_model_filepath = str(Path(tmp, "optimized.onnx"))  # the graph onnxruntime really runs
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.bin")
        got = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
        unfused = float_compute(onnx.load(so.optimized_model_filepath, load_external_data=False))
    names = [o.name for o in ref.get_outputs()]
    want = ref.run(names, dict(feeds))
    try:
        have = got.run(names, dict(feeds))
    except Exception as e:  # onnxruntime's own Fail/InvalidArgument: the quantizer wrote a graph it cannot run
        raise ExportValidationError(
            f"onnxruntime cannot run the quantized model: {str(e).splitlines()[0][:300]}. Leave the node it names "
            "float (nodes_to_exclude=[...], `edge quantize --exclude NODE`), restrict op_types, or use mode='dynamic'"
        ) from e
    cosine, diff, bad = _compare(names, want, have, min_cosine)
    if bad:
        raise ExportValidationError(
            f"the quantized model drifts from the float one beyond cosine {min_cosine}: "
            + "; ".join(bad)
            + ". "
            + _why_drift(data, names, want, feeds, min_cosine, u8s8, cpu)
        )
    with tempfile.TemporaryDirectory(prefix="edge-quant-") as tmp:
        path = Path(tmp, Path(name).name)
        path.write_bytes(data)
        with Runtime(path, strategy="rebuild") as rt:
            edge_out = rt.run(dict(feeds))
        for name, b in zip(names, have):
            a, b = as_array(name, edge_out[name]), as_array(name, b)
            if not (np.array_equal(a, b) if a.dtype.kind == "U" else np.allclose(a, b, atol=1e-5, rtol=1e-4)):
                raise ExportValidationError(f"edge.Runtime on the quantized file differs from onnxruntime on {name!r}")
    return cosine, diff, unfused


def _compare(names, want, have, min_cosine: float):
    cosine, diff, bad = {}, {}, []
    for name, a, b in zip(names, want, have):
        a, b = as_array(name, a).reshape(-1), as_array(name, b).reshape(-1)
        if a.dtype.kind == "U" or b.dtype.kind == "U":  # labels: the share of equal ones stands for the cosine
            cosine[name], diff[name] = float(np.mean(a == b)) if a.size else 1.0, float(np.any(a != b))
        else:
            cosine[name] = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))
            diff[name] = float(np.abs(a - b).max()) if a.size else 0.0
        if cosine[name] < min_cosine:
            bad.append(f"{name!r}: cosine {cosine[name]:.4f}, max difference {diff[name]:.3g}")
    return cosine, diff, bad


def _why_drift(data: bytes, names, want, feeds, min_cosine: float, u8s8: bool, cpu) -> str:
    """The advice for a drift: this CPU's saturating U8S8 kernels when an exact run shows they are the cause."""
    usual = "Calibrate on more representative data, quantize per channel, or exclude sensitive ops (op_types)"
    if cpu is None:
        from edge.cpu_int8 import u8s8_saturates

        cpu = u8s8_saturates()
    if not u8s8 or cpu is False:
        return usual
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry(*EXACT_U8S8)
    exact = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"]).run(names, dict(feeds))
    cosine, _, bad = _compare(names, want, exact, min_cosine)
    where = "this x86 CPU has no VNNI" if cpu else "this x86 CPU's flags cannot be read (VNNI unknown)"
    worst = min(cosine.values()) if cosine else 1.0
    cause = (
        f"{where}: onnxruntime's U8S8 kernels here saturate 16-bit sums of u8*s8 pairs, and with exact integer "
        f"sums (its session.x64quantprecision=1) the same model reaches cosine {worst:.4f}"
    )
    if bad:
        return f"{usual}; besides, {cause}"
    return (
        f"The quantized model is right, this CPU's kernels are not: {cause}. Quantize with reduce_range=True "
        "(`edge quantize --reduce-range`: 7-bit weights, exact on every CPU) or weight_type='uint8'; a device with "
        "VNNI or an ARM CPU would run this model as quantized"
    )


def float_compute(optimized) -> list[str]:
    """Nodes onnxruntime's optimized graph runs in float on a dequantized integer weight.

    A ``DequantizeLinear`` of a weight feeding a float MatMul/Gemm/Conv is what onnxruntime leaves when its QDQ
    fusion does not apply (e.g. on the CPU a MatMul whose int8 input and output types differ, after its s8->u8
    rewrite, is not made ``QLinearMatMul``, and one with no ``QuantizeLinear`` after it is not made
    ``MatMulIntegerToFloat``): that weight is dequantized on every run, slower than the float model."""
    inits = {t.name for t in optimized.graph.initializer}
    dq_of_weight = {
        n.output[0] for n in optimized.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
    }
    return sorted(
        n.name or n.output[0]
        for n in optimized.graph.node
        if n.op_type in COMPUTE and n.domain in ("", "ai.onnx") and dq_of_weight & set(n.input[1:2])
    )
