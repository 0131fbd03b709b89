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
    left out; run on a light copy (:func:`_light_model`): no weight is copied. {} when it fails."""
    import onnx

    light, constants = _light_model(proto)
    try:
        out = onnx.shape_inference.infer_shapes(light)
    except Exception as e:  # onnx's InferenceError and protobuf errors: nothing can be checked, nothing dropped
        log.debug("value_info not checked: shape inference failed (%s)", e)
        return {}
    return {v.name: v.type for v in (*out.graph.value_info, *constants)}


def _light_model(proto):
    """The model as shape inference needs it, and the main graph's big ``Constant`` outputs as typed values: the main
    graph's large initializers and large ``Constant`` nodes' values as typed inputs (nothing to read for a shape);
    in If/Loop/Scan bodies (nested too) and local functions, where a value cannot become a graph input, every tensor
    over :data:`_SMALL` elements (body initializers, ``Constant`` values, any tensor attribute) keeps its name, dims
    and data type but no data. Before, nodes holding bodies were copied whole, and inference copied them again: a
    256 MB Constant in an If body cost 1 GB at peak. Types are the same as the whole model's (a tensor that large is
    no shape an op reads)."""
    import onnx
    from onnx import helper

    g = proto.graph
    light = onnx.ModelProto(ir_version=max(proto.ir_version, 4))
    light.opset_import.extend(proto.opset_import)
    for f in proto.functions:
        _copy(f, light.functions.add(), node=_light_node)
    lg = light.graph
    lg.input.extend(g.input)
    lg.output.extend(g.output)
    constants = []  # a big Constant's output as a typed input: the type inference gives it, without the data
    for node in g.node:
        t = _big_constant(node)
        if t is None:
            _light_node(node, lg.node.add())
        else:
            constants.append(helper.make_tensor_value_info(node.output[0], t.data_type, list(t.dims)))
    lg.input.extend(constants)
    for t in g.initializer:
        if _elements(t) <= _SMALL:
            lg.initializer.append(t)
        else:
            lg.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    for sp in g.sparse_initializer:  # (stored dense by the import before this runs)
        lg.input.append(helper.make_tensor_value_info(sp.values.name, sp.values.data_type, list(sp.dims)))
    return light, constants


def _copy(src, dst, **light) -> None:
    """Copy message ``src`` into the empty ``dst`` field by field; the fields named in ``light`` through their
    function ``(item, empty target)`` (each item of a repeated one)."""
    for field, value in src.ListFields():
        fill = light.get(field.name)
        many = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
        if fill is not None:
            for item in value if many else [value]:
                fill(item, getattr(dst, field.name).add() if many else getattr(dst, field.name))
        elif many:
            getattr(dst, field.name).extend(value)
        elif field.message_type is not None:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def _light_node(node, dst) -> None:
    if not any(a.HasField("g") or a.graphs or _tensors(a) for a in node.attribute):
        dst.CopyFrom(node)  # the common case: nothing held, nothing large
        return
    _copy(node, dst, attribute=_light_attribute)


def _tensors(a) -> bool:
    """Whether attribute ``a`` holds a tensor (dense or sparse) over :data:`_SMALL` elements."""
    held = [a.t] * a.HasField("t") + list(a.tensors) + [a.sparse_tensor] * a.HasField("sparse_tensor")
    return any(_big(t if t.DESCRIPTOR.name == "TensorProto" else t.values) for t in (*held, *a.sparse_tensors))


def _light_attribute(a, dst) -> None:
    _copy(
        a,
        dst,
        t=_light_tensor,
        tensors=_light_tensor,
        g=_light_graph,
        graphs=_light_graph,
        sparse_tensor=_light_sparse,
        sparse_tensors=_light_sparse,
    )


def _light_graph(g, dst) -> None:
    _copy(g, dst, node=_light_node, initializer=_light_tensor, sparse_initializer=_light_sparse)


def _light_tensor(t, dst) -> None:
    if not _big(t):
        dst.CopyFrom(t)
        return
    dst.name, dst.data_type = t.name, t.data_type
    dst.dims.extend(t.dims)


def _light_sparse(sp, dst) -> None:
    if not _big(sp.values):
        dst.CopyFrom(sp)
        return
    dst.dims.extend(sp.dims)
    dst.values.name, dst.values.data_type = sp.values.name, sp.values.data_type
    dst.indices.data_type = sp.indices.data_type


def _big(t) -> bool:
    """Over :data:`_SMALL` elements, or over 16 bytes per element allowed (a string tensor, or data not fitting its
    dims)."""
    return _elements(t) > _SMALL or t.ByteSize() > 16 * _SMALL + 4096


def _elements(t) -> int:
    size = 1
    for d in t.dims:
        size *= max(int(d), 0)
    return size


def _big_constant(node):
    """The tensor of a default-domain ``Constant`` node holding more than :data:`_SMALL` elements, else None."""
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.output) != 1:
        return None
    t = next((a.t for a in node.attribute if a.name == "value" and a.HasField("t")), None)
    return t if t is not None and _elements(t) > _SMALL else None


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
