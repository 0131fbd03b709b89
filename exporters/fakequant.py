"""The low-bit quantizer in the training loop: straight-through estimators and a quantized linear layer.

Per weight matrix: standardise (mean, std), snap to the Gaussian-quantile codes of
:mod:`edge.format.quant` (identity straight-through gradient), dequantize; ``sign`` is
BitDelta's sign with a per-matrix scale. What training sees is bit-identical to what the
device decodes from the adapter file.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from edge.errors import ConfigError
from edge.format import quant

__all__ = ["QLinear", "fake_quant"]


class _NearestCode(torch.autograd.Function):
    """Forward: the nearest code (exactly the codebook value). Backward: identity (straight-through)."""

    @staticmethod
    def forward(ctx, w_hat: torch.Tensor, bounds: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        idx = torch.searchsorted(bounds, w_hat.detach().reshape(-1), right=True)
        return codes[idx].reshape(w_hat.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor) -> torch.Tensor:
        return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad


def fake_quant(w: torch.Tensor, scheme: str, bits: int) -> torch.Tensor:
    """``edge.format.quant.decode(edge.format.quant.encode(w))`` in torch, with straight-through gradients.

    The statistics are computed in float64 and rounded to float32 and everything else
    runs in float32, operation for operation as :mod:`edge.format.quant` does.
    """
    if scheme == "fp32":
        return w
    if scheme == "gq":
        w64 = w.double()
        mu = w64.mean().float()
        sigma = (w64.std() if w.numel() > 1 else w64.sum() * 0).float()
        eps = torch.tensor(quant.EPS, dtype=torch.float32)
        w_hat = (w - mu) / (sigma + eps)
        codes = _NearestCode.apply(w_hat, torch.from_numpy(quant.thresholds(bits).copy()), _codebook(bits))
        return sigma * codes + mu
    if scheme == "sign":
        return _SignSTE.apply(w) * w.double().abs().mean().float()
    raise ConfigError(f"no torch quantizer for scheme {scheme!r}; known: gq, sign, fp32")


def _codebook(bits: int) -> torch.Tensor:
    return torch.from_numpy(quant.codebook(bits).copy())


class QLinear(nn.Module):
    """``y = x @ Q(W)^T``: a bias-free linear layer whose weight is fake-quantized."""

    def __init__(self, in_features: int, out_features: int, scheme: str, bits: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default
        self.scheme, self.bits = scheme, bits
        self.quantize = True  # off for export: the device feeds already decoded weights

    def small_init_(self) -> QLinear:
        """The reference's init for ``up``: truncated normal, std 1e-3, within +-2e-3."""
        nn.init.trunc_normal_(self.weight, std=1e-3, a=-2e-3, b=2e-3)
        return self

    def effective_weight(self) -> torch.Tensor:
        return fake_quant(self.weight, self.scheme, self.bits) if self.quantize else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight())
