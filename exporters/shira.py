"""SHiRA: sparse high-rank adapters, trained on the host (arXiv 2406.13175).

An adapter touches only a fixed ~1-2 % of the entries of some 2-D weights. This
module picks those entries (a *mask*), trains a delta per entry with the base
model frozen, and returns ``{param: (indices [2, N] int32, deltas [N] float32)}``
in PEFT's convention: the adapted weight is ``W + scatter(indices, deltas)``.

Masks are a registry (:data:`MASKS`, :func:`register_mask`); a mask function gets
the 2-D weight and, for data-driven kinds, the gradient magnitude accumulated on a
calibration set, and returns one score per entry (larger = keep). Indices are in
the parameter's torch layout (``[out, in]`` for ``nn.Linear``), row-major sorted.
"""

from __future__ import annotations

import copy
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from edge.errors import AdapterMismatchError, ConfigError

__all__ = [
    "DEFAULT_TARGETS",
    "saliency",
    "train_snip",
    "MASKS",
    "MaskKind",
    "make_masks",
    "merge_shira",
    "register_mask",
    "select_targets",
    "train_shira",
]

# Module-name suffixes adapted by default on the digits encoder (see select_targets).
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

    ``needs_calib=True`` means the function reads ``grad_abs`` (summed ``|dL/dW|``
    over a calibration set), so :func:`make_masks` requires ``calib``.
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


def select_targets(model: nn.Module, patterns: str | Sequence[str] = DEFAULT_TARGETS) -> list[str]:
    """Names of the 2-D ``weight`` parameters of the modules matched by ``patterns``.

    Like PEFT's ``target_modules``: a list matches a module whose name equals an entry
    or ends with ``"." + entry`` (``["q", "v", "fc1"]``); a single string is a regex
    that must match the whole module name (``r"blocks\\.0\\..*"``).
    """
    candidates = {name: m.weight for name, m in model.named_modules() if _has_2d_weight(m)}
    if isinstance(patterns, str):
        try:
            regex = re.compile(patterns)
        except re.error as exc:
            raise ConfigError(f"target pattern {patterns!r} is not a valid regex: {exc}") from exc
        chosen = [n for n in candidates if regex.fullmatch(n)]
    else:
        keys = list(patterns)
        chosen = [n for n in candidates if any(n == k or n.endswith("." + k) for k in keys)]
    if not chosen:
        raise ConfigError(f"no module with a 2-D weight matches {patterns!r}; available modules: {sorted(candidates)}")
    return [f"{n}.weight" if n else "weight" for n in chosen]


def make_masks(
    model: nn.Module,
    targets: Sequence[str],
    *,
    density: float = 0.01,
    kind: str = "snip",
    calib: tuple[np.ndarray, np.ndarray] | None = None,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[str, np.ndarray]:
    """Pick ``max(1, round(density * numel))`` entries of each target weight.

    Returns ``{param: int64 [2, N]}`` (row, col), sorted row-major. ``calib`` is a
    labelled ``(x, y)`` numpy pair, needed by ``grad`` and ``snip``. Ties are broken
    towards the lower flat index, so masks are deterministic.
    """
    if kind not in MASKS:
        raise ConfigError(f"unknown mask kind {kind!r}; registered kinds: {sorted(MASKS)}")
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"density must be in (0, 1], got {density}")
    mask = MASKS[kind]
    if mask.needs_calib and calib is None:
        raise ConfigError(f"mask kind {kind!r} scores entries by gradients: pass calib=(x, y)")
    params = _target_params(model, targets)
    grads = _calib_grad_abs(model, params, calib, batch_size) if mask.needs_calib else dict.fromkeys(params)
    out = {}
    for name, weight in params.items():
        w = weight.detach()
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        scores = mask.score(w, grads[name], rng).detach().double().reshape(-1).numpy()
        if scores.shape != (w.numel(),):
            raise ConfigError(f"mask {kind!r} returned {scores.size} scores for {name} with {w.numel()} entries")
        n = max(1, int(round(density * w.numel())))
        flat = np.sort(np.argsort(-scores, kind="stable")[:n])
        out[name] = np.stack(np.divmod(flat, w.shape[1])).astype(np.int64)
    return out


