"""The ``graph.value_info`` an imported ONNX file keeps: only entries that still describe a value of its graph, as
onnx's shape inference sees it.

``value_info`` is a hint an exporter writes (the type and shape of intermediate values). After
:func:`edge.convert.onnx_import.make_adapter_ready` rewrites the graph (scaffolding simplified, folded chains dropped,
sparse tensors densified), or in a file edited by hand, an entry may name a value no node makes any more, repeat an
initializer's or a graph input's type (a conflicting one makes onnx's shape inference, and so the router's tap
shapes, fail), or give an intermediate value another type or shape than its node makes. Measured (onnxruntime 1.32,
onnx 1.20): a wrong element type fails the session's load; a wrong shape loads (onnxruntime warns and merges
leniently) but :func:`edge.route.tapshapes.tensor_shapes` takes it as the value's shape, so a tap is sized wrong.
:func:`drop_stale_value_info` drops such entries; entries inference cannot check (values after a custom or fused op)
stay as the file has them.
"""

from __future__ import annotations

import logging

from edge.format.onnx_graph import keep_only

__all__ = ["drop_stale_value_info"]

log = logging.getLogger("edge.convert.onnx_import")
_SMALL = 1024  # initializers of at most this many elements are copied for inference (shapes read from constants)


def drop_stale_value_info(proto) -> int:
    """Drop the main graph's ``value_info`` entries that are stale (module doc); return how many went."""
    graph = proto.graph
    made = {o for n in graph.node for o in n.output if o}
    declared = {t.name for t in graph.initializer} | {v.name for v in (*graph.input, *graph.output)}
    before = len(graph.value_info)
    keep_only(graph.value_info, lambda v: v.name in made and v.name not in declared)
    inferred = _inferred_types(proto) if graph.value_info else {}
    keep_only(graph.value_info, lambda v: not _conflicts(v.type, inferred.get(v.name)))
    if len(graph.value_info) != before:
        log.info("%s: %d stale value_info entries dropped", graph.name[:80], before - len(graph.value_info))
    return before - len(graph.value_info)


def _inferred_types(proto) -> dict:
    """``{value: TypeProto}`` onnx's shape inference gives the main graph's node outputs, the file's own value_info
    left out; run on a light copy (large initializers as typed inputs: no weight is copied). {} when it fails."""
    import onnx
    from onnx import helper

    g = proto.graph
    light = onnx.ModelProto(ir_version=max(proto.ir_version, 4))
    light.opset_import.extend(proto.opset_import)
    light.functions.extend(proto.functions)
    lg = light.graph
    lg.node.extend(g.node)
    lg.input.extend(g.input)
    lg.output.extend(g.output)
    for t in g.initializer:
        size = 1
        for d in t.dims:
            size *= max(int(d), 0)
        if size <= _SMALL:
            lg.initializer.append(t)
        else:
            lg.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    try:
        out = onnx.shape_inference.infer_shapes(light)
    except Exception as e:  # onnx's InferenceError and protobuf errors: nothing can be checked, nothing dropped
        log.debug("value_info not checked: shape inference failed (%s)", e)
        return {}
    return {v.name: v.type for v in out.graph.value_info}


def _conflicts(given, inferred) -> bool:
    """Whether the file's type for a value contradicts the inferred one (element type, rank or a fixed dimension)."""
    if inferred is None or not given.HasField("tensor_type") or not inferred.HasField("tensor_type"):
        return False
    a, b = given.tensor_type, inferred.tensor_type
    if a.elem_type and b.elem_type and a.elem_type != b.elem_type:
        return True
    if not (a.HasField("shape") and b.HasField("shape")):
        return False
    if len(a.shape.dim) != len(b.shape.dim):
        return True
    return any(
        x.HasField("dim_value") and y.HasField("dim_value") and x.dim_value != y.dim_value
        for x, y in zip(a.shape.dim, b.shape.dim)
    )
