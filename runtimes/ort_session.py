"""onnxruntime sessions of the backend (:mod:`runtimes.onnxruntime`): their options, the bound session and the
prepacked one.

Both are built from one weight-less graph (see the backend's docstring). The ``bound`` session has every writable
tensor a graph input bound to the arena through IOBinding; the prepacked one is handed the arena's tensors as
initializers (in place where onnxruntime allows, :meth:`OrtSessions._build_fresh`).

Memory on tiny models (issue 18): a prepacked session of a model under :data:`runtimes.base.SMALL_MODEL_BYTES` runs
without onnxruntime's CPU arena (``enable_cpu_mem_arena``): the arena serves only tensor allocations and, switched
off, they go to the heap (onnxruntime issue 22271; the arena keeps what it once held until its session goes).
Measured in the ``edge bench memory`` children (every library's pages mapped in each, 1 thread, median of 3): a
settled ``hybrid`` runtime after a switch cycle held 0.44 and 0.35 MB less on the digits ViT fp32 and int8-static,
0.02-0.05 MB less on the ViT int8-dynamic and the digits CNN (fp32, int8); ``rebuild`` 0.03-0.38 MB less. Not
slower, paired within 30 rounds at load 7-9: inference 0.97-1.00x (CPU time 0.95-1.04x), switch 0.97-1.03x, rebuild
0.9-1.05x. The bound session keeps its arena: it packs its weights on every run, and without the arena that buffer
is allocated anew each time (its runs took 1.10-1.11x, paired; they serve the window after a switch and the
``bound`` strategy).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from pathlib import Path

from edge.errors import ConfigError, EdgeError, FormatError, OutOfMemoryError
from runtimes.base import trim_heap
from runtimes.ort_providers import check_registered

__all__ = ["OrtSessions", "asked_cpu_arena", "cannot_load", "out_of_memory", "session_options"]

log = logging.getLogger("edge.runtimes.onnxruntime")  # the backend's logger: these are its messages

_UNSHARED: set[str] = set()  # fingerprints of models onnxruntime would not prepack from the arena in place
_STUBS: list[tuple[str, str]] = []  # (folder, file name): an empty file onnxruntime must find but never reads
_STUBS_LOCK = threading.Lock()


def _stub() -> tuple[str, str]:
    """Where the data-less initializers of the prepacked graph say their data is: an empty file onnxruntime checks
    exists (``ValidateExternalDataPathFromDir``) but never reads, as the values come from memory (a read would find
    no bytes and fail loudly). ``/dev/null`` where there is one: no file to make (a temporary folder cost 0.2-0.4 ms
    of every first load in a process, most of it ``tempfile`` probing for a writable folder); else a temporary
    folder with an empty file, made once per process and removed at exit."""
    with _STUBS_LOCK:
        if not _STUBS:
            if os.devnull == "/dev/null" and os.path.exists(os.devnull):
                _STUBS.append(("/dev", "null"))
            else:
                import shutil
                import tempfile

                folder = tempfile.mkdtemp(prefix="edge-ort-")
                Path(folder, "edge-live-weights.bin").touch()
                atexit.register(shutil.rmtree, folder, True)
                _STUBS.append((folder, "edge-live-weights.bin"))
        return _STUBS[0]


#: what onnxruntime says when an allocation fails while it builds a session: a C++ ``std::bad_alloc`` (its what() on
#: libstdc++; "bad allocation" on MSVC) raised as a builtin MemoryError or inside its Fail/RuntimeException ("Exception
#: during loading: std::bad_alloc", "Exception during initialization: std::bad_alloc": both seen here under a ulimit
#: -v, onnxruntime 1.32), or its BFC arena's "Failed to allocate memory for requested buffer of size N"
_ALLOC_FAILED = ("bad_alloc", "bad allocation", "failed to allocate memory", "out of memory")


def out_of_memory(e: BaseException) -> bool:
    """Whether onnxruntime's exception ``e`` says an allocation failed (the device is short of memory)."""
    return isinstance(e, MemoryError) or any(k in str(e).lower() for k in _ALLOC_FAILED)


