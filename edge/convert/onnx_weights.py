"""An imported ONNX model's large weights held once, outside its protobuf message, read and written in pieces.

``edge import-onnx`` peaked at 3x the weights (the file's bytes and the message parsed from them; the message, numpy
copies of its weights and the serialized output). :func:`read_model` parses the file record by record (a
ModelProto is the merge of its top-level and graph-level records, so each is parsed on its own, in order, read
with ``pread``): the ``raw_data`` of each large main-graph initializer (``_STRIP_MIN`` bytes and more, a plain
dtype, no other data field) is kept out of the message, once, as the bytes read; external data is read so too
(through onnx's checked reader). :func:`weight_arrays` gives numpy views of them (no copy), and :func:`write_model`
writes the message field by field with those bytes put back in place, so the file written is byte for byte what
``SerializeToString`` gives for the whole message. A file whose top-level or graph records this does not know (an
unknown field or wire type, a tag protobuf refuses, records too small to hold a weight: :class:`_Reader`) is parsed
whole, as before; a large initializer not held (bfloat16, an unknown field) is read once, into the buffer parsed.
:func:`restore` puts the bytes back into the message, for the rare steps that hand the whole model to onnxruntime (an
opset before 7, layouts folded).
"""

from __future__ import annotations

import os
from collections import Counter
from math import prod

import numpy as np

from edge.errors import FormatError
from runtimes.onnx_file import varint_bytes as encode_varint  # the load path's framing: one encoder for both

__all__ = ["hold", "load_external", "outside_bytes", "read_model", "restore", "weight_arrays", "will_hold"]

#: raw_data of at least this many bytes is held outside the message (small tensors stay: shapes, scalars)
_STRIP_MIN = 1 << 16
#: TensorProto data types whose raw_data numpy_helper.to_array reads as is (little-endian)
_PLAIN = {1: "<f4", 2: "u1", 3: "i1", 4: "<u2", 5: "<i2", 6: "<i4", 7: "<i8", 10: "<f2", 11: "<f8"}
_PLAIN.update({12: "<u4", 13: "<u8"})
#: TensorProto fields a tensor held outside may carry: dims, data_type, name, raw_data, doc_string, metadata_props
_TENSOR_FIELDS = {1: (0, 2), 2: (0,), 8: (2,), 9: (2,), 12: (2,), 16: (2,)}
_MODEL_GRAPH, GRAPH_INIT, RAW_DATA = 7, 5, 9
_BATCH = 8 << 20  # records merged per parse call
_WINDOW = 1 << 16  # record headers are read through a window of this many bytes
#: over this many records averaging under this many bytes, a file is parsed whole (a hostile file of 2-byte records
#: took 3.6-4.4 us a record, 30 s for 20 MB, where protobuf takes 0.05 s)
_TINY = (1 << 17, 64)


class WholeMessage(Exception):
    """A record the piecewise reader does not take: the file is parsed whole."""


