"""Sparse tensors of an imported ONNX file stored dense, within what this process can allocate.

:func:`densify_sparse` stores ``sparse_initializer`` weights and ``Constant`` nodes' ``sparse_value`` dense, so they
are in the fingerprint (it hashes the graph's initializers) and can be targets. A sparse tensor is a few bytes that may
declare gigabytes (a 475-byte file declared 512 MB), so before anything is allocated the dense sizes, from the
tensors' headers, are summed and checked against three bounds: protobuf's 2 GB on the one file edge writes; the
caller's cap ``max_dense_mb`` (``edge import-onnx --max-dense-mb``, default :data:`DEFAULT_MAX_DENSE_MB`); and
:data:`PEAK_FACTOR` times the total against the memory this process can still use (:func:`edge.memory_room`:
``MemAvailable``, or the cgroup's limit when tighter), so a device or a container is not OOM-killed.

Each tensor is written straight into the graph's own TensorProto (no dense numpy array kept, no TensorProto copied
into the graph). Measured (VmHWM of ``edge import-onnx`` in a child process, sparse tensors of 512 MB and 1 GB dense
from files of 475-790 bytes): 4.0x the dense size before, 3.0x after, with the import's fingerprint arrays no longer
kept alive by a reference cycle (:func:`edge.convert.onnx_source.control_flow_weights`) and If nodes no longer
copied by :func:`edge.format.onnx_graph.keep_only`; what is left is the model itself, the import's arrays of its
weights, and protobuf's serialization of the file (its buffer and the bytes written). Since C21 a main-graph sparse
initializer is held dense once, out of the message, and written streamed (:mod:`edge.convert.onnx_weights`): peak
beyond what was read (measured, 128 MB dense of 50% non-zeros: +335 MB, its 192 MB of values and indices copied as
read; 512 MB declared by a 475-byte file: +0.1 MB, its zero pages never touched), checked at 1.1x the dense bytes plus
1.6x the stored ones; a Constant's or a body's stays in the message (+604 MB for 128 MB at 50%: the dense array, its
bytes and protobuf's copy, 3x; 512 MB declared: 2.0x), checked at 3.1x.
"""

from __future__ import annotations

import logging
from math import prod
from numbers import Real

import numpy as np

from edge.convert.onnx_source import PROTOBUF_LIMIT
from edge.convert.onnx_weights import hold
from edge.errors import ConfigError, FormatError
from edge.format.onnx_dtypes import STORED, type_name
from edge.format.onnx_graph import graphs as all_graphs

__all__ = ["DEFAULT_MAX_DENSE_MB", "PEAK_FACTOR", "PEAK_HELD", "check_cap", "check_sparse", "densify_sparse"]

log = logging.getLogger("edge.convert.onnx_import")

#: the default cap on all sparse tensors of a file stored dense: protobuf's limit on the file written, so no model
#: that can be imported at all hits it; pass less on a small device
DEFAULT_MAX_DENSE_MB = 2048.0
#: resident memory an import takes beyond what it has read, per byte: of a sparse tensor stored dense in the message
#: (a Constant's, an If/Loop/Scan body's: its bytes, protobuf's copy and, as it is written, its raw_data read out),
#: of one the main graph holds as an initializer (dense once, out of the message: :mod:`edge.convert.onnx_weights`),
#: of the sparse tensors' own values and indices (copied as they are read; counted by their size in memory, 8 bytes
#: an int64 stored as a 1-byte varint: S21) and of the rest of the model. Measured in
#: module doc; 3.1 for every byte densified before (the whole message copied by its serialization)
PEAK_FACTOR, PEAK_HELD, PEAK_STORED, PEAK_REST = 3.1, 1.1, 1.6, 0.2
#: the cap :func:`check_cap` takes is under this many MB
MAX_CAP_MB = 2**40
#: the largest dimension a sparse tensor may declare (no real weight has a longer axis)
_MAX_DIM = 2**31 - 1
_HINT = "(a sparse tensor declaring dims it does not hold is a broken or hostile file)"


