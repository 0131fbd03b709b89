"""The steps of a device trainer's tail (:mod:`edge.learn.tail`): each a numpy forward and backward.

:class:`Linear` is a trainable layer (``y = x @ M + b`` on the channel axis); :class:`Op` a parameter-free op
(bias, residual, ReLU, ReLU6 and other constant-bound ``Clip``, ``Tanh`` (a pooler), GELU, ``HardSwish`` and SiLU
(MobileNetV3's and EfficientNet's activations), a constant scale and a
``Transpose`` (ConvNeXt's layer scale and channels-last block), inference
BatchNormalization, LayerNormalization, mean pooling, reshapes), in float64
or the dtype of ``astype``. :func:`reshape` applies a shape-only op (also to the graph's constants).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

__all__ = ["Linear", "Op", "reshape"]


@dataclass(frozen=True)
class Linear:
    """``y = x @ M + b`` over the channel axis (last for MatMul/Gemm, 1 for a 1x1 Conv)."""

    param: str
    m: np.ndarray  # [in, out] float64 (or the dtype of astype)
    bias: np.ndarray | None
    axis: int
    flip: bool  # the source view is M.T (else M)
    shape: tuple[int, ...]  # the parameter's source shape
    scale: np.ndarray | None = None  # [out]: a BatchNorm folded into the stored weight (TensorInfo.channel_scale)

    @property
    def w2d(self) -> np.ndarray:
        return self.m.T if self.flip else self.m

    def astype(self, dtype) -> Linear:
        cast = {k: None if v is None else v.astype(dtype) for k, v in (("bias", self.bias), ("scale", self.scale))}
        return replace(self, m=self.m.astype(dtype), **cast)

    def forward(self, x, side, weights):
        m = weights[self.param].T if self.flip else weights[self.param]
        if self.scale is not None:  # the graph computes with the folded weight: source * scale per output channel
            m = m * self.scale
        xc = np.moveaxis(x, self.axis, -1)
        y = xc @ m + (0.0 if self.bias is None else self.bias)
        return np.moveaxis(y, -1, self.axis), (xc, m)

    def backward(self, dy, saved):
        return np.moveaxis(np.moveaxis(dy, self.axis, -1) @ saved[1].T, -1, self.axis)

    def grad(self, dy, saved) -> np.ndarray:
        """``dL/dW`` in the 2-D source view."""
        xc, m = saved
        dm = xc.reshape(-1, m.shape[0]).T @ np.moveaxis(dy, self.axis, -1).reshape(-1, m.shape[1])
        if self.scale is not None:  # d(source * scale) / d(source)
            dm = dm * self.scale
        return dm.T if self.flip else dm


@dataclass(frozen=True)
class Op:
    """A parameter-free op of the tail: ``kind`` and its constants."""

    kind: str
    node: str
    c: dict = field(default_factory=dict)

    def astype(self, dtype) -> Op:
        return replace(self, c={k: v.astype(dtype) if isinstance(v, np.ndarray) else v for k, v in self.c.items()})

    def forward(self, x, side, weights):
        k, c = self.kind, self.c
        if k == "bias":
            return x + c["b"], None
        if k == "residual":
            return x + side[c["tensor"]], None
        if k == "relu":
            return np.maximum(x, 0.0), x > 0
        if k == "clip":  # ReLU6, hardtanh: the gradient passes strictly inside the bounds, as torch's
            lo, hi = c["lo"], c["hi"]
            return np.clip(x, lo, hi).astype(x.dtype, copy=False), (x > lo) & (x < hi)
        if k == "tanh":
            y = np.tanh(x)
            return y, y
        if k == "gelu":
            return (x * _gelu_cdf(x, c["tanh"])).astype(x.dtype, copy=False), x
        if k == "hardswish":  # x * clip(x / 6 + 1/2, 0, 1) (ONNX HardSwish, torch's Hardswish)
            return (x * np.clip(x / 6.0 + 0.5, 0.0, 1.0)).astype(x.dtype, copy=False), x
        if k == "silu":  # x * sigmoid(x)
            s = 0.5 * (1.0 + np.tanh(0.5 * x))  # the logistic function without overflow for large |x|
            return (x * s).astype(x.dtype, copy=False), (x, s)
        if k == "affine":  # BatchNormalization at inference: per channel (axis 1)
            shape = (-1,) + (1,) * (x.ndim - 2)
            return x * c["s"].reshape(shape) + c["t"].reshape(shape), None
        if k == "layernorm":
            axes = tuple(range(c["axis"] % x.ndim, x.ndim))
            xc = x - x.mean(axes, keepdims=True)
            inv = 1.0 / np.sqrt((xc * xc).mean(axes, keepdims=True) + c["eps"])
            x_hat = xc * inv
            return x_hat * c["gamma"] + c["beta"], (x_hat, inv, axes)
        if k == "scale":  # per element or channel; one that would grow the tensor is no scale (named by the caller)
            if np.broadcast_shapes(x.shape, np.shape(c["s"])) != x.shape:
                raise ValueError(f"a constant of shape {list(np.shape(c['s']))} would broadcast it")
            return x * c["s"], None
        if k == "transpose":
            return np.transpose(x, c["perm"]), None
        if k == "mean":
            axes = tuple(a % x.ndim for a in (c["axes"] if c["axes"] is not None else range(2, x.ndim)))
            return x.mean(axes, keepdims=c["keepdims"]), (x.shape, axes)
        return reshape(k, c, x), x.shape

    def backward(self, dy, saved):
        k, c = self.kind, self.c
        if k in ("bias", "residual"):
            return dy
        if k in ("relu", "clip"):
            return dy * saved
        if k == "tanh":
            return dy * (1.0 - saved * saved)
        if k == "gelu":
            x = saved
            if c["tanh"]:  # 0.5 x (1 + tanh(k (x + 0.044715 x^3)))
                th = np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))
                du = math.sqrt(2 / math.pi) * (1.0 + 3 * 0.044715 * x * x)
                return dy * (0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * du)
            g = _gelu_cdf(x, False) + x * np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
            return (dy * g).astype(dy.dtype, copy=False)
        if k == "hardswish":  # torch's: 0 up to -3 (inclusive), x / 3 + 1/2 below 3, 1 from 3 on
            x = saved
            return (dy * np.where(x <= -3.0, 0.0, np.where(x < 3.0, x / 3.0 + 0.5, 1.0))).astype(dy.dtype, copy=False)
        if k == "silu":
            x, s = saved
            return (dy * (s * (1.0 + x * (1.0 - s)))).astype(dy.dtype, copy=False)
        if k == "scale":
            return dy * c["s"]
        if k == "transpose":
            return np.transpose(dy, np.argsort(c["perm"]))
        if k == "affine":
            return dy * c["s"].reshape((-1,) + (1,) * (dy.ndim - 2))
        if k == "layernorm":
            x_hat, inv, axes = saved
            d = dy * c["gamma"]
            return inv * (d - d.mean(axes, keepdims=True) - x_hat * (d * x_hat).mean(axes, keepdims=True))
        if k == "mean":
            shape, axes = saved
            n = math.prod(shape[a] for a in axes)
            return np.broadcast_to(np.expand_dims(dy, axes) if not c["keepdims"] else dy, shape) / n
        return dy.reshape(saved)


_ERF = np.vectorize(math.erf, otypes=[np.float64])


def _gelu_cdf(x, tanh: bool):
    if tanh:
        return 0.5 * (1.0 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * (1.0 + _ERF(x / math.sqrt(2.0)))


def reshape(kind: str, c: dict, x):
    if kind == "identity":
        return x
    if kind == "flatten":
        axis = c["axis"] % x.ndim if x.ndim else 0
        return x.reshape(math.prod(x.shape[:axis]), -1)
    if kind == "squeeze":
        axes = c["axes"] if c["axes"] is not None else [a for a, n in enumerate(x.shape) if n == 1]
        return np.squeeze(x, tuple(a % x.ndim for a in axes))
    if kind == "unsqueeze":
        return np.expand_dims(x, tuple(a % (x.ndim + len(c["axes"])) for a in c["axes"]))
    shape = [x.shape[i] if s == 0 and not c["allowzero"] else s for i, s in enumerate(c["shape"])]
    return x.reshape(shape)
