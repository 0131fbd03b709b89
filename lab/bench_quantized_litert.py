"""Fused adapters on an int8 base on LiteRT: bytes, inference, memory, switch and accuracy per model and base.

The LiteRT twin of :mod:`lab.bench_quantized` (issue 18), rows of the same shape
(``{"model", "base", "bytes", "infer_ms_p50", "rss_mb", "switch_ms_p50", "mean_acc_base",
"mean_acc_adapted"}`` plus context). Per demo encoder (ViT, CNN) exported to ``.tflite``, and MiniLM (its
embeddings' cosine to the fp32 model's instead of accuracy: ``cosine_base``, ``cosine_adapted`` with the same
random float adapter on both; dynamic: the quantizer's defaults; static: ``FULLY_CONNECTED`` ops only; both with
the word-embedding table int8 too, ``EMBEDDING_LOOKUP``), per base:

* ``fp32``: the float ``.tflite`` file; ``int8-dynamic``: :func:`exporters.tflite_quant.quantize_tflite`
  dynamic-range int8 (AI Edge Quantizer, weights per tensor with 4x headroom, FULLY_CONNECTED and
  DEPTHWISE_CONV_2D); ``int8-static``: int8 activations calibrated on training digits of every domain (the
  same weights), full integer on the CNN (int8 inputs and outputs: the bench quantizes the pixels with the
  input's scale), on the ViT around its FULLY_CONNECTED ops only (float input and logits); its integer SHiRA
  trains with the graph's activation grids in the loop;
* ``infer_ms_p50``: batch 1, the ``hybrid`` runtime settled with an adapter switched in, and
  ``static_infer_ms_p50`` a plain LiteRT interpreter (XNNPACK) on the same file and the same threads as the
  runtime's XNNPACK interpreter (``interpreter_threads``: 1 where dynamic-range ops are left to the built-in
  kernels, which collapse on 2, and for a model file under ``runtimes.base.SMALL_MODEL_BYTES``), paired
  within rounds (every base's contestants interleaved in each round);
* ``switch_ms_p50``: base -> adapter, one random SHiRA adapter of the same entries on every base
  (density 1 %; requantized onto an int8 base at load, clipped entries counted); goals judged on the median of
  per-round ratios and its 95 % interval, settled and with the caches evicted first
  (``switch_cold_x_fp32``), as in :mod:`lab.bench_quantized`;
* ``rss_mb``: resident memory of the switchable hybrid runtime after a switch cycle, in a fresh child,
  above a baseline child; ``plain_rss_mb`` a plain interpreter's;
* ``mean_acc_base`` / ``mean_acc_adapted``: mean test accuracy over the demo domains of the base and of the
  base with each domain's SHiRA adapter: the fp32 adapters on fp32, *integer* SHiRA trained on the
  ``.tflite`` file's own grid (:func:`exporters.train_shira_int`, the demo's mask, density, epochs and
  learning rate) on int8; ``mean_acc_requantized``: the fp32 adapters requantized at load (the float path).
  Measured on XNNPACK (strategy ``rebuild``: what a settled ``hybrid`` runtime serves);
  ``mean_acc_adapted_builtin`` on the built-in kernels (what serves in hybrid's settle window). They differ a
  little on a dynamic-range base: XNNPACK quantizes each activation row asymmetrically, the built-in kernel
  symmetrically (``asymmetric_quantize_inputs`` off, so that it reads the int8 weights at every run). The
  built-in kernel also misreads -128 in a symmetric int8 weight, which integer adapters no longer write
  (:mod:`edge.format.qrange`; demo ViT: 0.844 vs 0.845, 0.789 with the old trainer's -128 entries).

``edge bench quantized --backend tflite`` (through :func:`run_litert`) or
``python -m lab.bench_quantized_litert [--model vit|cnn|minilm|all] [--json P] [--md P]`` (section
``bench:quantized:tflite``); in the TFLite venv (litert-torch, ai-edge-quantizer). The rows are built by
:mod:`lab.bench_quantized_core` (shared with the onnxruntime bench); this file says what LiteRT's runs on
(:data:`LITERT`) and renders its section.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from lab.bench_quantized_core import (
    SENTENCES,
    QuantBackend,
    cached_quantized,
    emit,
    goal_lines,
    goals,
    measure_args,
    requantized_cell,
    rss_cell,
    switch_cell,
)
from lab.bench_quantized_core import add_arguments as core_arguments

__all__ = ["BASES", "LITERT", "SECTION", "add_arguments", "goals", "main", "markdown", "run_litert"]

#: base name -> quantize_tflite options per model family (None: the float model). Demo encoders: per tensor with 4x
#: headroom, as the ONNX bench's demo bases (lab.bench_quantized.BASES: per channel trained integer SHiRA to lower
#: accuracy there and here). MiniLM (no trained adapters) keeps the quantizer's defaults; full integer on every op gave
#: its embeddings cosine 0.64 to fp32, on the FULLY_CONNECTED ops only 0.95. A family's own entry ("vit", "cnn")
#: overrides "demo": the ViT's static base quantizes around its weight ops only (FULLY_CONNECTED; the rest float, as
#: lab.bench_quantized's static recipe): integer SHiRA mean accuracy 0.840 vs 0.834 on every op (fp32 0.850).
#: MiniLM's word-embedding table is int8 too (EMBEDDING_LOOKUP, one scale per row; static takes the dynamic-range
#: config for it, the quantizer has no full-integer lookup): 47 of its 90 MB float bytes. Left float, the int8 file
#: was 58 MB and the switchable runtime 97.5 MB resident, above a plain fp32 interpreter's 88.2 MB (issue 18's goal);
#: with it 23.5 MB and 66.4 MB (plain fp32 88.1 MB, load 4.3), at embedding cosine 0.9974 / 0.964 (dynamic / static,
#: quantize_tflite's check) against 0.9971 / 0.953 without
BASES = {
    "fp32": {"demo": None, "minilm": None},
    "int8-dynamic": {
        "demo": {"mode": "dynamic", "per_channel": False, "headroom": 4.0},
        "minilm": {"mode": "dynamic", "op_types": ["FULLY_CONNECTED", "EMBEDDING_LOOKUP"]},
    },
    "int8-static": {
        "demo": {"mode": "static", "per_channel": False, "headroom": 4.0, "train_activations": True},
        "vit": {
            "mode": "static",
            "per_channel": False,
            "headroom": 4.0,
            "train_activations": True,
            "op_types": ["FULLY_CONNECTED"],
        },
        "minilm": {"mode": "static", "op_types": ["FULLY_CONNECTED", "EMBEDDING_LOOKUP"]},
    },
}
SECTION = "quantized:tflite"


def quantized_model(src: Path, opts: dict, calib: dict, check: dict, store: Path) -> tuple[Path, dict]:
    """The cached int8 twin of ``src`` (once per float fingerprint and options)."""
    from exporters.tflite import load_model_info
    from exporters.tflite_quant import quantize_tflite

    def make(src, out, **options):
        return quantize_tflite(src, out, calib=calib, check=check, min_cosine=0.9, **options)

    return cached_quantized(src, load_model_info(src).fingerprint, opts, 1, store, make)


def pixels_for(path: Path, x: np.ndarray) -> np.ndarray:
    """``x`` as the model takes it: float, or int8 quantized with its input's scale (a full-integer model)."""
    from edge.format.tflite import read_tflite

    fb = read_tflite(path.read_bytes())
    t = next(t for t in fb.tensors if t.name == "pixels")
    if t.dtype is not np.int8:
        return np.ascontiguousarray(x, np.float32)
    return np.clip(np.round(x / t.scale[0]) + t.zero_point[0], -128, 127).astype(np.int8)


