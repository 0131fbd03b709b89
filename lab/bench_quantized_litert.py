"""Fused adapters on an int8 base on LiteRT: bytes, inference, memory, switch and accuracy per model and base.

The LiteRT twin of :mod:`lab.bench_quantized` (issue 18), rows of the same shape
(``{"model", "base", "bytes", "infer_ms_p50", "rss_mb", "switch_ms_p50", "mean_acc_base",
"mean_acc_adapted"}`` plus context). Per demo encoder (ViT, CNN) exported to ``.tflite``, and MiniLM (its
embeddings' cosine to the fp32 model's instead of accuracy: ``cosine_base``, ``cosine_adapted`` with the same
random float adapter on both; dynamic: the quantizer's defaults; static: ``FULLY_CONNECTED`` ops only), per base:

* ``fp32``: the float ``.tflite`` file; ``int8-dynamic``: :func:`exporters.tflite_quant.quantize_tflite`
  dynamic-range int8 (AI Edge Quantizer, weights per tensor with 4x headroom, FULLY_CONNECTED and
  DEPTHWISE_CONV_2D); ``int8-static``: int8 activations calibrated on training digits of every domain (the
  same weights), full integer on the CNN (int8 inputs and outputs: the bench quantizes the pixels with the
  input's scale), on the ViT around its FULLY_CONNECTED ops only (float input and logits); its integer SHiRA
  trains with the graph's activation grids in the loop;
* ``infer_ms_p50``: batch 1, the ``hybrid`` runtime settled with an adapter switched in, and
  ``static_infer_ms_p50`` a plain LiteRT interpreter (XNNPACK) on the same file and the same threads as the
  runtime's XNNPACK interpreter (``interpreter_threads``: 1 where dynamic-range ops are left to the built-in
  kernels, which collapse on 2), paired within rounds (every base's contestants interleaved in each round);
* ``switch_ms_p50``: base -> adapter, one random SHiRA adapter of the same entries on every base
  (density 1 %; requantized onto an int8 base at load, clipped entries counted);
* ``rss_mb``: resident memory of the switchable hybrid runtime after a switch cycle, in a fresh child,
  above a baseline child; ``plain_rss_mb`` a plain interpreter's;
* ``mean_acc_base`` / ``mean_acc_adapted``: mean test accuracy over the demo domains of the base and of the
  base with each domain's SHiRA adapter: the fp32 adapters on fp32, *integer* SHiRA trained on the
  ``.tflite`` file's own grid (:func:`exporters.train_shira_int`, the demo's mask, density, epochs and
  learning rate) on int8; ``mean_acc_requantized``: the fp32 adapters requantized at load (the float path).
  Measured on XNNPACK (strategy ``rebuild``: what a settled ``hybrid`` runtime serves);
  ``mean_acc_adapted_builtin`` on the built-in kernels (what serves in hybrid's settle window). They differ on a
  dynamic-range base: XNNPACK quantizes each activation row asymmetrically, the built-in kernel symmetrically
  (``asymmetric_quantize_inputs`` off, so that it reads the int8 weights at every run).

``edge bench quantized --backend tflite`` (through :func:`run_litert`) or
``python -m lab.bench_quantized_litert [--model vit|cnn|minilm|all] [--json P] [--md P]`` (section
``bench:quantized:tflite``); in the TFLite venv (litert-torch, ai-edge-quantizer).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np

from edge.machine import load_average
from edge.runtime import Runtime
from lab.bench_quantized_timing import paired_timings, switchable
from lab.benchmarks import default_targets, random_shira
from lab.litert_probe import memory, plain_interpreter

__all__ = ["BASES", "SECTION", "bench_quantized_litert", "goals", "main", "markdown", "run_litert"]

#: base name -> quantize_tflite options per model family (None: the float model). Demo encoders: per tensor with 4x
#: headroom, as the ONNX bench's demo bases (lab.bench_quantized.BASES: per channel trained integer SHiRA to lower
#: accuracy there and here). MiniLM (no trained adapters) keeps the quantizer's defaults; full integer on every op gave
#: its embeddings cosine 0.64 to fp32, on the FULLY_CONNECTED ops only 0.95. A family's own entry ("vit", "cnn")
#: overrides "demo": the ViT's static base quantizes around its weight ops only (FULLY_CONNECTED; the rest float, as
#: lab.bench_quantized's static recipe): integer SHiRA mean accuracy 0.840 vs 0.834 on every op (fp32 0.850)
BASES = {
    "fp32": {"demo": None, "minilm": None},
    "int8-dynamic": {
        "demo": {"mode": "dynamic", "per_channel": False, "headroom": 4.0},
        "minilm": {"mode": "dynamic"},
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
        "minilm": {"mode": "static", "op_types": ["FULLY_CONNECTED"]},
    },
}
#: BASES keys that are this bench's, not quantize_tflite's: train integer SHiRA with the full-integer graph's activation
#: grids in the loop (exporters.tflite_quant.tflite_activation_grid)
_BENCH_KEYS = ("train_activations",)
SECTION = "quantized:tflite"


def quantized_model(src: Path, opts: dict, calib: dict, store: Path) -> tuple[Path, dict]:
    """The cached int8 twin of ``src`` (once per float fingerprint and options)."""
    from exporters.tflite import load_model_info
    from exporters.tflite_quant import quantize_tflite

    blob = json.dumps([load_model_info(src).fingerprint, opts, 1], sort_keys=True)
    out = store / f"{src.stem}.{opts['mode']}.{hashlib.sha256(blob.encode()).hexdigest()[:12]}.tflite"
    report_path = out.with_suffix(".json")
    if not out.exists() or not report_path.exists():
        args = {k: v for k, v in opts.items() if k not in _BENCH_KEYS}
        report = quantize_tflite(src, out, calib=calib, min_cosine=0.9, **args)
        report_path.write_text(json.dumps(report.as_dict()))
    return out, json.loads(report_path.read_text())


def pixels_for(path: Path, x: np.ndarray) -> np.ndarray:
    """``x`` as the model takes it: float, or int8 quantized with its input's scale (a full-integer model)."""
    from edge.format.tflite import read_tflite

    fb = read_tflite(path.read_bytes())
    t = next(t for t in fb.tensors if t.name == "pixels")
    if t.dtype is not np.int8:
        return np.ascontiguousarray(x, np.float32)
    return np.clip(np.round(x / t.scale[0]) + t.zero_point[0], -128, 127).astype(np.int8)


