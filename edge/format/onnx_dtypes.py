"""ONNX tensors of element types this project cannot store: refused by name and type, before anything is read.

A weights fingerprint (:func:`edge.format.modelinfo.fingerprint`) hashes numpy arrays through the buffer protocol,
which numpy's own types have and ``ml_dtypes``' (what onnx reads BFLOAT16, the FLOAT8/FLOAT6/FLOAT4 types and the
packed INT4/UINT4/INT2/UINT2 as) do not: before, such an initializer crashed ``edge import-onnx`` with a traceback
("cannot include dtype 'E' in a buffer"), and a file holding one crashed the runtime's load the same way. Only what
is fingerprinted is checked (the graph's initializers, at import once functions are inlined and weights hoisted):
a ``Constant`` that is no weight (a bfloat16 scalar cast to float) runs as onnxruntime runs it.
"""

from __future__ import annotations

__all__ = ["STORED", "refuse_undefined", "refuse_unstored", "type_name"]

#: ONNX data types read as numpy's own dtypes: FLOAT, UINT8, INT8, UINT16, INT16, INT32, INT64, STRING, BOOL,
#: FLOAT16, DOUBLE, UINT32, UINT64, COMPLEX64, COMPLEX128
STORED = frozenset(range(1, 16))
_TAKES = "(it takes float16/32/64, integers of 8-64 bits, bool, complex and strings)"
#: at import: a float16 weight is not adapted either (only float32 weights are), and `edge quantize` needs the
#: imported float model; at load a float16 tensor is stored and fingerprinted, and an int8 twin loads
_IMPORT_HOW = "export the model in float32 (model.float() before torch.onnx.export)"
_LOAD_HOW = "convert it to float32 or float16 (or int8 with edge quantize) and export the model again"


def type_name(data_type: int) -> str:
    """``BFLOAT16`` for 16; ``17`` for a number onnx does not name."""
    from onnx import TensorProto

    try:
        return TensorProto.DataType.Name(data_type)
    except ValueError:
        return str(data_type)


def refuse_undefined(tensors, model: str) -> None:
    """Refuse the first of ``tensors`` (``(what, TensorProto)``) whose data type no ONNX version defines (0 or a number
    onnx does not name: onnx cannot decode it), from its header alone; ``model``: ``"ONNX model 'm'"``."""
    from edge.errors import FormatError

    for what, t in tensors:
        if t.data_type not in STORED and (not t.data_type or type_name(t.data_type).isdigit()):
            raise FormatError(
                f"{model}: {what} of dims {list(t.dims)[:8]} is of ONNX data type {t.data_type}, which no ONNX "
                f"version defines, so edge cannot read it {_TAKES}: the file is damaged or was written wrongly; "
                "export the model again"
            )


def refuse_unstored(tensors, model: str, *, graph=None) -> None:
    """Refuse the first of ``tensors`` (``(what, TensorProto)``: ``"initializer 'w'"``) whose data type is not in
    :data:`STORED`, from its header alone; ``model``: ``"ONNX model 'm'"``. ``graph``: at import, the graph holding
    them (the advice is then to export in float32, and a tensor no node of it, nor of its bodies, reads is said to be
    dead); ``None`` at load."""
    from edge.errors import FormatError

    refuse_undefined(tensors := list(tensors), model)
    bad = next(((what, t) for what, t in tensors if t.data_type not in STORED), None)
    if bad is None:
        return
    what, t = bad
    how = _LOAD_HOW
    if graph is not None:
        how = _IMPORT_HOW if t.name in _read(graph) else "it is used by no node: remove it, or export the model again"
    raise FormatError(
        f"{model}: {what} of dims {list(t.dims)[:8]} is of ONNX data type {type_name(t.data_type)}, which edge cannot "
        f"store or fingerprint {_TAKES}; {how}"
    )


def _read(graph) -> set[str]:
    """The names a node of ``graph`` or of its If/Loop/Scan bodies reads, and the graphs' outputs."""
    from edge.format.onnx_graph import graphs

    every = graphs(graph)
    return {i for g in every for n in g.node for i in n.input} | {o.name for g in every for o in g.output}
