"""The norms of token sequences a model computes, for the transformer tap sets (:mod:`edge.route.tapsets`).

A norm is found as one node (``LayerNormalization``; ``RMSNormalization``, opset 23; onnxruntime's
``SimplifiedLayerNormalization`` and its fused ``Skip*``/``Embed*`` norms) or written out in primitive ops, as
exporters write it where no such node is used:

* a layer norm below opset 17: ``ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div``, then ``Mul`` and ``Add`` by the
  affine weights;
* an RMS norm (T5, its sentence-T5 and flan-T5 encoders; ``torch.nn.RMSNorm`` below opset 23):
  ``x * 1 / sqrt(mean(x ** 2, -1) + eps)`` as ``Pow`` (or ``Mul`` of ``x`` by itself), ``ReduceMean`` over the last
  axis, ``Add``, ``Sqrt``, then ``Reciprocal`` and ``Mul`` or one ``Div``; then ``Mul`` by the weight. Casts around
  the statistics (T5 computes them in float32) are looked through. The ``ReduceMean`` must provably reduce the last
  axis only (its axes a constant ``[-1]``): a reduction over other axes is another op, not a norm of tokens.

Either way the norm's input (the residual stream) and its output (normalised, after the affine weights) are what the
``attn``/``mlp-in``... sets tap.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import prod

from edge.route.tapshapes import decoded, fused

__all__ = ["SUM_PREFIX", "expose_sums", "norms"]

#: single-node norms over the last axis in the standard domain (SimplifiedLayerNormalization: onnxruntime's RMS norm)
_NORM_OPS = ("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization")


def norms(model) -> list[tuple[str, str]]:
    """(input, output) of the norms of token sequences (module doc), in graph order. Not those of a channels-last
    map (ConvNeXt: a 4-D Transpose feeds them), which the CNN sets tap in its NCHW form."""
    producer = {o: n for n in model.graph.node for o in n.output}
    users: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    consts = _Consts(model)
    found = []
    for n in model.graph.node:
        if n.op_type in _NORM_OPS and n.domain in ("", "ai.onnx"):
            found.append((n.input[0], n.output[0]))
        elif fused(n) and "LayerNormalization" in n.op_type:  # onnxruntime's optimizer fused it: see _fused_norm
            found.append(_fused_norm(n))
        elif n.op_type == "Div" and _is_decomposed_norm(n, producer):
            found.append((producer[n.input[0]].input[0], _affine(n.output[0], users, ("Mul", "Add"))))
        elif n.op_type in ("Mul", "Div"):
            x = _rms_input(n, producer, consts)
            if x is not None:
                found.append((x, _affine(n.output[0], users, ("Mul",))))
    last = set()  # a 4-D Transpose's output and what the block computes from it (onnxruntime's optimizer cancels
    for n in model.graph.node:  # the transposes around a residual Add: ConvNeXt's sum is then channels-last)
        if n.op_type == "Transpose" and len(_perm(n)) == 4 or n.op_type in _LAST_OPS and last.intersection(n.input):
            last.update(n.output)
    stored = _stored_values(model)  # a norm of a stored table (DeBERTa-v2's, SEW-D's rel_embeddings) is no token's
    return [(i, o) for i, o in found if i not in last and i not in stored]


def _stored_values(model) -> set[str]:
    """The main graph's stored tensors and what it computes from them alone (in graph order): the same for every
    input. A name no node computes (an optional output an optimizer dropped) is not among them."""
    stored = {t.name for t in model.graph.initializer}
    for n in model.graph.node:
        if all(i in stored for i in n.input if i):  # a Constant node has no inputs: its output is stored
            stored.update(n.output)
    return stored


def _affine(out: str, users: dict, ops: Sequence[str]) -> str:
    """The output after a decomposed norm's affine weights: ``out`` through each op of ``ops`` that alone reads it
    (the weights are optional), looking through a Cast to the weights' type before it (T5 in float16)."""
    for op in ops:
        after = users.get(out, [])
        cast = after[0].output[0] if len(after) == 1 and after[0].op_type == "Cast" else None
        after = users.get(cast, []) if cast else after
        if len(after) != 1 or after[0].op_type != op:
            break
        out = after[0].output[0]
    return out


