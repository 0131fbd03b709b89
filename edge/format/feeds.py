"""What a model takes as input, read from the model file, and the check every ``run`` feed passes.

A caller of :meth:`edge.runtime.Runtime.run` may be careless but must never change the
model: under the ``bound`` and ``hybrid`` strategies the writable weights and the adapter
slots are graph inputs too, so a feed dict is checked against the model's *real* inputs
(the ones :class:`~edge.format.modelinfo.ModelInfo` lists) before anything reaches a backend:
names (a weight, a slot or any other name is refused), dtype (exactly the model's, in
native byte order; integers are converted to the model's integer type when every value
fits, as token ids are int64 from a tokenizer and int32 in a converted TFLite model),
rank, fixed dimensions and consistent symbolic ones (an ONNX input that declares no shape at all, as converters
write fully dynamic ones, takes any rank: its dtype is checked). Arrays that are not C-contiguous
are copied. Every refusal is a :class:`~edge.errors.ConfigError`.

:func:`run_batched` runs many samples through a runtime in chunks, of the batch size the model's file fixes when it
fixes one (torch.onnx.export without dynamic axes fixes the example's): updates and the router's fitting use it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.errors import ConfigError, FormatError

__all__ = [
    "FeedChecker",
    "InputSpec",
    "MAX_GENERATED_BYTES",
    "check_feeds",
    "dtype_hint",
    "generate_inputs",
    "input_specs",
    "names_only",
    "onnx_input_specs",
    "output_width",
    "fixed_batch",
    "pad_rows",
    "plain_name",
    "run_batched",
    "tflite_input_specs",
]

MAX_GENERATED_BYTES = 1 << 30  # inputs generate_inputs makes (float64 while drawn); larger ones come from a file


def plain_name(name, what: str = "adapter name") -> str:
    """``name`` as a plain ``str``. A ``str`` subclass may answer ``==`` and ``hash`` differently from one call to
    the next, so two look-ups of one name (is it active? is it held?) could disagree and an active adapter be
    dropped while still fused; its plain copy cannot. Anything but a string raises :class:`ConfigError`. Here, not
    in :mod:`edge.fusion` (which re-exports it): a run checking its outputs' names does not import the fusion."""
    if type(name) is str:
        return name
    if not isinstance(name, str):
        raise ConfigError(f"{what} must be a string, got {type(name).__name__} {name!r:.80}")
    return str.__str__(name)  # str's own: never the subclass's __str__


def dtype_hint(got: np.dtype, want: np.dtype) -> str:
    """What to do with an input of dtype ``got`` where the model takes ``want``: a float input of a full-integer
    model must be quantized with the input's own scale and zero point, not cast."""
    if got.kind == "f" and want.kind in "iu":
        return (
            f"a full-integer model takes quantized inputs: np.clip(np.round(x / scale) + zero_point, lo, hi).astype("
            f"np.{want}) with the input tensor's scale and zero point (edge.format.tflite.read_tflite(data).tensors)"
        )
    return "convert it with x.astype(...)"


@dataclass(frozen=True)
class InputSpec:
    """One model input: dtype and shape, each dimension a fixed size (int > 0) or a symbol (str; free)."""

    name: str
    dtype: np.dtype | None  # None: unknown (a backend without a reader), only the name is checked
    shape: tuple[int | str, ...] | None  # None: any rank (an ONNX input declaring no shape), the dtype is checked


def input_specs(backend: str, model: bytes) -> dict[str, InputSpec] | None:
    """The real input specs of a model's bytes for ``backend`` (None: no reader here for that backend)."""
    if backend == "tflite":
        return tflite_input_specs(model)
    if backend == "onnxruntime":
        return onnx_input_specs(model)
    return None


def names_only(names) -> dict[str, InputSpec]:
    """Specs that check only the names (for a backend this module cannot read)."""
    return {n: InputSpec(n, None, None) for n in names}


def onnx_input_specs(model, names: tuple[str, ...] | None = None) -> dict[str, InputSpec]:
    """Specs of the graph inputs ``names`` (default: those its :class:`ModelInfo` lists) of an ONNX model's bytes
    (or of the ``onnx.ModelProto`` already parsed from them)."""
    from edge.format.modelinfo import onnx_info
    from edge.format.onnx_proto import is_model, load_model, np_dtype

    proto = model if is_model(model) else load_model(model)
    names = onnx_info(proto).inputs if names is None else names
    graph_inputs = {i.name: i for i in proto.graph.input}
    out = {}
    for name in names:
        vi = graph_inputs.get(name)
        if vi is None or not vi.type.HasField("tensor_type"):
            raise FormatError(f"model metadata lists input {name!r}, which the ONNX graph lacks or is not a tensor")
        tt = vi.type.tensor_type
        try:
            dtype = np_dtype(tt.elem_type)
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"ONNX input {name!r} has an unsupported element type {tt.elem_type}") from e
        dims = tuple(
            int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or f"?{i}")
            for i, d in enumerate(tt.shape.dim)
        )
        out[name] = InputSpec(name, dtype, dims if tt.HasField("shape") else None)  # no shape: not even a rank
    return out


