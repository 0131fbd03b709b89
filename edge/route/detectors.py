"""The OOD detector interface, its registry, the metrics, and four baselines (MSP, energy,
Mahalanobis, kNN); the HDC detector is in :mod:`edge.route.hdc`.

Every detector has one interface (numpy only)::

    det = DETECTORS.get("hdc")()                          # or make_detector("knn", k=1)
    det.fit(features, logits, labels, domains)            # in-distribution data
    det.calibrate(features_held_out, logits_held_out)     # threshold at 95 % true-positive rate
    det.is_ood(features, logits)                          # bool per input
    det.update(features, logits, labels, domains)         # incremental; recalibrates

``score`` is higher for in-distribution inputs (ID is the positive class in
:func:`auroc` and :func:`fpr_at_tpr`). ``features`` are ``[N, d]`` (e.g. the pooled
layers of :mod:`edge.route.taps`), ``logits`` ``[N, C]``; ``labels`` default to the argmax of
the logits and ``domains`` (integer ids) to one domain. Import :mod:`edge.route.ood` to have
every built-in detector registered.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from edge.errors import ConfigError
from edge.registry import Registry
from edge.route.linalg import matmul, unit_rows, whitener

__all__ = [
    "DETECTORS",
    "Detector",
    "Energy",
    "KNN",
    "MSP",
    "Mahalanobis",
    "as_matrix",
    "auroc",
    "check_inputs",
    "fpr_at_tpr",
    "make_detector",
    "threshold_at_tpr",
]

#: OOD detectors by name; each entry is a class taking keyword options.
DETECTORS: Registry[type] = Registry("OOD detector")


def make_detector(name: str, **options) -> Detector:
    """A fresh detector ``name`` (see :data:`DETECTORS`) with its options."""
    return DETECTORS.get(name)(**options)


# -- metrics ------------------------------------------------------------------------------
def auroc(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """Area under the ROC curve with ID as the positive class (ties count one half)."""
    a, b = np.asarray(id_scores, np.float64).ravel(), np.asarray(ood_scores, np.float64).ravel()
    if not a.size or not b.size:
        raise ConfigError(f"auroc needs scores of both classes, got {a.size} ID and {b.size} OOD")
    s = np.concatenate([a, b])
    _, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)  # average rank of each distinct value (1-based)
    ranks = (upper - (counts - 1) / 2.0)[inv]
    return float((ranks[: a.size].sum() - a.size * (a.size + 1) / 2.0) / (a.size * b.size))


def threshold_at_tpr(id_scores: np.ndarray, tpr: float = 0.95) -> float:
    """The largest threshold keeping at least ``tpr`` of ``id_scores`` at or above it."""
    if not 0.0 < tpr <= 1.0:
        raise ConfigError(f"tpr must be in (0, 1], got {tpr}")
    s = np.sort(np.asarray(id_scores, np.float64).ravel())
    if not s.size:
        raise ConfigError("cannot calibrate on zero in-distribution scores; pass held-out ID data")
    if np.isnan(s[-1]):  # sorted: NaNs last
        raise ConfigError(f"{int(np.isnan(s).sum())} of {s.size} ID scores are NaN; calibrate on finite features")
    return float(s[int(np.floor((1.0 - tpr) * s.size + 1e-9))])


def fpr_at_tpr(id_scores: np.ndarray, ood_scores: np.ndarray, tpr: float = 0.95) -> float:
    """Fraction of OOD inputs accepted as ID at the threshold keeping ``tpr`` of ID (FPR95 by default)."""
    t = threshold_at_tpr(id_scores, tpr)
    return float((np.asarray(ood_scores, np.float64) >= t).mean())


# -- interface ----------------------------------------------------------------------------
class Detector(ABC):
    """Fit on ID data, score (higher = in-distribution), calibrate a threshold, update incrementally."""

    name = ""  # features and logits are always passed; each detector reads what it needs

    def __init__(self) -> None:
        self.threshold: float | None = None
        self.tpr = 0.95
        self._cal: tuple[np.ndarray, np.ndarray] | None = None

    def fit(self, features, logits, labels=None, domains=None) -> Detector:
        """Forget everything and learn ID statistics from these inputs."""
        f, lg, y, d = check_inputs(features, logits, labels, domains)
        self.width = f.shape[1]
        self._fit(f, lg, y, d)
        self.threshold, self._cal = None, None
        return self

    def update(self, features, logits, labels=None, domains=None) -> None:
        """Add ID inputs to the statistics (prototypes, means, bank); recalibrates if calibrated."""
        f, lg, y, d = check_inputs(features, logits, labels, domains)
        if type(self)._fit is not Detector._fit:  # stateful: fitted, on features this wide (MSP, energy need no fit)
            self._features(f)
        self._update(f, lg, y, d)
        if self._cal is not None:
            self.threshold = threshold_at_tpr(self.score(*self._cal), self.tpr)

    @abstractmethod
    def score(self, features, logits) -> np.ndarray:
        """One score per input; higher means more in-distribution."""

    def calibrate(self, features, logits, tpr: float = 0.95) -> float:
        """Set the threshold so that ``tpr`` of these held-out ID inputs are accepted; kept for recalibration."""
        f, lg = as_matrix(features, "features"), as_matrix(logits, "logits")
        self.tpr, self._cal = tpr, (f, lg)
        self.threshold = threshold_at_tpr(self.score(f, lg), tpr)
        return self.threshold

    def is_ood(self, features, logits) -> np.ndarray:
        if self.threshold is None:
            raise ConfigError(f"detector {self.name!r} is not calibrated; call calibrate(held-out ID data) first")
        return ~(self.score(features, logits) >= self.threshold)  # a NaN score (non-finite input) is OOD

    def _features(self, features) -> np.ndarray:
        """``features`` as a matrix of the width the detector was fitted on (a ConfigError otherwise)."""
        f = as_matrix(features, "features")
        width = getattr(self, "width", None)
        if width is None:
            raise ConfigError(f"detector {self.name!r} is not fitted; call fit(features, logits, ...) first")
        if f.shape[1] != width:
            raise ConfigError(f"features are {f.shape[1]} wide but detector {self.name!r} was fitted on {width}")
        return f

    def _fit(self, f, lg, y, d) -> None:  # stateless detectors need nothing
        pass

    def _update(self, f, lg, y, d) -> None:
        pass


def as_matrix(a, what: str) -> np.ndarray:
    """``a`` as a non-empty float32 ``[N, dim]`` array; ``what`` names it in the error."""
    a = np.asarray(a, np.float32)
    if a.ndim != 2 or not a.shape[0]:
        raise ConfigError(f"{what} must be a non-empty [N, dim] array, got shape {a.shape}")
    return a


def check_inputs(features, logits, labels=None, domains=None):
    """Validated ``(features, logits, labels, domains)``: labels default to the logits' argmax, domains to 0."""
    f, lg = as_matrix(features, "features"), as_matrix(logits, "logits")
    for a, what in ((f, "feature"), (lg, "logit")):
        bad = ~np.isfinite(a).all(1)
        if bad.any():
            raise ConfigError(
                f"{int(bad.sum())} of {len(a)} {what} rows hold NaN or inf (first row {int(bad.argmax())}); "
                "fit and update on finite inputs only"
            )
    if len(f) != len(lg):
        raise ConfigError(f"{len(f)} feature rows but {len(lg)} logit rows; pass both for the same inputs")
    y = lg.argmax(1) if labels is None else np.asarray(labels, np.int64).ravel()
    d = np.zeros(len(f), np.int64) if domains is None else np.asarray(domains, np.int64).ravel()
    if len(y) != len(f) or len(d) != len(f):
        raise ConfigError(f"labels ({len(y)}) and domains ({len(d)}) must have one entry per input ({len(f)})")
    if (y < 0).any() or (d < 0).any():
        raise ConfigError("labels and domains must be non-negative integers")
    return f, lg, y, d