def _accuracy(rt: Runtime, path: Path, d, name: str | None) -> float:
    rt.switch(name, clip=True)
    y = rt.run({"pixels": pixels_for(path, d.x_test)})["logits"]
    return float((y.argmax(1) == d.y_test).mean())


def demo_rows(family: str, cache: Path, bases: list[str], progress: bool) -> tuple[dict, dict]:
    """Accuracy rows per base (integer SHiRA per domain trained on the .tflite grid, cached), and the files."""
    import torch

    from exporters import shira
    from exporters.qshira import int_shira_adapter, train_shira_int
    from exporters.tflite_quant import tflite_activation_grid, tflite_quantized_base
    from lab import digits_model as dm
    from lab.bench_quantized import calibration_set
    from lab.datasets import load_domains
    from lab.pipeline import DemoConfig, prepare_demo

    cfg = DemoConfig(model=family)
    art = prepare_demo(cache, cfg, progress=progress, backend="tflite")
    domains = load_domains(cfg.domains, seed=cfg.seed)
    clean = domains["clean"]
    store = art.model.parent / "quantized"
    store.mkdir(exist_ok=True)
    model = dm.load_checkpoint(art.model.parent / "encoder.safetensors")
    targets = shira.select_targets(model, list(cfg.targets))
    rows, files = {}, {}
    for base in bases:
        row: dict = {"model": cfg.name, "base": base}
        opts = BASES[base].get(family, BASES[base]["demo"])
        if opts is None:
            path, adapters = art.model, dict(art.adapters)
        else:
            calib = {"pixels": calibration_set(domains, "domains")}
            path, row["quantization"] = quantized_model(art.model, opts, calib, store)
            info, qbase = tflite_quantized_base(path)
            grids = tflite_activation_grid(path) if opts.get("train_activations") else None
            adapters = {}
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # small models: one thread trains fastest on a shared machine
            try:
                for dn in cfg.domains:
                    out = store / f"{path.stem}.ishira-{dn}.safetensors"
                    if not out.exists():
                        d = domains[dn]
                        masks = shira.make_masks(
                            model, targets, density=cfg.density, kind=cfg.mask, calib=(d.x_train, d.y_train), seed=0
                        )
                        trained = train_shira_int(
                            model,
                            masks,
                            qbase,
                            d.x_train,
                            d.y_train,
                            epochs=cfg.shira_epochs,
                            lr=cfg.shira_lr,
                            activations=grids,
                        )
                        meta = {"mask": cfg.mask, "density": cfg.density, "domain": dn, "epochs": cfg.shira_epochs}
                        int_shira_adapter(trained, info, dn, meta).save(out)
                    adapters[dn] = out
            finally:
                torch.set_num_threads(threads)
        with Runtime(path, backend="tflite", strategy="rebuild") as rt:  # XNNPACK: what a settled hybrid serves
            for dn, a in adapters.items():
                rt.load_adapter(a, name=dn)
            accs = {
                dn: (_accuracy(rt, path, domains[dn], None), _accuracy(rt, path, domains[dn], dn)) for dn in adapters
            }
            if opts is not None:  # the float path: fp32 adapters requantized onto this base at load
                clipped, req, nnz = 0, [], []
                for dn, a in art.adapters.items():
                    rt.load_adapter(a, name=f"{dn}-float", clip=True)
                    req.append(_accuracy(rt, path, domains[dn], f"{dn}-float"))
                    clipped += rt.clipped
                    nnz.append(rt.adapter(f"{dn}-float").nnz)
                row["mean_acc_requantized"] = float(np.mean(req))
                row["requantized_clipped_per_adapter"] = clipped / len(req)
                row["requantized_nnz"] = float(np.mean(nnz))  # entries per fp32 adapter, mean over domains
        with Runtime(path, backend="tflite", strategy="builtin") as rt:  # what serves in hybrid's settle window
            for dn, a in adapters.items():
                rt.load_adapter(a, name=dn)
            row["mean_acc_adapted_builtin"] = float(np.mean([_accuracy(rt, path, domains[dn], dn) for dn in adapters]))
        row["mean_acc_base"] = float(np.mean([b for b, _ in accs.values()]))
        row["mean_acc_adapted"] = float(np.mean([a for _, a in accs.values()]))
        row["per_domain"] = {dn: {"base": b, "adapted": a} for dn, (b, a) in accs.items()}
        rows[base] = row
        files[base] = (path, {"pixels": pixels_for(path, clean.x_test[:1])})
    return rows, files


