"""What the graph does with a quantized target's integers, checked against the metadata before any write.

An int8 model's metadata (:class:`~edge.format.modelinfo.QuantInfo`) names each target's scale and zero point; an
adapter is written onto that grid (a float adapter requantized with that scale). The fingerprint covers the
initializers, not the nodes, so a file whose graph reads the integers otherwise (a blocked ``DequantizeLinear``,
another axis, a scale that is a graph input or computed, an op onnxruntime's optimizer fused in) would take adapters
on a grid its kernels do not use. :func:`check_quant_readers` refuses such a file in one line: every reader must be
one :func:`exporters.quantize_onnx` records (``DequantizeLinear`` with that scale, zero point and axis, unblocked;
``MatMulInteger``/``ConvInteger`` reading it as B with that zero point, the scale multiplied in after; a ``Gather``
whose rows only such a ``DequantizeLinear`` reads), or one that reads only its shape.

:func:`refuse_quantized_after_import` is the graph-only part of a load's check that ``edge inspect`` (and every
``read_model_info``) runs too: a file ``edge import-onnx`` wrote (which refuses quantized graphs) whose graph now has
quantized weights (an integer op other than Q/DQ, or a ``DequantizeLinear`` of stored integers) and whose metadata
records no integer target was quantized afterwards by another tool. A load refuses it on its weights' fingerprint;
without this, ``edge inspect`` described such a file (4-bit ``MatMulNBits`` keeping a weight's float copy for a
second reader) as loadable. Q/DQ pairs on activations only change no weight: such a file loads and is described.
"""

from __future__ import annotations

from edge.errors import FormatError
from edge.format.modelinfo import ModelInfo, TensorInfo
from edge.format.onnx_graph import consumers, graphs, quantized_ops, subgraph_reads

__all__ = ["check_quant_readers", "refuse_quantized_after_import"]

_SHAPE_ONLY = ("Shape", "Size")  # read a tensor's shape, never its values
#: onnxruntime's fusions of a quantized graph (SessionOptions.optimized_model_filepath saves them)
_FUSED = ("DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm", "QLinearMatMul", "QLinearConv", "QAttention")


def refuse_quantized_after_import(graph, info: ModelInfo) -> None:
    """Raise :class:`FormatError` if ``info`` is an imported float model's (no ``edge quantize`` twin: those may
    keep every target float, ``AddQDQPairToWeight``) and ``graph`` holds quantized weights: an integer op other than
    a Q/DQ pair (``MatMulNBits``, ``MatMulInteger``, ``QLinearConv``, ...) or a ``DequantizeLinear`` of a stored
    tensor. Q/DQ pairs on activations only leave every weight float: such a file loads, and is described."""
    if "imported" not in info.extra or "quantization" in info.extra:
        return
    found = set(quantized_ops(graph)) - _ACTIVATION_QDQ
    if weights := _dequantized_weights(graph):
        found.add(f"DequantizeLinear of stored integers ({', '.join(weights[:3])})")
    if found:
        raise FormatError(
            f"model {info.name!r} was made adapter-ready by `edge import-onnx`, but its graph has "
            f"{', '.join(sorted(found))}: it was quantized after export by another tool, which records no grids for "
            "adapters; quantize the imported float model with `edge quantize` (exporters.quantize_onnx) instead"
        )


#: quantized ops that may act on activations alone (a Q/DQ pair a tool put on a float model's activations)
_ACTIVATION_QDQ = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}


def _dequantized_weights(graph) -> list[str]:
    """Stored tensors (initializers, ``Constant`` outputs) that a ``DequantizeLinear`` of ``graph`` or of its
    If/Loop/Scan bodies reads as its integers."""
    every = graphs(graph)
    nodes = [n for g in every for n in g.node]
    stored = {t.name for g in every for t in g.initializer} | {
        o for n in nodes if n.op_type == "Constant" for o in n.output
    }
    return sorted({n.input[0] for n in nodes if n.op_type == "DequantizeLinear" and n.input and n.input[0] in stored})


