"""Checks and repairs :func:`edge.convert.onnx_import.make_adapter_ready` applies to an ONNX file written by another
tool before it looks for weights, so such a file is imported whole or refused at import, in one line naming what to
do, never written to fail later at load (or to run with a weight left out of the fingerprint).

:func:`foreign_metadata` takes over a ``metadata_props`` entry another tool wrote under this project's key;
:func:`check_graph` refuses what onnxruntime cannot load or edge.Runtime cannot feed (an IR version or opset newer than
onnx knows, an opset before 7 that onnxruntime cannot load, a node domain with no opset declared, no outputs, a name
defined twice, an input that is no tensor; an input with no shape at all, as converters write fully dynamic ones, is
kept: edge.Runtime then checks its feeds' dtype only); :func:`densify_sparse` stores ``sparse_initializer``
weights and ``Constant`` nodes' ``sparse_value`` dense, their total size checked against protobuf's 2 GB limit
before anything is allocated, so they are in the fingerprint (it hashes the graph's initializers) and can be
targets; :func:`trim_doc_strings` cuts every doc string the file holds.
"""

from __future__ import annotations

import json
import logging
from functools import cache
from math import prod

import numpy as np

from edge.convert.onnx_source import PROTOBUF_LIMIT
from edge.errors import ConfigError, FormatError
from edge.format.modelinfo import META_KEY, MODEL_FORMAT
from edge.format.onnx_graph import graphs as all_graphs

__all__ = ["MIN_OPSET", "check_graph", "densify_sparse", "foreign_metadata", "trim_doc_strings"]

log = logging.getLogger("edge.convert.onnx_import")

#: the oldest default-domain opset onnxruntime guarantees to run (older files fail at load: e.g. Gemm-6)
MIN_OPSET = 7
#: the largest dimension a sparse tensor may declare (no real weight has a longer axis)
_MAX_DIM = 2**31 - 1
DOC_LIMIT = 4096  # characters of a doc_string kept (a converter's may be megabytes: held by every session)


def foreign_metadata(proto, name: str) -> str | None:
    """The value another tool stored under this project's metadata key (``None`` if there is none, or it is this
    project's ``edge.model`` record). The key is this project's: the import overwrites it, and says so."""
    value = next((p.value for p in proto.metadata_props if p.key == META_KEY), None)
    if value is None:
        return None
    try:
        d = json.loads(value)
    except ValueError:
        d = None
    if isinstance(d, dict) and d.get("format") == MODEL_FORMAT:
        return None  # this project's own record: ModelInfo.from_json reads (or refuses) it
    log.warning(
        "%s: metadata %r=%r was written by another tool; replaced by this project's", name, META_KEY, value[:80]
    )
    return value[:200]


