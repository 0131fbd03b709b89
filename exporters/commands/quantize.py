"""``edge quantize MODEL --out OUT``: an exported model's int8 twin, adapter-ready, from the command line.

Runs :func:`exporters.quantize.quantize_onnx` (onnxruntime: dynamic, or static QDQ calibrated on the
user's samples) on an ``.onnx`` file and :func:`exporters.tflite_quant.quantize_tflite` (AI Edge
Quantizer, only in ``.venv-tflite``) on a ``.tflite`` file. Everything handed in is hostile: the model
is read bounded, must carry this project's metadata and must not be quantized already, and the copy
checked is the copy quantized (a copy the quantizer reads, so the path cannot change under it, in a work
folder beside ``OUT`` named with the pid: a killed run's copy is removed by the next, see :func:`staging`).
The calibration samples (the ``.npz`` format ``edge update`` reads) are checked against the
model's inputs before any array is loaded (:mod:`exporters.commands.quantize_data`). The quantizer
writes ``OUT`` atomically, only after its checks pass. No torch needed for ``.onnx``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

MODES = ("dynamic", "static")
METHODS = ("minmax", "entropy", "percentile")
TYPES = ("int8", "uint8")
SUFFIXES = {".onnx": "onnx", ".tflite": "tflite"}
MAX_MODEL_BYTES = (2 << 30) - 1  # one protobuf (or flatbuffer) message: a larger model cannot be one file
CHECK_ROWS = 64  # calibration samples the quantized outputs are compared with the float ones on
#: flags only onnxruntime's quantizer takes (flag -> attribute, and the value meaning "not given")
ONNX_ONLY = {
    "--exclude": ("exclude", ()),
    "--float-first": ("float_first", False),
    "--calibrate-method": ("calibrate_method", None),
    "--reduce-range": ("reduce_range", False),
    "--batch": ("batch", None),
    "--weight-type": ("weight_type", None),
    "--activation-type": ("activation_type", None),
    "--symmetric": ("symmetric", False),
}

_STATIC = "given with --mode static only (dynamic mode quantizes activations to uint8 at run time)"
_S8U8 = "int8 with --activation-type int8 (onnxruntime has no kernels for int8 activations on uint8 weights)"

log = logging.getLogger(__name__)


def register(sub) -> None:
    from edge.commands import output_path

    p = sub.add_parser(
        "quantize",
        help="int8 twin of an exported .onnx/.tflite model (onnxruntime or AI Edge Quantizer), adapter-ready",
        description="Quantize a model exported by this project to int8, keeping it adapter-ready: which integer "
        "tensors adapters write, with their scales, is proved and stored in the model's metadata, and the result "
        "is checked against the float model (and on edge.Runtime) before OUT is written. Adapters made for the "
        "float model load on the int8 twin (requantized onto its grid).",
    )
    p.add_argument("model", type=Path, help="float model exported by this project (.onnx or .tflite)")
    p.add_argument("--out", type=output_path, required=True, help="quantized model to write (same suffix as MODEL)")
    p.add_argument(
        "--mode",
        choices=MODES,
        default="dynamic",
        help="dynamic (default): int8 weights; static: int8 weights and activations calibrated on --calib",
    )
    add_arguments(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def add_arguments(p) -> None:
    """The quantization flags (shared with ``edge export --quantize``); read back with :func:`quantize_model`."""
    p.add_argument(
        "--calib",
        type=Path,
        metavar="SAMPLES",
        help="samples .npz (as `edge update` reads: 'x', or one array per input; 'y' ignored): calibrates static "
        "mode (required there) and is what the result is checked on (default: N(0,1) inputs, float inputs only)",
    )
    grain = p.add_mutually_exclusive_group()
    grain.add_argument(
        "--per-channel",
        dest="per_channel",
        action="store_true",
        default=None,
        help="one scale per output channel (default for .tflite)",
    )
    grain.add_argument(
        "--per-tensor", dest="per_channel", action="store_false", help="one scale per weight tensor (default for .onnx)"
    )
    p.add_argument("--exclude", nargs="+", default=(), metavar="NODE", help="onnx: node names kept in float")
    p.add_argument("--float-first", action="store_true", help="onnx: keep the first weight op (the stem) in float")
    p.add_argument("--calibrate-method", choices=METHODS, help="onnx static: activation ranges (default minmax)")
    p.add_argument(
        "--reduce-range",
        action="store_true",
        help="onnx: 7-bit weights: headroom for adapters, and exact on x86 CPUs without VNNI (whose onnxruntime int8 "
        "kernels saturate on full-range weights)",
    )
    p.add_argument("--weight-type", choices=TYPES, help="onnx: the weights' integer type (default int8)")
    p.add_argument("--activation-type", choices=TYPES, help="onnx static: the activations' type (default uint8)")
    p.add_argument(
        "--symmetric", action="store_true", help="onnx: symmetric weights and activations (zero point mid-range)"
    )
    p.add_argument(
        "--headroom", type=float, default=1.0, metavar="H", help="scales cover H times each weight's range (>= 1)"
    )
    p.add_argument("--op-types", nargs="+", metavar="OP", help="op types to quantize (default: the quantizer's)")
    p.add_argument(
        "--min-cosine", type=float, default=0.98, metavar="C", help="refuse a result whose outputs drift below this"
    )
    p.add_argument(
        "--batch", type=int, metavar="N", help="onnx: calibration rows per run (default 16, or the model's fixed batch)"
    )


def run(args) -> int:
    summary = quantize_model(args.model, args.out, args)
    print(json.dumps(summary, indent=1) if args.json else describe(summary))
    return 0


def check_request(src: Path, out: Path, args) -> str:
    """The model's format, after refusing what can be refused before any work: suffixes, flags, a missing quantizer.

    ``edge export --quantize`` calls it before exporting, so a bad request costs nothing."""
    from edge.errors import ConfigError

    fmt = SUFFIXES.get(src.suffix.lower())
    if fmt is None:
        raise ConfigError(f"{src.name}: quantize takes an .onnx or .tflite model exported by this project")
    if out.suffix.lower() != src.suffix.lower():
        raise ConfigError(f"--out {out.name} must end in {src.suffix.lower()}, the suffix of {src.name}")
    if out.resolve() == src.resolve():
        raise ConfigError(f"--out {out} is the float model itself; write the int8 twin to another file")
    if args.mode == "static" and args.calib is None:
        raise ConfigError(
            "static quantization calibrates activations on your data: pass --calib SAMPLES.npz ('x', or one array per "
            "model input, as `edge update` reads)"
        )
    if fmt == "tflite":
        given = [flag for flag, (attr, unset) in ONNX_ONLY.items() if getattr(args, attr) != unset]
        if given:
            raise ConfigError(f"{', '.join(given)} apply to .onnx models (onnxruntime's quantizer) only")
        need_quantizer()
    bad = [
        f"{flag} {value} must be {rule}"
        for flag, value, ok, rule in (
            ("--headroom", args.headroom, args.headroom >= 1.0, ">= 1"),
            ("--min-cosine", args.min_cosine, 0.0 < args.min_cosine <= 1.0, "in (0, 1]"),
            ("--batch", args.batch, args.batch is None or args.batch >= 1, ">= 1"),
            ("--activation-type", args.activation_type, args.activation_type is None or args.mode == "static", _STATIC),
            ("--weight-type", args.weight_type, args.weight_type != "uint8" or args.activation_type != "int8", _S8U8),
        )
        if not ok
    ]
    if bad:
        raise ConfigError("; ".join(bad))
    if args.calib is not None:
        from edge.format.io import check_regular

        check_regular(args.calib, what="calibration file")
    return fmt


def need_quantizer() -> None:
    """Refuse, in one line, a ``.tflite`` quantization where ai-edge-quantizer is not installed."""
    import importlib.util

    from edge.errors import BackendUnavailableError

    try:
        found = importlib.util.find_spec("ai_edge_quantizer") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise BackendUnavailableError(
            "quantizing a .tflite model needs ai-edge-quantizer, which only the TFLite venv has: run `make "
            "test-tflite` once (it creates .venv-tflite), then `.venv-tflite/bin/edge quantize ...` (or pip install "
            "'edge-adapt[tflite-export]')"
        )


def quantize_model(src: Path, out: Path, args) -> dict:
    """Quantize ``src`` into ``out`` as the parsed flags ``args`` ask (see the module doc); the summary."""
    from edge.errors import ConfigError, ExportValidationError
    from edge.format.io import read_bounded
    from exporters.commands.quantize_model import read_graph, read_model, refuse

    fmt = check_request(src, out, args)
    if fmt == "onnx":  # what the graph alone refuses costs its few MB, not the weights (BERT-base: 56 s, 1.76 GB)
        refuse(src, *read_graph(src), args)
    data = read_bounded(src, MAX_MODEL_BYTES, what="model file")
    info, specs = read_model(data, fmt, src)
    refuse(src, info, specs, args)  # again on the bytes read: the file may have changed since
    if fmt == "tflite" and args.mode == "static":
        _need_signature(data, src)
    from exporters.commands.quantize_data import generated_inputs, load_calibration

    if args.calib is not None:
        feeds, used = load_calibration(args.calib, specs)
    else:
        feeds, used = generated_inputs(specs, info), 0
        checked = "generated inputs (N(0,1)): pass --calib for your data"
    batch = args.batch or 16
    shape = next(iter(specs.values())).shape
    first = shape[0] if fmt == "onnx" and shape else None
    if isinstance(first, int):  # a fixed batch: calibration runs in whole batches of it
        if args.batch not in (None, first):
            raise ConfigError(f"--batch {args.batch}: {src.name} takes batches of exactly {first}")
        batch = first
        if args.calib is not None:
            if used < first:
                raise ConfigError(f"{args.calib}: {used} samples, fewer than the model's fixed batch of {first}")
            used -= used % first
            feeds = {k: v[:used] for k, v in feeds.items()}
    calib, check = (feeds, None) if args.calib is not None else (None, feeds)
    if calib is not None:  # the outputs are compared on the first rows (a fixed batch: one batch of them)
        rows = first if isinstance(first, int) else min(used, CHECK_ROWS)
        check = {k: v[:rows] for k, v in feeds.items()}
        checked = f"the first {rows} of {used} samples of {args.calib.name}"
    with staging(out) as tmp:
        copy = Path(tmp, src.name)  # the bytes checked above are the bytes quantized
        copy.write_bytes(data)
        del data  # the quantizer reads the copy
        try:
            report = _quantize(fmt, copy, out, args, calib, check, batch)
        except ExportValidationError as e:
            if args.calib is not None:
                raise
            raise ExportValidationError(f"{e} (checked on {checked})") from e
    return _summary(src, out, fmt, args, report, checked, used)


@contextlib.contextmanager
def staging(out: Path):
    """A work folder beside ``out``, ``.OUT.PID.quantize.tmp``, removed on exit; ones of dead pids are removed first.

    A killed run cannot clean up: its folder (a full model copy) sits beside the output, named with its pid, and the
    next run towards that output removes it. The quantizers' own temporary files (``exporters.quantize``,
    onnxruntime's calibration) go there too: ``tempfile.tempdir`` points at it for the duration.
    """
    from edge.errors import WriteError
    from edge.format.io import pid_alive

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(f"cannot write {out}: {e.strerror or e}; give a file path in a writable folder") from e
    pat = re.compile(rf"^\.{re.escape(out.name)}\.(\d+)\.quantize\.tmp$")
    for old in out.parent.iterdir():
        m = pat.match(old.name)
        if m and old.is_dir() and not old.is_symlink() and not pid_alive(int(m.group(1))):
            shutil.rmtree(old, ignore_errors=True)
    folder = out.parent / f".{out.name}.{os.getpid()}.quantize.tmp"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    saved, tempfile.tempdir = tempfile.tempdir, str(folder)
    try:
        yield folder
    finally:
        tempfile.tempdir = saved
        shutil.rmtree(folder, ignore_errors=True)


def describe(s: dict) -> str:
    """The summary as a few lines for a terminal."""
    t = s["targets"]

    def names(xs) -> str:
        return ", ".join(xs[:4]) + (f", ... ({len(xs)})" if len(xs) > 4 else "")

    slow = (
        names(s["float_compute"]) + " (dequantized every run: slower than the float model)"
        if s["float_compute"]
        else "none (every quantized weight op runs on integers)"
    )
    worst = min(s["cosine"], key=s["cosine"].get) if s["cosine"] else None
    lines = [
        f"quantized {s['model']} -> {s['out']} ({s['quantizer']}, {s['mode']}, "
        f"{'per channel' if s['per_channel'] else 'per tensor'})",
        f"  int8 targets   {len(t['int8'])} of {t['total']}: {names(t['int8']) or '-'}",
        f"  float targets  {len(t['float'])}: {names(t['float']) or '-'}",
        f"  dropped        {len(t['dropped'])}" + "".join(f"; {k}: {v}" for k, v in list(t["dropped"].items())[:3]),
        f"  float compute  {len(s['float_compute'])}: {slow}",
        f"  size           {s['bytes_before']:,} -> {s['bytes_after']:,} bytes",
    ]
    if worst is not None:
        lines.append(
            f"  check          cosine to the float model {s['cosine'][worst]:.5f} ({worst}, the lowest), "
            f"max diff {s['max_abs_diff'][worst]:.3g}; on {s['checked_on']}"
        )
    lines.append(
        f"  fingerprint    {s['fingerprint']} (adapters for the float model {s['float_fingerprint']} load too)"
    )
    return "\n".join(lines)


# -- helpers ----------------------------------------------------------------------------------------------------------


def _quantize(fmt: str, copy: Path, out: Path, args, calib, check, batch: int):
    """One call of the library quantizer; its own failures on a strange graph become one typed line."""
    from edge.errors import EdgeError, ExportValidationError

    common = {"mode": args.mode, "calib": calib, "check": check, "headroom": args.headroom}
    common.update(min_cosine=args.min_cosine, op_types=args.op_types)
    if args.per_channel is not None:
        common["per_channel"] = args.per_channel
    try:  # onnxruntime's histogram calibrators print their progress: stdout carries only the summary
        with contextlib.redirect_stdout(sys.stderr):
            return _run_quantizer(fmt, copy, out, args, common, batch)
    except EdgeError:
        raise
    except (RuntimeError, ValueError, KeyError, AssertionError, *_ort_errors(), *_flatbuffer_errors(fmt)) as e:
        log.info("the quantizer failed on %s", copy.name, exc_info=True)
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ExportValidationError(
            f"the quantizer failed on {copy.name}: {type(e).__name__}: {first} (edge -v quantize ... logs the trace)"
        ) from e


def _run_quantizer(fmt: str, copy: Path, out: Path, args, common: dict, batch: int):
    if fmt == "tflite":
        from exporters.tflite_quant import quantize_tflite

        return quantize_tflite(copy, out, **common)
    from exporters.quantize import quantize_onnx

    return quantize_onnx(
        copy,
        out,
        batch=batch,
        reduce_range=args.reduce_range,
        calibrate_method=args.calibrate_method or "minmax",
        weight_type=args.weight_type or "int8",
        activation_type=args.activation_type or "uint8",
        extra_options={"WeightSymmetric": True, "ActivationSymmetric": True} if args.symmetric else None,
        nodes_to_exclude=args.exclude,
        float_first=args.float_first,
        **common,
    )


def _flatbuffer_errors(fmt: str) -> tuple:
    """What the AI Edge Quantizer's flatbuffer code raises on a damaged ``.tflite`` file this project's reader let
    through (fuzzed: byte flips in a tiny model raised each of these from inside the quantizer)."""
    import struct

    return (struct.error, IndexError, AttributeError, TypeError) if fmt == "tflite" else ()


def _ort_errors() -> tuple:
    """onnxruntime's own exception classes (they derive from Exception only)."""
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as st
    except ImportError:
        return ()
    names = ("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NotImplemented", "RuntimeException")
    return tuple(getattr(st, n) for n in names if hasattr(st, n))


