"""Make a float32 ``.tflite`` file converted elsewhere (litert-torch, TF Lite converter) adapter-ready, no torch.

The ``.onnx`` counterpart is :mod:`edge.convert.onnx_import`. Here the weights are taken as stored:

- a target is a float32 constant of rank 2 and up that subgraph 0 reads as the weight of a
  ``FULLY_CONNECTED``, ``CONV_2D``, ``DEPTHWISE_CONV_2D``, ``BATCH_MATMUL``, ``EMBEDDING_LOOKUP`` or
  ``GATHER``; its adapter indices are given in the stored layout (TFLite's ``[out, in]``,
  ``[out, kh, kw, in]``, ``[1, kh, kw, out]``). It is named after the stored tensor, made a valid
  adapter target name: litert-torch's ``pkg.Model/pkg.Linear_fc1;`` becomes ``fc1`` (the attribute path;
  a clash gets ``_1``, ``_2``); ``report.targets`` and ``extra["imported"]["names"]`` map target to tensor;
- one tensor read by several operators (a weight used twice) is one target: a write reaches every
  reader, as it would in torch. A buffer that two tensors share (a converter's deduplication) is
  split, so an adapter on one leaves the other (listed under ``extra["imported"]["tied"]``);
- buffers stored outside the flatbuffer (``offset``/``size``) are read, bounded, and stored inline;
- a file with several signatures needs ``signature=``: the runtime runs one subgraph, so that
  signature's subgraph is moved first (refused when operators call subgraphs by index: control flow);
- tensors of subgraph 0 sharing a name (the fingerprint names every weight) get a suffix ``_1``, ``_2``
  (listed under ``extra["imported"]["renamed"]``);
- a file that is quantized (integer weights, or float16 weights behind ``DEQUANTIZE``) is refused:
  convert it in float32 and make the int8 twin with ``edge quantize`` (it records the grids adapters write).
  Only weights are looked at: a float model may hold integer constants (masks, tables) elsewhere;
- ``extra["imported"]["subgraphs"]`` counts the file's subgraphs; weights that other subgraphs read
  (control-flow bodies, other signatures) are not targets: their count is under
  ``extra["imported"]["untargeted_weights"]`` (an adapter cannot reach them).

The output is checked on LiteRT before it is written: same outputs as the input, bit for bit, on the
built-in kernels.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.errors import ConfigError, EdgeError, FormatError
from edge.format.adapter import MAX_NAME_LEN
from edge.format.io import atomic_write_bytes, read_bounded
from edge.format.modelinfo import META_KEY, ModelInfo, TensorInfo, fingerprint
from edge.format.tflite import (
    aligned_buffer,
    fingerprint_arrays,
    pack_model,
    read_tflite,
    set_metadata,
    tensor_name,
    unpack_model,
)

__all__ = ["import_tflite", "TfliteImport", "MAX_TFLITE_BYTES"]

MAX_TFLITE_BYTES = 2**31 - 1  # a flatbuffer addresses 2 GB; larger models keep weights outside (not supported here)

# builtin operator code -> input position of its weight
WEIGHT_INPUT = {9: 1, 3: 1, 4: 1, 126: 1, 7: 1, 36: 0}
OP_NAMES = {9: "FULLY_CONNECTED", 3: "CONV_2D", 4: "DEPTHWISE_CONV_2D", 126: "BATCH_MATMUL", 7: "EMBEDDING_LOOKUP"}
OP_NAMES[36] = "GATHER"
DEQUANTIZE = 6
FLOAT32 = 0


@dataclass(frozen=True)
class TfliteImport:
    """What :func:`import_tflite` found. ``info`` is the metadata written into the output file."""

    info: ModelInfo
    targets: dict[str, str]  # adapter target name -> stored tensor name
    readers: dict[str, str]  # stored tensor name -> the operator that reads it
    tied: dict[str, str]  # a target split from a buffer it shared -> the tensor it shared it with


def import_tflite(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    name: str | None = None,
    targets: Sequence[str] | None = None,
    signature: str | None = None,
    check: bool = True,
) -> TfliteImport:
    """Write ``src`` to ``out`` with adapter metadata; return what was found.

    Raises:
        FormatError: not a readable float32 ``.tflite`` file, already adapter-ready, quantized, or no weight found.
        ConfigError: ``targets`` names a tensor that is not a weight found; several signatures and no (or an
            unknown) ``signature``.
        BackendUnavailableError: ai-edge-litert (its flatbuffer schema) is not installed.
    """
    src = Path(src)
    data = read_bounded(src, MAX_TFLITE_BYTES, what=".tflite model")
    fb = read_tflite(data)
    if META_KEY in fb.metadata:
        raise FormatError(f"{src} is already adapter-ready (it has {META_KEY!r} metadata); load it with edge.Runtime")
    m = unpack_model(data)
    _inline_external(m, data, src)
    chosen = _signature_first(m, src, signature)
    renamed = _unique_names(m.subgraphs[0])
    if chosen is not None or renamed:
        fb = read_tflite(pack_model(m))
    _refuse_quantized(src, fb)
    sg = m.subgraphs[0]
    found = _find_targets(fb)
    if targets is not None:
        unknown = sorted(set(targets) - set(found))
        if unknown:
            raise ConfigError(f"targets {unknown[:5]} are not weights of {src}; found: {sorted(found)[:10]}")
        found = {k: v for k, v in found.items() if k in set(targets)}
    if not found:
        raise FormatError(
            f"{src} has no float32 weight read by a FULLY_CONNECTED, CONV_2D, DEPTHWISE_CONV_2D, BATCH_MATMUL, "
            "EMBEDDING_LOOKUP or GATHER operator in its first subgraph: nothing for an adapter to write"
        )
    tied = _split_shared(m, {i for i, t in enumerate(sg.tensors) if tensor_name(t) in found})
    base = pack_model(m)
    names = _target_names(found)
    stored = {t.name: t for t in read_tflite(base).tensors}
    tensors = {key: TensorInfo(tname, tuple(stored[tname].shape)) for key, tname in names.items()}
    in_names = tuple(tensor_name(sg.tensors[i]) for i in sg.inputs)
    out_names = tuple(tensor_name(sg.tensors[i]) for i in sg.outputs)
    extra = {"imported": {"format": "tflite", "producer": _producer(fb), "names": dict(names)}}
    extra["imported"]["subgraphs"] = len(m.subgraphs)
    if len(m.subgraphs) > 1:
        extra["imported"]["untargeted_weights"] = _other_weights(m)
    if tied:
        extra["imported"]["tied"] = dict(tied)
    if chosen is not None:
        extra["imported"]["signature"] = chosen
    if renamed:
        extra["imported"]["renamed"] = renamed
    info = ModelInfo(
        name=name or src.stem,
        fingerprint=fingerprint(fingerprint_arrays(base, read_tflite(base))),
        tensors=tensors,
        inputs=in_names,
        outputs=out_names,
        extra=extra,
    )
    set_metadata(m, META_KEY, info.to_json().encode())
    result = pack_model(m)
    if check:
        _same_outputs(data, result, src, chosen)
    atomic_write_bytes(out, result)
    return TfliteImport(info, names, found, tied)


def _target_names(found: dict[str, str]) -> dict[str, str]:
    """Adapter target name -> stored tensor name (adapter names hold no ``/``, ``\\``, NUL or ``..``)."""
    out: dict[str, str] = {}
    for k, tname in enumerate(found):
        key = tname
        if not _valid(key):
            # litert-torch: 'pkg.Model/torch.nn.modules.linear.Linear_fc1;...' -> 'fc1' (class path, attribute);
            # other converters (TF/Keras: 'sequential/dense/MatMul') keep their path, '/' written '.'
            segs = tname.split(";", 1)[0].split("/")
            parts = [seg.rsplit(".", 1)[-1].split("_", 1) for seg in segs[1:] if "." in seg]
            key = ".".join(p[1] for p in parts if len(p) == 2 and p[1]) or ".".join(x for x in segs if x and x != "..")
            key = key if _valid(key) else f"weight{k}"
        base, n = key, 0
        while key in out:
            n += 1
            key = f"{base}_{n}"
        out[key] = tname
    return out


def _valid(name: str) -> bool:
    return bool(name) and len(name) <= MAX_NAME_LEN and not any(c in name for c in "\0/\\") and ".." not in name


def _producer(fb) -> str:
    return "litert-torch" if "keep_stablehlo_constant" in fb.metadata else "unknown"


def _weights(fb):
    """The stored tensors subgraph 0's operators read as weights, with the reading operator's code."""
    for op in fb.ops:
        pos = WEIGHT_INPUT.get(op.code)
        if pos is not None and pos < len(op.inputs) and op.inputs[pos] >= 0 and fb.tensors[op.inputs[pos]].nbytes:
            yield fb.tensors[op.inputs[pos]], op.code


def _other_weights(m) -> int:
    """How many stored weights the operators of subgraphs other than 0 read (they are not targets)."""
    codes = [max(int(c.builtinCode), int(c.deprecatedBuiltinCode)) for c in m.operatorCodes]
    seen = set()
    for g, sg in enumerate(m.subgraphs[1:], 1):
        for op in sg.operators or []:
            pos = WEIGHT_INPUT.get(codes[op.opcodeIndex])
            if pos is not None and op.inputs is not None and pos < len(op.inputs) and op.inputs[pos] >= 0:
                b = m.buffers[sg.tensors[op.inputs[pos]].buffer]
                if b.data is not None and len(b.data):
                    seen.add((g, int(op.inputs[pos])))
    return len(seen)


def _refuse_quantized(src: Path, fb) -> None:
    for t, code in _weights(fb):
        table = OP_NAMES[code] in ("GATHER", "EMBEDDING_LOOKUP")  # an integer table with no grid is data, not weights
        if table and not t.scale and t.dtype is not None and np.dtype(t.dtype).kind in "iub":
            continue
        if t.scale or t.dtype != np.float32:
            kind = np.dtype(t.dtype).name if t.dtype is not None else f"TensorType {t.type}"
            grid = " on a quantization grid" if t.scale else ""
            raise FormatError(
                f"{src} stores tensor {t.name!r} as {kind}{grid}: a quantized or float16 file records no grid an "
                "adapter can write; convert the model in float32, import that, and make its int8 twin with "
                "`edge quantize`"
            )
    if any(op.code == DEQUANTIZE for op in fb.ops):
        raise FormatError(f"{src} dequantizes stored weights at run time (DEQUANTIZE); convert it in float32")


def _unique_names(sg) -> dict[str, str]:
    """Rename tensors whose name another tensor of ``sg`` holds (or that have none); return new -> old."""
    taken = {tensor_name(t) for t in sg.tensors}
    seen: set[str] = set()
    renamed = {}
    for i, t in enumerate(sg.tensors):
        old = tensor_name(t)
        if old and old not in seen:
            seen.add(old)
            continue
        n, new = 1, old or f"tensor{i}"
        while new in taken or new in seen:
            new, n = f"{old or f'tensor{i}'}_{n}", n + 1
        t.name = new.encode()
        seen.add(new)
        taken.add(new)
        renamed[new] = old
    return renamed


def _signature_first(m, src: Path, signature: str | None) -> str | None:
    """Move the subgraph of ``signature`` to index 0 (what the runtime runs); None: the file has one signature."""
    keys = [(_signature_key(d), int(d.subgraphIndex)) for d in (m.signatureDefs or [])]
    if len(keys) <= 1 and signature is None:
        return None
    known = [k for k, _ in keys]
    if signature is None or signature not in known:
        given = "none given" if signature is None else f"{signature!r} given"
        raise ConfigError(
            f"{src} has signatures {known} ({given}): the runtime runs one; import each as its own file with "
            "signature=NAME (edge import-tflite --signature NAME)"
        )
    k = dict(keys)[signature]
    if k != 0:
        # ops naming subgraphs by index: IF, WHILE, CALL_ONCE, and StableHLO's reduce, scatter, reduce_window, sort,
        # while, composite and case (ai_edge_litert's schema); old files keep codes under 127 in the deprecated field
        calls = {118, 119, 129, 174, 190, 198, 199, 200, 206, 209}
        codes = [max(int(c.builtinCode), int(c.deprecatedBuiltinCode)) for c in m.operatorCodes]
        if any(codes[op.opcodeIndex] in calls for g in m.subgraphs for op in g.operators or []):
            raise FormatError(f"{src}: signature {signature!r} is subgraph {k} and operators call subgraphs by index")
        m.subgraphs[0], m.subgraphs[k] = m.subgraphs[k], m.subgraphs[0]
        for d in m.signatureDefs:
            d.subgraphIndex = {0: k, k: 0}.get(int(d.subgraphIndex), int(d.subgraphIndex))
    return signature


def _signature_key(d) -> str:
    k = d.signatureKey
    return k.decode() if isinstance(k, bytes) else str(k or "")


def _inline_external(m, data: bytes, src: Path) -> None:
    """Buffers stored after the flatbuffer (``offset`` > 1) become inline data; the offsets are file positions."""
    for b in m.buffers:
        if b.offset and b.offset > 1:
            end = int(b.offset) + int(b.size)
            if end > len(data):
                raise FormatError(f"{src}: a buffer at bytes {b.offset}..{end} runs past the end ({len(data)} bytes)")
            b.data, b.offset, b.size = np.frombuffer(data, np.uint8, int(b.size), int(b.offset)).copy(), 0, 0


def _find_targets(fb) -> dict[str, str]:
    tensors, found = fb.tensors, {}
    for op in fb.ops:
        pos = WEIGHT_INPUT.get(op.code)
        if pos is None or pos >= len(op.inputs) or op.inputs[pos] < 0:
            continue
        t = tensors[op.inputs[pos]]
        if t.nbytes and t.dtype == np.float32 and len(t.shape) >= 2 and not t.scale:
            found.setdefault(t.name, OP_NAMES[op.code])
    return found


def _split_shared(m, wanted: set[int]) -> dict[str, str]:
    """Give each wanted tensor of subgraph 0 a buffer of its own; return the names split off."""
    users: dict[int, list[tuple[int, int]]] = {}
    for g, sg in enumerate(m.subgraphs):
        for i, t in enumerate(sg.tensors):
            if t.buffer:
                users.setdefault(t.buffer, []).append((g, i))
    tied = {}
    for i in sorted(wanted):
        t = m.subgraphs[0].tensors[i]
        others = [u for u in users[t.buffer] if u != (0, i)]
        if not others:
            continue
        users[t.buffer] = others
        g, j = others[0]
        tied[tensor_name(t)] = tensor_name(m.subgraphs[g].tensors[j])
        m.buffers.append(aligned_buffer(np.array(m.buffers[t.buffer].data, np.uint8)))
        t.buffer = len(m.buffers) - 1
        users[t.buffer] = [(0, i)]
    return tied


def _same_outputs(before: bytes, after: bytes, src: Path, signature: str | None) -> None:
    from runtimes.litert import interpreter_module

    interp, _ = interpreter_module()
    rng = np.random.default_rng(0)
    outs, feeds = [], None
    for data in (before, after):
        try:
            got, feeds = _run_once(interp, data, signature, feeds, rng)
        except EdgeError:  # our own refusals (FormatError is a ValueError too) stand as they are
            raise
        except (ValueError, RuntimeError) as e:  # an op LiteRT lacks (a custom op), a string input, ...
            raise FormatError(
                f"{src}: LiteRT cannot run it ({str(e)[:200]}); import-tflite checks the result on LiteRT's built-in "
                "kernels, so a file they cannot run is not imported"
            ) from e
        outs.append(got)
    for a, b in zip(*outs):
        if a.tobytes() != b.tobytes():
            raise FormatError(f"{src}: the adapter-ready file computes other outputs than the input; please report it")


def _run_once(interp, data: bytes, signature: str | None, feeds, rng):
    """One run of ``data`` on LiteRT's built-in kernels: (outputs, the feeds used: made on the first call)."""
    it = interp.Interpreter(
        model_content=data, experimental_op_resolver_type=interp.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    )
    if signature is not None:  # the file before has it at another subgraph index than the file after
        run = it.get_signature_runner(signature)
        feeds = feeds or {k: _example(d, rng) for k, d in sorted(run.get_input_details().items())}
        got = run(**feeds)
        return [np.array(got[k]) for k in sorted(got)], feeds
    it.allocate_tensors()
    feeds = feeds or [_example(d, rng) for d in it.get_input_details()]
    for d, x in zip(it.get_input_details(), feeds):
        it.set_tensor(d["index"], x)
    it.invoke()
    return [it.get_tensor(d["index"]).copy() for d in it.get_output_details()], feeds


def _example(detail, rng) -> np.ndarray:
    shape, dtype = tuple(int(v) for v in detail["shape"]), np.dtype(detail["dtype"])
    if dtype == np.bool_:
        return rng.random(shape) > 0.5
    if dtype.kind in "iu":
        return np.zeros(shape, dtype)  # ids: 0 is inside every table
    return rng.standard_normal(shape).astype(dtype)
