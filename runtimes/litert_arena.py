"""The LiteRT backend's arenas: the model's own bytes, viewed as float32 and as int8, written in place.

LiteRT's ``model_content`` is read in place, so the weights every interpreter reads *are* the
bytes held here: the float32 arena views them as float32 (every float target 4-byte aligned) and
the integer arena as int8/uint8 (quantized targets of an int8 model, issue 18), and slots live after
the model in the same buffer.

Which kernels see an in-place write of integer weights (measured on ai-edge-litert 2.3.0, x86-64,
``lab/bench_quantized_litert.py`` and ``tests/host/test_tflite_quant.py``): XNNPACK packs int8
weights like float ones (a rebuild is needed); the built-in kernels read them at every run for
``FULLY_CONNECTED`` (full-integer, and dynamic-range with symmetric input quantization),
``DEPTHWISE_CONV_2D`` (both kinds), full-integer ``CONV_2D`` and ``EMBEDDING_LOOKUP`` (an int8 table,
dequantized row by row at every run; XNNPACK leaves it to them). The dynamic-range (hybrid)
``CONV_2D`` and a hybrid ``FULLY_CONNECTED`` with ``asymmetric_quantize_inputs`` cache per-row
sums of the weights at their first run, so they would compute with a mix of old and new weights:
:func:`stale_readers` names them and the backend refuses the built-in strategies for such a model.
On a dynamic-range model the two kernels also differ in how they quantize activations: XNNPACK per
row asymmetrically, the built-in kernel (symmetric inputs) with one bit less for non-negative rows,
so a hybrid runtime's settle window answers a little less precisely than its settled XNNPACK copy
(demo ViT, integer SHiRA: mean accuracy 0.845 on XNNPACK, 0.789 on the built-in kernels).
"""

from __future__ import annotations

import ctypes
import math

import numpy as np

from edge.errors import FormatError
from edge.format.modelinfo import ModelInfo, fingerprint
from edge.format.qrange import QUANT_DTYPES
from edge.format.tflite import SCALE, ZERO_POINT, TfliteModel, fingerprint_arrays, quant_arrays
from runtimes.lines import HUGE_MIN, advise_huge

__all__ = [
    "ALIGN",
    "dynamic_range_ops",
    "load_arena",
    "quant_constants",
    "stale_readers",
    "verify_fingerprint",
    "writable_view",
]

ALIGN = 16
_SLOT_SHARE = 4  # slots may take this many times the model file's bytes
_FLOAT, _INTEGER = {0: np.dtype(np.float32)}, {3: np.dtype(np.uint8), 9: np.dtype(np.int8)}
_CONV_2D, _DEPTHWISE, _EMBEDDING_LOOKUP, _FULLY_CONNECTED = 3, 4, 7, 9
_NAMES = {_CONV_2D: "CONV_2D", _DEPTHWISE: "DEPTHWISE_CONV_2D", _FULLY_CONNECTED: "FULLY_CONNECTED"}


