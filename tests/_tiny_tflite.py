"""Tiny ``.tflite`` models written with the flatbuffer object API (no torch, no converter).

Same math, names, seeds and helper signatures as :mod:`_tiny` (the ONNX versions), so
table-driven tests pick a module per backend. ``FULLY_CONNECTED`` stores weights
``[out, in]``, the torch layout, so no tensor is stored transposed here. Slots are
subgraph inputs without data, as ``exporters.tflite`` writes them.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from ai_edge_litert import schema_py_generated as s

from edge.format.modelinfo import META_KEY, ModelInfo, QuantInfo, TensorInfo, fingerprint
from edge.format.tflite import (
    SCALE,
    ZERO_POINT,
    aligned_buffer,
    fingerprint_arrays,
    pack_model,
    read_tflite,
    set_metadata,
    stored_arrays,
)

SUFFIX = ".tflite"
_FC, _ADD, _CONV = s.BuiltinOperator.FULLY_CONNECTED, s.BuiltinOperator.ADD, s.BuiltinOperator.CONV_2D
_LOOKUP = s.BuiltinOperator.EMBEDDING_LOOKUP
_TYPES = {
    np.dtype(np.float32): s.TensorType.FLOAT32,
    np.dtype(np.int8): s.TensorType.INT8,
    np.dtype(np.int32): s.TensorType.INT32,
}


class _Graph:
    def __init__(self) -> None:
        self.m = s.ModelT()
        self.m.version = 3
        self.m.buffers = [aligned_buffer(None)]
        self.m.operatorCodes = []
        self.sg = s.SubGraphT()
        self.sg.tensors, self.sg.operators, self.sg.inputs, self.sg.outputs = [], [], [], []
        self.m.subgraphs = [self.sg]

    def tensor(
        self, name: str, shape, data: np.ndarray | None = None, batch: bool = False, dtype=np.float32, quant=None
    ) -> int:
        """A tensor (``data``: a constant; float32 unless it is int8/int32 data or ``dtype`` says so); ``quant``:
        ``(scales, zero_points)`` along axis 0."""
        dtype = np.dtype(data.dtype if data is not None and data.dtype in _TYPES else dtype)
        t = s.TensorT()
        t.name, t.type, t.shape = name.encode(), _TYPES[dtype], list(shape)
        if batch:
            t.shapeSignature = [-1, *shape[1:]]
        t.buffer = 0
        if data is not None:
            raw = np.ascontiguousarray(data, dtype).reshape(-1).view(np.uint8)
            self.m.buffers.append(aligned_buffer(raw))
            t.buffer = len(self.m.buffers) - 1
        if quant is not None:
            t.quantization = s.QuantizationParametersT()
            t.quantization.scale = np.asarray(quant[0], np.float32).reshape(-1)
            t.quantization.zeroPoint = np.asarray(quant[1], np.int64).reshape(-1)
            t.quantization.quantizedDimension = 0
        self.sg.tensors.append(t)
        return len(self.sg.tensors) - 1

    def op(self, code: int, inputs, outputs, relu: bool = False) -> None:
        codes = [c.builtinCode for c in self.m.operatorCodes]
        if code not in codes:
            c = s.OperatorCodeT()
            c.builtinCode, c.deprecatedBuiltinCode, c.version = code, code, 1
            self.m.operatorCodes.append(c)
            codes.append(code)
        o = s.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = codes.index(code), list(inputs), list(outputs)
        act = s.ActivationFunctionType.RELU if relu else s.ActivationFunctionType.NONE
        if code == _FC:
            o.builtinOptionsType, o.builtinOptions = s.BuiltinOptions.FullyConnectedOptions, s.FullyConnectedOptionsT()
        elif code == _CONV:  # SAME padding, stride 1
            o.builtinOptionsType, o.builtinOptions = s.BuiltinOptions.Conv2DOptions, s.Conv2DOptionsT()
            o.builtinOptions.padding, o.builtinOptions.strideW, o.builtinOptions.strideH = s.Padding.SAME, 1, 1
        elif code == _ADD:
            o.builtinOptionsType, o.builtinOptions = s.BuiltinOptions.AddOptions, s.AddOptionsT()
        else:  # EMBEDDING_LOOKUP: no options
            self.sg.operators.append(o)
            return
        o.builtinOptions.fusedActivationFunction = act
        self.sg.operators.append(o)

    def save(self, path: Path, info: ModelInfo) -> ModelInfo:
        data = pack_model(self.m)
        info = replace(info, fingerprint=fingerprint(fingerprint_arrays(data, read_tflite(data))))
        set_metadata(self.m, META_KEY, info.to_json().encode())
        Path(path).write_bytes(pack_model(self.m))
        return info


def make_mlp(
    path: Path, seed: int = 0, sizes=(10, 20, 2), name: str = "tiny-mlp", extra: dict | None = None
) -> ModelInfo:
    """x[B,10] -> Linear -> ReLU -> Linear -> logits[B,2], the weights of ``_tiny.make_mlp`` (same seed)."""
    rng = np.random.default_rng(seed)
    d_in, d_hid, d_out = sizes
    w1 = rng.standard_normal((d_hid, d_in)).astype(np.float32) * 0.5
    b1 = rng.standard_normal(d_hid).astype(np.float32) * 0.1
    w2 = rng.standard_normal((d_out, d_hid)).astype(np.float32) * 0.5
    b2 = rng.standard_normal(d_out).astype(np.float32) * 0.1
    g = _Graph()
    x = g.tensor("x", (1, d_in), batch=True)
    h = g.tensor("h", (1, d_hid), batch=True)
    y = g.tensor("logits", (1, d_out), batch=True)
    g.op(_FC, [x, g.tensor("fc1.weight", w1.shape, w1), g.tensor("fc1.bias", b1.shape, b1)], [h], relu=True)
    g.op(_FC, [h, g.tensor("fc2.weight", w2.shape, w2), g.tensor("fc2.bias", b2.shape, b2)], [y])
    g.sg.inputs, g.sg.outputs = [x], [y]
    info = ModelInfo(
        name=name,
        fingerprint="",
        tensors={
            "fc1.weight": TensorInfo("fc1.weight", (d_hid, d_in)),
            "fc2.weight": TensorInfo("fc2.weight", (d_out, d_hid)),
        },
        inputs=("x",),
        outputs=("logits",),
        extra=dict(extra or {}),
    )
    return g.save(path, info)


def make_branch_mlp(path: Path, seed: int = 0, d_in: int = 10, d_hid: int = 16, r: int = 4) -> ModelInfo:
    """``_tiny.make_branch_mlp``'s math; the branch weights are slots (subgraph inputs, zero = no adapter)."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((d_hid, d_in)).astype(np.float32) * 0.5
    b1 = rng.standard_normal(d_hid).astype(np.float32) * 0.1
    w2 = rng.standard_normal((2, d_hid)).astype(np.float32) * 0.5
    g = _Graph()
    x = g.tensor("x", (1, d_in), batch=True)
    down = g.tensor("branch.down.weight", (r, d_in))
    up = g.tensor("branch.up.weight", (d_hid, r))
    h2, d1, u0, h3 = (
        g.tensor(n, (1, k), batch=True) for n, k in (("h2", d_hid), ("d1", r), ("u0", d_hid), ("h3", d_hid))
    )
    y = g.tensor("logits", (1, 2), batch=True)
    g.op(_FC, [x, g.tensor("fc1.weight", w1.shape, w1), g.tensor("fc1.bias", b1.shape, b1)], [h2], relu=True)
    g.op(_FC, [x, down, -1], [d1], relu=True)
    g.op(_FC, [d1, up, -1], [u0])
    g.op(_ADD, [h2, u0], [h3])
    g.op(_FC, [h3, g.tensor("fc2.weight", w2.shape, w2), -1], [y])
    g.sg.inputs, g.sg.outputs = [x, down, up], [y]
    info = ModelInfo(
        name="branch-mlp",
        fingerprint="",
        tensors={
            "fc1.weight": TensorInfo("fc1.weight", (d_hid, d_in)),
            "fc2.weight": TensorInfo("fc2.weight", (2, d_hid)),
            "branch.down.weight": TensorInfo("branch.down.weight", (r, d_in), slot=True),
            "branch.up.weight": TensorInfo("branch.up.weight", (d_hid, r), slot=True),
        },
        inputs=("x",),
        outputs=("logits",),
    )
    return g.save(path, info)


