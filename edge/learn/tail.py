"""The trainable tail of a classifier, found from its ONNX graph, with its numpy forward and backward.

:class:`edge.learn.device_trainer.DeviceTrainer` trains the tail of any exported model:
the classifier weight and the last linear layer before it (``MatMul``, ``Gemm`` or a
1x1 ``Conv``, 1-D or 2-D), with the ops between them, everything else frozen. :func:`find_tail` walks
back from the logits output:

* after the classifier: its bias ``Add`` and shape-only ops; after a 1x1-conv classifier over a feature map
  (SqueezeNet's), also ``Relu``/``Clip`` and the mean pooling to one score per class (and a final ``Softmax`` or
  ``LogSoftmax`` over the classes: the tail ends at the scores it normalises, so it is never applied twice);
* the classifier: a ``MatMul``/``Gemm``/1x1 ``Conv`` reading one of the model's parameters
  (:class:`~edge.format.modelinfo.ModelInfo` tensors);
* between the last linear and the classifier (:data:`SUPPORTED`): ``Add`` (a bias, or a
  residual: the branch read by other nodes too is the skip, a frozen input of the tail),
  ``Relu``, ``Clip`` with constant bounds (ReLU6, hardtanh), ``Tanh`` (a pooler), ``HardSwish`` (MobileNetV3),
  SiLU written as ``x * Sigmoid(x)`` (EfficientNet), ``Mul`` by a constant (ConvNeXt's layer scale), ``Transpose``
  keeping the batch axis first (ConvNeXt's channels-last block), ``Gelu`` (also written out in
  ``Div``/``Erf``/``Add``/``Mul``, as torch exports it below
  opset 20: :mod:`edge.learn.graph_patterns`), ``LayerNormalization``, ``BatchNormalization`` (inference),
  ``ReduceMean`` and ``GlobalAveragePool`` (mean pooling), ``Reshape`` (to a constant shape, or to ``[batch, k]``
  with the batch read from ``Shape`` at run time, as torch writes ``flatten(1)`` of a dynamic batch:
  :func:`~edge.learn.graph_patterns.batch_flatten`), ``Flatten``,
  ``Squeeze``, ``Unsqueeze``, ``Identity``.

The walk stops at the first linear layer (the tail's input ``h`` is what it reads) or
at an op outside that set; then only the classifier is trainable and
:meth:`Tail.check` raises :class:`~edge.errors.ConfigError` naming the op when the
last linear is asked for. Each op has a forward and a backward (:mod:`edge.learn.tail_ops`), in float64
(or in the dtype of :meth:`Tail.astype`)
(tests/device/test_growth_device.py checks each against finite differences); the loss
is softmax cross-entropy on the logits.

Weights are handled as the 2-D *source view* of the parameter (``[out, in]`` in torch
layout, a 1x1 convolution's ``[out, in, 1, 1]`` flattened to ``[out, in]``), in which
SHiRA masks are chosen; ``M`` (``[in, out]``, ``y = x @ M + b`` on the channel axis) is
that view or its transpose.

**Layer sets.** A layer set sees only parameter names (:data:`edge.learn.space.LAYER_SETS`),
so the tail found in a graph is remembered per model (by its 2-D parameter names) when a
trainer locates it (:func:`remember`): ``tail-head`` is the classifier, ``tail`` the last
linear and the classifier (a 1x1 convolution's 4-D weight included). Until a trainer has
located a model's tail, both select nothing on it. :data:`TAIL_SPACE` crosses them with 5
densities, the graph-found counterpart of the name-based ``DEVICE_SPACE`` (``head``,
``last-mlp``: the digits ViT's names).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass, replace

import numpy as np

from edge.convert.onnx_read import attribute_value
from edge.errors import ConfigError
from edge.format.onnx_proto import to_array
from edge.learn.graph_patterns import LeadingDims, batch_flatten, depends, erf_gelu_input, silu_input
from edge.learn.space import LAYER_SETS, Arch
from edge.learn.tail_ops import Linear, Op, reshape

__all__ = ["SUPPORTED", "TAIL_SPACE", "Linear", "Tail", "find_tail", "remember"]

SUPPORTED = (
    "MatMul Gemm Conv(1x1) Add Mul(constant) Relu Clip Tanh HardSwish SiLU(Mul,Sigmoid) Gelu LayerNormalization "
    "BatchNormalization ReduceMean GlobalAveragePool Transpose(batch first) "
    "Reshape Flatten Squeeze Unsqueeze Identity".split()
)
_SHAPE = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity")
# after the classifier: its bias, reshapes, and (a 1x1-conv classifier over a map) an activation and the mean pooling
_POST = ("bias", "identity", "reshape", "flatten", "squeeze", "unsqueeze", "relu", "clip", "mean")


# -- the tail -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tail:
    """Steps from the tail's input to the logits; ``steps[ci]`` is the classifier."""

    steps: tuple
    ci: int
    input: str  # the graph tensor the first step reads
    residuals: tuple[str, ...]  # frozen skip inputs (graph tensors)
    logits: str
    why_short: str | None = None  # why the walk stopped before a last linear layer, when it did

    @property
    def linears(self) -> list[Linear]:
        return [s for s in self.steps if isinstance(s, Linear)]

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(s.param for s in self.linears)

    def check(self, params, where: str) -> None:
        """ConfigError unless every parameter is one this tail can train."""
        other = [p for p in params if p not in self.params]
        if other:
            short = f"; the walk back from the classifier stopped at {self.why_short}" if self.why_short else ""
            raise ConfigError(
                f"the device trainer adapts only {list(self.params)} of {where}, not {other}{short}; it trains the "
                f"classifier and the last linear layer before it through {', '.join(SUPPORTED)}"
            )

    def astype(self, dtype) -> Tail:
        """This tail with its constants (weights, biases, norm parameters) in ``dtype``."""
        return replace(self, steps=tuple(s.astype(dtype) for s in self.steps))

    def forward(self, x, side, weights, start: int = 0, stop: int | None = None):
        """``(output of steps[stop - 1], saved per step)`` from ``x``, the input of ``steps[start]``."""
        saved = []
        for step in self.steps[start:stop]:
            try:
                x, s = step.forward(x, side, weights)
            except ValueError as e:  # numpy's reshape or broadcast of a shape the walk misread: never a bare error
                where = f"{step.kind} node {step.node!r}" if isinstance(step, Op) else f"the layer of {step.param!r}"
                raise ConfigError(
                    f"the device trainer's tail cannot run {where} on a tensor of shape {list(x.shape)} ({e}); train "
                    "only what the runtime serves: ncm, slda or ranpac over taps (edge update --taps auto)"
                ) from e
            saved.append(s)
        return x, saved

    def grads(self, dlogits, saved, want, start: int = 0) -> dict[str, np.ndarray]:
        """``dL/dW`` (2-D source view) of each wanted parameter, back-propagating only as far as needed."""
        out, steps = {}, self.steps[start:]
        first = min((i for i, s in enumerate(steps) if isinstance(s, Linear) and s.param in want), default=None)
        if first is None:
            return out
        dy = dlogits
        for i in range(len(steps) - 1, first - 1, -1):
            step = steps[i]
            if isinstance(step, Linear) and step.param in want:
                out[step.param] = step.grad(dy, saved[i])
            if i > first:
                dy = step.backward(dy, saved[i])
        return out


