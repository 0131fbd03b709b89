"""An ONNX file read once, at the protobuf wire level, for a backend that keeps its weights in an arena.

:func:`parse_graph` walks the file's fields without decoding the tensors: it returns the model
without its graph's initializers (a few hundred KB, parsed by onnx) and where each initializer's
bytes are. :func:`take_writable` then copies the writable tensors from the file straight into one
arena per element type (float32; int8/uint8 for quantized weights). So a model is never held as a
parsed protobuf with its weights, nor serialised again. Field numbers are those of onnx.proto
(ModelProto.graph 7, GraphProto.initializer 5, TensorProto dims 1, data_type 2, name 8, raw_data 9,
data_location 14).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from math import prod

import numpy as np

from edge.errors import FormatError
from edge.format.modelinfo import ModelInfo, fingerprint
from edge.format.onnx_dtypes import refuse_unstored
from edge.format.onnx_graph import quantized_ops
from edge.format.onnx_proto import elem_type, load_model, pb2, to_array, value_info
from runtimes.lines import aligned_offsets, arena_group
from runtimes.onnx_quant import check_quant_readers

__all__ = [
    "ONNX_DTYPES",
    "add_inputs",
    "external_stub",
    "folded_reads",
    "quant_constants",
    "readers",
    "Stored",
    "strip_node_metadata",
    "graph_bytes",
    "parse_graph",
    "parse_graph_bytes",
    "take_writable",
    "tensor_proto",
    "verify_fingerprint",
    "writable_dtypes",
]


@dataclass(frozen=True)
class Stored:
    """Where one initializer is in the file: its TensorProto message, and its raw_data if the values are there."""

    span: tuple[int, int]
    dims: tuple[int, ...]
    dtype: int
    raw: tuple[int, int] | None
    external: bool
    values: int = 0  # how many float_data / int32_data values it stores (where there is no raw_data)


def graph_bytes(buf) -> bytes:
    """The model without its graph's initializers, serialised: enough to read its graph, inputs and metadata."""
    try:
        return _split(buf)[0]
    except (ValueError, IndexError, UnicodeDecodeError) as e:
        raise FormatError(f"not a readable ONNX model: {e}") from e


def parse_graph(buf):
    """The model without its graph's initializers (parsed by onnx; small), and where each initializer is."""
    return parse_graph_bytes(buf)[:2]


def parse_graph_bytes(buf):
    """:func:`parse_graph`'s two results and the serialised model without initializers (:func:`graph_bytes`)."""
    try:
        small, inits = _split(buf)
    except (ValueError, IndexError, UnicodeDecodeError) as e:
        raise FormatError(f"not a readable ONNX model: {e}") from e
    return load_model(small), inits, small


def _split(buf) -> tuple[bytes, dict[str, Stored]]:
    from runtimes.loading import page_releaser

    release = page_releaser(buf)  # over a file's map: the pages walked past are given back as the walk goes
    parts: list[bytes] = []
    inits: dict[str, Stored] = {}
    graphs = 0
    for num, wt, at, a, b in _fields(buf, 0, len(buf)):
        if num == 7 and wt == 2:  # ModelProto.graph
            graphs += 1
            kept = []
            for gnum, gwt, gat, ga, gb in _fields(buf, a, b):
                if gnum == 5 and gwt == 2:  # GraphProto.initializer
                    name, stored = _tensor(buf, ga, gb)
                    inits[name] = stored
                    release(gb)
                else:
                    kept.append(bytes(buf[gat:gb]))
            body = b"".join(kept)
            parts.append(varint_bytes(7 << 3 | 2) + varint_bytes(len(body)) + body)
        else:
            parts.append(bytes(buf[at:b]))
    release(len(buf))
    if graphs != 1:
        raise ValueError(f"expected one graph, found {graphs}")
    return b"".join(parts), inits


def _tensor(buf, start: int, end: int) -> tuple[str, Stored]:
    """TensorProto fields: dims 1, data_type 2, float_data 4, int32_data 5, name 8, raw_data 9, data_location 14."""
    name, dims, dtype, raw, external, values = "", [], 0, None, False, 0
    for num, wt, _, a, b in _fields(buf, start, end):
        if num == 1 and wt == 0:
            dims.append(_varint(buf, a)[0])
        elif num == 1 and wt == 2:  # packed
            while a < b:
                d, a = _varint(buf, a)
                dims.append(d)
        elif num == 2 and wt == 0:
            dtype = _varint(buf, a)[0]
        elif num == 8 and wt == 2:
            name = bytes(buf[a:b]).decode()
        elif num == 9 and wt == 2:
            raw = (a, b)
        elif num == 14 and wt == 0:
            external = _varint(buf, a)[0] == 1
        elif num in (4, 5):  # float_data (fixed 4 bytes), int32_data (varints): packed or one field a value
            values += _count(buf, a, b) if wt == 2 and num == 5 else (b - a) // 4 if wt == 2 else 1
    return name, Stored((start, end), tuple(dims), dtype, raw, external, values)


