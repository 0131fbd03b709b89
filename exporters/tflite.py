"""Export a torch module to ``.tflite`` in the layout the edge runtime expects, and prove it.

:func:`export_tflite` converts with ``litert-torch`` (the ``tflite-export`` extra: it
pulls jax and ~90 packages, so it is not part of the host install), then edits the
flatbuffer with ``ai_edge_litert.schema_py_generated``'s object API:

- every parameter of two or more dimensions is found among the stored constant
  tensors by value (as stored, or transposed), given its own buffer if the converter
  shared one, and renamed to its ``named_parameters()`` name, so
  :class:`~edge.format.modelinfo.TensorInfo` maps it the same way as on ONNX
  (``FULLY_CONNECTED`` stores linear weights ``[out, in]``: the torch layout);
- slots (adapter-branch parameters) are converted as extra graph inputs named after
  the parameter, so the runtime feeds them on every run and switches them in place;
- inputs and outputs are renamed to ``input_names`` / ``output_names``;
- every buffer is 16-byte aligned, and the :class:`~edge.format.modelinfo.ModelInfo` JSON is
  stored in the model's ``metadata`` entry ``"edge"`` (the device reads it without torch).

The result is run on LiteRT through the ``tflite`` backend (XNNPACK and built-in
kernels) against torch, and written atomically only if every output matches.

The flatbuffer helpers (:func:`pack_model`, :func:`set_metadata`) need no torch: torch
and litert-torch are imported inside :func:`export_tflite` only.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from edge.errors import BackendUnavailableError, ConfigError, ExportValidationError
from edge.format.modelinfo import META_KEY, ModelInfo, TensorInfo, fingerprint
from edge.format.tflite import aligned_buffer, pack_model, set_metadata, tensor_name, unpack_model

__all__ = ["export_tflite", "load_model_info", "pack_model", "set_metadata", "unpack_model", "aligned_buffer"]

log = logging.getLogger(__name__)

_FLOAT32 = 0


def export_tflite(
    model,
    example_inputs: tuple,
    path: str | os.PathLike,
    *,
    name: str,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_batch: bool = False,
    extra: Mapping[str, object] | None = None,
    slots: Sequence[str] = (),
    targets: Sequence[str] | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    validate: bool = True,
) -> ModelInfo:
    """Convert ``model`` to ``path`` as a ``.tflite`` file and return its ModelInfo.

    Arguments mean what they mean for :func:`exporters.onnx.export_onnx`. The batch is
    fixed to the example's (export with batch 1): the runtime runs other batch sizes in
    chunks of it. ``dynamic_batch=True`` asks litert-torch for a dynamic axis 0 (0.10 fails
    to lower it for most graphs, even a Linear; then it warns and fixes the batch). Slots must be
    zero in ``model`` (no adapter active). ``targets`` names the parameters adapters may
    write: each must be found as a stored tensor; by default every 2-D+ parameter the
    converter kept as one is recorded (the rest, e.g. a position table folded into a
    bias, are logged and left out).

    Raises:
        BackendUnavailableError: litert-torch or ai-edge-litert is not installed.
        ConfigError: inconsistent arguments, or the model is in training mode.
        ExportValidationError: a parameter cannot be found in the converted file, or
            outputs differ from torch (one error listing every mismatch).
    """
    import torch

    from exporters.validate import check_arguments, flatten_outputs

    path = Path(path)
    example_inputs = tuple(example_inputs)
    input_names, output_names, slots = tuple(input_names), tuple(output_names), tuple(slots)
    check_arguments(model, example_inputs, input_names, output_names, None, extra)
    params = {k: v.detach().cpu().numpy() for k, v in model.named_parameters()}
    unknown = [s for s in slots if s not in params or params[s].ndim < 2]
    if unknown:
        raise ConfigError(f"slots {unknown} are not 2-D+ parameters of the model; known: {sorted(params)[:10]}")
    unknown = sorted(set(targets or ()) - set(params))
    if unknown:
        raise ConfigError(f"targets {unknown[:10]} are not parameters of the model")
    nonzero = [s for s in slots if np.any(params[s])]
    if nonzero:
        raise ConfigError(f"slots {nonzero} must be zero at export (no adapter active)")

    content = _convert(model, example_inputs, slots, dynamic_batch)
    m = unpack_model(content)
    tensors = _map_parameters(m, params, slots, len(example_inputs), targets)
    _rename_io(m, input_names, output_names, slots)
    from edge.format.tflite import read_tflite, stored_arrays

    data = pack_model(m)
    info = ModelInfo(
        name=name,
        fingerprint=fingerprint(stored_arrays(data, read_tflite(data))),
        tensors=tensors,
        inputs=input_names,
        outputs=output_names,
        extra=dict(extra or {}),
    )
    set_metadata(m, META_KEY, info.to_json().encode())
    data = pack_model(m)

    if validate:
        with torch.no_grad():
            _validate(model, example_inputs, data, input_names, output_names, atol, rtol, flatten_outputs)
    from edge.format.io import atomic_write_bytes

    atomic_write_bytes(path, data)
    log.info("exported %s to %s (%d tensors, %s)", name, path, len(tensors), info.fingerprint)
    return info


def load_model_info(path: str | os.PathLike) -> ModelInfo:
    """Read the :class:`ModelInfo` an export wrote into a ``.tflite`` file's metadata."""
    from runtimes import read_model_info

    return read_model_info(path, "tflite")


