"""The lengths a model's dynamic input axes run at, for its footprint prediction (:mod:`runtimes.ort_footprint`).

A transformer exported with a dynamic sequence (``edge export --dynamic-seq``) declares its activations as
``[batch, seq, hidden]`` and its attention scores as ``[batch, heads, seq, seq]``: what a session holds grows with the
length it runs at, the scores with its square. Measured (fresh processes, ``lab.bench_memory``) on BERT and RoBERTa
h256-l4, DistilBERT h192-l3 and BERT h128-l2 with decomposed attention, dynamic int8 twins and a fused (opset 23)
BERT: ``bound`` grew from 27 MB at 64 tokens to 64 at 512 (BERT h256-l4) while the prediction stayed at one figure:
the walk left every ``seq``-sized tensor unsized and sized what followed the position table from the one row it read,
a 1-token run (9-16 % under at 64 tokens, 11-44 % at 128, 19-48 % at 256, 34-85 % at 512; fused models too). So the
prediction needs the length, and takes, in order:

1. ``dims``, what the caller says each axis runs at (``{"seq": 384}``);
2. the model's metadata: the ``max_seq_length`` (or a fixed ``seq_len``) its export records, where the runtime's
   tokenizer (:mod:`edge.text`) truncates every text (``edge export --dynamic-seq --seq-len N`` records N), for every
   dynamic axis but the batch (the exporter makes only a text model's sequence dynamic);
3. the graph's own bound: torch writes ``Min(512, seq)`` where the positions are sliced from a table of 512 rows (a
   longer input does not run);

else the tensors along that axis are not counted, as before lengths were known (a one-step run: a lower bound,
:attr:`~runtimes.ort_footprint.OrtParts.unsized` says why and what to pass, and a memory budget that weighs it logs
that; CNNs with dynamic height and width, audio models with a dynamic time axis and imported files with no record of
their length load and predict as they did). A length is never guessed.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Mapping

from edge.errors import ConfigError

__all__ = ["dim_value", "run_axes"]

#: a dim_param longer than this is not evaluated (a hostile file's; torch's are a few dozen characters)
_MAX_EXPR = 120
_CALLS = {"Min": min, "Max": max, "min": min, "max": max}
_BINOPS = {ast.Add: int.__add__, ast.Sub: int.__sub__, ast.Mult: int.__mul__, ast.FloorDiv: int.__floordiv__}


def dim_value(expr: str, axes: Mapping[str, int]) -> int | None:
    """The length of a symbolic dim (``seq``, ``Min(512, seq)``, ``2*seq + 1``) given each axis' length; None for
    one that names an unknown axis or is not such an expression (integers, + - * //, Min/Max only: nothing else of
    the string is run). A result below 1 is None."""
    if not expr or len(expr) > _MAX_EXPR:
        return None
    if expr in axes:
        return axes[expr]
    try:
        got = _eval(ast.parse(expr, mode="eval").body, axes)
    except (SyntaxError, ValueError, RecursionError, ZeroDivisionError, MemoryError):
        return None
    return got if got is not None and got >= 1 else None


def _eval(node, axes: Mapping[str, int]) -> int | None:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.Name):
        return axes.get(node.id)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        a, b = _eval(node.left, axes), _eval(node.right, axes)
        return None if a is None or b is None else _BINOPS[type(node.op)](a, b)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _CALLS and node.args:
        args = [_eval(a, axes) for a in node.args]
        return None if None in args or node.keywords else _CALLS[node.func.id](args)
    return None


def run_axes(
    proto, shapes: Mapping[str, object], dims: Mapping[str, int] | None, batch: int = 1
) -> tuple[dict[str, int], str]:
    """Each named axis of ``proto``'s graph inputs (but the constants in ``shapes`` or the graph's initializers) ->
    the length the prediction takes: the batch axis (the first, or one named ``batch``) ``batch``, any other from
    ``dims``, the metadata or the graph's bound (module doc); and, if one of them gives none, why the prediction is
    refused and what to pass (else ""). Raises ConfigError for ``dims`` that are not positive integers."""
    g = proto.graph
    const = {t.name for t in g.initializer} | set(shapes)
    given = _checked(dims or {})
    batch = given.get("batch", batch)
    axes: dict[str, int] = {"batch": batch}
    dynamic: dict[str, str] = {}  # axis -> the first input that has it
    unnamed: list[str] = []  # dynamic axes with no name: no value info can refer to them, no length sizes them
    for v in g.input:
        if v.name in const or not v.type.tensor_type.HasField("shape"):
            continue
        for i, d in enumerate(v.type.tensor_type.shape.dim):
            if d.HasField("dim_value"):
                continue
            name = d.dim_param
            if i == 0 or name == "batch":
                axes.setdefault(name or f"{v.name}[0]", given.get(name, batch))
            elif not name:
                unnamed.append(f"{v.name!r} (axis {i})")
            else:
                dynamic.setdefault(name, v.name)
    unknown = sorted(set(given) - set(dynamic) - set(axes))
    if unknown:  # a misspelt axis would leave the one meant at another length, unsaid
        raise ConfigError(
            f"dims {unknown} name no dynamic axis of model {g.name!r}'s inputs; its axes: "
            f"{sorted(set(dynamic) | set(axes))}"
        )
    longest = _metadata_length(proto)
    bounds = _graph_bounds(g, set(dynamic), shapes)
    for name in dynamic:
        if (length := given.get(name) or longest or bounds.get(name)) is not None:
            axes[name] = length
    unsized = [(n, v) for n, v in dynamic.items() if n not in axes]
    if unnamed and not unsized:
        return axes, (
            f"model {g.name!r}: input {unnamed[0]} has a dynamic axis with no name, so no length can be given for it "
            "and the tensors along it are not counted: the prediction is a lower bound (one step long). Name it "
            "(onnx.tools.update_model_dims.update_inputs_outputs_dims) and pass its length as dims, or export it "
            "with a fixed length"
        )
    if not unsized:
        return axes, ""
    name, source = unsized[0]
    return axes, (
        f"model {g.name!r}: input {source!r} has a dynamic axis {name!r} and nothing gives the length it runs at, so "
        "the tensors along it are not counted: the prediction is a lower bound (one step long). Export it with a "
        "fixed length (edge export --seq-len N without --dynamic-seq; exporters.export_onnx without that axis in "
        "dynamic_axes), or record a text model's longest run as extra max_seq_length in its metadata, or pass "
        f"dims={{{name!r}: N}} to OrtBackend.footprint_mb"
    )


def _checked(dims: Mapping[str, int]) -> dict[str, int]:
    bad = {k: v for k, v in dims.items() if type(v) is not int or v < 1}
    if bad:
        raise ConfigError(f"dims {bad} are not positive integers: give each dynamic axis' length, e.g. {{'seq': 256}}")
    return dict(dims)


def _metadata_length(proto) -> int | None:
    """A text model's longest run from its metadata (``max_seq_length``, or its fixed ``seq_len``), if recorded."""
    from edge.format.modelinfo import META_KEY

    for p in proto.metadata_props:
        if p.key != META_KEY:
            continue
        try:
            extra = json.loads(p.value).get("extra") or {}
        except (ValueError, AttributeError):  # a malformed record: the load refuses it (edge.format.modelinfo)
            return None
        n = (extra.get("max_seq_length") or extra.get("seq_len")) if isinstance(extra, dict) else None
        return n if type(n) is int and n >= 1 else None
    return None