def find_tail(proto, info) -> Tail:
    """The tail of the model (see the module doc); ConfigError when no linear classifier makes its logits."""
    g = proto.graph
    where = f"model {info.name!r}"
    consts = {i.name: to_array(i).astype(np.float64) for i in g.initializer}
    for n in g.node:  # constants, and the small shape arithmetic exporters leave on them
        if n.op_type == "Constant" and n.attribute:
            v = attribute_value(n.attribute[0])
            v = to_array(v) if n.attribute[0].name == "value" else np.asarray(v)
            if v.dtype.kind in "biuf":  # not strings or sparse tensors
                consts[n.output[0]] = v.astype(np.float64)
        elif n.op_type in ("Reshape", "Identity", "Cast", "Squeeze", "Unsqueeze") and all(i in consts for i in n.input):
            a = {k.name: attribute_value(k) for k in n.attribute}
            kind = "identity" if n.op_type == "Cast" else n.op_type.lower()
            c = {"axes": a.get("axes"), "allowzero": a.get("allowzero", 0)}
            if len(n.input) > 1:
                c["shape" if n.op_type == "Reshape" else "axes"] = [int(v) for v in consts[n.input[1]]]
            with contextlib.suppress(ValueError):  # a shape that does not apply: not a constant the tail needs
                consts[n.output[0]] = reshape(kind, c, consts[n.input[0]])
        elif (v := _fold_zero_bias(n, consts)) is not None:
            consts[n.output[0]] = v
    params = {t.initializer: p for p, t in info.tensors.items()}
    batch_dim = LeadingDims(proto)
    inits = {i.name for i in g.initializer}
    dims = {batch_dim(i.name) for i in g.input if i.name not in inits}
    fixed = next(iter(dims)) if len(dims) == 1 and isinstance(next(iter(dims)), int) else None  # the file's batch
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    outputs = [o.name for o in g.output]
    named = [o for o in (info.outputs or outputs) if not o.startswith("edge.")]  # not the taps' and head's outputs
    if "logits" not in outputs and len(named) > 1:  # the first is a guess: a Linear embedding would pass as one
        raise ConfigError(
            f"{where} has outputs {named}, none named 'logits': which one its classifier computes is not known; "
            "name it at export (torch.onnx.export(..., output_names=[..., 'logits']))"
        )
    logits = "logits" if "logits" in outputs else (named or info.outputs or outputs)[0]
    if (n := producer.get(logits)) is not None and n.op_type in ("Softmax", "LogSoftmax"):
        # probabilities out: the tail ends at the scores they normalise (softmax cross-entropy on those)
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 13)
        axis = next((attribute_value(a) for a in n.attribute if a.name == "axis"), -1 if opset >= 13 else 1)
        out = next(o.type.tensor_type for o in g.output if o.name == logits)
        rank = len(out.shape.dim) if out.HasField("shape") else 0
        if axis != -1 and not (rank and axis % rank == rank - 1):
            raise ConfigError(
                f"{where}: the output {logits!r} is a {n.op_type} over axis {axis} of a rank-{rank or '?'} tensor, "
                "not over the classes (the last axis); export the model without it"
            )
        logits = n.input[0]

    def attrs(n) -> dict:
        return {a.name: attribute_value(a) for a in n.attribute}

    def name(n) -> str:
        return f"{n.op_type} node {n.name or n.output[0]!r}"

    def linear(n) -> Linear | str | None:
        """The node as a Linear; a reason string when it is a linear op the tail cannot train; None otherwise."""
        if n.op_type not in ("MatMul", "Gemm", "Conv"):
            return None
        if len(n.input) < 2 or n.input[1] not in consts:
            return f"{name(n)} (its weight {n.input[1]!r} is an activation, not a parameter)"
        if n.input[1] not in params:
            return f"{name(n)} (its weight {n.input[1]!r} is not a parameter of the model: ModelInfo.tensors)"
        p, a, s = params[n.input[1]], attrs(n), consts[n.input[1]]
        bias = consts.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if len(n.input) > 2 and n.input[2] and bias is None:
            return f"{name(n)} (its bias is not a constant)"
        t = info.tensors[p].transposed
        if n.op_type == "MatMul":
            m, flip, axis = s, t, -1
        elif n.op_type == "Gemm":
            if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
                return f"{name(n)} (transA, alpha or beta: not a plain linear layer)"
            m, flip, axis = (s.T if a.get("transB", 0) else s), bool(a.get("transB", 0)) != t, -1
        else:
            one = all(v == 1 for k in ("strides", "dilations") for v in a.get(k, [1])) and not any(a.get("pads", []))
            if s.ndim < 3 or any(k != 1 for k in s.shape[2:]) or a.get("group", 1) != 1 or not one:
                return f"{name(n)} (kernel {list(s.shape[2:])}, group {a.get('group', 1)}: not a 1x1 convolution)"
            m, flip, axis = s.reshape(s.shape[0], -1).T, True, 1
        shape, ti = tuple(info.tensors[p].shape), info.tensors[p]
        if m.size != math.prod(shape) or m.ndim != 2:
            return f"{name(n)} (weight {m.shape} does not match parameter {p!r} {shape})"
        if ti.perm is not None and list(ti.perm) != sorted(ti.perm):
            return f"{name(n)} (its parameter {p!r} is stored permuted, {list(ti.perm)})"
        if ti.channel_scale is None:
            return Linear(p, m, bias, axis, flip, shape)
        scale = np.asarray(ti.channel_scale, np.float64)  # stored = source * scale[out]: train the source weight
        return Linear(p, m / scale, bias, axis, flip, shape, scale)

    def step(n) -> tuple[Op | str, str]:
        """The node as a tail op, or a reason string; and the input the walk goes on from."""
        op, a, first = n.op_type, attrs(n), n.input[0]
        if op == "Add":
            x, y = n.input
            if x in consts or y in consts:
                return Op("bias", n.name, {"b": consts[x if x in consts else y]}), y if x in consts else x
            single = [i for i in (x, y) if consumers.get(i, 0) == 1 and i not in outputs]
            if len(single) != 1:
                return f"{name(n)} (a sum of two activations, neither or both read only here: which is the skip?)", x
            return Op("residual", n.name, {"tensor": y if single[0] == x else x}), single[0]
        if op == "Relu":
            return Op("relu", n.name), first
        if op == "Tanh":  # a pooler (BERT's: Dense then tanh) between the last linear and the classifier
            return Op("tanh", n.name), first
        if op == "Clip":  # ReLU6 (MobileNet), hardtanh: bounds from attributes below opset 11, else constant inputs
            bounds = [a.get("min", -math.inf), a.get("max", math.inf)]
            for k, i in enumerate(n.input[1:3]):
                if i and i not in consts:
                    return f"{name(n)} (its bounds are not constants)", first
                if i:
                    bounds[k] = float(np.asarray(consts[i]).reshape(-1)[0]) if consts[i].size == 1 else math.nan
            if any(math.isnan(b) for b in bounds):
                return f"{name(n)} (its bounds are not scalars)", first
            return Op("clip", n.name, {"lo": bounds[0], "hi": bounds[1]}), first
        if op == "Gelu":
            how = a.get("approximate", "none")  # onnx gives string attributes as bytes
            return Op("gelu", n.name, {"tanh": (how.decode() if isinstance(how, bytes) else how) == "tanh"}), first
        if op == "Mul" and (x := erf_gelu_input(n, producer, consts)) is not None:  # GELU below opset 20
            return Op("gelu", n.name, {"tanh": False}), x
        if op == "HardSwish":
            return Op("hardswish", n.name), first
        if op == "Mul" and len(n.input) == 2 and (n.input[0] in consts) != (n.input[1] in consts):
            c, x = (n.input[0], n.input[1]) if n.input[0] in consts else (n.input[1], n.input[0])
            return Op("scale", n.name, {"s": consts[c]}), x  # a constant scale: ConvNeXt's layer scale (gamma)
        if op == "Transpose":  # ConvNeXt's channels-last block back to NCHW; the rows stay rows
            perm = [int(v) for v in a.get("perm", [])]
            if not perm or perm[0] != 0:
                return f"{name(n)} (perm {perm or 'reversed'}: it moves the batch axis)", first
            return Op("transpose", n.name, {"perm": perm}), first
        if op == "Mul" and (x := silu_input(n, producer, consumers)) is not None:  # nn.SiLU, both exporters
            return Op("silu", n.name), x
        if op == "LayerNormalization":
            if n.input[1] not in consts or (len(n.input) > 2 and n.input[2] and n.input[2] not in consts):
                return f"{name(n)} (scale or bias not constant)", first
            gamma = consts[n.input[1]]
            beta = consts[n.input[2]] if len(n.input) > 2 and n.input[2] else np.zeros_like(gamma)
            c = {"gamma": gamma, "beta": beta, "eps": a.get("epsilon", 1e-5), "axis": a.get("axis", -1)}
            return Op("layernorm", n.name, c), first
        if op == "BatchNormalization":
            if not all(i in consts for i in n.input[1:5]) or any(n.output[1:]):
                return f"{name(n)} (not an inference-mode BatchNormalization with constant statistics)", first
            scale, b, mean, var = (consts[i] for i in n.input[1:5])
            s = scale / np.sqrt(var + a.get("epsilon", 1e-5))
            return Op("affine", n.name, {"s": s, "t": b - mean * s}), first
        if op in ("ReduceMean", "GlobalAveragePool"):
            axes = a.get("axes")
            if op == "ReduceMean" and len(n.input) > 1 and n.input[1]:
                if n.input[1] not in consts:
                    return f"{name(n)} (axes not constant)", first
                axes = [int(v) for v in consts[n.input[1]]]
            if op == "ReduceMean" and not axes:
                return f"{name(n)} (no axes: it would average over the batch too)", first
            keep = bool(a.get("keepdims", 1)) if op == "ReduceMean" else True
            return Op("mean", n.name, {"axes": axes, "keepdims": keep}), first
        if op in _SHAPE:
            c = {"axis": a.get("axis", 1), "axes": a.get("axes"), "allowzero": a.get("allowzero", 0)}
            if batch_flatten(n, producer, consts, batch_dim):  # to [B, k], B read from Shape at run time
                return Op("flatten", n.name, {"axis": 1}), first
            if op in ("Reshape", "Squeeze", "Unsqueeze") and len(n.input) > 1 and n.input[1]:
                if n.input[1] not in consts:
                    return f"{name(n)} (shape or axes not constant, nor a flatten to [batch, k])", first
                c["shape" if op == "Reshape" else "axes"] = [int(v) for v in consts[n.input[1]]]
                if op == "Reshape" and fixed and c["shape"][:1] == [fixed] and -1 not in c["shape"][1:]:
                    c["shape"][0] = -1  # a file that fixes its batch: its rows (the trainer runs them all at once)
            if op == "Unsqueeze" and c["axes"] is None:
                return f"{name(n)} (no axes)", first
            return Op(op.lower(), n.name, c), first
        return name(n), first

    # after the classifier: its bias and shape-only ops
    post, t = [], logits
    while True:
        n = producer.get(t)
        if n is None:
            raise ConfigError(f"{where}: no linear classifier computes the output {logits!r}")
        lin = linear(n)
        if isinstance(lin, Linear):
            classifier, cls_in = lin, n.input[0]
            break
        s, t = step(n) if lin is None else (lin, None)
        if isinstance(s, str) or s.kind not in _POST:
            raise ConfigError(
                f"{where}: the output {logits!r} is computed by {s if isinstance(s, str) else name(n)}, not by a "
                "linear classifier (MatMul, Gemm or 1x1 Conv on a model parameter) followed by a bias, reshapes, "
                "Relu/Clip or mean pooling (a 1x1-conv classifier pooled over the map, as SqueezeNet's)" + _int8(info)
            )
        post.insert(0, s)
    # between the last linear layer and the classifier
    mid, t, why, last = [], cls_in, None, None
    while True:
        n = producer.get(t)
        if n is None:
            why = f"the model input {t!r}"
            break
        lin = linear(n)
        if lin is not None:
            last, why = (lin, None) if isinstance(lin, Linear) else (None, lin)
            break
        s, t = step(n)
        if isinstance(s, str):
            why = s
            break
        mid.insert(0, s)
    residuals = tuple(s.c["tensor"] for s in mid if s.kind == "residual")
    if last is not None and any(depends(r, n.output[0], producer) for r in residuals):
        last, why = None, f"{name(n)}, whose output the skip input of a residual sum also reads"
    if last is None:
        return Tail((classifier, *post), 0, cls_in, (), logits, why)
    return Tail((last, *mid, classifier, *post), 1 + len(mid), n.input[0], residuals, logits)


