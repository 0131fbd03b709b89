"""A tiny vision transformer over 8x8 digits: the demo's base model (host side).

``DigitsEncoder`` cuts an image into 2x2 patches (16 tokens), runs a few pre-LN
transformer blocks written with plain matmul and softmax (so it exports with
``torch.onnx.export(dynamo=True)``), and returns logits and pooled features.
Parameter names are stable because adapters address them:
``embed``, ``pos``, ``blocks.{i}.attn.{q,k,v,proj}``, ``blocks.{i}.mlp.{fc1,fc2}``,
``norm``, ``head``.

The demo's second encoder family, a small CNN, lives in :mod:`lab.digits_cnn`;
:func:`pretrain`, :func:`evaluate` and the checkpoint functions serve both
(:data:`ARCHITECTURES`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from edge.errors import ConfigError, FormatError

__all__ = ["ARCHITECTURES", "DigitsEncoder", "build", "evaluate", "load_checkpoint", "pretrain", "save_checkpoint"]

#: the demo's encoder families: name -> (module, class), imported when built
ARCHITECTURES = {"vit": ("lab.digits_model", "DigitsEncoder"), "cnn": ("lab.digits_cnn", "DigitsCNN")}

_CHECKPOINT_FORMAT = "edge.digits_encoder"
_CHECKPOINT_VERSION = 1


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads

        def split(z: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, H, T, D/H]
            return z.reshape(b, t, h, d // h).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = torch.softmax(q @ k.transpose(-2, -1) * (1.0 / math.sqrt(d // h)), dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, t, d))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class DigitsEncoder(nn.Module):
    """Small ViT over ``[B, 1, 8, 8]`` digits; ``forward`` returns ``(logits [B, 10], features [B, dim])``.

    ``features`` are the final-LayerNorm token features mean-pooled over the 16
    patches, i.e. exactly what ``head`` sees.
    """

    def __init__(
        self, dim: int = 64, depth: int = 2, heads: int = 4, mlp_ratio: int = 2, classes: int = 10, seed: int = 0
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.config = {"dim": dim, "depth": depth, "heads": heads, "mlp_ratio": mlp_ratio, "classes": classes}
        with torch.random.fork_rng(devices=[]):  # deterministic init that leaves the global RNG state alone
            torch.manual_seed(seed)
            self.embed = nn.Linear(4, dim)
            self.pos = nn.Parameter(torch.randn(16, dim) * 0.02)
            self.blocks = nn.ModuleList(_Block(dim, heads, mlp_ratio) for _ in range(depth))
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, classes)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = pixels.shape[0]
        # [B, 1, 8, 8] -> [B, 16, 4]: row-major 2x2 patches
        patches = pixels.reshape(b, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(b, 16, 4)
        x = self.embed(patches) + self.pos
        for block in self.blocks:
            x = block(x)
        features = self.norm(x).mean(dim=1)
        return self.head(features), features


def build(arch: str = "vit", **kwargs) -> nn.Module:
    """A fresh encoder of family ``arch`` (:data:`ARCHITECTURES`) with constructor ``kwargs``."""
    import importlib

    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown digits encoder {arch!r}; known: {sorted(ARCHITECTURES)}")
    module, cls = ARCHITECTURES[arch]
    return getattr(importlib.import_module(module), cls)(**kwargs)


def _arch(model: nn.Module) -> str:
    return next(k for k, (_, cls) in ARCHITECTURES.items() if type(model).__name__ == cls)


def pretrain(
    domain,
    *,
    arch: str = "vit",
    epochs: int = 60,
    lr: float = 3e-3,
    batch_size: int = 64,
    weight_decay: float = 0.05,
    seed: int = 0,
    progress: bool = True,
    **model_kwargs,
) -> nn.Module:
    """Train a fresh encoder of family ``arch`` (:data:`ARCHITECTURES`) on ``domain.x_train``/``y_train``.

    AdamW with a one-cycle (cosine) schedule.

    ``domain`` is an :class:`lab.datasets.Domain` (any object with ``x_train`` and
    ``y_train``). Deterministic for a seed on one machine. Returns the model in eval mode.
    """
    from tqdm.auto import tqdm

    if epochs < 1 or batch_size < 1:
        raise ConfigError(f"epochs and batch_size must be >= 1, got epochs={epochs}, batch_size={batch_size}")
    model = build(arch, seed=seed, **model_kwargs)
    x = torch.as_tensor(np.asarray(domain.x_train, dtype=np.float32))
    y = torch.as_tensor(np.asarray(domain.y_train, dtype=np.int64))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    bar = tqdm(range(epochs), desc="pretrain", disable=not progress, leave=False)
    for _ in bar:
        total = 0.0
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            loss = F.cross_entropy(model(x[idx])[0], y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        bar.set_postfix(loss=f"{total / len(x):.4f}")
    return model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` (returning logits or ``(logits, ...)``) on numpy ``x``, ``y``."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(x), batch_size):
        out = model(torch.as_tensor(np.asarray(x[start : start + batch_size], dtype=np.float32)))
        logits = out[0] if isinstance(out, tuple) else out
        correct += int((logits.argmax(-1).numpy() == np.asarray(y[start : start + batch_size])).sum())
    model.train(was_training)
    return correct / max(1, len(x))


def save_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Write the weights, the family and the constructor config to a safetensors file (no pickle)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": _CHECKPOINT_FORMAT, "version": str(_CHECKPOINT_VERSION), "config": json.dumps(model.config)}
    if _arch(model) != "vit":  # checkpoints without it are the ViT's (written before the CNN existed)
        meta["arch"] = _arch(model)
    save_file(tensors, str(path), metadata=meta)


MAX_CHECKPOINT_BYTES = 1 << 30  # a digits encoder is a few hundred KB


def load_checkpoint(path: str | Path) -> nn.Module:
    """Rebuild the encoder (a :class:`DigitsEncoder` or the family recorded) from :func:`save_checkpoint`."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from edge.format.io import check_regular

    size = check_regular(path, what="digits checkpoint")  # a FIFO would hang safetensors' open: refused first
    if size > MAX_CHECKPOINT_BYTES:
        raise FormatError(
            f"digits checkpoint {path} is {size} bytes, over the limit of {MAX_CHECKPOINT_BYTES} for one; "
            "delete it to train it again (edge demo)"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise FormatError(f"cannot read digits checkpoint {path}: {exc}") from exc
    if meta.get("format") != _CHECKPOINT_FORMAT or meta.get("version") != str(_CHECKPOINT_VERSION):
        raise FormatError(
            f"{path} is not a {_CHECKPOINT_FORMAT} v{_CHECKPOINT_VERSION} checkpoint "
            f"(format={meta.get('format')!r}, version={meta.get('version')!r}); re-save it with save_checkpoint"
        )
    model = build(meta.get("arch", "vit"), **json.loads(meta["config"]))
    try:
        model.load_state_dict(tensors)
    except RuntimeError as exc:
        raise FormatError(f"{path}: weights do not match the stored config: {exc}") from exc
    return model.eval()