def minilm_rows(cache: Path, bases: list[str], progress: bool) -> tuple[dict, dict]:
    """Embedding cosine to the fp32 model per base (base, and with one random float adapter on both; XNNPACK)."""
    from exporters import minilm
    from lab.bench_litert import export_bench_model
    from lab.bench_quantized import SENTENCES

    src, _ = export_bench_model("minilm", cache, quiet=not progress)
    feeds = {k: v.astype(np.int32) for k, v in minilm.tokenize(SENTENCES, seq_len=128).items()}  # litert-torch: int32
    one = {k: np.ascontiguousarray(v[:1]) for k, v in feeds.items()}
    rows, files, ref = {}, {}, {}
    for base in bases:
        row: dict = {"model": "all-MiniLM-L6-v2", "base": base}
        path, opts = src, BASES[base]["minilm"]
        if opts is not None:
            path, row["quantization"] = quantized_model(src, opts, feeds, src.parent)
        with Runtime(path, backend="tflite", strategy="rebuild") as rt:
            info = rt.info
            a = random_shira(info, default_targets(info), 0.01, seed=1, name="A")
            if info.float_fingerprint is not None:  # the float adapter, for the float twin: requantized at load
                a = type(a)("A", info.float_fingerprint, a.tensors, a.shapes, info=a.info)
            rt.load_adapter(a, clip=True)
            embs = {"base": rt.run(feeds)["embeddings"]}
            rt.switch("A", clip=True)
            embs["adapted"] = rt.run(feeds)["embeddings"]
            row["adapter_clipped"] = rt.clipped
        if opts is None:
            ref = embs
        for k, e in embs.items():
            cos = (e * ref[k]).sum(1) / np.linalg.norm(e, axis=1) / np.linalg.norm(ref[k], axis=1)
            row[f"cosine_{k}"] = float(cos.mean())
        rows[base] = row
        files[base] = (path, one)
    return rows, files


