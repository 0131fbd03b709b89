"""Shapes and element types of a model's tensors, for the tap sets (:mod:`edge.route.tapsets`) and :func:`tap_model`.

onnx's shape inference knows the standard ops only. A file saved by onnxruntime's optimizer
(``SessionOptions.optimized_model_filepath``, level BASIC or EXTENDED) holds its fused contrib ops (domain
``com.microsoft``: ``FusedConv``, ``BiasGelu``, ``SkipLayerNormalization``...), and every tensor behind one of them
would be left without a shape: no CNN stage, no tap with a known width. Inference therefore reads a *standard twin*
of such a graph (:data:`FUSED_SHAPES`): each fused op replaced by the standard op whose outputs have the same shapes
(a ``FusedConv`` by its ``Conv``, a ``BiasGelu`` by an ``Identity`` of its input...). The twin is only read for
shapes; nothing runs it. An op outside the table keeps its outputs unknown, and a tap on them is refused by name.
"""

from __future__ import annotations

from collections.abc import Sequence

from edge.errors import FormatError

__all__ = ["FUSED_SHAPES", "elem_types", "feature_shapes", "fused", "tensor_shapes"]

#: onnxruntime's fused ops (domain com.microsoft) -> what the twin reads for their output shapes: ``conv``/``gemm``
#: the standard op without the activation, ``matmul`` an Einsum with the transposes, ``same`` the first input's shape
#: for outputs 0 and 3 (a SkipLayerNormalization's normalised output and its sum), ``embed`` a Gather of the ids
FUSED_SHAPES = {
    "FusedConv": "conv",
    "FusedGemm": "gemm",
    "FusedMatMul": "matmul",
    "Gelu": "same",
    "FastGelu": "same",
    "QuickGelu": "same",
    "BiasGelu": "same",
    "BiasAdd": "same",
    "LayerNormalization": "same",
    "SimplifiedLayerNormalization": "same",
    "SkipLayerNormalization": "same",
    "SkipSimplifiedLayerNormalization": "same",
    "EmbedLayerNormalization": "embed",
}
_ACTIVATION = ("activation", "activation_params", "activation_alpha", "activation_beta", "activation_gamma")
_CONTRIB = ("com.microsoft",)


def fused(node) -> bool:
    """Whether ``node`` is one of onnxruntime's fused ops (:data:`FUSED_SHAPES`; ``SimplifiedLayerNormalization``
    is registered in the standard domain too)."""
    return node.op_type in FUSED_SHAPES and (
        node.domain in _CONTRIB or node.op_type == "SimplifiedLayerNormalization" and node.domain in ("", "ai.onnx")
    )


def _twin_nodes(node) -> list:
    """The standard nodes whose outputs have the shapes of fused ``node``'s (none: its outputs stay unknown)."""
    from onnx import helper

    kind = FUSED_SHAPES[node.op_type]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name not in _ACTIVATION}
    if kind in ("conv", "gemm"):
        op, ins = ("Conv", node.input[:3]) if kind == "conv" else ("Gemm", node.input)
        if kind == "gemm":
            attrs = {k: v for k, v in attrs.items() if k in ("alpha", "beta", "transA", "transB")}
        return [helper.make_node(op, list(ins), node.output[:1], **attrs)]
    if kind == "matmul":
        if attrs.get("transBatchA") or attrs.get("transBatchB"):
            return []
        a = "...ji" if attrs.get("transA") else "...ij"
        b = "...kj" if attrs.get("transB") else "...jk"
        return [helper.make_node("Einsum", node.input[:2], node.output[:1], equation=f"{a},{b}->...ik")]
    if kind == "embed":  # EmbedLayerNormalization(input_ids, segment_ids, word_embedding, ...): [B, S, hidden]
        return [helper.make_node("Gather", [node.input[2], node.input[0]], [o]) for o in node.output[:3:2] if o]
    outs = [o for k, o in enumerate(node.output) if o and k in (0, 3)]
    return [helper.make_node("Identity", node.input[:1], [o]) for o in outs]


def _standard(model):
    """``model``, or its standard twin when it holds fused ops (see the module doc)."""
    import onnx

    if not any(fused(n) for n in model.graph.node):
        return model
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    nodes = [m for n in model.graph.node for m in (_twin_nodes(n) if fused(n) else [n])]
    del twin.graph.node[:]
    twin.graph.node.extend(nodes)
    for o in twin.opset_import:  # Einsum needs opset 12
        if o.domain in ("", "ai.onnx") and o.version < 12 and any(n.op_type == "Einsum" for n in nodes):
            o.version = 12
    return twin


