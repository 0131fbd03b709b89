"""Small edits and look-ups on ONNX graphs that the exporter (host) and the importer (device) share."""

from __future__ import annotations

import re
from collections import defaultdict

__all__ = [
    "QUANTIZED_OPS",
    "QUANTIZED_PREFIXES",
    "batch_dim",
    "batch_folded",
    "consumers",
    "keep_only",
    "quantized_ops",
    "refuse_sparse",
    "set_metadata",
    "sparse_tensors",
    "subgraph_reads",
]

#: ops of a graph quantized by a tool (onnxruntime's quantizers, its optimizer's contrib fusions; QLinear* too)
QUANTIZED_OPS = (
    "DequantizeLinear",
    "QuantizeLinear",
    "DynamicQuantizeLinear",
    "MatMulInteger",
    "ConvInteger",
    "QLinearMatMul",
    "QLinearConv",
    "MatMulNBits",
    "QGemm",
    # onnxruntime's contrib ops of a quantized graph it optimized and saved (QLinearAdd and the other QLinear* too)
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
    "QAttention",
    "QEmbedLayerNormalization",
    # onnxruntime's other quantizers: MatMulNBits' 4-bit embeddings, bnb4; and its other integer contrib ops
    "GatherBlockQuantized",
    "MatMulBnb4",
    "MatMulFpQ4",
    "MatMulInteger16",
    "MatMulBlockQuantizedFp4Weight",
    "MatMulBlockQuantizedFp8Weight",
    "DynamicQuantizeLSTM",
    "QMoE",
    "MulInteger",
    "ReduceSumInteger",
    "QuantizeWithOrder",
    "DequantizeWithOrder",
    "QuantizeBFP",
    "DequantizeBFP",
)
#: prefixes of more such op families (QLinearAdd, QLinearSoftmax...; QOrderedMatMul...; MatMulNBitsQkv...)
QUANTIZED_PREFIXES = ("QLinear", "QOrdered", "MatMulNBits")


def sparse_tensors(proto) -> list[str]:
    """Names of the model's sparse initializers and ``Constant`` sparse values: in the main graph, in local functions
    and in every graph an op holds (If/Loop/Scan, SequenceMap, contrib ops), at any depth."""
    every = graphs(proto.graph, proto.functions)
    nodes = [*(n for g in every for n in g.node), *(n for f in proto.functions for n in f.node)]
    out = [s.values.name[:80] for g in every for s in g.sparse_initializer]
    constants = [n for n in nodes if n.op_type == "Constant" and any(a.name == "sparse_value" for a in n.attribute)]
    return out + [n.output[0][:80] if n.output else "?" for n in constants]


def refuse_sparse(proto, model: str) -> None:
    """Refuse, before any session is made, a model (this project's file) holding sparse tensors: onnxruntime makes
    them dense at load whatever dims they declare (a 849-byte file took 1.5 GB), unchecked, and the weights'
    fingerprint does not cover them. :func:`edge.convert.onnx_import.import_onnx` stores them all dense."""
    sparse = sparse_tensors(proto)
    if sparse:
        from edge.errors import FormatError

        raise FormatError(
            f"model {model!r} holds sparse tensor(s) {sparse[:5]}, which its weights fingerprint does not "
            "cover and onnxruntime would make dense at load, unchecked (an edge import-onnx before this release left "
            "them sparse, or the file was changed after it): import the original file again (edge import-onnx "
            "stores them dense, their size checked)"
        )


def keep_only(field, keep) -> None:
    """Filter a repeated protobuf field in place: only the items dropped are deleted (clearing the field and adding the
    kept ones back copied every kept message, an If node with its bodies' weights too, and protobuf's arena keeps the
    old copies until the model is freed: a 1 GB body cost 1 GB more for the rest of the import)."""
    drop = [i for i, item in enumerate(field) if not keep(item)]
    for i in reversed(drop):
        del field[i]


def consumers(graph) -> dict[str, list]:
    """Value name -> the nodes of ``graph`` that read it (a node reading a value twice counts once)."""
    users: dict[str, list] = defaultdict(list)
    for node in graph.node:
        for name in dict.fromkeys(node.input):
            users[name].append(node)
    return users


def subgraph_reads(graph) -> set[str]:
    """Names read by nodes inside If/Loop/Scan bodies, which the main graph's consumer map does not see."""
    names: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == attr.GRAPH else list(attr.graphs):
                names.update(i for n in sub.node for i in n.input)
                names |= subgraph_reads(sub)
    return names


def graphs(graph, functions=()) -> list:
    """``graph`` and every graph a node of it holds (If/Loop/Scan bodies, any op's graph attribute), nested ones too;
    with ``functions`` (a model's local functions), the graphs their nodes hold as well."""

    def held(nodes) -> list:
        return [g for n in nodes for a in n.attribute for g in ([a.g] if a.type == a.GRAPH else a.graphs)]

    out, todo = [], [graph, *held(n for f in functions for n in f.node)]
    while todo:
        g = todo.pop()
        out.append(g)
        todo += held(g.node)
    return out


def quantized_ops(graph, functions=()) -> list[str]:
    """The quantized op types of ``graph`` and of its If/Loop/Scan bodies, and of the model's local ``functions``
    (sorted; empty for a float graph)."""
    ops = {n.op_type for g in graphs(graph, functions) for n in g.node} | {n.op_type for f in functions for n in f.node}
    return sorted(op for op in ops if op in QUANTIZED_OPS or op.startswith(QUANTIZED_PREFIXES))


def set_metadata(proto, key: str, value: str) -> None:
    """Add or replace the ``metadata_props`` entry ``key`` of a ModelProto."""
    keep_only(proto.metadata_props, lambda p: p.key != key)
    proto.metadata_props.add(key=key, value=value)


def batch_dim(model) -> str | int | None:
    """The first axis of the model's first input (its name, or its size), None when unknown."""
    weights = {i.name for i in model.graph.initializer}
    dims = next((i.type.tensor_type.shape.dim for i in model.graph.input if i.name not in weights), ())
    return (dims[0].dim_param or dims[0].dim_value or None) if dims else None


def batch_folded(dim, batch) -> bool:
    """Whether a tensor's first axis ``dim`` (not ``batch`` itself) provably is not the batch: another fixed size,
    or an expression of the batch's name (``4*batch``: a model that folds patches or windows into the batch)."""
    if isinstance(dim, int) and isinstance(batch, int):
        return dim > 0 and dim != batch
    return isinstance(dim, str) and isinstance(batch, str) and re.search(rf"\b{re.escape(batch)}\b", dim) is not None
