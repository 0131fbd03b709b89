"""What :func:`exporters.quantize_onnx` (and ``edge quantize``) checks in a graph before onnxruntime's quantizer.

:func:`refuse_quantized_input` refuses a model quantized already, before any work: an int8 twin ``edge quantize``
wrote (its metadata says so: it loads on :class:`edge.Runtime` as it is) or a file another tool quantized after it
was exported (QDQ or QOperator, dynamic, 4-bit ``MatMulNBits``/``GatherBlockQuantized``, bnb4: the op types of
:data:`edge.format.onnx_graph.QUANTIZED_OPS`). onnxruntime's quantizers take such a file and either fail inside
(``MatMulBnb4``: "shape_inference failed ... if you quantize a model already quantized") or quantize it a second
time; neither file records the integer weights' grids that adapters need, so the float model is what to pass.

:func:`fit_ceil_pools` rewrites, for static (QDQ) quantization, the one op whose integer kernel on onnxruntime
computes another function than its float op: an ``AveragePool`` with ``ceil_mode=1`` and ``count_include_pad=1``
(``torch.nn.AvgPool2d(..., ceil_mode=True)``'s export: every Hugging Face EfficientNet's pooler). onnxruntime's
``QLinearAveragePool`` divides a window that runs past the input's end (the ceil mode's overhang, which is not
padding) by the whole kernel, where the float op and torch divide by the cells inside (onnxruntime#16203, fixed for
the float op only): EfficientNet's pooler (EfficientNet-B0's: a 1280-wide kernel over a 7x7 map; the tiny test
config's: 128 over 1x1) comes out as zeros on onnxruntime 1.32, so the int8 twin's embedding had cosine 0.0 to the
float one. Without explicit pads, ``count_include_pad`` has nothing to include and ``count_include_pad=0`` is the same
function, which the integer kernel computes right: the attribute is rewritten so. Leaving the node out of
quantization is not enough: onnxruntime's optimizer moves the next ``QuantizeLinear`` back over a Reshape and fuses
the pool again. A pool with explicit pads is left out of quantization (``nodes_to_exclude``) and the drift check
judges the result.

:func:`computed_weight_convs` finds the convolutions whose weight the graph computes instead of storing it (torch's
``weight_norm``: ``g * v / |v|``, the positional convolution of every wav2vec2, HuBERT and WavLM encoder).
onnxruntime's integer convolution (``ConvInteger``) reads a stored weight, and its dynamic quantizer failed on such a
node ("Expected mul_30 to be an initializer"): in dynamic mode they are kept in float, named in the log, and their
parameters (``g`` and ``v``) stay float adapter targets. The static (QDQ) quantizer takes the computed weight as an
activation (calibrated), so it needs nothing.

:func:`bypass_weight_identities` lets every reader of a weight read it by its own name: torch's export writes a
weight two modules share, or two equal weights (``nn.TransformerEncoder``'s cloned layers), once, the second reader
through an ``Identity``. onnxruntime's dynamic quantizer does not look through it: the first MatMul read the int8
copy, the second the float one, and the target was dropped (an adapter on one copy would not reach the other). Read
directly, both ``MatMulInteger`` nodes read the one int8 initializer and the target stays one integer target.
"""

from __future__ import annotations

import logging

from edge.errors import ConfigError
from edge.format.onnx_graph import quantized_ops, subgraph_reads

log = logging.getLogger("exporters.quantize")

__all__ = [
    "bypass_weight_identities",
    "computed_weight_convs",
    "dynamic_ready",
    "fit_ceil_pools",
    "refuse_quantized_input",
    "refuse_twin",
]


def refuse_twin(info, name: str) -> None:
    """Refuse a model whose metadata says it is an int8 twin already (``.onnx`` or ``.tflite``)."""
    integer = [k for k, t in info.tensors.items() if t.quant is not None]
    quant = info.extra.get("quantization")
    if integer or quant is not None:
        mode = quant.get("mode", "?") if isinstance(quant, dict) else "?"
        raise ConfigError(
            f"{name} is quantized already: an int8 twin `edge quantize` wrote ({len(integer)} integer targets, {mode} "
            "mode), which loads on edge.Runtime as it is; to quantize with other options, pass the float model it "
            f"was made from (weights fingerprint {info.float_fingerprint or 'unrecorded'})"
        )