def _count(buf, a: int, b: int) -> int:
    """The varints in ``buf[a:b]``: the bytes that end one (high bit clear)."""
    import numpy as np

    return int(np.count_nonzero(np.frombuffer(buf, np.uint8, b - a, a) < 0x80))


def _fields(buf, start: int, end: int):
    """Each field of the message ``buf[start:end]``: (number, wire type, field start, value start, value end)."""
    i = start
    while i < end:
        at = i
        key, i = _varint(buf, i)
        wt = key & 7
        if wt == 0:
            j = _varint(buf, i)[1]
        elif wt == 2:
            n, i = _varint(buf, i)
            j = i + n
        elif wt in (1, 5):
            j = i + (8 if wt == 1 else 4)
        else:
            raise ValueError(f"unsupported protobuf wire type {wt} at byte {at}")
        if j > end:
            raise ValueError(f"truncated field at byte {at}")
        yield key >> 3, wt, at, i, j
        i = j


def _varint(buf, i: int) -> tuple[int, int]:
    x = shift = 0
    while True:
        b = buf[i]
        x |= (b & 0x7F) << shift
        i += 1
        if b < 0x80:
            return x, i
        shift += 7


def varint_bytes(x: int) -> bytes:
    out = bytearray()
    while x > 0x7F:
        out.append(x & 0x7F | 0x80)
        x >>= 7
    out.append(x)
    return bytes(out)


def tensor_proto(buf, stored: Stored):
    return pb2().TensorProto.FromString(bytes(buf[stored.span[0] : stored.span[1]]))


#: ONNX data types a writable tensor may have (TensorProto FLOAT, UINT8, INT8): float weights, quantized ones
ONNX_DTYPES = {1: np.dtype(np.float32), 2: np.dtype(np.uint8), 3: np.dtype(np.int8)}


def writable_dtypes(
    inits: Mapping[str, Stored], writable: Sequence[str], dtypes: Mapping[str, str] | None = None
) -> dict[str, np.dtype]:
    """Each writable initializer's element type, once the file's own records of them are checked, before anything
    is allocated or read: every one is there, of the type ``dtypes`` names (``"int8"`` for a quantized target;
    float32 otherwise), in the file itself, with the bytes its dims say (at least one a value where onnx stores
    them as ``float_data``/``int32_data``). So a prediction from their dims (:mod:`runtimes.ort_footprint`)
    counts what :func:`take_writable` will copy, and a file whose dims lie is refused as one."""
    missing = [w for w in writable if w not in inits]
    if missing:
        # onnxruntime's names: NAME_quantized (quantize_dynamic/static), NAME_Q4 or NAME_DQ_Q4 (4-bit MatMulNBits)
        later = any(
            re.search(r"_(quantized|Q\d+)$", k) and k.startswith(tuple(m + "_" for m in missing)) for k in inits
        )
        hint = (
            "; they were quantized after export by another tool (stored as NAME_quantized, or NAME_Q4 by the 4-bit "
            "MatMulNBits quantizer), which records no grids for adapters: quantize the float model with `edge "
            "quantize` (exporters.quantize_onnx; int8) instead"
        )
        raise FormatError(f"model has no initializer(s) {missing[:5]} named in its metadata{hint if later else ''}")
    want = {k: np.dtype((dtypes or {}).get(k, "float32")) for k in writable}
    bad = {k: inits[k].dtype for k in writable if ONNX_DTYPES.get(inits[k].dtype) != want[k]}
    if bad:
        raise FormatError(
            f"writable tensors must be float32 (ONNX data_type 1), or int8/uint8 (3/2) where the metadata says they "
            f"are quantized; got data types {bad}"
        )
    external = sorted(k for k, t in inits.items() if t.external)  # a location would resolve outside our control
    if external:
        raise FormatError(
            f"initializer(s) {external[:5]} are in external data files, which this runtime does not read (a relative "
            "location would resolve against the working directory); save the model as one file: "
            "onnx.save(model, path, save_as_external_data=False)"
        )
    for name in writable:
        t = inits[name]
        n = prod(t.dims)
        if t.raw is not None and t.raw[1] - t.raw[0] != want[name].itemsize * n:
            raise FormatError(f"initializer {name!r}: {t.raw[1] - t.raw[0]} bytes of data for shape {t.dims}")
        if t.raw is None and t.span[1] - t.span[0] < n:  # float_data / int32_data: a byte a value at least
            raise FormatError(f"initializer {name!r}: {t.span[1] - t.span[0]} bytes for {n} values (shape {t.dims})")
        if t.raw is None and t.values != n:  # counted from the file's fields: nothing decoded or allocated
            raise FormatError(
                f"initializer {name!r}: its stored values do not fill its shape {list(t.dims)} ({t.values} values "
                f"for {n}); the file is damaged or was written wrongly: export or save the model again"
            )
    return want


