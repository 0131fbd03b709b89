"""Shallow on-device updates without autograd: numpy only, on a frozen encoder's features.

    rt = Runtime("encoder.onnx")
    up = Updater(rt, "slda", memory_mb=64)      # or Updater.load("state.safetensors", rt)
    report = up.partial_fit(x, y)               # labelled samples; call again to add classes or domains
    labels = up.predict(x_new)
    up.save("slda.state.safetensors")           # crash-safe, checksummed (edge.format.state)

Features are the model's ``features`` output computed by the runtime **as it is**:
with no adapter active that is the frozen base encoder; with a domain adapter
switched in, the update learns on top of that adapter's features (keep the same
adapter active when predicting).

Methods (registry :data:`METHODS`, see :mod:`edge.learn.methods`): ``ncm``,
``slda`` (the default), ``ranpac`` learn a new head over the features;
``shira-head`` (:mod:`edge.learn.shira_head`) changes the model itself, and
:meth:`Updater.to_adapter` returns its learned entries as a SHiRA adapter that
``Runtime.load_adapter``/``switch`` fuse in place.

Incremental: statistics accumulate over updates, new labels add classes, and
``partial_fit(..., domain="name")`` keeps one prototype per (domain, class) for
ncm, slda and ranpac, so a new domain does not average the earlier ones away
(predictions stay per class).

Memory: each method estimates its state and its largest allocations; an update
that would not fit ``memory_mb`` is refused up front (:class:`ConfigError`). The
update's peak extra memory is measured with :mod:`tracemalloc` (numpy reports its
buffers to it; the inference engine's own arena is not included), and an update
whose measured peak exceeds the budget is not committed.
"""

from __future__ import annotations

import contextlib
import os
import time
import tracemalloc
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edge.errors import AdapterMismatchError, ConfigError, FormatError
from edge.format.feeds import output_width as _declared_width
from edge.format.feeds import run_batched
from edge.format.samples import batch_length as _length
from edge.format.samples import check_labels as _labels
from edge.format.samples import load_samples
from edge.format.state import State, load_state, save_state, state_lock
from edge.learn import shira_head  # noqa: F401  (registers shira-head)
from edge.learn.methods import DEFAULT_MEMORY_MB, MB, METHODS, Context, Method, config_dict, make_config
from edge.learn.shira_head import ShiraHead, head_context, source_indices

__all__ = [
    "DEFAULT_MEMORY_MB",
    "METHODS",
    "Method",
    "UpdateReport",
    "Updater",
    "limit_blas_threads",
    "load_samples",
    "state_lock",
    "update",
]


@dataclass(frozen=True)
class UpdateReport:
    """What one update did and cost."""

    method: str
    samples: int
    seconds: float  # wall time of the whole update (encoder forward + statistics)
    encoder_seconds: float  # of which running the encoder for features
    peak_extra_mb: float  # peak numpy/Python memory above the start of the update (tracemalloc)
    estimate_mb: float  # the method's own estimate, checked against the budget before starting
    budget_mb: float
    classes: tuple[int, ...]  # classes the predictor knows after the update
    samples_seen: int  # over every update of this state

    def as_dict(self) -> dict:
        d = asdict(self)
        d["classes"] = list(self.classes)
        return d