def densify_sparse(
    proto, name: str, *, max_dense_mb: float = DEFAULT_MAX_DENSE_MB, room=None, outside=None
) -> list[str]:
    """Store the ``sparse_initializer`` tensors of the graph and its If/Loop/Scan bodies as dense initializers, and
    ``Constant`` nodes' ``sparse_value`` (bodies too: onnxruntime densifies them at load) as ``value``; return the main
    graph's initializers made dense. Every tensor's dims, data type and indices are checked, and their dense sizes
    summed against protobuf's limit, ``max_dense_mb`` and the memory left (module doc) before anything is allocated.
    ``room``: ``(bytes, where)`` to check against instead of :func:`edge.memory_room.memory_room`'s (tests).
    ``outside``: the main graph's large weights held out of the message (:mod:`edge.convert.onnx_weights`), where
    the main graph's dense ones go too."""
    from onnx import AttributeProto

    found = check_sparse(proto, name, max_dense_mb=max_dense_mb, room=room, outside=outside)
    if not found:
        return []
    graphs = all_graphs(proto.graph)
    made: list[str] = []
    taken = {t.name: "a sparse initializer and a dense one" for g in graphs for t in g.initializer}
    for g, sp, node in found:
        if node is not None:
            out = node.output[0] if node.output else sp.values.name
            old = len(node.attribute)
            _fill(node.attribute.add(name="value", type=AttributeProto.TENSOR).t, sp, out, name)
            for i in reversed(range(old)):  # then the sparse one (a Constant has one attribute)
                del node.attribute[i]
            continue
        if sp.values.name in taken:
            raise FormatError(
                f"ONNX model {name!r}: {sp.values.name[:80]!r} names {taken[sp.values.name]} (each tensor of a "
                "model needs a name of its own, and onnxruntime refuses a name defined twice); rename one of them "
                "in the exporting code, or export the model again"
            )
        taken[sp.values.name] = "two sparse initializers"
        main = outside if g is proto.graph else None
        _fill(g.initializer.add(), sp, sp.values.name, name, main)  # written in place: never copied into the graph
        made += [sp.values.name] if g is proto.graph else []
    for g in graphs:
        g.ClearField("sparse_initializer")
    if made:
        log.info("%s: %d sparse initializer(s) stored dense: %s", name, len(made), made[:5])
    return made


def check_sparse(proto, name: str, *, max_dense_mb: float = DEFAULT_MAX_DENSE_MB, room=None, outside=None) -> list:
    """Check the sparse tensors :func:`densify_sparse` would store dense (local functions' too, not yet inlined),
    nothing allocated: each one's header, and their total against the bounds (module doc). Return ``(graph, sparse
    tensor, Constant node or None)`` for the main graph and its bodies. Called first, before anything (onnxruntime
    too: an old opset's check loads the file) could densify them. ``outside``: the model's weights held out of the
    message (:mod:`edge.convert.onnx_weights`), counted with the rest of the model."""
    max_dense_mb = check_cap(max_dense_mb)
    found = _sparse(all_graphs(proto.graph), ())
    held = [
        g for f in proto.functions for n in f.node for a in n.attribute for g in (a.graphs or [a.g] * a.HasField("g"))
    ]
    every = found + _sparse([sub for g in held for sub in all_graphs(g)], proto.functions)
    if every:
        sizes = [_dense_bytes(sp, name) for _, sp, _ in every]  # each checked; nothing allocated yet
        _check_bounds(proto, every, sizes, name, max_dense_mb, room, outside)
    return found


def check_cap(value, flag: str = "max_dense_mb") -> float:
    """``value`` as a float when it is a cap :func:`check_sparse` takes (numpy's numbers too), else a ConfigError
    naming ``flag`` (``--max-dense-mb`` on the command line) and the range."""
    ok = isinstance(value, Real) and not isinstance(value, (bool, np.bool_))
    if not ok or not 0 < float(value) < MAX_CAP_MB:  # (NaN and inf fail the range)
        raise ConfigError(
            f"{flag} must be a number of MB greater than 0 and less than {MAX_CAP_MB:,}, got {value!r}; e.g. 512 (the "
            f"default, {DEFAULT_MAX_DENSE_MB:g}, is protobuf's limit on the file written: a larger cap changes nothing)"
        )
    return float(value)


