"""Fused adapters on an int8 base: bytes, inference, memory, switch and accuracy per model and base precision.

``edge bench quantized`` (issue 18). Per model (the demo ViT, the demo CNN, MiniLM) and per base
(``fp32``; ``int8-dynamic``: onnxruntime ``quantize_dynamic``; ``int8-static``: ``quantize_static``
QDQ calibrated on the training digits of every domain or on sentences; both via :func:`exporters.quantize_onnx`,
see :data:`BASES` for the recipes and what each choice measured):

* ``bytes``: the model file; ``rss_mb``: resident memory of a switchable ``hybrid`` runtime after
  a switch cycle, above a baseline child (``lab.bench_memory``: fresh children, every library's pages mapped in
  each), ``plain_rss_mb`` a plain onnxruntime session's, and for a small model ``plain_options_rss_mb`` a plain
  session with the runtime's options (no CPU arena: "no arena" in the table);
* ``infer_ms_p50``: batch 1, the hybrid runtime settled with an adapter switched in, and
  ``static_infer_ms_p50`` a plain session on the same file, paired within rounds (every base's
  contestants interleaved in each round);
* ``switch_ms_p50``: base -> adapter, one random SHiRA adapter of the same entries on every base
  (density 1 %; on an int8 base it is requantized at load, clipped entries counted); the goals take the
  median of per-round ratios with its 95 % interval (``switch_x_fp32_spread``, ``infer_overhead_pct_spread``):
  met only when the whole interval is within the limit, "within noise" when it crosses it. Timed twice per round:
  right after settling (what each base's own rebuild left in the caches) and with the caches evicted first on
  every base alike (``switch_cold_ms_p50``, ``switch_cold_x_fp32``: the switch's own cost; see
  :func:`lab.bench_quantized_timing.paired_timings`);
* ``mean_acc_base`` / ``mean_acc_adapted``: mean test accuracy over the demo domains of the base
  and of the base with each domain's SHiRA adapter: fp32 adapters on fp32, *integer* SHiRA
  (:func:`exporters.train_shira_int`, same mask kind, density and learning rate, ``INT_EPOCHS_X`` times the
  epochs (:mod:`lab.bench_quantized_core`); on the static base with the graph's activation grids in the loop) on int8;
  ``mean_acc_requantized`` the fp32 adapters requantized onto the int8 grid at load (the float path;
  ``requantized_clipped_per_adapter`` of ``requantized_nnz`` entries clipped, means over the domains).
  MiniLM has no labels: ``cosine_base`` / ``cosine_adapted`` are the mean cosine of its embeddings to
  the fp32 model's (adapted: both with the same random float adapter).

With ``--model all`` (or ``--ladder``), the memory goal is also measured on a ladder of BERT encoders with random
weights, 0.5 to 20 MB of fp32 weights (:mod:`lab.bench_quantized_ladder`): from which size the int8 hybrid runtime
is below a plain fp32 session (the demo encoders are below that size, MiniLM above).

The rows are built by :mod:`lab.bench_quantized_core` (shared with the LiteRT twin,
:mod:`lab.bench_quantized_litert`); this file says what onnxruntime's bench runs on (:data:`ONNX`) and renders it.
"""

from __future__ import annotations

from pathlib import Path

from edge.errors import ConfigError, EdgeError
from lab.bench_quantized_core import (
    DEMO_FAMILIES,
    GOALS,
    SENTENCES,
    QuantBackend,
    cached_quantized,
    calibration_set,
    emit,
    family_options,
    goal_lines,
    goals,
    measure_args,
    requantized_cell,
    rss_cell,
    switch_cell,
)
from lab.bench_quantized_core import add_arguments as core_arguments

__all__ = [
    "BASES",
    "DEMO_FAMILIES",
    "GOALS",
    "ONNX",
    "SENTENCES",
    "add_arguments",
    "calibration_set",
    "cli",
    "family_options",
    "markdown",
]

