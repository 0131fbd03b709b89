"""Export a torch module to ONNX in the layout the edge runtime expects, and prove it.

:func:`export_onnx` runs the torch dynamo exporter without its optimizer (so every
parameter keeps its ``named_parameters()`` name as an initializer), folds the
``Transpose(weight) -> MatMul`` pattern into the stored weight so MatMul reads the
initializer directly (onnxruntime can prepack it, or a runtime can bind it as a graph
input with no per-run Transpose), writes :class:`~edge.format.modelinfo.ModelInfo` into the
file's metadata, checks the result on onnxruntime against torch and only then
replaces the file at ``path``. Host side only: this module imports torch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from tqdm.auto import tqdm

from edge.errors import ConfigError, ExportValidationError, FormatError
from edge.format.modelinfo import META_KEY, ModelInfo, TensorInfo, fingerprint, onnx_info
from edge.format.onnx_graph import consumers, keep_only, set_metadata, subgraph_reads
from edge.format.onnx_scaffold import drop_unread, simplify
from exporters.onnx_ops import translations
from exporters.quiet import library_prints
from exporters.validate import check_arguments, compare, flatten_outputs, second_batch, with_source

__all__ = ["export_onnx", "load_model_info", "ATTENTION", "ATTENTION_OPSET", "OPSET", "IR_VERSION"]

log = logging.getLogger(__name__)

OPSET = 20  # default ai.onnx opset of torch 2.13's exporter; onnxruntime >= 1.17 runs it
IR_VERSION = 10  # onnx >= 1.17 stamps newer IR versions that older onnxruntime rejects
ATTENTION_OPSET = 23  # the first with ai.onnx Attention; onnxruntime >= 1.23 has its CPU kernel
#: how the transformer exporters write attention: ``attention`` -> (transformers attn_implementation, opset).
#: "fused": torch's exporter writes scaled_dot_product_attention as one ai.onnx Attention node, which
#: onnxruntime runs as one kernel (scores, mask, softmax and the weighted sum); the Q/K/V/output projections
#: stay MatMuls over their own initializers, so every adapter target is still written in place.
#: "decomposed": MatMul/Softmax at the default opset, for runtimes without Attention-23 (onnxruntime < 1.23;
#: the QNN execution provider leaves it to the CPU: onnxruntime-qnn issue 646).
ATTENTION = MappingProxyType({"fused": ("sdpa", ATTENTION_OPSET), "decomposed": ("eager", OPSET)})
_OPSETS = range(18, 24)  # what torch 2.13's dynamo exporter writes natively
_MATMUL_OPS = ("MatMul", "Gemm")


def export_onnx(
    model: torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    path: str | os.PathLike,
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    name: str,
    dynamic_batch: bool = True,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    extra: Mapping[str, object] | None = None,
    slots: Sequence[str] = (),
    atol: float = 1e-4,
    rtol: float = 1e-3,
    validate: bool = True,
    progress: bool = True,
    opset: int = OPSET,
) -> ModelInfo:
    """Export ``model`` to ``path`` as a single self-contained ONNX file and return its ModelInfo.

    Args:
        model: module in eval mode; ``model(*example_inputs)`` returns a tensor or a
            (nested) tuple/list/dict of tensors, flattened in order to ``output_names``.
        example_inputs: positional inputs used for tracing and validation; axis 0 is the batch.
        input_names, output_names: graph input/output names, one per flattened input/output.
        name: model name recorded in the metadata.
        dynamic_batch: make axis 0 of every input dynamic (named ``"batch"``).
        dynamic_axes: further dynamic axes, ``{input_name: {axis: dim_name}}``; axes that share
            a ``dim_name`` must be equal (e.g. ``{"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}}``).
        extra: JSON-serialisable values stored in ``ModelInfo.extra`` (labels, preprocessing...).
        slots: parameter names of adapter branches (bottleneck, LoRA): recorded with ``slot=True``
            so runtimes feed them at run time and switch them in place; export them at zero.
        atol, rtol: validation tolerance, ``np.allclose`` semantics with torch as reference.
        validate: run the file on onnxruntime (CPU) against torch before writing it.
        progress: show a progress bar over the export steps.
        opset: the ai.onnx opset (18-23); 23 lets the exporter write ``scaled_dot_product_attention``
            as one Attention node (see :data:`ATTENTION`), which needs onnxruntime >= 1.23 on the device.

    The file at ``path`` is replaced atomically and only once validation passed; on any
    error a pre-existing file there is left untouched.

    Raises:
        ConfigError: inconsistent arguments, or the model is in training mode.
        ExportValidationError: a parameter is missing from the graph, or outputs differ from torch.
    """
    path = Path(path)
    example_inputs = tuple(example_inputs)
    input_names, output_names = tuple(input_names), tuple(output_names)
    check_arguments(model, example_inputs, input_names, output_names, dynamic_axes, extra)
    if opset not in _OPSETS:
        raise ConfigError(f"opset {opset} is not supported; allowed: {_OPSETS.start}-{_OPSETS.stop - 1}")

    steps = tqdm(total=3 if validate else 2, desc=f"export {name}", unit="step", disable=not progress, leave=False)
    with steps:
        steps.set_postfix_str("torch.onnx.export")
        proto = _torch_export(model, example_inputs, input_names, output_names, dynamic_batch, dynamic_axes, opset)
        steps.update()

        steps.set_postfix_str("post-process")
        tensors = _fold_weight_transposes(proto, model)
        _attention_3d(proto)
        simplify(proto.graph)  # zero biases of bias-less convs, CastLike constants: onnxruntime folds neither
        unknown = [s for s in slots if s not in tensors]
        if unknown:
            raise ConfigError(f"slots {unknown} are not 2-D+ parameters of the model; known: {sorted(tensors)[:10]}")
        tensors = {k: replace(t, slot=k in slots) for k, t in tensors.items()}
        stored = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
        info = ModelInfo(
            name=name,
            fingerprint=fingerprint(stored),
            tensors=tensors,
            inputs=input_names,
            outputs=output_names,
            extra=with_source(model, extra),
        )
        set_metadata(proto, META_KEY, info.to_json())
        onnx.checker.check_model(proto)
        steps.update()

        with _staged_file(path, proto.SerializeToString()) as tmp:
            if validate:
                steps.set_postfix_str("validate on onnxruntime")
                _validate(model, example_inputs, tmp, input_names, output_names, dynamic_batch, atol, rtol)
                steps.update()
    log.info("exported %s to %s (%d tensors, %s)", name, path, len(tensors), info.fingerprint)
    return info


def load_model_info(path: str | os.PathLike) -> ModelInfo:
    """Read the :class:`ModelInfo` an export wrote into an ONNX file's metadata.

    Raises:
        FormatError: the file is not ONNX or carries no edge metadata.
    """
    try:
        proto = onnx.load(os.fspath(path), load_external_data=False)
    except OSError:
        raise
    except Exception as e:  # protobuf's DecodeError and friends
        raise FormatError(f"{path} is not a readable ONNX file: {e}") from e
    return onnx_info(proto)


# -- export ---------------------------------------------------------------------------------------------------------


def _torch_export(
    model, example_inputs, input_names, output_names, dynamic_batch, dynamic_axes, opset
) -> onnx.ModelProto:
    """Run the dynamo exporter, unoptimized so initializers keep their torch names."""
    dims: dict[str, torch.export.Dim] = {}

    def dim(label: str) -> torch.export.Dim:
        return dims.setdefault(label, torch.export.Dim(label))

    shapes = []
    for input_name in input_names:
        axes = {0: dim("batch")} if dynamic_batch else {}
        axes.update({int(a): dim(label) for a, label in (dynamic_axes or {}).get(input_name, {}).items()})
        shapes.append(axes or None)

    try:
        with library_prints("torch.onnx.export"):  # a failed trace's FX graph, printed to stderr: not under --quiet
            program = torch.onnx.export(
                model,
                example_inputs,
                dynamo=True,
                optimize=False,
                external_data=False,
                verbose=False,
                opset_version=opset,
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_shapes=tuple(shapes) if dims else None,
                custom_translation_table=translations(),  # aten ops torch mistranslates (exporters.onnx_ops)
            )
    except torch.onnx.OnnxExporterError as e:  # its message: pages of advice for torch developers
        summary = str(e).split("## Exception summary", 1)[-1].strip().splitlines() or [type(e).__name__]
        inner = getattr(model, str(getattr(model, "prefix", "")), model)  # exporters.hf wraps the model it names
        raise ExportValidationError(
            f"torch.onnx.export cannot export {type(inner).__name__} at opset {opset}: {summary[0][:300]}. "
            "Exported with fused attention (scaled_dot_product_attention, export_hf_encoder's default for text), "
            "a model may export with attention='decomposed' (edge export --attention decomposed); else export it "
            "with torch.onnx.export(dynamo=False) and bring the file in with edge import-onnx"
        ) from e
    proto = program.model_proto
    proto.ir_version = min(proto.ir_version, IR_VERSION)
    return proto


# -- post-processing ------------------------------------------------------------------------------------------------


def _fold_weight_transposes(proto: onnx.ModelProto, model: torch.nn.Module) -> dict[str, TensorInfo]:
    """Store ``Transpose(W) -> MatMul/Gemm`` weights pre-transposed; map every parameter to its initializer.

    Returns a TensorInfo for every parameter of two or more dimensions (the adapter targets).
    """
    graph = proto.graph
    _name_tied(graph, model)
    initializers = {t.name: t for t in graph.initializer}
    params = dict(model.named_parameters())
    missing = [n for n in params if n not in initializers]
    if missing:
        err = ExportValidationError(
            f"{len(missing)} parameter(s) are not initializers of the exported graph: {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}. Parameters unused by forward() are dropped by the exporter: "
            "remove those modules or parameters (set the attribute to None, e.g. wav2vec2/HuBERT/WavLM's training-only "
            "masked_spec_embed: model.masked_spec_embed = None) before exporting."
        )
        err.parameters = missing  # exporters.hf_unused words it for edge export
        raise err

    users = consumers(graph)
    protected = subgraph_reads(graph) | {o.name for o in graph.output}
    tensors: dict[str, TensorInfo] = {}
    folded: set[str] = set()  # outputs of the Transpose nodes to drop
    for pname, param in params.items():
        if param.dim() < 2 or not param.numel():  # an empty one (DINOv3 without registers): nothing to adapt
            continue
        transposes = users.get(pname, [])
        foldable = (
            param.dim() == 2
            and pname not in protected
            and bool(transposes)
            and all(_is_transpose_2d(n) for n in transposes)
            and all(_only_feeds_matmul(n.output[0], users, protected) for n in transposes)
        )
        if foldable:
            init = initializers[pname]
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(init).T), pname))
            for node in transposes:
                _rename_input(users[node.output[0]], node.output[0], pname)
                folded.add(node.output[0])
            folded.add(pname)  # its value_info, if any, has the old shape
        tensors[pname] = TensorInfo(initializer=pname, shape=tuple(param.shape), transposed=foldable)

    # Protobuf node handles go stale once the node list is rebuilt: remove everything in one pass at the end.
    keep_only(graph.node, lambda n: not (n.op_type == "Transpose" and n.output[0] in folded))
    keep_only(graph.value_info, lambda v: v.name not in folded)
    return tensors


def _attention_3d(proto: onnx.ModelProto) -> int:
    """Feed each ai.onnx Attention node its 3-D ``[batch, seq, heads * head_size]`` Q, K and V; return the count.

    torch writes ``scaled_dot_product_attention`` over 4-D heads-first tensors, so every layer reshapes and
    transposes Q, K and V on the way in and its output on the way out: 24 Transposes and Reshapes in a 6-layer
    encoder that onnxruntime runs as separate copies. Attention-23 also takes the 3-D forms (with ``q_num_heads``
    and ``kv_num_heads``) and then returns the 3-D output the final Reshape made, so those nodes go. Only the
    exact pattern is rewritten (shapes known from the exporter's value_info); the weights are not touched.
    """
    graph = proto.graph
    users = consumers(graph)
    producer = {o: n for n in graph.node for o in n.output}
    shapes = {
        v.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]
        for v in (*graph.value_info, *graph.input, *graph.output)
    }
    protected = subgraph_reads(graph) | {o.name for o in graph.output}

    def sole(value: str, op: str):  # the one node reading ``value``, if it is an ``op`` and nothing else reads it
        readers = users.get(value, [])
        return readers[0] if len(readers) == 1 and readers[0].op_type == op and value not in protected else None

    def heads_first(node) -> bool:
        return next((list(a.ints) for a in node.attribute if a.name == "perm"), None) == [0, 2, 1, 3]

    dropped: set[str] = set()  # outputs of the nodes to remove
    count = 0
    for att in [n for n in graph.node if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]:
        if len(att.output) != 1 or any(a.name in ("q_num_heads", "kv_num_heads") for a in att.attribute):
            continue
        flat, heads = [], set()
        for value in att.input[:3]:
            t = producer.get(value)
            r = producer.get(t.input[0]) if t is not None and t.op_type == "Transpose" and heads_first(t) else None
            if r is None or r.op_type != "Reshape" or not (sole(value, "Attention") and sole(r.output[0], "Transpose")):
                break
            s4, s3 = shapes.get(value, []), shapes.get(r.input[0], [])
            if len(s4) != 4 or len(s3) != 3 or not isinstance(s4[1], int) or s4[1] < 1:
                break
            if all(isinstance(d, int) for d in (s3[2], s4[3])) and s3[2] != s4[1] * s4[3]:
                break
            flat.append((r.input[0], t, r))
            heads.add(s4[1])
        if len(flat) != 3 or len(heads) != 1:
            continue
        # the way out: Reshape (a view, optional) -> Transpose(0, 2, 1, 3) -> Reshape to 3-D
        chain, value = [], att.output[0]
        for op in ("Reshape", "Transpose", "Reshape"):
            node = sole(value, op)
            if node is None and op == "Reshape" and not chain:
                continue  # no leading view
            if node is None or (op == "Transpose" and not heads_first(node)):
                break
            chain.append(node)
            value = node.output[0]
        if len(chain) < 2 or chain[-2].op_type != "Transpose" or len(shapes.get(value, [])) != 3:
            continue
        for i, (value_3d, t, r) in enumerate(flat):
            att.input[i] = value_3d
            dropped.update((t.output[0], r.output[0]))
        dropped.update(n.output[0] for n in chain)
        att.output[0] = value
        (n_heads,) = heads
        att.attribute.extend(
            [onnx.helper.make_attribute("q_num_heads", n_heads), onnx.helper.make_attribute("kv_num_heads", n_heads)]
        )
        count += 1
    keep_only(graph.node, lambda n: not (n.output and n.output[0] in dropped and n.op_type in ("Reshape", "Transpose")))
    drop_unread(graph, protected)
    return count


def _name_tied(graph: onnx.GraphProto, model: torch.nn.Module) -> None:
    """Name a tied parameter's initializer as ``named_parameters()`` does (its first name), not the alias forward()
    reads it by (T5's ``shared.weight`` is read as ``encoder.embed_tokens.weight``): targets keep one torch name."""
    initializers = {t.name: t for t in graph.initializer}
    first: dict[int, str] = {}
    for alias, param in model.named_parameters(remove_duplicate=False):
        name = first.setdefault(id(param), alias)
        if alias != name and name not in initializers and alias in initializers and alias not in subgraph_reads(graph):
            initializers[name] = initializers.pop(alias)
            initializers[name].name = name
            _rename_input(graph.node, alias, name)
            for v in (*graph.value_info, *graph.output):
                if v.name == alias:
                    v.name = name


def _rename_input(nodes: list, old: str, new: str) -> None:
    for node in nodes:
        for i, inp in enumerate(node.input):
            if inp == old:
                node.input[i] = new


def _is_transpose_2d(node: onnx.NodeProto) -> bool:
    if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
        return False
    perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])  # default reverses the axes
    return perm == [1, 0]


def _only_feeds_matmul(value: str, consumers: dict, protected: set[str]) -> bool:
    users = consumers.get(value, [])
    return value not in protected and bool(users) and all(u.op_type in _MATMUL_OPS for u in users)


# -- saving ---------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _staged_file(path: Path, data: bytes):
    """Write ``data`` durably to a temp file next to ``path`` and yield its path.

    The temp file replaces ``path`` (atomically, ``os.replace``) only if the block succeeds;
    otherwise it is removed and ``path`` is untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable where the platform allows syncing a directory (POSIX)."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# -- validation -----------------------------------------------------------------------------------------------------


def _validate(model, example_inputs, file, input_names, output_names, dynamic_batch, atol, rtol) -> None:
    """Compare every output of ``file`` on onnxruntime with torch, on the examples and a second batch."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # run errors are raised (and shown once, in our line), not logged too
    try:
        session = ort.InferenceSession(os.fspath(file), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's Fail/InvalidGraph: the exporter wrote a graph it cannot load
        said = (str(e) or type(e).__name__).splitlines()[0][:300]
        raise ExportValidationError(
            f"onnxruntime cannot load the exported graph: {said}. The file was not written. An op was mistranslated: "
            "export with attention='decomposed' (edge export --attention decomposed), or export with "
            "torch.onnx.export(dynamo=False) and bring the file in with edge import-onnx"
        ) from e
    got_in = tuple(i.name for i in session.get_inputs())
    got_out = tuple(o.name for o in session.get_outputs())
    if got_in != input_names or got_out != output_names:
        raise ExportValidationError(
            f"exported graph has inputs {list(got_in)} and outputs {list(got_out)}, "
            f"expected {list(input_names)} and {list(output_names)}"
        )

    batch = example_inputs[0].shape[0] if example_inputs[0].dim() else 1
    batches = {f"examples (batch {batch})": example_inputs}
    second = batch + 1 if dynamic_batch else batch
    batches[f"second batch (batch {second})"] = second_batch(example_inputs, second)

    problems = []
    for label, inputs in batches.items():
        feed = {n: x.detach().cpu().numpy() for n, x in zip(input_names, inputs)}
        try:
            with torch.no_grad():
                expected = [t.detach().cpu().numpy() for t in flatten_outputs(model(*inputs))]
            actual = session.run(list(output_names), feed)
        except Exception as e:  # torch's or onnxruntime's own errors (InvalidArgument, Fail): a shape was fixed
            one = " (torch.export may fix a dimension of size 1: give an example batch of 2 or more)"
            one = one if second > batch == 1 else ""
            raise ExportValidationError(
                f"the model or its exported graph does not run on the {label}: {str(e).splitlines()[0][:300]}. "
                f"The code or torch.export fixed a dimension{one}; export with dynamic_batch=False (and the batch you "
                "serve), or make the code shape-independent. The file was not written."
            ) from e
        for out_name, want, got in zip(output_names, expected, actual):
            problem = compare(want, got, atol, rtol)
            if problem:
                problems.append(f"{out_name!r} on {label}: {problem}")
    if problems:  # one line, as the CLI prints it (edge.cli.one_line shows a newline as \n)
        raise ExportValidationError(
            f"onnxruntime outputs differ from torch beyond atol={atol:g}, rtol={rtol:g} in {len(problems)} case(s): "
            + "; ".join(problems)
            + ". The file was not written. Check for ops that differ between torch and ONNX, or loosen the tolerance."
        )
