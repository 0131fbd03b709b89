"""Feature taps: intermediate activations of an ONNX model as one extra output, plus a detector head.

OOD detection works best on several layers of the frozen encoder (HDFF, Mahalanobis
ensembles), but an exported model returns only its final outputs. :func:`tap_model`
writes a copy of the model whose extra output ``edge.features`` concatenates the tapped
tensors, each mean-pooled to ``[B, C]`` (``[B, T, C]`` over ``T``: over the real tokens when the model has an
``attention_mask`` input, so padding does not change them, and so is a channels-first token map ``[B, C, T]``,
SqueezeBERT's, whose ``T`` is the mask's: :mod:`edge.route.tapmask`; ``[B, C, H, W]`` over ``H, W``, a 1-D CNN's
``[B, C, L]`` over ``L``), so the detector reads them from the **same** inference pass that serves the input: no
second run.
Which axes hold the channels is told by the graph (:class:`~edge.route.tapshapes.Layouts`), never by the rank.

Cost, measured on the digits encoder: two pooled taps and the concat add about 1-3 % to
a run at batch 16, 3-4 % at batch 1 (one node each: ``Concat`` and ``ReduceMean``, plus
the output). One tap is pooled straight into the output (one node).

**Detector head** (``head=Head(...)``): the HDC detector folded into the same graph, so
an inference also returns each input's routing vote (output ``edge.vote``: the domain,
or ``-1`` when the input is out of distribution). The folded HDC score (:mod:`edge.route.hdc`)
is a cosine in the whitened feature space: a ``Gemm`` with ``edge.head.m`` and
``edge.head.c`` gives the whitened features with the bias component (``u``),
``LpNormalization`` scales them to unit length, and a second ``Gemm`` with
``edge.head.p`` and ``edge.head.t`` gives the cosine to every class prototype, behind
the calibrated threshold ``t`` in column 0 (zero weights, bias ``t``). One ``ArgMax``
then decides both: the bar wins (OOD: no prototype is within cosine ``t``), or the most
similar class prototype does. Prototype ``(domain, class)`` sits at column ``1 + domain *
classes + class``, and a ``Gather`` from a constant table (:meth:`Head.route_table`)
turns the column into the vote. Five nodes: on a small encoder onnxruntime's cost per
node is a good part of the head's cost, and at batch 1 the rest is reading the two
matrices (about ``width * (width + 1 + classes * domains)`` floats) once per input.
A tie between the bar and a prototype counts as OOD (numpy: ``score < t`` is OOD).
The capacity ``classes * domains`` is fixed at tap time; unused columns hold a large
negative bias. The head tensors are ordinary initializers that the runtime writes like
weights (:meth:`Runtime.set_head`), so the ``hybrid`` strategy prepacks them; they are
marked ``head`` in the model metadata, excluded from the fingerprint and refused as
adapter targets. Until a detector writes them every input votes ``-1``. The graph
returns votes, not scores: :meth:`edge.route.ood.HDC.score` on the ``edge.features`` output
gives those. That is the narrow form, for features up to ``Head.rank`` wide (256 by default); wider features
(a text encoder's ``attn`` taps: 2304 on MiniLM, 9216 on BERT-base) get the wide form, whose cost grows with
``width * rank`` rather than ``width ** 2``. :mod:`edge.route.head` holds both forms.

Why in the graph: scored in numpy right after an onnxruntime run, the same arithmetic cost 70 us per batch
of 16 instead of 30 us hot (about ten numpy calls, each paying cold caches), 9-13 % of the digits encoder's
run at batch 16, 20-30 % at batch 1. In the graph, taps and head cost 2-4 % of it at batch 16 and about 9 %
at batch 1 (BENCHMARKS.md). At batch 1 that is onnxruntime's cost per node (0.4-1 us each, on the 62 us ViT
and the 10 us CNN alike), not arithmetic; fetching an output costs about as much, so the router fetches
only the logits and the vote (``Runtime.run(feeds, outputs)``; the features too while it learns), as the
bench's runs do (plain: the logits). Each head node's cost on the ViT, from the model cut after it (raw
sessions, batch 1, paired, load 7): Concat 1.5-2 points, ReduceMean 1.3, the whitening Gemm 3,
LpNormalization ~0, the prototype Gemm 2, ArgMax 0.5, Gather 0.2.
Measured besides (digits ViT, batch 1, paired, load 3-12): one ``Gemm`` onto a tight frame of the
prototypes whose ``LayerNormalization`` (scale and bias per column) yields the cosines and the bar, six
nodes instead of seven: 8.7-9.5 % against 9.1-9.8 %, within noise (on the CNN 32.0 against 31.3 %); no
``Gather`` (the column mapped in numpy): 0-0.4 points before the lookup; onnxruntime's parallel executor:
19.6 against 9.2 %; a narrower whitened space (the least-variance directions) raised the AUROC but cut
routing as served to 90.4 % (rank 64 of 128); the last ``attn`` tap alone: 5.1 against 8.7 %, but it routes
92.5 % as served; each tap pooled and two chained Gemms (the second's C input carrying the first's product)
instead of the Concat: 8.7 against 9.0 %; onnxruntime's ``only_execute_path_to_fetches``: within noise.
None kept. Folding the mean into one Gemm over the flattened taps would read T times the matrix (1.1 MB
per ViT input at batch 1): not tried. Pooling by a ``MatMul`` with a constant ``1/T`` row (its ``[B, 1, C]``
then needs a Squeeze, Reshape or Flatten before the ``Gemm``): 2.4-4.7 against 2.9 % for ``ReduceMean``;
``Einsum btc,ck->bk`` (pool and whiten in one node, no bias): 10.7 against 5.2 %. Not kept either.
What was kept: **one tap** (:mod:`edge.route.tapsets`; ``mlp-in:1`` then, now ``attn-in:1`` at the same cost, what
``edge bench ood`` and ``edge demo --stream`` serve on the ViT).
At batch 1 the head reads its matrices once per input, so its width costs as much as its nodes (a ``Gemm``
onto 16 columns +1.2 points over the taps, onto 211 columns +3.3): one 64-wide tap reads 8.1 k floats
against 24.4 k for two, and saves the ``Concat``. Through :class:`~edge.runtime.Runtime` (hybrid, steady
state, both in the same rounds, four runs of 40-200 rounds, load 11-13): two ``attn`` taps +7.9 to +10.4 %,
``mlp-in:1`` +4.0 to +8.0 % at batch 1, 2.3-5.9 points less in every run; at batch 16 1.9-5.1 points less.
Earlier heads: one ``Gemm`` with a norm bar concatenated in front and the column turned into a domain by
``Div``/``Sub`` (8 nodes) cost about 2 points more at batch 1; one with separate max, divide, compare and
select (12 nodes) more again. An earlier try fed the matrices as graph inputs every run and added ~7 %:
onnxruntime packs a fed matrix on every call, while a constant one is packed once per session.

**The one-tap head at batch 1, and why it does not go under 5 %** (digits ViT, ``mlp-in:1``; raw sessions,
each variant against the plain run in the same rounds, 100-150 rounds of 25 runs, load 4-13; the spread of
one figure between runs is about 0.7 points). The optimised graphs (``optimized_model_filepath``) with and
without the head are the same 68 nodes plus its six: the tap on block 0's norm output keeps every fusion.
The model cut after each head node, over the plain run: ReduceMean 2.1-2.3 points (its output fetched; a
second small fetch costs nothing measurable), the whitening Gemm +0.6 to +1.2, LpNormalization +0.2, the
prototype Gemm +0.4 to +0.7, ArgMax +0.4 to +0.7, Gather +0.2 to +0.4: the head 4.8-6.2 % (through the
Runtime 5.4-5.9 %). The plain model runs 68 nodes in 58-61 us, about 0.85 us a node, and the head is six
of them (3-3.6 us), the ReduceMean alone about 1.2 us, on one thread as on two; ``attn-in:1`` costs the same
(4.7 and 5.3 against 4.9 and 5.7 % in two runs, load 14). Tried in the same rounds,
none kept: the head on the model's own pooled ``features`` (already ``[B, C]``, no ReduceMean) 3.0-4.0 %,
but it routes 90.0 % as served (HDC AUROC 86.4); pooling by ReduceSum, by a MatMul with a ``1/T`` row and a
Flatten or Reshape, by ReduceMean with keepdims and a Flatten, or by the model's own ReduceMean (the tap
concatenated to its input, then sliced): each within noise of the ReduceMean or dearer; TopK and GatherND
instead of ArgMax and Gather: -0.7, +0.4 and 0.0 points; the head without the ``edge.features`` output: -0.9
and -1.8 points on raw sessions, -0.5 and +0.9 through the Runtime; the tight frame read by a
``LayerNormalization`` (five nodes: ReduceMean, a Gemm onto 127 columns, LayerNormalization, ArgMax,
Gather) 5.58 against 5.59 %. The
whitening Gemm's bias can be folded exactly on a LayerNormalization tap (``sum_c (y_c - beta_c) / gamma_c
= 0``, so a row of ``M`` yields the constant) and saved 0.3-0.7 points, but on the demo ViT ``sum beta /
gamma`` is 0.016 (the fold scales rounding by about 70) and an adapter that writes the norm's weights
breaks it: not kept. A vote that is distance-aware needs a pool, a whitening, a norm, the prototype
products, an argmax and the domain lookup; each one-node merge tried costs what it saves. The ratio also
grows with the machine's load: ``edge bench ood`` gave 5.4 % at load 1.7 (``mlp-in:1``), 6.4 % for
``mlp-in:1`` and for ``attn-in:1`` at load 6-11 (BENCHMARKS.md).
Kernel forms and session options, measured later (``attn-in:1``, batch 1, onnxruntime 1.32.0, paired within
rounds against the plain run, 80-300 rounds of 30 runs, load 0.3-7.5): the head costs 3.1-3.5 us over a
58-60 us plain run (+5.0 to +6.5 %) in every form, and two sessions of the same file differ by up to 0.3 us
(IQR +-0.5): nothing beat that. ArgMax ``select_last_index`` or ``keepdims``, an int32 route table, MatMul+Add
for either Gemm, the pool's axes as an initializer: within +-0.3 us; no Gather, the column mapped in numpy
(``table[column]``, 0.07 us): -0.44 to +0.51 us in five runs; pooling by a 1x1 ``Conv`` (weights 1/T) and a
``Flatten``: 0.08-0.14 us less in a head-only model, -0.44 to +0.49 us in the ViT; opset 17's ReduceMean
(axes an attribute) against opset 20's (an input): 0.04 us a node. Head matrices of other widths (16 to 96
columns) cost the same: at batch 1 the head is its six nodes' dispatch, not its arithmetic. Session options
set on both sessions (head over plain, same rounds; defaults +5.2 to +5.5 %): intra-op spinning off +6.5,
``dynamic_block_base`` 4 +6.6, ``force_spinning_stop`` +6.4, denormals as zero +5.6, no memory pattern +6.3,
no CPU arena +6.2, ``ORT_ENABLE_EXTENDED`` +6.0, priority-based order +5.4, one intra-op thread +6.1 (the plain
run 10 % faster, 53.5 against 59.7 us, the head as dear). :meth:`Runtime.run` adds 1.9 us to both runs alike;
a second fetched output ~0.1 us. Dropping the ``edge.features`` graph output: -0.1 to -0.5 us (the router
fetches it while it learns).

**Placement** (kept): the taps' and the head's nodes are stored right after the last node that writes a tapped
tensor, not appended at the end (:func:`_place_early`; onnxruntime runs nodes in the stored order). ``attn-in:1``,
raw sessions paired within rounds (100 rounds, load 2.9): on one intra-op thread 5.6 % against 6.4 % appended; on
two, 4.1 % against 5.4-5.6 % (``mlp-in:1``, 60-150 rounds, load 1.8-2.1). Since a model under 1 MiB of weights
runs on one thread by default (``runtimes.base.SMALL_MODEL_BYTES``: the plain ViT is about 5 % faster there), the
served figure is the one-thread one.

Only nodes, graph inputs and outputs are added (constants as ``Constant`` nodes); the
stored weights are untouched, so the copy keeps the model's fingerprint and every
adapter of the model applies to it. Which tensors to tap: :mod:`edge.route.tapsets` (by name, by op
pattern, as the exporter declared them; ``auto`` by default).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from edge.errors import ConfigError
from edge.format.modelinfo import META_KEY
from edge.format.onnx_graph import batch_dim, batch_folded
from edge.route.head import HEAD_C, HEAD_M, HEAD_P, HEAD_T, HEAD_UNUSED, VOTE, Head, add_head
from edge.route.tapargs import check_args
from edge.route.tapmask import MASKED, MASKED_FIRST, along_tokens, check_tokens, mask_input, mask_weights, pool_masked
from edge.route.tapsets import TAP_SETS, expose_sums, feature_shapes, resolve_tap_set, resolve_taps, tensor_shapes
from edge.route.tapshapes import FIRST, LAST, LAYOUTS, Layouts, elem_types, unsized

__all__ = [
    "FEATURES",
    "HEAD_C",
    "HEAD_M",
    "HEAD_P",
    "HEAD_T",
    "HEAD_UNUSED",
    "TAP_SETS",
    "VOTE",
    "Head",
    "Tapped",
    "resolve_taps",
    "tap_model",
]

FEATURES = "edge.features"
#: element types a tap may hold (onnx TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16): all but float32 are cast to it
FLOATS = (1, 10, 11, 16)


def _pool_axes(shape: tuple, layout: str | None) -> tuple[list[int], int]:
    """Axes a tap is mean-pooled over, and its channel axis: ``[B, C, *spatial]`` over the spatial axes (at any
    rank: a 1-D CNN's ``[B, C, L]`` over ``L``), ``[B, T, C]`` (or ``[B, H, W, C]``) over the rest; ``[B, C]``
    not at all."""
    if len(shape) <= 2:
        return [], 1
    if layout == FIRST:
        return list(range(2, len(shape))), 1
    return list(range(1, len(shape) - 1)), len(shape) - 1


@dataclass(frozen=True)
class Tapped:
    """What :func:`tap_model` wrote: the file, the tapped tensors, the feature output with its width, the head."""

    path: Path
    tensors: tuple[str, ...]  # the tapped tensors, in feature order
    width: int  # feature columns: the tapped tensors' channels summed
    features: str = FEATURES  # output [B, width]
    head: Head | None = None  # in-graph detector head (output VOTE), if any
    tap_set: str = "names"  # which set gave the tensors: the name asked for, "auto (stages)" for auto's choice


def tap_model(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    taps: str | Sequence[str] = "auto",
    *,
    head: Head | None = None,
    mask: str | None = "auto",
    layout: Mapping[str, str] | None = None,
) -> Tapped:
    """Write ``src`` with one more output, ``edge.features`` ``[B, d]``, to ``dst``.

    ``taps``: a tap set name (:data:`TAP_SETS`) or tensor names. Every tap is mean-pooled
    (a ``[B, T, C]`` tensor over ``T``, a ``[B, C, H, W]`` feature map over ``H, W``, a 1-D CNN's ``[B, C, L]``
    over ``L``, a ``[B, C]`` one not at all), and the pooled taps are concatenated in order (small taps of one
    shape apart from the channels are concatenated first and pooled by one node: the same values). With
    ``head``, the detector head of the module doc is added too (output ``edge.vote``).
    ``mask``: a ``[B, T]`` graph input marking real tokens (1) and padding (0); every ``[B, T, C]`` tap is then
    averaged over the real tokens only, so padding a sentence does not change its features (a ``[B, C, T]`` one too
    when its last axis is provably the mask's; a 1-D CNN's shorter map is not a token map). ``"auto"`` takes
    the input ``attention_mask`` when the model has one; ``None`` averages over every position.
    ``layout``: ``{tensor: "channels-first" | "channels-last"}``, taken over the graph's word: needed for a tap whose
    layout the graph does not tell (:class:`~edge.route.tapshapes.Layouts`: the op producing the tensor, or the ops
    reading it; never its rank alone), which is otherwise refused naming it. The file is rewritten only when its
    bytes would change, so a cache can keep it. Arguments of the wrong type (the paths and the taps swapped) raise
    :class:`ConfigError` naming the one at fault and the signature (:mod:`edge.route.tapargs`).
    """
    from onnx import TensorProto, helper

    from edge.convert.onnx_source import read_onnx
    from edge.format.io import atomic_write_bytes

    src, dst, taps = check_args(src, dst, taps, head, mask, layout)  # types first: a ConfigError naming the argument
    model = read_onnx(src)  # a regular file, bounded; FormatError naming it otherwise
    taps, used = resolve_tap_set(model, taps, source=src)
    if not taps:
        raise ConfigError(f"no taps given for model {model.graph.name!r}; pass a tap set name or tensor names")
    taken = {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
    if FEATURES in taken:
        raise ConfigError(f"model {model.graph.name!r} already has an output {FEATURES!r}; tap the original")
    names = {o for n in model.graph.node for o in n.output} | taken | {i.name for i in model.graph.initializer}
    ours = sorted(n for n in names if n.startswith("edge."))
    if ours:  # the names this module adds all start with "edge.": a clash would make an invalid graph
        raise ConfigError(f"model {model.graph.name!r} already has tensors {ours[:4]}; tap the original model")
    expose_sums(model, taps)  # a fused norm's input that onnxruntime's optimizer did not keep: its optional output
    layouts = _layouts(model, taps, layout or {})
    shapes = feature_shapes(model, tensor_shapes(model), taps, layouts)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    types = elem_types(model)
    found, batch = [], batch_dim(model)
    for tensor in taps:
        why = _not_activation(model.graph, tensor)
        if why:
            raise ConfigError(
                f"tap {tensor!r} {why}; pass a tap set ({', '.join(TAP_SETS.names())}; NAME:K) or the names of "
                "intermediate tensors, batch first"
            )
        if types.get(tensor, TensorProto.FLOAT) not in FLOATS:  # float16/64 taps are cast to float32 below
            kind = TensorProto.DataType.Name(types[tensor]).lower()
            raise ConfigError(f"tap {tensor!r} of model {model.graph.name!r} holds {kind}; tap float tensors only")
        shape = shapes.get(tensor) or ()
        if len(shape) > 2 and layouts[tensor] is None:
            raise ConfigError(
                f"tap {tensor!r} of model {model.graph.name!r} has shape {list(shape)} and the graph does not tell "
                "its layout (no conv, pool or norm makes or reads it); pass layout={" + repr(tensor) + ": "
                f"'{FIRST}'}} (a conv's map: pooled over the axes after the channels) or '{LAST}' (a token "
                "sequence [B, T, C]: pooled over T)"
            )
        axes, channel = _pool_axes(shape, layouts[tensor])
        channels = shape[channel] if len(shape) >= 2 else None
        if not isinstance(channels, int):
            blind = unsized(model)
            raise ConfigError(
                f"tap {tensor!r} is not a tensor of model {model.graph.name!r} with a batch axis and a known "
                f"feature dimension (the channels); some tensors: {sorted(shapes)[:8]}"
                + (f"; onnxruntime's fused {', '.join(blind)} leave the shapes after them unknown: tap the file "
                   "before optimisation" if blind else "")
            )  # fmt: skip
        if shape[0] != batch and batch_folded(shape[0], batch):  # e.g. MobileViT's patches folded into the batch
            raise ConfigError(f"tap {tensor!r} has first axis {shape[0]!r}, not the batch {batch!r}: its rows are "
                              "not the inputs; pass taps='stages' or tensor names that are batch first")  # fmt: skip
        found.append((tensor, shape, axes, channels, channel))
    width = sum(c for *_, c, _ in found)
    g = model.graph
    ours = len(g.node)  # the nodes from here on are the taps' and the head's (placed early below)
    for i, (tensor, *rest) in enumerate(found):  # the pooled output is float32: other float taps are cast first
        if types.get(tensor, TensorProto.FLOAT) != TensorProto.FLOAT:
            found[i] = (f"edge.cast{i}", *rest)
            g.node.append(helper.make_node("Cast", [tensor], [found[i][0]], to=TensorProto.FLOAT, name=found[i][0]))
    name = mask_input(g, mask) if any(len(s) == 3 for _, s, *_ in found) else None
    along = along_tokens(model, name, [(t, s) for t, s, a, *_ in found if a == [2]]) if name else set()
    tokens = [  # [B, T, C] taps, and [B, C, T] ones whose last axis is the mask's (SqueezeBERT's Conv1d blocks)
        MASKED if axes == [1] else MASKED_FIRST if tensor in along else None for tensor, _, axes, *_ in found
    ]
    if name is not None and any(tokens):  # token taps averaged over the real tokens: MatMul by the mask's weights
        check_tokens(g, name, [(t, s) for k, (t, s, *_) in zip(tokens, found) if k == MASKED])
        mask_weights(g, name, opset, first=MASKED_FIRST in tokens)
        found = [(t, s, [k] if k else a, *r) for k, (t, s, a, *r) in zip(tokens, found)]
    channel = found[0][4]
    rest = {(k, tuple(d for i, d in enumerate(shape) if i != k)) for _, shape, _, _, k in found}
    if len(found) > 1 and len(rest) == 1 and _small(found):
        # small taps of one shape apart from the channels: concatenate, then pool once (one node instead of one
        # per tap; at batch 1 onnxruntime's cost per node is most of what the taps cost, while copying large
        # taps, e.g. a text encoder's [B, T, C] at batch 16, would cost more than the nodes it saves)
        pooled_by = found[0][2]
        g.node.append(
            helper.make_node(
                "Concat",
                [t for t, *_ in found],
                ["edge.taps" if pooled_by else FEATURES],
                axis=channel,
                name="edge.taps.concat",
            )
        )
        if pooled_by:
            _pool(g, "edge.taps", FEATURES, pooled_by, opset)
    elif len(found) == 1:  # pooled straight into the output: no one-input Concat (onnxruntime keeps it)
        _pool(g, found[0][0], FEATURES, found[0][2], opset)
    else:
        pooled = [f"edge.tap{i}" for i in range(len(found))]
        for out, (tensor, _, axes, *_) in zip(pooled, found):
            _pool(g, tensor, out, axes, opset)
        g.node.append(helper.make_node("Concat", pooled, [FEATURES], axis=1, name="edge.features.concat"))
    g.output.append(helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, ["batch", width]))
    props = {p.key: p.value for p in model.metadata_props}
    props["edge.route.taps"] = ",".join(taps)
    props["edge.route.tapset"] = used
    meta = props.get(META_KEY)
    if head is not None:
        meta = add_head(model, head, width, meta, FEATURES, opset)
    _place_early(g, ours, set(taps))
    if meta is not None:  # the new outputs are the model's outputs (edge.learn.update can learn on the features)
        props[META_KEY] = _with_outputs(meta, FEATURES, *([VOTE] if head is not None else []))
    helper.set_model_props(model, props)
    data = model.SerializeToString()
    if not _holds(dst, data):
        atomic_write_bytes(dst, data)  # a FIFO or device at dst is refused (WriteError), not written into
    return Tapped(dst, tuple(taps), width, head=head, tap_set=used)


def _holds(path: Path, data: bytes) -> bool:
    """Whether the regular file ``path`` holds ``data`` already; read bounded by ``len(data)``, so a FIFO or
    ``/dev/zero`` in its place (or a larger file) is not read but answered False."""
    from edge.errors import FormatError
    from edge.format.io import read_bounded

    try:
        return read_bounded(path, len(data), what="tapped model") == data
    except FormatError:  # none there, not a regular file, or longer than data: written (or refused) anew
        return False


def _layouts(model, taps: Sequence[str], given: Mapping[str, str]) -> dict[str, str | None]:
    """Each tap's layout: the one ``given`` for it (``tap_model(..., layout=)``), else the graph's (or None)."""
    for tensor, value in given.items():
        if tensor not in taps:
            raise ConfigError(f"layout of {tensor!r} given, but it is not a tap of model {model.graph.name!r}; "
                              f"the taps: {list(taps)[:8]}")  # fmt: skip
        if value not in LAYOUTS:
            raise ConfigError(f"layout {value!r} of tap {tensor!r}: expected one of {', '.join(LAYOUTS)}")
    told = Layouts(model)
    return {t: given.get(t) or told(t) for t in taps}


def _not_activation(g, tensor: str) -> str | None:
    """Why ``tensor`` can be no tap whatever its shape (a stored weight, or no tensor of the graph), or None."""
    import difflib

    if any(i.name == tensor for i in g.initializer):
        return f"is a stored weight of model {g.name!r}, not an activation"
    made = {o for n in g.node for o in n.output if o} | {i.name for i in g.input}
    if tensor in made:
        return None
    close = difflib.get_close_matches(tensor, sorted(made), 3)
    return f"names no tensor of model {g.name!r}" + (f" (close: {', '.join(close)})" if close else "")


def _place_early(g, ours: int, taps: set[str]) -> None:
    """Move the nodes from ``g.node[ours]`` on (the taps' and the head's, which read only the tapped tensors and
    their own constants) to right after the last node that writes a tapped tensor. onnxruntime runs a graph's
    nodes in the order stored, so the head then reads its tap while it is in the cache, and the tap's buffer
    is free for the rest of the run; appended at the end, the head cost 5.4-5.6 % of the digits ViT's run at
    batch 1, placed early 4.1 % (``mlp-in:1``, raw sessions, paired in 60-150 rounds, load 1.8-2.1)."""
    nodes = list(g.node)
    body, new = nodes[:ours], nodes[ours:]
    last = max((i for i, n in enumerate(body) if taps & set(n.output)), default=-1)
    del g.node[:]
    g.node.extend(body[: last + 1] + new + body[last + 1 :])


#: taps are concatenated before pooling when each holds at most this many values per input (see tap_model)
CONCAT_FIRST_MAX = 1 << 14


def _small(found: list) -> bool:
    """Whether every tap has a fixed shape apart from the batch and at most ``CONCAT_FIRST_MAX`` values per input."""
    sizes = [shape[1:] for _, shape, *_ in found]
    if not all(isinstance(d, int) for s in sizes for d in s):
        return False
    return sum(math.prod(s) for s in sizes) <= CONCAT_FIRST_MAX


def _pool(g, tensor: str, out: str, axes: list, opset: int) -> None:
    """Append the node that mean-pools ``tensor`` over ``axes`` into ``out`` (an ``Identity`` for no axes;
    ``[MASKED]``/``[MASKED_FIRST]``: a token tap averaged over the real tokens, :mod:`edge.route.tapmask`)."""
    from onnx import TensorProto, helper

    if axes in ([MASKED], [MASKED_FIRST]):
        pool_masked(g, tensor, out, axes[0])
    elif not axes:
        g.node.append(helper.make_node("Identity", [tensor], [out], name=f"{out}.pool"))
    elif opset >= 18:
        const = helper.make_tensor(f"{out}.axes.value", TensorProto.INT64, [len(axes)], axes)
        g.node.append(helper.make_node("Constant", [], [f"{out}.axes"], value=const))
        g.node.append(helper.make_node("ReduceMean", [tensor, f"{out}.axes"], [out], keepdims=0, name=f"{out}.pool"))
    else:
        g.node.append(helper.make_node("ReduceMean", [tensor], [out], axes=axes, keepdims=0, name=f"{out}.pool"))


def _with_outputs(meta: str, *names: str) -> str:
    from edge.format.modelinfo import ModelInfo

    info = ModelInfo.from_json(meta)
    return replace(info, outputs=(*info.outputs, *(n for n in names if n not in info.outputs))).to_json()
