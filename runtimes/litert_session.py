"""One LiteRT interpreter of the tflite backend (:mod:`runtimes.litert`) and its per-call path.

On the tiny demo models a run is 6-30 us, so what a call costs above the interpreter's own work
shows: the path is laid out once per interpreter, and a call checks each feed's dtype by identity
and lets the interpreter's ``SetTensor`` refuse a wrong shape or type; everything else (casting,
resizing, chunking, refusing with a typed error) happens only for feeds that path does not take.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from edge.errors import ConfigError, FormatError
from edge.format.feeds import dtype_hint

__all__ = ["Session", "ops_details"]


class Session:
    """One interpreter, its input/output tensor indices, and the shapes it is allocated for.

    ``run`` is the hot path, built at load so that a call does no more than the interpreter needs:
    per input one dtype identity check and one ``SetTensor`` (which itself refuses a wrong shape or
    type), ``Invoke``, and one ``GetTensor`` copy per output asked. Slots are fed only after a write
    changed them or the input buffers moved (inputs keep their values between invokes). Anything
    the fast path does not take (another batch or shape, a castable dtype, a missing or extra
    name) goes through :meth:`_checked`, which validates, converts, resizes or chunks. The calls go
    to the interpreter's native wrapper (``Interpreter._interpreter``, what ``set_tensor``,
    ``invoke`` and ``get_tensor`` forward to) when it has them, skipping the Python forwarding and
    ``invoke``'s check for live ``tensor()`` views, which this backend never takes.

    A model exported with a fixed batch (litert-torch 0.10 bakes it into reshapes) runs
    other batch sizes in chunks of that batch, the last one zero-padded; a model with a
    dynamic batch axis is resized instead.
    """

    def __init__(self, interp, inputs: Sequence[str], slots: Mapping[str, np.ndarray], outputs: Sequence[str]) -> None:
        self.interp = interp
        by_name = {d["name"]: d for d in interp.get_input_details()}
        missing = [n for n in [*inputs, *slots] if n not in by_name]
        if missing:
            raise FormatError(f"the .tflite model has no input(s) {missing}; it has {sorted(by_name)}")
        self.inputs = {n: by_name[n]["index"] for n in [*inputs, *slots]}
        self.shapes = {n: tuple(by_name[n]["shape"]) for n in [*inputs, *slots]}
        self.dtypes = {n: np.dtype(by_name[n]["dtype"]) for n in [*inputs, *slots]}
        self.signature = {
            n: tuple(int(d) for d in by_name[n].get("shape_signature", by_name[n]["shape"])) for n in inputs
        }
        sig = list(self.signature.values())
        fixed = bool(sig) and all(len(s) and s[0] > 0 for s in sig)
        self.batch = int(by_name[inputs[0]]["shape"][0]) if fixed else None
        self.index = {d["name"]: d["index"] for d in interp.get_output_details()}  # output name -> tensor index
        self.outputs = tuple((n, self.index[n]) for n in outputs)
        self.delegated = any(op.get("op_name") == "DELEGATE" for op in ops_details(interp))
        self.threads = 1  # what the interpreter was built with (set by the backend)
        native = getattr(interp, "_interpreter", None)
        self.direct = all(callable(getattr(native, m, None)) for m in ("SetTensor", "Invoke", "GetTensor"))
        self._native = native if self.direct else None
        if self.direct:
            self._set, self._invoke, self._get = native.SetTensor, native.Invoke, native.GetTensor
        else:  # another interpreter build: its public calls (the same work, a little more Python)
            self._set, self._invoke, self._get = interp.set_tensor, interp.invoke, interp.get_tensor
        self._plan = tuple((n, self.inputs[n], self.dtypes[n]) for n in inputs)
        wrong = [n for n, x in slots.items() if (x.shape, x.dtype) != (self.shapes[n], self.dtypes[n])]
        if wrong:
            raise FormatError(f"slot(s) {wrong} of the .tflite model do not match its inputs' shapes and types")
        self._slots = tuple((self.inputs[n], x) for n, x in slots.items())
        self._fed = -1  # the backend's slot version these input buffers hold (-1: none yet)
        self._fetch: dict = {None: self.outputs}  # outputs asked -> (name, index) pairs

    def run(self, feeds, names: Sequence[str] | None, slots: int, check=None) -> dict[str, np.ndarray]:
        """The outputs ``names`` (default: all) by name, with the backend's slots at version ``slots``; ``check``
        (e.g. the runtime's :class:`~edge.format.feeds.FeedChecker`) sees the feeds the fast path does not take."""
        try:
            fetch = self._fetch[names]
        except (KeyError, TypeError):
            fetch = self._fetch_plan(names)
        if len(feeds) == len(self._plan):
            put = self._set
            try:
                for name, idx, dtype in self._plan:
                    x = feeds[name]
                    if x.dtype is not dtype:
                        break
                    put(idx, x)
                else:
                    x = None
            except (LookupError, AttributeError, TypeError, ValueError):  # missing, not an array, other shape
                x = feeds
            if x is None:
                if self._fed != slots:
                    self._feed_slots(slots)
                self._invoke()
                get, out = self._get, {}
                for name, idx in fetch:  # a loop, not a comprehension: no frame of its own on Python 3.11 (-0.1 us)
                    out[name] = get(idx)
                return out
        return self._checked(feeds if check is None else check(feeds), fetch, slots)

    def _fetch_plan(self, names) -> tuple:
        try:
            fetch = tuple((k, self.index[k]) for k in names)
        except KeyError as e:
            raise ConfigError(f"{e.args[0]!r} is not an output of the model; it has {sorted(self.index)}") from None
        if len(self._fetch) < 64 and type(names) is tuple:
            self._fetch[names] = fetch
        return fetch

    def _feed_slots(self, version: int) -> None:
        for idx, x in self._slots:
            self._set(idx, x)
        self._fed = version

    def _checked(self, feeds, fetch, slots: int) -> dict[str, np.ndarray]:
        """The slow path: every feed validated and converted, the interpreter resized or the batch chunked."""
        if not isinstance(feeds, Mapping):
            raise ConfigError(f"feeds must be a dict of input name -> array, got {type(feeds).__name__}")
        plan = {name for name, _, _ in self._plan}
        unknown = [str(k)[:80] for k in feeds if k not in plan][:5]
        if unknown:
            raise ConfigError(f"unknown model input(s) {unknown}; the model takes {sorted(plan)}")
        missing = [n for n in plan if n not in feeds]
        if missing:
            raise ConfigError(f"missing model input(s) {missing}; the model takes {sorted(plan)}")
        feeds = {k: self._cast(k, v) for k, v in feeds.items()}
        for name, x in feeds.items():
            if x.ndim != len(self.signature[name]) or x.ndim == 0:
                raise ConfigError(f"input {name!r} must have {len(self.signature[name])} dimensions, got {x.shape}")
        n = self.batch
        if n is not None and feeds and len(next(iter(feeds.values()))) != n:
            if len({len(x) for x in feeds.values()}) > 1:
                raise ConfigError(f"inputs have different batch sizes {[x.shape for x in feeds.values()]}; use one")
            return self._chunked(feeds, slots, n, fetch)
        return self._resized(feeds, slots, fetch)

    def _chunked(self, feeds, slots: int, n: int, fetch) -> dict[str, np.ndarray]:
        """Run a batch of another size than the file's fixed batch ``n`` in chunks of ``n`` (last one zero-padded)."""
        b = len(next(iter(feeds.values())))
        parts = []
        for i in range(0, b, n):
            chunk = {k: v[i : i + n] for k, v in feeds.items()}
            m = len(next(iter(chunk.values())))
            if m < n:
                chunk = {k: np.concatenate([v, np.zeros((n - m, *v.shape[1:]), v.dtype)]) for k, v in chunk.items()}
            parts.append({k: v[:m] for k, v in self._resized(chunk, slots, fetch).items()})
        return {k: np.concatenate([p[k] for p in parts]) for k, _ in fetch}

    def _resized(self, feeds, slots: int, fetch) -> dict[str, np.ndarray]:
        """Run ``feeds`` (converted), resizing the interpreter first where their shapes differ from the allocated
        ones: only the dimensions the file leaves open (-1) may change, checked before anything is allocated."""
        changed = {name: x.shape for name, x in feeds.items() if x.shape != self.shapes[name]}
        for name, shape in changed.items():
            sig = self.signature[name]
            if len(shape) != len(sig) or any(0 <= want != got for got, want in zip(shape, sig)) or 0 in shape:
                took = "[" + ", ".join("?" if d < 0 else str(d) for d in sig) + "]"
                raise ConfigError(f"input {name!r} has shape {shape}; the model takes {took} (? any size above 0)")
        if changed:
            self._fed = -1  # the input buffers move: slots are fed again
            try:
                for name, shape in changed.items():
                    self._resize(self.inputs[name], shape)
                    self.shapes[name] = shape
            finally:  # never leave a resized interpreter unallocated
                (self.interp.allocate_tensors if self._native is None else self._native.AllocateTensors)()
        for name, x in feeds.items():
            self._set(self.inputs[name], x)
        if self._fed != slots:
            self._feed_slots(slots)
        self._invoke()
        return {name: self._get(idx) for name, idx in fetch}

    def _resize(self, index: int, shape: tuple[int, ...]) -> None:
        if self._native is not None:  # the public call refuses while the bound calls hold the wrapper
            self._native.ResizeInputTensor(index, np.array(shape, np.int32), True)
        else:
            self.interp.resize_tensor_input(index, shape, strict=True)

    def _cast(self, name: str, x) -> np.ndarray:
        """``x`` as the input's dtype, C-contiguous: int64 ids into an int32 input (litert-torch narrows 64-bit
        types by default) when every value fits, another byte order of the same type; anything else refused."""
        want = self.dtypes[name]
        try:
            x = np.ascontiguousarray(x)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"input {name!r}: not an array ({e})") from e
        if x.dtype == want:
            return x
        if x.dtype.kind in "iu" and want.kind in "iu":
            info = np.iinfo(want)
            if x.size and (x.min() < info.min or x.max() > info.max):
                raise ConfigError(f"input {name!r} has values outside the model's {want} range")
            return x.astype(want)
        if x.dtype.newbyteorder("=") == want:
            return x.astype(want)  # another byte order: the same values
        raise ConfigError(f"input {name!r} must be {want}, got {x.dtype}; {dtype_hint(x.dtype, want)}")


def ops_details(interp) -> list[dict]:
    try:
        return interp._get_ops_details()
    except AttributeError:  # older interpreters: no op listing, assume the delegate ran
        return [{"op_name": "DELEGATE"}]
