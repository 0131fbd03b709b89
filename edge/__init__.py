"""Edge adaptation runtime: one frozen encoder, many tiny adapters, switched in place on device.

Public API (device side; numpy only, no torch)::

    import edge
    rt = edge.Runtime("encoder.onnx")          # backend "onnxruntime", best strategy
    rt.load_adapter("rotate.safetensors")
    rt.switch("rotate")                        # fused mode, in place; rt.switch(None) undoes bit-exactly
    out = rt.run({"pixels": x})

See README.md for the CLI, the adapter file format and device installs.
"""

from __future__ import annotations

from edge.errors import (
    AdapterMismatchError,
    BackendUnavailableError,
    ConfigError,
    EdgeError,
    ExportValidationError,
    FormatError,
    RegistryError,
    RuntimeClosedError,
    SaturationError,
    SignatureError,
    WriteError,
)
from edge.format.adapter import Adapter, SparseDelta, load_adapter
from edge.format.modelinfo import ModelInfo, TensorInfo, fingerprint

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdapterMismatchError",
    "BackendUnavailableError",
    "ConfigError",
    "EdgeError",
    "ExportValidationError",
    "FormatError",
    "ModelInfo",
    "RegistryError",
    "RuntimeClosedError",
    "SaturationError",
    "SignatureError",
    "Runtime",
    "SparseDelta",
    "TensorInfo",
    "Updater",
    "WriteError",
    "fingerprint",
    "load_adapter",
    "merge_weights",
]


def __getattr__(name: str):
    if name in ("Runtime", "merge_weights"):  # imported on first use: pulls in the backends
        from edge import runtime

        return getattr(runtime, name)
    if name == "Updater":
        from edge.learn.update import Updater

        return Updater
    raise AttributeError(f"module 'edge' has no attribute {name!r}")
