"""Which tensors to tap (:func:`edge.route.taps.tap_model`): named tap sets and their resolution.

Taps for any exported model, three ways:

* **by name**: a list of tensor names (batch first);
* **by op pattern** (:data:`TAP_SETS`). A pre-LN transformer's ``LayerNormalization``
  inputs: ``attn`` the residual stream after each attention sub-block, ``blocks`` after
  each block, ``all`` after every sub-block; and its outputs: ``mlp-in`` the normalised
  input of each block's MLP (the ``attn`` taps normalised), ``attn-in`` the normalised
  input of each block's attention (block 0's: the normalised embedding). A CNN's 4-D (NCHW) feature
  maps, each pooled by a global average over its spatial axes: ``stages`` the last map at
  each resolution (the output of each downsampling stage; resolution = the number of
  strided Conv/pool nodes above it, found without shapes), ``residual`` after each
  residual block (a sum of two maps, or the activation that alone reads it). Maps end
  where a global pool, reshape or linear layer starts; they run on through a channel split or
  shuffle (ShuffleNet) and a channels-last block (ConvNeXt: Transpose to NHWC and back);
* **by the model's own declaration** at export time: ``declared`` reads the tensor names
  an exporter put in ``ModelInfo.extra["taps"]``;
* ``first``: the first of ``auto``'s taps alone, the cheapest to serve (one pooled tensor,
  no ``Concat``). On the demo CNN (its stem map) it detects as well as two taps; on the
  demo ViT one tap routes 94.9 % as served against 95.5 % (below the 95 % goal).

``NAME:K`` takes the first ``K`` taps of a set: ``attn-in:1``, block 0's normalised attention
input (the normalised patch embedding) alone, is what the demo ViT serves (``edge bench ood``,
``edge demo --stream``). On it, one tap instead of two saves the ``Concat`` and half the head's
matrices, and at batch 1 that is most of the detection overhead. Among single taps it routes as
well as any and detects best; it sits before every adapted weight of the demo's adapters, so
its features are the same under every state. Measured on the demo ViT (routing as served over
every state and known domain; HDC AUROC against the best baseline on the same features;
*novel accepted*: a domain left out of the router, the share of its test inputs voted into a
known domain, mean over states):

========================  ===========  ========  =============  ====================================
tap                       as served    rejected  HDC AUROC      novel accepted: invert, blur,
                                                 (best other)   rotate, noise
========================  ===========  ========  =============  ====================================
``attn-in:1``             95.0 %       2.3 %     96.7 (96.5)    0.0, 57.9, 38.6, 14.5 %
``mlp-in:1``              95.1 %       2.2 %     92.0 (92.3)    41.9, 100, 94.7, 28.8 %
``attn`` (two taps)       95.5 %       1.6 %     92.7 (93.2)    1.1, 100, 87.4, 31.3 %
========================  ===========  ========  =============  ====================================

``mlp-in:1`` (block 0's normalised MLP input, served before) met the routing and AUROC goals
but let 42 % of an unknown inverted stream in as known: on ``edge demo --stream`` the invert
segment was voted OOD 53 % of the time (two ``attn`` taps: 99 %), the router switched to
``blur`` on it, and the grown domain routed 72 % of its held-out inputs afterwards (98 %).
Other single taps, novel invert accepted: the raw residual stream after block 0's attention
(``attn:1``) 5.9 %, after block 1's attention 23.0 %, block 1's normalised MLP input 48.3 %;
``mlp-in`` (both blocks) 34.0 %. Routing as served, single taps: block 0's MLP hidden layer
before GELU 95.3 % (128 wide: twice the head), ``attn:1`` 94.9 %, the raw residual stream
after block 0 93.8 %, anything in block 1 90-92.5 %, the model's own pooled ``features``
90.0 % (HDC AUROC 86.4).

``auto`` (the default) takes the declared taps, else ``attn``, else ``stages``; a model
with none of them raises :class:`~edge.errors.ConfigError` naming what to pass. More
taps score a little better but cost more: the detector whitens ``d x d`` per input up to the head's
rank (256), ``d x rank`` beyond it (:mod:`edge.route.head`), and ``d`` grows with each tap (BENCHMARKS.md
compares them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from edge.errors import ConfigError, FormatError
from edge.format.modelinfo import META_KEY
from edge.registry import Registry

__all__ = ["TAP_SETS", "feature_shapes", "resolve_taps", "tap_set", "tensor_shapes"]


def _norms(model) -> list[tuple[str, str]]:
    """(input, output) of the layer norms of token sequences, in graph order: a LayerNormalization node, or the
    nodes exporters write below opset 17 (ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, then Mul and Add by
    the affine weights). Not those of a channels-last map (ConvNeXt: a 4-D Transpose feeds them), which the CNN
    sets tap in its NCHW form."""
    producer = {o: n for n in model.graph.node for o in n.output}
    users: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    found = []
    for n in model.graph.node:
        if n.op_type == "LayerNormalization":
            found.append((n.input[0], n.output[0]))
        elif n.op_type == "Div" and _is_decomposed_norm(n, producer):
            out = n.output[0]
            for op in ("Mul", "Add"):  # the affine weights, when there are
                after = users.get(out, [])
                if len(after) != 1 or after[0].op_type != op:
                    break
                out = after[0].output[0]
            found.append((producer[n.input[0]].input[0], out))
    last = {o for o, n in producer.items() if n.op_type == "Transpose" and len(_perm(n)) == 4}
    return [(i, o) for i, o in found if i not in last]


def _is_decomposed_norm(div, producer) -> bool:
    """``div`` is ``(x - mean(x)) / sqrt(...)``: the core of a LayerNormalization written out in primitive ops."""
    sub, root = producer.get(div.input[0]), producer.get(div.input[1])
    if sub is None or root is None or sub.op_type != "Sub" or root.op_type != "Sqrt":
        return False
    mean = producer.get(sub.input[1])
    return mean is not None and mean.op_type == "ReduceMean" and mean.input[0] == sub.input[0]


def _norm_inputs(model) -> list[str]:
    return [i for i, _ in _norms(model)]


def _norm_outputs(model) -> list[str]:
    return [o for _, o in _norms(model)]


#: ops that keep a feature map a feature map ([B, C, H, W] in, [B, C, H', W'] out); anything else (a global
#: pool, a reshape, a linear layer) ends the convolutional part for the CNN tap sets
_MAP_OPS = frozenset(
    "Conv BatchNormalization InstanceNormalization Relu Clip LeakyRelu PRelu Sigmoid HardSigmoid HardSwish Tanh "
    "Elu Selu Gelu Mul Add Sub Div Concat MaxPool AveragePool Pad Identity Dropout Split Slice".split()
)
#: carry a map's level without being maps: a channel split (SplitToSequence, then SequenceAt gives 4-D maps) and a
#: channel shuffle (ShuffleNet: Reshape to 5-D, Transpose, Reshape back to a 4-D map)
_CARRY_OPS = frozenset(("SplitToSequence", "SequenceAt", "Reshape", "Transpose"))


def _stride(node) -> int:
    """The largest stride of a Conv, MaxPool or AveragePool node (1 for any other op)."""
    from onnx import helper

    if node.op_type not in ("Conv", "MaxPool", "AveragePool"):
        return 1
    strides = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "strides"), [1])
    return max(strides, default=1)


def _feature_maps(model) -> list[tuple[str, int, bool]]:
    """``(tensor, resolution level, residual sum?)`` of every 4-D feature map a node computes, in graph order.

    The level counts the strided Conv/pool nodes between the input and the tensor (shape-free,
    so symbolic input sizes work); a residual sum is an ``Add`` of two feature maps.
    """
    inits = {i.name for i in model.graph.initializer}
    rank = {k: len(v) for k, v in tensor_shapes(model).items()}
    level = {i.name: 0 for i in model.graph.input if rank.get(i.name) == 4 and i.name not in inits}
    out, last = [], set()  # last: channels-last maps (ConvNeXt: Transpose to NHWC, LayerNorm, MLP, back to NCHW)
    raw = set(level)  # the input and its layout changes (tf2onnx's NHWC -> NCHW Transpose): pixels, not features
    for node in model.graph.node:
        ins = [level[i] for i in node.input if i in level]
        if ins and node.op_type == "Transpose" and rank.get(node.output[0]) == 4:
            perm = _perm(node)
            if perm == [0, 2, 3, 1] and node.input[0] not in last or node.input[0] in last and perm != [0, 3, 1, 2]:
                last.add(node.output[0])
            elif perm != [0, 3, 1, 2]:
                continue
            level[node.output[0]] = max(ins)
            if node.input[0] in raw:
                raw.add(node.output[0])
            elif node.output[0] not in last:
                out.append((node.output[0], max(ins), False))
            continue
        if ins and any(i in last for i in node.input):
            last.update(o for o in node.output if rank.get(o) == 4)
            level.update({o: max(ins) for o in node.output if rank.get(o) == 4})
            continue
        carry = node.op_type in _CARRY_OPS
        if not (node.op_type in _MAP_OPS or carry) or not ins:
            continue
        lv = max(ins) + (_stride(node) > 1)
        for o in node.output:
            if rank.get(o) == 5 or node.op_type == "SplitToSequence":  # inside a shuffle or a split
                level[o] = lv
            elif rank.get(o) == 4 and (
                not carry or node.op_type == "SequenceAt" or node.op_type == "Reshape" and rank.get(node.input[0]) == 5
            ):
                level[o] = lv
                if node.op_type != "Pad":  # a padded map's border is zeros, not features: its input is the tap
                    out.append((o, lv, node.op_type == "Add" and len(ins) == 2))
    return out


def _perm(node) -> list[int]:
    from onnx import helper

    return next((list(helper.get_attribute_value(a)) for a in node.attribute if a.name == "perm"), [])


def _stages(model) -> list[str]:
    """After each CNN stage: the last feature map computed at each resolution."""
    last: dict[int, str] = {}
    for tensor, lv, _ in _feature_maps(model):
        last[lv] = tensor
    return [last[lv] for lv in sorted(last)]


def _residual(model) -> list[str]:
    """After each residual block: each residual sum, or the activation that alone reads it."""
    maps = _feature_maps(model)
    names = {t for t, _, _ in maps}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    out = []
    for tensor, _, residual in maps:
        if residual:
            after = consumers.get(tensor, [])
            act = after[0].output[0] if len(after) == 1 and after[0].op_type in _ACTIVATIONS else None
            out.append(act if act in names else tensor)
    return out


_ACTIVATIONS = frozenset("Relu Clip LeakyRelu PRelu Elu Selu Gelu HardSwish Tanh".split())


def _declared(model) -> list[str]:
    """The taps the exporter recorded: ``ModelInfo.extra["taps"]`` (tensor names), or none."""
    from edge.format.modelinfo import ModelInfo

    meta = next((p.value for p in model.metadata_props if p.key == META_KEY), None)
    taps = ModelInfo.from_json(meta).extra.get("taps") if meta is not None else None
    if taps is None:
        return []
    if isinstance(taps, str) or not all(isinstance(t, str) for t in taps):
        raise FormatError(f"model {model.graph.name!r} declares taps {taps!r}; expected a list of tensor names")
    return list(taps)


def _attn_in(model) -> list[str]:
    """Each pre-LN block's normalised attention input: the first norm output of each pair (a final norm, the
    odd one out, is not a block's)."""
    outs = _norm_outputs(model)
    return outs[0 : 2 * (len(outs) // 2) : 2]


def _auto(model) -> list[str]:
    """The model's declared taps, else after each transformer block's attention, else after each CNN stage."""
    return _declared(model) or TAP_SETS.get("attn")(model) or _stages(model)


#: named tap choices: name -> function(onnx.ModelProto) -> tensor names. With pre-LN blocks
#: (two LayerNormalization nodes each, plus a final one) the norm inputs are, in order: the
#: embedding, then after each attention and after each MLP sub-block.
TAP_SETS: Registry[Callable] = Registry("tap set")
TAP_SETS.add("attn", lambda m: _norm_inputs(m)[1::2])  # after each attention sub-block
TAP_SETS.add("blocks", lambda m: [t for t in _norm_inputs(m)[::-1][::2] if t != _norm_inputs(m)[0]][::-1])
TAP_SETS.add("all", lambda m: _norm_inputs(m)[1:])  # after every sub-block
TAP_SETS.add("mlp-in", lambda m: _norm_outputs(m)[1::2])  # each block's normalised MLP input: attn, normalised
TAP_SETS.add("attn-in", _attn_in)  # each block's normalised attention input (no final norm)
TAP_SETS.add("stages", _stages)  # CNN: the last feature map at each resolution
TAP_SETS.add("residual", _residual)  # CNN: after each residual block
TAP_SETS.add("declared", _declared)  # what the exporter recorded in ModelInfo.extra["taps"]
TAP_SETS.add("auto", _auto)  # declared, else attn, else stages
TAP_SETS.add("first", lambda m: _auto(m)[:1])  # auto's first tap alone: one pooled tensor, the cheapest to serve


def tap_set(spec: str) -> tuple[Callable, int | None]:
    """The tap set function and count of ``NAME`` or ``NAME:K`` (the set's first ``K`` taps); unknown names and
    counts that are not whole numbers >= 1 raise, naming what is allowed."""
    name, _, count = spec.partition(":")
    if count and not (count.isdigit() and int(count) >= 1):
        raise ConfigError(f"tap set {spec!r}: the count after ':' must be a whole number >= 1, e.g. {name}:1")
    if name not in TAP_SETS:
        raise ConfigError(f"unknown tap set {name!r}; known: {', '.join(TAP_SETS.names())} (NAME:K: its first K)")
    return TAP_SETS.get(name), int(count) if count else None


def resolve_taps(model, taps: str | Sequence[str] = "auto") -> list[str]:
    """Tensor names for a tap set name (:data:`TAP_SETS`), ``NAME:K`` (its first ``K`` taps) or an explicit list."""
    if not isinstance(taps, str):
        return list(dict.fromkeys(taps))
    find, count = tap_set(taps)
    names = list(dict.fromkeys(find(model)))[:count]
    if not names:
        some = [t for t, _, _ in _feature_maps(model)][-4:] or _norm_inputs(model)[-4:]
        raise ConfigError(
            f"tap set {taps!r} finds nothing in model {model.graph.name!r}: no taps declared at export "
            f"(ModelInfo.extra['taps']), {len(_norm_inputs(model))} LayerNormalization nodes "
            "(attn, mlp-in, blocks, all), "
            f"{len(_stages(model))} CNN stages (stages, residual); pass taps=[tensor names] (intermediate tensors, "
            f"batch first{', e.g. ' + str(some) if some else ''})"
        )
    return names


def tensor_shapes(model) -> dict[str, tuple]:
    """Shape (ints, or names for symbolic dims) of every tensor onnx shape inference knows."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as e:  # onnx raises InferenceError and protobuf errors
        raise FormatError(f"shape inference failed on model {model.graph.name!r}: {e}") from e
    shapes = _shapes_of(inferred)
    if any(o not in shapes for n in model.graph.node for o in n.output if o):
        shapes = {**_symbolic_shapes(model), **shapes}
    return _norm_widths(model, shapes)


def feature_shapes(model, shapes: dict[str, tuple], tensors: Sequence[str]) -> dict[str, tuple]:
    """``shapes`` with the shapes of ``tensors`` whose feature dimension (the last; the second of a 4-D map) onnx's
    inference left unknown taken from onnxruntime's symbolic inference where it knows it (Swin's blocks behind
    window reshapes). The symbolic inference runs only then, so tensors onnx already sizes keep their shapes."""

    def known(shape) -> bool:
        return bool(shape) and len(shape) >= 2 and isinstance(shape[1] if len(shape) >= 4 else shape[-1], int)

    if all(known(shapes.get(t)) for t in tensors):
        return shapes
    symbolic = _symbolic_shapes(model)
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
    exported below opset 17), from onnxruntime's symbolic inference; {} when it cannot tell either."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        return _shapes_of(SymbolicShapeInference.infer_shapes(model, auto_merge=True))
    except Exception:  # an op it has no rule for: the taps without a shape are refused by name as before
        return {}
