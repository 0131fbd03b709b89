"""Small ONNX graph patterns the tail walk (:mod:`edge.learn.tail`) reads: numpy and onnx protos only.

* :func:`erf_gelu_input`: GELU written out in primitive ops, ``x * 0.5 * (1 + erf(x / sqrt(2)))``, as
  torch's exporters emit it below opset 20 (``Div``, ``Erf``, ``Add``, ``Mul``, ``Mul``; any operand order,
  the division also as a product with ``1 / sqrt(2)``).
* :func:`batch_flatten`: a ``Reshape`` to ``[B, k]`` whose ``B`` is read at run time from ``Shape`` (torch's
  exporters write ``flatten(1)`` and ``view(x.size(0), -1)`` of a dynamic batch so: dynamo as
  ``Concat(Reshape(Squeeze(Shape(x, start=0, end=1)), [-1]), [k])``, TorchScript as
  ``Concat(Unsqueeze(Gather(Shape(h), 0)), [-1])``), proven to keep the batch axis and merge the rest.
  :class:`LeadingDims` tells the dimension 0 the graph records for a tensor.
* :func:`silu_input`: SiLU (swish) written out, ``x * Sigmoid(x)``, as both torch exporters emit ``nn.SiLU``
  (EfficientNet's activation).
* :func:`depends`: whether one graph tensor is computed from another.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

__all__ = ["LeadingDims", "batch_flatten", "depends", "erf_gelu_input", "silu_input"]


def _scalar(consts: Mapping[str, np.ndarray], name: str, value: float) -> bool:
    v = consts.get(name)
    return v is not None and v.size == 1 and abs(float(v.reshape(-1)[0]) - value) <= 1e-5 * max(1.0, abs(value))


def _erf_term(s: str, x: str, producer: Mapping, consts: Mapping) -> bool:
    """Whether tensor ``s`` is ``1 + erf(x / sqrt(2))``."""
    add = producer.get(s)
    if add is None or add.op_type != "Add" or len(add.input) != 2:
        return False
    erf_out = next((i for i, o in zip(add.input, add.input[::-1]) if _scalar(consts, o, 1.0)), None)
    erf = producer.get(erf_out) if erf_out is not None else None
    if erf is None or erf.op_type != "Erf":
        return False
    scaled = producer.get(erf.input[0])
    if scaled is None or len(scaled.input) != 2:
        return False
    a, b = scaled.input
    if scaled.op_type == "Div":
        return a == x and _scalar(consts, b, math.sqrt(2.0))
    pairs = ((a, b), (b, a))
    return scaled.op_type == "Mul" and any(t == x and _scalar(consts, o, math.sqrt(0.5)) for t, o in pairs)


def erf_gelu_input(node, producer: Mapping, consts: Mapping) -> str | None:
    """The tensor ``x`` when ``Mul`` node ``node`` ends an erf GELU of ``x`` written out (module doc); else None."""
    if node.op_type != "Mul" or len(node.input) != 2:
        return None
    for k in (0, 1):
        inner = producer.get(node.input[k])
        if inner is None or inner.op_type != "Mul" or node.input[k] in consts or len(inner.input) != 2:
            continue
        three = [*inner.input, node.input[1 - k]]
        half = [t for t in three if _scalar(consts, t, 0.5)]
        rest = [t for t in three if t not in consts]
        if len(half) != 1 or len(rest) != 2:
            continue
        for x, s in (rest, rest[::-1]):
            if _erf_term(s, x, producer, consts):
                return x
    return None


def silu_input(node, producer: Mapping, consumers: Mapping) -> str | None:
    """The tensor ``x`` when ``Mul`` node ``node`` is ``x * Sigmoid(x)`` and the Sigmoid is read only there."""
    if node.op_type != "Mul" or len(node.input) != 2:
        return None
    for k in (0, 1):
        sig = producer.get(node.input[k])
        x = node.input[1 - k]
        if sig is not None and sig.op_type == "Sigmoid" and sig.input[0] == x and consumers.get(sig.output[0]) == 1:
            return x
    return None


def depends(tensor: str, on: str, producer: Mapping) -> bool:
    """Whether graph tensor ``tensor`` is computed from ``on``."""
    seen, todo = set(), [tensor]
    while todo:
        t = todo.pop()
        if t == on:
            return True
        n = producer.get(t)
        if n is None or t in seen:
            continue
        seen.add(t)
        todo.extend(i for i in n.input if i)
    return False


_SAME_VALUE = ("Reshape", "Squeeze", "Unsqueeze", "Identity")  # on one element: its value unchanged


def _dim0_of(t: str, producer: Mapping, consts: Mapping) -> str | None:
    """The tensor whose dimension 0 the one-element tensor ``t`` holds, when the graph proves it; else None."""
    n = producer.get(t)
    while n is not None and n.op_type in _SAME_VALUE and (n.op_type != "Reshape" or n.input[1] in consts):
        n = producer.get(n.input[0])  # a one-element shape tensor reshaped or (un)squeezed: the same value
    if n is None or n.op_type not in ("Shape", "Gather", "Slice"):
        return None
    shape = n if n.op_type == "Shape" else producer.get(n.input[0])
    if shape is None or shape.op_type != "Shape":
        return None
    a = {k.name: k for k in shape.attribute}
    start = a["start"].i if "start" in a else 0
    end = a["end"].i if "end" in a else None
    if start != 0:
        return None
    if n.op_type == "Shape":
        return shape.input[0] if end == 1 else None
    if n.op_type == "Gather":
        index = consts.get(n.input[1])
        axis = next((k.i for k in n.attribute if k.name == "axis"), 0)
        ok = index is not None and index.size == 1 and int(index.reshape(-1)[0]) == 0 and axis == 0
        return shape.input[0] if ok else None
    ins = [*n.input, "", "", ""][1:5]  # Slice(data, starts, ends, axes, steps)
    vals = [consts.get(i) if i else None for i in ins]
    if any(v is None for v in vals[:2]) or any(i and v is None for i, v in zip(ins[2:], vals[2:])):
        return None
    want = ([0], [1], [0], [1])
    ok = all(v is None or (v.size == 1 and int(v.reshape(-1)[0]) == w[0]) for v, w in zip(vals, want))
    return shape.input[0] if ok else None


def batch_flatten(node, producer: Mapping, consts: Mapping, batch_dim) -> bool:
    """Whether ``Reshape`` node ``node`` maps its input ``[B, ...]`` to ``[B, k]`` through a shape computed at run time.

    The shape must be ``Concat(b, [k])`` on axis 0 with ``k`` a constant (-1 or positive) and ``b`` dimension 0
    of a tensor ``T`` read by ``Shape`` (``Shape(T, 0, 1)``, ``Gather(Shape(T), 0)``, ``Slice(Shape(T), 0, 1)``,
    then reshaped or squeezed); ``T`` the reshaped tensor itself, or one whose dimension 0 the graph
    gives as the same symbol (or size) as the reshaped tensor's: ``batch_dim(name)`` returns that, or None when
    the graph does not say. Anything else is not proven a flatten, and False.
    """
    if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] in consts:
        return False
    cat = producer.get(node.input[1])
    if cat is None or cat.op_type != "Concat" or len(cat.input) != 2 or any(k.i for k in cat.attribute):
        return False
    k = consts.get(cat.input[1])
    if k is None or k.shape != (1,) or not (k[0] == -1 or k[0] >= 1):
        return False
    t, x = _dim0_of(cat.input[0], producer, consts), node.input[0]
    if t is None:
        return False
    return t == x or (d := batch_dim(x)) is not None and d == batch_dim(t)


class LeadingDims:
    """Dimension 0 of a graph tensor as the model records it (a symbol or a size), None when it does not say.

    Read from the graph's inputs, outputs and ``value_info``; for a tensor they do not cover, ONNX shape inference
    is run once (a copy of the model). A model it cannot infer leaves the tensor unknown (None).
    """

    def __init__(self, proto) -> None:
        self._proto, self._dims, self._inferred = proto, self._read(proto.graph), False

    @staticmethod
    def _read(graph) -> dict:
        out = {}
        for v in (*graph.input, *graph.value_info, *graph.output):
            t = v.type.tensor_type
            if t.HasField("shape") and t.shape.dim:
                d = t.shape.dim[0]
                out[v.name] = d.dim_param or (d.dim_value if d.HasField("dim_value") else None)
        return out

    def __call__(self, name: str):
        if name not in self._dims and not self._inferred:
            import onnx

            self._inferred = True
            try:
                inferred = onnx.shape_inference.infer_shapes(self._proto)
            except Exception:  # onnx's InferenceError, ValueError on a model over 2 GB: then the graph does not say
                return None
            self._dims = {**self._read(inferred.graph), **self._dims}
        return self._dims.get(name) or None