#: ops that keep a channels-last map channels-last (ConvNeXt's block between its two Transposes)
_LAST_OPS = frozenset(  # (an int8 twin's QDQ pairs carry a channels-last map too)
    "Add Sub Mul Div Identity MatMul LayerNormalization Gelu QuickGelu FastGelu BiasGelu QuantizeLinear "
    "DequantizeLinear".split()
)


#: prefix of a tap on the sum a fused norm normalises that the saved graph does not keep (``expose_sums``)
SUM_PREFIX = "edge.sum."
#: onnxruntime's fused norms whose input (the residual or embedding sum) is an optional output: its index
_SUM_OUTPUT = {"SkipLayerNormalization": 3, "SkipSimplifiedLayerNormalization": 3, "EmbedLayerNormalization": 2}


def _fused_norm(n) -> tuple[str, str]:
    """(input, output) of a norm onnxruntime's optimizer fused: a ``SkipLayerNormalization`` normalises the sum of
    its first inputs (a residual ``Add`` before), an ``EmbedLayerNormalization`` the embeddings' sum. That sum is
    an optional output, often not kept: then the input is named ``SUM_PREFIX + output`` and :func:`expose_sums`
    adds it when it is tapped (the same tensor the unoptimised graph's ``Add`` computes)."""
    k = _SUM_OUTPUT.get(n.op_type)
    if k is None:  # LayerNormalization in the contrib domain
        return n.input[0], n.output[0]
    return (n.output[k] if len(n.output) > k and n.output[k] else SUM_PREFIX + n.output[0]), n.output[0]


def expose_sums(model, taps: Sequence[str]) -> None:
    """Give each fused norm whose unkept sum is tapped (``SUM_PREFIX + its output``) that sum as its optional
    output, in place (an optional output of the same node: no weight, no other node changes)."""
    want = {t[len(SUM_PREFIX) :] for t in taps if t.startswith(SUM_PREFIX)}
    for n in model.graph.node:
        k = _SUM_OUTPUT.get(n.op_type)
        if k is not None and fused(n) and n.output and n.output[0] in want:
            while len(n.output) <= k:
                n.output.append("")
            n.output[k] = SUM_PREFIX + n.output[0]


def _is_decomposed_norm(div, producer) -> bool:
    """``div`` is ``(x - mean(x)) / sqrt(...)``: the core of a LayerNormalization written out in primitive ops."""
    sub, root = producer.get(div.input[0]), producer.get(div.input[1])
    if sub is None or root is None or sub.op_type != "Sub" or root.op_type != "Sqrt":
        return False
    mean = producer.get(sub.input[1])
    return mean is not None and mean.op_type == "ReduceMean" and mean.input[0] == sub.input[0]


def _rms_input(n, producer, consts: _Consts) -> str | None:
    """The ``x`` of an RMS norm's core ``x * 1 / sqrt(mean(x ** 2, -1) + eps)`` (module doc) when ``n`` (a ``Mul`` by
    the ``Reciprocal``, or a ``Div`` by the ``Sqrt``) is its last node; else None."""

    def made(t: str, *ops: str):  # the node making t, looking through Casts (T5's float32 statistics)
        node = producer.get(t)
        while node is not None and node.op_type == "Cast":
            node = producer.get(node.input[0])
        return node if node is not None and node.op_type in ops else None

    def source(t: str) -> str:  # the tensor a chain of Casts starts from
        node = producer.get(t)
        while node is not None and node.op_type == "Cast":
            t, node = node.input[0], producer.get(node.input[0])
        return t

    def inverse_root(t: str):  # the Sqrt of 1 / sqrt(...): a Reciprocal (dynamo) or a Div of 1 (TorchScript)
        inv = made(t, "Reciprocal", "Div")
        if inv is not None and inv.op_type == "Div" and consts.value(inv.input[0]) != [1]:
            return None
        return made(inv.input[-1], "Sqrt") if inv is not None else None

    if len(n.input) != 2:
        return None
    if n.op_type == "Div":
        pairs = [(n.input[0], made(n.input[1], "Sqrt"))]
    else:  # Mul: the inverse root on either side
        pairs = [(n.input[1 - k], inverse_root(n.input[k])) for k in (0, 1)]
    for x, root in pairs:
        add = made(root.input[0], "Add") if root is not None else None
        mean = next((m for m in (made(i, "ReduceMean") for i in add.input) if m), None) if add is not None else None
        if mean is None or not _last_axis(consts.axes(mean), mean.input[0], consts):
            continue
        square = made(mean.input[0], "Pow", "Mul")
        if square is None or len(square.input) != 2 or source(square.input[0]) != source(x):
            continue
        if square.op_type == "Mul" and source(square.input[1]) == source(x) or consts.value(square.input[1]) == [2]:
            return source(x)  # the residual stream itself, not its cast to float32 for the statistics
    return None


