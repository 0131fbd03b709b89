"""Export a torch module to ``.tflite`` in the layout the edge runtime expects, and prove it.

:func:`export_tflite` converts with ``litert-torch`` (the ``tflite-export`` extra: it
pulls jax and ~90 packages, so it is not part of the host install), then edits the
flatbuffer with ``ai_edge_litert.schema_py_generated``'s object API:

- every parameter of two or more dimensions is found among the stored constant
  tensors by value (:mod:`exporters.layout_match`): under any axis permutation
  (``FULLY_CONNECTED`` stores linear weights ``[out, in]``, the torch layout; ``CONV_2D``
  filters are OHWI, depthwise filters ``[1, H, W, C]``, a Conv1d ``[O, 1, K, I]``), and
  where litert-torch folded the BatchNorm after a conv into its filter, scaled per output
  channel, checked bit for bit against that BatchNorm's fold. It is given its own buffer if
  the converter shared one and renamed to its ``named_parameters()`` name; its
  :class:`~edge.format.modelinfo.TensorInfo` records the permutation (``perm``) and the
  folded scale (``channel_scale``), so an adapter given on the torch weight lands on the
  stored one. A conv weight found nowhere is an error naming it (and the BatchNorm after
  it, if any);
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.errors import BackendUnavailableError, ConfigError, ExportValidationError
from edge.format.modelinfo import META_KEY, ModelInfo, TensorInfo, fingerprint
from edge.format.tflite import aligned_buffer, pack_model, set_metadata, tensor_name, unpack_model
from exporters.layout_match import BatchNormFold, StoredMatch, match_stored

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
    bias, are logged and left out), and every Conv1d/2d/3d weight must be found.

    Raises:
        BackendUnavailableError: litert-torch or ai-edge-litert is not installed.
        ConfigError: inconsistent arguments, or the model is in training mode.
        ExportValidationError: a parameter cannot be found in the converted file, or
            outputs differ from torch (one error listing every mismatch).
    """
    import torch

    from exporters.validate import check_arguments, flatten_outputs, with_source

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

    convs = _convs(model, example_inputs)
    content = _convert(model, example_inputs, slots, dynamic_batch)
    m = unpack_model(content)
    tensors = _map_parameters(m, params, slots, len(example_inputs), targets, convs)
    _rename_io(m, input_names, output_names, slots)
    from edge.format.tflite import fingerprint_arrays, read_tflite

    data = pack_model(m)
    info = ModelInfo(
        name=name,
        fingerprint=fingerprint(fingerprint_arrays(data, read_tflite(data))),
        tensors=tensors,
        inputs=input_names,
        outputs=output_names,
        extra=with_source(model, extra),
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


def _map_parameters(
    m, params: Mapping[str, np.ndarray], slots, n_inputs: int, targets, convs: Mapping[str, _Conv]
) -> dict[str, TensorInfo]:
    """Find each 2-D+ parameter's constant tensor by value, give it its own buffer, name it after the parameter.

    A parameter is looked for as stored under any axis permutation (unit axes aside: Conv1d is
    stored as a 2-D conv), then, if none holds it, scaled per output channel (a BatchNorm folded
    into the conv; checked against that BatchNorm when the conv feeds one). What is found nowhere
    raises when it is a target; with no ``targets`` given, when it is a conv weight (the rest is
    logged: e.g. a position table the converter folded into a constant).
    """
    sg = m.subgraphs[0]
    users: dict[int, list[int]] = {}
    for i, t in enumerate(sg.tensors):
        users.setdefault(t.buffer, []).append(i)
    consts = {i: _tensor_array(m, t) for i, t in enumerate(sg.tensors) if _has_data(m, t) and t.type == _FLOAT32}
    taken: set[int] = set()
    out: dict[str, TensorInfo] = {}
    missing: dict[str, str] = {}
    for pname, value in params.items():
        if value.ndim < 2:
            continue
        if pname in slots:
            idx = sg.inputs[n_inputs + list(slots).index(pname)]
            out[pname] = TensorInfo(pname, tuple(value.shape), transposed=False, slot=True)
            sg.tensors[idx].name = pname.encode()
            continue
        found = _find(sg, consts, taken, pname, value, convs.get(pname))
        if found is None:
            missing[pname] = _why_missing(pname, value, convs.get(pname))
            continue
        idx, match = found
        taken.add(idx)
        t = sg.tensors[idx]
        if len(users[t.buffer]) > 1:  # shared with another tensor: a write would leak into it
            users[t.buffer].remove(idx)
            m.buffers.append(aligned_buffer(np.array(m.buffers[t.buffer].data, np.uint8)))
            t.buffer = len(m.buffers) - 1
            users[t.buffer] = [idx]
        t.name = pname.encode()
        out[pname] = _tensor_info(pname, value.shape, match)
    required = [p for p in missing if (p in targets if targets is not None else p in convs)]
    if required:
        lines = [missing[p] for p in required[:10]] + (["..."] if len(required) > 10 else [])
        raise ExportValidationError(
            f"{len(required)} parameter(s) that adapters may target are not stored tensors of the converted model: "
            + "; ".join(lines)
            + ". "
            "Adapters cannot target such weights: remove unused modules, keep the op unfused, or pass targets= "
            "without them."
        )
    rest = [missing[p] for p in missing if p not in required]
    if rest:
        log.warning("parameters not found among the stored tensors, left out of the adapter targets: %s", rest)
    names = [tensor_name(t) for t in sg.tensors]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ExportValidationError(f"tensor names are not unique after renaming: {dup[:5]}")
    return out


@dataclass(frozen=True)
class _Conv:
    """A convolution weight, and the BatchNorm its output feeds (if any) with the scale that BatchNorm folds."""

    module: str
    batchnorm: str | None = None
    fold: BatchNormFold | None = None


def _convs(model, example_inputs) -> dict[str, _Conv]:
    """Every Conv1d/2d/3d weight by parameter name, with the BatchNorm that takes its output directly.

    Found by running ``model`` once with hooks: a BatchNorm whose input *is* a conv's output
    tensor (the object, not an equal value) is the one a converter folds into that conv.
    """
    import torch

    nn = torch.nn
    convs = {mod: name for name, mod in model.named_modules() if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d))}
    bns = {
        mod: n for n, mod in model.named_modules() if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))
    }
    out = {_weight_name(name): _Conv(name) for name in convs.values()}
    if not convs or not bns:
        return out
    produced: dict[int, tuple[str, object]] = {}

    def after_conv(mod, _args, output):
        produced[id(output)] = (convs[mod], output)  # the tensor is kept, so its id is not reused meanwhile

    def before_bn(mod, args):
        hit = produced.get(id(args[0])) if args else None
        if hit is None or hit[1] is not args[0] or mod.running_var is None:  # no running stats: nothing to fold
            return
        weight = None if mod.weight is None else mod.weight.detach().cpu().numpy()
        fold = BatchNormFold.of(weight, mod.running_var.detach().cpu().numpy(), mod.eps)
        out[_weight_name(hit[0])] = _Conv(hit[0], bns[mod], fold)

    handles = [m.register_forward_hook(after_conv) for m in convs]
    handles += [m.register_forward_pre_hook(before_bn) for m in bns]
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for h in handles:
            h.remove()
    return out