#: base name -> quantize_onnx options per model family (None: the float model); a value given per demo family
#: ({"vit": .., "cnn": ..}) is resolved by :func:`family_options`. Demo encoders: per-tensor weights with headroom
#: (scales cover that many times each weight's largest magnitude), so the largest, most adapted weights can move
#: outward (none: 0.63 on rotate for the ViT; per channel, whose largest weights all sit at the limit: 0.55-0.76).
#: Static (measured 2026-11-30, one seed, mean adapted accuracy over the four domains; fp32 SHiRA: ViT 0.8502, CNN
#: 0.8548): onnxruntime's defaults (int8 activations on every op, calibrated on clean digits, 4x) gave ViT 0.8395,
#: CNN 0.8335. Calibrating on every domain's training digits: 0.8404 / 0.8395; QDQ only around the weight ops with
#: uint8 activations: 0.8437 / 0.8372; integer SHiRA trained with the graph's activation grids in the loop
#: (train_activations): 0.8497 / 0.8432; the CNN's stem kept float (float_first): 0.8446, and 2x headroom with it
#: 0.8511 (the ViT at 2x: 0.8316, at 3x: 0.8414; the CNN at 3x: 0.8423). Percentile calibration: CNN 0.8340.
#: MiniLM (no trained adapters) keeps onnxruntime's defaults: headroom costs its embeddings precision (cosine 0.81 at
#: 3x vs 0.97), and static QDQ of every op gave cosine 0.40, so static quantizes MatMuls per channel. uint8
#: activations (quantize_onnx's default) let onnxruntime fuse all 36 MatMuls into QLinearMatMul; int8 ones left 24
#: in float over weights dequantized every run (2.6x slower than fp32; see QuantReport.float_compute)
BASES = {
    "fp32": {"demo": None, "minilm": None},
    "int8-dynamic": {"demo": {"mode": "dynamic", "headroom": 4.0}, "minilm": {"mode": "dynamic"}},
    "int8-static": {
        "demo": {
            "mode": "static",
            "headroom": {"vit": 4.0, "cnn": 2.0},
            "float_first": True,
            "activation_type": "uint8",
            "op_types": ["MatMul", "Gemm", "Conv"],
            "calib": "domains",
            "train_activations": True,
        },
        "minilm": {"mode": "static", "per_channel": True, "op_types": ["MatMul"], "activation_type": "uint8"},
    },
}


def quantized_model(src: Path, opts: dict, calib: dict, check: dict, store: Path) -> tuple[Path, dict]:
    """The cached int8 twin of ``src`` quantized with ``opts`` (once per float fingerprint and options)."""
    from exporters.onnx import load_model_info
    from exporters.quantize import EXPORTER_VERSION, quantize_onnx

    def make(src, out, **options):
        return quantize_onnx(src, out, calib=calib, check=check, min_cosine=0.9, **options)

    return cached_quantized(src, load_model_info(src).fingerprint, opts, EXPORTER_VERSION, store, make)


def _quantized_base(path):
    from exporters.qshira import quantized_base

    return quantized_base(path)


def _activation_grid(path):
    from exporters.qshira import activation_grid

    return activation_grid(path)


def _minilm(cache: Path, progress: bool):
    from exporters import minilm

    src = cache / "minilm" / "all-MiniLM-L6-v2.onnx"
    if not src.exists():
        minilm.export_minilm(src, progress=progress)
    return src, minilm.tokenize(SENTENCES, seq_len=128)