def cannot_load(
    e: Exception, model: str, strategy: str | None = None, dims=None
) -> ConfigError | FormatError | OutOfMemoryError:
    """onnxruntime's refusal of a model's graph (its Fail, InvalidGraph, NotImplemented...), said as a FormatError,
    or with ``dims`` fixed (:mod:`edge.dims`) as a ConfigError naming them (sizes the graph's shapes contradict: the
    file loads without them); an allocation that failed (:func:`out_of_memory`) is said as an
    :class:`~edge.errors.OutOfMemoryError`: the file is fine, the device is short of memory."""
    if out_of_memory(e):
        how = f" with strategy {strategy!r}" if strategy else ""
        return OutOfMemoryError(
            f"onnxruntime ran out of memory building a session of model {model!r}{how} ({e}); the file is fine, this "
            "device is short of memory: use a lighter strategy (bound keeps no prepacked copy of the weights), set "
            "budgets.memory_mb in the device profile to what the device can spare (strategy auto then picks one "
            "that fits), or give the process more memory"
        )
    if dims:
        return ConfigError(
            f"onnxruntime cannot load model {model!r} with dims {dict(dims)}: {str(e)[:600]}; a size fixed there may "
            "contradict a fixed axis of the graph: check the sizes the model was made for, or load without dims"
        )
    return FormatError(
        f"onnxruntime cannot load model {model!r}: {e}; check the file with onnx.checker.check_model, or import the "
        "original export again (edge import-onnx)"
    )


def session_options(ort, threads: int | None, *, cpu_arena: bool = True, dims=None):
    """onnxruntime ``SessionOptions`` as the backend makes them: ``threads`` intra-op threads (None: onnxruntime's
    default, all cores), warnings and errors logged, its CPU arena unless ``cpu_arena`` is False, the graph inputs'
    dimensions named in ``dims`` fixed to their sizes (:mod:`edge.dims`; onnxruntime's free dimension overrides). A
    plain session compared with the runtime can be made with the same (``edge bench memory`` does)."""
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
    so.log_severity_level = 3
    if not cpu_arena:
        so.enable_cpu_mem_arena = False
    for name, size in (dims or {}).items():
        so.add_free_dimension_override_by_name(name, int(size))
    return so


def asked_cpu_arena(providers, provider_options) -> bool | None:
    """What the CPU provider's ``use_arena`` option asks (a device profile's; None: not given). onnxruntime's Python
    API builds its CPU provider from ``SessionOptions.enable_cpu_mem_arena`` alone and drops this option without a
    word, so the backend sets that from it, on every session."""
    for name, opts in zip(providers, provider_options or ()):
        if name == "CPUExecutionProvider" and "use_arena" in opts:
            value = str(opts["use_arena"]).strip().lower()
            if value not in ("1", "0", "true", "false"):
                raise ConfigError(f"CPUExecutionProvider's use_arena must be 1 or 0 (true or false), got {value!r}")
            return value in ("1", "true")
    return None


