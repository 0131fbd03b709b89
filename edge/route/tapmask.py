"""Averaging token taps over the real tokens only (:func:`edge.route.taps.tap_model`'s ``mask``).

A ``[B, T]`` graph input marks the real tokens (1) and the padding (0). Its rows become averaging weights
(each sums to 1, or to 0 when it masks every token), and a token tap is averaged by one ``MatMul`` with them:
``[B, 1, T] @ [B, T, C]`` for a channels-last tap, ``[B, C, T] @ [B, T, 1]`` for a channels-first one (SqueezeBERT
keeps its hidden states as ``[B, C, T]`` between its Conv1d blocks), then a ``Flatten`` to ``[B, C]``. A
channels-first ``[B, C, L]`` map is a token map only when its last axis is provably the mask's (the same fixed
length, or the same named dimension, by onnx's or onnxruntime's symbolic shape inference): a 1-D CNN's map over a
waveform, whose length its strided convs change, is averaged over every position as before.
"""

from __future__ import annotations

from edge.errors import ConfigError

__all__ = [
    "MASKED",
    "MASKED_FIRST",
    "along_tokens",
    "check_tokens",
    "mask_input",
    "mask_weights",
    "pool_masked",
    "same_length",
]

#: pooling markers (in place of the axes) of a channels-last and a channels-first token tap
MASKED, MASKED_FIRST = "mask", "mask-first"
_WEIGHTS, _WEIGHTS_T = "edge.mask.w", "edge.mask.wt"


def mask_input(g, mask: str | None) -> str | None:
    """The ``[B, T]`` input named by ``mask`` (``"auto"``: ``attention_mask`` when the model has it), or None; a
    name that is no such input raises, naming the inputs."""
    inputs = {i.name: i for i in g.input}
    if mask == "auto":
        mask = "attention_mask" if "attention_mask" in inputs else None
    if mask is None:
        return None
    if not isinstance(mask, str) or mask not in inputs or len(inputs[mask].type.tensor_type.shape.dim) != 2:
        raise ConfigError(
            f"mask {mask!r} is not a [batch, tokens] input of model {g.name!r} (its inputs: {sorted(inputs)}); "
            "pass mask=None to average over every position"
        )
    return mask


def _length(g, mask: str):
    dim = next(i.type.tensor_type.shape.dim[1] for i in g.input if i.name == mask)
    return dim.dim_value if dim.HasField("dim_value") else dim.dim_param or None


def same_length(g, mask: str | None, length) -> bool:
    """Whether an axis of ``length`` (an int or a dimension's name) is provably the mask's token axis."""
    want = _length(g, mask) if mask is not None else None
    return want is not None and length is not None and type(want) is type(length) and want == length


def along_tokens(model, mask: str | None, taps: list) -> set[str]:
    """The channels-first ``[B, C, L]`` taps (``(tensor, shape)``) whose last axis is provably the mask's token axis:
    by onnx's shapes, else by onnxruntime's symbolic ones (a TorchScript file's ``Conv`` outputs: onnx names their
    length ``unk__N``, the symbolic inference the input's ``t``)."""
    g = model.graph
    found = {t for t, shape in taps if same_length(g, mask, shape[2])}
    rest = [t for t, _ in taps if t not in found]
    if mask is not None and rest:
        from edge.route.tapshapes import symbolic_shapes

        sym = symbolic_shapes(model)
        found |= {t for t in rest if len(sym.get(t) or ()) == 3 and same_length(g, mask, sym[t][2])}
    return found


def check_tokens(g, mask: str, taps: list) -> None:
    """Refuse a ``[B, T, C]`` tap whose ``T`` is not the mask's: the mask cannot weigh its positions (FunnelBaseModel
    pools 8 tokens to 4 between blocks; the MatMul by the weights would not even load)."""
    want = _length(g, mask)
    want = want if isinstance(want, int) else None  # two names of dimensions may still be equal
    for tensor, shape in taps:
        if isinstance(want, int) and isinstance(shape[1], int) and shape[1] != want:
            # the CLI takes no mask=None: name the taps given that do have one position per token, as --taps takes them
            ok = [t for t, s in taps if s[1] == want]
            named = f" (of those given: {','.join(ok)}; edge update: --taps {','.join(ok)})" if ok else ""
            raise ConfigError(
                f"tap {tensor!r} of model {g.name!r} has {shape[1]!r} positions where the mask {mask!r} has "
                f"{want!r} (the model pools its sequence): it cannot be averaged over the real tokens; pass "
                f"mask=None (an average over every position, padding included) or taps with one position per "
                f"token{named}"
            )


def mask_weights(g, mask: str, opset: int, first: bool) -> None:
    """Append the nodes turning the ``[B, T]`` mask input into averaging weights ``[B, 1, T]`` (and, with ``first``,
    their ``[B, T, 1]`` transpose for channels-first taps)."""
    from onnx import TensorProto, helper

    def const(name: str, dtype, dims: list[int], values: list) -> str:
        g.node.append(
            helper.make_node("Constant", [], [name], value=helper.make_tensor(f"{name}.value", dtype, dims, values))
        )
        return name

    g.node.append(helper.make_node("Cast", [mask], ["edge.mask.f"], to=TensorProto.FLOAT, name="edge.mask.cast"))
    shape = const("edge.mask.shape", TensorProto.INT64, [3], [0, 1, -1])
    g.node.append(helper.make_node("Reshape", ["edge.mask.f", shape], ["edge.mask.r"], name="edge.mask.reshape"))
    if opset >= 13:
        axes = const("edge.mask.axes", TensorProto.INT64, [1], [2])
        g.node.append(helper.make_node("ReduceSum", ["edge.mask.r", axes], ["edge.mask.n"], name="edge.mask.sum"))
    else:
        g.node.append(helper.make_node("ReduceSum", ["edge.mask.r"], ["edge.mask.n"], axes=[2], name="edge.mask.sum"))
    one = const("edge.mask.one", TensorProto.FLOAT, [], [1.0])
    g.node.append(helper.make_node("Max", ["edge.mask.n", one], ["edge.mask.d"], name="edge.mask.max"))
    g.node.append(helper.make_node("Div", ["edge.mask.r", "edge.mask.d"], [_WEIGHTS], name="edge.mask.div"))
    if first:
        g.node.append(helper.make_node("Transpose", [_WEIGHTS], [_WEIGHTS_T], perm=[0, 2, 1], name="edge.mask.t"))


def pool_masked(g, tensor: str, out: str, marker: str) -> None:
    """Append the ``MatMul`` and ``Flatten`` averaging token tap ``tensor`` over the real tokens into ``out``
    ``[B, C]`` (``marker``: :data:`MASKED` for ``[B, T, C]``, :data:`MASKED_FIRST` for ``[B, C, T]``)."""
    from onnx import helper

    pair = [_WEIGHTS, tensor] if marker == MASKED else [tensor, _WEIGHTS_T]
    g.node.append(helper.make_node("MatMul", pair, [f"{out}.sum"], name=f"{out}.pool"))
    g.node.append(helper.make_node("Flatten", [f"{out}.sum"], [out], axis=1, name=f"{out}.flatten"))