CONV = (5, 4, 3)  # make_conv: out channels, in channels, kernel side


def make_conv(path: Path, seed: int = 0, scale: bool = False, side: int = 6) -> tuple[ModelInfo, np.ndarray]:
    """x[1,side,side,4] (NHWC) -> CONV_2D (SAME) -> y[1,side,side,5], the filter stored OHWI as converters do.

    The source (torch) weight ``w`` is ``[O, I, K, K]``; with ``scale`` the stored filter is
    ``w * s[o]`` (a folded BatchNorm) and the metadata says so. Returns ``(info, w)``; the bias is 0.1.
    """
    rng = np.random.default_rng(seed)
    o, i, k = CONV
    w = rng.standard_normal((o, i, k, k)).astype(np.float32) * 0.5
    s_ = rng.uniform(0.5, 2.0, o).astype(np.float32) if scale else None
    stored = (w if s_ is None else w * s_[:, None, None, None]).transpose(0, 2, 3, 1)
    g = _Graph()
    x = g.tensor("x", (1, side, side, i))
    y = g.tensor("y", (1, side, side, o))
    bias = np.full(o, 0.1, np.float32)
    g.op(_CONV, [x, g.tensor("conv.weight", stored.shape, stored), g.tensor("conv.bias", (o,), bias)], [y])
    g.sg.inputs, g.sg.outputs = [x], [y]
    folded = None if s_ is None else tuple(float(v) for v in s_)
    t = TensorInfo("conv.weight", (o, i, k, k), perm=(0, 2, 3, 1), channel_scale=folded)
    info = ModelInfo(name="tiny-conv", fingerprint="", tensors={"conv.weight": t}, inputs=("x",), outputs=("y",))
    return g.save(path, info), w