def timings(files: dict, threads: int | None, rounds: int, runs: int, switches: int) -> dict:
    """Per base on LiteRT: :func:`lab.bench_quantized.paired_timings` against a plain interpreter on the same file."""
    contestants, held = {}, {}
    for base, (path, feeds) in files.items():
        rt = switchable(path, backend="tflite", threads=threads)
        # the plain interpreter runs on the threads the runtime's XNNPACK interpreter was held to (1 where it leaves
        # dynamic-range ops to the built-in kernels, runtimes.litert.one_thread_reason): same kernels, same threads
        held[base] = rt.backend.interpreter_threads
        contestants[base] = (rt, plain_interpreter(path, held[base].get("xnnpack", threads)), feeds)
    out = paired_timings(contestants, rounds, runs, switches)
    for base, (path, _) in files.items():
        out[base].update(bytes=Path(path).stat().st_size, interpreter_threads=held[base])
    return out


def bench_quantized_litert(
    cache: Path,
    *,
    models: list[str],
    bases: list[str] | None = None,
    threads: int | None = None,
    rounds: int = 5,
    runs: int = 20,
    switches: int = 20,
    with_memory: bool = True,
    progress: bool = True,
) -> dict:
    bases = list(bases or BASES)
    rows = []
    for m in models:
        rows_m, files = minilm_rows(cache, bases, progress) if m == "minilm" else demo_rows(m, cache, bases, progress)
        t = timings(files, threads, rounds, runs, switches)
        for b in bases:
            row = {**rows_m[b], **t[b], "load_1m": (load_average() or [None])[0]}
            if with_memory:
                row.update(memory(*files[b], threads))
            rows.append(row)
    return {
        "rows": rows,
        "goals": goals(rows),
        "backend": "tflite",
        "threads": threads,
        "rounds": rounds,
        "runs_per_round": runs,
    }


def goals(rows: list[dict]) -> dict:
    """The issue's goals per model and int8 base, from figures measured in this run (as lab.bench_quantized)."""
    out = {}
    by = {(r["model"], r["base"]): r for r in rows}
    for (model, base), r in by.items():
        f = by.get((model, "fp32"))
        if base == "fp32" or f is None:
            continue
        ov, x = r["infer_overhead_pct"], r["switch_ms_p50"] / f["switch_ms_p50"]
        g = {}
        if "mean_acc_adapted" in r:  # MiniLM has no labels: cosine to fp32 instead, no accuracy goal
            gap = 100.0 * (f["mean_acc_adapted"] - r["mean_acc_adapted"])
            g["acc_gap_points"] = {"value": round(gap, 2), "limit": 1.0, "met": gap <= 1.0}
        g["infer_overhead_pct"] = {"value": round(ov, 1), "limit": 3.0, "met": ov <= 3.0}
        g["switch_x_fp32"] = {"value": round(x, 2), "limit": 1.0, "met": x <= 1.0}
        if r.get("rss_mb") is not None and f.get("plain_rss_mb") is not None:
            g["rss_below_fp32_plain"] = {
                "value": round(r["rss_mb"], 1),
                "limit": round(f["plain_rss_mb"], 1),
                "met": r["rss_mb"] < f["plain_rss_mb"],
            }
        out[f"{model}/{base}"] = g
    return out


