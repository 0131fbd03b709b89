"""Reading an ONNX file exported elsewhere, before :mod:`edge.convert.onnx_import` looks for its weights.

:func:`read_onnx` reads the file bounded (a FIFO, a folder, ``/dev/zero`` or a symlink loop is a
:class:`~edge.errors.FormatError`, never a hang or a traceback) and its external data through onnx's
checked loader (relative paths inside the model's folder, regular files only); a model whose weights would pass
protobuf's 2 GB limit on one file is refused before its external data is read. :func:`hoist_constants`
turns weights an exporter left in ``Constant`` nodes into initializers, :func:`refuse_quantized` refuses a
graph already quantized (wholly or in part: its integer weights could not take an adapter), and
:func:`why_no_weights` says what to do with a graph whose weights are not float32 initializers (float16, bfloat16);
:func:`unique_node_names` renames nodes that repeat a name (onnxruntime refuses such a graph);
:func:`inline_functions` expands model-local functions (their weights are call arguments);
:func:`weights_off_inputs` takes weights off the graph inputs (IR < 4 listed every initializer there);
:func:`recurrent_weights` names the weights of GRU/LSTM/RNN nodes, which are not targets.
:func:`hoist_body_initializers` moves the weights of If/Loop/Scan bodies into the main graph (so the fingerprint
covers them) and :func:`control_flow_weights` names the weights bodies read: they are not targets, and are said so.
"""

from __future__ import annotations

import os
from collections.abc import Container, Mapping
from math import prod
from pathlib import Path

import numpy as np

from edge.errors import ConfigError, FormatError
from edge.format.onnx_graph import QUANTIZED_OPS, keep_only, quantized_ops

__all__ = [
    "MAX_MODEL_BYTES",
    "control_flow_weights",
    "floating",
    "hoist_body_initializers",
    "QUANTIZED_OPS",
    "hoist_constants",
    "inline_functions",
    "read_onnx",
    "recurrent_weights",
    "refuse_quantized",
    "tied_copies",
    "unique_node_names",
    "weights_off_inputs",
    "why_no_weights",
]

MAX_MODEL_BYTES = 1 << 40  # as edge.runtime: the limit keeps a device file finite


_FLOATS = (1, 10, 11, 16)  # onnx.TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16


