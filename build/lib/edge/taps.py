"""Feature taps: intermediate activations of an ONNX model as one extra output, plus a detector head.

OOD detection works best on several layers of the frozen encoder (HDFF, Mahalanobis
ensembles), but an exported model returns only its final outputs. :func:`tap_model`
writes a copy of the model whose extra output ``edge.features`` concatenates the tapped
tensors, each mean-pooled over every axis but the batch and the last
(``[B, T, C] -> [B, C]``), so the detector reads them from the **same** inference pass
that serves the input: no second run.

Cost, measured on the digits encoder at batch 16: two pooled taps and the concat add
about 1-3 % to a run. A detector head inside the graph (a ``Gemm`` fed with the
detector's matrices every run) was tried and added ~7 %: onnxruntime packs a fed matrix
on every call, so scoring stays in numpy.

Only nodes, graph inputs and outputs are added (constants as ``Constant`` nodes); the
stored weights are untouched, so the copy keeps the model's fingerprint and every
adapter of the model applies to it.

Tap sets (:data:`TAP_SETS`) read a pre-LN transformer's ``LayerNormalization`` inputs:
``attn`` (default) the residual stream after each attention sub-block, ``blocks`` after
each block, ``all`` after every sub-block. More taps score a little better but cost
more: the detector whitens ``d x d`` per input and ``d`` grows with each tap
(BENCHMARKS.md compares them). Pass tensor names to tap anything else.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edge.errors import ConfigError, FormatError
from edge.registry import Registry

__all__ = ["FEATURES", "TAP_SETS", "Tapped", "resolve_taps", "tap_model"]

FEATURES = "edge.features"


def _norm_inputs(model) -> list[str]:
    return [n.input[0] for n in model.graph.node if n.op_type == "LayerNormalization"]


#: named tap choices: name -> function(onnx.ModelProto) -> tensor names. With pre-LN blocks
#: (two LayerNormalization nodes each, plus a final one) the norm inputs are, in order: the
#: embedding, then after each attention and after each MLP sub-block.
TAP_SETS: Registry[Callable] = Registry("tap set")
TAP_SETS.add("attn", lambda m: _norm_inputs(m)[1::2])  # after each attention sub-block
TAP_SETS.add("blocks", lambda m: [t for t in _norm_inputs(m)[::-1][::2] if t != _norm_inputs(m)[0]][::-1])
TAP_SETS.add("all", lambda m: _norm_inputs(m)[1:])  # after every sub-block


def resolve_taps(model, taps: str | Sequence[str] = "attn") -> list[str]:
    """Tensor names for a tap set name (:data:`TAP_SETS`) or an explicit list."""
    if not isinstance(taps, str):
        return list(dict.fromkeys(taps))
    names = list(dict.fromkeys(TAP_SETS.get(taps)(model)))
    if not names:
        raise ConfigError(
            f"tap set {taps!r} finds nothing in model {model.graph.name!r} ({len(_norm_inputs(model))} "
            "LayerNormalization nodes); pass taps=[tensor names] (intermediate tensors, batch first)"
        )
    return names


@dataclass(frozen=True)
class Tapped:
    """What :func:`tap_model` wrote: the file, the tapped tensors, and the feature output with its width."""

    path: Path
    tensors: tuple[str, ...]  # the tapped tensors, in feature order
    width: int  # feature columns: the tapped tensors' last dimensions summed
    features: str = FEATURES  # output [B, width]


def tap_model(src: str | os.PathLike, dst: str | os.PathLike, taps: str | Sequence[str] = "attn") -> Tapped:
    """Write ``src`` with one more output, ``edge.features`` ``[B, d]``, to ``dst``.

    Every tap is mean-pooled over all axes but the first and last, and the pooled taps
    are concatenated in order. The file is rewritten only when its bytes would change,
    so a cache can keep it.
    """
    import onnx
    from onnx import TensorProto, helper

    from edge._io import atomic_write_bytes

    try:
        model = onnx.load(str(src))
    except Exception as e:  # protobuf DecodeError and friends
        raise FormatError(f"cannot read ONNX model {src}: {e}") from e
    taps = resolve_taps(model, taps)
    shapes = _shapes(model)
    taken = {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
    if FEATURES in taken:
        raise ConfigError(f"model {model.graph.name!r} already has an output {FEATURES!r}; tap the original")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    pooled, width = [], 0
    for i, tensor in enumerate(taps):
        shape = shapes.get(tensor)
        if not shape or not isinstance(shape[-1], int):
            raise ConfigError(
                f"tap {tensor!r} is not a tensor of model {model.graph.name!r} with a known last dimension; "
                f"some tensors: {sorted(shapes)[:8]}"
            )
        width += shape[-1]
        out = f"edge.tap{i}"
        axes = list(range(1, len(shape) - 1))
        if not axes:
            model.graph.node.append(helper.make_node("Identity", [tensor], [out], name=f"{out}.pool"))
        elif opset >= 18:
            const = helper.make_tensor(f"{out}.axes.value", TensorProto.INT64, [len(axes)], axes)
            model.graph.node.append(helper.make_node("Constant", [], [f"{out}.axes"], value=const))
            model.graph.node.append(
                helper.make_node("ReduceMean", [tensor, f"{out}.axes"], [out], keepdims=0, name=f"{out}.pool")
            )
        else:
            model.graph.node.append(
                helper.make_node("ReduceMean", [tensor], [out], axes=axes, keepdims=0, name=f"{out}.pool")
            )
        pooled.append(out)
    g = model.graph
    g.node.append(helper.make_node("Concat", pooled, [FEATURES], axis=1, name="edge.features.concat"))
    g.output.append(helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, ["batch", width]))
    helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, "edge.taps": ",".join(taps)})
    data = model.SerializeToString()
    dst = Path(dst)
    if not (dst.exists() and dst.read_bytes() == data):
        atomic_write_bytes(dst, data)
    return Tapped(dst, tuple(taps), width)


def _shapes(model) -> dict[str, tuple]:
    """Shape (ints, or names for symbolic dims) of every tensor onnx shape inference knows."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as e:  # onnx raises InferenceError and protobuf errors
        raise FormatError(f"shape inference failed on model {model.graph.name!r}: {e}") from e
    shapes = {}
    for v in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]:
        t = v.type.tensor_type
        if t.HasField("shape"):
            shapes[v.name] = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim)
    return shapes