def markdown(result: dict) -> str:
    lines = [
        "| model | base | bytes | infer ms p50 (plain) | rss MB (plain) | switch ms p50 | base acc / cos | adapted acc "
        "/ cos (built-in kernels) | fp32 adapter requantized (clipped) | load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        req = (
            f"{r['mean_acc_requantized']:.3f} "
            f"({r['requantized_clipped_per_adapter']:.0f} of {r['requantized_nnz']:,.0f})"
            if "mean_acc_requantized" in r
            else "-"
        )
        rss = f"{r['rss_mb']:.1f} ({r['plain_rss_mb']:.1f})" if r.get("rss_mb") is not None else "not measured"
        builtin = f" ({r['mean_acc_adapted_builtin']:.4f})" if "mean_acc_adapted_builtin" in r else ""
        acc_b, acc_a = r.get("mean_acc_base", r.get("cosine_base")), r.get("mean_acc_adapted", r.get("cosine_adapted"))
        lines.append(
            f"| {r['model']} | {r['base']} | {r['bytes']:,} | {r['infer_ms_p50']:.3f} ({r['static_infer_ms_p50']:.3f}) "
            f"| {rss} | {r['switch_ms_p50']:.3f} | {acc_b:.4f} | {acc_a:.4f}{builtin} "
            f"| {req} | {r['load_1m']} |"
        )
    lines += ["", "Goals (issue 18), from this run's figures:", ""]
    for k, g in result.get("goals", {}).items():
        parts = ", ".join(
            f"{n} {v['value']} (limit {v['limit']}: {'met' if v['met'] else 'NOT met'})" for n, v in g.items()
        )
        lines.append(f"- {k}: {parts}")
    return "\n".join(lines)


def add_arguments(ap) -> None:
    ap.add_argument("--model", default="all", choices=["vit", "cnn", "minilm", "all"], help="model(s)")
    ap.add_argument("--bases", nargs="+", choices=list(BASES), default=None, help="base precisions (default: all)")
    ap.add_argument("--rounds", type=int, default=5, help="timing rounds (contestants interleaved in each)")
    ap.add_argument("--runs", type=int, default=20, help="timed inferences per contestant per round")
    ap.add_argument("--no-memory", action="store_true", help="skip the resident-memory children")


def run_litert(args) -> dict:
    """The bench for parsed ``edge bench quantized --backend tflite`` arguments (``lab.bench_quantized.cli``)."""
    return bench_quantized_litert(
        Path(args.cache),
        models=["vit", "cnn", "minilm"] if args.model == "all" else [args.model],
        bases=args.bases,
        threads=args.threads,
        rounds=args.rounds,
        runs=args.runs,
        with_memory=not args.no_memory,
        progress=not args.quiet,
    )


def cli(args) -> int:
    """``python -m lab.bench_quantized_litert``: the JSON printed, optionally written, and its section."""
    from edge.format.io import write_json
    from edge.machine import machine
    from lab.benchmarks import write_section

    result = run_litert(args)
    result["machine"] = machine()
    print(json.dumps(result, indent=1))
    if args.json:
        write_json(args.json, result)
    if args.md:
        write_section(args.md, SECTION, "Fused adapters on an int8 base on LiteRT (issue 18)", markdown(result))
    return 0


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
