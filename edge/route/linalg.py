"""Small numpy kernels shared by the OOD detectors (:mod:`edge.route.detectors`, :mod:`edge.route.hdc`)."""

from __future__ import annotations

import numpy as np

__all__ = ["LowRankWhitening", "group_sums", "hadamard_rows", "matmul", "top_eigen", "unit_rows", "whitener"]

#: OpenBLAS runs a GEMM with m * n * k up to this on the calling thread (SMP_THRESHOLD_MIN * 4)
SINGLE_THREAD_MNK = 1 << 18


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` in row chunks small enough for BLAS to stay on the calling thread.

    A multi-threaded BLAS call on small matrices fights onnxruntime's spinning intra-op
    threads and any other load for the cores. Measured on a loaded 2-core VM:
    ``[16, 256] @ [256, 256]`` took 29 us alone and 79 ms right after an onnxruntime run,
    ``[32, 128] @ [128, 128]`` 444 us even alone; in single-thread chunks 0.1 ms and
    55 us. Scoring stays on the calling thread, so its cost does not depend on that race.
    """
    k, n = b.shape
    if len(a) * k * n <= SINGLE_THREAD_MNK:
        return a @ b
    cols = max(1, min(n, SINGLE_THREAD_MNK // max(1, k)))
    rows = max(1, SINGLE_THREAD_MNK // max(1, k * cols))
    out = np.empty((len(a), n), np.result_type(a, b))
    for j in range(0, n, cols):
        for i in range(0, len(a), rows):
            np.matmul(a[i : i + rows], b[:, j : j + cols], out=out[i : i + rows, j : j + cols])
    return out


def whitener(cov: np.ndarray, floor: float) -> np.ndarray:
    """``W`` with ``W^T cov W = I`` on the kept spectrum; eigenvalues floored at ``floor * max``."""
    ev, u = np.linalg.eigh(cov)
    ev = np.maximum(ev, floor * max(float(ev.max()), 1e-30))
    return (u / np.sqrt(ev)).astype(np.float32)


def top_eigen(c: np.ndarray, rank: int, seed: int = 0, power: int = 6) -> tuple[np.ndarray, np.ndarray, float]:
    """Top ``rank`` eigenpairs of ``c^T c / N`` (``c`` ``[N, d]``) and its trace, never forming ``d x d``.

    ``(V [d, k], L [k] descending, trace)`` with ``k = min(rank, N, d)``. ``N <= d``: exact, from the ``N x N`` Gram
    matrix ``c c^T / N`` (``V = c^T U / sqrt(N L)``). Else randomized subspace iteration (Halko, Martinsson and
    Tropp 2011, alg. 4.4): ``2 rank`` random directions, ``power`` iterations of ``c^T (c Q)``, each
    re-orthonormalised, then the exact eigenpairs of ``c`` projected on the subspace. Features' spectra decay
    slowly, hence the wide oversampling and six iterations: on a linearly decaying standard deviation (harder than
    the encoders' spectra) the top 16 of 200 and 64 of 600 eigenvalues came within 1.3 % and 0.5 % (99.7 and
    99.9 % of their variance captured), against 7 % with ``rank // 4`` more directions and four iterations. Time
    ``O(N d rank)``, memory ``O(N d + d rank)``; every product goes through :func:`matmul`.
    """
    n, d = c.shape
    k = min(rank, n, d)
    trace = float(np.einsum("ij,ij->", c, c)) / n
    if n <= d:
        ev, u = np.linalg.eigh(matmul(c, np.ascontiguousarray(c.T)) / n)
        ev, u = ev[::-1][:k], u[:, ::-1][:, :k]
        k = int((ev > 1e-12 * max(float(ev[0]), 1e-300)).sum())  # directions the rows span (N - domains at most)
        ev, u = ev[:k], np.ascontiguousarray(u[:, :k])
        return matmul(np.ascontiguousarray(c.T), u) / np.sqrt(ev * n), ev, trace
    wide = min(d, 2 * k)
    ct = np.ascontiguousarray(c.T)
    q = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, wide)))[0]
    for _ in range(power):
        q = np.linalg.qr(_inner(c, _inner(ct, q)))[0]
    y = _inner(ct, q)
    ev, u = np.linalg.eigh(matmul(np.ascontiguousarray(y.T), y) / n)
    ev, u = np.maximum(ev[::-1][:k], 0.0), u[:, ::-1][:, :k]
    return matmul(q, np.ascontiguousarray(u)), ev, trace


def _inner(at: np.ndarray, b: np.ndarray, block: int = 64) -> np.ndarray:
    """``at.T @ b`` summed over blocks of ``block`` rows of both: with a long inner dimension, :func:`matmul`'s
    chunks would be single rows (matrix-vector speed); these stay on the calling thread too. Measured on a loaded
    2-core VM, ``[2304, 2560] @ [2560, 512]``: 0.55 s against 2.15 s."""
    out = np.zeros((at.shape[1], b.shape[1]), np.result_type(at, b))
    for s in range(0, len(at), block):
        out += matmul(at[s : s + block].T, b[s : s + block])
    return out


class LowRankWhitening:
    """``z = (f - mu) S^(-1/2) / sqrt(d)`` for the probabilistic-PCA covariance ``S = V L V^T + s2 (I - V V^T)``
    (Tipping and Bishop 1999): the top ``k`` eigenpairs ``V, L`` of the pooled within-domain covariance kept exactly,
    the rest of its spectrum replaced by its mean ``s2`` (from the trace). A linear map of ``f``, applied, folded into
    a matrix and normed in ``O(d k)`` per row: ``S^(-1/2) = V diag(L^-1/2 - s2^-1/2) V^T + I / sqrt(s2)`` and
    ``|z|^2 = (|g|^2 / s2 - |g V diag(1/s2 - 1/L)^(1/2)|^2) / d``. The eigenvalue floor (``floor * max``) bounds
    ``L`` and ``s2`` from below as the full whitening's floor does: ``s2`` reaches it when the rows span at most
    ``k`` directions (fewer inputs than the rank), which then weigh ``1 / sqrt(floor * max)``, not infinity.
    """

    def __init__(self, centred: np.ndarray, rank: int, floor: float, seed: int = 0) -> None:
        n, d = centred.shape
        v, ev, trace = top_eigen(centred, rank, seed)
        top = max(float(ev[0]) if len(ev) else 0.0, 1e-30)
        s2 = max((trace - float(ev.sum())) / (d - len(ev)), floor * top)
        ev = np.maximum(ev, s2)  # the kept directions are never below the mean of the others (rounding aside)
        self.rank, self.width, self.s2 = len(ev), d, s2
        self.kappa = s2 * d  # |g|^2 - |g self.unit_ws|^2 = kappa |z|^2
        a = 1.0 / np.sqrt(d)
        self._v, self._v64 = v.astype(np.float32), v
        self._coef = (ev**-0.5 - s2**-0.5) * a  # per kept direction, over the isotropic part
        self._scale = a / np.sqrt(s2)
        self.unit_ws = v * np.sqrt(np.maximum(1.0 - s2 / ev, 0.0))  # [d, k] float64, columns of norm <= 1
        self._ws = (self.unit_ws / np.sqrt(self.kappa)).astype(np.float32)
        self._q = np.float32(1.0 / self.kappa)

    def whiten(self, g: np.ndarray) -> np.ndarray:
        """``z`` of the rows ``g = f - mu`` ``[N, d]``."""
        return g * np.float32(self._scale) + matmul(matmul(g, self._v) * self._coef.astype(np.float32), self._v.T)

    def fold(self, a: np.ndarray) -> np.ndarray:
        """``S^(-1/2) a / sqrt(d)`` for columns ``a`` ``[d, K]`` (float64): ``g`` times it is ``z`` times ``a``."""
        a = np.asarray(a, np.float64)
        return a * self._scale + self._v64 @ (self._coef[:, None] * (self._v64.T @ a))

    def sqnorm(self, g: np.ndarray) -> np.ndarray:
        """``|z|^2`` of the rows ``g = f - mu`` (float32)."""
        y = matmul(g, self._ws)
        return self._q * np.einsum("ij,ij->i", g, g) - np.einsum("ij,ij->i", y, y)


def group_sums(index: np.ndarray, v: np.ndarray, groups: int) -> np.ndarray:
    """Row sums of ``v`` per group ``index``: ``[groups, width]`` float64 (``np.add.at`` is slow)."""
    out = np.zeros((groups, v.shape[1]))
    for g in np.unique(index):
        out[g] = v[index == g].sum(0, dtype=np.float64)
    return out


def unit_rows(x: np.ndarray) -> np.ndarray:
    """``x`` with every row scaled to unit L2 norm (zero rows stay zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def hadamard_rows(rows: int, dim: int, seed: int) -> np.ndarray:
    """``rows`` distinct rows of the ``dim x dim`` Sylvester-Hadamard matrix, random column signs (int8 +-1)."""
    rng = np.random.default_rng(seed)
    r = rng.choice(dim, size=rows, replace=False).astype(np.int64)
    a = r[:, None] & np.arange(dim, dtype=np.int64)[None, :]  # H[i, j] = (-1)^popcount(i & j)
    for shift in (32, 16, 8, 4, 2, 1):
        a ^= a >> shift
    signs = rng.choice(np.array([-1, 1], np.int8), size=dim)
    return (1 - 2 * (a & 1)).astype(np.int8) * signs
