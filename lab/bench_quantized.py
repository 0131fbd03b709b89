"""Fused adapters on an int8 base: bytes, inference, memory, switch and accuracy per model and base precision.

``edge bench quantized`` (issue 18). Per model (the demo ViT, the demo CNN, MiniLM) and per base
(``fp32``; ``int8-dynamic``: onnxruntime ``quantize_dynamic``; ``int8-static``: ``quantize_static``
QDQ calibrated on the training digits of every domain or on sentences; both via :func:`exporters.quantize_onnx`,
see :data:`BASES` for the recipes and what each choice measured):

* ``bytes``: the model file; ``rss_mb``: resident memory of a switchable ``hybrid`` runtime after
  a switch cycle, above a baseline child (``lab.bench_memory``: fresh children), and
  ``plain_rss_mb`` a plain onnxruntime session's;
* ``infer_ms_p50``: batch 1, the hybrid runtime settled with an adapter switched in, and
  ``static_infer_ms_p50`` a plain session on the same file, paired within rounds (every base's
  contestants interleaved in each round);
* ``switch_ms_p50``: base -> adapter, one random SHiRA adapter of the same entries on every base
  (density 1 %; on an int8 base it is requantized at load, clipped entries counted);
* ``mean_acc_base`` / ``mean_acc_adapted``: mean test accuracy over the demo domains of the base
  and of the base with each domain's SHiRA adapter: fp32 adapters on fp32, *integer* SHiRA
  (:func:`exporters.train_shira_int`, same mask kind, density and learning rate, ``INT_EPOCHS_X`` times the
  epochs; on the static base with the graph's activation grids in the loop) on int8;
  ``mean_acc_requantized`` the fp32 adapters requantized onto the int8 grid at load (the float path;
  ``requantized_clipped_per_adapter`` of ``requantized_nnz`` entries clipped, means over the domains).
  MiniLM has no labels: ``cosine_base`` / ``cosine_adapted`` are the mean cosine of its embeddings to
  the fp32 model's (adapted: both with the same random float adapter).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from edge.errors import ConfigError, EdgeError
from edge.machine import load_average
from edge.runtime import Runtime
from lab.bench_quantized_timing import paired_timings, switchable
from lab.benchmarks import default_targets, random_shira

__all__ = ["BASES", "GOALS", "add_arguments", "bench_quantized", "calibration_set", "cli", "family_options", "markdown"]

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
DEMO_FAMILIES = ("vit", "cnn")
#: keys of a BASES entry that are this bench's, not quantize_onnx's: the calibration set (:func:`calibration_set`),
#: and whether integer SHiRA trains with the static graph's activation grids in the loop (``activation_grid``)
_BENCH_KEYS = ("calib", "train_activations")
INT_EPOCHS_X = 1  # integer SHiRA trains this many times the fp32 recipe's epochs (1: the same recipe)
GOALS = {"acc_gap_points": 1.0, "infer_overhead_pct": 3.0, "switch_x": 1.0}
SENTENCES = [
    "An edge device adapts to drifting data.",
    "The sensor on the shop floor reports a new kind of vibration.",
    "Translate the manual into plain words for the night shift.",
    "A camera at the gate sees more rain than it did last week.",
    "Small models run on cheap boards without a network.",
    "The update arrived overnight and the pump kept running.",
    "Switching adapters costs less than loading another model.",
    "Quantized weights take a quarter of the memory.",
]


def quantized_model(src: Path, opts: dict, calib: dict, check: dict, store: Path) -> tuple[Path, dict]:
    """The cached int8 twin of ``src`` quantized with ``opts`` (once per float fingerprint and options)."""
    from exporters.onnx import load_model_info
    from exporters.quantize import EXPORTER_VERSION, quantize_onnx

    blob = json.dumps([load_model_info(src).fingerprint, opts, EXPORTER_VERSION], sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()
    out = store / f"{src.stem}.{opts['mode']}.{key[:12]}.onnx"
    report_path = out.with_suffix(".json")
    if not out.exists() or not report_path.exists():
        args = {k: v for k, v in opts.items() if k not in _BENCH_KEYS}  # in the key, but not quantize_onnx options
        report = quantize_onnx(src, out, calib=calib, check=check, min_cosine=0.9, **args)
        report_path.write_text(json.dumps(report.as_dict()))
    return out, json.loads(report_path.read_text())


def family_options(opts: dict | None, family: str) -> dict | None:
    """A BASES entry for one demo family: each value given per family (a dict keyed by every family) is its own."""
    if opts is None:
        return None
    return {k: v[family] if isinstance(v, dict) and set(v) == set(DEMO_FAMILIES) else v for k, v in opts.items()}


def calibration_set(domains: dict, kind: str, n: int = 512) -> np.ndarray:
    """Static quantization's calibration images: ``clean`` (the first ``n`` clean training digits) or ``domains``
    (``n`` drawn evenly from the clean and every shifted domain's training split: the inputs the device will see,
    so activation ranges cover inverted and noisy digits too; test splits are never used)."""
    if kind == "clean":
        return domains["clean"].x_train[:n]
    if kind != "domains":
        raise ConfigError(f"calibration set {kind!r}: known clean, domains")
    rng = np.random.default_rng(0)
    per = -(-n // len(domains))
    parts = [d.x_train[rng.permutation(len(d.x_train))[:per]] for d in domains.values()]
    return np.ascontiguousarray(np.concatenate(parts)[rng.permutation(per * len(domains))[:n]])


def _accuracy(rt: Runtime, d, name: str | None) -> float:
    rt.switch(name, clip=True)
    y = rt.run({"pixels": np.ascontiguousarray(d.x_test)})["logits"]
    return float((y.argmax(1) == d.y_test).mean())


def demo_rows(family: str, cache: Path, bases: list[str], progress: bool) -> tuple[dict, dict]:
    """Accuracy rows per base for a demo encoder (training integer SHiRA per domain, cached), and the files."""
    import torch

    from exporters import shira
    from exporters.qshira import activation_grid, int_shira_adapter, quantized_base, train_shira_int
    from lab import digits_model as dm
    from lab.datasets import load_domains
    from lab.pipeline import DemoConfig, prepare_demo

    cfg = DemoConfig(model=family)
    art = prepare_demo(cache, cfg, progress=progress)
    domains = load_domains(cfg.domains, seed=cfg.seed)
    clean = domains["clean"]
    store = art.model.parent / "quantized"
    store.mkdir(exist_ok=True)
    model = dm.load_checkpoint(art.model.parent / "encoder.safetensors")
    targets = shira.select_targets(model, list(cfg.targets))
    rows, files = {}, {}
    for base in bases:
        row: dict = {"model": cfg.name, "base": base}
        opts = family_options(BASES[base]["demo"], family)
        if opts is None:
            path, adapters = art.model, dict(art.adapters)
        else:
            calib = {"pixels": calibration_set(domains, opts.get("calib", "clean"))}
            path, row["quantization"] = quantized_model(art.model, opts, calib, {"pixels": clean.x_test[:64]}, store)
            info, qbase = quantized_base(path)
            grids = activation_grid(path) if opts.get("train_activations") else None
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
                        epochs = INT_EPOCHS_X * cfg.shira_epochs
                        trained = train_shira_int(
                            model, masks, qbase, d.x_train, d.y_train, epochs=epochs, lr=cfg.shira_lr, activations=grids
                        )
                        meta = {"mask": cfg.mask, "density": cfg.density, "domain": dn, "epochs": epochs}
                        int_shira_adapter(trained, info, dn, meta).save(out)
                    adapters[dn] = out
            finally:
                torch.set_num_threads(threads)
        with Runtime(path, strategy="bound") as rt:
            for dn, a in adapters.items():
                rt.load_adapter(a, name=dn)
            accs = {dn: (_accuracy(rt, domains[dn], None), _accuracy(rt, domains[dn], dn)) for dn in cfg.domains}
            if opts is not None:  # the float path: fp32 adapters requantized onto this base at load
                clipped, req, nnz = 0, [], []
                for dn, a in art.adapters.items():
                    rt.load_adapter(a, name=f"{dn}-float", clip=True)
                    req.append(_accuracy(rt, domains[dn], f"{dn}-float"))
                    clipped += rt.clipped
                    nnz.append(rt.adapter(f"{dn}-float").nnz)
                row["mean_acc_requantized"] = float(np.mean(req))
                row["requantized_clipped_per_adapter"] = clipped / len(req)
                row["requantized_nnz"] = float(np.mean(nnz))  # entries per fp32 adapter, mean over domains
        row["mean_acc_base"] = float(np.mean([b for b, _ in accs.values()]))
        row["mean_acc_adapted"] = float(np.mean([a for _, a in accs.values()]))
        row["per_domain"] = {dn: {"base": b, "adapted": a} for dn, (b, a) in accs.items()}
        rows[base] = row
        files[base] = (path, {"pixels": np.ascontiguousarray(clean.x_test[:1])})
    return rows, files


def minilm_rows(cache: Path, bases: list[str], progress: bool) -> tuple[dict, dict]:
    """Embedding cosine to the fp32 model per base (base, and with one random float adapter on both)."""
    from exporters import minilm

    src = cache / "minilm" / "all-MiniLM-L6-v2.onnx"
    if not src.exists():
        minilm.export_minilm(src, progress=progress)
    feeds = minilm.tokenize(SENTENCES, seq_len=128)
    one = {k: np.ascontiguousarray(v[:1]) for k, v in feeds.items()}
    rows, files, ref = {}, {}, {}
    for base in bases:
        row: dict = {"model": "all-MiniLM-L6-v2", "base": base}
        path, opts = src, BASES[base]["minilm"]
        if opts is not None:
            path, row["quantization"] = quantized_model(src, opts, feeds, feeds, cache / "minilm")
        with Runtime(path, strategy="bound") as rt:
            info = rt.info
            names = default_targets(info)
            a = random_shira(info, names, 0.01, seed=1, name="A")
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
    """Per base on onnxruntime: :func:`paired_timings` against a plain session on the same file."""
    import onnxruntime as ort

    contestants = {}
    for base, (path, feeds) in files.items():
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        plain = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        contestants[base] = (switchable(path, threads=threads), lambda f, p=plain: p.run(None, dict(f)), feeds)
    out = paired_timings(contestants, rounds, runs, switches)
    for base, (path, _) in files.items():
        out[base]["bytes"] = Path(path).stat().st_size
    return out


def bench_quantized(
    cache: Path,
    *,
    models: list[str],
    bases: list[str] | None = None,
    threads: int | None = None,
    rounds: int = 5,
    runs: int = 20,
    switches: int = 20,
    memory: bool = True,
    progress: bool = True,
) -> dict:
    from lab.bench_memory import bench_memory

    bases = list(bases or BASES)
    rows = []
    for m in models:
        rows_m, files = minilm_rows(cache, bases, progress) if m == "minilm" else demo_rows(m, cache, bases, progress)
        t = timings(files, threads, rounds, runs, switches)
        for b in bases:
            row = {**rows_m[b], **t[b], "load_1m": (load_average() or [None])[0]}
            if memory:
                path, feeds = files[b]
                try:
                    mem = bench_memory(path, feeds, strategies=["hybrid"], threads=threads, repeat=1, progress=False)
                except EdgeError as e:  # e.g. its probe's random adapter saturates this int8 base: say so
                    row["rss_error"] = str(e)[-300:]
                    mem = None
                if mem is not None:
                    row["rss_mb"], row["plain_rss_mb"] = mem["strategies"]["hybrid"]["rss_mb"], mem["plain"]["rss_mb"]
            rows.append(row)
    return {"rows": rows, "goals": goals(rows), "threads": threads, "rounds": rounds, "runs_per_round": runs}


def goals(rows: list[dict]) -> dict:
    """The issue's goals per model, from figures measured in this run."""
    out = {}
    by = {(r["model"], r["base"]): r for r in rows}
    for (model, base), r in by.items():
        f = by.get((model, "fp32"))
        if base == "fp32" or f is None:
            continue
        g = {}
        if "mean_acc_adapted" in r:
            gap = 100.0 * (f["mean_acc_adapted"] - r["mean_acc_adapted"])
            g["acc_gap_points"] = {"value": round(gap, 2), "limit": GOALS["acc_gap_points"], "met": gap <= 1.0}
        ov = r.get("infer_overhead_pct", 100.0 * (r["infer_ms_p50"] / r["static_infer_ms_p50"] - 1.0))
        g["infer_overhead_pct"] = {"value": round(ov, 1), "limit": GOALS["infer_overhead_pct"], "met": ov <= 3.0}
        if r.get("rss_mb") is not None and f.get("plain_rss_mb") is not None:
            g["rss_below_fp32_plain"] = {"value": round(r["rss_mb"], 1), "limit": round(f["plain_rss_mb"], 1)}
            g["rss_below_fp32_plain"]["met"] = r["rss_mb"] < f["plain_rss_mb"]
        x = r.get("switch_x_fp32_paired", r["switch_ms_p50"] / f["switch_ms_p50"])  # paired within rounds
        g["switch_x_fp32"] = {"value": round(x, 2), "limit": GOALS["switch_x"], "met": x <= 1.0}
        out[f"{model}/{base}"] = g
    return out