def load_arena(model: bytes, fb: TfliteModel, info: ModelInfo, owned: bool = False):
    """``(data, float32 arena, {integer dtype: arena}, offset, live views, slots)`` over one private copy.

    ``offset`` is each writable tensor's position in its own arena (elements). Quantized targets
    (``TensorInfo.quant``) must be stored with that integer type; every other writable tensor float32.
    ``owned``: ``model`` is a ``bytes`` object nobody else holds (the backend read it from the file); it
    becomes the arena itself when it needs no padding, so loading holds the model once, not twice.
    """
    by_name = {t.name: t for t in fb.tensors}
    if len(by_name) != len(fb.tensors):
        raise FormatError("tensor names of the .tflite model are not unique; re-export it")
    want = {}
    for t in info.tensors.values():
        want[t.initializer] = np.dtype(t.quant.dtype) if t.quant is not None else np.dtype(np.float32)
    writable = sorted(want)
    slots = sorted({t.initializer for t in info.tensors.values() if t.slot})
    missing = [w for w in writable if w not in by_name]
    if missing:
        raise FormatError(f"model has no tensor(s) {missing[:5]} named in its metadata")
    sizes = {t.initializer: math.prod(t.shape) for t in info.tensors.values()}
    buffers: dict[int, str] = {}
    for name in writable:
        t = by_name[name]
        if any(d < 0 for d in t.shape) or math.prod(t.shape) != sizes[name]:
            raise FormatError(
                f"writable tensor {name!r} has shape {list(t.shape)[:8]} in the file, not the {sizes[name]} entries "
                "its metadata declares; re-export the model"
            )
        got = _FLOAT.get(t.type) or _INTEGER.get(t.type)
        if got != want[name]:
            raise FormatError(
                f"writable tensor {name!r} must be {want[name]} (as the metadata says), got TensorType {t.type}"
            )
        if name in slots:
            if t.nbytes or t.index not in fb.inputs:
                raise FormatError(f"slot {name!r} must be a subgraph input without data; re-export with slots=...")
            continue
        size = got.itemsize
        if t.nbytes != size * int(np.prod(t.shape)) or t.start % size:
            raise FormatError(f"writable tensor {name!r} has {t.nbytes} bytes at offset {t.start} (unaligned?)")
        if t.buffer in buffers:
            raise FormatError(f"tensors {buffers[t.buffer]!r} and {name!r} share one buffer; re-export the model")
        buffers[t.buffer] = name
    shared = [t.name for t in fb.tensors if t.buffer in buffers and t.name != buffers[t.buffer]]
    if shared:
        raise FormatError(f"writable weights share their buffer with {shared[:5]}; re-export the model")

    size = -(-len(model) // ALIGN) * ALIGN
    slot_bytes = sum(4 * sizes[name] for name in slots)
    if slot_bytes > _SLOT_SHARE * size + (1 << 20):  # adapter slots are a bottleneck's weights, smaller than the base
        raise FormatError(
            f"the model's slots would take {slot_bytes} bytes, over {_SLOT_SHARE} times its own {len(model)}; "
            "a slot holds an adapter's weights: re-export the model with smaller slots"
        )
    slot_at = {}
    for name in slots:
        slot_at[name] = size
        size += -(-4 * int(np.prod(by_name[name].shape)) // ALIGN) * ALIGN
    if owned and type(model) is bytes and size == len(model):
        data = model  # already private: no second copy at load
        raw = writable_view(data)
    else:  # a fresh object only this backend references (``model + pad`` would be ``model`` itself when pad is empty)
        data = bytes(size)
        raw = writable_view(data)
        if size >= HUGE_MIN:  # before the copy below first writes its pages (numpy never advises a bytes object)
            advise_huge(raw)
        raw[: len(model)] = np.frombuffer(model, np.uint8)
    arena = raw[: len(raw) // 4 * 4].view(np.float32)
    integer = {d: raw.view(d) for d in {want[n] for n in writable} if d.kind in "iu"}
    offset, live = {}, {}
    for name in writable:
        t, dt = by_name[name], want[name]
        start = slot_at.get(name, t.start)
        offset[name] = start // dt.itemsize
        view = arena if dt.kind == "f" else integer[dt]
        live[name] = view[offset[name] : offset[name] + int(np.prod(t.shape))].reshape(t.shape)
    return data, arena, integer, offset, live, slots


def writable_view(data: bytes) -> np.ndarray:
    """A writable uint8 view of a ``bytes`` object's storage.

    LiteRT's ``model_content`` takes only ``bytes`` and reads it in place, so the
    weights are edited through this view. Safe here because the object is private to
    the backend, never hashed or interned, and outlives every interpreter and view
    (the backend keeps it).
    """
    get = ctypes.pythonapi.PyBytes_AsString
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object]
    ptr = get(data)
    if ptr % ALIGN:
        raise FormatError("model buffer is not 16-byte aligned in memory")  # CPython aligns bytes storage
    return np.ctypeslib.as_array((ctypes.c_uint8 * len(data)).from_address(ptr))


def verify_fingerprint(data: bytes, fb: TfliteModel, info: ModelInfo) -> None:
    got = fingerprint(fingerprint_arrays(data, fb))
    if got != info.fingerprint:
        raise FormatError(
            f"model {info.name!r}: weights fingerprint {got} differs from the exported {info.fingerprint}; "
            "the file was modified after export (re-export it)"
        )


def quant_constants(fb: TfliteModel, info: ModelInfo) -> dict[str, np.ndarray]:
    """The scales and zero points the metadata names (``tensor@scale``, ``tensor@zero_point``), read-only,
    checked: positive finite float32 scales, one per channel of the quantized axis (or one), zero points
    of the tensor's integer type."""
    found = quant_arrays(fb)
    out = {}
    for name, t in info.tensors.items():
        q = t.quant
        if q is None:
            continue
        if (q.scale, q.zero_point) != (t.initializer + SCALE, t.initializer + ZERO_POINT):
            raise FormatError(f"{name}: quantization names {q.scale!r}, {q.zero_point!r} are not its tensor's")
        if q.scale not in found:
            raise FormatError(f"{name}: tensor {t.initializer!r} has no quantization parameters in the file")
        scale, zp = found[q.scale], found[q.zero_point]
        n = 1 if q.axis is None else t.shape[q.axis]
        if scale.size != n or not (np.isfinite(scale).all() and (scale > 0).all()):
            raise FormatError(f"{name}: scale {q.scale!r} is not {n} positive finite float32 value(s)")
        lo, hi = QUANT_DTYPES[q.dtype]  # a zero point's range: the type's whole one
        if zp.size != n or zp.min() < lo or zp.max() > hi:
            raise FormatError(f"{name}: zero point {q.zero_point!r} is not {n} {q.dtype} value(s)")
        out[q.scale], out[q.zero_point] = scale, zp.astype(q.dtype)
    for v in out.values():
        v.flags.writeable = False
    return out


def stale_readers(fb: TfliteModel, integer: frozenset[int]) -> list[str]:
    """Operators reading one of the ``integer`` tensors (indices) whose built-in kernel would not see a write.

    Those cache something derived from the weights at their first run (hybrid row sums). Anything
    but the kernels measured to read integer weights at every run is listed (``"OP reads NAME"``).
    """
    tensors = fb.tensors
    out = []
    for op in fb.ops:
        hit = [i for i in op.inputs[1:] if i in integer]
        if not hit:
            continue
        hybrid = op.inputs[0] >= 0 and tensors[op.inputs[0]].type in _FLOAT  # float activations, int8 weights
        fine = op.code in (_DEPTHWISE, _EMBEDDING_LOOKUP) or (
            op.code == _FULLY_CONNECTED and not (hybrid and op.asymmetric)
        )
        fine = fine or (op.code == _CONV_2D and not hybrid)
        if not fine:
            kind = "dynamic-range " if hybrid else ""
            out += [f"{kind}{_NAMES.get(op.code, f'builtin op {op.code}')} reads {tensors[i].name!r}" for i in hit]
    return out


def dynamic_range_ops(fb: TfliteModel) -> dict[int, int]:
    """Dynamic-range (hybrid) operators: op index -> its integer weight's tensor index.

    Float activations in, int8/uint8 constant weights: the kernels that quantize their input at every
    run. On ai-edge-litert 2.3.0 their built-in versions split even tiny work over the interpreter's
    threads, and with more than one thread they were measured 16-300x slower on a loaded 2-core machine
    (figures in :func:`runtimes.litert.one_thread_reason`): the backend runs any interpreter that leaves one
    to the built-in kernels on one thread.
    """
    tensors, out = fb.tensors, {}
    for k, op in enumerate(fb.ops):
        if not op.inputs or op.inputs[0] < 0 or tensors[op.inputs[0]].type not in _FLOAT:
            continue
        weights = [i for i in op.inputs[1:] if i >= 0 and tensors[i].type in _INTEGER and tensors[i].nbytes]
        if weights:
            out[k] = weights[0]
    return out
