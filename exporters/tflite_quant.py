"""Quantize an exported ``.tflite`` model with the AI Edge Quantizer, keeping it adapter-ready (issue 18).

:func:`quantize_tflite` takes a file written by :func:`exporters.export_tflite` (it carries this
project's metadata: the adapter targets by stored tensor name) and runs ``ai_edge_quantizer``
(Google's LiteRT post-training quantizer, installed with litert-torch in the ``tflite-export``
extra) with its own recipes:

* ``"dynamic"``: dynamic-range int8 (``recipe.dynamic_wi8_afp32``'s config: int8 weights, one
  symmetric scale per output channel, float activations quantized by the kernels at run time), on
  the ops ``op_types`` (default ``FULLY_CONNECTED``, ``DEPTHWISE_CONV_2D`` and ``EMBEDDING_LOOKUP``:
  the dynamic-range ``CONV_2D`` kernel caches per-row sums of its weights, so an in-place switch
  would not reach it on the built-in kernels; its weights then stay float targets, see
  :mod:`runtimes.litert_arena`). ``EMBEDDING_LOOKUP``'s table becomes int8 with one scale per row
  (the quantizer's ``materialize_embedding_lookup``); LiteRT's hybrid lookup kernel dequantizes the
  rows it gathers at every run, and XNNPACK leaves the op to it, so a write reaches it in place.
  It is most of a text encoder's bytes: MiniLM's file 58 MB -> 23 MB, as onnxruntime's int8 one;
* ``"static"``: full integer (``recipe.static_wi8_ai8``: int8 weights per channel and int8
  activations calibrated on the caller's data; the model's inputs and outputs become int8 with the
  scale and zero point stored on them, what NPU delegates take). The quantizer has no full-integer
  ``EMBEDDING_LOOKUP``: asked for (in ``op_types``), its table gets the dynamic-range config above
  (int8 table, float rows out, a CPU op either way).

The quantizer keeps tensor names, so every target is found by name in the result: an int8 tensor
with per-channel scales is recorded as an integer target (:class:`~edge.format.modelinfo.QuantInfo`
naming ``tensor@scale`` and ``tensor@zero_point``, the tensor's own quantization parameters, which
the fingerprint covers), a float one stays a float target. Each mapping is proved by dequantizing
(every entry within half a step of the float weight). ``headroom`` > 1 widens every target's
scales so adapted entries can move outward before they saturate, as :func:`exporters.quantize_onnx`
does (full integer: the int32 biases of the ops it feeds, whose scale is the input's times the
weight's, are rescaled with it). The file is checked before ``out`` is written: LiteRT runs it
beside the float model (cosine per output, refused below ``min_cosine``) on XNNPACK and on the
built-in kernels, through :class:`runtimes.litert.LiteRTBackend`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from edge.errors import BackendUnavailableError, ConfigError, ExportValidationError
from edge.format.modelinfo import META_KEY, ModelInfo, QuantInfo, fingerprint
from edge.format.tflite import (
    SCALE,
    ZERO_POINT,
    fingerprint_arrays,
    pack_model,
    read_tflite,
    set_metadata,
    stored_arrays,
    tflite_info,
    unpack_model,
)
from exporters.quantize import QuantReport

__all__ = ["MODES", "OP_TYPES", "quantize_tflite", "tflite_activation_grid", "tflite_quantized_base"]

log = logging.getLogger(__name__)

MODES = ("dynamic", "static")
#: ops quantized by default per mode (None: every op the quantizer supports)
OP_TYPES = {"dynamic": ("FULLY_CONNECTED", "DEPTHWISE_CONV_2D", "EMBEDDING_LOOKUP"), "static": None}
#: ops a static recipe quantizes with the dynamic-range config (the quantizer's policy has no full-integer one)
_TABLE_OPS = ("EMBEDDING_LOOKUP",)
_INT8, _INT32, _FC = 9, 2, 9  # TensorType.INT8, TensorType.INT32, BuiltinOperator.FULLY_CONNECTED
_KINDS = {9: "Gemm", 3: "Conv", 4: "Conv"}  # FULLY_CONNECTED, CONV_2D, DEPTHWISE_CONV_2D: ops holding their bias


def quantize_tflite(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    mode: str = "dynamic",
    calib: Mapping[str, np.ndarray] | Iterable[Mapping[str, np.ndarray]] | None = None,
    check: Mapping[str, np.ndarray] | None = None,
    op_types: Sequence[str] | None = None,
    per_channel: bool = True,
    headroom: float = 1.0,
    min_cosine: float = 0.98,
) -> QuantReport:
    """Quantize the exported ``.tflite`` model ``src`` into ``out`` (see the module doc) and return the report.

    Args:
        mode: ``"dynamic"`` (int8 weights, float activations) or ``"static"`` (full integer).
        calib: static mode's calibration data: ``{input: array [N, ...]}`` (fed one example batch of the
            model at a time) or an iterable of feed dicts. Required for ``static``.
        check: float inputs to compare the quantized model with the float one (default: the first rows of
            ``calib``); required when ``calib`` is not given. For a static model they are quantized with
            its input's scale and zero point, and its outputs dequantized, before comparing.
        op_types: LiteRT op names to quantize (``ai_edge_quantizer.qtyping.TFLOperationName``), default
            :data:`OP_TYPES` for the mode.
        per_channel: one scale per output channel of each weight (the quantizer's ``CHANNELWISE``), else one per
            tensor (``TENSORWISE``; dynamic-range ``DEPTHWISE_CONV_2D`` filters stay per channel: LiteRT's kernel
            for them reads one scale per channel, and garbles outputs with one per tensor).
        headroom: every quantized target's scales times this (>= 1); the weights are requantized from the float
            ones onto the wider grid.
        min_cosine: refuse the result if any output's cosine to the float model is below this.

    Raises:
        BackendUnavailableError: ai-edge-quantizer is not installed.
        ConfigError: an unknown mode or op, missing calibration/check data, headroom < 1.
        ExportValidationError: a target's mapping cannot be proven, or the outputs drift.
    """
    if mode not in MODES:
        raise ConfigError(f"mode {mode!r} is unknown; allowed: {MODES}")
    if headroom < 1.0:
        raise ConfigError(f"headroom {headroom} must be >= 1 (scales cover headroom times each weight's range)")
    src, out = Path(src), Path(out)
    data = src.read_bytes()
    fb = read_tflite(data)
    info = tflite_info(data, fb)
    if any(t.quant is not None for t in info.tensors.values()):
        raise ConfigError(f"{src} is quantized already; pass the float model exported by exporters.export_tflite")
    batch = _example_batch(fb, info)
    feeds = _feeds(calib, batch) if calib is not None else []
    if mode == "static" and not feeds:
        raise ConfigError("static quantization calibrates activations: pass calib={input: array} (the user's data)")
    check = dict(check) if check is not None else (feeds[0] if feeds else None)
    if check is None:
        raise ConfigError("pass check={input: array} (or calib=...) to compare the quantized model with the float one")

    qdata = _run_quantizer(data, mode, feeds, OP_TYPES[mode] if op_types is None else tuple(op_types), per_channel)
    m = unpack_model(qdata)
    for b in m.buffers:  # data the quantizer appended after the flatbuffer (large models): back inside it
        if b.data is None and b.offset > 1:
            if b.offset + b.size > len(qdata):
                raise ExportValidationError("the quantizer wrote a buffer past the end of its file")
            b.data, b.offset, b.size = np.frombuffer(qdata, np.uint8, b.size, b.offset), 0, 0
    _keep_io_names(m, fb)
    for op in m.subgraphs[0].operators:  # symmetric input quantization: the kernel reads the weights every run
        if m.operatorCodes[op.opcodeIndex].builtinCode == _FC and op.builtinOptions is not None:
            op.builtinOptions.asymmetricQuantizeInputs = False
    tensors, quantized, floats, dropped = _map_targets(m, info, stored_arrays(data, fb), headroom)
    packed = pack_model(m)
    extra = dict(info.extra)
    extra["quantization"] = {
        "mode": mode,
        "per_channel": per_channel,
        "weight_type": "int8",
        "headroom": headroom,
        "op_types": None if op_types is None and OP_TYPES[mode] is None else list(op_types or OP_TYPES[mode]),
        "float_fingerprint": info.fingerprint,
        "quantizer": "ai-edge-quantizer",
    }
    qinfo = replace(info, fingerprint=fingerprint(fingerprint_arrays(packed, read_tflite(packed))), tensors=tensors)
    qinfo = replace(qinfo, extra=extra)
    set_metadata(m, META_KEY, qinfo.to_json().encode())
    result = pack_model(m)
    cosine, diff = _check(data, result, info, check, min_cosine)
    from edge.format.io import atomic_write_bytes

    atomic_write_bytes(out, result)
    log.info("quantized %s (%s): %d integer targets", src.name, mode, len(quantized))
    return QuantReport(qinfo, mode, per_channel, quantized, floats, dropped, len(data), len(result), cosine, diff)


def tflite_quantized_base(path: str | os.PathLike):
    """``(info, {param: exporters.qshira.QuantBase})`` of a quantized ``.tflite`` model: what the device holds,
    in the source layout and units, for :func:`exporters.train_shira_int`. Where the converter folded a
    BatchNorm into a conv (``TensorInfo.channel_scale``), the scale is divided by that fold, so the dequantized
    base is the torch conv weight the BatchNorm after it still scales (one step of the stored grid, per entry)."""
    from exporters.qshira import QuantBase

    data = Path(path).read_bytes()
    fb = read_tflite(data)
    info = tflite_info(data, fb)
    stored = stored_arrays(data, fb)
    by_name = {t.name: t for t in fb.tensors}
    out = {}
    for pname, t in info.tensors.items():
        if t.quant is None:
            continue
        shape = t.quant_shape
        tensor = by_name[t.initializer]
        s = np.asarray(tensor.scale, np.float32).reshape(shape)
        z = np.asarray(tensor.zero_point, np.int64).astype(t.quant.dtype).reshape(shape)
        if t.channel_scale is not None:  # a folded BatchNorm: the torch weight is the stored one / its scale
            fold = np.asarray(t.channel_scale, np.float32).reshape([-1] + [1] * (len(t.shape) - 1))
            s = (s / fold).astype(np.float32)
            z = np.broadcast_to(z, np.broadcast_shapes(z.shape, s.shape)).copy()
        bounds = t.quant.weight_bounds(z)  # LiteRT's int8 weights are symmetric: [-127, 127]
        out[pname] = QuantBase(t.from_stored(stored[t.initializer]), s, z, bounds, t.quant.dtype)
    if not out:
        raise ConfigError(f"{path} has no quantized targets: quantize it first (exporters.quantize_tflite)")
    return info, out


def tflite_activation_grid(path: str | os.PathLike):
    """For each integer target of a full-integer ``.tflite`` model: the grids of its op's input and output
    (:class:`exporters.qshira.OpGrid`), for :func:`exporters.train_shira_int`'s ``activations=``.

    Read from the tensors' quantization parameters. A conv whose filter holds a folded BatchNorm gets no output
    grid (its stored output is after the BatchNorm, the torch conv's before it); a dynamic-range model has none.
    """
    from exporters.qshira import ActGrid, OpGrid

    class ClippedGrid(ActGrid):
        """The grid with a clipped straight-through gradient: none where the value saturates. With the plain one,
        training pushes saturated logits on (the device's output grid clips them) until they tie: the demo CNN's
        integer SHiRA on its full-integer base fell to chance (0.21 on invert), 0.90 with this (fp32: 0.91)."""

        def fake(self, x):
            lo, hi = self.bounds
            inside = ((x / self.scale + self.zero_point) >= lo - 0.5) & ((x / self.scale + self.zero_point) <= hi + 0.5)
            y = ActGrid.fake(self, x)
            return y.where(inside, y.detach())

    data = Path(path).read_bytes()
    fb = read_tflite(data)
    info = tflite_info(data, fb)
    tensors = fb.tensors
    index = {t.name: t.index for t in tensors}

    def grid(i: int):
        t = tensors[i] if i >= 0 else None
        if t is None or t.type != _INT8 or len(t.scale) != 1:
            return None
        return ClippedGrid(float(t.scale[0]), int(t.zero_point[0]), (-128, 127))

    out = {}
    for pname, t in info.tensors.items():
        readers = [op for op in fb.ops if t.quant is not None and index[t.initializer] in op.inputs]
        if len(readers) != 1 or readers[0].code not in _KINDS or readers[0].inputs[1] != index[t.initializer]:
            continue
        op = readers[0]
        if grid(op.inputs[0]) is None:  # float activations: a dynamic-range op
            continue
        output = None if t.channel_scale is not None else grid(op.outputs[0]) if op.outputs else None
        out[pname] = OpGrid(_KINDS[op.code], grid(op.inputs[0]), output)
    return out


# -- quantizing -------------------------------------------------------------------------------------------------------


def _keep_io_names(m, fb) -> None:
    """The float model's input and output names on the quantized model's (the quantizer renames an input or output
    it puts a quantize/dequantize op before, e.g. ``logits`` -> ``logits_dequant``, when only some ops are quantized).
    The tensor that held the name (now inside the graph) gets the quantizer's name in exchange."""
    sg, names = m.subgraphs[0], [t.name for t in fb.tensors]
    for old, new in ((fb.inputs, sg.inputs), (fb.outputs, sg.outputs)):
        if len(old) != len(new):
            raise ExportValidationError(f"the quantizer changed the model's inputs/outputs: {len(old)} -> {len(new)}")
        for i, j in zip(old, new):
            want, t = names[i], sg.tensors[j]
            got = t.name.decode() if isinstance(t.name, bytes) else t.name
            if got == want:
                continue
            if not got.startswith(want):
                raise ExportValidationError(f"the quantizer renamed model input/output {want!r} to {got!r}")
            for other in sg.tensors:  # the name's old holder, now an inner tensor
                if (other.name.decode() if isinstance(other.name, bytes) else other.name) == want:
                    other.name = got.encode()
            t.name = want.encode()


def _run_quantizer(data: bytes, mode: str, feeds: list[dict], op_types: Sequence[str] | None, per_channel: bool):
    try:
        from ai_edge_quantizer import qtyping, quantizer
    except ImportError as e:
        raise BackendUnavailableError(
            f"TFLite quantization needs ai-edge-quantizer ({e}): pip install 'edge-adapt[tflite-export]'"
        ) from e
    names = qtyping.TFLOperationName
    ops = [names.ALL_SUPPORTED] if op_types is None else []
    for op in op_types or ():
        try:
            ops.append(names(op))
        except ValueError:
            raise ConfigError(f"op {op!r} is not a LiteRT op the quantizer knows; e.g. FULLY_CONNECTED") from None
    q = quantizer.Quantizer(bytearray(data))
    grain = qtyping.QuantGranularity.CHANNELWISE if per_channel else qtyping.QuantGranularity.TENSORWISE
    for op in ops:
        if mode == "dynamic" or op.value in _TABLE_OPS:  # depthwise: LiteRT's kernel reads one scale per channel
            per = qtyping.QuantGranularity.CHANNELWISE if op == names.DEPTHWISE_CONV_2D else grain
            q.add_dynamic_config(regex=".*", operation_name=op, num_bits=8, granularity=per)
        else:
            q.add_static_config(
                regex=".*", operation_name=op, activation_num_bits=8, weight_num_bits=8, weight_granularity=grain
            )
    calibration = None
    if mode == "static":
        from ai_edge_litert.interpreter import Interpreter

        signatures = Interpreter(model_content=data).get_signature_list()
        if not signatures:
            raise ConfigError("static quantization calibrates through the model's signature and this file has none: "
                              "export it with exporters.export_tflite")  # fmt: skip
        signature = next(iter(signatures))
        calibration = q.calibrate({signature: feeds})
    logging.getLogger("absl").disabled, was = True, logging.getLogger("absl").disabled
    try:
        return bytes(q.quantize(calibration, enable_progress_bar=False, enable_progress_report=False).quantized_model)
    finally:
        logging.getLogger("absl").disabled = was


def _map_targets(m, info: ModelInfo, floats: Mapping[str, np.ndarray], headroom: float):
    """Each target's TensorInfo in the quantized model (proved by dequantizing), and what became of each."""
    sg = m.subgraphs[0]
    by_name = {(t.name.decode() if isinstance(t.name, bytes) else t.name): t for t in sg.tensors}
    tensors, quantized, kept, dropped = {}, [], [], {}
    for pname, t in info.tensors.items():
        st = by_name.get(t.initializer)
        if st is None:
            dropped[pname] = "its tensor is gone from the quantized model"
            continue
        qp = st.quantization
        if t.slot or t.head or st.type != _INT8:
            tensors[pname] = t
            if not (t.slot or t.head):
                kept.append(pname)
            continue
        if qp is None or qp.scale is None or not len(qp.scale):
            dropped[pname] = "stored as int8 without a scale"
            continue
        stored_shape = tuple(int(d) for d in st.shape)
        dim = int(qp.quantizedDimension)
        scale = np.asarray(qp.scale, np.float32) * np.float32(headroom)
        zp = np.asarray(qp.zeroPoint if qp.zeroPoint is not None else np.zeros(scale.size), np.int64)
        bshape = [1] * len(stored_shape)
        if scale.size > 1:
            bshape[dim] = -1
        s, z = scale.reshape(bshape), zp.reshape(bshape)
        real = np.asarray(floats[t.initializer], np.float32).reshape(stored_shape)
        q = np.asarray(m.buffers[st.buffer].data, np.uint8).view(np.int8).reshape(stored_shape)
        if headroom != 1.0:
            q = np.clip(np.round(real / s) + z, -127, 127).astype(np.int8)
            m.buffers[st.buffer].data = q.reshape(-1).view(np.uint8).copy()
            qp.scale = scale
            _rescale_biases(m, sg.tensors.index(st), headroom)
        err = np.abs((q.astype(np.float32) - z) * s - real)
        if not np.all(err <= 0.5 * np.broadcast_to(s, real.shape) * (1 + 1e-3) + 1e-7):
            raise ExportValidationError(
                f"{pname}: dequantizing {t.initializer!r} with its scales (dimension {dim}) is off the float "
                f"weight by up to {float(err.max()):.3g}; the quantized model is not what this exporter understands"
            )
        axis = t.layout[dim] if scale.size > 1 else None
        quant = QuantInfo(t.initializer + SCALE, t.initializer + ZERO_POINT, "int8", axis)
        tensors[pname] = replace(t, quant=quant)
        quantized.append(pname)
    return tensors, quantized, kept, dropped


def _rescale_biases(m, weight: int, headroom: float) -> None:
    """Full integer: an int32 bias of an op reading ``weight`` has scale input * weight scale; widen it too."""
    sg = m.subgraphs[0]
    for op in sg.operators:
        inputs = list(op.inputs)
        if len(inputs) < 3 or inputs[1] != weight or inputs[2] < 0:
            continue
        b = sg.tensors[inputs[2]]
        if b.type != _INT32 or b.quantization is None or b.quantization.scale is None:
            continue
        if sum(list(o.inputs).count(inputs[2]) for o in sg.operators) > 1:
            raise ExportValidationError(f"bias {b.name!r} is shared by several ops; cannot rescale it for headroom")
        q = np.asarray(m.buffers[b.buffer].data, np.uint8).view(np.int32)
        m.buffers[b.buffer].data = np.round(q / headroom).astype(np.int32).view(np.uint8).copy()
        b.quantization.scale = np.asarray(b.quantization.scale, np.float32) * np.float32(headroom)


# -- data and checks --------------------------------------------------------------------------------------------------


def _example_batch(fb, info: ModelInfo) -> int | None:
    """The fixed batch of the model's first input (litert-torch bakes the example's), None if dynamic."""
    names = {t.name: t for t in fb.tensors}
    first = names.get(info.inputs[0]) if info.inputs else None
    if first is None or not first.signature:
        return None
    return int(first.signature[0]) if first.signature[0] > 0 else None


def _feeds(calib, batch: int | None) -> list[dict[str, np.ndarray]]:
    if isinstance(calib, Mapping):
        arrays = {k: np.asarray(v) for k, v in calib.items()}
        n = min(len(v) for v in arrays.values())
        step = batch or n
        return [{k: v[i : i + step] for k, v in arrays.items()} for i in range(0, n - step + 1, step)]
    return [dict(f) for f in calib]


def _check(float_data: bytes, data: bytes, info: ModelInfo, feeds: Mapping[str, np.ndarray], min_cosine: float):
    """Quantized vs float outputs on LiteRT: XNNPACK, and the built-in kernels when they can serve switches."""
    from runtimes.base import BackendOptions
    from runtimes.litert import LiteRTBackend

    feeds = {k: np.asarray(v) for k, v in feeds.items()}
    ref = LiteRTBackend(float_data, BackendOptions(strategy="rebuild"))
    try:
        want = ref.run(feeds)
    finally:
        ref.close()
    fb = read_tflite(data)
    names = {t.name: t for t in fb.tensors}
    qfeeds = {k: _quantize_input(names[k], v) for k, v in feeds.items()}
    cosine, diff, bad = {}, {}, []
    for strategy in ("rebuild", "builtin"):
        try:
            backend = LiteRTBackend(data, BackendOptions(strategy=strategy))
        except ConfigError as e:  # int8 weights feed a kernel that caches: only rebuild can serve them
            log.info("not checking the built-in kernels: %s", e)
            continue
        try:
            got = backend.run(qfeeds)
        finally:
            backend.close()
        for name in info.outputs:
            a = want[name].astype(np.float64).reshape(-1)
            b = _dequantize_output(names[name], got[name]).astype(np.float64).reshape(-1)
            c = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))
            cosine[name] = min(cosine.get(name, 1.0), c)
            diff[name] = max(diff.get(name, 0.0), float(np.abs(a - b).max()) if a.size else 0.0)
            if c < min_cosine:
                bad.append(f"{name!r} ({strategy}): cosine {c:.4f}, max difference {diff[name]:.3g}")
    if bad:
        raise ExportValidationError(
            f"the quantized model drifts from the float one beyond cosine {min_cosine}: "
            + "; ".join(bad)
            + ". Calibrate on more representative data, or quantize fewer ops (op_types)"
        )
    return cosine, diff


def _quantize_input(t, x: np.ndarray) -> np.ndarray:
    """A float input for an int8 model input (full integer): quantized with that input's scale and zero point."""
    if t.type != _INT8:
        return x
    s, z = np.float32(t.scale[0]), int(t.zero_point[0])
    return np.clip(np.round(np.asarray(x, np.float32) / s) + z, -128, 127).astype(np.int8)


def _dequantize_output(t, y: np.ndarray) -> np.ndarray:
    if t.type != _INT8 or not t.scale:
        return np.asarray(y, np.float32)
    return (y.astype(np.float32) - np.float32(t.zero_point[0])) * np.float32(t.scale[0])
