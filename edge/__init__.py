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

from typing import TYPE_CHECKING

from edge.errors import (
    AdapterMismatchError,
    BackendUnavailableError,
    ConfigError,
    EdgeError,
    ExportValidationError,
    FormatError,
    OutOfMemoryError,
    RegistryError,
    RuntimeClosedError,
    SaturationError,
    SignatureError,
    WriteError,
)

if TYPE_CHECKING:  # for readers and type checkers; at run time each is imported on first use (__getattr__)
    from edge.format.adapter import Adapter, SparseDelta, load_adapter
    from edge.format.modelinfo import ModelInfo, TensorInfo, fingerprint
    from edge.learn.update import Updater
    from edge.runtime import Runtime, merge_weights

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
    "OutOfMemoryError",
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


#: public name -> the module it lives in, imported on first use: ``import edge`` (and so ``edge --help``) costs
#: only :mod:`edge.errors`; numpy comes with the first adapter or model, the backends with the first Runtime
_LAZY = {
    "Adapter": "edge.format.adapter",
    "SparseDelta": "edge.format.adapter",
    "load_adapter": "edge.format.adapter",
    "ModelInfo": "edge.format.modelinfo",
    "TensorInfo": "edge.format.modelinfo",
    "fingerprint": "edge.format.modelinfo",
    "Runtime": "edge.runtime",
    "merge_weights": "edge.runtime",
    "Updater": "edge.learn.update",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edge' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