def _inferred(model, twin=None):
    import onnx

    try:
        return onnx.shape_inference.infer_shapes(twin if twin is not None else _standard(model))
    except Exception as e:  # onnx raises InferenceError and protobuf errors
        raise FormatError(f"shape inference failed on model {model.graph.name!r}: {e}") from e


def tensor_shapes(model) -> dict[str, tuple]:
    """Shape (ints, or names for symbolic dims) of every tensor onnx shape inference knows."""
    twin = _standard(model)
    shapes = _shapes_of(_inferred(model, twin))
    if any(o not in shapes for n in model.graph.node for o in n.output if o):
        shapes = {**_symbolic_shapes(twin), **shapes}
    return _norm_widths(model, shapes)


def elem_types(model) -> dict[str, int]:
    """Element type of every tensor onnx's shape inference knows (``{}`` when it fails: shapes then decide)."""
    try:
        g = _inferred(model).graph
    except FormatError:  # tensor_shapes already reported it
        return {}
    return {
        v.name: v.type.tensor_type.elem_type
        for v in [*g.value_info, *g.output, *g.input]
        if v.type.tensor_type.elem_type
    }


def feature_shapes(model, shapes: dict[str, tuple], tensors: Sequence[str]) -> dict[str, tuple]:
    """``shapes`` with the shapes of ``tensors`` whose feature dimension (the last; the second of a 4-D map) onnx's
    inference left unknown taken from onnxruntime's symbolic inference where it knows it (Swin's blocks behind
    window reshapes). The symbolic inference runs only then, so tensors onnx already sizes keep their shapes."""

    def known(shape) -> bool:
        return bool(shape) and len(shape) >= 2 and isinstance(shape[1] if len(shape) >= 4 else shape[-1], int)

    if all(known(shapes.get(t)) for t in tensors):
        return shapes
    symbolic = _symbolic_shapes(_standard(model))
    better = {t: symbolic[t] for t in tensors if not known(shapes.get(t)) and known(symbolic.get(t))}
    return {**shapes, **better}


def _norm_widths(model, shapes: dict[str, tuple]) -> dict[str, tuple]:
    """Fill the last dimension of a last-axis LayerNormalization's input and output from its scale's length where
    inference left it symbolic (Swin's window reshapes): the width of the ``attn``/``mlp-in`` taps."""
    from onnx import helper

    scales = {i.name: tuple(i.dims) for i in model.graph.initializer}
    for n in model.graph.node:
        axis = next((helper.get_attribute_value(a) for a in n.attribute if a.name == "axis"), -1)
        if n.op_type != "LayerNormalization" or len(n.input) < 2 or len(scales.get(n.input[1], ())) != 1:
            continue
        for t in (n.input[0], n.output[0]):
            shape = shapes.get(t)
            if shape and axis in (-1, len(shape) - 1) and not isinstance(shape[-1], int):
                shapes[t] = (*shape[:-1], scales[n.input[1]][0])
    return shapes


def _shapes_of(model) -> dict[str, tuple]:
    shapes = {}
    for v in [*model.graph.value_info, *model.graph.output, *model.graph.input]:
        t = v.type.tensor_type
        if t.HasField("shape"):
            shapes[v.name] = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim)
    return shapes


def _symbolic_shapes(model) -> dict[str, tuple]:
    """Shapes onnx's inference leaves unknown behind reshapes computed from ``Shape`` (a dynamic batch axis
    exported below opset 17), from onnxruntime's symbolic inference: what it found, also when it could not size
    every tensor. Driven as onnxruntime's own ``transformers.shape_infer_helper`` does, not by ``infer_shapes``,
    which on an incomplete inference saves ``sym_shape_infer_temp.onnx`` and its data files into the working
    folder and raises; {} when it fails outright."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        infer = SymbolicShapeInference(2**31 - 1, True, False, 0)
        infer._preprocess(model)
        while infer.run_:
            infer._infer_impl()
        infer._update_output_from_vi()
        return _shapes_of(infer.out_mp_)
    except Exception:  # an op it has no rule for: the taps without a shape are refused by name as before
        return {}
