"""What every exporter checks: its arguments, and the exported file's outputs against torch."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import numpy as np
import torch

from edge.convert.onnx_source import PROTOBUF_LIMIT
from edge.errors import ConfigError

__all__ = ["check_arguments", "compare", "flatten_outputs", "second_batch", "with_source"]


def with_source(model, extra) -> dict:
    """``extra`` plus the model's :func:`~edge.format.modelinfo.source_fingerprint` (every parameter and buffer as
    torch holds it), so the ``.onnx`` and ``.tflite`` exported from these weights are known as twins."""
    from edge.format.modelinfo import source_fingerprint

    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu().contiguous()
        state[k] = (v.view(torch.int16) if v.dtype == torch.bfloat16 else v).numpy()  # numpy has no bfloat16
    return {**dict(extra or {}), "source_fingerprint": source_fingerprint(state)}


def check_arguments(model, example_inputs, input_names, output_names, dynamic_axes, extra) -> None:
    if model.training:
        raise ConfigError(
            "model is in training mode (dropout and batch-norm updates break validation); call model.eval()"
        )
    if not example_inputs or not all(isinstance(x, torch.Tensor) for x in example_inputs):
        raise ConfigError("example_inputs must be a non-empty tuple of torch tensors, one per graph input")
    if len(input_names) != len(example_inputs):
        raise ConfigError(
            f"{len(input_names)} input_names {list(input_names)} for {len(example_inputs)} example inputs"
        )
    if len(set(input_names)) != len(input_names) or len(set(output_names)) != len(output_names):
        raise ConfigError(f"input and output names must be unique: {list(input_names)}, {list(output_names)}")
    unknown = sorted(set(dynamic_axes or {}) - set(input_names))
    if unknown:
        raise ConfigError(f"dynamic_axes names unknown inputs {unknown}; the inputs are {list(input_names)}")
    try:
        json.dumps(dict(extra or {}))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"extra must be a JSON-serialisable mapping (stored as file metadata): {e}") from e
    state = {t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values() if t.numel()}
    if sum(state.values()) > PROTOBUF_LIMIT:  # one tensor shared by two names counts once
        raise ConfigError(
            f"{type(model).__name__} holds {sum(state.values()):,} bytes of weights, over protobuf's 2 GB limit on "
            "one ONNX file; an adapter-ready file holds its weights inline (the device runtime reads no external "
            "data), so models this large are not supported: export a smaller model"
        )
    with torch.no_grad():
        n_out = len(flatten_outputs(model(*example_inputs)))
    if n_out != len(output_names):
        raise ConfigError(f"model returns {n_out} tensors but {len(output_names)} output_names were given")


def flatten_outputs(outputs) -> list[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, Mapping):
        outputs = list(outputs.values())
    if isinstance(outputs, (tuple, list)):
        return [t for o in outputs for t in flatten_outputs(o)]
    raise ConfigError(f"model output of type {type(outputs).__name__} is not a tensor, tuple, list or dict of tensors")


def compare(want: np.ndarray, got: np.ndarray, atol: float, rtol: float) -> str | None:
    """Describe how ``got`` misses ``want`` (np.allclose semantics), or None when it matches."""
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)} != torch shape {tuple(want.shape)}"
    if got.dtype != want.dtype:
        return f"dtype {got.dtype} != torch dtype {want.dtype}"
    if want.dtype == np.bool_:
        wrong = int(np.count_nonzero(got != want))
        return f"{wrong} of {want.size} values differ" if wrong else None
    if np.allclose(got, want, atol=atol, rtol=rtol):
        return None
    return f"max abs diff {float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)))):.3g}"


def second_batch(example_inputs: tuple[torch.Tensor, ...], batch: int) -> tuple[torch.Tensor, ...]:
    """Inputs of ``batch`` rows: random values for float inputs, tiled examples for the rest (ids, masks)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for x in example_inputs:
        if x.dim() == 0:
            out.append(x)
        elif x.is_floating_point():
            out.append(torch.randn((batch, *x.shape[1:]), generator=gen).to(x.dtype))
        else:
            reps = math.ceil(batch / x.shape[0])
            out.append(x.repeat(reps, *[1] * (x.dim() - 1))[:batch])
    return tuple(out)