def take_writable(
    buf, inits: Mapping[str, Stored], writable: Sequence[str], read, dtypes: Mapping[str, str] | None = None
):
    """Copy the writable initializers from the file into one arena per element type, all carved from one buffer
    (:func:`runtimes.lines.arena_group`); return the arenas (dtype -> flat array), each tensor's offset in its
    arena, and a view per tensor.

    ``dtypes`` names the element type each tensor must have (``"int8"`` for a quantized target);
    every other writable tensor must be float32 (checked first: :func:`writable_dtypes`).
    """
    want = writable_dtypes(inits, writable, dtypes)
    offset, live, totals = {}, {}, {}
    for dt in set(want.values()):  # every tensor on a cache line, the arena too: a structured mask's blocks are lines
        names = [k for k in writable if want[k] == dt]
        starts, totals[dt] = aligned_offsets([prod(inits[k].dims) for k in names], dt.itemsize)
        offset.update(zip(names, starts))
    arenas = arena_group(totals)  # one buffer: a switch's few float entries of an int8 model share its int8 call
    for name in writable:
        t, dt = inits[name], want[name]
        n = prod(t.dims)
        view = arenas[dt][offset[name] : offset[name] + n]
        if t.raw is not None:
            read(memoryview(view).cast("B"), t.raw[0])
            if sys.byteorder == "big" and dt.itemsize > 1:  # ONNX stores little-endian
                view.byteswap(inplace=True)
        else:  # float_data / int32_data: rare, let onnx decode it (its count checked: a short list is no shape)
            try:
                values = to_array(tensor_proto(buf, t)).reshape(-1)
            except (ValueError, TypeError) as e:
                raise FormatError(
                    f"initializer {name!r}: its stored values do not fill its shape {list(t.dims)} ({e}); the file "
                    "is damaged or was written wrongly: export or save the model again"
                ) from e
            view[:] = values
        live[name] = view.reshape(t.dims)
    return arenas, offset, live


def verify_fingerprint(
    proto, info: ModelInfo, live: Mapping[str, np.ndarray], decoded: Mapping[str, np.ndarray] | None = None
) -> None:
    """Check the weights (``live`` arena views, the graph's other initializers) against ``info.fingerprint``.
    ``decoded``: graph initializers already decoded from these very protos (:func:`quant_constants`' scales and zero
    points), hashed as they are rather than decoded again (an int8 MiniLM's 78 of its 141)."""
    refuse_unstored(((f"initializer {t.name[:80]!r}", t) for t in proto.graph.initializer), f"model {info.name!r}")
    heads = {t.initializer for t in info.tensors.values() if t.head}  # runtime-owned (edge.route.taps): not weights
    tensors = {k: v for k, v in live.items() if k not in heads}
    decoded = decoded or {}
    for t in proto.graph.initializer:
        if t.name not in tensors and t.name not in heads:
            tensors[t.name] = decoded[t.name] if t.name in decoded else to_array(t)
    got = fingerprint(tensors)
    if got != info.fingerprint:
        raise FormatError(
            f"model {info.name!r}: weights fingerprint {got} differs from the exported {info.fingerprint}; "
            f"the file was modified after export ({_modified_how(proto, info)})"
        )


def _modified_how(proto, info: ModelInfo) -> str:
    """What to do about a file whose weights changed: a quantizer or onnxruntime's optimizer re-saving it is named."""
    quantized = quantized_ops(proto.graph)
    if quantized and not any(t.quant is not None for t in info.tensors.values()):
        return (
            f"its graph has {', '.join(quantized)}: it was quantized after export by another tool, which records no "
            "grids for adapters; quantize the float model with `edge quantize` (exporters.quantize_onnx) instead"
        )
    if quantized:
        return (
            "if onnxruntime saved it (SessionOptions.optimized_model_filepath) or another quantizer ran on it, load "
            "the file `edge quantize` wrote: the runtime lets onnxruntime optimize it in memory; else re-quantize"
        )
    return "re-export it"


