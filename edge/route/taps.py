"""Feature taps: intermediate activations of an ONNX model as one extra output, plus a detector head.

OOD detection works best on several layers of the frozen encoder (HDFF, Mahalanobis
ensembles), but an exported model returns only its final outputs. :func:`tap_model`
writes a copy of the model whose extra output ``edge.features`` concatenates the tapped
tensors, each mean-pooled over every axis but the batch and the last
(``[B, T, C] -> [B, C]``), so the detector reads them from the **same** inference pass
that serves the input: no second run.

Cost, measured on the digits encoder at batch 16: two pooled taps and the concat add
about 1-3 % to a run.

**Detector head** (``head=Head(...)``): the HDC detector folded into the same graph, so
an inference also returns each input's routing vote (output ``edge.vote``: the domain,
or ``-1`` when the input is out of distribution). The folded HDC score (:mod:`edge.route.ood`)
is affine in the features up to one norm: one ``Gemm`` with the matrix ``edge.head.m``
and bias ``edge.head.c`` gives the whitened features with the bias component (``u``)
and every class prototype's unnormalised similarity ``s_k``, and an input is in
distribution when ``max_k s_k / ||u|| >= t``, i.e. ``max_k s_k >= t ||u||``. So the
bar ``t ||u||`` (``t`` = ``edge.head.t``, the calibrated threshold) is put in front of
the class columns and one ``ArgMax`` decides both: the bar wins (OOD), or the most
similar class prototype does. Prototype ``(domain, class)`` sits at column ``(domain +
1) * classes + class`` of that row (``classes - 1`` never-winning columns follow the
bar), so the vote is ``column // classes - 1``. Eight nodes in all, since onnxruntime's
fixed cost per node, not the arithmetic, is most of the head's cost on a small encoder.
A tie between the bar and a prototype counts as OOD (numpy: ``score < t`` is OOD).
The capacity ``classes * domains`` is fixed at tap time; unused columns hold a large
negative bias. The head tensors are ordinary initializers that the runtime writes like
weights (:meth:`Runtime.set_head`), so the ``hybrid`` strategy prepacks them; they are
marked ``head`` in the model metadata, excluded from the fingerprint and refused as
adapter targets. Until a detector writes them every input votes ``-1``. The graph
returns votes, not scores: :meth:`edge.route.ood.HDC.score` on the ``edge.features`` output
gives those.

Why in the graph: scored in numpy right after an onnxruntime run, the same arithmetic
cost 70 us per batch of 16 instead of 30 us hot (about ten numpy calls, each paying
cold caches), 9-13 % of the digits encoder's run at batch 16; in the graph, taps and
head together cost about 4 % of it (BENCHMARKS.md), most of it onnxruntime's fixed cost
per node (a few us each; the ``Gemm`` alone is about 2.5 %, and an earlier head of 12
nodes, with separate max, divide, compare and select, cost 5-6.5 %). An earlier try
fed the matrices as graph inputs every run and added ~7 %: onnxruntime packs a fed
matrix on every call, while a constant one is packed once per session.

Only nodes, graph inputs and outputs are added (constants as ``Constant`` nodes); the
stored weights are untouched, so the copy keeps the model's fingerprint and every
adapter of the model applies to it.

Tap sets (:data:`TAP_SETS`) read a pre-LN transformer's ``LayerNormalization`` inputs:
``attn`` (default) the residual stream after each attention sub-block, ``blocks`` after
each block, ``all`` after every sub-block. More taps score a little better but cost
more: the detector whitens ``d x d`` per input and ``d`` grows with each tap
(BENCHMARKS.md compares them). Pass tensor names to tap anything else.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from edge.errors import ConfigError, FormatError
from edge.format.modelinfo import META_KEY
from edge.registry import Registry

__all__ = [
    "FEATURES",
    "HEAD_C",
    "HEAD_M",
    "HEAD_T",
    "TAP_SETS",
    "VOTE",
    "Head",
    "Tapped",
    "resolve_taps",
    "tap_model",
]

FEATURES = "edge.features"
VOTE = "edge.vote"  # detector-head output: [B] int64, the routed domain, or -1 when the input is OOD
HEAD_M, HEAD_C, HEAD_T = "edge.head.m", "edge.head.c", "edge.head.t"  # head tensors: Gemm matrix, bias, threshold
#: bias of unused head columns: never the max or the argmax
HEAD_UNUSED = -1e30


def _norm_inputs(model) -> list[str]:
    return [n.input[0] for n in model.graph.node if n.op_type == "LayerNormalization"]


#: named tap choices: name -> function(onnx.ModelProto) -> tensor names. With pre-LN blocks
#: (two LayerNormalization nodes each, plus a final one) the norm inputs are, in order: the
#: embedding, then after each attention and after each MLP sub-block.
TAP_SETS: Registry[Callable] = Registry("tap set")
TAP_SETS.add("attn", lambda m: _norm_inputs(m)[1::2])  # after each attention sub-block
TAP_SETS.add("blocks", lambda m: [t for t in _norm_inputs(m)[::-1][::2] if t != _norm_inputs(m)[0]][::-1])
TAP_SETS.add("all", lambda m: _norm_inputs(m)[1:])  # after every sub-block


def resolve_taps(model, taps: str | Sequence[str] = "attn") -> list[str]:
    """Tensor names for a tap set name (:data:`TAP_SETS`) or an explicit list."""
    if not isinstance(taps, str):
        return list(dict.fromkeys(taps))
    names = list(dict.fromkeys(TAP_SETS.get(taps)(model)))
    if not names:
        raise ConfigError(
            f"tap set {taps!r} finds nothing in model {model.graph.name!r} ({len(_norm_inputs(model))} "
            "LayerNormalization nodes); pass taps=[tensor names] (intermediate tensors, batch first)"
        )
    return names


@dataclass(frozen=True)
class Head:
    """Capacity of an in-graph detector head: known domains and classes per domain it can hold."""

    domains: int = 8
    classes: int = 10

    def __post_init__(self) -> None:
        if self.domains < 1 or self.classes < 1:
            raise ConfigError(
                f"a detector head needs domains >= 1 and classes >= 1, got {self.domains}, {self.classes}"
            )

    def columns(self, width: int) -> tuple[int, int, int]:
        """Column counts of the head's Gemm output: whitened features + bias, padding, class prototypes."""
        return width + 1, self.classes - 1, self.classes * self.domains


