"""Checks and repairs :func:`edge.convert.onnx_import.make_adapter_ready` applies to an ONNX file written by another
tool before it looks for weights, so such a file is imported whole or refused at import, in one line naming what to
do, never written to fail later at load (or to run with a weight left out of the fingerprint).

:func:`foreign_metadata` takes over a ``metadata_props`` entry another tool wrote under this project's key;
:func:`check_graph` refuses what onnxruntime cannot load or edge.Runtime cannot feed (an IR version or opset newer than
onnx knows, an opset before 7 that onnxruntime cannot load, a node domain with no opset declared, no outputs, a name
defined twice, an input that is no tensor; an input with no shape at all, as converters write fully dynamic ones, is
kept: edge.Runtime then checks its feeds' dtype only); :func:`densify_sparse` (:mod:`edge.convert.onnx_densify`)
stores sparse tensors dense, within protobuf's limit, the caller's cap and the memory left; :func:`trim_doc_strings`
cuts every doc string the file holds.
"""

from __future__ import annotations

import json
import logging
from functools import cache

from edge.convert.onnx_densify import densify_sparse
from edge.errors import ConfigError, FormatError
from edge.format.modelinfo import META_KEY, MODEL_FORMAT

__all__ = ["MIN_OPSET", "check_graph", "densify_sparse", "foreign_metadata", "trim_doc_strings"]

log = logging.getLogger("edge.convert.onnx_import")

#: the oldest default-domain opset onnxruntime guarantees to run (older files fail at load: e.g. Gemm-6)
MIN_OPSET = 7
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
