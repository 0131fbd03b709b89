"""The device-side runtime: one model, many sparse adapters, fused-mode switching.

    rt = Runtime("model.onnx")                 # onnxruntime, strategy picked for you
    rt.load_adapter("rotate.safetensors")      # validated against the model, prepared
    rt.switch("rotate")                        # overwrite the adapter's entries in place
    rt.switch({"rotate": 1.0, "noise": 0.5})   # W + 1.0*S_rotate + 0.5*S_noise
    rt.switch(None)                            # bit-exact base weights again
    out = rt.run({"pixels": x})                # every output; outputs=["logits"]: only those

Merge semantics, used everywhere (runtime, tests, reference models): for each
touched entry, ``w = base + sum_i(alpha_i * delta_i)``, the sum taken in float32 in
the order the adapters are given, then added to the base value once. Switching back
writes the saved base values, never subtracts, so undo is bit-exact. On a quantized
model (int8/uint8 weights) the same holds on the base's integer grid (:mod:`edge.fusion`).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edge import cpu_int8
from edge.adapters_held import AdapterHolder, HeldBuffers, check_clip
from edge.engine_cache import cached_engine, explicit_engine
from edge.errors import ConfigError, EdgeError, OutOfMemoryError, RuntimeClosedError, SaturationError
from edge.format.feeds import FeedChecker, input_specs, names_only, plain_name
from edge.format.io import read_bounded
from edge.format.modelinfo import ModelInfo, ReadOnlyDict, read_only
from edge.format.signing import SignaturePolicy
from edge.heads import head_names, head_writes

if TYPE_CHECKING:
    from edge.fusion import Prepared

__all__ = ["Runtime", "RuntimeClosedError", "SaturationError", "merge_weights"]  # noqa: F822 (merge_weights: __getattr__)

log = logging.getLogger("edge.runtime")
_ND = np.ndarray  # one global lookup on the hot path of run
#: onnxruntime's errors of a run that failed in a kernel on what it was fed (its status codes' Python types)
_ORT_RUN_FAILURES = ("Fail", "RuntimeException", "EPFail")

MAX_MODEL_BYTES = 1 << 40  # model files are trusted; the limit only keeps a device file from being read forever
_fusion = None  # edge.fusion, imported by the first switch or adapter (_fused): a Runtime that only runs never does


def _fused():
    global _fusion
    from edge import fusion

    _fusion = fusion
    return fusion


def __getattr__(name: str):
    if name == "merge_weights":  # edge.fusion's (edge.merge_weights, `from edge.runtime import merge_weights`)
        return _fused().merge_weights
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _timeout(timeout) -> float | None:
    """A wait's ``timeout`` in seconds as threading takes it: None (no limit), or a real number (negative: 0; over
    threading's limit or infinite: None); anything else, nan included, a :class:`ConfigError`."""
    if timeout is None:
        return None
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float, np.integer, np.floating))
        or timeout != timeout
    ):
        raise ConfigError(f"a wait's timeout is None or a number of seconds >= 0; given {timeout!r}")
    return None if timeout >= threading.TIMEOUT_MAX else max(float(timeout), 0.0)