def make_int8_mlp(path: Path, seed: int = 0, sizes=(10, 20, 2), static: bool = False) -> ModelInfo:
    """``make_mlp``'s math with int8 weights, one symmetric scale per output channel (headroom 2: room for adapters
    to grow), as ``exporters.quantize_tflite`` writes them. ``static=False``: dynamic range (float activations,
    float biases); ``static=True``: full integer (int8 input, activations and output with their scale and zero
    point, int32 biases), what NPU delegates take."""
    rng = np.random.default_rng(seed)
    d_in, d_hid, d_out = sizes
    ws = [rng.standard_normal((d_hid, d_in)).astype(np.float32) * 0.5]
    bs = [rng.standard_normal(d_hid).astype(np.float32) * 0.1]
    ws.append(rng.standard_normal((d_out, d_hid)).astype(np.float32) * 0.5)
    bs.append(rng.standard_normal(d_out).astype(np.float32) * 0.1)
    g = _Graph()
    act = {"x": (0.25, 0), "h": (8.0 / 255, -128), "logits": (16.0 / 127, 0)}  # (scale, zero point)

    def io(name: str, n: int) -> int:
        if not static:
            return g.tensor(name, (1, n), batch=True)
        sc, zp = act[name]
        return g.tensor(name, (1, n), batch=True, dtype=np.int8, quant=([sc], [zp]))

    x, h, y = io("x", d_in), io("h", d_hid), io("logits", d_out)
    tensors = {}
    for name, w, b, src, dst, relu in (("fc1", ws[0], bs[0], x, h, True), ("fc2", ws[1], bs[1], h, y, False)):
        scale = (2.0 * np.abs(w).max(1) / 127).astype(np.float32)
        q = np.round(w / scale[:, None]).astype(np.int8)
        wi = g.tensor(f"{name}.weight", w.shape, q, quant=(scale, np.zeros(len(scale))))
        if static:
            bscale = (act["x" if name == "fc1" else "h"][0] * scale).astype(np.float32)
            bq = np.round(b / bscale).astype(np.int32)
            bi = g.tensor(f"{name}.bias", b.shape, bq, quant=(bscale, np.zeros(len(bscale))))
        else:
            bi = g.tensor(f"{name}.bias", b.shape, b)
        g.op(_FC, [src, wi, bi], [dst], relu=relu)
        quant = QuantInfo(f"{name}.weight{SCALE}", f"{name}.weight{ZERO_POINT}", "int8", 0)
        tensors[f"{name}.weight"] = TensorInfo(f"{name}.weight", w.shape, quant=quant)
    g.sg.inputs, g.sg.outputs = [x], [y]
    name = "int8-static-mlp" if static else "int8-mlp"
    return g.save(path, ModelInfo(name=name, fingerprint="", tensors=tensors, inputs=("x",), outputs=("logits",)))