def _weight_name(module: str) -> str:
    return f"{module}.weight" if module else "weight"


def _find(sg, consts, taken, pname: str, value: np.ndarray, conv: _Conv | None):
    """``(tensor index, StoredMatch)`` of the stored tensor holding ``value``: as is or permuted first, then scaled."""
    hint = pname.rsplit(".", 1)[0]
    fold = None if conv is None else conv.fold
    for scaled in (False, True):
        found = []
        for i, arr in consts.items():
            if i in taken or arr.size != value.size:
                continue
            match = match_stored(value, arr, scaled=scaled, batchnorm=fold)
            if match is not None:
                found.append((i, match))
        if found:
            found.sort(key=lambda f: hint not in tensor_name(sg.tensors[f[0]]))  # ties (equal values): the named one
            return found[0]
    return None


def _tensor_info(pname: str, shape: tuple[int, ...], match: StoredMatch) -> TensorInfo:
    n = len(shape)
    perm = None if match.perm == tuple(range(n)) else tuple(match.perm)
    transposed = n == 2 and perm == (1, 0)
    scale = None if match.scale is None else tuple(float(v) for v in match.scale)
    if match.how == "ulps":
        log.info("%s: stored scaled per channel, reproduced within a few ulps (not bit for bit)", pname)
    return TensorInfo(
        pname, tuple(shape), transposed=transposed, perm=None if transposed else perm, channel_scale=scale
    )


def _why_missing(pname: str, value: np.ndarray, conv: _Conv | None) -> str:
    what = f"{pname} {list(value.shape)}"
    if conv is None:
        return f"{what}: no stored tensor holds its values in any axis layout (transformed by the converter, or unused)"
    if conv.batchnorm is None:
        return (
            f"{what} (conv {conv.module!r}, no BatchNorm after it): no stored tensor holds its values in any axis "
            "layout, nor scaled per output channel"
        )
    return (
        f"{what} (conv {conv.module!r} followed by BatchNorm {conv.batchnorm!r}): no stored tensor holds its values "
        "in any axis layout, nor scaled per output channel by the BatchNorm's weight / sqrt(running_var + eps)"
    )


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
                    problems.append(f"{out_name!r} on {label} ({kernels}): {problem}")
        backend.close()
    if problems:
        raise ExportValidationError(
            f"LiteRT outputs differ from torch beyond atol={atol:g}, rtol={rtol:g} in {len(problems)} case(s): "
            + "; ".join(problems)
            + ". The file was not written. Check for ops that differ between torch and LiteRT, or loosen the tolerance."
        )
