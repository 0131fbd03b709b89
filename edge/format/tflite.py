"""Read the parts of a ``.tflite`` flatbuffer the runtime needs, with ``struct`` only.

The device may run the old ``tflite-runtime`` wheel, which ships no schema package,
so this reader walks the flatbuffer directly (format: flatbuffers' binary layout;
field numbers: LiteRT's ``schema.fbs``). It returns where every constant tensor's
bytes live in the file, so the backend can view and overwrite them in place, each
tensor's quantization parameters (scale, zero point, quantized dimension: an int8
model's), the operators of subgraph 0 (builtin code, inputs, and the one option the
backend needs: whether a ``FULLY_CONNECTED`` quantizes its inputs asymmetrically), the
subgraph inputs and outputs, and the ``metadata`` entries (the exporter stores
:class:`~edge.format.modelinfo.ModelInfo` JSON under ``"edge"``). A model's fingerprint
covers its stored tensors and the quantization parameters of the quantized ones
(:func:`fingerprint_arrays`).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

from edge.errors import BackendUnavailableError, FormatError
from edge.format.modelinfo import META_KEY, ModelInfo
from edge.format.tflite_checks import check_indices, check_operator, check_quant

__all__ = [
    "DTYPES",
    "SCALE",
    "ZERO_POINT",
    "TfliteModel",
    "TfliteOp",
    "TfliteTensor",
    "fingerprint_arrays",
    "quant_arrays",
    "read_tflite",
    "stored_arrays",
]

IDENTIFIER = b"TFL3"

#: LiteRT TensorType -> numpy dtype (the types a fingerprint or a weight write can meet)
DTYPES = {
    0: np.float32,
    1: np.float16,
    2: np.int32,
    3: np.uint8,
    4: np.int64,
    6: np.bool_,
    7: np.int16,
    9: np.int8,
    10: np.float64,
    12: np.uint64,
    15: np.uint32,
    16: np.uint16,
}

# field numbers in schema.fbs
_MODEL_OPCODES, _MODEL_SUBGRAPHS, _MODEL_BUFFERS, _MODEL_METADATA = 1, 2, 4, 6
_SUBGRAPH_TENSORS, _SUBGRAPH_INPUTS, _SUBGRAPH_OUTPUTS, _SUBGRAPH_OPERATORS = 0, 1, 2, 3
_TENSOR_SHAPE, _TENSOR_TYPE, _TENSOR_BUFFER, _TENSOR_NAME, _TENSOR_QUANT, _TENSOR_SIGNATURE = 0, 1, 2, 3, 4, 7
_TENSOR_VARIABLE = 5
_QUANT_SCALE, _QUANT_ZERO_POINT, _QUANT_DIMENSION = 2, 3, 6
_OPCODE_DEPRECATED, _OPCODE_BUILTIN = 0, 3
_OP_OPCODE, _OP_INPUTS, _OP_OUTPUTS, _OP_OPTIONS_TYPE, _OP_OPTIONS = 0, 1, 2, 3, 4
_FULLY_CONNECTED_OPTIONS, _FC_ASYMMETRIC = 8, 3  # BuiltinOptions.FullyConnectedOptions, its asymmetric_quantize_inputs
_BUFFER_DATA, _BUFFER_OFFSET, _BUFFER_SIZE = 0, 1, 2
_METADATA_NAME, _METADATA_BUFFER = 0, 1
_SLACK = 4096  # decoding work allowed beyond the file's size (bytes)


@dataclass(frozen=True)
class TfliteTensor:
    """One tensor of a subgraph; ``start``/``nbytes`` locate its constant data in the file (``nbytes`` 0: none)."""

    index: int
    name: str
    type: int
    shape: tuple[int, ...]
    signature: tuple[int, ...]  # shape with -1 for dynamic axes
    buffer: int
    start: int
    nbytes: int
    scale: tuple[float, ...] = ()  # quantization: real = (q - zero_point) * scale, per quantized_dimension if several
    zero_point: tuple[int, ...] = ()
    quantized_dimension: int = 0

    @property
    def dtype(self):
        return DTYPES.get(self.type)


@dataclass(frozen=True)
class TfliteOp:
    """One operator of subgraph 0: its builtin code (``BuiltinOperator``), input and output tensor indices
    (-1: none), and whether it quantizes float inputs asymmetrically
    (``FullyConnectedOptions.asymmetric_quantize_inputs``: the hybrid kernel then caches per-row sums of its
    weights)."""

    code: int
    inputs: tuple[int, ...]
    asymmetric: bool = False
    outputs: tuple[int, ...] = ()


@dataclass(frozen=True)
class TfliteModel:
    subgraphs: tuple[tuple[TfliteTensor, ...], ...]
    inputs: tuple[int, ...]  # tensor indices of subgraph 0
    outputs: tuple[int, ...]
    metadata: dict[str, bytes]
    size: int  # bytes the flatbuffer and its appended buffers occupy
    ops: tuple[TfliteOp, ...] = ()  # operators of subgraph 0

    @property
    def tensors(self) -> tuple[TfliteTensor, ...]:
        return self.subgraphs[0]


class _Reader:
    """Flatbuffer reads bounded by the file: every table's vtable lies inside it (the flatbuffers verifier's
    rule), and the work done (tables visited, elements and string bytes decoded) may not exceed the file's
    size, so offsets that point many entries at one big table or string cannot amplify a small file."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.budget = len(data) + _SLACK

    def spend(self, n: int) -> None:
        self.budget -= n
        if self.budget < 0:
            raise FormatError(
                f"corrupt .tflite file: its offsets make it decode more than its own {len(self.data)} bytes "
                "(several entries point at the same table, vector or string); re-export the model"
            )

    def u32(self, pos: int) -> int:
        return struct.unpack_from("<I", self.data, pos)[0]

    def table(self, pos: int) -> int:
        return pos + self.u32(pos)

    def field(self, table: int, number: int) -> int:
        """Absolute position of a field of ``table``, or 0 when absent."""
        vtable = table - struct.unpack_from("<i", self.data, table)[0]
        vsize = struct.unpack_from("<H", self.data, vtable)[0] if 0 <= vtable <= len(self.data) - 4 else 0
        if vsize < 4 or vsize % 2 or vtable + vsize > len(self.data):
            raise FormatError(f"corrupt .tflite file: the table at byte {table} has no valid vtable (at {vtable})")
        at = 4 + 2 * number
        if at >= vsize:
            return 0
        off = struct.unpack_from("<H", self.data, vtable + at)[0]
        return table + off if off else 0

    def scalar(self, table: int, number: int, fmt: str, default=0):
        pos = self.field(table, number)
        return struct.unpack_from(fmt, self.data, pos)[0] if pos else default

    def vector(self, table: int, number: int) -> tuple[int, int]:
        """(position of the first element, length) of a vector field; (0, 0) when absent."""
        pos = self.field(table, number)
        if not pos:
            return 0, 0
        vec = self.table(pos)
        n = self.u32(vec)
        if vec + 4 + n > len(self.data):  # every element takes at least a byte
            raise FormatError(f"a vector of {n} elements at byte {vec} runs past the end of the file")
        return vec + 4, n

    def tables(self, table: int, number: int) -> list[int]:
        start, n = self.vector(table, number)
        self.spend(8 * n)  # an offset and a table's own offset at least
        return [self.table(start + 4 * i) for i in range(n)]

    def ints(self, table: int, number: int, fmt: str = "i") -> tuple:
        start, n = self.vector(table, number)
        self.spend(n * struct.calcsize(fmt))
        return struct.unpack_from(f"<{n}{fmt}", self.data, start) if n else ()

    def string(self, table: int, number: int) -> str:
        start, n = self.vector(table, number)
        self.spend(n)
        return self.data[start : start + n].decode("utf-8")  # LiteRT's Python API refuses other names too