def strip_node_metadata(proto) -> None:
    """Drop what an exporter writes on each node for debugging (``metadata_props``: torch's stack traces, module
    scopes; ``doc_string``), control flow bodies too: onnxruntime keeps it in every session (digits ViT int8: 102 KB
    of its 142 KB graph, 0.14 MB per session; issue 18). The model's own metadata (its ModelInfo) stays. 0.13 ms for
    that graph's 189 nodes (ClearField; walking every node's attributes for subgraphs tripled it)."""
    proto.ClearField("doc_string")  # the model's and each graph's too: a converter's may be megabytes (issue B18)
    graphs = [proto.graph]
    while graphs:
        graphs[-1].ClearField("doc_string")
        for node in graphs.pop().node:
            node.ClearField("metadata_props")
            node.ClearField("doc_string")
            if node.op_type in _CONTROL_FLOW:
                graphs.extend(a.g for a in node.attribute if a.HasField("g"))


_CONTROL_FLOW = {"If", "Loop", "Scan", "SequenceMap"}  # the standard operators with graph attributes


def add_inputs(proto, names: Sequence[str], live: Mapping[str, np.ndarray]) -> None:
    """Declare ``names`` as graph inputs of their stored shape and element type."""
    proto.graph.input.extend(value_info(k, elem_type(live[k].dtype), list(live[k].shape)) for k in names)


def quant_constants(proto, info: ModelInfo) -> dict[str, np.ndarray]:
    """The scale and zero-point initializers the metadata names, read-only, checked to exist and be finite."""
    wanted = {n for t in info.tensors.values() if t.quant is not None for n in (t.quant.scale, t.quant.zero_point)}
    found = {t.name: to_array(t) for t in proto.graph.initializer if t.name in wanted}
    missing = sorted(wanted - set(found))
    if missing:
        raise FormatError(f"model {info.name!r} names quantization constants it does not have: {missing[:5]}")
    for v in found.values():
        v.flags.writeable = False
    for name, t in info.tensors.items():
        q = t.quant
        if q is None:
            continue
        scale, zp = found[q.scale], found[q.zero_point]
        n = 1 if q.axis is None else t.shape[q.axis]
        if scale.dtype != np.float32 or scale.size != n or not (np.isfinite(scale).all() and (scale > 0).all()):
            raise FormatError(f"{name}: scale {q.scale!r} is not {n} positive finite float32 value(s)")
        if zp.dtype != np.dtype(q.dtype) or zp.size != n:
            raise FormatError(f"{name}: zero point {q.zero_point!r} is not {n} {q.dtype} value(s), got {zp.dtype}")
    check_quant_readers(proto, info)  # the graph applies those very constants to the integers, unblocked
    return found


def external_stub(name: str, arr: np.ndarray, location: str):
    """An initializer with no data: onnxruntime takes its values from ``add_external_initializers``."""
    proto = pb2().TensorProto
    t = proto(name=name, data_type=elem_type(arr.dtype), dims=list(arr.shape))
    t.data_location = proto.EXTERNAL
    entry = t.external_data.add()
    entry.key, entry.value = "location", location
    return t


def readers(proto, names: set[str]) -> dict[str, set[tuple[str, int]]]:
    """For each of ``names``, the (op type, input index) of every node of the graph reading it."""
    out: dict[str, set[tuple[str, int]]] = {k: set() for k in names}
    for n in proto.graph.node:
        for i, k in enumerate(n.input):
            if k in out:
                out[k].add((n.op_type, i))
    return out


def folded_reads(proto, weights: set[str]) -> set[str]:
    """The ``weights`` read by a node whose inputs are all constants (initializers, ``Constant`` outputs and what
    only they compute): onnxruntime's constant folding computes such a node while it builds the session, reading
    the weight's data from the graph, so a weight handed over in place (its graph entry a data-less stub) would be
    read from the stub file (e.g. Swin v2's continuous position bias MLP over a constant coordinate table)."""
    const = {t.name for t in proto.graph.initializer} | set(weights)
    out: set[str] = set()
    for n in proto.graph.node:
        if all(i in const for i in n.input if i):
            const.update(n.output)
            out.update(i for i in n.input if i in weights)
    return out