def read_onnx(src: str | os.PathLike, limit: int = MAX_MODEL_BYTES, outside: dict | None = None):
    """The ``onnx.ModelProto`` of the regular file ``src``, external data (beside it) read in. ``outside``: a dict
    to put the large weights' bytes in instead of the message (:mod:`edge.convert.onnx_weights`: read in pieces)."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    from edge.convert.onnx_weights import load_external, read_model
    from edge.format.io import read_bounded

    src = Path(src)
    if outside is None:
        data = read_bounded(src, limit, what="ONNX model")
        try:
            proto = onnx.load_model_from_string(data)
        except Exception as e:  # protobuf's DecodeError and friends
            raise FormatError(f"{src} is not a readable ONNX file: {e}") from e
        size = len(data)
        del data
    else:
        proto, size = read_model(src, limit, outside, PROTOBUF_LIMIT)
    if not proto.graph.node:
        raise FormatError(
            f"{src} is not an ONNX model: its graph has no nodes ({size} bytes); give an exported .onnx file"
        )
    _refuse_over_protobuf_limit(proto, size, src)  # before its external data is read: it may be gigabytes
    try:
        if outside is None:
            load_external_data_for_model(proto, os.fspath(src.parent))
        else:
            load_external(proto, outside, os.fspath(src.parent))
    except Exception as e:  # onnx's checks: outside the folder, not a regular file, past its end
        hint = "keep the data files the exporter wrote beside the model"
        if "symbolic link" in str(e):  # a Hugging Face hub cache links every file of a snapshot into blobs/
            hint = "copy the model's folder with its links resolved (cp -rL; a Hugging Face hub cache links its files)"
        raise FormatError(f"{src}: cannot read its external data: {e}; {hint}") from e
    return proto


#: protobuf's limit on one serialised message: an adapter-ready ONNX file is one ModelProto with its weights inline
PROTOBUF_LIMIT = (1 << 31) - 1


def _refuse_over_protobuf_limit(proto, size: int, src: Path) -> None:
    """Refuse a model whose weights, stored inline, would pass protobuf's 2 GB limit, from the sizes its external
    tensors declare (dims x element size), so nothing of its external data is read. The adapter-ready file is one
    self-contained message (the device runtime reads no external data), so such a model cannot be imported."""
    from onnx import TensorProto, helper

    def nbytes(t) -> int:
        try:
            item = helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        except (KeyError, TypeError, ValueError):  # UNDEFINED, STRING: no fixed width, counted by their length
            item = 1
        return prod(max(0, d) for d in t.dims) * item  # Python ints: a hostile shape cannot wrap around

    tensors = list(proto.graph.initializer) + [
        a.t for n in proto.graph.node if n.op_type == "Constant" for a in n.attribute if a.HasField("t")
    ]
    external = sum(nbytes(t) for t in tensors if t.data_location == TensorProto.EXTERNAL)
    if external and size + external > PROTOBUF_LIMIT:
        raise ConfigError(
            f"{src}: {size + external:,} bytes with its external data ({external:,}), over protobuf's 2 GB limit "
            f"({PROTOBUF_LIMIT:,}) on one ONNX file; edge imports a model into one self-contained file, which the "
            "device runtime reads (it reads no external data), so models this large are not supported: export a "
            "smaller model (nothing of its external data was read)"
        )


def weights_off_inputs(proto) -> None:
    """Take the initializers off the graph inputs (an IR < 4 file lists every one there: a caller could feed a weight).

    The IR version is raised to 4, the first that allows an initializer no input names: an IR 3 file without them
    fails onnx's checker (so ``edge quantize``, through onnxruntime's quantizer, refused an imported file). IR 4
    changed nothing else; onnxruntime runs the file as before.
    """
    inits = {t.name for t in proto.graph.initializer}
    keep_only(proto.graph.input, lambda v: v.name not in inits)
    proto.ir_version = max(proto.ir_version, 4)


def hoist_constants(graph, weight_inputs: Mapping[str, int], pass_through: Container[str]) -> list[str]:
    """Turn float ``Constant`` nodes of 2+ dims read as a weight (through ``pass_through`` ops) into initializers.

    Returns their names. Only weights move: what onnx calls a constant and an initializer runs the same.
    """
    producer = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    hoisted: dict[str, object] = {}
    for node in graph.node:
        slot = weight_inputs.get(node.op_type)
        if node.domain not in ("", "ai.onnx") or slot is None or len(node.input) <= slot:
            continue
        value = node.input[slot]
        while value in producer and producer[value].op_type in pass_through:
            value = producer[value].input[0]
        const = producer.get(value)
        if const is None or const.op_type != "Constant" or value in outputs or value in hoisted:
            continue
        attr = next((a for a in const.attribute if a.name == "value"), None)
        if attr is not None and len(const.attribute) == 1 and attr.t.data_type in _FLOATS and len(attr.t.dims) >= 2:
            hoisted[value] = const  # a weight matrix or filter; index tables and shapes stay constants
    for name, const in hoisted.items():
        tensor = next(a.t for a in const.attribute if a.name == "value")
        tensor.name = name
        graph.initializer.append(tensor)
        graph.node.remove(const)
    return list(hoisted)


def inline_functions(proto, name: str) -> list[str]:
    """Inline the model's local functions (torch.onnx's ``export_modules_as_functions`` wraps each Linear in one, its
    weight a call argument) with onnx's inliner, so their weights are read by the ops inside; return their names."""
    from onnx.inliner import inline_local_functions

    if not proto.functions:
        return []
    names = sorted({f"{f.domain}.{f.name}" for f in proto.functions})
    try:
        inlined = inline_local_functions(proto)
    except Exception as e:  # onnx's own errors: a function it cannot expand
        raise FormatError(
            f"ONNX model {name!r}: its local functions {names} cannot be inlined ({e}); re-export "
            "it without export_modules_as_functions"
        ) from e
    proto.CopyFrom(inlined)
    return names