def _quantized_base(path):
    from exporters.tflite_quant import tflite_quantized_base

    return tflite_quantized_base(path)


def _activation_grid(path):
    from exporters.tflite_quant import tflite_activation_grid

    return tflite_activation_grid(path)


def _minilm(cache: Path, progress: bool):
    from exporters import minilm
    from lab.bench_litert import export_bench_model

    src, _ = export_bench_model("minilm", cache, quiet=not progress)
    return src, {k: v.astype(np.int32) for k, v in minilm.tokenize(SENTENCES, seq_len=128).items()}  # int32 ids


def _plain(path, rt, threads: int | None):
    """A plain interpreter on the threads the runtime's XNNPACK interpreter was held to (1 where it leaves
    dynamic-range ops to the built-in kernels, runtimes.litert.one_thread_reason): same kernels, same threads."""
    from lab.litert_probe import plain_interpreter

    held = rt.backend.interpreter_threads
    return plain_interpreter(path, held.get("xnnpack", threads)), {"interpreter_threads": held}


def _memory(path, feeds: dict, threads: int | None) -> dict:
    from lab.litert_probe import memory

    return memory(path, feeds, threads)


#: this bench's backend: the demo's .tflite exports, quantize_tflite calibrated on every domain, accuracy on
#: XNNPACK (``rebuild``: what a settled hybrid runtime serves) and on the built-in kernels (hybrid's settle window)
LITERT = QuantBackend(
    name="tflite",
    bases=BASES,
    quantize=quantized_model,
    quantized_base=_quantized_base,
    activation_grid=_activation_grid,
    minilm=_minilm,
    plain=_plain,
    memory=_memory,
    strategy="rebuild",
    builtin_strategy="builtin",
    calib="domains",
    pixels=pixels_for,
)


