"""Writing an imported ONNX model field by field, the weights :mod:`edge.convert.onnx_weights` holds out of the
message put back in place: the bytes ``SerializeToString`` gives, with no whole copy of the file in memory (and no
``ByteSize`` of a large message: upb serializes a message to count it, twice its size at peak)."""

from __future__ import annotations

from edge.convert.onnx_weights import GRAPH_INIT, RAW_DATA, WholeMessage, encode_varint, held_view, read_varint, restore

__all__ = ["message_size", "write_model"]


def write_model(f, proto, outside, limit: int | None = None) -> None:
    """Write ``proto`` to the binary file ``f`` as ``proto.SerializeToString()`` would, the bytes held outside in
    place: field by field, a message of :data:`_BIG` bytes or more in its own fields (a tensor's ``raw_data`` read
    once, as it is written), so no whole copy of the file is made. A message whose pieces do not add up to its size
    (fields protobuf keeps but does not name) is serialized whole. Over ``limit`` bytes (protobuf's 2 GB, which
    ``SerializeToString`` refused) it is a ConfigError, before a byte is written."""
    from edge.errors import ConfigError

    try:
        n, _, write = _message(proto, outside, 0)
    except WholeMessage:  # unnamed fields beside the weights held outside: the whole message, the old way
        restore(proto, outside)
        n, _, write = _message(proto, outside, 0)
    if limit is not None and n > limit:
        raise ConfigError(
            f"the imported model would be {n:,} bytes, over protobuf's limit of {limit:,} on one ONNX file, which the "
            "device runtime reads whole; export a smaller model"
        )
    write(f)


#: a message of this many bytes or more is written field by field
_BIG = 1 << 20


def _message(msg, outside, depth: int):
    """``(length, length added by the bytes held outside, writer)`` of ``msg`` (``depth`` 0: the model, 1: its
    graph, where the held initializers are). ``ByteSize`` is not asked of a large message: upb serializes it to
    count (twice its size at peak)."""
    held = outside if depth < 2 else None
    if not held and not _may_be_big(msg):
        return msg.ByteSize(), 0, lambda f: f.write(msg.SerializeToString())
    unknown = _has_unknown(msg)
    if unknown:  # fields protobuf keeps without a name here: not written by pieces
        if held:
            raise WholeMessage
        return msg.ByteSize(), 0, lambda f: f.write(msg.SerializeToString())
    pieces = list(_pieces(msg, held, depth))
    n, added = sum(p[0] for p in pieces), sum(p[1] for p in pieces)
    if unknown is None and n - added != msg.ByteSize():  # protobuf before 4.24 cannot say: the sizes compared
        if added:
            raise WholeMessage
        return n - added, 0, lambda f: f.write(msg.SerializeToString())
    return n, added, lambda f: [write(f) for _, _, write in pieces]


#: AttributeProto types that hold tensors or graphs (TENSOR, GRAPH, TENSORS, GRAPHS, SPARSE_TENSOR(S))
_HOLDING = {4, 5, 9, 10, 11, 12}
_TYPED = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def _may_be_big(msg) -> bool:
    """Whether ``msg`` may hold a large tensor (then written by pieces), from its fields alone."""
    kind = type(msg).__name__
    if kind == "NodeProto":
        return any(a.type in _HOLDING for a in msg.attribute)
    if kind == "AttributeProto":
        return msg.type in _HOLDING
    if kind == "TensorProto":
        return msg.HasField("raw_data") or sum(len(getattr(msg, k)) for k in _TYPED) > 1024
    return kind in ("ModelProto", "GraphProto", "FunctionProto", "TrainingInfoProto", "SparseTensorProto")


def _has_unknown(msg) -> bool | None:
    """Whether ``msg`` itself carries fields its schema does not name (None: this protobuf cannot say)."""
    try:
        from google.protobuf import unknown_fields
    except ImportError:
        return None
    return len(unknown_fields.UnknownFieldSet(msg)) > 0


def _pieces(msg, outside, depth: int):
    """``(length, length added by held bytes, writer)`` of each field record of ``msg``, in protobuf's order."""
    taken = set()  # held bytes go to the first initializer of their name (two of one name: refused by the import)
    for fd, value in msg.ListFields():
        key = encode_varint(fd.number << 3 | 2)
        if fd.type == fd.TYPE_MESSAGE:
            for item in value if _repeated(fd) else (value,):
                view = None
                if depth == 1 and fd.number == GRAPH_INIT and item.name not in taken:
                    view = held_view(item, outside)
                    taken.add(item.name)
                if view is None:
                    n, added, write = _message(item, outside, depth + 1)
                else:
                    n, write = _tensor_piece(item, view)
                    added = n - item.ByteSize()
                added += len(encode_varint(n)) - len(encode_varint(n - added))
                yield len(key) + len(encode_varint(n)) + n, added, _framed(key + encode_varint(n), write)
        elif fd.type == fd.TYPE_BYTES and not _repeated(fd) and len(value) >= _BIG:  # raw_data: read as written
            name = fd.name
            yield (
                len(key) + len(encode_varint(len(value))) + len(value),
                0,
                _framed(key + encode_varint(len(value)), _getter(msg, name)),
            )
        else:  # serialized again as written: none of them kept meanwhile
            yield len(_field(msg, fd, value)), 0, lambda f, fd=fd, value=value: f.write(_field(msg, fd, value))


def _repeated(fd) -> bool:
    flag = getattr(fd, "is_repeated", None)  # protobuf 6+; ``label`` before (gone in 7)
    return bool(flag) if flag is not None else fd.label == fd.LABEL_REPEATED


def _field(msg, fd, value) -> bytes:
    """The record(s) of one field of ``msg`` that is not a message, as protobuf serializes them."""
    tmp = type(msg)()
    if _repeated(fd):
        getattr(tmp, fd.name).extend(value)
    else:
        setattr(tmp, fd.name, value)
    return tmp.SerializeToString()


def _framed(head: bytes, write):
    def framed(f) -> None:
        f.write(head)
        write(f)

    return framed


def _getter(msg, name: str):
    return lambda f: f.write(getattr(msg, name))


def _tensor_piece(t, view: memoryview):
    """A TensorProto's length and writer with its raw_data (field 9) put before its first field numbered above."""
    head = t.SerializeToString()
    pos = 0
    while pos < len(head):
        key, i = read_varint(head, 0 + pos, len(head))
        if key >> 3 > RAW_DATA:
            break
        value, j = read_varint(head, i, len(head))
        pos = j + value if key & 7 == 2 else j
    raw_key = bytes([RAW_DATA << 3 | 2]) + encode_varint(view.nbytes)
    n = len(head) + len(raw_key) + view.nbytes

    def write(f) -> None:
        f.write(head[:pos])
        f.write(raw_key)
        f.write(view)
        f.write(head[pos:])

    return n, write


def message_size(msg, outside=None) -> int:
    """The bytes ``msg`` is written as (with the bytes held outside, for the model), without protobuf's ``ByteSize``
    on a large message (upb serializes it to count it: twice its size)."""
    try:
        return _message(msg, outside, 0 if type(msg).__name__ == "ModelProto" else 2)[0]
    except WholeMessage:
        return msg.ByteSize() + sum(v.nbytes for v in outside.values())
