"""onnxruntime backend with fused-mode weight writes.

onnxruntime prepacks constant MatMul weights at session start, so an in-place edit of an initializer is
never seen (shared ANCHORS.md section 2). Strategies:

``rebuild``
    The arena's tensors are handed to a new session as initializers after every write. Full speed at
    inference, a switch costs a session build.
``bound``
    The writable tensors are graph inputs bound once through IOBinding to the same numpy arrays (zero
    copy). A write is a numpy scatter; no prepacking, so inference is slower (MLAS packs B on every call).
``hybrid`` (default)
    A write scatters into the arrays and flips inference to the ``bound`` session at once; a background
    thread builds a prepacked session from the same arrays and swaps it in when done, unless another write
    came meanwhile (then it builds again). Fast switch, full steady-state speed; the window in between
    runs at ``bound`` speed.

Memory (issue 16): the writable tensors live once, in one contiguous arena per element type (float32;
int8/uint8 for the weights of a quantized model, issue 18), so a switch is a few numpy scatters whatever
the tensor count, plus onnxruntime's prepacked copy of the MatMul weights (``hybrid``, ``rebuild``; a
stale one is freed before packing anew). Tables only Gather reads (embeddings) are fed from the arena on
every run rather than handed over. Loading walks the file once at the protobuf wire level
(:mod:`runtimes.onnx_file`): only the graph without the writable tensors, a few hundred KB, is parsed, the file's
pages the walk mapped are given back (54 of ResNet-50's 94 MB), then the tensors go straight into the arena (given
a path, the file is never held whole); both sessions use that weight-less graph. Cold start: ``hybrid`` builds its
prepacked session in the constructing thread and serves from it; one background thread, started before that build
(right after it, the session's intra-op threads spin and a thread started then waited 2 ms p50 for a core at load
3), builds the bound session (needed from the first switch on) once the first inference has returned or a write asks
(a build holds the GIL at times: README, caveat of ``hybrid``), then runs the rebuilds. Digits ViT (0.3 MB of
weights; ``edge bench memory``, 16 rounds, load 2.8):
ready 1.18x the plain session's, main-thread CPU 1.27x (+2.5 ms: the graph parsed once, the arena, the
fingerprint, ``Runtime``'s checks). Memory: ``hybrid`` holds two sessions, and onnxruntime's own share of each is
about 1 MB on tiny models (graph, kernels, plans, arena, intra-op thread) whatever the weights weigh, so under a
few MB of weights a hybrid runtime stays above a plain session, int8 or not (issue 18).
:meth:`OrtBackend.footprint_mb` predicts each strategy's resident memory from the graph
(:mod:`runtimes.ort_footprint`); ``strategy="auto"`` with a memory budget picks by it, and a strategy asked is
checked against it, from the graph and the weights' dims before the arena is allocated (a refused 64 MB load peaked
64 MB above the process, now 2 MB: VmHWM in a fresh process). :meth:`OrtBackend.run` fetches
(or binds) only the outputs asked for. The sessions themselves (their options, the bound build, the prepacked build)
are :mod:`runtimes.ort_session`'s: a small model's prepacked sessions run without onnxruntime's CPU arena
(``cpu_arena``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from math import prod
from pathlib import Path

import numpy as np

from edge.errors import BackendUnavailableError, ConfigError
from edge.format.feeds import onnx_input_specs
from edge.format.modelinfo import ModelInfo, onnx_info
from edge.format.onnx_graph import refuse_sparse
from edge.format.onnx_proto import load_model, pb2
from runtimes import onnx_file as _file
from runtimes.base import BACKENDS, SMALL_MODEL_BYTES, ArenaBackend, BackendOptions, model_buffer
from runtimes.loading import release_pages
from runtimes.onnx_file import (
    ONNX_DTYPES,
    parse_graph,
    parse_graph_bytes,
    take_writable,
    tensor_proto,
    verify_fingerprint,
    writable_dtypes,
)
from runtimes.onnx_quant import refuse_quantized_after_import
from runtimes.ort_footprint import OrtParts, ort_parts
from runtimes.ort_providers import ORT_PROVIDERS
from runtimes.ort_session import OrtSessions, asked_cpu_arena

__all__ = ["OrtBackend"]

log = logging.getLogger("edge.runtimes.onnxruntime")


@BACKENDS.register("onnxruntime")
class OrtBackend(OrtSessions, ArenaBackend):
    name = "onnxruntime"
    STRATEGIES = ("hybrid", "bound", "rebuild")
    DEFAULT_STRATEGY = "hybrid"
    TAKES_DIMS = True  # named input dimensions fixed by free dimension overrides (edge.dims)
    AUTO_ORDER = ("hybrid", "bound")
    FREE_STALE_BEFORE_BUILD = True  # a stale prepacked session never serves again (runs check the generation)
    REBUILD_FAILED = "background session rebuild failed; staying on the bound session"
    PROVIDERS = ORT_PROVIDERS
    CPU_PROVIDER = "CPUExecutionProvider"
    INSTALL_HINT = "pip install onnxruntime (or the vendor's onnxruntime build with its execution providers)"

    @classmethod
    def available_providers(cls) -> list[str] | None:
        try:
            import onnxruntime as ort
        except ImportError:
            return None
        return list(ort.get_available_providers())

    @classmethod
    def read_info(cls, path: Path) -> ModelInfo:
        with model_buffer(path) as (buf, _):
            proto, inits = parse_graph(buf)
            info = onnx_info(proto)
            refuse_quantized_after_import(proto.graph, info)  # a load refuses it on its weights' fingerprint
            # the file's records of its writable tensors checked as a load checks them (nothing allocated): a file
            # whose dims or data types lie is refused here too, not described as loadable (`edge inspect`, engines)
            writable_dtypes(inits, *_writable(info))
            return info

    @classmethod
    def footprint_mb(
        cls,
        model: bytes | str | os.PathLike | ModelInfo,
        strategy: str,
        providers: Sequence[str] = (),
        dims: Mapping[str, int] | None = None,
    ) -> float:
        """Predicted resident memory (MB) that loading ``model`` with ``strategy`` adds to the process (on the CPU:
        ``providers`` change nothing here; another execution provider's device memory is not predicted).

        ``model`` is a path or the file bytes (the graph's parts, :mod:`runtimes.ort_footprint`), or a
        :class:`ModelInfo` (no graph: the weights, every writable weight counted as prepacked, and a rough
        :data:`_SESSION_MB` a session: above the graph's prediction on every model measured there). ``dims``: the
        length each dynamic input axis runs at (``{"seq": 256}``); else the model's ``max_seq_length`` or the graph's
        bound; with none, a lower bound, logged as a warning saying what to pass (:mod:`runtimes.ort_lengths`)."""
        if isinstance(model, ModelInfo):
            sizes = {
                t.initializer: (np.dtype(t.dtype).itemsize * prod(t.shape), t.slot) for t in model.tensors.values()
            }
            weights = sum(n for n, _ in sizes.values())
            return _predict(weights, weights - sum(n for n, slot in sizes.values() if slot), strategy)
        _check_strategy(strategy)
        with model_buffer(model) as (buf, _):
            proto, inits, _ = parse_graph_bytes(buf)
            info = onnx_info(proto)
            writable = {t.initializer for t in info.tensors.values() if t.initializer in inits}
            proto.graph.initializer.extend(tensor_proto(buf, t) for k, t in inits.items() if k not in writable)
        shapes = {k: (tuple(inits[k].dims), ONNX_DTYPES.get(inits[k].dtype, _F4)) for k in writable}
        slots = {t.initializer for t in info.tensors.values() if t.slot}
        fed = slots | _only(_file.readers(proto, writable - slots), _GATHERED)  # as __init__ feeds them
        parts = ort_parts(proto, shapes, fed, dims=dims)
        if parts.unsized:  # an engine choice under a budget weighs this figure too (edge.engine_budget)
            log.warning("%s", parts.unsized)
        return parts.mb(strategy)

    def __init__(self, model: bytes | str | os.PathLike, options: BackendOptions) -> None:
        try:
            import onnxruntime as ort

            pb2()  # runtimes.onnx_file reads the graph with onnx's protobuf classes (edge.format.onnx_proto)
        except ImportError as e:
            raise BackendUnavailableError(f"the onnxruntime backend needs onnx and onnxruntime: {e}") from e
        self._ort = ort
        self._measure_from()
        if options.strategy != "auto" and options.strategy not in self.STRATEGIES:
            raise ConfigError(
                f"unknown onnxruntime strategy {options.strategy!r}; allowed: auto, {', '.join(self.STRATEGIES)}"
            )
        self._providers = self._check_providers(options.providers)
        popts = options.provider_options
        self._provider_options = [dict(o) for o in popts] if popts and len(popts) == len(self._providers) else None
        self._threads = options.threads
        self.arena_asked = asked_cpu_arena(self._providers, self._provider_options)  # a profile's use_arena wins

        with model_buffer(model) as (buf, read):
            nbytes = len(buf)  # the whole model (not only its writable tensors) decides a tiny model's threads
            proto, inits, _ = parse_graph_bytes(buf)
            self.info = onnx_info(proto)
            refuse_sparse(proto, self.info.name)  # verify or not: onnxruntime would densify them unchecked at load
            self.check_precision(options)  # from the graph, before the weights are read into the arena
            self.input_specs = onnx_input_specs(proto, self.info.inputs)  # the real inputs, from the graph parsed once
            if options.dims:  # named dimensions fixed to sizes (edge.dims): names checked, sizes in specs and sessions
                from edge.dims import fix_specs

                self.dims, self.input_specs = (
                    dict(options.dims),
                    fix_specs(self.input_specs, options.dims, self.info.name),
                )
            writable, dtypes = _writable(self.info)
            kept = set(inits) - set(writable)  # small constants (biases, shapes): kept in the graph, taken before
            proto.graph.initializer.extend(tensor_proto(buf, t) for k, t in inits.items() if k in kept)
            release_pages(buf, 0, nbytes)  # the weights, so the file pages read so far are not held beside the arena
            want = writable_dtypes(inits, writable, dtypes)  # the file's records of them checked, nothing allocated
            self._slots = {t.initializer for t in self.info.tensors.values() if t.slot}
            # graph inputs of the prepacked session, fed from the arena on every run: the slots, and the tables only
            # Gather reads (embeddings), which onnxruntime would otherwise copy (it copies external initializers)
            readers = _file.readers(proto, set(writable) - self._slots)
            self._fed = self._slots | _only(readers, _GATHERED)
            self._parts: OrtParts | None = None  # the footprint's parts (runtimes.ort_footprint), from the graph
            self._parts_graph, self._parts_lock = b"", threading.Lock()
            if options.memory_mb is not None:  # the budget is met from the graph and the dims, before the weights
                shapes = {k: (inits[k].dims, want[k]) for k in writable}
                self._parts = ort_parts(proto, shapes, self._fed, dims=self.dims)
            self._strategy = strategy = self._budgeted_strategy(options)
            arenas, self._offset, self._live = take_writable(buf, inits, writable, read, dtypes)
        self._arena = arenas.get(_F4, np.empty(0, _F4))  # float weights; quantized ones in an integer arena
        self._arena_of = {k: arenas[v.dtype] for k, v in self._live.items() if v.dtype != _F4}
        self._constants = _file.quant_constants(proto, self.info)
        if options.verify:
            verify_fingerprint(proto, self.info, self._live, self._constants)  # scales: decoded once
        _file.strip_node_metadata(proto)  # both sessions' graphs, and the one kept for rebuilds, without it
        self._output_names = [o.name for o in proto.graph.output]
        self._fed_feeds = {k: self._live[k] for k in sorted(self._fed)}
        self._consts = sorted(set(self._live) - self._fed)
        # handed over in place (others are copied: e.g. Conv weights, which optimizers rewrite, and weights that
        # constant folding computes with at build, which it reads from the graph, not from add_initializer)
        self._shared = _only(readers, _PACKED) - _file.folded_reads(proto, set(self._consts))
        self.weights_mb = sum(a.nbytes for a in arenas.values()) / 2**20
        self.packed_mb = sum(self._live[k].nbytes for k in self._consts) / 2**20  # the fast session's own copies
        if self._threads is None and nbytes < SMALL_MODEL_BYTES:
            log.info("%d-byte model: its sessions run on 1 thread (pass threads= for more)", nbytes)
            self._threads = 1
        self.cpu_arena = nbytes >= SMALL_MODEL_BYTES  # a small model's prepacked sessions without it (ort_session)
        if self.arena_asked is not None and self.arena_asked != self.cpu_arena:
            log.info("CPU arena %s, as use_arena asks (this model's default: %s)", self.arena_asked, self.cpu_arena)
            self.cpu_arena = self.arena_asked
        if strategy == "bound" and self._parts is None:  # no graph is kept for bound (issue 18): the parts now
            self._parts = self._footprint_parts(proto)

        # one weight-less graph in two forms: the fed tensors are graph inputs in both; the others are
        # data-less initializers (values handed over at build) in the prepacked form, graph inputs in the bound one
        _file.add_inputs(proto, sorted(self._fed), self._live)
        self._static_bytes = b""
        if strategy in ("rebuild", "hybrid"):
            location = self._stub_location()
            stubs = (_file.external_stub(k, self._live[k], location) for k in self._consts)
            proto.graph.initializer.extend(stubs)
            self._static_bytes = proto.SerializeToString()
            del proto.graph.initializer[len(proto.graph.initializer) - len(self._consts) :]
        bound_bytes = b""
        if strategy in ("bound", "hybrid"):
            _file.add_inputs(proto, self._consts, self._live)
            bound_bytes = proto.SerializeToString()
        del proto
        if self._parts is None:  # the graph walk (2-50 ms on MiniLM-L6): at the first predicted_mb, not every load
            self._parts_graph = self._static_bytes  # kept for rebuilds anyway

        self._init_rebuilds(options)
        self.shares_weights = self._may_share()  # prepack from the arena in place (_build_fresh)
        self._bound = self._binding = None
        self._bound_fetch: tuple[str, ...] = ()  # the outputs bound on self._binding, in order
        self._bound_ready = threading.Event()  # the bound session exists (or failed: _bound_error)
        self._bound_error, self._bound_asked = None, strategy != "hybrid"
        if strategy == "hybrid":  # cold start: serve prepacked; one background thread builds the bound session (for
            # switches) after the first inference (or at the first write), then runs the rebuilds. Started before the
            # prepacked build: right after it, that session's intra-op threads spin and a new thread waits for a core
            self._go_bound = threading.Event()
            self._bound_model = bound_bytes
            self._start_rebuilds("edge-ort-hybrid")  # self._rebuilder: it builds the bound session too
        if strategy in ("rebuild", "hybrid"):
            try:
                self._static, self._static_gen = self._build_fresh(), 0
            except BaseException:
                self.close()  # the hybrid thread waits for a go that would never come
                raise
        if strategy == "rebuild":
            self._bound_ready.set()  # there is none
        if strategy == "bound":
            self._make_bound(bound_bytes)
        del bound_bytes
        if strategy != "hybrid":
            self._measure()

    # -- contract ---------------------------------------------------------------------------
    @property
    def strategy(self) -> str:
        return self._strategy

    @property
    def providers(self) -> list[str]:
        return list(self._any_session().get_providers())

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self._any_session().get_inputs() if i.name not in self._live]

    def _any_session(self):
        sess = self._static or self._bound
        if sess is None:  # mid-rebuild right after load: the bound session is on its way
            self._bound_ready.wait()
            sess = self._static or self._bound
        return sess

    def read(self, tensor: str) -> np.ndarray:
        view = self._live[tensor].view()
        view.flags.writeable = False
        return view

    def constant(self, tensor: str) -> np.ndarray:
        try:
            return self._constants[tensor]
        except KeyError:
            raise ConfigError(f"{tensor!r} is not a scale or zero point of model {self.info.name!r}") from None

    @property
    def output_names(self) -> list[str]:
        return list(self._output_names)

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        names = self._output_names if outputs is None else outputs
        with self._lock:
            s = self._static if self._static_gen == self._generation else None
            if s is None and self._strategy == "rebuild":  # the last build failed: built now, or its error again
                s = self._rebuilt()
            if s is not None:
                outs = s._edge_run(names, {**feeds, **self._fed_feeds} if self._fed_feeds else feeds, None)
                if not self._bound_asked:
                    self._start_bound()
                return dict(zip(names, outs))
            self._bound_ready.wait()  # hybrid right after load: the bound session is still being built
            if (b := self._binding) is None:
                why = (
                    "it is closed" if self._closed else f"its bound session could not be built ({self._bound_error!r})"
                )
                raise BackendUnavailableError(f"no current onnxruntime session for {self.info.name!r}: {why}")
            for k, v in feeds.items():
                b.bind_cpu_input(k, np.ascontiguousarray(v))
            if self._bound_fetch != tuple(names):  # outputs stay bound from run to run: drop the others
                b.clear_binding_outputs()
                self._bound_fetch = tuple(names)
            for name in names:  # rebound every run: onnxruntime allocates each output for this run's shape
                b.bind_output(name, "cpu")
            self._bound.run_with_iobinding(b)
            return dict(zip(names, b.copy_outputs_to_cpu()))

    def write(self, *prepared) -> None:
        if not self._bound_asked:
            self._start_bound()
        super().write(*prepared)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Settled, and hybrid's bound session built once the first run or write asked for it (a build not asked
        for is no work in flight: the thread waits for the go)."""
        if self._bound_asked and not self._bound_ready.is_set():
            start = time.monotonic()
            if not self._bound_ready.wait(timeout):
                return False
            timeout = None if timeout is None else max(0.0, timeout - (time.monotonic() - start))
        return self.wait_settled(timeout)

    def _start_bound(self) -> None:
        self._bound_asked = True  # run() asks once: set() takes a lock and notifies
        if self._rebuilder is not None and not self._go_bound.is_set():
            self._go_bound.set()

    def close(self) -> None:
        with self._lock:
            self._closed = True  # a bound build not begun is not begun any more
        if self._strategy == "hybrid":
            self._go_bound.set()  # the thread waiting for it returns; super().close() joins it
        super().close()
        self._bound_ready.set()  # wait_idle's waiters return too

    def _rebuild_loop(self) -> None:
        """Hybrid's one background thread: the bound session first (once asked), then the rebuilds after writes.
        One thread, not two: a thread start is a wait for the scheduler in the constructing thread (0.1-2 ms on a
        loaded machine), and each thread that builds a session keeps its own glibc malloc arena holding it."""
        model, self._bound_model = self._bound_model, b""
        self._make_bound(model, self._go_bound)
        del model
        super()._rebuild_loop()

    def _release(self) -> None:
        self._bound = self._binding = None

    # -- footprint --------------------------------------------------------------------------
    def predicted_mb(self, strategy: str | None = None) -> float:
        """Predicted resident memory (MB) of this model under ``strategy`` (default: the one in use), from the
        graph's parts (:mod:`runtimes.ort_footprint`; computed at the first call)."""
        strategy = _check_strategy(strategy or self._strategy)
        with self._parts_lock:
            if self._parts is None:
                self._parts = self._footprint_parts(load_model(self._parts_graph))
                self._parts_graph = b""
        return self._parts.mb(strategy)

    def _budgeted_strategy(self, options: BackendOptions) -> str:
        """The strategy to load with: the one asked, checked against ``options.memory_mb`` (:meth:`_check_budget`),
        or for ``auto`` the default, or under a budget the first of :attr:`AUTO_ORDER` whose prediction fits it.
        Called with the graph parsed (``self._parts`` set when there is a budget) and no weight read yet."""
        if self._parts is not None and self._parts.unsized:  # a dynamic axis of no known length (ort_lengths)
            log.warning("%s; memory budget %g MB weighs that lower bound", self._parts.unsized, options.memory_mb)
        if options.strategy != "auto":
            self._check_budget(options, options.strategy)
            return options.strategy
        if options.memory_mb is None:
            return self.DEFAULT_STRATEGY
        predicted = {s: self.predicted_mb(s) for s in self.STRATEGIES}
        return self.choose_strategy(predicted, options.memory_mb, model=self.info.name)

    def _footprint_parts(self, proto) -> OrtParts:
        """The parts of this model's footprint, from its weight-less graph ``proto`` (not modified)."""
        return ort_parts(proto, {k: (v.shape, v.dtype) for k, v in self._live.items()}, self._fed, dims=self.dims)

    def _check_providers(self, asked: Sequence[str]) -> list[str]:
        available = self._ort.get_available_providers()
        asked = list(asked) or ["CPUExecutionProvider"]
        missing = [p for p in asked if p not in available]
        if missing:
            raise BackendUnavailableError(
                f"onnxruntime execution provider(s) {missing} are not available here; available: {available}. "
                "Install the onnxruntime build that has them, or ask for CPUExecutionProvider"
            )
        return asked


# -- footprint without a graph (a ModelInfo): runtimes.ort_footprint has the model of it -----------------------------
_SESSION_MB = 8.0  # onnxruntime's own per session, rough: 0.6-10 MB from the digits CNN to MiniLM-L6 (ort_footprint)
_PACKED = {("MatMul", 1), ("Gemm", 1), ("MatMulInteger", 1)}  # inputs MLAS prepacks when they are constant
_F4 = np.dtype(np.float32)
_GATHERED = {("Gather", 0)}  # embedding tables


def _check_strategy(strategy: str) -> str:
    if strategy not in OrtBackend.STRATEGIES:
        raise ConfigError(f"unknown onnxruntime strategy {strategy!r}; allowed: {', '.join(OrtBackend.STRATEGIES)}")
    return strategy


def _predict(weights: float, packed: float, strategy: str) -> float:
    """MB without the graph: the arena, plus the prepacked copy and one session for hybrid/rebuild, plus the bound
    session."""
    _check_strategy(strategy)
    mb = weights / 2**20
    if strategy in ("hybrid", "rebuild"):
        mb += packed / 2**20 + _SESSION_MB
    if strategy in ("hybrid", "bound"):
        mb += _SESSION_MB
    return mb


def _only(readers: Mapping[str, set], kinds: set[tuple[str, int]]) -> set[str]:
    return {k for k, r in readers.items() if r and r <= kinds}


def _writable(info: ModelInfo) -> tuple[list[str], dict[str, str]]:
    """The writable tensors' initializers, sorted, and the element type the metadata records for each quantized one:
    what :func:`~runtimes.onnx_file.writable_dtypes` checks the file's records against (a load and ``read_info``)."""
    quantized = {t.initializer: t.quant.dtype for t in info.tensors.values() if t.quant is not None}
    return sorted({t.initializer for t in info.tensors.values()}), quantized