def markdown(result: dict) -> str:
    lines = [
        "| model | base | bytes | infer ms p50 (plain) | rss MB (plain) | switch ms p50 | base acc / cos "
        "| adapted acc / cos | fp32 adapter requantized (clipped) | load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        acc_b = r.get("mean_acc_base", r.get("cosine_base"))
        acc_a = r.get("mean_acc_adapted", r.get("cosine_adapted"))
        req = (
            f"{r['mean_acc_requantized']:.3f} "
            f"({r['requantized_clipped_per_adapter']:.0f} of {r['requantized_nnz']:,.0f})"
            if "mean_acc_requantized" in r
            else "-"
        )
        rss = f"{r['rss_mb']:.1f} ({r['plain_rss_mb']:.1f})" if r.get("rss_mb") is not None else "not measured"
        lines.append(
            f"| {r['model']} | {r['base']} | {r['bytes']:,} | {r['infer_ms_p50']:.3f} ({r['static_infer_ms_p50']:.3f}) "
            f"| {rss} | {r['switch_ms_p50']:.3f} | {acc_b:.4f} | {acc_a:.4f} | {req} | {r['load_1m']} |"
        )
    unmeasured = [r for r in result["rows"] if "rss_error" in r]
    lines += [f"\n{r['model']} {r['base']}: memory not measured: {r['rss_error']}" for r in unmeasured]
    lines += ["", "Goals (issue 18), from this run's figures:", ""]
    for k, g in result["goals"].items():
        parts = ", ".join(
            f"{n} {v['value']} (limit {v['limit']}: {'met' if v['met'] else 'NOT met'})" for n, v in g.items()
        )
        lines.append(f"- {k}: {parts}")
    return "\n".join(lines)


def add_arguments(sp) -> None:
    sp.add_argument("--model", default="all", choices=["vit", "cnn", "minilm", "all"], help="model(s)")
    sp.add_argument("--bases", nargs="+", choices=list(BASES), default=None, help="base precisions (default: all)")
    sp.add_argument("--rounds", type=int, default=5, help="timing rounds (contestants interleaved in each)")
    sp.add_argument("--runs", type=int, default=20, help="timed inferences per contestant per round")
    sp.add_argument("--no-memory", action="store_true", help="skip the resident-memory children")


def cli(args) -> int:
    from edge.commands import host_needed
    from edge.format.io import write_json
    from edge.machine import machine
    from lab.benchmarks import write_section

    host_needed("edge bench quantized")
    section = ("quantized", "Fused adapters on an int8 base (issue 18)")
    render = markdown
    if args.backend == "tflite":
        module = litert_module()
        result, render = litert_result(module, args), getattr(module, "markdown", markdown)
        section = (
            getattr(module, "SECTION", "quantized:tflite"),
            "Fused adapters on an int8 base on LiteRT (issue 18)",
        )
    elif args.backend != "onnxruntime":
        raise ConfigError(f"edge bench quantized --backend {args.backend!r}: known backends onnxruntime, tflite")
    else:
        models = ["vit", "cnn", "minilm"] if args.model == "all" else [args.model]
        result = bench_quantized(
            args.cache,
            models=models,
            bases=args.bases,
            threads=args.threads,
            rounds=args.rounds,
            runs=args.runs,
            memory=not args.no_memory,
            progress=not args.quiet,
        )
    result["machine"] = machine()
    print(json.dumps(result, indent=1))
    if args.json:
        write_json(args.json, result)
    if args.md:
        write_section(args.md, *section, render(result))
    return 0


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
