"""LiteRT (TFLite) backend with fused-mode weight writes.

XNNPACK, LiteRT's default CPU delegate, packs constant weights when an interpreter is
prepared, so an in-place edit is not seen by it; LiteRT's built-in kernels read
constant tensors straight from the model bytes (``model_content`` is not copied), so
they see an edit at once, but run several times slower (shared ANCHORS.md section 2).

The backend keeps one copy of the model as a ``bytes`` object that every interpreter
reads, and writes adapter entries into it in place: the float32 "arena" of this
backend *is* that buffer, viewed as float32 (every writable tensor's bytes are
4-byte aligned in the file), so a switch is one numpy scatter whatever the tensor
count, and no weight is ever copied. A quantized model's int8 targets (``exporters.quantize_tflite``) are
written the same way through the integer arena, a second view of the same bytes
(:mod:`runtimes.litert_arena`: which built-in kernels see such a write; a model whose int8 weights feed one
that does not is refused for ``hybrid`` and ``builtin``). Strategies:

``rebuild``
    Every write builds a new XNNPACK interpreter over the same bytes (it packs the
    current weights). Full speed at inference, a switch costs an interpreter build.
``builtin``
    One interpreter with the built-in kernels and no delegate: a write is the scatter
    only; inference is slower (no XNNPACK).
``hybrid`` (default)
    A write scatters and flips inference to the ``builtin`` interpreter at once; a
    background thread builds a fresh XNNPACK interpreter and swaps it in when done,
    unless another write came meanwhile (then it builds again). Fast switch, full
    steady-state speed. A run that comes in the settle window goes to the built-in
    kernels, unless they are measured slower than an interpreter build (large models):
    then it waits for the XNNPACK interpreter, which answers sooner.

Slots (adapter-branch tensors, see :class:`~edge.format.modelinfo.TensorInfo`) are subgraph
inputs of the exported file (``exporters.tflite`` makes them so); their values live
after the model in the same buffer and are fed on every run, so a slot-only write needs
no rebuild, as on onnxruntime.

Threads: every interpreter runs on ``threads``, except one that leaves a dynamic-range op to the built-in kernels
(XNNPACK does not take a dynamic-range ``DEPTHWISE_CONV_2D``) or an adaptable ``CONV_2D`` filter to their
multithreaded kernel: that one runs on 1 thread, logged (:func:`one_thread_reason`, ``interpreter_threads``).
``threads=None`` means all cores, except for a model file under :data:`runtimes.base.SMALL_MODEL_BYTES`: one
thread (logged at info), since handing a run of a few microseconds to a second thread costs more than it saves and
leaves the run at the mercy of whatever else holds the other core. Measured with plain interpreters on 2 cores (load
average 5, paired over 15 rounds): digits CNN 3.6 us on 1 thread, 6.2 us on 2; the ViT 22 us against 32 us (int8:
16 against 27); on 2 threads the CNN's paired runtime-to-plain ratio swung from 0.4x to 2.2x between rounds, on 1
it stayed within 1 %.

Each interpreter sits in a :class:`~runtimes.litert_session.Session`, which lays out its per-call path at build.

Interpreter: ``ai_edge_litert.interpreter`` (the maintained wheel), else
``tflite_runtime.interpreter`` (last release 2.14, needs numpy<2) with a logged
warning; neither installed raises :class:`~edge.errors.BackendUnavailableError`.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import numpy as np

from edge.errors import BackendUnavailableError, ConfigError, EdgeError, FormatError
from edge.format.feeds import InputSpec, tflite_input_specs
from edge.format.io import read_bounded
from edge.format.modelinfo import ModelInfo
from edge.format.tflite import read_tflite, tflite_info
from edge.format.tflite_checks import check_tensor_sizes
from runtimes.base import BACKENDS, SMALL_MODEL_BYTES, ArenaBackend, BackendOptions, trim_heap
from runtimes.litert_arena import dynamic_range_ops, load_arena, quant_constants, stale_readers, verify_fingerprint
from runtimes.litert_footprint import file_mb, held_bytes, litert_parts
from runtimes.litert_header import mapped
from runtimes.litert_session import Session, ops_details
from runtimes.litert_threads import one_thread_reason

__all__ = ["LiteRTBackend", "interpreter_module", "one_thread_reason", "DELEGATES"]

log = logging.getLogger("edge.runtimes.litert")

#: what ``providers=`` may ask for; () means the default, XNNPACK with built-in kernels for the rest
DELEGATES = ("XNNPACK", "CPU")
MAX_MODEL_BYTES = 1 << 40  # as edge.runtime's: the limit only keeps a device file from being read forever


def interpreter_module():
    """``(module, wheel name)`` of the LiteRT interpreter: ai-edge-litert, else tflite-runtime (with a warning)."""
    try:
        from ai_edge_litert import interpreter

        return interpreter, "ai-edge-litert"
    except ImportError as first:
        try:
            from tflite_runtime import interpreter
        except ImportError:
            raise BackendUnavailableError(
                f"the tflite backend needs a LiteRT interpreter ({first}): pip install ai-edge-litert "
                "(or, on old devices, tflite-runtime==2.14.0 with numpy<2 and Python <= 3.11)"
            ) from first
        log.warning("ai-edge-litert is not installed: using tflite-runtime's interpreter (last release, 2.14)")
        return interpreter, "tflite-runtime"


@BACKENDS.register("tflite")
class LiteRTBackend(ArenaBackend):
    name = "tflite"
    STRATEGIES = ("hybrid", "rebuild", "builtin")
    DEFAULT_STRATEGY = "hybrid"
    AUTO_ORDER = ("hybrid", "rebuild", "builtin")  # under a memory budget: one arena less, then no packed copy
    REBUILD_FAILED = "background interpreter rebuild failed; staying on the built-in kernels"
    FREE_STALE_BEFORE_BUILD = True  # free the stale XNNPACK interpreter's packed weights before packing anew
    # XNNPACK, built-in kernels ("CPU"); the external delegates are named so that profiles for boards that
    # have them validate, and are refused at load until this backend loads them (no silent fallback).
    PROVIDERS = MappingProxyType(
        {
            "XNNPACK": frozenset(),
            "CPU": frozenset(),
            "EDGETPU": frozenset({"library", "device"}),
            "GPU": None,
            "NNAPI": frozenset(
                {
                    "library",
                    "execution_preference",
                    "accelerator_name",
                    "cache_dir",
                    "model_token",
                    "disallow_nnapi_cpu",
                    "allow_fp16",
                    "max_number_delegated_partitions",
                }
            ),
            "HEXAGON": None,
        }
    )
    CPU_PROVIDER = "CPU"
    INSTALL_HINT = "pip install ai-edge-litert"

    @classmethod
    def available_providers(cls) -> list[str] | None:
        """What this backend can run here: XNNPACK and the built-in kernels, when a LiteRT runtime is installed."""
        import importlib.util

        for module in ("ai_edge_litert.interpreter", "tflite_runtime.interpreter"):
            try:
                if importlib.util.find_spec(module) is not None:
                    return list(DELEGATES)
            except (ImportError, ValueError):
                continue
        return None

    @classmethod
    def read_info(cls, path: Path) -> ModelInfo:
        data = read_bounded(Path(path), MAX_MODEL_BYTES, what="model file")
        fb = read_tflite(data)
        check_tensor_sizes(fb.tensors)  # as a load checks them: a shape edited to ask for gigabytes is refused here too
        return tflite_info(data, fb)

    @classmethod
    def footprint_mb(cls, model: bytes | str | os.PathLike, strategy: str, providers: Sequence[str] = ()) -> float:
        """Predicted resident MB of ``model`` under ``strategy`` before it is loaded (:func:`litert_footprint.file_mb`),
        as it runs with ``providers`` (``["CPU"]``: without XNNPACK; a delegate not loaded yet counted as XNNPACK)."""
        return file_mb(model, strategy, xnnpack=set(providers) != {"CPU"})  # as _check_providers decides at load

    def __init__(self, model: bytes | str | os.PathLike, options: BackendOptions) -> None:
        self._lib, self.runtime = interpreter_module()
        strategy = self.DEFAULT_STRATEGY if options.strategy == "auto" else options.strategy
        if strategy not in self.STRATEGIES:
            raise ConfigError(
                f"unknown tflite strategy {options.strategy!r}; allowed: auto, {', '.join(self.STRATEGIES)}"
            )
        if options.dims:  # never ignored: a .tflite's shapes are fixed at export and its dimensions have no names
            raise ConfigError(
                f"dims {dict(options.dims)} fix named dimensions of an ONNX model; a .tflite's shapes are fixed "
                "when it is exported (-1 marks a dynamic one, without a name): drop dims, or run the .onnx file "
                "(backend='onnxruntime')"
            )
        self._want_xnnpack = _check_providers(options.providers)
        if strategy == "builtin" and options.providers and self._want_xnnpack:
            raise ConfigError("strategy 'builtin' runs without the XNNPACK delegate; do not ask for XNNPACK with it")
        owned = not isinstance(model, (bytes, bytearray, memoryview))
        if owned:  # a path: this backend's arena is the file's bytes (bounded: a FIFO or /dev/zero is refused)
            if options.memory_mb is not None or options.precision != "any":  # what could refuse a whole file
                with mapped(model) as view:  # refused from the tensor table (pages read as touched), no weight read
                    self._plan(view, options, say=False)
            model = read_bounded(Path(model), MAX_MODEL_BYTES, what="model file")
        self._threads = int(options.threads or os.cpu_count() or 1)
        if options.threads is None and memoryview(model).nbytes < SMALL_MODEL_BYTES and self._threads > 1:
            log.info(
                "%d-byte model: its interpreters run on 1 thread (pass threads= for more)", memoryview(model).nbytes
            )
            self._threads = 1
        fb, strategy = self._plan(model, options)
        arena = load_arena(model, fb, self.info, owned)
        self._model, self._arena, integer, self._offset, self._live, self._slots = arena
        if options.verify:
            verify_fingerprint(self._model, fb, self.info)
        self._arena_of = {k: integer[v.dtype] for k, v in self._live.items() if v.dtype.kind in "iu"}
        self._constants = quant_constants(fb, self.info)  # scales and zero points of quantized targets
        self._names = [t.name for t in fb.tensors]
        self._writable = frozenset(t.index for t in fb.tensors if t.name in self._live and t.nbytes)
        self._dynamic = dynamic_range_ops(fb)  # op index -> int8 weight index (hybrid kernels: thread rule)
        self._one_thread: set[bool] = set()  # interpreter kinds (delegate or not) one_thread_reason held to 1
        self._input_names = list(self.info.inputs) or [
            self._names[i] for i in fb.inputs if self._names[i] not in self._slots
        ]
        self._output_names = list(self.info.outputs) or [self._names[i] for i in fb.outputs]
        self._slot_feeds = {k: self._live[k] for k in self._slots}
        self._slot_version = 0  # bumped by every write; a session feeds the slots when its copy is older

        self._init_rebuilds(options)  # _static: the XNNPACK interpreter
        self._builtin: Session | None = None
        self._builtin_ms: float | None = None  # last run time on the built-in kernels (hybrid's wait policy)

        if strategy in ("builtin", "hybrid"):
            self._builtin = self._build(delegate=False)
        if strategy in ("rebuild", "hybrid"):
            self._static = self._build_fresh()
            self._static_gen = 0
        if strategy == "hybrid":
            self._start_rebuilds("edge-litert-rebuild")

    def _plan(self, model, options: BackendOptions, say: bool = True):
        """``model``'s tensor table (from its bytes, or a mapped file: no weight is read), checked, and the strategy
        that will run under ``options``: refused here when the budget, the tensor sizes or the device's precision
        rule it out. ``say``: log what it decides (the second pass of a load, on the bytes, does)."""
        strategy = self._strategy = self.DEFAULT_STRATEGY if options.strategy == "auto" else options.strategy
        fb = read_tflite(model)
        check_tensor_sizes(fb.tensors, options.memory_mb)  # before LiteRT allocates them
        self.info = tflite_info(model, fb)
        self.check_precision(options)  # a float model on an int8-only device (an Edge TPU) is refused here
        # the strategy, and the budget met, from the tensor table: before the model is copied into its arena
        self._parts = litert_parts(fb, held_bytes(memoryview(model).nbytes, self.info), self._want_xnnpack)
        quantized = {t.initializer for t in self.info.tensors.values() if t.quant is not None}
        stale = stale_readers(fb, frozenset(t.index for t in fb.tensors if t.name in quantized))
        if stale and options.strategy == "auto":  # the one strategy that serves it: say so, and take it
            if say:
                log.info("%s: %s; strategy auto takes 'rebuild'", self.info.name, stale[0])
            strategy = self._strategy = "rebuild"
        if options.strategy == "auto" and options.memory_mb is not None:  # the first the budget admits (predicted)
            predicted = {s: self._parts.mb(s) for s in (("rebuild",) if stale else self.AUTO_ORDER)}
            strategy = self._strategy = self.choose_strategy(predicted, options.memory_mb, model=self.info.name)
        if stale and strategy != "rebuild":  # a built-in kernel would compute with a mix of old and new weights
            raise ConfigError(
                f"{self.info.name!r}: {stale[0]}{f' (and {len(stale) - 1} more)' if len(stale) > 1 else ''}, whose "
                f"built-in kernel keeps values derived from the int8 weights, so strategy {strategy!r} could not "
                "serve a switch at once: use strategy='rebuild', or quantize without those ops "
                "(exporters.quantize_tflite(..., op_types=...))"
            )
        self.strategy_reason: str | None = None  # why the strategy run is not the one asked for
        if strategy == "hybrid" and not self._want_xnnpack:  # providers=["CPU"]: a rebuild would build its twin
            self._strategy = strategy = "builtin"
            self.strategy_reason = "hybrid without XNNPACK (providers=['CPU']): one built-in interpreter serves"
            if say:
                log.info("%s: %s", self.info.name, self.strategy_reason)
        self._check_budget(options, strategy)  # checked as it will run
        return fb, strategy

    # -- contract ---------------------------------------------------------------------------
    @property
    def strategy(self) -> str:
        return self._strategy

    @property
    def providers(self) -> list[str]:
        """``["XNNPACK", "CPU"]`` while the XNNPACK interpreter serves (built-in kernels for what it
        does not take), ``["CPU"]`` while the built-in kernels alone do."""
        with self._lock:
            static = self._static is not None and self._static_gen == self._generation
            sess = self._static if static else self._builtin
        return ["XNNPACK", "CPU"] if sess is not None and sess.delegated else ["CPU"]

    @property
    def interpreter_threads(self) -> dict[str, int]:
        """Threads each live interpreter was built with (``"xnnpack"``, ``"builtin"``): ``threads`` unless a
        kernel rule took it down to 1 (logged as a warning when it does)."""
        with self._lock:
            live = {"xnnpack": self._static, "builtin": self._builtin}
            return {k: sess.threads for k, sess in live.items() if sess is not None}

    @property
    def input_names(self) -> list[str]:
        return list(self._input_names)

    def predicted_mb(self, strategy: str | None = None) -> float | None:
        """Predicted resident MB of this model under ``strategy`` (default: the one in use), from the file's
        tensor table: its bytes, XNNPACK's packed weights, the arenas (:mod:`runtimes.litert_footprint`)."""
        return self._parts.mb(strategy or self._strategy)

    def read(self, tensor: str) -> np.ndarray:
        view = self._live[tensor].view()
        view.flags.writeable = False
        return view

    def constant(self, tensor: str) -> np.ndarray:
        try:
            return self._constants[tensor]
        except KeyError:
            raise FormatError(f"{tensor!r} is not a quantization constant of {self.info.name!r}") from None

    @property
    def input_specs(self) -> dict[str, InputSpec]:
        """The real inputs, read from the bytes this backend holds (so a caller that gave a path needs no copy)."""
        return tflite_input_specs(self._model)

    @property
    def output_names(self) -> list[str]:
        return list(self._output_names)

    #: run takes ``check``: a caller that validates feeds (``Runtime``) may hand them over unchecked; the session's
    #: fast path takes only the model's inputs at their allocated shapes and dtypes, anything else goes to ``check``
    CHECKS_FEEDS = True

    def run(self, feeds, outputs: Sequence[str] | None = None, check=None) -> dict[str, np.ndarray]:
        try:  # no cost unless LiteRT fails: a model its own checks let through (see edge.format.tflite_checks)
            with self._lock:  # one lock, the serving interpreter checked first (a tiny model runs in 6 us)
                sess = self._static
                if sess is not None and self._static_gen == self._generation:
                    return sess.run(feeds, outputs, self._slot_version, check)
                if self._strategy != "hybrid":
                    return self._serving().run(feeds, outputs, self._slot_version, check)
            if self._worth_waiting():  # hybrid in its settle window: the XNNPACK copy lands sooner than built-ins run
                self._settled.wait(2 * self._builtin_ms / 1e3)
            with self._lock:
                sess = self._static
                if sess is not None and self._static_gen == self._generation:
                    return sess.run(feeds, outputs, self._slot_version, check)
                sess = self._serving()
                t0 = time.perf_counter()  # hybrid's settle window: how long the built-in kernels take (its wait policy)
                out = sess.run(feeds, outputs, self._slot_version, check)
                self._builtin_ms = (time.perf_counter() - t0) * 1e3
                return out
        except RuntimeError as e:
            if isinstance(e, EdgeError):
                raise
            if (
                "out of bounds" in str(e).lower()
                and isinstance(feeds, Mapping)
                and any(  # an id outside a table
                    np.asarray(v).dtype.kind in "iu" for v in feeds.values()
                )
            ):
                raise ConfigError(_out_of_bounds(str(e), feeds, self.info.name)) from e
            raise FormatError(
                f"LiteRT could not run {self.info.name!r}: {str(e)[:300]} (a file it loads but cannot run is damaged, "
                "or uses an op or delegate this LiteRT build lacks)"
            ) from e

    def write(self, *prepared) -> None:
        with self._lock:
            self._slot_version += 1  # slot values may change: every interpreter feeds them again at its next run
            super().write(*prepared)

    def _worth_waiting(self) -> bool:
        """Hybrid, mid-rebuild: is an interpreter build (measured) quicker than a built-in-kernel run (measured)?"""
        built, slow = self.last_build_ms, self._builtin_ms
        return not self._settled.is_set() and built is not None and slow is not None and built < slow

    def _release(self) -> None:
        self._builtin = None

    # -- interpreters -----------------------------------------------------------------------
    def _serving(self) -> Session:
        if self._static is not None and self._static_gen == self._generation:
            return self._static
        if self._strategy == "rebuild":  # the last build failed: built now, or its error again (ArenaBackend._rebuilt)
            return self._rebuilt()
        if self._builtin is None:  # hybrid and builtin hold the built-in kernels' interpreter until closed
            raise BackendUnavailableError(f"no current LiteRT interpreter for {self.info.name!r}: it is closed")
        return self._builtin

    def _build(self, *, delegate: bool) -> Session:
        """A new interpreter over the live model bytes (XNNPACK packs the weights it finds there now)."""
        t0 = time.perf_counter()
        resolver = self._lib.OpResolverType
        kind = resolver.AUTO if delegate else resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        threads = 1 if delegate in self._one_thread else self._threads  # the rule's answer holds for the model
        try:
            while True:
                interp = self._lib.Interpreter(
                    model_content=self._model, num_threads=threads, experimental_op_resolver_type=kind
                )
                interp.allocate_tensors()  # applies the default delegate (XNNPACK packs here)
                why = None
                if threads > 1:
                    why = one_thread_reason(ops_details(interp), delegate, self._writable, self._dynamic)
                if why is None:
                    break
                name = "XNNPACK" if delegate else "built-in"
                log.warning("%s: the %s interpreter runs on 1 thread, not %s: %s", self.info.name, name, threads, why)
                threads = 1
                self._one_thread.add(delegate)
        except (ValueError, RuntimeError) as e:
            raise FormatError(f"LiteRT cannot load the model: {e}") from e
        sess = Session(interp, self._input_names, self._slot_feeds, self._output_names)
        sess.threads = threads
        if delegate and not sess.delegated:
            log.warning("XNNPACK took no op of %s; running on the built-in kernels", self.info.name)
        self.last_build_ms = (time.perf_counter() - t0) * 1e3
        return sess

    def _build_fresh(self) -> Session:
        sess = self._build(delegate=self._want_xnnpack)
        if threading.current_thread() is self._rebuilder:
            # hybrid, off the switch path: the stale interpreter's packed weights, freed before this build, go back
            # to the malloc arena of the thread that built them (the first one: the loading thread's), which this
            # thread never allocates from, and glibc keeps them: MiniLM int8 hybrid 15 MB less resident after a
            # switch cycle with this trim (0.2 ms), the ViT 0.5 MB; rebuild, one thread, frees them for reuse
            trim_heap()
        return sess