def unique_node_names(graph) -> int:
    """Give every node of ``graph`` that repeats an earlier node's name a new one; return how many were renamed.

    onnxruntime refuses a graph where two nodes share a name ("two nodes with same node name"), which some tools
    write (merged or hand-edited graphs); a node's name is a label only, so the model computes the same."""
    taken = {n.name for n in graph.node}
    seen: set[str] = set()
    renamed = 0
    for node in graph.node:
        if node.name and node.name in seen:
            k = 1
            while f"{node.name}_{k}" in taken:
                k += 1
            node.name = f"{node.name}_{k}"
            taken.add(node.name)
            renamed += 1
        seen.add(node.name)
    return renamed


def refuse_quantized(graph, name: str, functions=()) -> None:
    """Raise :class:`ConfigError` if ``graph`` (or one of the model's local ``functions``) is already quantized, even in
    part (some ops left in float).

    Its integer weights carry no record of their grids, and importing only its float weights would leave the
    quantized layers silently without adapters: the float model it was made from is the one to import.
    """
    quantized = quantized_ops(graph, functions)  # If/Loop/Scan bodies too: a quantized body would otherwise pass unsaid
    if quantized:
        raise ConfigError(
            f"ONNX model {name!r} is already quantized ({', '.join(quantized)}): import the float model it was made "
            "from, then make its int8 twin with `edge quantize` (exporters.quantize_onnx), which records the "
            "integer weights' grids so adapters can write them"
        )


def why_no_weights(graph, arrays: Mapping[str, np.ndarray]) -> str:
    """What to do about a graph with no float32 weight initializer to adapt ('' if nothing is known): weights of
    another float type, or of a type only ``ml_dtypes`` reads (float8, int4: weight-only storage cast to float)."""
    low = sorted({str(a.dtype) for a in arrays.values() if a.dtype != np.float32 and (floating(a.dtype) or _ml(a))})
    if low:
        return (
            f"; its weights are {'/'.join(low)}: export the model in float32 (model.float() before torch.onnx.export)"
        )
    return ""


def _ml(a: np.ndarray) -> bool:
    """Whether onnx read ``a`` as one of ``ml_dtypes``' types (float8, int4, ...), not numpy's own."""
    return a.dtype.type.__module__.startswith("ml_dtypes")


def floating(dtype: np.dtype) -> bool:
    """A float type, bfloat16 included (onnx reads it as ml_dtypes' bfloat16, whose numpy kind is 'V')."""
    return dtype.kind == "f" or dtype.name == "bfloat16"


def tied_copies(names, arrays: Mapping[str, np.ndarray]) -> dict[str, str]:
    """Targets that hold the same values as an earlier one, or its transpose: ``{later: earlier}``.

    An exporter stores a tied weight (an embedding reused as the output projection) as two initializers, so an
    adapter on one copy leaves the other as it was; identical untrained copies look the same and are named too."""
    seen: dict[tuple, list[str]] = {}
    out: dict[str, str] = {}
    for k in names:
        a = arrays[k]
        forms = [a, a.T] if a.ndim == 2 else [a]
        keys = [_tie_key(f) for f in forms]  # of the transpose too; the values then compared in full
        same = (o for key, f in zip(keys, forms) for o in seen.get(key, ()) if np.array_equal(f, arrays[o]))
        if (other := next(same, None)) is not None:
            out[k] = other
        else:
            seen.setdefault(keys[0], []).append(k)
    return out


def _tie_key(a: np.ndarray) -> tuple:
    """Shape, dtype and the first row and column (first and last 64 entries of other ranks): no copy of a weight, to
    keep the import's peak memory at one copy of the weights (:mod:`edge.convert.onnx_weights`)."""
    if a.ndim == 2 and a.size:
        return a.shape, a.dtype.str, a[0].tobytes(), a[:, 0].tobytes()
    flat = a.reshape(-1) if a.flags.c_contiguous else a.ravel()
    return a.shape, a.dtype.str, flat[:64].tobytes(), flat[-64:].tobytes()