def _int8(info) -> str:
    """What to do instead when the model is an int8 twin (its classifier is a MatMulInteger or a QDQ chain)."""
    if not any(t.quant is not None for t in info.tensors.values()):
        return ""
    return (
        f"; model {info.name!r} has int8 weights (an edge quantize twin): the device trainer trains float weights, so "
        "grow on the float model it was quantized from, or learn on this one with edge update --method ncm, slda or "
        "ranpac"
    )


_FOLD_MAX = 1 << 20  # elements: an Expand of constants larger than this is not a bias the tail needs


def _fold_zero_bias(n, consts: dict) -> np.ndarray | None:
    """The constant a ``Shape``/``CastLike``/``Expand`` node computes from constants, else None.

    torch's dynamo exporter (unoptimized, as :func:`exporters.onnx.export_onnx` runs it) writes the zero bias of a
    ``bias=False`` conv as ``Expand(CastLike(0, x), Expand(Shape(weight, 0, 1), [1]))``; folded here, so the conv
    before a BatchNorm is a layer of the tail (it was "its bias is not a constant"). ``CastLike`` to the type of an
    activation is folded only for zeros and ones (the same values in every type, bool too).
    """
    op, ins = n.op_type, list(n.input)
    a = {k.name: attribute_value(k) for k in n.attribute}
    if op == "Shape" and ins and ins[0] in consts:
        return np.asarray(consts[ins[0]].shape[a.get("start", 0) : a.get("end")], np.float64)
    if op == "CastLike" and len(ins) == 2 and ins[0] in consts:
        v = consts[ins[0]]
        return v if v.size <= _FOLD_MAX and np.all((v == 0) | (v == 1)) else None
    if op == "Expand" and len(ins) == 2 and ins[0] in consts and ins[1] in consts:
        shape = consts[ins[1]].reshape(-1)
        if shape.size > 8 or np.any(shape < 0) or np.any(shape != np.round(shape)):
            return None
        try:
            out = np.broadcast_shapes(consts[ins[0]].shape, tuple(int(s) for s in shape))
        except ValueError:
            return None
        return np.broadcast_to(consts[ins[0]], out).copy() if math.prod(out) <= _FOLD_MAX else None
    return None


# -- layer sets ---------------------------------------------------------------------------------------
_FOUND: dict[frozenset, tuple[str, ...]] = {}  # a model's 2-D parameter names -> its tail's parameters


def _key(names) -> frozenset:
    """The model's 2-D parameter names, without the detector head's (a tapped copy is the same model)."""
    return frozenset(n for n in names if not n.startswith("edge."))


def remember(info, tail: Tail) -> None:
    """Make ``tail-head`` and ``tail`` select this tail's parameters on this model."""
    _FOUND[_key(k for k, t in info.tensors.items() if len(t.shape) == 2)] = tail.params


LAYER_SETS.add("tail-head", lambda names: list(_FOUND.get(_key(names), ())[-1:]))
LAYER_SETS.add("tail", lambda names: list(p) if len(p := _FOUND.get(_key(names), ())) == 2 else [])

#: the device trainer's search space on any model: 5 densities x the graph-found layer sets
TAIL_SPACE: tuple[Arch, ...] = tuple(
    Arch("shira", d, layers) for d, layers in itertools.product((0.02, 0.05, 0.1, 0.2, 0.5), ("tail-head", "tail"))
)
