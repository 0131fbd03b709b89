"""Axes computed from constants, folded for shape inference (:func:`edge.route.tapshapes.tensor_shapes`).

torch's dynamo exporter writes some axes as a small computation on constants instead of a constant: GroupNorm's
affine weights are unsqueezed over ``Range(1, rank - 1, 1)`` (wav2vec2's feature encoder). onnx's shape inference
does not evaluate that ``Range``, so the ``Unsqueeze`` and every tensor after it lose their rank, and the CNN tap
sets stop at the first conv. :func:`fold_axes` evaluates such axes (the ``axes`` input of ``Squeeze``, ``Unsqueeze``
and the ``Reduce*`` ops) when they depend on constants alone, through a short list of arithmetic ops, with onnx's
reference evaluator (one node at a time, none making more than 64 values), and gives the graph read for shapes a
``Constant`` in their place. Nothing is guessed: axes that depend on a graph input, or on an op outside the list,
stay as they are. Only the copy read for shapes changes.
"""

from __future__ import annotations

import math

__all__ = ["fold_axes"]

#: ops evaluated on constants (small integer arithmetic: what exporters compute axes with)
_FOLDABLE = frozenset(
    "Constant Identity Cast CastLike Reshape Add Sub Mul Div Neg Range Concat Squeeze Unsqueeze Gather Slice".split()
)
#: ops whose second input is axes
_AXES_OPS = frozenset(
    "Squeeze Unsqueeze ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSumExp "
    "ReduceSumSquare".split()
)
#: an initializer read by the folded ops may hold at most this many values (axes come from scalars and short vectors)
_SMALL = 64


def fold_axes(model):
    """A copy of ``model`` whose computed constant axes are ``Constant`` nodes (module doc), or ``model`` itself when
    there are none."""
    import onnx

    g = model.graph
    small = {i.name: i for i in g.initializer if math.prod(i.dims) <= _SMALL}
    producer = {o: n for n in g.node for o in n.output if o}
    const: set[str] = set(small)
    for n in g.node:
        if n.op_type in _FOLDABLE and n.domain in ("", "ai.onnx") and all(not i or i in const for i in n.input):
            const.update(o for o in n.output if o)
    targets = sorted(
        {
            n.input[1]
            for n in g.node
            if n.op_type in _AXES_OPS
            and len(n.input) > 1
            and n.input[1] in const
            and n.input[1] in producer
            and producer[n.input[1]].op_type != "Constant"
        }
    )
    if not targets:
        return model
    values = _evaluate(model, targets, producer, small)
    if not values:
        return model
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    nodes = [
        onnx.helper.make_node("Constant", [], [n.output[0]], value=onnx.numpy_helper.from_array(values[n.output[0]]))
        if n.output and n.output[0] in values
        else n
        for n in twin.graph.node
    ]
    del twin.graph.node[:]
    twin.graph.node.extend(nodes)
    return twin


def _evaluate(model, targets: list[str], producer: dict, small: dict) -> dict:
    """The values of ``targets`` (integer vectors of at most 8 values) from the constant nodes they depend on, run one
    node at a time so that no step allocates more than ``_SMALL`` values (a hostile ``Range`` or a chain of
    ``Concat`` is refused before it runs, or after its first oversized output); {} when any step fails."""
    import numpy as np
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    needed, todo, seen = {}, list(targets), set(targets)
    while todo:
        n = producer.get(todo.pop())
        if n is None:
            continue
        needed[id(n)] = n
        for i in n.input:
            if i and i not in seen:
                seen.add(i)
                todo.append(i)
    order = {id(n): k for k, n in enumerate(model.graph.node)}
    opsets = {o.domain or "": o.version for o in model.opset_import if o.domain in ("", "ai.onnx")}
    try:
        values = {name: numpy_helper.to_array(t) for name, t in small.items() if name in seen}
        for n in sorted(needed.values(), key=lambda n: order[id(n)]):
            feeds = {i: values[i] for i in n.input if i}
            if n.op_type == "Range" and _range_length(*(feeds[i] for i in n.input)) > _SMALL:
                return {}
            if _predicted(n.op_type, [np.asarray(feeds[i]) for i in n.input if i]) > _SMALL:
                return {}  # a Concat of many inputs, a broadcast or a Gather that would make more: not run
            outs = ReferenceEvaluator(n, opsets=opsets).run(None, feeds)
            if any(np.asarray(v).size > _SMALL for v in outs):
                return {}
            values.update(zip(n.output, (np.asarray(v) for v in outs)))
    except Exception:  # an op or form the evaluator does not take: the axes stay computed, as before
        return {}
    return {
        t: values[t].astype(np.int64)
        for t in targets
        if values[t].dtype.kind in "iu" and values[t].ndim <= 1 and values[t].size <= 8
    }


def _predicted(op: str, inputs: list) -> int:
    """An upper bound of the values ``op`` makes from ``inputs`` (checked before it runs): their sum for Concat, the
    product of the sizes for a Gather and for the broadcasting arithmetic, else the largest input (Reshape, Cast,
    Slice... make no more than they are given; Range is bounded by :func:`_range_length`)."""
    sizes = [int(a.size) for a in inputs]
    if op == "Concat":
        return sum(sizes)
    if op in ("Gather", "Add", "Sub", "Mul", "Div"):
        return math.prod(max(s, 1) for s in sizes)
    return max(sizes, default=0)


def _range_length(start, limit, delta) -> float:
    """How many values ``Range(start, limit, delta)`` makes (infinite for a zero step)."""
    start, limit, delta = (float(v) for v in (start, limit, delta))
    return math.inf if delta == 0 else max(0.0, math.ceil((limit - start) / delta))