def check_graph(proto, name: str) -> None:
    """Refuse, before anything is written, an ONNX model the device runtime could not load or run."""
    import onnx

    if proto.ir_version > onnx.IR_VERSION:
        raise FormatError(
            f"ONNX model {name!r} has IR version {proto.ir_version}, newer than this onnx ({onnx.__version__}) "
            f"reads (up to {onnx.IR_VERSION}); upgrade onnx and onnxruntime, or export it with an older exporter"
        )
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    declared = {"ai.onnx" if o.domain == "" else o.domain for o in proto.opset_import}
    declared |= {f.domain for f in proto.functions}  # a model-local function's own domain: inlined by the import
    for node in proto.graph.node:
        domain = node.domain or "ai.onnx"
        if domain not in declared:  # onnxruntime: "No opset import for domain"
            raise ConfigError(
                f"ONNX model {name!r}: node {node.name[:60] or node.op_type!r} ({node.op_type}) is of domain "
                f"{domain!r}, for which the model declares no opset (opset_import); export it again, or add one: "
                f"model.opset_import.append(onnx.helper.make_opsetid({node.domain!r}, VERSION))"
            )
    if opset is not None and opset > onnx.defs.onnx_opset_version():
        raise FormatError(
            f"ONNX model {name!r} uses opset {opset} of the default domain, newer than this onnx ({onnx.__version__}) "
            f"knows (up to {onnx.defs.onnx_opset_version()}); upgrade onnx and onnxruntime, or export at an older opset"
        )
    if opset is not None and opset < MIN_OPSET and (why := _ort_refuses(proto)) is not None:
        raise ConfigError(
            f"ONNX model {name!r} uses opset {opset} of the default domain, and onnxruntime cannot load it ({why}); "
            f"it runs opset {MIN_OPSET} and later (older operators, such as Gemm with a broadcast attribute, have no "
            "kernels): re-export it at opset 13 or later (onnx.version_converter.convert_version(model, 13) "
            "converts many such files)"
        )
    graph = proto.graph
    if not graph.output:
        raise ConfigError(
            f"ONNX model {name!r} declares no graph outputs, so a run could return nothing; re-export it with its "
            "outputs (torch.onnx.export(..., output_names=[...]))"
        )
    for v in graph.input:
        if v.type.WhichOneof("value") != "tensor_type":
            kind = (v.type.WhichOneof("value") or "").removesuffix("_type")
            raise ConfigError(
                f"ONNX model {name!r}: input {v.name[:80]!r} is {'a ' + kind if kind else 'of no type'}, not a tensor "
                "(edge.Runtime feeds tensors only); re-export the model with tensor inputs"
            )
        if not v.type.tensor_type.elem_type:  # (no shape is fine: any rank, its dtype checked at every run)
            raise ConfigError(
                f"ONNX model {name!r}: input {v.name[:80]!r} declares no element type, so no feed can be checked or "
                "run; re-export the model with typed inputs"
            )
    _defined_once(graph, name)


