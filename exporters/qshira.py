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
* targets the quantizer left in float keep the plain SHiRA delta.

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
from exporters.data import Loss, batches, call, check_reiterable, loss_value

__all__ = ["QuantBase", "int_shira_adapter", "quantized_base", "train_shira_int"]


@dataclass(frozen=True)
class QuantBase:
    """One quantized target as the device holds it, in the source (torch) layout."""

    q: np.ndarray  # the integers
    scale: np.ndarray  # broadcastable to q (one value, or one per channel along the quantized axis)
    zero_point: np.ndarray  # same shape as scale
    bounds: tuple[int, int]
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
        shape = [1] * len(t.shape)
        if t.quant.axis is not None:
            shape[t.quant.axis] = -1
        s = numpy_helper.to_array(inits[t.quant.scale]).astype(np.float32).reshape(shape)
        z = numpy_helper.to_array(inits[t.quant.zero_point]).reshape(shape)
        q = t.from_stored(numpy_helper.to_array(inits[t.initializer]))
        out[pname] = QuantBase(q, s, z, t.quant.bounds, t.quant.dtype)
    if not out:
        raise ConfigError(f"{path} has no quantized targets: quantize it first (exporters.quantize.quantize_onnx)")
    return info, out


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
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """Train the masked entries of ``model`` on the quantized base ``base`` (:func:`quantized_base`).

    ``model`` is the float torch model the quantized file came from (same parameter names);
    it is left unchanged. Data as :func:`exporters.shira.train_shira`. Returns ``{param:
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
            grid[k] = (s, q, float(b.bounds[0]), float(b.bounds[1]))
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