# -- the updater ------------------------------------------------------------------------------
class Updater:
    """Learn from labelled samples on device, over a :class:`~edge.runtime.Runtime`'s feature output.

    ``options`` are the method's configuration (e.g. ``features=512`` for ranpac,
    ``shrinkage=0.1`` for slda); unknown names raise :class:`ConfigError`.
    """

    def __init__(
        self,
        runtime,
        method: str = "slda",
        *,
        memory_mb: float = DEFAULT_MEMORY_MB,
        feature_output: str = "features",
        logit_output: str = "logits",
        head: str = "head.weight",
        batch: int = 256,
        **options,
    ) -> None:
        self.runtime = runtime
        self.memory_mb = float(memory_mb)
        if not self.memory_mb > 0:
            raise ConfigError(f"memory_mb must be > 0, got {memory_mb}")
        if batch < 1:
            raise ConfigError(f"batch must be >= 1, got {batch}")
        self.batch = batch
        info = runtime.info
        if feature_output not in info.outputs:
            raise ConfigError(
                f"model {info.name!r} has no output {feature_output!r} to learn from (outputs: {list(info.outputs)}); "
                "export the encoder with a features output, or tap it (edge.route.taps.tap_model: output "
                "'edge.features'), and pass feature_output=NAME (edge update: --taps auto, or -o feature_output=NAME)"
            )
        self.feature_output = feature_output
        self.logit_output = logit_output if logit_output in info.outputs else None
        self.fingerprint = info.fingerprint
        cls = METHODS.get(method)
        self.method_name = method
        config = make_config(cls, options)
        self.method: Method = cls(config, self._context(cls, head), self.memory_mb)
        self.samples_seen = 0
        self.history: list[UpdateReport] = []
        self.prototypes: list[tuple[str, int]] = []  # (domain, class) per label the method sees
        self._groups: dict[int, np.ndarray] | None = None

    def _context(self, cls, head: str) -> Context:
        dim = self._feature_dim()
        if cls is not ShiraHead:
            return Context(dim)
        ctx, self._head_layout = head_context(self.runtime, head, dim, self.logit_output)
        return ctx

    def _feature_dim(self) -> int:
        """The features' width, from the model file's declared output shape (its graph only: no weight is read)."""
        from runtimes.base import model_buffer
        from runtimes.onnx_file import parse_graph_bytes

        with model_buffer(self.runtime.model_path) as (buf, _):  # regular files only: a FIFO swapped in is refused
            try:
                graph = parse_graph_bytes(buf)[0]
            except FormatError:  # not an ONNX file (a .tflite): it declares no width here
                graph = None
        dim = None if graph is None else _declared_width(graph, self.feature_output)
        if dim is None:
            raise ConfigError(
                f"output {self.feature_output!r} of {self.runtime.model_path} has no fixed width; "
                "export the model with a static feature dimension"
            )
        return dim

    # -- persistence -------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the state atomically with a checksum (see :mod:`edge.format.state`)."""
        meta = {
            "config": config_dict(self.method.config),
            "feature_output": self.feature_output,
            "head": self.method.ctx.head_name,
            "dim": self.method.ctx.dim,
            "samples_seen": self.samples_seen,
            "updates": len(self.history),
            "prototypes": [list(p) for p in self.prototypes],
        }
        return save_state(path, State(self.method_name, self.fingerprint, self.method.tensors, meta))

    @classmethod
    def load(cls, path: str | os.PathLike, runtime, *, memory_mb: float = DEFAULT_MEMORY_MB, **kwargs) -> Updater:
        """Resume from a state file; the runtime's model must be the one the state was made for."""
        st = load_state(path)
        if st.base_fingerprint != runtime.info.fingerprint:
            raise AdapterMismatchError(
                f"update state {path} belongs to model {st.base_fingerprint}, but the runtime runs "
                f"{runtime.info.fingerprint}; start a new state for this model"
            )
        meta = dict(st.meta)
        config = meta.get("config", {})
        if not isinstance(config, dict):
            config = {}
        kwargs.setdefault("feature_output", meta.get("feature_output", "features"))
        if meta.get("head"):
            kwargs.setdefault("head", meta["head"])
        up = cls(runtime, st.method, memory_mb=memory_mb, **kwargs, **config)
        fresh = up.method.tensors
        bad = [k for k, v in st.tensors.items() if v.dtype.kind == "f" and not np.isfinite(v).all()]
        if bad:
            raise FormatError(f"{path}: state tensors {bad} hold NaN or Inf; the state is damaged, start a new one")
        if set(st.tensors) != set(fresh):
            raise FormatError(f"{path}: {st.method} state holds {sorted(st.tensors)}, expected {sorted(fresh)}")
        odd = [k for k, v in st.tensors.items() if v.dtype != fresh[k].dtype or v.ndim != fresh[k].ndim]
        if odd:
            raise FormatError(f"{path}: state tensors {odd} have the wrong dtype or rank for {st.method}")
        try:
            up.prototypes = [(str(d), int(c)) for d, c in meta.get("prototypes", [])]
        except (TypeError, ValueError) as e:
            raise FormatError(f"{path}: malformed 'prototypes' in the state metadata: {e}") from e
        if up.method.per_domain and len(up.prototypes) != st.tensors["counts"].size:
            raise FormatError(f"{path}: {len(up.prototypes)} prototypes for {st.tensors['counts'].size} state rows")
        up.method.commit(dict(st.tensors))
        up.samples_seen = int(meta.get("samples_seen", 0))
        return up

    def to_adapter(self, name: str = "update", info: Mapping[str, object] | None = None):
        """The learned head entries as a SHiRA :class:`~edge.format.adapter.Adapter` (``shira-head`` only)."""
        from edge.format.adapter import Adapter, SparseDelta

        m = self.method
        if not isinstance(m, ShiraHead):
            raise ConfigError(f"only shira-head changes model weights; {self.method_name!r} is a separate head")
        if not m.counts.any():
            raise ConfigError("nothing learned yet: call partial_fit before to_adapter")
        delta = SparseDelta(source_indices(m.tensors["indices"], self._head_layout), m.tensors["values"].copy())
        meta = {"mask": "snip", "density": m.config.density, "trained_on_device": True, "samples": self.samples_seen}
        return Adapter(
            name,
            self.fingerprint,
            {m.ctx.head_name: delta},
            {m.ctx.head_name: tuple(self._head_layout[0])},
            method="shira",
            info={**meta, **dict(info or {})},
        )

    # -- learning ----------------------------------------------------------------------------
    @property
    def classes(self) -> tuple[int, ...]:
        if self.method.per_domain:
            return tuple(sorted({c for _, c in self.prototypes}))
        return tuple(int(c) for c in np.flatnonzero(self.method.counts))

    @property
    def domains(self) -> tuple[str, ...]:
        """Domains given to :meth:`partial_fit` so far (``""`` for samples given without one)."""
        return tuple(dict.fromkeys(d for d, _ in self.prototypes))

    def features(self, x) -> tuple[np.ndarray, np.ndarray | None]:
        """Run the model in chunks of ``batch`` (of its batch size, when its file fixes one: the last chunk padded with
        zeros, their rows dropped); returns (features float32 [n, d], logits or None)."""
        out = run_batched(self.runtime, self._feeds(x), self.batch)
        fs = [np.asarray(f, np.float32) for f in out.get(self.feature_output, [])]
        ls = [np.asarray(v, np.float32) for v in out.get(self.logit_output, [])] if self.logit_output else []
        f = np.concatenate(fs) if fs else np.zeros((0, self.method.ctx.dim), np.float32)
        if f.ndim != 2:
            raise ConfigError(f"output {self.feature_output!r} has shape {f.shape}; an update needs [batch, dim]")
        return f, (np.concatenate(ls) if ls else None)

    def partial_fit(self, x, y, domain: str | None = None) -> UpdateReport:
        """Learn from samples ``x`` (array, or dict of model inputs) with integer labels ``y``.

        ``domain`` names where the samples come from (a camera, a site, a season).
        ncm, slda and ranpac then keep one prototype per (domain, class), so a new
        domain adds to the earlier ones instead of averaging them away; predictions
        are per class, whatever the domain. shira-head learns one head for all.
        """
        y = _labels(y, _length(x))
        return self._update(y, domain, lambda: self.features(x))

    def partial_fit_features(
        self, features: np.ndarray, y, logits: np.ndarray | None = None, domain: str | None = None
    ) -> UpdateReport:
        """Learn from precomputed features (as :meth:`features` returns them) and labels."""
        f = np.asarray(features, np.float32)
        if f.ndim != 2:
            raise ConfigError(f"features must be [n, dim], got shape {f.shape}")
        y = _labels(y, len(f))
        return self._update(y, domain, lambda: (f, logits))

    def _targets(self, y: np.ndarray, domain: str | None) -> tuple[np.ndarray, list[tuple[str, int]]]:
        """The labels the method learns (prototype ids for per-domain methods) and the prototypes after."""
        if not self.method.per_domain:
            return y, self.prototypes
        protos = list(self.prototypes)
        index = {p: i for i, p in enumerate(protos)}
        ids = np.empty_like(y)
        for c in np.unique(y):
            key = ("" if domain is None else str(domain), int(c))
            if key not in index:
                index[key] = len(protos)
                protos.append(key)
            ids[y == c] = index[key]
        return ids, protos

    def _update(self, y: np.ndarray, domain: str | None, get_features) -> UpdateReport:
        m = self.method
        m.check_labels(y)
        y, protos = self._targets(y, domain)
        classes = max(int(y.max()) + 1, m.counts.size)
        estimate = m.estimate_bytes(len(y), classes) + len(y) * (m.ctx.dim + classes) * 4
        if estimate > self.memory_mb * MB:
            raise ConfigError(
                f"{self.method_name} update of {len(y)} samples needs about {_mb(estimate)} MB, over the "
                f"memory budget of {self.memory_mb:g} MB; {m.advice(len(y), classes, self.memory_mb)}"
            )
        with _traced() as peak:
            t0 = time.perf_counter()
            f, logits = get_features()
            t1 = time.perf_counter()
            if len(f) != len(y):
                raise ConfigError(f"got {len(f)} feature rows for {len(y)} labels")
            if f.shape[1] != m.ctx.dim:
                raise ConfigError(f"features are {f.shape[1]} wide, the state expects {m.ctx.dim}")
            if not np.all(np.isfinite(f)):
                raise ConfigError("the model produced NaN or Inf features for some samples; check the inputs")
            new = m.fit(f, y, logits, seed=len(self.history))
            t2 = time.perf_counter()
        extra = peak() / MB
        if extra > self.memory_mb:
            raise ConfigError(
                f"{self.method_name} update used {_mb(extra * MB)} MB at its peak, over the budget of "
                f"{self.memory_mb:g} MB (estimated {_mb(estimate)} MB); nothing was changed. "
                f"{m.advice(len(y), classes, self.memory_mb)}"
            )
        m.commit(new)
        self.prototypes = protos
        self._groups = None
        self.samples_seen += len(y)
        report = UpdateReport(
            self.method_name,
            len(y),
            t2 - t0,
            t1 - t0,
            extra,
            estimate / MB,
            self.memory_mb,
            self.classes,
            self.samples_seen,
        )
        self.history.append(report)
        return report

    # -- prediction --------------------------------------------------------------------------
    def scores(self, x) -> np.ndarray:
        """Class scores ``[n, max class + 1]`` (column = label; ``-inf`` for classes never seen)."""
        return self.scores_features(self.features(x)[0])

    def scores_features(self, f: np.ndarray) -> np.ndarray:
        if not self.method.counts.any():
            raise ConfigError("nothing learned yet: call partial_fit first")
        s = self.method.scores(np.asarray(f, np.float32))
        if not self.method.per_domain:
            return s
        if self._groups is None:  # class -> its prototypes' columns
            groups: dict[int, list[int]] = {}
            for i, (_, c) in enumerate(self.prototypes):
                groups.setdefault(c, []).append(i)
            self._groups = {c: np.asarray(ids) for c, ids in groups.items()}
        out = np.full((len(s), max(self._groups) + 1), -np.inf, s.dtype)
        for c, ids in self._groups.items():
            out[:, c] = s[:, ids].max(axis=1)
        return out

    def predict(self, x) -> np.ndarray:
        return self.predict_features(self.features(x)[0])

    def predict_features(self, f: np.ndarray) -> np.ndarray:
        return self.scores_features(f).argmax(axis=1)

    # -- helpers -----------------------------------------------------------------------------
    def _feeds(self, x) -> dict[str, np.ndarray]:
        inputs = self.runtime.info.inputs
        if isinstance(x, Mapping):
            missing = [k for k in inputs if k not in x]
            if missing:
                raise ConfigError(f"missing model input(s) {missing}; the model takes {list(inputs)}")
            return {k: np.asarray(x[k]) for k in inputs}
        if len(inputs) != 1:
            raise ConfigError(f"model takes inputs {list(inputs)}; pass a dict of them")
        return {inputs[0]: np.asarray(x)}