def control_flow_weights(graph, arrays: Mapping[str, np.ndarray]) -> dict[str, str]:
    """Weights (float, 2-D and up) read inside If/Loop/Scan bodies: ``{name: why it is not a target}``.

    The import follows the main graph's ops only; a body's own initializers, and the main graph's weights a body reads
    (unless the main graph also reads them as a weight), would otherwise be left out without a word.
    """
    out: dict[str, str] = {}
    _body_weights(graph, "", arrays, out)
    return out


def _body_weights(g, where: str, arrays, out: dict[str, str]) -> None:
    """:func:`control_flow_weights` for the bodies of ``g``'s nodes, at any depth (a function, not a closure: a
    recursive closure is a reference cycle, which held ``arrays``, every weight, until a gc pass)."""
    from onnx import AttributeProto

    for node in g.node:
        for attr in node.attribute:
            subs = [attr.g] if attr.type == AttributeProto.GRAPH else list(attr.graphs)
            for sub in subs:
                at = f"{where}{node.op_type} {node.name or node.output[0]!r}"
                why = f"read inside the {attr.name} of {at}: weights of control-flow bodies are not adapted"
                for t in sub.initializer:
                    if t.data_type in _FLOATS and len(t.dims) >= 2:
                        out.setdefault(t.name, why.replace("read inside", "stored in"))
                for name in {i for n in sub.node for i in n.input}:
                    a = arrays.get(name)
                    if a is not None and a.dtype.kind == "f" and a.ndim >= 2:
                        out.setdefault(name, why)
                _body_weights(sub, f"{at} > ", arrays, out)


#: ONNX's recurrent ops -> the inputs holding their weights (W, R, B)
_RECURRENT = {"GRU": (1, 2, 3), "LSTM": (1, 2, 3), "RNN": (1, 2, 3)}


def recurrent_weights(graph, arrays: Mapping[str, np.ndarray]) -> dict[str, str]:
    """Weights read by GRU/LSTM/RNN nodes: ``{name: why it is not a target}``.

    ONNX stacks a recurrent layer's gates in its own order (GRU z, r, h; LSTM i, o, f, c), not torch's (r, z, n;
    i, f, g, o), in ``[directions, gates * hidden, ...]`` tensors: a delta in the torch layout has no place recorded
    for it there. They stay in the fingerprint, and are said, not silently left out.
    """
    out: dict[str, str] = {}
    for node in graph.node:
        slots = _RECURRENT.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        for i in slots or ():
            if i < len(node.input) and node.input[i] in arrays and arrays[node.input[i]].dtype.kind == "f":
                out.setdefault(
                    node.input[i],
                    f"the {'WRB'[i - 1]} input of {node.op_type} {node.name or node.output[0]!r}: recurrent weights "
                    "(gates stacked in ONNX's order, not torch's) are not adapted; adapt the layers around it",
                )
    return out


def hoist_body_initializers(graph) -> list[str]:
    """Move the initializers of If/Loop/Scan bodies (nested too) into the main graph; return their names.

    A body reads an outer-scope value as it reads its own, so the model computes the same; in the main graph they are
    covered by the fingerprint, which hashes the main graph's initializers (a weight left in a body could be changed
    after import and the runtime would load the file). A name the main graph already uses, or a body input's default,
    stays where it is.
    """
    from onnx import AttributeProto

    taken = {t.name for t in graph.initializer} | {v.name for v in graph.input}
    taken |= {o for n in graph.node for o in n.output}
    moved: list[str] = []

    def visit(g) -> None:
        for node in g.node:
            for attr in node.attribute:
                for sub in [attr.g] if attr.type == AttributeProto.GRAPH else list(attr.graphs):
                    keep, own = [], {v.name for v in sub.input}  # an initializer naming a body input is its default
                    for t in sub.initializer:
                        if t.name in taken or t.name in own:
                            keep.append(t)
                            continue
                        taken.add(t.name)
                        graph.initializer.append(t)
                        moved.append(t.name)
                    del sub.initializer[:]
                    sub.initializer.extend(keep)
                    visit(sub)

    visit(graph)
    return moved
