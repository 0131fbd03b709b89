"""The onnxruntime backend's predicted resident memory, read from the model's graph (:func:`ort_parts`).

What a model loaded by :class:`runtimes.onnxruntime.OrtBackend` keeps resident, per part, and which strategy holds
which (:meth:`OrtParts.mb`):

``weights``
    The arena: every writable tensor once, float32 and integer (the backend's own arrays; both sessions read them
    in place: the bound one through IOBinding, the prepacked one through ``add_initializer`` or as fed inputs).
``packed``
    The prepacked session's own copies (``hybrid``, ``rebuild``): MLAS packs the constant B of ``MatMul`` and
    ``Gemm`` (float32: columns padded to a multiple of 16, ``MlasGemmPackBSize``), of ``MatMulInteger`` and of the
    QDQ weights onnxruntime fuses into integer kernels (``DequantizeLinear`` feeding ``MatMul`` or ``Gemm``:
    ``MlasGemmPackBSize`` of the quantized GEMM, columns padded to 16 and rows to 4, plus an int32 column sum per
    column); every other constant the session is handed (a ``Conv`` filter, which the layout optimizer reorders
    into blocks; a ``DequantizeLinear`` feeding anything else) is copied, its own bytes again. A tensor read by
    two packing ops counts twice (each kernel packs its own). Tables only ``Gather`` reads (embeddings) are fed
    from the arena on every run: nothing. The bound session packs nothing (it packs B on every run, in scratch).
``activations``
    The largest sum of activation tensors alive at once when the nodes run in graph order, at ``batch``; a tensor
    lives from the node that writes it to the last that reads it, the graph's inputs and outputs throughout; what
    constants alone compute (folded when the session is built) is not an activation. Sizes come from the graph's
    own value infos (torch.onnx writes most) with the batch axis fixed and any other dynamic one at the length it runs
    at (:mod:`runtimes.ort_lengths`), the others from their inputs by op family
    (:func:`_propagated`), not from onnx's shape inference: its operator schema registry, built at its first use,
    stays resident (3.6-5 MB a process, measured) and would cost more than the prediction is worth. Each session
    holds that times :data:`ARENA_FACTOR`: its BFC arena (grown in chunks; the first run allocates tensor by tensor
    before the memory pattern's one block), kernel scratch (an ``Attention`` node's scores are no graph tensor) and
    what its first runs leave in the heap.
``session``
    What a session holds whatever its weights: :data:`SESSION_MB`, plus :data:`NODE_BYTES` a node of the graph (its
    kernel, plan and graph entries) and :data:`CONSTANT_BYTES` an initializer (its value, name and plan entries: a
    static int8 model has a scale and a zero point a weight), per session.

``bound``: weights + one session; ``rebuild``: weights + packed + one session (a rebuild frees the stale session
before it packs anew, ``FREE_STALE_BEFORE_BUILD``); ``hybrid``: weights + packed + two sessions, so
``hybrid = bound + rebuild - weights``. Measured, a hybrid runtime holds less than that by about twice its
activation peak (3.3 MB on MiniLM-L6, 1.1 on BERT h320-l4, nothing on the digits models): the two sessions' first
runs share heap. Counted anyway: hybrid is then over, never under (a budget must not admit what does not fit).

How close (onnxruntime 1.32.0, x86-64, 2 cores; a fresh process per file and strategy, every library's pages mapped
first as ``edge bench memory`` does; resident growth above a process that imported the same modules, after load,
runs and one adapter switch cycle, minus the adapter's bytes; median of 2 rounds at load 7-11, which moves no byte):
fitted and checked on 15 files x 3 strategies. MiniLM-L6 fp32, dynamic and static int8: bound and rebuild within
-1.2 to +0.4 %, hybrid +0.7 to +7.4 % (95.5 predicted against 95.7 MB bound, 145.5 against 141.8 hybrid); BERT ladder
rungs h192-l3 and h320-l4 (fp32, dynamic int8): bound and rebuild +0.6 to +10 %, hybrid +3.6 to +16 %; h128-l2 and
the sub-MB digits ViT and CNN (fp32, dynamic and static int8): 0 to +0.6 MB bound and rebuild, up to +1.3 MB hybrid.
No figure under by more than 1.2 %. In one earlier round (load 5-8) every MiniLM process held 4-5 MB more and BERT
h320-l4 int8's bound and rebuild 5.3 MB more (the heap's state, not the model): then bound was 4 % under.
On models exported from torch by ``exporters.onnx`` (same method, median of 2 rounds): a ResNet-18-shaped CNN
(45 MB), a MobileNetV2-shaped one (13 MB), their dynamic int8 twins and a 1-D audio CNN hold 1.8-2.25x their activation
peak, not 4.5 (no hidden scratch: :data:`CONV_ARENA_FACTOR`); a model indexing a 24 MB parameter (``table[ids]``)
holds a transposed copy of it in the bound session (``per_run``). A model with a dynamic input axis (a text encoder
exported with ``--dynamic-seq``) is sized at the length it runs at (:func:`runtimes.ort_lengths.run_axes`: ``dims``
given, else the ``max_seq_length`` its export records, else the graph's bound, else a lower bound: a one-step run,
said where a budget weighs it): its value infos
(``[batch, seq, hidden]``, decomposed attention's scores ``[batch, heads, seq, seq]``) sized from it. Measured at
64-512 tokens (same method, one round; adapters included) on BERT/RoBERTa h256-l4, DistilBERT h192-l3, BERT h128-l2
with decomposed attention: bound -9 to +21 %, rebuild -13 to +16 %, hybrid -5 to +41 %; their dynamic int8 twins
(128 and 512 tokens): bound -8 to +23 %, rebuild -14 to +16 %, hybrid -5 to +50 %; a fused (opset 23) BERT h256-l4:
bound 0 to +10 %, rebuild -2 to +6 %, hybrid 0 to +16 %. The most over is hybrid at 512 tokens (its two sessions
share heap, above), the most under rebuild at 128-256 tokens (a session holds more than 4.5x a small peak and less
than that of a large one: fitted alone on these rows, :data:`ARENA_FACTOR` comes out at 4.5 again). A model exported
at a fixed 512 tokens is predicted as its dynamic twin at 512, within 1 %. Before, every ``seq``-sized tensor went
unsized: a 1-token run, 9-16 % under at 64 tokens and 34-85 % under at 512.
Not counted: the Python process and onnxruntime's libraries (paid once a process, whatever the model), the adapters
held (:attr:`edge.Runtime.adapter_bytes`), and a batch larger than ``batch`` or a sequence longer than the length
predicted at (activations grow with them; attention scores with the length's square).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from math import prod

import numpy as np

from edge.errors import ConfigError
from runtimes.ort_lengths import dim_value, run_axes

__all__ = ["ARENA_FACTOR", "CONSTANT_BYTES", "NODE_BYTES", "SESSION_MB", "STRATEGIES", "OrtParts", "ort_parts"]

STRATEGIES = ("hybrid", "bound", "rebuild")
#: a session's memory: its fixed part, per node, per initializer, per byte of the activation peak; fitted on the
#: measurements of the module doc (least squares weighted by 1/measured, an under-prediction weighted 10x more)
SESSION_MB = 0.4
NODE_BYTES = 4400
CONSTANT_BYTES = 4800
ARENA_FACTOR = 4.5
#: the same for a convolutional graph whose every activation is a graph tensor sized from the graph
#: (:func:`_convolutional`): measured 1.8-2.25x its peak (fp32 and dynamic int8 ResNet-18-shaped, a MobileNetV2-shaped
#: CNN, a 1-D audio CNN); with ``ARENA_FACTOR`` their ``bound`` was predicted 26-56 % over
CONV_ARENA_FACTOR = 2.4
_MB = 2**20
_F4 = 4
#: a tensor's elements are counted up to this (a hostile file's dims, 2**62 each or an expression of them, would
#: overflow the float of the prediction); a tensor that large fits no device anyway
_MAX_ELEMENTS = 2**62
#: bytes an element of each TensorProto element type (FLOAT, UINT8, INT8, UINT16, INT16, INT32, INT64, BOOL,
#: FLOAT16, DOUBLE, UINT32, UINT64, BFLOAT16)
_ITEM = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}
_PACKS = {"MatMul", "Gemm", "MatMulInteger"}
_SAME_SHAPE = {"DequantizeLinear", "Cast", "Identity"}  # a folded constant of its first input's shape
_FIRST = {"Reshape", "Squeeze", "Unsqueeze", "Flatten"}  # input 0's elements, whatever the shape input
#: folded from the weights in the bound session too: a weight's shape is fixed, and its dequantized copy is made
#: per run next to its MatMul in both sessions (static int8 MiniLM's bound figure, fitted with it folded, is within 1 %)
_KEEPS_FOLDED = {"Shape", "Size", "DequantizeLinear"}


@dataclass(frozen=True)
class OrtParts:
    """Bytes of each part of an onnxruntime model's footprint (see the module doc)."""

    weights: int  # the arena: writable tensors once, float and integer
    packed: int  # the prepacked session's own copies (MLAS packed B, copied constants)
    activations: int  # largest sum of live activations at the batch
    nodes: int  # nodes of the graph
    constants: int  # initializers of the graph, writable or not
    #: what the bound session computes from its weights on every run (a transposed table: :func:`_peak`)
    per_run: int = 0
    arena_factor: float = ARENA_FACTOR  # a session's memory per byte of the activation peak
    #: why the activations are a lower bound (a dynamic input axis of no known length, its tensors not counted:
    #: runtimes.ort_lengths; said where a memory budget weighs the prediction), else ""
    unsized: str = ""

    def session_mb(self, bound: bool = False) -> float:
        """One session's own memory: its fixed part, its nodes, its initializers and its activations (``bound``: the
        bound session's, with what it computes from its weights every run). With :attr:`unsized` set, a lower bound:
        the tensors along an axis of unknown length are not counted (a one-step run)."""
        own = NODE_BYTES * self.nodes + CONSTANT_BYTES * self.constants + self.arena_factor * self.activations
        return SESSION_MB + (own + (self.per_run if bound else 0)) / _MB

    def mb(self, strategy: str) -> float:
        """Predicted resident MB under ``strategy``."""
        if strategy not in STRATEGIES:
            raise ConfigError(f"unknown onnxruntime strategy {strategy!r}; allowed: {', '.join(STRATEGIES)}")
        packed = 0 if strategy == "bound" else self.packed
        sessions = (self.session_mb(bound=True) if strategy != "rebuild" else 0) + (
            self.session_mb() if strategy != "bound" else 0
        )
        return (self.weights + packed) / _MB + sessions


