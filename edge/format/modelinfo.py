"""What the runtime needs to know about an exported model, and its fingerprint.

The exporter stores this in the ONNX file's ``metadata_props`` (keys below); the
runtime reads it back without torch. Adapter indices are always given in the
*source* (torch) layout of a parameter, e.g. ``[out, in]`` for a linear weight;
``tensors`` maps each parameter to the stored initializer and says whether it is
stored transposed, so one adapter file serves every backend.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from edge.errors import FormatError

__all__ = ["ModelInfo", "TensorInfo", "fingerprint", "META_KEY", "MODEL_FORMAT", "MODEL_VERSION"]

META_KEY = "edge"  # metadata_props key holding ModelInfo as JSON
MODEL_FORMAT = "edge.model"
MODEL_VERSION = 1


def fingerprint(tensors: Mapping[str, np.ndarray]) -> str:
    """Content hash of a model's stored weights: names, dtypes, shapes and bytes.

    Computed over the tensors *as stored in the exported file* (after any layout
    change), sorted by name, so host and device agree without torch.
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        h.update(name.encode())
        h.update(b"\0" + arr.dtype.str.encode() + b"\0" + repr(tuple(arr.shape)).encode() + b"\0")
        h.update(memoryview(arr).cast("B"))
    return "sha256:" + h.hexdigest()[:32]


@dataclass(frozen=True)
class TensorInfo:
    """Where a source parameter lives in the exported file."""

    initializer: str  # name of the stored tensor
    shape: tuple[int, ...]  # source (torch) shape, in which adapter indices are given
    transposed: bool = False  # stored as the 2-D transpose of the source layout
    slot: bool = False  # an adapter-branch tensor: fed at run time, never prepacked, zero when no adapter is active
    head: bool = (
        False  # a detector-head tensor (edge.route.taps): written by the runtime's owner, outside the fingerprint
    )


@dataclass(frozen=True)
class ModelInfo:
    """Metadata the exporter writes and the runtime reads."""

    name: str
    fingerprint: str
    tensors: Mapping[str, TensorInfo] = field(default_factory=dict)
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    extra: Mapping[str, object] = field(default_factory=dict)  # e.g. labels, preprocessing

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": MODEL_FORMAT,
                "version": MODEL_VERSION,
                "name": self.name,
                "fingerprint": self.fingerprint,
                "tensors": {
                    k: {"initializer": t.initializer, "shape": list(t.shape), "transposed": t.transposed}
                    | ({"slot": True} if t.slot else {})
                    | ({"head": True} if t.head else {})
                    for k, t in self.tensors.items()
                },
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
            tensors = {
                k: TensorInfo(
                    str(t["initializer"]),
                    _shape(t["shape"]),
                    bool(t["transposed"]),
                    bool(t.get("slot", False)),
                    bool(t.get("head", False)),
                )
                for k, t in d["tensors"].items()
            }
            return cls(
                name=str(d["name"]),
                fingerprint=str(d["fingerprint"]),
                tensors=tensors,
                inputs=tuple(d.get("inputs", ())),
                outputs=tuple(d.get("outputs", ())),
                extra=dict(d.get("extra", {})),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise FormatError(f"model metadata is missing or has a malformed field: {e!r}") from e


def onnx_info(proto) -> ModelInfo:
    """The :class:`ModelInfo` an exporter stored in an ONNX model's ``metadata_props`` (``proto``: a ModelProto)."""
    for p in proto.metadata_props:
        if p.key == META_KEY:
            return ModelInfo.from_json(p.value)
    raise FormatError(
        f"ONNX model {proto.graph.name!r} has no {META_KEY!r} metadata: it was not exported by this project's "
        "exporter (use `exporters.export_onnx`, or `edge import-onnx` for a model exported elsewhere)"
    )


def _shape(value) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > 8 or not all(type(n) is int and n > 0 for n in value):
        raise ValueError(f"shape {str(value)[:80]} is not a list of positive integers")
    return tuple(value)