def read_tflite(data: bytes) -> TfliteModel:
    """Parse ``data`` (a whole ``.tflite`` file). Raises :class:`FormatError` if it is not one."""
    if len(data) < 8 or data[4:8] != IDENTIFIER:
        raise FormatError(f"not a .tflite file (identifier {data[4:8]!r}, expected {IDENTIFIER!r})")
    try:
        return _read(_Reader(data), len(data))
    except (struct.error, IndexError, UnicodeDecodeError) as e:
        raise FormatError(f"corrupt .tflite file: {e}") from e


def _read(r: _Reader, size: int) -> TfliteModel:
    root = r.table(0)
    buffers = []
    end = 0
    for b in r.tables(root, _MODEL_BUFFERS):
        start, n = r.vector(b, _BUFFER_DATA)
        offset = r.scalar(b, _BUFFER_OFFSET, "<Q")
        if offset > 1:  # data appended after the flatbuffer (models over 2 GB)
            start, n = offset, r.scalar(b, _BUFFER_SIZE, "<Q")
        if start + n > size:
            raise FormatError(f"buffer data runs past the end of the file ({start + n} > {size} bytes)")
        buffers.append((start, n))
        end = max(end, start + n)
    subgraphs, ready = [], {-1}  # ready: subgraph 0's tensors an operator may read (constants, variables, inputs)
    graphs = r.tables(root, _MODEL_SUBGRAPHS)
    for sg in graphs:
        tensors = []
        for i, t in enumerate(r.tables(sg, _SUBGRAPH_TENSORS)):
            bidx = r.scalar(t, _TENSOR_BUFFER, "<I")
            if bidx >= len(buffers):
                raise FormatError(f"tensor {i} names buffer {bidx} of {len(buffers)}")
            shape = r.ints(t, _TENSOR_SHAPE)
            start, n = buffers[bidx] if bidx else (0, 0)
            q = r.table(r.field(t, _TENSOR_QUANT)) if r.field(t, _TENSOR_QUANT) else 0
            quant = _quant(r, q, i, shape, r.scalar(t, _TENSOR_TYPE, "<b")) if q else ()
            if not subgraphs and (n or 0 in shape or r.scalar(t, _TENSOR_VARIABLE, "<B")):
                ready.add(i)
            tensors.append(
                TfliteTensor(
                    i, r.string(t, _TENSOR_NAME), r.scalar(t, _TENSOR_TYPE, "<b"), shape,
                    r.ints(t, _TENSOR_SIGNATURE) or shape, bidx, start, n, *quant,
                )
            )  # fmt: skip
        subgraphs.append(tuple(tensors))
    if not subgraphs:
        raise FormatError("the .tflite file has no subgraph")
    sg0, count = graphs[0], len(subgraphs[0])
    inputs, outputs = r.ints(sg0, _SUBGRAPH_INPUTS), r.ints(sg0, _SUBGRAPH_OUTPUTS)
    check_indices("the subgraph's inputs and outputs", inputs + outputs, count, optional=False)
    ready |= set(inputs)
    codes = [
        max(r.scalar(c, _OPCODE_DEPRECATED, "<b"), r.scalar(c, _OPCODE_BUILTIN, "<i"))
        for c in r.tables(root, _MODEL_OPCODES)
    ]
    ops = []
    for op in r.tables(sg0, _SUBGRAPH_OPERATORS):
        k = r.scalar(op, _OP_OPCODE, "<I")
        if k >= len(codes):
            raise FormatError(f"an operator names opcode {k} of {len(codes)}")
        fc = r.scalar(op, _OP_OPTIONS_TYPE, "<B") == _FULLY_CONNECTED_OPTIONS and r.field(op, _OP_OPTIONS)
        asym = bool(r.scalar(r.table(r.field(op, _OP_OPTIONS)), _FC_ASYMMETRIC, "<B")) if fc else False
        reads, writes = r.ints(op, _OP_INPUTS), r.ints(op, _OP_OUTPUTS)
        check_operator(len(ops), codes[k], reads, writes, count, ready)
        ops.append(TfliteOp(codes[k], reads, asym, writes))
    metadata = {}
    for m in r.tables(root, _MODEL_METADATA):
        bidx = r.scalar(m, _METADATA_BUFFER, "<I")
        if bidx < len(buffers):
            start, n = buffers[bidx]
            name = r.string(m, _METADATA_NAME)
            if name in metadata:
                raise FormatError(f"the .tflite metadata entry {name!r} appears twice; entry names must be unique")
            r.spend(n)
            metadata[name] = bytes(r.data[start : start + n])
    if set(outputs) - ready:
        raise FormatError(f"the subgraph's outputs {sorted(set(outputs) - ready)[:5]} are computed by no operator")
    return TfliteModel(tuple(subgraphs), inputs, outputs, metadata, max(end, r.u32(0)), tuple(ops))


