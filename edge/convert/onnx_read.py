"""Reading an ONNX file on the device (the device trainer, ``edge update``'s head lookup) without importing ``onnx``.

:func:`read_model` reads the file as :func:`edge.convert.onnx_source.read_onnx` does (bounded, regular files only,
an empty graph refused) with onnx's generated protobuf classes alone (:mod:`edge.format.onnx_proto`), so the
device's growth and update paths do not pay ``import onnx`` (0.7-1.2 s, ``ml_dtypes``) before their first step; a
model whose tensors live in external data files is handed to ``read_onnx``, whose checked loader reads them (the
device's adapter-ready files are self-contained). :func:`attribute_value` is ``onnx.helper.get_attribute_value``.
"""

from __future__ import annotations

import os
from pathlib import Path

from edge.errors import FormatError
from edge.format.onnx_proto import load_model, pb2

__all__ = ["attribute_value", "read_model"]

_EXTERNAL = 1  # TensorProto.EXTERNAL


def read_model(src: str | os.PathLike, limit: int | None = None):
    """The ``ModelProto`` of the regular file ``src`` (as ``read_onnx``: external data beside it read in)."""
    from edge.convert.onnx_source import MAX_MODEL_BYTES, read_onnx
    from edge.format.io import read_bounded

    src, limit = Path(src), MAX_MODEL_BYTES if limit is None else limit
    data = read_bounded(src, limit, what="ONNX model")
    try:
        proto = load_model(data)
    except FormatError as e:
        raise FormatError(f"{src}: {e}") from e
    if not proto.graph.node:
        raise FormatError(
            f"{src} is not an ONNX model: its graph has no nodes ({len(data)} bytes); give an exported .onnx file"
        )
    if _external(proto):  # onnx's loader checks the data files' paths (inside the folder, regular files)
        return read_onnx(src, limit)
    return proto


def _external(proto) -> bool:
    """Whether a tensor onnx's loader would read from an external file is in ``proto``: initializers (sparse ones'
    values and indices too) and node attributes' tensors of the main graph, of local functions and of every graph
    inside them (If/Loop/Scan bodies), as ``onnx.external_data_helper`` walks them."""
    from edge.format.onnx_graph import graphs

    every = graphs(proto.graph, proto.functions)
    tensors = [t for g in every for t in g.initializer]
    sparse = [s for g in every for s in g.sparse_initializer]
    for n in (*(n for g in every for n in g.node), *(n for f in proto.functions for n in f.node)):
        for a in n.attribute:
            tensors += [a.t, *a.tensors] if a.HasField("t") else a.tensors
            sparse += [a.sparse_tensor, *a.sparse_tensors] if a.HasField("sparse_tensor") else a.sparse_tensors
    return any(t.data_location == _EXTERNAL for t in (*tensors, *(x for s in sparse for x in (s.values, s.indices))))


def attribute_value(attr):
    """The value of an ``AttributeProto`` as ``onnx.helper.get_attribute_value`` gives it: a scalar, a message, or a
    list for the repeated types; None for UNDEFINED; ValueError for a reference attribute or an unknown type."""
    if attr.ref_attr_name:
        raise ValueError(f"cannot get the value of reference attribute {attr.name!r} ({attr.ref_attr_name!r})")
    field = (_FIELDS or _fields()).get(attr.type)
    if field is None:
        if attr.type == 0:  # UNDEFINED
            return None
        raise ValueError(f"unsupported ONNX attribute type {attr.type} of {attr.name!r}")
    value = getattr(attr, field)
    return value if field in _SINGLE else list(value)


_SINGLE = ("f", "i", "s", "t", "g", "sparse_tensor", "tp")
_FIELDS: dict[int, str] = {}


def _fields() -> dict[int, str]:
    """AttributeProto's type -> the field holding its value (the enum read from onnx's own classes)."""
    a = pb2().AttributeProto
    names = {
        "FLOAT": "f",
        "INT": "i",
        "STRING": "s",
        "TENSOR": "t",
        "GRAPH": "g",
        "SPARSE_TENSOR": "sparse_tensor",
        "TYPE_PROTO": "tp",
        "FLOATS": "floats",
        "INTS": "ints",
        "STRINGS": "strings",
        "TENSORS": "tensors",
        "GRAPHS": "graphs",
        "SPARSE_TENSORS": "sparse_tensors",
        "TYPE_PROTOS": "type_protos",
    }
    _FIELDS.update({getattr(a, k): v for k, v in names.items()})
    return _FIELDS
