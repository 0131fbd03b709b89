"""Update methods for :mod:`edge.learn.update`: a registry of numpy-only learners over encoder features.

A method is a :class:`Method` subclass registered in :data:`METHODS`: a frozen
``Config`` (its options), the state tensors it starts from, a pure ``fit`` that
returns new state tensors (the :class:`~edge.learn.update.Updater` commits them only when
the update stayed within its memory budget), ``scores`` for prediction, and
estimates of the memory its state and one update take. Add a method with one new
class and ``@METHODS.register("name")``; the tests fail until it has a test case.

* ``ncm``: nearest class mean by cosine; state = class sums and counts.
* ``slda``: streaming LDA: class means plus one shared covariance, shrunk towards
  a scaled identity; state = class sums, counts and the raw second moment.
* ``ranpac``: RanPAC-style ridge head on ``M`` random ReLU features
  (``G += H^T H``, ``Q += H^T Y``, ``W = (G + lambda I)^-1 Q``); lambda is chosen
  on a held-out split of each update's samples. ``M`` is bounded by the budget.
* ``shira-head`` (:mod:`edge.learn.shira_head`): SHiRA entries of the model's head.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

import numpy as np

from edge.errors import ConfigError
from edge.registry import Registry

__all__ = [
    "DEFAULT_MEMORY_MB",
    "METHODS",
    "Context",
    "Method",
    "NearestClassMean",
    "RanPAC",
    "StreamingLDA",
    "config_dict",
    "make_config",
    "softmax",
]

DEFAULT_MEMORY_MB = 64.0
MB = float(1 << 20)

#: Update methods by name: a :class:`Method` subclass per entry.
METHODS: Registry[type] = Registry("update method")


@dataclass(frozen=True)
class Context:
    """What a method may know about the model: feature size and, for head methods, the head."""

    dim: int
    head_weight: np.ndarray | None = None  # [C, dim] float32, current weights of the head
    head_name: str | None = None


class Method(ABC):
    """An update method: configuration, state tensors, a pure ``fit`` and ``scores``.

    ``fit`` returns new state tensors and leaves ``self`` unchanged; the
    :class:`Updater` commits them only when the update stayed within budget.
    """

    name: str = ""
    #: True: labels are prototypes, one per (domain, class); the Updater maps them back to classes.
    per_domain: bool = True

    @dataclass(frozen=True)
    class Config:
        pass

    def __init__(self, config: Config, ctx: Context, budget_mb: float = DEFAULT_MEMORY_MB) -> None:
        self.config, self.ctx = config, ctx
        self._cache: object = None
        if self.state_bytes() > budget_mb * MB:
            raise ConfigError(
                f"a {self.name} state with these options takes {self.state_bytes() / MB:.1f} MB, over the memory "
                f"budget of {budget_mb:g} MB; {self.advice(0, 0, budget_mb)}"
            )
        self.tensors: dict[str, np.ndarray] = self.initial()

    def commit(self, tensors: dict[str, np.ndarray]) -> None:
        self.tensors, self._cache = tensors, None

    @property
    def counts(self) -> np.ndarray:
        return self.tensors["counts"]

    @abstractmethod
    def initial(self) -> dict[str, np.ndarray]:
        """State tensors before any sample."""

    def state_bytes(self) -> int:
        """Bytes of the state before any sample (checked against the budget before it is allocated)."""
        return 0

    @abstractmethod
    def estimate_bytes(self, n: int, classes: int) -> int:
        """Upper estimate of the extra bytes an update of ``n`` samples over ``classes`` classes allocates."""

    @abstractmethod
    def fit(self, f: np.ndarray, y: np.ndarray, logits: np.ndarray | None, seed: int) -> dict[str, np.ndarray]:
        """New state tensors after learning features ``f [n, dim]`` with labels ``y [n]``."""

    @abstractmethod
    def scores(self, f: np.ndarray) -> np.ndarray:
        """Scores ``[n, labels]`` per label the method was given (for per-domain methods, a prototype id)."""

    def check_labels(self, y: np.ndarray) -> None:
        """Raise :class:`ConfigError` for labels the method cannot learn."""

    def advice(self, n: int, classes: int, budget_mb: float) -> str:
        """How to make an update of ``n`` samples fit ``budget_mb`` (for error messages)."""
        return "update from fewer samples at a time (several partial_fit calls), or raise memory_mb"


# -- helpers shared by the methods -------------------------------------------------------------
def _grow(a: np.ndarray, classes: int, axis: int = 0) -> np.ndarray:
    """``a`` padded with zeros along ``axis`` to ``classes`` entries."""
    if a.shape[axis] >= classes:
        return a
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, classes - a.shape[axis])
    return np.pad(a, pad)


def _class_sums(f: np.ndarray, y: np.ndarray, classes: int) -> tuple[np.ndarray, np.ndarray]:
    sums = np.zeros((classes, f.shape[1]), np.float64)
    np.add.at(sums, y, f.astype(np.float64, copy=False))
    return sums, np.bincount(y, minlength=classes).astype(np.int64)


def _mask_unseen(s: np.ndarray, counts: np.ndarray) -> np.ndarray:
    s[:, counts == 0] = -np.inf
    return s


@METHODS.register("ncm")
class NearestClassMean(Method):
    """Nearest class mean by cosine similarity."""

    name = "ncm"

    def initial(self):
        return {"sums": np.zeros((0, self.ctx.dim)), "counts": np.zeros(0, np.int64)}

    def estimate_bytes(self, n, classes):
        return 8 * (3 * classes * self.ctx.dim + 2 * n * self.ctx.dim)

    def fit(self, f, y, logits, seed):
        k = max(int(y.max()) + 1, self.counts.size)
        sums, counts = _class_sums(f, y, k)
        return {"sums": _grow(self.tensors["sums"], k) + sums, "counts": _grow(self.counts, k) + counts}

    def scores(self, f):
        if self._cache is None:
            mu = self.tensors["sums"] / np.maximum(self.counts, 1)[:, None]
            self._cache = mu / np.maximum(np.linalg.norm(mu, axis=1, keepdims=True), 1e-12)
        fn = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
        return _mask_unseen(fn @ self._cache.T, self.counts)


@METHODS.register("slda")
class StreamingLDA(Method):
    """Streaming LDA: running class means and one shared covariance with shrinkage.

    Predicts with ``Lambda = inv((1 - s) Sigma + s * (tr(Sigma) / d) I)``: score
    ``mu_c Lambda f - mu_c Lambda mu_c / 2``. The statistics are sums, so the order
    of updates does not matter.
    """

    name = "slda"

    @dataclass(frozen=True)
    class Config:
        shrinkage: float = 0.05  # towards a scaled identity, in [0, 1]

        def __post_init__(self):
            if not 0.0 <= self.shrinkage <= 1.0:
                raise ConfigError(f"slda shrinkage must be in [0, 1], got {self.shrinkage}")

    def initial(self):
        d = self.ctx.dim
        return {"sums": np.zeros((0, d)), "counts": np.zeros(0, np.int64), "second": np.zeros((d, d))}

    def estimate_bytes(self, n, classes):
        d = self.ctx.dim
        return 8 * (3 * classes * d + 2 * n * d + 6 * d * d)

    def fit(self, f, y, logits, seed):
        k = max(int(y.max()) + 1, self.counts.size)
        sums, counts = _class_sums(f, y, k)
        f64 = f.astype(np.float64, copy=False)
        return {
            "sums": _grow(self.tensors["sums"], k) + sums,
            "counts": _grow(self.counts, k) + counts,
            "second": self.tensors["second"] + f64.T @ f64,
        }

    def scores(self, f):
        if self._cache is None:
            counts, d = self.counts, self.ctx.dim
            n = max(int(counts.sum()), 1)
            mu = self.tensors["sums"] / np.maximum(counts, 1)[:, None]
            within = (self.tensors["second"] - (mu * counts[:, None]).T @ mu) / n
            s = self.config.shrinkage
            scale = max(float(np.trace(within)) / d, 1e-12)
            prec = np.linalg.pinv((1 - s) * within + s * scale * np.eye(d), hermitian=True)
            w = mu @ prec
            self._cache = (w, -0.5 * np.einsum("cd,cd->c", w, mu))
        w, b = self._cache
        return _mask_unseen(f.astype(np.float64) @ w.T + b, self.counts)


@METHODS.register("ranpac")
class RanPAC(Method):
    """Ridge head on ``M`` random ReLU features of the encoder's features (RanPAC, arXiv 2307.02251)."""

    name = "ranpac"
    CHUNK = 256

    @dataclass(frozen=True)
    class Config:
        features: int = 512  # M, the random-feature count; memory and time grow as M^2 and M^3
        seed: int = 0
        holdout: float = 0.2  # share of each update's samples used to choose lambda
        lambdas: tuple[float, ...] = tuple(10.0**e for e in range(-5, 3))  # times mean(diag(G))

        def __post_init__(self):
            if not 1 <= self.features <= 1 << 16:
                raise ConfigError(f"ranpac features (M) must be in [1, 65536], got {self.features}")
            if not 0.0 < self.holdout < 1.0:
                raise ConfigError(f"ranpac holdout must be in (0, 1), got {self.holdout}")
            if not self.lambdas or min(self.lambdas) <= 0:
                raise ConfigError(f"ranpac lambdas must be positive, got {self.lambdas}")
            object.__setattr__(self, "lambdas", tuple(float(x) for x in self.lambdas))

    def initial(self):
        m, d = self.config.features, self.ctx.dim
        rng = np.random.default_rng(self.config.seed)
        proj = (rng.standard_normal((d, m)) / np.sqrt(d)).astype(np.float32)
        return {
            "proj": proj,
            "gram": np.zeros((m, m)),
            "q": np.zeros((m, 0)),
            "counts": np.zeros(0, np.int64),
            "lam": np.array(1.0),
        }

    def state_bytes(self):
        m = self.config.features
        return 8 * m * m + 4 * self.ctx.dim * m

    def estimate_bytes(self, n, classes):
        m = self.config.features
        # new gram + eigenvectors + LAPACK workspace + solve copy, random features, Q and the solution
        return 8 * (5 * m * m + 2 * n * m + 4 * m * classes)

    def advice(self, n, classes, budget_mb):
        for cand in (4096, 2048, 1024, 512, 256, 128):
            if cand >= self.config.features:
                continue
            probe = RanPAC.__new__(RanPAC)  # the estimates only read config and ctx
            probe.config, probe.ctx = RanPAC.Config(features=cand), self.ctx
            need = max(probe.state_bytes(), probe.estimate_bytes(n, classes) + n * (self.ctx.dim + classes) * 4)
            if need <= budget_mb * MB:
                return f"lower ranpac features (M={self.config.features}) to {cand} or less, or raise memory_mb"
        return super().advice(n, classes, budget_mb)

    def _features(self, f: np.ndarray) -> np.ndarray:
        return np.maximum(f.astype(np.float32, copy=False) @ self.tensors["proj"], 0).astype(np.float64)

    def _accumulate(self, gram, q, f, y):
        for i in range(0, len(f), self.CHUNK):
            h = self._features(f[i : i + self.CHUNK])
            gram += h.T @ h
            np.add.at(q.T, y[i : i + self.CHUNK], h)  # q += h^T onehot(y)

    def fit(self, f, y, logits, seed):
        k = max(int(y.max()) + 1, self.counts.size)
        gram = self.tensors["gram"].copy()
        q = _grow(self.tensors["q"], k, axis=1).copy()
        lam = float(self.tensors["lam"])
        rng = np.random.default_rng([self.config.seed, seed])
        order = rng.permutation(len(f))
        n_hold = int(round(self.config.holdout * len(f)))
        if n_hold >= 2 and len(f) - n_hold >= 2:
            hold, train = order[:n_hold], order[n_hold:]
            self._accumulate(gram, q, f[train], y[train])
            lam = self._choose_lambda(gram, q, self._features(f[hold]), y[hold])
            self._accumulate(gram, q, f[hold], y[hold])
        else:  # too few samples to hold any out: keep the previous lambda
            self._accumulate(gram, q, f, y)
        counts = _grow(self.counts, k) + np.bincount(y, minlength=k)
        return {**self.tensors, "gram": gram, "q": q, "counts": counts, "lam": np.array(lam)}

    def _choose_lambda(self, gram, q, h_hold, y_hold) -> float:
        """The ridge factor with the best held-out accuracy (ties: lower squared error)."""
        scale = max(float(np.trace(gram)) / gram.shape[0], 1e-12)
        evals, evecs = np.linalg.eigh(gram)
        proj_q = evecs.T @ q
        h_rot = h_hold @ evecs
        onehot = np.eye(q.shape[1])[y_hold]
        best = None
        for a in self.config.lambdas:
            s = h_rot @ (proj_q / (evals + a * scale)[:, None])
            key = (-(s.argmax(1) == y_hold).mean(), float(((s - onehot) ** 2).mean()))
            if best is None or key < best[0]:
                best = (key, a * scale)
        return best[1]

    def scores(self, f):
        if self._cache is None:
            g = self.tensors["gram"] + float(self.tensors["lam"]) * np.eye(self.config.features)
            self._cache = np.linalg.solve(g, self.tensors["q"]) if self.tensors["q"].size else self.tensors["q"]
        return _mask_unseen(self._features(f) @ self._cache, self.counts)


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def make_config(cls, options: Mapping[str, object]):
    """The method's ``Config`` from keyword options; unknown names raise :class:`ConfigError`."""
    known = {f.name for f in fields(cls.Config)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(
            f"unknown option(s) {unknown} for update method {cls.name!r}; known: {sorted(known) or 'none'}"
        )
    try:
        return cls.Config(**options)
    except TypeError as e:
        raise ConfigError(f"bad option for update method {cls.name!r}: {e}") from e


def config_dict(config) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
