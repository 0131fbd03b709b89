"""Which tensors to tap (:func:`edge.route.taps.tap_model`): named tap sets and their resolution.

Taps for any exported model, three ways:

* **by name**: a list of tensor names (batch first);
* **by op pattern** (:data:`TAP_SETS`). A pre-LN transformer's norm (``LayerNormalization``, or an RMS norm:
  T5's encoder, :mod:`edge.route.tapnorms`) inputs: ``attn`` the residual stream after each attention sub-block,
  ``blocks`` after each block, ``all`` after every sub-block; and its outputs: ``mlp-in`` the normalised
  input of each block's MLP (the ``attn`` taps normalised), ``attn-in`` the normalised
  input of each block's attention (block 0's: the normalised embedding). A CNN's channels-first feature
  maps (NCHW; a 1-D CNN's ``[B, C, L]``: the rank of its convs' outputs), each pooled by a global average over its
  spatial axes: ``stages`` the last map at
  each resolution (the output of each downsampling stage; resolution = the number of
  strided Conv/pool nodes above it, found without shapes), ``residual`` after each
  residual block (a sum of two maps, or the activation that alone reads it). Maps end
  where a global pool, reshape or linear layer starts; they run on through a channel split or
  shuffle (ShuffleNet) and a channels-last block (ConvNeXt: Transpose to NHWC and back), and through an
  ``edge quantize`` twin's integer ops (static QDQ pairs, dynamic ``ConvInteger``): the float model's stages;
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
with none of them raises :class:`~edge.errors.ConfigError` naming what to pass. A set whose taps fold something
into the batch axis (MobileViT's transformer: ``4*batch`` rows, its patches) is passed over for the next with a
warning, and :func:`resolve_tap_set` (``Tapped.tap_set``, the tapped file's ``edge.route.tapset``) says which set
was taken: ``auto (stages)``.

Files saved by onnxruntime's optimizer (``optimized_model_filepath``, BASIC or EXTENDED) give the taps of the file
before it (the same pooled features): a ``FusedConv`` is a conv stage (strided or not, its fourth input a residual
sum), ``BiasGelu``/``FastGelu``/``QuickGelu`` are activations, a ``SkipLayerNormalization`` or
``EmbedLayerNormalization`` is a norm of the sum it takes in. That sum is an optional output the optimizer drops
when nothing else reads it (post-LN BERT, a final norm); a tap on it is named ``edge.sum.<norm output>`` and
:func:`expose_sums` restores the output in the tapped copy. Their shapes come from :mod:`edge.route.tapshapes`.
A ConvNeXt residual sum the optimizer moved into channels-last form (``[B, H, W, C]``: it cancels the Transposes
around the ``Add``) is still a ``residual`` tap, pooled over ``H, W``. Not followed: level ALL's NCHWc layout
(``com.microsoft.nchwc``), which is specific to the machine that saved it. More
taps score a little better but cost more: the detector whitens ``d x d`` per input up to the head's
rank (256), ``d x rank`` beyond it (:mod:`edge.route.head`), and ``d`` grows with each tap (BENCHMARKS.md
compares them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from edge.errors import ConfigError, FormatError
from edge.format.modelinfo import META_KEY
from edge.registry import Registry
from edge.route.tapnorms import SUM_PREFIX, expose_sums, norms
from edge.route.tapshapes import LAST, Layouts, feature_shapes, tensor_shapes

__all__ = [
    "SUM_PREFIX",
    "TAP_SETS",
    "expose_sums",
    "feature_shapes",
    "resolve_tap_set",
    "resolve_taps",
    "tap_set",
    "tensor_shapes",
]

log = logging.getLogger(__name__)


def _norm_inputs(model) -> list[str]:
    return [i for i, _ in norms(model)]


def _norm_outputs(model) -> list[str]:
    return [o for _, o in norms(model)]


#: onnxruntime's fused activations (domain com.microsoft; its Gelu has the standard op's name)
_FUSED_ACTIVATIONS = ("QuickGelu", "FastGelu", "BiasGelu")
#: ops that keep a feature map a feature map ([B, C, H, W] in, [B, C, H', W'] out); anything else (a global
#: pool, a reshape, a linear layer) ends the convolutional part for the CNN tap sets
_MAP_OPS = frozenset(
    "Conv BatchNormalization InstanceNormalization Relu Clip LeakyRelu PRelu Sigmoid HardSigmoid HardSwish Tanh "
    "Elu Selu Gelu Mul Add Sub Div Concat MaxPool AveragePool Pad Identity Dropout Split Slice".split()
) | {"FusedConv", *_FUSED_ACTIVATIONS}
#: carry a map's level without being maps: a channel split (SplitToSequence, then SequenceAt gives 4-D maps) and a
#: channel shuffle (ShuffleNet: Reshape to 5-D, Transpose, Reshape back to a 4-D map)
_CARRY_OPS = frozenset(("SplitToSequence", "SequenceAt", "Reshape", "Transpose"))
#: an ``edge quantize`` twin's maps: static QDQ puts ``QuantizeLinear -> DequantizeLinear`` on them, dynamic mode
#: computes a conv as ``DynamicQuantizeLinear -> ConvInteger -> Cast -> Mul (scales)``; the integer tensors carry a
#: map's level (and the input's pixels stay pixels) but are never taps, the float ones (DQ, Cast to float) are maps
_INT_OPS = frozenset(("QuantizeLinear", "DynamicQuantizeLinear", "ConvInteger"))
_FLOATS = frozenset((1, 10, 11, 16))  # TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16


def _stride(node) -> int:
    """The largest stride of a Conv, MaxPool or AveragePool node (1 for any other op)."""
    from onnx import helper

    if node.op_type not in ("Conv", "FusedConv", "ConvInteger", "MaxPool", "AveragePool"):
        return 1
    strides = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "strides"), [1])
    return max(strides, default=1)


def _feature_maps(model, last_sums: bool = False, lost: list | None = None) -> list[tuple[str, int, bool]]:
    """``(tensor, resolution level, residual sum?)`` of every channels-first feature map a node computes (4-D for a
    2-D CNN, 3-D ``[B, C, L]`` for a 1-D one: the rank of its convs' outputs), in graph order; with ``last_sums``
    also the residual sums of channels-last maps (onnxruntime's optimizer cancels the Transposes around ConvNeXt's
    residual ``Add``: its sum is then ``[B, H, W, C]``, the same values as before, pooled over ``H, W``).

    The level counts the strided Conv/pool nodes between the input and the tensor (shape-free,
    so symbolic input sizes work); a residual sum is an ``Add`` of two feature maps. The input: a graph input of the
    maps' rank, or one of a rank less given its channel axis by an ``Unsqueeze``/``Reshape`` (a waveform ``[B, L]``).
    """
    inits = {i.name for i in model.graph.initializer}
    rank = {k: len(v) for k, v in tensor_shapes(model).items()}
    r = next((rank[n.output[0]] for n in model.graph.node if n.op_type in _CONVS and rank.get(n.output[0], 0) > 2), 4)
    to_last, to_first = [0, *range(2, r), 1], [0, r - 1, *range(1, r - 1)]  # [0, 2, 3, 1] and [0, 3, 1, 2] in 2-D
    level = {i.name: 0 for i in model.graph.input if rank.get(i.name) == r and i.name not in inits}
    out, last, sums = [], set(), set()  # last: channels-last maps (ConvNeXt: Transpose to NHWC, LN, MLP, to NCHW)
    ints: set[str] = set()  # integer maps (a twin's quantized ones, a Cast to an integer type): levels, never taps
    raw = set(level)  # the input and its layout changes (tf2onnx's NHWC -> NCHW Transpose): pixels, not features
    flat = {i.name for i in model.graph.input if rank.get(i.name) == r - 1 and i.name not in inits}  # [B, L] audio
    shape_of = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Shape" and _whole(n)}
    for node in model.graph.node:
        if node.op_type in _SAME and node.input and node.input[0] in flat and rank.get(node.output[0]) == r - 1:
            flat.add(node.output[0])  # input_values[:, None]: torch writes a whole Slice before the Unsqueeze
            continue
        if node.op_type in ("Unsqueeze", "Reshape") and node.input[0] in flat and rank.get(node.output[0]) == r:
            level[node.output[0]] = 0  # a waveform [B, L] (an image [B, H, W]) given its channel axis: the input
            raw.add(node.output[0])
            continue
        src = shape_of.get(node.input[1]) if node.op_type == "Reshape" and len(node.input) > 1 else None
        if src in level and src not in raw | last and node.input[0] not in level and rank.get(node.output[0]) == r:
            level[node.output[0]] = level[src]  # back to a map's own Shape: torch's GroupNorm below opset 18
            continue  # (Reshape to [B, G, -1], InstanceNormalization, Reshape back), before its affine Mul, Add
        ins = [level[i] for i in node.input if i in level]
        if ins and node.op_type == "Transpose" and rank.get(node.output[0]) == r:
            perm, src = _perm(node), node.input[0]
            if src in raw and perm == to_first:  # the input's layout change (in 1-D the same perm as to_last)
                pass
            elif perm == to_last and src not in last or src in last and perm != to_first:
                last.add(node.output[0])
            elif perm != to_first or src not in last:  # a map permuted for a recurrent layer (CRNN: [B, W, C, H]) is
                continue  # no map: its channels are neither first nor last
            level[node.output[0]] = max(ins)
            if src in raw:
                raw.add(node.output[0])
            elif src in ints:
                ints.add(node.output[0])
            elif node.output[0] not in last:
                out.append((node.output[0], max(ins), False))
            continue
        if ins and any(i in last for i in node.input):
            last.update(o for o in node.output if rank.get(o) == r)
            level.update({o: max(ins) for o in node.output if rank.get(o) == r})
            if last_sums and node.output[0] in last and _is_sum(node, level):
                out.append((node.output[0], max(ins), True))
                sums.add(node.output[0])
            continue
        if ins and (node.op_type in _INT_OPS or node.op_type in ("DequantizeLinear", "Cast")):
            o, lv = node.output[0], max(ins) + (_stride(node) > 1)
            if rank.get(o) in (r, r + 1) and node.input[0] in level:  # r + 1: inside a channel shuffle
                level[o] = lv
                floats = node.op_type not in _INT_OPS and _float_out(node)
                if not floats:
                    ints.add(o)
                if node.input[0] in raw:
                    raw.add(o)  # the input quantized: still pixels
                elif rank.get(o) == r and floats:
                    out.append((o, lv, False))
            continue
        carry = node.op_type in _CARRY_OPS
        if not (node.op_type in _MAP_OPS or carry) or not ins:
            continue
        lv = max(ins) + (_stride(node) > 1)
        integer = any(i in ints for i in node.input)  # an op on integers (a clamp, a sum) gives integers
        if lost is not None and not carry and node.output and node.output[0] not in rank:
            lost.append(node)  # a map read by a map op whose output inference could not size: the maps end here
        for o in node.output:
            if rank.get(o) == r + 1 or node.op_type == "SplitToSequence":  # inside a shuffle or a split
                level[o] = lv
            elif rank.get(o) == r and (
                not carry
                or node.op_type == "SequenceAt"
                or node.op_type == "Reshape"
                and rank.get(node.input[0]) == r + 1
            ):
                level[o] = lv
                if integer:
                    ints.add(o)
                elif node.op_type != "Pad":  # a padded map's border is zeros, not features: its input is the tap
                    out.append((o, lv, _is_sum(node, level)))
    told = Layouts(model)  # a rank-3 input read by a conv and by token layers alike: its token tensors are not maps
    return [m for m in out if (told(m[0]) == LAST) == (m[0] in sums)]


def _whole(shape_node) -> bool:
    """Whether a ``Shape`` node gives its input's whole shape (no ``end``; ``start`` 0 if any, as dynamo writes)."""
    return all(a.name == "start" and a.i == 0 for a in shape_node.attribute)


#: ops that leave a raw input raw (a waveform sliced or cast is still the waveform)
_SAME = ("Slice", "Identity", "Cast")
#: convolutions: the rank of their outputs is the rank of a model's feature maps
_CONVS = ("Conv", "FusedConv", "ConvInteger")


def _float_out(node) -> bool:
    """Whether a ``DequantizeLinear`` or ``Cast`` node gives floats (a Cast to an integer type is no tap)."""
    return node.op_type == "DequantizeLinear" or any(a.name == "to" and a.i in _FLOATS for a in node.attribute)


def _is_sum(node, level) -> bool:
    """A residual sum: an ``Add`` of two feature maps, or a ``FusedConv`` adding one (its fourth input) to its conv
    before the activation (onnxruntime's Conv+Add+activation fusion)."""
    if node.op_type == "FusedConv":
        return len(node.input) > 3 and node.input[3] in level
    return node.op_type == "Add" and sum(i in level for i in node.input) == 2


def _perm(node) -> list[int]:
    from onnx import helper

    return next((list(helper.get_attribute_value(a)) for a in node.attribute if a.name == "perm"), [])


def _stages(model) -> list[str]:
    """After each CNN stage: the last feature map computed at each resolution. Maps that run into an op whose output
    shape inference leaves unsized end there (axes computed from an input, an op it has no rule for): logged as a
    warning naming the op, since the stages after it are then missing."""
    last: dict[int, str] = {}
    lost: list = []
    for tensor, lv, _ in _feature_maps(model, lost=lost):
        last[lv] = tensor
    if lost:
        n = lost[0]
        log.warning(
            "tap set 'stages' on model %r: the feature maps end at %s node %r (onnx's shape inference does not size "
            "its output), so later stages are missing; pass taps=[tensor names] for them (edge update --taps A,B)",
            model.graph.name,
            n.op_type,
            n.name or n.output[0],
        )
    return [last[lv] for lv in sorted(last)]


def _residual(model) -> list[str]:
    """After each residual block: each residual sum, or the activation that alone reads it."""
    maps = _feature_maps(model, last_sums=True)
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


_ACTIVATIONS = frozenset("Relu Clip LeakyRelu PRelu Elu Selu Gelu HardSwish Tanh".split()) | set(_FUSED_ACTIVATIONS)


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


def _label(model, source=None) -> str:
    """How a message names the model: its graph's name, and its file when the caller knows it (an exported graph's
    name, ``main_graph``, tells nobody which file)."""
    return f"model {model.graph.name!r}" + (f" ({source})" if source is not None else "")


def _auto(model, source=None) -> tuple[str, list[str]]:
    """``auto``'s set and taps: the model's declared taps, else after each transformer block's attention, else after
    each CNN stage; a set whose taps fold something into the batch axis (MobileViT's transformer: patches, 4 rows an
    input) is passed over for the next, with a warning, since its rows are not the inputs."""
    folded = []
    for name in ("declared", "attn", "stages"):
        found = TAP_SETS.get(name)(model)
        bad = _folded(model, found) if found else []
        if found and not bad:
            if folded:
                log.warning(
                    "tap set 'auto' on %s: %s; tapping %r instead", _label(model, source), "; ".join(folded), name
                )
            return name, found
        if bad:
            folded.append(f"{name!r} taps {bad[0][0]!r} with first axis {bad[0][1]!r}, not the batch")
    if folded:
        raise ConfigError(f"tap set 'auto' on {_label(model, source)}: {'; '.join(folded)}; pass tensor names that "
                          "are batch first (taps=[names], edge update --taps A,B)")  # fmt: skip
    return "auto", []


def _folded(model, taps: Sequence[str]) -> list[tuple[str, object]]:
    """The taps whose first axis provably is not the model's batch (:func:`edge.format.onnx_graph.batch_folded`), or
    is a fixed size when the batch is not (XLNet's time-major ``[seq, batch, hidden]`` stream)."""
    from edge.format.onnx_graph import batch_dim, batch_folded

    shapes, batch = tensor_shapes(model), batch_dim(model)
    firsts = [(t, (shapes.get(t) or (batch,))[0]) for t in taps]
    fixed = isinstance(batch, str)  # a dynamic batch: a fixed first axis is another axis
    return [(t, d) for t, d in firsts if d != batch and (batch_folded(d, batch) or (fixed and isinstance(d, int)))]


#: named tap choices: name -> function(onnx.ModelProto) -> tensor names. With pre-LN blocks
#: (two norms each, plus a final one) the norm inputs are, in order: the
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
TAP_SETS.add("auto", lambda m: _auto(m)[1])  # declared, else attn, else stages (batch first)
TAP_SETS.add("first", lambda m: _auto(m)[1][:1])  # auto's first tap alone: one pooled tensor, the cheapest to serve


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
    return resolve_tap_set(model, taps)[0]


def resolve_tap_set(model, taps: str | Sequence[str] = "auto", source=None) -> tuple[list[str], str]:
    """:func:`resolve_taps`, and which set gave the names: ``taps`` itself, ``"auto (stages)"`` for the set ``auto``
    or ``first`` chose, ``"names"`` for an explicit list. ``source``: the model's file, for messages."""
    if not isinstance(taps, str):
        return list(dict.fromkeys(taps)), "names"
    find, count = tap_set(taps)
    used = taps
    if taps.partition(":")[0] in ("auto", "first"):
        chosen, found = _auto(model, source)
        found, used = (found if taps.startswith("auto") else found[:1]), f"{taps} ({chosen})"
    else:
        found = find(model)
    names = list(dict.fromkeys(found))[:count]
    if not names:
        some = [t for t, _, _ in _feature_maps(model)][-4:] or _norm_inputs(model)[-4:]
        raise ConfigError(
            f"tap set {taps!r} finds nothing in {_label(model, source)}: no taps declared at export "
            f"(ModelInfo.extra['taps']), {len(_norm_inputs(model))} norms of tokens (LayerNormalization, RMS norms) "
            "(attn, mlp-in, blocks, all), "
            f"{len(_stages(model))} CNN stages (stages, residual); pass taps=[tensor names] (edge update --taps A,B: "
            f"intermediate tensors, batch first{', e.g. ' + ','.join(some) if some else ''}){_nchwc(model)}"
        )
    return names, used


def _nchwc(model) -> str:
    """What to do about onnxruntime's NCHWc layout (a file saved at level ALL), when the graph holds it."""
    if not any(n.domain == "com.microsoft.nchwc" for n in model.graph.node):
        return ""
    return ("; its convs are onnxruntime's NCHWc layout (saved at level ALL, for the machine that saved it): tap the "
            "file before optimisation, or one saved at ORT_ENABLE_EXTENDED")  # fmt: skip