# -- logit baselines -------------------------------------------------------------------------
@DETECTORS.register("msp")
class MSP(Detector):
    """Maximum softmax probability (Hendrycks & Gimpel)."""

    name = "msp"

    def score(self, features, logits):
        z = as_matrix(logits, "logits").astype(np.float64)
        z = z - z.max(1, keepdims=True)
        return 1.0 / np.exp(z).sum(1)  # max softmax = exp(0) / sum


@DETECTORS.register("energy")
class Energy(Detector):
    """Negative free energy ``T * logsumexp(logits / T)`` (Liu et al.)."""

    name = "energy"

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def score(self, features, logits):
        z = as_matrix(logits, "logits").astype(np.float64) / self.temperature
        m = z.max(1)
        return self.temperature * (m + np.log(np.exp(z - m[:, None]).sum(1)))


# -- feature baselines -----------------------------------------------------------------------
class _GroupStats:
    """Running per-group sums and one global second moment: pooled within-group covariance on demand."""

    def __init__(self, dim: int) -> None:
        self.keys: dict[tuple[int, int], int] = {}
        self.sums = np.zeros((0, dim))
        self.counts = np.zeros(0)
        self.second = np.zeros((dim, dim))

    def add(self, f: np.ndarray, keys: list[tuple[int, int]]) -> np.ndarray:
        rows = np.array([self.keys.setdefault(k, len(self.keys)) for k in keys], np.int64)
        grow = len(self.keys) - len(self.counts)
        if grow:
            self.sums = np.vstack([self.sums, np.zeros((grow, self.sums.shape[1]))])
            self.counts = np.concatenate([self.counts, np.zeros(grow)])
        x = f.astype(np.float64)
        np.add.at(self.sums, rows, x)
        np.add.at(self.counts, rows, 1.0)
        self.second += x.T @ x
        return rows

    def means(self) -> np.ndarray:
        return self.sums / self.counts[:, None]

    def covariance(self) -> np.ndarray:
        m = self.means()
        return (self.second - (m * self.counts[:, None]).T @ m) / self.counts.sum()


