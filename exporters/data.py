"""Data and losses for host-side training: numpy ``(x, y)`` arrays or any iterable of batches.

A batch is ``(inputs, targets)``: ``inputs`` a tensor or array, a tuple (passed positionally)
or a dict (passed as keywords). Float arrays become float32, integer arrays int64 (token ids,
class indices). A loss is ``loss(output, target) -> scalar tensor`` (default cross-entropy); it
reads :func:`output_tensor` of the model's output: the tensor itself, the first element of a
tuple or list, or ``logits`` of a dict or Hugging Face ``ModelOutput`` (else its first value).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from edge.errors import ConfigError

__all__ = ["Loss", "as_tensor", "batches", "call", "check_reiterable", "is_pair", "loss_value", "output_tensor"]

#: ``loss(output, target) -> scalar tensor``
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def is_pair(data) -> bool:
    """An ``(x, y)`` pair of arrays, as opposed to an iterable of ``(inputs, targets)`` batches."""
    return isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], (np.ndarray, torch.Tensor))


def check_reiterable(x, y, epochs: int) -> None:
    if y is None and epochs > 1 and iter(x) is x:
        raise ConfigError(
            f"{type(x).__name__} is a one-shot iterator but {epochs} passes are needed: pass a list or a DataLoader"
        )


def as_tensor(v) -> torch.Tensor:
    """Tensors as given; arrays as float32 (floats) or int64 (integers, e.g. token ids or class indices)."""
    if isinstance(v, torch.Tensor):
        return v
    a = np.asarray(v)
    return torch.as_tensor(a.astype(np.float32 if np.issubdtype(a.dtype, np.floating) else np.int64))


def batches(x, y, batch_size: int, classify: bool, gen: torch.Generator | None = None):
    """Yield ``(inputs, target, n)``: chunks of the arrays ``x, y`` (shuffled with ``gen``), or the batches of ``x``.

    ``x`` may also be the pair ``(x, y)`` itself (``y`` None): ``train_shira(model, masks, (x, y))``.
    """
    if y is None and is_pair(x):
        x, y = x
    if y is not None:
        xa, ya = np.asarray(x), np.asarray(y)
        if len(xa) != len(ya) or len(xa) == 0:
            raise ConfigError(f"x and y must be non-empty and of equal length, got {len(xa)} and {len(ya)}")
        xt, yt = as_tensor(xa), torch.as_tensor(ya.astype(np.int64)) if classify else as_tensor(ya)
        order = torch.randperm(len(xt), generator=gen) if gen is not None else torch.arange(len(xt))
        for b in order.split(batch_size):
            yield (xt[b],), yt[b], len(b)
        return
    if isinstance(x, (np.ndarray, torch.Tensor)):
        raise ConfigError("x is an array but y is None: pass y, or an iterable of (inputs, targets) batches")
    count = 0
    for i, batch in enumerate(x):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ConfigError(f"batch {i} is a {type(batch).__name__}; every batch must be an (inputs, targets) pair")
        inputs, target = batch
        if isinstance(inputs, Mapping):
            inputs = {k: as_tensor(v) for k, v in inputs.items()}
        elif isinstance(inputs, (tuple, list)):
            inputs = tuple(as_tensor(v) for v in inputs)
        else:
            inputs = (as_tensor(inputs),)
        target = as_tensor(target)
        count += 1
        yield inputs, target, len(target) if target.dim() else 1
    if not count:
        raise ConfigError(f"the data ({type(x).__name__}) yielded no batches")


def call(model: nn.Module, weights: dict[str, torch.Tensor], inputs):
    if isinstance(inputs, Mapping):
        return torch.func.functional_call(model, weights, (), dict(inputs))
    return torch.func.functional_call(model, weights, tuple(inputs))


def output_tensor(out) -> torch.Tensor:
    """The tensor a loss reads: itself, the first of a tuple/list, a mapping's ``logits`` (else its first value)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) and out:
        return output_tensor(out["logits"] if "logits" in out else next(iter(out.values())))
    if isinstance(out, (tuple, list)) and out:
        return output_tensor(out[0])
    raise ConfigError(f"model output of type {type(out).__name__} holds no tensor to compute a loss on")


def loss_value(loss: Loss | None, out, target: torch.Tensor) -> torch.Tensor:
    value = (loss or F.cross_entropy)(output_tensor(out), target)
    if not isinstance(value, torch.Tensor) or value.dim() != 0:
        raise ConfigError(f"loss must return a scalar tensor, got {type(value).__name__} {getattr(value, 'shape', '')}")
    return value
