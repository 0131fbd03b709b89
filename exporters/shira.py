"""SHiRA: sparse high-rank adapters, trained on the host (arXiv 2406.13175).

An adapter touches a fixed ~1-2 % of the entries of some weights. This module picks
those entries (a *mask*, from the registry :data:`MASKS`), trains one delta per entry
with the base model frozen, and returns ``{param: (indices [ndim, N] int32, deltas [N]
float32)}`` in PEFT's convention: the adapted weight is ``W + scatter(indices, deltas)``.

Adaptable: every module whose own ``weight`` has two or more axes, ``nn.Linear``
``[out, in]``, ``nn.Conv1d/2d/3d`` ``[out, in / groups, *kernel]`` (depthwise and grouped
too), ``nn.Embedding`` ``[num, dim]``, custom modules alike; never norms or biases (1-D).
Indices are in the torch layout, one row per axis (``np.unravel_index`` of the flat
index), row-major sorted: for a matrix, PEFT's ``[2, N]`` (row, col).

Data: numpy arrays ``x, y`` (batched here; float arrays become float32, integer arrays
int64, so token ids stay ids; with the default loss ``y`` holds class indices), or an
iterable of ``(inputs, targets)`` batches with ``y=None`` (a ``DataLoader``, a list;
``inputs`` a tensor or array, a tuple of them passed positionally, or a dict passed as
keywords). ``loss(output, target) -> scalar tensor`` defaults to cross-entropy; it gets
the model's output reduced to one tensor: itself, the first element of a tuple or list,
or the ``"logits"`` entry of a dict or HF ``ModelOutput`` (else its first value).
"""

from __future__ import annotations

import contextlib
import copy
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from edge.errors import AdapterMismatchError, ConfigError
from exporters.data import Loss, batches, call, check_reiterable, is_pair, loss_value
from exporters.masks import register_structured, transposed_targets
from exporters.targets import match_modules, select_targets, short_list

if TYPE_CHECKING:
    from edge.format.adapter import Adapter
    from edge.format.modelinfo import ModelInfo

__all__ = [
    "DEFAULT_TARGETS",
    "MASKS",
    "MaskKind",
    "make_masks",
    "match_modules",
    "merge_shira",
    "register_mask",
    "saliency",
    "select_targets",
    "shira_adapter",
    "train_shira",
    "train_snip",
]

# Module-name suffixes adapted on the demo's digits encoder; other models: select_targets(model) takes every one.
DEFAULT_TARGETS: tuple[str, ...] = ("q", "k", "v", "proj", "fc1", "fc2")


@dataclass(frozen=True)
class MaskKind:
    """A registered mask: ``score(weight, grad_abs, rng) -> scores`` shaped like ``weight``."""

    name: str
    score: Callable[[torch.Tensor, torch.Tensor | None, np.random.Generator], torch.Tensor]
    needs_calib: bool


MASKS: dict[str, MaskKind] = {}


def register_mask(name: str, *, needs_calib: bool = False):
    """Decorator registering a mask scoring function under ``name``; names are unique.

    The function gets a weight of any shape (2-D, conv, embedding) and returns one score
    per entry. ``needs_calib=True`` means it reads ``grad_abs`` (summed ``|dL/dW|`` over
    a calibration set), so :func:`make_masks` requires ``calib``.
    """

    def wrap(fn):
        if name in MASKS:
            raise ConfigError(
                f"mask {name!r} is already registered ({MASKS[name].score.__qualname__}); pick another name"
            )
        MASKS[name] = MaskKind(name, fn, needs_calib)
        return fn

    return wrap


@register_mask("random")
def _random(weight, grad_abs, rng):
    return torch.from_numpy(rng.random(tuple(weight.shape)))


@register_mask("wm")
def _weight_magnitude(weight, grad_abs, rng):
    return weight.abs()


@register_mask("grad", needs_calib=True)
def _grad(weight, grad_abs, rng):
    return grad_abs


@register_mask("snip", needs_calib=True)
def _snip(weight, grad_abs, rng):
    return (weight * grad_abs).abs()


register_structured(register_mask, MASKS)  # block4-*, block16-* and rows-* over the kinds above (exporters.masks)


# -- targets ----------------------------------------------------------------------------------------------------------


# -- masks and training -----------------------------------------------------------------------------------------------


