"""The torch parameter values :func:`edge.convert.onnx_import.import_onnx` names an ONNX file's targets by: read from
safetensors only (a pickle checkpoint runs code when loaded, so it is refused)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edge.errors import FormatError

__all__ = ["read_state_dict"]

_MAX_STATE_DICT = 1 << 36  # bytes per safetensors file (the whole file is read into memory)


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Floating-point tensors of a ``.safetensors`` file, or of ``model.safetensors`` in a Hugging Face folder.

    Pickle checkpoints (``.bin``, ``.pt``) are refused: loading them runs code.
    """
    from edge.format.io import read_safetensors

    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("model*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
            hint = f" (found {pickles}: pickle, refused; re-save with safetensors)" if pickles else ""
            raise FormatError(f"{path} has no model.safetensors{hint}")
    elif path.exists() and not path.is_file():  # a FIFO, socket or device: named as what it is, never read
        from edge.format.paths import not_a

        raise FormatError(f"{path} {not_a(path, 'a .safetensors file or a Hugging Face model folder')}")
    elif path.suffix != ".safetensors" and path.exists():  # a missing path: read_safetensors names it
        raise FormatError(
            f"{path}: state dicts are read from .safetensors files only (pickle runs code when loaded); "
            "save one with safetensors.torch.save_file(model.state_dict(), 'model.safetensors')"
        )
    else:
        files = [path]
    out: dict[str, np.ndarray] = {}
    for f in files:
        for k, v in read_safetensors(f, _MAX_STATE_DICT, what="state dict").items():
            if v.dtype.kind == "f":
                out[k] = np.asarray(v, dtype=np.float32)
    return out
