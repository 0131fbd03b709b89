"""What :meth:`edge.Runtime.run` says when onnxruntime fails a run of a model with inputs that declare no shape.

Such inputs' shapes are not checked before a run (:mod:`edge.format.feeds`), so a kernel's refusal may be the first
word of a wrong feed, or it may be a value out of range. :func:`run_failure` reads onnxruntime's message: a known
value error ("Out of range value in index tensor", "out of data bounds") is said as one, even at a node that reads
such an input itself (an index fed out of range); words of shapes, dimensions, broadcasting, rank or axes ("MatMul
dimension mismatch", "IsAxisInRange(axis, tensor_rank)": a 2-D feed to a model made for 3-D fails at a Softmax
downstream) as a shape problem of those inputs; anything else names both possibilities, asserting neither.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from edge.errors import ConfigError

__all__ = ["checked_failure", "run_failure"]

#: words of onnxruntime's kernel messages about shapes ("MatMul dimension mismatch", "Attempting to broadcast an
#: axis", "cannot be reshaped to the requested shape", "Invalid rank", "IsAxisInRange(axis, tensor_rank) was false.
#: axis 2 is not in valid range [-2,1]")
_SHAPE_WORDS = re.compile(
    r"\b(shapes?|dims?|dimensions?|broadcast\w*|rank|\w+_rank|axis|axes|IsAxisInRange|NumDimensions)\b", re.I
)
#: onnxruntime's messages of an index out of range, whatever shapes were fed (GatherElements "Out of range value in
#: index tensor", Gather and ScatterElements "indices element out of data bounds", GatherND "invalid indice found")
_VALUE_WORDS = re.compile(r"out of (?:data )?bounds|out of range value|invalid indices? found|invalid indice\b", re.I)
#: "Non-zero status code returned while running MatMul node. Name:'/layer/MatMul' Status Message: ..."
_NODE = re.compile(r"running (\S+) node\. Name:'([^']{0,400})'")
#: a source location, and the C++ signature after it ("/onnxruntime_src/.../x.cc:150 void f(...) [with T = long]")
_SOURCE = re.compile(r"^\S+\.(?:cc|cpp|h):\d+\s+(?:[^\[(]*::[^\[(]*\([^)]*\)\s*(?:\[[^\]]*\]\s*)?)?")


def run_failure(e: BaseException, free: Sequence[str], model: str, path: Path | None) -> ConfigError:
    """The one-line error for onnxruntime's ``Fail`` ``e`` running ``model`` (file ``path``) whose inputs ``free``
    declare no shape."""
    first, status, node, where = _read(e)
    reads = _node_inputs(path, node.group(2)) if node is not None else None
    fed = [n for n in free if reads is not None and n in reads]
    free = list(free)[:5]
    if _VALUE_WORDS.search(status):
        direct = f" (the node reads input(s) {fed[:5]} directly)" if fed else ""
        return ConfigError(
            f"onnxruntime failed running model {model!r}{where} ({first}): a value is out of range for it (an index "
            f"fed, or computed from the values fed){direct}; check the values fed, or run the file with onnxruntime "
            "directly for the node's whole message"
        )
    if _SHAPE_WORDS.search(status):
        which = f"node {node.group(2)[:80]!r} reads input(s) {fed[:5]}, and " if fed else ""
        return ConfigError(
            f"the model could not run these inputs ({first}); {which}input(s) {free} declare no shape in the model "
            "file, so their shapes are not checked before a run: feed the shapes the model was made for"
        )
    which = f"; the node reads input(s) {fed[:5]} itself" if fed else ""
    return ConfigError(
        f"onnxruntime failed running model {model!r}{where} ({first}); either a shape the model was not made for "
        f"(input(s) {free} declare no shape in the model file, so their shapes are not checked before a run{which}) "
        "or a value out of range for it (an index or axis computed from the values fed): feed the shapes the model "
        "was made for and check the values fed, or run the file with onnxruntime directly for the node's whole message"
    )


def checked_failure(e: BaseException, model: str, named: dict[str, tuple], dims=None) -> ConfigError:
    """The one-line error for onnxruntime's failure ``e`` running ``model`` when every input declares its shape.
    ``named``: the inputs whose shapes hold dimensions by name (``{"ids": ("batch", "seq")}``), whose sizes are free
    and so were not checked: a text longer than a position table, a batch another input does not share. ``dims``: the
    named dimensions the runtime fixed (:mod:`edge.dims`): a size that contradicts a fixed axis of the graph fails
    in a kernel, so the error names them."""
    first, status, node, where = _read(e)
    sized = ", ".join(f"{k} {list(v)}" for k, v in list(named.items())[:5])
    size = (
        f"a size the model was not made for (input(s) {sized} take any size along their named dimensions, which "
        "are not checked before a run: a text longer than the model's positions, a batch the inputs do not share)"
    )
    value = "a value out of range for it (an index fed, or a shape or index the graph computes from the values fed)"
    if _VALUE_WORDS.search(status) or not named:
        why, fix = (
            f"the inputs fed have the shapes the model declares, so {value}" if not named else value,
            "check the values fed",
        )
    elif _SHAPE_WORDS.search(status):
        why, fix = size, "feed the sizes the model was made for"
    else:
        why, fix = f"either {size} or {value}", "feed the sizes the model was made for and check the values fed"
    if dims:
        why, fix = f"{why}, or dims {dict(dims)} fix a size the graph contradicts", f"{fix}; check the dims"
    return ConfigError(
        f"onnxruntime failed running model {model!r}{where} ({first}); {why}: {fix}, or run the file with "
        "onnxruntime directly for the node's whole message"
    )


def _read(e: BaseException) -> tuple:
    """onnxruntime's message ``e`` read: its first line (:func:`_gist`), its status message, the failing node's match
    (op type, name) or None, and " in its OP node 'NAME'" for the error's wording ("" when no node is named)."""
    text = str(e).strip()
    first = _gist((text.splitlines() or [type(e).__name__])[0])
    node = _NODE.search(text)
    where = f" in its {node.group(1)} node {node.group(2)[:80]!r}" if node is not None else ""
    return first, text.partition("Status Message:")[2] or text, node, where


def _gist(line: str, keep: int = 300) -> str:
    """onnxruntime's first line, its kernel's words kept: the source location and C++ signature it may quote before
    them cut ("...gather_elements.cc:150 void onnxruntime::core_impl(...) [with ...] GatherElements op: Out of range
    value in index tensor"), and a line still too long cut at its start, where the node is named already."""
    head, sep, status = line.partition("Status Message:")
    status = _SOURCE.sub("", status.strip()) if sep else ""
    line = f"{head.strip()} {status}".strip() if sep else line.strip()
    return line if len(line) <= keep else "..." + line[-keep:]


def _node_inputs(path: Path | None, name: str) -> set[str] | None:
    """The inputs of the node named ``name`` in the model file (bodies too), or None when it is not found there
    (onnxruntime's fused nodes have names of their own) or the file cannot be read again."""
    if path is None or not name:
        return None
    try:
        from edge.format.onnx_graph import graphs
        from runtimes.loading import model_buffer
        from runtimes.onnx_file import parse_graph

        with model_buffer(path) as (buf, _):
            proto, _ = parse_graph(buf)
    except Exception:  # the error being worded is onnxruntime's; a file gone or changed since only loses the hint
        return None
    for g in graphs(proto.graph, proto.functions):
        for n in g.node:
            if n.name == name:
                return set(n.input)
    return None