def _need_signature(data: bytes, src: Path) -> None:
    """Static .tflite calibration runs the model through its signature: refuse a file without one."""
    from ai_edge_litert import schema_py_generated as schema

    from edge.errors import ConfigError, FormatError

    try:
        signatures = schema.Model.GetRootAs(data, 0).SignatureDefsLength()
    except _flatbuffer_errors("tflite") as e:
        raise FormatError(f"{src.name} is a damaged .tflite file: {type(e).__name__}: {e}") from e
    if signatures == 0:
        raise ConfigError(
            f"{src.name} has no signature, which static calibration runs it through; export it with "
            "exporters.export_tflite (litert-torch writes one), or use --mode dynamic"
        )


def _summary(src: Path, out: Path, fmt: str, args, report, checked: str, used: int) -> dict:
    info = report.info
    quant = info.extra.get("quantization", {})
    return {
        "model": str(src),
        "out": str(out),
        "format": fmt,
        "quantizer": "onnxruntime" if fmt == "onnx" else "ai-edge-quantizer",
        "mode": report.mode,
        "per_channel": report.per_channel,
        "targets": {
            "total": len(report.quantized) + len(report.float_targets) + len(report.dropped),
            "int8": list(report.quantized),
            "float": list(report.float_targets),
            "dropped": dict(report.dropped),
        },
        "float_compute": list(report.float_compute),
        "float_nodes": list(quant.get("float_nodes", [])),
        "bytes_before": report.bytes_before,
        "bytes_after": report.bytes_after,
        "cosine": report.cosine,
        "max_abs_diff": report.max_abs_diff,
        "checked_on": checked,
        "calibration": None if args.calib is None else {"file": str(args.calib), "samples": used},
        "fingerprint": info.fingerprint,
        "float_fingerprint": info.float_fingerprint,
    }