def tflite_input_specs(model: bytes, names: tuple[str, ...] | None = None) -> dict[str, InputSpec]:
    """Specs of the subgraph inputs ``names`` (default: those its :class:`ModelInfo` lists) of a ``.tflite`` file.

    The first dimension is free whatever the file says: the backend runs other batch sizes
    than a fixed one in chunks.
    """
    from edge.format.tflite import read_tflite, tflite_info

    fb = read_tflite(model)
    names = tflite_info(model, fb).inputs if names is None else names
    by_name = {fb.tensors[i].name: fb.tensors[i] for i in fb.inputs if 0 <= i < len(fb.tensors)}
    out = {}
    for name in names:
        t = by_name.get(name)
        if t is None or t.dtype is None:
            raise FormatError(f"model metadata lists input {name!r}, which the .tflite subgraph lacks")
        sig = t.signature or t.shape
        dims = tuple("batch" if i == 0 else (int(d) if d > 0 else f"?{i}") for i, d in enumerate(sig))
        out[name] = InputSpec(name, np.dtype(t.dtype), dims)
    return out


def check_feeds(feeds: object, specs: Mapping[str, InputSpec], weights: frozenset[str] = frozenset()) -> dict:
    """The feeds to hand a backend: exactly the model's inputs, checked (see the module doc).

    ``feeds`` is a mapping of input name to array, or one array for a one-input model;
    ``weights`` names the model's writable tensors, for a clearer refusal when a feed names one.
    """
    names = list(specs)
    if isinstance(feeds, np.ndarray):
        if len(names) != 1:
            raise ConfigError(f"model takes inputs {names}; pass a dict of them")
        feeds = {names[0]: feeds}
    if not isinstance(feeds, Mapping):
        raise ConfigError(f"feeds must be a dict of input name -> array, got {type(feeds).__name__}")
    unknown = [k for k in feeds if not isinstance(k, str) or k not in specs]  # (an unhashable key: refused too)
    if unknown:
        shown = [str(k)[:80] for k in unknown[:5]]
        hit = [k for k in shown if k in weights]
        why = (
            f"{hit} are weights or adapter slots, which only load_adapter/switch may change"
            if hit
            else "they are not inputs of the model"
        )
        raise ConfigError(f"refused feed(s) {shown}: {why}; the model takes {names}")
    missing = [n for n in names if n not in feeds]
    if missing:
        raise ConfigError(f"missing model input(s) {missing}; the model takes {names}")
    sizes: dict[str, tuple[int, str]] = {}
    out = {}
    for name, spec in specs.items():
        x = feeds[name]
        if type(x) is not np.ndarray:  # a subclass (a memmap) as a plain view: its own shape or ndim may lie
            try:
                x = np.asarray(x)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"input {name!r}: not an array ({e})") from e
        if spec.dtype is None:
            out[name] = x
            continue
        if x.dtype.byteorder not in ("=", "|") and x.dtype.byteorder != _NATIVE:
            raise ConfigError(
                f"input {name!r} is {x.dtype.str}, not in this machine's byte order; "
                f"convert it with x.astype(x.dtype.newbyteorder('='))"
            )
        if x.dtype != spec.dtype and x.dtype.kind in "iu" and spec.dtype.kind in "iu":
            x = _narrow(name, x, spec.dtype)  # token ids: int64 from a tokenizer, int32 in a converted model
        if x.dtype != spec.dtype:
            raise ConfigError(f"input {name!r} must be {spec.dtype}, got {x.dtype}; {dtype_hint(x.dtype, spec.dtype)}")
        if spec.shape is None:  # the model declares no shape for it (any rank): the backend checks what it runs
            out[name] = x if x.flags.c_contiguous else np.ascontiguousarray(x)
            continue
        if x.ndim != len(spec.shape):
            raise ConfigError(f"input {name!r} must have {len(spec.shape)} dimensions {_show(spec)}, got {x.shape}")
        for i, (got, want) in enumerate(zip(x.shape, spec.shape)):
            if isinstance(want, int) and got != want:
                raise ConfigError(f"input {name!r} has shape {x.shape}; the model takes {_show(spec)}{_fixed(want)}")
            if isinstance(want, str):
                if got == 0:
                    raise ConfigError(f"input {name!r} has shape {x.shape}: dimension {i} is empty")
                seen = sizes.setdefault(want, (got, name))
                if seen[0] != got:
                    raise ConfigError(
                        f"dimension {want!r} is {seen[0]} in input {seen[1]!r} but {got} in {name!r}; use one size"
                    )
        out[name] = x if x.flags.c_contiguous else np.ascontiguousarray(x)
    return out