@dataclass(frozen=True)
class Tapped:
    """What :func:`tap_model` wrote: the file, the tapped tensors, the feature output with its width, the head."""

    path: Path
    tensors: tuple[str, ...]  # the tapped tensors, in feature order
    width: int  # feature columns: the tapped tensors' last dimensions summed
    features: str = FEATURES  # output [B, width]
    head: Head | None = None  # in-graph detector head (output VOTE), if any


def tap_model(
    src: str | os.PathLike, dst: str | os.PathLike, taps: str | Sequence[str] = "attn", *, head: Head | None = None
) -> Tapped:
    """Write ``src`` with one more output, ``edge.features`` ``[B, d]``, to ``dst``.

    Every tap is mean-pooled over all axes but the first and last, and the pooled taps
    are concatenated in order. With ``head``, the detector head of the module doc is
    added too (outputs ``edge.score`` and ``edge.route``). The file is rewritten only
    when its bytes would change, so a cache can keep it.
    """
    import onnx
    from onnx import TensorProto, helper

    from edge.format.io import atomic_write_bytes

    try:
        model = onnx.load(str(src))
    except Exception as e:  # protobuf DecodeError and friends
        raise FormatError(f"cannot read ONNX model {src}: {e}") from e
    taps = resolve_taps(model, taps)
    shapes = _shapes(model)
    taken = {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
    if FEATURES in taken:
        raise ConfigError(f"model {model.graph.name!r} already has an output {FEATURES!r}; tap the original")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    pooled, width = [], 0
    for i, tensor in enumerate(taps):
        shape = shapes.get(tensor)
        if not shape or not isinstance(shape[-1], int):
            raise ConfigError(
                f"tap {tensor!r} is not a tensor of model {model.graph.name!r} with a known last dimension; "
                f"some tensors: {sorted(shapes)[:8]}"
            )
        width += shape[-1]
        out = f"edge.tap{i}"
        axes = list(range(1, len(shape) - 1))
        if not axes:
            model.graph.node.append(helper.make_node("Identity", [tensor], [out], name=f"{out}.pool"))
        elif opset >= 18:
            const = helper.make_tensor(f"{out}.axes.value", TensorProto.INT64, [len(axes)], axes)
            model.graph.node.append(helper.make_node("Constant", [], [f"{out}.axes"], value=const))
            model.graph.node.append(
                helper.make_node("ReduceMean", [tensor, f"{out}.axes"], [out], keepdims=0, name=f"{out}.pool")
            )
        else:
            model.graph.node.append(
                helper.make_node("ReduceMean", [tensor], [out], axes=axes, keepdims=0, name=f"{out}.pool")
            )
        pooled.append(out)
    g = model.graph
    g.node.append(helper.make_node("Concat", pooled, [FEATURES], axis=1, name="edge.features.concat"))
    g.output.append(helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, ["batch", width]))
    props = {p.key: p.value for p in model.metadata_props}
    props["edge.route.taps"] = ",".join(taps)
    if head is not None:
        props[META_KEY] = _add_head(model, head, width, opset, props.get(META_KEY))
    helper.set_model_props(model, props)
    data = model.SerializeToString()
    dst = Path(dst)
    if not (dst.exists() and dst.read_bytes() == data):
        atomic_write_bytes(dst, data)
    return Tapped(dst, tuple(taps), width, head=head)