def ort_parts(
    proto,
    shapes: Mapping[str, tuple[tuple[int, ...], np.dtype]],
    fed: set[str],
    batch: int = 1,
    dims: Mapping[str, int] | None = None,
) -> OrtParts:
    """The parts of the model ``proto``'s footprint. ``proto``: its ``ModelProto`` without the writable tensors'
    data (they may be absent, data-less stubs or graph inputs; not modified); ``shapes``: each writable tensor's
    shape and dtype; ``fed``: those fed to the prepacked session as inputs (slots, embedding tables); ``dims``: the
    length each dynamic axis of the inputs runs at (``{"seq": 256}``), else :func:`runtimes.ort_lengths.run_axes`
    finds it (the model's ``max_seq_length``, the graph's own bound); if none does, the parts say why
    (:attr:`OrtParts.unsized`) and their :meth:`~OrtParts.mb` is a lower bound (the tensors along that axis not
    counted, as before lengths were known)."""
    weights = sum(prod(s) * np.dtype(d).itemsize for s, d in shapes.values())
    g = proto.graph
    constants = len({t.name for t in g.initializer} | set(shapes))
    axes, unsized = run_axes(proto, shapes, dims, batch)
    peak, per_run = _peak(proto, shapes, axes)
    factor = CONV_ARENA_FACTOR if _convolutional(g, shapes) else ARENA_FACTOR
    return OrtParts(weights, _packed(proto, shapes, fed), peak, len(g.node), constants, per_run, factor, unsized)