@DETECTORS.register("mahalanobis")
class Mahalanobis(Detector):
    """Minimum Mahalanobis distance to a class mean under one shared covariance (Lee et al.).

    Class means per (domain, class); the shared within-class covariance is
    eigen-floored at ``floor`` times its largest eigenvalue (pooled LayerNorm
    features are rank-deficient). Updates add to running sums (exact).
    """

    name = "mahalanobis"

    def __init__(self, floor: float = 1e-6) -> None:
        super().__init__()
        self.floor = float(floor)

    def _fit(self, f, lg, y, d):
        self._stats = _GroupStats(f.shape[1])
        self._update(f, lg, y, d)

    def _update(self, f, lg, y, d):
        self._stats.add(f, list(zip(d.tolist(), y.tolist())))
        self._w = whitener(self._stats.covariance(), self.floor)
        self._m = (self._stats.means() @ self._w).astype(np.float32)
        self._m2 = (self._m**2).sum(1)

    def score(self, features, logits):
        z = matmul(self._features(features), self._w)
        dist = (z**2).sum(1)[:, None] - 2.0 * matmul(z, self._m.T) + self._m2
        return -dist.min(1)


@DETECTORS.register("knn")
class KNN(Detector):
    """Cosine similarity to the ``k``-th nearest ID feature (Sun et al.), features L2-normalised.

    Updates append to the bank; beyond ``max_bank`` entries, reservoir sampling keeps
    a uniform sample of everything seen.
    """

    name = "knn"

    def __init__(self, k: int = 1, max_bank: int = 20000, seed: int = 0) -> None:
        super().__init__()
        if k < 1 or max_bank < k:
            raise ConfigError(f"need 1 <= k <= max_bank, got k={k}, max_bank={max_bank}")
        self.k, self.max_bank = int(k), int(max_bank)
        self._rng = np.random.default_rng(seed)

    def _fit(self, f, lg, y, d):
        self._bank = np.zeros((0, f.shape[1]), np.float32)
        self._seen = 0
        self._update(f, lg, y, d)

    def _update(self, f, lg, y, d):
        for row in unit_rows(f):
            self._seen += 1
            if len(self._bank) < self.max_bank:
                self._bank = np.vstack([self._bank, row[None]]) if len(self._bank) else row[None].copy()
            else:
                j = int(self._rng.integers(self._seen))
                if j < self.max_bank:
                    self._bank[j] = row

    def score(self, features, logits):
        sims = matmul(unit_rows(self._features(features)), self._bank.T)
        k = min(self.k, sims.shape[1])
        return np.partition(sims, sims.shape[1] - k, axis=1)[:, sims.shape[1] - k]