def _quant(r: _Reader, q: int, i: int, shape: tuple[int, ...], ttype: int) -> tuple:
    """(scale, zero_point, quantized_dimension) of tensor ``i``, checked."""
    scale, zero = r.ints(q, _QUANT_SCALE, "f"), r.ints(q, _QUANT_ZERO_POINT, "q")
    dim = r.scalar(q, _QUANT_DIMENSION, "<i")
    check_quant(i, ttype, shape, scale, zero, dim)
    return scale, zero, dim


def tflite_info(model: bytes, fb: TfliteModel | None = None) -> ModelInfo:
    """The :class:`ModelInfo` an exporter stored in a ``.tflite`` file's ``metadata`` entry ``"edge"``."""
    fb = fb or read_tflite(model)
    if META_KEY not in fb.metadata:
        raise FormatError(
            f".tflite model has no {META_KEY!r} metadata (it has {sorted(fb.metadata)}): it is not adapter-ready; "
            "for a float32 file converted elsewhere run `edge import-tflite IN --out OUT` (or "
            "edge.convert.tflite_import.import_tflite) and load OUT (or export the torch model with "
            "`exporters.export_tflite`); for an int8 model, import the float one and make its twin with "
            "`edge quantize` (exporters.quantize_tflite): a file quantized elsewhere records no grids for adapters"
        )
    try:
        text = fb.metadata[META_KEY].decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"the .tflite {META_KEY!r} metadata is not UTF-8 JSON: {e}") from e
    info = ModelInfo.from_json(text)
    for what, names, ends in (("input", info.inputs, fb.inputs), ("output", info.outputs, fb.outputs)):
        have = [fb.tensors[i].name for i in ends]
        if set(names) - set(have):
            raise FormatError(
                f"the .tflite {META_KEY!r} metadata names {what}s {sorted(set(names) - set(have))[:5]}, but the "
                f"subgraph's {what}s are {have[:8]}; the file was altered after export (re-export it)"
            )
    return info


