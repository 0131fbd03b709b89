"""Device-side inference backends behind one numpy-only contract (see :mod:`runtimes.base`).

A backend is one module with one :class:`~runtimes.base.Backend` subclass that owns
everything about itself (strategies, providers or delegates and their options, the probe
of what this machine has, the install hint, how to read its model file's metadata), plus
one line in :data:`TABLE`. Modules are imported on first use, so a device without LiteRT
never imports it.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from edge.errors import ConfigError, RegistryError
from runtimes.base import BACKENDS, Backend, BackendOptions, WeightWrite

__all__ = [
    "TABLE",
    "Backend",
    "BackendOptions",
    "WeightWrite",
    "backend_for_path",
    "backend_names",
    "get_backend",
    "model_files",
    "read_model_info",
]

#: backend name -> (module, model file suffixes). One line per backend.
TABLE: dict[str, tuple[str, tuple[str, ...]]] = {
    "onnxruntime": ("runtimes.onnxruntime", (".onnx",)),
    "tflite": ("runtimes.litert", (".tflite",)),
}


def backend_names() -> list[str]:
    return sorted(TABLE)


def get_backend(name: str) -> type[Backend]:
    """The backend class registered as ``name`` (imports its module on first use)."""
    if name not in TABLE:
        raise RegistryError(f"unknown backend {name!r}; known: {', '.join(backend_names())}")
    if name not in BACKENDS:
        importlib.import_module(TABLE[name][0])
    return BACKENDS.get(name)


def backend_for_path(path: str | os.PathLike) -> str:
    """The backend that runs a model file, by its suffix; an unknown suffix is an error naming the known ones."""
    suffix = Path(path).suffix.lower()
    for name, (_, suffixes) in TABLE.items():
        if suffix in suffixes:
            return name
    known = ", ".join(f"{s} ({n})" for n, (_, ss) in TABLE.items() for s in ss)
    raise ConfigError(f"cannot tell the backend of {Path(path).name} from its suffix; known: {known}")


def model_files(path: str | os.PathLike) -> dict[str, Path]:
    """The files of one exported model for each backend: ``path`` and the files beside it with the same stem and
    another backend's suffix (``encoder.onnx``, ``encoder.tflite``), in :data:`TABLE` order; only those that exist."""
    path = Path(path)
    found = {}
    for name, (_, suffixes) in TABLE.items():
        for suffix in suffixes:
            candidate = path if path.suffix.lower() == suffix else path.with_suffix(suffix)
            if candidate.is_file():
                found[name] = candidate
                break
    return found


def read_model_info(path: str | os.PathLike, backend: str | None = None):
    """The :class:`~edge.format.modelinfo.ModelInfo` stored in a model file, without building a session."""
    return get_backend(backend or backend_for_path(path)).read_info(Path(path))
