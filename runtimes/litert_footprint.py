"""The LiteRT backend's predicted resident memory, read from the ``.tflite`` file's own tensor table.

What a LiteRT model keeps resident, per part (:func:`litert_parts`), and which strategy holds which
(:func:`predict_mb`):

``model``
    The model's bytes, held once by the backend and read in place by every interpreter
    (``model_content``), plus the slot values stored after them: the file's size plus the slots' bytes.
``tables``
    What the backend's Python side keeps of the file's tensor table: :data:`TABLE_BYTES` a tensor, and
    :data:`SCALE_BYTES` a quantization scale (an int8 model's per-channel scales and zero points are Python
    tuples: 2.3 MB for MiniLM-L6's 51,260).
``packed``
    XNNPACK's packed copy of the weights it takes, one per XNNPACK interpreter (``hybrid`` and ``rebuild``; no
    weights cache is shared; none with ``providers=["CPU"]``). XNNPACK repacks the constant filter and bias of
    ``FULLY_CONNECTED``, ``CONV_2D``, ``DEPTHWISE_CONV_2D``, ``TRANSPOSE_CONV`` and a ``BATCH_MATMUL`` with a
    constant right-hand side into its GEMM layout (XNNPACK ``src/packing.c``, ``xnn_pack_f32_gemm_goi_w``: per block
    of output channels, the bias then the filter rows; int8 filters of a dynamic-range or full-integer model are
    packed as int8, with an int32/float32 bias and per-channel scale), so a packed filter takes its own bytes again
    plus a few words per output channel; every other constant (an ``ADD``'s operand, an embedding table that
    ``EMBEDDING_LOOKUP`` or ``GATHER`` reads) stays where it is in the model's bytes. A dynamic-range
    ``DEPTHWISE_CONV_2D`` is not counted (XNNPACK leaves it to the built-in kernels, see
    :func:`runtimes.litert.one_thread_reason`). A filter two ops read counts twice (each op packs its own). Not
    counted: the padding of the last block of output channels to the kernel's tile (a few channels a layer).
``arena``
    One interpreter's activation memory at the file's batch: the largest sum of activation tensors alive
    at once when the operators run in file order (a tensor lives from the operator that writes it to the
    last that reads it; the model's inputs and outputs throughout; for the built-in interpreter also a
    ``CONV_2D``'s im2col buffer during its op), times :data:`ARENA_FACTOR` for what the planner's layout,
    the kernels' other scratch (a built-in ``BATCH_MATMUL``'s transposed operand) and XNNPACK's own
    workspace add; plus :data:`INTERPRETER_MB`, what an interpreter's operator and tensor tables hold.

``builtin`` holds model + one arena; ``rebuild`` model + packed + one arena (a rebuild frees the stale
interpreter before it packs anew, ``FREE_STALE_BEFORE_BUILD``); ``hybrid`` model + packed + two arenas. Without
XNNPACK (``providers=["CPU"]``) nothing is packed, and ``hybrid`` is predicted as what runs: ``builtin`` (the
backend serves it with its one built-in interpreter, :class:`runtimes.litert.LiteRTBackend`).
Not counted: the Python process and LiteRT's shared libraries (paid once a process, whatever the model),
and an input batch larger than the file's (the arena grows with it); the adapters held are counted apart
(:attr:`edge.Runtime.adapter_bytes`).

How close, predicted against measured (ai-edge-litert 2.3.0, x86-64; a fresh process per file and strategy,
after a warm-up model was loaded and run; resident growth over load and the first run, hybrid's also after one
run on its built-in interpreter, as in a settle window; memory does not depend on the load average, 8-14 then):
within 3 % for every strategy on MiniLM-L6 fp32 (85.7 MB file: 130.2 predicted against 129.4 MB measured under
rebuild, 89.6 against 89.7 builtin, 133.6 against 133.5 hybrid) and dynamic-range int8 (22.4 MB file), on
random-weight HF exports (BERT 4x384 fp32 and int8, ViT 6x256 fp32 and int8); -4 to +8 % on a small ResNet
(the built-in im2col over-counted, XNNPACK's indirection buffers not counted); 2-6 % under on full-integer
MiniLM-L6 (its built-in kernels keep per-channel data not counted here); on the sub-MB digits models 0.1-0.5 MB
over (the constants dominate) and up to 0.2 MB under (their full-integer CNN).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edge.errors import ConfigError
from edge.format.tflite import TfliteModel

__all__ = [
    "ARENA_FACTOR",
    "INTERPRETER_MB",
    "SCALE_BYTES",
    "TABLE_BYTES",
    "LiteRTParts",
    "file_mb",
    "held_bytes",
    "litert_parts",
    "predict_mb",
]

STRATEGIES = ("hybrid", "rebuild", "builtin")
#: activation peak -> an interpreter's arena (planner layout, kernel scratch, XNNPACK's workspace); fitted
#: on MiniLM-L6 (fp32 and dynamic-range) and the exports measured in the module doc
ARENA_FACTOR = 1.6
TABLE_BYTES, SCALE_BYTES = 1024, 48  # MiniLM-L6: 0.51 MB for 495 tensors; 34-40 B a scale parsed, 6-11 kept
INTERPRETER_MB = 0.3  # an interpreter's own tables (measured 0.1-0.4 MB beyond its arena on the digits models)
_MB = 2**20
# BuiltinOperator codes (LiteRT schema.fbs) -> input positions of the filter and the bias XNNPACK packs
_PACKED = {9: (1, 2), 3: (1, 2), 4: (1, 2), 67: (1, 3), 126: (1, None)}
_CONV_2D, _DEPTHWISE = 3, 4
_INT8 = {3, 9}  # TensorType UINT8, INT8


@dataclass(frozen=True)
class LiteRTParts:
    """Bytes of each part of a LiteRT model's footprint (see the module doc)."""

    model: int  # the file's bytes and the slot values after them
    tables: int  # the tensor table's Python objects
    packed: int  # XNNPACK's packed weights, one XNNPACK interpreter's copy
    peak: int  # the largest sum of activation tensors alive at once, at the file's batch (XNNPACK's interpreter)
    peak_builtin: int  # the same with the built-in CONV_2D's im2col buffer alive during its op
    xnnpack: bool = True  # False: providers=["CPU"], where hybrid runs as builtin

    def mb(self, strategy: str) -> float:
        """Predicted resident MB under ``strategy`` (as it runs: ``hybrid`` without XNNPACK is ``builtin``)."""
        if strategy not in STRATEGIES:
            raise ConfigError(f"unknown tflite strategy {strategy!r}; allowed: {', '.join(STRATEGIES)}")
        if strategy == "hybrid" and not self.xnnpack:
            strategy = "builtin"
        peaks = {"hybrid": (self.peak, self.peak_builtin), "rebuild": (self.peak,), "builtin": (self.peak_builtin,)}
        arenas = sum(p * ARENA_FACTOR / _MB + INTERPRETER_MB for p in peaks[strategy])
        return (self.model + self.tables) / _MB + (0 if strategy == "builtin" else self.packed / _MB) + arenas