def _plain(path, rt, threads: int | None):
    """A plain onnxruntime session on the same file (the runtime's threads, as it resolved them)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    threads = rt.backend.threads if threads is None else threads
    if threads:
        so.intra_op_num_threads = threads
    plain = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return (lambda f: plain.run(None, dict(f))), {}


def _memory(path, feeds: dict, threads: int | None) -> dict:
    """Resident MB of a settled hybrid runtime and of a plain session (:mod:`lab.bench_memory`: fresh children)."""
    from lab.bench_memory import bench_memory

    try:
        mem = bench_memory(path, feeds, strategies=["hybrid"], threads=threads, repeat=1, progress=False)
    except EdgeError as e:  # e.g. its probe's random adapter saturates this int8 base: say so
        return {"rss_error": str(e)[-300:]}
    out = {"rss_mb": mem["strategies"]["hybrid"]["rss_mb"], "plain_rss_mb": mem["plain"]["rss_mb"]}
    if "plain_options" in mem:  # a plain session with the runtime's options (a small model: no CPU arena)
        out["plain_options_rss_mb"] = mem["plain_options"]["rss_mb"]
    return out


#: this bench's backend: the demo's ONNX files, quantize_onnx, accuracy on the ``bound`` strategy
ONNX = QuantBackend(
    name="onnxruntime",
    bases=BASES,
    quantize=quantized_model,
    quantized_base=_quantized_base,
    activation_grid=_activation_grid,
    minilm=_minilm,
    plain=_plain,
    memory=_memory,
    strategy="bound",
)


def markdown(result: dict) -> str:
    lines = [
        "| model | base | bytes | infer ms p50 (plain) | rss MB (plain) | switch ms p50 (evicted) | base acc / cos "
        "| adapted acc / cos | fp32 adapter requantized (clipped) | load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        acc_b = r.get("mean_acc_base", r.get("cosine_base"))
        acc_a = r.get("mean_acc_adapted", r.get("cosine_adapted"))
        lines.append(
            f"| {r['model']} | {r['base']} | {r['bytes']:,} | {r['infer_ms_p50']:.3f} ({r['static_infer_ms_p50']:.3f}) "
            f"| {rss_cell(r)} | {switch_cell(r)} | {acc_b:.4f} | {acc_a:.4f} | {requantized_cell(r)} "
            f"| {r['load_1m']} |"
        )
    unmeasured = [r for r in result["rows"] if "rss_error" in r]
    lines += [f"\n{r['model']} {r['base']}: memory not measured: {r['rss_error']}" for r in unmeasured]
    lines += goal_lines(result["goals"])
    if "ladder" in result:
        from lab.bench_quantized_ladder import ladder_lines

        lines += ladder_lines(result["ladder"])
    return "\n".join(lines)


def add_arguments(sp) -> None:
    import argparse

    core_arguments(sp, BASES)
    sp.add_argument(
        "--ladder",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also measure resident memory on a ladder of BERT encoders (lab.bench_quantized_ladder): from which "
        "size the int8 hybrid runtime is below a plain fp32 session (default: with --model all and memory measured; "
        "onnxruntime only)",
    )


def _ladder_wanted(args) -> bool:
    """``--ladder``/``--no-ladder``, else on with ``--model all`` when memory is measured; asked for with
    ``--no-memory`` or another backend, a ConfigError."""
    asked = getattr(args, "ladder", None)
    if asked is None:
        return args.backend == "onnxruntime" and args.model == "all" and not args.no_memory
    if asked and (args.backend != "onnxruntime" or args.no_memory):
        given = "--no-memory" if args.backend == "onnxruntime" else f"--backend {args.backend}"
        raise ConfigError(
            "edge bench quantized --ladder measures resident memory on onnxruntime; drop --no-memory and use "
            f"--backend onnxruntime (given {given})"
        )
    return asked


def cli(args) -> int:
    from edge.commands import host_needed

    host_needed("edge bench quantized")
    ladder = _ladder_wanted(args)
    if args.backend == "tflite":
        module = litert_module()
        section = (
            getattr(module, "SECTION", "quantized:tflite"),
            "Fused adapters on an int8 base on LiteRT (issue 18)",
        )
        return emit(args, litert_result(module, args), section, getattr(module, "markdown", markdown))
    if args.backend != "onnxruntime":
        raise ConfigError(f"edge bench quantized --backend {args.backend!r}: known backends onnxruntime, tflite")
    rows = measure_args(ONNX, args)
    result = {"rows": rows, "goals": goals(rows), "threads": args.threads, "rounds": args.rounds}
    result["runs_per_round"] = args.runs
    if ladder:
        from lab.bench_quantized_ladder import ladder as run_ladder

        recipe = BASES["int8-dynamic"]["minilm"]  # the ladder's encoders are text encoders, as MiniLM
        result["ladder"] = run_ladder(
            Path(args.cache), ONNX.quantize, recipe, threads=args.threads, progress=not args.quiet
        )
    return emit(args, result, ("quantized", "Fused adapters on an int8 base (issue 18)"), markdown)


#: the LiteRT twin of this bench: a module with ``run_litert(args) -> {"rows": [...], ...}``, rows in this bench's
#: shape (``model``, ``base``, ``bytes``, ``infer_ms_p50``, ``static_infer_ms_p50``, ``switch_ms_p50``, accuracy ...)
LITERT_BENCH = "lab.bench_quantized_litert"


def litert_module():
    """:data:`LITERT_BENCH`, or a ConfigError saying it is missing."""
    import importlib

    try:
        module = importlib.import_module(LITERT_BENCH)
    except ModuleNotFoundError as e:
        if e.name != LITERT_BENCH:
            raise
        raise ConfigError(
            f"edge bench quantized --backend tflite needs {LITERT_BENCH} (the LiteRT bench), which this install lacks; "
            "run it with --backend onnxruntime, or from a checkout that has it"
        ) from e
    if not callable(getattr(module, "run_litert", None)):
        raise ConfigError(f"{LITERT_BENCH} has no run_litert(args) -> dict, the entry this bench calls")
    return module


def litert_result(module, args) -> dict:
    """``edge bench quantized --backend tflite``: ``module.run_litert(args)``, rows checked, goals added here."""
    result = dict(module.run_litert(args))
    rows = result.get("rows")
    if not isinstance(rows, list) or not all(isinstance(r, dict) and {"model", "base"} <= set(r) for r in rows):
        raise ConfigError(f"{LITERT_BENCH}.run_litert returned no rows in this bench's shape (model, base, ...)")
    result.setdefault("goals", goals(rows))
    return result