def _sparse(graphs, functions) -> list:
    """``(graph or function, sparse tensor, Constant node or None)`` of ``graphs`` and ``functions``' own nodes."""
    found = [(g, sp, None) for g in graphs for sp in g.sparse_initializer]
    return found + [
        (g, a.sparse_tensor, n)
        for g in (*graphs, *functions)
        for n in g.node
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx")
        for a in n.attribute
        if a.name == "sparse_value"
    ]


def _check_bounds(proto, found, sizes, name: str, max_dense_mb: float, room, outside=None) -> None:
    """Refuse, naming the largest tensor, a total dense size over protobuf's limit, the cap, or the memory left."""
    total = sum(sizes)
    big = max(range(len(found)), key=sizes.__getitem__)
    sp = found[big][1]
    what = (
        f"ONNX model {name!r}: sparse tensor {sp.values.name[:80]!r} of dims {list(sp.dims)[:8]} is {sizes[big]:,} "
        f"bytes stored dense ({len(found)} sparse tensor(s): {total:,} bytes dense"
    )
    from edge.convert.onnx_weights import will_hold
    from edge.convert.onnx_write import message_size

    wire = sum(message_size(s) for _, s, _ in found)  # (no ByteSize: upb serializes a message to count it)
    rest = message_size(proto, outside) - wire
    stored = sum(_in_memory(s.values) + _in_memory(s.indices, 8 * (s.indices.data_type != 7)) for _, s, _ in found)
    if rest + total > PROTOBUF_LIMIT:
        raise FormatError(
            f"{what}, with the model's other {rest:,} bytes), over protobuf's 2 GB limit ({PROTOBUF_LIMIT:,} bytes) on "
            f"the one self-contained file edge imports to; export the model with its weights dense, under that limit "
            f"{_HINT}"
        )
    cap = int(max_dense_mb * (1 << 20))
    if total > cap:
        given = "the default" if max_dense_mb == DEFAULT_MAX_DENSE_MB else "as given"
        raise FormatError(
            f"{what}), over the cap of {cap:,} bytes (max_dense_mb={max_dense_mb:g}, {given}); if the model is meant "
            f"to hold that much, pass a larger cap (edge import-onnx --max-dense-mb MB), else export its weights "
            f"dense {_HINT}"
        )
    if room is None:
        from edge.memory_room import memory_room

        room = memory_room()
    held = sum(
        n for (g, sp, node), n in zip(found, sizes) if node is None and g is proto.graph and will_hold(sp, n, outside)
    )
    need = int(PEAK_HELD * held + PEAK_FACTOR * (total - held) + PEAK_STORED * stored + PEAK_REST * rest)
    if room is not None and need > room[0]:
        raise FormatError(
            f"{what}); importing it takes about {need / total:.1f}x that at peak ({need:,} bytes with the rest of the "
            f"model), over the "
            f"{room[0]:,} bytes this process can still use ({room[1]}); import it where more memory is free (close "
            f"other programs, raise the container's memory limit, or use a larger machine), or export its weights "
            f"dense {_HINT}"
        )


#: bytes an element of a TensorProto's typed field takes in memory (in the message, then in to_array's array)
_WIDTH = {"float_data": 4, "int32_data": 4, "int64_data": 8, "uint64_data": 8, "double_data": 8}


def _in_memory(t, made: int = 0) -> int:
    """The bytes a sparse tensor's values or indices take in memory: the raw_data's, 4 or 8 per element of a typed
    field (not the file's varints: 1 byte for a small int64, 8 in the message and in to_array's copy), plus ``made``
    per element for what they are turned into (int64 indices)."""
    count = sum(len(getattr(t, k)) for k in _WIDTH)
    typed = sum(len(getattr(t, k)) * w for k, w in _WIDTH.items())
    raw = len(t.raw_data)
    if raw and made:
        from onnx import helper

        try:
            count += raw // helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        except (KeyError, TypeError, ValueError):
            count += raw
    return raw + typed + made * count


