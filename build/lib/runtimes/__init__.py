"""Device-side inference backends behind one numpy-only contract (see :mod:`runtimes.base`).

A backend is one module that registers its class in :data:`runtimes.base.BACKENDS`;
add it here with one line so it can be imported lazily by name.
"""

from __future__ import annotations

import importlib

from runtimes.base import BACKENDS, Backend, BackendOptions, WeightWrite

__all__ = ["BACKENDS", "Backend", "BackendOptions", "WeightWrite", "get_backend", "backend_names"]

_MODULES = {
    "onnxruntime": "runtimes.onnxruntime",
    "tflite": "runtimes.litert",
}


def backend_names() -> list[str]:
    return sorted(_MODULES)


def get_backend(name: str) -> type[Backend]:
    """The backend class registered as ``name`` (imports its module on first use)."""
    if name in _MODULES and name not in BACKENDS:
        importlib.import_module(_MODULES[name])
    return BACKENDS.get(name)