#: ops whose working memory is no graph tensor, or whose output the walk cannot size from the graph
_HIDDEN = {"Attention", "MultiHeadAttention", "GroupQueryAttention", "LSTM", "GRU", "RNN", "Loop", "Scan", "If"}


def _convolutional(g, shapes) -> bool:
    """Whether the graph convolves and its activations are all graph tensors the walk sizes: no attention or
    recurrent op (their scores and states are kernel scratch) and no product of two activations (sized as the larger
    one, short of e.g. attention scores: ``ARENA_FACTOR`` absorbs that)."""
    const = {t.name for t in g.initializer} | set(shapes)
    convolves = False
    for n in g.node:
        if n.op_type in _HIDDEN or n.op_type == "Einsum":
            return False
        if n.op_type in _PACKS and (len(n.input) < 2 or n.input[1] not in const):
            return False
        convolves = convolves or n.op_type in ("Conv", "ConvInteger", "QLinearConv")
    return convolves


def _packed(proto, shapes, fed: set[str]) -> int:
    """Bytes of the prepacked session's own copies of the constant writable tensors."""
    consts = {k: v for k, v in shapes.items() if k not in fed}
    dq = {n.output[0]: n.input[0] for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in consts}
    packs: dict[str, int] = {}
    for n in proto.graph.node:
        if n.op_type not in _PACKS or len(n.input) < 2:
            continue
        b = n.input[1]
        name = b if b in consts else dq.get(b)
        if name is None:
            continue
        shape, dtype = consts[name]
        if len(shape) != 2:
            continue
        trans = n.op_type == "Gemm" and any(a.name == "transB" and a.i for a in n.attribute)
        k, cols = (shape[1], shape[0]) if trans else shape
        cols16 = -(-cols // 16) * 16
        integer = np.dtype(dtype).itemsize == 1
        size = cols16 * (-(-k // 4) * 4) + 4 * cols16 if integer else cols16 * k * _F4
        packs[name] = packs.get(name, 0) + size
    return sum(packs.get(k, prod(s) * np.dtype(d).itemsize) for k, (s, d) in consts.items())


def _peak(proto, shapes, axes: Mapping[str, int]) -> tuple[int, int]:
    """The largest sum of activation tensors alive at once, running the nodes in graph order at ``batch``; and the
    bytes the bound session computes from the weights on every run (its weights are graph inputs, so nothing computed
    from them is folded at build): each output of a node folded from a weight, at its first input's size (torch.onnx
    writes ``table[ids]`` as ``GatherND(Transpose(table))``: a transposed copy of the table a run), but for
    ``Shape``/``Size`` (a weight's shape is fixed) and ``DequantizeLinear`` (its copy is made per run next to its
    MatMul in both sessions: static int8 MiniLM's bound figure, fitted without it, is within 1 %)."""
    g = proto.graph
    const = {t.name: tuple(t.dims) for t in g.initializer} | {k: tuple(s) for k, (s, _) in shapes.items()}
    known = {}  # tensor -> (elements, bytes an element), from the graph's own value infos
    dims = dict(axes)  # symbolic dim -> its length, each expression evaluated once
    for v in (*g.value_info, *g.output, *g.input):
        if v.name not in const and (got := _declared(v, dims)) is not None:
            known[v.name] = got
    inputs = [v.name for v in g.input if v.name not in const]
    keep = {v.name for v in g.output} | set(inputs)
    nodes = []  # the nodes that run (not folded), with their inputs and outputs read once
    per_run, size = 0, {k: prod(s) * np.dtype(d).itemsize for k, (s, d) in shapes.items()}  # weights, and from them
    for n in g.node:
        ins, outs = list(n.input), [o for o in n.output if o]
        if n.op_type == "Constant" or ins and all(i in const for i in ins if i):
            same = const.get(ins[0], ()) if ins and n.op_type in _SAME_SHAPE else ()
            const.update((o, same) for o in outs)  # folded at build: a constant, not an activation
            if n.op_type not in _KEEPS_FOLDED and any(i in size for i in ins):  # but a bound session's every run
                first = size.get(ins[0], prod(const.get(ins[0], ())) * _F4)
                size.update((o, first) for o in outs)
                per_run += first * len(outs)
        else:
            nodes.append((n, ins, outs))
    last = {i: k for k, (_, ins, _) in enumerate(nodes) for i in ins}
    ends: dict[int, list[str]] = {}
    live = {i: _bytes(known.get(i)) for i in inputs}
    now = peak = sum(live.values())
    for k, (n, _, outs) in enumerate(nodes):
        for j, o in enumerate(outs):
            if o not in live:
                if o not in known:
                    elements, item = _propagated(n, j, known, const)
                    known[o] = min(elements, _MAX_ELEMENTS), item
                live[o] = _bytes(known[o])
                now += live[o]
                if o not in keep:
                    ends.setdefault(max(last.get(o, k), k), []).append(o)
        peak = max(peak, now)
        for o in ends.pop(k, ()):
            now -= live.pop(o)
    return peak, per_run


def _strides(node) -> int:
    """The product of a Conv's or pool's ``strides`` (1 without): its output has that many times fewer positions (with
    ``same`` padding; as many or one more per axis on an odd one: ``ARENA_FACTOR`` covers it)."""
    return max(prod(next((list(a.ints) for a in node.attribute if a.name == "strides"), [1])), 1)


def _bytes(size: tuple[int, int] | None) -> int:
    return 0 if size is None else size[0] * size[1]


def _declared(value, axes: dict[str, int | None]) -> tuple[int, int] | None:
    """(elements, bytes an element) of a value info whose shape is known once the batch axis (the first, or one
    named ``batch``) and the inputs' dynamic axes (``axes``: name -> length) are fixed, torch's expressions of them
    too (``Min(512, seq)``: :func:`runtimes.ort_lengths.dim_value`); None if another axis is unknown or there is no
    shape. Each expression's value (or None) is added to ``axes``: a graph repeats a few thousand times."""
    t = value.type.tensor_type
    if not t.HasField("shape") or not t.elem_type:
        return None
    n = 1
    for i, d in enumerate(t.shape.dim):
        if not d.HasField("dim_value") and d.dim_param not in axes:
            axes[d.dim_param] = dim_value(d.dim_param, axes)
        if d.HasField("dim_value"):
            n *= max(d.dim_value, 1)
        elif (v := axes[d.dim_param]) is not None:
            n *= v
        elif i == 0:
            n *= axes["batch"]
        else:
            return None
    return min(n, _MAX_ELEMENTS), _ITEM.get(t.elem_type, 4)


def _propagated(node, j: int, known, const) -> tuple[int, int]:
    """(elements, bytes an element) of output ``j`` of ``node`` when the graph does not declare it, by op family:
    a product with a constant right-hand side [K, N] maps K to N, a ``Conv`` its input channels to its output ones,
    a ``Conv`` or pool divides the positions by its strides (a dynamic int8 ResNet-18's stem, whose value info
    ``edge quantize`` drops, was counted at stride 1: 4x its output, 4.5x the whole footprint), ``Concat`` sums,
    ``Gather`` from a constant table takes a row an index, ``DynamicQuantizeLinear`` makes bytes (and two scalars),
    ``Cast`` its ``to`` type, ``CastLike`` its first input's shape in its second's type (torch.onnx casts a scalar
    like the activation before every Conv and Clip: taken as elementwise, each was counted at the activation's size,
    2.6x the peak on a MobileNetV2), ``Shape`` a few int64s and ``Reshape`` (and its kin, :data:`_FIRST`) its first
    input (an activation's ``Shape`` taken as elementwise fed the Reshape after it: 3x the activations a layer on a
    BERT-base-shaped encoder with a dynamic sequence, 121 MB for 2 layers); every other op is taken as elementwise
    (its largest activation input, in that input's type)."""
    ins = [known[i] for i in node.input if i in known]
    big = max(ins, default=(0, 4))
    op = node.op_type
    if op == "DynamicQuantizeLinear":
        return (big[0], 1) if j == 0 else (1, 4 if j == 1 else 1)
    if op == "Cast":
        to = next((a.i for a in node.attribute if a.name == "to"), 1)
        return big[0], _ITEM.get(to, 4)
    if op in ("Shape", "Size"):  # a few int64s, whatever the size of what they describe
        return 8, 8
    if op in _FIRST and node.input[0] in known:  # the same elements, whatever the shape input's size
        return known[node.input[0]]
    if op == "CastLike":  # input 0's shape in input 1's type: torch.onnx's scalar bias and clip bounds, not x's size
        first = node.input[0]
        size = known[first][0] if first in known else prod(const.get(first, ()))
        return size, known.get(node.input[1], (0, 4))[1]
    if op == "Concat":
        return sum(e for e, _ in ins), big[1]
    w = const.get(node.input[1]) if len(node.input) > 1 else None
    if op in ("MatMul", "MatMulInteger", "Gemm") and w and len(w) == 2 and node.input[0] in known:
        k, cols = (w[1], w[0]) if any(a.name == "transB" and a.i for a in node.attribute) else w
        a = known[node.input[0]]
        return max(a[0] // max(k, 1), 1) * cols, 4
    if op in ("Conv", "ConvInteger") and w and len(w) > 2 and node.input[0] in known:  # [C_out, C_in/group, k...]
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        return max(known[node.input[0]][0] // max(w[1] * group * _strides(node), 1), 1) * w[0], 4
    if op in ("MaxPool", "AveragePool", "LpPool"):
        return max(big[0] // _strides(node), 1), big[1]
    if op == "Gather" and node.input[0] in const and node.input[1] in known:
        return known[node.input[1]][0] * prod(const[node.input[0]][1:]), 4
    return big
