"""What the runtime needs to know about an exported model, and its fingerprint.

The exporter stores this in the ONNX file's ``metadata_props`` (keys below); the
runtime reads it back without torch. Adapter indices are always given in the
*source* (torch) layout of a parameter, e.g. ``[out, in]`` for a linear weight;
``tensors`` maps each parameter to the stored initializer and says how it is laid out there
(as it is, its 2-D transpose, or any axis permutation such as TFLite's OHWI filters) and
whether a converter scaled it per output channel (BatchNorm folded into a convolution), so one
adapter file serves every backend.

The fingerprint hashes the stored tensors, so ``M.onnx`` and ``M.tflite`` of one model differ.
The exporters also record :func:`source_fingerprint`, a hash of the torch weights the file was
exported from (``extra["source_fingerprint"]``): float files with the same one are *twins*, and
``backend="auto"`` lets an adapter made for either run on the other (:attr:`ModelInfo.also_fits`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from edge.errors import FormatError
from edge.format.qrange import QUANT_DTYPES, SAFE_BOUNDS, weight_bounds

__all__ = [
    "ModelInfo",
    "QuantInfo",
    "ReadOnlyDict",
    "ReadOnlyList",
    "TensorInfo",
    "fingerprint",
    "read_only",
    "source_fingerprint",
    "META_KEY",
    "MODEL_FORMAT",
    "MODEL_VERSION",
]

META_KEY = "edge"  # metadata_props key holding ModelInfo as JSON
MODEL_FORMAT = "edge.model"
MODEL_VERSION = 1


def fingerprint(tensors: Mapping[str, np.ndarray]) -> str:
    """Content hash of a model's stored weights: names, dtypes, shapes and bytes (strings by value).

    Computed over the tensors *as stored in the exported file* (after any layout
    change), sorted by name, so host and device agree without torch.
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        if arr.dtype.kind == "O":  # onnx's STRING tensors (skl2onnx's class labels): by value, not by pointer
            arr = _text_bytes(arr)
        h.update(name.encode())
        h.update(b"\0" + arr.dtype.str.encode() + b"\0" + repr(tuple(arr.shape)).encode() + b"\0")
        h.update(memoryview(arr).cast("B") if arr.size else b"")  # an empty weight (no registers)
    return "sha256:" + h.hexdigest()[:32]


def _text_bytes(a: np.ndarray) -> np.ndarray:
    """An object array (onnx reads STRING tensors as such: its buffer holds pointers, different on every read) as a
    length-prefixed UTF-8 encoding of its shape and items, typed ``S1``: no ONNX initializer reads as that type, so
    no numeric tensor of the same bytes hashes alike, and a changed label still changes the fingerprint."""
    parts = [b"str", repr(tuple(a.shape)).encode()]
    for item in a.reshape(-1):
        b = item if isinstance(item, bytes) else str(item).encode("utf-8", "surrogatepass")
        parts += [len(b).to_bytes(8, "little"), b]
    return np.frombuffer(b"".join(parts), "S1")


def source_fingerprint(state: Mapping[str, np.ndarray]) -> str:
    """Content hash of the weights a file was exported from (a torch ``state_dict`` as numpy, source layout).

    Two exported files with the same one came from the same weights, whatever each stored; the
    exporters record it as ``extra["source_fingerprint"]``. Distinct from :func:`fingerprint` by a prefix.
    """
    return "source:" + fingerprint(state).removeprefix("sha256:")