class Runtime(AdapterHolder):
    """Run one exported model and switch sparse adapters into its weights in place (:mod:`edge.adapters_held`)."""

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        backend: str | None = None,
        strategy: str = "auto",
        threads: int | None = None,
        providers: Iterable[str] = (),
        verify: bool = True,
        trusted_keys: Iterable[str | bytes] | None = None,
        device=None,
        enforce_memory_budget: bool = True,
        dims: Mapping[str, int] | None = None,
    ) -> None:
        """Load ``model`` on ``backend``.

        ``device`` (a profile name, a YAML path or an ``edge.devices.DeviceProfile``) supplies threads, execution
        providers with their options, and the fallback policy: a missing provider raises (``fallback: error``) or
        runs on CPU with a logged warning, recorded in :attr:`fallback_warning`. Explicit
        ``threads``/``providers``/``strategy`` win over it. With ``strategy="auto"`` the profile's
        ``budgets.memory_mb`` picks the strategy (hybrid when its predicted footprint fits, else bound (LiteRT:
        rebuild, then builtin), else a ``ConfigError`` naming the figures); a strategy given (or the profile's) whose
        predicted footprint exceeds it is a ``ConfigError`` before any session is built, and a model file larger
        than the budget is refused before it is read; ``backend="auto"`` measures only the engines that fit it; the
        same budget bounds the adapters loaded (:mod:`edge.adapters_held`); ``enforce_memory_budget=False`` skips
        all of these. An allocation that fails while loading is an :class:`~edge.errors.OutOfMemoryError`.
        ``backend="auto"`` runs the engine measured fastest here among
        the model's files for the profile's backends (``M.onnx``, ``M.tflite`` side by side; the profile's order
        decides within 3 %), measured on the first load and read from a cache after
        (:func:`edge.engine_cache.cached_engine`); files exported from the same weights are twins, so an adapter made
        for either loads on the one that runs (:attr:`ModelInfo.also_fits`). The default ``backend=None`` is
        ``"auto"`` with a ``device`` and else the backend of ``model``'s suffix (``.onnx``: onnxruntime, ``.tflite``:
        LiteRT). :attr:`engine_choice` says which engine runs and why. ``dims`` fixes the model's named input
        dimensions to sizes in every session (``{"batch": 1, "sequence": 128}``, :mod:`edge.dims`; over the profile's
        ``dims`` per name, which apply only to the names the file declares, on a backend that takes dims: the others
        are skipped, logged; :attr:`dims` says what applies): a name no input declares, a size outside 1..2**31-1, or
        a backend that takes none (a ``.tflite``) is a ``ConfigError``, and so is a feed of another size; the model
        and its adapters are unchanged."""
        from runtimes import BackendOptions, backend_for_path, get_backend

        self.device, self.fallback_warning, profile_options = None, None, None  # fallback_warning: str | None
        if device is not None:
            from edge.devices import DeviceProfile, check_fits, load_profile

            self.device = device if isinstance(device, DeviceProfile) else load_profile(device)
            if enforce_memory_budget:  # a file over the budget: refused before it is read, whatever the strategy
                check_fits(model, self.device)
        profile_dims = getattr(self.device, "dims", None)
        if dims is not None or profile_dims:  # fixed sizes (edge.dims): a load without them imports none of it
            from edge.dims import check_dims
            from edge.dims_apply import applying

            dims = check_dims(dims)  # checked before any read; the profile's apply per file and backend (edge.dims)
        given, budget_kw = backend is not None, {"enforce_memory_budget": enforce_memory_budget}
        if not given:  # a device: the engine measured fastest on it; else the file's own engine
            backend = "auto" if self.device is not None else backend_for_path(model)
        self.engine_choice = (  # which engine runs and why; "auto": measured once, then read from a cache
            cached_engine(model, device=self.device, threads=threads, strategy=strategy, dims=dims, **budget_kw)
            if backend == "auto"
            else explicit_engine(backend, model, given)
        )
        backend, model = self.engine_choice.backend, self.engine_choice.path
        #: the named dimensions fixed in every session: ``dims`` over the profile's that apply to this file here
        self.dims = applying(backend, model, profile_dims, dims) if dims or profile_dims else {}  # one without: refused
        if self.device is not None:
            opts = self.device.backend_options(backend)
            threads = threads if threads is not None else opts.threads
            providers = tuple(providers) or opts.providers
            strategy = strategy if strategy != "auto" else opts.strategy
            profile_options = opts
            self.fallback_warning = opts.fallback_warning
        self._policy = SignaturePolicy.resolve(trusted_keys, self.device)  # checked before the model is read
        path, owned = Path(model), backend in ("onnxruntime", "tflite")  # engines that read the file themselves
        data = path if owned else read_bounded(path, MAX_MODEL_BYTES, what="model file")  # never two copies at once
        budget = self.device.budgets.memory_mb if self.device is not None and enforce_memory_budget else None
        self._budget_mb, self._auto = budget, strategy == "auto"  # what the model and the adapters held must fit
        options = BackendOptions(
            threads=threads,
            strategy=strategy,
            providers=tuple(providers),
            verify=verify,
            memory_mb=budget,
            dims=self.dims or None,
        )
        if profile_options is not None:
            options = replace(
                options,
                provider_options=profile_options.provider_options,
                device=profile_options.device,
                fallback_warning=profile_options.fallback_warning,
                precision=profile_options.precision,
            )
        try:
            self.backend = get_backend(backend)(data, options)
        except MemoryError as e:  # an allocation failed while loading: the device is short of memory, not the file bad
            if isinstance(e, EdgeError):
                raise
            raise OutOfMemoryError(
                f"ran out of memory loading {path.name} on {backend} (strategy {strategy}): {e or type(e).__name__}; "
                "use a lighter strategy, set budgets.memory_mb in the device profile to what the device can spare "
                "(strategy auto then picks one that fits), or give the process more memory"
            ) from e
        # the real inputs, read by the backend while loading (no second walk of the file)
        self._inputs = self.backend.input_specs if owned else input_specs(backend, data)
        if self.dims and not owned and self._inputs:  # the sizes fixed in the specs too: a feed of another refused
            from edge.dims import fix_specs

            self._inputs = fix_specs(self._inputs, self.dims, path.name)
        tensors = ReadOnlyDict(self.backend.info.tensors)  # read-only: what set_head and adapters are checked against
        extra = read_only(self.backend.info.extra)  # read-only too: it says which fingerprints adapters may name
        self._info: ModelInfo = replace(
            self.backend.info, also_fits=self.engine_choice.twins, tensors=tensors, extra=extra
        )
        self.model_path, self._file_mb = path, path.stat().st_size / 2**20  # a budget's model part, unpredicted
        if backend == "onnxruntime":  # its U8S8 int8 kernels saturate on x86 without VNNI: say so at load
            cpu_int8.warn_u8s8_saturation(self.info, path.name, read=self.backend.read)
        if not self._inputs:  # a backend with no reader here, or no inputs in the metadata: names from the backend
            self._inputs = names_only(self.info.inputs or tuple(self.backend.input_names))
        self._writable = frozenset(self.info.tensors) | {t.initializer for t in self.info.tensors.values()}
        self._check_feeds = FeedChecker(self._inputs, self._writable)
        self._backend_checks = bool(getattr(self.backend, "CHECKS_FEEDS", False))  # it checks off its fast path
        self._fetch: dict = {None: None}  # outputs lists checked by run -> their distinct names (None: all)
        self._closed = False
        self._max_adapter_bytes = None  # computed at the first adapter file (edge.adapters_held)
        self._adapters: dict[str, Prepared] = {}
        self._held = HeldBuffers()  # the bytes they keep, each buffer once
        self._active: dict[str, float] = {}
        self._touched: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # stored -> (positions, base values)
        self._layout: object = None  # the active single adapter's layout: switching to its like needs no undo
        self._restore: object = self.backend.prepare([])  # undoes the current state (at first: writes nothing)
        self._empty, self._apply, self.clipped = self._restore, self._restore, 0  # _apply: redoes this state
        self._lock = threading.Lock()
        why = self.engine_choice.reason
        log.info("loaded %s: %s; strategy %s, providers %s", path.name, why, self.strategy, self.providers)

    # -- what is running ---------------------------------------------------------------------
    @property
    def strategy(self) -> str:
        """The weight-update strategy the backend uses (``auto`` resolved)."""
        return self.backend.strategy

    providers = property(lambda self: self.backend.providers, doc="Execution providers / delegates running the model.")
    policy = property(lambda self: self._policy, doc="The signature policy, fixed when the runtime was built.")
    info = property(lambda self: self._info, doc="The model's description (read-only: heads, adapters obey it).")

    @property
    def active(self) -> dict[str, float]:
        """The adapters fused into the weights now, with their weights (empty = base model)."""
        return dict(self._active)

    # -- switching ---------------------------------------------------------------------------
    def switch(
        self,
        spec: str | Mapping[str, float] | Iterable[str] | None,
        *,
        head: Mapping[str, np.ndarray] | None = None,
        clip: bool = False,
    ) -> None:
        """Fuse the given adapters into the weights, replacing whatever was fused before.

        ``None`` or ``{}`` restores the base model; a name fuses one adapter; a mapping fuses several with weights
        (``W + a1*S1 + a2*S2``). ``head`` also writes detector-head tensors in the same step (:meth:`set_head`), so
        no inference sees the new weights with the old head. The switch either completes or changes nothing: all
        checks and arithmetic happen before the first write, and one cut short puts back the weights and head it
        found. On a quantized model, fused values outside the integer range raise
        :class:`~edge.fusion.SaturationError` unless ``clip=True`` (a bool; clipped, counted in :attr:`clipped`); a
        single adapter at weight 1 keeps the clip it was loaded with (its writes are prepared at load).
        """
        if self._closed:  # the checks inline, their calls only to raise: right after a background build every
            self._check_open()  # call of a switch is a run of cache misses (~1-2 us each; A19)
        target = {spec: 1.0} if type(spec) is str else (_fusion or _fused()).normalise(spec)  # str: as normalise
        if clip is not True and clip is not False:
            check_clip(clip)
        writes = [] if head is None else head_writes(self.info, head)  # checked whatever it is ({} writes nothing)
        head_write = self.backend.prepare(writes) if writes else None
        with self._lock:
            if self._closed:
                self._check_open()
            p = self._adapters.get(spec) if type(spec) is str else None  # the common case: one lookup
            if p is None and len(target) == 1 and next(iter(target.values())) == 1.0:  # e.g. {"a": 1.0}
                p = self._adapters.get(next(iter(target)))
            if p is None and (unknown := [n for n in target if n not in self._adapters]):
                raise ConfigError(f"adapter(s) {unknown} are not loaded; loaded: {sorted(self._adapters) or 'none'}")
            if fast := p is not None:  # one adapter at weight 1: its writes were prepared at load
                apply, restore, touched, clipped = p.apply, p.restore, p.touched, p.clipped
            elif not target:  # the base model: only the undo of the current state is written
                apply, restore, touched, clipped = self._empty, self._empty, {}, 0
            else:
                from runtimes import WeightWrite

                fusion = _fusion or _fused()
                f = fusion.fuse(self._parts(target), clip=clip, what=f"fusing {target}", bounds=self.int_bounds())
                fusion.check_finite(f.values, f"fusing {target}")
                touched, clipped = f.touched, f.clipped
                apply = self.backend.prepare([WeightWrite(t, touched[t][0], v) for t, v in f.values.items()])
                restore = self.backend.prepare([WeightWrite(t, pos, b) for t, (pos, b) in touched.items()])
            undo = self._empty if fast and p.layout is self._layout else self._restore  # all its entries rewritten
            heads = () if head_write is None else (head_write,)
            old_heads = self._heads_now(writes) if writes else []  # the head as it is: put back if the write fails
            try:
                self.backend.write(undo, apply, *heads)
            except BaseException:  # cut short (a Ctrl-C between two writes) or failed: back to the state it found
                self.backend.write(undo, restore, self._apply, *self._head_back(old_heads))  # base values at both
                raise  # states' entries, then the old state's, and its head
            self._restore, self._touched, self._active, self.clipped = restore, touched, target, clipped
            self._layout, self._apply = p.layout if fast else None, apply
        if clipped and not fast:  # a single adapter's clipping was reported when it loaded
            log.warning("fusing %s clipped %d entries of the quantized weights to the integer range", target, clipped)

    def set_head(self, values: Mapping[str, np.ndarray]) -> None:
        """Overwrite detector-head tensors (``TensorInfo.head``, added by :func:`edge.route.taps.tap_model`).

        ``values`` maps head tensor names to arrays of their exact shape. A head is the router's scoring matrix
        in the graph: written like weights (prepacked by ``hybrid`` and ``rebuild``), never touched by adapters,
        and outside the model fingerprint.
        """
        self._check_open()
        writes = head_writes(self.info, values)
        write = self.backend.prepare(writes)
        with self._lock:
            self._check_open()
            old = self._heads_now(writes)
            try:
                self.backend.write(write)
            except BaseException:  # cut short between two head tensors: the head it found, whole
                self.backend.write(*self._head_back(old))
                raise

    def _heads_now(self, writes: list) -> list:
        """Copies of the current values of the head tensors ``writes`` write (none: empty). Under the lock; only
        prepared (:meth:`_head_back`) when a write fails: a switch with a head costs one copy of it (kept no longer:
        a wide head is megabytes)."""
        return [(w.tensor, self.backend.read(w.tensor).copy()) for w in writes]

    def _head_back(self, old: list) -> tuple:
        """The prepared write that puts back the head values :meth:`_heads_now` copied."""
        from runtimes import WeightWrite

        return (self.backend.prepare([WeightWrite(t, None, v) for t, v in old]),) if old else ()

    @property
    def heads(self) -> list[str]:
        """Names of the model's detector-head tensors (empty unless tapped with a head)."""
        return head_names(self.info)

    def _parts(self, target: Mapping[str, float]) -> dict[str, list]:
        """Per stored tensor, (positions, alpha * delta, base values) of each weighted adapter in ``target``."""
        owner: dict[str, str] = {}
        for name in target:
            p = self._adapters[name]
            if p.adapter.fusable:
                continue
            for tname in p.index:
                if tname in owner:
                    raise ConfigError(
                        f"adapters {owner[tname]!r} and {name!r} both write slot {tname!r}; branch adapters "
                        "(bottleneck, LoRA) cannot share slots. Fuse SHiRA adapters, or one branch adapter per slot"
                    )
                owner[tname] = name
        parts: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
        for name, alpha in target.items():
            p = self._adapters[name]
            for tname, idx in p.index.items():
                with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked by the caller
                    parts.setdefault(tname, []).append((idx, np.float32(alpha) * p.delta[tname], p.base[tname]))
        return parts

    def wait_settled(self, timeout: float | None = None) -> bool:
        """Wait for any background work the strategy does after a switch (True when done): from then on runs are
        served at full speed."""
        self._check_open()
        done = self.backend.wait_settled(_timeout(timeout))
        self._closed and self._check_open()  # closed by another thread while this one waited
        return done

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until the backend has no background work in flight (True when none): :meth:`wait_settled`, and the
        session ``hybrid`` builds for switches after the first run (memory measured after this holds both)."""
        self._check_open()
        done = self.backend.wait_idle(_timeout(timeout))
        self._closed and self._check_open()
        return done

    # -- inference ---------------------------------------------------------------------------
    def run(
        self, feeds: Mapping[str, np.ndarray] | np.ndarray, outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run the model on a dict of named inputs (or one array for a one-input model); return ``outputs`` (names
        of model outputs, default all: at batch 1 each output fetched costs about as much as a node). Feeds are
        checked against the model's real inputs (:func:`edge.format.feeds.check_feeds`): a name that is not an
        input (a weight, a slot), a wrong dtype, byte order, rank or fixed dimension is refused."""
        self._closed and self._check_open()  # raises when closed (no call when open: run is the hot path)
        try:  # None (all), or a list asked before: one lookup
            names = self._fetch[tuple(outputs) if type(outputs) in (list, tuple) else outputs]
        except (KeyError, TypeError):
            names = self._check_outputs(outputs)
        try:
            if self._backend_checks and type(feeds) is dict:  # its fast path takes only what the check passes as is
                return self.backend.run(feeds, names, self._check_feeds)
            if type(feeds) is dict and (last := self._check_feeds._last) and len(feeds) == len(last):
                feeds = dict(feeds)  # FeedChecker's own first step, inlined: a frame costs ~1 us right after a run
                for k, v in feeds.items():
                    e = last.get(k) if type(k) is str else None  # a str subclass can pose as an input, name a weight
                    if e is None or type(v) is not _ND or v.dtype is not e[0] or v.shape != e[1] or v.strides != e[2]:
                        return self.backend.run(self._check_feeds(feeds), names)
                return self.backend.run(feeds, names)
            return self.backend.run(self._check_feeds(feeds), names)
        except Exception as e:
            if self._closed:  # closed by another thread while this run was on its way to the backend
                raise RuntimeClosedError(f"this runtime ({self.model_path.name}) was closed during the run") from e
            if type(e).__name__ == "InvalidArgument" and type(e).__module__.startswith("onnxruntime"):
                raise ConfigError(f"onnxruntime refused the inputs: {e}") from e
            if type(e).__module__.startswith("onnxruntime") and type(e).__name__ in _ORT_RUN_FAILURES:
                from edge import run_errors  # a shape problem of shape-less inputs only when it plausibly is

                free = [s.name for s in self._inputs.values() if s.dtype is not None and s.shape is None]
                if free:
                    raise run_errors.run_failure(e, free, self.info.name, self.model_path) from e
                named = {s.name: s.shape for s in self._inputs.values() if any(type(d) is str for d in s.shape or ())}
                raise run_errors.checked_failure(e, self.info.name, named, self.dims) from e
            raise

    def _check_outputs(self, outputs) -> tuple[str, ...]:
        """``outputs`` as distinct model output names, remembered for the next call (a few fixed lists). Names are
        taken as plain ``str``: a subclass can compare equal to an output while its characters, which the engine
        binds by, name something else, and a list of them remembered would answer every later call for that list."""
        allowed = self.backend.output_names
        ok = isinstance(outputs, Sequence) and not isinstance(outputs, str)
        given = tuple(outputs) if ok else ()  # one pass over the caller's sequence
        ok = ok and all(isinstance(n, str) for n in given)
        names = tuple(dict.fromkeys(plain_name(n, "output name") for n in given)) if ok else ()
        unknown = [n for n in names if n not in allowed][:8]
        if not ok or unknown or not names:
            what = f"{unknown} are not outputs of" if unknown else f"outputs={outputs!r:.80} names no output of"
            raise ConfigError(f"{what} model {self.info.name!r}; pass a list of its outputs: {allowed}")
        if len(self._fetch) < 64:  # under the plain characters: a numpy str_ list hits it; a posing one never sets it
            self._fetch[tuple(str.__str__(n) for n in given)] = names
        return names

    def weights(self, param: str) -> np.ndarray:
        """Current value of a source parameter in its source layout (a copy; a folded channel scale left in; the
        integers of a quantized one, dequantize with ``info.tensors[param].dequantize``)."""
        self._check_open()
        t = self.info.tensors.get(param) if isinstance(param, str) else None  # (an unhashable one: refused too)
        if t is None:
            raise ConfigError(f"{str(param)[:80]!r} is not a parameter of model {self.info.name!r}")
        return t.from_stored(self.backend.read(t.initializer))

    def close(self) -> None:
        """Release the backend; afterwards every call raises :class:`RuntimeClosedError` (closing twice is fine)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.backend.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeClosedError(f"this runtime ({self.model_path.name}) is closed; create a new Runtime")

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
