"""The adapter file format: sparse (SHiRA) and dense (bottleneck, LoRA) adapters.

An adapter file is one safetensors file. For every target tensor ``P`` (named as the
source parameter, e.g. ``blocks.0.attn.q.weight``) it holds either

* sparse (method ``shira``, fused into base weights): ``P.indices``, int32 ``[ndim, N]``
  (for a matrix: row, col) in the source (torch) layout, as HF PEFT stores
  ``shira_indices``; and ``P.values``, float32 ``[N]``, the trained deltas (merged
  ``W = W + scatter(values)``); for a target stored quantized (:class:`~edge.format.modelinfo.QuantInfo`)
  maybe ``P.qvalues``, ``[N]`` int8/uint8: the exact integers the device writes (an *integer*
  adapter; ``P.values`` keeps the float delta for reference). The metadata's ``dtype`` is then
  that type and ``quantized`` lists those targets (older runtimes refuse the file by its
  ``dtype``; float-only files are written exactly as before); or
* dense (methods ``adapter`` and ``lora``, written into the model's adapter *slots*):
  ``P.values``, float32 of the full source shape; or, when stored at low precision,
  ``P.codes`` (uint8, packed codes) and ``P.stats`` (float32, per-matrix statistics)
  decoded by :mod:`edge.format.quant` at load time.

The safetensors header's ``__metadata__["edge"]`` is a JSON object: ``format``
(``"edge.adapter"``), ``version``, ``method``, ``name``, ``base_fingerprint`` (see
:func:`edge.format.modelinfo.fingerprint`), ``dtype``, ``targets`` (name -> source shape),
``encodings`` (name -> ``{"scheme", "bits"}`` for low-precision dense targets) and
free-form ``info`` (mask kind, density, training figures).

Files are read with ``safetensors`` and ``json`` only; every structural problem is a
:class:`~edge.errors.FormatError`, every misfit to a model an
:class:`~edge.errors.AdapterMismatchError`. The two kinds of tensors and what each must satisfy are
:mod:`edge.format.deltas` (``SparseDelta`` and ``DenseDelta`` are importable from here too).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge.errors import AdapterMismatchError, FormatError
from edge.format.deltas import MAX_NAME_LEN as MAX_NAME_LEN  # re-exported: edge.convert reads it here
from edge.format.deltas import DenseDelta, SparseDelta, check_target
from edge.format.io import atomic_write_bytes
from edge.format.modelinfo import ModelInfo
from edge.registry import Registry

__all__ = [
    "max_adapter_bytes",
    "Adapter",
    "SparseDelta",
    "DenseDelta",
    "METHODS",
    "ADAPTER_FORMAT",
    "ADAPTER_VERSION",
    "load_adapter",
    "adapter_from_bytes",
    "check_targets",
    "inspect_adapter",
    "adapter_header",
]

ADAPTER_FORMAT = "edge.adapter"
#: every key of a version-1 metadata record (what :meth:`Adapter.save` writes)
_META_KEYS = frozenset(
    {"format", "version", "method", "name", "base_fingerprint", "dtype", "targets", "info", "quantized", "encodings"}
)
ADAPTER_VERSION = 1
MAX_HEADER_BYTES = 16 * 1024 * 1024  # a SHiRA header lists names and shapes, never megabytes
MAX_FILE_BYTES = 1 << 31  # an adapter file larger than 2 GiB is refused before reading

#: Adapter methods by name. A fusable method rewrites entries of base weights (sparse deltas);
#: a slot method writes whole adapter-branch tensors (dense), which the model must carry as slots.
METHODS: Registry[dict] = Registry("adapter method")
METHODS.add("shira", {"fusable": True, "doc": "sparse high-rank adapter: deltas at chosen weight entries"})
METHODS.add("adapter", {"fusable": False, "doc": "AdaptFormer bottleneck branch (down, ReLU, up, scale)"})
METHODS.add("lora", {"fusable": False, "doc": "low-rank branch B @ A on chosen linear layers"})


@dataclass(frozen=True)
class Adapter:
    """A sparse adapter: which entries of which base tensors change, and by how much."""

    name: str
    base_fingerprint: str
    tensors: Mapping[str, SparseDelta | DenseDelta]
    shapes: Mapping[str, tuple[int, ...]]
    method: str = "shira"
    info: Mapping[str, object] = field(default_factory=dict)
    encodings: Mapping[str, object] = field(default_factory=dict)  # name -> edge.format.quant.Encoded (low precision)

    @property
    def fusable(self) -> bool:
        return bool(METHODS.get(self.method)["fusable"])

    def __post_init__(self) -> None:
        _validate(self)

    nnz = property(lambda self: sum(d.nnz for d in self.tensors.values()), doc="entries the adapter changes")

    def save(self, path: str | os.PathLike) -> Path:
        """Write the adapter atomically (a crash leaves the previous file intact)."""
        from safetensors.numpy import save

        arrays: dict[str, np.ndarray] = {}
        encodings = {}
        for tname, d in self.tensors.items():
            if tname in self.encodings:
                enc = self.encodings[tname]
                arrays[f"{tname}.codes"] = np.ascontiguousarray(enc.codes, dtype=np.uint8)
                arrays[f"{tname}.stats"] = np.ascontiguousarray(enc.stats, dtype=np.float32)
                encodings[tname] = {"scheme": enc.scheme, "bits": int(enc.bits)}
                continue
            if isinstance(d, SparseDelta):
                arrays[f"{tname}.indices"] = np.ascontiguousarray(d.indices, dtype=np.int32)
                if d.qvalues is not None:
                    arrays[f"{tname}.qvalues"] = np.ascontiguousarray(d.qvalues)
            arrays[f"{tname}.values"] = np.ascontiguousarray(d.values, dtype=np.float32)
        quantized = sorted(k for k, d in self.tensors.items() if getattr(d, "qvalues", None) is not None)
        meta = {
            "format": ADAPTER_FORMAT,
            "version": ADAPTER_VERSION,
            "method": self.method,
            "name": self.name,
            "base_fingerprint": self.base_fingerprint,
            "dtype": str(self.tensors[quantized[0]].qvalues.dtype) if quantized else "float32",
            "targets": {k: list(v) for k, v in self.shapes.items()},
            "info": dict(self.info),
        }
        if quantized:
            meta["quantized"] = quantized
        if encodings:
            meta["encodings"] = encodings
        return atomic_write_bytes(path, save(arrays, metadata={"edge": json.dumps(meta, sort_keys=True)}))

    def check_against(self, info: ModelInfo) -> None:
        """Raise :class:`AdapterMismatchError` unless this adapter fits the model ``info``."""
        check_targets(self.name, self.base_fingerprint, self.shapes, self.fusable, info)
        ints = {k: d.qvalues.dtype for k, d in self.tensors.items() if getattr(d, "qvalues", None) is not None}
        bad = {k: f"{v} for {info.tensors[k].dtype}" for k, v in ints.items() if v != info.tensors[k].dtype}
        if bad or (ints and self.base_fingerprint != info.fingerprint):  # integers fit one quantized base only
            raise AdapterMismatchError(f"integer adapter {self.name!r} does not fit {info.name!r}: {bad or 'base'}")


def load_adapter(
    path: str | os.PathLike,
    *,
    trusted_keys: list[bytes] | None = None,
    policy=None,
    model: ModelInfo | None = None,
    max_bytes: int = MAX_FILE_BYTES,
) -> Adapter:
    """Read and validate an adapter file. Raises :class:`FormatError` for anything malformed.

    The file is read once, bounded (:func:`edge.format.io.read_bounded`: regular files only, at
    most ``max_bytes``). ``policy`` (an :class:`edge.format.signing.SignaturePolicy`, or one built
    from ``trusted_keys``, raw Ed25519 public keys) verifies the detached signature (``PATH.sig``)
    over the exact bytes read, before they are parsed; an unsigned or wrongly signed file raises
    :class:`~edge.errors.SignatureError`. With ``model``, every declared target is checked
    against it (:class:`AdapterMismatchError`) before any array is decoded.
    """
    from edge.format.signing import SignaturePolicy

    if policy is None:
        policy = SignaturePolicy(None if trusted_keys is None else tuple(trusted_keys))
    data = policy.read(path, max_bytes, what="adapter file")
    return adapter_from_bytes(data, source=str(path), model=model)


def adapter_from_bytes(data: bytes, *, source: str = "<bytes>", model: ModelInfo | None = None) -> Adapter:
    """Parse an adapter from the bytes of a safetensors file (see the module doc).

    Order matters for hostile files: metadata first (bounded JSON), then the declared targets
    (and, with ``model``, their fit to it), then the payload (the ``safetensors`` library),
    then each tensor's dtype and size against its declaration, and only then decoding.
    """
    meta = _read_metadata(data, source)
    method, shapes, encodings_meta = _declared(meta, source)
    sparse = METHODS.get(method)["fusable"]
    if model is not None:
        check_targets(str(meta.get("name")), meta["base_fingerprint"], shapes, sparse, model)
    arrays = _payload(data, source)
    quantized = _quantized(meta, shapes, arrays, source)
    expected = {f"{t}.qvalues" for t in quantized}
    for t in shapes:
        if t in encodings_meta:
            expected |= {f"{t}.codes", f"{t}.stats"}
        else:
            expected |= {f"{t}.indices", f"{t}.values"} if sparse else {f"{t}.values"}
    if set(arrays) != expected:
        extra, missing = sorted(set(arrays) - expected), sorted(expected - set(arrays))
        raise FormatError(f"{source}: tensors do not match metadata targets (missing: {missing}, unexpected: {extra})")
    encodings = {t: _decode_spec(source, t, spec, arrays, shapes[t]) for t, spec in encodings_meta.items()}
    if sparse:
        tensors = {
            t: SparseDelta(arrays[f"{t}.indices"], arrays[f"{t}.values"], arrays.get(f"{t}.qvalues")) for t in shapes
        }
    else:
        for t in shapes:
            if t not in encodings and arrays[f"{t}.values"].shape != shapes[t]:
                raise FormatError(f"{source}: {t}: values are {arrays[f'{t}.values'].shape}, declared {shapes[t]}")
        tensors = {
            t: DenseDelta(_decoded(source, t, encodings[t]) if t in encodings else arrays[f"{t}.values"])
            for t in shapes
        }
    info = meta.get("info", {})
    try:
        return Adapter(
            name=str(meta.get("name", Path(source).stem)),
            base_fingerprint=meta["base_fingerprint"],
            tensors=tensors,
            shapes=shapes,
            method=method,
            info=info if isinstance(info, dict) else {},
            encodings=encodings,
        )
    except AdapterMismatchError as e:  # self-inconsistent file: a format problem, not a model misfit
        raise FormatError(f"{source}: {e}") from e


def inspect_adapter(path: str | os.PathLike, *, max_bytes: int = MAX_FILE_BYTES) -> dict:
    """Metadata and sizes of an adapter file, validated like :func:`load_adapter` but never decoded."""
    from edge.format.io import read_bounded

    data = read_bounded(path, max_bytes, what="adapter file")
    source = str(path)
    meta = _read_metadata(data, source)
    method, shapes, encodings_meta = _declared(meta, source)
    if not encodings_meta:  # nothing to decode: validate it all, as a load would
        nnz = adapter_from_bytes(data, source=source).nnz
    else:  # validate every encoding (codes sized for the declared shape), decode none
        arrays = _payload(data, source)
        expected = {f"{t}.{part}" for t in encodings_meta for part in ("codes", "stats")}
        expected |= {f"{t}.values" for t in shapes if t not in encodings_meta}
        if set(arrays) != expected:
            raise FormatError(f"{source}: tensors {sorted(arrays)[:8]} do not match the targets {sorted(expected)[:8]}")
        for t, spec in encodings_meta.items():
            _decode_spec(source, t, spec, arrays, shapes[t])
        nnz = sum(int(np.prod(shape, dtype=np.int64)) for shape in shapes.values())
    info = meta.get("info", {})
    return {
        "name": str(meta.get("name", Path(source).stem)),
        "method": method,
        "dtype": meta.get("dtype", "float32"),
        "base_fingerprint": meta["base_fingerprint"],
        "nnz": nnz,
        "bytes": len(data),
        "targets": {k: list(v) for k, v in shapes.items()},
        "encodings": dict(encodings_meta),
        "info": info if isinstance(info, dict) else {},
    }


def check_targets(name: str, fingerprint: str, shapes: Mapping[str, tuple[int, ...]], fusable: bool, info: ModelInfo):
    """Raise :class:`AdapterMismatchError` unless targets ``shapes`` (of an adapter of that kind) fit ``info``."""
    if fingerprint not in info.fits:  # a float adapter also fits the int8 twin, and the .onnx's fits the .tflite
        raise AdapterMismatchError(
            f"adapter {name!r} was trained on base {fingerprint}, but the loaded model "
            f"{info.name!r} is {info.fingerprint}; train or convert the adapter for this model"
        )
    for tname, shape in shapes.items():
        if tname not in info.tensors:
            known = ", ".join(sorted(info.tensors)[:8])
            raise AdapterMismatchError(
                f"adapter {name!r} targets {tname[:120]!r}, which model {info.name!r} does not have "
                f"(its tensors include: {known}, ...)"
            )
        t = info.tensors[tname]
        if tuple(t.shape) != tuple(shape):
            raise AdapterMismatchError(
                f"adapter {name!r} expects {tname!r} of shape {tuple(shape)}, model has {tuple(t.shape)}"
            )
        if t.head:
            raise AdapterMismatchError(
                f"adapter {name!r} targets {tname!r}, a detector-head tensor of model {info.name!r} "
                "(written by the router, not a weight); adapters may only target model weights and slots"
            )
        if t.slot == fusable:
            want = "base weights" if fusable else "adapter slots (export the model with slots=...)"
            raise AdapterMismatchError(
                f"adapter {name!r} must target {want}, but {tname!r} is "
                f"{'a slot' if t.slot else 'a base weight'} of model {info.name!r}"
            )


def _payload(data: bytes, source: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    try:
        return load(data)
    except Exception as e:  # safetensors raises its own SafetensorError and others on corrupt data
        raise FormatError(f"{source}: corrupt safetensors payload: {e}") from e


def _declared(meta: dict, source: str) -> tuple[str, dict[str, tuple[int, ...]], dict]:
    """Method, target shapes and encodings as the metadata declares them, each strictly typed and bounded."""
    unknown = sorted(set(meta) - _META_KEYS)
    if unknown:  # a newer writer's field, or a forged one: never silently ignored
        raise FormatError(
            f"{source}: adapter metadata has unknown key(s) {[k[:40] for k in unknown[:5]]}; version "
            f"{ADAPTER_VERSION} knows {sorted(_META_KEYS)}; re-save the adapter with this version's Adapter.save"
        )
    method = meta.get("method")
    if not isinstance(method, str) or method not in METHODS:
        raise FormatError(f"{source}: adapter method {method!r} is unknown; known: {METHODS.names()}")
    if not isinstance(meta.get("base_fingerprint"), str):
        raise FormatError(f"{source}: metadata field 'base_fingerprint' must be a string")
    if "name" in meta and not isinstance(meta["name"], str):
        raise FormatError(f"{source}: metadata field 'name' must be a string, got {type(meta['name']).__name__}")
    targets = meta.get("targets")
    if not isinstance(targets, dict) or not targets:
        raise FormatError(f"{source}: metadata 'targets' must be a non-empty object of name -> shape")
    shapes = {}
    for t, shape in targets.items():
        if (
            not isinstance(shape, list)
            or not 1 <= len(shape) <= 8
            or not all(type(n) is int and 0 < n <= 1 << 40 for n in shape)
            or int(np.prod(shape, dtype=object)) > 1 << 40
        ):
            raise FormatError(f"{source}: target {t[:120]!r} has shape {str(shape)[:80]}, not 1-8 positive integers")
        shapes[t] = tuple(shape)
    encodings = meta.get("encodings", {})
    if not isinstance(encodings, dict) or (METHODS.get(method)["fusable"] and encodings):
        raise FormatError(f"{source}: 'encodings' must be an object, and only dense adapters have them")
    unknown = sorted(set(encodings) - set(shapes))
    if unknown:
        raise FormatError(f"{source}: encodings name targets that are not declared: {unknown[:5]}")
    return method, shapes, encodings


def adapter_header(data: bytes, source: str = "<bytes>") -> dict:
    """The metadata record of an adapter file's bytes (bounded JSON header: ``name``, ``base_fingerprint``, ...),
    checked for its format and version; the tensors are not read. Verify the bytes first (a policy's ``read``)."""
    return _read_metadata(data, source)


def _read_metadata(data: bytes, source: str) -> dict:
    from edge.format.io import read_edge_metadata

    meta = read_edge_metadata(
        data,
        source,
        fmt=ADAPTER_FORMAT,
        version=ADAPTER_VERSION,
        max_header=MAX_HEADER_BYTES,
        upgrade="upgrade the runtime or re-save the adapter",
    )
    if meta.get("dtype", "float32") not in ("float32", "int8", "uint8"):
        raise FormatError(f"{source}: dtype {meta.get('dtype')!r} is not supported; allowed: float32, int8, uint8")
    return meta


def _quantized(meta: dict, shapes: Mapping[str, tuple[int, ...]], arrays: Mapping, source: str) -> list[str]:
    """The targets an integer adapter holds integers for (``meta["quantized"]``), checked against its dtype."""
    quantized, dtype = meta.get("quantized", []), meta.get("dtype", "float32")
    if not isinstance(quantized, list) or not all(isinstance(t, str) and t in shapes for t in quantized):
        raise FormatError(f"{source}: 'quantized' must list declared targets, got {str(quantized)[:120]}")
    got = {str(getattr(arrays.get(f"{t}.qvalues"), "dtype", dtype)) for t in quantized}  # a missing one: refused later
    if bool(quantized) != (dtype != "float32") or got - {dtype}:
        raise FormatError(f"{source}: dtype {dtype!r} disagrees with the integer targets {quantized[:5]}")
    return quantized


def _decode_spec(source: str, tname: str, spec, arrays, shape):
    """The :class:`edge.format.quant.Encoded` of one low-precision target, checked."""
    from edge.format import quant

    if not isinstance(spec, dict) or set(spec) != {"scheme", "bits"}:
        raise FormatError(f"{source}: encoding of {tname!r} must be {{'scheme', 'bits'}}, got {spec!r}")
    codes, stats = arrays[f"{tname}.codes"], arrays[f"{tname}.stats"]
    if codes.dtype != np.uint8 or stats.dtype != np.float32:
        raise FormatError(f"{source}: {tname}: codes must be uint8 and stats float32, got {codes.dtype}, {stats.dtype}")
    if not isinstance(spec["scheme"], str) or type(spec["bits"]) is not int:
        raise FormatError(f"{source}: encoding of {tname!r}: scheme must be a string and bits an integer, got {spec!r}")
    try:
        return quant.Encoded(scheme=spec["scheme"], bits=spec["bits"], shape=tuple(shape), codes=codes, stats=stats)
    except (TypeError, ValueError) as e:
        raise FormatError(f"{source}: {tname}: bad encoding {spec!r}: {e}") from e


def _decoded(source: str, tname: str, enc) -> np.ndarray:
    from edge.format import quant

    try:
        values = quant.decode(enc)
    except (ValueError, KeyError) as e:  # EdgeError subclasses of ValueError included
        raise FormatError(f"{source}: {tname}: cannot decode {enc.scheme} {enc.bits}-bit codes: {e}") from e
    return np.ascontiguousarray(values, dtype=np.float32).reshape(enc.shape)


def _validate(a: Adapter) -> None:
    """Self-consistency of an adapter (no model needed). Raises AdapterMismatchError."""
    if a.method not in METHODS:
        raise AdapterMismatchError(f"adapter method {a.method!r} is unknown; known: {METHODS.names()}")
    if set(a.encodings) - set(a.tensors):
        raise AdapterMismatchError(f"encodings name unknown targets: {sorted(set(a.encodings) - set(a.tensors))}")
    if set(a.tensors) != set(a.shapes):
        raise AdapterMismatchError("adapter tensors and shapes name different targets")
    for tname, d in a.tensors.items():
        check_target(tname, tuple(a.shapes[tname]), d, a.fusable, a.method)


def max_adapter_bytes(info: ModelInfo) -> int:
    """The largest adapter file that can fit ``info``: every entry of every weight and slot changed
    (sparse: int32 indices per dimension, a float32 value and an integer one), plus a full-size header. A file
    over it is refused before a byte of it is read, so a huge file never holds up the runtime."""
    entries = sum((4 * len(t.shape) + 5) * int(np.prod(t.shape, dtype=np.int64)) for t in info.tensors.values())
    return min(MAX_FILE_BYTES, entries + 64 * len(info.tensors) + MAX_HEADER_BYTES + 8)