def make_masks(
    model: nn.Module,
    targets: Sequence[str],
    *,
    density: float = 0.01,
    kind: str = "wm",
    calib=None,
    seed: int = 0,
    batch_size: int = 256,
    loss: Loss | None = None,
    layout: Mapping[str, str] | None = None,
) -> dict[str, np.ndarray]:
    """Pick ``max(1, round(density * numel))`` entries of each target weight (default ``kind``: the best measured on
    the demo domains by ``edge bench masks``).

    Returns ``{param: int64 [ndim, N]}`` (one row per axis; row, col for a matrix),
    sorted row-major. ``calib`` (needed by ``grad`` and ``snip``) is a labelled
    ``(x, y)`` numpy pair or an iterable of ``(inputs, targets)`` batches, scored with
    ``loss``. Ties are broken towards the lower flat index, so masks are deterministic.
    ``layout`` (``{param: "transposed" | "as-is"}``, :func:`exporters.masks.stored_layout`)
    makes masks score each weight as the device stores it (structured kinds need it).
    """
    if kind not in MASKS:
        raise ConfigError(f"unknown mask kind {kind!r}; registered kinds: {sorted(MASKS)}")
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"density must be in (0, 1], got {density}")
    mask = MASKS[kind]
    if mask.needs_calib and calib is None:
        raise ConfigError(f"mask kind {kind!r} scores entries by gradients: pass calib=(x, y) or calib=batches")
    params = _target_params(model, targets)
    flipped = transposed_targets(layout, params)
    grads = dict.fromkeys(params)
    if mask.needs_calib:
        x, y = (calib[0], calib[1]) if is_pair(calib) else (calib, None)
        for g, _ in _batch_grads(model, list(params), x, y, batch_size, loss):  # sum of |dL/dW| over batches
            grads = {k: g[k].abs() if grads[k] is None else grads[k] + g[k].abs() for k in params}
    out = {}
    for name, weight in params.items():
        w = weight.detach()
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        g, t = grads[name], name in flipped  # transposed: score the stored [in, out], read back as [out, in]
        scores = mask.score(w.T if t else w, g.T if t and g is not None else g, rng)
        scores = (scores.T if t else scores).detach().double().reshape(-1).numpy()
        if scores.shape != (w.numel(),):
            raise ConfigError(f"mask {kind!r} returned {scores.size} scores for {name} with {w.numel()} entries")
        n = max(1, int(round(density * w.numel())))
        flat = np.sort(np.argsort(-scores, kind="stable")[:n])
        out[name] = np.stack(np.unravel_index(flat, tuple(w.shape))).astype(np.int64)
    return out


