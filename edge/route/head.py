"""The detector head of a tapped model (:func:`edge.route.taps.tap_model`, ``head=Head(...)``): its capacity, its
tensors and its nodes, in one of two forms fixed at tap time by the feature width (:mod:`edge.route.taps` module doc
has the measurements behind the narrow form).

**Narrow** (``width <= Head.rank``): five nodes. A ``Gemm`` with ``edge.head.m`` ``[d, d + 1]`` and
``edge.head.c`` gives the whitened features with the bias component (``u``), ``LpNormalization`` scales them to unit
length, a second ``Gemm`` with ``edge.head.p`` and ``edge.head.t`` gives the cosine to every class prototype behind
the calibrated threshold in column 0, one ``ArgMax`` picks the bar (OOD) or the most similar prototype, and a
``Gather`` from :meth:`Head.route_table` turns the column into the vote.

**Wide** (``width > Head.rank``): the detector whitens with a rank-capped covariance (:mod:`edge.route.hdc`,
``rank``), so every cosine numerator is linear in ``f`` and ``|u|^2`` is ``|f - mu|^2 / s^2`` minus a rank-``r``
quadratic plus ``bias^2``. Nine nodes read ``d * (r + 1 + n_v) + d`` floats per input instead of ``d * (d + 1)``:
``g = f - mu`` (``Sub``, ``edge.head.mu``); one ``Gemm`` ``O = g M + c`` whose columns are the ``r`` quadratic
directions, a constant 1, the bar (0) and the ``n_v - 1`` prototype numerators; ``ReduceSumSquare(g)``;
``O * O``; a ``Gemm`` with ``edge.head.e`` ``[r + 1 + n_v, 1]`` and ``C = |g|^2`` gives ``kappa |u|^2`` (``e`` is
``-kappa`` on the quadratic columns, ``kappa bias^2`` on the constant one); ``Sqrt``; a ``Gemm``
``sqrt(kappa |u|^2) * edge.head.t + O`` puts ``t |u|`` into the bar's column (``t / sqrt(kappa)`` there) and
``HEAD_UNUSED`` times the norm into every column that must not win; ``ArgMax`` and ``Gather`` as above. The vote
compares ``numerator_k`` with ``t |u|``: the same as the cosine with ``t``, ``|u| > 0``. MiniLM with ``auto`` taps
(2304 wide, rank 256): 2.6 MB per input instead of 21 MB.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from edge.errors import ConfigError, FormatError
from edge.format.modelinfo import META_KEY

__all__ = ["HEAD_C", "HEAD_E", "HEAD_M", "HEAD_MU", "HEAD_P", "HEAD_RANK", "HEAD_T", "HEAD_UNUSED", "VOTE", "Head"]

VOTE = "edge.vote"  # detector-head output: [B] int64, the routed domain, or -1 when the input is OOD
#: head tensors: whitening Gemm (matrix, bias), prototype Gemm (matrix, bias; its column 0 holds the threshold);
#: the wide form's centre and norm weights (module doc)
HEAD_M, HEAD_C, HEAD_P, HEAD_T = "edge.head.m", "edge.head.c", "edge.head.p", "edge.head.t"
HEAD_MU, HEAD_E = "edge.head.mu", "edge.head.e"
#: bias of unused head columns: never the max or the argmax
HEAD_UNUSED = -1e30
#: default rank of the whitening (edge.route.hdc.HDC(rank=...)) and of a wide head: features up to this wide are
#: whitened in full and get the narrow head
HEAD_RANK = 256


@dataclass(frozen=True)
class Head:
    """Capacity of an in-graph detector head: known domains, classes per domain, and the whitening rank.

    ``rank``: features up to ``rank`` wide get the narrow head; wider ones the wide head, which holds a whitening
    of rank ``rank`` (the detector must be fitted with ``HDC(rank=...)`` at most this).
    """

    domains: int = 8
    classes: int = 10
    rank: int = HEAD_RANK

    def __post_init__(self) -> None:
        if self.domains < 1 or self.classes < 1 or self.rank < 1:
            raise ConfigError(
                f"a detector head needs domains, classes and rank >= 1, got {self.domains}, {self.classes}, {self.rank}"
            )

    def wide(self, width: int) -> bool:
        """Whether features ``width`` wide get the wide form (module doc)."""
        return width > self.rank

    def columns(self, width: int) -> tuple[int, int]:
        """Narrow: output widths of the two Gemms (whitened features with the bias component; bar + prototypes).
        Wide: the one Gemm's (quadratic directions, constant, bar, prototypes) and the bar + prototypes."""
        n_v = 1 + self.classes * self.domains
        return (self.rank + 1 + n_v, n_v) if self.wide(width) else (width + 1, n_v)

    def route_table(self, width: int = 0) -> list[int]:
        """The vote of each column ArgMax reads: -1 for the bar and the columns before it, else the column's domain."""
        lead = [-1] * (self.rank + 1) if self.wide(width) else []
        return lead + [-1] + [j // self.classes for j in range(self.classes * self.domains)]


def add_head(model, head: Head, width: int, meta: str | None, features: str, opset: int) -> str:
    """Add the detector head's tensors, nodes and outputs; return the model metadata with the head tensors."""
    from onnx import TensorProto, helper, numpy_helper

    from edge.format.modelinfo import ModelInfo, TensorInfo

    if meta is None:
        raise FormatError(f"model {model.graph.name!r} has no {META_KEY!r} metadata; tap a model exported by edge")
    info = ModelInfo.from_json(meta)
    taken = {t.name for t in model.graph.initializer} | {o.name for o in model.graph.output} | set(info.tensors)
    clash = sorted(taken & {HEAD_M, HEAD_C, HEAD_P, HEAD_T, HEAD_MU, HEAD_E, VOTE})
    if clash:
        raise ConfigError(f"model {model.graph.name!r} already has {clash}; tap the original model")
    g = model.graph
    values = _wide_init(head, width) if head.wide(width) else _narrow_init(head, width)
    g.initializer.extend(numpy_helper.from_array(v, k) for k, v in values.items())

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        g.node.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    if head.wide(width):
        c = node("Sub", [features, HEAD_MU], "edge.head.g")  # f - mu
        out = node("Gemm", [c, HEAD_M, HEAD_C], "edge.head.o")  # [quadratic, 1, bar 0, numerators]
        if opset >= 18:
            axes = helper.make_tensor("edge.head.axes.value", TensorProto.INT64, [1], [1])
            g.node.append(helper.make_node("Constant", [], ["edge.head.axes"], value=axes))
            ss = node("ReduceSumSquare", [c, "edge.head.axes"], "edge.head.gg", keepdims=1)
        else:
            ss = node("ReduceSumSquare", [c], "edge.head.gg", axes=[1], keepdims=1)
        sq = node("Mul", [out, out], "edge.head.sq")
        n2 = node("Gemm", [sq, HEAD_E, ss], "edge.head.n2")  # kappa |u|^2
        norm = node("Sqrt", [n2], "edge.head.norm")
        cos = node("Gemm", [norm, HEAD_T, out], "edge.head.cos")  # t |u| in the bar's column, numerators after it
    else:
        u = node("Gemm", [features, HEAD_M, HEAD_C], "edge.head.u")  # [(f - mu) W, bias]
        unit = node("LpNormalization", [u], "edge.head.unit", axis=1, p=2)
        cos = node("Gemm", [unit, HEAD_P, HEAD_T], "edge.head.cos")  # [t, cosine to each class prototype]
    column = node("ArgMax", [cos], "edge.head.column", axis=1, keepdims=0)
    route = head.route_table(width)
    table = helper.make_tensor("edge.head.route.value", TensorProto.INT64, [len(route)], route)
    g.node.append(helper.make_node("Constant", [], ["edge.head.route"], value=table))
    node("Gather", ["edge.head.route", column], VOTE, axis=0)
    g.output.append(helper.make_tensor_value_info(VOTE, TensorProto.INT64, ["batch"]))
    tensors = dict(info.tensors)
    for k, v in values.items():
        tensors[k] = TensorInfo(k, tuple(v.shape), head=True)
    form = {"domains": head.domains, "classes": head.classes, "width": width}
    if head.wide(width):
        form["rank"] = head.rank
    return replace(info, tensors=tensors, extra={**info.extra, "edge.head": form}).to_json()


def _narrow_init(head: Head, width: int) -> dict:
    """The narrow head's tensors before a detector writes them: every input votes -1."""
    import numpy as np

    n_u, n_v = head.columns(width)
    c = np.zeros(n_u, np.float32)
    c[width] = 1.0  # the bias component: ||u|| = 1
    t = np.full(n_v, HEAD_UNUSED, np.float32)
    t[0] = 0.0  # the bar beats every unused prototype column: all OOD until written
    return {
        HEAD_M: np.zeros((width, n_u), np.float32),
        HEAD_C: c,
        HEAD_P: np.zeros((n_u, n_v), np.float32),
        HEAD_T: t,
    }


def _wide_init(head: Head, width: int) -> dict:
    """The wide head's tensors before a detector writes them: a norm of at least 1, the bar (0) beats every column."""
    import numpy as np

    n_o, _ = head.columns(width)
    bar = head.rank + 1
    c = np.zeros(n_o, np.float32)
    c[head.rank] = 1.0  # the constant column
    e = np.zeros((n_o, 1), np.float32)
    e[head.rank] = 1.0
    t = np.full((1, n_o), HEAD_UNUSED, np.float32)
    t[0, bar] = 0.0
    return {
        HEAD_MU: np.zeros(width, np.float32),
        HEAD_M: np.zeros((width, n_o), np.float32),
        HEAD_C: c,
        HEAD_E: e,
        HEAD_T: t,
    }
