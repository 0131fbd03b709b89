"""The media type of a model file in the registry (its metadata is read by :func:`runtimes.read_model_info`)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["model_media_type"]


def model_media_type(path: str | Path) -> str:
    from edge.fleet.oci import MEDIA

    return MEDIA["model_tflite"] if Path(path).suffix == ".tflite" else MEDIA["model_onnx"]