def update(
    runtime,
    x,
    y,
    *,
    method: str = "slda",
    state: str | os.PathLike | None = None,
    memory_mb: float = DEFAULT_MEMORY_MB,
    domain: str | None = None,
    **options,
) -> tuple[Updater, UpdateReport]:
    """One update: resume ``state`` if the file exists (else start ``method``), learn, save back to ``state``."""
    with state_lock(state):  # two writers of one state take turns: nothing is lost
        if state is not None and Path(state).exists():
            up = Updater.load(state, runtime, memory_mb=memory_mb)
            if up.method_name != method:
                raise ConfigError(f"state {state} holds a {up.method_name!r} update, not {method!r}; pick another path")
        else:
            up = Updater(runtime, method, memory_mb=memory_mb, **options)
        report = up.partial_fit(x, y, domain=domain)
        if state is not None:
            up.save(state)
    return up, report


@contextlib.contextmanager
def limit_blas_threads(n: int | None) -> Iterator[str]:
    """Limit numpy's BLAS/OpenMP threads to ``n`` (threadpoolctl when installed). Yields what was done."""
    if n is None:
        yield "default"
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield f"unlimited (install threadpoolctl, or set OPENBLAS_NUM_THREADS={n} OMP_NUM_THREADS={n})"
        return
    with threadpool_limits(limits=n):
        yield f"{n} (threadpoolctl)"


# -- private helpers ------------------------------------------------------------------------------
@contextlib.contextmanager
def _traced():
    """Measure peak traced memory above the current level; yields a function returning bytes."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    result = {"peak": 0}
    try:
        yield lambda: result["peak"]
    finally:
        result["peak"] = max(0, tracemalloc.get_traced_memory()[1] - base)
        if started:
            tracemalloc.stop()


def _mb(n: float) -> str:
    """``n`` bytes in MB, with the digits a small figure needs (0.000095, not 0.0 or 9.5e-05)."""
    if n >= 0.1 * MB:
        return f"{n / MB:.1f}"
    return np.format_float_positional(n / MB, precision=2, fractional=False).rstrip(".")
