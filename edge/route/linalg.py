"""Small numpy kernels shared by the OOD detectors (:mod:`edge.route.detectors`, :mod:`edge.route.hdc`)."""

from __future__ import annotations

import numpy as np

__all__ = ["group_sums", "matmul", "unit_rows", "whitener"]

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


def group_sums(index: np.ndarray, v: np.ndarray, groups: int) -> np.ndarray:
    """Row sums of ``v`` per group ``index``: ``[groups, width]`` float64 (``np.add.at`` is slow)."""
    out = np.zeros((groups, v.shape[1]))
    for g in np.unique(index):
        out[g] = v[index == g].sum(0, dtype=np.float64)
    return out


def unit_rows(x: np.ndarray) -> np.ndarray:
    """``x`` with every row scaled to unit L2 norm (zero rows stay zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