def _last_axis(axes: list | None, tensor: str, consts: _Consts) -> bool:
    """Whether ``axes`` is the last axis of ``tensor`` alone: ``[-1]``, or ``[rank - 1]`` (dynamo writes ``[2]``)
    when shape inference knows the rank."""
    if axes is None or len(axes) != 1:
        return False
    return axes[0] == -1 or axes[0] > 0 and axes[0] == consts.rank(tensor) - 1


class _Consts:
    """Small constant vectors of a graph (initializers and ``Constant`` nodes, through ``Reshape``, ``Cast``,
    ``Identity``), as flat lists: a ``ReduceMean``'s axes, a ``Pow``'s exponent; and tensors' ranks."""

    def __init__(self, model):
        from onnx import numpy_helper

        self._producer = {o: n for n in model.graph.node for o in n.output if o}
        self._stored = {i.name: i for i in model.graph.initializer if prod(i.dims) <= 8}
        self._np = numpy_helper
        self._model, self._shapes = model, None

    def rank(self, tensor: str) -> int:
        """The rank of ``tensor`` (0: unknown); shapes are inferred once, when first asked."""
        if self._shapes is None:
            from edge.errors import FormatError
            from edge.route.tapshapes import tensor_shapes

            try:
                self._shapes = tensor_shapes(self._model)
            except FormatError:  # inference failed: no rank known, so no positive axis is provably the last
                self._shapes = {}
        return len(self._shapes.get(tensor) or ())

    def value(self, name: str) -> list | None:
        from onnx import helper

        for _ in range(8):
            if name in self._stored:
                return _small(self._np, self._stored[name])
            n = self._producer.get(name)
            if n is None:
                return None
            if n.op_type in ("Reshape", "Cast", "Identity", "CastLike", "Squeeze", "Unsqueeze"):
                name = n.input[0]
                continue
            if n.op_type != "Constant" or not n.attribute:
                return None
            a = n.attribute[0]
            if a.name == "value":
                return _small(self._np, a.t)
            v = helper.get_attribute_value(a)
            return list(v) if isinstance(v, (list, tuple)) else [v] if isinstance(v, (int, float)) else None
        return None

    def axes(self, node) -> list | None:
        """A Reduce node's axes: its ``axes`` attribute (below opset 18) or its constant second input."""
        from onnx import helper

        attr = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axes"), None)
        if attr is not None:
            return _integers(attr)
        v = self.value(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        return _integers(v) if v is not None else None


def _small(numpy_helper, t) -> list | None:
    """A stored tensor's values, if it holds at most 8 numbers that decode (else None: a damaged or hostile record
    is no norm's axes, never an exception out of the tap search)."""
    return decoded(numpy_helper, t) if prod(t.dims) <= 8 and t.data_type in _NUMERIC else None


def _integers(values) -> list | None:
    """``values`` as axes: finite integral numbers only (NaN, inf or 1.5 are no axes)."""
    try:
        out = [int(v) for v in values if float(v).is_integer()]
    except (TypeError, ValueError, OverflowError):
        return None
    return out if len(out) == len(values) else None


#: ONNX element types whose values can be axes: float, uint8, int8, uint16, int16, int32, int64, double, uint32, uint64
_NUMERIC = frozenset({1, 2, 3, 4, 5, 6, 7, 11, 12, 13})


def _perm(node) -> list[int]:
    from onnx import helper

    return next((list(helper.get_attribute_value(a)) for a in node.attribute if a.name == "perm"), [])
