"""Fused adapters on an int8 base: bytes, inference, memory, switch and accuracy per model and base precision.

``edge bench quantized`` (issue 18). Per model (the demo ViT, the demo CNN, MiniLM) and per base
(``fp32``; ``int8-dynamic``: onnxruntime ``quantize_dynamic``; ``int8-static``: ``quantize_static``
QDQ calibrated on clean training digits or on sentences; both via :func:`exporters.quantize_onnx`,
weights per tensor with 3x headroom, see :data:`BASES`):

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
  epochs) on int8;
  ``mean_acc_requantized`` the fp32 adapters requantized onto the int8 grid at load (the float path).
  MiniLM has no labels: ``cosine_base`` / ``cosine_adapted`` are the mean cosine of its embeddings to
  the fp32 model's (adapted: both with the same random float adapter).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from edge.errors import EdgeError
from edge.machine import load_average, p50, time_calls
from edge.runtime import Runtime
from lab.benchmarks import default_targets, random_shira

__all__ = ["BASES", "GOALS", "add_arguments", "bench_quantized", "cli", "markdown"]

#: base name -> quantize_onnx options per model family (None: the float model). Demo encoders: per tensor with 4x
#: headroom (scales cover four times each weight's largest magnitude). Measured on the demo ViT (rotate, invert; 30
#: epochs): integer SHiRA 0.83/0.88 with 4x, 0.82/0.88 with 3x, 0.80/0.85 with 2x, 0.63 on rotate with none (the
#: largest, most adapted weights sit at the integer limits and cannot move outward); per channel was worse (0.55-0.76
#: on rotate). MiniLM (no trained adapters) keeps onnxruntime's defaults: headroom costs its embeddings precision
#: (cosine 0.81 at 3x vs 0.97), and static QDQ of every op gave cosine 0.40, so static quantizes MatMuls per channel
BASES = {
    "fp32": {"demo": None, "minilm": None},
    "int8-dynamic": {"demo": {"mode": "dynamic", "headroom": 4.0}, "minilm": {"mode": "dynamic"}},
    "int8-static": {
        "demo": {"mode": "static", "headroom": 4.0},
        "minilm": {"mode": "static", "per_channel": True, "op_types": ["MatMul"]},
    },
}
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
        report = quantize_onnx(src, out, calib=calib, check=check, min_cosine=0.9, **opts)
        report_path.write_text(json.dumps(report.as_dict()))
    return out, json.loads(report_path.read_text())


def _accuracy(rt: Runtime, d, name: str | None) -> float:
    rt.switch(name, clip=True)
    y = rt.run({"pixels": np.ascontiguousarray(d.x_test)})["logits"]
    return float((y.argmax(1) == d.y_test).mean())


def demo_rows(family: str, cache: Path, bases: list[str], progress: bool) -> tuple[dict, dict]:
    """Accuracy rows per base for a demo encoder (training integer SHiRA per domain, cached), and the files."""
    import torch

    from exporters import shira
    from exporters.qshira import int_shira_adapter, quantized_base, train_shira_int
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
        opts = BASES[base]["demo"]
        if opts is None:
            path, adapters = art.model, dict(art.adapters)
        else:
            calib = {"pixels": clean.x_train[:512]}
            path, row["quantization"] = quantized_model(art.model, opts, calib, {"pixels": clean.x_test[:64]}, store)
            info, qbase = quantized_base(path)
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
                            model, masks, qbase, d.x_train, d.y_train, epochs=epochs, lr=cfg.shira_lr
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
                clipped, req = 0, []
                for dn, a in art.adapters.items():
                    rt.load_adapter(a, name=f"{dn}-float", clip=True)
                    req.append(_accuracy(rt, domains[dn], f"{dn}-float"))
                    clipped += rt.clipped
                    nnz = rt.adapter(f"{dn}-float").nnz
                row["mean_acc_requantized"] = float(np.mean(req))
                row["requantized_clipped_per_adapter"] = clipped / len(req)
                row["adapter_nnz"] = nnz
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
    """Per base: switch time of one random SHiRA adapter (the same entries on every base), and inference p50 of the
    settled hybrid runtime and of a plain onnxruntime session on the same file, interleaved within rounds."""
    import onnxruntime as ort

    out, contestants = {}, {}
    for base, (path, feeds) in files.items():
        rt = Runtime(path, strategy="hybrid", threads=threads)
        info = rt.info
        a = random_shira(info, default_targets(info), 0.01, seed=1, name="A")
        if info.float_fingerprint is not None:
            a = type(a)("A", info.float_fingerprint, a.tensors, a.shapes, info=a.info)
        rt.load_adapter(a, clip=True)
        sw = []
        for i in range(switches + 2):
            rt.switch(None)
            rt.wait_settled()
            t0 = time.perf_counter()
            rt.switch("A", clip=True)
            t1 = time.perf_counter()
            rt.wait_settled()
            if i >= 2:
                sw.append((t1 - t0) * 1e3)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        plain = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        out[base] = {"switch_ms_p50": p50(sw), "adapter_nnz": a.nnz, "bytes": Path(path).stat().st_size}
        contestants[base] = (rt, plain, feeds)
    times = {b: {"rt": [], "plain": []} for b in files}
    for _ in range(rounds):
        for b, (rt, plain, feeds) in contestants.items():
            times[b]["plain"] += time_calls(lambda p=plain, f=feeds: p.run(None, dict(f)), runs)
            times[b]["rt"] += time_calls(lambda r=rt, f=feeds: r.run(f), runs)
    for b, (rt, _, _) in contestants.items():
        out[b]["infer_ms_p50"] = p50(times[b]["rt"])
        out[b]["static_infer_ms_p50"] = p50(times[b]["plain"])
        out[b]["infer_overhead_pct"] = 100.0 * (out[b]["infer_ms_p50"] / out[b]["static_infer_ms_p50"] - 1.0)
        rt.close()
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
        ov = r["infer_overhead_pct"]
        g["infer_overhead_pct"] = {"value": round(ov, 1), "limit": GOALS["infer_overhead_pct"], "met": ov <= 3.0}
        if r.get("rss_mb") is not None and f.get("plain_rss_mb") is not None:
            g["rss_below_fp32_plain"] = {"value": round(r["rss_mb"], 1), "limit": round(f["plain_rss_mb"], 1)}
            g["rss_below_fp32_plain"]["met"] = r["rss_mb"] < f["plain_rss_mb"]
        x = r["switch_ms_p50"] / f["switch_ms_p50"]
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
            f"{r['mean_acc_requantized']:.3f} ({r['requantized_clipped_per_adapter']:.0f} of {r['adapter_nnz']})"
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
        write_section(args.md, "quantized", "Fused adapters on an int8 base (issue 18)", markdown(result))
    return 0
