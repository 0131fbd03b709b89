"""Handwritten digits and deterministic domain shifts for the adaptation demo.

The source domain ("clean") is scikit-learn's 8x8 handwritten digits scaled to
``[0, 1]``. Each target domain applies one registered shift to the same images,
so a model trained on clean digits has something to lose, and an adapter has
something to recover. Everything here is numpy; scikit-learn is imported only
when the digits are loaded.

A shift is a function ``(x, rng) -> x`` over float32 images ``[N, 1, 8, 8]`` in
``[0, 1]``; it must return the same shape and range and draw randomness only from
``rng``. Add one with :func:`register_shift`.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edge.errors import ConfigError

__all__ = ["SHIFTS", "Domain", "Shift", "load_digits", "load_domains", "register_shift", "warp"]

Shift = Callable[[np.ndarray, np.random.Generator], np.ndarray]
SHIFTS: dict[str, Shift] = {}


def register_shift(name: str) -> Callable[[Shift], Shift]:
    """Decorator registering a domain shift under ``name``; a name can be used once."""

    def wrap(fn: Shift) -> Shift:
        if name in SHIFTS:
            raise ConfigError(f"shift {name!r} is already registered ({SHIFTS[name].__qualname__}); pick another name")
        SHIFTS[name] = fn
        return fn

    return wrap


@dataclass(frozen=True, eq=False)
class Domain:
    """One domain's train and test split: images ``[N, 1, 8, 8]`` float32, labels int64."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as float32 ``[N, 1, 8, 8]`` in ``[0, 1]`` and int64 labels ``[N]``."""
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError("the digits demo needs scikit-learn: pip install 'edge-adapt[demo]'") from exc
    bunch = _sk_load_digits()
    x = (bunch.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    return x, bunch.target.astype(np.int64)


def load_domains(
    targets: tuple[str, ...] | list[str] = ("rotate", "noise", "invert", "blur"),
    seed: int = 0,
    test_fraction: float = 0.3,
) -> dict[str, Domain]:
    """The clean source domain plus one shifted domain per name in ``targets``.

    All domains share one stratified train/test split (drawn from ``seed``), so a
    test image of every domain is a shifted copy of the same clean test image.
    Each shift draws from its own generator, seeded by ``seed`` and its name, so
    the result does not depend on the order or choice of the other targets.
    """
    unknown = [t for t in targets if t not in SHIFTS]
    if unknown:
        raise ConfigError(f"unknown shift(s) {unknown}; known shifts: {sorted(SHIFTS)}")
    if "clean" in targets:
        raise ConfigError("'clean' is the source domain and is always returned; do not list it in targets")
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")

    x, y = load_digits()
    train_idx, test_idx = _stratified_split(y, test_fraction, seed)
    domains = {"clean": Domain("clean", x[train_idx], y[train_idx], x[test_idx], y[test_idx])}
    for name in targets:
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        x_train = _apply(name, x[train_idx], rng)
        x_test = _apply(name, x[test_idx], rng)
        domains[name] = Domain(name, x_train, y[train_idx], x_test, y[test_idx])
    return domains


def _stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train and test indices with about ``test_fraction`` of each class in test."""
    rng = np.random.default_rng(seed)
    test = []
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        test.append(idx[: int(round(test_fraction * len(idx)))])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(y)), test_idx)
    return train_idx, test_idx


def _apply(name: str, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = SHIFTS[name](x.copy(), rng)
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


def _bilinear(x: np.ndarray, src_y: np.ndarray, src_x: np.ndarray) -> np.ndarray:
    """Sample images ``x [N, 1, H, W]`` at fractional source coordinates ``[N, H, W]``; zeros outside."""
    n, _, h, w = x.shape
    padded = np.pad(x[:, 0], ((0, 0), (1, 1), (1, 1)))  # a zero border absorbs out-of-range samples
    sy = np.clip(src_y, -1.0, h) + 1.0
    sx = np.clip(src_x, -1.0, w) + 1.0
    y0 = np.clip(np.floor(sy).astype(np.int64), 0, h)
    x0 = np.clip(np.floor(sx).astype(np.int64), 0, w)
    wy, wx = sy - y0, sx - x0
    b = np.arange(n)[:, None, None]
    out = (
        (1 - wy) * (1 - wx) * padded[b, y0, x0]
        + (1 - wy) * wx * padded[b, y0, x0 + 1]
        + wy * (1 - wx) * padded[b, y0 + 1, x0]
        + wy * wx * padded[b, y0 + 1, x0 + 1]
    )
    return out[:, None].astype(np.float32)


def warp(x: np.ndarray, angle: np.ndarray, scale: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """Rotate (radians), scale and translate each image about its centre, per image."""
    n, _, h, w = x.shape
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    gy, gx = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    ry, rx = gy[None] - cy - dy[:, None, None], gx[None] - cx - dx[:, None, None]
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    s = scale[:, None, None]
    # inverse map: output pixel -> source pixel
    src_y = (cos * ry - sin * rx) / s + cy
    src_x = (sin * ry + cos * rx) / s + cx
    return _bilinear(x, src_y, src_x)


@register_shift("rotate")
def _rotate(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rotate by 35-45 degrees, clockwise or counter-clockwise at random (bilinear)."""
    n = len(x)
    angle = np.deg2rad(rng.uniform(35.0, 45.0, n)) * rng.choice([-1.0, 1.0], n)
    zeros = np.zeros(n)
    return warp(x, angle, np.ones(n), zeros, zeros)


@register_shift("noise")
def _noise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Additive gaussian noise, sigma 0.35, clipped to [0, 1]."""
    return np.clip(x + rng.normal(0.0, 0.35, x.shape).astype(np.float32), 0.0, 1.0)


@register_shift("invert")
def _invert(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Photographic negative: ``1 - x``."""
    return 1.0 - x


@register_shift("blur")
def _blur(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """3x3 box blur applied twice (zero padding), then contrast-stretched back to a peak of 1."""
    h, w = x.shape[-2:]
    for _ in range(2):
        p = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
        x = sum(p[:, :, i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9.0
    peak = x.max(axis=(1, 2, 3), keepdims=True)
    return x / np.maximum(peak, 1e-6)


@register_shift("shift")
def _shift(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Translate by 1 pixel in a random direction and shrink to 90 % (bilinear)."""
    n = len(x)
    theta = rng.uniform(0.0, 2 * np.pi, n)
    return warp(x, np.zeros(n), np.full(n, 0.9), 1.0 * np.sin(theta), 1.0 * np.cos(theta))