# -- conversion -----------------------------------------------------------------------------------------------------


def _convert(model, example_inputs, slots, dynamic_batch) -> bytes:
    """litert-torch conversion; slots become trailing graph inputs (fed zeros while tracing)."""
    import torch

    try:
        import litert_torch
    except ImportError as e:
        raise BackendUnavailableError(
            f"TFLite export needs litert-torch ({e}): pip install 'edge-adapt[tflite-export]' "
            "(a separate venv is advised: it pulls jax and ~90 packages)"
        ) from e

    class _WithSlots(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, *args):
            n = len(args) - len(slots)
            return torch.func.functional_call(self.inner, dict(zip(slots, args[n:])), args[:n], strict=False)

    wrapped = _WithSlots().eval() if slots else model
    zeros = tuple(torch.zeros_like(dict(model.named_parameters())[s]) for s in slots)
    args = example_inputs + zeros
    shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=4096)
        shapes = tuple({0: batch} if x.dim() else None for x in example_inputs) + (None,) * len(slots)
    with _fusion_barriers(model):
        try:
            return bytes(litert_torch.convert(wrapped, args, dynamic_shapes=shapes).model_content())
        except Exception as e:  # noqa: BLE001 - litert-torch raises many kinds; retry with a fixed batch
            if shapes is None:
                raise
            log.warning("litert-torch could not export a dynamic batch (%s); exporting the example batch only", e)
            return bytes(litert_torch.convert(wrapped, args).model_content())


@contextlib.contextmanager
def _fusion_barriers(model):
    """Put litert-torch's optimization barrier on the input of every ``nn.Linear`` while converting.

    Without it the converter folds a preceding elementwise scale into the weights (e.g. a
    LayerNorm's gamma: ``W' = W * gamma``), and the stored tensor is no longer the
    parameter an adapter edits. The barrier is an identity that the converter drops after
    its fusion passes; the LayerNorm affine then runs as its own (cheap) elementwise ops.
    """
    import torch
    from litert_torch.backend.optimization_barrier import optimization_barrier

    def hook(_module, args):  # two operands: the single-operand lowering of litert-torch 0.10 is broken
        x, _ = optimization_barrier(args[0], args[0])
        return (x, *args[1:])

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _map_parameters(m, params: Mapping[str, np.ndarray], slots, n_inputs: int, targets) -> dict[str, TensorInfo]:
    """Find each 2-D+ parameter's constant tensor by value, give it its own buffer, name it after the parameter."""
    sg = m.subgraphs[0]
    users: dict[int, list[int]] = {}
    for i, t in enumerate(sg.tensors):
        users.setdefault(t.buffer, []).append(i)
    consts = {i: _tensor_array(m, t) for i, t in enumerate(sg.tensors) if _has_data(m, t) and t.type == _FLOAT32}
    taken: set[int] = set()
    out: dict[str, TensorInfo] = {}
    missing = []
    for pname, value in params.items():
        if value.ndim < 2:
            continue
        if pname in slots:
            idx = sg.inputs[n_inputs + list(slots).index(pname)]
            out[pname] = TensorInfo(pname, tuple(value.shape), transposed=False, slot=True)
            sg.tensors[idx].name = pname.encode()
            continue
        hint = pname.rsplit(".", 1)[0]
        found = []
        for i, arr in consts.items():
            if i in taken or arr.size != value.size:
                continue
            if tuple(arr.shape) == value.shape and np.array_equal(arr, value):
                found.append((i, False))
            elif value.ndim == 2 and tuple(arr.shape) == value.shape[::-1] and np.array_equal(arr, value.T):
                found.append((i, True))
        if not found:
            missing.append(f"{pname} {tuple(value.shape)}")
            continue
        found.sort(key=lambda f: hint not in tensor_name(sg.tensors[f[0]]))  # ties (equal values): prefer the named one
        idx, transposed = found[0]
        taken.add(idx)
        t = sg.tensors[idx]
        if len(users[t.buffer]) > 1:  # shared with another tensor: a write would leak into it
            users[t.buffer].remove(idx)
            m.buffers.append(aligned_buffer(np.array(m.buffers[t.buffer].data, np.uint8)))
            t.buffer = len(m.buffers) - 1
            users[t.buffer] = [idx]
        t.name = pname.encode()
        out[pname] = TensorInfo(pname, tuple(value.shape), transposed=transposed)
    required = [p for p in missing if targets is None or p.split(" ")[0] in targets]
    if targets is None and missing:
        log.warning("parameters not stored as tensors (folded by the converter; not adapter targets): %s", missing)
        required = []
    if required:
        raise ExportValidationError(
            f"{len(required)} target parameter(s) are not stored tensors of the converted model: {required[:10]}"
            f"{' ...' if len(required) > 10 else ''}. The converter folded or transformed them (or forward() does "
            "not use them); adapters cannot target such weights. Remove unused modules, or keep the op unfused."
        )
    names = [tensor_name(t) for t in sg.tensors]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ExportValidationError(f"tensor names are not unique after renaming: {dup[:5]}")
    return out