def litert_parts(fb: TfliteModel, model_bytes: int, xnnpack: bool = True) -> LiteRTParts:
    """The parts of ``fb``'s footprint (``model_bytes``: what the backend holds, file and slots; ``xnnpack``
    False: ``providers=["CPU"]``, every interpreter built-in, so nothing packed)."""
    scales = sum(len(t.scale) for t in fb.tensors)
    tables = TABLE_BYTES * len(fb.tensors) + SCALE_BYTES * scales
    builtin = _peak(fb, im2col=True)
    if not xnnpack:
        return LiteRTParts(model_bytes, tables, 0, builtin, builtin, xnnpack=False)
    return LiteRTParts(model_bytes, tables, _packed(fb), _peak(fb, im2col=False), builtin)


def predict_mb(fb: TfliteModel, model_bytes: int, strategy: str) -> float:
    """Predicted resident MB of the model ``fb`` on LiteRT under ``strategy`` (see the module doc)."""
    return litert_parts(fb, model_bytes).mb(strategy)


def file_mb(model, strategy: str, xnnpack: bool = True) -> float:
    """Predicted resident MB of a ``.tflite`` file (path or bytes) under ``strategy`` before it is loaded (the
    backend's own figure): the bytes the backend will hold counted as :func:`runtimes.litert_arena.load_arena`
    lays them out (the file, padded, then each slot). A path's tensor table is read from the mapped file, its
    weights never (:mod:`runtimes.litert_header`)."""
    from edge.format.tflite import read_tflite, tflite_info
    from runtimes.litert_header import mapped

    if isinstance(model, (bytes, bytearray)):
        fb = read_tflite(model)
        return litert_parts(fb, held_bytes(len(model), tflite_info(model, fb)), xnnpack).mb(strategy)
    with mapped(model) as data:
        fb = read_tflite(data)
        return litert_parts(fb, held_bytes(len(data), tflite_info(data, fb)), xnnpack).mb(strategy)