def stored_arrays(data: bytes, model: TfliteModel) -> dict[str, np.ndarray]:
    """Every constant tensor of subgraph 0 as a read-only array over ``data``, by tensor name.

    These are the "stored tensors" a :func:`~edge.format.modelinfo.fingerprint` covers. Types
    numpy cannot hold (int4, strings) are given as raw bytes.
    """
    out: dict[str, np.ndarray] = {}
    raw = np.frombuffer(data, np.uint8)
    for t in model.tensors:
        if not t.nbytes:
            continue
        if t.name in out:
            raise FormatError(f"two constant tensors are named {t.name!r}; tensor names must be unique")
        if any(d < 0 for d in t.shape):
            raise FormatError(f"constant tensor {t.name!r} has shape {list(t.shape)}; sizes must not be negative")
        dtype = t.dtype
        chunk = raw[t.start : t.start + t.nbytes]
        if dtype is not None and t.nbytes == math.prod(t.shape) * np.dtype(dtype).itemsize:
            out[t.name] = chunk.view(dtype).reshape(t.shape)
        else:
            out[t.name] = chunk
    return out


def quant_arrays(model: TfliteModel) -> dict[str, np.ndarray]:
    """The quantization parameters of every constant quantized tensor: ``{name@scale: float32 [n],
    name@zero_point: int64 [n]}`` (what a quantized target's :class:`~edge.format.modelinfo.QuantInfo` names)."""
    out: dict[str, np.ndarray] = {}
    for t in model.tensors:
        if t.nbytes and t.scale:
            out[f"{t.name}{SCALE}"] = np.asarray(t.scale, np.float32)
            out[f"{t.name}{ZERO_POINT}"] = np.asarray(t.zero_point, np.int64)
    return out


