"""Shapes, element types and layouts of a model's tensors, for the tap sets (:mod:`edge.route.tapsets`) and
:func:`tap_model`.

onnx's shape inference knows the standard ops only. A file saved by onnxruntime's optimizer
(``SessionOptions.optimized_model_filepath``, level BASIC or EXTENDED) holds its fused contrib ops (domain
``com.microsoft``: ``FusedConv``, ``BiasGelu``, ``SkipLayerNormalization``...), and every tensor behind one of them
would be left without a shape: no CNN stage, no tap with a known width. Inference therefore reads a *standard twin*
of such a graph (:data:`FUSED_SHAPES`): each fused op replaced by the standard op whose outputs have the same shapes
(a ``FusedConv`` by its ``Conv``, a ``BiasGelu`` by an ``Identity`` of its input...). The twin is only read for
shapes; nothing runs it. An op outside the table keeps its outputs unknown, and a tap on them is refused by name.

A tap's layout (:class:`Layouts`: its channels second, ``[B, C, *spatial]``, or last, ``[B, T, C]``) is told by the
ops that make or read it, not by its rank: a 1-D CNN's ``[B, C, L]`` and a token sequence's ``[B, T, C]`` are both
3-D.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from edge.errors import FormatError

__all__ = [
    "decoded",
    "FIRST",
    "FUSED_SHAPES",
    "LAST",
    "LAYOUTS",
    "Layouts",
    "elem_types",
    "feature_shapes",
    "fused",
    "symbolic_shapes",
    "tensor_shapes",
    "unsized",
]

#: onnxruntime's fused ops (domain com.microsoft) -> what the twin reads for their output shapes: ``conv``/``gemm``
#: the standard op without the activation, ``matmul`` an Einsum with the transposes, ``same`` the first input's shape
#: for outputs 0 and 3 (a SkipLayerNormalization's normalised output and its sum), ``embed`` a Gather of the ids,
#: ``attention`` its input's shape when its values are as wide as its input (BERT's: packed weights ``[d, 3 d]``)
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
    "Attention": "attention",
}
_ACTIVATION = ("activation", "activation_params", "activation_alpha", "activation_beta", "activation_gamma")
_CONTRIB = ("com.microsoft",)


def fused(node) -> bool:
    """Whether ``node`` is one of onnxruntime's fused ops (:data:`FUSED_SHAPES`; ``SimplifiedLayerNormalization``
    is registered in the standard domain too)."""
    return node.op_type in FUSED_SHAPES and (
        node.domain in _CONTRIB or node.op_type == "SimplifiedLayerNormalization" and node.domain in ("", "ai.onnx")
    )


def _twin_nodes(node, dims: dict[str, list[int]]) -> list:
    """The standard nodes whose outputs have the shapes of fused ``node``'s (none: its outputs stay unknown);
    ``dims``: the stored tensors' shapes."""
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
    if kind == "attention":  # Attention(input [B, S, d], weights [d, q + k + v], ...) -> [B, S, v]
        w = dims.get(node.input[1], [])
        sizes = attrs.get("qkv_hidden_sizes") or ([w[1] // 3] * 3 if len(w) == 2 else [])
        same = len(w) == 2 and len(sizes) == 3 and sizes[2] == w[0]  # else its outputs stay unknown
        return [helper.make_node("Identity", node.input[:1], node.output[:1])] if same else []
    if kind == "embed":  # EmbedLayerNormalization(input_ids, segment_ids, word_embedding, ...): [B, S, hidden]
        return [helper.make_node("Gather", [node.input[2], node.input[0]], [o]) for o in node.output[:3:2] if o]
    outs = [o for k, o in enumerate(node.output) if o and k in (0, 3)]
    return [helper.make_node("Identity", node.input[:1], [o]) for o in outs]


def unsized(model) -> list[str]:
    """onnxruntime's fused ops in ``model`` whose outputs the standard twin cannot size (no rule, or none for the
    form at hand): the shapes after them are unknown."""
    dims = {i.name: list(i.dims) for i in model.graph.initializer}
    ops = {n.op_type for n in model.graph.node if n.domain in _CONTRIB and not (fused(n) and _twin_nodes(n, dims))}
    return sorted(ops)


def _standard(model):
    """``model``, or its standard twin when it holds fused ops (see the module doc); axes computed from constants
    (dynamo's GroupNorm) folded into constants for the inference (:mod:`edge.route.tapfold`)."""
    import onnx

    from edge.route.tapfold import fold_axes

    if not any(fused(n) for n in model.graph.node):
        return fold_axes(model)
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    dims = {i.name: list(i.dims) for i in model.graph.initializer}
    nodes = [m for n in model.graph.node for m in (_twin_nodes(n, dims) if fused(n) else [n])]
    del twin.graph.node[:]
    twin.graph.node.extend(nodes)
    for o in twin.opset_import:  # Einsum needs opset 12
        if o.domain in ("", "ai.onnx") and o.version < 12 and any(n.op_type == "Einsum" for n in nodes):
            o.version = 12
    return fold_axes(twin)


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


def feature_shapes(
    model, shapes: dict[str, tuple], tensors: Sequence[str], layouts: Mapping[str, str | None] | None = None
) -> dict[str, tuple]:
    """``shapes`` with the shapes of ``tensors`` whose feature dimension (the channels: the second axis of a
    channels-first tensor in ``layouts``, else the last) onnx's inference left unknown taken from onnxruntime's
    symbolic inference where it knows it (Swin's blocks behind window reshapes). The symbolic inference runs only
    then, so tensors onnx already sizes keep their shapes."""

    def known(t, shape) -> bool:
        first = (layouts or {}).get(t) == FIRST
        return bool(shape) and len(shape) >= 2 and isinstance(shape[1] if first else shape[-1], int)

    if all(known(t, shapes.get(t)) for t in tensors):
        return shapes
    symbolic = _symbolic_shapes(_standard(model))
    better = {t: symbolic[t] for t in tensors if not known(t, shapes.get(t)) and known(t, symbolic.get(t))}
    return {**shapes, **better}


#: norms over the last axis whose scale's length is the width of their input and output
_NORMS = ("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization")


def _norm_widths(model, shapes: dict[str, tuple]) -> dict[str, tuple]:
    """Fill the last dimension of a last-axis norm's (``_NORMS``) input and output from its scale's length where
    inference left it symbolic (Swin's window reshapes): the width of the ``attn``/``mlp-in`` taps."""
    from onnx import helper

    scales = {i.name: tuple(i.dims) for i in model.graph.initializer}
    for n in model.graph.node:
        axis = next((helper.get_attribute_value(a) for a in n.attribute if a.name == "axis"), -1)
        if n.op_type not in _NORMS or len(n.input) < 2 or len(scales.get(n.input[1], ())) != 1:
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


def symbolic_shapes(model) -> dict[str, tuple]:
    """onnxruntime's symbolic shapes of ``model``'s tensors (of its standard twin): dimensions named after the inputs'
    (a ``Conv`` keeps ``seq`` where onnx's inference invents ``unk__N``); {} when it fails."""
    return _symbolic_shapes(_standard(model))


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


#: how a tap's axes are laid out: its channels second (``[B, C, *spatial]``, a conv's map: pooled over the spatial
#: axes) or last (``[B, T, C]``, a token sequence: pooled over ``T``); ``tap_model(..., layout={name: ...})``
FIRST, LAST = "channels-first", "channels-last"
LAYOUTS = (FIRST, LAST)
#: ops whose output (and data input) is channels-first at any rank: convolutions, their norms and pools
_FIRST_OPS = frozenset(
    "Conv FusedConv ConvTranspose ConvInteger QLinearConv BatchNormalization InstanceNormalization GroupNormalization "
    "LRN MaxPool AveragePool LpPool GlobalAveragePool GlobalMaxPool GlobalLpPool MaxUnpool".split()
)
#: ops whose output is channels-last: norms over the last axis (onnxruntime's fused ones too) and attention
_LAST_OPS = frozenset(
    "LayerNormalization RMSNormalization SimplifiedLayerNormalization SkipLayerNormalization "
    "SkipSimplifiedLayerNormalization EmbedLayerNormalization Attention MultiHeadAttention".split()
)
#: ops whose output keeps its inputs' layout: element-wise ops (an int8 twin's QuantizeLinear/DequantizeLinear
#: pairs too), and those that slice, join or pad along an axis
_SAME_OPS = frozenset(
    "Relu Clip LeakyRelu PRelu Sigmoid HardSigmoid HardSwish Tanh Elu Selu Celu Gelu FastGelu QuickGelu BiasGelu "
    "BiasAdd Erf Softplus Softsign Mish Neg Abs Sqrt Exp Log Reciprocal Cast Identity Dropout Add Sub Mul Div Pow "
    "Max Min Mean Sum Where Concat Split Slice Pad QuantizeLinear DequantizeLinear".split()
)
_DOMAINS = ("", "ai.onnx", "com.microsoft")
_DEPTH = 400  # a walk longer than this stops (a tap's layout is then not told): Python's recursion limit is 1000


class Layouts:
    """The layout (:data:`FIRST` or :data:`LAST`) of a model's tensors, told from the graph, never from a rank: the op
    producing the tensor (a conv, its norm or pool: channels first; a norm over the last axis, a linear layer
    (``MatMul`` by a 2-D weight), an embedding ``Gather``, attention: channels last), walking back through
    element-wise ops, slices, joins and pads, and through a ``Transpose`` (which moves the channel axis); else the
    ops reading it (a conv reads channels first, a norm over the last axis channels last). None: not told."""

    def __init__(self, model):
        from onnx import helper, numpy_helper

        g = model.graph
        self._producer = {o: n for n in g.node for o in n.output if o}
        self._users: dict[str, list] = {}
        for n in g.node:
            for i in n.input:
                self._users.setdefault(i, []).append(n)
        self._dims = {i.name: len(i.dims) for i in g.initializer}
        stored = [(i.name, i) for i in g.initializer]
        stored += [
            (n.output[0], a.t) for n in g.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"
        ]
        self._consts = {  # small int64 vectors: a Squeeze's or Unsqueeze's axes (a record that does not decode: none)
            name: v
            for name, t in stored
            if len(t.dims) == 1 and t.dims[0] <= 8 and t.data_type == 7 and (v := decoded(numpy_helper, t)) is not None
        }
        self._attr = lambda n, name, default: next(
            (helper.get_attribute_value(a) for a in n.attribute if a.name == name), default
        )
        self._memo: dict[str, str | None] = {}

    def __call__(self, tensor: str) -> str | None:
        return self._back(tensor, 0) or self._forward(tensor)

    def _matrix(self, name: str) -> bool:
        """A stored 2-D weight, or one transposed or cast from it (a linear layer's ``MatMul`` right side)."""
        n = self._producer.get(name)
        if n is not None and n.op_type in ("Transpose", "Cast", "Identity", "DequantizeLinear"):
            name = n.input[0]
        return self._dims.get(name) == 2

    def _anchor(self, n, tensor: str) -> str | None:
        """The layout ``n`` itself fixes for ``tensor``, its output or input 0 (None: ``n`` does not fix one)."""
        if n.domain not in _DOMAINS:
            return None
        if n.op_type in _FIRST_OPS and (tensor in n.output or n.input[0] == tensor):
            return FIRST
        if n.op_type in _LAST_OPS and (tensor in n.output or n.input[0] == tensor):
            return LAST if self._attr(n, "axis", -1) == -1 else None
        if n.op_type in ("MatMul", "FusedMatMul") and len(n.input) > 1 and self._matrix(n.input[1]):
            return LAST if tensor in n.output or n.input[0] == tensor else None
        if n.op_type == "Gather" and tensor in n.output and self._dims.get(n.input[0]) == 2:
            return LAST  # an embedding table's rows
        return None

    def _back(self, tensor: str, depth: int) -> str | None:
        if tensor in self._memo:
            return self._memo[tensor]
        n = self._producer.get(tensor)
        if n is None or depth > _DEPTH:
            return None
        self._memo[tensor] = found = self._anchor(n, tensor)
        if found is None and n.op_type == "Transpose" and n.domain in _DOMAINS:
            perm, before = list(self._attr(n, "perm", [])), self._back(n.input[0], depth + 1)
            if before is not None and len(perm) > 2:
                at = perm.index(1 if before == FIRST else len(perm) - 1)
                found = FIRST if at == 1 else LAST if at == len(perm) - 1 else None
        elif found is None and n.op_type in ("Squeeze", "Unsqueeze") and n.domain in _DOMAINS:
            before = self._back(n.input[0], depth + 1)  # axes past the channels (first) or before them (last, < -1)
            axes = self._axes(n)
            if axes and all(a >= 2 for a in axes) and before == FIRST or all(a < -1 for a in axes) and before == LAST:
                found = before
        elif found is None and n.op_type == "Reshape" and n.domain in _DOMAINS and len(n.input) > 1:
            shape = self._producer.get(n.input[1])  # back to a tensor's own Shape: its layout (torch's GroupNorm
            whole = shape is not None and all(a.name == "start" and a.i == 0 for a in shape.attribute)
            if whole and shape.op_type == "Shape":  # below opset 18; dynamo's Shape(start=0) too)
                found = self._back(shape.input[0], depth + 1)
        elif found is None and n.op_type in _SAME_OPS and n.domain in _DOMAINS:
            seen = {self._back(i, depth + 1) for i in n.input if i and i not in self._dims} - {None}
            found = seen.pop() if len(seen) == 1 else None
        self._memo[tensor] = found
        return found

    def _axes(self, n) -> list[int]:
        """A Squeeze's or Unsqueeze's axes: its attribute (below opset 13) or its stored second input."""
        if len(n.input) > 1:
            return [int(a) for a in self._consts.get(n.input[1], [])]
        return list(self._attr(n, "axes", []))

    def _forward(self, tensor: str) -> str | None:
        """What the ops reading ``tensor`` (through element-wise ops, slices, joins, pads) take it for."""
        todo, seen = [tensor], {tensor}
        while todo and len(seen) < _DEPTH:
            t = todo.pop(0)
            for n in self._users.get(t, []):
                found = self._anchor(n, t)
                if found is not None:
                    return found
                if n.op_type in _SAME_OPS and n.domain in _DOMAINS:
                    todo += [o for o in n.output if o and o not in seen]
                    seen.update(n.output)
        return None


def decoded(numpy_helper, t) -> list | None:
    """A stored tensor's values, flat, or None when its record does not decode (values that do not fill its dims, an
    undefined element type: a damaged or hostile file), never an exception out of the tap search."""
    try:
        return numpy_helper.to_array(t).ravel().tolist()
    except (TypeError, ValueError):
        return None