class OrtSessions:
    """The session half of :class:`runtimes.onnxruntime.OrtBackend` (a mixin: it uses the backend's arena, graph and
    rebuild state)."""

    #: whether the prepacked sessions use onnxruntime's CPU arena (set by the backend from the model's size)
    cpu_arena = True
    #: the arena a device profile asks for (the CPU provider's ``use_arena``), on every session; None: not asked
    arena_asked: bool | None = None
    #: named input dimensions fixed to sizes (``BackendOptions.dims``, :mod:`edge.dims`), on every session
    dims: dict[str, int] = {}

    def _stub_location(self) -> str:
        """The file name the prepacked graph's data-less initializers point at (:func:`_stub`), in its folder."""
        self._stub_folder, location = _stub()
        return location

    def _may_share(self) -> bool:
        """Whether to hand the prepacked session the arena's weights in place (not refused for this model before)."""
        return self.info.fingerprint not in _UNSHARED

    def _session_options(self, prepacked: bool = False):
        """The options of every session of this backend; a ``prepacked`` (full-speed) session of a small model
        without onnxruntime's CPU arena (:attr:`cpu_arena`), unless a profile asked (:attr:`arena_asked`)."""
        arena = self.arena_asked if self.arena_asked is not None else self.cpu_arena or not prepacked
        return session_options(self._ort, self._threads, cpu_arena=arena, dims=self.dims)

    def _make_bound(self, model: bytes, go: threading.Event | None = None) -> None:
        """The session with every writable tensor a graph input, bound to the arena (zero copy). In the background:
        after ``go`` is set, and a pause so the run that set it returns first (a build holds the GIL at times)."""
        ort = self._ort
        if go is not None:
            go.wait()
            if not self._closed:
                time.sleep(self._rebuild_delay)
            if self._closed:  # closed before or during the pause: no build for a backend going away
                self._bound_ready.set()
                return
        try:
            sess = ort.InferenceSession(
                model, self._session_options(), providers=self._providers, provider_options=self._provider_options
            )
            check_registered(sess, self._providers)
            sess.disable_fallback()  # onnxruntime's wrapper keeps the model bytes only to re-create it on a provider
            sess._model_bytes = None  # fallback (never wanted); the bound graph has no other holder (issue 18)
            binding = sess.io_binding()
            self._bound_values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in self._live.items()}
            for k, v in self._bound_values.items():
                binding.bind_ortvalue_input(k, v)
        except Exception as e:
            if threading.current_thread() is not self._rebuilder:
                if isinstance(e, EdgeError):  # a provider that did not start (check_registered)
                    raise
                raise cannot_load(e, self.info.name, self._strategy, self.dims) from e
            log.exception("building the bound session failed; switches of constant weights cannot be served")
            self._bound_error = e
        else:
            self._bound, self._binding = sess, binding
            trim_heap()
            if threading.current_thread() is self._rebuilder:
                self._measure()
        finally:
            self._bound_ready.set()

    def _build_fresh(self):
        """A prepacked session over the arena. The weights only MatMul/Gemm read (as B) are handed over in place
        with ``add_initializer``: onnxruntime prepacks them without copying (observed, onnxruntime 1.2x-1.3x);
        their stubs in the graph point at an empty file it must find but never reads. Other constants (e.g. Conv
        weights, which optimizers rewrite) go through ``add_external_initializers``, which copies them. If
        onnxruntime refuses the in-place way, every constant is copied from then on for this model, with a
        warning (onnxruntime frees its copies of prepacked weights after packing)."""
        ort = self._ort
        t0 = time.perf_counter()
        so = self._session_options(prepacked=True)
        values = {k: ort.OrtValue.ortvalue_from_numpy(self._live[k]) for k in self._consts}
        shared = self._shared if self.shares_weights else set()
        for k in shared:
            so.add_initializer(k, values[k])
        copied = [k for k in self._consts if k not in shared]
        if copied:
            so.add_external_initializers(copied, [values[k] for k in copied])
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", self._stub_folder)
        try:
            sess = ort.InferenceSession(
                self._static_bytes, so, providers=self._providers, provider_options=self._provider_options
            )
        except Exception as e:  # onnxruntime's Fail and friends
            if not self.shares_weights or out_of_memory(e):  # copying the weights would take more memory still
                raise cannot_load(e, self.info.name, self._strategy, self.dims) from e
            self.shares_weights = False
            try:  # a model onnxruntime refuses whatever the weights: said as that, not as the in-place way failing
                sess = self._build_fresh()
            except (FormatError, OutOfMemoryError):
                self.shares_weights = True
                raise
            log.warning("onnxruntime would not prepack from the arena in place (%s); copying the weights instead", e)
            _UNSHARED.add(self.info.fingerprint)  # do not try again for this model in this process
            return sess
        check_registered(sess, self._providers)
        sess._edge_keepalive = values  # onnxruntime references these buffers
        # run() calls the native run: onnxruntime's wrapper (onnxruntime_inference_collection.py) re-checks the feed
        # names (check_feeds did), the ownership of OrtValue feeds (ours are numpy arrays) and WebGPU graph capture
        # (kept: its wrapper), and retries on other providers when one fails (a silent fallback: never wanted)
        native = getattr(sess, "_sess", None)
        webgpu = "WebGpuExecutionProvider" in self._providers
        sess._edge_run = native.run if native is not None and hasattr(native, "run") and not webgpu else sess.run
        del so, values
        trim_heap()
        self.last_build_ms = (time.perf_counter() - t0) * 1e3
        return sess
