"""Transport compression for any adapter's tensors: ComPEFT-style top-k plus ternary signs.

ComPEFT (arXiv 2311.13171), ``scope="adapter"``: over all of an adapter's tensors
taken together (SHiRA ``values``, dense deltas or bottleneck weights alike), keep the
``density`` fraction of entries with the largest ``|tau|``, drop the rest, and store
each kept entry as ``sign(tau) * scale`` with one ``scale = alpha * std(tau)`` for the
whole adapter. ``alpha=None`` picks the least-squares scale, the mean ``|tau|`` of the
kept entries. ``scope="tensor"`` does the same per tensor (its own top-k and scale),
for adapters whose tensors live on different scales (a bottleneck's ``down`` and ``up``).

On the wire (:func:`to_bytes`, one safetensors file, format ``edge.compeft`` v1):
per tensor ``P.mask`` (1 bit per entry, packed as :func:`edge.format.quant.pack_bits`) and
``P.signs`` (1 bit per kept entry, 1 = positive); the scales, alpha and shapes in the
metadata; tensors that are not compressed (e.g. SHiRA indices) may ride along as is.
The receiver calls :func:`from_bytes` and :func:`decompress` and gets float32 arrays
back, which then go through the normal adapter validation. numpy only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from edge.errors import ConfigError, FormatError
from edge.format.io import load_json
from edge.format.quant import pack_bits, unpack_bits

__all__ = ["COMPEFT_FORMAT", "SCOPES", "Ternary", "compeft", "decompress", "from_bytes", "to_bytes"]

COMPEFT_FORMAT = "edge.compeft"
COMPEFT_VERSION = 1
SCOPES = ("adapter", "tensor")  # where top-k and the scale are taken: the whole adapter (ComPEFT) or each tensor


@dataclass(frozen=True)
class Ternary:
    """A ComPEFT-compressed set of tensors: kept positions, their signs and their scale."""

    shapes: Mapping[str, tuple[int, ...]]
    mask: Mapping[str, np.ndarray]  # bool, flat, True = kept
    positive: Mapping[str, np.ndarray]  # bool, one per kept entry
    scales: Mapping[str, float]  # per tensor; all equal with scope "adapter"
    alpha: float  # scale / std(tau), averaged over the groups
    passthrough: Mapping[str, np.ndarray] = field(default_factory=dict)

    @property
    def kept(self) -> int:
        return int(sum(int(m.sum()) for m in self.mask.values()))


def compeft(
    tensors: Mapping[str, np.ndarray],
    density: float,
    alpha: float | None = None,
    passthrough: Mapping[str, np.ndarray] | None = None,
    scope: str = "adapter",
) -> Ternary:
    """Compress ``tensors`` (name -> float array, any shapes) ComPEFT-style; see the module doc.

    Keeps ``max(1, round(density * size))`` entries of each group (the whole adapter, or
    each tensor); ties go to the lower position in name order, so the result is deterministic.
    """
    if not 0.0 < density <= 1.0:
        raise ConfigError(f"density must be in (0, 1], got {density}")
    if alpha is not None and not 0 <= alpha < math.inf:
        raise ConfigError(f"alpha must be a finite number >= 0 (scale = alpha * std), got {alpha}")
    if scope not in SCOPES:
        raise ConfigError(f"scope must be one of {SCOPES}, got {scope!r}")
    if not tensors:
        raise ConfigError("nothing to compress: tensors is empty")
    names = sorted(tensors)
    flats = {n: np.asarray(tensors[n], dtype=np.float32).reshape(-1) for n in names}
    if not all(np.all(np.isfinite(f)) for f in flats.values()):
        raise ConfigError("tensors to compress contain NaN or Inf")
    groups = [names] if scope == "adapter" else [[n] for n in names]
    mask, positive, scales, alphas = {}, {}, {}, []
    for group in groups:
        tau = np.concatenate([flats[n] for n in group])
        keep = np.zeros(tau.size, dtype=bool)
        keep[np.argsort(-np.abs(tau), kind="stable")[: max(1, int(round(density * tau.size)))]] = True
        std = float(tau.astype(np.float64).std())
        scale = float(np.abs(tau[keep].astype(np.float64)).mean()) if alpha is None else float(alpha) * std
        alphas.append(scale / std if std > 0 else 0.0)
        start = 0
        for n in group:
            m = keep[start : start + flats[n].size]
            mask[n], positive[n], scales[n] = m, flats[n][m] >= 0, scale
            start += flats[n].size
    shapes = {n: tuple(int(d) for d in np.shape(tensors[n])) for n in names}
    return Ternary(shapes, mask, positive, scales, float(np.mean(alphas)), dict(passthrough or {}))


def decompress(t: Ternary) -> dict[str, np.ndarray]:
    """Float32 tensors: ``+-scale`` at kept entries, 0 elsewhere; pass-through tensors as stored."""
    out: dict[str, np.ndarray] = {}
    for n, shape in t.shapes.items():
        s = np.float32(t.scales[n])
        flat = np.zeros(int(np.prod(shape, dtype=np.int64)), dtype=np.float32)
        flat[t.mask[n]] = np.where(t.positive[n], s, -s)
        out[n] = flat.reshape(shape)
    out.update({k: np.asarray(v) for k, v in t.passthrough.items()})
    return out


def to_bytes(t: Ternary, meta: Mapping[str, object] | None = None) -> bytes:
    """Serialise for transport (safetensors; see the module doc). ``meta`` is free-form JSON."""
    from safetensors.numpy import save

    arrays: dict[str, np.ndarray] = {}
    for n in t.shapes:
        arrays[f"{n}.mask"] = pack_bits(t.mask[n].astype(np.uint8), 1)
        arrays[f"{n}.signs"] = pack_bits(t.positive[n].astype(np.uint8), 1)
    for n, v in t.passthrough.items():
        arrays[f"{n}.raw"] = np.ascontiguousarray(v)
    header = {
        "format": COMPEFT_FORMAT,
        "version": COMPEFT_VERSION,
        "scales": dict(t.scales),
        "alpha": t.alpha,
        "shapes": {n: list(s) for n, s in t.shapes.items()},
        "raw": sorted(t.passthrough),
        "meta": dict(meta or {}),
    }
    return save(arrays, metadata={"edge": json.dumps(header, sort_keys=True, separators=(",", ":"))})


def from_bytes(data: bytes) -> tuple[Ternary, dict]:
    """Parse :func:`to_bytes` output; returns the :class:`Ternary` and the free-form metadata."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        arrays = load(data)
        header = load_json(_metadata(data)["edge"], source=COMPEFT_FORMAT)
    except (SafetensorError, ValueError, KeyError, TypeError) as e:
        raise FormatError(f"not a readable {COMPEFT_FORMAT} payload: {e}") from e
    if (
        not isinstance(header, dict)
        or header.get("format") != COMPEFT_FORMAT
        or header.get("version") != COMPEFT_VERSION
    ):
        got = (header.get("format"), header.get("version")) if isinstance(header, dict) else type(header).__name__
        raise FormatError(f"payload is {got!r}, expected {COMPEFT_FORMAT!r} v{COMPEFT_VERSION}")
    try:
        if not all(isinstance(header.get(k), t) for k, t in (("shapes", dict), ("scales", dict), ("raw", list))):
            raise ValueError("'shapes' and 'scales' must be objects and 'raw' a list")
        if not isinstance(header.get("meta", {}), dict) or not all(isinstance(n, str) for n in header["raw"]):
            raise ValueError("'meta' must be an object and 'raw' a list of names")
        shapes = {n: _shape(n, s) for n, s in header["shapes"].items()}
        scales = {n: _scale(f"scale of {n[:80]!r}", header["scales"][n]) for n in shapes}
        alpha = _scale("alpha", header["alpha"])
        raw = list(header["raw"])
        mask, positive = {}, {}
        for n, shape in shapes.items():
            size = int(np.prod(shape, dtype=np.int64))
            mask[n] = unpack_bits(arrays[f"{n}.mask"], 1, size).astype(bool)
            kept = int(mask[n].sum())
            positive[n] = unpack_bits(arrays[f"{n}.signs"], 1, kept).astype(bool)
        passthrough = {n: arrays[f"{n}.raw"] for n in raw}
        expected = {f"{n}.{p}" for n in shapes for p in ("mask", "signs")} | {f"{n}.raw" for n in raw}
        if set(arrays) != expected:
            raise ValueError(f"unexpected tensors {sorted(set(arrays) - expected)}")
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(f"malformed {COMPEFT_FORMAT} payload: {e!r}") from e
    return Ternary(shapes, mask, positive, scales, alpha, passthrough), dict(header.get("meta", {}))


def _scale(what: str, value) -> float:
    """A stored scale: a JSON number (not a string or a boolean), at least 0 and finite in float32."""
    if type(value) not in (int, float) or not 0 <= value <= float(np.finfo(np.float32).max):
        raise ValueError(f"{what} is {str(value)[:40]!r}, not a number in [0, float32 max]")
    return float(value)


def _shape(name: str, shape) -> tuple[int, ...]:
    """A stored shape: a list of at most 8 non-negative integers (not booleans or floats) of at most 2**40 entries."""
    if (
        not isinstance(shape, list)
        or len(shape) > 8
        or not all(type(d) is int and 0 <= d <= 1 << 40 for d in shape)
        or math.prod(shape) > 1 << 40
    ):
        raise ValueError(f"tensor {name[:80]!r} has shape {str(shape)[:80]}, not up to 8 non-negative integers")
    return tuple(shape)


def _metadata(data: bytes) -> dict:
    import struct

    if len(data) < 8:
        raise ValueError(f"{len(data)} bytes is too short")
    (hlen,) = struct.unpack("<Q", data[:8])
    if hlen > len(data) - 8:
        raise ValueError("header length exceeds the payload")
    return load_json(data[8 : 8 + hlen], source="safetensors header")["__metadata__"]