_NATIVE = "<" if sys.byteorder == "little" else ">"
_MEMO = 64  # feed signatures a FeedChecker remembers (a stream repeats one or a few)


class FeedChecker:
    """:func:`check_feeds` for one model, remembering the feed signatures it accepted unchanged.

    What the check decides depends only on the names, dtypes (byte order included), shapes and
    contiguity of the arrays, never on their values (integer inputs that needed converting are
    not remembered), so a dict of plain C-contiguous arrays whose signature passed before passes
    again without the full check. A dict is copied **before** it is looked at: what is checked is
    what runs, whatever another thread does to the caller's dict meanwhile (a name added between a
    check and a copy would reach the backend unchecked: under ``bound`` a weight is an input).

    Cost at batch 1 matters (a stream): right after a native run Python's caches are cold and every
    step costs several times its warm cost, so the last accepted signature is compared entry by entry
    (name, dtype object, shape, strides: equal strides for an equal shape and dtype mean the same
    C-contiguous layout) before the set of remembered ones is consulted. Only a dict whose names are
    plain ``str`` is handed on as given: a ``str`` subclass can hash and compare as an input's name
    while its characters, which onnxruntime binds by, name a weight, so :func:`check_feeds` rebuilds
    such a dict under the model's own names.
    """

    def __init__(self, specs: Mapping[str, InputSpec], weights: frozenset[str] = frozenset()) -> None:
        self.specs, self.weights = specs, weights
        self._seen: set[tuple] = set()
        self._last: dict[str, tuple] = {}  # name -> (dtype, shape, strides) of the last signature accepted

    def __call__(self, feeds: object) -> dict:
        if type(feeds) is dict:
            feeds = dict(feeds)  # one snapshot: the check and the run see the same names and arrays
            last = self._last
            if last and len(feeds) == len(last):
                for k, v in feeds.items():
                    e = last.get(k)
                    if (
                        e is None
                        or type(k) is not str  # a str subclass may pose as an input and carry a weight's name
                        or type(v) is not np.ndarray
                        or v.dtype is not e[0]
                        or v.shape != e[1]
                        or v.strides != e[2]
                    ):
                        break
                else:
                    return feeds
        sig = _signature(feeds)
        if sig is not None and sig in self._seen:
            self._last = {k: (v.dtype, v.shape, v.strides) for k, v in feeds.items()}
            return feeds
        out = check_feeds(feeds, self.specs, self.weights)
        if sig is not None and all(out[k] is v for k, v in feeds.items()):
            if len(self._seen) < _MEMO:
                self._seen.add(sig)
            self._last = {k: (v.dtype, v.shape, v.strides) for k, v in feeds.items()}
        return out


def _signature(feeds: object) -> tuple | None:
    if type(feeds) is not dict:
        return None
    sig = []
    for k, v in feeds.items():
        if type(k) is not str or type(v) is not np.ndarray or not v.flags.c_contiguous:
            return None
        sig.append((k, v.dtype, v.shape))
    return tuple(sig)