def markdown(result: dict) -> str:
    lines = [
        "| model | base | bytes | infer ms p50 (plain) | rss MB (plain) | switch ms p50 (evicted) | base acc / cos "
        "| adapted acc / cos (built-in kernels) | fp32 adapter requantized (clipped) | load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        builtin = f" ({r['mean_acc_adapted_builtin']:.4f})" if "mean_acc_adapted_builtin" in r else ""
        acc_b, acc_a = r.get("mean_acc_base", r.get("cosine_base")), r.get("mean_acc_adapted", r.get("cosine_adapted"))
        lines.append(
            f"| {r['model']} | {r['base']} | {r['bytes']:,} | {r['infer_ms_p50']:.3f} ({r['static_infer_ms_p50']:.3f}) "
            f"| {rss_cell(r)} | {switch_cell(r)} | {acc_b:.4f} | {acc_a:.4f}{builtin} "
            f"| {requantized_cell(r)} | {r['load_1m']} |"
        )
    return "\n".join(lines + goal_lines(result.get("goals", {})))


def add_arguments(ap) -> None:
    core_arguments(ap, BASES)


def run_litert(args) -> dict:
    """The bench for parsed ``edge bench quantized --backend tflite`` arguments (``lab.bench_quantized.cli``)."""
    rows = measure_args(LITERT, args)
    result = {"rows": rows, "goals": goals(rows), "backend": "tflite", "threads": args.threads, "rounds": args.rounds}
    return {**result, "runs_per_round": args.runs}


def cli(args) -> int:
    """``python -m lab.bench_quantized_litert``: the JSON printed, optionally written, and its section."""
    return emit(args, run_litert(args), (SECTION, "Fused adapters on an int8 base on LiteRT (issue 18)"), markdown)


def main(argv: list[str] | None = None) -> int:
    from edge.commands import DEFAULT_CACHE

    ap = argparse.ArgumentParser(prog="python -m lab.bench_quantized_litert", description=__doc__.splitlines()[0])
    add_arguments(ap)
    ap.add_argument("--cache", type=Path, default=None, help="artifact cache (default: ~/.cache/edge)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    args.cache = args.cache or DEFAULT_CACHE
    return cli(args)


if __name__ == "__main__":
    raise SystemExit(main())