def refuse_quantized_input(graph, info, name: str) -> None:
    """Refuse an ONNX model quantized already: by ``edge quantize`` (``info``) or by another tool (``graph``'s ops).

    ``graph`` may be one read without its weights (:func:`runtimes.onnx_file.parse_graph`): nodes are all it needs."""
    refuse_twin(info, name)
    found = quantized_ops(graph)
    if found:
        raise ConfigError(
            f"ONNX model {name!r} is already quantized ({', '.join(found)}): import the float model it was made from "
            "with `edge import-onnx`, or pass the float file exported by this project (exporters.export_onnx, "
            "export_hf_encoder), and `edge quantize` that; a file another tool quantized records no grids for "
            "adapters, so neither edge quantize, edge import-onnx nor edge.Runtime takes it as it is"
        )


def fit_ceil_pools(graph) -> tuple[list[str], list[str]]:
    """Rewrite ``graph``'s ceil-mode, pad-counting AveragePools without pads to ``count_include_pad=0`` (the same
    function); return (their names, the names of such pools with pads, which static quantization keeps in float)."""
    rewritten, kept = [], []
    for node in graph.node:
        if node.op_type != "AveragePool" or node.domain not in ("", "ai.onnx"):
            continue
        attrs = {a.name: a for a in node.attribute}
        if not (getattr(attrs.get("ceil_mode"), "i", 0) and getattr(attrs.get("count_include_pad"), "i", 0)):
            continue
        auto = getattr(attrs.get("auto_pad"), "s", b"NOTSET")
        if any(getattr(attrs.get("pads"), "ints", ())) or auto not in (b"NOTSET", b"VALID"):  # pads count: kept
            kept.append(node.name)
        else:
            attrs["count_include_pad"].i = 0
            rewritten.append(node.name)
    return rewritten, kept


def computed_weight_convs(graph) -> list[str]:
    """Names of the ``Conv``/``ConvTranspose`` nodes whose weight is computed in ``graph``, not an initializer or a
    ``Constant`` (weight norm): onnxruntime's quantizers need a stored weight, so these stay in float."""
    stored = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    convs = (n for n in graph.node if n.op_type in ("Conv", "ConvTranspose") and n.domain in ("", "ai.onnx"))
    return [n.name for n in convs if len(n.input) > 1 and n.input[1] not in stored]


def dynamic_ready(graph) -> list[str]:
    """Ready ``graph`` for onnxruntime's dynamic quantizer (:func:`bypass_weight_identities`); return the names of
    the convolutions it must leave in float (:func:`computed_weight_convs`)."""
    shared = bypass_weight_identities(graph)
    if shared:
        log.info("dynamic: %d weight(s) read through Identity are read directly: %s", len(shared), shared[:5])
    return computed_weight_convs(graph)


def bypass_weight_identities(graph) -> list[str]:
    """Remove each ``Identity`` of an initializer (not a graph output, not read inside a control-flow body), its
    readers reading the initializer itself; return the names of the initializers so read."""
    stored = {t.name for t in graph.initializer}
    kept = {o.name for o in graph.output} | subgraph_reads(graph)
    alias: dict[str, str] = {}
    for n in graph.node:  # in graph order (topological): an Identity of an Identity of a weight is the weight too
        if n.op_type == "Identity" and n.domain in ("", "ai.onnx") and n.output[0] not in kept:
            if n.input[0] in stored or n.input[0] in alias:
                alias[n.output[0]] = alias.get(n.input[0], n.input[0])
    if not alias:
        return []
    for node in graph.node:
        for i, value in enumerate(node.input):
            if value in alias:
                node.input[i] = alias[value]
    left = [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    del graph.node[:]
    graph.node.extend(left)
    return sorted(set(alias.values()))