def _add_head(model, head: Head, width: int, opset: int, meta: str | None) -> str:
    """Add the detector head's tensors, nodes and outputs; return the model metadata with the head tensors."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from edge.format.modelinfo import ModelInfo, TensorInfo

    if meta is None:
        raise FormatError(f"model {model.graph.name!r} has no {META_KEY!r} metadata; tap a model exported by edge")
    info = ModelInfo.from_json(meta)
    taken = {t.name for t in model.graph.initializer} | {o.name for o in model.graph.output} | set(info.tensors)
    clash = sorted(taken & {HEAD_M, HEAD_C, HEAD_T, VOTE})
    if clash:
        raise ConfigError(f"model {model.graph.name!r} already has {clash}; tap the original model")
    n_u, n_pad, n_c = head.columns(width)
    c = np.full(n_u + n_pad + n_c, HEAD_UNUSED, np.float32)
    c[:n_u] = 0.0
    c[width] = 1.0  # the bias component: ||u|| = 1, every class column -1e30 < t: all OOD until written
    c[n_u + n_pad :] = 0.0
    g = model.graph
    g.initializer.extend(
        [
            numpy_helper.from_array(np.zeros((width, len(c)), np.float32), HEAD_M),
            numpy_helper.from_array(c, HEAD_C),
            numpy_helper.from_array(np.ones(1, np.float32), HEAD_T),
        ]
    )

    def const(name: str, values: list[int]) -> str:
        value = helper.make_tensor(f"{name}.value", TensorProto.INT64, [len(values)], values)
        g.node.append(helper.make_node("Constant", [], [name], value=value))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        g.node.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    y = node("Gemm", [FEATURES, HEAD_M, HEAD_C], "edge.head.y")
    split = const("edge.head.split", [n_u, n_pad + n_c])
    g.node.append(
        helper.make_node("Split", [y, split], ["edge.head.u", "edge.head.cls"], axis=1, name="edge.head.split")
    )
    if opset >= 18:
        norm = node("ReduceL2", ["edge.head.u", const("edge.head.axis", [1])], "edge.head.norm", keepdims=1)
    else:
        norm = node("ReduceL2", ["edge.head.u"], "edge.head.norm", axes=[1], keepdims=1)
    bar = node("Mul", [norm, HEAD_T], "edge.head.bar")  # t * ||u||: a class wins only with cosine >= t
    ext = node("Concat", [bar, "edge.head.cls"], "edge.head.ext", axis=1)
    column = node("ArgMax", [ext], "edge.head.column", axis=1, keepdims=0)
    slot = node("Div", [column, const("edge.head.classes", [head.classes])], "edge.head.slot")
    node("Sub", [slot, const("edge.head.one", [1])], VOTE)
    g.output.append(helper.make_tensor_value_info(VOTE, TensorProto.INT64, ["batch"]))
    tensors = dict(info.tensors)
    tensors[HEAD_M] = TensorInfo(HEAD_M, (width, len(c)), head=True)
    tensors[HEAD_C] = TensorInfo(HEAD_C, (len(c),), head=True)
    tensors[HEAD_T] = TensorInfo(HEAD_T, (1,), head=True)
    extra = {**info.extra, "edge.head": {"domains": head.domains, "classes": head.classes, "width": width}}
    return replace(info, tensors=tensors, extra=extra).to_json()


def _shapes(model) -> dict[str, tuple]:
    """Shape (ints, or names for symbolic dims) of every tensor onnx shape inference knows."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as e:  # onnx raises InferenceError and protobuf errors
        raise FormatError(f"shape inference failed on model {model.graph.name!r}: {e}") from e
    shapes = {}
    for v in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]:
        t = v.type.tensor_type
        if t.HasField("shape"):
            shapes[v.name] = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim)
    return shapes