def _rename_io(m, input_names, output_names, slots) -> None:
    sg = m.subgraphs[0]
    if len(sg.inputs) != len(input_names) + len(slots) or len(sg.outputs) != len(output_names):
        raise ExportValidationError(
            f"converted model has {len(sg.inputs)} inputs and {len(sg.outputs)} outputs, expected "
            f"{len(input_names)} (+{len(slots)} slots) and {len(output_names)}"
        )
    for idx, n in zip(sg.inputs, input_names):
        sg.tensors[idx].name = n.encode()
    for idx, n in zip(sg.outputs, output_names):
        sg.tensors[idx].name = n.encode()
    by_index = {int(i): n for i, n in zip(sg.inputs, [*input_names, *slots])}
    by_index.update({int(i): n for i, n in zip(sg.outputs, output_names)})
    for sd in m.signatureDefs or []:
        for t in [*(sd.inputs or []), *(sd.outputs or [])]:
            if t.tensorIndex in by_index:
                t.name = by_index[t.tensorIndex].encode()


def _has_data(m, t) -> bool:
    b = m.buffers[t.buffer]
    return b.data is not None and len(b.data) > 0


def _tensor_array(m, t) -> np.ndarray:
    shape = tuple(int(d) for d in (t.shape if t.shape is not None else ()))
    raw = np.asarray(m.buffers[t.buffer].data, np.uint8)
    if raw.size != 4 * int(np.prod(shape)):
        return np.empty(0, np.float32)
    return raw.view(np.float32).reshape(shape)


# -- validation -----------------------------------------------------------------------------------------------------


def _validate(model, example_inputs, data, input_names, output_names, atol, rtol, flatten) -> None:
    """Run ``data`` on LiteRT (XNNPACK and built-in kernels) against torch; one error lists every mismatch."""
    from edge.format.tflite import read_tflite
    from exporters.validate import compare, second_batch
    from runtimes.base import BackendOptions
    from runtimes.litert import LiteRTBackend

    batch = example_inputs[0].shape[0] if example_inputs[0].dim() else 1
    batches = {f"examples (batch {batch})": example_inputs}
    fb = read_tflite(data)
    if all(fb.tensors[i].signature[:1] == (-1,) for i in fb.inputs[: len(input_names)]):
        batches[f"second batch (batch {batch + 1})"] = second_batch(example_inputs, batch + 1)
    problems = []
    for strategy in ("rebuild", "builtin"):
        backend = LiteRTBackend(data, BackendOptions(strategy=strategy))
        for label, inputs in batches.items():
            expected = [t.detach().cpu().numpy() for t in flatten(model(*inputs))]
            got = backend.run({n: x.detach().cpu().numpy() for n, x in zip(input_names, inputs)})
            for out_name, want in zip(output_names, expected):
                problem = compare(want, got[out_name], atol, rtol)
                if problem:
                    kernels = "XNNPACK" if strategy == "rebuild" else "built-in kernels"
                    problems.append(f"  {out_name!r} on {label} ({kernels}): {problem}")
        backend.close()
    if problems:
        raise ExportValidationError(
            f"LiteRT outputs differ from torch beyond atol={atol:g}, rtol={rtol:g} in {len(problems)} case(s):\n"
            + "\n".join(problems)
            + "\nThe file was not written. Check for ops that differ between torch and LiteRT, or loosen the tolerance."
        )
