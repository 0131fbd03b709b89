"""Make an ONNX file exported elsewhere (torch.onnx, optimum, tf2onnx) adapter-ready, without torch.

:func:`import_onnx` follows the weight input of every MatMul, Gemm, Conv, ConvTranspose and Gather
(through Transpose, Reshape, Flatten, Squeeze, Unsqueeze, Identity, a Cast to float32) to its initializer and records
it in this project's metadata with its layout: adapter indices are in the torch layout (``[out,
in]`` for a linear, ``[out, in/groups, kH, kW]`` for a conv), stored as is (reshaped) or as its 2-D
transpose (``TensorInfo.transposed``: a MatMul reads ``[in, out]``). A permutation the metadata
cannot express (an HWIO filter transposed in the graph) is folded into the stored tensor.
A convolution whose exporter folded a BatchNorm into it matches its torch weight up to a
per-output-channel scale (:mod:`edge.convert.bn_fold`), recorded as ``TensorInfo.channel_scale``.

Without a state dict targets keep their ONNX names (made valid adapter target names: tf2onnx's
``model/dense/MatMul:0`` is ``model.dense.MatMul:0``, :mod:`edge.convert.onnx_names`); with one (safetensors, or an
HF folder's ``model.safetensors``; never pickle) each is named after the torch parameter of equal value, as
:mod:`exporters.tflite` maps tensors. Ambiguous, unmatched and missing names are reported in
:class:`ImportReport`, never guessed. What onnxruntime could not load (an opset before 7, no outputs, a name defined
twice, ...) is refused first, and sparse weights are stored dense (:mod:`edge.convert.onnx_foreign`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge.convert.onnx_bnmeta import drop_bn_folded
from edge.convert.onnx_densify import DEFAULT_MAX_DENSE_MB, check_sparse
from edge.convert.onnx_foldcheck import check_same_outputs
from edge.convert.onnx_foreign import MIN_OPSET, check_graph, densify_sparse, foreign_metadata, trim_doc_strings
from edge.convert.onnx_layout import NotAWeight as _NotAWeight
from edge.convert.onnx_layout import apply_op as _apply
from edge.convert.onnx_names import adapter_names, name_by_value, select
from edge.convert.onnx_source import (
    PROTOBUF_LIMIT,
    control_flow_weights,
    floating,
    hoist_body_initializers,
    hoist_constants,
    inline_functions,
    read_onnx,
    recurrent_weights,
    refuse_quantized,
    tied_copies,
    unique_node_names,
    weights_off_inputs,
    why_no_weights,
)
from edge.convert.onnx_valueinfo import drop_stale_value_info
from edge.convert.onnx_weights import restore, weight_arrays
from edge.convert.onnx_write import write_model
from edge.convert.state_dict import read_state_dict
from edge.errors import AdapterMismatchError, ConfigError, FormatError
from edge.format.modelinfo import META_KEY, ModelInfo, TensorInfo, fingerprint
from edge.format.onnx_dtypes import refuse_undefined, refuse_unstored
from edge.format.onnx_graph import consumers, keep_only, set_metadata, subgraph_reads
from edge.format.onnx_scaffold import simplify

__all__ = ["ImportReport", "import_onnx", "make_adapter_ready", "read_state_dict", "WEIGHT_INPUTS"]

log = logging.getLogger(__name__)

#: op type -> index of its weight input; the torch layout of what the op reads is given by :func:`_torch_view`.
WEIGHT_INPUTS = {"MatMul": 1, "Gemm": 1, "Conv": 1, "ConvTranspose": 1, "Gather": 0}
#: onnxruntime's fused ops (a file saved with ``optimized_model_filepath``) -> the op whose weight layout they keep
FUSED = {"FusedConv": "Conv", "FusedGemm": "Gemm", "FusedMatMul": "MatMul"}
_PASS_THROUGH = ("Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Cast")


@dataclass(frozen=True)
class ImportReport:
    """What :func:`import_onnx` found. ``info`` is the metadata written into the output file."""

    info: ModelInfo
    renamed: Mapping[str, str] = field(default_factory=dict)  # initializer -> torch parameter name
    unmatched: tuple[str, ...] = ()  # targets no parameter has the value of (they keep their ONNX names)
    ambiguous: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # target or parameter -> candidates
    missing: tuple[str, ...] = ()  # 2-D+ parameters stored in no target (folded by the exporter, or unused)
    skipped: Mapping[str, str] = field(default_factory=dict)  # weight initializer -> why it is not a target
    folded: tuple[str, ...] = ()  # initializers stored permuted so the graph reads them directly


def import_onnx(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    state_dict: str | os.PathLike | Mapping[str, np.ndarray] | None = None,
    targets: Sequence[str] | None = None,
    name: str | None = None,
    strict: bool = False,
    max_dense_mb: float = DEFAULT_MAX_DENSE_MB,
) -> ImportReport:
    """Write ``src`` to ``out`` with adapter metadata; return what was found.

    Args:
        src: an ONNX file (external data next to it is read in and stored inline).
        out: the adapter-ready file to write (atomically).
        state_dict: torch parameter values to name the targets by: a ``.safetensors`` file, a
            Hugging Face folder, or a mapping of arrays.
        targets: keep only targets matching one of these (globs such as ``*.weight``, or module
            names or suffixes as PEFT's ``target_modules``); each must match something.
        name: model name in the metadata (default: the file's stem).
        strict: raise, rather than keep ONNX names, when a name is unmatched, ambiguous or missing.
        max_dense_mb: the most MB the file's sparse tensors may take stored dense (all together); they are also
            refused when storing them would not fit the memory this process can still use (:mod:`edge.memory_room`).

    Raises:
        FormatError: ``src`` is not a readable ONNX file, its sparse tensors are too large stored dense (over
            ``max_dense_mb`` or the memory left), or the state dict is not safetensors.
        ConfigError: a ``targets`` pattern matches nothing, the graph has no weight to adapt or is quantized (even
            in part), or ``out`` is not writable.
        AdapterMismatchError: ``strict`` and some names could not be matched (nothing is written).
    """
    from edge.format.io import atomic_write_bytes

    src = Path(src)
    outside: dict = {}  # the large weights' bytes, held once, out of the message (edge.convert.onnx_weights)
    proto = read_onnx(src, outside=outside)
    params = read_state_dict(state_dict) if isinstance(state_dict, (str, os.PathLike)) else state_dict
    report = make_adapter_ready(
        proto, params=params, targets=targets, name=name or src.stem, max_dense_mb=max_dense_mb, outside=outside
    )
    if strict and (report.unmatched or report.ambiguous or report.missing):
        raise AdapterMismatchError(_strict_refusal(src, report))
    try:  # streamed, the held weights in place: the bytes SerializeToString gives, without a whole copy of them
        atomic_write_bytes(out, lambda f: write_model(f, proto, outside, PROTOBUF_LIMIT))
    except OSError as e:
        raise ConfigError(f"cannot write {out}: {e.strerror or e}; give --out a file path in a writable folder") from e
    log.info("imported %s -> %s: %d targets, %s", src, out, len(report.info.tensors), report.info.fingerprint)
    return report


def _old_opset(proto) -> bool:
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return opset is not None and opset < MIN_OPSET


def _strict_refusal(src: Path, report: ImportReport) -> str:
    """Why ``--strict`` refused ``src``: only the kinds of mismatch found, each with what it means without strict."""
    parts = []
    if report.unmatched:
        parts.append(f"{len(report.unmatched)} target(s) match no parameter {list(report.unmatched)[:5]}")
    if report.ambiguous:
        parts.append(f"{len(report.ambiguous)} name(s) are ambiguous {dict(list(report.ambiguous.items())[:3])}")
    if report.missing:
        parts.append(
            f"{len(report.missing)} parameter(s) reach no adapter target {list(report.missing)[:5]} (the exporter "
            "folded or reshaped them into other values, or the graph does not use them): an adapter trained on "
            "them cannot be applied to this file"
        )
    without = []
    if report.unmatched or report.ambiguous:
        without.append("the targets named above keep their ONNX names")
    if report.missing:
        without.append("the file is written with the targets it has")
    return f"{src}: {'; '.join(parts)}; nothing was written. Without --strict {' and '.join(without)}"


def make_adapter_ready(
    proto,
    *,
    params: Mapping[str, np.ndarray] | None = None,
    targets: Sequence[str] | None = None,
    name: str = "model",
    max_dense_mb: float = DEFAULT_MAX_DENSE_MB,
    outside: dict | None = None,
) -> ImportReport:
    """Edit ``proto`` (an ``onnx.ModelProto``) in place as :func:`import_onnx` does, and return the report.
    ``outside``: the bytes of large initializers held out of ``proto`` (:func:`read_onnx`'s), kept in step."""
    from onnx import numpy_helper

    replaced = foreign_metadata(proto, name)  # another tool's value under this project's key: taken over, said
    meta = next((p.value for p in proto.metadata_props if p.key == META_KEY), None) if replaced is None else None
    if meta is not None:
        if ModelInfo.from_json(meta).float_fingerprint is None:  # not an `edge quantize` twin: quantized elsewhere?
            refuse_quantized(proto.graph, name, proto.functions)  # (onnxruntime's quantizers keep it)
        raise ConfigError(
            f"ONNX model {name!r} already carries {META_KEY!r} metadata (exported or imported by this project): "
            "load it with edge.Runtime as it is, or import the original file"
        )
    check_sparse(
        proto, name, max_dense_mb=max_dense_mb, outside=outside
    )  # first: a sparse tensor may declare gigabytes
    if outside and _old_opset(proto):  # onnxruntime is handed the whole model to say whether it can load it
        restore(proto, outside)
    check_graph(proto, name)  # what onnxruntime could not load is refused here, not written to fail at load
    inlined = inline_functions(proto, name)  # torch's export_modules_as_functions: weights read inside functions
    sparse = densify_sparse(
        proto, name, max_dense_mb=max_dense_mb, outside=outside
    )  # sparse weights stored dense (a function's too, inlined first): targets
    graph = proto.graph
    refuse_quantized(graph, name)
    hoisted = hoist_constants(graph, WEIGHT_INPUTS, _PASS_THROUGH)  # weights an exporter left in Constant nodes
    hoist_body_initializers(graph)  # a control-flow body's weights: into the fingerprint (not targets: said below)
    relabelled = unique_node_names(graph)  # else no onnxruntime session could load the file written
    inits = {t.name: t for t in graph.initializer}
    if not inits:
        raise ConfigError(f"ONNX model {name!r} stores no initializers: there are no weights to adapt")
    weights_off_inputs(proto)  # IR < 4 style: initializers listed as inputs
    held = [(f"initializer {k[:80]!r}", t) for k, t in inits.items()]
    refuse_undefined(held, f"ONNX model {name!r}")  # a type onnx cannot decode: its to_array raises KeyError
    try:
        arrays = weight_arrays(inits, outside)  # views of the bytes held outside: no copy
    except (ValueError, TypeError) as e:  # data that does not fit its declared shape or type
        raise FormatError(
            f"ONNX model {name!r} stores a weight its declared shape does not fit ({e}); re-export it"
        ) from e

    scaffold = simplify(graph)  # torch dynamo's zero conv biases and CastLike constants, which onnxruntime keeps
    found, skipped, dead, rewire = _find_weights(graph, arrays)
    for k, why in {**recurrent_weights(graph, arrays), **control_flow_weights(graph, arrays)}.items():  # said
        if k not in found:
            skipped.setdefault(k, why)
    folded = [k for k, view in found.items() if view.fold is not None]
    if folded and outside:
        restore(proto, outside)  # onnxruntime runs the model before and after: whole
    before = proto.SerializeToString() if folded else b""  # for the check after folding: a whole copy, so only then
    for node, slot, value in rewire:  # after the copy: the graph checked against is the one given
        node.input[slot] = value
    for k in folded:
        arrays[k] = np.ascontiguousarray(found[k].fold)
        inits[k].CopyFrom(numpy_helper.from_array(arrays[k], k))
    keep_only(graph.node, lambda n: not dead.intersection(n.output))  # the folded chains
    keep_only(graph.value_info, lambda v: v.name not in dead and v.name not in folded)  # stale shapes

    tensors = {k: TensorInfo(k, v.shape, v.transposed) for k, v in found.items()}
    renamed, unmatched, ambiguous, missing = {}, [], {}, []
    if params is not None:
        tensors, renamed, unmatched, ambiguous, missing = name_by_value(found, arrays, params)
    else:  # a weight a BatchNorm was folded into keeps torch's name but not its values: left out, said
        tensors = drop_bn_folded(graph, tensors, skipped)
    tensors, valid = adapter_names(tensors)  # tf2onnx's 'model/dense/MatMul:0': no adapter may name a '/'
    if targets:
        tensors = select(tensors, targets)
    if not tensors:
        raise ConfigError(
            f"ONNX model {name!r} has no float32 MatMul/Gemm/Conv/Gather weight initializers to adapt"
            + (f" ({len(skipped)} skipped: {dict(list(skipped.items())[:5])})" if skipped else "")
            + why_no_weights(graph, arrays)
        )

    io_names = tuple(v.name for v in graph.input), tuple(v.name for v in graph.output)
    extra = {"imported": {"producer": f"{proto.producer_name} {proto.producer_version}".strip()}}
    if hoisted:
        extra["imported"]["constants_hoisted"] = hoisted
    if inlined:
        extra["imported"]["functions_inlined"] = inlined
    extra["imported"].update({"sparse_densified": sparse} if sparse else {})
    extra["imported"].update({"scaffolding": scaffold} if any(scaffold.values()) else {})
    extra["imported"].update({"doc_strings_cut": cut} if (cut := trim_doc_strings(proto)) else {})
    extra["imported"].update({"value_info_dropped": stale} if (stale := drop_stale_value_info(proto)) else {})
    extra["imported"].update({"replaced_metadata": replaced} if replaced is not None else {})
    if relabelled:
        extra["imported"]["nodes_renamed"] = relabelled
        log.warning("%s: %d node(s) repeated another node's name and were renamed", name, relabelled)
    if valid:
        extra["imported"]["names"] = valid  # target -> the ONNX initializer it was renamed from
    if tied := tied_copies(sorted(found), arrays):  # said: an adapter on one copy leaves the other as it was
        key = {t.initializer: k for k, t in tensors.items()}
        extra["imported"]["tied"] = {
            key.get(a, renamed.get(a, a)): key.get(b, renamed.get(b, b)) for a, b in tied.items()
        }
        log.warning("%s: targets hold the same values as others (tied or identical): %s", name, tied)
    # what the fingerprint cannot hash (bfloat16, float8, int4): checked after the weights' own refusals, which say more
    refuse_unstored(held, f"ONNX model {name!r}", graph=graph)
    info = ModelInfo(name, fingerprint(arrays), tensors, *io_names, extra)  # skl2onnx labels too
    set_metadata(proto, META_KEY, info.to_json())
    if folded:
        check_same_outputs(before, proto)
    for kind, items in (("unmatched", unmatched), ("ambiguous", ambiguous), ("missing", missing)):
        if items:
            log.warning("%s: %d %s name(s): %s", name, len(items), kind, list(items)[:10])
    return ImportReport(info, renamed, tuple(unmatched), ambiguous, tuple(missing), skipped, tuple(folded))


# -- finding weights ------------------------------------------------------------------------------------------------


@dataclass
class _View:
    """How an op reads a stored initializer, in the torch layout."""

    shape: tuple[int, ...]  # torch shape
    transposed: bool  # stored as its 2-D transpose (else as it, reshaped)
    fold: np.ndarray | None = None  # new stored value when the layout needs folding
    ops: tuple[str, ...] = ()


def _find_weights(graph, arrays: Mapping[str, np.ndarray]):
    producer = {o: n for n in graph.node for o in n.output}
    users = consumers(graph)
    protected = {o.name for o in graph.output} | subgraph_reads(graph)
    found: dict[str, _View] = {}
    skipped: dict[str, str] = {}
    dead: set[str] = set()  # outputs of folded Transpose/Reshape chains
    rewire: list[tuple] = []  # (node, input slot, initializer) it reads once folded
    left: set[str] = set()  # MatMul's left operand (W @ x): said, not adapted
    gathered: dict[str, str] = {}  # read by a Gather that is no row lookup: said unless another reader adapts it
    foreign: dict[str, tuple[str, str]] = {}  # read by an op of another domain, in a layout not known: (domain, where)
    for node in graph.node:
        kind = _kind(node)
        slot = WEIGHT_INPUTS.get(kind)
        if slot is None or len(node.input) <= slot:
            for value in node.input if node.domain not in ("", "ai.onnx") and kind is None else ():
                if value in arrays and arrays[value].ndim >= 2 and floating(arrays[value].dtype):
                    where = f"read by {node.domain} {node.op_type} {node.name or node.output[0]!r}"
                    foreign.setdefault(value, (node.domain, where))
            continue
        if kind == "MatMul" and node.input[0] in arrays and node.input[1] not in arrays:
            left.add(node.input[0])
        chain, value = [], node.input[slot]
        while value not in arrays and value in producer and producer[value].op_type in _PASS_THROUGH:
            chain.append(producer[value])
            value = producer[value].input[0]
        if value in arrays and floating(arrays[value].dtype) and arrays[value].dtype != np.float32:
            skipped.setdefault(value, f"stored as {arrays[value].dtype} (only float32 weights are adapted)")
        elif value in arrays and arrays[value].dtype in (np.int8, np.uint8) and any(c.op_type == "Cast" for c in chain):
            skipped.setdefault(value, f"stored as {arrays[value].dtype}, cast to float with no scale (not adapted)")
        if value not in arrays or arrays[value].dtype != np.float32 or arrays[value].size < 2:
            continue
        try:
            view = _torch_view(node, kind, chain, arrays[value], arrays, producer)
        except _NotAWeight as e:
            skipped.setdefault(value, str(e))
            continue
        if view is None:  # a Gather that is no row lookup of a 2-D table
            ndim = arrays[value].ndim
            axis = _gather_axis({a.name: a.i for a in node.attribute}, ndim)
            gathered.setdefault(
                value,
                f"gathered on axis {axis} of a {ndim}-D table (only the rows of a 2-D embedding table are adapted)",
            )
            continue
        if view.fold is not None:  # only when the chain serves this op alone may it be dropped
            names = [value, *(c.output[0] for c in chain)]
            if any(n in protected or len(users.get(n, [])) != 1 for n in names):
                skipped[value] = f"read through {'/'.join(view.ops[:-1])} in a layout the metadata cannot record"
                continue
            rewire.append((node, slot, value))  # the op will read the (permuted) initializer directly
            dead.update(names[1:])
        prior = found.get(value)
        if prior is not None and (prior.shape, prior.transposed) != (view.shape, view.transposed):
            skipped[value] = f"read in two layouts ({'/'.join(prior.ops)} and {kind})"
            continue
        found.setdefault(value, view)
    for value in left - set(found) - set(skipped):
        skipped[value] = "read as MatMul's left operand (W @ x); only x @ W (torch's Linear) is adapted"
    for value, why in gathered.items():
        if value not in found and value not in skipped:
            skipped[value] = why
    for value, (domain, where) in foreign.items():  # onnxruntime's NCHWc Conv reads a blocked filter layout, for one
        hint = (
            "; import the model as exported, before onnxruntime's optimizations (of its fused ops only FusedConv, "
            "FusedGemm and FusedMatMul are read)"
            if domain.startswith("com.microsoft")
            else " (a custom op)"
        )
        skipped.setdefault(value, f"{where}, whose weight layout is not known here{hint}")
    for value in skipped:
        found.pop(value, None)
    return found, skipped, dead, rewire


def _kind(node) -> str | None:
    """The standard op whose weight layout ``node`` reads (itself, or what an onnxruntime fused op fuses)."""
    if node.domain in ("", "ai.onnx"):
        return node.op_type if node.op_type in WEIGHT_INPUTS else None
    return FUSED.get(node.op_type) if node.domain == "com.microsoft" else None


def _torch_view(node, op: str, chain, stored: np.ndarray, arrays, producer) -> _View | None:
    """The torch-layout view of ``stored`` that ``node`` (computing ``op``) reads through ``chain`` (innermost op last).

    The layout is worked out on an array of flat positions pushed through the chain (only when there is one).
    """
    ops = (*(c.op_type for c in chain), op)
    attrs = {a.name: a.i for a in node.attribute}
    if attrs.get("transBatchB", 0):  # FusedMatMul's batch transpose: no linear layer reads its weight so
        raise _NotAWeight(f"{node.op_type} reads it with transBatchB (only x @ W and x @ W.T are adapted)")
    direct = None if chain else _direct_layout(op, stored.ndim, attrs)
    if direct is not None:  # read as stored: no position array needed (embeddings can be huge)
        return _View(stored.shape[::-1] if direct else stored.shape, direct, ops=ops)
    idx = np.arange(stored.size, dtype=np.int64).reshape(stored.shape)
    for c in reversed(chain):
        idx = _apply(c, idx, arrays, producer)
    consumed = idx
    if op == "MatMul":
        if idx.ndim != 2:
            raise _NotAWeight(f"MatMul reads it as {idx.ndim}-D (only 2-D weights are adapted)")
        idx = idx if attrs.get("transB", 0) else idx.T  # FusedMatMul's transB reads [out, in], as Gemm's
    elif op == "Gemm":
        idx = idx if attrs.get("transB", 0) else idx.T
    elif op == "Gather":
        if _gather_axis(attrs, idx.ndim) != 0 or idx.ndim != 2:
            return None  # not an embedding table: said by _find_weights unless another reader adapts it
    elif idx.ndim < 3:
        raise _NotAWeight(f"{op} weight of {idx.ndim} dims")
    shape = tuple(int(s) for s in idx.shape)
    flat = np.arange(stored.size, dtype=np.int64)
    if np.array_equal(idx.reshape(-1), flat):
        return _View(shape, False, ops=ops)
    if len(shape) == 2 and stored.shape == shape[::-1] and np.array_equal(idx, flat.reshape(shape[::-1]).T):
        return _View(shape, True, ops=ops)
    # Store what the op reads, so its torch layout is the stored one (or its 2-D transpose, for MatMul/Gemm).
    return _View(shape, idx is not consumed, fold=stored.reshape(-1)[consumed], ops=ops)


def _direct_layout(op: str, ndim: int, attrs) -> bool | None:
    """Whether an op reading an initializer directly reads the 2-D transpose of the torch layout (None: unknown)."""
    if op == "MatMul" and ndim == 2 or op == "Gemm":
        return not attrs.get("transB", 0)  # x @ W reads [in, out]; torch stores [out, in]
    if op.startswith("Conv") and ndim >= 3 or op == "Gather" and ndim == 2 and _gather_axis(attrs, ndim) == 0:
        return False
    return None


def _gather_axis(attrs, ndim: int) -> int:
    axis = attrs.get("axis", 0)
    return axis + ndim if axis < 0 else axis
