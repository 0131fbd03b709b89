"""Checks and repairs :func:`edge.convert.onnx_import.make_adapter_ready` applies to an ONNX file written by another
tool before it looks for weights, so such a file is imported whole or refused at import, in one line naming what to
do, never written to fail later at load (or to run with a weight left out of the fingerprint).

:func:`foreign_metadata` takes over a ``metadata_props`` entry another tool wrote under this project's key;
:func:`check_graph` refuses what onnxruntime cannot load or edge.Runtime cannot feed (an IR version or opset newer than
onnx knows, an opset before 7 that onnxruntime cannot load, a node domain with no opset declared, no outputs, a name
defined twice, an input that is no tensor or has no shape); :func:`densify_sparse` stores ``sparse_initializer``
weights and ``Constant`` nodes' ``sparse_value`` dense, their size checked before anything is allocated, so they
are in the fingerprint (it hashes the graph's initializers) and can be targets.
"""

from __future__ import annotations

import json
import logging
from math import prod

import numpy as np

from edge.errors import ConfigError, FormatError
from edge.format.modelinfo import META_KEY, MODEL_FORMAT

__all__ = ["MIN_OPSET", "check_graph", "densify_sparse", "foreign_metadata", "trim_doc_strings"]

log = logging.getLogger("edge.convert.onnx_import")

#: the oldest default-domain opset onnxruntime guarantees to run (older files fail at load: e.g. Gemm-6)
MIN_OPSET = 7
_DENSE_LIMIT = (1 << 31) - 1  # protobuf's limit on one file: a dense weight past it could never be written
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
    inits = {t.name for t in graph.initializer}
    for v in graph.input:
        if v.type.WhichOneof("value") != "tensor_type":
            kind = (v.type.WhichOneof("value") or "").removesuffix("_type")
            raise ConfigError(
                f"ONNX model {name!r}: input {v.name[:80]!r} is {'a ' + kind if kind else 'of no type'}, not a tensor "
                "(edge.Runtime feeds tensors only); re-export the model with tensor inputs"
            )
        if not v.type.tensor_type.HasField("shape") and v.name not in inits:
            raise ConfigError(
                f"ONNX model {name!r}: input {v.name[:80]!r} declares no shape (not even its rank), which edge.Runtime "
                "checks every feed against; re-export it with input shapes (symbolic dims such as 'batch' are fine), "
                "or set them: onnx.tools.update_model_dims.update_inputs_outputs_dims(model, {name: [dims]}, {})"
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
    """Store the graph's ``sparse_initializer`` tensors as dense initializers, and ``Constant`` nodes' ``sparse_value``
    as ``value``; return the initializers made dense. Dims, indices and data sizes are checked before allocating."""
    from onnx import helper

    graph = proto.graph
    taken = {t.name for t in graph.initializer}
    made: list[str] = []
    for sp in graph.sparse_initializer:
        dense = _dense(sp, name)
        if dense.name in taken:
            raise FormatError(
                f"ONNX model {name!r}: {dense.name[:80]!r} is both an initializer and a sparse initializer; export "
                "the model again"
            )
        taken.add(dense.name)
        graph.initializer.append(dense)
        made.append(dense.name)
    graph.ClearField("sparse_initializer")
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "sparse_value":
                    dense = _dense(attr.sparse_tensor, name)
                    dense.name = node.output[0] if node.output else dense.name
                    node.ClearField("attribute")
                    node.attribute.append(helper.make_attribute("value", dense))
                    break
    if made:
        log.info("%s: %d sparse initializer(s) stored dense: %s", name, len(made), made[:5])
    return made


def _dense(sp, name: str):
    """One SparseTensorProto as a dense TensorProto (values at their indices, zero elsewhere)."""
    from onnx import TensorProto, helper, numpy_helper

    what = f"ONNX model {name!r}: sparse tensor {sp.values.name[:80]!r}"
    if any(t.data_location == TensorProto.EXTERNAL for t in (sp.values, sp.indices)):
        raise FormatError(
            f"{what} keeps its values in external data, which is not read for sparse tensors; save the model with "
            "its sparse tensors inline (onnx.save(model, path, save_as_external_data=False))"
        )
    dims = [int(d) for d in sp.dims]
    try:
        item = helper.tensor_dtype_to_np_dtype(sp.values.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        raise FormatError(f"{what} has values of unknown ONNX data type {sp.values.data_type}") from None
    if any(d < 0 for d in dims) or prod(dims) * item > _DENSE_LIMIT:  # Python ints: checked before allocating
        raise ConfigError(
            f"{what} declares dims {dims[:8]}: stored dense that is over protobuf's 2 GB limit on one ONNX file "
            f"({_DENSE_LIMIT:,} bytes), which edge imports to; export the model with dense weights of a smaller size"
        )
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
    """Cut the model's, its graph's and its nodes' ``doc_string`` to :data:`DOC_LIMIT` characters (the device
    runtime reads and parses the file whole); return how many were cut."""
    cut = 0
    for holder in [proto, proto.graph, *proto.graph.node]:
        if len(holder.doc_string) > DOC_LIMIT:
            holder.doc_string = holder.doc_string[:DOC_LIMIT] + " [cut by edge import-onnx]"
            cut += 1
    return cut
