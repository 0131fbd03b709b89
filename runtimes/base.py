"""The backend contract: load, run, and the sparse weight write that fused switching needs.

Everything crossing this boundary is numpy. Native handles (IOBinding, sessions,
interpreters, delegates) stay inside the backend.
"""

from __future__ import annotations

import os
import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from edge.errors import BackendUnavailableError
from edge.format.modelinfo import ModelInfo
from edge.registry import Registry
from runtimes.lines import compile_write, fold_narrow, merge_positions, share_positions
from runtimes.loading import model_buffer, rss_mb, trim_heap
from runtimes.rebuilds import Rebuilds

__all__ = [
    "ArenaBackend",
    "ArenaWrite",
    "Backend",
    "BackendOptions",
    "BACKENDS",
    "SMALL_MODEL_BYTES",
    "WeightWrite",
    "model_buffer",
    "rss_mb",
    "trim_heap",
]


#: a model whose file (or bytes, as given) is smaller than this runs on one thread, on either backend, unless
#: ``threads`` is given: handing a run of a few microseconds to a second thread costs more than it saves. Plain
#: sessions on 2 cores, load 4.7-5, 1 thread against 2: digits CNN 3.6 against 6.2 us (LiteRT), 8.1 against 10.1
#: (onnxruntime); digits ViT 22 against 32 us (LiteRT), onnxruntime 1.10-1.14x faster on 1 (fp32 and int8). The
#: demo models are 23-413 KB, MiniLM 24-90 MB: the boundary between was not measured
SMALL_MODEL_BYTES = 1 << 20


@dataclass(frozen=True)
class BackendOptions:
    """What the caller (or a device profile) asks of a backend."""

    threads: int | None = None  # intra-op threads; None = the backend's default (all cores; 1 for a tiny model)
    strategy: str = "auto"  # how weight writes reach the kernels; see each backend's STRATEGIES
    providers: tuple[str, ...] = ()  # execution providers / delegates in order of preference; () = CPU
    provider_options: tuple[Mapping[str, str], ...] = ()  # one dict per provider, aligned with ``providers``
    verify: bool = True  # check the weights' fingerprint against the model's metadata at load
    device: str | None = None  # the device profile these options came from, if any
    fallback_warning: str | None = None  # what the profile's fallback policy dropped, if anything
    rebuild_delay_ms: float = 2.0  # hybrid: debounce between a write and the background rebuild
    memory_mb: float | None = None  # memory budget: strategy "auto" picks what the model's predicted footprint fits
    precision: str = "any"  # "fp32" or "int8": the model precision the device runs (NPUs: int8 only); "any"
    dims: Mapping[str, int] | None = None  # named input dimensions fixed to sizes in every session (edge.dims)

    def __post_init__(self) -> None:
        from edge.machine import check_threads

        check_threads(self.threads)
        if self.dims:
            from edge.dims import check_dims

            check_dims(self.dims)


@dataclass(frozen=True)
class WeightWrite:
    """Overwrite ``values`` at flat positions ``index`` of stored tensor ``tensor`` (stored layout)."""

    tensor: str
    index: np.ndarray | None  # int64, flat positions in the stored tensor; None: the whole tensor, in order
    values: np.ndarray  # same dtype as the stored tensor