def _narrow(name: str, x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """An integer input converted to the model's integer dtype when every value fits; refused otherwise."""
    info = np.iinfo(dtype)
    if x.size and (int(x.min()) < info.min or int(x.max()) > info.max):
        raise ConfigError(
            f"input {name!r} holds values in [{int(x.min())}, {int(x.max())}], outside the model's {dtype} "
            f"range [{info.min}, {info.max}]"
        )
    return x.astype(dtype)


def _fixed(want: int) -> str:
    """What a dimension fixed by the runtime's dims (:class:`edge.dims.FixedDim`, which has a name) means."""
    name = getattr(want, "name", None)
    if name is None:
        return ""
    return (
        f": dimension {name!r} is fixed to {int(want)} by dims (Runtime(dims=...), --dim or the device profile's "
        "dims); feed that size, or load the model with another"
    )


def _show(spec: InputSpec) -> str:
    return "of any shape" if spec.shape is None else "[" + ", ".join(str(d) for d in spec.shape) + "]"


def output_width(model, name: str) -> int | None:
    """The last dimension of output ``name`` as declared in an ONNX model, if it is fixed (else None; None too for a
    file that is not ONNX). ``model``: the ``onnx.ModelProto`` already parsed (its graph suffices), or a path, read
    bounded (a FIFO, ``/dev/zero`` or a folder is a :class:`FormatError` naming what it is, never a hang)."""
    from edge.format.onnx_proto import is_model, load_model

    if is_model(model):
        proto = model
    else:
        from edge.format.io import read_bounded

        data = read_bounded(model, 1 << 40, what="model file")
        try:
            proto = load_model(data)
        except FormatError:  # not an ONNX file (a .tflite)
            return None
    for o in proto.graph.output:
        if o.name == name:
            dims = o.type.tensor_type.shape.dim
            if dims and dims[-1].HasField("dim_value"):
                return int(dims[-1].dim_value)
    return None


def generate_inputs(
    model: str | os.PathLike,
    names: Sequence[str],
    batch: int = 1,
    seed: int = 0,
    specs: Mapping[str, InputSpec] | None = None,
) -> dict[str, np.ndarray]:
    """Inputs made from an ONNX model's input metadata: symbolic dims set to ``batch``, floats ~ N(0, 1).

    ``specs``: the inputs a runtime already read from the graph (``rt.backend.input_specs``), so the model file,
    weights and all, is not read and parsed a second time (for MiniLM that doubled the peak memory measured)."""
    if specs is not None and all(n in specs and specs[n].dtype is not None for n in names):
        specs = {n: specs[n] for n in names}
    elif Path(model).suffix != ".onnx":
        raise ConfigError(f"can generate inputs only for .onnx models; pass --inputs X.npz for {Path(model).name}")
    else:
        from edge.format.io import read_bounded

        specs = onnx_input_specs(read_bounded(model, 1 << 40, what="model file"), tuple(names))
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, spec in specs.items():
        if spec.shape is None:
            raise ConfigError(
                f"input {name!r} of {Path(model).name} declares no shape (not even its rank), so none can be "
                "generated for it; pass --inputs X.npz with one array per input"
            )
        shape = tuple(d if isinstance(d, int) else batch for d in spec.shape)
        if np.prod(shape, dtype=np.float64) * max(spec.dtype.itemsize, 8) > MAX_GENERATED_BYTES:
            raise ConfigError(
                f"input {name!r} of {Path(model).name} declares shape {list(spec.shape)}: over "
                f"{MAX_GENERATED_BYTES >> 20} MiB to generate; pass --inputs X.npz with one array per input"
            )
        feeds[name] = (
            rng.standard_normal(shape).astype(spec.dtype) if spec.dtype.kind == "f" else np.zeros(shape, spec.dtype)
        )
    return feeds


def run_batched(
    runtime, feeds: Mapping[str, np.ndarray], batch: int, outputs: Sequence[str] | None = None
) -> dict[str, list[np.ndarray]]:
    """Each output's values for ``feeds`` (every array ``[n, ...]``), in chunks of ``batch`` rows; chunks of the
    batch size the model's file fixes on every input, if it does, the last one padded with zeros and their rows
    dropped (the backend's specs: LiteRT's leave the batch free, as that backend chunks by itself)."""
    specs = getattr(getattr(runtime, "backend", None), "input_specs", None) or {}
    step = fixed_batch(s.shape for s in specs.values())
    n = len(next(iter(feeds.values()))) if feeds else 0
    out: dict[str, list[np.ndarray]] = {}
    for i in range(0, n, step or batch):
        chunk = {k: v[i : i + (step or batch)] for k, v in feeds.items()}
        m = len(next(iter(chunk.values())))
        chunk = pad_rows(chunk, step or m)
        got = runtime.run(chunk) if outputs is None else runtime.run(chunk, outputs)
        for k, v in got.items():
            out.setdefault(k, []).append(v[:m])
    return out


def fixed_batch(shapes) -> int | None:
    """The batch size the input ``shapes`` all fix (their first dimension, one and the same int), else None."""
    firsts = {s[0] if s else None for s in shapes}  # (None: an input of any shape fixes nothing)
    b = firsts.pop() if len(firsts) == 1 else None
    return b if isinstance(b, int) and b > 0 else None


def pad_rows(chunk: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """``chunk`` (arrays ``[m, ...]``, ``m <= rows``) with zero rows appended up to ``rows``."""
    return {
        k: np.concatenate([v, np.zeros((rows - len(v), *v.shape[1:]), v.dtype)]) if len(v) < rows else v
        for k, v in chunk.items()
    }
