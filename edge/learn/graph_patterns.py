"""Small ONNX graph patterns the tail walk (:mod:`edge.learn.tail`) reads: numpy and onnx protos only.

* :func:`erf_gelu_input`: GELU written out in primitive ops, ``x * 0.5 * (1 + erf(x / sqrt(2)))``, as
  torch's exporters emit it below opset 20 (``Div``, ``Erf``, ``Add``, ``Mul``, ``Mul``; any operand order,
  the division also as a product with ``1 / sqrt(2)``).
* :func:`depends`: whether one graph tensor is computed from another.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

__all__ = ["depends", "erf_gelu_input"]


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