def held_bytes(nbytes: int, info) -> int:
    """The bytes the backend holds for a file of ``nbytes`` whose :class:`~edge.format.modelinfo.ModelInfo` is
    ``info``, laid out as :func:`runtimes.litert_arena.load_arena` does: the file, padded, then each slot's float32
    values, padded; known before the file is copied."""
    from runtimes.litert_arena import ALIGN

    slots = [t for t in info.tensors.values() if t.slot]
    return -(-nbytes // ALIGN) * ALIGN + sum(-(-4 * math.prod(t.shape) // ALIGN) * ALIGN for t in slots)


def _nbytes(t) -> int:
    """A tensor's bytes at the file's shape (a dynamic axis counted as 1, as LiteRT allocates it)."""
    item = np.dtype(t.dtype).itemsize if t.dtype is not None else 1
    return math.prod(max(d, 1) for d in t.shape) * item


def _packed(fb: TfliteModel) -> int:
    """Bytes XNNPACK's packed copy takes: each constant filter it takes, once per op that reads it (each op packs
    its own), with its bias (4 bytes an output channel, zeros when the op has none) and, for an int8 filter, a
    4-byte scale and a 4-byte row sum an output channel."""
    tensors, total = fb.tensors, 0
    for op in fb.ops:
        where = _PACKED.get(op.code)
        if where is None or len(op.inputs) <= where[0] or op.inputs[where[0]] < 0:
            continue
        w = tensors[op.inputs[where[0]]]
        if not w.nbytes or not w.shape:
            continue
        if op.code == _DEPTHWISE and w.type in _INT8 and not _activation_int8(fb, op):
            continue  # dynamic-range depthwise: XNNPACK leaves it to the built-in kernels
        out = max(w.shape[-1] if op.code in (_DEPTHWISE, 126) else w.shape[0], 1)
        total += w.nbytes + 4 * out + (8 * out if w.type in _INT8 else 0)
    return total


def _activation_int8(fb: TfliteModel, op) -> bool:
    """The op's first input is integer (a full-integer model), not float (a dynamic-range one)."""
    x = op.inputs[0] if op.inputs else -1
    return x >= 0 and fb.tensors[x].type in _INT8


def _peak(fb: TfliteModel, im2col: bool) -> int:
    """The largest sum of activation tensors alive at once, running the operators in file order (``im2col``: with
    the built-in ``CONV_2D``'s im2col buffer, output pixels x filter taps x input channels, during its op)."""
    tensors = fb.tensors
    act = {t.index for t in tensors if not t.nbytes}
    last = {}
    for k, op in enumerate(fb.ops):
        for i in op.inputs:
            if i in act:
                last[i] = k
    keep = set(fb.outputs)
    live = {i: _nbytes(tensors[i]) for i in fb.inputs if i in act}
    now = peak = sum(live.values())
    for k, op in enumerate(fb.ops):
        for i in op.outputs:
            if i in act and i not in live:
                live[i] = _nbytes(tensors[i])
                now += live[i]
        peak = max(peak, now + (_im2col(tensors, op) if im2col else 0))
        for i in [i for i in live if i not in keep and last.get(i, -1) <= k]:
            now -= live.pop(i)
    return peak


def _im2col(tensors, op) -> int:
    """Bytes of a built-in ``CONV_2D``'s im2col buffer (0 for a 1x1 filter, which needs none, or another op)."""
    if op.code != _CONV_2D or len(op.inputs) < 2 or not op.outputs or min(op.inputs[:2]) < 0 or op.outputs[0] < 0:
        return 0
    x, w, y = tensors[op.inputs[0]], tensors[op.inputs[1]], tensors[op.outputs[0]]
    if len(w.shape) != 4 or len(y.shape) != 4 or w.shape[1] * w.shape[2] == 1:
        return 0
    item = 1 if w.type in _INT8 else (np.dtype(x.dtype).itemsize if x.dtype is not None else 4)
    return math.prod(max(d, 1) for d in (*y.shape[:3], *w.shape[1:])) * item