@dataclass(frozen=True)
class QuantInfo:
    """How a quantized target is stored: ``real = (q - zero_point) * scale``.

    ``scale`` and ``zero_point`` name initializers of the model itself (never copied into the
    metadata, so they are covered by the fingerprint); ``axis`` is the *source* axis the scales
    run along (per channel), or None for one scale for the whole tensor.
    """

    scale: str
    zero_point: str
    dtype: str = "int8"
    axis: int | None = None

    def __post_init__(self) -> None:
        if self.dtype not in QUANT_DTYPES:
            raise FormatError(f"quantized dtype {self.dtype!r} is not supported; allowed: {sorted(QUANT_DTYPES)}")
        if not isinstance(self.scale, str) or not isinstance(self.zero_point, str) or not self.scale:
            raise FormatError("a quantized tensor needs the names of its scale and zero-point initializers")

    @property
    def bounds(self) -> tuple[int, int]:
        """Integers no kernel misreads (int8 [-127, 127], uint8 [0, 255]); :meth:`weight_bounds`: the weight's own."""
        return SAFE_BOUNDS[self.dtype]

    def weight_bounds(self, zero_point: np.ndarray) -> tuple[int, int]:
        return weight_bounds(self.dtype, zero_point)  # symmetric int8 (zero point 0): [-127, 127]

    def _json(self) -> dict:
        return {"scale": self.scale, "zero_point": self.zero_point, "dtype": self.dtype, "axis": self.axis}

    @classmethod
    def _from_json(cls, q) -> QuantInfo:
        if not isinstance(q, Mapping) or set(q) != {"scale", "zero_point", "dtype", "axis"}:
            raise ValueError(f"quant {str(q)[:120]} is not {{scale, zero_point, dtype, axis}}")
        if q["axis"] is not None and type(q["axis"]) is not int:
            raise ValueError(f"quant axis {q['axis']!r} is not an integer or null")
        return cls(q["scale"], q["zero_point"], q["dtype"], q["axis"])