def _dense_bytes(sp, name: str) -> int:
    """The dense size of one SparseTensorProto, from its header alone (dims, data types): nothing allocated."""
    from onnx import TensorProto, helper

    what = f"ONNX model {name!r}: sparse tensor {sp.values.name[:80]!r}"
    if any(t.data_location == TensorProto.EXTERNAL for t in (sp.values, sp.indices)):
        raise FormatError(
            f"{what} keeps its values in external data, which is not read for sparse tensors; save the model with "
            "its sparse tensors inline (onnx.save(model, path, save_as_external_data=False))"
        )
    integers = (TensorProto.INT64, TensorProto.INT32, TensorProto.INT16, TensorProto.INT8, TensorProto.UINT64)
    if sp.indices.data_type not in (*integers, TensorProto.UINT32, TensorProto.UINT16, TensorProto.UINT8):
        raise FormatError(  # (onnxruntime reads any integer type; each is made int64 here)
            f"{what}: its indices are of ONNX data type {sp.indices.data_type}, not an integer type (ONNX asks for "
            "int64); export the model again"
        )
    kind = sp.values.data_type
    if kind == TensorProto.STRING or (kind not in STORED and kind):  # before any size is computed from an itemsize
        raise FormatError(
            f"{what} has values of ONNX data type {type_name(kind)}: edge stores sparse tensors of numbers only (of "
            "float16/32/64, integers of 8-64 bits, bool or complex: a string's dense size is not in the header, and "
            "the weights' fingerprint cannot hash the others); export the model with this tensor dense"
            + (", in float32" if kind != TensorProto.STRING else "")
        )
    try:
        item = helper.tensor_dtype_to_np_dtype(kind).itemsize
    except (KeyError, TypeError, ValueError):
        raise FormatError(f"{what} has values of unknown ONNX data type {kind}") from None
    dims = [int(d) for d in sp.dims]
    if any(d < 0 or d > _MAX_DIM for d in dims):  # [0, 2**62] is empty, yet no array of that shape can be made
        raise FormatError(
            f"{what} declares dims {dims[:8]}: a negative dimension or one over {_MAX_DIM:,}; export the model again"
        )
    return prod(dims) * item  # Python ints: a hostile shape cannot wrap around


#: ONNX data types whose raw_data is the little-endian bytes of the numpy array to_array gives (others, as int4 or
#: strings, go through numpy_helper.from_array)
_RAW = {1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 16}


def _fill(t, sp, tname: str, name: str, outside=None) -> None:
    """Write one SparseTensorProto (checked by :func:`_dense_bytes`) into the empty TensorProto ``t``, dense (zero but
    at its indices): one dense buffer at a time, handed to protobuf and freed."""
    from onnx import numpy_helper

    what = f"ONNX model {name!r}: sparse tensor {sp.values.name[:80]!r}"
    dims = [int(d) for d in sp.dims]
    try:
        values = numpy_helper.to_array(sp.values).reshape(-1)
        indices = numpy_helper.to_array(sp.indices).astype(np.int64, copy=False)
    except (ValueError, TypeError) as e:
        raise FormatError(f"{what}: its values or indices do not fit their declared shapes ({e})") from e
    n = prod(dims)
    if indices.ndim == 2 and indices.shape == (values.size, len(dims)) and dims:  # [NNZ, rank] coordinates
        if (indices < 0).any() or (indices >= np.array(dims)).any():
            raise FormatError(f"{what}: an index is outside its dims {dims}; export the model again")
        indices = np.ravel_multi_index(tuple(indices.T), dims)
    elif indices.ndim != 1 or indices.size != values.size:
        raise FormatError(
            f"{what}: {values.size} values but indices of shape {list(indices.shape)} (want [{values.size}] or "
            f"[{values.size}, {len(dims)}]); export the model again"
        )
    if indices.size and (indices.min() < 0 or indices.max() >= n):
        raise FormatError(f"{what}: an index is outside its {n} elements (dims {dims}); export the model again")
    dtype = values.dtype.newbyteorder("<") if values.dtype.byteorder == ">" else values.dtype
    dense = np.zeros(n, dtype)  # calloc: only the pages the values land on are touched
    dense[indices] = values
    if sp.values.data_type in _RAW:
        t.name, t.data_type = tname, sp.values.data_type
        t.dims.extend(dims)
        if hold(t, dense, outside):  # the one copy, held out of the message (edge.convert.onnx_weights)
            return
        t.raw_data = dense.tobytes()  # the one full copy (protobuf takes bytes only), freed on return
    else:
        t.CopyFrom(numpy_helper.from_array(dense.reshape(dims), tname))
