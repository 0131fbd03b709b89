"""Low-precision codecs for adapter tensors: Gaussian-quantile codes, sign-and-scale, raw fp32.

The device decodes what the host trained, so this module is the single source of
truth for both sides (``exporters.lowbit`` mirrors it in torch, operation for
operation). numpy only.

Schemes (registry :data:`SCHEMES`, one :class:`Scheme` per name):

* ``"gq"`` (arXiv "Revisiting the Parameter Efficiency of Adapters from the Perspective
  of Precision Redundancy", code JieShibo/PETL-ViT ``binary_adapter``), 1, 2, 4 or 8 bits.
  Per tensor ``mu = mean(W)``, ``sigma = std(W)`` (unbiased, as ``torch.std``), both
  computed in float64 and rounded to float32; ``W_hat = (W - mu) / (sigma + 1e-5)`` in
  float32; each entry takes the nearest code of :func:`codebook` (a value exactly on a
  threshold takes the upper code); decode ``sigma * code + mu`` in float32.
  Stats: ``[mu, sigma]``.
* ``"sign"`` (BitDelta), 1 bit: ``sign(W) * scale`` with ``scale = mean|W|`` (zero
  counts as positive). Stats: ``[scale]``.
* ``"fp32"``, 32 bits: the raw little-endian float32 bytes. Stats: none.

Codes are packed :func:`pack_bits`-wise: ``8 // bits`` codes per byte, the first in the
lowest bits (the reference code's byte layout).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edge.errors import ConfigError, FormatError
from edge.registry import Registry

__all__ = [
    "CODE_BITS",
    "EPS",
    "SCHEMES",
    "Encoded",
    "Scheme",
    "codebook",
    "decode",
    "encode",
    "fake_quant",
    "gq_stats",
    "nbytes",
    "pack_bits",
    "thresholds",
    "unpack_bits",
]

CODE_BITS = (1, 2, 4, 8)  # widths pack_bits handles (a whole number of codes per byte)
EPS = np.float32(1e-5)  # the reference code's guard in W_hat = (W - mu) / (sigma + EPS)


# -- codebooks ------------------------------------------------------------------------------------------------------


@functools.cache
def _codebook64(bits: int) -> np.ndarray:
    """Fixed point of the reference iteration: every code is the median of its cell, cells split midway.

    The reference code iterates ``values = ppf(mid-probability of each cell)``,
    ``thresholds = midpoints`` 500 times from zeros; that converges for 1, 2 and 4 bits
    but not for 8. We solve the same fixed point directly: pick the lowest code ``v0``,
    walk the cells upwards (cell ``i`` has its median at ``v_i``, so its upper edge sits
    at probability ``2 * cdf(v_i) - cdf(lower edge)``; the next code mirrors ``v_i`` in
    that edge) and bisect ``v0`` until the middle threshold lands on 0 (symmetry).
    """
    half = 2 ** (bits - 1)

    def middle_threshold(v0: float) -> tuple[float, list[float]]:
        v, lower, vals = v0, 0.0, [v0]
        for i in range(half):
            upper = 2.0 * _ndtr(v) - lower
            if upper >= 1.0:
                return math.inf, vals
            edge = _ndtri(upper)
            if i == half - 1:
                return edge, vals
            v, lower = 2.0 * edge - v, upper
            vals.append(v)
        raise AssertionError("unreachable")

    lo, hi = -12.0, 0.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if middle_threshold(mid)[0] > 0.0:
            hi = mid
        else:
            lo = mid
    vals = np.asarray(middle_threshold(0.5 * (lo + hi))[1])
    return np.concatenate([vals, -vals[::-1]])


def codebook(bits: int) -> np.ndarray:
    """The ``2**bits`` Gaussian-quantile codes of the ``gq`` scheme, float32, sorted and symmetric.

    1 bit: +-0.6745; 2 bits: +-0.3778, +-1.2657; 4 and 8 bits: 16 and 256 levels.
    """
    _check_code_bits(bits)
    out = _codebook64(bits).astype(np.float32)
    out.flags.writeable = False
    return out


def thresholds(bits: int) -> np.ndarray:
    """Decision thresholds between neighbouring codes (midpoints), float32, ``2**bits - 1`` of them."""
    c = _codebook64(bits)
    out = ((c[1:] + c[:-1]) / 2.0).astype(np.float32)
    out.flags.writeable = False
    return out


def _ndtr(x: float) -> float:
    """Standard normal CDF."""
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


# Acklam's rational approximation of the normal quantile (relative error 1.2e-9), then Halley steps.
_A = (-3.969683028665376e01, 2.209460984245205e02, -2.759285104469687e02, 1.383577518672690e02, -3.066479806614716e01)
_A5 = 2.506628277459239e00
_B = (-5.447609879822406e01, 1.615858368580409e02, -1.556989798598866e02, 6.680131188771972e01, -1.328068155288572e01)
_C = (
    -7.784894002430293e-03,
    -3.223964580411365e-01,
    -2.400758277161838e00,
    -2.549732539343734e00,
    4.374664141464968e00,
)
_C5 = 2.938163982698783e00
_D = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00, 3.754408661907416e00)


def _ndtri(p: float) -> float:
    """Standard normal quantile for ``0 < p < 1``."""

    def horner(coefs, tail, z):
        acc = 0.0
        for c in coefs:
            acc = acc * z + c
        return acc * z + tail

    if p < 0.02425 or p > 0.97575:
        q = math.sqrt(-2.0 * math.log(min(p, 1.0 - p)))
        x = horner(_C, _C5, q) / horner(_D, 1.0, q)
        x = x if p < 0.5 else -x
    else:
        q = p - 0.5
        r = q * q
        x = horner(_A, _A5, r) * q / horner(_B, 1.0, r)
    for _ in range(2):
        u = (_ndtr(x) - p) * math.sqrt(2.0 * math.pi) * math.exp(0.5 * x * x)
        x -= u / (1.0 + 0.5 * x * u)
    return x


# -- bit packing ----------------------------------------------------------------------------------------------------


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack codes in ``[0, 2**bits)`` into bytes: ``8 // bits`` per byte, the first in the lowest bits.

    Returns uint8 of length ``ceil(len * bits / 8)``; the unused high bits of the last byte are 0.
    """
    _check_code_bits(bits)
    codes = np.asarray(codes).reshape(-1)
    if codes.size and (not np.issubdtype(codes.dtype, np.integer) or codes.min() < 0 or codes.max() >= 1 << bits):
        raise ConfigError(f"{bits}-bit codes must be integers in [0, {1 << bits}), got {codes.dtype} values")
    per = 8 // bits
    padded = np.zeros(-(-codes.size // per) * per, dtype=np.uint8)
    padded[: codes.size] = codes
    shifts = np.arange(0, 8, bits, dtype=np.uint8)
    return np.bitwise_or.reduce(padded.reshape(-1, per) << shifts, axis=1).astype(np.uint8)


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: the first ``count`` codes, uint8."""
    _check_code_bits(bits)
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.ndim != 1:
        raise FormatError(f"packed codes must be a 1-D uint8 array, got {packed.dtype} {packed.shape}")
    if packed.size != -(-count * bits // 8):
        raise FormatError(f"{packed.size} bytes cannot hold exactly {count} codes of {bits} bits")
    shifts = np.arange(0, 8, bits, dtype=np.uint8)
    mask = np.uint8((1 << bits) - 1)
    return ((packed[:, None] >> shifts) & mask).reshape(-1)[:count]


def _check_code_bits(bits: int) -> None:
    if bits not in CODE_BITS:
        raise ConfigError(f"bits must be one of {CODE_BITS}, got {bits!r}")


# -- schemes --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scheme:
    """A registered codec: ``encode(flat float32, bits) -> (payload uint8, stats float32)`` and its inverse."""

    name: str
    bits: tuple[int, ...]  # widths it accepts
    n_stats: int
    encode: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]
    decode: Callable[[np.ndarray, np.ndarray, int, int], np.ndarray]  # (payload, stats, bits, count) -> float32
    doc: str = ""
    #: ``(stats, bits) -> the largest |value| decode can give`` (NaN for stats out of range, e.g. a negative scale)
    largest: Callable[[np.ndarray, int], float] | None = None

    def payload_bytes(self, bits: int, count: int) -> int:
        return -(-count * bits // 8)


SCHEMES: Registry[Scheme] = Registry("quantization scheme")


def gq_stats(values: np.ndarray) -> tuple[np.float32, np.float32]:
    """``(mu, sigma)`` of the ``gq`` scheme: mean and unbiased std in float64, rounded to float32."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    sigma = v.std(ddof=1) if v.size > 1 else 0.0
    return np.float32(v.mean()), np.float32(sigma)


def _gq_encode(flat: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    mu, sigma = gq_stats(flat)
    w_hat = (flat - mu) / (sigma + EPS)  # float32 throughout, as the torch mirror computes it
    codes = np.searchsorted(thresholds(bits), w_hat, side="right").astype(np.uint8)
    return pack_bits(codes, bits), np.array([mu, sigma], dtype=np.float32)


def _gq_decode(payload: np.ndarray, stats: np.ndarray, bits: int, count: int) -> np.ndarray:
    mu, sigma = stats[0], stats[1]
    return sigma * codebook(bits)[unpack_bits(payload, bits, count)] + mu


def _gq_largest(stats: np.ndarray, bits: int) -> float:
    mu, sigma = (float(v) for v in stats)
    return abs(mu) + sigma * float(np.abs(codebook(bits)).max()) if sigma >= 0 else math.nan


def _sign_encode(flat: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    scale = np.float32(np.abs(flat.astype(np.float64)).mean()) if flat.size else np.float32(0)
    return pack_bits((flat >= 0).astype(np.uint8), 1), np.array([scale], dtype=np.float32)


def _sign_decode(payload: np.ndarray, stats: np.ndarray, bits: int, count: int) -> np.ndarray:
    return np.where(unpack_bits(payload, 1, count).astype(bool), stats[0], -stats[0]).astype(np.float32)


def _fp32_encode(flat: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    return flat.astype("<f4").view(np.uint8).copy(), np.zeros(0, dtype=np.float32)


def _fp32_decode(payload: np.ndarray, stats: np.ndarray, bits: int, count: int) -> np.ndarray:
    if payload.size != 4 * count:
        raise FormatError(f"{payload.size} bytes cannot hold exactly {count} float32 values")
    return payload.view("<f4").astype(np.float32)


SCHEMES.add(
    "gq",
    Scheme("gq", CODE_BITS, 2, _gq_encode, _gq_decode, "per-tensor standardised Gaussian-quantile codes", _gq_largest),
)
SCHEMES.add(
    "sign",
    Scheme("sign", (1,), 1, _sign_encode, _sign_decode, "BitDelta: sign(W) * mean|W|", lambda s, b: float(s[0])),
)
SCHEMES.add("fp32", Scheme("fp32", (32,), 0, _fp32_encode, _fp32_decode, "raw little-endian float32"))


# -- encoded tensors ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoded:
    """One tensor in a scheme: packed payload bytes plus per-tensor statistics.

    Validated on construction (it may come from a file): a malformed one raises
    :class:`~edge.errors.FormatError`.
    """

    scheme: str
    bits: int
    shape: tuple[int, ...]
    codes: np.ndarray  # uint8 [payload bytes], packed
    stats: np.ndarray  # float32 [n_stats]

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise FormatError(f"unknown quantization scheme {self.scheme!r}; known: {SCHEMES.names()}")
        s = SCHEMES.get(self.scheme)
        if self.bits not in s.bits:
            raise FormatError(f"scheme {self.scheme!r} stores {s.bits} bits, not {self.bits!r}")
        if not isinstance(self.shape, (tuple, list)) or not all(
            isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0 for d in self.shape
        ):
            raise FormatError(f"shape must be a tuple of positive ints, got {self.shape!r}")
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        want = s.payload_bytes(self.bits, self.count)
        if not isinstance(self.codes, np.ndarray) or self.codes.dtype != np.uint8 or self.codes.shape != (want,):
            got = f"{getattr(self.codes, 'dtype', type(self.codes))} {getattr(self.codes, 'shape', '')}"
            raise FormatError(
                f"{self.scheme}/{self.bits} codes of shape {self.shape} must be uint8 ({want},), got {got}"
            )
        if not isinstance(self.stats, np.ndarray) or self.stats.dtype != np.float32 or self.stats.shape != (s.n_stats,):
            got = f"{getattr(self.stats, 'dtype', type(self.stats))} {getattr(self.stats, 'shape', '')}"
            raise FormatError(f"{self.scheme} stats must be float32 ({s.n_stats},), got {got}")
        if not np.all(np.isfinite(self.stats)):
            raise FormatError(f"{self.scheme} stats contain NaN or Inf")
        top = s.largest(self.stats, self.bits) if s.largest else 0.0
        if not 0 <= top <= float(np.finfo(np.float32).max):  # NaN: stats out of range
            raise FormatError(
                f"{self.scheme} stats {self.stats.tolist()} decode out of range (a negative scale, or values beyond "
                "float32); the file is corrupt or was not written by edge.format.quant.encode"
            )

    @property
    def count(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def encode(values: np.ndarray, scheme: str = "gq", bits: int = 1) -> Encoded:
    """Encode a float tensor (any shape) in ``scheme`` at ``bits``; the tensor is first cast to float32."""
    s = SCHEMES.get(scheme)
    if bits not in s.bits:
        raise ConfigError(f"scheme {scheme!r} takes bits {s.bits}, got {bits!r}")
    arr = np.asarray(values)
    if not np.issubdtype(arr.dtype, np.floating) or arr.size == 0:
        raise ConfigError(f"can only encode a non-empty float array, got {arr.dtype} of shape {arr.shape}")
    flat = np.ascontiguousarray(arr, dtype=np.float32).reshape(-1)
    if not np.all(np.isfinite(flat)):
        raise ConfigError("values to encode contain NaN or Inf")
    payload, stats = s.encode(flat, bits)
    return Encoded(scheme, int(bits), tuple(int(d) for d in arr.shape), payload, stats)


def decode(enc: Encoded) -> np.ndarray:
    """The float32 tensor an :class:`Encoded` stands for, in its shape."""
    s = SCHEMES.get(enc.scheme)
    return s.decode(enc.codes, enc.stats, enc.bits, enc.count).astype(np.float32, copy=False).reshape(enc.shape)


def fake_quant(values: np.ndarray, scheme: str = "gq", bits: int = 1) -> np.ndarray:
    """``decode(encode(values))``: what the device will compute with."""
    return decode(encode(values, scheme, bits))


def nbytes(enc: Encoded) -> int:
    """Payload bytes: packed codes plus statistics (no file header)."""
    return int(enc.codes.nbytes + enc.stats.nbytes)