@dataclass(frozen=True)
class TensorInfo:
    """Where a source parameter lives in the exported file, and how its entries map there.

    ``stored = source.transpose(perm) * channel_scale[o]`` (``o`` = source axis 0, the output
    channel): ``perm`` is None for the layouts ``transposed`` names (as stored, or the 2-D
    transpose), and ``channel_scale`` is set only where a converter folded a per-channel scale
    (BatchNorm) into the stored weight, so a delta given on the source weight lands on the
    folded one. The methods below are the one place that mapping is written.
    """

    initializer: str  # name of the stored tensor
    shape: tuple[int, ...]  # source (torch) shape, in which adapter indices are given
    transposed: bool = False  # stored as the 2-D transpose of the source layout
    slot: bool = False  # an adapter-branch tensor: fed at run time, never prepacked, zero when no adapter is active
    head: bool = (
        False  # a detector-head tensor (edge.route.taps): written by the runtime's owner, outside the fingerprint
    )
    perm: tuple[int, ...] | None = None  # stored = source.transpose(perm); None: as ``transposed`` says
    channel_scale: tuple[float, ...] | None = None  # folded per output channel (source axis 0), float32 values
    quant: QuantInfo | None = None  # stored as integers on a grid (the initializer holds them); None: float32

    def __post_init__(self) -> None:
        n = len(self.shape)
        if self.quant is not None and self.quant.axis is not None and not 0 <= self.quant.axis < n:
            raise FormatError(f"{self.initializer}: quantization axis {self.quant.axis} outside {n} axes")
        if self.quant is not None and self.slot:
            raise FormatError(f"{self.initializer}: adapter slots are float32, never quantized")
        if self.perm is not None and sorted(self.perm) != list(range(n)):
            raise FormatError(f"{self.initializer}: layout {list(self.perm)} is not a permutation of {n} axes")
        if self.perm is not None and self.transposed:
            raise FormatError(f"{self.initializer}: give either transposed or perm, not both")
        if self.transposed and n != 2:
            raise FormatError(f"{self.initializer}: only 2-D tensors can be stored transposed, not {list(self.shape)}")
        if self.channel_scale is not None and (not n or len(self.channel_scale) != self.shape[0]):
            raise FormatError(
                f"{self.initializer}: {len(self.channel_scale)} channel scales for source shape {list(self.shape)}"
            )

    @property
    def layout(self) -> tuple[int, ...]:
        """The axis permutation from the source layout to the stored one."""
        if self.perm is not None:
            return self.perm
        return (1, 0) if self.transposed else tuple(range(len(self.shape)))

    @property
    def stored_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[a] for a in self.layout)

    def stored_offsets(self, indices: np.ndarray) -> np.ndarray:
        """Flat offsets in the stored tensor of source-layout ``indices`` (``[ndim, nnz]``, in range)."""
        rows = np.asarray(indices, dtype=np.int64)
        return np.ravel_multi_index(tuple(rows[a] for a in self.layout), self.stored_shape).astype(np.int64)

    def stored_delta(self, indices: np.ndarray, values: np.ndarray) -> np.ndarray:
        """A source-layout delta at ``indices`` as it lands on the stored (possibly folded) weight."""
        if self.channel_scale is None:
            return values
        scale = np.asarray(self.channel_scale, dtype=np.float32)
        with np.errstate(over="ignore"):  # inf here is refused by the caller (check_finite), named there
            return (values * scale[np.asarray(indices[0], dtype=np.int64)]).astype(np.float32)

    def fold(self, source: np.ndarray) -> np.ndarray:
        """A float source-layout tensor (a delta on the torch weight) scaled as the converter folded the weight."""
        out = np.asarray(source, dtype=np.float32).reshape(self.shape)
        if self.channel_scale is None:
            return out
        return out * np.asarray(self.channel_scale, dtype=np.float32).reshape((-1,) + (1,) * (len(self.shape) - 1))

    def to_stored(self, source: np.ndarray) -> np.ndarray:
        """A whole source-layout tensor in the stored layout, flat and contiguous (float32, or the integers of a
        quantized weight as they are): the inverse of :meth:`from_stored`; a delta goes through :meth:`fold`."""
        out = np.asarray(source).reshape(self.shape)
        out = out if out.dtype.kind in "iu" else out.astype(np.float32, copy=False)
        return np.ascontiguousarray(out.transpose(self.layout)).reshape(-1)

    def from_stored(self, stored: np.ndarray) -> np.ndarray:
        """The stored tensor read back in the source layout, with any folded channel scale left in (a copy)."""
        return np.array(np.asarray(stored).reshape(self.stored_shape).transpose(np.argsort(self.layout)))

    @property
    def dtype(self) -> str:
        """The stored element type: ``float32``, or the quantized integer type."""
        return "float32" if self.quant is None else self.quant.dtype

    @property
    def stored_quant_axis(self) -> int | None:
        """The stored axis the quantization scales run along (None: per tensor, or not quantized)."""
        if self.quant is None or self.quant.axis is None:
            return None
        return self.layout.index(self.quant.axis)

    def grid_units(self, indices: np.ndarray, values: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """A source-layout float delta at ``indices`` in steps of the quantization grid (float32, not rounded).

        ``scale`` is the model's scale initializer (one value, or one per entry of the quantized axis).
        """
        delta = np.asarray(self.stored_delta(indices, values), np.float32)
        s = np.asarray(scale, np.float32).reshape(-1)
        with np.errstate(over="ignore"):  # inf steps are refused by the caller (merged), named there
            if self.quant is None or self.quant.axis is None:
                return (delta / s[0]).astype(np.float32)
            return (delta / s[np.asarray(indices[self.quant.axis], np.int64)]).astype(np.float32)

    @property
    def quant_shape(self) -> tuple[int, ...]:
        """The shape a scale or zero point takes to broadcast over the source layout: -1 on the quantized axis."""
        shape = [1] * len(self.shape)
        if self.quant is not None and self.quant.axis is not None:
            shape[self.quant.axis] = -1
        return tuple(shape)

    def dequantize(self, stored: np.ndarray, scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
        """A stored integer tensor as real values, in the source layout (float32)."""
        q = self.from_stored(stored).astype(np.float32)
        shape = self.quant_shape
        s = np.asarray(scale, np.float32).reshape(shape)
        z = np.asarray(zero_point).astype(np.float32).reshape(shape)
        return ((q - z) * s).astype(np.float32)

    def _json(self) -> dict:
        d = {"initializer": self.initializer, "shape": list(self.shape), "transposed": self.transposed}
        if self.slot:
            d["slot"] = True
        if self.head:
            d["head"] = True
        if self.perm is not None:
            d["perm"] = list(self.perm)
        if self.channel_scale is not None:  # exact float32 bytes, compact
            raw = np.asarray(self.channel_scale, dtype="<f4").tobytes()
            import base64  # only a folded channel scale needs it

            d["channel_scale"] = base64.b64encode(raw).decode("ascii")
        if self.quant is not None:
            d["quant"] = self.quant._json()
        return d

    @classmethod
    def _from_json(cls, t: Mapping) -> TensorInfo:
        shape = _shape(t["shape"])
        perm = t.get("perm")
        if perm is not None and (not isinstance(perm, list) or not all(type(a) is int for a in perm)):
            raise ValueError(f"perm {str(perm)[:80]} is not a list of integers")
        scale = t.get("channel_scale")
        if scale is not None:
            if not isinstance(scale, str) or len(scale) != 4 * math.ceil(4 * shape[0] / 3):
                raise ValueError(f"channel_scale is not {shape[0]} base64-encoded float32 values")
            import base64

            values = np.frombuffer(base64.b64decode(scale, validate=True), dtype="<f4")
            if not np.all(np.isfinite(values)) or not np.all(values != 0):
                raise ValueError("channel_scale holds a zero or non-finite value")
            scale = tuple(float(v) for v in values)
        return cls(
            str(t["initializer"]),
            shape,
            bool(t["transposed"]),
            bool(t.get("slot", False)),
            bool(t.get("head", False)),
            None if perm is None else tuple(perm),
            scale,
            None if t.get("quant") is None else QuantInfo._from_json(t["quant"]),
        )


def _refuse(self, *args, **kwargs):
    raise TypeError(
        f"this {type(self).__name__} is read-only (a runtime's model description or held adapter); build a new "
        "Runtime to serve another model, or copy it (dict(...), list(...)) to change your own"
    )


class ReadOnlyDict(dict):
    """A dict that refuses changes: the tensors a runtime checks adapters and heads against (``Runtime.info``), so
    no caller can make a weight a head or move a target. It pickles (to a child process) as a plain dict."""

    __slots__ = ()  # no instance dict: as small as a dict
    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _refuse

    def __reduce__(self):
        return dict, (dict(self),)


class ReadOnlyList(list):
    """A list that refuses changes, inside a :func:`read_only` description. It pickles as a plain list."""

    __slots__ = ()
    __setitem__ = __delitem__ = __iadd__ = __imul__ = append = extend = insert = pop = remove = clear = _refuse
    sort = reverse = _refuse

    def __reduce__(self):
        return list, (list(self),)


#: how deep :func:`read_only` follows nested mappings and lists
READ_ONLY_DEPTH = 64


def read_only(value: object, depth: int = 0) -> object:
    """``value`` with every mapping and list in it, nested, copied read-only (:class:`ReadOnlyDict`,
    :class:`ReadOnlyList`): what a runtime hands out of a model's metadata (``Runtime.info.extra``, which decides
    the fingerprints an adapter may name, :attr:`ModelInfo.fits`) and of a held adapter (its ``tensors``,
    ``shapes``, ``info``), so a caller cannot edit what loads and switches were checked against. Nested deeper than
    :data:`READ_ONLY_DEPTH` (or a cycle, infinitely deep) is a ``FormatError``, never a bare RecursionError. For a
    plain, editable copy: ``json.loads(info.to_json())`` or ``copy.deepcopy``."""
    if depth > READ_ONLY_DEPTH:
        raise FormatError(
            f"a model description or adapter info nests mappings and lists more than {READ_ONLY_DEPTH} deep (or "
            "refers to itself): pass plain JSON-like metadata"
        )
    if isinstance(value, Mapping):
        return ReadOnlyDict({k: read_only(v, depth + 1) for k, v in value.items()})
    if isinstance(value, list):
        return ReadOnlyList(read_only(v, depth + 1) for v in value)
    return value


@dataclass(frozen=True)
class ModelInfo:
    """Metadata the exporter writes and the runtime reads."""

    name: str
    fingerprint: str
    tensors: Mapping[str, TensorInfo] = field(default_factory=dict)
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    extra: Mapping[str, object] = field(default_factory=dict)  # e.g. labels, preprocessing
    #: fingerprints of twin files whose adapters fit this one too (set by the runtime, never stored)
    also_fits: tuple[str, ...] = field(default=(), compare=False)

    @property
    def source_fingerprint(self) -> str | None:
        """For a float model from this project's exporters: the hash of the torch weights it was exported from
        (:func:`source_fingerprint`); None for a quantized model (its integer adapters fit it alone) or another's."""
        fp = self.extra.get("source_fingerprint")
        return fp if isinstance(fp, str) and fp and "quantization" not in self.extra else None

    @property
    def fits(self) -> tuple[str, ...]:
        """The base fingerprints an adapter may name to load here: this file's, the float model's it was quantized
        from, and its twins' (:attr:`also_fits`)."""
        return tuple(f for f in (self.fingerprint, self.float_fingerprint, *self.also_fits) if f)

    @property
    def float_fingerprint(self) -> str | None:
        """For a model quantized by ``exporters.quantize_onnx``: the fingerprint of the float model it came from
        (float adapters trained on that model fit this one, requantized at load); else None."""
        q = self.extra.get("quantization")
        fp = q.get("float_fingerprint") if isinstance(q, Mapping) else None
        return fp if isinstance(fp, str) else None

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": MODEL_FORMAT,
                "version": MODEL_VERSION,
                "name": self.name,
                "fingerprint": self.fingerprint,
                "tensors": {k: t._json() for k, t in self.tensors.items()},
                "inputs": list(self.inputs),
                "outputs": list(self.outputs),
                "extra": dict(self.extra),
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> ModelInfo:
        from edge.format.io import load_json

        d = load_json(text, source="model metadata")
        if not isinstance(d, dict) or d.get("format") != MODEL_FORMAT:
            raise FormatError(
                f"model metadata format is {d.get('format') if isinstance(d, dict) else d!r}, expected {MODEL_FORMAT!r}"
            )
        if type(d.get("version")) is not int or d.get("version") != MODEL_VERSION:
            raise FormatError(
                f"model metadata version {d.get('version')!r} is not supported (this runtime reads {MODEL_VERSION}); "
                "re-export the model or upgrade the runtime"
            )
        try:
            tensors = {k: TensorInfo._from_json(t) for k, t in d["tensors"].items()}
            return cls(
                name=str(d["name"]),
                fingerprint=str(d["fingerprint"]),
                tensors=tensors,
                inputs=tuple(d.get("inputs", ())),
                outputs=tuple(d.get("outputs", ())),
                extra=dict(d.get("extra", {})),
            )
        except FormatError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise FormatError(f"model metadata is missing or has a malformed field: {e!r}") from e


def onnx_info(proto) -> ModelInfo:
    """The :class:`ModelInfo` an exporter stored in an ONNX model's ``metadata_props`` (``proto``: a ModelProto)."""
    for p in proto.metadata_props:
        if p.key == META_KEY:
            return ModelInfo.from_json(p.value)
    from edge.format.onnx_graph import quantized_ops

    if quantized := quantized_ops(
        proto.graph, proto.functions
    ):  # `edge import-onnx` would refuse it: say what to do at once
        raise FormatError(
            f"ONNX model {proto.graph.name!r} has no {META_KEY!r} metadata and was quantized by another tool "
            f"({', '.join(quantized)}), which records no grids for adapters: import the float model it was made from "
            "(`edge import-onnx`), then make its int8 twin with `edge quantize` (exporters.quantize_onnx)"
        )
    raise FormatError(
        f"ONNX model {proto.graph.name!r} has no {META_KEY!r} metadata: it was not exported by this project's "
        "exporter (use `exporters.export_onnx`, or `edge import-onnx` for a model exported elsewhere)"
    )


def _shape(value) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > 8 or not all(type(n) is int and n > 0 for n in value):
        raise ValueError(f"shape {str(value)[:80]} is not a list of positive integers")
    return tuple(value)