def fingerprint_arrays(data: bytes, model: TfliteModel) -> dict[str, np.ndarray]:
    """What a ``.tflite`` model's fingerprint covers: the stored tensors and the quantization parameters of the
    quantized ones (a float model has none, so its fingerprint is over the stored tensors alone)."""
    out = stored_arrays(data, model)
    quant = quant_arrays(model)
    clash = sorted(set(out) & set(quant))
    if clash:
        raise FormatError(f"tensor names {clash[:3]} clash with quantization parameter names; rename the tensors")
    out.update(quant)
    return out


#: suffixes naming a quantized tensor's scale and zero point (tensor quantization parameters, not tensors)
SCALE, ZERO_POINT = "@scale", "@zero_point"

#: byte alignment of every buffer this project writes (the runtimes view weights in place)
ALIGN = 16


# -- writing (object API of ai-edge-litert's schema; host and tests) --------------------------------------------


def _schema():
    try:
        from ai_edge_litert import schema_py_generated
    except ImportError as e:
        raise BackendUnavailableError(
            f"editing .tflite files needs ai-edge-litert ({e}): pip install ai-edge-litert"
        ) from e
    return schema_py_generated


def unpack_model(data: bytes):
    """The object-API ``ModelT`` of a ``.tflite`` file."""
    s = _schema()
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise FormatError("not a .tflite flatbuffer (identifier is not TFL3)")
    return s.ModelT.InitFromPackedBuf(bytearray(data), 0)


def pack_model(m) -> bytes:
    """Serialise a ``ModelT`` with every buffer's data 16-byte aligned (the runtime views weights in place)."""
    import flatbuffers

    m.buffers = [aligned_buffer(b.data, b.offset, b.size) for b in m.buffers]
    builder = flatbuffers.Builder(1024 + sum(0 if b.data is None else len(b.data) + ALIGN for b in m.buffers))
    builder.Finish(m.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def set_metadata(m, key: str, value: bytes) -> None:
    """Add or replace the ``metadata`` entry ``key`` (its bytes live in a new buffer)."""
    s = _schema()
    m.buffers.append(aligned_buffer(np.frombuffer(value, np.uint8)))
    entries = [e for e in (m.metadata or []) if tensor_name(e) != key]
    entry = s.MetadataT()
    entry.name, entry.buffer = key.encode(), len(m.buffers) - 1
    m.metadata = [*entries, entry]


def aligned_buffer(data, offset: int = 0, size: int = 0):
    """A ``BufferT`` whose data (uint8) is packed 16-byte aligned (the object API aligns to 1 byte)."""
    s = _schema()

    class _AlignedBuffer(s.BufferT):
        def Pack(self, builder):  # noqa: N802 - the object API's name
            vec = None
            if self.data is not None and len(self.data):
                raw = np.ascontiguousarray(self.data, np.uint8).tobytes()
                builder.StartVector(1, len(raw), ALIGN)
                builder.head -= len(raw)
                builder.Bytes[builder.head : builder.head + len(raw)] = raw
                vec = builder.EndVector()
            s.BufferStart(builder)
            if vec is not None:
                s.BufferAddData(builder, vec)
            s.BufferAddOffset(builder, self.offset)
            s.BufferAddSize(builder, self.size)
            return s.BufferEnd(builder)

    b = _AlignedBuffer()
    b.data, b.offset, b.size = (None if data is None or not len(data) else np.asarray(data, np.uint8)), offset, size
    return b


def tensor_name(obj) -> str:
    """A flatbuffer object's ``name`` as text."""
    n = obj.name
    return n.decode() if isinstance(n, bytes) else str(n or "")
