"""Constant scaffolding torch's dynamo exporter writes and onnxruntime never folds, rewritten in the graph.

torch 2.13's exporter (unoptimized, as :func:`exporters.onnx.export_onnx` runs it so that weights keep their torch
names) writes every scalar an op needs as ``CastLike(Constant, x)``: the constant cast to the type of an activation
``x``. Because ``x`` is computed at run time, onnxruntime folds none of them, and whatever reads them is not
constant either:

- a **bias-less Conv** (every CNN whose convs feed a BatchNorm: ResNet, MobileNet, EfficientNet, RegNet, and the HF
  CNNs) gets a zero bias ``Expand(CastLike(0, x), Expand(Shape(weight)[0:1], [1]))``, so onnxruntime cannot fold
  the BatchNorm into the Conv, and runs three extra nodes per conv;
- a **ReLU6 / Hardtanh** (``Clip``) gets its bounds the same way, so it is never fused into the Conv before it.

Measured on this machine (onnxruntime 1.32, one thread, batch 1, 2026-12-02): a MobileNetV2-shaped net (13 MB of
weights, 52 convs) ran 25.6 ms as exported and 11.2 ms with its zero biases dropped; a ResNet-18-shaped one 50.7
against 38.4 ms; outputs equal within 2e-8.

:func:`simplify` rewrites, in place: a ``CastLike`` of a small constant to an activation whose element type the
graph tells (:func:`element_types`) becomes a ``Constant`` of that type (the same output name); a Conv bias that is
torch's zero bias (an all-zero constant expanded to the weight's first dimension, ``Shape(weight)[0:1]``) is dropped
(the input is optional: no bias); the nodes nothing reads any more go. Initializers are never touched (a bias that
is a parameter stays, whatever its values: it may be an adapter target), so a file's fingerprint is the same before
and after. Used by the exporter and by ``edge import-onnx``.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["drop_unread", "element_types", "simplify"]

#: ops whose first output has the element type of their first input
_SAME_AS_FIRST = frozenset(
    "Abs AveragePool BatchNormalization Clip Concat Conv ConvTranspose Div Dropout Elu Erf Exp Expand Flatten Gelu "
    "Gemm GlobalAveragePool GlobalMaxPool GroupNormalization HardSigmoid HardSwish Identity InstanceNormalization "
    "LayerNormalization LeakyRelu LpNormalization MatMul Max MaxPool Min Mish Mul Neg Pad Pow PRelu ReduceMax "
    "ReduceMean ReduceMin ReduceSum Relu Reshape Resize Selu Sigmoid Sign Slice Softmax LogSoftmax Softplus Split "
    "Sqrt Squeeze Sub Sum Tanh Tile Transpose Unsqueeze Upsample".split()
)
#: ops whose outputs are int64 whatever they read
_INT64 = frozenset({"Shape", "Size", "ArgMax", "ArgMin", "NonZero"})
#: a constant this large (elements) or larger is never rewritten: the scaffolding is scalars and short vectors
_SMALL = 64


def element_types(graph) -> dict[str, int]:
    """``TensorProto`` element type of every value the graph declares or its ops tell (nodes in graph order)."""
    from onnx import TensorProto

    types: dict[str, int] = {}
    for v in (*graph.input, *graph.value_info, *graph.output):
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
            types[v.name] = v.type.tensor_type.elem_type
    for t in graph.initializer:
        types[t.name] = t.data_type
    for n in graph.node:
        if not n.output or n.domain not in ("", "ai.onnx"):
            continue
        known = None
        if n.op_type in _SAME_AS_FIRST and n.input and n.input[0] in types:
            known = types[n.input[0]]
        elif n.op_type == "CastLike" and len(n.input) > 1 and n.input[1] in types:
            known = types[n.input[1]]
        elif n.op_type == "Cast":
            known = next((a.i for a in n.attribute if a.name == "to"), None)
        elif n.op_type in _INT64:
            known = TensorProto.INT64
        elif n.op_type == "Constant" and (value := _constant_value(n)) is not None:
            known = _np_to_onnx(value.dtype)
        if known:
            for o in n.output if n.op_type == "Split" else n.output[:1]:
                types.setdefault(o, known)
    return types


def simplify(graph) -> dict[str, int]:
    """Rewrite the scaffolding (module doc) in ``graph`` in place; return how many of each rewrite were made."""
    from onnx import helper, numpy_helper

    types = element_types(graph)
    producer = {o: n for n in graph.node for o in n.output if o}
    folded = 0
    for i, n in enumerate(graph.node):
        if n.op_type != "CastLike" or n.domain not in ("", "ai.onnx") or len(n.input) != 2:
            continue
        value = _small_constant(n.input[0], producer)
        to = _numpy_type(types.get(n.input[1]))
        if value is None or to is None or not _exact_cast(value, to):
            continue
        const = helper.make_node(
            "Constant", [], [n.output[0]], name=n.name, value=numpy_helper.from_array(value.astype(to), n.output[0])
        )
        graph.node[i].CopyFrom(const)
        producer[n.output[0]] = graph.node[i]
        folded += 1
    dropped = 0
    for n in graph.node:
        if n.op_type == "Conv" and n.domain in ("", "ai.onnx") and len(n.input) == 3 and n.input[2]:
            if _computed_zero(n.input[2], n.input[1], producer):
                del n.input[2]
                dropped += 1
    removed = drop_unread(graph) if folded or dropped else 0
    return {"castlike_folded": folded, "zero_bias_dropped": dropped, "nodes_removed": removed}


def _constant_value(node):
    """The value of a ``Constant`` node as a numpy array (None: a sparse or unknown attribute)."""
    import numpy as np
    from onnx import numpy_helper

    for a in node.attribute:
        if a.name == "value" and a.HasField("t"):
            try:
                return numpy_helper.to_array(a.t)
            except (TypeError, ValueError):  # an element type numpy has no dtype for
                return None
        if a.name in ("value_float", "value_int"):
            return np.array(
                a.f if a.name == "value_float" else a.i, np.float32 if a.name == "value_float" else np.int64
            )
        if a.name in ("value_floats", "value_ints"):
            return np.array(
                a.floats if a.name == "value_floats" else a.ints, np.float32 if a.name == "value_floats" else np.int64
            )
    return None


def _small_constant(value: str, producer: Mapping):
    """The value of ``value`` when a ``Constant`` node of at most :data:`_SMALL` numeric elements makes it."""
    n = producer.get(value)
    if n is None or n.op_type != "Constant" or n.domain not in ("", "ai.onnx"):
        return None
    v = _constant_value(n)
    return v if v is not None and v.size <= _SMALL and v.dtype.kind in "fiub" else None


def _computed_zero(value: str, weight: str, producer: Mapping) -> bool:
    """Whether ``value`` is torch's zero bias of a conv reading ``weight``: ``Expand`` of a small all-zero
    ``Constant`` (through ``Cast``/``CastLike``) to a shape that is the weight's first dimension, ``Shape(weight)``
    sliced to ``[0:1]`` (through ``Expand``/``Identity`` of it). A bias of any other shape is left, as the graph has it
    (onnxruntime refuses it at run time: dropping it would make a broken model run)."""
    n = producer.get(value)
    if n is None or n.op_type != "Expand" or n.domain not in ("", "ai.onnx") or len(n.input) != 2:
        return False
    z = producer.get(n.input[0])
    while z is not None and z.op_type in ("Cast", "CastLike") and z.domain in ("", "ai.onnx"):
        z = producer.get(z.input[0])
    v = None if z is None else _small_constant(z.output[0], producer)
    if v is None or v.size != 1 or v.any():
        return False
    s = producer.get(n.input[1])
    while s is not None and s.op_type in ("Expand", "Identity") and s.domain in ("", "ai.onnx"):
        s = producer.get(s.input[0])  # Expand(Shape(w)[0:1], [1]): still [C_out]
    if s is None or s.op_type != "Shape" or s.domain not in ("", "ai.onnx") or s.input[0] != weight:
        return False
    at = {a.name: a.i for a in s.attribute}
    return at.get("start", 0) == 0 and at.get("end") == 1


def _exact_cast(value, to) -> bool:
    """Whether ``value`` cast to ``to`` keeps every value (a scaffolding constant always does; anything else is left
    as the graph has it, CastLike and all)."""
    import numpy as np

    with np.errstate(all="ignore"):
        back = value.astype(to).astype(value.dtype)
    return bool(np.array_equal(back, value))


def _numpy_type(elem: int | None):
    from onnx import TensorProto, helper

    if elem in (None, 0, TensorProto.STRING, TensorProto.BFLOAT16) or elem >= TensorProto.FLOAT8E4M3FN:
        return None
    try:
        return helper.tensor_dtype_to_np_dtype(elem)
    except (KeyError, ValueError):
        return None


def _np_to_onnx(dtype) -> int | None:
    from onnx import helper

    try:
        return helper.np_dtype_to_tensor_dtype(dtype)
    except (KeyError, ValueError, TypeError):
        return None


def drop_unread(graph, protected: set[str] | frozenset = frozenset()) -> int:
    """Remove nodes none of whose outputs a node, a subgraph, the graph's outputs or ``protected`` read (repeatedly:
    their inputs' makers go too); drop the value_info of values nothing makes. Return how many nodes went."""
    from edge.format.onnx_graph import keep_only, subgraph_reads

    before = len(graph.node)
    protected = {o.name for o in graph.output} | subgraph_reads(graph) | set(protected)
    while True:
        read = {i for n in graph.node for i in n.input} | protected
        if all(any(o in read for o in n.output) for n in graph.node):
            break
        keep_only(graph.node, lambda n, read=read: any(o in read for o in n.output))
    produced = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    produced |= {t.name for t in graph.initializer}
    keep_only(graph.value_info, lambda v: v.name in produced)
    return before - len(graph.node)