class Backend(ABC):
    """One inference engine holding one model whose weights can be rewritten in place."""

    name: str = ""
    STRATEGIES: tuple[str, ...] = ()
    DEFAULT_STRATEGY: str = ""
    TAKES_DIMS = False  # BackendOptions.dims honoured in every session; a backend without refuses them (ConfigError)

    info: ModelInfo  # read from the model file by the backend

    @abstractmethod
    def __init__(self, model: bytes | str | os.PathLike, options: BackendOptions) -> None:
        """Load ``model`` (the file bytes, or its path: a backend may then stream the weights without
        holding the whole file) and its :class:`ModelInfo`; verify its fingerprint.

        Every stored tensor named in ``info.tensors`` must be writable afterwards.
        Raises :class:`~edge.errors.FormatError` for an unreadable or tampered file.
        """

    @abstractmethod
    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run once; returns the outputs named in ``outputs`` (names of :attr:`output_names`, checked by the
        caller), or every model output (``None``), by name. Safe to call from several threads. A backend with
        ``CHECKS_FEEDS = True`` takes ``run(feeds, outputs, check)``: the caller hands it unchecked feeds and it
        calls ``check(feeds)`` on any its fast path does not take exactly as the check would pass them."""

    @property
    def output_names(self) -> list[str]:
        """The model's outputs, in order (what :meth:`run` returns with ``outputs=None``)."""
        return list(self.info.outputs)

    @abstractmethod
    def read(self, tensor: str) -> np.ndarray:
        """The current contents of a writable stored tensor (read-only view; do not modify)."""

    def constant(self, tensor: str) -> np.ndarray:
        """A constant tensor the metadata names, never written: a quantized target's scale or zero point."""
        from edge.errors import FormatError

        raise FormatError(f"the {self.name} backend does not serve quantized models (asked for {tensor!r})")

    def check_precision(self, options: BackendOptions) -> None:
        """Refuse a model whose weights are not of the precision ``options`` asks for (a device profile's)."""
        from edge.errors import ConfigError

        quantized = any(t.quant is not None for t in self.info.tensors.values())
        want, got = options.precision, "int8" if quantized else "fp32"
        if want not in ("any", "fp32", "int8"):
            raise ConfigError(f"precision {want!r} is unknown; allowed: any, fp32, int8")
        if want != "any" and want != got:
            raise ConfigError(
                f"{options.device or 'this device'} runs {want} models, but {self.info.name!r} is {got}; "
                + (
                    "quantize it (exporters.quantize_onnx; exporters.quantize_tflite for .tflite)"
                    if want == "int8"
                    else "load its float model"
                )
            )

    def prepare(self, writes: Sequence[WeightWrite]) -> object:
        """Compile writes into the backend's fastest form (done once per adapter, ahead of switching).

        Inputs are already validated by the caller (indices in range, dtypes right).
        The default keeps the list as is.
        """
        return list(writes)

    @abstractmethod
    def write(self, *prepared: object) -> None:
        """Apply prepared writes, in order, atomically with respect to :meth:`run`.

        When this returns, the next :meth:`run` uses the new weights.
        """

    def wait_settled(self, timeout: float | None = None) -> bool:
        """Block until any background work after a write is done (True if settled)."""
        return True

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no background work is in flight (True if none): :meth:`wait_settled`, plus any build the
        backend began on its own after load (``hybrid``'s bound session, begun by the first run)."""
        return self.wait_settled(timeout)

    @property
    def threads(self) -> int | None:
        """The intra-op threads the backend runs on, as resolved (``None``: the library's default, all cores; a
        tiny model's default is 1, :data:`SMALL_MODEL_BYTES`): what a plain session compared with it should use."""
        return getattr(self, "_threads", None)

    @property
    @abstractmethod
    def strategy(self) -> str:
        """The weight-update strategy actually in use."""

    @property
    @abstractmethod
    def providers(self) -> list[str]:
        """Execution providers / delegates actually running the model."""

    def close(self) -> None:
        """Release native resources (optional)."""

    # -- footprint (optional): what ``strategy="auto"`` weighs against a memory budget --------
    AUTO_ORDER: tuple[str, ...] = ()  # strategies "auto" may pick under a budget, preferred first

    def predicted_mb(self, strategy: str | None = None) -> float | None:
        """Predicted resident memory (MB) of this model under ``strategy`` (default: the one in use)."""
        return None

    @classmethod
    def footprint_mb(
        cls, model: bytes | str | os.PathLike, strategy: str, providers: Sequence[str] = ()
    ) -> float | None:
        """Predicted resident memory (MB) of ``model`` (its file or bytes) under ``strategy``, before it is loaded
        (what ``backend="auto"`` weighs against a memory budget before measuring); None: not predicted.
        ``providers``: what the backend will be asked to run on (a device profile's), where that changes what is
        held (LiteRT without XNNPACK packs nothing, and runs ``hybrid`` as ``builtin``)."""
        return None

    @property
    def measured_mb(self) -> float | None:
        """Process resident memory growth (MB) from just before loading until every session was in place
        (for a background build, when it ended); None when not measured (e.g. off Linux) or when the
        process shrank meanwhile. It counts whatever else the process allocated or freed meanwhile and
        means something only for the first load in a process (a second load reuses freed pages)."""
        return getattr(self, "_measured", None)

    def _measure_from(self) -> None:
        """Start measuring: :meth:`_measure` then records the growth since this call."""
        self._rss0, self._measured = rss_mb(), None

    def _measure(self) -> None:
        rss0 = getattr(self, "_rss0", None)
        grown = rss_mb() - rss0 if rss0 is not None else None
        self._measured = grown if grown is not None and grown >= 0 else None

    @classmethod
    def choose_strategy(
        cls, predicted: Mapping[str, float], budget_mb: float, used_mb: float | None = 0.0, model: str = "the model"
    ) -> str:
        """Strategy ``auto`` under a memory budget: the first of :attr:`AUTO_ORDER` whose predicted
        footprint plus ``used_mb`` (what else the process holds, if the caller counts it; a backend
        loading a model passes 0) fits ``budget_mb``.

        Raises :class:`~edge.errors.ConfigError` naming the figures when none fits.
        """
        from edge.errors import ConfigError

        used = float(used_mb or 0.0)
        order = cls.AUTO_ORDER or (cls.DEFAULT_STRATEGY,)
        for s in order:
            if s in predicted and used + predicted[s] <= budget_mb:
                return s
        needs = ", ".join(f"{s} {predicted[s]:.0f} MB" for s in order if s in predicted)
        already = f"the process already uses {used:.0f} MB and " if used else ""
        raise ConfigError(
            f"no {cls.name} strategy fits the memory budget of {budget_mb:.0f} MB: {already}{model} needs {needs} "
            "(predicted); raise budgets.memory_mb in the device profile, or load a smaller or quantized model"
        )

    @classmethod
    def check_strategy(
        cls, strategy: str, predicted: Mapping[str, float | None], budget_mb: float, model: str = "the model"
    ) -> None:
        """Refuse a strategy asked explicitly whose ``predicted`` footprint exceeds ``budget_mb``, naming the
        figures and the strategies of this backend that would fit (or that none does). A strategy without a
        prediction (None) is not refused."""
        from edge.errors import ConfigError

        mine = predicted.get(strategy)
        if mine is None or mine <= budget_mb:
            return
        known = [s for s in cls.STRATEGIES if predicted.get(s) is not None]
        fit = [f"{s} ({predicted[s]:.1f} MB)" for s in known if predicted[s] <= budget_mb]
        if fit:
            fix = f"strategy {' or '.join(fit)} fits it (strategy='auto' takes the first that fits)"
        else:
            needs = ", ".join(f"{s} {predicted[s]:.1f} MB" for s in known)
            fix = f"none of the {cls.name} strategies fits it ({needs}): load a smaller or quantized model"
        raise ConfigError(
            f"strategy {strategy!r} would take {mine:.1f} MB for {model} on {cls.name} (predicted), over the memory "
            f"budget of {budget_mb:g} MB (budgets.memory_mb): {fix}; or raise budgets.memory_mb in the device "
            "profile (enforce_memory_budget=False skips the check)"
        )


#: Backends by name; each backend module registers itself on import.
BACKENDS: Registry[type[Backend]] = Registry("backend")


@dataclass(frozen=True)
class ArenaWrite:
    """A prepared write: (arena or a view of it, positions or slice, values) parts of disjoint entries (see
    :mod:`runtimes.lines`), and whether it touches constant weights (not only slots)."""

    parts: tuple[tuple[np.ndarray, np.ndarray | slice, np.ndarray], ...]
    weights: bool


class ArenaBackend(Rebuilds, Backend):
    """What both backends share: writable tensors in one arena per element type, and rebuilds of a fast session
    (:class:`runtimes.rebuilds.Rebuilds`).

    A subclass sets ``_arena`` (the float32 arena), ``_offset`` (tensor -> offset in its arena),
    ``_slots`` and ``_strategy``, and ``_arena_of`` (tensor -> its arena) for tensors stored in
    another arena than ``_arena`` (quantized int8/uint8 weights: the integer arena); calls
    :meth:`_check_budget` once its strategy is fixed, before it reads more of the model than its prediction needs,
    and :meth:`_init_rebuilds` before building sessions; provides :meth:`_build_fresh` (a fast session over the
    current arena, e.g. prepacked) and :meth:`_release`.
    """

    def _check_budget(self, options: BackendOptions, strategy: str) -> None:
        """Refuse ``strategy`` when it was asked explicitly (not ``auto``, which chose under the budget) and its
        :meth:`predicted_mb` exceeds ``options.memory_mb`` (:meth:`check_strategy`). ``strategy`` is the one that
        will run (LiteRT's ``hybrid`` without XNNPACK runs as ``builtin``). Each backend calls this before it
        reads its weights where its prediction does not need them (onnxruntime), and before any session."""
        if options.memory_mb is not None and options.strategy != "auto":
            predicted = {s: self.predicted_mb(s) for s in self.STRATEGIES}
            self.check_strategy(strategy, predicted, options.memory_mb, repr(self.info.name))

    def _release(self) -> None:
        """Drop the sessions (after close)."""

    def _arena_for(self, tensor: str) -> np.ndarray:
        return getattr(self, "_arena_of", {}).get(tensor, self._arena)

    def prepare(self, writes: Sequence[WeightWrite]) -> ArenaWrite:
        """The writes compiled per arena (:func:`runtimes.lines.compile_write`): aligned runs as copies of 16-byte
        units, a whole tensor as a slice, the rest entry by entry (a few entries of a wider arena sharing a buffer
        with a one-byte one, in the same call: :func:`runtimes.lines.fold_narrow`); a later write of an entry wins.

        Values for an integer tensor must already be of its type (never silently rounded or wrapped). Positions
        equal to those of another prepared write are that one's array (:func:`runtimes.lines.share_positions`).
        """
        from edge.errors import ConfigError

        writes = [w for w in writes if w.index is None or len(w.index)]
        per: dict[int, tuple[np.ndarray, dict[str, list]]] = {}  # id(arena) -> (arena, tensor -> its writes)
        for w in writes:
            arena, val = self._arena_for(w.tensor), np.asarray(w.values)
            if arena.dtype.kind != "f" and val.dtype != arena.dtype:
                raise ConfigError(f"write to {w.tensor!r}: values are {val.dtype}, it holds {arena.dtype}")
            tw = per.setdefault(id(arena), (arena, {}))[1]
            tw.setdefault(w.tensor, []).append((w.index, np.asarray(val, arena.dtype).reshape(-1)))
        pieces = [
            (arena, [(self._offset[t], *merge_positions(ws)) for t, ws in tw.items()]) for arena, tw in per.values()
        ]
        parts = share_positions([p for arena, ps in fold_narrow(pieces) for p in compile_write(arena, ps)])
        return ArenaWrite(parts, any(w.tensor not in self._slots for w in writes))

    def write(self, *prepared: ArenaWrite) -> None:
        with self._lock:
            weights = False
            for w in prepared:
                weights = weights or w.weights
                for arena, pos, val in w.parts:
                    arena[pos] = val
            if not weights:
                return  # only slot tensors changed: they are fed on every run
            self._generation += 1
            if self._strategy == "hybrid":  # weakly: an unloaded adapter's writes go (see _warm)
                self._recent.append([weakref.ref(w) for w in prepared if w.parts])
                self._writer = threading.get_ident()  # whose CPU _warm runs on (no system call here: gettid is one)
            if self._strategy == "rebuild":
                if self.FREE_STALE_BEFORE_BUILD:
                    self._static = None  # stale from here on: free its packed weights before packing anew
                self._static = self._build_fresh()
                self._static_gen = self._generation
            elif self._strategy == "hybrid":
                self._settled.clear()
                if not self._watching:  # a polling rebuild thread sees the new generation: no wake on this path
                    self._wake.notify()

    def _rebuilt(self):
        """Strategy ``rebuild`` with no session for the current weights (a write's build failed, and so did the build
        of the switch's recovery write, both out of memory most likely): the session built now, by the run asking,
        under the lock it holds. rebuild holds one session at a time (what its footprint and a memory budget count),
        so a write drops the stale one before building and nothing old is kept to serve meanwhile; a build that fails
        here raises its typed error again (``OutOfMemoryError``), and the next run builds again (memory may be back).
        """
        if self._closed:
            raise BackendUnavailableError(f"the {self.name} backend of {self.info.name!r} is closed")
        self._static = None
        self._static = self._build_fresh()
        self._static_gen = self._generation
        return self._static

    def wait_settled(self, timeout: float | None = None) -> bool:
        return self._settled.wait(timeout)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._wake.notify()
        thread = self._rebuilder  # a build in flight finishes first (native code must not be cut off)
        if thread is not None and thread is not threading.current_thread():
            thread.join(60.0)
        with self._lock:
            self._static = None
            self._release()
        self._settled.set()  # a waiter on a rebuild the close cut short returns (and its Runtime says closed)
