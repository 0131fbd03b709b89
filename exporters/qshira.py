"""Integer SHiRA: sparse adapters trained with a quantized base's grid in the loop (issue 18).

A model quantized by :func:`exporters.quantize.quantize_onnx` holds each target as integers
``q`` with a scale ``s`` (per tensor or per channel) and zero point ``z``. The device writes an
integer adapter's entries as integers on that grid, so training here sees exactly that:

* every quantized target of the torch model is replaced by its dequantized base
  ``(q - z) * s`` read from the quantized file (the weights the device holds);
* each masked entry carries a float delta ``d``; the forward uses
  ``(q - z + clamp(round_ste(d / s), lo - q, hi - q)) * s``: the nearest grid point the
  integer type can hold, with a straight-through round (gradient 1), so the adapted entry is
  the integer the device will write;
* targets the quantizer left in float keep the plain SHiRA delta;
* on a static (QDQ) model, optionally (``activations=``, from :func:`activation_grid`), the input
  and output of each target's MatMul/Gemm/Conv are snapped to the graph's activation grids
  (round and saturate, straight-through): the adapter learns against the activation rounding
  and clipping of the graph the device runs, calibrated on the base (measured on the demo
  domains: +0.6 points of mean adapted accuracy on both encoders' static bases).

:func:`train_shira_int` returns ``{param: (indices, float delta actually applied, integers)}``
and :func:`int_shira_adapter` wraps that as an :class:`edge.Adapter` whose ``qvalues`` the
runtime writes bit-exactly (``values`` keep the applied delta in real units, for reference).
Masks come from :func:`exporters.shira.make_masks` as for float SHiRA.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from edge.errors import AdapterMismatchError, ConfigError
from edge.format.modelinfo import ModelInfo, onnx_info
from edge.format.qrange import weight_bounds
from exporters.data import Loss, batches, call, check_reiterable, loss_value

__all__ = [
    "ActGrid",
    "OpGrid",
    "QuantBase",
    "TRAINER_VERSION",
    "activation_grid",
    "int_shira_adapter",
    "quantized_base",
    "train_shira_int",
]

#: what :func:`train_shira_int` writes; a cache of its adapters keys on it. 2: symmetric int8 weights (zero point
#: 0) get integers in [-127, 127] (1 wrote -128, which runtimes now refuse: edge.format.qrange)
TRAINER_VERSION = 2


@dataclass(frozen=True)
class QuantBase:
    """One quantized target as the device holds it, in the source (torch) layout."""

    q: np.ndarray  # the integers
    scale: np.ndarray  # broadcastable to q (one value, or one per channel along the quantized axis)
    zero_point: np.ndarray  # same shape as scale
    bounds: tuple[int, int]  # the weights' range: edge.format.qrange.weight_bounds (symmetric int8: [-127, 127])
    dtype: str

    def dequantized(self) -> np.ndarray:
        return ((self.q.astype(np.float32) - self.zero_point.astype(np.float32)) * self.scale).astype(np.float32)


def quantized_base(path: str | os.PathLike) -> tuple[ModelInfo, dict[str, QuantBase]]:
    """The metadata of a quantized model and, for each of its integer targets, what the device holds."""
    proto = onnx.load(os.fspath(path))
    info = onnx_info(proto)
    inits = {t.name: t for t in proto.graph.initializer}
    out = {}
    for pname, t in info.tensors.items():
        if t.quant is None:
            continue
        shape = t.quant_shape
        s = numpy_helper.to_array(inits[t.quant.scale]).astype(np.float32).reshape(shape)
        z = numpy_helper.to_array(inits[t.quant.zero_point]).reshape(shape)
        q = t.from_stored(numpy_helper.to_array(inits[t.initializer]))
        out[pname] = QuantBase(q, s, z, t.quant.weight_bounds(z), t.quant.dtype)  # symmetric int8: [-127, 127]
    if not out:
        raise ConfigError(f"{path} has no quantized targets: quantize it first (exporters.quantize.quantize_onnx)")
    return info, out


@dataclass(frozen=True)
class ActGrid:
    """A static graph's quantization of one activation: real = (q - zero_point) * scale, q in ``bounds``."""

    scale: float
    zero_point: int
    bounds: tuple[int, int]

    def fake(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` snapped to this grid (round, saturate), with a straight-through gradient."""
        lo, hi = self.bounds
        q = torch.clamp(torch.round(x / self.scale) + self.zero_point, lo, hi)
        return x + ((q - self.zero_point) * self.scale - x).detach()


@dataclass(frozen=True)
class OpGrid:
    """The activations a static graph quantizes around the op reading one weight target (None: left float)."""

    op: str  # MatMul (its output is quantized before the bias Add), Gemm or Conv (bias included)
    input: ActGrid | None
    output: ActGrid | None


_INT_BOUNDS = {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255)}


def activation_grid(path: str | os.PathLike) -> dict[str, OpGrid]:
    """For each integer target of a static (QDQ) model: the grids of the input and output of the op that reads it.

    Read from the graph (the ``DequantizeLinear`` feeding the op's input 0, the ``QuantizeLinear`` after it), so
    :func:`train_shira_int` can snap the torch model's activations where the device's graph does. Targets read by
    anything but one MatMul/Gemm/Conv (after their ``DequantizeLinear``) have no entry; a dynamic model has none.
    """
    proto = onnx.load(os.fspath(path))
    info = onnx_info(proto)
    inits = {t.name: t for t in proto.graph.initializer}
    made = {o: n for n in proto.graph.node for o in n.output}
    users: dict[str, list] = {}
    for n in proto.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)

    def grid(scale: str, zp: str) -> ActGrid | None:
        if scale not in inits or zp not in inits:
            return None
        s, z = numpy_helper.to_array(inits[scale]), numpy_helper.to_array(inits[zp])
        if s.size != 1 or z.dtype not in _INT_BOUNDS:
            return None  # per-channel activations or 16-bit: not simulated
        return ActGrid(float(s.reshape(-1)[0]), int(z.reshape(-1)[0]), _INT_BOUNDS[z.dtype])

    out = {}
    for pname, t in info.tensors.items():
        dq = [n for n in users.get(t.initializer, []) if n.op_type == "DequantizeLinear"] if t.quant else []
        ops = [n for d in dq for n in users.get(d.output[0], [])]
        if len(ops) != 1 or ops[0].op_type not in ("MatMul", "Gemm", "Conv") or ops[0].input[1] != dq[0].output[0]:
            continue
        op = ops[0]
        src = made.get(op.input[0])
        a = (
            grid(*src.input[1:3])
            if src is not None and src.op_type == "DequantizeLinear" and len(src.input) > 2
            else None
        )
        after = users.get(op.output[0], [])
        q = after[0] if len(after) == 1 and after[0].op_type == "QuantizeLinear" and len(after[0].input) > 2 else None
        out[pname] = OpGrid(op.op_type, a, grid(*q.input[1:3]) if q is not None else None)
    return out


def _hooks(model: nn.Module, grids: Mapping[str, OpGrid]) -> list:
    """Forward hooks snapping each target module's input and output to the static graph's grids."""
    modules = dict(model.named_modules())
    handles = []
    for pname, g in grids.items():
        owner, _, leaf = pname.rpartition(".")
        m = modules.get(owner)
        kinds = (nn.Linear,) if g.op in ("MatMul", "Gemm") else (nn.Conv1d, nn.Conv2d)
        if leaf != "weight" or not isinstance(m, kinds):
            raise ConfigError(
                f"{pname}: the quantized graph reads it with {g.op}, but it is not the weight of a torch "
                f"{'/'.join(k.__name__ for k in kinds)} module here; train without activations=, or export that op "
                "as such a module"
            )
        if g.input is not None:
            handles.append(m.register_forward_pre_hook(lambda _m, args, a=g.input: (a.fake(args[0]), *args[1:])))
        if g.output is not None:
            pre_bias = g.op == "MatMul"  # the exported MatMul is followed by the bias Add; Gemm/Conv hold the bias

            def after(mod, _args, y, a=g.output, pre_bias=pre_bias):
                b = mod.bias if pre_bias and mod.bias is not None else None
                return a.fake(y - b) + b if b is not None else a.fake(y)

            handles.append(m.register_forward_hook(after))
    return handles


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def train_shira_int(
    model: nn.Module,
    masks: Mapping[str, np.ndarray],
    base: Mapping[str, QuantBase],
    x,
    y: np.ndarray | None = None,
    *,
    loss: Loss | None = None,
    epochs: int = 30,
    lr: float = 1e-2,
    batch_size: int = 64,
    seed: int = 0,
    activations: Mapping[str, OpGrid] | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """Train the masked entries of ``model`` on the quantized base ``base`` (:func:`quantized_base`).

    ``model`` is the float torch model the quantized file came from (same parameter names);
    it is left unchanged. Data as :func:`exporters.shira.train_shira`. ``activations``
    (:func:`activation_grid` of a static model) snaps the inputs and outputs of those targets' ops
    to the graph's activation grids during training (straight-through), so the adapter learns
    against the rounding and saturation the device's static graph applies. Returns ``{param:
    (int32 indices [ndim, N], float32 applied deltas [N], integers [N] or None for a float target)}``.
    """
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ConfigError(f"need epochs >= 1, batch_size >= 1, lr > 0; got {epochs}, {batch_size}, {lr}")
    check_reiterable(x, y, epochs)
    params = dict(model.named_parameters())
    unknown = [k for k in list(masks) + list(base) if k not in params]
    if unknown:
        raise AdapterMismatchError(f"{unknown[:5]} are not parameters of the model")
    frozen = {k: v.detach() for k, v in params.items()}
    frozen.update({k: v.detach() for k, v in model.named_buffers()})
    grid = {}
    for k, b in base.items():
        if tuple(b.q.shape) != tuple(params[k].shape):
            raise AdapterMismatchError(f"{k}: quantized shape {b.q.shape} is not the model's {tuple(params[k].shape)}")
        frozen[k] = torch.as_tensor(b.dequantized())
    index = {k: tuple(torch.as_tensor(np.asarray(m, np.int64))) for k, m in masks.items()}
    for k, idx in index.items():
        if k in base:
            b = base[k]
            s = torch.as_tensor(np.broadcast_to(b.scale, b.q.shape)[tuple(i.numpy() for i in idx)].copy())
            q = torch.as_tensor(b.q[tuple(i.numpy() for i in idx)].astype(np.float32))
            lo, hi = weight_bounds(b.dtype, b.zero_point)  # a QuantBase made by hand: never past its grid either
            grid[k] = (s, q, float(max(lo, b.bounds[0])), float(min(hi, b.bounds[1])))
    deltas = {k: torch.zeros(idx[0].numel(), requires_grad=True) for k, idx in index.items()}
    opt = torch.optim.AdamW(deltas.values(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)

    def steps(k: str) -> torch.Tensor:  # whole grid steps (straight-through), kept inside the integer range
        s, q, lo, hi = grid[k]
        return torch.minimum(torch.maximum(_round_ste(deltas[k] / s), lo - q), hi - q)

    def applied(k: str) -> torch.Tensor:
        return steps(k) * grid[k][0] if k in grid else deltas[k]

    was = model.training
    model.eval()
    handles = _hooks(model, activations or {})
    try:
        for _ in range(epochs):
            for inputs, target, _n in batches(x, y, batch_size, loss is None, gen):
                weights = dict(frozen)
                for k, idx in index.items():
                    weights[k] = frozen[k].index_put(idx, applied(k), accumulate=True)
                value = loss_value(loss, call(model, weights, inputs), target)
                opt.zero_grad(set_to_none=True)
                value.backward()
                opt.step()
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    out = {}
    with torch.no_grad():
        for k, idx in index.items():
            ind = torch.stack(idx).numpy().astype(np.int32)
            delta = applied(k).numpy().astype(np.float32)
            if k in grid:
                qv = grid[k][1].numpy().astype(np.int64) + steps(k).numpy().astype(np.int64)
                out[k] = (ind, delta, qv.astype(base[k].dtype))
            else:
                out[k] = (ind, delta, None)
    return out


def int_shira_adapter(
    trained: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]],
    info: ModelInfo,
    name: str,
    meta: Mapping[str, object] | None = None,
):
    """Wrap :func:`train_shira_int` output as an :class:`edge.Adapter` for the quantized model ``info``."""
    from edge.format.adapter import Adapter, SparseDelta

    bad = [k for k in trained if k not in info.tensors or (trained[k][2] is None) != (info.tensors[k].quant is None)]
    if bad:
        raise AdapterMismatchError(f"{bad[:5]} are not targets of {info.name!r} stored as the training assumed")
    tensors = {
        k: SparseDelta(np.asarray(i, np.int32), np.asarray(v, np.float32), q) for k, (i, v, q) in trained.items()
    }
    shapes = {k: tuple(info.tensors[k].shape) for k in trained}
    return Adapter(name, info.fingerprint, tensors, shapes, method="shira", info=dict(meta or {}))