def train_shira(
    model: nn.Module,
    masks: dict[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int = 30,
    lr: float = 2e-2,
    batch_size: int = 64,
    weight_decay: float = 0.0,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Train the masked entries of a frozen ``model`` on ``(x, y)`` with cross-entropy.

    Only one 1-D delta per target (zeros at start) is trainable; each forward uses
    ``W + index_put(delta)`` through :func:`torch.func.functional_call`, so the model
    and its weights are left bit-identical. Returns ``{param: (int32 [2, N], float32
    [N] deltas)}``. ``model`` may return logits or ``(logits, ...)``.
    """
    from tqdm.auto import tqdm

    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ConfigError(f"need epochs >= 1, batch_size >= 1, lr > 0; got {epochs}, {batch_size}, {lr}")
    params = _target_params(model, list(masks))
    index = {name: _check_indices(name, masks[name], params[name]) for name in params}
    frozen = {k: v.detach() for k, v in model.named_parameters()}
    frozen.update({k: v.detach() for k, v in model.named_buffers()})
    deltas = {
        name: torch.zeros(rc[0].numel(), dtype=params[name].dtype, requires_grad=True) for name, rc in index.items()
    }
    opt = torch.optim.AdamW(deltas.values(), lr=lr, weight_decay=weight_decay)
    xt = torch.as_tensor(np.asarray(x, dtype=np.float32))
    yt = torch.as_tensor(np.asarray(y, dtype=np.int64))
    gen = torch.Generator().manual_seed(seed)

    was_training = model.training
    model.eval()  # frozen base: no dropout, no batch-norm statistics updates
    try:
        bar = tqdm(range(epochs), desc="shira", disable=not progress, leave=False)
        for _ in bar:
            total = 0.0
            for batch in torch.randperm(len(xt), generator=gen).split(batch_size):
                weights = dict(frozen)
                for name, (rows, cols) in index.items():
                    weights[name] = frozen[name].index_put((rows, cols), deltas[name], accumulate=True)
                out = torch.func.functional_call(model, weights, (xt[batch],))
                loss = F.cross_entropy(out[0] if isinstance(out, tuple) else out, yt[batch])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(batch)
            bar.set_postfix(loss=f"{total / len(xt):.4f}")
    finally:
        model.train(was_training)
    return {
        name: (torch.stack(index[name]).numpy().astype(np.int32), deltas[name].detach().numpy().astype(np.float32))
        for name in index
    }


def saliency(model: nn.Module, x: np.ndarray, y: np.ndarray, params: Sequence[str]) -> dict[str, np.ndarray]:
    """``|w * dL/dw|`` of each parameter in ``params`` on ``(x, y)`` (mean cross-entropy), at the base weights."""
    named = dict(model.named_parameters())
    leaves = {p: named[p].detach().clone().requires_grad_(True) for p in params}
    frozen = {k: v.detach() for k, v in named.items()}
    out = torch.func.functional_call(model.eval(), {**frozen, **leaves}, (torch.as_tensor(x),))
    loss = F.cross_entropy(out[0] if isinstance(out, tuple) else out, torch.as_tensor(y))
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return {p: (leaves[p] * g).abs().detach().numpy() for p, g in zip(leaves, grads)}


def train_snip(
    model: nn.Module,
    targets: Sequence[str],
    x: np.ndarray,
    y: np.ndarray,
    *,
    density: float,
    epochs: int,
    lr: float,
    seed: int = 0,
    threads: int | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """SNIP masks on ``(x, y)`` then :func:`train_shira`, with ``threads`` torch threads (restored after)."""
    before = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(threads)
        masks = make_masks(model, targets, density=density, kind="snip", calib=(x, y), seed=seed)
        return train_shira(model, masks, x, y, epochs=epochs, lr=lr, seed=seed, progress=False)
    finally:
        torch.set_num_threads(before)


def merge_shira(model: nn.Module, adapter: dict[str, tuple[np.ndarray, np.ndarray]], alpha: float = 1.0) -> nn.Module:
    """A deep copy of ``model`` with ``alpha * deltas`` added at each adapter's indices."""
    merged = copy.deepcopy(model)
    params = _target_params(merged, list(adapter))
    with torch.no_grad():
        for name, (indices, deltas) in adapter.items():
            rows, cols = _check_indices(name, indices, params[name])
            values = torch.as_tensor(np.asarray(deltas), dtype=params[name].dtype)
            if values.shape != (rows.numel(),):
                raise AdapterMismatchError(f"{name}: {rows.numel()} indices but deltas of shape {tuple(values.shape)}")
            params[name].index_put_((rows, cols), alpha * values, accumulate=True)
    return merged


def _has_2d_weight(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, nn.Parameter) and weight.dim() == 2


def _target_params(model: nn.Module, targets: Sequence[str]) -> dict[str, nn.Parameter]:
    named = dict(model.named_parameters())
    missing = [t for t in targets if t not in named]
    if missing:
        known = sorted(k for k, v in named.items() if v.dim() == 2)
        raise AdapterMismatchError(f"parameters {missing} are not in the model; 2-D parameters: {known}")
    flat = [t for t in targets if named[t].dim() != 2]
    if flat:
        raise ConfigError(f"SHiRA adapts 2-D weights only; {flat} are not 2-D")
    return {t: named[t] for t in targets}


def _check_indices(name: str, indices: np.ndarray, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    idx = np.asarray(indices)
    if idx.ndim != 2 or idx.shape[0] != 2 or not np.issubdtype(idx.dtype, np.integer):
        raise AdapterMismatchError(f"{name}: indices must be an integer array [2, N], got {idx.dtype} {idx.shape}")
    rows, cols = weight.shape
    if idx.size and (idx.min() < 0 or idx[0].max() >= rows or idx[1].max() >= cols):
        raise AdapterMismatchError(f"{name}: indices out of range for a weight of shape {tuple(weight.shape)}")
    t = torch.as_tensor(idx.astype(np.int64))
    return t[0], t[1]


def _calib_grad_abs(
    model: nn.Module, params: dict[str, nn.Parameter], calib: tuple[np.ndarray, np.ndarray], batch_size: int
) -> dict[str, torch.Tensor]:
    """Sum over calibration batches of ``|dL/dW|`` (mean cross-entropy per batch) for each target."""
    x, y = calib
    if len(x) != len(y) or len(x) == 0:
        raise ConfigError(f"calib must be a non-empty (x, y) pair of equal length, got {len(x)} and {len(y)}")
    frozen = {k: v.detach() for k, v in model.named_parameters()}
    frozen.update({k: v.detach() for k, v in model.named_buffers()})
    leaves = {k: frozen[k].clone().requires_grad_(True) for k in params}
    acc = {k: torch.zeros_like(v) for k, v in leaves.items()}
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(x), batch_size):
            xb = torch.as_tensor(np.asarray(x[start : start + batch_size], dtype=np.float32))
            yb = torch.as_tensor(np.asarray(y[start : start + batch_size], dtype=np.int64))
            out = torch.func.functional_call(model, {**frozen, **leaves}, (xb,))
            loss = F.cross_entropy(out[0] if isinstance(out, tuple) else out, yb)
            grads = torch.autograd.grad(loss, list(leaves.values()))
            for k, g in zip(leaves, grads, strict=True):
                acc[k] += g.abs()
    finally:
        model.train(was_training)
    return acc