def check_quant_readers(proto, info: ModelInfo) -> None:
    """Raise :class:`FormatError` unless every node reading a quantized target applies the metadata's grid.

    A model with no quantized target (every float model) has nothing to check: the graph is not walked."""
    if all(t.quant is None for t in info.tensors.values()):
        return
    graph = proto.graph
    users = consumers(graph)
    inputs = {v.name for v in graph.input}
    nested = subgraph_reads(graph)
    for name, t in info.tensors.items():
        q = t.quant
        if q is None:
            continue
        fed = sorted({q.scale, q.zero_point} & inputs)
        if fed:
            raise FormatError(f"{name}: its scale or zero point {fed} is a graph input: a caller could change the grid")
        if t.initializer in nested:
            raise FormatError(
                f"{name}: {t.initializer!r} is read inside a control-flow body, whose grid is not checked"
            )
        readers = users.get(t.initializer, ())
        if not readers:  # the graph reads a copy (a Constant node, say) or nothing: adapters would change nothing
            raise FormatError(
                f"model {info.name!r}: quantized target {name!r} ({t.initializer!r}) is read by no node, so an "
                "adapter written there would change nothing; re-make the int8 model with `edge quantize` "
                "(exporters.quantize_onnx)"
            )
        for node in readers:
            why = _why_not(node, t.initializer, t, users, nested)
            if why:
                hint = (
                    "; onnxruntime's optimizer writes it: load the file `edge quantize` wrote (the runtime lets "
                    "onnxruntime optimize it in memory), not one saved with optimized_model_filepath"
                    if node.op_type in _FUSED
                    else "; re-make the int8 model with `edge quantize` (exporters.quantize_onnx)"
                )
                raise FormatError(f"model {info.name!r}: quantized target {name!r} {why}{hint}")


def _why_not(node, value: str, t: TensorInfo, users, nested) -> str:
    """Why ``node`` reading ``value`` (``t``'s integers, or rows gathered from them) is off the metadata's grid."""
    q, op = t.quant, node.op_type
    ins = list(node.input)
    at = f"{op} {node.name or node.output[0]!r}"
    if op in _SHAPE_ONLY:
        return ""
    if op == "DequantizeLinear" and ins[0] == value and value not in ins[1:]:
        if ins[1:3] != [q.scale, q.zero_point]:
            return (
                f"is dequantized by {at} with scale/zero point {ins[1:3]}, not the metadata's {[q.scale, q.zero_point]}"
            )
        attrs = {a.name: a.i for a in node.attribute}
        if attrs.get("block_size", 0):
            return f"is dequantized by {at} in blocks of {attrs['block_size']} (a scale per block, not per channel)"
        if t.stored_quant_axis is not None and attrs.get("axis", 1) % len(t.stored_shape) != t.stored_quant_axis:
            return f"is dequantized by {at} along axis {attrs.get('axis', 1)}, not the metadata's stored axis"
        return ""
    if op in ("MatMulInteger", "ConvInteger") and ins.index(value) == 1 and ins.count(value) == 1:
        if ins[3:4] != [q.zero_point]:
            return f"is read by {at} with zero point {ins[3:4]}, not the metadata's {q.zero_point!r}"
        return _scaled_by(node, q.scale, users, at)
    if op == "Gather" and ins[0] == value and value not in ins[1:]:
        rows = users.get(node.output[0], ())
        if t.quant.axis is not None or not rows or any(n.op_type != "DequantizeLinear" for n in rows):
            return f"is gathered by {at}, whose rows are not dequantized with one scale"
        return next((w for n in rows if (w := _why_not(n, node.output[0], t, users, nested))), "")
    return f"is read by {at} (input {ins.index(value)}), which this runtime does not know the grid of"


def _scaled_by(node, scale: str, users, at: str) -> str:
    """Why the integer product of ``node`` is not turned to float with ``scale`` ('' if it is): its one reader must
    be a Cast to float whose one reader is a Mul by ``scale`` or by a Mul that reads ``scale`` (onnxruntime's
    dynamic quantization multiplies the input's scale into the weight's first), as :func:`exporters.quantize_onnx`
    writes it; another scale there would put the adapters on a grid the graph does not use."""
    cast = users.get(node.output[0], ())
    if len(cast) != 1 or cast[0].op_type != "Cast" or {a.name: a.i for a in cast[0].attribute}.get("to") != 1:
        return f"is read by {at}, whose integer product is not cast to float alone"
    mul = users.get(cast[0].output[0], ())
    if len(mul) != 1 or mul[0].op_type != "Mul":
        return f"is read by {at}, whose product is not multiplied by a scale alone"
    other = [i for i in mul[0].input if i != cast[0].output[0]]
    if other == [scale]:
        return ""
    producers = [n for n in users.get(scale, ()) if n.op_type == "Mul" and n.output[0] in other]
    if len(other) == 1 and producers:
        return ""
    return f"is read by {at}, whose product is multiplied by {other}, not by its scale {scale!r}"