def _ort_refuses(proto) -> str | None:
    """onnxruntime's first line of refusal to load ``proto`` (an old-opset file: it runs many of them), or None."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None  # the runtime's load will say what it says
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own error types
        return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return None


def _defined_once(graph, name: str) -> None:
    """Each value defined once (SSA): an initializer or graph input no node also writes, no output written twice.
    (A graph input naming an initializer, as IR < 4 files list them, is the one repetition allowed.)"""
    seen: dict[str, str] = {}
    defs = [(t.name, "an initializer") for t in graph.initializer]
    inits = {t.name for t in graph.initializer}
    defs += [(v.name, "a graph input") for v in graph.input if v.name not in inits]
    defs += [(o, f"an output of {n.op_type} node {n.name[:60]!r}") for n in graph.node for o in n.output if o]
    for value, what in defs:
        if value in seen:
            both = f"{seen[value]} and {what}" if what != seen[value] else f"{what}, twice"
            raise FormatError(
                f"ONNX model {name!r}: {value[:80]!r} is defined twice ({both}), which onnxruntime refuses; rename "
                "one of them in the exporting code, or export the model again"
            )
        seen[value] = what


def densify_sparse(proto, name: str) -> list[str]:
    """Store the ``sparse_initializer`` tensors of the graph and its If/Loop/Scan bodies as dense initializers, and
    ``Constant`` nodes' ``sparse_value`` (bodies too: onnxruntime densifies them at load) as ``value``; return the main
    graph's initializers made dense. Every tensor's dims, data type and indices are checked, and their dense sizes
    summed against :data:`PROTOBUF_LIMIT` with the rest of the model, before anything is allocated."""
    from onnx import helper

    graphs = all_graphs(proto.graph)
    found = [(g, sp, None) for g in graphs for sp in g.sparse_initializer]
    found += [
        (g, a.sparse_tensor, n)
        for g in graphs
        for n in g.node
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx")
        for a in n.attribute
        if a.name == "sparse_value"
    ]
    if not found:
        return []
    sizes = [_dense_bytes(sp, name) for _, sp, _ in found]  # each checked; nothing allocated yet
    rest = proto.ByteSize() - sum(sp.ByteSize() for _, sp, _ in found)
    if rest + sum(sizes) > PROTOBUF_LIMIT:
        big = max(range(len(found)), key=sizes.__getitem__)
        sp = found[big][1]
        raise FormatError(
            f"ONNX model {name!r}: sparse tensor {sp.values.name[:80]!r} of dims {list(sp.dims)[:8]} is "
            f"{sizes[big]:,} bytes stored dense ({len(found)} sparse tensor(s): {sum(sizes):,} bytes dense, with the "
            f"model's other {rest:,} bytes), over protobuf's 2 GB limit ({PROTOBUF_LIMIT:,} bytes) on the one "
            "self-contained file edge imports to; export the model with its weights dense, under that limit "
            "(a sparse tensor declaring dims it does not hold is a broken or hostile file)"
        )
    made: list[str] = []
    taken = {t.name for g in graphs for t in g.initializer}
    for g, sp, node in found:
        dense = _dense(sp, name)
        if node is not None:
            dense.name = node.output[0] if node.output else dense.name
            node.ClearField("attribute")
            node.attribute.append(helper.make_attribute("value", dense))
            continue
        if dense.name in taken:
            raise FormatError(
                f"ONNX model {name!r}: {dense.name[:80]!r} is both an initializer and a sparse initializer; export "
                "the model again"
            )
        taken.add(dense.name)
        g.initializer.append(dense)
        made += [dense.name] if g is proto.graph else []
    for g in graphs:
        g.ClearField("sparse_initializer")
    if made:
        log.info("%s: %d sparse initializer(s) stored dense: %s", name, len(made), made[:5])
    return made


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
    try:
        item = helper.tensor_dtype_to_np_dtype(sp.values.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        raise FormatError(f"{what} has values of unknown ONNX data type {sp.values.data_type}") from None
    dims = [int(d) for d in sp.dims]
    if any(d < 0 or d > _MAX_DIM for d in dims):  # [0, 2**62] is empty, yet no array of that shape can be made
        raise FormatError(
            f"{what} declares dims {dims[:8]}: a negative dimension or one over {_MAX_DIM:,}; export the model again"
        )
    return prod(dims) * item  # Python ints: a hostile shape cannot wrap around


def _dense(sp, name: str):
    """One SparseTensorProto (checked by :func:`_dense_bytes`) as a dense TensorProto (zero but at its indices)."""
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
    dense = np.zeros(n, values.dtype)
    dense[indices] = values
    return numpy_helper.from_array(dense.reshape(dims), sp.values.name)


def trim_doc_strings(proto) -> int:
    """Cut every ``doc_string`` the model holds to :data:`DOC_LIMIT` characters: the model's, its graphs' (If/Loop/Scan
    bodies too), nodes', attributes', initializers', value infos' and functions' (the device runtime reads and parses
    the file whole, and a session holds the graph); return how many were cut. Tensors' data is never read."""
    cut, todo = 0, [proto]
    while todo:
        m = todo.pop()  # (TrainingInfoProto, SparseTensorProto: no doc_string of their own, only deeper)
        if "doc_string" in m.DESCRIPTOR.fields_by_name and len(m.doc_string) > DOC_LIMIT:
            m.doc_string = m.doc_string[:DOC_LIMIT] + " [cut by edge import-onnx]"
            cut += 1
        for field, repeated in _message_fields().get(m.DESCRIPTOR.full_name, ()):
            if repeated:
                todo += getattr(m, field)
            elif m.HasField(field):
                todo.append(getattr(m, field))
    return cut


@cache
def _message_fields() -> dict[str, tuple]:
    """ONNX message type -> ``(field, repeated)`` of its fields holding messages that hold a ``doc_string`` (there
    or deeper)."""
    import onnx

    def holds(desc, seen) -> bool:
        if "doc_string" in desc.fields_by_name:
            return True
        seen.add(desc.full_name)
        return any(
            f.message_type and f.message_type.full_name not in seen and holds(f.message_type, seen) for f in desc.fields
        )

    out, todo = {}, [onnx.ModelProto.DESCRIPTOR]
    while todo:
        desc = todo.pop()
        if desc.full_name in out:
            continue
        fields = [f for f in desc.fields if f.message_type and holds(f.message_type, set())]
        out[desc.full_name] = tuple((f.name, _repeated(f)) for f in fields)
        todo += [f.message_type for f in fields]
    return out


def _repeated(field) -> bool:
    """Whether a protobuf field is repeated (``is_repeated`` from protobuf 6, ``label`` before)."""
    is_repeated = getattr(field, "is_repeated", None)
    return bool(is_repeated) if is_repeated is not None else field.label == field.LABEL_REPEATED