def read_varint(buf, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise WholeMessage
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def read_key(buf, pos: int, end: int) -> tuple[int, int]:
    """A record's key (tag), as protobuf takes it: at most 5 bytes and 2**32-1, else the file is parsed whole (and
    refused there, as protobuf refuses it)."""
    key, after = read_varint(buf, pos, min(end, pos + 5))
    if key > 0xFFFFFFFF:
        raise WholeMessage
    return key, after


def _wire(fd) -> int:
    return 2 if fd.type in (fd.TYPE_STRING, fd.TYPE_MESSAGE, fd.TYPE_BYTES) else 0


def read_model(src, limit: int, outside: dict, cap: int):
    """The ``ModelProto`` of the regular file ``src`` (at most ``limit`` bytes, else a FormatError) and its size, the
    raw_data of its large initializers put in ``outside`` (name -> bytes) instead."""
    from edge.format.io import open_regular

    fd, st = open_regular(src, what="ONNX model")
    try:
        if st.st_size > limit:
            what = f"ONNX model {os.fspath(src)} is {st.st_size} bytes"
            raise FormatError(f"{what}, over the limit of {limit} bytes for it")
        if st.st_size > cap:
            raise FormatError(
                f"{src} is not a readable ONNX file: {st.st_size:,} bytes, over protobuf's 2 GB limit ({cap:,}) on "
                "one message, which protobuf cannot parse; export the model with its weights as external data"
            )
        try:
            proto = _parse(src, st.st_size, fd, outside)
        except FormatError:
            raise
        except Exception as e:  # protobuf's DecodeError and friends
            raise FormatError(f"{src} is not a readable ONNX file: {e}") from e
        if os.fstat(fd).st_size != st.st_size:
            raise FormatError(f"ONNX model {os.fspath(src)} changed size while being read; try again")
        return proto, st.st_size
    except OSError as e:
        raise FormatError(f"cannot read ONNX model {os.fspath(src)}: {e.strerror or e}") from e
    finally:
        os.close(fd)


def _parse(src, size: int, fd: int, outside: dict):
    import onnx

    proto = onnx.ModelProto()
    try:
        held = _Reader(fd, size, proto, src).run()
    except WholeMessage:
        proto = onnx.ModelProto()
        data = _pread(fd, size, 0, src)
        proto.ParseFromString(data)  # (DecodeError: the caller's FormatError)
        return proto
    names = Counter(t.name for t in proto.graph.initializer) if held else {}
    for idx, view in held:
        t = proto.graph.initializer[idx]
        if names[t.name] > 1:  # a name defined twice (refused later, by name): kept in the message, matched by none
            t.raw_data = bytes(view)
        else:
            outside[t.name] = view
    return proto


def _pread(fd: int, n: int, offset: int, src) -> bytes:
    data = os.pread(fd, n, offset)
    if len(data) != n:
        raise FormatError(f"ONNX model {os.fspath(src)} changed size while being read; try again")
    return data


class _Reader:
    """Record headers are read through a window of :data:`_WINDOW` bytes; runs of consecutive small records go to
    protobuf in one piece (a graph's under one field-7 key); a file of pathologically small records (no large weight
    to hold: :data:`_TINY`) is parsed whole, as before, which is hundreds of times faster than record by record."""

    def __init__(self, fd: int, size: int, proto, src):
        self.fd, self.size, self.proto, self.src = fd, size, proto, src
        self.batch = bytearray()
        self.held: list[tuple[int, memoryview]] = []
        self.inits = self.records = 0
        self.run_at = self.run_end = 0
        self.run_graph = False
        self.win, self.win_at = b"", 0
        self.fields = {f.number: f for f in proto.DESCRIPTOR.fields}
        self.graph_fields = {f.number: f for f in proto.graph.DESCRIPTOR.fields}

    def run(self) -> list[tuple[int, memoryview]]:
        pos = 0
        while pos < self.size:
            number, start, end = self._record(pos, self.size, self.fields)
            if number == _MODEL_GRAPH:
                self._graph(start, end)
            elif end - pos >= _BATCH:
                self._merge(b"", pos, end)
            else:
                self._take(pos, end, False)
            pos = end
        self._flush()
        return self.held

    def _record(self, pos: int, limit: int, fields) -> tuple[int, int, int]:
        """``(field number, payload start, record end)`` of the record at ``pos`` (a known field, its wire type)."""
        self.records += 1
        if self.records > _TINY[0] and pos < _TINY[1] * self.records:
            raise WholeMessage  # pathologically small records: no large weight to hold, protobuf parses it faster
        at = pos - self.win_at
        if at < 0 or at + 20 > len(self.win) and self.win_at + len(self.win) < self.size:
            self.win, self.win_at, at = os.pread(self.fd, min(_WINDOW, self.size - pos), pos), pos, 0
        head_end = min(len(self.win), limit - self.win_at)
        key, i = read_key(self.win, at, head_end)
        number, wire = key >> 3, key & 7
        fd = fields.get(number)
        if fd is None or wire != _wire(fd):
            raise WholeMessage
        value, j = read_varint(self.win, i, head_end)
        end = pos + j - at + value if wire == 2 else pos + j - at
        if end > limit:
            raise WholeMessage
        return number, pos + j - at, end

    def _graph(self, start: int, end: int) -> None:
        pos = start
        while pos < end:
            number, payload, rec_end = self._record(pos, end, self.graph_fields)
            if number == GRAPH_INIT:
                self.inits += 1
            if number == GRAPH_INIT and rec_end - payload >= _STRIP_MIN:
                self._tensor(pos, payload, rec_end)
            elif rec_end - pos >= _BATCH:  # (a sparse tensor, a node holding one)
                self._merge(_graph_key(rec_end - pos), pos, rec_end)
            else:
                self._take(pos, rec_end, True)
            pos = rec_end

    def _tensor(self, pos: int, payload: int, end: int) -> None:
        """A large initializer record, read once into the buffer protobuf parses should it not be held."""
        self._end_run()
        prefix = _graph_key(end - pos)
        buf = self._read_into(prefix, pos, end)
        kept = _split_raw(memoryview(buf).toreadonly(), len(prefix) + payload - pos)
        if kept is None:
            if len(buf) >= _BATCH:
                self._flush()
                self.proto.MergeFromString(buf)
            else:
                self._add(b"", buf)
            return
        head, view = kept
        record = bytes([GRAPH_INIT << 3 | 2]) + encode_varint(len(head)) + head
        self._add(_graph_key(len(record)), record)
        self.held.append((self.inits - 1, view))

    def _take(self, pos: int, end: int, graph: bool) -> None:
        """Add the small record ``pos:end`` to the run of records read and handed to protobuf together."""
        if self.run_end == pos and self.run_graph == graph and end - self.run_at < _BATCH:
            self.run_end = end
            return
        self._end_run()
        self.run_at, self.run_end, self.run_graph = pos, end, graph

    def _end_run(self) -> None:
        at, n, graph = self.run_at, self.run_end - self.run_at, self.run_graph
        self.run_at = self.run_end = 0
        if n:
            self._add(_graph_key(n) if graph else b"", _pread(self.fd, n, at, self.src))

    def _add(self, key: bytes, record) -> None:
        self.batch += key
        self.batch += record
        if len(self.batch) >= _BATCH:
            self._flush()

    def _flush(self) -> None:
        self._end_run()
        if self.batch:
            self.proto.MergeFromString(self.batch)  # (DecodeError: the caller's FormatError)
            self.batch = bytearray()

    def _read_into(self, prefix: bytes, pos: int, end: int) -> bytearray:
        """The record ``pos:end`` read straight into a buffer after ``prefix`` (no copy of it made)."""
        buf = bytearray(len(prefix) + end - pos)
        buf[: len(prefix)] = prefix
        if os.preadv(self.fd, [memoryview(buf)[len(prefix) :]], pos) != end - pos:
            raise FormatError(f"ONNX model {os.fspath(self.src)} changed size while being read; try again")
        return buf

    def _merge(self, prefix: bytes, pos: int, end: int) -> None:
        """Parse one large record, read straight into its buffer after ``prefix``."""
        self._flush()
        self.proto.MergeFromString(self._read_into(prefix, pos, end))


def _graph_key(n: int) -> bytes:
    """The key and length of a ModelProto.graph record of ``n`` bytes."""
    return bytes([_MODEL_GRAPH << 3 | 2]) + encode_varint(n)


def _split_raw(record: memoryview, start: int) -> tuple[bytes, memoryview] | None:
    """A TensorProto record's payload without its raw_data, and a view of the raw_data; None when the tensor has any
    field but those of :data:`_TENSOR_FIELDS`, no raw_data, two, or a data type :data:`_PLAIN` does not name."""
    pos, end, head, raw, dtype = start, len(record), bytearray(), None, None
    while pos < end:
        key, i = read_key(record, pos, end)
        number, wire = key >> 3, key & 7
        if wire not in _TENSOR_FIELDS.get(number, ()):
            return None
        value, j = read_varint(record, i, end)
        stop = j + value if wire == 2 else j
        if stop > end:
            raise WholeMessage
        if number == RAW_DATA:
            if raw is not None:
                return None
            raw = record[j:stop]
        else:
            if number == 2:
                if dtype is not None:
                    return None
                dtype = value
            head += record[pos:stop]
        pos = stop
    if raw is None or dtype not in _PLAIN:
        return None
    return bytes(head), raw


def load_external(proto, outside: dict, base: str) -> None:
    """Read the main graph's large external tensors of a plain dtype into ``outside`` (not the message), as onnx's
    loader reads them (its checks: inside ``base``, a regular file, within its length), then the rest as onnx does."""
    from onnx import TensorProto
    from onnx.external_data_helper import load_external_data_for_model

    try:  # onnx 1.2x's checked reader, not public: the bytes alone
        from onnx.external_data_helper import _read_external_data_bytes
    except ImportError:  # onnx 1.16 has none: its public loader (a transient second copy of each tensor)
        _read_external_data_bytes = _read_public
    for t in proto.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL or t.data_type not in _PLAIN or t.name in outside:
            continue
        if prod(max(0, d) for d in t.dims) * np.dtype(_PLAIN[t.data_type]).itemsize < _STRIP_MIN:
            continue
        data = _read_external_data_bytes(t, base)
        t.ClearField("raw_data")
        t.data_location = TensorProto.DEFAULT
        del t.external_data[:]
        outside[t.name] = memoryview(data)
    load_external_data_for_model(proto, base)


def _read_public(t, base: str) -> bytes:
    from onnx.external_data_helper import load_external_data_for_tensor

    load_external_data_for_tensor(t, base)
    data = t.raw_data
    t.ClearField("raw_data")
    return data


def outside_bytes(outside) -> int:
    return sum(v.nbytes for v in (outside or {}).values())


def held_view(t, outside) -> memoryview | None:
    return outside.get(t.name) if outside and not t.HasField("raw_data") else None


def weight_arrays(inits, outside) -> dict[str, np.ndarray]:
    """numpy arrays of ``inits`` (name -> TensorProto): views of the bytes held outside (no copy), else onnx's."""
    from onnx import numpy_helper

    out = {}
    for k, t in inits.items():
        view = held_view(t, outside)
        if view is None:
            out[k] = numpy_helper.to_array(t)
        else:
            out[k] = np.frombuffer(view, np.dtype(_PLAIN[t.data_type])).reshape(tuple(t.dims))
    return out


def restore(proto, outside) -> None:
    """Put the bytes held outside back into the message (a whole copy: for the steps that need it whole)."""
    taken = set()  # the bytes of a name go to its first initializer only, as write_model puts them
    for t in proto.graph.initializer:
        view = held_view(t, outside) if t.name not in taken else None
        taken.add(t.name)
        if view is not None:
            t.raw_data = bytes(view)
    if outside:
        outside.clear()


def hold(t, dense: np.ndarray, outside) -> bool:
    """Hold the dense array ``dense`` (of the TensorProto header ``t``, its raw_data unset) in ``outside``, when its
    type is one :func:`weight_arrays` views and it is large; else False (the caller stores it in the message)."""
    if outside is None or t.data_type not in _PLAIN or dense.nbytes < _STRIP_MIN or t.name in outside:
        return False
    outside[t.name] = memoryview(np.ascontiguousarray(dense, np.dtype(_PLAIN[t.data_type]))).cast("B")
    return True


def will_hold(sp, dense_bytes: int, outside) -> bool:
    """Whether the main graph's sparse initializer ``sp`` (``dense_bytes`` stored dense) will be held out of the
    message by :func:`hold` (the import's memory check counts it once)."""
    return (
        outside is not None
        and sp.values.data_type in _PLAIN
        and dense_bytes >= _STRIP_MIN
        and sp.values.name not in outside
    )