def _out_of_bounds(text: str, feeds, model: str) -> str:
    """LiteRT's "index out of bounds" at run, said about the input: which integer input holds values outside the
    table (read from LiteRT's ``bounds are [0, N]`` when it gives them) and the table size."""
    m = re.search(r"Got (-?\d+), and bounds are \[0, (\d+)\]", text)
    hi = int(m.group(2)) if m else None
    ints = {}  # integer input -> (min, max)
    for name, x in feeds.items() if isinstance(feeds, Mapping) else ():
        a = np.asarray(x)
        if a.dtype.kind in "iu" and a.size:
            ints[name] = (int(a.min()), int(a.max()))
    bad = [k for k, (lo, top) in ints.items() if lo < 0 or (hi is not None and top > hi)] or list(ints)
    which = ", ".join(f"{k!r} (values {ints[k][0]}..{ints[k][1]})" for k in bad)
    which = f"input {which}" if len(bad) == 1 else f"one of the inputs {which}" if bad else "an integer input"
    table = f"a table of {hi + 1} rows (ids 0..{hi})" if hi is not None else "its table"
    return (
        f"{which} of {model!r} indexes outside {table}: LiteRT says {text[:200]!r}; "
        "give ids the model's vocabulary holds (check the tokenizer matches the model)"
    )


def _check_providers(asked: Sequence[str]) -> bool:
    """True when XNNPACK should be used. Anything but XNNPACK/CPU is refused: no silent fallback."""
    unknown = [p for p in asked if p not in DELEGATES]
    if unknown:
        raise BackendUnavailableError(
            f"LiteRT delegate(s) {unknown} are not available in this backend; available: {list(DELEGATES)} "
            "(() = XNNPACK with built-in kernels; ['CPU'] = built-in kernels only)"
        )
    return not asked or "XNNPACK" in asked