def train_shira(
    model: nn.Module,
    masks: dict[str, np.ndarray],
    x,
    y: np.ndarray | None = None,
    *,
    loss: Loss | None = None,
    epochs: int = 30,
    lr: float = 2e-2,
    batch_size: int = 64,
    weight_decay: float = 0.0,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Train the masked entries of a frozen ``model`` on ``(x, y)`` arrays or on the batches ``x`` (``y=None``).

    Only one 1-D delta per target (zeros at start) is trainable; each forward uses
    ``W + index_put(delta)`` through :func:`torch.func.functional_call`, so the model
    and its weights are left bit-identical. Arrays are reshuffled every epoch (seeded);
    batches are used in the order the iterable gives them, which must be re-iterable
    (a list, a ``DataLoader``) when ``epochs > 1``. Returns ``{param: (int32 [ndim, N],
    float32 [N] deltas)}``.
    """
    from tqdm.auto import tqdm

    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ConfigError(f"need epochs >= 1, batch_size >= 1, lr > 0; got {epochs}, {batch_size}, {lr}")
    check_reiterable(x, y, epochs)
    params = _target_params(model, list(masks))
    index = {name: _check_indices(name, masks[name], params[name]) for name in params}
    _no_sparse_grads(model, list(params))
    frozen = {k: v.detach() for k, v in model.named_parameters()}
    frozen.update({k: v.detach() for k, v in model.named_buffers()})
    deltas = {
        name: torch.zeros(idx[0].numel(), dtype=params[name].dtype, requires_grad=True) for name, idx in index.items()
    }
    opt = torch.optim.AdamW(deltas.values(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)

    with _eval_mode(model):  # frozen base: no dropout, no batch-norm statistics updates
        bar = tqdm(range(epochs), desc="shira", disable=not progress, leave=False)
        for _ in bar:
            total, seen = 0.0, 0
            for inputs, target, n in batches(x, y, batch_size, loss is None, gen):
                weights = dict(frozen)
                for name, idx in index.items():
                    weights[name] = frozen[name].index_put(idx, deltas[name], accumulate=True)
                value = loss_value(loss, call(model, weights, inputs), target)
                opt.zero_grad(set_to_none=True)
                value.backward()
                opt.step()
                total, seen = total + value.item() * n, seen + n
            bar.set_postfix(loss=f"{total / max(seen, 1):.4f}")
    return {
        name: (torch.stack(index[name]).numpy().astype(np.int32), deltas[name].detach().numpy().astype(np.float32))
        for name in index
    }


def saliency(
    model: nn.Module,
    x,
    y: np.ndarray | None = None,
    params: Sequence[str] | None = None,
    *,
    loss: Loss | None = None,
    batch_size: int | None = None,
) -> dict[str, np.ndarray]:
    """``|w * dL/dw|`` of each parameter in ``params`` (default: :func:`select_targets`) at the base weights.

    ``L`` is the mean loss over every sample: one forward over the arrays (or chunks of
    ``batch_size``), or over the batches ``x`` (``y=None``), gradients weighted by batch size.
    """
    names = list(select_targets(model) if params is None else params)
    weights = dict(model.named_parameters())
    missing = [p for p in names if p not in weights]
    if missing:
        raise AdapterMismatchError(f"parameters {missing} are not in the model")
    grad, total = None, 0  # running mean over batches, weighted by their size (one batch: its gradient as is)
    for g, n in _batch_grads(model, names, x, y, batch_size or (len(x) if y is not None else 1), loss):
        grad = g if grad is None else {p: grad[p] * (total / (total + n)) + g[p] * (n / (total + n)) for p in g}
        total += n
    return {p: (weights[p].detach() * grad[p]).abs().numpy() for p in names}


def train_snip(
    model: nn.Module,
    targets: Sequence[str],
    x,
    y: np.ndarray | None = None,
    *,
    density: float,
    epochs: int = 30,
    lr: float = 2e-2,
    seed: int = 0,
    threads: int | None = None,
    loss: Loss | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """SNIP masks on the data then :func:`train_shira`, with ``threads`` torch threads (restored after)."""
    check_reiterable(x, y, 2)  # one pass to calibrate, then training
    before = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(threads)
        calib = (x, y) if y is not None else x
        masks = make_masks(model, targets, density=density, kind="snip", calib=calib, seed=seed, loss=loss)
        return train_shira(model, masks, x, y, loss=loss, epochs=epochs, lr=lr, seed=seed, progress=False)
    finally:
        torch.set_num_threads(before)


def merge_shira(model: nn.Module, adapter: dict[str, tuple[np.ndarray, np.ndarray]], alpha: float = 1.0) -> nn.Module:
    """A deep copy of ``model`` with ``alpha * deltas`` added at each adapter's indices (any weight shape)."""
    merged = copy.deepcopy(model)
    params = _target_params(merged, list(adapter))
    with torch.no_grad():
        for name, (indices, deltas) in adapter.items():
            idx = _check_indices(name, indices, params[name])
            values = torch.as_tensor(np.asarray(deltas), dtype=params[name].dtype)
            if values.shape != (idx[0].numel(),):
                raise AdapterMismatchError(
                    f"{name}: {idx[0].numel()} indices but deltas of shape {tuple(values.shape)}"
                )
            params[name].index_put_(idx, alpha * values, accumulate=True)
    return merged


def shira_adapter(
    trained: Mapping[str, tuple[np.ndarray, np.ndarray]],
    info: ModelInfo,
    name: str,
    meta: Mapping[str, object] | None = None,
    *,
    model: nn.Module | None = None,
) -> Adapter:
    """Wrap :func:`train_shira` output as an :class:`edge.format.adapter.Adapter` for the exported model ``info``.

    Every trained parameter must be a base-weight tensor of ``info`` whose shape takes the
    indices (and, with ``model``, equals the torch parameter's shape); otherwise one
    :class:`AdapterMismatchError` lists each misfit, e.g. a parameter the exporter folded
    away or renamed.
    """
    from edge.format.adapter import Adapter, SparseDelta

    torch_shapes = {k: tuple(p.shape) for k, p in model.named_parameters()} if model is not None else {}
    problems = []
    for pname, (indices, _) in trained.items():
        t = info.tensors.get(pname)
        idx = np.asarray(indices)
        if t is None:
            problems.append(f"{pname!r} is not a tensor of the exported model (folded or renamed by the exporter?)")
        elif t.slot or t.head:
            problems.append(f"{pname!r} is {'an adapter slot' if t.slot else 'a detector-head tensor'}, not a weight")
        elif pname in torch_shapes and torch_shapes[pname] != tuple(t.shape):
            problems.append(f"{pname!r} has torch shape {torch_shapes[pname]} but exported shape {tuple(t.shape)}")
        elif idx.ndim != 2 or idx.shape[0] != len(t.shape):
            problems.append(f"{pname!r}: indices {idx.shape} do not fit its exported shape {tuple(t.shape)}")
        elif idx.size and (idx.min() < 0 or np.any(idx.max(axis=1) >= np.asarray(t.shape))):
            problems.append(f"{pname!r}: indices out of range for its exported shape {tuple(t.shape)}")
    if problems:
        raise AdapterMismatchError(
            f"adapter {name!r} does not fit model {info.name!r}: "
            + "; ".join(problems)
            + f". The model's tensors: {short_list(sorted(info.tensors), 12)}"
        )
    tensors = {k: SparseDelta(np.asarray(i, np.int32), np.asarray(v, np.float32)) for k, (i, v) in trained.items()}
    shapes = {k: tuple(info.tensors[k].shape) for k in trained}
    return Adapter(name, info.fingerprint, tensors, shapes, method="shira", info=dict(meta or {}))


# -- helpers ----------------------------------------------------------------------------------------------------------


def _target_params(model: nn.Module, targets: Sequence[str]) -> dict[str, nn.Parameter]:
    named = dict(model.named_parameters())
    missing = [t for t in targets if t not in named]
    if missing:
        known = sorted(k for k, v in named.items() if v.dim() >= 2)
        raise AdapterMismatchError(
            f"parameters {missing} are not in the model; its 2-D+ parameters: {short_list(known, 20)}"
        )
    flat = [t for t in targets if named[t].dim() < 2]
    if flat:
        raise ConfigError(f"SHiRA adapts weights of 2-D or more (linear, conv, embedding); {flat} are 1-D")
    return {t: named[t] for t in targets}


def _check_indices(name: str, indices: np.ndarray, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    idx = np.asarray(indices)
    if idx.ndim != 2 or idx.shape[0] != weight.dim() or not np.issubdtype(idx.dtype, np.integer):
        raise AdapterMismatchError(
            f"{name}: indices must be an integer array [{weight.dim()}, N] (one row per axis of its shape "
            f"{tuple(weight.shape)}), got {idx.dtype} {idx.shape}"
        )
    if idx.size and (idx.min() < 0 or np.any(idx.max(axis=1) >= np.asarray(weight.shape))):
        raise AdapterMismatchError(f"{name}: indices out of range for a weight of shape {tuple(weight.shape)}")
    return tuple(torch.as_tensor(idx.astype(np.int64)))


def _batch_grads(model: nn.Module, names: Sequence[str], x, y, batch_size: int, loss: Loss | None):
    """Yield ``({param: dL/dW}, n)`` per batch (``L`` the batch's mean loss) at the base weights, in eval mode."""
    _no_sparse_grads(model, names)
    frozen = {k: v.detach() for k, v in model.named_parameters()}
    frozen.update({k: v.detach() for k, v in model.named_buffers()})
    leaves = {k: frozen[k].clone().requires_grad_(True) for k in names}
    with _eval_mode(model):
        for inputs, target, n in batches(x, y, batch_size, loss is None):
            value = loss_value(loss, call(model, {**frozen, **leaves}, inputs), target)
            yield dict(zip(leaves, torch.autograd.grad(value, list(leaves.values())), strict=True)), n


def _no_sparse_grads(model: nn.Module, names: Sequence[str]) -> None:
    owners = {n: model.get_submodule(n.rpartition(".")[0]) for n in names}
    sparse = [n for n, m in owners.items() if getattr(m, "sparse", False) is True]
    if sparse:
        raise ConfigError(f"{sparse} belong to embeddings with sparse=True (sparse gradients): set .sparse = False")


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