def _graph_bounds(g, names: set[str], shapes: Mapping[str, object]) -> dict[str, int]:
    """Axis -> the length a slice of a stored table clips it to: torch writes ``[1, Min(512, seq)]`` on the ``Slice``
    of BERT's ``position_ids`` (a table of 512 positions, which a longer input overruns). Only a ``Slice`` whose data
    is a stored tensor (an initializer, or a writable one in ``shapes``) with an axis of that length counts: a prefix
    slice of an activation (pooling ``h[:, :4]`` writes ``Min(4, seq)``) bounds no input. Of several, the largest."""
    stored = {t.name: {int(d) for d in t.dims} for t in g.initializer}
    for k, v in shapes.items():
        dims = v[0] if isinstance(v, tuple) and v and isinstance(v[0], tuple | list) else ()
        stored[k] = {int(d) for d in dims}
    sliced = {
        o: stored[n.input[0]]
        for n in g.node
        if n.op_type == "Slice" and n.input and n.input[0] in stored
        for o in n.output
    }
    bounds: dict[str, int] = {}
    for v in (*g.value_info, *g.output):
        if v.name not in sliced:
            continue
        for d in v.type.tensor_type.shape.dim:
            p = d.dim_param
            if not p.startswith("Min(") or len(p) > _MAX_EXPR:
                continue
            try:
                call = ast.parse(p, mode="eval").body
            except (SyntaxError, ValueError, RecursionError, MemoryError):
                continue
            args = call.args if isinstance(call, ast.Call) else []
            consts = [
                a.value
                for a in args
                if isinstance(a, ast.Constant) and type(a.value) is int and a.value in sliced[v.name]
            ]
            axis = [a.id for a in args if isinstance(a, ast.Name) and a.id in names]
            if len(args) == 2 and consts and axis:
                bounds[axis[0]] = max(bounds.get(axis[0], consts[0]), consts[0])
    return bounds