def make_embedding(path: Path, rows: int = 1000, dim: int = 4, ids: int = 8, seed: int = 0) -> ModelInfo:
    """input_ids[ids] (int32) -> EMBEDDING_LOOKUP of a ``[rows, dim]`` float table (the target) -> emb[ids, dim]."""
    table = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    g = _Graph()
    x = g.tensor("input_ids", (ids,), dtype=np.int32)
    y = g.tensor("emb", (ids, dim))
    g.op(_LOOKUP, [x, g.tensor("embed.weight", table.shape, table)], [y])
    g.sg.inputs, g.sg.outputs = [x], [y]
    tensors = {"embed.weight": TensorInfo("embed.weight", (rows, dim))}
    return g.save(path, ModelInfo("tiny-embedding", "", tensors, inputs=("input_ids",), outputs=("emb",)))


def reference_conv(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """numpy SAME convolution of NHWC ``x`` with the source-layout weight ``w`` ``[O, I, K, K]`` (+ bias 0.1)."""
    k = w.shape[-1]
    xp = np.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
    windows = np.lib.stride_tricks.sliding_window_view(xp, (k, k), axis=(1, 2))  # [B, H, W, I, K, K]
    return np.einsum("bhwikl,oikl->bhwo", windows.astype(np.float64), w.astype(np.float64)).astype(np.float32) + 0.1


def _stored(path: Path) -> dict[str, np.ndarray]:
    data = Path(path).read_bytes()
    return {k: np.array(v) for k, v in stored_arrays(data, read_tflite(data)).items()}


def base_weights(path: Path, info: ModelInfo) -> dict[str, np.ndarray]:
    """Source-layout base weights of the targets, read from the file (slots: zeros; a folded scale left in)."""
    stored = _stored(path)
    out = {}
    for k, t in info.tensors.items():
        out[k] = t.from_stored(stored[t.initializer]) if not t.slot else np.zeros(t.shape, np.float32)
    return out


def write_merged(path: Path, info: ModelInfo, merged: dict[str, np.ndarray], out: Path) -> None:
    """A copy of the model file with ``merged`` (source layout, a folded scale left in, as base_weights reads
    them) written into its stored tensors."""
    data = bytearray(Path(path).read_bytes())
    by_name = {t.name: t for t in read_tflite(bytes(data)).tensors}
    for k, t in info.tensors.items():
        if t.slot:
            continue
        w = t.to_stored(merged[k]).tobytes()  # any layout
        at = by_name[t.initializer].start
        data[at : at + len(w)] = w
    Path(out).write_bytes(bytes(data))


def reference_branch(path: Path, info: ModelInfo, weights: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """numpy forward of make_branch_mlp with source-layout ``weights`` overriding the stored ones."""
    w = base_weights(path, info)
    w.update(weights)
    stored = _stored(path)  # a converted file names the bias after the op: take the one 1-D [d_hid] tensor
    b1 = stored.get("fc1.bias", next((v for v in stored.values() if v.shape == (w["fc1.weight"].shape[0],)), None))
    h = (
        np.maximum(x @ w["fc1.weight"].T + b1, 0)
        + np.maximum(x @ w["branch.down.weight"].T, 0) @ w["branch.up.weight"].T
    )
    return h @ w["fc2.weight"].T
