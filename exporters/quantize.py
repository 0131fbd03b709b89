"""Quantize an exported model with onnxruntime's own tools, keeping it adapter-ready (issue 18).

:func:`quantize_onnx` takes a model written by :func:`exporters.export_onnx` or
:func:`exporters.export_hf_encoder` (it carries this project's metadata) and runs
``onnxruntime.quantization.quantize_dynamic`` (weights int8, activations quantized at run
time: ``MatMulInteger``) or ``quantize_static`` (QDQ, activations calibrated on the caller's
data with a ``CalibrationDataReader``; per tensor or per channel). It then reads the
quantized graph to find, for every adapter target, the integer initializer that replaced it
and the scale and zero point its consumers use (``DequantizeLinear`` inputs and ``axis``;
``MatMulInteger``/``ConvInteger`` B zero point, per column / per output channel), and proves
the mapping by dequantizing: every entry must be within half a step of the float weight. A
target onnxruntime left in float stays a float target; one that exists both ways (read by a
quantized and a float node) is dropped from the targets and reported, since writing one copy
would not change the other. Slots and detector heads are never quantized. The fingerprint is
recomputed over the stored tensors, the metadata written, and the file checked: onnxruntime
runs it beside the float model (cosine and max difference per output, refused below
``min_cosine``) and :class:`edge.Runtime` loads it (fingerprint, integer arena) and must
reproduce onnxruntime's outputs (:mod:`exporters.quantize_check`; a drift this host's CPU causes, U8S8 kernels
without VNNI, is named as such with its fix). Only then is ``out`` replaced. The report also lists the weight ops
onnxruntime's optimized graph still runs in float over weights it dequantizes on every run
(``float_compute``: a recipe that is slower than the float model), read from the graph it really runs. A model
quantized already is refused first, and static mode keeps in float the nodes onnxruntime's integer kernels compute
otherwise than the float op (:mod:`exporters.quantize_graph`: a ceil-mode AveragePool, EfficientNet's pooler, is
rewritten to the same function in a form they compute right).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from edge.errors import ConfigError, ExportValidationError
from edge.format.io import atomic_write_bytes
from edge.format.modelinfo import META_KEY, ModelInfo, QuantInfo, fingerprint, onnx_info
from edge.format.onnx_graph import consumers, set_metadata
from exporters.quantize_check import COMPUTE as _COMPUTE
from exporters.quantize_check import check_quantized
from exporters.quantize_graph import dynamic_ready, fit_ceil_pools, refuse_quantized_input

__all__ = ["EXPORTER_VERSION", "QuantReport", "quantize_onnx", "MODES"]

log = logging.getLogger(__name__)

MODES = ("dynamic", "static")
EXPORTER_VERSION = 4  # bumped when the same options give a different file (2: quantized Gather tables are targets;
# 3: static activations default to uint8; 4: a weight read also by Shape/Size stays a target)
_TYPES = {"int8": "QInt8", "uint8": "QUInt8"}
_SHAPE_ONLY = ("Shape", "Size")  # ops that read a tensor's shape, never its values (torch's dynamo exports a Conv so)
_HISTOGRAM = ("entropy", "percentile")  # onnxruntime's calibrators that build histograms (see _feed_batches)
_CALIBRATION = {  # onnxruntime.quantization.CalibrationMethod, by the name this module takes
    "minmax": lambda oq: oq.CalibrationMethod.MinMax,
    "entropy": lambda oq: oq.CalibrationMethod.Entropy,
    "percentile": lambda oq: oq.CalibrationMethod.Percentile,
}


@dataclass(frozen=True)
class QuantReport:
    """What :func:`quantize_onnx` did: the model info written, which targets are integer, and the check."""

    info: ModelInfo
    mode: str
    per_channel: bool
    quantized: list[str]  # targets now stored as integers
    float_targets: list[str]  # targets onnxruntime left in float32 (still adaptable, as floats)
    dropped: dict[str, str] = field(default_factory=dict)  # targets removed from the metadata, and why
    bytes_before: int = 0
    bytes_after: int = 0
    cosine: dict[str, float] = field(default_factory=dict)  # per output, quantized vs float, over the check inputs
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    float_compute: list[str] = field(
        default_factory=list
    )  # weight ops onnxruntime still runs in float (see quantize_check)

    def as_dict(self) -> dict:
        return {
            "mode": self.mode,
            "per_channel": self.per_channel,
            "quantized": len(self.quantized),
            "float_targets": self.float_targets,
            "dropped": self.dropped,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "cosine": self.cosine,
            "max_abs_diff": self.max_abs_diff,
            "float_compute": self.float_compute,
            "fingerprint": self.info.fingerprint,
        }


def quantize_onnx(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    mode: str = "dynamic",
    per_channel: bool = False,
    calib: Mapping[str, np.ndarray] | Iterable[Mapping[str, np.ndarray]] | None = None,
    check: Mapping[str, np.ndarray] | None = None,
    batch: int = 16,
    op_types: Iterable[str] | None = None,
    weight_type: str = "int8",
    activation_type: str = "uint8",
    min_cosine: float = 0.98,
    reduce_range: bool = False,
    headroom: float = 1.0,
    calibrate_method: str = "minmax",
    extra_options: Mapping[str, object] | None = None,
    nodes_to_exclude: Iterable[str] = (),
    float_first: bool = False,
) -> QuantReport:
    """Quantize the exported model ``src`` into ``out`` (see the module doc) and return the report.

    Args:
        mode: ``"dynamic"`` (``quantize_dynamic``) or ``"static"`` (``quantize_static``, QDQ).
        per_channel: one scale per output channel of each weight (else one per tensor).
        calib: static mode's calibration data: ``{input: array [N, ...]}`` (fed in batches of
            ``batch``) or an iterable of feed dicts. Required for ``static``.
        check: inputs to compare the quantized model with the float one (default: the first
            ``batch`` rows of ``calib``); required when ``calib`` is not given.
        op_types: operator types to quantize (default: onnxruntime's for the mode).
        weight_type, activation_type: ``"int8"`` or ``"uint8"`` (activations: static mode only). Activations
            default to uint8: onnxruntime's CPU provider rewrites int8 QDQ activations to uint8 only where a
            quantized tensor has one reader, and fuses ``DQ -> MatMul -> Q`` into ``QLinearMatMul`` only when the
            input and output types agree (its ``MatMulNodeGroupSelector``), so with int8 activations every MatMul
            whose input is shared (Q/K/V) stays a float MatMul over weights dequantized on every run: MiniLM ran
            2.6x slower than float. uint8 activations with int8 weights (U8S8) fuse everywhere; see
            :attr:`QuantReport.float_compute`.
        calibrate_method: ``"minmax"``, ``"entropy"`` or ``"percentile"`` (onnxruntime's ``CalibrationMethod``).
        extra_options: onnxruntime's ``extra_options`` (``ActivationSymmetric``; ``MatMulConstBOnly``: dynamic only);
            ``TensorQuantOverrides`` is this function's (``headroom``).
        nodes_to_exclude: node names to keep in float besides slots and heads (their weights stay float targets).
        float_first: keep the first weight op in graph order (the stem reading the raw input) in float, the usual
            first-layer exception: its input is the model's own, unscaled, and its weights are few. Recorded in the
            metadata (``quantization.float_nodes``) with ``nodes_to_exclude``.
        min_cosine: refuse the result if any output's cosine to the float model is below this.
        reduce_range: 7-bit weights (onnxruntime's ``reduce_range``): half the integer range is left
            free, so adapters can move the largest weights outward (headroom) at some precision.
        headroom: per-tensor weight scales cover ``headroom`` times each target's largest magnitude
            (onnxruntime's ``TensorQuantOverrides`` rmin/rmax), so adapted entries can grow that far
            before they saturate; 1 is onnxruntime's default (the largest weight at the integer limit).

    Raises:
        ConfigError: an unknown mode or type, missing calibration/check data, or a graph quantized already.
        ExportValidationError: the mapping of a target cannot be proven, or the outputs drift.
    """
    from onnxruntime import quantization as oq

    if mode not in MODES or {weight_type, activation_type} - set(_TYPES) or calibrate_method not in _CALIBRATION:
        raise ConfigError(
            f"mode {mode!r}, weight_type {weight_type!r}, activation_type {activation_type!r}, calibrate_method "
            f"{calibrate_method!r}: allowed modes {MODES}, types {sorted(_TYPES)}, methods {sorted(_CALIBRATION)}"
        )
    src, out = Path(src), Path(out)
    proto = onnx.load(str(src))
    info = onnx_info(proto)
    refuse_quantized_input(proto.graph, info, src.name)  # by edge quantize, or another tool after export
    feeds = _feed_batches(calib, batch, calibrate_method) if calib is not None else None
    if mode == "static" and not feeds:
        raise ConfigError("static quantization calibrates activations: pass calib={input: array} (the user's data)")
    check = dict(check) if check is not None else (feeds[0] if feeds else None)
    if check is None:
        raise ConfigError("pass check={input: array} (or calib=...) to compare the quantized model with the float one")
    if headroom < 1.0 or (headroom != 1.0 and per_channel):
        raise ConfigError(f"headroom {headroom} must be >= 1, and is for per-tensor scales (per_channel=False)")
    _name_nodes(proto)
    _fold_shape_reads(proto)
    fitted, unfit = fit_ceil_pools(proto.graph) if mode == "static" else ([], [])
    if fitted or unfit:  # onnxruntime's QLinearAveragePool divides a ceil-mode window by the whole kernel
        log.info("static: ceil-mode AveragePools counting pads: %s rewritten, %s kept float", fitted[:5], unfit[:5])
    keep = {t.initializer for t in info.tensors.values() if t.slot or t.head}
    computed = dynamic_ready(proto.graph) if mode == "dynamic" else []  # weight norm: see quantize_graph
    if computed:
        log.warning("%d convolution(s) whose weight the graph computes stay float: %s", len(computed), computed[:5])
    # onnxruntime's quantizer knows "Attention" as com.microsoft's op and rewrites any node of that type into
    # QAttention; the standard ai.onnx Attention (opset 23, our fused-attention export) is not that op: keep it float
    # (its Q/K/V projections are separate MatMuls, quantized as usual)
    exclude = sorted(
        {n.name for n in proto.graph.node if keep & set(n.input)}
        | {n.name for n in proto.graph.node if n.op_type == "Attention" and n.domain in ("", "ai.onnx")}
        | set(asked := _asked_float(proto, info, nodes_to_exclude, float_first))
        | set(unfit)
        | set(computed)
    )
    ort_extra = dict(extra_options or {})
    if "TensorQuantOverrides" in ort_extra:
        raise ConfigError("extra_options['TensorQuantOverrides'] is set by this function (headroom=); pass headroom")
    if mode == "static" and ort_extra.get("MatMulConstBOnly"):  # read by onnx_quantizer.py only, not the QDQ one
        raise ConfigError(
            "extra_options['MatMulConstBOnly'] is ignored by onnxruntime's static (QDQ) quantizer: to keep the "
            "activation-by-activation MatMuls in float, name them in nodes_to_exclude (edge quantize --exclude NODE)"
        )
    if headroom != 1.0:
        ort_extra["TensorQuantOverrides"] = _headroom(proto, info, headroom)
    with tempfile.TemporaryDirectory(prefix="edge-quant-") as tmp:
        named, qpath = Path(tmp, "in.onnx"), Path(tmp, "out.onnx")
        onnx.save(proto, str(named))
        common = {
            "per_channel": per_channel,
            "reduce_range": reduce_range,
            "weight_type": getattr(oq.QuantType, _TYPES[weight_type]),
            "nodes_to_exclude": exclude,
            "op_types_to_quantize": list(op_types) if op_types is not None else None,
            "extra_options": ort_extra,
        }
        logging.getLogger().disabled, was = True, logging.getLogger().disabled  # its "run pre-processing" banner
        try:
            if mode == "dynamic":
                oq.quantize_dynamic(named, qpath, **common)
            else:
                reader = _Reader(feeds)
                oq.quantize_static(
                    named,
                    qpath,
                    reader,
                    quant_format=oq.QuantFormat.QDQ,
                    activation_type=getattr(oq.QuantType, _TYPES[activation_type]),
                    calibrate_method=_CALIBRATION[calibrate_method](oq),
                    **common,
                )
        finally:
            logging.getLogger().disabled = was
        q = onnx.load(str(qpath))
    tensors, quantized, floats, dropped = _map_targets(proto, q, info)
    if per_channel and (one := [k for k in quantized if tensors[k].quant.axis is None]):  # ConvInteger, Gather
        log.warning("per_channel: onnxruntime gave %d target(s) one scale each (per tensor): %s", len(one), one[:5])
    q.ir_version = min(q.ir_version, proto.ir_version)
    stored = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    heads = {t.initializer for t in info.tensors.values() if t.head}
    extra = dict(info.extra)
    extra["quantization"] = {
        "mode": mode,
        "per_channel": per_channel,
        "weight_type": weight_type,
        "reduce_range": reduce_range,
        "headroom": headroom,
        "float_fingerprint": info.fingerprint,
    }
    if mode == "static":
        extra["quantization"].update(activation_type=activation_type, calibrate_method=calibrate_method)
    if asked:
        extra["quantization"]["float_nodes"] = asked
    qinfo = replace(
        info,
        fingerprint=fingerprint({k: v for k, v in stored.items() if k not in heads}),
        tensors=tensors,
        extra=extra,
    )
    del q.metadata_props[:]
    for p in proto.metadata_props:
        if p.key != META_KEY:
            q.metadata_props.add(key=p.key, value=p.value)
    set_metadata(q, META_KEY, qinfo.to_json())
    onnx.checker.check_model(q)
    data = q.SerializeToString()
    cosine, diff, unfused = check_quantized(
        src, data, check, min_cosine, u8s8=weight_type == "int8" and not reduce_range, name=out.name
    )
    if unfused:
        log.warning(
            "onnxruntime runs %d weight op(s) of %s in float on weights it dequantizes every run (%s...): slower than "
            "the float model; for static mode try activation_type='uint8' or fewer op_types",
            len(unfused),
            out.name,
            ", ".join(unfused[:3]),
        )
    atomic_write_bytes(out, data)
    log.info("quantized %s (%s%s): %d integer targets", src.name, mode, ", per channel" * per_channel, len(quantized))
    return QuantReport(
        qinfo, mode, per_channel, quantized, floats, dropped, src.stat().st_size, len(data), cosine, diff, unfused
    )


# -- mapping --------------------------------------------------------------------------------------------------------


def _map_targets(float_proto, q, info: ModelInfo):
    """Each target's TensorInfo in the quantized graph (proved by dequantizing), and what became of each."""
    finits = {t.name: t for t in float_proto.graph.initializer}
    qinits = {t.name: t for t in q.graph.initializer}
    users = consumers(q.graph)
    tensors, quantized, floats, dropped = {}, [], [], {}
    for pname, t in info.tensors.items():
        # onnxruntime's naming (a Gemm weight read transposed is stored transposed first); proved below
        qname = next((n for n in (f"{t.initializer}{s}_quantized" for s in ("", "_Transposed")) if n in qinits), None)
        if qname is None or t.slot or t.head:
            if t.initializer not in qinits:
                dropped[pname] = "its initializer is gone from the quantized graph"
                continue
            tensors[pname] = t
            if not (t.slot or t.head):
                floats.append(pname)
            continue
        if t.initializer in qinits and any(n.op_type not in _SHAPE_ONLY for n in users.get(t.initializer, ())):
            dropped[pname] = "read both as float and quantized (writing one copy would not change the other)"
            continue
        if qname.endswith("_Transposed_quantized"):  # stored as the 2-D transpose of the float initializer
            layout = tuple(reversed(t.layout))
            t = replace(t, transposed=layout == (1, 0), perm=None)
        found = {_scale_of(n, qname, qinits, users) for n in users.get(qname, [])}
        if len(found) != 1 or None in found:
            ops = sorted({n.op_type for n in users.get(qname, [])})
            dropped[pname] = f"its integers are read by {ops}, whose scale this exporter cannot prove"
            continue
        scale, zp, stored_axis = found.pop()
        qarr = numpy_helper.to_array(qinits[qname])
        dtype = str(qarr.dtype)
        s = numpy_helper.to_array(qinits[scale])
        axis = None if s.size == 1 else t.layout[stored_axis]
        new = replace(t, initializer=qname, quant=QuantInfo(scale, zp, dtype, axis))
        z = numpy_helper.to_array(qinits[zp])
        real = info.tensors[pname].from_stored(numpy_helper.to_array(finits[t.initializer]))
        err = np.abs(new.dequantize(qarr, s, z) - real)
        step = np.broadcast_to(s.reshape([-1 if a == axis else 1 for a in range(len(t.shape))]), real.shape)
        if not np.all(err <= 0.5 * step * (1 + 1e-3) + 1e-7):
            raise ExportValidationError(
                f"{pname}: dequantizing {qname!r} with scale {scale!r} and zero point {zp!r} (axis {axis}) is off the "
                f"float weight by up to {float(err.max()):.3g} (half a step: {float(step.max()) / 2:.3g}); the "
                "quantized graph is not what this exporter understands"
            )
        tensors[pname] = new
        quantized.append(pname)
    return tensors, quantized, floats, dropped


def _scale_of(node, qname: str, inits, users) -> tuple[str, str, int] | None:
    """(scale, zero point, stored axis) a consumer of the integers ``qname`` applies, or None if unknown."""
    if node.op_type == "Gather" and node.input[0] == qname:  # a quantized table: rows gathered, then dequantized
        after = {_scale_of(n, node.output[0], inits, users) for n in users.get(node.output[0], [])}
        found = after.pop() if len(after) == 1 else None
        return found if found is not None and inits[found[0]].dims in ([], [1]) else None  # per tensor only
    if node.op_type == "DequantizeLinear" and node.input[0] == qname and len(node.input) >= 3:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        rank = len(inits[qname].dims) if qname in inits else 1
        return (node.input[1], node.input[2], axis % rank) if node.input[1] in inits else None
    if node.op_type in ("MatMulInteger", "ConvInteger") and list(node.input[1:2]) == [qname] and len(node.input) >= 4:
        scale = qname.removesuffix("_quantized") + "_scale"  # multiplies the product downstream (onnxruntime's name)
        if scale not in inits or node.input[3] not in inits:
            return None
        return scale, node.input[3], (1 if node.op_type == "MatMulInteger" else 0)
    return None


# -- helpers --------------------------------------------------------------------------------------------------------


def _headroom(proto, info: ModelInfo, headroom: float) -> dict:
    """onnxruntime ``TensorQuantOverrides``: each weight target's range widened ``headroom`` times."""
    inits = {t.name: t for t in proto.graph.initializer}
    out = {}
    for t in info.tensors.values():
        if not (t.slot or t.head) and t.initializer in inits:
            m = float(np.abs(numpy_helper.to_array(inits[t.initializer])).max()) * headroom or 1e-8
            out[t.initializer] = [{"rmin": np.array(-m, np.float32), "rmax": np.array(m, np.float32)}]
    return out


def _asked_float(proto, info: ModelInfo, names: Iterable[str], first: bool) -> list[str]:
    """The node names the caller keeps in float: ``names`` (each must exist), with ``first`` the first weight op."""
    nodes = list(proto.graph.node)
    names = list(dict.fromkeys(names))
    unknown = sorted(set(names) - {n.name for n in nodes})
    if unknown:
        raise ConfigError(
            f"nodes_to_exclude names no node of the graph: {unknown[:5]}; node names are in the ONNX file"
        )
    if first:
        weights = {t.initializer for t in info.tensors.values() if not (t.slot or t.head)}
        stem = next((n.name for n in nodes if n.op_type in _COMPUTE and weights & set(n.input[1:2])), None)
        if stem is None:
            raise ConfigError("float_first=True, but no MatMul/Gemm/Conv of the graph reads an adapter target")
        names = list(dict.fromkeys([stem, *names]))
    return names


def _fold_shape_reads(proto) -> None:
    """Replace each ``Shape``/``Size`` of a weight by a ``Constant`` of its value, in place.

    torch's dynamo export gives a bias-less Conv a zero bias built from ``Shape(weight)`` (every HF CNN: ResNet,
    RegNet, MobileNetV2, ConvNeXt...); that reader kept onnxruntime's quantizer from dropping the float weight, so the
    int8 file carried every conv twice and was larger than the float one (an HF ResNet: 6.45 against 5.24 MB). A
    weight's shape is fixed (a graph input of the same name could override it: those are left)."""
    g = proto.graph
    weights = {t.name: tuple(t.dims) for t in g.initializer} if g.initializer else {}
    for name in {i.name for i in g.input}:
        weights.pop(name, None)
    for i, n in enumerate(g.node):
        if n.op_type not in _SHAPE_ONLY or n.domain not in ("", "ai.onnx") or n.input[0] not in weights:
            continue
        dims = weights[n.input[0]]
        if n.op_type == "Size":
            value = np.array(int(np.prod(dims, dtype=np.int64)), dtype=np.int64)
        else:  # Shape's start/end (opset 15): negative from the back, clamped to the rank
            at = {a.name: a.i for a in n.attribute}
            r = len(dims)
            lo, hi = (min(max(v + r if v < 0 else v, 0), r) for v in (at.get("start", 0), at.get("end", r)))
            value = np.array(dims[lo:hi], dtype=np.int64)
        const = onnx.helper.make_node("Constant", [], [n.output[0]], name=n.name, value=numpy_helper.from_array(value))
        g.node[i].CopyFrom(const)


def _name_nodes(proto) -> None:
    """Give every unnamed node a unique name (``nodes_to_exclude`` selects by name)."""
    seen = {n.name for n in proto.graph.node if n.name}
    for i, n in enumerate(proto.graph.node):
        if not n.name:
            n.name = f"edge_node_{i}"
            while n.name in seen:
                n.name += "_"
            seen.add(n.name)


def _feed_batches(calib, batch: int, method: str = "minmax") -> list[dict[str, np.ndarray]]:
    """The calibration feeds. onnxruntime's histogram calibrators (entropy, percentile) stack every batch's outputs in
    one array (onnxruntime#18792), so a short last batch failed inside them: their batches are made one size (the
    largest that divides the rows; the histograms do not depend on it), and feeds of several shapes are refused."""
    if isinstance(calib, Mapping):
        arrays = {k: np.asarray(v) for k, v in calib.items()}
        n = min(len(v) for v in arrays.values())
        if method in _HISTOGRAM and n % batch:
            batch = max(b for b in range(1, batch + 1) if n % b == 0)
            log.info("%s calibration: %d rows in batches of %d (one size, for its histograms)", method, n, batch)
        return [{k: v[i : i + batch] for k, v in arrays.items()} for i in range(0, n, batch)]
    feeds = [dict(f) for f in calib]
    shapes = {tuple((k, np.shape(v)) for k, v in sorted(f.items())) for f in feeds}
    if method in _HISTOGRAM and len(shapes) > 1:
        raise ConfigError(
            f"{method} calibration needs feeds of one shape (onnxruntime's histogram calibrators stack them); got "
            f"{len(shapes)} shapes: pass calib as {{input: array}} (batched here) or equal batches, or use minmax"
        )
    return feeds


class _Reader:
    """The ``CalibrationDataReader`` protocol over a list of feeds (onnxruntime calls ``get_next`` until None)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self) -> None:  # not needed by MinMax calibration
        raise NotImplementedError
